"""Gateway fixtures: the real engine's members load once per session; each test gets
its own SAFEGATE_HOME, database and app."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.blocklists import BlocklistStore
from gateway.config import Settings
from gateway.ensemble import build_members
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.members.blocklist import BlocklistClassifier
from gateway.safety.policy import Policy

READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def loaded_members(tmp_path_factory: pytest.TempPathFactory) -> list[MemberSpec]:
    """Encoder heads, profanity and PII, loaded once: the expensive edge."""
    home = tmp_path_factory.mktemp("members-home")
    return build_members(Settings(home=home), blocklists=None)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


@pytest.fixture
def real_engine(settings: Settings, loaded_members: list[MemberSpec]) -> Iterator[SafetyEngine]:
    engine = SafetyEngine(loaded_members, policy=Policy.load(settings.policy_file))
    yield engine
    engine.close()


EngineFactory = Callable[[Settings, BlocklistStore], SafetyEngine]


@pytest.fixture
def engine_factory(loaded_members: list[MemberSpec]) -> EngineFactory:
    def factory(settings: Settings, store: BlocklistStore) -> SafetyEngine:
        members = [*loaded_members, MemberSpec(BlocklistClassifier(source=store))]
        return SafetyEngine(
            members,
            policy=Policy.load(settings.policy_file),
            max_text_chars=settings.engine.max_text_chars,
        )

    return factory


def ready_client(app_settings: Settings, factory: EngineFactory) -> TestClient:
    client = TestClient(create_app(app_settings, engine_factory=factory))
    client.__enter__()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(client.get("/readyz").json())
        time.sleep(0.05)
    return client


@pytest.fixture
def client(settings: Settings, engine_factory: EngineFactory) -> Iterator[TestClient]:
    client = ready_client(settings, engine_factory)
    yield client
    client.__exit__(None, None, None)
