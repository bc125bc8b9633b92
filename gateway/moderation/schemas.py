"""``/v1/moderations`` in OpenAI's schema, with safegate's detail under extra keys.

OpenAI's fields (``flagged``, ``categories``, ``category_scores``,
``category_applied_input_types``) carry the thirteen categories under OpenAI's names, so
the official client parses the response unchanged. Beside them each result has:

- ``severities``: Azure AI Content Safety's four categories, ``{"severity": 0|2|4|6,
  "level": "safe"|"low"|"medium"|"high", "filtered": bool}``;
- ``shields``: jailbreak, indirect_attack, profanity, pii and blocklist, each
  ``{"detected": bool, "score": float, "filtered": bool}`` (pii and blocklist also list
  the kinds found, never the text);
- ``action``: ``block``, ``annotate`` or ``allow`` under the policy;
- ``reasons``: why, in words (never quoting the input), including which allowlist exempted
  which category when that unflagged it (``gateway.safety.allowlist``);
- ``members``: each member's latency, the labels it fired on, and its error if it failed;
- ``language`` (when clear) and ``low_confidence``: true when the text is in a language the
  engine's model does not cover (its model card's ``languages``), so its scores are less
  reliable; a policy can block such texts (``unsupported_language: block``).
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.safety.taxonomy import Category, Shield
from gateway.safety.verdict import Action, Verdict, VerdictAction

DEFAULT_MODEL_NAME = "safegate-moderation-1"


class TextInput(BaseModel):
    """OpenAI's multimodal input item; only text is supported."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[TextInput] = Field(
        description="A text, or an array of texts (or of {type: text, text} items)."
    )
    model: str | None = Field(default=None, max_length=200)

    @field_validator("input")
    @classmethod
    def _not_empty(
        cls, value: str | list[str] | list[TextInput]
    ) -> str | list[str] | list[TextInput]:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("input must not be empty")
            return value
        if not value:
            raise ValueError("input must contain at least one text")
        for index, item in enumerate(value):
            text = item.text if isinstance(item, TextInput) else str(item)
            if not text.strip():
                raise ValueError(f"input[{index}] must not be empty")
        return value

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        return [item if isinstance(item, str) else item.text for item in self.input]


class Severity(BaseModel):
    severity: int
    level: Literal["safe", "low", "medium", "high"]
    filtered: bool


class ShieldResult(BaseModel):
    detected: bool
    score: float
    filtered: bool
    kinds: list[str] | None = None


class MemberResult(BaseModel):
    id: str
    latency_ms: float
    fired: list[str]
    error: str | None = None


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]
    severities: dict[str, Severity]
    shields: dict[str, ShieldResult]
    action: VerdictAction
    reasons: list[str]
    members: list[MemberResult]
    language: str | None
    low_confidence: bool


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


def to_result(verdict: Verdict) -> ModerationResult:
    categories = {c.value: verdict.labels[c].flagged for c in Category}
    scores = {c.value: round(verdict.labels[c].score, 6) for c in Category}
    shields: dict[str, ShieldResult] = {}
    for shield in Shield:
        result = verdict.labels[shield]
        kinds = sorted({f.kind for f in verdict.findings if f.label is shield})
        shields[shield.value] = ShieldResult(
            detected=result.flagged,
            score=round(result.score, 6),
            filtered=result.flagged and result.action is Action.BLOCK,
            kinds=kinds if shield in (Shield.PII, Shield.BLOCKLIST) else None,
        )
    severities = {
        azure.value: Severity(
            severity=int(result.severity),
            level=result.severity.azure_name,
            filtered=result.filtered,
        )
        for azure, result in verdict.azure.items()
    }
    fired: dict[str, list[str]] = {}
    for label, result in verdict.labels.items():
        for member in result.members:
            fired.setdefault(member, []).append(label.value)
    members = [
        MemberResult(
            id=report.member,
            latency_ms=round(report.latency_ms, 3),
            fired=fired.get(report.member, []),
            error=report.error,
        )
        for report in verdict.members
    ]
    return ModerationResult(
        flagged=verdict.blocked or any(categories.values()),
        categories=categories,
        category_scores=scores,
        category_applied_input_types={c.value: ["text"] for c in Category},
        severities=severities,
        shields=shields,
        action=verdict.action,
        reasons=list(verdict.reasons),
        members=members,
        language=verdict.language,
        low_confidence=verdict.low_confidence,
    )


def to_response(verdicts: list[Verdict], *, model: str | None) -> ModerationResponse:
    return ModerationResponse(
        id=f"modr-{uuid.uuid4().hex}",
        model=model or DEFAULT_MODEL_NAME,
        results=[to_result(verdict) for verdict in verdicts],
    )
