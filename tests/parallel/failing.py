"""Rank 1 fails inside a gather; every rank must raise instead of waiting for it."""

from modes.parallel import ranks


def compute() -> dict[int, int]:
    if group.rank == 1:
        raise ValueError("rank 1 cannot read its batch")
    return {group.rank: group.rank}


group = ranks()
group.gather(compute)
