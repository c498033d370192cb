"""Global importance alpha of each MoE layer per modality (GMLG, algorithm.md section 1).

alpha_m(l) = mean over calibration answer tokens of KL(p_orig || p_(l,m)), p_(l,m) the output
when every routed expert of layer l is skipped for the tokens of modality m, normalised so
that alpha_m sums to 1 over layers. ``mode="shared"`` skips the layer for all tokens at once
(the paper's wording) and gives every modality the same alpha.

``semantics="release"`` reproduces the authors' release (algorithm.md section 7): KL at the
release's positions (`modes.calibration.kl`), knocked-out tokens' routed experts output their
own input instead of nothing, and a zero KL sum keeps the raw values. ``knockout`` < 1 skips
only that share of each token's lowest-weight slots at the knocked-out layer (partial
knockout: importance measured where skipping actually operates).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from modes import engine
from modes.adapters.registry import MODALITIES, spec_for
from modes.calibration.calibration_set import CalibrationSet, measure
from modes.calibration.kl import Semantics, answer_kl, answer_logprobs
from modes.calibration.replay import PrefixReplay, media_encoders
from modes.data.sample import Sample
from modes.engine import ModelInfo
from modes.engine.rules import Routing, SkipRule
from modes.engine.tokens import modality_code
from modes.errors import PlanError, UsageError
from modes.io import write_json_atomic

__all__ = ["Importance", "calibrate"]

AlphaMode = Literal["per_modality", "shared"]


@dataclass
class Importance:
    """Normalised alphas per MoE layer and modality, with the raw KL behind them."""

    alphas: dict[int, dict[str, float]]
    raw_kl: dict[int, dict[str, float]]
    mode: AlphaMode
    model: ModelInfo
    answer_tokens: int
    provenance: dict[str, Any] = field(default_factory=dict)
    semantics: Semantics = "modes"  # the KL positions the search's loss must use too

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in next(iter(self.alphas.values())))

    def max_alphas(self) -> dict[str, float]:
        """The largest alpha of each modality: with pi <= 1, no score s = alpha * pi exceeds it."""
        return {m: max(alphas[m] for alphas in self.alphas.values()) for m in self.modalities}

    def tempered(self, gamma: float) -> Importance:
        """Alphas raised to ``gamma`` and renormalised per modality: 0 gives uniform alphas
        (DMT only), 1 these (MoDES); in between, low-importance layers keep more weight."""
        if not math.isfinite(gamma) or gamma < 0:
            raise UsageError(f"gamma must be finite and >= 0, got {gamma}")
        alphas: dict[int, dict[str, float]] = {layer: {} for layer in self.alphas}
        for modality in self.modalities:
            powered = {layer: values[modality] ** gamma for layer, values in self.alphas.items()}
            total = sum(powered.values()) or 1.0
            for layer, value in powered.items():
                alphas[layer][modality] = value / total
        provenance = {**self.provenance, "tempered_gamma": gamma}
        return Importance(
            alphas, self.raw_kl, self.mode, self.model, self.answer_tokens, provenance, self.semantics
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "modes.Importance",
            "format_version": 1,
            "semantics": self.semantics,
            "mode": self.mode,
            "model": self.model.to_json(),
            "answer_tokens": self.answer_tokens,
            "alphas": {str(k): v for k, v in sorted(self.alphas.items())},
            "raw_kl": {str(k): v for k, v in sorted(self.raw_kl.items())},
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != "modes.Importance":
                raise PlanError(f"{path} is not a modes importance file (run `modes calibrate`)")
            return cls(
                alphas={int(k): v for k, v in data["alphas"].items()},
                raw_kl={int(k): v for k, v in data["raw_kl"].items()},
                mode=data["mode"],
                model=ModelInfo.from_json(data["model"]),
                answer_tokens=int(data["answer_tokens"]),
                provenance=data.get("provenance") or {},
                semantics=data.get("semantics", "modes"),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, PlanError):
                raise
            raise PlanError(f"{path} is not a valid importance file ({error!r})") from error


class _Knockout:
    """At the target layer, skip the target modalities' slots (all of them, or the ``share``
    with the lowest weights); nothing elsewhere. Remembers which tokens lost every slot."""

    def __init__(self, layer: int, target: dict[str, Any], share: float):
        self.layer = layer
        self.target = target
        self.share = share
        self.emptied: torch.Tensor | None = None  # [T] bool, tokens of the last call with no slot left

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        self.emptied = None
        if self.target.get("layer") != self.layer:
            return torch.zeros_like(routing.pi, dtype=torch.bool)
        hit = torch.isin(routing.codes, self.target["codes"].to(routing.codes.device))  # [T]
        skip = hit.unsqueeze(1).expand_as(routing.pi)  # [T, k]
        if self.share < 1:
            ranks = routing.pi.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # [T, k]
            skip = skip & (ranks >= round(routing.pi.shape[1] * (1 - self.share)))
        self.emptied = skip.all(dim=1)
        return skip


@dataclass
class _KnockoutPlan:
    """The engine plan of calibration: `_Knockout` rules that all read one mutable ``target``
    ({"layer": l, "codes": modality codes}), so one patch serves every knockout pass."""

    special_token_ids: tuple[int, ...]
    share: float = 1.0
    target: dict[str, Any] = field(default_factory=dict)
    rules: dict[int, _Knockout] = field(default_factory=dict)
    renormalize: bool = False

    def rule(self, layer: int) -> SkipRule:
        return self.rules.setdefault(layer, _Knockout(layer, self.target, self.share))

    def check_fits(self, info: ModelInfo) -> None:
        """Built for the model at hand."""


def _release_fill(rule: _Knockout):
    """Forward hook on a patched experts module: tokens whose routed experts were all skipped
    output the module's input, as the release's ``mlp_forward`` returns its input for them."""

    def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        emptied = rule.emptied
        if emptied is None or not bool(emptied.any()):
            return output
        return torch.where(emptied.unsqueeze(1), args[0].to(output.dtype), output)

    return hook


def calibrate(
    model: Any,
    processor: Any,
    samples: Sequence[Sample] | CalibrationSet,
    mode: AlphaMode = "per_modality",
    batch_size: int = 16,
    reuse_prefix: bool = True,
    special_token_ids: Sequence[int] | None = None,
    progress: bool = True,
    semantics: Semantics = "modes",
    knockout: float = 1.0,
) -> Importance:
    """Alphas for every MoE layer of ``model`` and every modality present in ``samples``.

    ``samples``: the samples, or a `CalibrationSet` of them (then ``batch_size`` is the set's,
    and the unskipped log-probs this computes stay in the set for the search and fidelity).
    ``semantics``: ``"modes"`` (algorithm.md section 1) or ``"release"`` (the authors' code,
    section 7). ``knockout``: share of each token's slots skipped at the measured layer (1: all).
    """
    if mode not in ("per_modality", "shared"):
        raise UsageError(f"mode must be 'per_modality' or 'shared', not {mode!r}")
    if not 0 < knockout <= 1:
        raise UsageError(f"knockout must be a share of the slots in (0, 1], got {knockout}")
    if engine.is_patched(model):
        raise UsageError("calibrate an unpatched model (call modes.remove(model) first)")
    info = engine.model_info(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    plan = _KnockoutPlan(tuple(special_token_ids or tokenizer.all_special_ids), share=knockout)
    calibration = CalibrationSet.of(model, processor, samples, batch_size, semantics)
    allowed = spec_for(model.config.model_type).modalities
    modalities = _modalities_present(model, calibration, plan, allowed)
    with engine.applied(model, plan), contextlib.ExitStack() as hooks:
        if semantics == "release":
            for site in engine.moe_sites(model):
                hooks.callback(
                    site.module.register_forward_hook(_release_fill(plan.rules[site.layer])).remove
                )
        sums = _knockout_sums(model, plan, calibration, info, modalities, mode, reuse_prefix, progress)
    answer_tokens = calibration.answer_tokens
    raw = {layer: {g: s / answer_tokens for g, s in by_group.items()} for layer, by_group in sums.items()}
    return Importance(
        alphas=_normalise(raw, modalities, mode, keep_raw_if_zero=semantics == "release"),
        raw_kl={layer: _expand(v, modalities, mode) for layer, v in raw.items()},
        mode=mode,
        model=info,
        answer_tokens=answer_tokens,
        provenance={
            "samples": len(calibration.samples),
            "batch_size": calibration.batch_size,
            "reuse_prefix": reuse_prefix,
            "special_token_ids": list(plan.special_token_ids),
            "knockout": knockout,
        },
        semantics=semantics,
    )


def _knockout_sums(
    model: Any,
    plan: _KnockoutPlan,
    calibration: CalibrationSet,
    info: ModelInfo,
    modalities: list[str],
    mode: AlphaMode,
    reuse_prefix: bool,
    progress: bool,
) -> dict[int, dict[str, float]]:
    """For each MoE layer and modality group, the KL summed over every batch's answer tokens
    when the layer is knocked out for that group (each rank its share of the batches, summed in
    global batch order)."""
    sites = engine.moe_sites(model)
    replay = PrefixReplay(engine.decoder_layers(model, [s.name for s in sites]), media_encoders(model))
    group, mine = calibration.group, calibration.mine
    groups = {m: [m] for m in modalities} if mode == "per_modality" else {"all": list(modalities)}
    total = len(mine) * len(info.moe_layers) * len(groups)
    bar = tqdm(total=total, desc="calibrate", unit="pass", disable=not (progress and group.is_main))

    def my_passes() -> dict[int, dict[int, dict[str, float]]]:
        with torch.no_grad():
            return {
                index: _knockout_pass(
                    model, calibration, index, replay, plan.target, info, groups, reuse_prefix, bar
                )
                for index, _ in mine
            }

    per_batch = group.gather(my_passes)  # every batch's KL sums, in global batch order
    bar.close()
    sums = {layer: dict.fromkeys(groups, 0.0) for layer in info.moe_layers}
    for by_layer in per_batch.values():
        for layer, by_group in by_layer.items():
            for name, kl in by_group.items():
                sums[layer][name] += kl
    return sums


def _knockout_pass(
    model,
    calibration: CalibrationSet,
    index: int,
    replay: PrefixReplay,
    target,
    info,
    groups,
    reuse_prefix,
    bar,
) -> dict[int, dict[str, float]]:
    """KL summed over batch ``index``'s answer tokens for each knocked-out layer and modality
    group. Its reference pass (nothing skipped) records the prefix and gives the set its
    unskipped log-probs."""
    batch = calibration.batches[index]
    sums: dict[int, dict[str, float]] = {layer: {} for layer in info.moe_layers}
    target.clear()
    with replay.recording():
        reference = answer_logprobs(model, batch)
    calibration.remember_reference(index, reference)
    for layer in info.moe_layers:
        for group, modalities in groups.items():
            target.update(layer=layer, codes=torch.tensor([modality_code(m) for m in modalities]))
            if reuse_prefix:
                with replay.replaying(layer):
                    kl = answer_kl(model, batch, reference)
            else:
                kl = answer_kl(model, batch, reference)
            # KL >= 0; when the knockout changes nothing, rounding can leave about -1e-11
            sums[layer][group] = max(0.0, float(kl))
            bar.update(1)
    replay.outputs = {}
    return sums


def _modalities_present(
    model: Any, calibration: CalibrationSet, plan: _KnockoutPlan, allowed: tuple[str, ...]
) -> list[str]:
    """Modalities with tokens in the calibration data, counted by the patched model itself (the
    knockout plan with no target skips nothing) over the batches of every rank."""
    plan.target.clear()
    counts = measure(model, calibration, plan, kl=False).stats["per_modality"]
    present = [m for m in allowed if counts.get(m, {}).get("total_slots", 0) > 0]
    if not present:
        raise UsageError("calibration samples contain no text or media tokens")
    return present


def _expand(by_group: dict[str, float], modalities: list[str], mode: AlphaMode) -> dict[str, float]:
    return by_group if mode == "per_modality" else dict.fromkeys(modalities, by_group["all"])


def _normalise(
    raw: dict[int, dict[str, float]], modalities: list[str], mode: AlphaMode, keep_raw_if_zero: bool
) -> dict[int, dict[str, float]]:
    expanded = {layer: _expand(v, modalities, mode) for layer, v in raw.items()}
    alphas: dict[int, dict[str, float]] = {layer: {} for layer in raw}
    for modality in modalities:
        total = sum(v[modality] for v in expanded.values())
        if total <= 0 and keep_raw_if_zero:  # the release divides only a non-zero sum
            warnings.warn(
                f"knocking out any layer for {modality} tokens leaves the answers unchanged (KL sum "
                f"{total}); as the release does, its alphas keep the raw values",
                stacklevel=3,
            )
            total = 1.0
        if total <= 0:
            raise UsageError(
                f"skipping any layer for {modality} tokens leaves the answers unchanged (KL sum {total}); "
                "use more calibration samples or samples with answers"
            )
        for layer, values in expanded.items():
            alphas[layer][modality] = values[modality] / total
    return alphas
