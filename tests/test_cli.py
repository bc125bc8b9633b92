"""The root ``safegate`` command: it lists every command without importing the packages,
and each listed line is the command's own help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer._click.core import Context
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


def test_key_commands_import_neither_models_nor_the_web_stack() -> None:
    imported = _imported_after(["keys", "--help"])
    assert "gateway" in imported
    assert "torch" not in imported
    assert "transformers" not in imported
    assert "fastapi" not in imported


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["nope"])
    assert result.exit_code == 2
    assert "No such command 'nope'" in result.output


def test_commands_run_through_the_root() -> None:
    result = CliRunner().invoke(app, ["keys", "list", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage: root keys list" in result.output


def _run(*argv: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``safegate ARGV`` in a fresh interpreter, its output piped (not a terminal)."""
    environ = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "TERMINAL_WIDTH"}}
    environ["SAFEGATE_HOME"] = str(home)
    return subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", "from safegate.cli import main; main()", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )


def test_piped_help_shows_every_option_name_whole(tmp_path: Path) -> None:
    done = _run("finetune", "train", "--help", home=tmp_path)
    assert done.returncode == 0, done.stderr
    command = COMMANDS["finetune"].load("finetune")
    train = command.get_command(Context(command), "train")  # type: ignore[attr-defined]
    names = [name for param in train.params for name in param.opts if name.startswith("--")]
    assert len(names) > 10
    missing = [name for name in names if name not in done.stdout]
    assert missing == []


def test_piped_tables_keep_each_row_on_one_line(tmp_path: Path) -> None:
    name = "billing-integration-key-for-the-nightly-export-job-in-eu-west"
    created = _run("keys", "create", "--name", name, "--role", "developer", home=tmp_path)
    assert created.returncode == 0, created.stderr
    listed = _run("keys", "list", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if name in line]
    assert len(rows) == 1
    assert "developer" in rows[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["moderate", "--input", "{missing}", "--output", "{out}"],
        ["finetune", "validate", "{missing}"],
        ["safety", "train", "--data-dir", "{missing}"],
    ],
    ids=["moderate", "finetune-validate", "safety-train"],
)
def test_a_missing_file_is_a_usage_error_without_traceback(tmp_path: Path, argv: list[str]) -> None:
    missing, out = tmp_path / "nope.jsonl", tmp_path / "out.jsonl"
    args = [a.format(missing=missing, out=out) for a in argv]
    done = _run(*args, home=tmp_path / "home")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    assert "does not exist" in errors[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nope"], "Error: No such command 'nope'."),
        (["keys", "create", "--name", "x", "--role", "boss"], "Error: Invalid value for '--role'"),
        (["moderate", "--batch-size", "many", "hello"], "Error: Invalid value for '--batch-size'"),
    ],
    ids=["unknown-command", "bad-choice", "not-a-number"],
)
def test_a_usage_error_is_plain_lines_not_a_box(
    tmp_path: Path, argv: list[str], expected: str
) -> None:
    done = _run(*argv, home=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0].startswith("Usage: ")
    assert any(line.startswith(expected) for line in lines), done.stderr
    assert not set("│╭╰─") & set(done.stderr)
