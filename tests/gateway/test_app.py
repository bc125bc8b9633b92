"""The app's HTTP edges: API docs behind a key, a readiness probe without paths, the body
size limit however the body arrives, and an OpenAPI document that promises what is sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.access import Role
from gateway.app import create_app
from gateway.blocklists import BlocklistStore
from gateway.config import Settings
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.members import MemberLoadError
from gateway.safety.policy import Policy
from tests.gateway.conftest import READY_TIMEOUT_S, EngineFactory, issue_key, ready_client

DOC_PATHS = ("/openapi.json", "/docs", "/redoc")
SECRET_DIR = "/srv/operator-home/.safegate"


@pytest.fixture
def docs_client(settings: Settings, engine_factory: EngineFactory) -> Iterator[TestClient]:
    client = ready_client(settings.model_copy(update={"api_docs": True}), engine_factory)
    yield client
    client.__exit__(None, None, None)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- API docs ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOC_PATHS)
def test_api_docs_are_off_by_default(client: TestClient, path: str) -> None:
    response = client.get(path)  # with the admin key: off means off for everyone
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("path", DOC_PATHS)
def test_api_docs_when_on_need_a_key(docs_client: TestClient, path: str) -> None:
    del docs_client.headers["Authorization"]
    missing = docs_client.get(path)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = docs_client.get(path, headers=bearer("sg-" + "x" * 43))
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("role", list(Role))
def test_api_docs_when_on_answer_any_role(docs_client: TestClient, role: Role) -> None:
    headers = bearer(issue_key(docs_client, role))
    document = docs_client.get("/openapi.json", headers=headers)
    assert document.status_code == 200
    assert document.json()["info"]["title"] == "safegate"
    assert "/v1/moderations" in document.json()["paths"]
    assert not any(path in document.json()["paths"] for path in DOC_PATHS)

    for page, marker in [("/docs", "SwaggerUIBundle"), ("/redoc", "Redoc.init")]:
        response = docs_client.get(page, headers=headers)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert marker in response.text
        # The document is inline: a browser fetching /openapi.json would send no key.
        assert '"/v1/moderations"' in response.text
        assert "'/openapi.json'" not in response.text


# -- readiness ---------------------------------------------------------------------------


def test_readyz_names_the_members_and_nothing_else(client: TestClient) -> None:
    del client.headers["Authorization"]  # open, like /healthz
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"status", "members"}
    assert body["status"] == "ready"
    assert body["members"] == [
        "encoder",
        "multilingual",
        "language",
        "profanity",
        "pii",
        "blocklist",
    ]


def test_readyz_of_a_failed_engine_says_why_without_paths(settings: Settings) -> None:
    def missing_heads(app_settings: Settings, store: BlocklistStore) -> SafetyEngine:
        raise MemberLoadError(
            f"encoder: cannot read {SECRET_DIR}/heads.safetensors: no such file "
            f"(cache ~/.cache/safegate, relative weights/heads.json)"
        )

    with TestClient(create_app(settings, engine_factory=missing_heads)) as client:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (body := client.get("/readyz").json())["status"] == "loading":
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
        response = client.get("/readyz")
        key = issue_key(client, Role.DEVELOPER)
        refused = client.post("/v1/moderations", json={"input": "hi"}, headers=bearer(key))

    assert response.status_code == 503
    assert response.json() == {
        "status": "failed",
        "error": "MemberLoadError: encoder: cannot read <path>: no such file "
        "(cache <path>, relative <path>)",
    }
    assert refused.status_code == 503
    assert SECRET_DIR not in refused.text
    assert "<path>" in refused.json()["error"]["message"]


def test_readyz_while_loading_says_only_loading(settings: Settings) -> None:
    release = threading.Event()

    def slow(app_settings: Settings, store: BlocklistStore) -> SafetyEngine:
        release.wait(timeout=READY_TIMEOUT_S)
        raise MemberLoadError("released")

    with TestClient(create_app(settings, engine_factory=slow)) as client:
        try:
            response = client.get("/readyz")
        finally:
            release.set()
    assert (response.status_code, response.json()) == (503, {"status": "loading"})


# -- body size ---------------------------------------------------------------------------

CHUNK_BYTES = 64 * 1024


def chunked_json(total_bytes: int, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A moderation body of about ``total_bytes``, sent in chunks with no Content-Length."""
    yield b'{"input": "'
    sent = 0
    while sent < total_bytes:
        yield b"word " * (chunk_bytes // 5)
        sent += chunk_bytes
    yield b'"}'


@pytest.mark.parametrize("path", ["/v1/moderations", "/v1/chat/completions"])
def test_a_chunked_body_over_the_limit_is_a_413_with_a_code(
    client: TestClient, settings: Settings, path: str
) -> None:
    response = client.post(
        path,
        content=chunked_json(settings.max_body_bytes + CHUNK_BYTES),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json() == {
        "error": {
            "message": f"request body exceeds {settings.max_body_bytes} bytes "
            "(SAFEGATE_MAX_BODY_BYTES)",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }


def test_a_chunked_body_under_the_limit_is_read(client: TestClient) -> None:
    response = client.post(
        "/v1/moderations",
        content=chunked_json(20_000, chunk_bytes=2_000),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["flagged"] is False


def test_a_declared_length_over_the_limit_is_a_413_before_the_route(
    client: TestClient, settings: Settings
) -> None:
    body = b'{"input": "' + b"x" * settings.max_body_bytes + b'"}'
    response = client.post(
        "/v1/moderations", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


# -- the OpenAPI document ----------------------------------------------------------------


def test_openapi_promises_400_not_422_and_documents_the_errors(docs_client: TestClient) -> None:
    response = docs_client.get("/openapi.json")
    assert response.status_code == 200
    assert "422" not in response.text
    assert "HTTPValidationError" not in response.text
    document = response.json()
    error_ref = {"$ref": "#/components/schemas/Error"}
    assert document["components"]["schemas"]["Error"]["required"] == ["error"]
    for path in ("/v1/moderations", "/v1/chat/completions"):
        responses = document["paths"][path]["post"]["responses"]
        assert {"400", "401", "403", "413", "429", "503"} <= set(responses), path
        for code in ("400", "413"):
            assert responses[code]["content"]["application/json"]["schema"] == error_ref
        assert document["paths"][path]["post"]["security"] == [{"bearer": []}, {"api-key": []}]
    assert set(document["paths"]["/v1/blocklists/{name}"]["get"]["responses"]) >= {"404"}
    # The open probes promise no key and no error bodies they never send.
    assert set(document["paths"]["/healthz"]["get"]["responses"]) == {"200"}
    assert "security" not in document["paths"]["/readyz"]["get"]


def test_what_openapi_promises_for_a_bad_body_is_what_is_sent(docs_client: TestClient) -> None:
    response = docs_client.post("/v1/moderations", json={"inputs": "typo"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_an_encoder_disabled_by_configuration_shows_in_readyz_and_every_response(
    tmp_path: Path, loaded_members: list[MemberSpec]
) -> None:
    def without_encoder(app_settings: Settings, store: BlocklistStore) -> SafetyEngine:
        members = [m for m in loaded_members if m.classifier.id != "encoder"]
        return SafetyEngine(members, policy=Policy.load(app_settings.policy_file))

    settings = Settings(home=tmp_path / "home", encoder={"enabled": False})
    client = ready_client(settings, without_encoder)
    try:
        ready = client.get("/readyz").json()
        moderated = client.post("/v1/moderations", json={"input": "hello there"})
        health = client.get("/healthz")
    finally:
        client.__exit__(None, None, None)
    assert any("encoder disabled" in notice for notice in ready["degraded"])
    for response in (moderated, health):
        assert "encoder disabled" in response.headers["safegate-degraded"]
