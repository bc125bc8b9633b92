"""Settings: each domain's ``settings.py`` is a leaf, ``gateway.config`` composes them,
and every default and environment variable name stays what operators were told."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings
from safegate.settings import SharedSettings

ROOT = Path(__file__).resolve().parent.parent.parent
GATEWAY = ROOT / "gateway"
# What a settings module may import besides the standard library and other settings
# modules of the gateway.
ALLOWED = {"__future__", "pydantic", "pydantic_settings", "safegate.settings"}


def _settings_modules() -> list[Path]:
    return [GATEWAY / "config.py", *sorted(GATEWAY.rglob("settings.py"))]


def _imported(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, wherever the import stands (lazy ones included)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import"
            base = node.module or ""
            for alias in node.names:
                # ``from gateway.chat import settings`` imports a settings module too
                named = f"{base}.{alias.name}" if alias.name == "settings" else base
                found.append((node.lineno, named))
    return found


def _allowed(module: str) -> bool:
    top = module.partition(".")[0]
    if top == "gateway":
        return module.rpartition(".")[2] == "settings"
    return top in sys.stdlib_module_names or top in ALLOWED or module in ALLOWED


def test_the_domains_own_their_settings() -> None:
    owned = {path.parent.relative_to(GATEWAY).as_posix() for path in _settings_modules()[1:]}
    assert owned >= {"access", "audit", "blocklists", "chat", "safety"}


@pytest.mark.parametrize("path", _settings_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_settings_modules_import_only_settings(path: Path) -> None:
    """``gateway.config`` and every ``settings.py`` import pydantic, the standard library
    and other settings modules, never a domain's code: the domains import their defaults
    from their settings, not the other way round."""
    found = _imported(path)
    assert found, "nothing found: the reader is broken"
    outside = [
        f"{path.name}:{line} imports {module}" for line, module in found if not _allowed(module)
    ]
    assert outside == []


def test_the_leaf_check_sees_a_domain_import(tmp_path: Path) -> None:
    bad = tmp_path / "settings.py"
    bad.write_text(
        "from pydantic import BaseModel\n"
        "from gateway.safety.settings import DEFAULT_MEMBER_TIMEOUT_S\n"
        "from gateway.chat import settings\n"
        "def f():\n    from gateway.safety.engine import DEFAULT_MAX_TEXT_CHARS\n"
    )
    assert [module for _, module in _imported(bad) if not _allowed(module)] == [
        "gateway.safety.engine"
    ]


def _own_fields(settings: Settings) -> dict[str, Any]:
    dumped = settings.model_dump(mode="json")
    return {
        name: dumped[name]
        for name in Settings.model_fields
        if name not in SharedSettings.model_fields
    }


def _clear_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SAFEGATE_"):
            monkeypatch.delenv(name)


def test_every_default(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_environment(monkeypatch)
    assert _own_fields(Settings()) == {
        "policy_file": str(GATEWAY / "policies" / "default.yaml"),
        "host": "127.0.0.1",
        "port": 8000,
        "max_body_bytes": 2_000_000,
        "max_moderation_inputs": 64,
        "log_level": "info",
        "api_docs": False,
        "engine": {
            "max_text_chars": 32_000,
            "timeout_per_kchar_s": 0.1,
            "max_batch": 32,
            "max_batch_chars": 4_000,
            "queue_capacity_chars": 2_000_000,
            "max_wait_s": 0.0,
        },
        "encoder": {
            "enabled": True,
            "heads": str(GATEWAY / "safety" / "weights" / "heads.safetensors"),
            "backend": None,  # the model card's
            "timeout_s": 5.0,
            "threads": None,
        },
        "multilingual": {
            "enabled": True,
            "heads": str(GATEWAY / "safety" / "weights" / "multilingual" / "heads.safetensors"),
            "transfer": True,
            "unclear": True,
            "timeout_s": 5.0,
        },
        "language": {"enabled": True, "timeout_s": 5.0},
        "profanity": {"enabled": True, "timeout_s": 5.0},
        "pii": {"enabled": True, "default_region": "US", "timeout_s": 5.0},
        "blocklist": {"enabled": True, "refresh_s": 5.0, "timeout_s": 5.0},
        "detoxify": {
            "enabled": False,
            "model_type": "original",
            "checkpoint": None,
            "huggingface_config_path": None,
            "allowed_sha256": [],
            "timeout_s": 5.0,
        },
        "llm_judge": {
            "enabled": False,
            "model": "ollama/llama-guard3:1b",
            "api_base": None,
            "api_key": None,
            "timeout_s": 10.0,
            "mock_response": None,
        },
        "chat": {
            "max_messages": 256,
            "max_message_chars": 32_000,
            "max_tokens": 4096,
            "max_choices": 4,
            "max_tools": 128,
            "max_prompt_chars": 256_000,
            "stream_window_chars": 160,
            "stream_increment_chars": 24,
            "stream_overlap_chars": 160,
        },
        "upstreams": {"file": str(GATEWAY / "chat" / "upstreams.yaml"), "serve_local": True},
        "audit": {
            "drain_interval_s": 10.0,
            "write_timeout_s": 2.0,
            "spool_dir": None,
            "record_requests": True,
        },
        "auth": {"enabled": True, "cache_ttl_s": 5.0, "outage_grace_s": 300.0},
        "rate_limit": {
            "requests_per_minute": 600,
            "burst": None,
            "redis_url": None,
            "key_prefix": "safegate:ratelimit:",
            "timeout_s": 0.5,
        },
        "quota": {"cache_ttl_s": 2.0},
        "tracing": {
            "enabled": False,
            "service_name": None,
            "endpoint": None,
            "sample_ratio": 1.0,
            "export_timeout_s": 10.0,
        },
    }


ENVIRONMENT = [
    ("SAFEGATE_PORT", "9000", ("port",), 9000),
    ("SAFEGATE_ENGINE__MAX_BATCH", "7", ("engine", "max_batch"), 7),
    ("SAFEGATE_ENCODER__BACKEND", "torch", ("encoder", "backend"), "torch"),
    ("SAFEGATE_LANGUAGE__ENABLED", "false", ("language", "enabled"), False),
    ("SAFEGATE_MULTILINGUAL__ENABLED", "false", ("multilingual", "enabled"), False),
    ("SAFEGATE_MULTILINGUAL__TRANSFER", "false", ("multilingual", "transfer"), False),
    ("SAFEGATE_PROFANITY__TIMEOUT_S", "2.5", ("profanity", "timeout_s"), 2.5),
    ("SAFEGATE_PII__DEFAULT_REGION", "GB", ("pii", "default_region"), "GB"),
    ("SAFEGATE_BLOCKLIST__REFRESH_S", "9", ("blocklist", "refresh_s"), 9.0),
    ("SAFEGATE_DETOXIFY__MODEL_TYPE", "unbiased", ("detoxify", "model_type"), "unbiased"),
    ("SAFEGATE_LLM_JUDGE__MODEL", "ollama/x", ("llm_judge", "model"), "ollama/x"),
    ("SAFEGATE_CHAT__MAX_TOOLS", "3", ("chat", "max_tools"), 3),
    ("SAFEGATE_UPSTREAMS__SERVE_LOCAL", "false", ("upstreams", "serve_local"), False),
    ("SAFEGATE_AUDIT__WRITE_TIMEOUT_S", "3", ("audit", "write_timeout_s"), 3.0),
    ("SAFEGATE_AUTH__OUTAGE_GRACE_S", "0", ("auth", "outage_grace_s"), 0.0),
    ("SAFEGATE_RATE_LIMIT__REDIS_URL", "redis://r", ("rate_limit", "redis_url"), "redis://r"),
    ("SAFEGATE_QUOTA__CACHE_TTL_S", "4", ("quota", "cache_ttl_s"), 4.0),
    ("SAFEGATE_TRACING__ENABLED", "true", ("tracing", "enabled"), True),
]


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"), ENVIRONMENT, ids=[e[0] for e in ENVIRONMENT]
)
def test_environment_names(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: tuple[str, ...], expected: object
) -> None:
    _clear_environment(monkeypatch)
    monkeypatch.setenv(name, value)
    found: Any = Settings().model_dump(mode="json")
    for part in field:
        found = found[part]
    assert found == expected
