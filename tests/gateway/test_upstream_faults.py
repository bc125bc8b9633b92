"""Upstream faults: the whole call is bounded by ``timeout_s``, retries included, and a
malformed answer is a 502, streamed or not. Real sockets on 127.0.0.1 stand for the
broken upstreams (``silent_port`` is in conftest.py); litellm's Router talks to them as
it would to any OpenAI endpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from gateway.config import Settings
from tests.gateway.conftest import EngineFactory, ready_client

USER = {"role": "user", "content": "How do I reset my console?"}


class _Garbage(BaseHTTPRequestHandler):
    """Answers every POST with 200 and a body that is not an OpenAI answer."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b"<html>maintenance page</html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def garbage_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _client(
    tmp_path: Path, factory: EngineFactory, port: int, *, timeout_s: float, retries: int
) -> TestClient:
    path = tmp_path / "upstreams.yaml"
    upstreams = {
        "models": [
            {
                "name": "broken",
                "litellm": {
                    "model": "openai/broken",
                    "api_key": "k",
                    "api_base": f"http://127.0.0.1:{port}/v1",
                },
            }
        ],
        "timeout_s": timeout_s,
        "num_retries": retries,
        "local_adapters": False,
    }
    path.write_text(yaml.safe_dump(upstreams), encoding="utf-8")
    return ready_client(Settings(home=tmp_path / "home", upstreams={"file": path}), factory)


@pytest.mark.parametrize("stream", [False, True])
def test_timeout_bounds_the_whole_call_retries_included(
    tmp_path: Path, engine_factory: EngineFactory, silent_port: int, stream: bool
) -> None:
    client = _client(tmp_path, engine_factory, silent_port, timeout_s=1.0, retries=5)
    try:
        started = time.monotonic()
        response = client.post(
            "/v1/chat/completions", json={"model": "broken", "messages": [USER], "stream": stream}
        )
        elapsed = time.monotonic() - started
    finally:
        client.__exit__(None, None, None)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    # Six attempts of 1 s each would take 6 s or more; the bound is the one second asked
    # for, plus the prompt check and a margin for a loaded machine.
    assert elapsed < 3.5


@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_upstream_answer_is_a_502(
    tmp_path: Path, engine_factory: EngineFactory, garbage_port: int, stream: bool
) -> None:
    client = _client(tmp_path, engine_factory, garbage_port, timeout_s=5.0, retries=0)
    try:
        response = client.post(
            "/v1/chat/completions", json={"model": "broken", "messages": [USER], "stream": stream}
        )
    finally:
        client.__exit__(None, None, None)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_error"
    assert error["type"] == "upstream_error"
