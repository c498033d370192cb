"""transformers' own OpenAI-compatible server (``transformers serve``) with modes' model loading
and a plan applied: the bundled model by default, offline and without torchvision.

The server's handlers, routes and generation managers are transformers'; modes supplies the
model manager (our loading, the plan applied once at load, one model name), and adds skip
statistics: ``GET /v1/modes/stats`` (cumulative since start) and, per response, the header
``x-modes-skip-ratio`` (the ratio of the slots that request's forwards skipped, when requests
run one at a time; with concurrent requests the cumulative endpoint is exact and the header is
the ratio over the calls made while the request ran).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modes import engine
from modes.engine import ApplyOptions
from modes.loading import bundled_model_path, load_model, load_processor
from modes.plan import SkipPlan

__all__ = ["build_app", "serve"]


def _require_serving() -> None:
    """transformers' serving extras (fastapi, uvicorn, pydantic, openai) are optional."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError("modes serve needs transformers' serving extras: pip install 'modes[serve]'")


class _Loaded:
    """The one model this server serves, loaded with modes and patched with the plan."""

    def __init__(self, path: str, plan: SkipPlan | None, options: ApplyOptions):
        self.path, self.plan, self.options = path, plan, options

    def processor(self) -> Any:
        processor = load_processor(self.path)
        _match_response_template(processor, self.path)
        return processor

    def model(self) -> Any:
        model, processor = load_model(self.path)
        if self.plan is not None:
            engine.apply(model, self.plan, options=self.options, processor=processor)
        return model


def _match_response_template(processor: Any, path: str) -> None:
    """transformers' serve parses answers with a response template per model type that
    anchors on the assistant header as text ("<|im_start|>assistant\n"); a tokenizer whose
    decode spells the header otherwise (the bundled word-level one: "<|im_start|> assistant")
    gets the same template anchored on its own spelling. The table is transformers' own
    (5.24); where it moved, nothing is changed."""
    from transformers import AutoConfig

    try:
        from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS
    except ImportError:
        return

    tokenizer = getattr(processor, "tokenizer", processor)
    model_type = AutoConfig.from_pretrained(path).model_type
    template = next((v for types, v in _RESPONSE_TEMPLATE_FALLBACKS.items() if model_type in types), None)
    if template is None or getattr(tokenizer, "response_template", None) is not None:
        return
    anchor = template.get("start_anchor", "")
    spelled = tokenizer.decode(tokenizer(anchor, add_special_tokens=False)["input_ids"])
    if spelled != anchor:
        tokenizer.response_template = {**template, "start_anchor": spelled}


def _chat_handler_class() -> type:
    from fastapi import HTTPException
    from transformers.cli.serving.chat_completion import ChatCompletionHandler

    class ModesChatHandler(ChatCompletionHandler):
        """transformers' chat handler, answering 400 (with the reason) for inputs the model or
        its processor cannot take instead of failing with a 500."""

        async def handle_request(self, body: dict, request_id: str) -> Any:
            self._check_length(body)
            try:
                return await super().handle_request(body, request_id)
            except ValueError as error:  # e.g. an image that cannot be decoded
                raise HTTPException(400, f"bad request: {error}") from error

        def _check_length(self, body: dict) -> None:
            timed = next(iter(self.model_manager.loaded_models.values()))
            tokenizer = getattr(timed.processor, "tokenizer", timed.processor)
            limit = getattr(timed.model.config.get_text_config(), "max_position_embeddings", None)
            texts = [
                part for message in body.get("messages") or [] for part in _texts(message.get("content"))
            ]
            tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
            if limit is not None and tokens >= limit:
                raise HTTPException(
                    400, f"the prompt has {tokens} text tokens; this model reads at most {limit}"
                )

    return ModesChatHandler


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        ]
    return []


def _manager_class() -> type:
    from transformers.cli.serving.model_manager import ModelManager

    class ModesModelManager(ModelManager):
        """transformers' model manager serving one model, loaded by modes with the plan applied."""

        def __init__(self, loaded: _Loaded, name: str):
            self.modes_loaded, self.modes_name = loaded, name
            super().__init__(device="cpu", dtype="auto", model_timeout=-1, force_model=name)

        @staticmethod
        def process_model_name(model_id: str) -> str:
            return model_id  # one local model: its name as given

        def _validate_args(self) -> None:
            """Nothing to check: quantization and attention are not offered."""

        def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None) -> Any:
            self._check_name(model_id_and_revision)
            return self.modes_loaded.processor()

        def _load_model(self, model_id_and_revision: str, **_: Any) -> Any:
            self._check_name(model_id_and_revision)
            return self.modes_loaded.model()

        def _check_name(self, name: str) -> None:
            if name != self.modes_name:
                from fastapi import HTTPException

                raise HTTPException(
                    404, f"model {name!r} is not served here; this server serves {self.modes_name!r}"
                )

    return ModesModelManager


def build_app(
    model: str | None = None,
    plan: str | Path | None = None,
    execution: str = "auto",
    continuous_batching: bool = False,
    name: str = "modes",
) -> tuple[Any, Any]:
    """(FastAPI app, model manager) serving ``model`` (default: the bundled model) as ``name``
    with ``plan`` applied."""
    _require_serving()
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    skip_plan = SkipPlan.load(plan) if plan else None
    loaded = _Loaded(str(model or bundled_model_path()), skip_plan, ApplyOptions(execution))
    manager = _manager_class()(loaded, name)
    state = GenerationState(continuous_batching=continuous_batching, compile=False, cb_config=None)
    common = dict(model_manager=manager, generation_state=state)
    app = build_server(
        manager,
        _chat_handler_class()(**common, chat_template_kwargs={}),
        completion_handler=CompletionHandler(**common),
        response_handler=ResponseHandler(**common, chat_template_kwargs={}),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(**common, chat_template_kwargs={}, decision_config=None),
        generation_state=state,
    )
    _add_stats(app, manager, name)
    return app, manager


def _add_stats(app: Any, manager: Any, name: str) -> None:
    from fastapi import Request

    def served_model() -> Any:
        return manager.loaded_models[name].model

    @app.get("/v1/modes/stats")
    async def stats() -> dict[str, Any]:
        model = served_model()
        return engine.skip_stats(model) if engine.is_patched(model) else {"ratio": 0.0, "patched": False}

    @app.middleware("http")
    async def per_request_ratio(request: Request, call_next):
        model = served_model()
        if not engine.is_patched(model) or request.url.path != "/v1/chat/completions":
            return await call_next(request)
        before = engine.skip_stats(model)  # plain integers: a snapshot
        response = await call_next(request)
        after = engine.skip_stats(model)
        skipped = after["skipped_slots"] - before["skipped_slots"]
        total = after["total_slots"] - before["total_slots"]
        response.headers["x-modes-skip-ratio"] = f"{skipped / total:.6f}" if total else "0"
        return response


def serve(host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the server until interrupted (`build_app` options)."""
    import uvicorn

    app, _ = build_app(**options)
    uvicorn.run(app, host=host, port=port, log_level="warning")
