"""lmms-eval model ``modes``: any transformers MoE VLM, with a skipping plan applied.

    pip install "modes[eval]"
    lmms-eval --model modes --model_args pretrained=Qwen/Qwen3-VL-30B-A3B-Instruct,plan=plan.json \\
        --tasks gqa,chartqa,mme --batch_size 8

lmms-eval finds the name through the ``lmms_eval.models`` entry point in pyproject.toml.
``model_args``: ``pretrained`` (default: the bundled model), ``plan`` (a SkipPlan JSON; none:
the unskipped model), ``device``, ``dtype`` (float32, bfloat16, float16), ``max_new_tokens``,
``pack_weights`` (true: CPU, oneDNN-packed expert weights) or ``cpu_kernel`` (unset: modes'
compiled CPU kernel where it runs; true: insist on it; false: the loop path; see `modes.apply`).
Generation tasks only (``generate_until``), which covers the MoDES paper's benchmarks. The
realised skip ratios of the whole run are in `skip_stats`.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from modes import engine
from modes.data.sample import Sample
from modes.engine import ApplyOptions
from modes.engine.options import execution_of
from modes.evaluation.evaluate import generate_answers
from modes.loading import load_model
from modes.plan import SkipPlan

__all__ = ["ModesLMM", "manifest"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def manifest() -> ModelManifest:
    """The ``lmms_eval.models`` entry point: lmms-eval's model name ``modes``."""
    return ModelManifest(model_id="modes", simple_class_path="modes.evaluation.lmms.ModesLMM")


class ModesLMM(lmms):
    """Greedy generation through `modes.evaluation.generate_answers`, batched, plan applied."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        plan: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_new_tokens: int | str = 16,
        pack_weights: bool | str = False,
        cpu_kernel: bool | str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(
                f"modes: unknown model_args {sorted(unknown)}; accepted: pretrained, plan, device, "
                "dtype, batch_size, max_new_tokens, pack_weights, cpu_kernel"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"modes: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        options = ApplyOptions(
            execution=execution_of(_flag("pack_weights", pack_weights), _flag("cpu_kernel", cpu_kernel))
        )
        self.model, self.processor = load_model(pretrained, dtype=_DTYPES[dtype])
        if device:
            self.model.to(device)
        self.plan = SkipPlan.load(plan) if plan else None
        if self.plan is not None:
            engine.apply(self.model, self.plan, options=options, processor=self.processor)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests: list[Any]) -> list[str]:
        samples, stops = [], []
        for number, request in enumerate(requests):
            context, generation_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            image = next((v for v in visuals if hasattr(v, "convert")), None)
            samples.append(Sample(f"r{number}", context, "", task, image.convert("RGB") if image else None))
            until = generation_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
        new_tokens = max([self.max_new_tokens] + [r.args[1].get("max_new_tokens", 0) for r in requests])
        answers = generate_answers(
            self.model, self.processor, samples, batch_size=self.batch_size, max_new_tokens=new_tokens
        )
        return [_cut(answers[s.id], stop) for s, stop in zip(samples, stops, strict=True)]

    def skip_stats(self) -> dict[str, Any] | None:
        return engine.skip_stats(self.model) if self.plan is not None else None

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "modes: lmms-eval's loglikelihood tasks are not supported; use generation tasks"
        )

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("modes: multi-round generation is not supported; use single-turn tasks")


def _flag(name: str, value: bool | str | None) -> bool | None:
    """A boolean model_arg, as lmms-eval passes it (a bool, or the text after ``name=``; None:
    not given)."""
    if value is None or isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"modes: model_arg {name} must be true or false, got {value!r}")


def _cut(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
