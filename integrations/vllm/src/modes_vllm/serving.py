"""``vllm serve`` with MoDES statistics: an endpoint plugin (enable with ``VLLM_PLUGINS=modes``).

The counts live in the worker processes (`modes_vllm.skipping.SkipState`); the API server
reaches them through vLLM's ``collective_rpc`` and a worker method the general plugin adds.
- ``GET /v1/modes/stats``: slots routed and skipped since start, per modality and MoE layer;
- ``x-modes-skip-ratio`` on non-streaming completions: skipped over routed slots of the forwards
  made while the request ran (exact when requests run one at a time, as in ``modes serve``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from modes_vllm.skipping import skip_stats

__all__ = ["ModesEndpoints", "worker_skip_stats"]

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


def worker_skip_stats(worker: Any) -> dict[str, Any] | None:
    """Added to vLLM's workers as ``modes_skip_stats`` (`modes_vllm.register`)."""
    return skip_stats()


class ModesEndpoints:
    """vLLM endpoint plugin: MoDES statistics on the OpenAI-compatible server."""

    name = "modes"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine: Any = None

    def attach_router(self, app: FastAPI) -> None:
        app.add_api_route("/v1/modes/stats", self.stats, methods=["GET"])
        app.middleware("http")(self.skip_ratio_header)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        self.engine = engine_client

    async def _stats(self) -> dict[str, Any] | None:
        if self.engine is None:
            return None
        per_worker = await self.engine.collective_rpc("modes_skip_stats")
        return per_worker[0] if per_worker else None

    async def stats(self) -> JSONResponse:
        stats = await self._stats()
        if stats is None:
            return JSONResponse(
                {"error": "no MoDES plan is applied: start vllm with MODES_PLAN=plan.json"}, 404
            )
        return JSONResponse(stats)

    async def skip_ratio_header(self, request: Request, call_next: Any) -> Response:
        if request.method != "POST" or request.url.path not in COMPLETION_PATHS:
            return await call_next(request)
        before = await self._stats()
        response = await call_next(request)
        if before is None or "text/event-stream" in response.headers.get("content-type", ""):
            return response
        after = await self._stats()
        routed = after["routed"] - before["routed"]
        skipped = after["skipped"] - before["skipped"]
        response.headers["x-modes-skip-ratio"] = f"{skipped / routed if routed else 0.0:.6f}"
        return response
