"""`apply`, `applied`, `remove`, `skip_stats`, `reset_stats`: the public verbs of the skipping engine.

The engine takes any plan that names a rule per MoE layer (`Plan`): `modes.SkipPlan`, or an
internal one such as calibration's knockout. It imports no plan format, so plans, policies and
everything above them depend on it, never the reverse.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from modes.adapters.registry import ModelSpec, UnsupportedModelError, spec_for
from modes.engine.attention import AttentionProbe
from modes.engine.execute import is_experts_module
from modes.engine.info import ModelInfo
from modes.engine.kernels import kernel_status
from modes.engine.options import ApplyOptions
from modes.engine.rules import SkipRule
from modes.engine.tokens import STAT_NAMES, TokenContext
from modes.engine.wrappers import SkippingDenseRouter, SkippingExperts, _Skipping
from modes.errors import UsageError

__all__ = [
    "Plan",
    "add_counts",
    "applied",
    "apply",
    "decoder_layers",
    "is_patched",
    "model_info",
    "moe_sites",
    "remove",
    "reset_stats",
    "skip_stats",
    "slot_counts",
    "stats_from_counts",
]

_ATTR = "_modes_patch"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_k", "top_k", "experts_per_token")


class Plan(Protocol):
    """What the engine needs of a plan (`modes.SkipPlan` is one)."""

    special_token_ids: tuple[int, ...] | None  # never skipped, unless the caller names others
    renormalize: bool

    def rule(self, layer: int) -> SkipRule:
        """The rule of MoE layer ``layer``."""
        ...

    def check_fits(self, info: ModelInfo) -> None:
        """Raise unless the plan was made for a model like ``info``."""
        ...


@dataclass(frozen=True)
class MoESite:
    """One module modes replaces: its parent, attribute name, decoder layer and token subset."""

    name: str
    parent: nn.Module
    attr: str
    layer: int
    subset: str | None

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)


@dataclass
class _Patch:
    sites: list[MoESite]
    wrappers: list[_Skipping]
    hooks: list[Any]
    context: TokenContext
    plan: Plan
    probe: AttentionProbe | None = None


def _is_dense_router(module: nn.Module) -> bool:
    return hasattr(module, "top_k") and hasattr(module, "num_experts") and isinstance(module, nn.Linear)


def _find_sites(model: nn.Module, spec: ModelSpec) -> list[MoESite]:
    """The experts modules (or dense routers) of the language model, with their layer index."""
    matches = _is_dense_router if spec.dense_router else is_experts_module
    sites = []
    for name, module in model.named_modules():
        if not matches(module) or isinstance(module, _Skipping):
            continue
        layer = _LAYER_INDEX.findall(name + ".")
        if not layer:
            continue
        parent_name, _, attr = name.rpartition(".")
        subset = next((s for fragment, s in spec.token_subsets.items() if fragment in name), None)
        sites.append(MoESite(name, model.get_submodule(parent_name), attr, int(layer[-1]), subset))
    if not sites:
        raise UnsupportedModelError(
            f"no transformers MoE experts modules found in {type(model).__name__} "
            f"({spec.family}); is its language model a dense (non-MoE) model?"
        )
    return sites


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_info(model: nn.Module) -> ModelInfo:
    """Model type, MoE layer indices, experts and top-k: what a plan must match."""
    sites = moe_sites(model)
    text_config = _text_config(model)
    top_k = next((getattr(text_config, f) for f in TOP_K_FIELDS if getattr(text_config, f, None)), None)
    if top_k is None:
        raise UnsupportedModelError(f"cannot find the top-k of {model.config.model_type} in its config")
    num_experts = (
        sites[0].module.num_experts if not is_patched(model) else sites[0].module.base_layer.num_experts
    )
    return ModelInfo(
        model_type=model.config.model_type,
        moe_layers=tuple(sorted({site.layer for site in sites})),
        num_experts=int(num_experts),
        top_k=int(top_k),
    )


def moe_sites(model: nn.Module) -> list[MoESite]:
    """The MoE sites of ``model`` (those of its patch when patched)."""
    patch = getattr(model, _ATTR, None)
    return patch.sites if patch is not None else _find_sites(model, spec_for(model.config.model_type))


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def apply(
    model: nn.Module,
    plan: Plan,
    special_token_ids: Iterable[int] | None = None,
    *,
    options: ApplyOptions | None = None,
    processor: Any = None,
) -> nn.Module:
    """Patch ``model`` in place so that the slots ``plan`` skips are never computed.

    Never-skipped ids come from ``special_token_ids``, else ``options.special_token_ids``, else
    the plan's own (those it was searched with), else ``processor``'s tokenizer's special ids;
    the config's media start/end ids always count as special. ``options`` (`ApplyOptions`)
    also chooses how the kept slots run. Applying again replaces the previous patch; an error
    leaves the model untouched.
    """
    options = options or ApplyOptions()
    spec = spec_for(model.config.model_type)
    if options.execution in ("packed", "compiled") and spec.dense_router:
        raise UsageError(
            f"execution={options.execution!r} does not apply to {model.config.model_type}: its experts "
            "compute every expert (skipping there saves no compute); apply with execution='auto'"
        )
    plan.check_fits(model_info(model))
    if is_patched(model):
        remove(model)
    sites = _find_sites(model, spec)
    tokenizer = getattr(processor, "tokenizer", processor)
    special = _first_given(
        special_token_ids,
        options.special_token_ids,
        plan.special_token_ids,
        getattr(tokenizer, "all_special_ids", None),
    )
    context = TokenContext.for_model(model.config, spec, special)
    wrappers = [_wrap(site, plan, spec, context, _routed_scale(model, spec), options) for site in sites]
    probe = None  # attached (or refused) before anything is installed: errors leave no trace
    if any(getattr(wrapper.rule, "needs_attention", False) for wrapper in wrappers):
        layers = decoder_layers(model, [site.name for site in sites])
        probe = AttentionProbe.attach({site.layer: layers[site.layer] for site in sites}, context)
    for site, wrapper in zip(sites, wrappers, strict=True):
        setattr(site.parent, site.attr, wrapper)
    hooks = [
        model.register_forward_pre_hook(_context_hook(context), with_kwargs=True),
        model.register_forward_hook(lambda *_: context.clear(), always_call=True),
    ]
    setattr(model, _ATTR, _Patch(sites, wrappers, hooks, context, plan, probe))
    return model


@contextlib.contextmanager
def applied(
    model: nn.Module,
    plan: Plan,
    options: ApplyOptions | None = None,
    special_token_ids: Iterable[int] | None = None,
    *,
    processor: Any = None,
) -> Iterator[nn.Module]:
    """`apply` for the block, then `remove`, even if the block fails."""
    apply(model, plan, special_token_ids, options=options, processor=processor)
    try:
        yield model
    finally:
        remove(model)


def _first_given(*candidates: Iterable[int] | None) -> Iterable[int] | None:
    return next((ids for ids in candidates if ids is not None), None)


def _wrap(
    site: MoESite, plan: Plan, spec: ModelSpec, context: TokenContext, scale: float, options: ApplyOptions
) -> _Skipping:
    common = dict(
        layer=site.layer,
        rule=plan.rule(site.layer),
        context=context,
        routed_scale=scale,
        subset=site.subset,
        renormalize=bool(plan.renormalize),
    )
    if spec.dense_router:
        return SkippingDenseRouter(site.module, **common)
    return SkippingExperts(
        site.module,
        eager_accepts_sentinel=spec.eager_accepts_sentinel,
        cpu_choice=options.cpu_choice(site.module),
        **common,
    )


def decoder_layers(model: nn.Module, moe_layer_names: list[str]) -> nn.ModuleList:
    """The ModuleList of the language model's decoder layers (the one holding the MoE sites)."""
    prefix = moe_layer_names[0].split(".layers.")[0]
    layers = model.get_submodule(f"{prefix}.layers" if prefix else "layers")
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"expected a ModuleList of decoder layers at {prefix}.layers")
    return layers


def _routed_scale(model: nn.Module, spec: ModelSpec) -> float:
    """The constant factor the router multiplies into the weights (pi = weight / factor)."""
    if not spec.scaling_factor_field:
        return 1.0
    return float(getattr(_text_config(model), spec.scaling_factor_field, None) or 1.0)


def _context_hook(context: TokenContext) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                raise RuntimeError("modes: the patched model was called without input_ids or inputs_embeds")
            context.set_all_text(embeds.shape[0], embeds.shape[1], embeds.device)
            return
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 renames it `cache`
        decoding = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
        context.set_from_ids(
            input_ids,
            kwargs.get("attention_mask"),
            decoding=decoding,
            subset_type_ids=kwargs.get("moe_mm_token_type_ids"),
        )

    return hook


def _patch_of(model: nn.Module) -> _Patch:
    patch = getattr(model, _ATTR, None)
    if patch is None:
        raise UsageError("this model is not patched by modes; call modes.apply(model, plan) first")
    return patch


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: put the original modules back and drop the hooks."""
    patch = _patch_of(model)
    for site, wrapper in zip(patch.sites, patch.wrappers, strict=True):
        setattr(site.parent, site.attr, wrapper.base_layer)
    for hook in patch.hooks:
        hook.remove()
    if patch.probe is not None:
        patch.probe.detach()
    delattr(model, _ATTR)
    return model


def reset_stats(model: nn.Module) -> None:
    for wrapper in _patch_of(model).wrappers:
        wrapper.counter.reset()


def execution_info(model: nn.Module) -> dict[str, Any]:
    """What runs the kept slots of each MoE layer of a patched model: ``per_layer`` (layer ->
    path, with the reason where ``"auto"`` fell back), ``paths`` (path -> layers) and
    ``kernel`` (the instruction set modes' CPU kernel is built for here, or why none)."""
    patch = _patch_of(model)
    per_layer = {wrapper.layer: wrapper.execution for wrapper in patch.wrappers}
    paths: dict[str, list[int]] = {}
    for layer, description in per_layer.items():
        paths.setdefault(description.split(";")[0], []).append(layer)
    return {"per_layer": per_layer, "paths": paths, "kernel": kernel_status()}


def skip_stats(model: nn.Module) -> dict[str, Any]:
    """Skip ratio overall, per modality and per layer, with the slot counts behind each.

    ``ratio`` is over all routed slots (algorithm.md section 3); ``skippable_ratio`` over the
    slots of text and media tokens only (special tokens, never skipped, left out).

    Reads the on-device counters once (the only host sync).
    """
    return stats_from_counts(slot_counts(model))


SlotCounts = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (skipped, total) per bin, on CPU


def slot_counts(model: nn.Module) -> SlotCounts:
    """Skipped and total slots per MoE layer and statistics bin: what `skip_stats` reports, as
    integers that add up across processes or runs (`add_counts`)."""
    counts: SlotCounts = {}
    for wrapper in _patch_of(model).wrappers:
        if wrapper.counter.total is not None:
            counts = add_counts(
                counts, {wrapper.layer: (wrapper.counter.skipped.cpu(), wrapper.counter.total.cpu())}
            )
    return counts


def add_counts(first: SlotCounts, second: SlotCounts) -> SlotCounts:
    """The slot counts of both (exact: integers)."""
    added = dict(first)
    for layer, (skipped, total) in second.items():
        old = added.get(layer)
        added[layer] = (skipped, total) if old is None else (old[0] + skipped, old[1] + total)
    return added


def stats_from_counts(counts: SlotCounts) -> dict[str, Any]:
    """`skip_stats`' report of ``counts``."""
    zeros = torch.zeros(len(STAT_NAMES), dtype=torch.long)
    by_bin_skipped = sum((s for s, _ in counts.values()), zeros)
    by_bin_total = sum((t for _, t in counts.values()), zeros)
    skipped, total = int(by_bin_skipped.sum()), int(by_bin_total.sum())
    skippable = total - int(by_bin_total[STAT_NAMES.index("other")])
    return {
        "ratio": _ratio(skipped, total),
        "skippable_ratio": _ratio(skipped, skippable),
        "skipped_slots": skipped,
        "total_slots": total,
        "skippable_slots": skippable,
        "per_modality": {
            name: {"ratio": _ratio(int(s), int(t)), "skipped_slots": int(s), "total_slots": int(t)}
            for name, s, t in zip(STAT_NAMES, by_bin_skipped, by_bin_total, strict=True)
            if int(t) > 0
        },
        "per_layer": {
            layer: {
                "ratio": _ratio(int(s.sum()), int(t.sum())),
                "skipped_slots": int(s.sum()),
                "total_slots": int(t.sum()),
            }
            for layer, (s, t) in sorted(counts.items())
        },
    }


def _ratio(skipped: int, total: int) -> float:
    return skipped / total if total else 0.0
