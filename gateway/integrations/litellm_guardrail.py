"""safegate's safety engine as a LiteLLM proxy guardrail.

``SafegateGuardrail`` is a LiteLLM ``CustomGuardrail``. A LiteLLM proxy loads it from its
``config.yaml`` and runs the engine and policy that ``safegate serve`` runs::

    guardrails:
      - guardrail_name: safegate
        litellm_params:
          guardrail: gateway.integrations.litellm_guardrail.SafegateGuardrail
          mode: [pre_call, post_call]
          default_on: true
          policy_file: /etc/safegate/policy.yaml  # optional: else SAFEGATE_POLICY_FILE
          safegate_home: /var/lib/safegate        # optional: else SAFEGATE_HOME

What each hook does (``gateway.integrations.litellm_texts`` says which texts it reads):

- ``pre_call`` (and ``during_call``): every text the model will read is checked as a
  prompt before the model is called. ``SAFEGATE_CHAT__MAX_PROMPT_CHARS`` bounds them.
- ``post_call``: each choice of a chat completion is checked as a completion. An answer
  that passes is annotated as Azure OpenAI annotates it: ``prompt_filter_results`` (from
  the pre-call check) beside the choices and ``content_filter_results`` on each choice.
- ``post_call`` on a stream: ``gateway.integrations.litellm_stream`` releases each
  choice's content a few words at a time once checked, checks the whole completion when
  the stream ends and tool calls whole; a part that fails ends the stream.

Every verdict (no text, only categories, scores and reasons) is recorded in LiteLLM's
``standard_logging_guardrail_information`` for its loggers. A refusal is a
``GuardrailError`` (``gateway.integrations.litellm_errors``), the ``HTTPException`` that
LiteLLM's own guardrails raise: 400 ``content_filter`` naming the categories and reasons
(never the text), 503 ``safety_check_failed`` when a classifier fails or the engine
cannot load (fail closed), 429 ``engine_overloaded``, and a few 400s for what cannot be
checked.

The engine is built once, on the first request, in a worker thread (a lock makes
concurrent first requests wait for the one build), from safegate's ``Settings``
(``SAFEGATE_*``) with the config's ``policy_file`` and ``safegate_home`` over them. An
engine that cannot load refuses every request until the proxy restarts. Detection runs
off the event loop through the engine's ``MicroBatcher``. safegate's custom blocklists
live in safegate's database and are not read here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fastapi import HTTPException
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.litellm_core_utils.core_helpers import get_or_create_metadata_bucket
from litellm.types.guardrails import GuardrailEventHooks
from litellm.types.utils import (
    CallTypesLiteral,
    EmbeddingResponse,
    GuardrailStatus,
    ImageResponse,
    LiteLLMBatch,
    LiteLLMFineTuningJob,
    LLMResponseTypes,
    ModelResponse,
    ModelResponseStream,
)

from gateway.chat.content_filter import FilterResults, filter_results, merge
from gateway.chat.prompt import PromptText
from gateway.chat.schemas import NOT_IN_TURNS
from gateway.chat.service import safe_results
from gateway.config import Settings
from gateway.engine_factory import build_engine
from gateway.errors import public_error
from gateway.integrations.litellm_errors import (
    GuardrailError,
    Param,
    refusal,
    unavailable,
    unsupported,
)
from gateway.integrations.litellm_stream import FilteredStream, close_stream
from gateway.integrations.litellm_texts import completion_text, request_texts, split_long
from gateway.safety.batcher import MicroBatcher
from gateway.safety.engine import EngineOverloaded, SafetyEngine, SafetyError
from gateway.safety.policy import Policy
from gateway.safety.taxonomy import Direction
from gateway.safety.verdict import Verdict

if TYPE_CHECKING:
    from litellm.caching.dual_cache import DualCache
    from litellm.types.proxy.auth.user_api_key_auth import UserAPIKeyAuth

log = logging.getLogger("safegate.litellm_guardrail")

GUARDRAIL_PROVIDER = "safegate"
SUPPORTED_HOOKS = (
    GuardrailEventHooks.pre_call,
    GuardrailEventHooks.during_call,
    GuardrailEventHooks.post_call,
)
# Answers with no model-written text to check (the prompt was checked before them).
_TEXTLESS_RESPONSES = (EmbeddingResponse, ImageResponse, LiteLLMBatch, LiteLLMFineTuningJob)

EngineFactory = Callable[[Settings], SafetyEngine]


def default_engine(settings: Settings) -> SafetyEngine:
    """The engine ``safegate serve`` builds, less the database-backed blocklists."""
    return build_engine(settings, blocklists=None)


@dataclass(frozen=True)
class _Loaded:
    settings: Settings
    engine: SafetyEngine
    batcher: MicroBatcher

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    def stream(self) -> FilteredStream:
        return FilteredStream(
            check=self.check_completion, chat=self.settings.chat, policy=self.policy
        )

    async def check_completion(self, text: str) -> Verdict:
        """One completion text (or stream window) under the policy; the worst piece's
        verdict when it is longer than the engine takes at once."""
        limit = self.engine.max_text_chars
        pieces = [text[i : i + limit] for i in range(0, len(text), limit)] or [text]
        try:
            # Never shed: the model has answered; refusing now would waste the answer.
            reports = await self.batcher.detect(pieces, sheddable=False)
        except SafetyError as error:
            raise unavailable(public_error(error)) from error
        verdicts = [
            self.engine.decide(r, direction=Direction.COMPLETION, policy=self.policy)
            for r in reports
        ]
        blocked = [v for v in verdicts if v.blocked]
        return blocked[0] if blocked else max(verdicts, key=lambda v: len(v.flagged_labels))


class SafegateGuardrail(CustomGuardrail):
    """safegate's engine and policy in a LiteLLM proxy's hooks; see the module docstring."""

    use_native_lifecycle_hooks: ClassVar[bool] = True
    records_own_guardrail_information: ClassVar[bool] = True

    def __init__(
        self,
        *,
        policy_file: str | None = None,
        safegate_home: str | None = None,
        engine_factory: EngineFactory = default_engine,
        **kwargs: Any,
    ) -> None:
        """``policy_file`` and ``safegate_home`` override ``SAFEGATE_POLICY_FILE`` and
        ``SAFEGATE_HOME``; ``engine_factory`` builds the engine from the settings (tests
        hand in one already loaded). The rest is LiteLLM's (``guardrail_name``,
        ``event_hook``, ``default_on``, ...)."""
        if not callable(engine_factory):
            raise TypeError(f"engine_factory must be callable, got {type(engine_factory)}")
        kwargs.setdefault("supported_event_hooks", list(SUPPORTED_HOOKS))
        super().__init__(**kwargs)
        overrides: dict[str, Path] = {}
        if policy_file:
            overrides["policy_file"] = Path(policy_file).expanduser()
        if safegate_home:
            overrides["home"] = Path(safegate_home).expanduser()
        self.settings = Settings(**overrides)  # type: ignore[arg-type]
        self._engine_factory = engine_factory
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._load_error: str | None = None
        # Where the pre-call check leaves its annotations for the post-call hook; the
        # token keeps a client from planting annotations in its request's metadata.
        self._prompt_results_key = f"safegate_prompt_filter_results_{secrets.token_hex(8)}"

    @classmethod
    def get_supported_event_hooks(cls) -> list[GuardrailEventHooks]:
        return list(SUPPORTED_HOOKS)

    # -- the engine ---------------------------------------------------------------------

    async def _ready(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            loaded = await asyncio.to_thread(self._load)
        return loaded

    def _load(self) -> _Loaded:
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            if self._load_error is not None:
                raise unavailable(self._load_error)
            started = time.perf_counter()
            try:
                engine = self._engine_factory(self.settings)
            except Exception as error:  # noqa: BLE001 - every request then fails closed
                self._load_error = public_error(error)
                log.error("safety engine failed to load", extra={"error": self._load_error})
                raise unavailable(self._load_error) from error
            config = self.settings.engine
            batcher = MicroBatcher(
                engine,
                max_batch=config.max_batch,
                max_batch_chars=config.max_batch_chars,
                queue_capacity_chars=config.queue_capacity_chars,
                max_wait_s=config.max_wait_s,
            )
            self._loaded = _Loaded(settings=self.settings, engine=engine, batcher=batcher)
            log.info(
                "safety engine ready",
                extra={
                    "members": [spec.classifier.id for spec in engine.members],
                    "load_s": round(time.perf_counter() - started, 3),
                },
            )
            return self._loaded

    async def aclose(self) -> None:
        """Stop the batcher and the engine's threads (a proxy's exit does it too)."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            await loaded.batcher.close()
            loaded.engine.close()

    # -- LiteLLM's hooks ----------------------------------------------------------------

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        cache: DualCache,
        data: dict[str, Any],
        call_type: CallTypesLiteral,
    ) -> Exception | str | dict[str, Any] | None:
        await self._check_prompt(data, event=GuardrailEventHooks.pre_call)
        return None  # allowed, unchanged (annotations wait in the request's metadata)

    async def async_moderation_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: UserAPIKeyAuth,
        call_type: CallTypesLiteral,
    ) -> object:
        await self._check_prompt(data, event=GuardrailEventHooks.during_call)
        return None

    async def async_post_call_success_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: UserAPIKeyAuth,
        response: LLMResponseTypes,
    ) -> Any:
        if isinstance(response, _TEXTLESS_RESPONSES):
            return response
        started = time.perf_counter()
        if not isinstance(response, ModelResponse):
            error = unsupported(type(response).__name__)
            self._record(data, None, error=error, started=started, param="completion")
            raise error
        try:
            loaded = await self._ready()
            verdicts: dict[str, Verdict] = {}
            for position, choice in enumerate(response.choices):
                text = completion_text(getattr(choice, "message", None))
                if text.strip():
                    index = getattr(choice, "index", None)
                    source = f"choices[{index if isinstance(index, int) else position}]"
                    verdicts[source] = await loaded.check_completion(text)
        except HTTPException as error:
            self._record(data, None, error=error, started=started, param="completion")
            raise
        blocked = {source: v for source, v in verdicts.items() if v.blocked}
        refused = refusal(blocked, verdicts, policy=loaded.policy, param="completion")
        self._record(data, verdicts, error=refused, started=started, param="completion")
        if refused is not None:
            raise refused
        for position, choice in enumerate(response.choices):
            index = getattr(choice, "index", None)
            verdict = verdicts.get(f"choices[{index if isinstance(index, int) else position}]")
            choice.content_filter_results = (  # type: ignore[attr-defined]
                filter_results(verdict) if verdict is not None else safe_results()
            )
        prompt_results = self._prompt_results(data)
        if prompt_results is not None:
            response.prompt_filter_results = [  # type: ignore[attr-defined]
                {"prompt_index": 0, "content_filter_results": prompt_results}
            ]
        return response

    async def async_post_call_streaming_iterator_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        response: Any,
        request_data: dict[str, Any],
    ) -> AsyncGenerator[ModelResponseStream, None]:
        started = time.perf_counter()
        stream: FilteredStream | None = None
        try:
            stream = (await self._ready()).stream()
            async for chunk in response:
                if not isinstance(chunk, ModelResponseStream):
                    raise unsupported(type(chunk).__name__)
                for out in await stream.take(chunk):
                    yield out
            for out in await stream.finish():
                yield out
        except HTTPException as error:
            checked = stream.verdicts() if stream is not None else None
            self._record(request_data, checked, error=error, started=started, param="completion")
            await close_stream(response)
            raise
        self._record(
            request_data, stream.verdicts(), error=None, started=started, param="completion"
        )

    # -- checks -------------------------------------------------------------------------

    async def _check_prompt(self, data: dict[str, Any], *, event: GuardrailEventHooks) -> None:
        started = time.perf_counter()
        texts = request_texts(data)
        if not texts:
            return
        try:
            loaded = await self._ready()
            verdicts = await self._prompt_verdicts(loaded, texts)
        except HTTPException as error:
            self._record(data, None, error=error, started=started, param="prompt", event=event)
            raise
        blocked = {source: v for source, v in verdicts.items() if v.blocked}
        refused = refusal(blocked, verdicts, policy=loaded.policy, param="prompt")
        self._record(data, verdicts, error=refused, started=started, param="prompt", event=event)
        if refused is not None:
            raise refused
        _, metadata = get_or_create_metadata_bucket(data)
        metadata[self._prompt_results_key] = merge(filter_results(v) for v in verdicts.values())

    async def _prompt_verdicts(
        self, loaded: _Loaded, texts: Sequence[PromptText]
    ) -> dict[str, Verdict]:
        total = sum(len(text.text) for text in texts)
        limit = loaded.settings.chat.max_prompt_chars
        if total > limit:
            raise GuardrailError(
                400,
                {
                    "error": f"the request holds {total} characters the model would read; "
                    f"safegate checks at most {limit} (SAFEGATE_CHAT__MAX_PROMPT_CHARS)",
                    "type": "invalid_request_error",
                    "code": "prompt_too_long",
                    "param": "messages",
                },
            )
        pieces = split_long(texts, limit=loaded.engine.max_text_chars)
        try:
            reports = await loaded.batcher.detect([piece.text for piece in pieces])
        except EngineOverloaded as error:
            raise GuardrailError(
                429,
                {
                    "error": str(error),
                    "type": "rate_limit_error",
                    "code": "engine_overloaded",
                },
                headers={"Retry-After": str(math.ceil(error.retry_after_s))},
            ) from error
        except SafetyError as error:
            raise unavailable(public_error(error)) from error
        return {
            piece.source: loaded.engine.decide(
                report,
                direction=Direction.PROMPT,
                policy=loaded.policy,
                ignore=() if piece.document else NOT_IN_TURNS,
            )
            for piece, report in zip(pieces, reports, strict=True)
        }

    def _prompt_results(self, data: Mapping[str, Any]) -> FilterResults | None:
        for key in ("metadata", "litellm_metadata"):
            bucket = data.get(key)
            if isinstance(bucket, dict):
                results = bucket.get(self._prompt_results_key)
                if isinstance(results, dict):
                    return results
        return None

    def _record(
        self,
        data: dict[str, Any],
        verdicts: Mapping[str, Verdict] | None,
        *,
        error: HTTPException | None,
        started: float,
        param: Param,
        event: GuardrailEventHooks = GuardrailEventHooks.post_call,
    ) -> None:
        """The verdicts (categories, reasons and annotations; never the text) in
        LiteLLM's guardrail logging, and one log line with counts and timing."""
        ended = time.perf_counter()
        summary: dict[str, Any] = {"checked": param}
        status: GuardrailStatus = "success"
        if verdicts is not None:
            summary["texts"] = len(verdicts)
            summary["flagged"] = sorted(
                {label.value for v in verdicts.values() for label in v.flagged_labels}
            )
            summary["content_filter_results"] = merge(filter_results(v) for v in verdicts.values())
        if error is not None:
            detail: dict[str, Any] = error.detail if isinstance(error.detail, dict) else {}
            summary["code"] = detail.get("code")
            summary["reasons"] = detail.get("reasons", [detail.get("error")])
            status = (
                "guardrail_intervened"
                if detail.get("code") == "content_filter"
                else "guardrail_failed_to_respond"
            )
        now = time.time()
        self.add_standard_logging_guardrail_information_to_request_data(
            guardrail_json_response=summary,
            request_data=data,
            guardrail_status=status,
            start_time=now - (ended - started),
            end_time=now,
            duration=ended - started,
            guardrail_provider=GUARDRAIL_PROVIDER,
            event_type=event,
        )
        log.info(
            "guardrail checked",
            extra={
                "checked": param,
                "texts": summary.get("texts", 0),
                "flagged": summary.get("flagged", []),
                "status": status,
                "latency_ms": round((ended - started) * 1000, 3),
            },
        )
