"""The one interface every member of the ensemble implements.

A member is built from its configuration, loads what it needs once, and then scores
batches of normalised texts. It declares the labels it can score; the ensemble combines
members label by label. Members are synchronous: the engine runs them off the event
loop, under a time budget each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from gateway.safety.normalize import NormalizedText
from gateway.safety.taxonomy import Label
from gateway.safety.verdict import Detection


@runtime_checkable
class Classifier(Protocol):
    """A member of the classifier ensemble."""

    @property
    def id(self) -> str:
        """The member's configured id; results are keyed by it."""
        ...

    @property
    def labels(self) -> frozenset[Label]:
        """The labels this member scores."""
        ...

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        """Score each text; return one detection per text, in order.

        Raise on any failure: the engine turns an exception into a fail-closed verdict.
        """
        ...
