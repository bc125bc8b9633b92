"""Upstream models: every chat completion reaches its model through litellm's Router.

An upstreams file (YAML; ``gateway/chat/upstreams.yaml`` ships, ``SAFEGATE_UPSTREAMS__FILE``
points elsewhere) names what clients may call and how to reach it::

    models:
      - name: demo                         # what clients send as "model"
        local: demo-console-support        # an adapter the local model server serves
      - name: gpt-4o-mini
        litellm: {model: openai/gpt-4o-mini, api_key: os.environ/OPENAI_API_KEY}
    aliases: {support: demo}               # another name for a model
    fallbacks: {gpt-4o-mini: [demo]}       # tried in order when a model fails
    timeout_s: 60
    num_retries: 1
    local_adapters: true                   # also every adapter deployed in the registry

Any litellm model string works (``openai/``, ``azure/``, ``ollama/``, ``hosted_vllm/``,
...); secrets stay in the environment through litellm's ``os.environ/NAME`` values.
With ``local_adapters`` every adapter deployed with ``safegate models deploy`` is callable
by its name, served by the local model server (``safegate finetune serve``, which
``safegate serve`` starts) on 127.0.0.1 at ``SAFEGATE_LOCAL_MODELS_PORT``; an entry with
``local: <adapter>`` names one of them under another name. The list is read again when a request
names a model the gateway does not know, so a new deployment needs no restart.

Errors (``gateway.errors``): an unknown model is a 404 ``model_not_found``; an upstream
that times out is a 504 ``upstream_timeout``; one that fails otherwise (refused
connection, 5xx, bad credentials on our side) is a 502 ``upstream_error``; an upstream
400 (a context window exceeded, an unsupported parameter) is passed on as a 400.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ApiError, InvalidRequest, NotFound
from safegate.offline import offline_defaults
from safegate.settings import DEFAULT_TIMEOUTS, DatabaseTimeouts, local_models_api_base

log = logging.getLogger("safegate.upstreams")

DEFAULT_UPSTREAM_TIMEOUT_S = 60.0
DEFAULT_NUM_RETRIES = 1
LOCAL_API_KEY = "local"  # the local model server checks no key; litellm wants one
MIN_REFRESH_GAP_S = 1.0  # an unknown model re-reads the registry at most this often
# Parameters a client may set; nothing else reaches litellm (a client must never set
# api_base, api_key or mock_response).
FORWARDED_PARAMS = frozenset(
    {
        "frequency_penalty",
        "logit_bias",
        "max_completion_tokens",
        "max_tokens",
        "n",
        "parallel_tool_calls",
        "presence_penalty",
        "response_format",
        "seed",
        "stop",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_p",
        "user",
    }
)


class UpstreamsError(Exception):
    """The upstreams file is missing, unreadable or invalid."""


class UpstreamFailed(ApiError):
    status = 502
    type = "upstream_error"


class UpstreamTimeout(ApiError):
    status = 504
    type = "upstream_error"


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    litellm: dict[str, Any] | None = None
    # An adapter served by the local model server, by its registry name: its address is
    # the one setting SAFEGATE_LOCAL_MODELS_PORT, not written here.
    local: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    description: str = ""

    @field_validator("litellm")
    @classmethod
    def _has_model(cls, params: dict[str, Any] | None) -> dict[str, Any] | None:
        if params is not None and (not isinstance(params.get("model"), str) or not params["model"]):
            raise ValueError("litellm.model must name a litellm model, e.g. openai/gpt-4o-mini")
        return params

    @property
    def litellm_model(self) -> str:
        """The litellm model string calls to this entry use."""
        if self.litellm is not None:
            return str(self.litellm["model"])
        return f"openai/{self.local}"

    @model_validator(mode="after")
    def _one_target(self) -> ModelEntry:
        if (self.litellm is None) == (self.local is None):
            raise ValueError(f"model {self.name!r} needs either litellm or local, not both")
        return self


class UpstreamsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(default_factory=list)
    aliases: dict[str, str] = Field(default_factory=dict)
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    timeout_s: float = Field(default=DEFAULT_UPSTREAM_TIMEOUT_S, gt=0)
    num_retries: int = Field(default=DEFAULT_NUM_RETRIES, ge=0, le=10)
    local_adapters: bool = True

    def litellm_models(self, name: str) -> tuple[str, ...]:
        """The litellm model strings a call to ``name`` may reach: its own, then its
        fallbacks' (aliases followed); a name not configured is a deployed adapter on the
        local model server. Used to price and count tokens."""
        target = self.aliases.get(name, name)
        entries = {entry.name: entry for entry in self.models}
        chain = [target, *self.fallbacks.get(target, ())]
        return tuple(
            dict.fromkeys(
                entries[member].litellm_model if member in entries else f"openai/{member}"
                for member in chain
            )
        )

    @classmethod
    def load(cls, path: Path) -> UpstreamsConfig:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise UpstreamsError(f"cannot read upstreams file {path}: {error}") from error
        except yaml.YAMLError as error:
            raise UpstreamsError(f"upstreams file {path} is not valid YAML: {error}") from error
        if isinstance(raw, dict) and "local_api_base" in raw:
            raise UpstreamsError(
                f"upstreams file {path}: local_api_base is no longer read; the local model "
                "server's address is one setting, SAFEGATE_LOCAL_MODELS_PORT"
            )
        try:
            config = cls.model_validate(raw)
        except ValidationError as error:
            raise UpstreamsError(f"upstreams file {path} is invalid: {error}") from error
        names = {entry.name for entry in config.models}
        for alias, target in config.aliases.items():
            if target not in names:
                raise UpstreamsError(f"{path}: alias {alias!r} points at unknown model {target!r}")
        for model, chain in config.fallbacks.items():
            for name in (model, *chain):
                if name not in names:
                    raise UpstreamsError(f"{path}: fallbacks name unknown model {name!r}")
        return config


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One callable model as ``/v1/models`` shows it."""

    id: str
    owned_by: str
    created: int


AdapterSource = Callable[[], Sequence[str]]


class LitellmUpstreams:
    """The configured models behind one ``litellm.Router``."""

    def __init__(
        self,
        config: UpstreamsConfig,
        *,
        adapters: AdapterSource | None = None,
        local_api_base: str = local_models_api_base(),
    ) -> None:
        offline_defaults()
        self.config = config
        self.local_api_base = local_api_base
        self._adapters = adapters if config.local_adapters else None
        self._local: tuple[str, ...] = ()
        self._refreshed = 0.0
        self._created = int(time.time())
        self._router = self._build()

    def _build(self) -> Any:
        from litellm.router import Router

        model_list = [
            {"model_name": entry.name, "litellm_params": self._params(entry)}
            for entry in self.config.models
        ]
        configured = {entry.name for entry in self.config.models}
        model_list += [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": self.local_api_base,
                    "api_key": LOCAL_API_KEY,
                },
            }
            for name in self._local
            if name not in configured
        ]
        return Router(
            model_list=model_list,
            model_group_alias=dict(self.config.aliases),
            fallbacks=[{model: chain} for model, chain in self.config.fallbacks.items()],
            num_retries=self.config.num_retries,
            timeout=self.config.timeout_s,
            stream_timeout=self.config.timeout_s,
        )

    def _params(self, entry: ModelEntry) -> dict[str, Any]:
        if entry.litellm is not None:
            return dict(entry.litellm)
        return {
            "model": f"openai/{entry.local}",
            "api_base": self.local_api_base,
            "api_key": LOCAL_API_KEY,
        }

    def refresh(self) -> bool:
        """Read the deployed adapters again; True when the list changed."""
        if self._adapters is None:
            return False
        self._refreshed = time.monotonic()
        try:
            found = tuple(sorted(self._adapters()))
        except Exception as exc:  # noqa: BLE001 - the configured models keep working
            log.warning("cannot read deployed adapters", extra={"error": type(exc).__name__})
            return False
        if found == self._local:
            return False
        self._local = found
        self._router = self._build()
        log.info("upstreams refreshed", extra={"adapters": list(found)})
        return True

    def known(self, name: str) -> bool:
        names = {entry.name for entry in self.config.models} | set(self._local)
        return name in names or name in self.config.aliases

    def models(self) -> list[ModelInfo]:
        configured = [ModelInfo(e.name, "safegate", self._created) for e in self.config.models]
        local = [
            ModelInfo(name, "safegate-local", self._created)
            for name in self._local
            if name not in {e.name for e in self.config.models}
        ]
        aliases = [ModelInfo(alias, "safegate", self._created) for alias in self.config.aliases]
        return configured + local + aliases

    def litellm_models(self, name: str) -> tuple[str, ...]:
        """``UpstreamsConfig.litellm_models``: what a call to ``name`` may reach."""
        return self.config.litellm_models(name)

    def reports_stream_usage(self, name: str) -> bool:
        """Whether every model ``name`` may reach takes ``stream_options`` (so a stream can
        be asked for its usage)."""
        from litellm import get_supported_openai_params

        for model in self.litellm_models(name):
            try:
                supported = get_supported_openai_params(model=model) or []
            except Exception:  # noqa: BLE001 - a provider litellm cannot place: do not ask
                return False
            if "stream_options" not in supported:
                return False
        return True

    async def resolve(self, name: str) -> str:
        """The name itself when callable; a 404 in OpenAI's words otherwise."""
        if not self.known(name) and time.monotonic() - self._refreshed >= MIN_REFRESH_GAP_S:
            await asyncio.to_thread(self.refresh)
        if not self.known(name):
            raise NotFound(
                f"The model '{name}' does not exist or you do not have access to it; "
                "GET /v1/models lists the models this gateway serves",
                param="model",
                code="model_not_found",
            )
        return name

    async def complete(
        self, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> Any:
        """The whole call, retries and fallbacks included, ends within ``timeout_s``."""
        limit = self.config.timeout_s
        try:
            async with asyncio.timeout(limit):
                response = await self._router.acompletion(
                    model=model, messages=list(messages), **params
                )
        except TimeoutError as exc:
            raise _timed_out(model, limit) from exc
        except Exception as exc:
            raise upstream_error(exc, model=model) from exc
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise UpstreamFailed(
                f"model {model!r} returned a malformed answer (no choices)", code="upstream_error"
            )
        return response

    async def stream(
        self, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> AsyncIterator[Any]:
        """The first chunk arrives within ``timeout_s`` of the call (retries included), and
        each later one within ``timeout_s`` of the one before."""
        limit = self.config.timeout_s
        deadline = asyncio.get_running_loop().time() + limit
        try:
            async with asyncio.timeout(limit):
                chunks = await self._router.acompletion(
                    model=model, messages=list(messages), stream=True, **params
                )
        except TimeoutError as exc:
            raise _timed_out(model, limit) from exc
        except Exception as exc:
            raise upstream_error(exc, model=model) from exc
        return _guarded(chunks, model=model, first_deadline=deadline, gap_s=limit)


def registry_adapters(
    database_url: str, *, timeouts: DatabaseTimeouts = DEFAULT_TIMEOUTS
) -> AdapterSource:
    """The names of the adapters deployed in the model registry (its read API).

    Reads are rare (start-up, an unknown model at most every ``MIN_REFRESH_GAP_S``), so no
    connection is kept between them: nothing is left open for the garbage collector.
    """
    state: dict[str, Any] = {}

    def read() -> list[str]:
        from finetune.db import Database
        from finetune.registry import ModelKind, ModelRegistry

        if "registry" not in state:
            database = Database(database_url, timeouts=timeouts)
            try:
                database.migrate()
            finally:
                database.dispose()
            state["registry"] = ModelRegistry(database)
        registry: ModelRegistry = state["registry"]
        try:
            return [m.name for m in registry.deployed_models() if m.kind is ModelKind.ADAPTER]
        finally:
            registry.database.dispose()

    return read


def _timed_out(model: str, limit: float) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"model {model!r} did not answer within {limit:g} s (timeout_s, retries included)",
        code="upstream_timeout",
    )


def _meaningful(chunk: Any) -> bool:
    """A chunk that carries something of an answer: a choice with a role, content or tool
    calls. (litellm makes up a bare ``finish_reason`` chunk for a body it cannot parse.)"""
    for choice in getattr(chunk, "choices", None) or ():
        delta = getattr(choice, "delta", None)
        if delta is not None and (
            getattr(delta, "content", None)
            or getattr(delta, "tool_calls", None)
            or getattr(delta, "role", None)
        ):
            return True
    return False


async def _guarded(
    chunks: Any, *, model: str, first_deadline: float, gap_s: float
) -> AsyncIterator[Any]:
    """Map failures to the gateway's errors, bound the waits, refuse an empty stream.

    Chunks before the first one that carries an answer are held back, so a stream with no
    answer at all fails on the first read, before the client is sent a 200.
    """
    loop = asyncio.get_running_loop()
    iterator = aiter(chunks)
    valid = False
    held: list[Any] = []
    wait = max(0.0, first_deadline - loop.time())
    while True:
        try:
            async with asyncio.timeout(wait):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            break
        except TimeoutError as exc:
            raise _timed_out(model, gap_s) from exc
        except Exception as exc:
            raise upstream_error(exc, model=model) from exc
        if getattr(chunk, "choices", None) is None:
            raise UpstreamFailed(
                f"model {model!r} sent a malformed stream chunk", code="upstream_error"
            )
        wait = gap_s
        if not valid:
            held.append(chunk)
            if not _meaningful(chunk):
                continue
            valid = True
            for early in held:
                yield early
            held.clear()
            continue
        yield chunk
    if not valid:
        raise UpstreamFailed(
            f"model {model!r} ended its stream without a valid chunk (a malformed answer)",
            code="upstream_error",
        )


def upstream_error(exc: BaseException, *, model: str) -> ApiError:
    """Map a litellm (openai-style) exception to the gateway's error for the client.

    The upstream's own message is kept to its first line: it names the cause (a refused
    connection, an unknown model upstream) without echoing request content.
    """
    from litellm import exceptions

    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, exceptions.Timeout):
        return UpstreamTimeout(
            f"model {model!r} did not answer in time: {detail}", code="upstream_timeout"
        )
    if isinstance(exc, exceptions.ContextWindowExceededError | exceptions.BadRequestError):
        return InvalidRequest(
            f"model {model!r} rejected the request: {detail}", code="upstream_bad_request"
        )
    return UpstreamFailed(
        f"model {model!r} failed ({type(exc).__name__}): {detail}", code="upstream_error"
    )
