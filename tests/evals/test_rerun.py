"""An unchanged rerun reuses the earlier run's scores: no metric computes, nothing loads
(neither evaluate nor the safety engine); a changed output, reference, label or option
scores afresh. The hash each metric was scored on is kept in the run record."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from evals.cache import CallCache
from evals.metrics import quality, safety
from evals.metrics.base import metric_inputs_sha256
from evals.models import Completion
from evals.records import Output, Sample
from evals.runs import Run, RunStatus, RunStore
from tests.evals.conftest import QUESTIONS, FakeCaller, make_runner, write_suite

METRICS: list[Any] = ["exact_match", "rougeL", "harm_rate", "filter_rate"]


class OneOtherAnswer(FakeCaller):
    """Answers the last question otherwise than its reference."""

    async def complete(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
    ) -> Completion:
        completion = await super().complete(messages, params)
        if messages[-1]["content"] == QUESTIONS[-1]:
            return Completion("Look under the console.", "stop", None, None, 1.0)
        return completion


class CountingJudge:
    """Stands in for the engine at ``shared_judge``: nothing is harmful, nothing refused."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def judge(self, texts: Sequence[str]) -> list[safety.TextJudgement]:
        self.texts.extend(texts)
        return [safety.TextJudgement(severities={}, refusal=False) for _ in texts]


class Loads:
    """Counts what scoring loads: evaluate modules and the safety judge."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.modules: list[str] = []
        self.judges = 0
        self.judge = CountingJudge()
        load_module = quality.load_module

        def counting_module(module: str) -> Any:
            self.modules.append(module)
            return load_module(module)

        def counting_judge() -> CountingJudge:
            self.judges += 1
            return self.judge

        monkeypatch.setattr(quality, "load_module", counting_module)
        monkeypatch.setattr(safety, "shared_judge", counting_judge)

    def forbid(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def refuse(*args: object) -> Any:
            raise AssertionError("a metric loaded its machinery on an unchanged rerun")

        monkeypatch.setattr(quality, "load_module", refuse)
        monkeypatch.setattr(safety, "shared_judge", refuse)


def scores(run: Run) -> dict[str, Any]:
    """What a metric said, without where it was scored."""
    return {
        name: {key: value for key, value in record.items() if key != "reused_from"}
        for name, record in run.metrics.items()
    }


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Loads:
    return Loads(monkeypatch)


def test_an_unchanged_rerun_reuses_every_score_and_loads_nothing(
    tmp_path: Path,
    store: RunStore,
    cache: CallCache,
    loads: Loads,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    suite = write_suite(tmp_path, metrics=METRICS)
    (first,) = make_runner(store, cache, FakeCaller()).run(suite)
    assert first.status is RunStatus.SUCCEEDED, first.error
    assert loads.modules == ["exact_match", "rouge"]
    assert loads.judges == 1
    assert sorted(loads.judge.texts) == sorted(f"answer: {q}" for q in QUESTIONS)
    assert all(len(record["inputs_sha256"]) == 64 for record in first.metrics.values())
    assert not any("reused_from" in record for record in first.metrics.values())

    loads.forbid(monkeypatch)
    forbidden = FakeCaller(forbid=True)
    (second,) = make_runner(store, cache, forbidden).run(suite)
    assert second.status is RunStatus.SUCCEEDED, second.error
    assert forbidden.calls == []
    assert scores(second) == scores(first)
    assert second.metrics["rougeL"]["value"] == 1.0
    assert {record["reused_from"] for record in second.metrics.values()} == {first.id}

    # a third run points at the run that scored, not at the one that reused
    (third,) = make_runner(store, cache, FakeCaller(forbid=True)).run(suite)
    assert {record["reused_from"] for record in third.metrics.values()} == {first.id}
    assert store.get(third.id).metrics == third.metrics  # persisted as returned


def test_a_changed_output_or_option_scores_again(
    tmp_path: Path, store: RunStore, cache: CallCache, loads: Loads
) -> None:
    suite = write_suite(tmp_path, metrics=METRICS)
    (first,) = make_runner(store, cache, FakeCaller()).run(suite)

    # one output changes (a new revision of the model answers one question otherwise)
    model = {
        "name": "mock",
        "via": "litellm",
        "model": "openai/mock",
        "params": {"api_key": "k", "mock_response": "The console restarts."},
        "revision": "2",
    }
    suite = write_suite(tmp_path, metrics=METRICS, models=[model])
    loads.modules.clear()
    (changed,) = make_runner(store, cache, OneOtherAnswer()).run(suite)
    assert changed.status is RunStatus.SUCCEEDED, changed.error
    assert changed.metrics["exact_match"]["value"] == pytest.approx(5 / 6)
    assert loads.modules == ["exact_match", "rouge"]
    assert loads.judges == 2
    assert not any("reused_from" in record for record in changed.metrics.values())
    for name in ("exact_match", "rougeL", "harm_rate", "filter_rate"):
        assert changed.metrics[name]["inputs_sha256"] != first.metrics[name]["inputs_sha256"]

    # one metric's options change: that metric alone rescores
    loads.modules.clear()
    options = {"name": "exact_match", "options": {"ignore_case": False}}
    metrics = [options, "rougeL", "harm_rate", "filter_rate"]
    suite = write_suite(tmp_path, metrics=metrics, models=[model])
    (optioned,) = make_runner(store, cache, FakeCaller(forbid=True)).run(suite)
    assert optioned.status is RunStatus.SUCCEEDED, optioned.error
    assert loads.modules == ["exact_match"]
    assert "reused_from" not in optioned.metrics["exact_match"]
    assert {optioned.metrics[n].get("reused_from") for n in ("rougeL", "harm_rate")} == {changed.id}

    # --no-cache scores afresh as well as calling afresh
    loads.modules.clear()
    (fresh,) = make_runner(store, cache, FakeCaller()).run(suite, use_cache=False)
    assert loads.modules == ["exact_match", "rouge"]
    assert not any("reused_from" in record for record in fresh.metrics.values())


def test_a_failed_run_is_never_reused(
    tmp_path: Path, store: RunStore, cache: CallCache, loads: Loads
) -> None:
    suite = write_suite(tmp_path, metrics=["exact_match"], max_error_rate=0.0)
    (failed,) = make_runner(store, cache, FakeCaller(fail=[QUESTIONS[0]])).run(suite)
    assert failed.status is RunStatus.FAILED
    # the failed call is retried and answers now: different outputs, and a failed run anyway
    (again,) = make_runner(store, cache, FakeCaller()).run(suite)
    assert again.status is RunStatus.SUCCEEDED, again.error
    assert "reused_from" not in again.metrics["exact_match"]
    assert loads.modules == ["exact_match", "exact_match"]


def _sample(labels: dict[str, Any], reference: str | None = "yes") -> Sample:
    return Sample("d:1", "d", ({"role": "user", "content": "hi"},), reference, labels)


def _output(text: str | None, filtered: str | None = None) -> Output:
    return Output("d:1", text, "stop", filtered, None, 12.0, False, "p" * 64, None)


@pytest.mark.parametrize(
    ("sample", "output", "options"),
    [
        pytest.param(_sample({"harmful": False}), _output("yes"), {}, id="label"),
        pytest.param(_sample({"harmful": True}, "no"), _output("yes"), {}, id="reference"),
        pytest.param(_sample({"harmful": True}), _output("no"), {}, id="output text"),
        pytest.param(_sample({"harmful": True}), _output(None, "prompt"), {}, id="filtered"),
        pytest.param(_sample({"harmful": True}), _output("yes"), {"label": "x"}, id="options"),
    ],
)
def test_the_inputs_hash_covers_labels_references_outputs_and_options(
    sample: Sample, output: Output, options: dict[str, Any]
) -> None:
    base = metric_inputs_sha256("refusal_rate", {}, [_sample({"harmful": True})], [_output("yes")])
    assert metric_inputs_sha256("refusal_rate", options, [sample], [output]) != base
    # latency and whether the output came from the cache are not inputs
    cached = Output("d:1", "yes", "stop", None, None, 99.0, True, "p" * 64, None)
    assert metric_inputs_sha256("refusal_rate", {}, [_sample({"harmful": True})], [cached]) == base
