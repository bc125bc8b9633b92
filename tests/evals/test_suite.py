"""Suites: every problem names the file and the field, and is found before any model call."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.cache import CallCache
from evals.errors import ModelNotFound, SuiteError
from evals.runner import Runner
from evals.runs import RunStore
from evals.suite import (
    DEFAULT_API_KEY_ENV,
    DEFAULT_CONCURRENCY,
    DEFAULT_GATEWAY_URL,
    GatewayModel,
    LitellmModel,
    choose_models,
    load_suite,
)
from tests.evals.conftest import FakeCaller, make_runner, write_suite

GATEWAY = {"name": "demo", "via": "gateway"}
MOCK = {"name": "mock", "via": "litellm", "model": "openai/mock", "params": {"api_key": "k"}}


def test_a_minimal_suite_gets_named_defaults(tmp_path: Path) -> None:
    suite = load_suite(write_suite(tmp_path, models=[GATEWAY], metrics=None, concurrency=None))
    assert suite.spec.concurrency == DEFAULT_CONCURRENCY
    (model,) = suite.spec.models
    assert isinstance(model, GatewayModel)
    assert (model.base_url, model.api_key_env) == (DEFAULT_GATEWAY_URL, DEFAULT_API_KEY_ENV)
    assert model.served_name == "demo"
    assert suite.spec.generation.params() == {"temperature": 0.0, "max_tokens": 32, "seed": 0}
    assert len(suite.sha256) == 64


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"datasets": [{"name": "a", "path": "qa.jsonl"}, {"name": "b", "path": "gone.jsonl"}]},
            "suite.yaml: datasets[1].path: file not found",
        ),
        ({"datasets": [{"name": "a"}]}, "datasets[0]: give exactly one of path"),
        (
            {"datasets": [{"name": "a", "path": "qa.jsonl", "fromat": "chat"}]},
            "datasets[0].fromat: unknown field",
        ),
        (
            {"datasets": [{"name": "a", "path": "qa.jsonl", "format": "csv"}]},
            "datasets[0].format: Input should be 'chat' or 'prompt'",
        ),
        ({"datasets": []}, "datasets: List should have at least 1 item"),
        (
            {"models": [{"name": "m", "via": "carrier-pigeon"}]},
            "models[0]: via must be 'gateway' or 'litellm'",
        ),
        ({"models": [{"name": "m"}]}, "models[0]: via is missing"),
        ({"models": [{**GATEWAY, "base_ur": "x"}]}, "models[0].base_ur: unknown field"),
        ({"models": [MOCK, MOCK]}, "suite.yaml: models: model 'mock' is named twice"),
        ({"concurrency": 0}, "concurrency: Input should be greater than or equal to 1"),
        (
            {"generation": {"temperature": 3}},
            "generation.temperature: Input should be less than or equal to 2",
        ),
        ({"gate": "gates/missing.yaml"}, "suite.yaml: gate: file not found"),
        ({"name": None}, "suite.yaml: name: Field required"),
        ({"name": "has space"}, "name: String should match pattern"),
    ],
)
def test_bad_suites_name_file_and_field(
    tmp_path: Path, overrides: dict[str, object], expected: str
) -> None:
    with pytest.raises(SuiteError) as caught:
        load_suite(write_suite(tmp_path, **overrides))
    assert expected in str(caught.value)
    assert str(tmp_path / "suite.yaml") in str(caught.value)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"nope.yaml: file not found"):
        load_suite(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: x\ndatasets: [\n", encoding="utf-8")
    with pytest.raises(SuiteError, match=r"bad.yaml: line 3: not valid YAML"):
        load_suite(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n", encoding="utf-8")
    with pytest.raises(SuiteError, match="a suite is a YAML mapping"):
        load_suite(tmp_path / "list.yaml")


def test_model_choice_and_overrides(tmp_path: Path) -> None:
    gateway = {**GATEWAY, "base_url": "http://gw:9000/v1", "api_key_env": "GW_KEY"}
    suite = load_suite(write_suite(tmp_path, models=[MOCK, gateway]))
    assert [c.spec.name for c in choose_models(suite, None)] == ["mock", "demo"]
    (chosen,) = choose_models(suite, "demo")
    assert chosen.field == "models[1]"
    (override,) = choose_models(suite, "gateway:support-v2")
    assert isinstance(override.spec, GatewayModel)
    assert override.spec.served_name == "support-v2"
    assert override.spec.base_url == "http://gw:9000/v1"  # the suite's gateway settings
    assert override.spec.api_key_env == "GW_KEY"
    (direct,) = choose_models(suite, "litellm:ollama/phi3")
    assert isinstance(direct.spec, LitellmModel)
    assert direct.spec.model == "ollama/phi3"
    with pytest.raises(ModelNotFound, match=r"suite.yaml: --model: unknown model 'gpt-5'"):
        choose_models(suite, "gpt-5")


def test_cache_identity_leaves_secrets_out(tmp_path: Path) -> None:
    model = LitellmModel(
        name="m", via="litellm", model="azure/gpt", params={"api_key": "sk-1", "api_base": "u"}
    )
    assert model.identity()["params"] == {"api_base": "u"}


# -- found before any model call, by the runner ---------------------------------------------------


def _prepare_fails(
    store: RunStore, cache: CallCache, suite: Path, *, model: str | None = None
) -> str:
    caller = FakeCaller(forbid=True)  # raises if asked to generate
    runner = make_runner(store, cache, caller)
    with pytest.raises(SuiteError) as caught:
        runner.run(suite, model=model)
    assert caller.calls == []
    assert store.list() == []  # nothing was stored either
    return str(caught.value)


def test_missing_dataset_fails_before_any_call(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    suite = write_suite(tmp_path, datasets=[{"name": "qa", "path": "missing.jsonl"}])
    message = _prepare_fails(store, cache, suite)
    assert "suite.yaml: datasets[0].path: file not found" in message


def test_malformed_dataset_fails_before_any_call(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    (tmp_path / "qa.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n', encoding="utf-8")
    message = _prepare_fails(store, cache, write_suite(tmp_path))
    assert "qa.jsonl: line 2: prompt must be a non-empty string" in message


def test_unknown_metric_and_bad_options_fail_before_any_call(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    metrics = ["rougeL", "bleurt", {"name": "bleu", "options": {"smoothing": "maybe"}}]
    message = _prepare_fails(store, cache, write_suite(tmp_path, metrics=metrics))
    assert "suite.yaml: metrics[1].name: unknown metric 'bleurt'; known metrics: " in message
    assert "suite.yaml: metrics[2].options: metric " in message
    assert "has no option 'smoothing'" in message


def test_unknown_model_fails_before_any_call(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    message = _prepare_fails(store, cache, write_suite(tmp_path), model="gpt-5")
    assert "suite.yaml: --model: unknown model 'gpt-5'; the suite has mock" in message


def test_real_callers_check_models_before_any_call(
    tmp_path: Path, store: RunStore, cache: CallCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EVAL_TEST_KEY", raising=False)
    models = [
        {"name": "nowhere", "via": "litellm", "model": "no-such-provider-xyz/model"},
        {**GATEWAY, "api_key_env": "EVAL_TEST_KEY"},
        {
            "name": "env",
            "via": "litellm",
            "model": "openai/x",
            "params": {"api_key": "os.environ/EVAL_TEST_KEY"},
        },
    ]
    runner = Runner(store, cache, progress=False)  # the real callers
    with pytest.raises(SuiteError) as caught:
        runner.run(write_suite(tmp_path, models=models))
    message = str(caught.value)
    assert "suite.yaml: models[0]: litellm knows no provider for 'no-such-provider-xyz/model'" in (
        message
    )
    assert "suite.yaml: models[1].api_key_env: $EVAL_TEST_KEY is not set" in message
    assert "suite.yaml: models[2].params.api_key: $EVAL_TEST_KEY is not set" in message
    assert store.list() == []
