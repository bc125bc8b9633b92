"""Policy files: defaults, overrides, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.safety.policy import DEFAULT_THRESHOLD, Policy, PolicyError
from gateway.safety.settings import SHIPPED_POLICY
from gateway.safety.taxonomy import Category, Direction, Shield
from gateway.safety.verdict import Action


def test_shipped_policy_loads_with_documented_defaults() -> None:
    policy = Policy.load(SHIPPED_POLICY)
    assert policy.action(Direction.PROMPT, Category.HATE) is Action.BLOCK
    assert policy.action(Direction.PROMPT, Shield.PII) is Action.ANNOTATE
    assert policy.action(Direction.PROMPT, Shield.JAILBREAK) is Action.BLOCK
    assert policy.action(Direction.COMPLETION, Shield.JAILBREAK) is Action.ANNOTATE
    assert policy.fail_open == frozenset()


def test_threshold_precedence_explicit_then_tuned_then_default(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("prompt:\n  hate: {threshold: 0.2}\n")
    policy = Policy.load(path)
    tuned = {Category.HATE: 0.7, Category.SEXUAL: 0.6}
    assert policy.threshold(Direction.PROMPT, Category.HATE, tuned) == 0.2
    assert policy.threshold(Direction.COMPLETION, Category.HATE, tuned) == 0.7
    assert policy.threshold(Direction.PROMPT, Category.VIOLENCE, tuned) == DEFAULT_THRESHOLD


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("prompt:\n  hatred: {action: block}\n", "unknown label 'hatred'"),
        ("prompt:\n  hate: {action: delete}\n", "action"),
        ("prompt:\n  hate: {threshold: 1.5}\n", "threshold"),
        ("prompt: [unclosed\n", "not valid YAML"),
        ("colour: blue\n", "colour"),
    ],
)
def test_bad_policy_files_fail_with_the_field_at_fault(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(content)
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


def test_missing_policy_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="nowhere.yaml"):
        Policy.load(tmp_path / "nowhere.yaml")
