"""The model registry: base models and trained adapters, and which are deployed.

A base is a path or hub id that loads as ``Phi3ForCausalLM`` (the demo base is one,
registered as ``demo-base``). An adapter is a LoRA adapter folder trained on a base.
Deploying an adapter makes the local server (``finetune.serving``) answer for its name;
deleting refuses while it is deployed, and a base refuses while adapters depend on it.

``deployed_models()`` is the read API the gateway uses to list what it can route to.
``resolve_base`` says what a base argument names (a registered base, a local folder or a
hub id) for training, serving and ``finetune validate --base`` alike.
"""

from __future__ import annotations

import builtins
import json
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Boolean, DateTime, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from finetune.db import Base, Database
from finetune.errors import ModelDeployed, NotABase, RegistryError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ModelKind(StrEnum):
    BASE = "base"
    ADAPTER = "adapter"


class ModelRow(Base):
    __tablename__ = "finetune_models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    base: Mapped[str | None] = mapped_column(String(300), nullable=True)
    path: Mapped[str] = mapped_column(String(1000))
    deployed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    hyperparameters: Mapped[str] = mapped_column(Text, default="{}")
    data_sha256: Mapped[str] = mapped_column(Text, default="{}")
    metrics: Mapped[str] = mapped_column(Text, default="{}")


@dataclass(frozen=True)
class Model:
    name: str
    kind: ModelKind
    base: str | None
    path: str
    deployed: bool
    created_at: datetime
    job_id: str | None
    hyperparameters: dict[str, Any]
    data_sha256: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, row: ModelRow) -> Model:
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        return cls(
            name=row.name,
            kind=ModelKind(row.kind),
            base=row.base,
            path=row.path,
            deployed=row.deployed,
            created_at=created,
            job_id=row.job_id,
            hyperparameters=json.loads(row.hyperparameters or "{}"),
            data_sha256=json.loads(row.data_sha256 or "{}"),
            metrics=json.loads(row.metrics or "{}"),
        )

    def summary(self) -> dict[str, Any]:
        """What ``models list --json`` prints."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "base": self.base,
            "deployed": self.deployed,
            "created": self.created_at.isoformat(),
        }

    def details(self) -> dict[str, Any]:
        """What ``models show`` prints."""
        return {
            **self.summary(),
            "path": self.path,
            "job": self.job_id,
            "hyperparameters": self.hyperparameters,
            "data_sha256": self.data_sha256,
            "metrics": self.metrics,
        }


class ModelRegistry:
    def __init__(self, database: Database) -> None:
        self.database = database

    def register(
        self,
        name: str,
        *,
        kind: ModelKind,
        path: Path | str,
        base: str | None = None,
        job_id: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        data_sha256: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> Model:
        if not NAME.match(name):
            raise RegistryError(
                f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if kind is ModelKind.ADAPTER and not base:
            raise RegistryError("an adapter needs the base it was trained on")
        with self.database.session() as session:
            row = session.get(ModelRow, name)
            if row is not None and not replace:
                raise RegistryError(f"a model named {name!r} already exists")
            if row is not None and row.deployed:
                raise ModelDeployed(f"model {name!r} is deployed; undeploy it before replacing it")
            row = row or ModelRow(name=name)
            row.kind = kind.value
            row.base = base
            row.path = str(path)
            row.deployed = False
            row.created_at = datetime.now(UTC)
            row.job_id = job_id
            row.hyperparameters = json.dumps(hyperparameters or {}, sort_keys=True)
            row.data_sha256 = json.dumps(data_sha256 or {}, sort_keys=True)
            row.metrics = json.dumps(metrics or {}, sort_keys=True)
            session.add(row)
            session.flush()
            return Model.from_row(row)

    def get(self, name: str) -> Model:
        with self.database.session() as session:
            row = session.get(ModelRow, name)
            if row is None:
                raise RegistryError(f"no model named {name!r}; 'safegate models list' lists them")
            return Model.from_row(row)

    def find(self, name: str) -> Model | None:
        with self.database.session() as session:
            row = session.get(ModelRow, name)
            return None if row is None else Model.from_row(row)

    def list(self) -> builtins.list[Model]:
        with self.database.session() as session:
            rows = session.scalars(select(ModelRow).order_by(ModelRow.created_at)).all()
            return [Model.from_row(row) for row in rows]

    def deploy(self, name: str) -> Model:
        return self._set_deployed(name, deployed=True)

    def undeploy(self, name: str) -> Model:
        return self._set_deployed(name, deployed=False)

    def delete(self, name: str, *, remove_files: bool = True) -> Model:
        with self.database.session() as session:
            row = session.get(ModelRow, name)
            if row is None:
                raise RegistryError(f"no model named {name!r}; 'safegate models list' lists them")
            if row.deployed:
                raise ModelDeployed(
                    f"model {name!r} is deployed and cannot be deleted; "
                    f"run 'safegate models undeploy {name}' first"
                )
            if row.kind == ModelKind.BASE:
                users = session.scalars(select(ModelRow.name).where(ModelRow.base == name)).all()
                if users:
                    raise RegistryError(
                        f"base {name!r} is used by adapters {', '.join(sorted(users))}; "
                        "delete them first"
                    )
            model = Model.from_row(row)
            session.delete(row)
        if remove_files and model.kind is ModelKind.ADAPTER:
            shutil.rmtree(model.path, ignore_errors=True)
        return model

    def deployed_models(self) -> builtins.list[Model]:
        """Read API for the gateway: every deployed adapter and base."""
        return [model for model in self.list() if model.deployed]

    def _set_deployed(self, name: str, *, deployed: bool) -> Model:
        with self.database.session() as session:
            row = session.get(ModelRow, name)
            if row is None:
                raise RegistryError(f"no model named {name!r}; 'safegate models list' lists them")
            if deployed and not Path(row.path).exists() and row.kind == ModelKind.ADAPTER:
                raise RegistryError(f"model {name!r} has no files at {row.path}; retrain it")
            row.deployed = deployed
            session.flush()
            return Model.from_row(row)


class ModelSource(Protocol):
    """The registry's read API (``ModelRegistry``), all the server and ``resolve_base`` need."""

    def find(self, name: str) -> Model | None: ...

    def list(self) -> builtins.list[Model]: ...

    def deployed_models(self) -> builtins.list[Model]: ...


@dataclass(frozen=True)
class ResolvedBase:
    """The base a ``--base`` argument names.

    ``name`` is what an adapter records as its base and what the server serves the base
    under: the registered name, else the absolute path of a local folder, else the hub id.
    ``location`` is what ``from_pretrained`` loads; ``aliases`` are every spelling an
    adapter's ``base`` may use for it (registry name, path as written, absolute path).
    """

    name: str
    location: str
    aliases: frozenset[str]
    created: datetime | None = None  # when it was registered; None when it is not

    @property
    def registered(self) -> bool:
        return self.created is not None


def resolve_base(spec: str, *, registry: ModelSource | None, use: str = "use") -> ResolvedBase:
    """A registered base (by name, or by a path it was registered with), a local folder,
    or a hub id, in that order; nothing is loaded or checked on disk beyond existence.

    An adapter's name raises ``NotABase`` ("... is an adapter, not a base; <use> its base
    ... instead"); ``registry=None`` resolves paths and hub ids only.
    """
    model = registry.find(spec) if registry is not None else None
    if model is not None and model.kind is ModelKind.ADAPTER:
        raise NotABase(
            f"{spec!r} is an adapter, not a base; {use} its base {model.base!r} instead",
            adapter=spec,
            base=model.base or "",
        )
    if model is None and registry is not None:  # a path or hub id a registered base has
        model = next(
            (
                m
                for m in registry.list()
                if m.kind is ModelKind.BASE and _spelling(spec) in _spellings(m.path)
            ),
            None,
        )
    if model is not None:
        aliases = {model.name, *_spellings(model.path)}
        return ResolvedBase(model.name, model.path, frozenset(aliases), model.created_at)
    name = _spelling(spec)
    return ResolvedBase(name, name, frozenset(_spellings(spec)))


def same_base(base: str, resolved: ResolvedBase) -> bool:
    """Whether an adapter's recorded ``base`` is one of the spellings of ``resolved``."""
    return bool(_spellings(base) & resolved.aliases)


def _spellings(spec: str) -> set[str]:
    """A base as written, and as an absolute path when it is a local folder."""
    return {spec, _spelling(spec)}


def _spelling(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec
