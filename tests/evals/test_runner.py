"""The runner: bounded concurrency, outputs stored as they complete, the call cache,
resuming an interrupted run, model errors recorded per example, and the run's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.cache import CallCache
from evals.errors import RunError
from evals.records import SCHEMA_VERSION, prompt_sha256, reference_sha256
from evals.runs import RunStatus, RunStore, load_runs, load_samples
from tests.evals.conftest import (
    QUESTIONS,
    FakeCaller,
    Killed,
    make_runner,
    qa_rows,
    write_jsonl,
    write_suite,
)


def test_a_run_records_its_suite_by_absolute_path(
    tmp_path: Path, store: RunStore, cache: CallCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given relative, as `safegate eval run evals/suites/smoke.yaml` gives it: the
    # dashboard, started elsewhere, still finds the suite to show each example's prompt.
    suite = write_suite(tmp_path)
    monkeypatch.chdir(suite.parent)
    (run,) = make_runner(store, cache, FakeCaller()).run(Path(suite.name))
    assert Path(run.suite_path) == suite.resolve()


def test_a_run_stores_outputs_metrics_and_versioned_files(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    caller = FakeCaller()
    (run,) = make_runner(store, cache, caller).run(write_suite(tmp_path))
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert sorted(caller.calls) == sorted(QUESTIONS)
    assert run.counts == {
        "samples": 6, "done": 6, "called": 6, "cached": 0, "errors": 0,
        "filtered_prompt": 0, "filtered_completion": 0,
    }  # fmt: skip
    exact = run.metrics["exact_match"]
    assert exact["value"] == 1.0  # the fake answers exactly the reference
    assert exact["direction"] == "higher"
    assert set(exact["per_sample"]) == {f"qa:q{n}" for n in range(1, 7)}

    folder = store.run_dir(run.id)
    raw = (folder / "run.json").read_text(encoding="utf-8")
    record = json.loads(raw)
    assert raw == json.dumps(record, sort_keys=True, indent=2) + "\n"  # sorted keys
    assert record["schema_version"] == SCHEMA_VERSION
    assert record["status"] == "succeeded"
    assert record["suite"]["name"] == "unit"
    assert record["config"]["model"]["identity"]["model"] == "openai/mock"
    assert "api_key" not in record["config"]["model"]["identity"]["params"]  # no secrets
    assert record["config"]["datasets"][0]["samples"] == 6
    lines = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"qa:q{n}" for n in range(1, 7)]  # dataset order
    first = lines[0]
    assert first["output"] == f"answer: {QUESTIONS[0]}"
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    assert first["prompt_sha256"] == prompt_sha256(messages)
    assert first["reference_sha256"] == reference_sha256(f"answer: {QUESTIONS[0]}")
    assert (folder / "report.md").read_text().startswith(f"# Eval run {run.id}")
    assert json.loads((folder / "report.json").read_text())["run"]["id"] == run.id


def test_a_rerun_of_an_unchanged_suite_makes_no_calls(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    suite = write_suite(tmp_path)
    (first,) = make_runner(store, cache, FakeCaller()).run(suite)
    forbidden = FakeCaller(forbid=True)  # raises if called
    (second,) = make_runner(store, cache, forbidden).run(suite)
    assert forbidden.calls == []
    assert second.status is RunStatus.SUCCEEDED, second.error
    assert second.id != first.id
    assert (second.counts["called"], second.counts["cached"]) == (0, 6)
    assert store.outputs(second.id)["qa:q1"].text == store.outputs(first.id)["qa:q1"].text
    assert second.metrics["exact_match"]["value"] == 1.0

    # a change in generation parameters is another call
    changed = write_suite(tmp_path, generation={"temperature": 0, "max_tokens": 33})
    caller = FakeCaller()
    make_runner(store, cache, caller).run(changed)
    assert len(caller.calls) == 6

    # --no-cache calls again (and refreshes the cache)
    caller = FakeCaller()
    (fresh,) = make_runner(store, cache, caller).run(suite, use_cache=False)
    assert len(caller.calls) == 6
    assert fresh.counts["cached"] == 0


def test_a_model_error_on_one_example_is_recorded_and_the_run_goes_on(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    suite = write_suite(tmp_path, max_error_rate=0.2)
    caller = FakeCaller(fail=[QUESTIONS[2]])
    (run,) = make_runner(store, cache, caller).run(suite)
    assert len(caller.calls) == 6  # every example was tried
    assert run.status is RunStatus.SUCCEEDED  # 1 of 6 is under max_error_rate 0.2
    outputs = store.outputs(run.id)
    assert outputs["qa:q3"].error == "RuntimeError: upstream exploded"
    assert outputs["qa:q3"].text is None
    assert all(outputs[f"qa:q{n}"].error is None for n in (1, 2, 4, 5, 6))
    assert run.counts["errors"] == 1
    assert run.metrics["exact_match"]["per_sample"]["qa:q3"] is None  # not applicable

    # errors are not cached: the next run calls only the failed example
    again = FakeCaller()
    (rerun,) = make_runner(store, cache, again).run(suite)
    assert again.calls == [QUESTIONS[2]]
    assert rerun.counts == {**rerun.counts, "called": 1, "cached": 5, "errors": 0}


def test_too_many_errors_fail_the_run_with_the_first_reason(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    (run,) = make_runner(store, cache, FakeCaller(fail=[QUESTIONS[0]])).run(write_suite(tmp_path))
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert run.error.startswith("1 of 6 calls failed (16.7% > max_error_rate 5.0%); first: ")
    assert run.metrics["exact_match"]["value"] == 1.0  # metrics are still there


def test_an_interrupted_run_resumes_calling_only_what_is_left(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    suite = write_suite(tmp_path, concurrency=1)
    with pytest.raises(Killed):
        make_runner(store, cache, FakeCaller(kill_after=2)).run(suite)
    (interrupted,) = store.list()
    assert interrupted.status is RunStatus.FAILED
    assert interrupted.error is not None
    assert f"--resume {interrupted.id}" in interrupted.error
    assert sorted(store.outputs(interrupted.id)) == ["qa:q1", "qa:q2"]  # stored as they came

    # resume, without the cache, to show the run itself knows what is done
    caller = FakeCaller()
    (resumed,) = make_runner(store, cache, caller).run(
        suite, resume=interrupted.id, use_cache=False
    )
    assert caller.calls == QUESTIONS[2:]
    assert resumed.id == interrupted.id
    assert resumed.status is RunStatus.SUCCEEDED, resumed.error
    assert len(store.outputs(resumed.id)) == 6
    assert [run.id for run in store.list()] == [interrupted.id]

    with pytest.raises(RunError, match="already succeeded"):
        make_runner(store, cache, FakeCaller()).run(suite, resume=resumed.id)


def test_a_concurrent_run_killed_midway_resumes_with_the_rest(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    rows = qa_rows([f"Question number {n}?" for n in range(40)])
    write_jsonl(tmp_path / "qa.jsonl", rows)
    suite = write_suite(tmp_path, concurrency=4)
    with pytest.raises(Killed):
        make_runner(store, cache, FakeCaller(kill_after=10, delay_s=0.001)).run(suite)
    (run,) = store.list()
    done = store.outputs(run.id)
    assert 0 < len(done) <= 10

    caller = FakeCaller()
    (resumed,) = make_runner(store, cache, caller).run(suite, resume=run.id, use_cache=False)
    prompts = {f"qa:{row['id']}": row["prompt"] for row in rows}
    assert sorted(caller.calls) == sorted(prompts[i] for i in prompts if i not in done)
    assert resumed.counts["done"] == 40


def test_resume_refuses_a_changed_dataset_and_unknown_runs(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    suite = write_suite(tmp_path)
    with pytest.raises(Killed):
        make_runner(store, cache, FakeCaller(kill_after=1)).run(suite)
    (run,) = store.list()
    write_jsonl(tmp_path / "qa.jsonl", qa_rows(QUESTIONS[:3]))
    with pytest.raises(RunError, match=r"datasets changed since it ran \(qa\)"):
        make_runner(store, cache, FakeCaller()).run(suite, resume=run.id)
    with pytest.raises(RunError, match="no run 'evrun-nope'"):
        make_runner(store, cache, FakeCaller()).run(suite, resume="evrun-nope")


def test_concurrency_is_bounded_and_identical_calls_are_made_once(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    questions = [f"Question {n}?" for n in range(12)]
    write_jsonl(tmp_path / "qa.jsonl", qa_rows([*questions, questions[0]]))  # one repeated
    caller = FakeCaller(delay_s=0.01)
    (run,) = make_runner(store, cache, caller).run(write_suite(tmp_path), concurrency=3)
    assert caller.max_in_flight == 3
    assert len(caller.calls) == 12  # 13 samples, 12 distinct calls
    assert run.counts["done"] == 13


def test_runs_and_samples_read_as_dataframes(
    tmp_path: Path, store: RunStore, cache: CallCache, eval_home: Path
) -> None:
    (run,) = make_runner(store, cache, FakeCaller(fail=[QUESTIONS[1]])).run(write_suite(tmp_path))
    runs = load_runs()
    assert list(runs.columns[:5]) == ["id", "suite", "model", "status", "created_at"]
    assert runs.loc[0, "id"] == run.id
    assert runs.loc[0, "metric.exact_match"] == 1.0
    assert str(runs["created_at"].dt.tz) == "UTC"
    samples = load_samples(run.id)
    assert list(samples["sample_id"]) == [f"qa:q{n}" for n in range(1, 7)]
    assert samples.loc[1, "error"] == "RuntimeError: upstream exploded"
    assert samples["latency_ms"].dtype.kind == "f"
    with pytest.raises(RunError):
        load_samples("evrun-missing")


@pytest.mark.postgres
def test_runs_on_postgresql(tmp_path: Path, postgres_url: str, eval_home: Path) -> None:
    from evals.db import Database

    database = Database(postgres_url)
    database.migrate()
    try:
        store = RunStore(database, runs_dir=eval_home / "evals")
        cache = CallCache(database)
        suite = write_suite(tmp_path)
        (run,) = make_runner(store, cache, FakeCaller()).run(suite)
        assert run.status is RunStatus.SUCCEEDED, run.error
        forbidden = FakeCaller(forbid=True)
        (again,) = make_runner(store, cache, forbidden).run(suite)
        assert again.counts["cached"] == 6
        assert load_runs(postgres_url).loc[0, "id"] == again.id
    finally:
        database.dispose()


def test_a_run_of_an_override_model_resumes_with_the_same_model(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    suite = write_suite(tmp_path, concurrency=1)
    with pytest.raises(Killed):
        make_runner(store, cache, FakeCaller(kill_after=3)).run(
            suite, model="litellm:openai/candidate"
        )
    (run,) = store.list()
    assert run.model == "openai/candidate"
    caller = FakeCaller()
    (resumed,) = make_runner(store, cache, caller).run(suite, resume=run.id)
    assert (resumed.id, resumed.model, resumed.status) == (run.id, run.model, RunStatus.SUCCEEDED)
    assert caller.calls == QUESTIONS[3:]
