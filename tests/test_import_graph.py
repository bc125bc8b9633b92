"""The project's import graph, read from the source (``ast``), nothing imported; and what
importing the settings really loads, in a fresh interpreter.

Three properties ARCHITECTURE.md states:

- no cycle among the modules of ``gateway``, ``finetune``, ``evals``, ``dashboard`` and
  ``safegate``. Only module-level imports are edges: an import inside a function (or a
  method) is lazy, it runs when the function is called, after every module has loaded,
  so it cannot close a cycle at import time (the commands import their heavy packages
  that way on purpose). Imports under ``if TYPE_CHECKING:`` never run and are not edges
  either; imports in a class body, a ``try`` or another ``if`` at module level are.
  ``import a.b.c`` and ``from a.b import c`` are edges to the module they name (``a.b.c``
  where it is one of ours), not to every package above it: Python runs ``a/__init__.py``
  first, but a package whose ``__init__`` imports its own submodules is the usual layout,
  not a cycle;
- the dependency direction between the packages, where every import counts (lazy ones
  and those for type checking too: a dependency is one whenever it runs);
- ``gateway.config`` is a leaf at run time: importing it loads the settings modules it
  composes and the packages above them, whose ``__init__`` imports nothing
  (``gateway.lazy_exports``), and no store, engine, route or model library.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "finetune", "evals", "dashboard", "safegate")


@dataclass(frozen=True, slots=True)
class Import:
    importer: str
    imported: str  # a module of the project, the most specific one the statement names
    names: tuple[str, ...]  # for ``from X import a, b``: a and b; empty for ``import X``
    module_level: bool  # runs when the importer is imported (not lazy, not TYPE_CHECKING)
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _sources() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: list[ast.stmt], *, eager: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement below ``body``, with whether it runs at import time."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, eager
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _statements(node.body, eager=False)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.body, eager=False)
            yield from _statements(node.orelse, eager=eager)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    nested = [c for c in children if isinstance(c, ast.stmt)]
                    for child in children:
                        if isinstance(child, ast.ExceptHandler | ast.match_case):
                            nested.extend(child.body)
                    yield from _statements(nested, eager=eager)


def _ours(name: str) -> str | None:
    """The most specific module of the project that ``name`` is or lies in."""
    sources = _sources()
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in sources:
            return candidate
    return None


def _base(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if _sources()[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


@cache
def imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for module, path in _sources().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, eager in _statements(tree.body, eager=True):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _ours(alias.name)
                    if target is not None:
                        found.append(Import(module, target, (), eager, node.lineno))
                continue
            assert isinstance(node, ast.ImportFrom)
            base = _base(module, node)
            submodules = {a.name: _ours(f"{base}.{a.name}") for a in node.names}
            plain = tuple(a.name for a in node.names if submodules[a.name] != f"{base}.{a.name}")
            target = _ours(base)
            if plain and target is not None:
                found.append(Import(module, target, plain, eager, node.lineno))
            for name, submodule in submodules.items():
                if submodule == f"{base}.{name}":
                    found.append(Import(module, submodule, (), eager, node.lineno))
    return tuple(found)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import),
    each as one cycle through its modules (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    components.append(component)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    return [*paths[node], start]
                if successor not in paths:
                    paths[successor] = [*paths[node], successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def _package(module: str) -> str:
    return module.partition(".")[0]


def test_every_package_is_read() -> None:
    assert {_package(module) for module in _sources()} == set(PACKAGES)
    assert len(imports()) > 500  # a parser that found nothing would find no cycle


def test_no_import_cycle_at_import_time() -> None:
    graph: dict[str, set[str]] = {module: set() for module in _sources()}
    for found in imports():
        if found.module_level:
            graph[found.importer].add(found.imported)
    cycles = _cycles(graph)
    assert cycles == [], "import cycles (module-level imports):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_the_cycle_finder_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]


def _crossings(importer: str, imported: str) -> list[str]:
    return sorted(
        f"{found.importer}:{found.line} imports {found.imported}"
        for found in imports()
        if _package(found.importer) == importer and _package(found.imported) == imported
    )


def test_finetune_imports_none_of_the_others() -> None:
    for other in ("gateway", "evals", "dashboard"):
        assert _crossings("finetune", other) == []


def test_evals_imports_neither_dashboard_nor_finetune() -> None:
    assert _crossings("evals", "dashboard") == []
    assert _crossings("evals", "finetune") == []


def test_gateway_imports_neither_evals_nor_dashboard() -> None:
    assert _crossings("gateway", "evals") == []
    assert _crossings("gateway", "dashboard") == []


def test_gateway_reaches_finetune_only_through_the_registry_read_api() -> None:
    """The deployed adapters, read from the model registry's database when asked for:
    never at import time, so the gateway starts without finetune's modules."""
    reached = [found for found in imports() if _package(found.imported) == "finetune"]
    reached = [found for found in reached if _package(found.importer) == "gateway"]
    assert reached, "the gateway no longer reads the registry: update ARCHITECTURE.md"
    assert {found.imported for found in reached} <= {"finetune.registry", "finetune.db"}
    assert [found for found in reached if found.module_level] == []


def test_safegate_shared_modules_import_none_of_the_four() -> None:
    """``safegate.cli`` names every package's commands and imports each only inside the
    command; the other modules of ``safegate`` import none of the four, and nothing
    imports ``safegate.cli``."""
    for other in ("gateway", "finetune", "evals", "dashboard"):
        crossings = _crossings("safegate", other)
        assert [c for c in crossings if not c.startswith("safegate.cli:")] == []
    eager = [
        found
        for found in imports()
        if found.importer == "safegate.cli" and _package(found.imported) != "safegate"
    ]
    assert [found for found in eager if found.module_level] == []
    assert [found.importer for found in imports() if found.imported == "safegate.cli"] == []


def test_only_the_train_command_imports_the_offline_training_code() -> None:
    """``gateway.safety.training`` is offline code (torch training loops, the corpus): the
    running gateway never imports it; ``safegate safety train`` does, when it runs."""
    training = "gateway.safety.training"
    reached = sorted(
        {
            found.importer
            for found in imports()
            if found.imported.startswith(training) and not found.importer.startswith(training)
        }
    )
    assert reached == ["gateway.cli"]
    assert not [
        found
        for found in imports()
        if found.importer == "gateway.cli"
        and found.imported.startswith(training)
        and found.module_level
    ]


def _loaded_by(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``module``."""
    script = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=ROOT,
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_importing_the_settings_loads_only_settings() -> None:
    """``gateway.config`` composes the domains' ``settings.py``; importing it runs their
    packages' ``__init__`` files too, which must import none of their modules."""
    loaded = _loaded_by("gateway.config")
    assert {name for name in loaded if _package(name) in PACKAGES} == {
        "gateway",
        "gateway.config",
        "gateway.lazy_exports",
        "gateway.access",
        "gateway.access.settings",
        "gateway.audit",
        "gateway.audit.settings",
        "gateway.blocklists",
        "gateway.blocklists.settings",
        "gateway.chat",
        "gateway.chat.settings",
        "gateway.safety",
        "gateway.safety.settings",
        "safegate",
        "safegate.settings",
    }
    heavy = {
        *("fastapi", "starlette", "litellm", "torch", "transformers", "onnxruntime", "numpy"),
        *("sqlalchemy", "alembic"),
    }
    assert {name.partition(".")[0] for name in loaded} & heavy == set()
