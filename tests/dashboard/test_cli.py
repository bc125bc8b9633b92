"""``safegate dashboard``: prepares the home (tables, the first reviewer key) and starts
Streamlit on 127.0.0.1 with the right options; the Streamlit process is replaced at the
``subprocess.call`` seam."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dashboard import cli
from dashboard.access import sign_in
from gateway.auth import Role
from safegate.cli import app
from tests.dashboard.conftest import open_stores


def test_safegate_dashboard_starts_streamlit_over_the_same_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("SAFEGATE_HOME", str(home))
    monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
    started: list[list[str]] = []

    def call(command: list[str]) -> int:
        started.append(command)
        return 0

    monkeypatch.setattr(cli.subprocess, "call", call)
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
