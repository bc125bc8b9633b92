"""Two ``safegate serve`` replicas on one PostgreSQL and the local Redis, run for real.

What docs/deployment.md promises, shown with the same processes and settings it lists:
a key revoked through one replica's database is refused by both within
``SAFEGATE_AUTH__CACHE_TTL_S``; one rate limit holds across both (the bucket lives in
Redis); a blocklist item added through one replica is enforced by the other, and an
allowlist made through one exempts on the other, within ``SAFEGATE_BLOCKLIST__REFRESH_S``;
a daily token quota spent on one is enforced by the other within
``SAFEGATE_QUOTA__CACHE_TTL_S``; flagged requests answered by both land in the one audit
store, none lost. The module's cluster has a fresh PostgreSQL schema and its own Redis key
prefix; each test uses its own keys.
The upstream is litellm's ``mock_response``, so no network is needed.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis
import yaml
from sqlalchemy import Engine, create_engine, text

from tests.gateway.conftest import fresh_schema
from tests.ports import free_port

START_TIMEOUT_S = 180.0
CACHE_TTL_S = 1.0
REFRESH_S = 1.0
QUOTA_TTL_S = 1.0
REDIS_URL = "redis://127.0.0.1:6379/0"
HATE = "All Muslims are terrorists and should be thrown out of this country."
ANSWER = "To reset your console, hold the power button for ten seconds."


@dataclass
class Replica:
    name: str
    base: str
    process: subprocess.Popen[bytes]


def _redis_or_skip() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as error:  # the suite's machine runs Redis; say so when it does not
        pytest.fail(f"the replica test needs the local Redis at {REDIS_URL}: {error}")


def _wait_ready(replica: Replica) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{replica.base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert replica.process.poll() is None, f"replica {replica.name} exited during start-up"
        assert time.monotonic() < deadline, f"replica {replica.name} did not become ready"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def shared_postgres_url(postgres_admin: Engine) -> Iterator[str]:
    """One fresh schema for the module's cluster."""
    with fresh_schema(postgres_admin) as url:
        yield url


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, shared_postgres_url: str
) -> Iterator[tuple[list[Replica], dict[str, str]]]:
    """Two replicas, each with its own home and port, sharing the database and Redis;
    started once for the module (each test uses its own keys and texts)."""
    _redis_or_skip()
    tmp_path = tmp_path_factory.mktemp("replicas")
    postgres_url = shared_postgres_url
    prefix = f"safegate-test-{uuid.uuid4().hex[:8]}:"
    upstreams = tmp_path / "upstreams.yaml"
    upstreams.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "mock",
                        "litellm": {
                            "model": "openai/mock",
                            "api_key": "k",
                            "mock_response": ANSWER,
                        },
                    }
                ],
                "num_retries": 0,
                "local_adapters": False,
            }
        ),
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "SAFEGATE_DATABASE_URL": postgres_url,
        "SAFEGATE_RATE_LIMIT__REDIS_URL": REDIS_URL,
        "SAFEGATE_RATE_LIMIT__KEY_PREFIX": prefix,
        "SAFEGATE_AUTH__CACHE_TTL_S": str(CACHE_TTL_S),
        "SAFEGATE_BLOCKLIST__REFRESH_S": str(REFRESH_S),
        "SAFEGATE_QUOTA__CACHE_TTL_S": str(QUOTA_TTL_S),
        "SAFEGATE_UPSTREAMS__FILE": str(upstreams),
        "SAFEGATE_UPSTREAMS__SERVE_LOCAL": "false",
    }
    replicas: list[Replica] = []
    try:
        # Both at once, as an orchestrator starts them: they take turns at the migrations.
        for name in ("a", "b"):
            port = free_port()
            home = tmp_path / f"home-{name}"
            process = subprocess.Popen(  # noqa: S603 - our own CLI
                [sys.executable, "-m", "safegate.cli", "serve", "--port", str(port)],
                env={**env, "SAFEGATE_HOME": str(home)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            replicas.append(Replica(name, f"http://127.0.0.1:{port}", process))
        for replica in replicas:
            _wait_ready(replica)
        yield replicas, {**env, "SAFEGATE_HOME": str(tmp_path / "home-a")}
    finally:
        for replica in replicas:
            replica.process.terminate()
        for replica in replicas:
            try:
                replica.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait(timeout=10)
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()


def _keys(env: dict[str, str], *args: str) -> str:
    """``safegate keys ...`` against the shared database; its stdout, stripped (``create``
    prints the new key alone on it)."""
    done = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "safegate.cli", "keys", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip()


def _moderate(replica: Replica, key: str, text_: str) -> httpx.Response:
    return httpx.post(
        f"{replica.base}/v1/moderations",
        headers={"Authorization": f"Bearer {key}"},
        json={"input": text_},
        timeout=60,
    )


def test_a_key_revoked_is_refused_by_every_replica_within_the_cache_ttl(
    cluster: tuple[list[Replica], dict[str, str]],
) -> None:
    replicas, env = cluster
    key = _keys(env, "create", "--name", "ci-bot", "--role", "developer")
    for replica in replicas:  # both have now verified and cached the key
        assert _moderate(replica, key, "Hello there.").status_code == 200
    listed = _keys(env, "list")
    key_id = next(
        re.search(r"key_[0-9a-f]+", line).group()  # type: ignore[union-attr]
        for line in listed.splitlines()
        if " ci-bot " in line
    )
    _keys(env, "revoke", key_id)
    time.sleep(CACHE_TTL_S + 0.5)  # refused by both once the TTL has passed
    for replica in replicas:
        response = _moderate(replica, key, "Hello there.")
        assert response.status_code == 401, (replica.name, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_one_rate_limit_holds_across_replicas(
    cluster: tuple[list[Replica], dict[str, str]],
) -> None:
    replicas, env = cluster
    key = _keys(env, "create", "--name", "limited", "--role", "developer", "--rate-limit", "4")
    statuses = [_moderate(replicas[i % 2], key, "Hello there.").status_code for i in range(8)]
    # A bucket of 4 per minute, shared: four answers in all, whichever replica served them.
    assert statuses.count(200) == 4, statuses
    assert statuses.count(429) == 4, statuses
    refused = _moderate(replicas[1], key, "Hello there.")
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1


def test_a_blocklist_item_added_on_one_replica_is_enforced_by_the_other(
    cluster: tuple[list[Replica], dict[str, str]],
) -> None:
    replicas, env = cluster
    admin = _keys(env, "create", "--name", "ops", "--role", "admin")
    first, second = replicas
    text_ = "Status update on project kestrel for the board."
    before = _moderate(second, admin, text_).json()["results"][0]
    assert before["flagged"] is False
    headers = {"Authorization": f"Bearer {admin}"}
    created = httpx.post(
        f"{first.base}/v1/blocklists",
        headers=headers,
        json={"name": "codenames", "description": "unreleased projects"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    added = httpx.post(
        f"{first.base}/v1/blocklists/codenames/items",
        headers=headers,
        json={"items": [{"type": "term", "value": "kestrel"}]},
        timeout=30,
    )
    assert added.status_code == 201, added.text
    deadline = time.monotonic() + REFRESH_S + 5
    while True:
        result = _moderate(second, admin, text_).json()["results"][0]
        if result["flagged"]:
            break
        assert time.monotonic() < deadline, "the other replica never enforced the new item"
        time.sleep(0.2)
    assert result["shields"]["blocklist"]["filtered"] is True
    assert result["action"] == "block"


def test_an_allowlist_made_on_one_replica_exempts_on_the_other(
    cluster: tuple[list[Replica], dict[str, str]],
) -> None:
    replicas, env = cluster
    admin = _keys(env, "create", "--name", "ops-allowlists", "--role", "admin")
    first, second = replicas
    text_ = "Book a table at Shooter Burger downtown."  # violence to the shipped model
    assert _moderate(second, admin, text_).json()["results"][0]["flagged"] is True
    created = httpx.post(
        f"{first.base}/v1/allowlists",
        headers={"Authorization": f"Bearer {admin}"},
        json={
            "name": "restaurants",
            "terms": ["Shooter Burger"],
            "categories": ["violence", "illicit/violent"],
            "directions": ["prompt"],
        },
        timeout=30,
    )
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + REFRESH_S + 5
    while True:
        result = _moderate(second, admin, text_).json()["results"][0]
        if not result["flagged"]:
            break
        assert time.monotonic() < deadline, "the other replica never applied the allowlist"
        time.sleep(0.2)
    assert result["action"] == "allow"
    assert any(r.startswith("allowlist 'restaurants' exempted") for r in result["reasons"])


def test_flagged_requests_from_both_replicas_land_in_one_audit_store(
    cluster: tuple[list[Replica], dict[str, str]], shared_postgres_url: str
) -> None:
    replicas, env = cluster
    key = _keys(env, "create", "--name", "writer", "--role", "developer")
    per_replica = 6

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            calls = [
                client.post(
                    f"{replica.base}/v1/moderations",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"input": f"{HATE} ({replica.name} {n})"},
                )
                for n in range(per_replica)
                for replica in replicas
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(send_all())
    assert all(response.status_code == 200 for response in responses)
    assert all(response.json()["results"][0]["flagged"] for response in responses)
    request_ids = {response.headers["x-request-id"] for response in responses}
    assert len(request_ids) == 2 * per_replica
    engine = create_engine(shared_postgres_url)
    try:
        deadline = time.monotonic() + 10
        while True:
            with engine.connect() as connection:
                stored = {
                    row[0]
                    for row in connection.execute(text("SELECT request_id FROM flagged_items"))
                }
            if request_ids <= stored or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        engine.dispose()
    assert request_ids <= stored, f"missing: {request_ids - stored}"


def _chat(replica: Replica, key: str) -> httpx.Response:
    return httpx.post(
        f"{replica.base}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "mock", "messages": [{"role": "user", "content": "How do I reset it?"}]},
        timeout=60,
    )


def test_a_token_quota_spent_on_one_replica_holds_on_the_other(
    cluster: tuple[list[Replica], dict[str, str]],
) -> None:
    replicas, env = cluster
    first, second = replicas
    key = _keys(env, "create", "--name", "metered", "--role", "developer", "--daily-tokens", "40")
    spent = 0
    for _ in range(10):  # each answer costs tokens; the first replica stops the key itself
        response = _chat(first, key)
        if response.status_code == 429:
            break
        assert response.status_code == 200, response.text
        spent += response.json()["usage"]["total_tokens"]
    assert response.status_code == 429
    assert spent >= 40
    time.sleep(QUOTA_TTL_S + 0.5)
    refused = _chat(second, key)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "daily token quota of 40 tokens" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
