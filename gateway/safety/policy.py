"""The policy: per-label thresholds and actions for each direction, and fail-open members.

A policy is YAML (``gateway/policies/default.yaml`` ships; ``SAFEGATE_POLICY_FILE``
points elsewhere)::

    name: default
    prompt:
      hate: {action: block}              # threshold omitted: the tuned default
      profanity: {action: annotate, threshold: 0.9}
    completion:
      jailbreak: {action: annotate}
    fail_open: [llm_judge]               # members allowed to fail without blocking
    stream_mode: sync                    # or async: stream at once, check after (leaks)
    unsupported_language: annotate       # or block: refuse texts the model does not cover

Labels the file does not name get the default rule: ``block`` for harm categories and
attack shields, ``annotate`` for profanity and PII, ``block`` for blocklists. A
threshold left out is the one tuned on dev data for the member that scores the label
(the encoder heads' model card), or ``DEFAULT_THRESHOLD`` when no member tuned one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.safety.taxonomy import Category, Direction, Label, Shield, parse_label
from gateway.safety.verdict import Action

DEFAULT_THRESHOLD = 0.5

DEFAULT_ACTIONS: Mapping[Label, Action] = MappingProxyType(
    {
        **dict.fromkeys(Category, Action.BLOCK),
        Shield.JAILBREAK: Action.BLOCK,
        Shield.INDIRECT_ATTACK: Action.BLOCK,
        Shield.PROFANITY: Action.ANNOTATE,
        Shield.PII: Action.ANNOTATE,
        Shield.BLOCKLIST: Action.BLOCK,
    }
)


class PolicyError(Exception):
    """The policy file is missing, unreadable or invalid."""


class Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Action | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class Policy(BaseModel):
    """Thresholds and actions per direction and label."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "default"
    prompt: dict[str, Rule] = Field(default_factory=dict)
    completion: dict[str, Rule] = Field(default_factory=dict)
    fail_open: frozenset[str] = frozenset()
    # How streamed completions are filtered: "sync" holds text back until it is checked;
    # "async" (Azure's asynchronous filter) sends at once, checks right after, and ends
    # the stream at a violation. Not leak-proof.
    stream_mode: Literal["sync", "async"] = "sync"
    # A text in a language the engine's model does not cover gets low-confidence scores:
    # "annotate" marks it (low_confidence in every response), "block" refuses it.
    unsupported_language: Literal["annotate", "block"] = "annotate"

    @field_validator("prompt", "completion")
    @classmethod
    def _known_labels(cls, rules: dict[str, Rule]) -> dict[str, Rule]:
        for name in rules:
            parse_label(name)  # raises ValueError with the known labels
        return rules

    def rule(self, direction: Direction, label: Label) -> Rule:
        rules = self.prompt if direction is Direction.PROMPT else self.completion
        return rules.get(label.value, Rule())

    def action(self, direction: Direction, label: Label) -> Action:
        return self.rule(direction, label).action or DEFAULT_ACTIONS[label]

    def threshold(self, direction: Direction, label: Label, tuned: Mapping[Label, float]) -> float:
        explicit = self.rule(direction, label).threshold
        if explicit is not None:
            return explicit
        return tuned.get(label, DEFAULT_THRESHOLD)

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise PolicyError(f"cannot read policy file {path}: {error}") from error
        except yaml.YAMLError as error:
            raise PolicyError(f"policy file {path} is not valid YAML: {error}") from error
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise PolicyError(f"policy file {path} is invalid: {error}") from error
