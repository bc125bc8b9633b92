"""The Allowlists page through ``streamlit.testing.v1.AppTest`` over a seeded home: reviewers
read, admins create (refused patterns named), disable, enable and delete, and what the
page changes is what the gateway's store (and so the engine) sees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from streamlit.testing.v1 import AppTest

from dashboard.stores import Stores
from gateway.allowlists import AllowlistSnapshot, AllowlistStore
from gateway.safety.taxonomy import Category, Direction
from tests.dashboard.conftest import AppFactory, open_page
from tests.dashboard.seed import Seeded

StoresOf = Callable[[Path], Stores]


def engine_view(store: AllowlistStore) -> AllowlistSnapshot:
    """What a gateway starting now would match (``store`` caches its own snapshot)."""
    return AllowlistStore(store.database).snapshot()


def texts_on(app: AppTest) -> str:
    parts = [element.value for element in app.markdown]
    parts += [element.value for element in app.caption]
    parts += [element.value for element in app.info]
    return "\n".join(str(part) for part in parts)


def click(app: AppTest, label: str) -> None:
    next(button for button in app.button if button.label == label).click().run()
    assert not app.exception, [error.value for error in app.exception]


def fill_new_allowlist(app: AppTest, *, name: str, terms: str = "", regexes: str = "") -> None:
    next(t for t in app.text_input if t.label == "Name").input(name)
    next(t for t in app.text_area if t.label.startswith("Terms")).input(terms)
    next(t for t in app.text_area if t.label.startswith("Regexes")).input(regexes)
    categories = next(m for m in app.multiselect if m.label == "Categories exempted")
    categories.set_value(["violence", "illicit/violent"])


def test_a_reviewer_reads_allowlists_but_cannot_change_them(
    fresh: Seeded, make_app: AppFactory, stores_of: StoresOf
) -> None:
    reviewer = open_page(make_app(fresh.home, fresh.reviewer_key), "allowlists")
    assert [title.value for title in reviewer.title] == ["Allowlists"]
    assert "No allowlists yet" in texts_on(reviewer)
    assert "Changing allowlists needs an admin key" in texts_on(reviewer)
    assert [button.label for button in reviewer.button] == ["Sign out"]
    stores_of(fresh.home).allowlists.create(
        "restaurants",
        terms=["Murder Burger"],
        categories=["violence"],
        directions=["prompt"],
        created_by=fresh.admin_id,
    )
    reviewer.run()
    [table] = reviewer.dataframe
    assert list(table.value["name"]) == ["restaurants"]
    assert list(table.value["terms"]) == ["Murder Burger"]
    assert [button.label for button in reviewer.button] == ["Sign out"]


def test_an_admin_creates_disables_enables_and_deletes_an_allowlist(
    fresh: Seeded, make_app: AppFactory, stores_of: StoresOf
) -> None:
    store = stores_of(fresh.home).allowlists
    admin = open_page(make_app(fresh.home, fresh.admin_key), "allowlists")

    fill_new_allowlist(admin, name="restaurants", regexes="burger\n(murder)\\s+\\1")
    click(admin, "Create allowlist")
    assert "backreferences are not supported" in admin.error[0].value
    assert "(regexes.1)" in admin.error[0].value
    assert store.list() == []

    fill_new_allowlist(admin, name="restaurants", terms="Murder Burger\nGutshot Grill")
    click(admin, "Create allowlist")
    assert not admin.error, [error.value for error in admin.error]
    assert admin.success[0].value == "allowlist restaurants created"
    created = store.get("restaurants")
    assert created.terms == ("Murder Burger", "Gutshot Grill")
    assert created.categories == (Category.ILLICIT_VIOLENT, Category.VIOLENCE)
    assert created.directions == (Direction.PROMPT,)
    assert created.created_by == fresh.admin_id
    assert created.enabled
    assert [hit.allowlist for hit in engine_view(store).search("murder burger")] == ["restaurants"]
    assert list(admin.dataframe[0].value["name"]) == ["restaurants"]

    click(admin, "Disable")
    assert admin.success[0].value == "allowlist restaurants disabled"
    assert store.get("restaurants").enabled is False
    assert engine_view(store).search("murder burger") == ()
    click(admin, "Enable")
    assert store.get("restaurants").enabled is True

    click(admin, "Delete")
    assert admin.success[0].value == "allowlist restaurants deleted"
    assert store.list() == []
    assert "No allowlists yet" in texts_on(admin)
