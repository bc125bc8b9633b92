"""Policies by name: the service's own, or the one an API key carries.

A key created with ``--policy strict`` is checked under ``strict``: the file
``<SAFEGATE_HOME>/policies/strict.yaml`` if it exists, else the shipped
``gateway/policies/strict.yaml``. Files are read once and kept. A key whose policy
cannot be found or read is refused with a 503 (fail closed) rather than checked under a
policy its owner did not choose.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from gateway.errors import ServiceUnavailable
from gateway.safety.policy import Policy, PolicyError
from gateway.safety.settings import SHIPPED_POLICY

POLICY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class PolicyCatalog:
    def __init__(self, *, default: Policy, home_dir: Path) -> None:
        self.default = default
        self.directories = (home_dir / "policies", SHIPPED_POLICY.parent)
        self._loaded: dict[str, Policy] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None) -> Policy:
        """The policy called ``name``; the service default for None."""
        if name is None:
            return self.default
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
        if not POLICY_NAME.match(name):
            raise ServiceUnavailable(
                f"this key's policy name {name!r} is invalid; ask an admin to fix the key",
                code="policy_unavailable",
            )
        for directory in self.directories:
            path = directory / f"{name}.yaml"
            if path.is_file():
                try:
                    policy = Policy.load(path)
                except PolicyError as error:
                    raise ServiceUnavailable(
                        f"this key's policy {name!r} cannot be loaded ({error}); requests with "
                        "it are refused",
                        code="policy_unavailable",
                    ) from error
                with self._lock:
                    self._loaded[name] = policy
                return policy
        searched = ", ".join(str(d) for d in self.directories)
        raise ServiceUnavailable(
            f"this key's policy {name!r} was not found (looked in {searched}); requests with "
            "it are refused",
            code="policy_unavailable",
        )
