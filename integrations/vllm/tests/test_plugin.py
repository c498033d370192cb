"""modes-vllm against plain vLLM and against modes' transformers engine (runs in vLLM's venv).

Every engine runs in its own process (`run_vllm.py`; `reference.py` in modes' venv, named by
``MODES_PYTHON``), on the first 100 test-split samples of the bundled model, eager and compiled.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PLAN_88 = REPO / "docs/results/plan_88.json"
SAMPLES = 100
DECISIONS = 8  # samples whose per-token decisions are compared (the rest: answers and counts)
MODES = ("eager", "compiled")
MODES_PYTHON = os.environ.get("MODES_PYTHON", str(REPO / ".venv/bin/python"))


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("modes-vllm")


@pytest.fixture(scope="session")
def plans(workdir) -> dict[str, Path]:
    """plan_88 (searched), a seeded random plan, and plan_88 with every threshold 0."""
    zero = json.loads(PLAN_88.read_text())
    zero["policy"]["thresholds"] = dict.fromkeys(zero["policy"]["thresholds"], 0.0)
    (workdir / "zero.json").write_text(json.dumps(zero))
    return {"plan_88": PLAN_88, "random": workdir / "random.json", "zero": workdir / "zero.json"}


@pytest.fixture(scope="session")
def references(workdir, plans) -> dict[str, dict]:
    """modes.apply's answers, decisions and slot counts per plan (the random plan written here)."""
    out = {}
    for name, options in (
        ("plan_88", ["--plan", str(plans["plan_88"])]),
        ("random", ["--random-plan", str(plans["random"]), "--seed", "3"]),
    ):
        path = workdir / f"reference_{name}.json"
        _run(
            [
                MODES_PYTHON,
                str(HERE / "reference.py"),
                str(path),
                *options,
                "--samples",
                str(SAMPLES),
                "--decisions",
                str(DECISIONS),
            ]
        )
        out[name] = json.loads(path.read_text())
    return out


_RUNS: dict[tuple[str | None, str], dict] = {}


@pytest.fixture(scope="session")
def vllm_run(workdir, plans, references):
    """vLLM's results with plan ``name`` (None: no plugin plan) in ``mode``, run once each."""

    def run(name: str | None, mode: str) -> dict:
        if (name, mode) not in _RUNS:
            out = workdir / f"vllm_{name}_{mode}.json"
            env = {"MODES_PLAN": str(plans[name])} if name else {"MODES_PLAN": ""}
            env["VLLM_CACHE_ROOT"] = str(workdir / "vllm-cache")  # shared: the plan must key it
            _run(
                [
                    sys.executable,
                    str(HERE / "run_vllm.py"),
                    str(workdir / "reference_plan_88.json"),
                    str(out),
                    "--mode",
                    mode,
                    "--decisions",
                    str(DECISIONS),
                ],
                env,
            )
            _RUNS[name, mode] = json.loads(out.read_text())
        return _RUNS[name, mode]

    return run


def _layers(forward: dict) -> dict[int, list]:
    return {int(layer): kept for layer, kept in forward.items()}


def test_the_plugin_core_imports_neither_modes_nor_transformers_moe_code():
    code = (
        "import sys, modes_vllm, modes_vllm.skipping; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('modes', 'transformers')))"
    )
    assert _run([sys.executable, "-c", code]).stdout.strip() == "[]"


@pytest.mark.parametrize(("patch", "warns"), [("0", False), (None, True)])
def test_register_warns_on_a_vllm_it_is_not_tested_with(monkeypatch, caplog, patch, warns):
    """A patch release of the tested vLLM is quiet; the next minor release warns."""
    import modes_vllm
    import vllm

    major, minor = (int(part) for part in modes_vllm.TESTED_VLLM.split("."))
    version = f"{major}.{minor}.{patch}" if patch is not None else f"{major}.{minor + 1}.0"
    monkeypatch.setenv("MODES_PLAN", str(PLAN_88))
    monkeypatch.setattr(vllm, "__version__", version)
    with caplog.at_level("WARNING", logger="modes_vllm"):
        modes_vllm.register()
    expected = f"tested with vLLM {modes_vllm.TESTED_VLLM}.x and runs on vLLM {version}"
    assert (expected in caplog.text) == warns


@pytest.mark.parametrize("mode", MODES)
def test_zero_thresholds_give_plain_vllms_tokens_and_logprobs(vllm_run, mode):
    plain, zero = vllm_run(None, mode), vllm_run("zero", mode)
    assert zero["slot_counts"]["skipped"] == 0 and zero["slot_counts"]["routed"] > 0
    assert [s["token_ids"] for s in zero["samples"]] == [s["token_ids"] for s in plain["samples"]]
    assert [s["logprobs"] for s in zero["samples"]] == [s["logprobs"] for s in plain["samples"]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("plan", ["plan_88", "random"])
def test_slot_decisions_equal_modes_apply_token_by_token(references, vllm_run, plan, mode):
    """First samples one at a time: every forward (prefill, then each decode step), layer and token."""
    reference, run = references[plan]["samples"], vllm_run(plan, mode)
    assert len(run["forwards"]) == DECISIONS
    for sample, forwards in zip(reference, run["forwards"], strict=False):
        assert [_layers(f) for f in forwards] == [_layers(f) for f in sample["forwards"]], sample["id"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("plan", ["plan_88", "random"])
def test_batched_answers_and_slot_counts_equal_the_transformers_engine(references, vllm_run, plan, mode):
    """All samples in one batched generate: prompts, greedy answers, and the slots kept per MoE
    layer and modality (text, visual, audio, special) over the whole run."""
    reference, run = references[plan], vllm_run(plan, mode)
    assert len(run["samples"]) == SAMPLES == len(reference["samples"])
    assert sum(s["image_png"] is not None for s in reference["samples"]) >= SAMPLES // 2
    for mine, theirs in zip(run["samples"], reference["samples"], strict=True):
        assert mine["prompt_token_ids"] == theirs["prompt_token_ids"], theirs["id"]
        assert mine["token_ids"] == theirs["token_ids"], theirs["id"]
    counts = run["slot_counts"]["layers"]
    assert set(counts) == set(reference["slot_counts"])
    for layer, theirs in reference["slot_counts"].items():
        assert counts[layer] == theirs, layer
    assert 0 < run["slot_counts"]["skipped"] < run["slot_counts"]["routed"]


def test_the_plan_keys_vllms_compile_cache(vllm_run, plans):
    """Graphs compiled with and without MoDES differ only in an op the cache key cannot see."""
    run = vllm_run("plan_88", "compiled")
    plan = json.loads(plans["plan_88"].read_text())
    assert (
        run["additional_config"]["modes_plan_sha256"]
        == hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    )
    assert "modes_plan_sha256" not in vllm_run(None, "compiled")["additional_config"]


def test_the_benchmark_runs_on_qwen3_moe_and_reaches_its_target(tmp_path):
    """benchmarks/vllm_plugin.py on a two-layer Qwen3-MoE (vLLM's dummy weights): the text-only
    class is served with the plugin too, and the bisected threshold gives the target ratio."""
    out = tmp_path / "bench.json"
    _run(
        [
            sys.executable,
            str(REPO / "benchmarks/vllm_plugin.py"),
            "--shape",
            "tiny",
            "--target",
            "0.5",
            "--mode",
            "eager",
            "--dtype",
            "float32",
            "--rounds",
            "1",
            "--prompts",
            "2",
            "--prompt-tokens",
            "16",
            "--new-tokens",
            "2",
            "--out",
            str(out),
        ],
        {"VLLM_CACHE_ROOT": str(tmp_path / "cache")},
    )
    result = json.loads(out.read_text())
    assert result["no skipping"]["skip_ratio"] == 0.0
    assert result["plan"]["skip_ratio"] == pytest.approx(0.5, abs=0.05)
    for name in ("plain vllm", "no skipping", "plan"):
        assert result[name]["prefill_tokens_per_s"] > 0 and result[name]["decode_tokens_per_s"] > 0
    assert result["op_us_per_moe_layer_decode"] > 0
