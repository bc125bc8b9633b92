"""Local serving: one Phi-3 base and every deployed LoRA adapter, in one process.

``LocalModelServer`` loads ONE base (a registered base's folder, or a local path or hub
id; ``finetune.registry.resolve_base``) and attaches with peft each adapter deployed on
it: ``PeftModel.from_pretrained`` for the first, ``load_adapter(path, adapter_name=name)``
for the rest. A request's ``model`` picks the adapter; the server switches with
``set_adapter(name)`` (or runs the bare base inside ``disable_adapter()``) per request,
without reloading the base. ``refresh()`` reads the registry again and attaches newly
deployed adapters, drops undeployed ones and reloads one whose registry row changed; the
base stays where it is.

Every method that touches the model blocks and takes the server's lock: one generation
at a time. ``finetune.serving.app`` calls them from its worker thread and serves them
over OpenAI's chat API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.conversation import END_OF_TURN, PHI3_CHAT_TEMPLATE
from finetune.errors import (
    BaseModelError,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    RegistryError,
    failure_reason,
)
from finetune.registry import (
    Model,
    ModelKind,
    ModelSource,
    ResolvedBase,
    resolve_base,
    same_base,
)
from finetune.serving.generation import (
    DEFAULT_MAX_TOKENS,
    Completion,
    Prompt,
    SamplingDefaults,
    SamplingParams,
    StopWhen,
    Turn,
    decode,
    finish,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer

log = logging.getLogger("safegate.finetune.serving")

MAX_PROMPT_CHARS = 200_000  # checked before tokenizing
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_HINT = "serve"  # "... is an adapter, not a base; serve its base ... instead"


def deployed_base(registry: ModelSource) -> str:
    """The one base every deployed adapter was trained on; refuses none or several."""
    adapters = [m for m in registry.deployed_models() if m.kind is ModelKind.ADAPTER]
    if not adapters:
        raise RegistryError(
            "no adapter is deployed; run 'safegate models deploy NAME' or pass --base"
        )
    bases: dict[str, list[str]] = {}
    for adapter in adapters:
        base = resolve_base(adapter.base or "", registry=registry, use=ADAPTER_HINT).name
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
    (``finetune.serving.app.GenerationWorker``), never from an event loop. ``served()``
    and ``knows()`` only read a snapshot and are safe anywhere.
    """

    def __init__(
        self,
        base: ResolvedBase,
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
        resolved = resolve_base(base, registry=registry, use=ADAPTER_HINT)
        server = cls(resolved, registry=registry, device=device)
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
            f" ({self.base.location})" if self.base.location != self.base.name else ""
        )
        try:
            config = AutoConfig.from_pretrained(self.base.location)
            if config.model_type != "phi3":
                raise BaseModelError(
                    f"{where} is a {config.model_type!r} model; the server loads Phi-3 bases"
                )
            tokenizer = AutoTokenizer.from_pretrained(self.base.location)
            model = Phi3ForCausalLM.from_pretrained(
                self.base.location, dtype=dtype, use_safetensors=True
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
        self.sampling_defaults = SamplingDefaults.of_base(self.base.location)
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
            if m.kind is ModelKind.ADAPTER and m.base and same_base(m.base, self.base)
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
                    failed[name] = (signature, failure_reason(exc))
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
                StopWhen(
                    decode=partial(decode, tokenizer),
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
        completion = finish(
            decode(tokenizer, new_ids),
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
