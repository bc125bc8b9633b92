"""The errors safegate's LiteLLM guardrail raises, as LiteLLM's own guardrails raise them.

``GuardrailError`` is a ``fastapi.HTTPException`` whose ``detail`` is a dict: the proxy
turns ``detail["error"]`` into the OpenAI error's message, takes the exception's
``type`` and ``param``, and keeps all of ``detail`` under ``provider_specific_fields``.
Messages name where and why, never the text::

    GuardrailError (fastapi.HTTPException)
     400 content_filter        a text was blocked: categories, reasons and Azure's
                               content_filter_result per category
     400 prompt_too_long       the prompt is over SAFEGATE_CHAT__MAX_PROMPT_CHARS
     400 unsupported_response  an answer that is not a chat completion (the Responses or
                               Anthropic API): its text cannot be read, so it is withheld
     429 engine_overloaded     the engine's queue is full; Retry-After says when to retry
     503 safety_check_failed   a classifier failed (unless the policy lists it under
                               fail_open) or the engine could not load: fail closed
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from fastapi import HTTPException

from gateway.chat.content_filter import filter_results, merge
from gateway.chat.prompt import worst_reasons
from gateway.safety.policy import Policy
from gateway.safety.verdict import Action, Verdict

Param = Literal["prompt", "completion"]


class GuardrailError(HTTPException):
    """A refusal, as LiteLLM's guardrails raise one. The proxy copies ``type`` and
    ``param`` into its OpenAI error body and keeps ``detail`` beside it."""

    def __init__(
        self, status_code: int, detail: dict[str, Any], *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.type: str = detail["type"]
        self.param: str | None = detail.get("param")


def refusal(
    blocked: Mapping[str, Verdict],
    checked: Mapping[str, Verdict],
    *,
    policy: Policy,
    param: Param,
) -> GuardrailError | None:
    """The error for blocked texts (none when nothing is): a 400 content_filter naming
    the categories and reasons, or a 503 when only failing classifiers blocked them."""
    if not blocked:
        return None
    reasons = worst_reasons(blocked)
    categories = sorted(
        {
            *(
                label.value
                for verdict in blocked.values()
                for label in verdict.flagged_labels
                if verdict.labels[label].action is Action.BLOCK
            ),
            *(
                "language"
                for verdict in blocked.values()
                if verdict.low_confidence and policy.unsupported_language == "block"
            ),
        }
    )
    if not categories:
        return unavailable("; ".join(reasons))
    return GuardrailError(
        400,
        {
            "error": f"safegate's content filter blocked the {param} for "
            f"{', '.join(categories)}: {'; '.join(reasons)}",
            "type": "invalid_request_error",
            "code": "content_filter",
            "param": param,
            "categories": categories,
            "reasons": reasons,
            "content_filter_result": merge(filter_results(v) for v in checked.values()),
        },
    )


def unavailable(reason: str) -> GuardrailError:
    return GuardrailError(
        503,
        {
            "error": "safegate could not run its safety check, so the request was refused "
            f"(the policy fails closed): {reason}",
            "type": "service_unavailable",
            "code": "safety_check_failed",
            "reasons": [reason],
        },
    )


def unsupported(kind: str) -> GuardrailError:
    return GuardrailError(
        400,
        {
            "error": f"safegate's guardrail checks chat completions; a {kind} answer cannot "
            "be checked, so it was withheld",
            "type": "invalid_request_error",
            "code": "unsupported_response",
        },
    )
