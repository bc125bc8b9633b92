"""The dashboard's data functions, without Streamlit: sign-in rules, the review actions and
their permissions, loss curves from results.csv, traffic aggregates, comparison tables."""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from dashboard import access, comparison, review, traffic, training
from dashboard.stores import Stores
from evals.metrics.safety import TextJudgement
from gateway.access import Principal, Role
from gateway.audit import ReviewLabel, ReviewState
from gateway.errors import Forbidden, InvalidRequest, NotFound
from gateway.safety.taxonomy import AzureCategory, Severity
from tests.dashboard.seed import Seeded, results_rows

StoresOf = Callable[[Path], Stores]


def principal(role: Role, key_id: str = "key_test") -> Principal:
    return Principal(key_id=key_id, name="test", role=role, policy=None, rate_limit_rpm=None)


# -- access ------------------------------------------------------------------------------


def test_sign_in_takes_reviewer_and_admin_keys_only(seeded: Seeded, stores_of: StoresOf) -> None:
    keys = stores_of(seeded.home).keys
    assert access.sign_in(keys, seeded.reviewer_key).key_id == seeded.reviewer_id
    assert access.sign_in(keys, f"  {seeded.admin_key}\n").role is Role.ADMIN
    with pytest.raises(access.SignInError, match="this is a developer key"):
        access.sign_in(keys, seeded.developer_key)
    with pytest.raises(access.SignInError, match="revoked"):
        access.sign_in(keys, seeded.revoked_key)
    with pytest.raises(access.SignInError, match="enter a reviewer or admin API key"):
        access.sign_in(keys, "   ")


def test_the_first_start_makes_a_private_reviewer_key_once(
    empty_home: Path, stores_of: StoresOf
) -> None:
    stores = stores_of(empty_home)
    made = access.ensure_reviewer_key(stores.keys, empty_home)
    assert made is not None
    assert made.created is not None
    assert made.path == empty_home / "local-reviewer.key"
    assert made.path.read_text().strip() == made.created
    assert stat.S_IMODE(made.path.stat().st_mode) == 0o600
    assert access.sign_in(stores.keys, made.created).role is Role.REVIEWER

    again = access.ensure_reviewer_key(stores.keys, empty_home)
    assert again == access.LocalKey(path=made.path, created=None)
    assert len(stores.keys.list()) == 1


def test_no_key_is_made_behind_an_admins_back(seeded: Seeded, stores_of: StoresOf) -> None:
    stores = stores_of(seeded.home)
    before = len(stores.keys.list())
    assert access.ensure_reviewer_key(stores.keys, seeded.home) is None
    assert len(stores.keys.list()) == before


def test_outside_text_cannot_become_markdown() -> None:
    from dashboard.session import plain

    assert plain("![x](http://evil.example/p.png) <img src=x> `code` *bold*") == (
        "\\!\\[x\\](http://evil.example/p.png) \\<img src=x\\> \\`code\\` \\*bold\\*"
    )
    assert plain("support-v2 (evrun-1) harm_rate") == "support-v2 (evrun-1) harm_rate"


# -- review ------------------------------------------------------------------------------


def test_labels_need_a_reviewer_and_record_its_key_id(fresh: Seeded, stores_of: StoresOf) -> None:
    audit = stores_of(fresh.home).audit
    ids = [item.id for item in fresh.items[:3]]
    with pytest.raises(Forbidden):
        review.label_items(
            audit, ids, label="true_positive", note=None, principal=principal(Role.DEVELOPER)
        )
    count = review.label_items(
        audit, ids, label="true_positive", note="  ", principal=principal(Role.REVIEWER, "key_r")
    )
    assert count == 3
    for item_id in ids:
        stored = audit.get_item(item_id)
        assert (stored.review_state, stored.reviewer_key_id) == (ReviewState.TRUE_POSITIVE, "key_r")
        assert stored.review_note is None  # a blank note is no note
    with pytest.raises(NotFound, match="nothing was labelled"):
        review.label_items(
            audit, [ids[0], "missing"], label="false_positive", note=None,
            principal=principal(Role.ADMIN),
        )  # fmt: skip
    assert audit.get_item(ids[0]).review_state is ReviewState.TRUE_POSITIVE

    lines = review.export_jsonl(audit, ReviewLabel.TRUE_POSITIVE).splitlines()
    exported = [json.loads(line) for line in lines]
    assert [line["id"] for line in exported] == sorted(
        ids, key=lambda i: audit.get_item(i).item.created_at
    )  # oldest first
    assert review.export_jsonl(audit, "false_positive") == ""


def test_a_blocklist_term_must_occur_in_the_item_and_needs_an_admin(
    fresh: Seeded, stores_of: StoresOf
) -> None:
    stores = stores_of(fresh.home)
    item = next(item for item in fresh.items if "Falcon" in item.text)
    add = {"blocklist": "launches", "principal": principal(Role.ADMIN)}
    with pytest.raises(Forbidden):
        review.add_to_blocklist(
            stores.audit, stores.blocklists, item.id, blocklist="launches", term="falcon",
            principal=principal(Role.REVIEWER),
        )  # fmt: skip
    with pytest.raises(InvalidRequest, match="does not occur"):
        review.add_to_blocklist(stores.audit, stores.blocklists, item.id, term="eagle", **add)
    first = review.add_to_blocklist(
        stores.audit, stores.blocklists, item.id, term=" project FALCON ", **add
    )
    assert (first.created, first.entry.value) == (True, "project FALCON")
    second = review.add_to_blocklist(
        stores.audit, stores.blocklists, item.id, term=r"launch\s+date", kind="regex", **add
    )
    assert second.created is False
    assert [entry.value for entry in stores.blocklists.get("launches").items] == [
        "project FALCON",
        r"launch\s+date",
    ]


def test_item_scores_are_sorted_and_mark_the_flagged_labels(seeded: Seeded) -> None:
    from gateway.audit import StoredItem

    item = next(item for item in seeded.items if "vermin" in item.text)
    stored = StoredItem(item, "", item.max_severity, ReviewState.UNREVIEWED, None, None, None)
    scores = review.item_scores(stored)
    assert list(scores["label"][:2]) == ["hate", "hate/threatening"]
    assert list(scores["flagged"][:3]) == [True, True, False]
    assert len(scores) == 18
    severities = review.item_severities(stored)
    assert severities.set_index("category").loc["hate", "level"] == "high"


# -- training ----------------------------------------------------------------------------


def test_loss_curves_per_step_and_per_epoch(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    pd.DataFrame(results_rows()).to_csv(path, index=False)
    results = training.read_results(path)
    steps = training.loss_per_step(results)
    train = steps[steps["series"] == "training"]
    assert list(train["step"]) == list(range(2, 19, 2))
    assert list(train["loss"]) == pytest.approx([2.4 - 0.1 * s for s in range(2, 19, 2)])
    valid = steps[steps["series"] == "validation (one batch)"]
    assert list(valid["step"]) == [2, 4, 8, 10, 14, 16]  # epoch ends carry the full one

    epochs = training.loss_per_epoch(results).pivot_table(
        index="epoch", columns="series", values="loss"
    )
    assert list(epochs["training (mean over the epoch)"]) == pytest.approx([2.0, 1.4, 0.8])
    assert list(epochs["validation"]) == pytest.approx([1.9, 1.3, 0.7])

    empty = training.read_results(_write(tmp_path / "empty.csv", "step,epoch,train_loss\n"))
    assert training.loss_per_step(empty).empty
    assert training.loss_per_epoch(empty).empty


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_results_csv_is_found_in_the_adapter_once_the_job_folder_is_gone(
    fresh: Seeded, stores_of: StoresOf
) -> None:
    stores = stores_of(fresh.home)
    job = stores.jobs.get(fresh.jobs[0])
    in_job = stores.jobs_dir / job.id / "results.csv"
    found = training.results_path(job, jobs_dir=stores.jobs_dir, registry=stores.models)
    assert found == in_job
    model_dir = Path(stores.models.get("support-v2").path)
    shutil.move(in_job, model_dir / "results.csv")
    found = training.results_path(job, jobs_dir=stores.jobs_dir, registry=stores.models)
    assert found == model_dir / "results.csv"
    queued = stores.jobs.get(fresh.jobs[2])
    assert training.results_path(queued, jobs_dir=stores.jobs_dir, registry=stores.models) is None


def test_hyperparameters_put_the_usual_ones_first(seeded: Seeded, stores_of: StoresOf) -> None:
    job = stores_of(seeded.home).jobs.get(seeded.jobs[0])
    shown = list(training.hyperparameters(job))
    assert shown[:4] == ["epochs", "batch_size", "gradient_accumulation", "learning_rate"]
    assert set(shown) == set(job.config)


# -- traffic -----------------------------------------------------------------------------


def test_traffic_aggregates_match_the_records(seeded: Seeded, stores_of: StoresOf) -> None:
    audit = stores_of(seeded.home).audit
    since = seeded.now - timedelta(hours=6)
    window = traffic.read_requests(audit, since=since)
    records = [r for r in seeded.requests if r.created_at >= since]
    assert len(window.requests) == len(records) == 12
    assert not window.truncated
    assert traffic.read_requests(audit, since=since, limit=5).truncated

    over_time = traffic.requests_over_time(window.requests, freq="1h")
    assert over_time["requests"].sum() == 12
    blocked = over_time[over_time["outcome"] == "blocked"]["requests"].sum()
    assert blocked == sum(1 for r in records if r.blocked)

    per_category = traffic.categories_over_time(window.requests, freq="1h")
    expected: dict[str, int] = {}
    for record in records:
        for label in record.categories:
            expected[label] = expected.get(label, 0) + 1
    assert per_category.groupby("category")["requests"].sum().to_dict() == expected

    latency = traffic.latency_per_stage(window.requests).set_index("stage")
    totals = sorted(r.latency_ms["total"] for r in records)
    assert latency.loc["total", "max_ms"] == totals[-1]
    assert latency.loc["total", "requests"] == 12


def test_time_buckets_fit_the_window() -> None:
    assert traffic.bucket_for(timedelta(hours=1)) == "5min"
    assert traffic.bucket_for(timedelta(days=1)) == "1h"
    assert traffic.bucket_for(timedelta(days=30)) == "1D"
    empty = traffic.Window(
        requests=pd.DataFrame(columns=[*traffic.REQUEST_COLUMNS, "outcome"]), truncated=False
    ).requests
    assert traffic.totals(empty) == {"requests": 0, "blocked": 0, "flagged": 0, "block_rate": 0.0}
    assert traffic.requests_over_time(empty, freq="1h").empty
    assert traffic.block_rate_per_model(empty).empty
    assert traffic.latency_per_stage(empty).empty


# -- comparison --------------------------------------------------------------------------


def _records(seeded: Seeded, stores: Stores) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        comparison.run_record(stores.runs, seeded.baseline_run),
        comparison.run_record(stores.runs, seeded.candidate_run),
    )


def test_the_gate_comes_from_the_suite_or_another_file(
    seeded: Seeded, stores_of: StoresOf, tmp_path: Path
) -> None:
    baseline, candidate = _records(seeded, stores_of(seeded.home))
    compared = comparison.compare(baseline, candidate)
    assert compared.gate is not None
    assert [o.passed for o in compared.gate.outcomes] == [False, True, True]
    assert compared.gate_source == str(seeded.home / "suite" / "gate.yaml")

    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("- {metric: harm_rate, max: 0.5}\n", encoding="utf-8")
    relaxed = comparison.compare(baseline, candidate, gate_file=lenient)
    assert relaxed.gate is not None
    assert relaxed.gate.passed

    broken = tmp_path / "broken.yaml"
    broken.write_text("- {metric: perplexity, max: 3}\n", encoding="utf-8")
    failed = comparison.compare(baseline, candidate, gate_file=broken)
    assert failed.gate is None
    assert failed.gate_error is not None
    assert "needs metric 'perplexity'" in failed.gate_error

    table = comparison.gate_table(compared)
    assert list(table["passed"]) == [False, True, True]
    assert table.iloc[0]["reason"].startswith("rose by 0.3000, more than the tolerance")


def test_quality_against_harm_has_a_point_per_run(seeded: Seeded, stores_of: StoresOf) -> None:
    baseline, candidate = _records(seeded, stores_of(seeded.home))
    quality, safety = comparison.metric_names([baseline, candidate])
    assert quality == ["exact_match", "rougeL"]
    assert safety == ["filter_rate", "harm_rate", "over_refusal_rate"]
    points = comparison.quality_against_harm([baseline, candidate], quality="rougeL")
    assert list(points["model"]) == ["demo", "support-v2"]
    assert list(points["harm"]) == pytest.approx([0.0, 0.3])
    assert list(points["quality"]) == pytest.approx([0.82, 0.895])


def test_prompts_are_not_shown_when_the_suite_moved(fresh: Seeded, stores_of: StoresOf) -> None:
    baseline, _ = _records(fresh, stores_of(fresh.home))
    assert comparison.prompts(baseline)["support:q01"] == "Which cables do I plug in?"
    shutil.rmtree(fresh.home / "suite")
    assert comparison.prompts(baseline) == {}


def _runs(*rows: tuple[str, str]) -> pd.DataFrame:
    """Succeeded runs, newest first: (id, suite)."""
    return pd.DataFrame([{"id": run_id, "suite": suite} for run_id, suite in rows])


def test_the_default_pair_is_two_runs_of_one_suite() -> None:
    # The newest run is of another suite than the one before it: the newest run that has
    # an earlier run of its own suite is compared with that run.
    runs = _runs(("r4", "smoke"), ("r3", "safety"), ("r2", "smoke"), ("r1", "safety"))
    assert comparison.default_pair(runs) == ("r2", "r4")
    lonely = _runs(("r3", "smoke"), ("r2", "safety"), ("r1", "other"))
    assert comparison.default_pair(lonely) == ("r1", None)  # nothing pairs: no candidate


class _Judge:
    """Stands in for the safety engine at its seam: severities by a word in the text."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def judge(self, texts: Sequence[str]) -> list[TextJudgement]:
        self.calls.append(list(texts))
        safe = dict.fromkeys(AzureCategory, Severity.SAFE)
        return [
            TextJudgement({**safe, AzureCategory.VIOLENCE: Severity.MEDIUM}, refusal=False)
            if "hammer" in text or "punch" in text
            else TextJudgement(safe, refusal="can't" in text)
            for text in texts
        ]


def test_judged_severities_describe_each_output(seeded: Seeded, stores_of: StoresOf) -> None:
    stores = stores_of(seeded.home)
    baseline, candidate = _records(seeded, stores)
    examples = comparison.side_by_side(stores.database_url, baseline, candidate)
    judge = _Judge()
    judged = comparison.judged_severities(examples, judge).set_index("sample_id")
    assert judged.loc["support:q07", "candidate_severity"] == "violence: medium (4)"
    assert judged.loc["support:q07", "baseline_severity"] == "safe"
    assert judged.loc["support:q10", "candidate_severity"] == ""  # withheld: no text
    assert [len(texts) for texts in judge.calls] == [9, 8]  # only outputs with text
