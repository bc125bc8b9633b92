"""Eval fixtures: a temporary SAFEGATE_HOME with the harness's tables, suite files written
per test, and ``FakeCaller``, a model replaced at the ``ModelCaller`` seam that counts its
calls (and can fail one example, or "kill" the run after N calls)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from evals.cache import CallCache
from evals.db import Database
from evals.models import Completion, ModelCaller
from evals.runner import Runner
from evals.runs import RunStore
from evals.settings import get_settings
from evals.suite import ChosenModel

# The gateway's fixtures, for the tests that run a real gateway app and PostgreSQL.
from tests.gateway.conftest import (  # noqa: F401
    engine_factory,
    loaded_members,
    members_home,
    postgres_admin,
    postgres_url,
)

QUESTIONS = [
    "How do I reset my console?",
    "What does NX-310 mean?",
    "How do I pair a controller?",
    "Why is the fan loud?",
    "How do I update the system?",
    "Where is the serial number?",
]


class Killed(BaseException):
    """Stands for the process being killed mid-run (Ctrl-C, SIGKILL)."""


class FakeCaller:
    """Answers ``"answer: <last user message>"``; records every call it gets."""

    def __init__(
        self,
        *,
        fail: Sequence[str] = (),
        kill_after: int | None = None,
        delay_s: float = 0.0,
        forbid: bool = False,
    ) -> None:
        self.calls: list[str] = []
        self.checks = 0
        self.fail = set(fail)
        self.kill_after = kill_after
        self.delay_s = delay_s
        self.forbid = forbid
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def name(self) -> str:
        return "fake"

    async def check(self) -> None:
        self.checks += 1

    async def complete(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
    ) -> Completion:
        if self.forbid:
            raise AssertionError("the model was called")
        if self.kill_after is not None and len(self.calls) >= self.kill_after:
            raise Killed
        question = messages[-1]["content"]
        self.calls.append(question)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        if question in self.fail:
            raise RuntimeError("upstream exploded")
        return Completion(f"answer: {question}", "stop", None, None, 1.0)

    async def aclose(self) -> None:
        return None


def factory_for(caller: FakeCaller) -> Callable[[ChosenModel], ModelCaller]:
    return lambda chosen: caller


@pytest.fixture
def eval_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    monkeypatch.setenv("SAFEGATE_HOME", str(home))
    monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture
def database(eval_home: Path) -> Iterator[Database]:
    db = Database(get_settings().database)
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture
def store(database: Database, eval_home: Path) -> RunStore:
    return RunStore(database, runs_dir=eval_home / "evals")


@pytest.fixture
def cache(database: Database) -> CallCache:
    return CallCache(database)


def make_runner(store: RunStore, cache: CallCache, caller: FakeCaller) -> Runner:
    return Runner(store, cache, caller_factory=factory_for(caller), progress=False)


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def qa_rows(questions: Sequence[str] = QUESTIONS) -> list[dict[str, Any]]:
    return [
        {"id": f"q{index}", "prompt": question, "reference": f"answer: {question}"}
        for index, question in enumerate(questions, start=1)
    ]


def write_suite(directory: Path, **overrides: Any) -> Path:
    """A suite over ``qa.jsonl`` (written if missing) with one litellm mock model;
    ``overrides`` replace top-level fields (None removes one)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "qa.jsonl").exists():
        write_jsonl(directory / "qa.jsonl", qa_rows())
    suite: dict[str, Any] = {
        "name": "unit",
        "datasets": [{"name": "qa", "path": "qa.jsonl", "format": "prompt"}],
        "models": [
            {
                "name": "mock",
                "via": "litellm",
                "model": "openai/mock",
                "params": {"api_key": "k", "mock_response": "The console restarts."},
                "max_retries": 0,
            }
        ],
        "generation": {"temperature": 0, "max_tokens": 32},
        "metrics": ["exact_match"],
        "concurrency": 2,
    }
    for key, value in overrides.items():  # None leaves the field out
        if value is None:
            suite.pop(key, None)
        else:
            suite[key] = value
    path = directory / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return path
