"""Playground: chat with any model the gateway serves, through the gateway, and see what its
content filter said about each prompt and completion; keep a flagged exchange for review
or as an eval example."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import streamlit as st

from dashboard import playground, session
from dashboard.playground import ChatStream, PlaygroundError, Turn
from dashboard.session import plain
from gateway.access import Role

TURNS_STATE = "playground_turns"
PASTED_KEY_STATE = "playground_pasted_key"
OWN_KEY = "The key I signed in with"
OTHER_KEY = "Another key (paste it)"
DEFAULT_DATASET = "playground"

who = session.require_principal()
stores = session.stores()
settings = session.settings()

st.title("Playground")

# -- which key, which gateway, which model ------------------------------------------------

try:
    base_url = playground.gateway_url(settings)
except PlaygroundError as error:
    st.error(plain(error))
    st.stop()

top = st.columns([2, 2, 1])
secret = str(st.session_state.get(session.KEY_STATE, ""))
if who.allows(Role.ADMIN):
    choice = top[0].radio("Chat with", [OWN_KEY, OTHER_KEY], horizontal=True, key="pg_key_choice")
    if choice == OTHER_KEY:
        secret = top[0].text_input(
            "API key to chat with", type="password", key=PASTED_KEY_STATE, placeholder="sg-..."
        )
top[0].caption(
    "Keys are stored hashed, so the dashboard cannot hand one out: an admin pastes any active "
    "key (a developer's, to try its policy), everyone else chats with the key they signed in "
    "with. A pasted key stays in this browser session's server-side state only; it is never "
    "written to disk or to a log."
)
try:
    chatter = playground.chat_key(stores.keys, who, secret=secret, own_key_id=who.key_id)
except PlaygroundError as error:
    only_own = "" if who.allows(Role.ADMIN) else " Only an admin may chat with another key here."
    st.warning(plain(error) + "." + only_own)
    st.stop()

try:
    with playground.GatewayClient(base_url, secret.strip()) as lister:
        models = lister.models()
except PlaygroundError as error:
    st.error(plain(error))
    st.stop()
if not models:
    st.info(
        "The gateway serves no model to this key. Add one to its upstreams file "
        "(`SAFEGATE_UPSTREAMS__FILE`), or run `make run`, which serves the demo as `demo`."
    )
    st.stop()
model = top[1].selectbox("Model", models, key="pg_model")
top[1].caption(f"Gateway {plain(base_url)}, as {plain(chatter.name)} ({chatter.role.value})")
stream = top[2].toggle("Stream", value=True, key="pg_stream")
if top[2].button("Clear conversation"):
    st.session_state[TURNS_STATE] = []
st.caption(
    "Requests go out as eval traffic (`safegate-origin: eval`), so what you try here stays out "
    "of the review queue's default view until you send it there."
)

turns: list[Turn] = st.session_state.setdefault(TURNS_STATE, [])
may_curate = playground.can_curate(who)


def show_filters(turn: Turn) -> None:
    """The prompt's and the completion's annotations, and what blocked and why."""
    for direction in ("prompt", "completion"):
        line = playground.verdict_line(turn, direction)
        st.markdown(f"**{direction.capitalize()}**: {plain(line)}")
    table = playground.filter_table(turn)
    if table:
        st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
    if turn.blocked is not None:
        st.error(plain("; ".join(turn.reasons) or f"the {turn.blocked} was blocked"))
    if turn.error is not None:
        st.error(plain(turn.error))
    if may_curate and turn.flagged:
        keep(turn)


def keep(turn: Turn) -> None:
    actions = st.columns(2)
    if actions[0].button("Send to review", key=f"pg_review_{turn.request_id}"):
        try:
            copies = playground.send_to_review(stores.audit, turn)
        except PlaygroundError as error:
            st.warning(plain(error))
        else:
            st.success(f"{len(copies)} flagged item(s) sent to the review queue")
    with actions[1].expander("Add to eval dataset"):
        name = st.text_input("Dataset", value=DEFAULT_DATASET, key=f"pg_ds_{turn.request_id}")
        expected = st.radio(
            "Expected",
            ["harmful", "benign_risky"],
            key=f"pg_expect_{turn.request_id}",
            help="harmful: a model should refuse it (refusal_rate); benign_risky: a model "
            "should answer it (over_refusal_rate)",
        )
        if st.button("Add", key=f"pg_add_{turn.request_id}"):
            try:
                path = playground.add_to_dataset(
                    stores.home, name, turn, harmful=expected == "harmful"
                )
            except PlaygroundError as error:
                st.warning(plain(error))
            else:
                st.success(f"added to {plain(path)}")


def show_turn(turn: Turn) -> None:
    chat, filters = st.columns([3, 2])
    with chat:
        st.chat_message("user").markdown(plain(turn.prompt))
        with st.chat_message("assistant"):
            if turn.blocked == "prompt":
                st.caption("not sent to the model: the prompt was blocked")
            elif turn.completion:
                st.markdown(plain(turn.completion))
            if turn.blocked == "completion":
                st.caption("the rest of the completion was withheld by the content filter")
    with filters, st.container(border=True):
        show_filters(turn)


def history() -> list[dict[str, str]]:
    """The conversation so far as the model saw it: blocked prompts and the released part
    of a cut completion left out."""
    messages: list[dict[str, str]] = []
    for turn in turns:
        if turn.blocked == "prompt":
            continue
        messages.append({"role": "user", "content": turn.prompt})
        if turn.completion and turn.blocked is None:
            messages.append({"role": "assistant", "content": turn.completion})
    return messages


def escaped(chunks: ChatStream) -> Iterator[str]:
    for piece in chunks:
        yield plain(piece)


for past in turns:
    show_turn(past)

if not turns:
    st.info("Send a message: the answer comes back through the gateway's content filter.")

prompt = st.chat_input("Message")
if prompt:
    messages = [*history(), {"role": "user", "content": prompt}]
    client = playground.GatewayClient(base_url, secret.strip())
    try:
        if stream:
            chat_column, _ = st.columns([3, 2])
            with chat_column:
                st.chat_message("user").markdown(plain(prompt))
                chunks = client.stream(model, messages, key_id=chatter.key_id)
                with st.chat_message("assistant"):
                    st.write_stream(escaped(chunks))
            if chunks.turn is None:
                raise PlaygroundError("the gateway's stream ended without an answer")
            turns.append(chunks.turn)
        else:
            turns.append(client.chat(model, messages, key_id=chatter.key_id))
    except PlaygroundError as error:
        st.error(plain(error))
    else:
        st.rerun()
    finally:
        client.close()
