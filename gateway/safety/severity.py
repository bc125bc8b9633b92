"""Azure AI Content Safety severities, derived from the combined OpenAI-category results.

For each Azure category (hate, sexual, violence, self_harm) look at the OpenAI
categories that feed it (``taxonomy.AZURE_CATEGORY_MEMBERS``):

- ``high`` (6): a severe subcategory is flagged (threatening, minors, graphic,
  illicit/violent, self-harm intent or instructions), or a feeding category is flagged
  with a calibrated score of at least ``HIGH_SCORE``;
- ``medium`` (4): a feeding category is flagged (its score reached its threshold);
- ``low`` (2): the highest feeding score is at least half its threshold;
- ``safe`` (0): otherwise.

``filtered`` is true when a flagged feeding category's action is ``block``: what
Azure OpenAI reports as ``filtered`` for a content filter configured at that level.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from gateway.safety.taxonomy import (
    AZURE_CATEGORY_MEMBERS,
    SEVERE_CATEGORIES,
    AzureCategory,
    Label,
    Severity,
)
from gateway.safety.verdict import Action, AzureResult, LabelResult

HIGH_SCORE = 0.9


def azure_results(labels: Mapping[Label, LabelResult]) -> Mapping[AzureCategory, AzureResult]:
    out: dict[AzureCategory, AzureResult] = {}
    for azure, categories in AZURE_CATEGORY_MEMBERS.items():
        results = [labels[category] for category in categories if category in labels]
        flagged = [result for result in results if result.flagged]
        if any(r.label in SEVERE_CATEGORIES or r.score >= HIGH_SCORE for r in flagged):
            severity = Severity.HIGH
        elif flagged:
            severity = Severity.MEDIUM
        elif any(r.score >= r.threshold / 2 for r in results):
            severity = Severity.LOW
        else:
            severity = Severity.SAFE
        filtered = any(r.action is Action.BLOCK for r in flagged)
        out[azure] = AzureResult(category=azure, severity=severity, filtered=filtered)
    return MappingProxyType(out)
