"""One safety judge per test session, built on the gateway tests' loaded engine members."""

from __future__ import annotations

from evals.metrics.safety import SafetyJudge
from evals.refusal import RefusalDetector
from gateway.config import Settings
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.policy import Policy

_JUDGES: dict[int, SafetyJudge] = {}


def judge_for(members: list[MemberSpec]) -> SafetyJudge:
    """The judge over these members (the session's), built once."""
    key = id(members)
    if key not in _JUDGES:
        policy = Policy.load(Settings().policy_file)
        _JUDGES[key] = SafetyJudge(SafetyEngine(members, policy=policy), RefusalDetector.load())
    return _JUDGES[key]
