"""`modes serve`: an OpenAI-compatible chat-completions server with a plan applied.

Built on FastAPI and transformers' public generation API (``generate``, continuous batching),
not on transformers' own server, whose internals changed shape between 5.24 and 5.25. Routes:
``POST /v1/chat/completions`` (text and base64 images, streamed or not), ``GET /v1/models``,
``GET /health`` and ``GET /v1/modes/stats`` (`modes.skip_stats` since start). Every whole
(non-streamed) answer carries the header ``x-modes-skip-ratio``: the share of routed slots its
forwards skipped, exact when requests run one at a time (the default); under continuous
batching, the ratio over every forward made while it ran.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modes import engine
from modes.engine import ApplyOptions
from modes.errors import UsageError
from modes.loading import bundled_model_path, input_device, load_model
from modes.plan import SkipPlan
from modes.serving.chat import BadRequestError, ChatRequest
from modes.serving.generation import BatchedGenerator, SequentialGenerator

__all__ = ["ServedModel", "build_app", "serve"]


def _require_serving() -> None:
    """The web dependencies (fastapi, uvicorn) are optional."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ImportError(f"modes serve needs {error.name}: pip install 'modes[serve]'") from error


@dataclass
class ServedModel:
    """The one model a server answers with: loaded by modes, the plan applied once."""

    name: str
    model: Any
    processor: Any
    generator: SequentialGenerator | BatchedGenerator

    @classmethod
    def load(
        cls,
        path: str,
        plan: SkipPlan | None,
        options: ApplyOptions,
        continuous_batching: bool,
        name: str,
        placement: dict[str, Any] | None = None,
    ) -> ServedModel:
        """``placement``: `modes.load_model`'s dtype and accelerate options."""
        model, processor = load_model(path, **(placement or {}))
        if plan is not None:
            engine.apply(model, plan, options=options, processor=processor)
        tokenizer = getattr(processor, "tokenizer", processor)
        counter = functools.partial(_slot_counts, model)
        if not continuous_batching:
            return cls(name, model, processor, SequentialGenerator(model, tokenizer.pad_token_id, counter))
        if processor is not tokenizer:
            raise UsageError(
                "continuous batching serves text-only models (transformers batches no image inputs); "
                "serve this vision-language model without --continuous-batching"
            )
        generator = BatchedGenerator(model, tokenizer.eos_token_id, tokenizer.pad_token_id, counter)
        return cls(name, model, processor, generator)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def encode(self, request: ChatRequest) -> dict[str, Any]:
        """The request's chat as model inputs, on the model's input device."""
        if request.images and self.processor is self.tokenizer:
            raise BadRequestError(f"{self.name} reads text only; send the request without images")
        text = self.processor.apply_chat_template(
            request.messages, add_generation_prompt=True, tokenize=False
        )
        try:
            kwargs = {"images": request.images} if request.images else {}
            encoded = self.processor(text=[text], return_tensors="pt", **kwargs)
        except ValueError as error:  # e.g. a number of images the prompt does not match
            raise BadRequestError(f"bad request: {error}") from error
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        length = encoded["input_ids"].shape[1]
        if limit is not None and length + request.max_new_tokens > limit:
            raise BadRequestError(
                f"the prompt has {length} tokens and asks for {request.max_new_tokens} more; "
                f"this model reads at most {limit}"
            )
        device = input_device(self.model)
        return {k: v.to(device) for k, v in encoded.items()}


def _slot_counts(model: Any) -> tuple[int, int]:
    """(skipped, total) routed slots since start; (0, 0) unpatched."""
    if not engine.is_patched(model):
        return 0, 0
    stats = engine.skip_stats(model)
    return stats["skipped_slots"], stats["total_slots"]


def build_app(
    model: str | None = None,
    plan: str | Path | None = None,
    execution: str = "auto",
    continuous_batching: bool = False,
    name: str = "modes",
    placement: dict[str, Any] | None = None,
) -> tuple[Any, ServedModel]:
    """(FastAPI app, served model) serving ``model`` (default: the bundled model) as ``name``
    with ``plan`` applied; ``placement``: `modes.load_model`'s dtype and accelerate options."""
    _require_serving()
    skip_plan = SkipPlan.load(plan) if plan else None
    path = str(model or bundled_model_path())
    served = ServedModel.load(path, skip_plan, ApplyOptions(execution), continuous_batching, name, placement)
    from modes.serving.app import chat_app

    return chat_app(served), served


def serve(host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the server until interrupted (`build_app` options)."""
    import uvicorn

    app, _ = build_app(**options)
    uvicorn.run(app, host=host, port=port, log_level="warning")
