"""modes' compiled CPU kernel: every build this CPU runs computes what `F.linear` computes, for
every tail of K and O and every tile height, in fp32, bf16 and fp16; it is what `modes.apply`
runs by default where it can, steps aside with the reason where it cannot, and refuses what an
explicit ``execution="compiled"`` cannot run with the fix named."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import modes
from experts_layouts import LAYOUTS, TOLERANCE, build_experts, keep_first_slot_of_most_tokens, routing
from modes import ApplyOptions
from modes.engine import kernels, options
from modes.engine.compiled import MAX_ROWS_PER_EXPERT, CompiledExperts
from modes.engine.execute import run_experts
from modes.engine.kernels import ISAS, Kernel, best_isa
from tiny_models import TINY_MODELS, build, prompts

NO_COMPILER = shutil.which("c++") is None and shutil.which("g++") is None


def isa_param(name: str):
    """One build, skipped with the reason where this machine cannot run or build it."""
    isa = ISAS[name]
    reason = None if isa.runs_here() else f"this CPU cannot run the {name} build ({kernels._missing(isa)})"
    reason = reason or ("no C++ compiler on this machine" if NO_COMPILER else None)
    return pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


BUILDS = [isa_param(name) for name in ISAS]
DEFAULT_BUILD = pytest.mark.skipif(
    best_isa() is None or NO_COMPILER, reason=f"no kernel build runs here: {kernels._no_isa_reason(None)}"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13])  # each tile height (4 or 6), several tiles
@pytest.mark.parametrize(("inner", "outer"), [(64, 32), (37, 6), (16, 1), (33, 129), (7, 3)])  # K, O tails
@pytest.mark.parametrize("isa", BUILDS)
def test_each_build_equals_each_runs_linear(isa, dtype, rows, inner, outer):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(5, outer, inner, generator=generator).to(dtype)  # [E, O, K]
    experts = torch.tensor([3, 0, 4, 1])  # runs in any expert order, one of them empty
    counts = [rows, max(rows - 1, 1), 0, rows + 2]
    x = torch.randn(sum(counts), inner, generator=generator).to(dtype)  # [N, K]
    starts = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])  # [R + 1]
    got = kernels.grouped_rows_linear(x, weight, starts, experts, isa=isa)
    expected = torch.cat(
        [
            torch.nn.functional.linear(x[starts[r] : starts[r + 1]].float(), weight[e].float())
            for r, e in enumerate(experts.tolist())
        ]
    )
    assert got.dtype == dtype and got.shape == (sum(counts), outer)
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype])


def count_kernel_calls(path: CompiledExperts) -> list[int]:
    """Rows handed to ``path``'s kernel, one entry per call."""
    calls: list[int] = []
    op = path.kernel.op
    path.kernel = Kernel(path.kernel.isa, lambda rows, *a: calls.append(len(rows)) or op(rows, *a))
    return calls


@DEFAULT_BUILD
def test_few_rows_per_expert_run_on_the_kernel_and_many_on_the_module():
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    path = CompiledExperts(experts)
    calls = count_kernel_calls(path)
    few = MAX_ROWS_PER_EXPERT * experts.num_experts  # one slot kept per token
    hidden, index, weights = routing(experts, tokens=few)
    skip = torch.zeros_like(index, dtype=torch.bool)
    skip[:, 1] = True
    run_experts(experts, hidden, index, weights, skip, cpu_path=path)
    assert calls == [few, few]  # both projections, one call each
    calls.clear()
    hidden, index, weights = routing(experts, tokens=few + 1)
    skip = torch.zeros_like(index, dtype=torch.bool)
    skip[:, 1] = True
    run_experts(experts, hidden, index, weights, skip, cpu_path=path)
    assert calls == []  # more rows than the kernel's regime: the module's grouped kernel


@DEFAULT_BUILD
def test_a_call_that_skips_nothing_runs_the_module_itself():
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    path = CompiledExperts(experts)
    calls = count_kernel_calls(path)
    hidden, index, weights = routing(experts, tokens=3)
    skip = torch.zeros_like(index, dtype=torch.bool)
    got = run_experts(experts, hidden, index, weights, skip, cpu_path=path)
    assert torch.equal(got, experts(hidden, index, weights)) and calls == []


@DEFAULT_BUILD
def test_weights_changed_in_place_are_what_the_kernel_reads():
    """No copy: unlike packed weights, nothing can go stale."""
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    path = CompiledExperts(experts)
    hidden, index, weights = routing(experts, tokens=3)
    skip = keep_first_slot_of_most_tokens(index)
    with torch.no_grad():
        experts.down_proj.mul_(2)
    expected = experts(hidden, index, weights.masked_fill(skip, 0))
    torch.testing.assert_close(run_experts(experts, hidden, index, weights, skip, cpu_path=path), expected)


@DEFAULT_BUILD
def test_a_cast_module_falls_back_to_its_own_kernel():
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    path = CompiledExperts(experts)
    calls = count_kernel_calls(path)
    experts.double()
    hidden, index, weights = routing(experts, tokens=3)
    skip = keep_first_slot_of_most_tokens(index)
    got = run_experts(experts, hidden.double(), index, weights.double(), skip, cpu_path=path)
    assert got.dtype == torch.float64 and calls == []


@DEFAULT_BUILD
@pytest.mark.parametrize(
    ("layout", "dtype", "message"),
    [
        (LAYOUTS[0], torch.float64, r"runs float32, bfloat16, float16, not torch\.float64"),
        (LAYOUTS[1], torch.float32, r"stores expert weights \[in, out\]"),
    ],
    ids=["float64", "transposed"],
)
def test_what_the_kernel_cannot_run_is_refused_with_the_fix(layout, dtype, message):
    experts = build_experts(*layout, "grouped_mm").to(dtype)
    with pytest.raises(ValueError, match=message + r".*apply with execution='loop'"):
        CompiledExperts(experts)


@DEFAULT_BUILD
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(experts=torch.tensor([0, 5, 1])), "expert out of range"),
        (dict(starts=torch.tensor([0, 2, 1, 4])), "run starts must not decrease"),
        (dict(starts=torch.tensor([0, 1, 2, 3])), "runs must cover the rows"),
        (
            dict(rows=torch.randn(4, 8).double(), weight=torch.randn(5, 4, 8).double()),
            "float16 expected, got Double",
        ),
    ],
    ids=["expert", "order", "cover", "dtype"],
)
def test_malformed_runs_are_refused_before_any_read(change, message):
    """A bad expert id or run boundary would read out of bounds: the kernel checks them first."""
    call = dict(rows=torch.randn(4, 8), weight=torch.randn(5, 4, 8), starts=torch.tensor([0, 1, 2, 4]))
    call.update(experts=torch.tensor([0, 1, 2]))
    call.update(change)
    with pytest.raises(RuntimeError, match=message):
        kernels.grouped_rows_linear(call["rows"], call["weight"], call["starts"], call["experts"])


def qwen_model():
    tiny = next(t for t in TINY_MODELS if t.model_type == "qwen3_moe")
    return tiny, build(tiny)


def moderate_plan(model, tiny):
    from test_skipping import MODERATE, make_plan

    return make_plan(model, tiny, tau=MODERATE, seed=3)


@DEFAULT_BUILD
def test_apply_runs_the_kernel_by_default_and_says_so():
    tiny, model = qwen_model()
    modes.apply(model, moderate_plan(model, tiny))
    info = modes.execution_info(model)
    assert set(info["paths"]) == {f"compiled ({best_isa().name})"}
    assert info["kernel"] == {"isa": best_isa().name, "built": True, "error": None}
    modes.apply(model, moderate_plan(model, tiny), options=ApplyOptions("loop"))
    assert set(modes.execution_info(model)["paths"]) == {"loop"}


@pytest.mark.skipif(not ISAS["avx2"].runs_here() or NO_COMPILER, reason="needs an x86-64 CPU with AVX2 + FMA")
def test_aten_cpu_capability_chooses_the_build_as_it_does_for_torch(monkeypatch):
    tiny, model = qwen_model()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    modes.apply(model, moderate_plan(model, tiny))
    assert set(modes.execution_info(model)["paths"]) == {"compiled (avx2)"}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # on x86: no vector build, the loop
    modes.apply(model, moderate_plan(model, tiny))
    info = modes.execution_info(model)
    assert set(info["paths"]) == {"loop"} and info["kernel"]["isa"] is None
    assert "ATEN_CPU_CAPABILITY=default allows no kernel build" in next(iter(info["per_layer"].values()))
    with pytest.raises(ValueError, match="ATEN_CPU_CAPABILITY=default allows no kernel build"):
        modes.apply(model, moderate_plan(model, tiny), options=ApplyOptions("compiled"))


@pytest.mark.parametrize(
    ("vector_bits", "chosen"), [(256, "sve256"), (128, "neon"), (512, "neon"), (0, "neon")]
)
def test_an_aarch64_cpu_gets_the_sve256_build_only_with_256_bit_vectors(monkeypatch, vector_bits, chosen):
    """A vector-length-specific build on other vectors computes garbage (under qemu, a 256-bit
    build on 128-bit SVE aborts), so the vector length decides, as it does for PyTorch's SVE256."""
    monkeypatch.setattr(kernels, "_machine", lambda: "aarch64")
    flags = frozenset({"asimd", "sve"} if vector_bits else {"asimd"})
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    monkeypatch.setattr(kernels, "sve_vector_bits", lambda: vector_bits)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert best_isa().name == chosen
    if chosen == "neon":
        needs = "256-bit SVE vectors" if vector_bits else "the CPU flags sve"
        refused = f"cannot run the sve256 build .it needs {needs}"
        with pytest.raises(kernels.KernelUnavailableError, match=refused):
            kernels.load_kernel("sve256")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # PyTorch's NEON kernels: so is modes'
    assert best_isa().name == "neon"


@DEFAULT_BUILD
def test_without_a_compiler_apply_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", {best_isa().name: RuntimeError("no C++ compiler found")})
    monkeypatch.setattr(options, "_warned_build", False)
    tiny, model = qwen_model()
    ids = prompts(tiny)
    with torch.no_grad():
        expected = modes.apply(model, moderate_plan(model, tiny), options=ApplyOptions("loop"))(
            input_ids=ids
        ).logits
    with pytest.warns(
        RuntimeWarning, match=r"could not be built: no C\+\+ compiler found.*loop path"
    ) as caught:
        modes.apply(model, moderate_plan(model, tiny))
    assert len(caught) == 1  # one warning for the model, not one per layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modes.apply(model, moderate_plan(model, tiny))  # and not again
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, expected)
    assert set(modes.execution_info(model)["paths"]) == {"loop"}
    with pytest.raises(ValueError, match=r"no C\+\+ compiler found; apply with execution='loop'"):
        modes.apply(model, moderate_plan(model, tiny), options=ApplyOptions("compiled"))
