"""PNG plots of calibration and search results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from modes.calibration.importance import Importance
from modes.thresholds.frontier import SearchResult

__all__ = ["plot_compare", "plot_importance", "plot_search"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # plots are optional
        raise ImportError("plots need matplotlib: pip install 'modes[plots]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_importance(importance: Importance, path: str | Path) -> Path:
    """alpha per MoE layer, one line per modality."""
    plt = _pyplot()
    layers = sorted(importance.alphas)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for modality in importance.modalities:
        axes.plot(
            layers, [importance.alphas[layer][modality] for layer in layers], marker="o", label=modality
        )
    axes.set_xlabel("MoE layer")
    axes.set_ylabel("alpha (normalised KL)")
    axes.set_title(f"Layer importance ({importance.mode})")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_search(result: SearchResult, path: str | Path) -> Path:
    """Evaluated points coloured by the skip ratio the target is of and sized by f (KL), frontier
    and choice marked."""
    plt = _pyplot()
    names = list(result.grid)
    of = result.plan.target_of
    ratio_name = f"skip ratio of the {of} slots"
    figure, axes = plt.subplots(figsize=(6.5, 5))
    if len(names) == 1:
        xs = [p.thresholds[names[0]] for p in result.points]
        axes.plot(xs, [p.ratios.of(of) for p in result.points], "o", label=ratio_name)
        axes.plot(xs, [p.f for p in result.points], "s", label="f (KL)")
        axes.axvline(result.best.thresholds[names[0]], color="red", label="chosen")
        axes.set_xlabel(f"tau_{names[0]}")
        axes.legend()
    else:
        x_name, y_name = names
        scatter = axes.scatter(
            [p.thresholds[x_name] for p in result.points],
            [p.thresholds[y_name] for p in result.points],
            c=[p.ratios.of(of) for p in result.points],
            s=[20 + 400 * min(1.0, p.f / max(1e-12, max(q.f for q in result.points))) for p in result.points],
            cmap="viridis",
            edgecolors="k",
            linewidths=0.3,
        )
        figure.colorbar(scatter, label=f"{ratio_name}; marker size ~ f (KL)")
        frontier = sorted(result.frontier, key=lambda p: p.thresholds[x_name])
        axes.plot(
            [p.thresholds[x_name] for p in frontier],
            [p.thresholds[y_name] for p in frontier],
            "r--",
            label="frontier",
        )
        axes.plot(
            result.best.thresholds[x_name],
            result.best.thresholds[y_name],
            "r*",
            markersize=16,
            label="chosen",
        )
        if min(min(v) for v in result.grid.values()) > 0:  # sigmoid grids are dense near 0
            axes.set_xscale("log")
            axes.set_yscale("log")
        axes.set_xlabel(f"tau_{x_name}")
        axes.set_ylabel(f"tau_{y_name}")
        axes.legend(loc="lower left")
    axes.set_title(f"Search for {result.plan.target_ratio:.2f} of the {of} slots")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_compare(report: dict, path: str | Path) -> Path:
    """Relative accuracy against realised skip ratio, one line per method."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    methods = dict.fromkeys(row["method"] for row in report["rows"])
    base = report["baseline"]["accuracy"]
    colors, markers = plt.get_cmap("tab20").colors, "os^vD<>pPX*h"
    for number, method in enumerate(methods):
        rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["ratio"])
        axes.errorbar(
            [r["ratio"] for r in rows],
            [r["relative_accuracy"] for r in rows],
            yerr=[100 * r["accuracy_se"] / base for r in rows],
            marker=markers[number % len(markers)],
            color=colors[(2 * number) % 20 + (number // 10) % 2],
            capsize=2,
            label=method,
        )
    axes.set_xlabel(f"realised skip ratio of the {report['target_of']} slots (test split)")
    axes.set_ylabel("relative accuracy (%)")
    axes.set_title("Accuracy vs skipping, bundled model")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
