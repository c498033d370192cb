"""Train the bundled Qwen3-VL-MoE on the synthetic benchmark (CPU, reproducible from a seed).

    python -m modes.bundled.train --out src/modes/bundled/checkpoint

Two stages, as real VLMs are built: the vision tower is first pretrained alone to tell the
colour and shape of the object under each visual token (linear heads on its merged outputs,
discarded afterwards), then frozen while the language model learns the benchmark: loss on
answer and end-of-turn tokens only, plus the model's router load-balancing loss so that all
experts are used. Samples are drawn on the fly from the train seed range.

A phase can stop at any time and continue: every ``--save-every`` steps the full state
(float32 weights, optimizer moments, sampling generator, log, elapsed time) is written to
``OUT/resume/`` (safetensors + JSON); rerunning the same command continues from it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import Qwen3VLMoeForConditionalGeneration

from modes.bundled.build import build_tokenizer, model_config, save_processor
from modes.checkpoints import hub_layout_loading, write_hub_layout
from modes.data.benchmark import COLORS, SHAPES, SKILLS, SPLITS, make_sample, token_labels
from modes.data.encoding import encode_teacher_forced
from modes.data.sample import Sample
from modes.io import write_json_atomic
from modes.loading import load_processor

__all__ = [
    "ResumeState",
    "export_partial",
    "main",
    "parse_skill_weights",
    "pretrain_vision",
    "train",
    "training_summary",
]


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_skill_weights(text: str) -> dict[str, float]:
    """``"exists=3,position_of=3"`` -> weights per skill (unnamed skills weigh 1)."""
    weights = dict.fromkeys(SKILLS, 1.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        skill, _, value = item.partition("=")
        if skill not in weights or not value:
            raise ValueError(
                f"bad skill weight {item!r}: write skill=weight with a skill from {', '.join(SKILLS)}"
            )
        weights[skill] = float(value)
    if min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"skill weights must be >= 0 and not all 0, got {weights}")
    return weights


def _training_batch(
    seeds: list[int], generator: torch.Generator, skill_weights: dict[str, float] | None
) -> list[Sample]:
    """Samples for ``seeds``; with weights, each sample's skill is drawn from them instead of
    cycling with the seed (to give the hardest skills more of a late training phase)."""
    first_seed, _ = SPLITS["train"]
    if skill_weights is None:
        return [make_sample(first_seed + s) for s in seeds]
    probabilities = torch.tensor([skill_weights[skill] for skill in SKILLS])
    picks = torch.multinomial(probabilities, len(seeds), replacement=True, generator=generator)
    return [make_sample(first_seed + s, SKILLS[i]) for s, i in zip(seeds, picks.tolist(), strict=True)]


def pretrain_vision(
    model: Qwen3VLMoeForConditionalGeneration,
    processor,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[dict]:
    """Teach the vision tower to encode the colour and shape under each merged output token.

    Without this the language model never learns to read images: a randomly initialised tower
    separates cells only weakly (outputs share one dominant direction) and, trained jointly
    through the answer loss, drifts to an image-independent output. Heads read the final
    merged features and every deepstack feature, so everything the LM receives is informative.
    """
    visual = model.model.visual.train()
    width = model.config.vision_config.out_hidden_size
    outputs = 1 + len(model.config.vision_config.deepstack_visual_indexes)
    heads = torch.nn.ModuleList(
        torch.nn.ModuleDict(
            {
                "color": torch.nn.Linear(width, len(COLORS) + 1),
                "shape": torch.nn.Linear(width, len(SHAPES) + 1),
            }
        )
        for _ in range(outputs)
    )
    parameters = [*visual.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    first_seed, pool = SPLITS["train"]
    generator = torch.Generator().manual_seed(seed + 1)
    log = []
    for step in tqdm(range(steps), desc="pretrain vision", unit="step"):
        seeds = torch.randint(0, pool, (batch_size,), generator=generator).tolist()
        images, colors, shapes = zip(*(token_labels(first_seed + s) for s in seeds), strict=True)
        pixels = processor.image_processor(images=list(images), return_tensors="pt")
        out = visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"], return_dict=True)
        features = [out.pooler_output, *out.deepstack_features]  # each [B * tokens, width]
        color = torch.tensor(colors).reshape(-1)  # [B * tokens], row-major merged tokens
        shape = torch.tensor(shapes).reshape(-1)
        loss = sum(
            F.cross_entropy(head["color"](f), color) + F.cross_entropy(head["shape"](f), shape)
            for head, f in zip(heads, features, strict=True)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                accuracy = (heads[0]["color"](features[0]).argmax(-1) == color).float().mean().item()
            log.append(
                {"step": step, "loss": round(loss.item(), 4), "cell_color_accuracy": round(accuracy, 4)}
            )
    visual.requires_grad_(False)
    return log


def train(
    out: str | Path,
    steps: int = 5000,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 50,
    save_every: int = 0,
    vision_steps: int = 400,
    init: str | Path | None = None,
    skill_weights: dict[str, float] | None = None,
    **text_overrides,
) -> dict:
    """Build, train and save the model + processor into ``out``; returns the training summary.

    ``init``: continue from a checkpoint this function wrote (its vision tower stays frozen
    and is not pretrained again); its training summary is kept under ``previous``.
    ``skill_weights``: draw each sample's skill from these weights (default: balanced).
    ``save_every``: write the resumable state every that many steps; a later call with the
    same settings continues from it instead of starting over.
    """
    torch.manual_seed(seed)
    out = Path(out)
    tokenizer = build_tokenizer()
    save_processor(tokenizer, out)
    processor = load_processor(out)
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "vision_steps": vision_steps if init is None else 0,
        "init": None if init is None else str(init),
        "skill_weights": skill_weights,
        "text_overrides": text_overrides,
    }
    model, previous = _initial_model(tokenizer, init, text_overrides)
    state = ResumeState.load(out, settings)
    if state is None:
        started = time.perf_counter()
        vision_log = (
            [] if init is not None else pretrain_vision(model, processor, steps=vision_steps, seed=seed)
        )
        state = ResumeState(settings, vision_log=vision_log, seconds=time.perf_counter() - started)
    model.model.visual.requires_grad_(False)
    model.config.text_config.output_router_logits = True
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(seed)
    if state.step or state.saved:
        state.restore(model, optimizer, generator)
        print(f"resuming {out} at step {state.step} of {steps}")
    elif save_every:
        state.save(out, model, optimizer, generator)  # the pretrained vision tower is not redone
    _train_language_model(model, processor, optimizer, generator, state, out, log_every, save_every)
    _save(model, out)
    summary = _write_training_log(out, state, previous)
    ResumeState.discard(out)
    return summary


def _write_training_log(dest: Path, state: ResumeState, previous: dict | None, **extra: Any) -> dict:
    """``dest``/training_log.json: the phase's settings, ``extra``, what it reached and the
    summary of the phase it continued; returns that summary (the log without the step lines)."""
    summary = {
        **{k: v for k, v in state.settings.items() if k not in ("init", "text_overrides")},
        **extra,
        "vision_cell_color_accuracy": state.vision_log[-1]["cell_color_accuracy"]
        if state.vision_log
        else None,
        "seconds": round(state.seconds, 1),
    }
    if previous is not None:
        summary["previous"] = previous
    write_json_atomic(
        dest / "training_log.json", {**summary, "vision_log": state.vision_log, "log": state.log}
    )
    return summary


def _initial_model(
    tokenizer, init: str | Path | None, text_overrides: dict
) -> tuple[Qwen3VLMoeForConditionalGeneration, dict | None]:
    """A fresh model, or the ``init`` checkpoint (and its summary)."""
    if init is None:
        return Qwen3VLMoeForConditionalGeneration(model_config(tokenizer, **text_overrides)).train(), None
    with hub_layout_loading(init):
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(init, dtype=torch.float32).train()
    return model, training_summary(Path(init))


def _train_language_model(model, processor, optimizer, generator, state, out, log_every, save_every) -> None:
    """Steps ``state.step`` .. ``steps`` of the answer loss (+ router balance loss)."""
    steps, batch_size, lr = (state.settings[k] for k in ("steps", "batch_size", "lr"))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    _, pool = SPLITS["train"]
    progress = tqdm(range(state.step, steps), desc="train", unit="step", initial=state.step, total=steps)
    resumed_at = time.perf_counter() - state.seconds
    for step in progress:
        seeds = torch.randint(0, pool, (batch_size,), generator=generator).tolist()
        samples = _training_batch(seeds, generator, state.settings["skill_weights"])
        batch = encode_teacher_forced(processor, samples)
        answer_mask = batch.pop("answer_mask")
        labels = batch["input_ids"].masked_fill(~answer_mask, -100)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        output = model(**batch, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        aux = output.aux_loss.item() if output.aux_loss is not None else float("nan")
        progress.set_postfix(loss=f"{output.loss.item():.3f}", aux=f"{aux:.3f}")
        if step % log_every == 0 or step == steps - 1:
            state.log.append({"step": step, "loss": round(output.loss.item(), 4), "aux_loss": round(aux, 4)})
        state.step, state.seconds = step + 1, time.perf_counter() - resumed_at
        if save_every and state.step % save_every == 0 and state.step < steps:
            state.save(out, model, optimizer, generator)


class ResumeState:
    """Where a training phase stands: step, log, elapsed seconds, and the settings it ran with.

    Saved under ``OUT/resume/`` with the float32 weights, the optimizer's moments and the
    sampling generator (safetensors), written to a new folder and swapped in, so that a
    phase killed mid-save still resumes from the previous save.
    """

    def __init__(
        self,
        settings: dict,
        vision_log: list | None = None,
        step: int = 0,
        seconds: float = 0.0,
        log: list[dict] | None = None,
    ):
        self.settings, self.vision_log, self.step, self.seconds = settings, vision_log or [], step, seconds
        self.log: list[dict] = log or []
        self.saved: Path | None = None  # the folder this state was loaded from

    @staticmethod
    def folder(out: Path) -> Path:
        return out / "resume"

    @classmethod
    def load(cls, out: Path, settings: dict | None) -> ResumeState | None:
        """The last save under ``out`` (None: none); ``settings`` must be those it ran with
        (None: whatever they were)."""
        folder = cls.folder(out)
        if not (folder / "state.json").exists():
            old = folder.with_name("resume.old")  # killed between the two renames of a save
            if not (old / "state.json").exists():
                return None
            folder = old
        record = json.loads((folder / "state.json").read_text())
        settings = record["settings"] if settings is None else settings
        if record["settings"] != json.loads(json.dumps(settings)):
            raise ValueError(
                f"{folder} holds a phase started with other settings ({record['settings']}); "
                f"rerun with those, or delete {folder} to start this phase over"
            )
        state = cls(settings, record["vision_log"], record["step"], record["seconds"], record["log"])
        state.saved = folder
        return state

    def restore(self, model, optimizer, generator) -> None:
        model.load_state_dict(load_file(self.saved / "model.safetensors"), strict=True)
        moments = load_file(self.saved / "optimizer.safetensors")
        generator.set_state(moments.pop("generator"))
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, param in enumerate(params):
            optimizer.state[param] = {
                key: moments[f"{index}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")
            }

    def save(self, out: Path, model, optimizer, generator) -> None:
        folder, fresh, old = self.folder(out), out / "resume.new", out / "resume.old"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        weights = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
        save_file(weights, fresh / "model.safetensors")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        moments = {"generator": generator.get_state()}
        for index, param in enumerate(params):
            for key, value in optimizer.state.get(param, {}).items():
                moments[f"{index}.{key}"] = value.detach().clone().contiguous()
        save_file(moments, fresh / "optimizer.safetensors")
        record = {"settings": self.settings, "step": self.step, "seconds": self.seconds}
        write_json_atomic(fresh / "state.json", {**record, "vision_log": self.vision_log, "log": self.log})
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def discard(cls, out: Path) -> None:
        for name in ("resume", "resume.new", "resume.old"):
            shutil.rmtree(out / name, ignore_errors=True)


def export_partial(out: str | Path, dest: str | Path) -> dict:
    """A phase stopped midway (its last save under ``out``) as a checkpoint in ``dest`` that a
    new phase can start from (``--init dest``): weights in bf16 as every checkpoint, processor,
    and a training log whose summary says how far the phase got (``steps_done`` of ``steps``).
    The optimizer's moments stay behind: the new phase starts its own."""
    out, dest = Path(out), Path(dest)
    record = ResumeState.load(out, None)
    if record is None:
        raise FileNotFoundError(f"{ResumeState.folder(out)} holds no saved state to export")
    settings = record.settings
    tokenizer = build_tokenizer()
    save_processor(tokenizer, dest)
    model, previous = _initial_model(tokenizer, settings["init"], settings["text_overrides"])
    model.load_state_dict(load_file(record.saved / "model.safetensors"), strict=True)
    _save(model, dest)
    return _write_training_log(dest, record, previous, steps_done=record.step)


def training_summary(checkpoint: Path) -> dict | None:
    """A checkpoint's training settings and time, without the per-step logs (None: no log)."""
    path = checkpoint / "training_log.json"
    if not path.exists():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("log", "vision_log")}


def _save(model: Qwen3VLMoeForConditionalGeneration, directory: Path) -> None:
    """bf16 weights (half the size; loaded back as float32 by `modes.load_model`), in the layout
    of Hub checkpoints so that vLLM loads the same files (`modes.checkpoints`)."""
    state = {name: tensor.detach().to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    model.config.text_config.output_router_logits = False
    model.save_pretrained(directory, state_dict=state)
    model.config.text_config.output_router_logits = True
    write_hub_layout(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="directory for the checkpoint and processor")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=400, help="vision pretraining steps")
    parser.add_argument("--init", default=None, help="continue from this checkpoint (second phase)")
    parser.add_argument(
        "--skill-weights",
        type=parse_skill_weights,
        default=None,
        help="e.g. exists=3,position_of=3: oversample skills (others weigh 1; default balanced)",
    )
    parser.add_argument(
        "--save-every", type=int, default=200, help="steps between saves of the resumable state (0: none)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--export-partial",
        metavar="DEST",
        default=None,
        help="do not train: write the last save of the phase in --out as a checkpoint in DEST",
    )
    args = parser.parse_args(argv)
    if args.export_partial:
        print(export_partial(args.out, args.export_partial))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        train(
            args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            vision_steps=args.vision_steps,
            init=args.init,
            save_every=args.save_every,
            skill_weights=args.skill_weights,
        )
    )


if __name__ == "__main__":
    main()
