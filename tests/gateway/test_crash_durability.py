"""kill -9 right after a stream's ``[DONE]`` loses no audit record.

A real ``safegate serve`` process (real engine, SQLite under a fresh home), an upstream
that streams a completion turning hateful (litellm's ``mock_response``): the client reads
the stream to ``[DONE]``, the server is killed with SIGKILL at once, and the flagged
completion is found in the audit database or the spool that the next start drains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from sqlalchemy import create_engine, text

from tests.ports import free_port

HATE = "All Muslims are terrorists and should be thrown out of this country."
ANSWER = "To reset your console, hold the power button for ten seconds."
START_TIMEOUT_S = 180.0


def test_a_streamed_blocked_completion_survives_kill_9_after_done(tmp_path: Path) -> None:
    home = tmp_path / "home"
    upstreams = tmp_path / "upstreams.yaml"
    upstreams.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "rogue",
                        "litellm": {
                            "model": "openai/rogue",
                            "api_key": "k",
                            "mock_response": f"{ANSWER} {HATE}",
                        },
                    }
                ],
                "num_retries": 0,
                "local_adapters": False,
            }
        ),
        encoding="utf-8",
    )
    port = free_port()
    env = {
        **os.environ,
        "SAFEGATE_HOME": str(home),
        "SAFEGATE_UPSTREAMS__FILE": str(upstreams),
        "SAFEGATE_UPSTREAMS__SERVE_LOCAL": "false",
    }
    server = subprocess.Popen(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "safegate.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, "safegate serve exited during start-up"
            assert time.monotonic() < deadline, "safegate serve did not become ready"
            time.sleep(0.5)
        key = (home / "local-developer.key").read_text(encoding="utf-8").strip()
        body = {
            "model": "rogue",
            "stream": True,
            "messages": [{"role": "user", "content": "How do I reset my console?"}],
        }
        finishes: list[str] = []
        with httpx.stream(
            "POST",
            f"{base}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    server.send_signal(signal.SIGKILL)  # the moment the client hears [DONE]
                    break
                if line.startswith("data: "):
                    chunk = json.loads(line.removeprefix("data: "))
                    finishes += [
                        c["finish_reason"] for c in chunk.get("choices") or () if c["finish_reason"]
                    ]
        server.wait(timeout=30)
        assert finishes == ["content_filter"]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)

    engine = create_engine(f"sqlite:///{home}/safegate.db")
    with engine.connect() as connection:
        stored = connection.execute(
            text("SELECT direction FROM flagged_items WHERE request_id = :id"), {"id": request_id}
        ).all()
    engine.dispose()
    spool = home / "audit-spool" / "spool.jsonl"
    spooled = (
        [line for line in spool.read_text().splitlines() if request_id in line]
        if spool.exists()
        else []
    )
    assert ("completion",) in stored or spooled, "the flagged completion's record was lost"
