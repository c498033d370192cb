"""The atomic writers every artefact goes through."""

from __future__ import annotations

import pytest

from modes.io import write_json_atomic, write_text_atomic


def test_writing_over_a_directory_names_it_and_leaves_it(tmp_path):
    (tmp_path / "kept.txt").write_text("x")
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        write_json_atomic(tmp_path, {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]  # no temporary file left behind


def test_a_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    write_text_atomic(path, "old and longer")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
