"""Human-readable tables of modes' results (the CLI prints them; docs embed them)."""

from __future__ import annotations

from typing import Any

__all__ = ["compare_markdown", "demo_table", "text_table"]


def text_table(rows: list[list[Any]], header: list[str]) -> str:
    """Right-aligned plain-text columns with a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[Any]) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def compare_markdown(report: dict[str, Any]) -> str:
    """The paper-style table of `modes.compare`: ratios (of the skippable slots and of all),
    per-modality ratios, per-skill accuracy, accuracy +- its standard error, relative accuracy
    and the calibration KL every method reached."""
    skills = list(report["baseline"]["per_skill"])
    header = [
        "method",
        "target",
        "ratio",
        "of all",
        "text",
        "visual",
        *skills,
        "accuracy",
        "relative %",
        "calib KL",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = report["baseline"]
    cells = [
        "unskipped",
        "-",
        "0.000",
        "0.000",
        "-",
        "-",
        *(f"{base['per_skill'][k] * 100:.1f}" for k in skills),
    ]
    cells += [_percent(base["accuracy"], base["accuracy_se"]), "100.0", "0"]
    lines.append("| " + " | ".join(cells) + " |")
    for row in report["rows"]:
        modality = [f"{row['per_modality'].get(m, 0.0):.3f}" for m in ("text", "visual")]
        cells = [
            row["method"],
            f"{row['target']:.2f}",
            f"{row['ratio']:.3f}",
            f"{row['ratio_of_all_slots']:.3f}",
        ]
        cells += [*modality, *(f"{row['per_skill'][k] * 100:.1f}" for k in skills)]
        cells += [_percent(row["accuracy"], row["accuracy_se"]), f"{row['relative_accuracy']:.1f}"]
        cells.append(f"{row['calibration_kl']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value: float, error: float) -> str:
    return f"{value * 100:.1f} +- {error * 100:.1f}"


def demo_table(summary: dict[str, Any]) -> str:
    """`modes demo`'s table: thresholds, ratios and accuracy of each target's plan."""
    base = summary["baseline"]
    rows = [["none", "-", "-", "0.000 / 0.000", _percent(base["accuracy"], base["accuracy_se"]), "100.00"]]
    for plan in summary["plans"]:
        rows.append(
            [
                f"{plan['target']:.2f}",
                " / ".join(f"{t:.4f}" for t in plan["thresholds"].values()),
                f"{plan['calibration_ratio']:.3f}",
                f"{plan['test_ratio']:.3f} / {plan['test_ratio_of_all_slots']:.3f}",
                _percent(plan["accuracy"], plan["accuracy_se"]),
                f"{plan['relative_accuracy']:.2f}",
            ]
        )
    modalities = "/".join(summary["plans"][0]["thresholds"]) if summary["plans"] else ""
    of = summary["plans"][0]["target_of"] if summary["plans"] else "skippable"
    header = [
        "target",
        f"tau ({modalities})",
        "calib ratio",
        f"test ratio ({of} / all)",
        "accuracy %",
        "relative %",
    ]
    return text_table(rows, header)
