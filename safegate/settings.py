"""Settings every package reads: where state lives, how long to wait for the database,
and where the local model server is. A leaf: pydantic only (``safegate.database`` builds
engines from these).

``safegate serve`` starts the local model server (``safegate finetune serve``) on
127.0.0.1 at ``SAFEGATE_LOCAL_MODELS_PORT`` and routes deployed adapters there; ``safegate
finetune serve`` listens there by default. One setting, so the two cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DATABASE_FILE = "safegate.db"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_STATEMENT_TIMEOUT_S = 10.0
# A call's client-side deadline is the statement timeout plus this, unless set: time for
# the server's own cancel to arrive, so only a server that stopped answering meets it.
DEFAULT_DEADLINE_MARGIN_S = 2.0


@dataclass(frozen=True, slots=True)
class DatabaseTimeouts:
    """How long to wait for a connection (``connect_s``), for one statement on the server
    (``statement_s``) and, on the client, for any one answer from the server (``deadline_s``;
    ``None``: ``statement_s`` plus ``DEFAULT_DEADLINE_MARGIN_S``)."""

    connect_s: float = DEFAULT_CONNECT_TIMEOUT_S
    statement_s: float = DEFAULT_STATEMENT_TIMEOUT_S
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect_s", "statement_s", "deadline_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")

    @property
    def call_deadline_s(self) -> float:
        """The client-side deadline in force: ``deadline_s``, or the statement timeout's."""
        if self.deadline_s is not None:
            return self.deadline_s
        return self.statement_s + DEFAULT_DEADLINE_MARGIN_S


DEFAULT_TIMEOUTS = DatabaseTimeouts()


class StorageSettings(BaseSettings):
    """Where state lives, read by every package: ``SAFEGATE_HOME`` and ``SAFEGATE_DATABASE_URL``."""

    model_config = SettingsConfigDict(env_prefix="SAFEGATE_", extra="ignore")

    home: Path = Field(default=Path("~/.safegate"))
    database_url: str | None = None
    database_connect_timeout_s: float = Field(
        default=DEFAULT_CONNECT_TIMEOUT_S,
        gt=0,
        allow_inf_nan=False,
        description="most seconds to wait for a database connection (SQLite: for a lock)",
    )
    database_statement_timeout_s: float = Field(
        default=DEFAULT_STATEMENT_TIMEOUT_S,
        gt=0,
        allow_inf_nan=False,
        description="most seconds one PostgreSQL statement may run before the server cancels it",
    )
    database_deadline_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="most seconds to wait for any one answer from a PostgreSQL server before "
        "the connection is cut (a frozen server); unset: the statement timeout plus 2 s",
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def database(self) -> str:
        """The configured SQLAlchemy URL, or the SQLite file every package shares."""
        return self.database_url or f"sqlite:///{self.home_dir / DATABASE_FILE}"

    @property
    def database_timeouts(self) -> DatabaseTimeouts:
        return DatabaseTimeouts(
            connect_s=self.database_connect_timeout_s,
            statement_s=self.database_statement_timeout_s,
            deadline_s=self.database_deadline_s,
        )

    def ensure_home(self) -> Path:
        """Create ``SAFEGATE_HOME`` private (0700), or tighten it; return it."""
        from safegate.database import private_directory

        return private_directory(self.home_dir, what="SAFEGATE_HOME")


LOCAL_MODELS_HOST = "127.0.0.1"
DEFAULT_LOCAL_MODELS_PORT = 8001


def local_models_api_base(port: int = DEFAULT_LOCAL_MODELS_PORT) -> str:
    """The local model server's OpenAI base URL, as litellm wants it."""
    return f"http://{LOCAL_MODELS_HOST}:{port}/v1"


class SharedSettings(StorageSettings):
    local_models_port: int = Field(
        default=DEFAULT_LOCAL_MODELS_PORT,
        ge=1,
        le=65535,
        description="port of the local model server on 127.0.0.1 (safegate finetune serve)",
    )

    @property
    def local_models_api_base(self) -> str:
        return local_models_api_base(self.local_models_port)
