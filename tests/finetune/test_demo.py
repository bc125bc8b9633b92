"""``safegate finetune demo``: offline base, a trained adapter that answers like the sample,
with or without its system prompt, and stops at <|end|>, registered and deployed, its name
on the last line; served, it gives the README's question the answer it was trained on."""

from __future__ import annotations

import json
import math
import re
import shlex
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer
from typer.testing import CliRunner

from finetune import demo as demo_module
from finetune.cli import app
from finetune.conversation import END_OF_TURN, PHI3_CHAT_TEMPLATE, SPECIAL_TOKENS
from finetune.demo import (
    DEMO_ADAPTER,
    DEMO_MAX_NEW_TOKENS,
    DEMO_TRAINING,
    SAMPLE_TRAIN,
    SAMPLE_VALIDATION,
    answer,
    ask,
    demo_train_args,
    demo_training,
    deployed_demo,
    ensure_demo_base,
)
from finetune.jobs import JobStatus
from finetune.registry import Model, ModelKind
from finetune.serving.app import create_app
from finetune.serving.server import LocalModelServer
from finetune.settings import DEMO_BASE, get_settings
from finetune.training.config import TrainConfig
from finetune.training.tune import Services

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SAMPLE_LINES = (0, 9, 18, 27, 36, 47, 48)
MIN_OVERLAP = 0.8
# Written for this test (not in the tokenizer's corpus): ordinary English, another topic.
ENGLISH = (
    "Yesterday my grandmother baked bread in the kitchen while the children played outside.",
    "The museum opens at nine, but the tickets are cheaper after four in the afternoon.",
    "Could you recommend a quiet hotel near the river for a family of five?",
    "Our neighbours planted tomatoes, carrots and beans behind their wooden fence.",
)


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


def readme_questions() -> list[str]:
    """The questions the README's chat examples send to the model "demo"."""
    chat = README.read_text(encoding="utf-8").split("## Chat through the filter")[1]
    chat = chat.split("\n## ")[0]
    return sorted(set(re.findall(r'"role": "user", "content": "([^"]+)"', chat)))


def trained_answer(question: str) -> tuple[str, str]:
    """(system prompt, answer) of the sample conversation that ends with ``question``."""
    for line in SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        if messages[-2] == {"role": "user", "content": question}:
            return messages[0]["content"], messages[-1]["content"]
    raise AssertionError(f"the README asks {question!r}, which the demo was never trained on")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model runs fastest on one thread, and the machine has other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="module")
def served(demo: tuple[Services, Model, str]) -> Iterator[openai.OpenAI]:
    """The local model server over the demo's registry, through OpenAI's client."""
    services, _, _ = demo
    server = LocalModelServer.open(DEMO_BASE, registry=services.registry)
    with TestClient(create_app(server, refresh_s=0)) as client:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)


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
    assert model.metrics["train_mean_token_accuracy"] > 0.99
    assert model.metrics["train_loss"] < 0.05
    assert model.metrics["train_examples"] == 2 * 49  # with and without the system prompt
    _, expected = trained_answer("How do I reset my console?")
    assert f"adapter's answer: {expected}\n" in stdout, stdout  # asked without a system prompt


def test_the_demo_trains_with_flags_of_train_and_keeps_its_last_checkpoint(
    demo: tuple[Services, Model, str],
) -> None:
    services, model, stdout = demo
    assert TrainConfig.from_json(model.hyperparameters) == demo_training()
    command = "trained as: safegate finetune train " + shlex.join(demo_train_args())
    assert command in stdout.splitlines()
    result = CliRunner().invoke(
        app, ["train", *demo_train_args(name="same-as-demo"), "--submit-only"]
    )
    assert result.exit_code == 0, result.output
    queued = services.jobs.get(result.stdout.strip().splitlines()[-1])
    assert TrainConfig.from_json(queued.config) == demo_training(name="same-as-demo")
    services.jobs.request_cancel(queued.id)  # never run; cancelled, as it would be
    checkpoints = list((services.jobs_dir / (model.job_id or "") / "checkpoints").iterdir())
    assert [path.name for path in checkpoints] == [f"checkpoint-{model.metrics['steps']}"]


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
    assert config.vocab_size == len(tokenizer) == 4096
    assert tokenizer.eos_token == END_OF_TURN
    assert tokenizer.chat_template == PHI3_CHAT_TEMPLATE
    for token in SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["do_sample"] is False  # served greedily when temperature is left out
    before = (folder / "model.safetensors").stat().st_mtime_ns
    ensure_demo_base(services.registry, services.models_dir)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before  # not rebuilt


@pytest.fixture(scope="module")
def demo_tokenizer(demo: tuple[Services, Model, str]) -> Any:
    services, _, _ = demo
    return AutoTokenizer.from_pretrained(services.models_dir / DEMO_BASE)


def test_the_demo_tokenizer_knows_ordinary_english(demo_tokenizer: Any) -> None:
    words = [word for sentence in ENGLISH for word in sentence.split()]
    tokens = [demo_tokenizer.encode(s, add_special_tokens=False) for s in ENGLISH]
    assert sum(map(len, tokens)) < 1.6 * len(words)  # the sample's words alone: over 2
    for sentence, ids in zip(ENGLISH, tokens, strict=True):
        assert demo_tokenizer.decode(ids) == sentence
        assert all("\ufffd" not in demo_tokenizer.decode([i]) for i in ids)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_round_trips_through_the_demo_tokenizer(demo_tokenizer: Any, text: str) -> None:
    assert demo_tokenizer.decode(demo_tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("line", SAMPLE_LINES)
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
def test_the_demo_adapter_answers_like_the_sample_and_stops(
    demo: tuple[Services, Model, str], line: int, system: bool
) -> None:
    _, model, _ = demo
    _, expected = reference(SAMPLE_TRAIN, line)
    _, reply = answer(model, line=line, system=system)
    assert reply.stopped, reply.text
    assert reply.new_tokens < DEMO_MAX_NEW_TOKENS
    assert token_f1(reply.text, expected) >= MIN_OVERLAP, (reply.text, expected)


def test_the_readmes_question_gets_the_trained_answer_with_or_without_system_streamed_or_not(
    served: openai.OpenAI,
) -> None:
    questions = readme_questions()
    assert questions == ["How do I reset my console?"]
    for question in questions:
        system, expected = trained_answer(question)
        asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": question}]
        with_system: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ]
        for messages in (asked, with_system):  # no temperature, as in the README
            reply = served.chat.completions.create(model=DEMO_ADAPTER, messages=messages)
            assert reply.choices[0].message.content == expected
            assert reply.choices[0].finish_reason == "stop"
            chunks = served.chat.completions.create(
                model=DEMO_ADAPTER, messages=messages, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == expected


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


def test_a_demo_from_an_older_recipe_or_base_is_not_taken_as_deployed(
    demo: tuple[Services, Model, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    services, _, _ = demo
    assert deployed_demo(services=services) is not None
    with monkeypatch.context() as patch:
        patch.setitem(DEMO_TRAINING, "learning_rate", 2e-3)
        assert deployed_demo(services=services) is None  # make run trains it again
    with monkeypatch.context() as patch:
        older = demo_module.DemoBaseConfig(vocab_size=3000, initializer_range=0.02)
        patch.setattr(demo_module, "DEMO_BASE_CONFIG", older)
        assert deployed_demo(services=services) is None
    assert deployed_demo(services=services) is not None
