"""Functions the ``modes_bundled`` lmms-eval task names; scoring is modes' own exact match.

    python -m modes.evaluation.lmms_tasks.utils modes_bundled_test.parquet
writes the bundled test split in the parquet form the task reads.
"""

from __future__ import annotations

import sys
from typing import Any

from modes.evaluation.evaluate import normalise_answer

__all__ = ["doc_to_text", "doc_to_visual", "process_results"]


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")] if doc.get("image") is not None else []


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": float(normalise_answer(results[0]) == normalise_answer(doc["answer"]))}


if __name__ == "__main__":
    from modes.data.samples import export_samples, load_samples

    print(
        export_samples(
            load_samples(split="test"), sys.argv[1] if len(sys.argv) > 1 else "modes_bundled_test.parquet"
        )
    )
