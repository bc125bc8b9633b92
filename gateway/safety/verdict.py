"""Value types that cross the engine's seams: member detections and the final verdict.

Everything here is frozen. Scores are probabilities in [0, 1] and are checked where
they are built, so a member that returns a logit or a -1..1 risk fails loudly instead of
drifting silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

from gateway.safety.taxonomy import AzureCategory, Category, Direction, Label, Severity, Shield


def check_probability(value: float, *, what: str) -> float:
    """Return ``value`` as a float if it is a probability; raise ``ValueError`` otherwise."""
    number = float(value)
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{what} must be a probability in [0, 1], got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class Finding:
    """Evidence a member found at a place in the text (a PII span, a blocklist hit).

    ``start``/``end`` index the text view the member read (see ``NormalizedText``).
    A finding never carries the matched text itself, only where it is and what it is.
    """

    label: Label
    kind: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"bad span {self.start}..{self.end}")


@dataclass(frozen=True, slots=True)
class Detection:
    """What one member says about one text: calibrated scores per label, findings,
    (from the language member) the language the text is written in, when it is clear,
    and (from the engine's allowlist step) how the text scores with allowlisted matches
    masked."""

    scores: Mapping[Label, float]
    findings: tuple[Finding, ...] = ()
    language: str | None = None
    exemptions: tuple[Exemption, ...] = ()

    def __post_init__(self) -> None:
        checked = {
            label: check_probability(score, what=f"score for {label}")
            for label, score in self.scores.items()
        }
        object.__setattr__(self, "scores", MappingProxyType(checked))


class Action(StrEnum):
    """What the policy does with a label that crossed its threshold."""

    BLOCK = "block"
    ANNOTATE = "annotate"


# What happens to a whole text (``Verdict.action``): blocked, annotated, or let through.
VerdictAction = Literal["block", "annotate", "allow"]


@dataclass(frozen=True, slots=True)
class MemberReport:
    """One member's part in a verdict: its detection, or why it has none."""

    member: str
    latency_ms: float
    detection: Detection | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.detection is None) == (self.error is None):
            raise ValueError("a member report has exactly one of detection and error")


@dataclass(frozen=True, slots=True)
class Exemption:
    """Allowlists that matched a text, and how it scores with their matches masked.

    For ``categories`` in ``direction`` the engine may use ``reports`` (the members that
    score categories, run on the text with every match of ``allowlists`` replaced by a
    placeholder) instead of the text's own scores; ``gateway.safety.allowlist`` says how.
    """

    direction: Direction
    categories: frozenset[Category]
    allowlists: tuple[str, ...]
    reports: tuple[MemberReport, ...]


@dataclass(frozen=True, slots=True)
class LabelResult:
    """The combined result for one label."""

    label: Label
    score: float
    threshold: float
    flagged: bool
    action: Action
    members: tuple[str, ...] = ()  # members whose score crossed the threshold

    def __post_init__(self) -> None:
        check_probability(self.score, what=f"score for {self.label}")
        check_probability(self.threshold, what=f"threshold for {self.label}")


@dataclass(frozen=True, slots=True)
class AzureResult:
    """One Azure harm category: its severity and whether the policy filtered it."""

    category: AzureCategory
    severity: Severity
    filtered: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    """The engine's decision about one text.

    ``blocked`` is True when a label whose action is ``block`` is flagged, or when a
    member failed and the policy does not allow that member to fail open. ``reasons``
    says why, in words fit for an API error message; it never quotes the text.
    """

    direction: Direction
    labels: Mapping[Label, LabelResult]
    azure: Mapping[AzureCategory, AzureResult]
    members: tuple[MemberReport, ...]
    blocked: bool
    reasons: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = field(default=())
    # The text's language when the language member is sure of it, and whether the
    # engine's model does not cover that language: its scores are then low-confidence.
    language: str | None = None
    low_confidence: bool = False

    @property
    def flagged(self) -> bool:
        """True when any label crossed its threshold or the verdict is blocked."""
        return self.blocked or any(result.flagged for result in self.labels.values())

    def category(self, category: Category) -> LabelResult:
        return self.labels[category]

    def shield(self, shield: Shield) -> LabelResult:
        return self.labels[shield]

    @property
    def flagged_labels(self) -> tuple[Label, ...]:
        return tuple(label for label, result in self.labels.items() if result.flagged)

    @property
    def action(self) -> VerdictAction:
        """What happens to the text: ``block``, ``annotate`` (flagged, let through), ``allow``."""
        return "block" if self.blocked else "annotate" if self.flagged else "allow"
