"""The root ``safegate`` command: it lists every command without importing the packages,
and each listed line is the command's own help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from safegate.cli import COMMANDS, app

PACKAGES = ("gateway", "finetune", "evals", "dashboard", "torch", "transformers", "fastapi")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_listed_help_is_the_commands_own(name: str) -> None:
    command = COMMANDS[name].load(name)
    own = (command.help or "").strip().split("\n\n")[0].replace("\n", " ")
    assert COMMANDS[name].help == own
    assert command.name == name


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name, entry in COMMANDS.items():
        assert name in result.output
        assert entry.help in result.output


def _imported_after(argv: list[str]) -> list[str]:
    """The project's and heavy packages a fresh interpreter imported to run ``argv``."""
    script = (
        "import json, sys\n"
        "from safegate.cli import app\n"
        "try:\n"
        f"    app({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"names = {{m.split('.')[0] for m in sys.modules}} & set({PACKAGES!r})\n"
        "print(json.dumps(sorted(names)))\n"
    )
    done = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    imported: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return imported


def test_root_help_imports_no_package() -> None:
    assert _imported_after(["--help"]) == []


def test_key_commands_import_neither_torch_nor_transformers() -> None:
    imported = _imported_after(["keys", "--help"])
    assert "gateway" in imported
    assert "torch" not in imported
    assert "transformers" not in imported


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["nope"])
    assert result.exit_code == 2
    assert "No such command 'nope'" in result.output


def test_commands_run_through_the_root() -> None:
    result = CliRunner().invoke(app, ["keys", "list", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage: root keys list" in result.output
