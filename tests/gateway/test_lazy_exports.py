"""A package's names load when first asked for, and each is its module's own object."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest

from gateway.lazy_exports import lazy_exports

PACKAGES = (
    "gateway.access",
    "gateway.allowlists",
    "gateway.audit",
    "gateway.blocklists",
    "gateway.chat",
    "gateway.moderation",
)


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_is_its_modules_own(name: str) -> None:
    package = importlib.import_module(name)
    for exported in package.__all__:
        value = getattr(package, exported)
        homes = [
            module.__name__
            for module in list(sys.modules.values())
            if isinstance(module, ModuleType)
            and module.__name__.startswith(f"{name}.")
            and vars(module).get(exported) is value
        ]
        assert homes, f"{name}.{exported} is none of its modules' own"


def test_star_import_and_submodules_still_work() -> None:
    namespace: dict[str, object] = {}
    exec("from gateway.audit import *", namespace)  # noqa: S102 - a fixed statement
    assert namespace["AuditStore"] is importlib.import_module("gateway.audit.store").AuditStore
    from gateway.access import dependencies

    assert dependencies.__name__ == "gateway.access.dependencies"


def test_an_unknown_name_is_an_attribute_error() -> None:
    package = importlib.import_module("gateway.audit")
    with pytest.raises(AttributeError, match="has no attribute 'AuditStor'"):
        package.AuditStor  # noqa: B018 - the lookup is the test


def test_the_map_must_name_exactly_all() -> None:
    with pytest.raises(ValueError, match="are not __all__"):
        lazy_exports("pkg", {"store": ("Store",)}, exported=["Store", "Record"])
    with pytest.raises(ValueError, match="are not __all__"):
        lazy_exports("pkg", {"store": ("Store",), "other": ("Store",)}, exported=["Store"])
