"""Data files: JSONL and parquet round trips, column mapping, and errors that name the row."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import modes
from modes.data import Columns, DataFileError, encode_teacher_forced, export_samples, load_samples
from modes.data.encoding import EmptyAnswerError, answer_logit_mask


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_and_load_round_trip(tmp_path, suffix):
    samples = load_samples(split="test", limit=10)
    path = export_samples(samples, tmp_path / f"test{suffix}")
    loaded = load_samples(path)
    assert [(s.id, s.question, s.answer, s.skill) for s in loaded] == [
        (s.id, s.question, s.answer, s.skill) for s in samples
    ]
    for original, again in zip(samples, loaded, strict=True):
        assert (original.image is None) == (again.image is None)
        if original.image is not None:
            assert original.image.tobytes() == again.image.tobytes()


def test_dataset_directory_and_column_mapping(tmp_path):
    import datasets

    image = Image.new("RGB", (8, 8), "red")
    data = datasets.Dataset.from_dict({"q": ["what color ?"], "a": ["red"], "img": [image]})
    datasets.DatasetDict({"validation": data}).save_to_disk(str(tmp_path / "ds"))
    columns = Columns(image="img", question="q", answer="a")
    (sample,) = load_samples(tmp_path / "ds", split="validation", columns=columns)
    assert (sample.question, sample.answer, sample.image.size) == ("what color ?", "red", (8, 8))
    with pytest.raises(DataFileError, match="not 'test'"):
        load_samples(tmp_path / "ds", split="test", columns=columns)


def test_malformed_rows_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"question": "q ?", "answer": "a"}) + "\n" + json.dumps({"question": "q ?"}) + "\n"
    )
    with pytest.raises(
        DataFileError,
        match="line 2: column 'answer' is missing or empty; if the answers are in another column, "
        "name it with --answer-column",
    ):
        load_samples(path)
    path.write_text(json.dumps({"question": "q ?", "answer": "a", "image": "nowhere.png"}) + "\n")
    with pytest.raises(DataFileError, match=r"line 1: image file .*nowhere\.png not found"):
        load_samples(path)
    path.write_text("{oops\n")
    with pytest.raises(DataFileError, match="line 1: not valid JSON"):
        load_samples(path)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataFileError, match="unknown data format"):
        load_samples(tmp_path / "x.csv")


def test_teacher_forced_mask_covers_answer_and_end_of_turn_only():
    processor = modes.load_processor(modes.bundled_model_path())
    samples = load_samples(split="test", limit=8)
    batch = encode_teacher_forced(processor, samples)
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        scored = batch["input_ids"][row][batch["answer_mask"][row]]
        assert tokenizer.decode(scored) == f"{sample.answer} {tokenizer.eos_token}"
    shifted = answer_logit_mask(batch["answer_mask"])
    assert int(shifted.sum()) == int(batch["answer_mask"].sum())


def test_empty_answer_is_refused_with_the_sample_id():
    processor = modes.load_processor(modes.bundled_model_path())
    sample = load_samples(split="test", limit=1)[0]
    empty = type(sample)(id="row7", question=sample.question, answer="", skill="x", image=sample.image)
    with pytest.raises(EmptyAnswerError, match="row7"):
        encode_teacher_forced(processor, [empty])
