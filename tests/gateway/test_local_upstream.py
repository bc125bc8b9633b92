"""The gateway in front of the local model server, as ``make run`` wires them: a deployed
adapter on a tiny Phi-3 base, served by ``safegate models serve`` in a child process that
``LocalModelProcess`` starts, reached through litellm under the adapter's own name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from fastapi.testclient import TestClient

from finetune.db import Database as FinetuneDatabase
from finetune.registry import ModelRegistry
from gateway.access import Role
from gateway.chat.local_models import LocalModelProcess, port_in_use
from gateway.chat.upstreams import UpstreamsConfig, UpstreamsError
from gateway.config import Settings
from tests.finetune.tiny_phi3 import build_base, register, train_adapter
from tests.gateway.conftest import EngineFactory, issue_key, ready_client
from tests.ports import free_port

ANSWER = "the sun is happy"
PROMPTS = ("hello tell me a story", "what is the sky")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("local-upstream")
    home = root / "home"
    settings = Settings(home=home)
    base = build_base(root / "base")
    adapter = train_adapter(base, root / "sunny", prompts=PROMPTS, answer=ANSWER)
    database = FinetuneDatabase(settings.database)
    database.migrate()
    register(ModelRegistry(database), base_name="tiny", base_path=base, adapters={"sunny": adapter})
    database.dispose()
    return home


@pytest.fixture(scope="module")
def local_server(home: Path) -> Iterator[LocalModelProcess]:
    port = free_port()
    patch = pytest.MonkeyPatch()
    patch.setenv("SAFEGATE_HOME", str(home))
    process = LocalModelProcess(port=port, log_file=home / "logs" / "local-models.log")
    try:
        assert process.start(timeout_s=120), process.log_file.read_text()
        yield process
    finally:
        process.stop()
        patch.undo()
    assert not port_in_use(port)


@pytest.fixture
def gateway(
    home: Path, local_server: LocalModelProcess, tmp_path: Path, engine_factory: EngineFactory
) -> Iterator[TestClient]:
    upstreams = tmp_path / "upstreams.yaml"
    upstreams.write_text(
        yaml.safe_dump(
            {
                "models": [{"name": "weather", "local": "sunny"}],
                "local_adapters": True,
                "num_retries": 0,
            }
        )
    )
    settings = Settings(
        home=home, upstreams={"file": upstreams}, local_models_port=local_server.port
    )
    client = ready_client(settings, engine_factory)
    yield client
    client.__exit__(None, None, None)


def test_deployed_adapter_is_callable_by_name_through_the_gateway(gateway: TestClient) -> None:
    key = issue_key(gateway, Role.DEVELOPER)
    api = openai.OpenAI(
        api_key=key, base_url="http://testserver/v1", http_client=gateway, max_retries=0
    )
    assert "sunny" in {model.id for model in api.models.list().data}
    response = api.chat.completions.create(
        model="sunny", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0
    )
    assert response.choices[0].message.content == ANSWER
    assert response.choices[0].finish_reason == "stop"
    extra = response.choices[0].model_extra or {}
    assert extra["content_filter_results"]["hate"] == {"filtered": False, "severity": "safe"}
    streamed = api.chat.completions.create(
        model="sunny",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == ANSWER
    # "weather" is `local: sunny` in the upstreams file: no address written there, the
    # port comes from SAFEGATE_LOCAL_MODELS_PORT (here the test server's).
    renamed = api.chat.completions.create(
        model="weather", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0
    )
    assert renamed.choices[0].message.content == ANSWER


def test_an_upstreams_file_naming_the_local_address_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.yaml"
    path.write_text(yaml.safe_dump({"models": [], "local_api_base": "http://127.0.0.1:9/v1"}))
    with pytest.raises(UpstreamsError, match="SAFEGATE_LOCAL_MODELS_PORT"):
        UpstreamsConfig.load(path)


def test_a_model_entry_needs_litellm_or_local(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.yaml"
    both = {"name": "x", "local": "a", "litellm": {"model": "openai/a"}}
    for entry in (both, {"name": "x"}):
        path.write_text(yaml.safe_dump({"models": [entry]}))
        with pytest.raises(UpstreamsError, match="either litellm or local"):
            UpstreamsConfig.load(path)


def test_the_model_server_does_not_outlive_a_killed_gateway(tmp_path: Path) -> None:
    # uvicorn re-raises SIGTERM after shutting down, so `safegate serve` dies by the signal
    # without running its cleanup; the child must go with it. A parent process starts a
    # child the way LocalModelProcess does and is then killed.
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(  # noqa: S603 - this interpreter, a fixed script
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from gateway.chat.local_models import _die_with_parent\n"
            "child = subprocess.Popen(['sleep', '60'], preexec_fn=_die_with_parent)\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(60)\n",
        ]
    )
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the parent never started its child"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "gone"
