"""The allocator switch that keeps benchmark calls free of page faults for their temporaries."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Each case in a child process: the switch changes its process's allocator for good.
REALLOCATE = """
import sys
from modes.evaluation.allocator import minor_page_faults, retain_freed_memory
import torch

applied = {retain} and retain_freed_memory()
faults = []
for _ in range(4):  # 64 MB of temporaries per call, as a prefill's experts call allocates
    before = minor_page_faults()
    torch.ones(16 * 2**20).sum()
    faults.append(minor_page_faults() - before)
print(applied, min(faults[1:]))
"""


def _faults_per_call(retain: bool) -> tuple[str, int]:
    code = REALLOCATE.format(retain=retain)
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    applied, faults = output.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retained_memory_is_reused_without_page_faults():
    applied, faults = _faults_per_call(retain=True)
    assert applied == "True"
    assert faults < 100  # a handful of small allocations at most


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_default_faults_in_every_large_temporary():
    """What the switch is for: without it each call maps 64 MB afresh (16384 pages)."""
    applied, faults = _faults_per_call(retain=False)
    assert applied == "False"
    assert faults > 10_000
