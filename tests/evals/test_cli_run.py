"""``safegate eval run|list|show`` through the root command, with litellm's
``mock_response`` as the model and a temporary SAFEGATE_HOME."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from safegate.cli import app
from tests.evals.conftest import write_suite

RUN_ID = re.compile(r"evrun-[0-9a-f]{12}")
DOWN = {
    "name": "down",
    "via": "litellm",
    "model": "openai/down",
    "params": {"api_key": "k", "api_base": "http://127.0.0.1:9/v1"},
    "max_retries": 0,
    "timeout_s": 5,
}


def safegate(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["eval", *args])
    return result.exit_code, result.stdout, result.stderr


def test_run_prints_the_run_id_alone_on_the_last_stdout_line(
    tmp_path: Path, eval_home: Path
) -> None:
    suite = write_suite(tmp_path)
    code, out, err = safegate("run", str(suite), "--model", "mock")
    assert code == 0, err
    run_id = out.splitlines()[-1]
    assert RUN_ID.fullmatch(run_id)
    assert out == run_id + "\n"  # RUN=$(safegate eval run ...) works
    assert f"succeeded {run_id}: 6 samples, 6 called, 0 cached, 0 errors" in err
    assert "exact_match = 0.0000" in err  # the mock answers something else
    assert (eval_home / "evals" / run_id / "run.json").is_file()

    code, out, err = safegate("run", str(suite), "--no-progress")
    assert code == 0, err
    assert "6 samples, 0 called, 6 cached" in err  # the rerun made no calls

    code, out, err = safegate("list", "--json")
    assert code == 0, err
    runs = json.loads(out)
    assert [set(item) for item in runs] == [{"id", "suite", "model", "created", "status"}] * 2
    assert runs[1]["id"] == run_id  # newest first
    assert (runs[1]["suite"], runs[1]["model"], runs[1]["status"]) == ("unit", "mock", "succeeded")

    code, out, err = safegate("show", run_id, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["id"] == run_id
    assert record["schema_version"] == 1
    assert record["metrics"]["exact_match"]["value"] == 0.0

    code, out, err = safegate("show", run_id)
    assert code == 0, err
    assert out.startswith(f"{run_id}  succeeded\n")
    assert "exact_match" in out

    code, out, err = safegate("list")
    assert code == 0
    assert run_id in out


def test_every_model_of_the_suite_runs_without_model(tmp_path: Path, eval_home: Path) -> None:
    mock = {
        "name": "mock",
        "via": "litellm",
        "model": "openai/m",
        "params": {"mock_response": "x", "api_key": "k"},
    }
    other = {**mock, "name": "other"}
    code, out, err = safegate("run", str(write_suite(tmp_path, models=[mock, other])))
    assert code == 0, err
    ids = out.splitlines()
    assert len(ids) == 2
    assert all(RUN_ID.fullmatch(line) for line in ids)
    code, out, _ = safegate("list", "--json")
    assert sorted(item["model"] for item in json.loads(out)) == ["mock", "other"]


def test_usage_errors_exit_2_before_any_call(tmp_path: Path, eval_home: Path) -> None:
    missing = write_suite(tmp_path, datasets=[{"name": "qa", "path": "nope.jsonl"}])
    code, out, err = safegate("run", str(missing))
    assert code == 2
    assert out == ""
    assert "suite.yaml: datasets[0].path: file not found" in err
    assert "Traceback" not in err

    code, out, err = safegate("run", str(write_suite(tmp_path)), "--model", "gpt-5")
    assert code == 2
    assert "--model: unknown model 'gpt-5'" in err

    code, _, err = safegate("run", str(tmp_path / "absent.yaml"))
    assert code == 2
    assert "absent.yaml: file not found" in err

    code, _, err = safegate("run", str(write_suite(tmp_path)), "--concurrency", "0")
    assert code == 2  # typer's own usage error

    code, _, err = safegate("show", "evrun-000000000000")
    assert code == 2
    assert "no run 'evrun-000000000000'" in err

    code, out, _ = safegate("list", "--json")
    assert json.loads(out) == []


def test_a_failed_run_exits_1_and_still_prints_its_id(tmp_path: Path, eval_home: Path) -> None:
    code, out, err = safegate("run", str(write_suite(tmp_path, models=[DOWN])), "--no-progress")
    assert code == 1
    run_id = out.splitlines()[-1]
    assert RUN_ID.fullmatch(run_id)
    assert f"failed {run_id}: 6 samples, 6 called, 0 cached, 6 errors" in err
    assert "6 of 6 calls failed" in err
    code, out, _ = safegate("show", run_id, "--json")
    record = json.loads(out)
    assert record["status"] == "failed"
    assert record["counts"]["errors"] == 6
