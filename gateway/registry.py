"""A small registry of named factories, shared by classifiers, metrics and upstreams.

Names come from a ``StrEnum`` so a typo is an error at import time, and a second
registration under one name raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(Exception):
    """A name collided or was unknown."""


class Registry(Generic[T]):
    """Maps enum names to objects of one kind (usually factories)."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._items: dict[StrEnum, T] = {}

    def register(self, name: StrEnum) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``."""

        def decorate(item: T) -> T:
            self.add(name, item)
            return item

        return decorate

    def add(self, name: StrEnum, item: T) -> None:
        if name in self._items:
            raise RegistryError(f"{self._kind} {name!s} is already registered")
        self._items[name] = item

    def get(self, name: str) -> T:
        for key, item in self._items.items():
            if key.value == name:
                return item
        known = ", ".join(sorted(key.value for key in self._items))
        raise RegistryError(f"unknown {self._kind} {name!r}; known: {known}")

    def names(self) -> list[str]:
        return sorted(key.value for key in self._items)

    def __contains__(self, name: object) -> bool:
        return any(key.value == name for key in self._items)

    def __iter__(self) -> Iterator[StrEnum]:
        return iter(self._items)
