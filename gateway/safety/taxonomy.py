"""The label taxonomy every member, policy and API speaks.

Canonical harm categories are OpenAI moderation's thirteen, spelled as OpenAI spells
them. Azure AI Content Safety's four harm categories and its 0/2/4/6 severity scale are
derived from them (see ``AZURE_CATEGORY_MEMBERS`` and :func:`gateway.safety.severity`).
Shields are detectors that sit beside the harm categories: prompt attacks, profanity,
personal data and custom blocklists.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from types import MappingProxyType


class Category(StrEnum):
    """OpenAI moderation categories (``omni-moderation`` spelling)."""

    HARASSMENT = "harassment"
    HARASSMENT_THREATENING = "harassment/threatening"
    HATE = "hate"
    HATE_THREATENING = "hate/threatening"
    ILLICIT = "illicit"
    ILLICIT_VIOLENT = "illicit/violent"
    SELF_HARM = "self-harm"
    SELF_HARM_INTENT = "self-harm/intent"
    SELF_HARM_INSTRUCTIONS = "self-harm/instructions"
    SEXUAL = "sexual"
    SEXUAL_MINORS = "sexual/minors"
    VIOLENCE = "violence"
    VIOLENCE_GRAPHIC = "violence/graphic"

    @property
    def parent(self) -> Category:
        """The top-level category (``hate/threatening`` -> ``hate``)."""
        return Category(self.value.split("/", 1)[0])


class Shield(StrEnum):
    """Detectors beside the harm categories."""

    JAILBREAK = "jailbreak"
    INDIRECT_ATTACK = "indirect_attack"
    PROFANITY = "profanity"
    PII = "pii"
    BLOCKLIST = "blocklist"


Label = Category | Shield


def parse_label(name: str) -> Label:
    """Return the category or shield called ``name``; raise ``ValueError`` otherwise."""
    try:
        return Category(name)
    except ValueError:
        pass
    try:
        return Shield(name)
    except ValueError:
        known = ", ".join([*Category, *Shield])
        raise ValueError(f"unknown label {name!r}; known labels: {known}") from None


class AzureCategory(StrEnum):
    """Azure AI Content Safety harm categories."""

    HATE = "hate"
    SEXUAL = "sexual"
    VIOLENCE = "violence"
    SELF_HARM = "self_harm"


class Severity(IntEnum):
    """Azure's four-level severity scale."""

    SAFE = 0
    LOW = 2
    MEDIUM = 4
    HIGH = 6

    @property
    def azure_name(self) -> str:
        """The name Azure OpenAI's content filter uses (``safe``, ``low``, ...)."""
        return self.name.lower()


class Direction(StrEnum):
    """Which side of a conversation a text comes from."""

    PROMPT = "prompt"
    COMPLETION = "completion"


# Which OpenAI categories feed each Azure category. A category may feed several:
# a threat aimed at a group is both hate and violence in Azure's taxonomy.
AZURE_CATEGORY_MEMBERS: MappingProxyType[AzureCategory, tuple[Category, ...]] = MappingProxyType(
    {
        AzureCategory.HATE: (
            Category.HATE,
            Category.HATE_THREATENING,
            Category.HARASSMENT,
            Category.HARASSMENT_THREATENING,
        ),
        AzureCategory.SEXUAL: (Category.SEXUAL, Category.SEXUAL_MINORS),
        AzureCategory.VIOLENCE: (
            Category.VIOLENCE,
            Category.VIOLENCE_GRAPHIC,
            Category.ILLICIT_VIOLENT,
            Category.HATE_THREATENING,
            Category.HARASSMENT_THREATENING,
        ),
        AzureCategory.SELF_HARM: (
            Category.SELF_HARM,
            Category.SELF_HARM_INTENT,
            Category.SELF_HARM_INSTRUCTIONS,
        ),
    }
)

# Subcategories that describe the severe end of their Azure category: when one of them
# is flagged the Azure severity is HIGH, not MEDIUM.
SEVERE_CATEGORIES: frozenset[Category] = frozenset(
    {
        Category.HATE_THREATENING,
        Category.HARASSMENT_THREATENING,
        Category.SEXUAL_MINORS,
        Category.VIOLENCE_GRAPHIC,
        Category.ILLICIT_VIOLENT,
        Category.SELF_HARM_INSTRUCTIONS,
        Category.SELF_HARM_INTENT,
    }
)
