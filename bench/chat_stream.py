"""What the chat gateway's filtering costs: time to first token and total time, streamed
and not, through ``safegate serve`` versus straight to the upstream.

The upstream is a stub OpenAI server in this process that sends a fixed benign answer
one token (~4 characters) every ``--token-ms`` milliseconds, like a model generating at
that speed. The gateway runs as ``safegate serve`` (real engine, auth on, the key it
makes on a first start) with the stub as its only model, once per stream window size.

Usage: .venv/bin/python bench/chat_stream.py [--requests 30] [--token-ms 20]
       [--windows 160] [--increments 10000,96,48,24,12,1]

``--increments`` sets SAFEGATE_CHAT__STREAM_INCREMENT_CHARS per run (10000 releases whole
sentences, as before word increments).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

ROOT = Path(__file__).resolve().parent.parent
ANSWER = (
    "To reset your console, hold the power button for ten seconds until the light blinks "
    "twice, then release it and wait for the start screen. Your saved games stay on the "
    "internal storage, so nothing is lost. If the light stays orange, unplug the power "
    "cable for a minute and try again. When the console starts, open Settings, choose "
    "System, then Updates, and install any update it offers before you play again."
)
QUESTION = "How do I reset my console?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stub_app(token_s: float) -> FastAPI:
    app = FastAPI()
    pieces = [ANSWER[i : i + 4] for i in range(0, len(ANSWER), 4)]

    @app.post("/v1/chat/completions", response_model=None)
    async def complete(request: Request) -> Response:
        body = await request.json()
        head = {"id": "chatcmpl-stub", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            await asyncio.sleep(token_s * len(pieces))
            return JSONResponse(
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": ANSWER},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 8,
                        "completion_tokens": len(pieces),
                        "total_tokens": 8 + len(pieces),
                    },
                }
            )

        async def events() -> AsyncIterator[bytes]:
            for piece in pieces:
                await asyncio.sleep(token_s)
                chunk = {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            done = {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            yield f"data: {json.dumps(done)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def start_stub(token_s: float) -> int:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub_app(token_s), port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return port


def measure(base: str, headers: dict[str, str], requests: int) -> dict[str, float]:
    body = {"model": "stub", "messages": [{"role": "user", "content": QUESTION}]}
    ttft: list[float] = []
    stream_total: list[float] = []
    plain: list[float] = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for _ in range(requests):
            started = time.perf_counter()
            first = None
            text = ""
            with client.stream(
                "POST", "/v1/chat/completions", json={**body, "stream": True}
            ) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    for choice in chunk.get("choices") or ():
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            first = first or time.perf_counter()
                            text += piece
            if text != ANSWER:
                raise RuntimeError("the stream did not carry the whole answer")
            if first is None:
                raise RuntimeError("no content arrived")
            ttft.append((first - started) * 1000)
            stream_total.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            client.post("/v1/chat/completions", json=body).raise_for_status()
            plain.append((time.perf_counter() - started) * 1000)
    return {
        "ttft_p50_ms": round(statistics.median(ttft), 1),
        "stream_total_p50_ms": round(statistics.median(stream_total), 1),
        "non_stream_p50_ms": round(statistics.median(plain), 1),
    }


def gateway(
    stub_port: int, window: int, increment: int
) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    home = Path(tempfile.mkdtemp())
    upstreams = home / "upstreams.yaml"
    upstreams.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "stub",
                        "litellm": {
                            "model": "openai/stub",
                            "api_base": f"http://127.0.0.1:{stub_port}/v1",
                            "api_key": "stub",
                        },
                    }
                ],
                "local_adapters": False,
                "num_retries": 0,
            }
        )
    )
    port = free_port()
    env = {
        **os.environ,
        "SAFEGATE_HOME": str(home),
        "SAFEGATE_UPSTREAMS__FILE": str(upstreams),
        "SAFEGATE_UPSTREAMS__SERVE_LOCAL": "false",
        "SAFEGATE_CHAT__STREAM_WINDOW_CHARS": str(window),
        "SAFEGATE_CHAT__STREAM_OVERLAP_CHARS": str(window),
        "SAFEGATE_CHAT__STREAM_INCREMENT_CHARS": str(increment),
        "SAFEGATE_RATE_LIMIT__REQUESTS_PER_MINUTE": "100000",
    }
    process = subprocess.Popen(  # noqa: S603 - our own CLI
        [str(ROOT / ".venv/bin/safegate"), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    else:
        process.terminate()
        raise RuntimeError("safegate serve did not become ready")
    key = (home / "local-developer.key").read_text(encoding="utf-8").strip()
    return process, base, {"Authorization": f"Bearer {key}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--windows", default="160")
    parser.add_argument("--increments", default="24")
    args = parser.parse_args()
    stub_port = start_stub(args.token_ms / 1000)
    results: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "token_ms": args.token_ms,
        "answer_chars": len(ANSWER),
        "requests": args.requests,
    }
    direct = measure(f"http://127.0.0.1:{stub_port}", {}, args.requests)
    results["direct"] = direct
    runs = [(int(w), int(i)) for w in args.windows.split(",") for i in args.increments.split(",")]
    for window, increment in runs:
        process, base, headers = gateway(stub_port, window, increment)
        try:
            measure(base, headers, 3)  # warm-up
            via = measure(base, headers, args.requests)
        finally:
            process.terminate()
            process.wait(timeout=30)
        via["added_ttft_ms"] = round(via["ttft_p50_ms"] - direct["ttft_p50_ms"], 1)
        via["added_non_stream_ms"] = round(
            via["non_stream_p50_ms"] - direct["non_stream_p50_ms"], 1
        )
        results[f"gateway_window_{window}_increment_{increment}"] = via
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
