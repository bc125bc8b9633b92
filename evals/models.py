"""Model callers: how a suite's model is asked, behind one ``ModelCaller`` protocol.

- ``GatewayCaller`` calls a safegate gateway with the official ``openai`` client, so the
  eval sees exactly what users get: a prompt the gateway blocks (HTTP 400, code
  ``content_filter``) is ``filtered="prompt"``; a completion it withholds
  (``finish_reason: "content_filter"``) is ``filtered="completion"``. Every request,
  the model check included, carries ``safegate-origin: eval`` (``EVAL_HEADERS``), which the
  gateway records on what it audits, so the review queue and the traffic page can keep
  eval traffic apart from users' (``gateway.origin``).
- ``LitellmCaller`` calls any litellm model string directly (tests use ``mock_response``).

A failed call is a ``Completion`` with ``error`` set, never an exception: the runner
records it on that example and goes on. Timeouts and retries are the suite's
(``timeout_s``, ``max_retries``; named defaults in ``evals.suite``). ``check()`` runs
before any generation and raises ``ModelNotFound``/``SuiteError`` for a model that
cannot be used (the gateway does not serve it, litellm knows no such provider, the key
variable is unset).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx2  # the HTTP client openai>=3 is built on
import openai

from evals.errors import ModelNotFound, SuiteError
from evals.suite import GatewayModel, LitellmModel
from gateway.origin import EVAL_ORIGIN, ORIGIN_HEADER

ERROR_CHARS = 500  # an error message kept on an example is cut to this length
ENV_PREFIX = "os.environ/"
CONTENT_FILTER = "content_filter"
EVAL_HEADERS = {ORIGIN_HEADER: EVAL_ORIGIN}  # on every request to a gateway


@dataclass(frozen=True, slots=True)
class Completion:
    """One call's result; exactly one of text / filtered / error explains it."""

    text: str | None
    finish_reason: str | None
    filtered: str | None  # None, "prompt" or "completion"
    error: str | None
    latency_ms: float


class ModelCaller(Protocol):
    """What the runner needs from a model. What makes two calls the same call (the cache
    key) is the suite's model spec (``GatewayModel.identity()``), not the caller."""

    @property
    def name(self) -> str:
        """The model's name in the suite (and in run records)."""
        ...

    async def check(self) -> None:
        """Raise ``SuiteError`` when the model cannot be used; makes no generation call."""
        ...

    async def complete(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
    ) -> Completion:
        """One chat completion; failures come back as ``Completion.error``."""
        ...

    async def aclose(self) -> None: ...


def describe_error(exc: BaseException) -> str:
    """``Type: message`` (status included when there is one), cut to ``ERROR_CHARS``."""
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", None) or exc) or "no message"
    text = f"{type(exc).__name__}" + (f" ({status})" if status else "") + f": {message}"
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class GatewayCaller:
    """A model behind a safegate gateway (``via: gateway``)."""

    def __init__(
        self,
        spec: GatewayModel,
        *,
        api_key: str,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        self.spec = spec
        self._client = openai.AsyncOpenAI(
            base_url=spec.base_url,
            api_key=api_key,
            timeout=spec.timeout_s,
            max_retries=spec.max_retries,
            http_client=http_client,
            default_headers=EVAL_HEADERS,
        )

    @property
    def name(self) -> str:
        return self.spec.name

    async def check(self) -> None:
        where = self.spec.base_url
        try:
            served = [model.id async for model in self._client.models.list()]
        except openai.AuthenticationError as exc:
            raise SuiteError(
                f"the gateway at {where} refused the key in ${self.spec.api_key_env} "
                f"({describe_error(exc)})"
            ) from None
        except openai.APIConnectionError as exc:
            raise SuiteError(
                f"cannot reach the gateway at {where} ({describe_error(exc)}); "
                "is 'safegate serve' running?"
            ) from None
        except openai.APIError as exc:
            raise SuiteError(
                f"the gateway at {where} did not list its models ({describe_error(exc)})"
            ) from None
        if self.spec.served_name not in served:
            listed = ", ".join(sorted(served)) or "nothing"
            raise ModelNotFound(
                f"the gateway at {where} does not serve {self.spec.served_name!r}; "
                f"it serves {listed}"
            )

    async def complete(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
    ) -> Completion:
        start = time.perf_counter()
        try:
            response = await self._client.chat.completions.create(
                model=self.spec.served_name,
                messages=[dict(message) for message in messages],  # type: ignore[misc]
                **params,
            )
        except openai.BadRequestError as exc:
            if exc.code == CONTENT_FILTER:
                return Completion(None, None, "prompt", None, _elapsed_ms(start))
            return Completion(None, None, None, describe_error(exc), _elapsed_ms(start))
        except openai.APIError as exc:
            return Completion(None, None, None, describe_error(exc), _elapsed_ms(start))
        latency = _elapsed_ms(start)
        if not response.choices:
            return Completion(None, None, None, "the gateway answered with no choices", latency)
        choice = response.choices[0]
        if choice.finish_reason == CONTENT_FILTER:
            return Completion(None, choice.finish_reason, "completion", None, latency)
        return Completion(choice.message.content or "", choice.finish_reason, None, None, latency)

    async def aclose(self) -> None:
        await self._client.close()


class LitellmCaller:
    """A model called directly through litellm (``via: litellm``)."""

    def __init__(self, spec: LitellmModel, *, params: Mapping[str, Any]) -> None:
        self.spec = spec
        self._params = dict(params)  # environment references resolved

    @property
    def name(self) -> str:
        return self.spec.name

    async def check(self) -> None:
        import litellm  # slow to import; only when a suite uses it

        try:
            litellm.get_llm_provider(model=self.spec.model, api_base=self._params.get("api_base"))
        except Exception as exc:  # litellm raises its BadRequestError, or ValueError
            raise ModelNotFound(
                f"litellm knows no provider for {self.spec.model!r} ({describe_error(exc)}); "
                "write it as PROVIDER/MODEL, e.g. openai/gpt-4o-mini"
            ) from None

    async def complete(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
    ) -> Completion:
        import litellm
        from litellm.exceptions import ContentPolicyViolationError

        start = time.perf_counter()
        try:
            response = await litellm.acompletion(
                model=self.spec.model,
                messages=[dict(message) for message in messages],
                timeout=self.spec.timeout_s,
                num_retries=self.spec.max_retries,
                **{**self._params, **params},
            )
        except ContentPolicyViolationError:
            return Completion(None, None, "prompt", None, _elapsed_ms(start))
        except Exception as exc:  # any provider's failure is this example's error
            return Completion(None, None, None, describe_error(exc), _elapsed_ms(start))
        latency = _elapsed_ms(start)
        choices = getattr(response, "choices", None) or []
        if not choices:
            return Completion(None, None, None, "the model answered with no choices", latency)
        choice = choices[0]
        finish_reason = getattr(choice, "finish_reason", None)
        if finish_reason == CONTENT_FILTER:
            return Completion(None, finish_reason, "completion", None, latency)
        content = getattr(getattr(choice, "message", None), "content", None)
        return Completion(content or "", finish_reason, None, None, latency)

    async def aclose(self) -> None:
        return None


def build_caller(
    spec: GatewayModel | LitellmModel,
    *,
    http_client: httpx2.AsyncClient | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelCaller:
    """The caller for a suite model; raises ``SuiteError`` when a secret it needs is unset."""
    env = os.environ if environ is None else environ
    if isinstance(spec, GatewayModel):
        key = env.get(spec.api_key_env)
        if not key:
            raise SuiteError(
                f"api_key_env: ${spec.api_key_env} is not set; export the gateway key "
                "(make run prints one) or name another variable"
            )
        return GatewayCaller(spec, api_key=key, http_client=http_client)
    params: dict[str, Any] = {}
    for name, value in spec.params.items():
        if isinstance(value, str) and value.startswith(ENV_PREFIX):
            variable = value.removeprefix(ENV_PREFIX)
            if not env.get(variable):
                raise SuiteError(f"params.{name}: ${variable} is not set")
            value = env[variable]
        params[name] = value
    return LitellmCaller(spec, params=params)
