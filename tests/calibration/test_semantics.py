"""Both calibration semantics against an independent re-implementation written here with plain
forward hooks on the unpatched transformers model (no modes engine): for each MoE layer and
modality, the experts module's output rows of that modality's tokens are replaced (zeros for
modes' reading, the module's input for the release's), and KL(orig || knocked) is summed at
the semantics' positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modes
from modes.calibration import calibrate
from modes.data.encoding import encode_teacher_forced
from modes.data.sample import batches_by_kind


def reference_alphas(model, processor, samples, semantics: str) -> dict[int, dict[str, float]]:
    tokenizer = processor.tokenizer
    image_id, im_start = model.config.image_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")
    special = torch.tensor(tokenizer.all_special_ids)
    experts = {
        int(name.split(".layers.")[1].split(".")[0]): module
        for name, module in model.named_modules()
        if name.endswith("mlp.experts")
    }
    sums = {layer: {"text": 0.0, "visual": 0.0} for layer in experts}
    tokens = 0
    for group in batches_by_kind(samples, 8):
        batch = encode_teacher_forced(processor, group)
        answer = batch.pop("answer_mask")  # [B, L], the answer and end-of-turn tokens
        ids, valid = batch["input_ids"], batch["attention_mask"].bool()
        if semantics == "modes":  # the logits predicting those tokens
            positions = torch.zeros_like(answer)
            positions[:, :-1] = answer[:, 1:]
        else:  # the release: from the last <|im_start|> + 3 to the end
            index = torch.arange(ids.shape[1]).expand_as(ids)
            last = torch.where(ids == im_start, index, -1).max(dim=1).values
            positions = (index >= (last + 3).unsqueeze(1)) & valid
        visual = (ids == image_id) & valid
        text = ~visual & valid & ~torch.isin(ids, special)
        with torch.no_grad():
            reference = F.log_softmax(model(**batch).logits[positions].float(), dim=-1)
        tokens += int(positions.sum())
        for layer, module in experts.items():
            for modality, rows in (("text", text.reshape(-1)), ("visual", visual.reshape(-1))):

                def knock(mod, args, output, rows=rows):
                    replacement = args[0] if semantics == "release" else torch.zeros_like(output)
                    return torch.where(rows.unsqueeze(1), replacement.to(output.dtype), output)

                handle = module.register_forward_hook(knock)
                with torch.no_grad():
                    knocked = F.log_softmax(model(**batch).logits[positions].float(), dim=-1)
                handle.remove()
                sums[layer][modality] += max(
                    0.0, float(F.kl_div(knocked, reference, log_target=True, reduction="sum"))
                )
    raw = {layer: {m: v / tokens for m, v in by.items()} for layer, by in sums.items()}
    totals = {m: sum(by[m] for by in raw.values()) for m in ("text", "visual")}
    return {layer: {m: v / totals[m] for m, v in by.items()} for layer, by in raw.items()}


@pytest.mark.parametrize("semantics", ["modes", "release"])
def test_calibration_matches_the_independent_reading(bundled, semantics):
    model, processor = bundled
    samples = modes.load_samples(split="calibration", limit=16)
    expected = reference_alphas(model, processor, samples, semantics)
    got = calibrate(model, processor, samples, batch_size=8, semantics=semantics, progress=False)
    assert got.semantics == semantics
    for layer, by_modality in expected.items():
        for modality, alpha in by_modality.items():
            # alphas are shares of 1: a layer whose knock-out barely matters (alpha ~ 0.002 on
            # the 12-layer model) carries float noise of the knocked forwards of ~5e-6 of the total
            assert got.alphas[layer][modality] == pytest.approx(alpha, rel=2e-3, abs=2e-5), (layer, modality)


def test_the_two_readings_differ_and_the_search_uses_the_calibrated_one(bundled, tmp_path):
    model, processor = bundled
    samples = modes.load_samples(split="calibration", limit=16)
    ours = calibrate(model, processor, samples, batch_size=8, progress=False)
    release = calibrate(model, processor, samples, batch_size=8, semantics="release", progress=False)
    gaps = [abs(ours.alphas[layer]["visual"] - release.alphas[layer]["visual"]) for layer in ours.alphas]
    assert max(gaps) > 0.05
    loaded = modes.Importance.load(release.save(tmp_path / "importance.json"))
    assert loaded.semantics == "release"
    result = modes.search(
        model, processor, samples, loaded, 0.5, grid=8, batch_size=8, progress=False, gammas=(1.0,)
    )
    assert result.plan.provenance["semantics"] == "release"


def test_tempering_nests_uniform_and_calibrated_alphas(bundled):
    model, processor = bundled
    importance = calibrate(model, processor, modes.load_samples(split="calibration", limit=8), progress=False)
    layers = len(importance.alphas)
    uniform, same = importance.tempered(0.0), importance.tempered(1.0)
    for layer in importance.alphas:
        for modality in importance.modalities:
            assert uniform.alphas[layer][modality] == pytest.approx(1 / layers)
            assert same.alphas[layer][modality] == pytest.approx(importance.alphas[layer][modality])
    half = importance.tempered(0.5)
    text = [half.alphas[layer]["text"] for layer in sorted(importance.alphas)]
    assert sum(text) == pytest.approx(1.0) and max(text) < max(a["text"] for a in importance.alphas.values())
