"""`modes serve` answers the real `openai` client on 127.0.0.1: text and image requests equal
`generate()` run alone with the same plan, thresholds 0 equal the unskipped server, skip
statistics are readable, a bounded load loses nothing, bad requests get a 4xx and the server
keeps serving, and continuous batching (text-only MoE models) gives the sequential answers."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import modes

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from modes.evaluation.evaluate import generate_answers  # noqa: E402
from modes.serving import build_app  # noqa: E402
from plans import uniform_plan  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A `modes serve` app on 127.0.0.1, in a thread, stopped at the end."""

    def __init__(self, **options):
        self.port = free_port()
        self.app, self.manager = build_app(**options)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0
        )

    def ask(self, sample, **extra) -> str:
        response = self.client.chat.completions.create(
            model="modes", messages=[message(sample)], max_tokens=4, **extra
        )
        return response.choices[0].message.content.strip()

    def post(self, body: bytes | dict, path: str = "/v1/chat/completions") -> tuple[int, dict, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read() or b"{}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def message(sample) -> dict:
    if sample.image is None:
        return {"role": "user", "content": sample.question}
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"role": "user", "content": [{"type": "text", "text": sample.question},
                                         {"type": "image_url", "image_url": {"url": url}}]}  # fmt: skip


@pytest.fixture(scope="module")
def samples():
    return modes.load_samples(split="test", limit=24)


@pytest.fixture(scope="module")
def plan_path(bundled, tmp_path_factory):
    model, processor = bundled
    plan = uniform_plan(model, 0.012, processor.tokenizer.all_special_ids)
    return plan.save(tmp_path_factory.mktemp("plan") / "plan.json")


@pytest.fixture(scope="module")
def server(plan_path):
    running = Server(plan=plan_path)
    yield running
    running.stop()


def alone(bundled, plan, samples) -> dict[str, str]:
    """Each sample through generate() on its own, the plan applied."""
    model, processor = bundled
    with modes.applied(model, plan):
        return {
            s.id: generate_answers(model, processor, [s], batch_size=1, progress=False)[s.id] for s in samples
        }


def test_text_and_image_answers_equal_generate_alone(server, bundled, plan_path, samples):
    expected = alone(bundled, modes.SkipPlan.load(plan_path), samples[:8])
    got = {s.id: server.ask(s) for s in samples[:8]}
    assert got == expected
    assert {s.image is None for s in samples[:8]} == {True, False}  # both kinds asked


def test_skip_statistics_per_response_and_cumulative(server, samples):
    status, headers, _body = server.post(
        {"model": "modes", "messages": [message(samples[20])], "max_tokens": 4}
    )
    assert status == 200 and 0 < float(headers["x-modes-skip-ratio"]) < 1, (
        headers,
        server.get("/v1/modes/stats")["skipped_slots"],
    )
    stats = server.get("/v1/modes/stats")
    assert 0 < stats["ratio"] < 1 and stats["skipped_slots"] > 0 and "per_modality" in stats


def test_bounded_load_loses_nothing(server, bundled, plan_path, samples):
    expected = alone(bundled, modes.SkipPlan.load(plan_path), samples)
    jobs = [samples[(client * 8 + request) % len(samples)] for client in range(16) for request in range(8)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(server.ask, jobs))
    assert len(answers) == 16 * 8
    assert answers == [expected[s.id] for s in jobs]


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, samples):
    not_an_image = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    broken_image = {"role": "user", "content": [{"type": "text", "text": "what color ?"},
                    {"type": "image_url", "image_url": {"url": not_an_image}}]}  # fmt: skip
    cases = [
        {"model": "modes", "messages": [broken_image], "max_tokens": 2},
        {"model": "modes", "messages": [{"role": "user", "content": "red " * 5000}], "max_tokens": 2},
        {"model": "no-such-model", "messages": [message(samples[0])], "max_tokens": 2},
        b"{not json",
    ]
    reasons = ["the image cannot be decoded", "this model reads at most 512", "no-such-model", "JSON"]
    for body, reason in zip(cases, reasons, strict=True):
        status, _, payload = server.post(body)
        assert 400 <= status < 500, (status, payload)
        assert reason in json.dumps(payload), payload
    assert server.ask(samples[0])  # still serving


def test_zero_thresholds_serve_the_unskipped_answers(bundled, samples, tmp_path):
    zero = uniform_plan(bundled[0], 0.0).save(tmp_path / "zero.json")
    skipping, plain = Server(plan=zero), Server()
    try:
        assert [skipping.ask(s) for s in samples[:6]] == [plain.ask(s) for s in samples[:6]]
    finally:
        skipping.stop()
        plain.stop()


def test_continuous_batching_gives_the_sequential_answers(bundled, tmp_path):
    """transformers serves VLMs sequentially; continuous batching runs text-only MoE models."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = bundled[1].tokenizer
    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=8, num_experts_per_tok=4,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    info = modes.model_info(model)
    plan = modes.SkipPlan({layer: {"text": 0.5} for layer in info.moe_layers}, {"text": 0.1}, model=info)
    questions = [modes.Sample(f"q{i}", f"what is {i} plus {i + 1} ?", "", "arithmetic") for i in range(6)]
    batched, sequential = (Server(model=str(tmp_path / "model"), plan=plan.save(tmp_path / f"p{cb}.json"),
                                  continuous_batching=cb) for cb in (True, False))  # fmt: skip
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            together = list(pool.map(batched.ask, questions))
        assert together == [sequential.ask(q) for q in questions]
        packed, alone = batched.get("/v1/modes/stats"), sequential.get("/v1/modes/stats")
        assert 0 < packed["ratio"] < 1
        assert packed["per_modality"] == alone["per_modality"]  # the same skip decisions, token by token
    finally:
        batched.stop()
        sequential.stop()


def test_streamed_answers_equal_whole_ones(server, samples):
    for sample in samples[:4]:
        stream = server.client.chat.completions.create(
            model="modes", messages=[message(sample)], max_tokens=4, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed.strip() == server.ask(sample)
