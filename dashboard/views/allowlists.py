"""Allowlists: every list and what it exempts; admins create, enable, disable and delete."""

from __future__ import annotations

import streamlit as st

from dashboard import allowlists, session
from dashboard.access import can_edit_lists
from dashboard.session import plain
from gateway.errors import ApiError
from gateway.safety.taxonomy import Category, Direction

NOTICE_STATE = "allowlists_notice"

who = session.require_principal()
store = session.stores().allowlists

st.title("Allowlists")
st.caption(
    "Terms and RE2 regexes whose matches are exempt from the categories named, in the "
    "directions named: a matching text is scored again with the matches masked, and only "
    "those categories use the lower score, so naming an allowlisted product in a harmful "
    "text does not get it through. Blocklists always win."
)
notice = st.session_state.pop(NOTICE_STATE, None)
if notice:
    st.success(plain(notice))

listed = allowlists.table(store)
if listed.empty:
    st.info(
        "No allowlists yet. An admin creates one below or through the API: "
        '`POST /v1/allowlists` (README, "Custom allowlists").'
    )
else:
    st.dataframe(listed, hide_index=True, width="stretch")


def done(message: str) -> None:
    st.session_state[NOTICE_STATE] = message
    st.rerun()


if not can_edit_lists(who):
    st.caption("Changing allowlists needs an admin key; reviewers can read them.")
    st.stop()

st.subheader("New allowlist")
with st.form("new_allowlist"):
    name = st.text_input("Name", placeholder="product-names")
    terms = st.text_area("Terms, one per line")
    regexes = st.text_area("Regexes (RE2, case-insensitive), one per line")
    categories = st.multiselect("Categories exempted", [category.value for category in Category])
    directions = st.multiselect(
        "Directions", [direction.value for direction in Direction], default=["prompt"]
    )
    submitted = st.form_submit_button("Create allowlist", type="primary")
if submitted:
    try:
        created = allowlists.create(
            store,
            name=name,
            terms=terms,
            regexes=regexes,
            categories=categories,
            directions=directions,
            principal=who,
        )
    except ApiError as error:
        st.error(plain(error.message) + (f" ({plain(error.param)})" if error.param else ""))
    else:
        done(f"allowlist {created.name} created")

if not listed.empty:
    st.subheader("Change an allowlist")
    chosen = st.selectbox("Allowlist", list(listed["name"]), key="allowlist_choice")
    enabled = bool(listed.set_index("name").loc[chosen, "enabled"])
    toggle, remove = st.columns(2)
    try:
        if toggle.button("Disable" if enabled else "Enable"):
            allowlists.set_enabled(store, chosen, enabled=not enabled, principal=who)
            done(f"allowlist {chosen} {'disabled' if enabled else 'enabled'}")
        if remove.button("Delete"):
            allowlists.delete(store, chosen, principal=who)
            done(f"allowlist {chosen} deleted")
    except ApiError as error:
        st.error(plain(error.message))
