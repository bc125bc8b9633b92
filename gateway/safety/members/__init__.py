"""Members of the classifier ensemble, one per module, all behind ``Classifier``.

Each module registers a factory under a ``MemberKind``; the engine builds the members
the settings name. A factory takes the member's settings and the engine's shared
resources and returns a loaded ``Classifier`` or raises ``MemberLoadError``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from gateway.registry import Registry
from gateway.safety.classifier import Classifier


class MemberKind(StrEnum):
    ENCODER = "encoder"
    PROFANITY = "profanity"
    DETOXIFY = "detoxify"
    BLOCKLIST = "blocklist"
    PII = "pii"
    LLM_JUDGE = "llm_judge"
    LANGUAGE = "language"
    MULTILINGUAL = "multilingual"


class MemberLoadError(Exception):
    """A member could not be built: missing file, bad checksum, bad option."""


MemberFactory = Callable[..., Classifier]
MEMBERS: Registry[MemberFactory] = Registry("ensemble member")
