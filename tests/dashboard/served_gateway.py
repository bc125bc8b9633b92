"""A real gateway over HTTP for the playground's tests: ``gateway.app.create_app`` served by
uvicorn on a loopback port, over the dashboard's seeded home (one database), with the real
engine's members (loaded once per session, ``tests.gateway.conftest``) and upstreams
replaced at their seam, litellm's ``mock_response``.

Models: ``support`` answers :data:`ANSWER`; ``hateful`` answers :data:`HATE`, a completion
the filter withholds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from gateway.app import create_app
from gateway.config import Settings
from tests.dashboard.seed import Seeded
from tests.gateway.conftest import EngineFactory
from tests.ports import free_port

ANSWER = "To reset your console hold the power button for ten seconds and wait for the light"
HATE = "All Muslims are terrorists and should be thrown out of this country."
QUESTION = "How do I reset my console?"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ServedGateway:
    url: str
    home: Path


def upstreams_file(folder: Path) -> Path:
    config = {
        "models": [
            {
                "name": name,
                "litellm": {"model": f"openai/{name}", "api_key": "k", "mock_response": answer},
            }
            for name, answer in (("support", ANSWER), ("hateful", HATE))
        ],
        "num_retries": 0,
        "timeout_s": 10,
        "local_adapters": False,
    }
    path = folder / "upstreams.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def served_gateway(
    fresh: Seeded, tmp_path: Path, engine_factory: EngineFactory
) -> Iterator[ServedGateway]:
    """The gateway on 127.0.0.1 over ``fresh``'s home, ready (engine loaded)."""
    port = free_port()
    settings = Settings(home=fresh.home, port=port, upstreams={"file": upstreams_file(tmp_path)})
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, engine_factory=engine_factory),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if not thread.is_alive():
                raise AssertionError("the gateway stopped before it was ready")
            if time.monotonic() > deadline:
                raise AssertionError("the gateway was not ready in time")
            time.sleep(0.2)
        yield ServedGateway(url=url, home=fresh.home)
    finally:
        server.should_exit = True
        thread.join(timeout=STOP_TIMEOUT_S)
