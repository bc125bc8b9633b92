"""The playground page through ``AppTest`` against a real gateway over HTTP (the real engine,
upstreams answered by litellm's ``mock_response``): answers and the filter's annotations,
blocks with their reasons, which keys may chat, and keeping a flagged exchange for review or
as an eval example."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import playground
from dashboard.playground import PlaygroundError
from dashboard.stores import Stores
from evals.datasets import load_datasets
from evals.suite import load_suite
from gateway.access import Principal, Role
from gateway.audit import ItemFilter
from gateway.config import Settings
from gateway.origin import EVAL_ORIGIN
from tests.dashboard.conftest import AppFactory, open_page, open_stores
from tests.dashboard.seed import Seeded
from tests.dashboard.served_gateway import (
    ANSWER,
    HATE,
    QUESTION,
    ServedGateway,
)
from tests.ports import free_port


@pytest.fixture
def gateway_env(served_gateway: ServedGateway, monkeypatch: pytest.MonkeyPatch) -> ServedGateway:
    monkeypatch.setenv(playground.GATEWAY_URL_VARIABLE, served_gateway.url)
    return served_gateway


def texts_on(app: AppTest) -> str:
    parts = [element.value for element in app.markdown]
    parts += [element.value for element in app.caption]
    parts += [element.value for element in app.error]
    return "\n".join(str(part) for part in parts)


def send(app: AppTest, text: str, *, stream: bool = True, model: str = "support") -> AppTest:
    app.selectbox(key="pg_model").select(model).run()
    app.toggle(key="pg_stream").set_value(stream).run()
    app.chat_input[0].set_value(text).run()
    assert not app.exception, [error.value for error in app.exception]
    return app


def filter_table(app: AppTest) -> dict[str, tuple[str, str]]:
    """The last turn's annotations as shown: category -> (prompt, completion)."""
    frame = app.dataframe[-1].value
    return {row["category"]: (row["prompt"], row["completion"]) for row in frame.to_dict("records")}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_benign_message_gets_the_answer_and_safe_annotations(
    gateway_env: ServedGateway, fresh: Seeded, make_app: AppFactory, stream: bool
) -> None:
    app = open_page(make_app(fresh.home, fresh.admin_key), "playground")
    assert [t.value for t in app.title] == ["Playground"]
    assert app.selectbox(key="pg_model").options == ["support", "hateful"]  # GET /v1/models
    send(app, QUESTION, stream=stream)
    shown = texts_on(app)
    assert ANSWER in shown
    assert "**Prompt**: safe" in shown
    assert "**Completion**: safe" in shown
    table = filter_table(app)
    assert table["hate"] == ("safe", "safe")
    assert table["violence"] == ("safe", "safe")
    assert table["jailbreak"] == ("not detected", "-")  # a prompt shield
    assert table["custom_blocklists"] == ("no hit", "no hit")
    assert not app.error
    assert not [b for b in app.button if b.label == "Send to review"]  # nothing flagged


def test_a_harmful_prompt_shows_blocked_with_its_category_and_reason(
    gateway_env: ServedGateway, fresh: Seeded, make_app: AppFactory
) -> None:
    app = open_page(make_app(fresh.home, fresh.admin_key), "playground")
    send(app, HATE)
    shown = texts_on(app)
    assert "**Prompt**: blocked: hate (" in shown
    assert "not sent to the model: the prompt was blocked" in shown
    reason = app.error[0].value.replace("\\", "")  # as shown: Markdown escapes removed
    assert "content filter" in reason
    assert "hate" in reason
    assert "messages[0]" in reason
    assert filter_table(app)["hate"] in {("medium, filtered", "-"), ("high, filtered", "-")}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_harmful_completion_is_cut_and_shown_blocked(
    gateway_env: ServedGateway, fresh: Seeded, make_app: AppFactory, stream: bool
) -> None:
    app = open_page(make_app(fresh.home, fresh.admin_key), "playground")
    send(app, QUESTION, model="hateful", stream=stream)
    shown = texts_on(app)
    assert "**Prompt**: safe" in shown
    assert "**Completion**: blocked: hate (" in shown
    assert "withheld by the content filter" in shown
    assert HATE not in shown  # nothing of a blocked completion reaches the page
    assert filter_table(app)["hate"][0] == "safe"
    assert filter_table(app)["hate"][1] in {"medium, filtered", "high, filtered"}
    assert "hate" in app.error[0].value


def test_a_flagged_exchange_sent_to_review_appears_in_the_review_queue(
    gateway_env: ServedGateway, fresh: Seeded, make_app: AppFactory
) -> None:
    app = open_page(make_app(fresh.home, fresh.admin_key), "playground")
    send(app, HATE)
    stores = open_stores(fresh.home)
    try:
        default_view = ItemFilter(hide_eval=True)
        before = {s.item.id for s in stores.audit.list_items(default_view, limit=500).items}
        eval_items = stores.audit.list_items(ItemFilter(origin=EVAL_ORIGIN), limit=500).items
        recorded = [s.item for s in eval_items if s.item.text == HATE]
        assert len(recorded) == 1  # the gateway's own record, as eval traffic: not in the queue
        assert recorded[0].id not in before

        next(b for b in app.button if b.label == "Send to review").click().run()
        assert "1 flagged item(s) sent to the review queue" in [s.value for s in app.success]
        after = stores.audit.list_items(default_view, limit=500).items
        sent = [s.item for s in after if s.item.id not in before]
    finally:
        stores.close()
    next(b for b in app.button if b.label == "Send to review").click().run()  # once is enough
    assert "already in the review queue" in app.warning[0].value
    assert len(sent) == 1
    item = sent[0]
    assert item.text == HATE
    assert item.origin == playground.PLAYGROUND_ORIGIN
    assert item.request_id == recorded[0].request_id
    assert item.key_id == fresh.admin_id
    assert "hate" in item.categories
    assert item.action == "block"
    assert item.scores == recorded[0].scores


def test_a_flagged_exchange_added_to_an_eval_dataset_lands_in_the_file(
    gateway_env: ServedGateway, fresh: Seeded, make_app: AppFactory, tmp_path: Path
) -> None:
    app = open_page(make_app(fresh.home, fresh.admin_key), "playground")
    send(app, QUESTION, model="hateful")
    app.text_input(key=next(k.key for k in app.text_input if k.key.startswith("pg_ds_"))).input(
        "hate-cases"
    ).run()
    next(b for b in app.button if b.label == "Add").click().run()
    path = fresh.home / "eval-datasets" / "hate-cases.jsonl"
    assert any(str(path) in s.value for s in app.success)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1
    assert rows[0]["messages"] == [{"role": "user", "content": QUESTION}]
    labels = rows[0]["labels"]
    assert labels["harmful"] is True
    assert labels["blocked"] == "completion"
    assert "hate" in labels["categories"]
    assert labels["model"] == "hateful"

    next(b for b in app.button if b.label == "Add").click().run()  # the same exchange again
    assert "already in hate-cases" in app.warning[0].value
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1

    # a suite loads it as a chat dataset
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(
        "name: playground\n"
        f"datasets: [{{name: hate-cases, path: {path}, format: chat}}]\n"
        "models: [{name: m, via: litellm, model: openai/m, params: {mock_response: ok}}]\n"
        "metrics: [refusal_rate]\n",
        encoding="utf-8",
    )
    [dataset] = load_datasets(load_suite(suite_file))
    assert dataset.samples[0].labels["harmful"] is True
    assert dataset.samples[0].messages[0]["content"] == QUESTION


def test_an_admin_chats_with_a_pasted_developer_key(
    gateway_env: ServedGateway, fresh: Seeded, make_app: AppFactory
) -> None:
    app = open_page(make_app(fresh.home, fresh.admin_key), "playground")
    app.radio(key="pg_key_choice").set_value("Another key (paste it)").run()
    assert "paste an API key" in app.warning[0].value
    app.text_input(key="playground_pasted_key").input(fresh.revoked_key).run()
    assert "revoked" in app.warning[0].value
    app.text_input(key="playground_pasted_key").input(fresh.developer_key).run()
    assert "as app-developer (developer)" in texts_on(app)
    send(app, QUESTION)
    assert ANSWER in texts_on(app)


def test_a_reviewer_may_chat_only_with_their_own_key_which_cannot_chat(
    gateway_env: ServedGateway, fresh: Seeded, make_app: AppFactory
) -> None:
    app = open_page(make_app(fresh.home, fresh.reviewer_key), "playground")
    assert not app.radio  # no other key to choose
    assert "alice-reviewer is a reviewer key; chat needs a developer or admin key" in (
        app.warning[0].value
    )
    assert "Only an admin may chat with another key here." in app.warning[0].value
    assert not app.chat_input


def test_key_rules_and_dataset_names() -> None:
    def of(role: Role) -> Principal:
        return Principal(key_id="k", name="n", role=role, policy=None, rate_limit_rpm=None)

    assert playground.can_curate(of(Role.ADMIN))
    assert playground.can_curate(of(Role.REVIEWER))
    assert not playground.can_curate(of(Role.DEVELOPER))
    for bad in ("", "../x", "a/b", "x.jsonl", "-lead", "a" * 65):
        with pytest.raises(PlaygroundError, match="dataset name"):
            playground.dataset_path(Path("/home"), bad)
    assert playground.dataset_path(Path("/h"), "hate_cases-1") == Path(
        "/h/eval-datasets/hate_cases-1.jsonl"
    )


@pytest.mark.parametrize(
    ("environ", "host", "expected"),
    [
        ({}, "127.0.0.1", "http://127.0.0.1:8123"),
        ({}, "0.0.0.0", "http://127.0.0.1:8123"),  # noqa: S104 - a setting's value
        ({}, "::1", "http://[::1]:8123"),
        ({"SAFEGATE_GATEWAY_URL": "https://gw.example/ "}, "127.0.0.1", "https://gw.example"),
    ],
)
def test_the_gateway_url_follows_the_settings(
    environ: dict[str, str], host: str, expected: str
) -> None:
    settings = Settings(host=host, port=8123)
    assert playground.gateway_url(settings, environ) == expected


def test_a_gateway_url_without_a_scheme_is_refused() -> None:
    with pytest.raises(PlaygroundError, match="must start with http"):
        playground.gateway_url(Settings(), {"SAFEGATE_GATEWAY_URL": "gw:8000"})


# -- the client against a gateway replaced at its seam (httpx.MockTransport) -------------------


def sse(*events: object) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )


SAFE = {"hate": {"filtered": False, "severity": "safe"}}
HATE_HIGH = {"hate": {"filtered": True, "severity": "high"}}


def client_of(handler: Callable[[httpx.Request], httpx.Response]) -> playground.GatewayClient:
    transport = httpx.MockTransport(handler)
    return playground.GatewayClient("http://gw", "sg-secret", transport=transport)


def test_a_stream_yields_each_released_part_and_keeps_the_last_annotations() -> None:
    seen: list[httpx.Request] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        seen.append(request)

        def part(text: str) -> dict[str, object]:
            choice = {"index": 0, "delta": {"content": text}, "content_filter_results": SAFE}
            return {"choices": [choice]}

        cut = {
            "index": 0,
            "delta": {},
            "finish_reason": "content_filter",
            "content_filter_results": HATE_HIGH,
            "content_filter_reasons": ["completion flagged for hate"],
        }
        body = sse(
            {"choices": [], "prompt_filter_results": [{"content_filter_results": SAFE}]},
            part("Hold the "),
            part("button."),
            {"choices": [cut]},
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with client_of(gateway) as client:
        stream = client.stream("m", [{"role": "user", "content": "hi"}], key_id="key_1")
        assert list(stream) == ["Hold the ", "button."]
    turn = stream.turn
    assert turn is not None
    assert turn.completion == "Hold the button."
    assert turn.blocked == "completion"
    assert turn.reasons == ("completion flagged for hate",)
    assert turn.completion_results == HATE_HIGH
    assert playground.verdict_line(turn, "completion") == "blocked: hate (high)"
    assert playground.verdict_line(turn, "prompt") == "safe"
    request = seen[0]
    assert request.headers["authorization"] == "Bearer sg-secret"
    assert request.headers["safegate-origin"] == EVAL_ORIGIN
    assert request.headers["x-request-id"] == turn.request_id
    assert json.loads(request.content)["stream"] is True


def test_a_stream_the_gateway_ends_with_an_error_keeps_what_came_and_says_why() -> None:
    def gateway(request: httpx.Request) -> httpx.Response:
        body = sse(
            {"choices": [{"index": 0, "delta": {"content": "Partial"}}]},
            {"error": {"message": "upstream failed mid-stream", "code": "upstream_error"}},
        )
        return httpx.Response(200, content=body)

    with client_of(gateway) as client:
        stream = client.stream("m", [{"role": "user", "content": "hi"}], key_id="key_1")
        assert list(stream) == ["Partial"]
    assert stream.turn is not None
    assert stream.turn.error == "upstream failed mid-stream"

    def garbled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(b"<html>maintenance</html>"))

    with client_of(garbled) as client, pytest.raises(PlaygroundError, match="not JSON"):
        list(client.stream("m", [{"role": "user", "content": "hi"}], key_id="key_1"))


def test_gateway_refusals_and_absence_are_errors_to_show() -> None:
    def forbidden(request: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "this route needs the developer role", "code": "forbidden"}}
        return httpx.Response(403, json=body)

    with client_of(forbidden) as client:
        with pytest.raises(PlaygroundError, match="answered 403: this route needs the developer"):
            client.models()
        with pytest.raises(PlaygroundError, match="answered 403"):
            list(client.stream("m", [{"role": "user", "content": "hi"}], key_id="key_1"))
    with (
        playground.GatewayClient(f"http://127.0.0.1:{free_port()}", "sg-secret") as absent,
        pytest.raises(PlaygroundError, match="not be reached.*SAFEGATE_GATEWAY_URL") as raised,
    ):
        absent.models()
    assert "sg-secret" not in str(raised.value)


def test_only_an_admin_may_chat_with_a_key_not_their_own(
    fresh: Seeded, stores_of: Callable[[Path], Stores]
) -> None:
    keys = stores_of(fresh.home).keys
    reviewer = keys.authenticate(fresh.reviewer_key)
    admin = keys.authenticate(fresh.admin_key)
    with pytest.raises(PlaygroundError, match="only an admin may chat with a key other than"):
        playground.chat_key(keys, reviewer, secret=fresh.developer_key, own_key_id=reviewer.key_id)
    developer = playground.chat_key(
        keys, admin, secret=f" {fresh.developer_key}\n", own_key_id=admin.key_id
    )
    assert (developer.name, developer.role) == ("app-developer", Role.DEVELOPER)
    with pytest.raises(PlaygroundError, match="a reviewer key; chat needs a developer or admin"):
        playground.chat_key(keys, admin, secret=fresh.reviewer_key, own_key_id=admin.key_id)
