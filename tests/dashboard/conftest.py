"""Dashboard fixtures: a seeded safegate home (``tests.dashboard.seed``), the stores over it,
``AppTest`` apps of ``dashboard/app.py`` signed in as one of its keys, and a real gateway
over HTTP for the playground (``tests.dashboard.served_gateway``, on the gateway tests'
engine members, loaded once per session)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.session import KEY_STATE
from dashboard.stores import Stores
from gateway.config import Settings
from tests.dashboard.seed import Seeded, seed
from tests.dashboard.served_gateway import served_gateway  # noqa: F401 - a fixture
from tests.gateway.conftest import (  # noqa: F401 - fixtures served_gateway needs
    engine_factory,
    loaded_members,
    members_home,
)

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
APP_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """A seeded home that tests only read (pages that change things use ``fresh``)."""
    return seed(tmp_path_factory.mktemp("dashboard") / "home")


@pytest.fixture
def fresh(tmp_path: Path) -> Seeded:
    """A seeded home of this test's own, for tests that label or add to blocklists."""
    return seed(tmp_path / "home")


@pytest.fixture
def empty_home(tmp_path: Path) -> Path:
    return tmp_path / "empty-home"


def open_stores(home: Path) -> Stores:
    return Stores.open(Settings(home=home))


@pytest.fixture
def stores_of() -> Iterator[Callable[[Path], Stores]]:
    opened: list[Stores] = []

    def of(home: Path) -> Stores:
        stores = open_stores(home)
        opened.append(stores)
        return stores

    yield of
    for stores in opened:
        stores.close()


AppFactory = Callable[[Path, str | None], AppTest]


@pytest.fixture
def make_app(monkeypatch: pytest.MonkeyPatch) -> AppFactory:
    """``make_app(home, key)``: an AppTest of the dashboard over ``home``, signed in with
    ``key`` (as the sign-in form leaves it) or not signed in (``None``); not yet run."""

    def make(home: Path, key: str | None) -> AppTest:
        monkeypatch.setenv("SAFEGATE_HOME", str(home))
        monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
        app = AppTest.from_file(str(APP), default_timeout=APP_TIMEOUT_S)
        if key is not None:
            app.session_state[KEY_STATE] = key
        return app

    return make


def open_page(app: AppTest, page: str) -> AppTest:
    """Run the app once (registering the pages), switch to ``views/<page>.py``, run it."""
    app.run()
    app.switch_page(f"views/{page}.py")
    app.run()
    assert not app.exception, [error.value for error in app.exception]
    return app
