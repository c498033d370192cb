"""Two CPU processes (gloo, under torchrun) give what one process with one thread gives, bit
for bit: alphas, raw KL and answer tokens; the search's plan, frontier and every point; the
evaluation's answers, accuracy and slot counts; a comparison's rows; with an odd number of
batches and with a rank that has no batch. Only rank 0 writes; an interrupted run resumes;
an error on one rank reaches every rank; the guard fires."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from modes import parallel
from modes.parallel import DistributedError, Ranks, gpus_of_rank, ranks

PIPELINE = Path(__file__).with_name("pipeline.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    environment["OMP_NUM_THREADS"] = "1"
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    alone, together = tmp_path_factory.mktemp("alone"), tmp_path_factory.mktemp("together")
    for command, out in (([sys.executable, str(PIPELINE)], alone), ([*TORCHRUN, str(PIPELINE)], together)):
        finished = run([*command, str(out)], out)
        assert finished.returncode == 0, finished.stderr[-3000:]
    reference = json.loads((alone / "rank0.json").read_text())
    ranks_ = [json.loads((together / f"rank{r}.json").read_text()) for r in (0, 1)]
    return reference, ranks_, alone, together


@pytest.mark.parametrize("name", ["uneven", "empty"])
def test_two_ranks_equal_one_process_bit_for_bit(results, name):
    reference, (first, second), _, _ = results
    assert (reference["world"], first["world"]) == (1, 2)
    for rank in (first, second):
        assert rank[name] == reference[name]  # exact: floats compared as written


def test_only_rank_0_writes_the_search_cache(results):
    _, _, alone, together = results
    for name in ("cache_uneven", "cache_empty"):  # one file, written by rank 0 alone: no line twice
        assert (together / name).read_text() == (alone / name).read_text()
    assert sorted(p.name for p in together.iterdir()) == [
        "cache_empty",
        "cache_uneven",
        "rank0.json",
        "rank1.json",
    ]


def test_cli_under_torchrun_writes_once_and_resumes(tmp_path):
    importance = tmp_path / "importance.json"
    finished = run(
        [*TORCHRUN, "-m", "modes", "calibrate", "--samples", "16", "--out", str(importance)], tmp_path
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count(f"wrote {importance}\n") == 1  # rank 1 prints nothing
    search = [*TORCHRUN, "-m", "modes", "search", "--samples", "16", "--importance", str(importance),
              "--target", "0.5", "--grid-size", "5", "--out", str(tmp_path / "plan.json")]  # fmt: skip
    stopped = run([*search, "--max-evaluations", "3"], tmp_path)
    assert stopped.returncode != 0 and "evaluation budget of 3 points used" in stopped.stderr
    cache = tmp_path / "plan.json.cache.jsonl"

    def points() -> int:
        return sum("fingerprint" not in line for line in cache.read_text().splitlines())

    assert points() == 3
    resumed = run(search, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    new = int(resumed.stdout.split(" new)")[0].rsplit("(", 1)[1])
    assert new == points() - 3  # the three points of the stopped run were not computed again


def test_a_group_smaller_than_the_launcher_said_is_refused(monkeypatch, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(DistributedError, match="each process would do the whole job alone"):
            ranks()
    finally:
        dist.destroy_process_group()


def test_exit_waits_for_gloo_to_release_the_last_gather(tmp_path):
    """At exit, modes waits until gloo's worker has let go of the last gather's tensors: its
    dropping a reference to a Python-made tensor takes the GIL, which aborts a process that is
    already shutting down."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        (gathered,) = parallel._all_gather_object({0: ("answer", torch.arange(3))}, 1)
        assert gathered[0][0] == "answer" and torch.equal(gathered[0][1], torch.arange(3))
        held = [weakref.ref(t) for t in parallel._last_exchange]
        assert len(held) == 4  # this rank's size, every rank's size, this payload, every payload
        parallel._drain_last_exchange()  # what exit runs: returns once only we hold them
        tensors = {i: ref() for i, ref in enumerate(held)}
        alive = {i: (t._use_count(), sys.getrefcount(t)) for i, t in tensors.items() if t is not None}
        assert parallel._last_exchange == [] and not alive, f"still alive (C++ uses, Python refs): {alive}"
    finally:
        dist.destroy_process_group()


def test_one_process_shares_everything_with_itself():
    assert ranks() == Ranks(0, 1)
    assert Ranks(1, 3).share("abcdefg") == [(1, "b"), (4, "e")]
    assert Ranks().gather(lambda: {2: "b", 0: "a"}) == {0: "a", 2: "b"}


def test_an_error_on_one_rank_reaches_every_rank(tmp_path):
    finished = run([*TORCHRUN, str(PIPELINE.with_name("failing.py"))], tmp_path)
    assert finished.returncode != 0
    assert "ValueError: rank 1 cannot read its batch" in finished.stderr  # rank 1's own error
    assert (
        "DistributedError: rank 1 failed: ValueError: rank 1 cannot read its batch" in finished.stderr
    )  # rank 0


@pytest.mark.parametrize(
    ("gpus", "local_world", "expected"),
    [(8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]), (8, 8, [[g] for g in range(8)]), (2, 4, [[0], [1], [0], [1]])],
)
def test_each_rank_dispatches_over_its_own_gpus(gpus, local_world, expected):
    assert [gpus_of_rank(gpus, rank, local_world) for rank in range(local_world)] == expected
    with pytest.raises(ValueError, match="local_rank"):
        gpus_of_rank(gpus, local_world, local_world)
