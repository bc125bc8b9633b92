"""The chat playground's logic: talk to the gateway over HTTP, read its content filter
annotations, and keep what a tester picks (the review queue, an eval dataset).

The gateway
    :func:`gateway_url`: ``SAFEGATE_GATEWAY_URL`` when set, else the address ``safegate
    serve`` listens on by the same settings (``SAFEGATE_HOST``/``SAFEGATE_PORT``, a wildcard
    host reached on 127.0.0.1). :class:`GatewayClient` lists models (``GET /v1/models``)
    and chats (``POST /v1/chat/completions``, plain or streamed), every call bounded by
    :data:`DEFAULT_TIMEOUT`. Each request carries ``safegate-origin: eval``: a tester's
    harmful prompts are test traffic, kept out of the review queue's and the traffic page's
    default views as ``safegate eval run``'s are, and an ``x-request-id`` the page chose, so
    the gateway's audit records of a turn can be found again.

Keys
    Keys are stored hashed, so the dashboard cannot hand one out: :func:`chat_key` checks
    a key the user supplies. An admin may chat with any active key (a developer's, to try
    its policy); anyone else only with the key they signed in with. The page keeps it in
    the Streamlit session only; nothing here writes or logs it.

Annotations
    :class:`Turn` is one exchange as the gateway answered it: the prompt's and the
    completion's Azure-style ``content_filter_results``, what was blocked (``prompt``: the
    400 ``content_filter`` error; ``completion``: ``finish_reason: content_filter``) and
    the gateway's words why. :func:`filter_table` and :func:`verdict_line` turn them into
    what the page shows.

Keeping an exchange (reviewers and admins, :func:`can_curate`)
    :func:`send_to_review` stores the gateway's own flagged items of the turn again with
    origin ``playground`` through ``AuditStore.record`` (the store the gateway writes), so
    reviewers see them in the default queue. :func:`add_to_dataset` appends the turn as a
    chat-format eval row (``evals.datasets``) with its flag labels to
    ``SAFEGATE_HOME/eval-datasets/NAME.jsonl`` (0600: it holds the raw text).

Errors: :class:`PlaygroundError` carries a message fit to show (the gateway's own, or what
could not be reached); it never quotes a key or a prompt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx

from gateway.access import KeyStore, Principal, Role
from gateway.audit import AuditStore, FlaggedItem, ItemFilter
from gateway.config import Settings
from gateway.errors import ApiError
from gateway.origin import EVAL_ORIGIN, ORIGIN_HEADER
from safegate.database import PRIVATE_FILE_MODE, private_directory

log = logging.getLogger("safegate.dashboard")

GATEWAY_URL_VARIABLE: Final = "SAFEGATE_GATEWAY_URL"
DEFAULT_TIMEOUT: Final = httpx.Timeout(60.0, connect=5.0)  # a stream's gap between chunks
REQUEST_ID_HEADER: Final = "x-request-id"
PLAYGROUND_ORIGIN: Final = "playground"  # what "Send to review" stores items under
DATASETS_DIRNAME: Final = "eval-datasets"
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - matched, not bound


class PlaygroundError(Exception):
    """Something the page shows as an error: the gateway's message, or why it is unreachable."""


def gateway_url(settings: Settings, environ: Mapping[str, str] = os.environ) -> str:
    """Where the gateway listens: ``SAFEGATE_GATEWAY_URL``, else ``safegate serve``'s address."""
    configured = environ.get(GATEWAY_URL_VARIABLE, "").strip()
    if configured:
        if not configured.startswith(("http://", "https://")):
            raise PlaygroundError(f"{GATEWAY_URL_VARIABLE} must start with http:// or https://")
        return configured.rstrip("/")
    host = "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


# -- keys and roles ----------------------------------------------------------------------------


def chat_key(keys: KeyStore, signed_in: Principal, *, secret: str, own_key_id: str) -> Principal:
    """The principal of ``secret`` if ``signed_in`` may chat with it, else ``PlaygroundError``.

    An admin may use any active key that may chat (developer or admin); anyone else only
    the key they signed in with (``own_key_id``), which must itself be allowed to chat.
    """
    secret = secret.strip()
    if not secret:
        raise PlaygroundError("paste an API key")
    try:
        principal = keys.authenticate(secret)
    except ApiError as error:
        raise PlaygroundError(error.message) from None
    if principal.key_id != own_key_id and not signed_in.allows(Role.ADMIN):
        raise PlaygroundError("only an admin may chat with a key other than their own")
    if not principal.allows(Role.DEVELOPER):
        raise PlaygroundError(
            f"{principal.name} is a {principal.role.value} key; chat needs a developer or admin key"
        )
    return principal


def can_curate(principal: Principal) -> bool:
    """Whether ``principal`` may send exchanges to review and add them to eval datasets."""
    return principal.allows(Role.REVIEWER)


# -- one exchange ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Turn:
    """One exchange as the gateway answered it."""

    request_id: str
    model: str
    key_id: str
    messages: tuple[Mapping[str, str], ...]  # what was sent, the new user message last
    started: datetime
    completion: str | None = None  # None: withheld, or never asked for (prompt blocked)
    finish_reason: str | None = None
    prompt_results: Mapping[str, Any] | None = None
    completion_results: Mapping[str, Any] | None = None
    blocked: str | None = None  # "prompt" | "completion"
    reasons: tuple[str, ...] = ()  # the gateway's words on what blocked and why
    error: str | None = None  # a stream the gateway ended with an error event

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]

    @property
    def flagged(self) -> bool:
        """Whether the filter flagged (blocked or annotated) anything in this exchange."""
        return self.blocked is not None or any(
            _flagged(results) for results in (self.prompt_results, self.completion_results)
        )

    @property
    def categories(self) -> tuple[str, ...]:
        """Every annotation that is filtered or above ``safe``, over prompt and completion."""
        found: list[str] = []
        for results in (self.prompt_results, self.completion_results):
            for name, entry in (results or {}).items():
                if _entry_flagged(entry) and name not in found:
                    found.append(name)
        return tuple(found)


def _entry_flagged(entry: object) -> bool:
    if not isinstance(entry, Mapping):
        return False
    return bool(
        entry.get("filtered")
        or entry.get("detected") is True
        or entry.get("severity", "safe") != "safe"
        or entry.get("low_confidence")
    )


def _flagged(results: Mapping[str, Any] | None) -> bool:
    return any(_entry_flagged(entry) for entry in (results or {}).values())


def filter_rows(results: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """One row per annotation: category, whether it was filtered, and what was found."""
    rows: list[dict[str, str]] = []
    for name, entry in (results or {}).items():
        if not isinstance(entry, Mapping):
            continue
        if "severity" in entry:
            found = str(entry["severity"])
        elif name == "custom_blocklists":
            hits = [str(d.get("id")) for d in entry.get("details", ()) if isinstance(d, Mapping)]
            found = ", ".join(hits) if hits else "no hit"
        elif name == "language":
            found = str(entry.get("detected") or "unknown")
            if entry.get("low_confidence"):
                found += " (low confidence)"
        else:
            found = "detected" if entry.get("detected") else "not detected"
            kinds = entry.get("kinds")
            if kinds:
                found += f" ({', '.join(map(str, kinds))})"
        rows.append(
            {"category": name, "filtered": "yes" if entry.get("filtered") else "no", "found": found}
        )
    return rows


def filter_table(turn: Turn) -> list[dict[str, str]]:
    """The prompt's and the completion's annotations side by side, one row per category:
    what was found, ``, filtered`` when that blocked; ``-`` where a side was not checked."""
    sides = {
        direction: {row["category"]: row for row in filter_rows(results)}
        for direction, results in (
            ("prompt", turn.prompt_results),
            ("completion", turn.completion_results),
        )
    }
    names = [*sides["prompt"], *(n for n in sides["completion"] if n not in sides["prompt"])]
    table = []
    for name in names:
        row = {"category": name}
        for direction, rows in sides.items():
            cell = rows.get(name)
            row[direction] = (
                "-"
                if cell is None
                else cell["found"] + (", filtered" if cell["filtered"] == "yes" else "")
            )
        table.append(row)
    return table


def verdict_line(turn: Turn, direction: str) -> str:
    """``safe``, ``flagged: hate (medium), pii`` or ``blocked: hate (high)`` for a direction."""
    results = turn.prompt_results if direction == "prompt" else turn.completion_results
    if results is None:
        return "not checked" if turn.blocked == "prompt" else "no annotations"
    named = []
    for name, entry in results.items():
        if _entry_flagged(entry):
            severity = entry.get("severity") if isinstance(entry, Mapping) else None
            named.append(f"{name} ({severity})" if severity not in (None, "safe") else name)
    if turn.blocked == direction:
        return "blocked: " + (", ".join(named) or "by policy")
    return "flagged: " + ", ".join(named) if named else "safe"


# -- the gateway over HTTP ----------------------------------------------------------------


class GatewayClient:
    """The gateway's chat API with one key; a call never waits past ``timeout``."""

    def __init__(
        self,
        base_url: str,
        secret: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._client = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {secret}", ORIGIN_HEADER: EVAL_ORIGIN},
        )
        self.base_url = base_url

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def models(self) -> list[str]:
        """The models the gateway serves to this key (``GET /v1/models``), in its order."""
        response = self._send("GET", "/v1/models")
        data = _json(response).get("data")
        if not isinstance(data, list):
            raise PlaygroundError("the gateway's model list is not an OpenAI model list")
        return [str(model["id"]) for model in data if isinstance(model, Mapping)]

    def chat(self, model: str, messages: Sequence[Mapping[str, str]], *, key_id: str) -> Turn:
        """One unstreamed exchange; a blocked prompt is a ``Turn``, other failures raise."""
        turn = _new_turn(model, messages, key_id=key_id)
        response = self._send(
            "POST",
            "/v1/chat/completions",
            json={"model": model, "messages": list(turn.messages)},
            headers={REQUEST_ID_HEADER: turn.request_id},
            blocked_ok=True,
        )
        body = _json(response)
        if response.status_code != httpx.codes.OK:
            return _prompt_blocked(turn, body)
        choices = body.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], Mapping) else {}
        message = choice.get("message") or {}
        finish = choice.get("finish_reason")
        return replace(
            turn,
            completion=message.get("content") if isinstance(message, Mapping) else None,
            finish_reason=finish,
            prompt_results=_prompt_results(body.get("prompt_filter_results")),
            completion_results=choice.get("content_filter_results"),
            blocked="completion" if finish == "content_filter" else None,
            reasons=tuple(choice.get("content_filter_reasons") or ()),
        )

    def stream(
        self, model: str, messages: Sequence[Mapping[str, str]], *, key_id: str
    ) -> ChatStream:
        """A streamed exchange: iterate it for the released text, then read ``.turn``."""
        return ChatStream(self, _new_turn(model, messages, key_id=key_id))

    def open_stream(self, body: object, *, headers: Mapping[str, str]) -> httpx.Response:
        """The streamed response's head (its body not yet read); the caller closes it."""
        request = self._client.build_request(
            "POST", "/v1/chat/completions", json=body, headers=headers
        )
        try:
            return self._client.send(request, stream=True)
        except httpx.HTTPError as error:
            raise _unreachable(self.base_url, error) from None

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        headers: Mapping[str, str] | None = None,
        blocked_ok: bool = False,
    ) -> httpx.Response:
        try:
            response = self._client.request(method, path, json=json, headers=headers)
        except httpx.HTTPError as error:
            raise _unreachable(self.base_url, error) from None
        _raise_for_error(response, blocked_ok=blocked_ok)
        return response


@dataclass
class ChatStream:
    """A streamed exchange: yields the text as the gateway releases it; ``turn`` after."""

    client: GatewayClient
    started_turn: Turn
    turn: Turn | None = None
    _text: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[str]:
        turn = self.started_turn
        body = {"model": turn.model, "messages": list(turn.messages), "stream": True}
        headers = {REQUEST_ID_HEADER: turn.request_id}
        response = self.client.open_stream(body, headers=headers)
        try:
            if response.status_code != httpx.codes.OK:
                response.read()
                _raise_for_error(response, blocked_ok=True)
                self.turn = _prompt_blocked(turn, _json(response))
                return
            yield from self._events(response)
        except httpx.HTTPError as error:
            raise _unreachable(self.client.base_url, error) from None
        finally:
            response.close()

    def _events(self, response: httpx.Response) -> Iterator[str]:
        turn = self.started_turn
        prompt_results: Mapping[str, Any] | None = None
        # Each released part carries its check's annotations; the final chunk carries the
        # whole completion's (or, when cut, the check that cut it): the last one wins.
        windows: list[Mapping[str, Any]] = []
        finish: str | None = None
        reasons: tuple[str, ...] = ()
        error: str | None = None
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            try:
                event = json.loads(line[len("data: ") :])
            except ValueError:
                raise PlaygroundError("the gateway sent a stream event that is not JSON") from None
            if "error" in event:
                error = str(event["error"].get("message", "the stream ended with an error"))
                break
            if "prompt_filter_results" in event:
                prompt_results = _prompt_results(event["prompt_filter_results"])
            for choice in event.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                if choice.get("content_filter_results"):
                    windows.append(choice["content_filter_results"])
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    reasons = tuple(choice.get("content_filter_reasons") or ())
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    self._text.append(piece)
                    yield piece
        self.turn = replace(
            turn,
            completion="".join(self._text),
            finish_reason=finish,
            prompt_results=prompt_results,
            completion_results=windows[-1] if windows else None,
            blocked="completion" if finish == "content_filter" else None,
            reasons=reasons,
            error=error,
        )


def _new_turn(model: str, messages: Sequence[Mapping[str, str]], *, key_id: str) -> Turn:
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("the last message must be the user's")
    return Turn(
        request_id=f"playground-{uuid.uuid4().hex}",
        model=model,
        key_id=key_id,
        messages=tuple({"role": m["role"], "content": m["content"]} for m in messages),
        started=datetime.now(UTC),
    )


def _prompt_blocked(turn: Turn, body: Mapping[str, Any]) -> Turn:
    error = body.get("error") or {}
    inner = error.get("innererror") or {}
    return replace(
        turn,
        prompt_results=inner.get("content_filter_result"),
        blocked="prompt",
        reasons=(str(error.get("message", "the prompt was blocked")),),
    )


def _prompt_results(value: object) -> Mapping[str, Any] | None:
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
        results = value[0].get("content_filter_results")
        return results if isinstance(results, Mapping) else None
    return None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise PlaygroundError(
            f"the gateway answered {response.status_code} with a body that is not JSON"
        ) from None
    if not isinstance(body, dict):
        raise PlaygroundError(f"the gateway answered {response.status_code} with unexpected JSON")
    return body


def _raise_for_error(response: httpx.Response, *, blocked_ok: bool) -> None:
    if response.status_code == httpx.codes.OK:
        return
    error = _json(response).get("error")
    if not isinstance(error, Mapping):
        raise PlaygroundError(f"the gateway answered {response.status_code}")
    if blocked_ok and response.status_code == 400 and error.get("code") == "content_filter":
        return
    raise PlaygroundError(f"the gateway answered {response.status_code}: {error.get('message')}")


def _unreachable(base_url: str, error: httpx.HTTPError) -> PlaygroundError:
    return PlaygroundError(
        f"the gateway at {base_url} could not be reached ({type(error).__name__}); start it "
        f"with `make run`, or point {GATEWAY_URL_VARIABLE} at it"
    )


# -- keeping an exchange ------------------------------------------------------------------


def send_to_review(audit: AuditStore, turn: Turn) -> list[FlaggedItem]:
    """Store the gateway's flagged items of ``turn`` again under origin ``playground``,
    visible in the review queue's default view; returns the stored copies.

    The gateway recorded them as eval traffic (the playground sends ``safegate-origin:
    eval``); the copies keep their request id, key, scores, severities, action and reasons.
    """
    if not turn.flagged:
        raise PlaygroundError("nothing in this exchange was flagged")
    if _items_of(audit, turn, origin=PLAYGROUND_ORIGIN):
        raise PlaygroundError("this exchange is already in the review queue")
    found = _items_of(audit, turn, origin=EVAL_ORIGIN)
    if not found:
        raise PlaygroundError(
            "the gateway's record of this exchange is not in the database yet (it may wait "
            "in the audit spool while the database is busy); try again in a few seconds"
        )
    copies = [
        replace(item, id=uuid.uuid4().hex, created_at=datetime.now(UTC), origin=PLAYGROUND_ORIGIN)
        for item in sorted(found, key=lambda item: item.created_at)
    ]
    asyncio.run(audit.record(copies))
    log.info(  # ids and counts only: never the text
        "playground exchange sent to review",
        extra={"request_id": turn.request_id, "key_id": turn.key_id, "items": len(copies)},
    )
    return copies


def _items_of(audit: AuditStore, turn: Turn, *, origin: str) -> list[FlaggedItem]:
    """The flagged items of ``turn``'s request stored under ``origin`` (one indexed query
    on the request id, a page at a time)."""
    where = ItemFilter(key_id=turn.key_id, origin=origin, request_id=turn.request_id)
    found: list[FlaggedItem] = []
    cursor: str | None = None
    while True:
        page = audit.list_items(where, limit=100, cursor=cursor)
        found += [stored.item for stored in page.items]
        if not page.has_more:
            return found
        cursor = page.next_cursor


def dataset_path(home: Path, name: str) -> Path:
    """``SAFEGATE_HOME/eval-datasets/NAME.jsonl``; a name is letters, digits, ``_`` and ``-``."""
    if not DATASET_NAME.fullmatch(name):
        raise PlaygroundError(
            "a dataset name is 1 to 64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return home / DATASETS_DIRNAME / f"{name}.jsonl"


def eval_row(turn: Turn, *, harmful: bool) -> dict[str, Any]:
    """The exchange as a chat-format eval row (``evals.datasets``): the messages sent, and
    labels a suite reads (``harmful`` or ``benign_risky``) with what the filter did."""
    return {
        "id": turn.request_id,
        "messages": [dict(message) for message in turn.messages],
        "labels": {
            "harmful" if harmful else "benign_risky": True,
            "categories": list(turn.categories),
            "blocked": turn.blocked,
            "model": turn.model,
            "source": PLAYGROUND_ORIGIN,
        },
    }


def add_to_dataset(home: Path, name: str, turn: Turn, *, harmful: bool) -> Path:
    """Append ``turn`` as one row to the named dataset (made 0600 in a 0700 folder)."""
    path = dataset_path(home, name)
    private_directory(path.parent, what="eval datasets folder")
    if path.exists():
        with path.open(encoding="utf-8") as existing:
            for line in existing:
                if line.strip() and json.loads(line).get("id") == turn.request_id:
                    raise PlaygroundError(f"this exchange is already in {name}")
    line = json.dumps(eval_row(turn, harmful=harmful), ensure_ascii=False) + "\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
    with os.fdopen(descriptor, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    log.info(
        "playground exchange added to an eval dataset",
        extra={"request_id": turn.request_id, "dataset": name},
    )
    return path
