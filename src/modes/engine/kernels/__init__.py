"""modes' compiled CPU kernel: rows grouped by expert times their experts' weights, in one call.

At high skip ratios each expert keeps a few rows, and oneDNN streams an expert's weight for a
few rows at a fraction of what the memory delivers (BENCHMARKS.md). ``grouped_rows.cpp`` reads
each weight row once per register tile, on the module's own weights as most families store
them ([out, in]): no packed copy. It is one source over ATen's portable vectors, built for one
instruction set (`ISAS`) the first time it is asked for, by `torch.utils.cpp_extension` (a C++
compiler and ninja are needed; the build is cached in ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). `best_isa` picks the fastest set this CPU runs, following
PyTorch's own ``ATEN_CPU_CAPABILITY`` when it is set (``avx2`` makes an AVX-512 machine run
the AVX2 build, ``default`` turns the kernel off); `load_kernel` says why when it cannot run.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modes.errors import UserError

__all__ = [
    "ISAS",
    "KERNEL_DTYPES",
    "Isa",
    "Kernel",
    "KernelBuildError",
    "KernelUnavailableError",
    "best_isa",
    "cpu_flags",
    "cpu_supports",
    "grouped_rows_linear",
    "kernel_status",
    "load_kernel",
    "sve_vector_bits",
]

SOURCE = Path(__file__).with_name("grouped_rows.cpp")
# OpenMP: ATen's parallel_for, as torch itself is built.
COMMON_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno")
_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c")
_AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"})


@dataclass(frozen=True)
class Isa:
    """One instruction set the kernel is built for: the CPU flags it needs (as /proc/cpuinfo
    spells them), the machine, the compiler flags and PyTorch's CPU_CAPABILITY it builds as;
    ``sve_bits``: the SVE vector length a vector-length-specific build needs (0: none)."""

    name: str
    machine: str
    cpu_flags: frozenset[str]
    cflags: tuple[str, ...]
    capability: str
    sve_bits: int = 0

    def runs_here(self) -> bool:
        if _machine() != self.machine or not self.cpu_flags <= cpu_flags():
            return False
        return self.sve_bits == 0 or sve_vector_bits() == self.sve_bits

    def build_flags(self) -> list[str]:
        capability = [f"-DCPU_CAPABILITY={self.capability}", f"-DCPU_CAPABILITY_{self.capability}"]
        return [*COMMON_FLAGS, *self.cflags, *capability, f"-DMODES_LIBRARY_NAME={self.library}"]

    @property
    def library(self) -> str:
        return f"modes_{self.name}"


ISAS: dict[str, Isa] = {
    isa.name: isa
    for isa in (
        # AVX-512 with native bf16 dot products (vdpbf16ps): Sapphire Rapids, Zen 4 and later
        Isa("avx512_bf16", "x86_64", _AVX512_FLAGS | {"avx512_bf16"}, (*_AVX512, "-mavx512bf16"), "AVX512"),
        Isa("avx512", "x86_64", _AVX512_FLAGS, _AVX512, "AVX512"),
        Isa("avx2", "x86_64", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c"), "AVX2"),
        # aarch64 with 256-bit SVE (Graviton3, Neoverse V1), as PyTorch builds its SVE256 kernels
        Isa(
            "sve256",
            "aarch64",
            frozenset({"asimd", "sve"}),
            ("-march=armv8.2-a+sve", "-msve-vector-bits=256", "-DCPU_CAPABILITY_SVE"),
            "SVE256",
            sve_bits=256,
        ),
        # aarch64: NEON is baseline and PyTorch's DEFAULT capability there is NEON
        Isa("neon", "aarch64", frozenset({"asimd"}), (), "DEFAULT"),
    )
}
"""Fastest first within each machine."""

_FOLLOWS = {
    "avx512": ("avx512_bf16", "avx512"),
    "avx2": ("avx2",),
    "sve256": ("sve256", "neon"),
    "default": ("neon",),
}
"""ATEN_CPU_CAPABILITY -> the builds it allows (on x86 ``default`` allows none)."""


class KernelUnavailableError(UserError, RuntimeError):
    """modes' CPU kernel could not be built or does not run on this CPU."""


class KernelBuildError(KernelUnavailableError):
    """This CPU could run the kernel, but building it failed (no compiler or ninja, ...)."""


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Every build runs these (bf16 and fp16 widened to fp32 in registers without native dots)."""


@dataclass(frozen=True)
class Kernel:
    """A loaded build: its instruction set and the op it registered."""

    isa: Isa
    op: Any

    def grouped_rows_linear(self, rows, weight, starts, experts) -> torch.Tensor:
        return self.op(rows, weight, starts, experts)


_lock = threading.Lock()
_loaded: dict[str, Kernel | Exception] = {}  # isa name -> build, or why it failed


def best_isa() -> Isa | None:
    """The fastest instruction set this CPU runs the kernel with (None: none does), following
    ``ATEN_CPU_CAPABILITY`` as PyTorch's own kernels do."""
    allowed = _FOLLOWS.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower(), tuple(ISAS))
    return next((isa for name, isa in ISAS.items() if name in allowed and isa.runs_here()), None)


def kernel_status() -> dict[str, str | None]:
    """The instruction set the default build is for (``isa``; None: none runs here) and whether
    it is ``built`` (loaded in this process), or ``error``: why it cannot run."""
    isa = best_isa()
    built = _loaded.get(isa.name) if isa is not None else None
    error = _no_isa_reason(None) if isa is None else str(built) if isinstance(built, Exception) else None
    return {"isa": isa.name if isa else None, "built": isinstance(built, Kernel), "error": error}


def load_kernel(isa: str | None = None) -> Kernel:
    """The kernel built for ``isa`` (default `best_isa`), compiled the first time on this
    machine (about a minute, with a progress line) and loaded from torch's cache after that;
    raises `KernelUnavailableError` naming why it cannot run."""
    chosen = ISAS.get(isa) if isa is not None else best_isa()
    if chosen is None:
        raise KernelUnavailableError(_no_isa_reason(isa))
    if not chosen.runs_here():
        raise KernelUnavailableError(
            f"this CPU cannot run the {chosen.name} build (it needs {_missing(chosen)})"
        )
    with _lock:
        if chosen.name not in _loaded:
            try:
                _loaded[chosen.name] = _build(chosen)
            except Exception as error:  # compiler, ninja or headers missing
                _loaded[chosen.name] = error
        built = _loaded[chosen.name]
    if isinstance(built, Exception):
        raise KernelBuildError(f"modes' CPU kernel ({chosen.name}) could not be built: {built}") from built
    return built


def _no_isa_reason(isa: str | None) -> str:
    if isa is not None:
        return f"no kernel build is named {isa!r}; choose from {list(ISAS)}"
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if forced:
        return f"ATEN_CPU_CAPABILITY={forced} allows no kernel build on {_machine()}"
    return (
        f"this CPU ({_machine()}) has none of the instruction sets the kernel is built for "
        f"({', '.join(isa.name for isa in ISAS.values())})"
    )


def _missing(isa: Isa) -> str:
    if _machine() != isa.machine:
        return f"an {isa.machine} CPU, this is {_machine()}"
    if isa.cpu_flags <= cpu_flags():
        return f"{isa.sve_bits}-bit SVE vectors, this CPU's are {sve_vector_bits()}-bit"
    return "the CPU flags " + ", ".join(sorted(isa.cpu_flags - cpu_flags()))


def sve_vector_bits() -> int:
    """This process's SVE vector length in bits (0 without SVE): ``prctl(PR_SVE_GET_VL)``, what a
    vector-length-specific build must match (a 256-bit build on 128-bit SVE computes garbage)."""
    if _machine() != "aarch64" or "sve" not in cpu_flags():
        return 0
    pr_sve_get_vl, vl_len_mask = 51, 0xFFFF  # <linux/prctl.h>
    answer = ctypes.CDLL(None, use_errno=True).prctl(pr_sve_get_vl, 0, 0, 0, 0)
    return (answer & vl_len_mask) * 8 if answer > 0 else 0


def _build(isa: Isa) -> Kernel:
    from torch.utils.cpp_extension import _get_build_directory, load

    name = f"modes_grouped_rows_{isa.name}"
    cached = (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    with _BuildProgress(isa.name, quiet=cached):
        load(name=name, sources=[str(SOURCE)], extra_cflags=isa.build_flags(), is_python_module=False)
    return Kernel(isa, getattr(torch.ops, isa.library).grouped_rows_linear)


class _BuildProgress:
    """A line on stderr that counts the seconds of a first build (cached builds stay quiet)."""

    def __init__(self, isa: str, quiet: bool):
        self.isa, self.quiet = isa, quiet
        self._done = threading.Event()

    def __enter__(self) -> _BuildProgress:
        if not self.quiet:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def _tick(self) -> None:
        from tqdm import tqdm

        label = f"modes: compiling the CPU kernel for {self.isa} (first use on this machine; cached after)"
        with tqdm(desc=label, bar_format="{desc}: {elapsed}", leave=True) as bar:
            while not self._done.wait(1.0):
                bar.refresh()

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if not self.quiet:
            self._thread.join()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (``flags`` on x86, ``Features`` on ARM)."""
    lines = _cpuinfo_lines()
    line = next((line for line in lines if line.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cpu_supports(dtype: torch.dtype) -> bool:
    """Whether the kernel runs ``dtype`` on this CPU (an instruction set it is built for is
    there), read from the CPU's flags without building anything."""
    return dtype in KERNEL_DTYPES and best_isa() is not None


def _cpuinfo_lines() -> list[str]:
    """/proc/cpuinfo's lines (Linux; elsewhere none, and the kernel is not offered)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text().splitlines() if cpuinfo.exists() else []


def grouped_rows_linear(
    rows: torch.Tensor,
    weight: torch.Tensor,
    starts: torch.Tensor,
    experts: torch.Tensor,
    isa: str | None = None,
) -> torch.Tensor:
    """``rows`` [N, K] grouped in runs (run r: rows ``starts[r]`` to ``starts[r + 1]`` - 1, of
    expert ``experts[r]``) times each run's expert weight ``weight`` [E, O, K] -> [N, O], no bias."""
    return load_kernel(isa).grouped_rows_linear(rows, weight, starts, experts)
