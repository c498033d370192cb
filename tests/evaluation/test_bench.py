"""`read_once`, the floor the benchmarks' memory bounds are taken against: it reads tensors of
every dtype, size and alignment (the fp32 view it takes where it can must not refuse the rest)."""

from __future__ import annotations

import pytest
import torch

from modes.evaluation.bench import read_once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_read_once_reads_any_size_and_alignment(dtype):
    base = torch.ones(4, 7, dtype=dtype)
    odd_sizes = [base, base[:, :3], base.reshape(-1)[1:], base.reshape(-1)[1:6], base.t()]
    read_once(odd_sizes)  # misaligned, odd byte counts and non-contiguous views included
    assert torch.equal(base, torch.ones(4, 7, dtype=dtype))  # read, not written
