"""The engine's combination logic: max over members, thresholds, actions, fail closed.

Members here are small deterministic classifiers: the seam under test is the engine,
so each member's behaviour (a score, an exception, a stall) is set by the test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.safety.engine import InputTooLong, MemberSpec, SafetyEngine
from gateway.safety.normalize import NormalizedText
from gateway.safety.policy import Policy, Rule
from gateway.safety.taxonomy import AzureCategory, Category, Direction, Label, Severity, Shield
from gateway.safety.verdict import Action, Detection


class Fixed:
    """Scores every text the same."""

    def __init__(
        self, id: str, scores: Mapping[Label, float], *, tuned: Mapping[Label, float] | None = None
    ) -> None:
        self.id = id
        self.scores = dict(scores)
        self.labels = frozenset(scores)
        self.calls: list[int] = []
        if tuned is not None:
            self.thresholds = dict(tuned)

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        self.calls.append(len(texts))
        return [Detection(scores=self.scores) for _ in texts]


class Raising:
    id = "broken"
    labels = frozenset({Category.HATE})

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        raise RuntimeError("model file corrupt")


class Stalling:
    id = "slow"
    labels = frozenset({Category.HATE})

    def __init__(self) -> None:
        self.release = threading.Event()

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        self.release.wait(5)
        return [Detection(scores={Category.HATE: 0.0}) for _ in texts]


def engine(*members: object, policy: Policy | None = None, timeout_s: float = 2.0) -> SafetyEngine:
    return SafetyEngine(
        [MemberSpec(member, timeout_s) for member in members],  # type: ignore[arg-type]
        policy=policy or Policy(),
    )


def test_label_score_is_the_highest_member_score_and_names_who_fired() -> None:
    low = Fixed("a", {Category.HATE: 0.2})
    high = Fixed("b", {Category.HATE: 0.8})
    verdict = engine(low, high).check(["text"])[0]
    hate = verdict.category(Category.HATE)
    assert hate.score == 0.8
    assert hate.flagged
    assert hate.members == ("b",)
    assert verdict.blocked
    assert "prompt flagged for hate" in verdict.reasons[0]


def test_below_threshold_allows_and_reports_nothing() -> None:
    verdict = engine(Fixed("a", {Category.HATE: 0.3})).check(["text"])[0]
    assert not verdict.flagged
    assert not verdict.blocked
    assert verdict.reasons == ()


def test_tuned_member_thresholds_are_the_default_and_policy_overrides_them() -> None:
    member = Fixed("a", {Category.VIOLENCE: 0.6}, tuned={Category.VIOLENCE: 0.7})
    assert not engine(member).check(["x"])[0].category(Category.VIOLENCE).flagged
    strict = Policy(prompt={"violence": Rule(threshold=0.5)})
    assert engine(member, policy=strict).check(["x"])[0].category(Category.VIOLENCE).flagged


def test_annotate_action_flags_without_blocking() -> None:
    member = Fixed("p", {Shield.PROFANITY: 0.99})
    verdict = engine(member).check(["x"])[0]
    assert verdict.shield(Shield.PROFANITY).flagged
    assert verdict.shield(Shield.PROFANITY).action is Action.ANNOTATE
    assert verdict.flagged
    assert not verdict.blocked


def test_direction_selects_the_rules() -> None:
    member = Fixed("e", {Shield.JAILBREAK: 0.9})
    policy = Policy(completion={"jailbreak": Rule(action=Action.ANNOTATE)})
    run = engine(member, policy=policy)
    assert run.check(["x"], direction=Direction.PROMPT)[0].blocked
    assert not run.check(["x"], direction=Direction.COMPLETION)[0].blocked


def test_a_member_that_raises_blocks_with_its_reason() -> None:
    verdict = engine(Fixed("ok", {Category.HATE: 0.0}), Raising()).check(["hello"])[0]
    assert verdict.blocked
    assert any(
        "member broken failed (RuntimeError: model file corrupt)" in r for r in verdict.reasons
    )


def test_a_member_that_overruns_its_budget_blocks() -> None:
    slow = Stalling()
    started = time.perf_counter()
    verdict = engine(Fixed("ok", {Category.HATE: 0.0}), slow, timeout_s=0.2).check(["hello"])[0]
    slow.release.set()
    assert time.perf_counter() - started < 2
    assert verdict.blocked
    assert any("member slow failed (timed out after 200 ms)" in r for r in verdict.reasons)


def test_fail_open_only_when_the_policy_names_the_member() -> None:
    policy = Policy(fail_open=frozenset({"broken"}))
    verdict = engine(Fixed("ok", {Category.HATE: 0.0}), Raising(), policy=policy).check(["x"])[0]
    assert not verdict.blocked
    assert any("failed open" in reason for reason in verdict.reasons)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_a_failing_member_never_yields_an_allow(scores: list[float]) -> None:
    members = [Fixed(f"m{i}", {Category.HATE: s}) for i, s in enumerate(scores)]
    verdict = engine(*members, Raising()).check(["x"])[0]
    assert verdict.blocked


@given(st.floats(0, 1), st.floats(0, 1))
def test_scores_stay_probabilities(a: float, b: float) -> None:
    verdict = engine(Fixed("a", {Category.SEXUAL: a}), Fixed("b", {Category.SEXUAL: b})).check(
        ["x"]
    )[0]
    assert all(0.0 <= result.score <= 1.0 for result in verdict.labels.values())
    assert verdict.category(Category.SEXUAL).score == max(a, b)


def test_severity_derivation() -> None:
    threat = engine(
        Fixed("a", {Category.HARASSMENT_THREATENING: 0.9, Category.HARASSMENT: 0.9})
    ).check(["x"])[0]
    assert threat.azure[AzureCategory.VIOLENCE].severity is Severity.HIGH
    assert threat.azure[AzureCategory.HATE].severity is Severity.HIGH
    medium = engine(Fixed("a", {Category.SEXUAL: 0.6})).check(["x"])[0]
    assert medium.azure[AzureCategory.SEXUAL].severity is Severity.MEDIUM
    assert medium.azure[AzureCategory.SEXUAL].filtered
    low = engine(Fixed("a", {Category.SELF_HARM: 0.3})).check(["x"])[0]
    assert low.azure[AzureCategory.SELF_HARM].severity is Severity.LOW
    assert not low.azure[AzureCategory.SELF_HARM].filtered
    assert low.azure[AzureCategory.HATE].severity is Severity.SAFE


def test_text_over_the_limit_is_refused_not_truncated() -> None:
    run = SafetyEngine(
        [MemberSpec(Fixed("a", {Category.HATE: 0.0}))], policy=Policy(), max_text_chars=10
    )
    with pytest.raises(InputTooLong, match="input 1 has 11 characters; the limit is 10"):
        run.check(["short", "x" * 11])


def test_duplicate_member_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        engine(Fixed("a", {Category.HATE: 0.1}), Fixed("a", {Category.HATE: 0.1}))


class RaisesTimeoutError:
    id = "flaky"
    labels = frozenset({Category.HATE})

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        raise TimeoutError("upstream judge did not answer")


def test_a_member_raising_timeout_error_is_reported_as_failing_not_overrunning() -> None:
    verdict = engine(RaisesTimeoutError(), timeout_s=5.0).check(["x"])[0]
    assert verdict.blocked
    assert any("TimeoutError: upstream judge did not answer" in r for r in verdict.reasons)


def test_the_time_budget_grows_with_the_batch_text() -> None:
    spec = MemberSpec(Fixed("a", {Category.HATE: 0.0}), timeout_s=1.0, timeout_per_kchar_s=0.5)
    assert spec.budget(0) == 1.0
    assert spec.budget(4000) == 3.0


class SlowPerText:
    id = "slow-per-text"
    labels = frozenset({Category.HATE})

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        time.sleep(0.002 * sum(len(t.light) for t in texts) / 100)
        return [Detection(scores={Category.HATE: 0.0}) for _ in texts]


def test_a_large_batch_gets_a_budget_for_its_size() -> None:
    member = SlowPerText()
    run = SafetyEngine(
        [MemberSpec(member, timeout_s=0.1, timeout_per_kchar_s=0.1)], policy=Policy()
    )
    texts = ["word " * 200] * 20  # 20,000 characters: about 0.4 s of work, 2.1 s of budget
    assert not any(verdict.blocked for verdict in run.check(texts))
    tight = SafetyEngine(
        [MemberSpec(member, timeout_s=0.1, timeout_per_kchar_s=0.0)], policy=Policy()
    )
    assert all(verdict.blocked for verdict in tight.check(texts))


def test_a_flagged_subcategory_flags_its_parent() -> None:
    member = Fixed("a", {Category.SELF_HARM: 0.2, Category.SELF_HARM_INTENT: 0.8})
    verdict = engine(member).check(["x"])[0]
    parent = verdict.category(Category.SELF_HARM)
    assert parent.flagged
    assert parent.score == 0.8
    assert parent.members == ("a",)


def test_a_category_flagged_through_its_subcategory_says_so_and_not_a_false_comparison() -> None:
    member = Fixed("a", {Category.ILLICIT: 0.3, Category.ILLICIT_VIOLENT: 0.7})
    policy = Policy(prompt={"illicit": Rule(threshold=0.8), "illicit/violent": Rule(threshold=0.5)})
    verdict = engine(member, policy=policy).check(["text"])[0]
    assert verdict.category(Category.ILLICIT).flagged  # as in OpenAI's taxonomy
    assert verdict.reasons == (
        "prompt flagged for illicit (its subcategory illicit/violent is flagged; members: a)",
        "prompt flagged for illicit/violent (score 0.70 >= threshold 0.50; members: a)",
    )
