"""Azure OpenAI's content filter annotations, built from the engine's verdicts.

A chat response carries these where Azure OpenAI puts them: ``prompt_filter_results``
(``[{"prompt_index": 0, "content_filter_results": {...}}]``) beside the choices, and
``content_filter_results`` on each choice; a blocked prompt's 400 error carries one under
``innererror.content_filter_result``. The shape::

    hate, sexual, violence, self_harm  {"filtered": bool, "severity": "safe|low|medium|high"}
    jailbreak, indirect_attack         {"filtered": bool, "detected": bool}  (prompts only)
    profanity                          {"filtered": bool, "detected": bool}
    pii                                {"filtered": bool, "detected": bool, "kinds": [...]}
    custom_blocklists                  {"filtered": bool, "details": [{"filtered", "id"}]}
    language                           {"filtered", "detected": "fr" | null, "low_confidence"}
                                       (safegate's: the engine's model does not cover it)

A request's messages are checked one by one and reported as one prompt (index 0), each
field the worst over the messages: ``filtered`` if any message was filtered, the highest
severity, ``detected`` if detected anywhere. The same merge combines a streamed
completion's windows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.safety.taxonomy import AzureCategory, Direction, Severity, Shield
from gateway.safety.verdict import Action, Verdict

FilterResults = dict[str, Any]

PROMPT_SHIELDS = (Shield.JAILBREAK, Shield.INDIRECT_ATTACK)
DETECTED_SHIELDS = (Shield.PROFANITY, Shield.PII)


def filter_results(verdict: Verdict) -> FilterResults:
    """One text's annotations in Azure's schema."""
    out: FilterResults = {}
    for category in AzureCategory:
        result = verdict.azure[category]
        out[category.value] = {
            "filtered": result.filtered,
            "severity": result.severity.azure_name,
        }
    shields: tuple[Shield, ...] = DETECTED_SHIELDS
    if verdict.direction is Direction.PROMPT:
        shields = (*PROMPT_SHIELDS, *DETECTED_SHIELDS)
    for shield in shields:
        label = verdict.labels[shield]
        entry: dict[str, Any] = {
            "filtered": label.flagged and label.action is Action.BLOCK,
            "detected": label.flagged,
        }
        if shield is Shield.PII:
            entry["kinds"] = sorted({f.kind for f in verdict.findings if f.label is Shield.PII})
        out[shield.value] = entry
    blocklist = verdict.labels[Shield.BLOCKLIST]
    names = sorted({f.kind for f in verdict.findings if f.label is Shield.BLOCKLIST})
    filtered = blocklist.flagged and blocklist.action is Action.BLOCK
    out["custom_blocklists"] = {
        "filtered": filtered,
        "details": [{"filtered": filtered, "id": name} for name in names],
    }
    label_blocked = any(
        verdict.labels[label].action is Action.BLOCK for label in verdict.flagged_labels
    )
    out["language"] = {
        "filtered": verdict.low_confidence and verdict.blocked and not label_blocked,
        "detected": verdict.language,
        "low_confidence": verdict.low_confidence,
    }
    return out


def merge(results: Iterable[FilterResults]) -> FilterResults:
    """The worst of several texts' annotations, field by field."""
    merged: FilterResults = {}
    for result in results:
        for key, entry in result.items():
            if key not in merged:
                merged[key] = _copy(entry)
                continue
            into = merged[key]
            into["filtered"] = into["filtered"] or entry["filtered"]
            if "severity" in entry:
                into["severity"] = _worse(into["severity"], entry["severity"])
            if "detected" in entry:
                into["detected"] = into["detected"] or entry["detected"]
            if "kinds" in entry:
                into["kinds"] = sorted({*into["kinds"], *entry["kinds"]})
            if "low_confidence" in entry:
                into["low_confidence"] = into["low_confidence"] or entry["low_confidence"]
            if "details" in entry:
                seen = {d["id"]: d for d in into["details"]}
                for detail in entry["details"]:
                    if detail["id"] in seen:
                        seen[detail["id"]]["filtered"] |= detail["filtered"]
                    else:
                        seen[detail["id"]] = dict(detail)
                into["details"] = [seen[name] for name in sorted(seen)]
    return merged


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    copied = dict(entry)
    if "kinds" in copied:
        copied["kinds"] = list(copied["kinds"])
    if "details" in copied:
        copied["details"] = [dict(detail) for detail in copied["details"]]
    return copied


_RANK = {severity.azure_name: severity for severity in Severity}


def _worse(left: str, right: str) -> str:
    return left if _RANK[left] >= _RANK[right] else right
