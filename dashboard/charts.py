"""Altair charts of the data functions' frames; Streamlit renders them (``st.altair_chart``).

Each function takes a frame in the shape its data function documents and returns a chart;
none reads a store or computes a number the table beside it does not show.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import altair as alt

if TYPE_CHECKING:
    import pandas as pd

OUTCOME_COLORS = alt.Scale(
    domain=["allowed", "flagged", "blocked"], range=["#9ecae1", "#fdae6b", "#d62728"]
)
GATE_COLORS = alt.Scale(domain=["pass", "FAIL", ""], range=["#2ca02c", "#d62728", "#9e9e9e"])


def quality_against_harm(frame: pd.DataFrame, *, quality: str, harm: str) -> alt.Chart:
    """One point per run: quality (up is better) against harm rate (left is better)."""
    chart: alt.Chart = (
        alt.Chart(frame)
        .mark_circle(size=140)
        .encode(
            x=alt.X("harm:Q", title=f"{harm} (lower is better)", scale=alt.Scale(zero=True)),
            y=alt.Y("quality:Q", title=f"{quality} (higher is better)", scale=alt.Scale(zero=True)),
            color=alt.Color("model:N", title="model"),
            tooltip=[
                "model",
                "run_id",
                alt.Tooltip("quality:Q", format=".4f"),
                alt.Tooltip("harm:Q", format=".4f"),
            ],
        )
        .properties(height=320)
    )
    return chart


def metric_deltas(table: pd.DataFrame) -> alt.LayerChart:
    """Per metric and candidate: the change against the baseline, with its interval."""
    base = alt.Chart(table).encode(
        y=alt.Y("metric:N", title=None),
        yOffset=alt.YOffset("candidate:N"),
    )
    bars = base.mark_bar().encode(
        x=alt.X("delta:Q", title="change (candidate - baseline)"),
        color=alt.Color("gate:N", scale=GATE_COLORS, title="gate"),
        tooltip=["candidate", "metric", alt.Tooltip("delta:Q", format="+.4f"), "statistic"],
    )
    whiskers = base.mark_rule().encode(x="ci_low:Q", x2="ci_high:Q")
    chart: alt.LayerChart = (bars + whiskers).properties(height=alt.Step(18))
    return chart


def loss_curves(frame: pd.DataFrame, *, x: str) -> alt.Chart:
    """Loss against ``x`` (``step`` or ``epoch``), one line per series."""
    chart: alt.Chart = (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X(f"{x}:Q", title=x),
            y=alt.Y("loss:Q", title="loss"),
            color=alt.Color("series:N", title=None),
            tooltip=[x, "series", alt.Tooltip("loss:Q", format=".4f")],
        )
        .properties(height=280)
    )
    return chart


def requests_over_time(frame: pd.DataFrame) -> alt.Chart:
    """Requests per time bucket, stacked by outcome."""
    chart: alt.Chart = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("time:T", title=None),
            y=alt.Y("requests:Q", title="requests", stack="zero"),
            color=alt.Color("outcome:N", scale=OUTCOME_COLORS, title=None),
            tooltip=["time:T", "outcome", "requests"],
        )
        .properties(height=260)
    )
    return chart


def categories_over_time(frame: pd.DataFrame) -> alt.Chart:
    """Flagged and blocked requests per label and time bucket."""
    chart: alt.Chart = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("time:T", title=None),
            y=alt.Y("sum(requests):Q", title="requests"),
            color=alt.Color("category:N", title="category"),
            column=alt.Column("outcome:N", title=None),
            tooltip=["time:T", "category", "outcome", "requests"],
        )
        .properties(height=240, width=320)
    )
    return chart


def block_rate_per_model(frame: pd.DataFrame) -> alt.Chart:
    chart: alt.Chart = (
        alt.Chart(frame)
        .mark_bar(color="#d62728")
        .encode(
            x=alt.X("block_rate:Q", title="block rate", axis=alt.Axis(format="%")),
            y=alt.Y("model:N", title=None, sort="-x"),
            tooltip=["model", "requests", "blocked", alt.Tooltip("block_rate:Q", format=".1%")],
        )
        .properties(height=alt.Step(28))
    )
    return chart


def latency_per_stage(samples: pd.DataFrame, *, order: list[str]) -> alt.Chart:
    """Latency distribution per stage (box: quartiles; whiskers: 1.5 IQR)."""
    chart: alt.Chart = (
        alt.Chart(samples)
        .mark_boxplot(extent=1.5)
        .encode(
            x=alt.X("ms:Q", title="milliseconds", scale=alt.Scale(type="symlog")),
            y=alt.Y("stage:N", title=None, sort=order),
        )
        .properties(height=alt.Step(36))
    )
    return chart


def label_scores(frame: pd.DataFrame, *, top: int = 12) -> alt.Chart:
    """A flagged item's highest label scores, flagged labels in red."""
    shown = frame.head(top)
    chart: alt.Chart = (
        alt.Chart(shown)
        .mark_bar()
        .encode(
            x=alt.X("score:Q", title="score", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("label:N", title=None, sort="-x"),
            color=alt.Color(
                "flagged:N",
                scale=alt.Scale(domain=[True, False], range=["#d62728", "#9e9e9e"]),
                title="flagged",
            ),
            tooltip=["label", alt.Tooltip("score:Q", format=".3f"), "flagged"],
        )
        .properties(height=alt.Step(20))
    )
    return chart


def tokens_per_day(frame: pd.DataFrame, *, names: dict[str, str]) -> alt.Chart:
    """Tokens per UTC day, one stacked colour per key (``traffic.tokens_per_day``)."""
    named = frame.assign(key=frame["key_id"].map(lambda key_id: names.get(key_id, key_id)))
    chart: alt.Chart = (
        alt.Chart(named)
        .mark_bar()
        .encode(
            x=alt.X("day:O", title="day (UTC)"),
            y=alt.Y("total_tokens:Q", title="tokens (prompt + completion)"),
            color=alt.Color("key:N", title="key"),
            tooltip=["day", "key", "requests", "prompt_tokens", "completion_tokens"],
        )
        .properties(height=280)
    )
    return chart
