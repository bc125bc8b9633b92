"""Build the safety engine's members from settings.

Each enabled member is constructed through the ``MEMBERS`` registry with its section
of the settings. A member that cannot load stops start-up with a ``MemberLoadError``
naming it: the service never starts with a silently missing classifier.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

from gateway.config import Settings
from gateway.safety.allocator import fix_mmap_threshold
from gateway.safety.allowlist import AllowlistSource
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.members import MEMBERS, MemberFactory, MemberKind
from gateway.safety.members.blocklist import BlocklistSource
from gateway.safety.policy import Policy

# Importing a member module registers its factory.
_MEMBER_MODULES = {
    MemberKind.ENCODER: "gateway.safety.members.encoder_heads",
    MemberKind.PROFANITY: "gateway.safety.members.profanity",
    MemberKind.PII: "gateway.safety.members.pii",
    MemberKind.BLOCKLIST: "gateway.safety.members.blocklist",
    MemberKind.DETOXIFY: "gateway.safety.members.detoxify_model",
    MemberKind.LLM_JUDGE: "gateway.safety.members.llm_judge",
    MemberKind.LANGUAGE: "gateway.safety.members.language",
    MemberKind.MULTILINGUAL: "gateway.safety.members.multilingual",
}


def build_members(settings: Settings, *, blocklists: BlocklistSource | None) -> list[MemberSpec]:
    specs: list[MemberSpec] = []
    if settings.encoder.enabled:
        factory = _factory(MemberKind.ENCODER)
        encoder = settings.encoder
        member = factory(
            heads_path=encoder.heads,
            backend=encoder.backend,
            cache_dir=settings.home_dir / "cache",
            threads=encoder.threads,
        )
        specs.append(MemberSpec(member, encoder.timeout_s))
    if settings.multilingual.enabled:
        factory = _factory(MemberKind.MULTILINGUAL)
        anchors = getattr(specs[0].classifier, "thresholds", None) if specs else None
        # Transfer skips the languages the English encoder's card covers.
        english = getattr(specs[0].classifier, "languages", ("en",)) if specs else ("en",)
        member = factory(
            heads_path=settings.multilingual.heads,
            anchors=anchors,
            transfer_except=english if settings.multilingual.transfer else None,
            unclear=settings.multilingual.unclear,
        )
        specs.append(MemberSpec(member, settings.multilingual.timeout_s))
    if settings.language.enabled:
        factory = _factory(MemberKind.LANGUAGE)
        specs.append(MemberSpec(factory(), settings.language.timeout_s))
    if settings.profanity.enabled:
        factory = _factory(MemberKind.PROFANITY)
        specs.append(MemberSpec(factory(), settings.profanity.timeout_s))
    if settings.pii.enabled:
        factory = _factory(MemberKind.PII)
        specs.append(
            MemberSpec(factory(default_region=settings.pii.default_region), settings.pii.timeout_s)
        )
    if settings.blocklist.enabled and blocklists is not None:
        factory = _factory(MemberKind.BLOCKLIST)
        specs.append(MemberSpec(factory(source=blocklists), settings.blocklist.timeout_s))
    if settings.detoxify.enabled:
        config = settings.detoxify
        factory = _factory(MemberKind.DETOXIFY)
        specs.append(
            MemberSpec(
                factory(
                    model_type=config.model_type,
                    checkpoint=config.checkpoint,
                    huggingface_config_path=config.huggingface_config_path,
                    allowed_sha256=frozenset(config.allowed_sha256),
                    cache_dir=settings.home_dir / "models" / "detoxify",
                ),
                config.timeout_s,
            )
        )
    if settings.llm_judge.enabled:
        config_judge = settings.llm_judge
        factory = _factory(MemberKind.LLM_JUDGE)
        specs.append(
            MemberSpec(
                factory(
                    model=config_judge.model,
                    api_base=config_judge.api_base,
                    api_key=config_judge.api_key,
                    timeout_s=config_judge.timeout_s,
                    mock_response=config_judge.mock_response,
                ),
                config_judge.timeout_s + 1.0,
            )
        )
    per_kchar = settings.engine.timeout_per_kchar_s
    return [replace(spec, timeout_per_kchar_s=per_kchar) for spec in specs]


def build_engine(
    settings: Settings,
    *,
    blocklists: BlocklistSource | None,
    allowlists: AllowlistSource | None = None,
) -> SafetyEngine:
    """The engine ``safegate serve`` runs; without an allowlist source nothing is exempt."""
    fix_mmap_threshold()  # or the heap grows with every new batch shape (allocator.py)
    policy = Policy.load(settings.policy_file)
    return SafetyEngine(
        build_members(settings, blocklists=blocklists),
        policy=policy,
        max_text_chars=settings.engine.max_text_chars,
        allowlists=allowlists,
    )


def _factory(kind: MemberKind) -> MemberFactory:
    importlib.import_module(_MEMBER_MODULES[kind])
    return MEMBERS.get(kind.value)
