"""`modes serve` on the bundled model, with and without a plan: tokens/s and time to first token.

    python benchmarks/serving.py [--plan docs/results/plan_88.json] [--rounds 3]

Two servers run in this process on 127.0.0.1 (one unskipped, one with the plan); only one is
asked at a time. Each round sends the same 32 chat completions (test-split questions with
their images, streamed, up to 8 new tokens) at concurrency 1 and 8, first to one server then
the other, alternating which goes first; time to first token is per request (median), tokens/s
is completion tokens over the batch's wall time. Ratios are plan over unskipped, medians over
the rounds.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import uvicorn

import modes
from modes.serving import build_app


def start(**options) -> tuple[uvicorn.Server, openai.OpenAI]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app, _ = build_app(**options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def message(sample) -> dict:
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": sample.question}, {"type": "image_url", "image_url": {"url": url}}]
    return {"role": "user", "content": content}


def one_request(client: openai.OpenAI, sample) -> tuple[float, int]:
    """(seconds to the first content chunk, completion chunks received)."""
    start, first, chunks = time.perf_counter(), None, 0
    stream = client.chat.completions.create(
        model="modes", messages=[message(sample)], max_tokens=8, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            chunks += 1
    return first or time.perf_counter() - start, chunks


def batch(client: openai.OpenAI, samples, concurrency: int) -> dict[str, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda s: one_request(client, s), samples))
    wall = time.perf_counter() - start
    return {
        "ttft_s": statistics.median(r[0] for r in results),
        "tokens_per_s": sum(r[1] for r in results) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="docs/results/plan_88.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/serving.json")
    args = parser.parse_args()
    samples = [s for s in modes.load_samples(split="test", limit=80) if s.image is not None][:32]
    servers = {"unskipped": start(), "plan": start(plan=args.plan)}
    for _, client in servers.values():
        batch(client, samples[:4], 2)  # warm-up
    runs = {c: {name: [] for name in servers} for c in (1, 8)}
    for round_number in range(args.rounds):
        for concurrency in runs:
            order = list(servers) if round_number % 2 == 0 else list(reversed(servers))
            for name in order:
                runs[concurrency][name].append(batch(servers[name][1], samples, concurrency))
    rows = []
    for concurrency, by_name in runs.items():
        row = {"concurrency": concurrency}
        for name, results in by_name.items():
            for key in ("ttft_s", "tokens_per_s"):
                row[f"{name}_{key}"] = statistics.median(r[key] for r in results)
        pairs = list(zip(by_name["unskipped"], by_name["plan"], strict=True))
        row["tokens_per_s_ratio"] = statistics.median(p["tokens_per_s"] / u["tokens_per_s"] for u, p in pairs)
        row["ttft_ratio"] = statistics.median(p["ttft_s"] / u["ttft_s"] for u, p in pairs)
        rows.append(row)
        print(
            f"concurrency {concurrency}: tokens/s {row['unskipped_tokens_per_s']:.1f} -> "
            f"{row['plan_tokens_per_s']:.1f} "
            f"({row['tokens_per_s_ratio']:.2f}x), TTFT {row['unskipped_ttft_s'] * 1e3:.0f} -> "
            f"{row['plan_ttft_s'] * 1e3:.0f} ms ({row['ttft_ratio']:.2f}x)"
        )
    Path(args.out).write_text(
        json.dumps({"plan": args.plan, "rounds": args.rounds, "rows": rows}, indent=2) + "\n"
    )
    for server, _ in servers.values():
        server.should_exit = True


if __name__ == "__main__":
    main()
