"""Local serving: one Phi-3 base and every deployed LoRA adapter, behind OpenAI's chat API.

``LocalModelServer`` loads ONE base (a registered base's folder, or a local path or hub
id) and attaches with peft each adapter deployed on it: ``PeftModel.from_pretrained`` for
the first, ``load_adapter(path, adapter_name=name)`` for the rest. A request's ``model``
picks the adapter; the server switches with ``set_adapter(name)`` (or runs the bare base
inside ``disable_adapter()``) per request, without reloading the base. ``refresh()``
reads the registry again and attaches newly deployed adapters, drops undeployed ones and
reloads one whose registry row changed; the base stays where it is.

``create_app(server)`` serves it::

    GET  /v1/models              the base as "<base-name>", each adapter by name
    GET  /v1/models/{id}         one of them
    POST /v1/chat/completions    OpenAI's request; "stream": true answers with SSE chunks
    GET  /healthz                base, adapters, adapters that failed to load

A request that leaves out ``temperature`` or ``top_p`` gets the base's own defaults where
its ``generation_config.json`` sets them, as vLLM applies them (``SamplingDefaults``):
``"do_sample": false`` answers greedily (the demo base says so: its adapters answer what
they learned), ``temperature`` and ``top_p`` are taken as they are. Otherwise, and for
Phi-3's own files, which set none of them, OpenAI's defaults (1.0 and 1.0) apply.

One request at a time reaches the model: generations and refreshes run on one worker
thread per loaded model (``GenerationWorker``), never on the event loop, and at most
``DEFAULT_MAX_QUEUED`` wait for it; past that the server answers 503. A stream's
generation runs on that thread and hands text to the event loop through transformers'
``AsyncTextIteratorStreamer``; a client that goes away cancels its generation at the next
token. The registry is read again every ``DEFAULT_REFRESH_S`` seconds, and at once when a
request names a model the server does not know, so a ``safegate models deploy`` is
picked up without a restart.

Errors leave as OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``;
a malformed request is a 400, never a 422 or a 500::

    FinetuneError (finetune.errors)
     +-- ServingError            status  type                   code
          +-- InvalidRequest     400     invalid_request_error  invalid_value, ...
          +-- ModelNotFound      404     invalid_request_error  model_not_found
          +-- ModelUnavailable   503     service_unavailable    model_unavailable
          +-- ServerBusy         503     service_unavailable    server_busy

The gateway reaches this server through litellm as an OpenAI-compatible upstream
(``hosted_vllm/<name>`` or ``openai/<name>`` with ``api_base="http://127.0.0.1:8001/v1"``).

Past one machine
----------------
This server is for one CPU or GPU box. To serve the same adapters at scale, point vLLM at
the same base and the same adapter folders (the registry's ``path`` of each adapter)::

    vllm serve microsoft/Phi-3-mini-4k-instruct --enable-lora --max-lora-rank 64 \\
        --lora-modules safety-tuned=/srv/safegate/models/safety-tuned \\
                       support-bot=/srv/safegate/models/support-bot \\
        --port 8001

vLLM exposes the same ``/v1/chat/completions`` and ``/v1/models``, the adapters under the
same names, so the gateway changes only its upstream: litellm's ``hosted_vllm/`` route,
``model="hosted_vllm/safety-tuned"`` with ``api_base="http://vllm-host:8001/v1"``. Run
several vLLM replicas behind a load balancer (or litellm's Router) for more throughput;
adapters can be added at run time with vLLM's ``/v1/load_lora_adapter`` when
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeGuard, TypeVar

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune.chat import END_OF_TURN, PHI3_CHAT_TEMPLATE
from finetune.errors import BaseModelError, FinetuneError, RegistryError
from finetune.registry import Model, ModelKind

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer

log = logging.getLogger("safegate.finetune.serving")

T = TypeVar("T")

OWNER = "safegate"
DEFAULT_MAX_TOKENS = 256  # when a request gives neither max_tokens nor max_completion_tokens
MAX_TOKENS_CAP = 2048  # a request asking for more is refused
DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults, unless the base's generation config sets its own
DEFAULT_TOP_P = 1.0
GENERATION_CONFIG = "generation_config.json"
MAX_STOP_SEQUENCES = 4
MAX_MESSAGES = 256
MAX_PROMPT_CHARS = 200_000  # checked before tokenizing
DEFAULT_GENERATION_TIMEOUT_S = 300.0  # a generation running longer stops, finish_reason "length"
DEFAULT_MAX_QUEUED = 16  # requests waiting for the model beyond this get a 503
DEFAULT_REFRESH_S = 10.0  # how often the registry is read again; 0 turns it off
MIN_REFRESH_GAP_S = 1.0  # an unknown model triggers a refresh at most this often
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_REASON_CHARS = 300  # of a load failure, in /healthz

FinishReason = Literal["stop", "length"]


# -- errors ---------------------------------------------------------------------------------


class ServingError(FinetuneError):
    """A request the server refuses; carries its HTTP status and OpenAI error fields."""

    status = 400
    type = "invalid_request_error"
    default_code = "invalid_value"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code


class InvalidRequest(ServingError):
    pass


class ModelNotFound(ServingError):
    status = 404
    default_code = "model_not_found"


class ModelUnavailable(ServingError):
    status = 503
    type = "service_unavailable"
    default_code = "model_unavailable"


class ServerBusy(ServingError):
    status = 503
    type = "service_unavailable"
    default_code = "server_busy"


# -- what the server serves -------------------------------------------------------------------


class ModelSource(Protocol):
    """The registry's read API the server needs (``finetune.registry.ModelRegistry``)."""

    def find(self, name: str) -> Model | None: ...

    def list(self) -> builtins.list[Model]: ...

    def deployed_models(self) -> builtins.list[Model]: ...


@dataclass(frozen=True)
class BaseSpec:
    """The base to load: the name it is served under, where it loads from, and every
    spelling an adapter's ``base`` may use for it (registry name, path or hub id)."""

    name: str
    path: str
    aliases: frozenset[str]
    created: datetime | None = None


def resolve_base(spec: str, *, registry: ModelSource | None = None) -> BaseSpec:
    """A registered base's name, or a local path or hub id (registered or not)."""
    model = registry.find(spec) if registry is not None else None
    if model is not None and model.kind is ModelKind.ADAPTER:
        raise RegistryError(
            f"{spec!r} is an adapter, not a base; serve its base {model.base!r} instead"
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
        return BaseSpec(model.name, model.path, frozenset(aliases), model.created_at)
    path = Path(spec).expanduser()
    return BaseSpec(spec, str(path) if path.exists() else spec, frozenset(_spellings(spec)))


def _spellings(spec: str) -> set[str]:
    """A base as written, and as an absolute path when it is a local folder."""
    return {spec, _spelling(spec)}


def _spelling(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def deployed_base(registry: ModelSource) -> str:
    """The one base every deployed adapter was trained on; refuses none or several."""
    adapters = [m for m in registry.deployed_models() if m.kind is ModelKind.ADAPTER]
    if not adapters:
        raise RegistryError(
            "no adapter is deployed; run 'safegate models deploy NAME' or pass --base"
        )
    bases: dict[str, list[str]] = {}
    for adapter in adapters:
        base = resolve_base(adapter.base or "", registry=registry).name
        bases.setdefault(base, []).append(adapter.name)
    if len(bases) > 1:
        listing = "; ".join(f"{base} ({', '.join(sorted(names))})" for base, names in bases.items())
        raise RegistryError(
            f"deployed adapters span several bases: {listing}; pick one with --base"
        )
    return next(iter(bases))


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``/v1/models``."""

    id: str
    kind: ModelKind
    base: str | None
    created: int


Role = Literal["system", "user", "assistant"]
ROLES: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, or what the context has left
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    stop: tuple[str, ...] = ()
    seed: int | None = None
    timeout_s: float = DEFAULT_GENERATION_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_TOKENS_CAP:
            raise InvalidRequest(
                f"max_tokens must be between 1 and {MAX_TOKENS_CAP}, got {self.max_tokens}",
                param="max_tokens",
            )
        if not 0 <= self.temperature <= 2:
            raise InvalidRequest("temperature must be between 0 and 2", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(not s for s in self.stop):
            raise InvalidRequest(
                f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings", param="stop"
            )
        if self.timeout_s <= 0:
            raise InvalidRequest("timeout_s must be positive", param="timeout_s")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves out ``temperature`` or ``top_p`` gets."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P

    @classmethod
    def of(cls, generation_config: Mapping[str, Any]) -> SamplingDefaults:
        """A base's defaults from its ``generation_config.json``: ``do_sample: false`` is
        greedy, ``temperature`` and ``top_p`` count where set; OpenAI's otherwise. A value
        out of OpenAI's range is ignored (logged), never an error for every request."""
        if generation_config.get("do_sample") is False:
            return cls(temperature=0.0)
        temperature = generation_config.get("temperature", DEFAULT_TEMPERATURE)
        top_p = generation_config.get("top_p", DEFAULT_TOP_P)
        if _number(temperature) and _number(top_p) and 0 <= temperature <= 2 and 0 < top_p <= 1:
            return cls(temperature=float(temperature), top_p=float(top_p))
        log.warning("the base's generation config has sampling values out of range; ignored")
        return cls()

    @classmethod
    def of_base(cls, location: str) -> SamplingDefaults:
        """The defaults of a local folder, or of a hub id from the local cache only."""
        folder = Path(location).expanduser()
        if folder.is_dir():
            found: object = folder / GENERATION_CONFIG
        else:
            from huggingface_hub import try_to_load_from_cache

            try:
                found = try_to_load_from_cache(location, GENERATION_CONFIG)
            except Exception:  # noqa: BLE001 - not a hub id: no file, no defaults
                found = None
        if not isinstance(found, str | Path) or not Path(found).is_file():
            return cls()
        try:
            data = json.loads(Path(found).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("cannot read the base's %s: %s", GENERATION_CONFIG, _reason(exc))
            return cls()
        return cls.of(data) if isinstance(data, dict) else cls()


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Prompt:
    """A tokenized request, checked against the model's context window."""

    model: str
    adapter: str | None  # None: the bare base
    input_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RefreshReport:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Loaded:
    model: Model
    signature: tuple[str, str]


# -- the server -------------------------------------------------------------------------------


class LocalModelServer:
    """One loaded base with its deployed adapters; thread-safe, one generation at a time.

    Every method that touches the model blocks: call them from a worker thread
    (``GenerationWorker``), never from an event loop. ``served()`` and ``knows()`` only
    read a snapshot and are safe anywhere.
    """

    def __init__(
        self,
        base: BaseSpec,
        *,
        registry: ModelSource | None = None,
        device: str | None = None,
    ) -> None:
        self.base = base
        self.registry = registry
        self.device = device
        self.base_loads = 0
        self.last_refresh = 0.0
        self._lock = threading.RLock()
        self._model: Any = None  # the base, or the PeftModel wrapping it
        self._base_model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._stop_ids: tuple[int, ...] = ()
        self._context = 0
        self.sampling_defaults = SamplingDefaults()  # the base's, once it is loaded
        self._adapters: Mapping[str, _Loaded] = {}
        self._failed: Mapping[str, tuple[tuple[str, str], str]] = {}
        self._started = int(time.time())

    @classmethod
    def open(
        cls, base: str, *, registry: ModelSource | None = None, device: str | None = None
    ) -> LocalModelServer:
        """Resolve ``base``, load it and attach its deployed adapters."""
        server = cls(resolve_base(base, registry=registry), registry=registry, device=device)
        server.load()
        return server

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> None:
        """Load the base and tokenizer (once), then attach the deployed adapters."""
        with self._lock:
            if self._base_model is None:
                self._load_base()
        self.refresh()

    def _load_base(self) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer, Phi3ForCausalLM

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        where = f"base {self.base.name!r}" + (
            f" ({self.base.path})" if self.base.path != self.base.name else ""
        )
        try:
            config = AutoConfig.from_pretrained(self.base.path)
            if config.model_type != "phi3":
                raise BaseModelError(
                    f"{where} is a {config.model_type!r} model; the server loads Phi-3 bases"
                )
            tokenizer = AutoTokenizer.from_pretrained(self.base.path)
            model = Phi3ForCausalLM.from_pretrained(
                self.base.path, dtype=dtype, use_safetensors=True
            )
        except BaseModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - offline, missing, corrupt: all say why
            raise BaseModelError(f"cannot load {where}: {exc}") from exc
        module: torch.nn.Module = model  # typed view: transformers' wrappers confuse mypy
        module.to(device)
        module.eval()
        self.device = device
        self._tokenizer = tokenizer
        self._base_model = model
        self._model = model
        self._stop_ids = _stop_token_ids(tokenizer, model)
        self._context = int(getattr(config, "max_position_embeddings", 0) or 4096)
        self.sampling_defaults = SamplingDefaults.of_base(self.base.path)
        self.base_loads += 1
        log.info("base loaded", extra={"base": self.base.name, "device": device})

    @property
    def base_model(self) -> PreTrainedModel:
        """The loaded base (the same object for the server's whole life)."""
        if self._base_model is None:
            raise BaseModelError("the base is not loaded; call load() first")
        return self._base_model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise BaseModelError("the base is not loaded; call load() first")
        return self._tokenizer

    def refresh(self) -> RefreshReport:
        """Attach newly deployed adapters, drop undeployed ones; the base stays loaded."""
        if self.registry is None:
            self.last_refresh = time.monotonic()
            return RefreshReport()
        wanted = {
            m.name: m
            for m in self.registry.deployed_models()
            if m.kind is ModelKind.ADAPTER and m.base and _spellings(m.base) & self.base.aliases
        }
        with self._lock:
            self.last_refresh = time.monotonic()
            loaded = dict(self._adapters)
            failed = dict(self._failed)
            removed = [
                name
                for name, entry in loaded.items()
                if name not in wanted or _signature(wanted[name]) != entry.signature
            ]
            for name in removed:
                self._detach(name, keep=[n for n in loaded if n not in removed])
                del loaded[name]
            added: list[str] = []
            new_failures: list[str] = []
            for name, model in wanted.items():
                signature = _signature(model)
                if name in loaded or failed.get(name, (None,))[0] == signature:
                    continue
                try:
                    self._attach(model)
                except Exception as exc:  # noqa: BLE001 - reported by /healthz and a 503
                    failed[name] = (signature, _reason(exc))
                    new_failures.append(name)
                    log.error(
                        "adapter %s failed to load: %s",
                        name,
                        failed[name][1],
                        extra={"adapter": name},
                    )
                    continue
                failed.pop(name, None)
                loaded[name] = _Loaded(model, signature)
                added.append(name)
            failed = {name: entry for name, entry in failed.items() if name in wanted}
            self._adapters = loaded
            self._failed = failed
        report = RefreshReport(
            tuple(added), tuple(n for n in removed if n not in wanted), tuple(new_failures)
        )
        if report.added or report.removed or report.failed:
            log.info("adapters refreshed", extra={"added": added, "removed": list(report.removed)})
        return report

    def _attach(self, model: Model) -> None:
        from peft import PeftModel

        folder = Path(model.path)
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise ModelUnavailable(
                f"adapter {model.name!r} has no {ADAPTER_WEIGHTS} in {folder}; "
                "only safetensors adapters are loaded"
            )
        try:
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(folder), adapter_name=model.name)
            else:
                self._model = PeftModel.from_pretrained(
                    self.base_model, str(folder), adapter_name=model.name
                )
        except Exception:
            self._undo_attach(model.name)
            raise
        self._model.eval()

    def _undo_attach(self, name: str) -> None:
        """Take out what a failed load left in the model (peft injects layers first)."""
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(self._model, PeftModel):
            if name in self._model.peft_config:
                self._model.delete_adapter(name)
            return
        base = self.base_model
        for path, module in list(base.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, child = path.rpartition(".")
                setattr(base.get_submodule(parent), child, module.get_base_layer())
        if "peft_config" in vars(base):
            del base.peft_config

    def _detach(self, name: str, *, keep: Sequence[str]) -> None:
        from peft import PeftModel

        if not isinstance(self._model, PeftModel) or name not in self._model.peft_config:
            return
        remaining = [n for n in self._model.peft_config if n != name]
        if not remaining:
            self._model.delete_adapter(name)
            self._model = self._model.unload()  # the same base object, LoRA layers removed
            return
        if name in _active_adapters(self._model):
            self._model.set_adapter(next((n for n in remaining if n in keep), remaining[0]))
        self._model.delete_adapter(name)

    # -- what is served ---------------------------------------------------------------------

    def served(self) -> list[ServedModel]:
        """The base first, then each loaded adapter; reads a snapshot, never blocks."""
        created = int(self.base.created.timestamp()) if self.base.created else self._started
        models = [ServedModel(self.base.name, ModelKind.BASE, None, created)]
        for name, entry in sorted(self._adapters.items()):
            stamp = int(entry.model.created_at.timestamp())
            models.append(ServedModel(name, ModelKind.ADAPTER, self.base.name, stamp))
        return models

    def knows(self, name: str) -> bool:
        return name == self.base.name or name in self._adapters or name in self._failed

    @property
    def failed(self) -> dict[str, str]:
        """Deployed adapters that could not be attached, with the reason."""
        return {name: reason for name, (_, reason) in self._failed.items()}

    def adapter_for(self, name: str) -> str | None:
        """The adapter a model name selects (None: the bare base); refuses with the reason."""
        if name == self.base.name:
            return None
        if name in self._adapters:
            return name
        if name in self._failed:
            raise ModelUnavailable(
                f"model {name!r} is deployed but failed to load: {self._failed[name][1]}",
                param="model",
            )
        raise ModelNotFound(
            f"the model {name!r} does not exist; GET /v1/models lists the models served here",
            param="model",
        )

    # -- generation -------------------------------------------------------------------------

    def prepare(self, model: str, turns: Sequence[Turn], params: SamplingParams) -> Prompt:
        """Check the model name and tokenize the conversation with the chat template."""
        adapter = self.adapter_for(model)
        if sum(len(turn.content) for turn in turns) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"the messages are longer than {MAX_PROMPT_CHARS} characters",
                param="messages",
                code="context_length_exceeded",
            )
        tokenizer = self.tokenizer
        template = tokenizer.chat_template or PHI3_CHAT_TEMPLATE
        text = tokenizer.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in turns],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        if not isinstance(text, str):  # tokenize=False always renders a string
            raise InvalidRequest("the chat template did not render text", param="messages")
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        room = self._context - len(ids)
        if room < 1:
            raise InvalidRequest(
                f"this model's context is {self._context} tokens; the messages take {len(ids)}",
                param="messages",
                code="context_length_exceeded",
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequest(
                f"this model's context is {self._context} tokens; the messages take "
                f"{len(ids)} and max_tokens asks for {params.max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        limit = params.max_tokens or min(DEFAULT_MAX_TOKENS, room)
        return Prompt(model=model, adapter=adapter, input_ids=ids, max_tokens=limit)

    def complete(
        self, model: str, turns: Sequence[Turn], params: SamplingParams | None = None
    ) -> Completion:
        """Prepare and generate in one call (the blocking API; tests and scripts)."""
        params = params or SamplingParams()
        return self.generate(self.prepare(model, turns, params), params)

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        streamer: BaseStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Generate for a prepared prompt with its adapter; one generation at a time."""
        try:
            with self._lock:
                return self._generate(prompt, params, streamer=streamer, cancel=cancel)
        finally:
            if streamer is not None:
                streamer.end()  # type: ignore[no-untyped-call]  # always ends, even on errors

    def _generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        streamer: BaseStreamer | None,
        cancel: threading.Event | None,
    ) -> Completion:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        adapter = self.adapter_for(prompt.model)  # may have been undeployed since prepare()
        if cancel is not None and cancel.is_set():  # the client left while it waited
            return Completion("", "length", len(prompt.input_ids), 0)
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._stop_ids[0]
        options: dict[str, Any] = {
            "max_new_tokens": prompt.max_tokens,
            "eos_token_id": list(self._stop_ids),
            "pad_token_id": pad,
            "do_sample": not params.greedy,
        }
        if not params.greedy:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        config = GenerationConfig(**options)  # type: ignore[no-untyped-call]
        start = len(prompt.input_ids)
        criteria = StoppingCriteriaList(
            [
                _StopWhen(
                    decode=partial(_decode, tokenizer),
                    start=start,
                    stops=params.stop,
                    cancel=cancel or threading.Event(),
                    deadline=time.monotonic() + params.timeout_s,
                )
            ]
        )
        input_ids = torch.tensor([prompt.input_ids], device=self.device)
        began = time.monotonic()
        with self._active(adapter), torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                stopping_criteria=criteria,
                streamer=streamer,
            )
        new_ids = [int(i) for i in output[0, start:].tolist()]
        completion = _finish(
            _decode(tokenizer, new_ids),
            new_ids,
            params=params,
            stop_ids=self._stop_ids,
            prompt_tokens=start,
        )
        log.info(
            "generated",
            extra={
                "model": prompt.model,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "finish_reason": completion.finish_reason,
                "seconds": round(time.monotonic() - began, 3),
            },
        )
        return completion

    @contextmanager
    def _active(self, adapter: str | None) -> Iterator[None]:
        from peft import PeftModel

        model = self._model
        if not isinstance(model, PeftModel):
            if adapter is not None:  # not reachable: adapters live on a PeftModel
                raise ModelUnavailable(f"adapter {adapter!r} is not attached", param="model")
            yield
        elif adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter)
            yield


def _reason(exc: Exception) -> str:
    """An exception's type and first two lines (peft lists every mismatched tensor)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    more = f" (+{len(lines) - 2} more lines)" if len(lines) > 2 else ""
    return f"{type(exc).__name__}: {' '.join(lines[:2])[:MAX_REASON_CHARS]}{more}"


def _signature(model: Model) -> tuple[str, str]:
    return (model.path, model.created_at.isoformat())


def _active_adapters(model: Any) -> list[str]:
    active = model.active_adapter
    return [active] if isinstance(active, str) else list(active)


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> tuple[int, ...]:
    """``<|end|>`` first, then the tokenizer's and the model's end-of-sequence ids."""
    ids: list[int] = []
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.append(end)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif isinstance(configured, list):
        ids.extend(int(i) for i in configured)
    unique = tuple(dict.fromkeys(ids))
    if not unique:
        raise BaseModelError("the tokenizer has neither <|end|> nor an end-of-sequence token")
    return unique


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


def _finish(
    text: str,
    new_ids: Sequence[int],
    *,
    params: SamplingParams,
    stop_ids: Sequence[int],
    prompt_tokens: int,
) -> Completion:
    cut = first_stop(text, params.stop)
    if cut is not None:
        text, reason = text[:cut], "stop"
    elif new_ids and new_ids[-1] in stop_ids:
        reason = "stop"
    else:
        reason = "length"  # max_tokens, or the generation timed out or was cancelled
    return Completion(
        text=text,
        finish_reason="stop" if reason == "stop" else "length",
        prompt_tokens=prompt_tokens,
        completion_tokens=len(new_ids),
    )


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [index for index in (text.find(s) for s in stops) if index >= 0]
    return min(found) if found else None


class StopFilter:
    """Streamed text minus everything from the first stop string on.

    Holds back the end of the text that could be the start of a stop string, so a stop
    string split across chunks never reaches the client.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut = first_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._send(cut)
        hold = max((_overlap(self.text, stop) for stop in self.stops), default=0)
        return self._send(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._send(len(self.text))

    def _send(self, end: int) -> str:
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that begins ``stop``."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


class _StopWhen:
    """Stops generation at a stop string, on cancel (client gone) or past the deadline."""

    def __init__(
        self,
        *,
        decode: Callable[[Sequence[int]], str],
        start: int,
        stops: Sequence[str],
        cancel: threading.Event,
        deadline: float,
    ) -> None:
        self.decode = decode
        self.start = start
        self.stops = tuple(stops)
        self.cancel = cancel
        self.deadline = deadline

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        import torch

        done = self.cancel.is_set() or time.monotonic() > self.deadline
        if not done and self.stops:
            text = self.decode(input_ids[0, self.start :].tolist())
            done = first_stop(text, self.stops) is not None
        flags = torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
        return flags  # type: ignore[return-value]


# -- the worker thread ------------------------------------------------------------------------


class GenerationWorker:
    """The one thread that runs a loaded model's work, with a bounded queue in front.

    ``run`` and ``submit`` refuse with ``ServerBusy`` when ``max_queued`` calls are
    already waiting or running; ``admit=False`` (refreshes) skips that check. ``close()``
    stops the thread; the next call starts a new one (an app may be started again).
    """

    def __init__(self, *, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.max_queued = max_queued
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, fn: Callable[[], T], *, admit: bool = True) -> asyncio.Future[T]:
        with self._lock:
            if admit and self._pending >= self.max_queued:
                raise ServerBusy(
                    f"{self._pending} requests are already waiting for the model; retry shortly"
                )
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="safegate-serve"
                )
            future: Future[T] = self._executor.submit(fn)
            self._pending += 1
        future.add_done_callback(self._done)
        return asyncio.wrap_future(future)

    async def run(self, fn: Callable[[], T], *, admit: bool = True) -> T:
        return await self.submit(fn, admit=admit)

    def _done(self, _future: Future[Any]) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        """Stop taking work; what is queued is cancelled, a running call finishes."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


# -- the HTTP API -----------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """OpenAI's chat completion request; fields this server cannot honour are refused,
    fields that do not change a local model's answer are accepted and ignored."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None

    def turns(self) -> list[Turn]:
        turns: list[Turn] = []
        for index, message in enumerate(self.messages):
            where = f"messages.{index}"
            role = "system" if message.role == "developer" else message.role
            if role not in ROLES:
                raise InvalidRequest(
                    f"{where}.role: {message.role!r} is not supported here; "
                    "use system, developer, user or assistant",
                    param=f"{where}.role",
                )
            turns.append(Turn(ROLES[role], _text_of(message, where)))
        return turns

    def params(self, defaults: SamplingDefaults | None = None) -> SamplingParams:
        """The sampling parameters; ``defaults`` fill in a left-out temperature and top_p."""
        defaults = defaults or SamplingDefaults()
        if self.n not in (None, 1):
            raise InvalidRequest("n: only one choice per request is supported", param="n")
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported", param="logprobs")
        if self.tools:
            raise InvalidRequest("tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequest(
                "response_format: only type 'text' is supported", param="response_format"
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            stop=stop,
            seed=self.seed,
        )


def _text_of(message: ChatMessage, where: str) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts: list[str] = []
    for index, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"{where}.content.{index}: only text parts are supported, got {part.type!r}",
                param=f"{where}.content",
            )
        texts.append(part.text)
    return "".join(texts)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNER
    kind: ModelKind
    base: str | None = Field(description="The base an adapter runs on; null for the base.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, completion: Completion) -> Usage:
        total = completion.prompt_tokens + completion.completion_tokens
        return cls(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=total,
        )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    base: str
    adapters: list[str]
    failed: dict[str, str]
    queued: int


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed or unsupported request"},
    404: {"model": ErrorBody, "description": "Unknown model"},
    503: {"model": ErrorBody, "description": "Busy, or the adapter failed to load"},
}


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorBody(
        error=ErrorDetail(message=message, type=type, param=param, code=code)
    ).model_dump()


def create_app(
    server: LocalModelServer,
    *,
    refresh_s: float = DEFAULT_REFRESH_S,
    max_queued: int = DEFAULT_MAX_QUEUED,
) -> FastAPI:
    """The OpenAI-compatible app for a loaded ``server``."""
    worker = GenerationWorker(max_queued=max_queued)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if server.registry is not None and refresh_s > 0:
            task = asyncio.create_task(_refresh_forever(server, worker, refresh_s))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            worker.close()

    app = FastAPI(
        title="safegate local models",
        version="0.1.0",
        summary=f"OpenAI-compatible chat completions for {server.base.name} and its adapters",
        lifespan=lifespan,
    )
    app.state.server = server
    app.state.worker = worker
    _install_errors(app)

    @app.get("/healthz")
    async def healthz() -> Health:
        adapters = [m.id for m in server.served() if m.kind is ModelKind.ADAPTER]
        return Health(
            base=server.base.name, adapters=adapters, failed=server.failed, queued=worker.pending
        )

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[_card(model) for model in server.served()])

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def retrieve_model(model_id: Annotated[str, PathParam()]) -> ModelCard:
        await _ensure_known(server, worker, model_id)
        for model in server.served():
            if model.id == model_id:
                return _card(model)
        server.adapter_for(model_id)  # raises the 404 or 503 that explains why
        raise ModelNotFound(f"the model {model_id!r} does not exist", param="model")

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={
            **ERROR_RESPONSES,
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks"},
        },
    )
    async def chat_completions(
        body: ChatCompletionRequest,
    ) -> ChatCompletion | StreamingResponse:
        turns = body.turns()
        params = body.params(server.sampling_defaults)
        await _ensure_known(server, worker, body.model)
        prompt = await worker.run(partial(server.prepare, body.model, turns, params))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            from transformers import AsyncTextIteratorStreamer

            streamer = AsyncTextIteratorStreamer(
                server.tokenizer,
                skip_prompt=True,
                timeout=params.timeout_s,
                skip_special_tokens=True,
            )
            cancel = threading.Event()
            generation = worker.submit(  # a 503 here still gets a status line
                partial(server.generate, prompt, params, streamer=streamer, cancel=cancel)
            )
            generation.add_done_callback(_retrieve)  # a stream cut short never awaits it
            chunks = _stream(
                streamer,
                generation,
                cancel,
                model=body.model,
                stop=params.stop,
                request_id=request_id,
                created=created,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            )
            return StreamingResponse(
                chunks,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        cancel = threading.Event()
        try:
            completion = await worker.run(partial(server.generate, prompt, params, cancel=cancel))
        finally:
            cancel.set()  # cancelled while waiting: the worker skips or stops the generation
        return ChatCompletion(
            id=request_id,
            created=created,
            model=body.model,
            choices=[
                Choice(
                    message=AssistantMessage(content=completion.text),
                    finish_reason=completion.finish_reason,
                )
            ],
            usage=Usage.of(completion),
        )

    return app


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(id=model.id, created=model.created, kind=model.kind, base=model.base)


async def _ensure_known(server: LocalModelServer, worker: GenerationWorker, name: str) -> None:
    """An unknown name may have just been deployed: read the registry once before a 404."""
    if server.knows(name) or server.registry is None:
        return
    if time.monotonic() - server.last_refresh >= MIN_REFRESH_GAP_S:
        try:
            await worker.run(server.refresh, admit=False)
        except Exception as exc:  # noqa: BLE001 - answer with what is loaded
            log.error("refresh failed: %s", _reason(exc))


def _retrieve(future: asyncio.Future[Completion]) -> None:
    if not future.cancelled():
        future.exception()


async def _refresh_forever(
    server: LocalModelServer, worker: GenerationWorker, every_s: float
) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await worker.run(server.refresh, admit=False)
        except Exception as exc:  # noqa: BLE001 - the server keeps what it has loaded
            log.error("refresh failed: %s", _reason(exc))


async def _stream(
    streamer: AsyncIterator[str],
    generation: asyncio.Future[Completion],
    cancel: threading.Event,
    *,
    model: str,
    stop: Sequence[str],
    request_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """OpenAI's ``chat.completion.chunk`` events for a generation, then ``[DONE]``."""

    def chunk(delta: Mapping[str, str], finish: FinishReason | None = None, **extra: object) -> str:
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return _sse(
            {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [] if extra else choices,
                **extra,
            }
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        text = StopFilter(stop)
        async for piece in streamer:
            out = text.feed(piece)
            if out:
                yield chunk({"content": out})
            if text.stopped:
                break
        tail = text.flush()
        if tail:
            yield chunk({"content": tail})
        completion = await generation
        yield chunk({}, completion.finish_reason)
        if include_usage:
            yield chunk({}, usage=Usage.of(completion).model_dump())
    except ServingError as exc:
        yield _sse(error_body(exc.message, type=exc.type, param=exc.param, code=exc.code))
    except TimeoutError:
        message = "no token came within the generation timeout"
        yield _sse(error_body(message, type="server_error", code="timeout"))
    except Exception as exc:  # noqa: BLE001 - the stream has started; report, do not raise
        log.error("stream failed: %s", _reason(exc))
        yield _sse(error_body("internal error while generating", type="server_error"))
    finally:
        cancel.set()  # the client may be gone: stop generating at the next token
    yield "data: [DONE]\n\n"


def _sse(body: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _install_errors(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI-style error body; bad requests are 400s."""

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        body = error_body(exc.message, type=exc.type, param=exc.param, code=exc.code)
        return JSONResponse(status_code=exc.status, content=body)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            body = error_body(
                "the request body is not valid JSON",
                type="invalid_request_error",
                code="invalid_json",
            )
            return JSONResponse(status_code=400, content=body)
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        detail = str(first.get("msg", "invalid request"))
        message = f"{param}: {detail}" if param else detail
        body = error_body(message, type="invalid_request_error", param=param, code="invalid_value")
        return JSONResponse(status_code=400, content=body)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = error_body(str(exc.detail), type=kind)
        return JSONResponse(status_code=exc.status_code, content=body)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return JSONResponse(
            status_code=500, content=error_body("internal error", type="server_error")
        )
