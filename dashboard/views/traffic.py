"""Traffic: requests and blocks per category over time, block rate per model, latency; one
key's or one origin's, eval traffic only on request; tokens per day per key and quota use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import streamlit as st

from dashboard import charts, review, session, traffic
from gateway.origin import EVAL_ORIGIN

WINDOWS = {
    "last hour": timedelta(hours=1),
    "last 6 hours": timedelta(hours=6),
    "last 24 hours": timedelta(days=1),
    "last 7 days": timedelta(days=7),
    "last 30 days": timedelta(days=30),
}

session.require_principal()
stores = session.stores()

st.title("Traffic")
row = st.columns([1, 2, 1, 1])
choice = row[0].selectbox("Window", list(WINDOWS), index=2, key="window")
span = WINDOWS[choice]
since = datetime.now(UTC) - span
senders = traffic.senders(stores.audit, since=since)
names = review.key_names(stores.keys)
key_id = row[1].selectbox(
    "Key",
    ["any", *senders.key_ids],
    format_func=lambda option: names.get(option, option),
    key="t_key",
)
origin = row[2].selectbox("Origin", ["any", *senders.origins], key="t_origin")
include_eval = row[3].checkbox(
    "Include eval traffic",
    key="t_eval",
    help=f"Requests marked 'safegate-origin: {EVAL_ORIGIN}' (safegate eval run) are left out "
    "unless ticked, or unless the origin filter asks for them.",
)
window = traffic.read_requests(
    stores.audit,
    since=since,
    key_id=None if key_id == "any" else key_id,
    origin=None if origin == "any" else origin,
    include_eval=include_eval,
)
requests = window.requests
hidden = (
    f"{window.hidden_eval} eval request{'s' if window.hidden_eval != 1 else ''} hidden: tick "
    "*Include eval traffic* to count them."
)
if requests.empty:
    if window.hidden_eval:
        st.info(f"No request in the {choice} matches these filters; {hidden}")
        st.stop()
    st.info(
        f"No request went through the filter in the {choice}. Start the gateway with "
        "`make run` and send one (README: *Chat through the filter*); each filtered "
        "request is recorded here, without its text."
    )
    st.stop()
if window.hidden_eval:
    st.caption(hidden)
if window.truncated:
    st.warning(f"Showing the newest {traffic.MAX_REQUESTS:,} requests of this window.")

summary = traffic.totals(requests)
columns = st.columns(4)
columns[0].metric("requests", f"{summary['requests']:,}")
columns[1].metric("blocked", f"{summary['blocked']:,}")
columns[2].metric("flagged, not blocked", f"{summary['flagged']:,}")
columns[3].metric("block rate", f"{summary['block_rate']:.1%}")

freq = traffic.bucket_for(span)
st.subheader("Requests over time")
st.altair_chart(
    charts.requests_over_time(traffic.requests_over_time(requests, freq=freq)), width="stretch"
)

st.subheader("Flags and blocks per category")
by_category = traffic.categories_over_time(requests, freq=freq)
if by_category.empty:
    st.caption("Nothing was flagged in this window.")
else:
    st.altair_chart(charts.categories_over_time(by_category))
    st.dataframe(traffic.per_category(requests), hide_index=True, width="stretch")

st.subheader("Block rate per model")
per_model = traffic.block_rate_per_model(requests)
st.altair_chart(charts.block_rate_per_model(per_model), width="stretch")
st.dataframe(
    per_model,
    hide_index=True,
    width="stretch",
    column_config={"block_rate": st.column_config.NumberColumn("block rate", format="percent")},
)

st.subheader("Latency per stage")
st.dataframe(
    traffic.latency_per_stage(requests),
    hide_index=True,
    width="stretch",
    column_config={
        name: st.column_config.NumberColumn(name, format="%.1f")
        for name in ("p50_ms", "p95_ms", "p99_ms", "max_ms")
    },
)
st.altair_chart(
    charts.latency_per_stage(traffic.stage_latencies(requests), order=list(traffic.STAGE_ORDER)),
    width="stretch",
)

st.subheader("Usage per key")
now = datetime.now(UTC)
tokens = traffic.tokens_per_day(
    stores.audit, since=since, until=now, key_id=None if key_id == "any" else key_id
)
if tokens.empty:
    st.caption("No request in this window reached a model.")
else:
    st.altair_chart(charts.tokens_per_day(tokens, names=names), width="stretch")
    st.dataframe(
        tokens.assign(key=tokens["key_id"].map(lambda k: names.get(k, k))).drop(columns="key_id"),
        hide_index=True,
        width="stretch",
        column_config={"cost_usd": st.column_config.NumberColumn("cost USD", format="%.4f")},
    )
st.caption(
    "Tokens per UTC day of every request (eval traffic included: quotas count it), as "
    "`safegate keys usage` reports them."
)
quotas = traffic.quota_table(stores.audit, stores.keys, now=now)
if quotas.empty:
    st.caption(
        "No key has a quota: `safegate keys quota KEY_ID --daily-tokens N` sets one "
        "(README: *Usage and quotas*)."
    )
else:
    st.markdown("**Quotas** (UTC day and month)")
    st.dataframe(
        quotas,
        hide_index=True,
        width="stretch",
        column_config={
            name: st.column_config.NumberColumn(name.replace("_", " "), format="percent")
            for name in ("daily_used", "monthly_used", "budget_used")
        },
    )
