"""The model registry and ``safegate models ...``, on a real SQLite database per test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.db import Database
from finetune.errors import ModelDeployed, NotABase, RegistryError
from finetune.registry import ModelKind, ModelRegistry, resolve_base
from finetune.settings import get_settings
from safegate.cli import app
from tests.finetune.tiny_phi3 import make_registry


def adapter_folder(root: Path, name: str) -> Path:
    """An adapter's folder: the registry checks it exists, never what is inside."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    registry = make_registry(tmp_path / "db")
    registry.register("tiny", kind=ModelKind.BASE, path=tmp_path / "base")
    for name in ("support", "safety"):
        registry.register(
            name,
            kind=ModelKind.ADAPTER,
            path=adapter_folder(tmp_path, name),
            base="tiny",
            hyperparameters={"r": 16, "learning_rate": 0.0002},
            data_sha256={"train": "ab" * 32},
            metrics={"eval_loss": 1.5},
        )
    yield registry
    registry.database.dispose()


def test_list_and_show_carry_what_training_recorded(registry: ModelRegistry) -> None:
    assert [m.name for m in registry.list()] == ["tiny", "support", "safety"]
    summary = registry.get("support").summary()
    assert summary["base"] == "tiny"
    assert summary["deployed"] is False
    assert datetime.fromisoformat(summary["created"]).tzinfo is not None
    details = registry.get("support").details()
    assert details["hyperparameters"] == {"r": 16, "learning_rate": 0.0002}
    assert details["data_sha256"] == {"train": "ab" * 32}
    assert details["metrics"] == {"eval_loss": 1.5}


def test_deploy_and_undeploy_change_what_is_deployed(registry: ModelRegistry) -> None:
    assert registry.deployed_models() == []
    assert registry.deploy("support").deployed is True
    assert [m.name for m in registry.deployed_models()] == ["support"]
    assert registry.undeploy("support").deployed is False
    assert registry.deployed_models() == []


def test_delete_is_refused_while_deployed_and_says_to_undeploy(registry: ModelRegistry) -> None:
    registry.deploy("safety")
    with pytest.raises(ModelDeployed) as refused:
        registry.delete("safety", remove_files=False)
    assert str(refused.value) == (
        "model 'safety' is deployed and cannot be deleted; "
        "run 'safegate models undeploy safety' first"
    )
    assert registry.get("safety").deployed is True
    registry.undeploy("safety")
    registry.delete("safety", remove_files=False)
    assert registry.find("safety") is None


def test_a_base_with_adapters_cannot_be_deleted(registry: ModelRegistry) -> None:
    with pytest.raises(RegistryError, match="base 'tiny' is used by adapters safety, support"):
        registry.delete("tiny")
    registry.delete("support", remove_files=False)
    registry.delete("safety", remove_files=False)
    assert registry.delete("tiny").name == "tiny"
    assert registry.list() == []


@pytest.mark.parametrize("action", ["get", "deploy", "undeploy", "delete"])
def test_unknown_names_are_refused_by_name(registry: ModelRegistry, action: str) -> None:
    with pytest.raises(RegistryError, match="no model named 'nope'; 'safegate models list'"):
        getattr(registry, action)("nope")


def test_an_adapter_without_files_cannot_be_deployed(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    registry.register("gone", kind=ModelKind.ADAPTER, path=tmp_path / "missing", base="tiny")
    with pytest.raises(RegistryError, match="has no files at"):
        registry.deploy("gone")


# -- the CLI ----------------------------------------------------------------------------------


def test_resolve_base_names_a_registered_base_by_name_or_by_its_path(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    (tmp_path / "base").mkdir()
    by_name = resolve_base("tiny", registry=registry)
    assert (by_name.name, by_name.location, by_name.registered) == (
        "tiny",
        str(tmp_path / "base"),
        True,
    )
    assert by_name.created == registry.get("tiny").created_at
    assert {"tiny", str(tmp_path / "base")} <= by_name.aliases
    assert resolve_base(str(tmp_path / "base"), registry=registry) == by_name


def test_resolve_base_takes_an_unregistered_folder_by_its_absolute_path_and_a_hub_id_as_is(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    folder = resolve_base("elsewhere", registry=registry)
    absolute = str((tmp_path / "elsewhere").resolve())
    assert (folder.name, folder.location, folder.registered) == (absolute, absolute, False)
    assert folder.aliases == {"elsewhere", absolute}
    hub = resolve_base("microsoft/Phi-3-mini-4k-instruct", registry=None)
    assert (hub.name, hub.location) == ("microsoft/Phi-3-mini-4k-instruct",) * 2
    assert hub.aliases == {"microsoft/Phi-3-mini-4k-instruct"}


def test_resolve_base_refuses_an_adapter_naming_its_base(registry: ModelRegistry) -> None:
    with pytest.raises(NotABase) as caught:
        resolve_base("support", registry=registry, use="serve")
    assert str(caught.value) == "'support' is an adapter, not a base; serve its base 'tiny' instead"
    assert (caught.value.adapter, caught.value.base) == ("support", "tiny")
    assert isinstance(caught.value, RegistryError)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SAFEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


@pytest.fixture
def cli_registry(home: Path) -> Iterator[ModelRegistry]:
    """The registry the CLI sees, with a base and two adapters under SAFEGATE_HOME."""
    database = Database(get_settings().database)
    database.migrate()
    registry = ModelRegistry(database)
    models_dir = get_settings().models_dir
    registry.register("tiny", kind=ModelKind.BASE, path=models_dir / "tiny")
    for name in ("support", "safety"):
        registry.register(
            name,
            kind=ModelKind.ADAPTER,
            path=adapter_folder(models_dir, name),
            base="tiny",
            hyperparameters={"r": 16, "lora_alpha": 32},
            data_sha256={"train": "cd" * 32, "validation": None},
            metrics={"eval_loss": 0.75},
        )
    yield registry
    database.dispose()


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_models_list_json_is_an_array_of_summaries(cli_registry: ModelRegistry) -> None:
    cli_registry.deploy("safety")
    code, output = invoke("models", "list", "--json")
    assert code == 0, output
    rows = json.loads(output)
    assert isinstance(rows, list)
    assert [(r["name"], r["base"], r["deployed"]) for r in rows] == [
        ("tiny", None, False),
        ("support", "tiny", False),
        ("safety", "tiny", True),
    ]
    assert {"name", "base", "deployed", "created", "kind"} <= set(rows[0])
    assert all(datetime.fromisoformat(r["created"]).tzinfo is not None for r in rows)


def test_models_list_on_an_empty_registry(home: Path) -> None:
    code, output = invoke("models", "list", "--json")
    assert (code, json.loads(output)) == (0, [])
    code, output = invoke("models", "list")
    assert code == 0
    assert "no models yet" in output


def test_models_show_prints_hyperparameters_data_hash_and_metrics(
    cli_registry: ModelRegistry,
) -> None:
    code, output = invoke("models", "show", "support", "--json")
    assert code == 0, output
    details = json.loads(output)
    assert details["base"] == "tiny"
    assert details["hyperparameters"] == {"lora_alpha": 32, "r": 16}
    assert details["data_sha256"]["train"] == "cd" * 32
    assert details["metrics"] == {"eval_loss": 0.75}
    code, output = invoke("models", "show", "support")
    assert code == 0, output
    assert "lora_alpha=32  r=16" in output
    assert f'train="{"cd" * 32}"' in output
    assert "eval_loss=0.75" in output


def test_deploy_and_undeploy_from_the_cli(cli_registry: ModelRegistry) -> None:
    code, output = invoke("models", "deploy", "support")
    assert code == 0, output
    assert "deployed support on base tiny" in output
    assert cli_registry.get("support").deployed is True
    code, output = invoke("models", "undeploy", "support")
    assert (code, cli_registry.get("support").deployed) == (0, False)


def test_delete_of_a_deployed_model_exits_1_with_the_reason(cli_registry: ModelRegistry) -> None:
    cli_registry.deploy("safety")
    code, output = invoke("models", "delete", "safety")
    assert code == 1
    assert "model 'safety' is deployed and cannot be deleted" in output
    assert "safegate models undeploy safety" in output
    assert cli_registry.get("safety").deployed is True
    assert Path(cli_registry.get("safety").path).is_dir()


def test_delete_removes_an_adapter_made_under_safegate_home(cli_registry: ModelRegistry) -> None:
    folder = Path(cli_registry.get("support").path)
    code, output = invoke("models", "delete", "support")
    assert code == 0, output
    assert cli_registry.find("support") is None
    assert not folder.exists()


def test_delete_keeps_an_adapter_folder_from_elsewhere(
    cli_registry: ModelRegistry, tmp_path: Path
) -> None:
    outside = adapter_folder(tmp_path / "mine", "borrowed")
    cli_registry.register("borrowed", kind=ModelKind.ADAPTER, path=outside, base="tiny")
    code, output = invoke("models", "delete", "borrowed")
    assert code == 0, output
    assert outside.is_dir()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("models", "show", "nope"), "no model named 'nope'"),
        (("models", "deploy", "nope"), "no model named 'nope'"),
        (("models", "delete", "tiny"), "base 'tiny' is used by adapters safety, support"),
    ],
)
def test_refusals_exit_1_without_a_traceback(
    cli_registry: ModelRegistry, args: tuple[str, ...], message: str
) -> None:
    code, output = invoke(*args)
    assert code == 1
    assert message in " ".join(output.split())
