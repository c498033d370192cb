"""GQA-like samples (image, question, answer) from the bundled benchmark or a data file.

Accepted sources: JSONL (one object per line; ``image`` a path relative to the file, or
absent for text-only rows), parquet with image bytes, or a local Hugging Face dataset
directory (`datasets.save_to_disk`). Column names are configurable. Every problem names the
row it was found in.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from modes.data.benchmark import generate_split
from modes.data.sample import Sample
from modes.errors import UserError

__all__ = ["Columns", "DataFileError", "export_samples", "load_samples"]


class DataFileError(UserError, ValueError):
    """A data file or one of its rows cannot be turned into samples."""


@dataclass(frozen=True)
class Columns:
    """Which columns hold each field (GQA-like defaults)."""

    image: str = "image"
    question: str = "question"
    answer: str = "answer"
    skill: str = "skill"
    id: str = "id"


def load_samples(
    source: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    columns: Columns | None = None,
) -> list[Sample]:
    """The bundled benchmark's ``split`` (``source=None``), or the samples of a data file."""
    if source is None:
        return generate_split(split, limit)
    path = Path(source)
    if not path.exists():
        raise DataFileError(f"data source {path} does not exist")
    samples = []
    for index, (place, row) in enumerate(_rows(path, split)):
        if limit is not None and index >= limit:
            break
        samples.append(_sample(row, index, f"{path} {place}", path, columns or Columns()))
    if not samples:
        raise DataFileError(f"{path} holds no samples")
    return samples


def _rows(path: Path, split: str) -> Iterable[tuple[str, dict[str, Any]]]:
    """(where, row) pairs, ``where`` 1-based as an editor counts: "line 4" of a JSONL file,
    "row 4" of a table."""
    if path.suffix in (".jsonl", ".json") and path.is_file():
        return _jsonl_rows(path)
    return ((f"row {number}", row) for number, row in enumerate(_table_rows(path, split), start=1))


def _table_rows(path: Path, split: str) -> Iterable[dict[str, Any]]:
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataFileError(f"{path} has splits {list(data)}, not {split!r}; pass --split")
            data = data[split]
        return iter(data)
    if path.suffix == ".parquet":
        import datasets

        return iter(datasets.Dataset.from_parquet(str(path)))
    raise DataFileError(
        f"{path}: unknown data format {path.suffix!r}; use .jsonl, .parquet or a dataset directory"
    )


def _jsonl_rows(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFileError(f"{path} line {number}: not valid JSON ({error.msg})") from error


def _sample(row: dict[str, Any], index: int, where: str, path: Path, columns: Columns) -> Sample:
    if not isinstance(row, dict):
        raise DataFileError(f"{where}: expected an object with question and answer, got {type(row).__name__}")
    for field in ("question", "answer"):
        name = getattr(columns, field)
        value = row.get(name)
        if not isinstance(value, (str, int, float)) or not str(value).strip():
            raise DataFileError(
                f"{where}: column {name!r} is missing or empty; if the {field}s are in another column, "
                f"name it with --{field}-column (columns here: {sorted(row)})"
            )
    return Sample(
        id=str(row.get(columns.id, f"row{index}")),
        question=str(row[columns.question]).strip(),
        answer=str(row[columns.answer]).strip(),
        skill=str(row.get(columns.skill) or "all"),
        image=_image(row.get(columns.image), where, path.parent if path.is_file() else path),
    )


def _image(value: Any, where: str, base: Path) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    try:
        if isinstance(value, dict) and value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str):
            image_path = Path(value) if Path(value).is_absolute() else base / value
            if not image_path.exists():
                raise DataFileError(f"{where}: image file {image_path} not found")
            return Image.open(image_path).convert("RGB")
    except DataFileError:
        raise
    except Exception as error:
        raise DataFileError(f"{where}: image cannot be read ({error})") from error
    raise DataFileError(f"{where}: unsupported image value of type {type(value).__name__}")


def export_samples(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples as JSONL with PNGs beside it (``name_images/``) or as parquet with image bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = list(samples)
    if path.suffix == ".parquet":
        import datasets

        records = {
            "id": [s.id for s in samples],
            "question": [s.question for s in samples],
            "answer": [s.answer for s in samples],
            "skill": [s.skill for s in samples],
            "image": [s.image for s in samples],
        }
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "skill": datasets.Value("string"),
                "image": datasets.Image(),
            }
        )
        datasets.Dataset.from_dict(records, features=features).to_parquet(str(path))
        return path
    image_dir = path.with_name(f"{path.stem}_images")
    image_dir.mkdir(exist_ok=True)
    with path.open("w") as handle:
        for sample in samples:
            row = {
                "id": sample.id,
                "question": sample.question,
                "answer": sample.answer,
                "skill": sample.skill,
            }
            if sample.image is not None:
                sample.image.save(image_dir / f"{sample.id}.png")
                row["image"] = f"{image_dir.name}/{sample.id}.png"
            handle.write(json.dumps(row) + "\n")
    return path
