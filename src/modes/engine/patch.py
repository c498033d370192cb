"""`apply`, `remove`, `skip_stats`, `reset_stats`: the public verbs of the skipping engine."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modes.adapters.registry import ModelSpec, UnsupportedModelError, spec_for
from modes.engine.attention import AttentionProbe
from modes.engine.execute import is_experts_module
from modes.engine.policies import rule_for
from modes.engine.rule import SkipRule
from modes.engine.tokens import STAT_NAMES, TokenContext
from modes.engine.wrappers import SkippingDenseRouter, SkippingExperts, _Skipping
from modes.plan import ModelInfo, SkipPlan

__all__ = [
    "apply",
    "decoder_layers",
    "find_moe_sites",
    "is_patched",
    "model_info",
    "moe_sites",
    "remove",
    "reset_stats",
    "skip_stats",
]

_ATTR = "_modes_patch"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_k", "top_k", "experts_per_token")

RuleFactory = Callable[[int], SkipRule]


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
    plan: SkipPlan | None
    probe: AttentionProbe | None = None


def _is_dense_router(module: nn.Module) -> bool:
    return hasattr(module, "top_k") and hasattr(module, "num_experts") and isinstance(module, nn.Linear)


def find_moe_sites(model: nn.Module, spec: ModelSpec) -> list[MoESite]:
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
    spec = spec_for(model.config.model_type)
    sites = _sites_of(model, spec)
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
    return _sites_of(model, spec_for(model.config.model_type))


def _sites_of(model: nn.Module, spec: ModelSpec) -> list[MoESite]:
    patch = getattr(model, _ATTR, None)
    return patch.sites if patch is not None else find_moe_sites(model, spec)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def apply(
    model: nn.Module,
    plan: SkipPlan | None = None,
    special_token_ids: Iterable[int] | None = None,
    *,
    rule_factory: RuleFactory | None = None,
    pack_weights: bool = False,
    cpu_kernel: bool = False,
) -> nn.Module:
    """Patch ``model`` in place so that the slots ``plan`` skips are never computed.

    ``special_token_ids`` (e.g. ``tokenizer.all_special_ids``) are never skipped; the config's
    media start/end ids always count as special. ``rule_factory(layer)`` replaces the MoDES rule
    (used by baselines); a plan is then optional. ``pack_weights`` (CPU, bf16 or fp32) keeps a
    oneDNN-packed copy of every routed expert's weights, so calls that skip something run
    faster at the cost of that much memory (`PackedExperts`); ``cpu_kernel`` (CPU with AVX-512,
    bf16 or fp32, weights stored [out, in]) runs them on modes' compiled kernel instead, on the
    module's own weights (`CompiledExperts`; compiled at first use). Applying again replaces
    the previous patch.
    """
    if plan is None and rule_factory is None:
        raise ValueError("modes.apply needs a SkipPlan (or a rule_factory)")
    spec = spec_for(model.config.model_type)
    if pack_weights and cpu_kernel:
        raise ValueError("pack_weights and cpu_kernel are two ways to run the same rows: choose one")
    for option, asked in (("pack_weights", pack_weights), ("cpu_kernel", cpu_kernel)):
        if asked and spec.dense_router:
            raise ValueError(
                f"{option} does not apply to {model.config.model_type}: its experts compute every "
                f"expert (skipping there saves no compute); apply without {option}=True"
            )
    if is_patched(model):
        remove(model)
    sites = find_moe_sites(model, spec)
    if plan is not None:
        plan.check_fits(model_info(model))
        rule_factory = rule_factory or (lambda layer: rule_for(plan, layer))
    context = TokenContext.for_model(model.config, spec, special_token_ids)
    scale = _routed_scale(model, spec)
    renormalize = bool(plan.renormalize) if plan is not None else False
    wrappers = []  # built before any is installed, so an error leaves the model untouched
    for site in sites:
        common = dict(
            layer=site.layer,
            rule=rule_factory(site.layer),
            context=context,
            routed_scale=scale,
            subset=site.subset,
            renormalize=renormalize,
        )
        if spec.dense_router:
            wrapper = SkippingDenseRouter(site.module, **common)
        else:
            wrapper = SkippingExperts(
                site.module,
                eager_accepts_sentinel=spec.eager_accepts_sentinel,
                pack_weights=pack_weights,
                cpu_kernel=cpu_kernel,
                **common,
            )
        wrappers.append(wrapper)
    for site, wrapper in zip(sites, wrappers, strict=True):
        setattr(site.parent, site.attr, wrapper)
    hooks = [
        model.register_forward_pre_hook(_context_hook(context), with_kwargs=True),
        model.register_forward_hook(lambda *_: context.clear(), always_call=True),
    ]
    probe = None
    if any(getattr(wrapper.rule, "needs_attention", False) for wrapper in wrappers):
        layers = decoder_layers(model, [site.name for site in sites])
        probe = AttentionProbe.attach({site.layer: layers[site.layer] for site in sites}, context)
    setattr(model, _ATTR, _Patch(sites, wrappers, hooks, context, plan, probe))
    return model


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
                raise ValueError("modes: the patched model was called without input_ids or inputs_embeds")
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
        raise ValueError("this model is not patched by modes; call modes.apply(model, plan) first")
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


def skip_stats(model: nn.Module) -> dict[str, Any]:
    """Skip ratio overall, per modality and per layer, with the slot counts behind each.

    Reads the on-device counters once (the only host sync).
    """
    per_layer_counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for wrapper in _patch_of(model).wrappers:
        if wrapper.counter.total is None:
            continue
        skipped, total = wrapper.counter.skipped.cpu(), wrapper.counter.total.cpu()
        old = per_layer_counts.get(wrapper.layer)
        per_layer_counts[wrapper.layer] = (
            (skipped, total) if old is None else (old[0] + skipped, old[1] + total)
        )
    by_bin_skipped = sum(
        (s for s, _ in per_layer_counts.values()), torch.zeros(len(STAT_NAMES), dtype=torch.long)
    )
    by_bin_total = sum(
        (t for _, t in per_layer_counts.values()), torch.zeros(len(STAT_NAMES), dtype=torch.long)
    )
    skipped, total = int(by_bin_skipped.sum()), int(by_bin_total.sum())
    return {
        "ratio": _ratio(skipped, total),
        "skipped_slots": skipped,
        "total_slots": total,
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
            for layer, (s, t) in sorted(per_layer_counts.items())
        },
    }


def _ratio(skipped: int, total: int) -> float:
    return skipped / total if total else 0.0
