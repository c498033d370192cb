"""The web routes of `modes serve` (FastAPI), around a `ServedModel`."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from modes import engine
from modes.serving.chat import BadRequestError, ChatRequest, chunk, completion, parse_request
from modes.serving.generation import Answer

if TYPE_CHECKING:
    from modes.serving.server import ServedModel

__all__ = ["chat_app"]


def chat_app(served: ServedModel) -> FastAPI:
    """The routes of `modes serve` around ``served``."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        served.generator.close()

    app = FastAPI(title="modes serve", lifespan=lifespan)

    @app.exception_handler(BadRequestError)
    async def bad_request(_: Request, error: BadRequestError) -> JSONResponse:
        body = {"error": {"message": str(error), "type": "invalid_request_error", "code": error.status}}
        return JSONResponse(body, status_code=error.status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "owned_by": "modes"}]}

    @app.get("/v1/modes/stats")
    async def stats() -> dict[str, Any]:
        if not engine.is_patched(served.model):
            return {"ratio": 0.0, "patched": False}
        return engine.skip_stats(served.model)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request) -> Any:
        request = parse_request(await _json(http))
        if request.model != served.name:
            raise BadRequestError(
                f"model {request.model!r} is not served here; this server serves {served.name!r}", 404
            )
        inputs = await run_in_threadpool(served.encode, request)
        if request.stream:
            return StreamingResponse(_stream(served, request, inputs), media_type="text/event-stream")
        return await run_in_threadpool(_whole_answer, served, request, inputs)

    return app


async def _json(http: Request) -> Any:
    try:
        return json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequestError(f"the request body is not valid JSON ({error})") from error


def _whole_answer(served: ServedModel, request: ChatRequest, inputs: dict[str, Any]) -> JSONResponse:
    answer = Answer()
    for _ in served.generator.generate(inputs, request.max_new_tokens, request.sampling, answer):
        pass
    tokens = answer.tokens
    text = served.tokenizer.decode(tokens, skip_special_tokens=True)
    prompt = int(inputs["input_ids"].shape[1])
    body = completion(served.name, text, prompt, len(tokens), _finish(served, tokens, request))
    headers = {"x-modes-skip-ratio": f"{answer.skipped / answer.total:.6f}" if answer.total else "0"}
    return JSONResponse(body, headers=headers)


def _stream(served: ServedModel, request: ChatRequest, inputs: dict[str, Any]) -> Iterator[str]:
    """Server-sent events: the role, then the answer's text as it grows, then the finish."""
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    yield _event(chunk(request_id, served.name, {"role": "assistant", "content": ""}))
    answer = Answer()
    shown = ""
    for _ in served.generator.generate(inputs, request.max_new_tokens, request.sampling, answer):
        text = served.tokenizer.decode(answer.tokens, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole characters only
            yield _event(chunk(request_id, served.name, {"content": text[len(shown) :]}))
            shown = text
    yield _event(chunk(request_id, served.name, {}, _finish(served, answer.tokens, request)))
    yield "data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _finish(served: ServedModel, tokens: list[int], request: ChatRequest) -> str:
    ended = bool(tokens) and tokens[-1] == served.tokenizer.eos_token_id
    return "stop" if ended or len(tokens) < request.max_new_tokens else "length"
