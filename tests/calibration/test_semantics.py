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
from modes.calibration.kl import assistant_header_length, prepare_batches
from modes.data.encoding import encode_teacher_forced
from modes.data.sample import batches_by_kind


def header_tokens(processor) -> int:
    """The assistant header's length in tokens: what the generation prompt adds to a chat."""
    chat = [{"role": "user", "content": [{"type": "text", "text": "what is 2 plus 2 ?"}]}]
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = [
        processor.apply_chat_template(chat, add_generation_prompt=opened, tokenize=False) for opened in (0, 1)
    ]
    closed, opened = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)
    assert opened[: len(closed)] == closed
    return len(opened) - len(closed)


def reference_alphas(model, processor, samples, semantics: str) -> dict[int, dict[str, float]]:
    tokenizer = processor.tokenizer
    header = header_tokens(processor)
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
        else:  # the release: from the last <|im_start|> + the header's length to the end
            index = torch.arange(ids.shape[1]).expand_as(ids)
            last = torch.where(ids == im_start, index, -1).max(dim=1).values
            positions = (index >= (last + header).unsqueeze(1)) & valid
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


def qwen_like_tokenizer():
    """A byte-level BPE with Qwen's pre-tokenizer and ChatML template, trained here on a few
    chats (Qwen's own tokenizer cannot be downloaded): it splits the header as Qwen's does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = Regex(  # Qwen2's pre-tokenizer pattern
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(split, "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    chats = [f"<|im_start|>user\nwhat is {i} plus {i} ?<|im_end|>\n<|im_start|>assistant\n{2 * i}<|im_end|>\n"
             for i in range(50)]  # fmt: skip
    backend.train_from_iterator(chats * 20, trainer)
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:], chat_template=template,
    )  # fmt: skip


def test_the_release_header_is_measured_with_the_tokenizer(bundled):
    """3 tokens on a Qwen-like tokenizer (the release's constant), 2 on the bundled word-level
    one; the release's positions then start at each row's first answer token."""
    qwen = qwen_like_tokenizer()
    assert assistant_header_length(qwen) == header_tokens(qwen) == 3
    processor = bundled[1]
    assert assistant_header_length(processor) == header_tokens(processor) == 2
    samples = modes.load_samples(split="calibration", limit=40)
    batches = prepare_batches(processor, samples, 8, "cpu", "release")
    for batch, group in zip(batches, batches_by_kind(samples, 8), strict=True):
        first_answer = encode_teacher_forced(processor, group)["answer_mask"].float().argmax(dim=1)  # [B]
        assert batch.logit_mask.float().argmax(dim=1).tolist() == first_answer.tolist()
    assert {batch.inputs.get("pixel_values") is None for batch in batches} == {True, False}


@pytest.mark.parametrize("semantics", ["modes", "release"])
def test_calibration_matches_the_independent_reading(bundled, semantics):
    model, processor = bundled
    samples = modes.load_samples(split="calibration", limit=16)
    expected = reference_alphas(model, processor, samples, semantics)
    got = calibrate(model, processor, samples, batch_size=8, semantics=semantics, progress=False)
    assert got.semantics == semantics
    for layer, by_modality in expected.items():
        for modality, alpha in by_modality.items():
            # alphas are shares of 1; the knocked forwards carry float noise of ~5e-6 of the total
            # on layers that barely matter (1.6e-7 measured on the bundled model): 1e-4 absolute
            assert abs(got.alphas[layer][modality] - alpha) <= 1e-4, (layer, modality)


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
