"""modes: training-free expert skipping (MoDES) for transformers MoE models.

  calibrate  alpha per MoE layer and modality        -> importance JSON (+ PNG)
  search     thresholds for a target skip ratio       -> plan JSON (+ PNG, resumable cache)
  eval       accuracy and skip ratios, with a plan    -> report JSON
  demo       calibrate, search, evaluate: the whole pipeline on one model
  compare    MoDES, its ablations and baselines at matched skip ratios
  bench      prefill latency and decode tokens/s with and without a plan
  serve      an OpenAI-compatible chat server with a plan applied

Every command runs on the bundled model by default (--model: any local or hub checkpoint).
Targets are shares of the skippable slots (text and media tokens; special tokens are never
skipped), like the paper's k' of k experts; --target-of all makes them shares of all slots.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modes.defaults import COMPARE_GRID_SIZE, DEFAULT_GAMMAS, SEARCH_GRID_SIZE
from modes.errors import UserError

__all__ = ["build_parser", "main"]

EXIT_USER_ERROR, EXIT_STOPPED, EXIT_INTERRUPTED = 2, 3, 130


# -- inputs, checked before any model loads ----------------------------------------------------
def _existing(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).exists():
        raise UserError(f"{what} {path} does not exist")
    return Path(path)


def _output_file(example: str) -> Callable[[str], str]:
    """argparse type of an ``--out``: a file to write, refused at once if it is a directory (the
    atomic write would otherwise fail at its rename, after the work)."""

    def check(path: str) -> str:
        if Path(path).is_dir():
            raise argparse.ArgumentTypeError(
                f"{path} is a directory; give the file to write, e.g. {Path(path) / example}"
            )
        return path

    return check


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from modes.loading import load_model

    name = _checked_model(args.model)
    try:
        return load_model(name, **_placement(args))
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not load --model {name}: {first}") from error


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """``load_model`` keywords of ``--dtype``, ``--device-map``, ``--max-memory``, ``--offload-folder``."""
    import torch

    placement: dict[str, Any] = {"dtype": "auto" if args.dtype == "auto" else getattr(torch, args.dtype)}
    if args.device_map is not None:
        placement["device_map"] = args.device_map
    if args.max_memory is not None:
        placement["max_memory"] = args.max_memory
    if args.offload_folder is not None:
        placement["offload_folder"] = args.offload_folder
    return placement


def _max_memory(text: str) -> dict[int | str, str]:
    """``0=70GiB,cpu=120GiB`` -> ``{0: "70GiB", "cpu": "120GiB"}`` (accelerate's max_memory)."""
    memory: dict[int | str, str] = {}
    for item in text.split(","):
        device, _, amount = item.strip().partition("=")
        if not device or not amount:
            raise argparse.ArgumentTypeError(
                f"expected DEVICE=AMOUNT pairs like 0=70GiB,cpu=120GiB, got {text!r}"
            )
        memory[int(device) if device.isdigit() else device] = amount
    return memory


def _checked_model(name: str | None) -> str | None:
    """``--model`` as given, refused at once when it names a local path that is not there."""
    if name is not None and _looks_local(name) and not Path(name).exists():
        raise UserError(f"--model {name} does not exist (give a checkpoint directory or a hub id org/name)")
    return name


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).suffix != ""


def _samples(args: argparse.Namespace) -> list:
    from modes.data.samples import Columns, load_samples

    _existing(args.data, "--data")
    columns = Columns(
        args.image_column, args.question_column, args.answer_column, args.skill_column, args.id_column
    )
    return load_samples(args.data, split=args.split, limit=args.samples, columns=columns)


def _plan(path: str | None):
    from modes.plan import SkipPlan

    return SkipPlan.load(_existing(path, "--plan")) if path else None


def _importance(path: str):
    from modes.calibration.importance import Importance

    return Importance.load(_existing(path, "--importance"))


def _paths_line(paths: dict[str, list[int]]) -> str:
    """``{"compiled (avx2)": [0, 1]}`` -> ``compiled (avx2) in layers 0, 1``."""
    return "; ".join(f"{path} in layers {', '.join(map(str, layers))}" for path, layers in paths.items())


def _options(args: argparse.Namespace):
    from modes.engine.options import ApplyOptions, execution_of

    return ApplyOptions(execution=execution_of(args.pack_weights, args.cpu_kernel))


_WRITER = {"main": True}  # under torchrun, only rank 0 writes files (set by `main`)


def _output(write: Callable[[], Path]) -> None:
    """``write()`` a file and say so, on the writing rank only."""
    if _WRITER["main"]:
        print(f"wrote {write()}")


def _write(path: str | Path | None, data: dict[str, Any]) -> None:
    from modes.io import write_json_atomic

    if path:
        _output(lambda: write_json_atomic(path, data))


def _plot(function_name: str, result: Any, path: Path) -> None:
    try:
        from modes.evaluation import plots
    except ImportError as error:  # matplotlib is an optional dependency
        print(f"(no plot {path}: {error}; pip install 'modes[plots]')")
        return
    _output(lambda: getattr(plots, function_name)(result, path))


def _ratios_line(report: dict[str, Any]) -> str:
    ratios = ", ".join(f"{m} {r:.4f}" for m, r in report["per_modality"].items())
    return (
        f"skip ratio {report['skippable_ratio']:.4f} of the skippable slots, {report['skip_ratio']:.4f} "
        f"of all slots"
        + (f" (per modality: {ratios}; other = special tokens, never skipped)" if ratios else "")
    )


# -- commands --------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> None:
    from modes.calibration.importance import calibrate
    from modes.evaluation.report import text_table

    samples = _samples(args)
    model, processor = _load_model(args)
    importance = calibrate(
        model,
        processor,
        samples,
        mode=args.mode,
        batch_size=args.batch_size,
        reuse_prefix=not args.no_reuse,
        semantics=args.semantics,
    )
    rows = [
        [layer, *(f"{alphas[m]:.4f}" for m in importance.modalities)]
        for layer, alphas in importance.alphas.items()
    ]
    print(text_table(rows, ["layer", *importance.modalities]))
    _output(lambda: importance.save(args.out))
    _plot("plot_importance", importance, Path(args.out).with_suffix(".png"))


def _grid(args: argparse.Namespace, importance: Any) -> Any:
    """``--grid-*``: a covering grid of that size for each gamma, or a fixed `GridSpec` (a linear
    covering grid of MoDES's own alphas covers every tempered set too: tempering lowers the
    largest alpha)."""
    from modes.thresholds.grid import GridSpec

    if args.grid_x_max == "auto" and args.grid_mapping == "sigmoid":
        return args.grid_size
    if args.grid_x_max == "auto":
        return GridSpec.covering(importance.max_alphas(), size=args.grid_size, mapping=args.grid_mapping)
    return GridSpec(size=args.grid_size, mapping=args.grid_mapping)


def cmd_search(args: argparse.Namespace) -> None:
    from modes.io import write_json_atomic
    from modes.thresholds.frontier import SearchConfig, search

    importance, samples = _importance(args.importance), _samples(args)
    model, processor = _load_model(args)
    cache = args.cache or f"{args.out}.cache.jsonl"
    args.resume_hint = f"points evaluated so far are in {cache}; rerun the same command to resume"
    config = SearchConfig(
        grid=_grid(args, importance),
        method=args.method,
        batch_size=args.batch_size,
        max_evaluations=args.max_evaluations,
        target_of=args.target_of,
        gammas=args.gamma,
    )
    result = search(model, processor, samples, importance, args.target, config, cache=cache)
    best = result.best
    thresholds = ", ".join(f"tau_{m}={t:.5f}" for m, t in best.thresholds.items())
    gamma = result.plan.provenance["tempered_gamma"]
    print(
        f"target {args.target:.2f} of the {args.target_of} slots: gamma {gamma:g}, {thresholds}; "
        "calibration skip ratio "
        f"{best.ratios.skippable:.4f} of the skippable slots, {best.ratios.all:.4f} of all; KL {best.f:.5f}; "
        f"{len(result.points)} points evaluated ({result.evaluations} new)"
    )
    _output(lambda: result.plan.save(args.out))
    _output(lambda: write_json_atomic(Path(args.out).with_suffix(".search.json"), result.to_json()))
    print(f"wrote {cache} (every evaluated point, as it was computed; a rerun resumes from it)")
    _plot("plot_search", result, Path(args.out).with_suffix(".png"))


def cmd_eval(args: argparse.Namespace) -> None:
    from modes.evaluation.evaluate import evaluate
    from modes.evaluation.fidelity import fidelity
    from modes.evaluation.report import text_table

    plan, samples, options = _plan(args.plan), _samples(args), _options(args)
    model, processor = _load_model(args)
    report = evaluate(model, processor, samples, plan=plan, batch_size=args.batch_size, options=options)
    report.pop("answers")
    report["execution"] = options.execution
    if report["execution_paths"]:
        print(f"kept slots ran on: {_paths_line(report['execution_paths'])}")
    if plan is not None:
        report["fidelity"] = fidelity(
            model, processor, samples, plan, batch_size=args.batch_size, options=options
        )
    rows = [[skill, f"{acc:.4f}"] for skill, acc in report["per_skill"].items()]
    rows.append(["overall", f"{report['accuracy']:.4f} +- {report['accuracy_se']:.4f}"])
    print(text_table(rows, ["skill", "accuracy"]))
    print(_ratios_line(report))
    if "fidelity" in report:
        kl, agreement = report["fidelity"]["mean_kl"], report["fidelity"]["top1_agreement"]
        print(f"mean KL {kl:.5f}, top-1 agreement {agreement:.4f} (answer tokens vs the unskipped model)")
    _write(args.out, report)


def cmd_demo(args: argparse.Namespace) -> None:
    import time

    from modes.data.samples import load_samples
    from modes.evaluation.demo import demo
    from modes.evaluation.report import demo_table

    started = time.perf_counter()
    out = Path(args.out_dir)
    calibration = load_samples(split="calibration", limit=args.calibration_samples)
    test = load_samples(split="test", limit=args.test_samples)
    model, processor = _load_model(args)
    print(
        f"calibrate on {len(calibration)} calibration samples, search targets {args.targets} of the "
        f"{args.target_of} slots, evaluate on {len(test)} test samples"
    )
    cache = out / "search.cache.jsonl"
    args.resume_hint = f"search points so far are in {cache}; rerun the same command to resume"
    result = demo(
        model,
        processor,
        calibration,
        test,
        args.targets,
        args.grid_size,
        args.batch_size,
        args.target_of,
        cache,
        gammas=args.gamma,
    )
    _output(lambda: result.importance.save(out / "importance.json"))
    _plot("plot_importance", result.importance, out / "importance.png")
    for target, search_result in result.searches.items():
        plan_path = out / f"plan_{round(target * 100)}.json"
        _output(functools.partial(search_result.plan.save, plan_path))
        _plot("plot_search", search_result, plan_path.with_suffix(".png"))
    summary = result.summary()
    print(demo_table(summary))
    summary["seconds"] = time.perf_counter() - started
    _write(out / "demo.json", summary)
    print(f"wrote {cache} (every evaluated point; a rerun resumes from it)")
    print(f"done in {summary['seconds']:.0f} s")


def cmd_compare(args: argparse.Namespace) -> None:
    from modes.data.samples import load_samples
    from modes.evaluation.compare import METHODS, compare
    from modes.evaluation.report import compare_markdown
    from modes.io import write_text_atomic

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)} or all")
    calibration = load_samples(split="calibration", limit=args.calibration_samples)
    test = load_samples(split="test", limit=args.test_samples)
    model, processor = _load_model(args)
    out = Path(args.out)
    report = compare(
        model,
        processor,
        calibration,
        test,
        None,  # calibrated inside, on the calibration set every method reuses
        args.targets,
        methods,
        args.grid_size,
        args.batch_size,
        target_of=args.target_of,
        cache=out.with_suffix(".cache.jsonl"),
        alpha_mode=args.alpha_mode,
    )
    markdown = compare_markdown(report)
    print(markdown)
    _write(out, report)
    _output(lambda: write_text_atomic(out.with_suffix(".md"), markdown + "\n"))
    _plot("plot_compare", report, out.with_suffix(".png"))


def cmd_serve(args: argparse.Namespace) -> None:
    from modes.serving import serve

    _plan(args.plan)  # checked before the model loads
    _checked_model(args.model)
    print(f"serving {args.name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    serve(
        host=args.host,
        port=args.port,
        model=args.model,
        plan=args.plan,
        execution=_options(args).execution,
        continuous_batching=args.continuous_batching,
        name=args.name,
        placement=_placement(args),
    )


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from modes.engine import ApplyOptions, model_info
    from modes.evaluation.allocator import choose_allocator
    from modes.evaluation.bench import bench, shaped_model
    from modes.evaluation.report import text_table
    from modes.plan import SkipPlan
    from modes.policies import KReductionConfig

    plan = _plan(args.plan)
    allocator = choose_allocator(args.system_malloc)  # before the model's allocations
    if args.shape:
        dtype = getattr(torch, "float32" if args.dtype == "auto" else args.dtype)
        model, special = shaped_model(args.shape, args.layers, dtype), ()
    else:
        model, processor = _load_model(args)
        special = processor.tokenizer.all_special_ids
    if plan is None:  # no calibrated plan for random weights: k-reduction gives the ratio exactly
        info = model_info(model)
        plan = SkipPlan(policy=KReductionConfig.for_ratio(info.top_k, args.skip_ratio), model=info)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    # ids from the whole vocabulary: a prompt of few distinct ids routes to few experts, which
    # flatters skipping (fewer expert weights to read per layer) beyond what real text gives
    input_ids = torch.randint(10, vocab, (args.batch, args.prompt_tokens), generator=generator)
    options = ApplyOptions(execution=_options(args).execution, special_token_ids=tuple(special))
    report = bench(model, plan, input_ids, new_tokens=args.new_tokens, repeats=args.repeats, options=options)
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
    print(
        text_table(rows, ["model", "prefill ms (median)", "decode tok/s (median)", "skip ratio (all slots)"])
    )
    print(
        f"prefill speedup {report['prefill_speedup']:.2f}x, decode speedup {report['decode_speedup']:.2f}x "
        "(medians of per-round ratios, so they need not equal the ratio of the medians above); "
        f"MoE share {report['moe_share_of_prefill']:.2f} -> Amdahl bound {report['amdahl_bound']:.2f}x "
        f"({report['prefill_fraction_of_bound']:.0%} of it reached)"
    )
    print(f"kept slots ran on: {_paths_line(report['paths'])}")
    _write(args.out, report)


# -- parser ----------------------------------------------------------------------------------
class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is none to show (required
    options, flags, None) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="checkpoint directory or hub id (default: the bundled model)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        default="float32",
        help="weights' dtype (auto: the checkpoint's)",
    )
    parser.add_argument(
        "--device-map",
        default=None,
        help="accelerate device map: auto, cpu, cuda, ... (default: load on CPU)",
    )
    parser.add_argument(
        "--max-memory",
        type=_max_memory,
        default=None,
        help="per-device budget for --device-map, e.g. 0=70GiB,cpu=120GiB",
    )
    parser.add_argument(
        "--offload-folder", default=None, help="where --device-map puts what fits nowhere else"
    )


def _add_data(parser: argparse.ArgumentParser, split: str, samples: int | None, batch_size: int) -> None:
    parser.add_argument(
        "--data", default=None, help="JSONL, parquet or dataset directory (default: bundled benchmark)"
    )
    parser.add_argument("--split", default=split, help="bundled benchmark split, or the dataset's split")
    every = " (default: all)" if samples is None else ""
    parser.add_argument("--samples", type=int, default=samples, help=f"use the first N samples{every}")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="samples per forward pass")
    for field in ("image", "question", "answer", "skill", "id"):
        parser.add_argument(f"--{field}-column", default=field, help=f"data column holding the {field}")


def _add_target_of(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target-of",
        choices=["skippable", "all"],
        default="skippable",
        help="targets are shares of the skippable slots (text and media tokens, like k' of k experts) "
        "or of all slots (special tokens, never skipped, included)",
    )


def _gammas(text: str) -> tuple[float, ...]:
    if text == "auto":
        return DEFAULT_GAMMAS
    try:
        return (float(text),)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected auto or a number, got {text!r}") from error


def _add_gamma(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gamma",
        type=_gammas,
        default=DEFAULT_GAMMAS,
        help="alpha exponent of the scores: auto picks 0 (DMT only), .25, .5, .75 or 1 (MoDES as published) "
        "by calibration KL; a number searches that one",
    )


def _add_grid(parser: argparse.ArgumentParser, grid_size: int, x_max: str) -> None:
    parser.add_argument("--grid-size", type=int, default=grid_size, help="D, thresholds per modality")
    parser.add_argument(
        "--grid-mapping",
        choices=["sigmoid", "linear"],
        default="sigmoid",
        help="x -> tau: the release's sigmoid (dense near 0) or tau = x",
    )
    parser.add_argument(
        "--grid-x-max",
        choices=["default", "auto"],
        default=x_max,
        help="auto: the largest tau skips every skippable slot; default: the release's x_max (tuned for "
        "48-layer models, may not reach high targets on shallower ones)",
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
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CPU: kept rows run on modes' compiled kernel where this CPU and a compiler allow it "
        "(the default); --cpu-kernel insists on it (an error says why it cannot run), "
        "--no-cpu-kernel runs the loop path",
    )


def _targets(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from error
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"targets must be in (0, 1), got {text!r}")
    return values


def _target(text: str) -> float:
    values = _targets(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one target, got {text!r}")
    return values[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_calibrate_command(commands)
    _add_search_command(commands)
    _add_evaluate_command(commands)
    _add_demo_command(commands)
    _add_bench_command(commands)
    _add_compare_command(commands)
    _add_serve_command(commands)
    return parser


def _add_serve_command(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="OpenAI-compatible server with a plan applied", formatter_class=HELP
    )
    _add_model(serve)
    serve.add_argument("--plan", default=None, help="plan JSON (default: the unskipped model)")
    serve.add_argument("--name", default="modes", help="the model name clients send")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--continuous-batching",
        action="store_true",
        help="transformers' continuous batching (paged attention)",
    )
    _add_cpu_paths(serve)
    serve.set_defaults(run=cmd_serve)


def _add_calibrate_command(commands: Any) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="alpha per MoE layer and modality", formatter_class=HELP
    )
    _add_model(calibrate)
    _add_data(calibrate, "calibration", 256, 16)
    calibrate.add_argument(
        "--mode",
        choices=["per_modality", "shared"],
        default="per_modality",
        help="per_modality: an alpha per layer and modality (the release); shared: per layer (the paper)",
    )
    calibrate.add_argument(
        "--semantics",
        choices=["modes", "release"],
        default="modes",
        help="modes: KL of the logits predicting the answer, knocked-out tokens get no MoE output; "
        "release: the authors' code exactly (docs/algorithm.md section 7)",
    )
    calibrate.add_argument("--no-reuse", action="store_true", help="recompute the unchanged prefix (slower)")
    calibrate.add_argument(
        "--out", type=_output_file("importance.json"), required=True, help="importance JSON (plot beside it)"
    )
    calibrate.set_defaults(run=cmd_calibrate)


def _add_search_command(commands: Any) -> None:
    search = commands.add_parser("search", help="thresholds for a target skip ratio", formatter_class=HELP)
    _add_model(search)
    _add_data(search, "calibration", 256, 16)
    search.add_argument("--importance", required=True, help="importance JSON from `modes calibrate`")
    search.add_argument(
        "--target", type=_target, required=True, help="target skip ratio in (0, 1), e.g. 0.88"
    )
    _add_target_of(search)
    _add_grid(search, grid_size=SEARCH_GRID_SIZE, x_max="auto")
    _add_gamma(search)
    search.add_argument(
        "--method",
        choices=["frontier", "exhaustive"],
        default="frontier",
        help="walk (<= 2D points) or all D^2",
    )
    search.add_argument("--cache", default=None, help="resumable point cache (default: OUT.cache.jsonl)")
    search.add_argument(
        "--max-evaluations", type=int, default=None, help="stop after N new points (resume later)"
    )
    search.add_argument(
        "--out",
        type=_output_file("plan.json"),
        required=True,
        help="plan JSON (search record and plot beside it)",
    )
    search.set_defaults(run=cmd_search)


def _add_evaluate_command(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval", help="accuracy and skip ratios, with or without a plan", formatter_class=HELP
    )
    _add_model(evaluate)
    _add_data(evaluate, "test", None, 64)
    evaluate.add_argument("--plan", default=None, help="plan JSON (default: the unskipped model)")
    evaluate.add_argument("--out", type=_output_file("report.json"), default=None, help="report JSON")
    _add_cpu_paths(evaluate)
    evaluate.set_defaults(run=cmd_eval)


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser("demo", help="the whole pipeline on the bundled model", formatter_class=HELP)
    _add_model(demo)
    demo.add_argument("--targets", type=_targets, default=[0.75, 0.88], help="comma-separated skip ratios")
    _add_target_of(demo)
    demo.add_argument("--calibration-samples", type=int, default=256, help="calibration split samples")
    demo.add_argument("--test-samples", type=int, default=None, help="test split samples (default: all)")
    demo.add_argument("--grid-size", type=int, default=COMPARE_GRID_SIZE, help="D, thresholds per modality")
    _add_gamma(demo)
    demo.add_argument("--batch-size", type=int, default=32, help="samples per forward pass")
    demo.add_argument(
        "--out-dir", default="runs/demo", help="where importance, plans, plots and demo.json go"
    )
    demo.set_defaults(run=cmd_demo)


def _add_bench_command(commands: Any) -> None:
    bench = commands.add_parser(
        "bench", help="prefill latency and decode tokens/s, with and without a plan", formatter_class=HELP
    )
    _add_model(bench)
    bench.add_argument(
        "--shape",
        default=None,
        choices=["qwen3-vl-30b-a3b"],
        help="random-weight model with real layer shapes",
    )
    bench.add_argument("--layers", type=int, default=2, help="decoder layers of the --shape model")
    bench.add_argument("--plan", default=None, help="plan JSON (default: k-reduction at --skip-ratio)")
    bench.add_argument("--skip-ratio", type=_target, default=0.88, help="k-reduction's ratio when no --plan")
    bench.add_argument("--batch", type=int, default=1, help="prompts per call")
    bench.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt")
    bench.add_argument("--new-tokens", type=int, default=16, help="decode steps timed")
    bench.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    _add_cpu_paths(bench)
    bench.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default allocator, which frees large temporaries back to the kernel, so "
        "every prefill pays page faults for them (by default the process keeps freed memory)",
    )
    bench.add_argument("--out", type=_output_file("bench.json"), default=None, help="report JSON")
    bench.set_defaults(run=cmd_bench)


def _add_compare_command(commands: Any) -> None:
    compare = commands.add_parser(
        "compare", help="MoDES, ablations and baselines at matched ratios", formatter_class=HELP
    )
    _add_model(compare)
    compare.add_argument(
        "--targets", type=_targets, default=[0.63, 0.75, 0.88], help="comma-separated skip ratios"
    )
    _add_target_of(compare)
    compare.add_argument(
        "--methods",
        default="all",
        help="comma-separated methods of `modes.evaluation.compare.METHODS` (MoDES, its variants and "
        "ablations, NAEE, MC-MoE, DiEP, k-reduction), or all",
    )
    compare.add_argument("--calibration-samples", type=int, default=256, help="calibration split samples")
    compare.add_argument("--test-samples", type=int, default=None, help="test split samples (default: all)")
    compare.add_argument(
        "--grid-size", type=int, default=COMPARE_GRID_SIZE, help="D, thresholds per modality"
    )
    compare.add_argument(
        "--alpha-mode", choices=["per_modality", "shared"], default="per_modality", help="calibration mode"
    )
    compare.add_argument("--batch-size", type=int, default=32, help="samples per forward pass")
    compare.add_argument(
        "--out",
        type=_output_file("compare.json"),
        default="runs/compare/compare.json",
        help="JSON (Markdown, PNG and caches beside it)",
    )
    compare.set_defaults(run=cmd_compare)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run_on_this_rank(args)
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", None)
        print(f"\nmodes {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.debug or not _is_user_error(error):
            raise
        print(f"modes {args.command}: error: {error}", file=sys.stderr)
        return EXIT_STOPPED if _is_budget_stop(error) else EXIT_USER_ERROR
    return 0


def _run_on_this_rank(args: argparse.Namespace) -> None:
    """Run the command; under torchrun every rank runs it, and only rank 0 prints and writes."""
    from modes.parallel import ranks

    group = ranks()
    _WRITER["main"] = group.is_main
    if group.is_main:
        args.run(args)
        return
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        args.run(args)


def _is_budget_stop(error: Exception) -> bool:
    """A search that stopped at its evaluation budget (a rerun resumes): not a failure."""
    from modes.thresholds.frontier import SearchBudgetError

    return isinstance(error, SearchBudgetError)


def _is_user_error(error: Exception) -> bool:
    """Errors that name a user's mistake and its fix (`modes.errors.UserError`: bad files,
    options, models, unreachable targets), and a file that is not there."""
    return isinstance(error, (UserError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
