"""`modes` command line: calibrate, search, eval, demo.

Every command works on the bundled model by default (--model takes any local or hub
checkpoint), prints a human table, and writes JSON with --out (plots beside it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from modes.calibration.importance import Importance, calibrate
from modes.data.samples import Columns, DataFileError, load_samples
from modes.evaluation.evaluate import evaluate
from modes.evaluation.fidelity import fidelity
from modes.io import write_json_atomic
from modes.loading import load_model
from modes.plan import PlanError, SkipPlan
from modes.search.frontier import SearchBudgetError, TargetUnreachableError, search
from modes.search.grid import GridSpec

__all__ = ["main"]


# -- shared pieces ---------------------------------------------------------------------------
def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="checkpoint directory or hub id (default: the bundled model)"
    )


def _add_data(parser: argparse.ArgumentParser, split: str, samples: int | None) -> None:
    parser.add_argument(
        "--data", default=None, help="JSONL, parquet or dataset directory (default: bundled benchmark)"
    )
    parser.add_argument(
        "--split", default=split, help=f"bundled benchmark split or dataset split (default {split})"
    )
    parser.add_argument("--samples", type=int, default=samples, help="use the first N samples")
    parser.add_argument("--batch-size", type=int, default=16)
    for field in ("image", "question", "answer", "skill", "id"):
        parser.add_argument(f"--{field}-column", default=field, help=f"column holding the {field}")


def _samples(args: argparse.Namespace) -> list:
    columns = Columns(
        args.image_column, args.question_column, args.answer_column, args.skill_column, args.id_column
    )
    return load_samples(args.data, split=args.split, limit=args.samples, columns=columns)


def _write(path: str | None, data: dict[str, Any]) -> None:
    if path:
        write_json_atomic(path, data)
        print(f"wrote {path}")


def _plot(function, result, json_path: str | None, suffix: str) -> None:
    if not json_path:
        return
    try:
        png = function(result, Path(json_path).with_suffix(suffix))
        print(f"wrote {png}")
    except ImportError as error:
        print(f"(no plot: {error})")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# -- commands --------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> None:
    from modes.evaluation.plots import plot_importance

    model, processor = load_model(args.model)
    importance = calibrate(
        model,
        processor,
        _samples(args),
        mode=args.mode,
        batch_size=args.batch_size,
        reuse_prefix=not args.no_reuse,
    )
    rows = [
        [layer, *(f"{alphas[m]:.4f}" for m in importance.modalities)]
        for layer, alphas in importance.alphas.items()
    ]
    print(_table(rows, ["layer", *importance.modalities]))
    if args.out:
        importance.save(args.out)
        print(f"wrote {args.out}")
    _plot(plot_importance, importance, args.out, ".png")


def _grid(args: argparse.Namespace, importance: Importance) -> GridSpec:
    if args.grid_x_max == "auto":
        max_scores = {m: max(a[m] for a in importance.alphas.values()) for m in importance.modalities}
        return GridSpec.covering(max_scores, size=args.grid_size, mapping=args.grid_mapping)
    return GridSpec(size=args.grid_size, mapping=args.grid_mapping)


def run_search(
    args: argparse.Namespace,
    model,
    processor,
    samples,
    importance: Importance,
    target: float,
    out: str | None,
):
    from modes.evaluation.plots import plot_search

    cache = args.cache or (f"{out}.cache.jsonl" if out else None)
    result = search(
        model,
        processor,
        samples,
        importance,
        target,
        grid=_grid(args, importance),
        method=args.method,
        cache=cache,
        batch_size=args.batch_size,
        max_evaluations=args.max_evaluations,
    )
    thresholds = ", ".join(f"tau_{m}={t:.5f}" for m, t in result.best.thresholds.items())
    print(
        f"target {target:.2f}: {thresholds}; calibration skip ratio {result.best.g:.4f}, "
        f"KL {result.best.f:.5f}; {len(result.points)} points evaluated ({result.evaluations} new)"
    )
    if out:
        result.plan.save(out)
        write_json_atomic(Path(out).with_suffix(".search.json"), result.to_json())
        print(f"wrote {out}")
    _plot(plot_search, result, out, ".png")
    return result


def cmd_search(args: argparse.Namespace) -> None:
    model, processor = load_model(args.model)
    run_search(
        args, model, processor, _samples(args), Importance.load(args.importance), args.target, args.out
    )


def cmd_eval(args: argparse.Namespace) -> None:
    model, processor = load_model(args.model)
    samples = _samples(args)
    plan = SkipPlan.load(args.plan) if args.plan else None
    options = dict(batch_size=args.batch_size, pack_weights=args.pack_weights, cpu_kernel=args.cpu_kernel)
    report = evaluate(model, processor, samples, plan=plan, **options)
    report.pop("answers")
    report["pack_weights"], report["cpu_kernel"] = args.pack_weights, args.cpu_kernel
    if plan is not None:
        report["fidelity"] = fidelity(model, processor, samples, plan, **options)
    rows = [[skill, f"{acc:.4f}"] for skill, acc in report["per_skill"].items()]
    rows.append(["overall", f"{report['accuracy']:.4f}"])
    print(_table(rows, ["skill", "accuracy"]))
    ratios = ", ".join(f"{m} {r:.4f}" for m, r in report["per_modality"].items())
    print(f"skip ratio {report['skip_ratio']:.4f}" + (f" ({ratios})" if ratios else ""))
    if "fidelity" in report:
        kl, agreement = report["fidelity"]["mean_kl"], report["fidelity"]["top1_agreement"]
        print(f"mean KL {kl:.5f}, top-1 agreement {agreement:.4f}")
    _write(args.out, report)


def cmd_demo(args: argparse.Namespace) -> None:
    """Calibrate, search each target, evaluate with and without each plan: the whole pipeline."""
    from modes.evaluation.compare import skippable_share

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, processor = load_model(args.model)
    calibration = load_samples(split="calibration", limit=args.calibration_samples)
    test = load_samples(split="test", limit=args.test_samples)
    print(f"1/3 calibrate on {len(calibration)} calibration samples")
    importance = calibrate(model, processor, calibration, batch_size=args.batch_size)
    importance.save(out / "importance.json")
    from modes.evaluation.plots import plot_importance

    _plot(plot_importance, importance, str(out / "importance.json"), ".png")
    share = skippable_share(model, processor, calibration, args.batch_size) if args.of_skippable else 1.0
    print(
        f"2/3 search targets {args.targets}"
        + (f" of the skippable slots ({share:.3f} of all)" if share < 1 else "")
    )
    plans = {}
    for target in args.targets:
        plan_path = str(out / f"plan_{round(target * 100)}.json")
        result = run_search(args, model, processor, calibration, importance, target * share, plan_path)
        plans[target] = (result.plan, result.best.g)
    print(f"3/3 evaluate on {len(test)} test samples")
    baseline = evaluate(model, processor, test, batch_size=args.batch_size)
    rows, summary = [["none", "-", "0.0000", "0.0000", f"{baseline['accuracy']:.4f}", "100.00"]], []
    for target, (plan, calibration_ratio) in plans.items():
        report = evaluate(model, processor, test, plan=plan, batch_size=args.batch_size)
        taus = " ".join(f"{t:.4f}" for t in plan.thresholds.values())
        relative = 100 * report["accuracy"] / baseline["accuracy"]
        rows.append(
            [
                f"{target:.2f}",
                taus,
                f"{calibration_ratio:.4f}",
                f"{report['skip_ratio']:.4f}",
                f"{report['accuracy']:.4f}",
                f"{relative:.2f}",
            ]
        )
        summary.append(
            {
                "target": target,
                "thresholds": plan.thresholds,
                "calibration_ratio": calibration_ratio,
                "test_ratio": report["skip_ratio"],
                "test_per_modality": report["per_modality"],
                "accuracy": report["accuracy"],
                "per_skill": report["per_skill"],
                "relative_accuracy": relative,
            }
        )
    header = [
        "target",
        "tau (" + "/".join(next(iter(plans.values()))[0].thresholds) + ")",
        "calib ratio",
        "test ratio",
        "accuracy",
        "relative %",
    ]
    print(_table(rows, header))
    elapsed = time.perf_counter() - started
    _write(
        str(out / "demo.json"),
        {
            "baseline": {k: baseline[k] for k in ("accuracy", "per_skill")},
            "plans": summary,
            "seconds": elapsed,
        },
    )
    print(f"done in {elapsed:.0f} s; plans in {out}")


def cmd_compare(args: argparse.Namespace) -> None:
    """Every method at every target on the test split: Markdown table, JSON and a PNG plot."""
    from modes.evaluation.compare import compare
    from modes.evaluation.plots import plot_compare

    model, processor = load_model(args.model)
    calibration = load_samples(split="calibration", limit=args.calibration_samples)
    test = load_samples(split="test", limit=args.test_samples)
    importance = calibrate(model, processor, calibration, mode=args.alpha_mode, batch_size=args.batch_size)
    report = compare(
        model,
        processor,
        calibration,
        test,
        importance,
        args.targets,
        args.methods,
        args.grid_size,
        args.batch_size,
    )
    markdown = compare_markdown(report)
    print(markdown)
    out = Path(args.out)
    _write(str(out), report)
    out.with_suffix(".md").write_text(markdown + "\n")
    _plot(plot_compare, report, str(out), ".png")


def cmd_bench(args: argparse.Namespace) -> None:
    """Prefill latency and decode tokens/s with and without a plan."""
    import torch

    from modes.engine.patch import model_info
    from modes.evaluation.allocator import choose_allocator
    from modes.evaluation.bench import bench, shaped_model

    allocator = choose_allocator(args.system_malloc)  # before the model's allocations
    if args.shape:
        model, special = shaped_model(args.shape, args.layers, getattr(torch, args.dtype)), []
    else:
        model, processor = load_model(args.model)
        special = processor.tokenizer.all_special_ids
    if args.plan:
        plan = SkipPlan.load(args.plan)
    else:  # no calibrated plan for random weights: k-reduction gives the ratio exactly
        info = model_info(model)
        keep = max(0, round(info.top_k * (1 - args.skip_ratio)))
        plan = SkipPlan({}, {}, method="k_reduction", parameters={"keep": keep}, model=info)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    # ids from the whole vocabulary: a prompt of few distinct ids routes to few experts, which
    # flatters skipping (fewer expert weights to read per layer) beyond what real text gives
    input_ids = torch.randint(10, vocab, (args.batch, args.prompt_tokens), generator=generator)
    report = bench(
        model,
        plan,
        input_ids,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        special_token_ids=special,
        pack_weights=args.pack_weights,
        cpu_kernel=args.cpu_kernel,
    )
    report["allocator"] = allocator
    rows = [
        [
            label,
            f"{r['prefill_s'] * 1e3:.1f}",
            f"{r['decode_tokens_per_s']:.1f}",
            f"{r.get('skip_ratio', 0.0):.3f}",
        ]
        for label, r in ((k, report[k]) for k in ("unskipped", "plan"))
    ]
    print(_table(rows, ["model", "prefill ms", "decode tok/s", "skip ratio"]))
    print(
        f"prefill speedup {report['prefill_speedup']:.2f}x, decode speedup {report['decode_speedup']:.2f}x; "
        f"MoE share {report['moe_share_of_prefill']:.2f} -> Amdahl bound {report['amdahl_bound']:.2f}x "
        f"({report['prefill_fraction_of_bound']:.0%} of it reached)"
    )
    _write(args.out, report)


def compare_markdown(report: dict[str, Any]) -> str:
    """The paper-style table: per-skill accuracy, relative accuracy, realised ratios."""
    skills = list(report["baseline"]["per_skill"])
    header = ["method", "target", "ratio", "text", "visual", *skills, "accuracy", "relative %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = report["baseline"]
    cells = ["unskipped", "-", "0.000", "-", "-", *(f"{base['per_skill'][k] * 100:.1f}" for k in skills)]
    lines.append("| " + " | ".join([*cells, f"{base['accuracy'] * 100:.1f}", "100.0"]) + " |")
    for row in report["rows"]:
        modality = [f"{row['per_modality'].get(m, 0.0):.3f}" for m in ("text", "visual")]
        cells = [row["method"], f"{row['target']:.2f}", f"{row['ratio']:.3f}", *modality]
        cells += [f"{row['per_skill'][k] * 100:.1f}" for k in skills]
        lines.append(
            "| "
            + " | ".join([*cells, f"{row['accuracy'] * 100:.1f}", f"{row['relative_accuracy']:.1f}"])
            + " |"
        )
    return "\n".join(lines)


# -- parser ----------------------------------------------------------------------------------
def _add_search_options(parser: argparse.ArgumentParser, grid_size: int, x_max: str) -> None:
    parser.add_argument("--grid-size", type=int, default=grid_size, help="D, thresholds per modality")
    parser.add_argument("--grid-mapping", choices=["sigmoid", "linear"], default="sigmoid")
    parser.add_argument(
        "--grid-x-max",
        choices=["default", "auto"],
        default=x_max,
        help="default: the released code's x_max; auto: the grid's top tau skips every slot",
    )
    parser.add_argument("--method", choices=["frontier", "exhaustive"], default="frontier")
    parser.add_argument("--cache", default=None, help="resumable point cache (default: OUT.cache.jsonl)")
    parser.add_argument(
        "--max-evaluations", type=int, default=None, help="stop after N new points (resume later)"
    )


def _add_of_skippable(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--of-all-slots",
        dest="of_skippable",
        action="store_false",
        help="targets are ratios of all slots (default: of the skippable, non-special ones, like k' of k)",
    )


def _add_cpu_paths(parser: argparse.ArgumentParser) -> None:
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument(
        "--pack-weights",
        action="store_true",
        help="CPU: apply the plan with oneDNN-packed expert weights (faster, a second copy in memory)",
    )
    paths.add_argument(
        "--cpu-kernel",
        action="store_true",
        help="CPU with AVX-512: run kept rows on modes' compiled kernel (faster, no copy; built once)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    calibrate_parser = commands.add_parser("calibrate", help="alpha per MoE layer and modality")
    _add_model(calibrate_parser)
    _add_data(calibrate_parser, "calibration", 256)
    calibrate_parser.add_argument("--mode", choices=["per_modality", "shared"], default="per_modality")
    calibrate_parser.add_argument(
        "--no-reuse", action="store_true", help="recompute the unchanged prefix (slower)"
    )
    calibrate_parser.add_argument("--out", required=True, help="importance JSON")
    calibrate_parser.set_defaults(run=cmd_calibrate)

    search_parser = commands.add_parser("search", help="thresholds for a target skip ratio")
    _add_model(search_parser)
    _add_data(search_parser, "calibration", 256)
    search_parser.add_argument("--importance", required=True, help="importance JSON from `modes calibrate`")
    search_parser.add_argument("--target", type=float, required=True, help="target skip ratio, e.g. 0.88")
    _add_search_options(search_parser, grid_size=100, x_max="default")
    search_parser.add_argument("--out", required=True, help="plan JSON")
    search_parser.set_defaults(run=cmd_search)

    eval_parser = commands.add_parser("eval", help="accuracy and skip ratio, with or without a plan")
    _add_model(eval_parser)
    _add_data(eval_parser, "test", None)
    eval_parser.add_argument("--plan", default=None)
    eval_parser.add_argument("--out", default=None, help="report JSON")
    _add_cpu_paths(eval_parser)
    eval_parser.set_defaults(run=cmd_eval, batch_size=64)

    demo_parser = commands.add_parser("demo", help="the whole pipeline on the bundled model")
    _add_model(demo_parser)
    demo_parser.add_argument(
        "--targets", type=lambda s: [float(t) for t in s.split(",")], default=[0.75, 0.88]
    )
    demo_parser.add_argument("--calibration-samples", type=int, default=256)
    demo_parser.add_argument("--test-samples", type=int, default=None)
    demo_parser.add_argument("--batch-size", type=int, default=32)
    demo_parser.add_argument("--out-dir", default="runs/demo")
    _add_search_options(demo_parser, grid_size=24, x_max="auto")
    _add_of_skippable(demo_parser)
    demo_parser.set_defaults(run=cmd_demo)

    bench_parser = commands.add_parser(
        "bench", help="prefill latency and decode tokens/s with and without a plan"
    )
    _add_model(bench_parser)
    bench_parser.add_argument(
        "--shape", default=None, help="random-weight model with real shapes: qwen3-vl-30b-a3b"
    )
    bench_parser.add_argument("--layers", type=int, default=2, help="decoder layers of the --shape model")
    bench_parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="weights of the --shape model"
    )
    bench_parser.add_argument("--plan", default=None, help="plan JSON (default: k-reduction at --skip-ratio)")
    bench_parser.add_argument("--skip-ratio", type=float, default=0.88)
    bench_parser.add_argument("--batch", type=int, default=1)
    bench_parser.add_argument("--prompt-tokens", type=int, default=512)
    bench_parser.add_argument("--new-tokens", type=int, default=16)
    bench_parser.add_argument("--repeats", type=int, default=5)
    _add_cpu_paths(bench_parser)
    bench_parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default allocator, which frees large temporaries back to the kernel, so "
        "every prefill pays page faults for them (by default the process keeps freed memory)",
    )
    bench_parser.add_argument("--out", default=None)
    bench_parser.set_defaults(run=cmd_bench)

    from modes.evaluation.compare import METHODS

    compare_parser = commands.add_parser("compare", help="MoDES, ablations and baselines at matched ratios")
    _add_model(compare_parser)
    compare_parser.add_argument(
        "--targets", type=lambda s: [float(t) for t in s.split(",")], default=[0.63, 0.75, 0.88]
    )
    compare_parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    compare_parser.add_argument("--calibration-samples", type=int, default=256)
    compare_parser.add_argument("--test-samples", type=int, default=None)
    compare_parser.add_argument("--grid-size", type=int, default=24)
    compare_parser.add_argument("--alpha-mode", choices=["per_modality", "shared"], default="per_modality")
    compare_parser.add_argument("--batch-size", type=int, default=32)
    compare_parser.add_argument(
        "--out", default="runs/compare/compare.json", help="JSON (Markdown and PNG beside it)"
    )
    _add_of_skippable(compare_parser)
    compare_parser.set_defaults(run=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (PlanError, DataFileError, TargetUnreachableError, FileNotFoundError, ValueError) as error:
        print(f"modes {args.command}: error: {error}", file=sys.stderr)
        return 2
    except SearchBudgetError as error:
        print(f"modes {args.command}: stopped: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
