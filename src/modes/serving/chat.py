"""OpenAI chat-completion requests into model inputs, and answers into OpenAI responses.

Plain functions over the request's JSON: no web framework here, so the rules (what a message
may hold, how images arrive, what a response looks like) are testable on their own.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

__all__ = ["BadRequestError", "ChatRequest", "chunk", "completion", "parse_request"]


class BadRequestError(ValueError):
    """A request the server cannot take; answered with its status and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ChatRequest:
    """What one chat completion asks for, in the chat template's own message format."""

    model: str
    messages: list[dict[str, Any]]  # content: a string, or parts {"type": "text"|"image"} with images
    images: list[Image.Image] = field(default_factory=list)  # in the order of the image parts
    max_new_tokens: int = 16
    stream: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)  # generate() options; empty: greedy


def parse_request(body: Any, default_max_tokens: int = 16) -> ChatRequest:
    """The request ``body`` (decoded JSON), checked; `BadRequestError` names what is wrong."""
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty list of chat messages")
    images: list[Image.Image] = []
    parsed = [_message(m, index, images) for index, m in enumerate(messages)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or default_max_tokens
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequestError(f"'max_tokens' must be a positive integer, not {max_tokens!r}")
    return ChatRequest(
        model=str(body.get("model", "")),
        messages=parsed,
        images=images,
        max_new_tokens=max_tokens,
        stream=bool(body.get("stream", False)),
        sampling=_sampling(body),
    )


def _message(message: Any, index: int, images: list[Image.Image]) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequestError(f"message {index} must be an object with a 'role' and a 'content'")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    if not isinstance(content, list):
        raise BadRequestError(f"message {index}: 'content' must be a string or a list of parts")
    parts = [_part(part, index, images) for part in content]
    if all(part["type"] == "text" for part in parts):  # text-only templates read strings only
        return {"role": message["role"], "content": "".join(part["text"] for part in parts)}
    return {"role": message["role"], "content": parts}


def _part(part: Any, index: int, images: list[Image.Image]) -> dict[str, str]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        images.append(_image(url, index))
        return {"type": "image"}
    raise BadRequestError(f"message {index}: a content part must be text or image_url, not {kind!r}")


def _image(url: Any, index: int) -> Image.Image:
    """A base64 data URL decoded (the server reaches no other address)."""
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise BadRequestError(f"message {index}: images must be base64 data URLs (data:image/png;base64,...)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True)))
        return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise BadRequestError(f"message {index}: the image cannot be decoded ({error})") from error


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """Greedy unless a temperature above 0 is asked for (answers that repeat, as evaluation's)."""
    temperature = body.get("temperature")
    if temperature is None or temperature == 0:
        return {}
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequestError(f"'temperature' must be a number >= 0, not {temperature!r}")
    options: dict[str, Any] = {"do_sample": True, "temperature": float(temperature)}
    if body.get("top_p") is not None:
        options["top_p"] = float(body["top_p"])
    return options


def completion(model: str, text: str, prompt_tokens: int, completion_tokens: int, finish: str) -> dict:
    """A ``chat.completion`` object."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk(request_id: str, model: str, delta: dict[str, str], finish: str | None = None) -> dict:
    """A ``chat.completion.chunk`` object of a streamed answer."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
