"""The install is reproducible: every dependency pyproject.toml names is pinned to one
exact version in constraints.txt (which ``make install`` uses and ``make lock`` refreshes),
torch aside: the Makefile pins it (``TORCH_SPEC``), a CPU or CUDA build per machine."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not pinned with =="
        pins[_canonical(name)] = version
    return pins


def test_every_dependency_is_pinned_exactly() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = _pins()
    missing = []
    for requirement in wanted:
        match = _NAME.match(requirement)
        assert match, requirement
        name = _canonical(match.group(1).split("[", 1)[0])
        if name != "torch" and name not in pins:
            missing.append(name)
    assert not missing, f"not pinned in constraints.txt (run `make lock`): {missing}"


def test_the_makefile_installs_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "--constraint $(CONSTRAINTS)" in makefile
    assert "\nlock:" in makefile
    assert "torch" not in _pins()
