"""The lmms-eval adapter: registered under ``modes`` and scoring a tiny offline task like modes does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model

import modes
from modes.engine.compiled import CompiledExperts
from modes.engine.kernels import cpu_supports
from modes.engine.packed import PackedExperts, packing_unsupported
from modes.evaluation import lmms_tasks
from modes.evaluation.lmms import ModesLMM
from modes.evaluation.lmms_tasks import utils as task
from modes.policies import KReductionConfig

TASK_YAML = Path(lmms_tasks.__file__).with_name("modes_bundled.yaml")


def test_lmms_eval_resolves_the_model_name_through_the_entry_point():
    assert get_model("modes") is ModesLMM


def read_task() -> dict:
    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(TASK_YAML.read_text(), Loader=TaskLoader)


def requests_for(samples: list, config: dict) -> tuple[list[Instance], dict]:
    docs = [{"question": s.question, "answer": s.answer, "image": s.image} for s in samples]
    requests = [
        Instance(
            "generate_until",
            (
                task.doc_to_text(doc),
                dict(config["generation_kwargs"]),
                task.doc_to_visual,
                i,
                "modes_bundled",
                "test",
            ),
            idx=0,
            metadata={"task": "modes_bundled", "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]
    return requests, {"modes_bundled": {"test": docs}}


def test_tiny_offline_task_scores_what_modes_evaluate_scores(tmp_path):
    config = read_task()
    for name in ("doc_to_visual", "doc_to_text", "process_results"):
        assert config[name] == f"utils.{name}" and callable(getattr(task, name))
    samples = modes.load_samples(split="test", limit=24)
    requests, task_dict = requests_for(samples, config)
    lm = ModesLMM(batch_size=8)
    lm.task_dict = task_dict
    answers = lm.generate_until(requests)
    scores = [
        task.process_results(doc, [answer])
        for doc, answer in zip(task_dict["modes_bundled"]["test"], answers, strict=True)
    ]
    accuracy = sum(s["exact_match"] for s in scores) / len(scores)
    reference = modes.evaluate(lm.model, lm.processor, samples, batch_size=8, progress=False)
    assert accuracy == reference["accuracy"]
    assert lm.skip_stats() is None

    plan = modes.SkipPlan(policy=KReductionConfig(keep=2), model=modes.model_info(lm.model))
    plan.save(tmp_path / "plan.json")
    skipping = ModesLMM(plan=str(tmp_path / "plan.json"), batch_size=8)
    skipping.task_dict = task_dict
    answers = skipping.generate_until(requests)
    assert skipping.skip_stats()["per_modality"]["text"]["ratio"] == 0.75
    paths = [("pack_weights", PackedExperts)] * (packing_unsupported(torch.float32) is None)
    if cpu_supports(torch.float32):  # AVX-512
        paths.append(("cpu_kernel", CompiledExperts))
    for option, path in paths:
        faster = ModesLMM(plan=str(tmp_path / "plan.json"), batch_size=8, **{option: "True"})
        faster.task_dict = task_dict
        sites = modes.engine.patch.moe_sites(faster.model)
        assert all(isinstance(site.module.cpu_path, path) for site in sites)
        assert faster.generate_until(requests) == answers


def test_boolean_model_args_are_checked():
    with pytest.raises(ValueError, match="pack_weights must be true or false, got 'maybe'"):
        ModesLMM(pack_weights="maybe")
