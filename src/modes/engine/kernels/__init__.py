"""modes' compiled CPU kernel: rows grouped by expert times their experts' weights, in one call.

At high skip ratios each expert keeps a few rows, and oneDNN streams an expert's weight for a
few rows at a fraction of what the memory delivers (BENCHMARKS.md). ``grouped_rows.cpp`` reads
each weight row once per register tile of up to four rows (AVX-512, with AVX-512 BF16 for
bf16), on the module's own weights as most families store them ([out, in]): no packed copy.
It is compiled for the CPU at hand (``-march=native``) the first time it is asked for, by
`torch.utils.cpp_extension` (a C++ compiler and ninja are needed; the build is cached in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), and `load_kernel` says
why when it cannot be.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["KernelUnavailableError", "cpu_supports", "grouped_rows_linear", "kernel_dtypes", "load_kernel"]

SOURCE = Path(__file__).with_name("grouped_rows.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: ATen's parallel_for, as torch itself is built

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_built: dict[str, Any] = {}  # "module" or "error", once tried


class KernelUnavailableError(RuntimeError):
    """modes' CPU kernel could not be built or does not run on this CPU."""


def load_kernel() -> Any:
    """The compiled extension, built at the first call of the process (about a minute the very
    first time, then loaded from torch's cache); raises `KernelUnavailableError` naming why."""
    with _lock:
        if not _built:
            try:
                _built["module"] = _build()
            except Exception as error:  # compiler, ninja or headers missing, or no AVX-512
                _built["error"] = error
        if "error" in _built:
            error = _built["error"]
            raise KernelUnavailableError(f"modes' CPU kernel is unavailable: {error}") from error
        return _built["module"]


def _build() -> Any:
    from torch.utils.cpp_extension import load

    _logger.info("modes: building the CPU kernel for this machine (once; cached by torch)")
    name = f"modes_grouped_rows_{_cpu_tag()}"
    module = load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, verbose=False)
    if not module.supports_float32():
        raise RuntimeError("this CPU has no AVX-512 (the kernel's fp32 and bf16 paths need it)")
    return module


def _cpu_tag() -> str:
    """A short tag of this CPU's model and instruction sets: torch's build cache knows sources and
    flags, not CPUs, so a ``-march=native`` build cached on a shared disk by another machine
    would be loaded here and could stop on an illegal instruction. The tag keeps them apart."""
    lines = [line for line in _cpuinfo_lines() if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256(
        "\n".join(lines or [platform.processor(), platform.machine()]).encode()
    ).hexdigest()[:12]


def cpu_supports(dtype: torch.dtype) -> bool:
    """Whether this CPU has the instructions the kernel needs for ``dtype`` (AVX-512, and AVX-512
    BF16 for bf16), read from the CPU's flags without building anything."""
    flags_line = next((line for line in _cpuinfo_lines() if line.startswith("flags")), "")
    flags = set(flags_line.partition(":")[2].split())
    needed = {torch.float32: {"avx512f"}, torch.bfloat16: {"avx512f", "avx512_bf16"}}.get(dtype)
    return needed is not None and needed <= flags


def _cpuinfo_lines() -> list[str]:
    """/proc/cpuinfo's lines (Linux; elsewhere none, and the kernel is not offered)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text().splitlines() if cpuinfo.exists() else []


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the built kernel runs on this CPU (bf16 needs AVX-512 BF16)."""
    module = load_kernel()
    return (torch.float32, torch.bfloat16) if module.supports_bfloat16() else (torch.float32,)


def grouped_rows_linear(
    rows: torch.Tensor, weight: torch.Tensor, starts: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """``rows`` [N, K] grouped in runs (run r: rows ``starts[r]`` to ``starts[r + 1]`` - 1, of
    expert ``experts[r]``) times each run's expert weight ``weight`` [E, O, K] -> [N, O], no bias."""
    return load_kernel().grouped_rows_linear(rows, weight, starts, experts)
