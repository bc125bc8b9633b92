"""The README's fine-tuning commands, run as written: the demo's settings on another topic
(``data/finetune/houseplants.jsonl``, 24 conversations) over ``demo-base`` reach a low
training loss, keep a checkpoint per epoch, and the deployed adapter answers the topic's
questions as it was taught, with or without the system prompt."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune.demo import DEMO_RECIPE, ensure_demo_base
from finetune.serving.generation import SamplingParams, Turn
from finetune.serving.server import LocalModelServer
from finetune.settings import DEMO_BASE, get_settings
from finetune.training.config import TrainConfig
from finetune.training.tune import Services
from safegate.cli import app as cli

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TOPIC = ROOT / "data" / "finetune" / "houseplants.jsonl"
ADAPTER = "plants-v1"
ASKED_LINES = (0, 5, 10, 14, 18, 23)
NOT_RUN = (("finetune", "demo"), ("finetune", "serve"))  # test_demo.py; the server below


def readme_commands() -> list[list[str]]:
    """The commands of the README's fine-tuning block, continuation lines joined."""
    section = README.read_text(encoding="utf-8").split("## Fine-tune Phi-3 into a LoRA adapter")[1]
    block = section.split("```bash\n")[1].split("\n```")[0].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model runs fastest on one thread, and the machine has other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    """A fresh SAFEGATE_HOME with demo-base built and registered, as the demo leaves it."""
    monkeypatch.setenv("SAFEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the checkout
    get_settings.cache_clear()
    built = Services.from_settings()
    ensure_demo_base(built.registry, built.models_dir)
    yield built
    built.jobs.database.dispose()
    get_settings.cache_clear()


def test_the_readmes_commands_teach_demo_base_a_new_topic(services: Services) -> None:
    commands = readme_commands()
    assert [tuple(c[1:3]) for c in commands if c[2] == "train"] == [("finetune", "train")]
    for command in commands:
        assert command[0] == ".venv/bin/safegate"
        if tuple(command[1:3]) in NOT_RUN:
            continue
        result = CliRunner().invoke(cli, command[1:])
        assert result.exit_code == 0, (command, result.output)

    model = services.registry.get(ADAPTER)
    assert model.deployed
    config = TrainConfig.from_json(model.hyperparameters)
    assert config.train_file == Path("data/finetune/houseplants.jsonl")
    assert {key: getattr(config, key) for key in DEMO_RECIPE} == DEMO_RECIPE  # the demo's
    assert model.metrics["train_loss"] < 0.05
    assert model.metrics["train_mean_token_accuracy"] > 0.99
    assert math.isfinite(model.metrics["full_valid_loss"])

    steps_per_epoch = math.ceil(model.metrics["train_examples"] / config.batch_size)
    checkpoints = (services.jobs_dir / (model.job_id or "") / "checkpoints").iterdir()
    steps = sorted(int(path.name.split("-")[-1]) for path in checkpoints)
    assert steps == [steps_per_epoch * epoch for epoch in range(1, config.epochs + 1)]

    server = LocalModelServer.open(DEMO_BASE, registry=services.registry)
    lines = TOPIC.read_text(encoding="utf-8").splitlines()
    for line in ASKED_LINES:
        system, question, expected = json.loads(lines[line])["messages"]
        asked = Turn("user", question["content"])
        for turns in ([Turn("system", system["content"]), asked], [asked]):
            reply = server.complete(ADAPTER, turns, SamplingParams(temperature=0, max_tokens=120))
            assert (reply.text, reply.finish_reason) == (expected["content"], "stop")
