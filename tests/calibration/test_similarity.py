"""DiEP's expert-similarity table: linear CKA's invariances and the table's construction."""

from __future__ import annotations

import copy

import torch

import modes
from modes.calibration.similarity import expert_outputs, expert_similarity, linear_cka
from modes.engine.patch import moe_sites


def test_linear_cka_is_one_for_rotated_and_scaled_copies_and_symmetric():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 16, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    unrelated = torch.randn(64, 16, generator=generator)
    cka = linear_cka(torch.stack([base, 3.0 * base @ rotation + 1.0, unrelated]))  # [3, 3]
    torch.testing.assert_close(cka, cka.T)
    torch.testing.assert_close(cka.diagonal(), torch.ones(3))
    assert cka[0, 1] > 0.999  # invariant to isotropic scaling, rotation and offset
    assert cka[0, 2] < 0.5


def test_expert_outputs_match_routing_every_token_to_one_expert(small_vlm):
    model, _ = small_vlm
    experts = moe_sites(model)[0].module
    hidden = torch.randn(5, model.config.text_config.hidden_size)
    outputs = expert_outputs(experts, hidden)  # [E, 5, H]
    assert outputs.shape == (experts.num_experts, 5, hidden.shape[1])
    index = torch.tensor([[3, 0]]).expand(5, 2)
    weights = torch.tensor([[0.25, 0.75]]).expand(5, 2)
    with torch.no_grad():
        mixed = experts(hidden, index, weights)
    torch.testing.assert_close(mixed, 0.25 * outputs[3] + 0.75 * outputs[0], rtol=1e-5, atol=1e-6)


def test_table_is_relative_to_the_layer_mean_and_finds_duplicated_experts(small_vlm):
    model, processor = small_vlm
    model = copy.deepcopy(model)
    experts = moe_sites(model)[1].module
    with torch.no_grad():
        for parameter in experts.parameters():
            if parameter.dim() and parameter.shape[0] == experts.num_experts:
                parameter[5] = parameter[2]  # expert 5 becomes a copy of expert 2
    samples = modes.load_samples(split="calibration", limit=16)
    calibration = modes.CalibrationSet.build(model, processor, samples, batch_size=8)
    tables = expert_similarity(model, calibration.batches, tokens_per_layer=64)
    info = modes.model_info(model)
    assert set(tables) == {str(layer) for layer in info.moe_layers}
    for rows in tables.values():
        table = torch.tensor(rows)
        assert table.shape == (info.num_experts, info.num_experts)
        torch.testing.assert_close(table, table.T)
        off_diagonal = table[~torch.eye(info.num_experts, dtype=torch.bool)]
        torch.testing.assert_close(off_diagonal.mean(), torch.tensor(1.0))
    duplicated = torch.tensor(tables[str(moe_sites(model)[1].layer)])
    torch.testing.assert_close(duplicated[2, 5], duplicated[2, 2])  # CKA 1, the layer's maximum
    assert duplicated[2, 5] == duplicated[2].max()
