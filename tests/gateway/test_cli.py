"""``safegate moderate`` on real text, single and from a JSONL file with a broken line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.config import get_settings
from safegate.cli import app


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SAFEGATE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_moderate_one_text_as_json(home: Path) -> None:
    result = CliRunner().invoke(
        app, ["moderate", "--json", "I will find you and beat you to death."]
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["flagged"] is True
    assert body["categories"]["harassment/threatening"] is True


def test_moderate_file_reports_bad_lines_by_number_and_keeps_the_rest(home: Path) -> None:
    source = home / "in.jsonl"
    source.write_text(
        "\ufeff"
        + json.dumps({"id": "a", "text": "What time does the museum open on Sundays?"})
        + "\n"
        + '{"text": "broken\n'
        + json.dumps({"text": 5})
        + "\n\n"
        + json.dumps({"id": 7, "text": "All immigrants are vermin and must be exterminated."})
        + "\n"
    )
    target = home / "out.jsonl"
    result = CliRunner().invoke(app, ["moderate", "--input", str(source), "--output", str(target)])
    assert result.exit_code == 1
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 5]
    assert records[0]["id"] == "a"
    assert records[0]["flagged"] is False
    assert records[1]["error"].startswith("line 2: not valid JSON")
    assert records[2]["error"] == 'line 3: expected an object with a string "text"'
    assert records[3]["id"] == "7"
    assert records[3]["categories"]["hate"] is True
    assert "text" not in records[3]  # results carry a hash of the text, not the text
    assert len(records[3]["text_sha256"]) == 64


def test_moderate_needs_text_or_input(home: Path) -> None:
    result = CliRunner().invoke(app, ["moderate"])
    assert result.exit_code == 2
