"""The skipping engine against the transformers implementation itself, for every family."""

from __future__ import annotations

import gc
import weakref
from typing import ClassVar

import pytest
import torch
from torch.overrides import TorchFunctionMode

import modes
from experts_layouts import skip_unless_packing
from modes import ApplyOptions
from modes.adapters import spec_for
from modes.engine.kernels import cpu_supports
from tiny_models import END_ID, START_ID, TINY_MODELS, TinyModel, build, call_kwargs, prompts

FAMILIES = [pytest.param(tiny, id=tiny.model_type) for tiny in TINY_MODELS]
NEEDS_KERNEL = pytest.mark.skipif(
    not cpu_supports(torch.float32), reason="no modes CPU kernel build runs here"
)


def modalities(tiny: TinyModel) -> list[str]:
    return ["text", *tiny.media]


MODERATE = "moderate"


def make_plan(model, tiny: TinyModel, tau: float | str, seed: int = 0) -> modes.SkipPlan:
    """Random per-layer, per-modality alphas (like a calibration would give) and one tau.

    ``tau=MODERATE`` picks a threshold that skips a good share of slots but not all: weights
    scale like 1 / top-k, so tau is a fraction of the mean alpha over that.
    """
    info = modes.model_info(model)
    generator = torch.Generator().manual_seed(seed)
    importance = {
        layer: {m: float(torch.rand((), generator=generator)) + 0.2 for m in modalities(tiny)}
        for layer in info.moe_layers
    }
    if tau == MODERATE:
        fraction = 0.6 / info.top_k if info.top_k > 1 else 0.8
        taus = {
            m: fraction * sum(a[m] for a in importance.values()) / len(importance) for m in modalities(tiny)
        }
    else:
        taus = {m: float(tau) for m in modalities(tiny)}
    return modes.SkipPlan(importance=importance, thresholds=taus, model=info)


def expected_codes(tiny: TinyModel, ids: torch.Tensor) -> list[str | None]:
    """Modality of each flattened token, computed here independently of modes."""
    names = {media_id: modality for modality, media_id in tiny.media.items()}
    return [("other" if i in (START_ID, END_ID) else names.get(i, "text")) for i in ids.reshape(-1).tolist()]


class DenseReference:
    """Unpatched model, every expert computed, skipped slots' weights zeroed by hooks."""

    def __init__(self, model, tiny: TinyModel, plan: modes.SkipPlan, ids: torch.Tensor):
        self.model, self.plan, self.tiny = model, plan, tiny
        self.codes = expected_codes(tiny, ids)
        self.visual = ids.reshape(-1) == tiny.media.get("visual", -1)
        self.spec = spec_for(model.config.model_type)
        text_config = model.config.get_text_config()
        self.scale = getattr(text_config, self.spec.scaling_factor_field or "", 1.0) or 1.0
        self.skipped = self.total = 0
        self.handles = []
        for name, module in model.named_modules():
            if self.spec.dense_router and name.endswith("router"):
                self.handles.append(module.register_forward_hook(self._router_hook(name)))
            elif not self.spec.dense_router and name.endswith("experts") and hasattr(module, "has_gate"):
                self.handles.append(
                    module.register_forward_pre_hook(self._experts_hook(name), with_kwargs=True)
                )

    def _layer(self, name: str) -> int:
        parts = name.split(".")
        return int(parts[parts.index("layers") + 1])

    def _skip(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        codes = self.codes
        if self.tiny.model_type == "ernie4_5_vl_moe" and bool(self.visual.any()):
            keep = self.visual if "vision_moe" in name else ~self.visual
            codes = [c for c, k in zip(codes, keep.tolist(), strict=True) if k]
        alphas = self.plan.importance[self._layer(name)]
        skip = torch.zeros_like(weights, dtype=torch.bool)
        for row, code in enumerate(codes):
            if code != "other":
                skip[row] = alphas[code] * (weights[row].float() / self.scale) < self.plan.thresholds[code]
        self.skipped += int(skip.sum())
        self.total += skip.numel()
        return skip

    def _experts_hook(self, name: str):
        def hook(module, args, kwargs):
            hidden, index, weights = args
            return (hidden, index, weights.masked_fill(self._skip(name, weights), 0)), kwargs

        return hook

    def _router_hook(self, name: str):
        def hook(module, args, output):
            scores, logits = output
            weights, index = torch.topk(scores, module.top_k, dim=1)
            kept = weights.masked_fill(self._skip(name, weights), 0)
            return torch.zeros_like(scores).scatter_(1, index, kept), logits

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class RowCounter(TorchFunctionMode):
    """Rows fed to matrix multiplications: (token, expert) rows times projections."""

    MATMULS: ClassVar = {
        torch.mm,
        torch.bmm,
        torch.matmul,
        torch.nn.functional.linear,
        torch.Tensor.__matmul__,
    }

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        grouped = getattr(torch.nn.functional, "grouped_mm", None)
        if func in (grouped, getattr(torch, "_grouped_mm", None)):
            offsets = kwargs.get("offs", args[2] if len(args) > 2 else None)
            self.rows += int(offsets[-1])
        elif func in self.MATMULS:
            first = args[0]
            self.rows += first.numel() // first.shape[-1]
        return func(*args, **kwargs)


def count_expert_rows(model, kwargs: dict) -> int:
    """Rows multiplied inside the experts modules only (attention and routers excluded)."""
    counter = RowCounter()
    modules = [m for n, m in model.named_modules() if n.endswith(".experts")]  # wrapper or original

    def start(*_):
        counter.__enter__()

    def stop(*_):
        counter.__exit__(None, None, None)

    handles = [m.register_forward_pre_hook(start) for m in modules]
    handles += [m.register_forward_hook(stop) for m in modules]
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return counter.rows


def assert_matches_dense_reference(
    model, tiny: TinyModel, plan: modes.SkipPlan, ids: torch.Tensor, **apply_options
):
    """Patched logits and slot counts equal the dense reference's; returns (reference, logits)."""
    reference = DenseReference(model, tiny, plan, ids)
    with torch.no_grad():
        expected = model(**call_kwargs(tiny, ids)).logits
    reference.remove()
    modes.apply(model, plan, special_token_ids=[START_ID, END_ID], **apply_options)
    with torch.no_grad():
        patched = model(**call_kwargs(tiny, ids)).logits
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)
    stats = modes.skip_stats(model)
    assert (stats["skipped_slots"], stats["total_slots"]) == (reference.skipped, reference.total)
    return reference, patched


@pytest.mark.parametrize("tiny", FAMILIES)
def test_zero_thresholds_are_bit_identical_and_remove_restores(tiny):
    model = build(tiny)
    ids = prompts(tiny)
    originals = {n: m for n, m in model.named_modules() if n.endswith(("experts", "router"))}
    with torch.no_grad():
        reference = model(**call_kwargs(tiny, ids)).logits
        reference_generation = model.generate(**call_kwargs(tiny, ids), max_new_tokens=4, do_sample=False)
        modes.apply(model, make_plan(model, tiny, tau=0.0))
        patched = model(**call_kwargs(tiny, ids)).logits
        patched_generation = model.generate(**call_kwargs(tiny, ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(patched, reference)
    assert torch.equal(patched_generation, reference_generation)
    assert modes.skip_stats(model)["skipped_slots"] == 0

    modes.remove(model)
    restored = {n: m for n, m in model.named_modules() if n.endswith(("experts", "router"))}
    assert restored.keys() == originals.keys()
    assert all(restored[n] is originals[n] for n in originals)
    with torch.no_grad():
        assert torch.equal(model(**call_kwargs(tiny, ids)).logits, reference)


@pytest.mark.parametrize("tiny", FAMILIES)
def test_rule_matches_dense_reference_and_stats_match_router_outputs(tiny):
    model = build(tiny)
    ids = prompts(tiny)
    plan = make_plan(model, tiny, tau=MODERATE, seed=3)
    reference, _ = assert_matches_dense_reference(model, tiny, plan, ids)
    assert 0 < reference.skipped < reference.total, "plan should skip some but not all slots"


@pytest.mark.parametrize("tiny", FAMILIES)
def test_skipped_rows_are_never_multiplied(tiny):
    model = build(tiny)
    kwargs = call_kwargs(tiny, prompts(tiny))
    dense_rows = count_expert_rows(model, kwargs)
    # the loop path's matmuls are visible to the counter (the compiled kernel's are not; it is
    # handed only the kept rows by the same grouping: test_compiled.py counts them)
    modes.apply(model, make_plan(model, tiny, tau=MODERATE, seed=5), options=ApplyOptions("loop"))
    skipped_rows = count_expert_rows(model, kwargs)
    ratio = modes.skip_stats(model)["ratio"]
    assert ratio > 0.2
    if spec_for(model.config.model_type).dense_router:
        # Llama 4's transformers experts compute every expert for every token: nothing to save.
        assert skipped_rows == dense_rows
    else:
        assert skipped_rows == pytest.approx((1 - ratio) * dense_rows, abs=1e-9)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize(
    "tiny", [t for t in FAMILIES if t.values[0].model_type in ("qwen3_vl_moe", "gpt_oss")]
)
def test_every_cpu_experts_implementation(tiny, implementation):
    model = build(tiny)
    model.set_experts_implementation(implementation)
    ids = prompts(tiny)
    with torch.no_grad():
        reference = model(**call_kwargs(tiny, ids)).logits
    modes.apply(model, make_plan(model, tiny, tau=0.0))
    with torch.no_grad():
        assert torch.equal(model(**call_kwargs(tiny, ids)).logits, reference)
    plan = make_plan(model, tiny, tau=MODERATE, seed=5)
    modes.remove(model)
    _, skipped = assert_matches_dense_reference(model, tiny, plan, ids)
    assert torch.isfinite(skipped).all()


@pytest.mark.parametrize("tiny", FAMILIES)
def test_left_padded_batch_matches_one_by_one(tiny):
    model = build(tiny)
    ids = prompts(tiny, batch=3, length=12)
    lengths = [12, 9, 7]
    pad = model.config.get_text_config().pad_token_id or 0
    batch = torch.full_like(ids, pad)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        batch[row, -length:] = ids[row, -length:]
        mask[row, -length:] = 1
    modes.apply(model, make_plan(model, tiny, tau=MODERATE, seed=7))

    singles, skipped, total = [], 0, 0
    for row, length in enumerate(lengths):
        modes.reset_stats(model)
        with torch.no_grad():
            singles.append(model(**call_kwargs(tiny, ids[row : row + 1, -length:])).logits[0])
        stats = modes.skip_stats(model)
        skipped, total = skipped + stats["skipped_slots"], total + stats["total_slots"]

    modes.reset_stats(model)
    with torch.no_grad():
        batched = model(**call_kwargs(tiny, batch, attention_mask=mask)).logits
    stats = modes.skip_stats(model)
    assert (stats["skipped_slots"], stats["total_slots"]) == (skipped, total)
    for row, length in enumerate(lengths):
        torch.testing.assert_close(batched[row, -length:], singles[row], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tiny", FAMILIES)
def test_full_skip_is_finite_and_decode_steps_count_as_text(tiny):
    model = build(tiny)
    ids = prompts(tiny, batch=2)
    modes.apply(model, make_plan(model, tiny, tau=1e6), special_token_ids=[START_ID, END_ID])
    with torch.no_grad():
        logits = model(**call_kwargs(tiny, ids)).logits
    assert torch.isfinite(logits).all()
    stats = modes.skip_stats(model)
    for modality in modalities(tiny):
        assert stats["per_modality"][modality]["ratio"] == 1.0
    assert all(layer["ratio"] > 0.5 for layer in stats["per_layer"].values())

    modes.reset_stats(model)
    new_tokens = 3
    with torch.no_grad():
        out = model.generate(
            **call_kwargs(tiny, ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    assert torch.isfinite(out.float()).all()
    stats = modes.skip_stats(model)
    info = modes.model_info(model)
    decode_text_slots = ids.shape[0] * (new_tokens - 1) * info.top_k * len(info.moe_layers)
    prompt_text = sum(code == "text" for code in expected_codes(tiny, ids))
    prompt_text_slots = prompt_text * info.top_k * len(info.moe_layers)
    assert stats["per_modality"]["text"]["total_slots"] == prompt_text_slots + decode_text_slots


@pytest.mark.parametrize("tiny", FAMILIES)
def test_few_kept_rows_take_the_expert_loop_and_still_match_the_reference(tiny, monkeypatch):
    """Decode-sized calls: fewer kept rows than experts run the expert loop on CPU."""
    from modes.engine import execute

    loop_chosen = []
    choose = execute.PlainLoop.runs_loop

    def spy(self, kept, num_experts):
        loop_chosen.append(choose(self, kept, num_experts))
        return loop_chosen[-1]

    monkeypatch.setattr(execute.PlainLoop, "runs_loop", spy)
    model = build(tiny)
    ids = prompts(tiny, batch=1, length=2)  # 2 tokens x top-4 = 8 slots: any skip leaves < 8 experts' rows
    plan = make_plan(model, tiny, tau=MODERATE, seed=11)
    assert_matches_dense_reference(model, tiny, plan, ids, options=ApplyOptions("loop"))
    # families whose experts run eagerly (sentinel path) or densely (Llama 4) never compact
    compacted = [m for m in model.modules() if getattr(m, "eager_accepts_sentinel", None) is not None]
    implementation = compacted[0].base_layer.config._experts_implementation if compacted else "eager"
    if implementation not in (None, "eager"):
        assert any(loop_chosen), "a decode-sized call should have taken the expert loop"


def cpu_path_refusal(model, option: str) -> str | None:
    """What ``modes.apply(model, ..., **{option: True})`` must refuse with, if anything."""
    if spec_for(model.config.model_type).dense_router:
        return f"execution={option!r} does not apply to {model.config.model_type}"
    experts = next(m for m in model.modules() if modes.engine.execute.is_experts_module(m))
    if option == "compiled" and experts.is_transposed:
        return r"stores expert weights \[in, out\]"
    return None


@pytest.mark.parametrize("option", ["packed", pytest.param("compiled", marks=NEEDS_KERNEL)])
@pytest.mark.parametrize("tiny", FAMILIES)
def test_cpu_paths_keep_zero_thresholds_bit_identical_and_match_the_reference(tiny, option):
    if option == "packed":
        skip_unless_packing()
    model = build(tiny)
    ids = prompts(tiny)
    refusal = cpu_path_refusal(model, option)
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            modes.apply(model, make_plan(model, tiny, tau=0.0), options=ApplyOptions(option))
        assert not modes.engine.is_patched(model)
        return
    with torch.no_grad():
        reference = model(**call_kwargs(tiny, ids)).logits
        reference_generation = model.generate(**call_kwargs(tiny, ids), max_new_tokens=4, do_sample=False)
        modes.apply(model, make_plan(model, tiny, tau=0.0), options=ApplyOptions(option))
        assert torch.equal(model(**call_kwargs(tiny, ids)).logits, reference)
        generation = model.generate(**call_kwargs(tiny, ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(generation, reference_generation)
    modes.remove(model)
    plan = make_plan(model, tiny, tau=MODERATE, seed=3)
    assert_matches_dense_reference(model, tiny, plan, ids, options=ApplyOptions(option))
    with torch.no_grad():
        faster_generation = model.generate(**call_kwargs(tiny, ids), max_new_tokens=4, do_sample=False)
        modes.apply(model, plan, special_token_ids=[START_ID, END_ID], options=ApplyOptions("loop"))
        plain_generation = model.generate(**call_kwargs(tiny, ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(faster_generation, plain_generation)


def test_both_cpu_paths_at_once_are_refused_before_anything_is_patched():
    tiny = next(t for t in TINY_MODELS if t.model_type == "qwen3_moe")
    model = build(tiny)
    with pytest.raises(ValueError, match=r"execution must be one of"):
        modes.apply(model, make_plan(model, tiny, tau=0.0), options=ApplyOptions("packed+compiled"))
    assert not modes.engine.is_patched(model)


def test_a_model_that_cannot_be_packed_is_left_untouched():
    tiny = next(t for t in TINY_MODELS if t.model_type == "qwen3_moe")
    model = build(tiny).half()
    originals = [module for name, module in model.named_modules() if name.endswith("experts")]
    with pytest.raises(ValueError, match=r"not torch\.float16: apply with execution='loop'"):
        modes.apply(model, make_plan(model, tiny, tau=0.0), options=ApplyOptions("packed"))
    assert not modes.engine.is_patched(model)
    assert [module for name, module in model.named_modules() if name.endswith("experts")] == originals


def test_remove_releases_the_packed_copies():
    """Packed copies double the experts' memory: `remove` must give it back (and `modes bench`
    relies on it to time the unskipped model without them)."""
    skip_unless_packing()
    tiny = next(t for t in TINY_MODELS if t.model_type == "qwen3_moe")
    model = build(tiny)
    modes.apply(model, make_plan(model, tiny, tau=MODERATE), options=ApplyOptions("packed"))
    packs = [weakref.ref(site.module.cpu_path) for site in modes.engine.patch.moe_sites(model)]
    assert packs and all(pack() is not None for pack in packs)
    gc.disable()  # freed by reference counting alone, as soon as the patch goes
    try:
        modes.remove(model)
        assert all(pack() is None for pack in packs)
    finally:
        gc.enable()
