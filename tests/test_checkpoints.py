"""Fused experts in Hub layout: the bundled files are vLLM's layout and still load exactly in modes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

import modes
from modes.bundled.build import build_tokenizer, model_config
from modes.checkpoints import hub_layout_loading, stores_hub_layout, write_hub_layout

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.fixture(scope="module")
def square_checkpoint(tmp_path_factory):
    """A one-layer Qwen3-VL-MoE whose gate_up_proj is square (hidden = 2 x inter), saved by transformers."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(0)
    config = model_config(build_tokenizer(), num_hidden_layers=1, num_experts=4, num_experts_per_tok=2)
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("square")
    model.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def _file_tensors(path):
    with safe_open(path / "model.safetensors", "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def test_the_bundled_checkpoint_is_in_hub_layout_with_the_fields_other_engines_read():
    path = modes.bundled_model_path()
    assert stores_hub_layout(path)
    config = json.loads((path / "config.json").read_text())["text_config"]
    assert config["norm_topk_prob"] is True and config["rope_parameters"]["mrope_interleaved"] is True
    hidden, inter = config["hidden_size"], config["moe_intermediate_size"]
    with safe_open(path / "model.safetensors", "pt") as handle:
        down = next(k for k in handle.keys() if k.endswith(EXPERTS[1]))  # noqa: SIM118
        assert handle.get_slice(down).get_shape()[1:] == [inter, hidden]  # Hub: [E, inter, hidden]


def test_hub_layout_files_load_to_the_weights_they_were_written_from(square_checkpoint, tmp_path):
    source, weights = square_checkpoint
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    assert not stores_hub_layout(tmp_path)
    write_hub_layout(tmp_path)
    write_hub_layout(tmp_path)  # idempotent: a second call changes nothing
    assert stores_hub_layout(tmp_path)
    stored = _file_tensors(tmp_path)
    for key, tensor in weights.items():  # the file holds the transposes, independently of transformers
        if key == "lm_head.weight":  # tied to the embeddings, not stored
            continue
        expected = tensor.transpose(1, 2) if key.endswith(EXPERTS) else tensor
        assert torch.equal(stored[key], expected), key
    with hub_layout_loading(tmp_path):
        model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[key]), key


def test_transformers_alone_misreads_a_square_hub_layout_tensor(square_checkpoint, tmp_path):
    """Why `hub_layout_loading` exists: transformers decides by shape, blind for square tensors.
    If this starts failing, transformers reads the layout itself and the workaround can go."""
    source, weights = square_checkpoint
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    write_hub_layout(tmp_path)
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    gate_up = next(k for k in weights if k.endswith(EXPERTS[0]))
    down = next(k for k in weights if k.endswith(EXPERTS[1]))
    assert torch.equal(plain[down], weights[down])  # not square: transformers' shape check works
    assert not torch.equal(plain[gate_up], weights[gate_up])  # square: loaded untransposed


def test_transformers_layout_files_load_unchanged(square_checkpoint):
    source, weights = square_checkpoint
    assert not stores_hub_layout(source)
    with hub_layout_loading(source):
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())


def test_other_families_have_one_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    assert not stores_hub_layout(tmp_path)
    with pytest.raises(ValueError, match="one layout"):
        write_hub_layout(tmp_path)
