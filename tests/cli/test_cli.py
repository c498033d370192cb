"""The command line on the bundled model: JSON outputs, plots, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import modes
from modes.cli.main import main
from modes.engine.kernels import cpu_supports
from modes.evaluation import allocator

NEEDS_KERNEL = pytest.mark.skipif(not cpu_supports(torch.float32), reason="modes' CPU kernel needs AVX-512")
CPU_PATH_FLAGS = [("--pack-weights", "packed")] + (
    [("--cpu-kernel", "compiled")] if cpu_supports(torch.float32) else []  # AVX-512
)


def test_calibrate_search_eval_pipeline(tmp_path, capsys):
    importance, plan, report = tmp_path / "importance.json", tmp_path / "plan.json", tmp_path / "eval.json"
    assert main(["calibrate", "--samples", "16", "--out", str(importance)]) == 0
    assert importance.with_suffix(".png").exists()
    code = main(
        ["search", "--samples", "16", "--importance", str(importance), "--target", "0.5",
         "--grid-size", "6", "--grid-x-max", "auto", "--out", str(plan)]
    )  # fmt: skip
    assert code == 0
    loaded = modes.SkipPlan.load(plan)
    assert loaded.achieved_ratio >= 0.5 and plan.with_suffix(".png").exists()
    assert main(["eval", "--samples", "24", "--plan", str(plan), "--out", str(report)]) == 0
    data = json.loads(report.read_text())
    for key in ("accuracy", "per_skill", "skip_ratio", "per_modality", "fidelity"):
        assert key in data
    assert 0 < data["skip_ratio"] < 1
    assert "skip ratio" in capsys.readouterr().out
    for flag, field in CPU_PATH_FLAGS:
        faster = tmp_path / f"eval_{field}.json"
        assert main(["eval", "--samples", "24", "--plan", str(plan), flag, "--out", str(faster)]) == 0
        faster_data = json.loads(faster.read_text())
        assert (data["execution"], faster_data["execution"]) == ("default", field)
        assert faster_data["skip_ratio"] == data["skip_ratio"]
        kl, faster_kl = data["fidelity"]["mean_kl"], faster_data["fidelity"]["mean_kl"]
        assert faster_kl == pytest.approx(kl, rel=1e-3, abs=1e-6)
    with pytest.raises(SystemExit) as refused:  # one CPU path at a time, as argparse says
        main(["eval", "--pack-weights", "--cpu-kernel"])
    assert refused.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_errors_exit_2_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text("{}")
    assert main(["eval", "--samples", "4", "--plan", str(bad)]) == 2
    assert "not a modes plan" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unreachable_target_is_reported(tmp_path, capsys):
    importance = tmp_path / "importance.json"
    assert main(["calibrate", "--samples", "8", "--out", str(importance)]) == 0
    code = main(
        ["search", "--samples", "8", "--importance", str(importance), "--target", "0.99",
         "--grid-size", "3", "--out", str(tmp_path / "plan.json")]
    )  # fmt: skip
    assert code == 2
    assert "is unreachable with this grid: its largest thresholds" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    assert (
        main(["demo", "--out-dir", str(tmp_path), "--calibration-samples", "64", "--test-samples", "160"])
        == 0
    )
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert [p["target"] for p in summary["plans"]] == [0.75, 0.88]


@pytest.mark.parametrize(
    "options",
    [[], ["--pack-weights", "--system-malloc"], pytest.param(["--cpu-kernel"], marks=NEEDS_KERNEL)],
    ids=["plain", "packed", "compiled"],
)
def test_bench_reports_both_runs_and_the_amdahl_bound(tmp_path, options, monkeypatch):
    retained = []  # the real call would change this test process's allocator for good
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: retained.append(True) or True)
    out = tmp_path / "bench.json"
    args = ["bench", "--prompt-tokens", "16", "--new-tokens", "3", "--repeats", "1", "--out", str(out)]
    args += options
    assert main(args) == 0
    report = json.loads(out.read_text())
    expected = {"--pack-weights": "packed", "--cpu-kernel": "compiled"}
    assert report["execution"] == next((expected[o] for o in options if o in expected), "default")
    assert retained == ([] if "--system-malloc" in options else [True])
    assert report["allocator"] == ("system default" if retained == [] else "freed memory retained")
    assert report["unskipped"]["prefill_minor_page_faults"] >= 0
    assert report["plan"]["skip_ratio"] == pytest.approx(
        1 - 1 / 8
    )  # k-reduction to 1 of 8, no special tokens
    assert 0 < report["moe_share_of_prefill"] < 1
    assert report["amdahl_bound"] == pytest.approx(
        1
        / (
            (1 - report["moe_share_of_prefill"])
            + report["moe_share_of_prefill"] * (1 - report["plan"]["skip_ratio"])
        )
    )


def test_compare_matches_ratios_and_writes_table_and_plot(tmp_path):
    out = tmp_path / "compare.json"
    methods = "modes,local,naee,mc_moe,diep,k_reduction"
    args = ["compare", "--targets", "0.5", "--methods", methods, "--calibration-samples", "16",
            "--test-samples", "16", "--grid-size", "5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [row["method"] for row in report["rows"]] == methods.split(",")
    for row in report["rows"][2:5]:  # scaled baselines: bisection reaches the calibration target
        plan = modes.SkipPlan.from_json(row["plan"])
        assert plan.method == row["method"]
        assert plan.achieved_ratio == pytest.approx(row["target"], abs=0.02)
    k_reduction = report["rows"][-1]
    assert k_reduction["per_modality"]["text"] == pytest.approx(0.5)  # keep 4 of 8, exactly
    assert out.with_suffix(".md").read_text().startswith("| method |")
    assert out.with_suffix(".png").exists()
