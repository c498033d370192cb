"""The command line on the bundled model: JSON outputs, plots, and clear errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modes
from modes.cli.main import build_parser, main
from modes.defaults import DEFAULT_GAMMAS
from modes.engine.kernels import cpu_supports
from modes.engine.packed import packing_unsupported
from modes.errors import PlanError
from modes.evaluation import allocator

NEEDS_KERNEL = pytest.mark.skipif(not cpu_supports(torch.float32), reason="no modes kernel build runs here")
NEEDS_PACKING = pytest.mark.skipif(
    packing_unsupported(torch.float32) is not None, reason=str(packing_unsupported(torch.float32))
)
CPU_PATH_FLAGS = [("--no-cpu-kernel", "loop")]
if packing_unsupported(torch.float32) is None:
    CPU_PATH_FLAGS.append(("--pack-weights", "packed"))
if cpu_supports(torch.float32):
    CPU_PATH_FLAGS.append(("--cpu-kernel", "compiled"))


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
        assert (data["execution"], faster_data["execution"]) == ("auto", field)
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
         "--grid-size", "3", "--grid-x-max", "default", "--out", str(tmp_path / "plan.json")]
    )  # fmt: skip
    assert code == 2  # the release's grid, tuned for 48 layers, stops short on 6
    err = capsys.readouterr().err
    assert "is unreachable with this grid: its largest thresholds" in err
    assert "--grid-x-max auto makes the largest tau skip every skippable slot" in err


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    assert (
        main(["demo", "--out-dir", str(tmp_path), "--calibration-samples", "64", "--test-samples", "160"])
        == 0
    )
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert [p["target"] for p in summary["plans"]] == [0.75, 0.88]


@pytest.mark.parametrize(("option", "gammas"), [([], DEFAULT_GAMMAS), (["--gamma", "1"], (1.0,))])
def test_demo_passes_gamma_to_the_pipeline(option, gammas, monkeypatch):
    """`modes demo --gamma 1` searches MoDES's own alphas only (it was parsed and dropped)."""
    from modes.evaluation import demo

    class CalledError(Exception):
        pass

    def record(*args, **kwargs):
        raise CalledError(kwargs["gammas"])

    monkeypatch.setattr(demo, "demo", record)
    args = ["demo", "--calibration-samples", "4", "--test-samples", "4", *option]
    with pytest.raises(CalledError) as called:
        main(args)
    assert tuple(called.value.args[0]) == gammas


@pytest.mark.parametrize(
    "options",
    [
        [],
        pytest.param(["--pack-weights", "--system-malloc"], marks=NEEDS_PACKING),
        pytest.param(["--cpu-kernel"], marks=NEEDS_KERNEL),
    ],
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
    assert report["execution"] == next((expected[o] for o in options if o in expected), "auto")
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
    methods = "modes,local,naee,mc_moe,diep,k_reduction,modes_release,modes_tempered,modes_partial"
    args = ["compare", "--targets", "0.5", "--methods", methods, "--calibration-samples", "16",
            "--test-samples", "16", "--grid-size", "5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [row["method"] for row in report["rows"]] == methods.split(",")
    for row in report["rows"][2:5]:  # scaled baselines: bisection reaches the calibration target
        plan = modes.SkipPlan.from_json(row["plan"])
        assert plan.method == row["method"]
        assert plan.achieved_ratio == pytest.approx(row["target"], abs=0.02)
    by_method = {row["method"]: row for row in report["rows"]}
    k_reduction = by_method["k_reduction"]
    assert k_reduction["per_modality"]["text"] == pytest.approx(0.5)  # keep 4 of 8, exactly
    for name in ("modes_tempered", "modes"):  # tempering nests MoDES (gamma = 1) in its choice
        assert by_method[name]["plan"]["provenance"]["compare_method"] == name
    gammas = by_method["modes_tempered"]["plan"]["provenance"]["calibration_kl_by_gamma"]
    assert by_method["modes_tempered"]["plan"]["provenance"]["calibration_kl"] == min(gammas.values())
    assert by_method["modes_release"]["plan"]["provenance"]["semantics"] == "release"
    assert all(row["calibration_kl"] >= 0 for row in report["rows"])
    assert out.with_suffix(".md").read_text().startswith("| method |")
    assert out.with_suffix(".png").exists()


# -- the command line as a newcomer meets it ---------------------------------------------------
def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys; from modes.cli.main import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subcommands.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"modes {name} {action.option_strings} has no help"
            shows_default = "%(default)" in action.help or "default" in action.help.lower()
            if action.default not in (None, False, argparse.SUPPRESS) and not shows_default:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_target_of_all_beyond_the_special_token_share_names_the_cap(tmp_path, capsys):
    importance = tmp_path / "importance.json"
    assert main(["calibrate", "--samples", "8", "--out", str(importance)]) == 0
    plan = tmp_path / "plan.json"
    args = ["search", "--samples", "8", "--importance", str(importance), "--grid-size", "4",
            "--out", str(plan), "--target-of", "all", "--target", "0.9"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "special tokens (chat markup, media start/end) hold" in err
    largest = float(err.split("so at most ")[1].split()[0])
    assert 0.5 < largest < 0.9
    cache = Path(f"{plan}.cache.jsonl").read_text().splitlines()
    assert len(cache) == 1 + 1, "the ceiling is one evaluation"
    assert main([*args[:-1], f"{largest - 0.01:.4f}"]) == 0  # just under the cap: reached
    assert modes.SkipPlan.load(plan).target_of == "all"


def test_targets_of_one_run_share_the_search_points(small_vlm, tmp_path):
    model, processor = small_vlm
    samples = modes.load_samples(split="calibration", limit=8)
    importance = modes.calibrate(model, processor, samples, batch_size=8, progress=False)
    grid = modes.GridSpec.covering(importance.max_alphas(), size=6)
    kwargs = dict(grid=grid, batch_size=8, progress=False, cache=tmp_path / "cache.jsonl", gammas=(1.0,))
    first = modes.search(model, processor, samples, importance, 0.6, **kwargs)
    second = modes.search(model, processor, samples, importance, 0.7, **kwargs)
    reused = [p for p in first.points if p in second.points]
    assert reused, "the second target walked none of the first target's points"
    assert first.evaluations + second.evaluations == len(second.points)  # none computed twice


def test_inputs_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("modes.loading.load_model", no_loading)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"question": "q ?", "answer": "a"}) + "\n\n" + json.dumps({"question": "q"}) + "\n"
    )
    cases = [
        (["eval", "--plan", str(tmp_path / "missing.json")], "--plan .*missing.json does not exist"),
        (["eval", "--data", str(bad)], "line 3: column 'answer' is missing .* --answer-column"),
        (["search", "--importance", str(tmp_path / "no.json"), "--target", "0.5", "--out", "p.json"],
         "--importance .*no.json does not exist"),
        (["eval", "--model", str(tmp_path / "no_model")], "--model .*no_model does not exist"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "example"),
    [
        (["calibrate"], "importance.json"),
        (["search", "--importance", "i.json", "--target", "0.5"], "plan.json"),
        (["eval"], "report.json"),
        (["bench"], "bench.json"),
        (["compare"], "compare.json"),
    ],
)
def test_an_out_directory_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command, example):
    """Found by hand: ``calibrate --out DIR`` ran its 30 s and then failed at the atomic rename."""
    monkeypatch.setattr("modes.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as refused:
        main([*command, "--out", str(tmp_path)])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a directory; give the file to write, e.g. {tmp_path / example}" in err


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{}")
    with pytest.raises(PlanError, match="not a modes plan"):
        main(["--debug", "eval", "--plan", str(bad)])


def test_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch):
    importance = tmp_path / "importance.json"
    assert main(["calibrate", "--samples", "8", "--out", str(importance)]) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    from modes.thresholds import frontier

    monkeypatch.setattr(frontier, "search", interrupted)
    plan = tmp_path / "plan.json"
    code = main(
        ["search", "--samples", "8", "--importance", str(importance), "--target", "0.5", "--out", str(plan)]
    )
    assert code == 130
    err = capsys.readouterr().err
    assert f"interrupted; points evaluated so far are in {plan}.cache.jsonl; rerun the same command" in err
    assert "Traceback" not in err


def test_outputs_follow_the_umask_and_each_gets_a_wrote_line(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        importance = tmp_path / "importance.json"
        assert main(["calibrate", "--samples", "8", "--out", str(importance)]) == 0
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    for path in (importance, importance.with_suffix(".png")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert f"wrote {path}" in out


@pytest.mark.parametrize("command", ["calibrate", "search", "eval", "serve", "compare", "demo", "bench"])
def test_model_placement_options_reach_load_model(command, monkeypatch, tmp_path):
    """--dtype, --device-map, --max-memory and --offload-folder: a 30B model on a GPU needs them."""
    from modes import loading
    from modes.serving import server

    class LoadedError(Exception):
        pass

    def record(name=None, **placement):
        raise LoadedError(placement)

    monkeypatch.setattr(loading, "load_model", record)
    monkeypatch.setattr(server, "load_model", record)
    importance = tmp_path / "importance.json"
    importance.write_text("{}")
    out = ["--out", str(tmp_path / "out.json")]
    extra = {"search": ["--importance", str(importance), "--target", "0.5", *out], "calibrate": out}.get(
        command, []
    )
    args = [
        command,
        *extra,
        "--dtype",
        "bfloat16",
        "--device-map",
        "auto",
        "--max-memory",
        "0=70GiB,cpu=120GiB",
    ]
    args += ["--offload-folder", str(tmp_path)]
    if command == "search":
        monkeypatch.setattr(modes.Importance, "load", staticmethod(lambda path: None))
    with pytest.raises(LoadedError) as loaded:
        main(args)
    assert loaded.value.args[0] == {
        "dtype": torch.bfloat16,
        "device_map": "auto",
        "max_memory": {0: "70GiB", "cpu": "120GiB"},
        "offload_folder": str(tmp_path),
    }


def test_a_malformed_max_memory_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--max-memory", "70GiB"])
    assert "expected DEVICE=AMOUNT pairs like 0=70GiB,cpu=120GiB" in capsys.readouterr().err


def test_only_user_errors_become_one_line(monkeypatch, capsys, tmp_path):
    """A `modes.errors.UserError` prints its line and exits 2; any other error (a ValueError
    from a bug, say) keeps its traceback."""
    from modes.calibration import importance
    from modes.errors import UsageError

    def failing(error):
        def calibrate(*args, **kwargs):
            raise error

        return calibrate

    out = ["--samples", "4", "--out", str(tmp_path / "importance.json")]
    monkeypatch.setattr(importance, "calibrate", failing(UsageError("knockout must be in (0, 1]")))
    assert main(["calibrate", *out]) == 2
    assert "modes calibrate: error: knockout must be in (0, 1]" in capsys.readouterr().err
    monkeypatch.setattr(importance, "calibrate", failing(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["calibrate", *out])
