"""``safegate finetune demo``: offline base, a trained adapter that answers like the sample
and stops at <|end|>, registered and deployed, its name on the last line."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer
from typer.testing import CliRunner

from finetune.chat import END_OF_TURN, PHI3_CHAT_TEMPLATE, SPECIAL_TOKENS
from finetune.cli import app
from finetune.demo import (
    DEMO_ADAPTER,
    DEMO_MAX_NEW_TOKENS,
    SAMPLE_TRAIN,
    SAMPLE_VALIDATION,
    answer,
    ask,
    ensure_demo_base,
)
from finetune.jobs import JobStatus
from finetune.registry import Model, ModelKind
from finetune.settings import DEMO_BASE, get_settings
from finetune.train import Services

SAMPLE_LINES = (0, 9, 18, 27, 36, 47)
MIN_OVERLAP = 0.8


def token_f1(reply: str, reference: str) -> float:
    """SQuAD-style word F1 between a reply and the reference answer."""
    got, want = Counter(reply.lower().split()), Counter(reference.lower().split())
    common = sum((got & want).values())
    if not common:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def reference(path: Path, line: int) -> tuple[list[dict[str, str]], str]:
    record = json.loads(path.read_text(encoding="utf-8").splitlines()[line])
    messages = record["messages"]
    return messages[:-1], messages[-1]["content"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Services, Model, str]]:
    """One demo run through the command line, shared by the checks below."""
    home = tmp_path_factory.mktemp("demo-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFEGATE_HOME", str(home))
        patch.delenv("SAFEGATE_DATABASE_URL", raising=False)
        get_settings.cache_clear()
        result = CliRunner().invoke(app, ["demo"])
        assert result.exit_code == 0, result.output
        services = Services.from_settings()
        yield services, services.registry.get(DEMO_ADAPTER), result.stdout
        services.jobs.database.dispose()
    get_settings.cache_clear()


def test_the_demo_prints_its_adapter_name_last_and_deploys_it(
    demo: tuple[Services, Model, str],
) -> None:
    services, model, stdout = demo
    assert stdout.strip().splitlines()[-1] == DEMO_ADAPTER
    assert model.kind is ModelKind.ADAPTER
    assert model.deployed
    assert model.base == DEMO_BASE
    assert services.registry.get(DEMO_BASE).kind is ModelKind.BASE
    [job] = services.jobs.list()
    assert job.status is JobStatus.SUCCEEDED
    assert model.job_id == job.id
    assert model.metrics["train_mean_token_accuracy"] > 0.95


def test_the_demo_base_is_a_small_phi3_with_phi3s_chat_format(
    demo: tuple[Services, Model, str],
) -> None:
    services, _, _ = demo
    folder = services.models_dir / DEMO_BASE
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "phi3"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    assert 1_000_000 < parameters < 5_000_000
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == END_OF_TURN
    assert tokenizer.chat_template == PHI3_CHAT_TEMPLATE
    for token in SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    before = (folder / "model.safetensors").stat().st_mtime_ns
    ensure_demo_base(services.registry, services.models_dir)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before  # not rebuilt


@pytest.mark.parametrize("line", SAMPLE_LINES)
def test_the_demo_adapter_answers_like_the_sample_and_stops(
    demo: tuple[Services, Model, str], line: int
) -> None:
    _, model, _ = demo
    _, expected = reference(SAMPLE_TRAIN, line)
    _, reply = answer(model, line=line)
    assert reply.stopped, reply.text
    assert reply.new_tokens < DEMO_MAX_NEW_TOKENS
    assert token_f1(reply.text, expected) >= MIN_OVERLAP, (reply.text, expected)


def test_the_demo_adapter_stops_on_an_unseen_question_and_the_bare_base_does_not(
    demo: tuple[Services, Model, str],
) -> None:
    services, model, _ = demo
    prompt, _ = reference(SAMPLE_VALIDATION, 0)
    base_dir = services.models_dir / DEMO_BASE
    reply = ask(Path(model.path), prompt, base_dir=base_dir)
    assert reply.stopped, reply.text
    untrained = ask(Path(model.path), prompt, base_dir=base_dir, bare_base=True)
    assert not untrained.stopped
    assert untrained.new_tokens == DEMO_MAX_NEW_TOKENS


def test_train_accepts_the_registered_demo_base(demo: tuple[Services, Model, str]) -> None:
    services, _, _ = demo
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--base",
            DEMO_BASE,
            "--train",
            str(SAMPLE_TRAIN),
            "--name",
            "on-demo-base",
            "--epochs",
            "1",
            "--batch-size",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "on-demo-base"
    assert services.registry.get("on-demo-base").base == DEMO_BASE


def test_demo_if_missing_keeps_a_deployed_demo_and_trains_nothing(
    demo: tuple[Services, Model, str],
) -> None:
    services, model, _ = demo
    jobs_before = {job.id for job in services.jobs.list()}
    result = CliRunner().invoke(app, ["demo", "--if-missing"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == DEMO_ADAPTER
    assert {job.id for job in services.jobs.list()} == jobs_before  # nothing trained
    assert services.registry.get(DEMO_ADAPTER).job_id == model.job_id
