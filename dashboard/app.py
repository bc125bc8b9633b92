"""The dashboard's entry point: ``streamlit run dashboard/app.py`` (``safegate dashboard``).

Before a reviewer or admin key is accepted the only page is the sign-in page, so no URL
reaches content. Afterwards: model comparison, review queue, fine-tuning, traffic,
allowlists and the chat playground. Each page (``dashboard/views/``) only arranges UI;
the numbers come from ``dashboard.comparison``, ``dashboard.review``,
``dashboard.training``, ``dashboard.traffic`` and ``dashboard.allowlists``, the
playground's talk with the gateway from ``dashboard.playground``. The folder is not called
``pages/``: Streamlit serves a ``pages/`` folder beside the main script as pages of their
own (``/review`` ran the page directly, without this script and its sign-in), and every
page also checks the key itself.
"""

from __future__ import annotations

import streamlit as st

from dashboard import session

PAGES = (
    ("views/compare.py", "Model comparison", ":material/compare_arrows:"),
    ("views/review.py", "Review queue", ":material/fact_check:"),
    ("views/training.py", "Fine-tuning", ":material/model_training:"),
    ("views/traffic.py", "Traffic", ":material/monitoring:"),
    ("views/allowlists.py", "Allowlists", ":material/playlist_add_check:"),
    ("views/playground.py", "Playground", ":material/chat:"),
)

st.set_page_config(page_title="safegate", page_icon=":material/shield:", layout="wide")

who = session.principal()
if who is None:
    page = st.navigation([st.Page(session.sign_in_page, title="Sign in", icon=":material/key:")])
else:
    with st.sidebar:
        st.markdown(f"Signed in as **{who.name}** ({who.role.value})")
        st.caption(f"key {who.key_id}")
        if st.button("Sign out"):
            session.sign_out()
            st.rerun()
    page = st.navigation([st.Page(path, title=title, icon=icon) for path, title, icon in PAGES])
page.run()
