"""Model comparison: eval runs against a baseline, metrics with deltas and intervals, the
gate, quality against harm, and examples side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, comparison, session
from dashboard.session import plain
from evals.runs import RunStore

CACHE_TTL_S = 30

session.require_principal()
stores = session.stores()

st.title("Model comparison")


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _runs(database_url: str) -> pd.DataFrame:
    return comparison.runs_table(database_url)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _record(_runs_store: RunStore, database_url: str, run_id: str) -> dict[str, Any]:
    del database_url  # part of the cache key
    return comparison.run_record(_runs_store, run_id)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner="comparing runs")
def _compare(
    baseline: dict[str, Any], candidates: Sequence[dict[str, Any]], gate_file: str | None
) -> list[comparison.CandidateComparison]:
    override = Path(gate_file) if gate_file else None
    return [comparison.compare(baseline, record, gate_file=override) for record in candidates]


@st.cache_data(ttl=CACHE_TTL_S, show_spinner="reading outputs")
def _examples(
    database_url: str, baseline: dict[str, Any], candidate: dict[str, Any], only: bool
) -> pd.DataFrame:
    return comparison.side_by_side(database_url, baseline, candidate, only_differences=only)


@st.cache_resource(show_spinner="loading the safety engine")
def _judge() -> comparison.SeverityJudge:
    from evals.metrics.safety import shared_judge

    return shared_judge()


runs = _runs(stores.database_url)
if runs.empty:
    st.info(
        "No eval runs yet. With the gateway running (`make run`), run a suite:\n\n"
        "```bash\n"
        "export SAFEGATE_KEY=$(cat ~/.safegate/local-developer.key)\n"
        "safegate eval run evals/suites/smoke.yaml\n"
        "```\n"
        "It runs the demo model through the filter and directly: two runs to compare."
    )
    st.stop()

with st.expander(f"All runs ({len(runs)})", expanded=False):
    st.dataframe(runs, hide_index=True, width="stretch")

done = runs[runs["status"] == "succeeded"]
if len(done) < 2:
    st.info(
        "Comparing needs two runs that succeeded; there "
        f"{'is one' if len(done) == 1 else 'are none'}. Run another model on the same suite, "
        "e.g. `safegate eval run evals/suites/smoke.yaml --model demo-direct`."
    )
    st.stop()

labels = {str(row["id"]): comparison.run_label(row) for row in done.to_dict("records")}
suite_of = {str(row["id"]): str(row["suite"]) for row in done.to_dict("records")}
ids = list(labels)
default_baseline, default_candidate = comparison.default_pair(done)
picks = st.columns([2, 3])
baseline_id = picks[0].selectbox(
    "Baseline",
    ids,
    index=ids.index(default_baseline),
    format_func=labels.__getitem__,
    key="baseline",
)
# Runs of the baseline's suite first: only they share samples with it.
others = sorted(
    (run_id for run_id in ids if run_id != baseline_id),
    key=lambda run_id: suite_of[run_id] != suite_of[baseline_id],
)
same_suite = [run_id for run_id in others if suite_of[run_id] == suite_of[baseline_id]]
preselected = [default_candidate] if default_candidate in same_suite else same_suite[:1]
candidate_ids = picks[1].multiselect(
    "Candidates", others, default=preselected, format_func=labels.__getitem__, key="candidates"
)
if not candidate_ids:
    st.info(
        f"Pick at least one candidate run to compare with the baseline. No other run of "
        f"the suite {plain(suite_of[baseline_id])!r} succeeded; runs of other suites share "
        "no samples with it."
        if not same_suite
        else "Pick at least one candidate run to compare with the baseline."
    )
    st.stop()

options = st.columns([2, 3])
only_differences = options[0].toggle("Show only differences", key="only_differences")
gate_file = (
    options[1]
    .text_input("Gate file (empty: the one the candidate's suite names)", key="gate_file")
    .strip()
)

baseline = _record(stores.runs, stores.database_url, baseline_id)
candidates = [_record(stores.runs, stores.database_url, run_id) for run_id in candidate_ids]
compared = _compare(baseline, candidates, gate_file or None)

# -- the gate ----------------------------------------------------------------------------

for item in compared:
    if item.gate_error:
        st.warning(f"{plain(item.label)}: the gate could not be checked: {plain(item.gate_error)}")
    elif item.gate is None:
        st.caption(f"{plain(item.label)}: its suite names no gate file.")
    elif item.gate.passed:
        st.success(f"{plain(item.label)}: gate passed ({len(item.gate.outcomes)} rules)")
    else:
        failed = ", ".join(outcome.rule.metric for outcome in item.gate.failed)
        st.error(f"{plain(item.label)}: gate FAILED on {plain(failed)}")
    if item.gate is not None:
        with st.expander(f"Gate rules for {item.label}"):
            st.dataframe(comparison.gate_table(item), hide_index=True, width="stretch")

# -- metrics -----------------------------------------------------------------------------

st.subheader("Metrics")
table = comparison.metric_table(compared, only_differences=only_differences)
if table.empty:
    st.info("No metric differs between these runs." if only_differences else "No shared metric.")
else:

    def _highlight(row: pd.Series) -> list[str]:
        if row["gate"] == "FAIL":
            color = "background-color: rgba(214, 39, 40, 0.18)"
        elif row["gate"] == "pass":
            color = "background-color: rgba(44, 160, 44, 0.14)"
        else:
            color = ""
        return [color] * len(row)

    shown = table.drop(columns=["test", "p_value"])
    st.dataframe(
        shown.style.apply(_highlight, axis=1).format(
            {
                "baseline_value": "{:.4f}",
                "candidate_value": "{:.4f}",
                "delta": "{:+.4f}",
                "ci_low": "{:+.4f}",
                "ci_high": "{:+.4f}",
            },
            na_rep="n/a",
        ),
        hide_index=True,
        width="stretch",
        key="metric_table",
    )
    st.caption(
        "CI: 95% paired bootstrap interval of the mean per-sample difference; binary "
        "metrics also get McNemar's exact test (statistic). Red rows fail a gate rule."
    )
    st.altair_chart(charts.metric_deltas(table), width="stretch")

quality, safety = comparison.metric_names([baseline, *candidates])
if quality and comparison.HARM_METRIC in safety:
    st.subheader("Quality against harm")
    default = quality.index("rougeL") if "rougeL" in quality else 0
    chosen = st.selectbox("Quality metric", quality, index=default, key="quality_metric")
    points = comparison.quality_against_harm([baseline, *candidates], quality=chosen)
    st.altair_chart(
        charts.quality_against_harm(points, quality=chosen, harm=comparison.HARM_METRIC),
        width="stretch",
    )

# -- examples ----------------------------------------------------------------------------

st.subheader("Examples side by side")
by_label = {item.label: record for item, record in zip(compared, candidates, strict=True)}
which = st.selectbox("Candidate", list(by_label), key="example_candidate")
examples = _examples(stores.database_url, baseline, by_label[which], only_differences)
if examples.empty:
    st.info("No example differs." if only_differences else "The runs share no sample.")
    st.stop()
judge = st.toggle(
    "Judge output severities with the safety engine (loads it once, a few seconds)",
    key="judge_severities",
)
if judge:
    examples = comparison.judged_severities(examples, _judge())
st.caption(
    f"{len(examples)} examples; {int(examples['differs'].sum())} differ. harm_rate per "
    "example: 1 = harmful at medium severity or above."
)
st.dataframe(examples.drop(columns=["differs"]), hide_index=True, width="stretch")

sample = st.selectbox("Example", list(examples["sample_id"]), key="example_id")
row = examples.set_index("sample_id").loc[sample]
if row["prompt"]:
    st.markdown("**Prompt**")
    st.text(row["prompt"])
left, right = st.columns(2)
for column, side, run_label in (
    (left, "baseline", baseline["model"]),
    (right, "candidate", by_label[which]["model"]),
):
    with column:
        st.markdown(f"**{side}: {plain(run_label)}**")
        st.caption(plain(row[f"{side}_filter"]))
        output = row[f"{side}_output"]
        st.text(output if isinstance(output, str) else "(no text)")
        harm = row.get(f"{side}_harm_rate")
        if harm is not None and harm == harm:
            st.caption(f"harm_rate: {harm:g}")
        if judge:
            st.caption(f"severities: {plain(row[f'{side}_severity'] or 'no text')}")
