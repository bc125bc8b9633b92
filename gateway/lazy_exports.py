"""Packages that offer their modules' names without importing the modules.

``from gateway.audit import AuditStore`` works, as the packages' docstrings promise, yet
importing ``gateway.audit`` runs nothing else. Python imports a package before any of its
modules, so an ``__init__`` that imported its contents would make ``gateway.config``,
which needs only ``gateway.audit.settings``, load the audit store and SQLAlchemy with it.
Instead the package's ``__getattr__`` (PEP 562) imports a name's module the first time
the name is asked for, and keeps the name on the package, so later lookups skip it.

A package names its exports three times, each for its own reader: ``__all__`` (``import
*``, and the re-exports mypy accepts), the same imports under ``TYPE_CHECKING`` (type
checkers and editors) and the map given to :func:`lazy_exports` (run time), which
checks that the map names exactly ``__all__``, when the package is imported.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Collection, Mapping


def lazy_exports(
    package: str, modules: Mapping[str, Collection[str]], *, exported: Collection[str]
) -> Callable[[str], object]:
    """The module ``__getattr__`` of ``package``: each name in ``modules[module]`` comes
    from ``package.module``. ``exported`` (the package's ``__all__``) must list the same
    names, each once; a mismatch raises ``ValueError``."""
    listed = [name for names in modules.values() for name in names]
    if sorted(listed) != sorted(exported):
        raise ValueError(
            f"{package}: the lazily imported names {sorted(listed)} are not __all__, "
            f"{sorted(exported)}"
        )
    where = {name: f"{package}.{module}" for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
