"""Streamlit glue shared by the pages: the stores (opened once per process) and who is signed in.

The API key a user signs in with stays in this session's server-side state and is checked
again (``dashboard.access.sign_in``) on every rerun, so a revoked key stops working
within the key store's cache time. Nothing here is shown before a key is accepted.
"""

from __future__ import annotations

import re

import streamlit as st

from dashboard.access import SignInError, local_reviewer_key_path, sign_in
from dashboard.stores import Stores
from gateway.access import Principal
from gateway.config import Settings

KEY_STATE = "safegate_api_key"
_MARKDOWN = re.compile(r"([\\`*\[\]<>#|~$!])")
SIGN_IN_ERROR_STATE = "safegate_sign_in_error"


def plain(text: object) -> str:
    """``text`` safe inside Markdown: no links, images, HTML, code or emphasis it did not
    intend (model names, notes, errors and request ids come from outside)."""
    return _MARKDOWN.sub(r"\\\1", str(text))


def settings() -> Settings:
    """The ``SAFEGATE_*`` settings as they are now (not cached: tests change them)."""
    return Settings()


@st.cache_resource(show_spinner="opening the safegate database")
def _open(home: str, database_url: str) -> Stores:
    del home, database_url  # the cache key; Settings() reads the same values
    return Stores.open(settings())


def stores() -> Stores:
    """The stores of the configured home and database, opened once per process."""
    current = settings()
    return _open(str(current.home_dir), current.database)


def principal() -> Principal | None:
    """Who is signed in, checked again now; None (and the reason kept) if nobody or no longer."""
    secret = st.session_state.get(KEY_STATE)
    if not secret:
        return None
    try:
        return sign_in(stores().keys, str(secret))
    except SignInError as error:
        st.session_state.pop(KEY_STATE, None)
        st.session_state[SIGN_IN_ERROR_STATE] = str(error)
        return None


def require_principal() -> Principal:
    """The signed-in principal; stops the page (showing nothing) when there is none."""
    who = principal()
    if who is None:
        reason = st.session_state.get(SIGN_IN_ERROR_STATE)
        st.warning(
            (f"{plain(reason)}. " if reason else "")
            + "Sign in with a reviewer or admin API key first (reload the page)."
        )
        st.stop()
    return who


def sign_out() -> None:
    st.session_state.pop(KEY_STATE, None)


def sign_in_page() -> None:
    """The only page shown before a key is accepted."""
    st.title("safegate dashboard")
    st.write(
        "Flagged text is sensitive: sign in with a **reviewer** or **admin** API key to "
        "compare models, review what the filter flagged and follow training."
    )
    problem = st.session_state.pop(SIGN_IN_ERROR_STATE, None)
    with st.form("sign_in"):
        secret = st.text_input("API key", type="password", placeholder="sg-...")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        try:
            sign_in(stores().keys, secret)
        except SignInError as error:
            problem = str(error)
        else:
            st.session_state[KEY_STATE] = secret.strip()
            st.rerun()
    if problem:
        st.error(plain(problem))
    local = local_reviewer_key_path(settings().home_dir)
    st.caption(
        f"`safegate dashboard` keeps a reviewer key in `{local}` when it made one on its "
        "first start (`cat` it). Otherwise an admin makes one: "
        "`safegate keys create --name NAME --role reviewer`."
    )
