"""Fused-expert layouts of checkpoint files, so that one set of files loads in every engine.

Hub checkpoints of some MoE families store fused expert tensors transposed with respect to
transformers' in-memory layout (Qwen3-VL-MoE: ``gate_up_proj`` [E, hidden, 2 x inter] and
``down_proj`` [E, inter, hidden] on the Hub and in vLLM, the transpose in transformers 5).
transformers tells the two apart by shape (``Transpose(check_dims=True)``), which cannot work
when a tensor is square: a square Hub-layout ``gate_up_proj`` then loads untransposed, silently
wrong. ``down_proj`` is never square when ``gate_up_proj`` is (hidden = 2 x inter), so it
names the file's layout; `load_model` uses `hub_layout_loading` to transpose both tensors
whenever the file is in Hub layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "HUB_TRANSPOSED_EXPERTS",
    "hub_layout_loading",
    "stores_hub_layout",
    "write_hub_layout",
]

# model_type -> (suffix of the fused gate/up tensor, suffix of the down tensor): the families whose
# Hub files store fused experts transposed (dims 1 and 2) against transformers' in-memory layout.
HUB_TRANSPOSED_EXPERTS: dict[str, tuple[str, str]] = {
    "qwen3_vl_moe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
}

# Config fields other engines read that transformers leaves implicit (vLLM: Qwen3-VL-MoE routers
# renormalise only with norm_topk_prob; its M-RoPE is interleaved only with mrope_interleaved).
HUB_TEXT_CONFIG_FIELDS: dict[str, dict[str, Any]] = {
    "qwen3_vl_moe": {"norm_topk_prob": True, "rope_parameters": {"mrope_interleaved": True}},
}


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    return sorted(path.glob("*.safetensors"))


def stores_hub_layout(path: str | Path) -> bool:
    """Whether the local checkpoint ``path`` stores its fused experts in Hub layout (False for
    hub names, other families, and files in transformers' layout)."""
    path = Path(path)
    if not (path / "config.json").exists():
        return False
    config = _config(path)
    if config.get("model_type") not in HUB_TRANSPOSED_EXPERTS:
        return False
    _, down = HUB_TRANSPOSED_EXPERTS[config["model_type"]]
    text = config.get("text_config", config)
    hub_shape = [text["moe_intermediate_size"], text["hidden_size"]]  # [inter, hidden] after E
    for file in _weight_files(path):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                if key.endswith(down):
                    return handle.get_slice(key).get_shape()[1:] == hub_shape
    return False


@contextmanager
def hub_layout_loading(path: str | Path) -> Iterator[None]:
    """Within it, transformers transposes the fused experts of ``path`` unconditionally when the
    file is in Hub layout (its shape check is blind for square tensors); otherwise no change.
    Not thread-safe: it swaps transformers' conversion table for the model type while loading."""
    if not stores_hub_layout(path):
        yield
        return
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import Transpose, WeightConverter

    model_type = _config(Path(path))["model_type"]
    original = get_checkpoint_conversion_mapping(model_type)
    transposes = [
        WeightConverter(source_patterns=name, target_patterns=name, operations=[Transpose(1, 2)])
        for name in HUB_TRANSPOSED_EXPERTS[model_type]
    ]
    register_checkpoint_conversion_mapping(model_type, transposes, overwrite=True)
    try:
        yield
    finally:
        register_checkpoint_conversion_mapping(model_type, original, overwrite=True)


def write_hub_layout(directory: str | Path) -> None:
    """Rewrite a checkpoint saved by transformers in Hub layout: fused experts transposed and
    the config fields other engines read. Idempotent; each file is replaced atomically."""
    directory = Path(directory)
    config = _config(directory)
    model_type = config["model_type"]
    if model_type not in HUB_TRANSPOSED_EXPERTS:
        raise ValueError(f"{model_type!r} checkpoints have one layout; nothing to rewrite")
    if not stores_hub_layout(directory):
        for file in _weight_files(directory):
            _transpose_experts(file, HUB_TRANSPOSED_EXPERTS[model_type])
    text = config.setdefault("text_config", {})
    for field, value in HUB_TEXT_CONFIG_FIELDS[model_type].items():
        text[field] = {**text.get(field, {}), **value} if isinstance(value, dict) else value
    from modes.io import write_json_atomic

    write_json_atomic(directory / "config.json", config)


def _transpose_experts(file: Path, suffixes: tuple[str, ...]) -> None:
    with safe_open(file, "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for key, tensor in tensors.items():
        if key.endswith(suffixes):
            tensors[key] = torch.transpose(tensor, 1, 2).contiguous()
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(file)
