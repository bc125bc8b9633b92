"""Eval suites: one YAML file names the datasets, the models, how to generate and what to score.

```yaml
name: smoke
datasets:
  - name: console_support_qa
    path: ../../data/evals/console_support_qa.jsonl   # relative to this file
    format: chat                                      # or prompt
models:
  - name: demo
    via: gateway            # the gateway's OpenAI API: what users get, filter included
  - name: demo-direct
    via: litellm            # straight to the model, no filter
    model: openai/demo-console-support
    params: {api_base: "http://127.0.0.1:8001/v1", api_key: local}
generation: {temperature: 0, max_tokens: 128}
metrics: [rougeL, {name: bleu, options: {}}]
gate: ../gates/default.yaml
concurrency: 4
```

``load_suite`` validates the file with pydantic and checks that every file it names exists;
each problem is reported as ``FILE: FIELD: what is wrong`` (``smoke.yaml: datasets[1].path:
file not found``). Metric names are checked against the metric registry by the runner, and
models by their callers, still before any model is called.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evals.errors import ModelNotFound, SuiteError

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000/v1"
DEFAULT_API_KEY_ENV = "SAFEGATE_KEY"
DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 64
DEFAULT_MAX_TOKENS = 256
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 2
# A run whose share of failed calls exceeds this is marked failed (its outputs and
# metrics are still stored, and a resume retries the failed calls).
DEFAULT_MAX_ERROR_RATE = 0.05
GATEWAY_PREFIX = "gateway:"
LITELLM_PREFIX = "litellm:"

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$"
_SECRET_PARAM = re.compile(r"(key|token|secret|password|credentials?)$", re.IGNORECASE)


class DatasetFormat(StrEnum):
    CHAT = "chat"  # {"messages": [...], "reference"?, "labels"?, "id"?}
    PROMPT = "prompt"  # {"prompt": str, "reference"?, "labels"?, "id"?}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HfSource(_Strict):
    """A Hugging Face dataset, read with ``datasets.load_dataset`` (needs the network)."""

    name: str = Field(min_length=1)
    split: str = "test"
    config: str | None = None


class DatasetSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    path: str | None = None  # local JSONL (or CSV / JSON array), relative to the suite file
    hf: HfSource | None = None
    format: DatasetFormat = DatasetFormat.CHAT
    limit: int | None = Field(default=None, ge=1)
    # Labels every row of this dataset gets (a row's own labels win), e.g. {harmful: true}.
    labels: dict[str, Any] = Field(default_factory=dict)
    # Which fields hold the prompt (prompt format), the reference and the row id: a key, a
    # CSV column, or a dotted path into nested rows (``turns.0`` is the first turn).
    prompt_field: str = Field(default="prompt", min_length=1)
    reference_field: str = Field(default="reference", min_length=1)
    id_field: str = Field(default="id", min_length=1)
    # For the prompt format: a system message sent before every prompt.
    system: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of path (a local file) or hf (a Hugging Face set)")
        return self


class _ModelBase(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    # Free text that goes into the cache key: change it when the model behind the name
    # changes (a new adapter deployed under the same name, a new policy) to call it afresh.
    revision: str | None = None
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)
    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0, le=10)


def base_url_problem(value: str) -> str | None:
    """Why ``value`` is not a usable base URL (``http(s)://HOST[:PORT][/PATH]``), or None."""
    try:
        parts = urllib.parse.urlsplit(value)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a port that is not a number, or out of range
        parts, port_ok = None, False
    if (
        parts is None
        or not port_ok
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or any(char.isspace() for char in value)
    ):
        return f"{value!r} is not an http(s) base URL (e.g. {DEFAULT_GATEWAY_URL})"
    return None


class GatewayModel(_ModelBase):
    """A model behind a safegate gateway, called with the official ``openai`` client."""

    via: Literal["gateway"]
    model: str | None = None  # the name the gateway serves; defaults to ``name``
    base_url: str = DEFAULT_GATEWAY_URL
    api_key_env: str = DEFAULT_API_KEY_ENV

    @field_validator("base_url")
    @classmethod
    def _usable_url(cls, value: str) -> str:
        problem = base_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @property
    def served_name(self) -> str:
        return self.model or self.name

    def identity(self) -> dict[str, Any]:
        return {
            "via": self.via,
            "base_url": self.base_url.rstrip("/"),
            "model": self.served_name,
            "revision": self.revision,
        }


class LitellmModel(_ModelBase):
    """A model called directly through ``litellm.acompletion`` (any provider string)."""

    via: Literal["litellm"]
    model: str = Field(min_length=1)
    # litellm's completion parameters (api_base, api_key, mock_response, ...). A value
    # ``os.environ/NAME`` is read from the environment, as in the gateway's upstreams.yaml.
    params: dict[str, Any] = Field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        public = {k: v for k, v in self.params.items() if not _SECRET_PARAM.search(k)}
        return {"via": self.via, "model": self.model, "params": public, "revision": self.revision}


ModelSpec = Annotated[GatewayModel | LitellmModel, Field(discriminator="via")]


class Generation(_Strict):
    """Generation parameters sent with every call (and part of every cache key)."""

    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = 0
    stop: list[str] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def params(self) -> dict[str, Any]:
        """The request parameters, without the ones left unset."""
        return self.model_dump(exclude_none=True)


class MetricSpec(_Strict):
    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class SuiteSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    datasets: list[DatasetSpec] = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    generation: Generation = Field(default_factory=Generation)
    metrics: list[MetricSpec] = Field(default_factory=list)
    gate: str | None = None  # a gate YAML, relative to the suite file (used by compare)
    concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=MAX_CONCURRENCY)
    max_error_rate: float = Field(default=DEFAULT_MAX_ERROR_RATE, ge=0, le=1)

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("datasets")
    @classmethod
    def _unique_datasets(cls, value: list[DatasetSpec]) -> list[DatasetSpec]:
        _no_duplicates([item.name for item in value], "dataset")
        return value

    @field_validator("models")
    @classmethod
    def _unique_models(cls, value: list[GatewayModel | LitellmModel]) -> list[Any]:
        _no_duplicates([item.name for item in value], "model")
        return value

    @field_validator("metrics")
    @classmethod
    def _unique_metrics(cls, value: list[MetricSpec]) -> list[MetricSpec]:
        _no_duplicates([item.name for item in value], "metric")
        return value


def _no_duplicates(names: Sequence[str], kind: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{kind} {name!r} is named twice")
        seen.add(name)


@dataclass(frozen=True, slots=True)
class Suite:
    """A validated suite and where it came from."""

    path: Path  # as the user gave it (messages name it so)
    sha256: str  # of the file's bytes
    spec: SuiteSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base_dir(self) -> Path:
        return self.path.resolve().parent

    def resolve(self, relative: str) -> Path:
        """A path the suite names, relative to the suite file."""
        return (self.base_dir / Path(relative).expanduser()).resolve()

    def where(self, field: str) -> str:
        """``FILE: FIELD`` for messages about one field."""
        return f"{self.path}: {field}"

    @property
    def gate_path(self) -> Path | None:
        return self.resolve(self.spec.gate) if self.spec.gate else None


@dataclass(frozen=True, slots=True)
class ChosenModel:
    """A model to run, the field that named it (for messages) and how it was chosen."""

    spec: GatewayModel | LitellmModel
    field: str  # "models[1]" or "--model"
    selector: str  # what --model says to choose it again (a resume does)
    # Where its base URL came from when not from the suite ("--base-url", "SAFEGATE_BASE_URL").
    base_url_from: str | None = None


def load_suite(path: Path | str) -> Suite:
    """Read and validate a suite file; raises ``SuiteError`` naming the file and the field."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SuiteError(f"{path}: file not found") from None
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SuiteError(f"{path}: {line}not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: a suite is a YAML mapping (name, datasets, models, ...)")
    try:
        spec = SuiteSpec.model_validate(raw)
    except ValidationError as exc:
        raise SuiteError("\n".join(_describe(path, exc))) from None
    suite = Suite(path=path, sha256=hashlib.sha256(data).hexdigest(), spec=spec)
    _check_files(suite)
    return suite


def _check_files(suite: Suite) -> None:
    problems: list[str] = []
    for index, dataset in enumerate(suite.spec.datasets):
        if dataset.path is not None and not suite.resolve(dataset.path).is_file():
            problems.append(
                f"{suite.where(f'datasets[{index}].path')}: file not found "
                f"({suite.resolve(dataset.path)})"
            )
    gate = suite.gate_path
    if gate is not None and not gate.is_file():
        problems.append(f"{suite.where('gate')}: file not found ({gate})")
    if problems:
        raise SuiteError("\n".join(problems))


def _describe(path: Path, error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors(include_url=False):
        field = _field_name(item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "union_tag_invalid":
            message = "via must be 'gateway' or 'litellm'"
        elif item["type"] == "union_tag_not_found":
            message = "via is missing (gateway or litellm)"
        lines.append(f"{path}: {field}: {message}" if field else f"{path}: {message}")
    return lines


def _field_name(loc: Sequence[int | str]) -> str:
    parts: list[str] = []
    for index, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(f"[{part}]")
            continue
        # a discriminated union puts its tag in the path: models[0].gateway.base_url
        tagged = index >= 2 and loc[0] == "models" and isinstance(loc[index - 1], int)
        if tagged and part in ("gateway", "litellm"):
            continue
        parts.append(f".{part}" if parts else part)
    return "".join(parts)


def choose_models(suite: Suite, name: str | None) -> list[ChosenModel]:
    """The suite's models to run: all of them, the one ``--model`` names, or an override.

    ``--model gateway:NAME`` runs the gateway model NAME (base URL and key variable from
    the suite's first gateway model, or the defaults); ``--model litellm:MODEL`` runs a
    litellm model string directly. Any other name must be one of the suite's models.
    """
    models = suite.spec.models
    if name is None:
        return [
            ChosenModel(spec, f"models[{index}]", spec.name) for index, spec in enumerate(models)
        ]
    for index, spec in enumerate(models):
        if spec.name == name:
            return [ChosenModel(spec, f"models[{index}]", name)]
    override: GatewayModel | LitellmModel | None = None
    try:
        if name.startswith(GATEWAY_PREFIX) and name.removeprefix(GATEWAY_PREFIX):
            served = name.removeprefix(GATEWAY_PREFIX)
            like = next((m for m in models if isinstance(m, GatewayModel)), None)
            override = GatewayModel(
                name=served,
                via="gateway",
                model=served,
                base_url=like.base_url if like else DEFAULT_GATEWAY_URL,
                api_key_env=like.api_key_env if like else DEFAULT_API_KEY_ENV,
            )
        elif name.startswith(LITELLM_PREFIX) and name.removeprefix(LITELLM_PREFIX):
            model = name.removeprefix(LITELLM_PREFIX)
            override = LitellmModel(name=model, via="litellm", model=model)
    except ValidationError:
        raise ModelNotFound(f"{suite.path}: --model: {name!r} is not a usable model name") from None
    if override is not None:
        return [ChosenModel(override, "--model", name)]
    known = ", ".join(spec.name for spec in models)
    raise ModelNotFound(
        f"{suite.path}: --model: unknown model {name!r}; the suite has {known} "
        f"(or name one as {GATEWAY_PREFIX}NAME or {LITELLM_PREFIX}MODEL)"
    )


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without secrets (api keys, tokens), for records and cache keys."""
    return {k: ("<redacted>" if _SECRET_PARAM.search(k) else v) for k, v in params.items()}
