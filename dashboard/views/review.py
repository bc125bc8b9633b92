"""Review queue: flagged items, filtered (eval traffic only on request); label one or many;
export; grow a blocklist."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import streamlit as st

from dashboard import charts, review, session
from dashboard.access import can_edit_lists
from dashboard.session import plain
from gateway.audit import ReviewLabel, ReviewState
from gateway.blocklists import ItemKind
from gateway.errors import ApiError
from gateway.origin import EVAL_ORIGIN
from gateway.safety.taxonomy import Category, Shield

LABEL_TEXT = {
    ReviewLabel.TRUE_POSITIVE: "True positive",
    ReviewLabel.FALSE_POSITIVE: "False positive",
    ReviewLabel.NEEDS_POLICY_CHANGE: "Needs policy change",
}
WINDOWS = {
    "any time": None,
    "last hour": timedelta(hours=1),
    "last 24 hours": timedelta(days=1),
    "last 7 days": timedelta(days=7),
    "last 30 days": timedelta(days=30),
}
SEVERITY_CHOICES = {"any": None, "low (2)+": 2, "medium (4)+": 4, "high (6)": 6}
PAGE_SIZE = 50
CURSOR_STATE = "review_cursors"
ALL_LABELS = [label.value for label in (*Category, *Shield)]

who = session.require_principal()
stores = session.stores()
audit = stores.audit

st.title("Review queue")

if review.review_counts(audit)["total"] == 0:
    st.info(
        "Nothing has been flagged yet. Flagged prompts and completions of requests through "
        "the gateway land here: start it with `make run` and send a request the filter "
        "flags, e.g.\n\n"
        "```bash\n"
        'curl -s http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer '
        '$SAFEGATE_KEY" -H \'content-type: application/json\' -d \'{"model": "demo", '
        '"messages": [{"role": "user", "content": "I will find you and hurt you."}]}\'\n'
        "```"
    )
    st.stop()

# -- filters -----------------------------------------------------------------------------

names = review.key_names(stores.keys)
with st.container(border=True):
    row = st.columns(6)
    state_choice = row[0].selectbox(
        "Review state", ["any", *[s.value for s in ReviewState]], index=1, key="f_state"
    )
    category = row[1].selectbox("Category", ["any", *ALL_LABELS], key="f_category")
    severity = row[2].selectbox("Severity", list(SEVERITY_CHOICES), key="f_severity")
    models = review.queue_models(audit)
    model = row[3].selectbox("Model", ["any", *models], key="f_model")
    direction = row[4].selectbox("Direction", ["any", "prompt", "completion"], key="f_direction")
    window = row[5].selectbox("Time", list(WINDOWS), key="f_window")
    more = st.columns([2, 1, 1])
    key_id = more[0].selectbox(
        "Key",
        ["any", *review.queue_keys(audit)],
        format_func=lambda choice: names.get(choice, choice),
        key="f_key",
    )
    origin = more[1].selectbox("Origin", ["any", *review.queue_origins(audit)], key="f_origin")
    include_eval = more[2].checkbox(
        "Include eval traffic",
        key="f_eval",
        help=f"Requests marked 'safegate-origin: {EVAL_ORIGIN}' (safegate eval run) are "
        "left out unless ticked, or unless the origin filter asks for them.",
    )

span = WINDOWS[window]
scope = review.item_filter(
    key_id=None if key_id == "any" else key_id,
    origin=None if origin == "any" else origin,
    include_eval=include_eval,
)
where = review.item_filter(
    category=None if category == "any" else category,
    severity_min=SEVERITY_CHOICES[severity],
    model=None if model == "any" else model,
    direction=None if direction == "any" else direction,
    review_state=None if state_choice == "any" else state_choice,
    since=None if span is None else datetime.now(UTC) - span,
    key_id=scope.key_id,
    origin=scope.origin,
    include_eval=include_eval,
)

counts = review.review_counts(audit, scope)
columns = st.columns(5)
columns[0].metric("flagged items", counts["total"])
for column, state in zip(columns[1:], ReviewState, strict=True):
    column.metric(state.value.replace("_", " "), counts[state.value])
hidden = review.hidden_eval(audit, where)
if hidden:
    st.caption(
        f"{hidden} eval item{'s' if hidden != 1 else ''} matching these filters "
        "hidden: tick *Include eval traffic* to show them."
    )

filter_key = repr(where)
if st.session_state.get("review_filter") != filter_key:  # a new filter starts at page one
    st.session_state["review_filter"] = filter_key
    st.session_state[CURSOR_STATE] = [None]
cursors: list[str | None] = st.session_state.setdefault(CURSOR_STATE, [None])
page = review.queue(audit, where, limit=PAGE_SIZE, cursor=cursors[-1], names=names)
items = page.items

if items.empty:
    st.info(
        "No flagged item matches these filters. Widen them (review state `any`, time "
        "`any time`) to see reviewed items too"
        + ("." if include_eval else ", or tick *Include eval traffic*.")
    )
    st.stop()

st.caption(f"page {len(cursors)} · {len(items)} items, newest first")
st.dataframe(
    items,
    hide_index=True,
    width="stretch",
    column_config={
        "created_at": st.column_config.DatetimeColumn("time", format="YYYY-MM-DD HH:mm:ss"),
        "max_severity": st.column_config.NumberColumn("severity"),
        "preview": st.column_config.TextColumn("text", width="large"),
    },
)
nav = st.columns([1, 1, 6])
if nav[0].button("Previous page", disabled=len(cursors) == 1):
    cursors.pop()
    st.rerun()
if nav[1].button("Next page", disabled=page.next_cursor is None):
    cursors.append(page.next_cursor)
    st.rerun()

labels = {
    str(row.id): f"{row.id[:8]} · {row.categories} · {row.preview[:60]}"
    for row in items.itertuples(index=False)
}

# -- one item ----------------------------------------------------------------------------

st.subheader("Item")
chosen = st.selectbox(
    "Flagged item", list(labels), format_func=labels.__getitem__, key="item_choice"
)
stored = audit.get_item(chosen)
item = stored.item
left, right = st.columns([3, 2])
with left:
    st.markdown(
        f"**{item.direction.value}** {plain(item.source)} of request {plain(item.request_id)} · "
        f"model **{plain(item.model or '-')}** · action **{item.action}** · "
        f"{item.created_at.strftime('%Y-%m-%d %H:%M:%S UTC')}  \n"
        f"key **{plain(names.get(item.key_id, item.key_id))}** · "
        f"origin **{plain(item.origin or 'not declared')}**"
    )
    st.text(item.text)  # plain text: flagged content is never rendered as markdown
    st.caption("reasons: " + plain("; ".join(item.reasons)) if item.reasons else "no reasons")
    state_line = f"review: **{stored.review_state.value}**"
    if stored.reviewer_key_id:
        state_line += f" by {plain(stored.reviewer_key_id)}"
    if stored.review_note:
        state_line += f" · note: {plain(stored.review_note)}"
    st.markdown(state_line)
with right:
    scores = review.item_scores(stored)
    st.altair_chart(charts.label_scores(scores), width="stretch")
    st.dataframe(review.item_severities(stored), hide_index=True, width="stretch")

note = st.text_input("Note (optional)", key="item_note", max_chars=2000)
buttons = st.columns(3)
for column, (label, text) in zip(buttons, LABEL_TEXT.items(), strict=True):
    if column.button(text, key=f"label_{label.value}", width="stretch"):
        try:
            review.label_items(audit, [chosen], label=label, note=note, principal=who)
        except ApiError as error:
            st.error(plain(error.message))
        else:
            st.toast(f"labelled {chosen[:8]} as {label.value}")
            st.rerun()

with st.expander("Add a term from this item to a blocklist"):
    if not can_edit_lists(who):
        st.caption("Adding to a blocklist needs an admin key; reviewers can label only.")
    else:
        with st.form("blocklist"):
            term = st.text_input("Term (or regex) found in the text")
            kind = st.radio("Kind", [ItemKind.TERM.value, ItemKind.REGEX.value], horizontal=True)
            name = st.text_input("Blocklist", value="review")
            add = st.form_submit_button("Add to blocklist")
        if add:
            try:
                added = review.add_to_blocklist(
                    audit,
                    stores.blocklists,
                    chosen,
                    blocklist=name,
                    term=term,
                    kind=kind,
                    principal=who,
                )
            except ApiError as error:
                st.error(plain(error.message))
            else:
                made = " (new list)" if added.created else ""
                st.success(
                    f"'{plain(added.entry.value)}' is in blocklist {plain(added.blocklist)}{made}"
                )

# -- many items --------------------------------------------------------------------------

st.subheader("Label several items")
with st.form("bulk"):
    picked = st.multiselect(
        "Items on this page", list(labels), format_func=labels.__getitem__, key="bulk_ids"
    )
    every = st.checkbox("All items on this page", key="bulk_all")
    bulk_label = st.radio(
        "Label",
        list(LABEL_TEXT),
        format_func=LABEL_TEXT.__getitem__,
        horizontal=True,
        key="bulk_label",
    )
    bulk_note = st.text_input("Note (optional)", key="bulk_note", max_chars=2000)
    apply = st.form_submit_button("Label selected")
if apply:
    targets = list(labels) if every else picked
    if not targets:
        st.warning("Pick items first (or tick 'All items on this page').")
    else:
        try:
            done = review.label_items(
                audit, targets, label=bulk_label, note=bulk_note, principal=who
            )
        except ApiError as error:
            st.error(plain(error.message))
        else:
            st.toast(f"labelled {done} items as {ReviewLabel(bulk_label).value}")
            st.rerun()

# -- export ------------------------------------------------------------------------------

st.subheader("Export labelled items")
export_choice = st.selectbox(
    "Which labels", ["any", *[label.value for label in ReviewLabel]], key="export_label"
)
if st.button("Prepare export"):
    st.session_state["export_data"] = review.export_jsonl(
        audit, None if export_choice == "any" else export_choice
    )
    st.session_state["export_name"] = f"review-{export_choice}.jsonl"
if "export_data" in st.session_state:
    data = st.session_state["export_data"]
    lines = data.count("\n")
    st.caption(f"{lines} labelled items, one eval example per line (as `/v1/review/export`).")
    st.download_button(
        "Download JSONL",
        data=data,
        file_name=st.session_state["export_name"],
        mime="application/x-ndjson",
        disabled=lines == 0,
    )
