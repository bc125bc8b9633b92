"""What the gateway adds to a short chat request, and where litellm's share of it goes.

1. Through ``safegate serve`` (real engine, auth, audit) against a stub upstream that
   answers at once: p50 added at concurrency 1 (gateway minus direct), and requests per
   second at concurrency 16, non-streamed, a short prompt and answer.
2. In process, the same stub reached four ways, p50 per call: plain httpx, the openai
   client, ``litellm.acompletion`` and litellm's ``Router`` as the gateway configures it
   (``gateway.chat.upstreams.LitellmUpstreams``), so litellm's own cost is separated from the
   network's.

3. With ``--compare KEY=VALUE`` (repeatable), a second gateway runs with those
   environment settings beside the first; sequential requests alternate between the two
   and the concurrent runs go A, B, B, A, so both configurations share the machine's
   state and the difference between them is measured in one run.

Usage: .venv/bin/python bench/chat_overhead.py [--requests 200] [--concurrent 800]
       [--compare SAFEGATE_ENGINE__MAX_WAIT_S=0.002]
Run on an idle machine.
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
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvicorn
import yaml
from fastapi import FastAPI, Request

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parent.parent
QUESTION = "How do I reset my console?"
ANSWER = "Hold the power button for ten seconds, then wait for the start screen."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_stub() -> int:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> dict[str, object]:
        body = await request.json()
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24},
        }

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return port


def start_gateway(
    stub_port: int, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    home = Path(tempfile.mkdtemp())
    upstreams = home / "upstreams.yaml"
    model = {"model": "openai/stub", "api_base": f"http://127.0.0.1:{stub_port}/v1"}
    upstreams.write_text(
        yaml.safe_dump(
            {
                "models": [{"name": "stub", "litellm": {**model, "api_key": "stub"}}],
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
        "SAFEGATE_RATE_LIMIT__REQUESTS_PER_MINUTE": "1000000",
        **(extra_env or {}),
    }
    process = subprocess.Popen(  # noqa: S603 - our own CLI
        [str(ROOT / ".venv/bin/safegate"), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
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


BODY = {"model": "stub", "messages": [{"role": "user", "content": QUESTION}]}


def sequential_ms(base: str, headers: dict[str, str], count: int) -> list[float]:
    return interleaved_ms([(base, headers)], count)[0]


def interleaved_ms(targets: list[tuple[str, dict[str, str]]], count: int) -> list[list[float]]:
    """``count`` sequential requests to each target, taking turns request by request."""
    times: list[list[float]] = [[] for _ in targets]
    clients = [httpx.Client(base_url=b, headers=h, timeout=60) for b, h in targets]
    try:
        for _ in range(count):
            for client, out in zip(clients, times, strict=True):
                started = time.perf_counter()
                client.post("/v1/chat/completions", json=BODY).raise_for_status()
                out.append((time.perf_counter() - started) * 1000)
    finally:
        for client in clients:
            client.close()
    return times


async def concurrent_rps(base: str, headers: dict[str, str], count: int, width: int) -> float:
    limits = httpx.Limits(max_connections=width)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=120, limits=limits
    ) as client:
        gate = asyncio.Semaphore(width)

        async def one() -> None:
            async with gate:
                (await client.post("/v1/chat/completions", json=BODY)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        return count / (time.perf_counter() - started)


async def client_costs(stub_port: int, count: int) -> dict[str, float]:
    """p50 ms per call to the stub through each client, in this process."""
    import litellm
    import openai

    from gateway.chat.upstreams import LitellmUpstreams, UpstreamsConfig

    api_base = f"http://127.0.0.1:{stub_port}/v1"
    messages = [{"role": "user", "content": QUESTION}]
    config = UpstreamsConfig.model_validate(
        {
            "models": [
                {"name": "stub", "litellm": {"model": "openai/stub", "api_base": api_base,
                                              "api_key": "stub"}}
            ],
            "num_retries": 0,
            "local_adapters": False,
        }
    )  # fmt: skip
    upstreams = LitellmUpstreams(config)
    raw = httpx.AsyncClient(timeout=30)
    sdk = openai.AsyncOpenAI(base_url=api_base, api_key="stub")

    async def plain() -> None:
        body = {"model": "stub", "messages": messages}
        (await raw.post(f"{api_base}/chat/completions", json=body)).raise_for_status()

    async def via_sdk() -> None:
        await sdk.chat.completions.create(model="stub", messages=messages)  # type: ignore[arg-type]

    async def via_litellm() -> None:
        await litellm.acompletion(
            model="openai/stub", api_base=api_base, api_key="stub", messages=messages
        )

    async def via_router() -> None:
        await upstreams.complete("stub", messages)

    out: dict[str, float] = {}
    for name, call in (
        ("httpx", plain),
        ("openai_sdk", via_sdk),
        ("litellm_acompletion", via_litellm),
        ("gateway_router", via_router),
    ):
        for _ in range(10):
            await call()
        times = []
        for _ in range(count):
            started = time.perf_counter()
            await call()
            times.append((time.perf_counter() - started) * 1000)
        out[name] = round(statistics.median(times), 2)
    await raw.aclose()
    return out


def summary(times: list[float], direct: list[float], rps: float, width: int) -> dict[str, float]:
    return {
        "gateway_p50_ms": round(statistics.median(times), 2),
        "gateway_p99_ms": round(sorted(times)[int(len(times) * 0.99) - 1], 2),
        "added_p50_ms": round(statistics.median(times) - statistics.median(direct), 2),
        f"requests_per_s_at_{width}": round(rps, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=800)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    stub_port = start_stub()
    result: dict[str, object] = {"date": datetime.now(UTC).isoformat(timespec="minutes")}
    result["client_p50_ms"] = asyncio.run(client_costs(stub_port, args.requests))
    direct = sequential_ms(f"http://127.0.0.1:{stub_port}", {}, args.requests)
    result["direct_p50_ms"] = round(statistics.median(direct), 2)
    variants: dict[str, dict[str, str]] = {"baseline": {}}
    if args.compare:
        variants["compare"] = dict(item.split("=", 1) for item in args.compare)
    started = {name: start_gateway(stub_port, env) for name, env in variants.items()}
    try:
        targets = [(base, headers) for _, base, headers in started.values()]
        interleaved_ms(targets, 20)  # warm-up
        times = interleaved_ms(targets, args.requests)
        order = list(variants) + list(reversed(variants))
        half = args.concurrent // 2 if len(variants) > 1 else args.concurrent
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for name in order if len(variants) > 1 else list(variants):
            _, base, headers = started[name]
            rates[name].append(asyncio.run(concurrent_rps(base, headers, half, args.width)))
    finally:
        for process, _, _ in started.values():
            process.terminate()
            process.wait(timeout=30)
    for (name, env), sample in zip(variants.items(), times, strict=True):
        rps = statistics.mean(rates[name])
        result[name] = {"env": env, **summary(sample, direct, rps, args.width)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
