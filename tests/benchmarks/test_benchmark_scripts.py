"""The benchmark scripts still run, and what they report holds together (tiny shapes, seconds)."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

from modes.engine import kernels, moe_sites
from modes.engine.kernels import cpu_supports
from modes.engine.packed import packing_unsupported

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import one another by name
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def moe_block():
    module = _script("moe_block")
    module.SHAPES["tiny"] = dict(cls=module.Qwen3MoeExperts, hidden=64, experts=16, top_k=4, width=32)
    return module


@pytest.mark.parametrize("tokens", [64, 1], ids=["prefill", "decode"])
def test_block_benchmark_case_reports_consistent_fields(moe_block, tokens):
    result = moe_block.bench_case("tiny", torch.float32, tokens, repeats=1)
    rows = result["rows"]
    assert [row["target_ratio"] for row in rows] == list(moe_block.RATIOS)
    assert rows[0]["ratio"] == 0.0
    assert all(later["ratio"] >= earlier["ratio"] for earlier, later in itertools.pairwise(rows))
    for row in rows:
        assert row["ideal"] == pytest.approx(1 / (1 - row["ratio"]), rel=1e-3)
        assert row["attainable"] <= row["ideal"]
    prefill = tokens >= 64
    if not prefill:  # decode: capped by the experts read, not the slots
        for row in rows[1:]:
            cap = result["default_experts_hit"] / row["experts_hit"] if row["experts_hit"] else row["ideal"]
            assert row["attainable"] == pytest.approx(min(row["ideal"], cap), rel=1e-2)
    assert (result["memory_bound"] is not None) == prefill
    assert (result["loop_every_slot_ms"] is None) == prefill
    assert set(result["minor_faults_per_call"]) >= {"default", *map(str, moe_block.RATIOS)}
    dtype = torch.float32  # the smoke runs' dtype
    paths = ["packed"] * (packing_unsupported(dtype) is None) + ["compiled"] * cpu_supports(dtype)
    assert result["cpu_paths"] == paths
    for path in paths:
        assert all(f"{path}_speedup" in row for row in rows[1:]) and f"{path}_speedup" not in rows[0]


def test_each_cpu_path_case_runs_on_its_path(moe_block, monkeypatch):
    """The timed call of a path must run that path, not the wrapper's default."""
    from modes.engine import execute

    used = []
    loop = execute.run_expert_loop
    monkeypatch.setattr(execute, "run_expert_loop", lambda *a, **k: used.append(a[5]) or loop(*a, **k))
    experts, draws, context = moe_block._setup("tiny", torch.float32, 64)
    wrapper = moe_block.SkippingExperts(experts, layer=0, rule=moe_block.FixedRule(0.9), context=context)
    path = execute.PlainLoop()
    moe_block._on_path(wrapper, "plain", path)(*draws[0])
    assert used and all(p is path for p in used)


def test_experts_hit_counts_each_expert_once_per_draw(moe_block):
    index = torch.tensor([[0, 1], [0, 2]])  # two tokens share expert 0
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    draws = [(None, index, weights), (None, index[:1], weights[:1])]
    assert moe_block._experts_hit(draws, moe_block.FixedRule(0.0)) == (3 + 2) / 2
    assert moe_block._experts_hit(draws, moe_block.FixedRule(0.5)) == (1 + 1) / 2  # both keep expert 0


def test_memory_table_compares_the_target_with_the_memory_bound(moe_block, capsys):
    table = _script("table")
    result = moe_block.bench_case("tiny", torch.float32, 64, repeats=1)
    table.memory_table([result])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    row = next(row for row in result["rows"] if row["target_ratio"] == 0.88)
    verdict = "yes" if 0.9 * row["ideal"] <= result["memory_bound"] else "no"
    assert line.startswith("| tiny | float32 | 64 |") and line.endswith(f"| {verdict} |")


def test_default_path_benchmark_reports_overhead_and_speedup_runs(monkeypatch):
    from modes.evaluation import bench

    tiny = dict(
        model_type="qwen3_vl_moe",
        text_config=dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, head_dim=32,
                         num_attention_heads=2, num_key_value_heads=1, num_experts=16, num_experts_per_tok=8,
                         vocab_size=256),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64),
    )  # fmt: skip
    monkeypatch.setitem(bench.SHAPES, "tiny", tiny)
    default_path = _script("default_path")
    monkeypatch.setattr(default_path, "SHAPE", "tiny")
    results = default_path.run(torch.float32, layers=1, tokens=32, repeats=1)
    assert results["thresholds_0"]["plan"]["skip_ratio"] == 0.0
    assert results["skip_0.875"]["plan"]["skip_ratio"] == pytest.approx(0.875)
    expected = {f"compiled ({kernels.best_isa().name})"} if cpu_supports(torch.float32) else {"loop"}
    assert set(results["skip_0.875"]["paths"]) == expected
    skipped = results["skip_0.875"]
    assert 0 < skipped["memory_bound"] <= skipped["amdahl_bound"]  # the read only lowers the bound
    unskipped, share = skipped["unskipped"]["prefill_s"], skipped["moe_share_of_prefill"]
    floored = max(unskipped * share * (1 - skipped["plan"]["skip_ratio"]), skipped["expert_weights_read_s"])
    assert skipped["memory_bound"] == pytest.approx(unskipped / (unskipped * (1 - share) + floored))
    model = bench.shaped_model("tiny", 1, torch.float32)
    experts = 16 * 3 * 64 * 32  # gate, up and down projections of each expert
    weights = [w for site in moe_sites(model) for w in site.module.parameters()]
    assert sum(w.numel() for w in weights) == experts  # the read covers the experts, nothing else
    assert default_path.machine()["kernel"]["isa"] == (
        kernels.best_isa().name if kernels.best_isa() else None
    )
