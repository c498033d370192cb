"""How the served model generates: one request at a time, or text requests packed into shared
forwards by transformers' continuous batching. Both take token ids in and give token ids out,
so the web layer does not know which runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from modes.errors import UsageError

__all__ = ["Answer", "BatchedGenerator", "SequentialGenerator", "SlotCounter"]

SlotCounter = Callable[[], tuple[int, int]]  # (skipped, total) routed slots so far


@dataclass
class Answer:
    """One request's new tokens, and the routed slots its forwards skipped and counted."""

    tokens: list[int] = field(default_factory=list)
    skipped: int = 0
    total: int = 0

    def record(self, before: tuple[int, int], after: tuple[int, int]) -> None:
        self.skipped, self.total = after[0] - before[0], after[1] - before[1]


class SequentialGenerator:
    """``model.generate`` on one request at a time (a lock), so a request's skip statistics are
    exactly the slot counts its forwards added."""

    def __init__(self, model: Any, pad_token_id: int | None, counter: SlotCounter):
        self.model, self.pad_token_id, self.counter = model, pad_token_id, counter
        self.lock = threading.Lock()

    def generate(
        self, inputs: dict[str, torch.Tensor], max_new_tokens: int, sampling: dict, answer: Answer
    ) -> Iterator[int]:
        """The new tokens of one request, yielded as they are generated and kept in ``answer``."""
        from transformers.generation.streamers import BaseStreamer

        produced: queue.Queue = queue.Queue()

        class Collect(BaseStreamer):
            prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    produced.put(token)

            def end(self) -> None:
                """The end is signalled once the slot counts are read (in ``run``)."""

        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self.lock, torch.no_grad():
                    before = self.counter()
                    self.model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=self.pad_token_id,
                        streamer=Collect(),
                        **{"do_sample": False, **sampling},
                    )
                    answer.record(before, self.counter())
            except BaseException as error:  # handed to the request's thread, which raises it
                failure.append(error)
            finally:
                produced.put(None)  # after the counts: the request reads them next

        threading.Thread(target=run, daemon=True).start()
        while (token := produced.get()) is not None:
            answer.tokens.append(token)
            yield token
        if failure:
            raise failure[0]

    def close(self) -> None:
        """Nothing runs between requests."""


class BatchedGenerator:
    """transformers' continuous batching manager (text-only models): requests join and leave a
    shared batch between forwards. One thread routes its results to each request's queue."""

    def __init__(self, model: Any, eos_token_id: int | None, pad_token_id: int | None, counter: SlotCounter):
        from transformers import GenerationConfig

        self.counter = counter
        config = GenerationConfig(
            do_sample=False, max_new_tokens=256, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )
        self.manager = model.init_continuous_batching(generation_config=config)
        self.manager.start()
        self.waiting: dict[str, queue.Queue] = {}
        self.lock = threading.Lock()
        self.count = 0
        self.running = True
        self.router = threading.Thread(target=self._route, daemon=True)
        self.router.start()

    def _route(self) -> None:
        while self.running:
            result = self.manager.get_result(timeout=0.1)
            if result is not None:
                with self.lock:
                    waiting = self.waiting.get(result.request_id)
                if waiting is not None:
                    waiting.put(result)

    def generate(
        self, inputs: dict[str, torch.Tensor], max_new_tokens: int, sampling: dict, answer: Answer
    ) -> Iterator[int]:
        """As `SequentialGenerator.generate`; the slots are those of every forward made meanwhile."""
        if sampling:
            raise UsageError("continuous batching here answers greedily; leave temperature unset or 0")
        with self.lock:
            request_id = f"modes-{self.count}"
            self.count += 1
            self.waiting[request_id] = results = queue.Queue()
        before = self.counter()
        try:
            prompt = inputs["input_ids"][0].tolist()
            self.manager.add_request(
                prompt, request_id=request_id, max_new_tokens=max_new_tokens, streaming=True
            )
            sent = 0
            while True:
                result = results.get()
                if result.error:
                    raise RuntimeError(f"continuous batching failed: {result.error}")
                for token in result.generated_tokens[sent:]:  # each result holds every token so far
                    answer.tokens.append(token)
                    yield token
                sent = len(result.generated_tokens)
                if result.is_finished():
                    answer.record(before, self.counter())
                    return
        finally:
            with self.lock:
                del self.waiting[request_id]

    def close(self) -> None:
        self.running = False
        self.manager.stop(block=True, timeout=10)
