"""``safegate dashboard``: prepares the home (tables, the first reviewer key) and starts
Streamlit on 127.0.0.1 with the right options (Streamlit replaced at the ``become`` seam);
and, for real, stops with no Streamlit left behind on SIGTERM or SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from dashboard import cli
from dashboard.access import sign_in
from gateway.access import Role
from gateway.chat.local_models import port_in_use
from safegate.cli import app
from tests.dashboard.conftest import open_stores
from tests.ports import free_port


def test_safegate_dashboard_starts_streamlit_over_the_same_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("SAFEGATE_HOME", str(home))
    monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
    started: list[list[str]] = []

    def become(command: list[str]) -> None:
        started.append(command)

    monkeypatch.setattr(cli, "become", become)
    result = CliRunner().invoke(app, ["dashboard", "--port", "8765"])
    assert result.exit_code == 0, result.output

    [command] = started
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", str(cli.APP)]
    options = dict(zip(command[5::2], command[6::2], strict=True))
    assert options["--server.address"] == "127.0.0.1"
    assert options["--server.port"] == "8765"
    assert options["--browser.gatherUsageStats"] == "false"
    assert options["--server.headless"] == "true"
    assert "safegate dashboard on http://127.0.0.1:8765" in result.output

    key_file = home / "local-reviewer.key"
    key = key_file.read_text().strip()
    assert f"created a reviewer API key (saved to {key_file}" in " ".join(result.output.split())
    assert key in result.output
    stores = open_stores(home)
    try:
        assert sign_in(stores.keys, key).role is Role.REVIEWER
    finally:
        stores.close()

    again = CliRunner().invoke(app, ["dashboard"])
    assert again.exit_code == 0
    assert f"sign in with the reviewer key in {key_file}" in " ".join(again.output.split())
    assert key not in again.output  # shown once, when it was made
    assert dict(zip(started[1][5::2], started[1][6::2], strict=True))["--server.port"] == "8501"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_dashboard_leaves_no_streamlit_behind(
    tmp_path: Path, stop: signal.Signals
) -> None:
    port = free_port()
    environ = {**os.environ, "SAFEGATE_HOME": str(tmp_path / "home")}
    environ.pop("SAFEGATE_DATABASE_URL", None)
    dashboard = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-c", "from safegate.cli import main; main()", "dashboard",
         "--port", str(port)],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Streamlit binds its port, then starts uvicorn and its runtime, and only then
        # installs its SIGINT and SIGTERM handlers: a SIGINT in that gap meets Python's
        # default handler, a KeyboardInterrupt that left the process hanging once on a
        # loaded machine (Streamlit's own start-up race, not safegate's). The dashboard
        # counts as running when it answers its health check, which narrows the gap to
        # a few turns of its event loop.
        deadline = time.monotonic() + 120
        while not _healthy(port):
            assert dashboard.poll() is None, "the dashboard exited before serving"
            assert time.monotonic() < deadline, "the dashboard did not start serving"
            time.sleep(0.2)
        dashboard.send_signal(stop)
        dashboard.wait(timeout=30)
        deadline = time.monotonic() + 10
        while port_in_use(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not port_in_use(port), "something still serves the dashboard's port"
    finally:
        if dashboard.poll() is None:
            dashboard.kill()
            dashboard.wait()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
