"""Training jobs end to end on a tiny Phi-3 built here: registered adapters, results.csv,
validation split, cancel, a killed run resumed, bad data and bad bases."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer, TrainerCallback
from typer.testing import CliRunner

from finetune.cli import app
from finetune.commands import training as training_commands
from finetune.conversation import Role
from finetune.demo import SAMPLE_TRAIN, SAMPLE_VALIDATION, DemoBaseConfig, build_demo_base
from finetune.demo import sample_texts as demo_corpus
from finetune.errors import BaseModelError, DataError
from finetune.jobs import JobStatus
from finetune.registry import ModelKind
from finetune.settings import get_settings
from finetune.training.config import CONFIG_FILE, PHI3_LORA_TARGETS, TrainConfig
from finetune.training.dataset import (
    PaddingCollator,
    encode_all,
    load_conversations,
    make_collator,
    without_system,
)
from finetune.training.results import METRICS_FILE, RESULTS_COLUMNS, RESULTS_FILE
from finetune.training.tune import Services, job_dir, last_checkpoint, run, submit
from finetune.validation import file_sha256

TINY = DemoBaseConfig(
    vocab_size=600,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=512,
)
STEPS_PER_EPOCH = 6  # 49 training examples, batch 9
KILL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "tiny-phi3"
    return build_demo_base(
        folder, corpus_texts=demo_corpus(SAMPLE_TRAIN, SAMPLE_VALIDATION), config=TINY
    )


@pytest.fixture
def services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    monkeypatch.setenv("SAFEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    built = Services.from_settings()
    yield built
    built.jobs.database.dispose()
    get_settings.cache_clear()


def tiny_config(base: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "name": "tiny-support",
        "base": str(base),
        "train_file": SAMPLE_TRAIN,
        "validation_file": SAMPLE_VALIDATION,
        "epochs": 2,
        "batch_size": 9,
        "learning_rate": 5e-3,
        "lora_r": 4,
        "lora_alpha": 8,
        "max_seq_length": 512,
        "logging_steps": 2,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def read_results(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == RESULTS_COLUMNS
        return list(reader)


def test_a_job_trains_registers_and_reports_an_adapter(tiny_base: Path, services: Services) -> None:
    config = tiny_config(tiny_base)
    job = submit(config, services=services)
    assert job.status is JobStatus.QUEUED
    assert job.data_sha256 == {
        "train": file_sha256(SAMPLE_TRAIN),
        "validation": file_sha256(SAMPLE_VALIDATION),
    }

    finished = run(job.id, services=services)

    assert finished.status is JobStatus.SUCCEEDED, finished.error
    model = services.registry.get("tiny-support")
    assert model.kind is ModelKind.ADAPTER
    assert model.base == str(tiny_base.resolve())
    assert model.job_id == job.id
    assert model.data_sha256 == job.data_sha256
    assert model.hyperparameters["lora_r"] == 4
    assert model.hyperparameters["effective_batch_size"] == 9
    assert model.metrics["steps"] == 2 * STEPS_PER_EPOCH
    assert model.metrics["train_examples"] == 49
    assert model.metrics["valid_examples"] == 12
    assert model.metrics["train_dropped"] == model.metrics["train_truncated"] == 0
    first = read_results(job_dir(job.id, services=services) / RESULTS_FILE)
    assert model.metrics["full_valid_loss"] < float(first[0]["full_valid_loss"] or math.inf)

    folder = Path(model.path)
    assert folder == services.models_dir / "tiny-support"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(PHI3_LORA_TARGETS)
    assert adapter["base_model_name_or_path"] == str(tiny_base.resolve())
    assert (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "training_args.bin").exists()
    saved_text = (folder / CONFIG_FILE).read_text()
    saved = json.loads(saved_text)
    assert list(saved) == sorted(saved)
    assert TrainConfig.from_json(saved) == config
    record = json.loads((folder / METRICS_FILE).read_text())
    assert record["schema_version"] == 1
    assert (record["status"], record["error"], record["job"]) == ("succeeded", None, job.id)
    assert record["metrics"] == model.metrics
    assert [p.name for p in services.models_dir.iterdir()] == ["tiny-support"]  # no leftovers

    rows = read_results(folder / RESULTS_FILE)
    assert [int(row["step"]) for row in rows] == [2, 4, 6, 8, 10, 12]
    for row in rows:
        loss = float(row["train_loss"])
        assert math.isfinite(loss)
        assert float(row["train_perplexity"]) == pytest.approx(math.exp(loss), rel=1e-4)
        assert 0.0 <= float(row["train_mean_token_accuracy"]) <= 1.0
    epoch_ends = [row for row in rows if row["full_valid_loss"]]
    assert [int(row["step"]) for row in epoch_ends] == [6, 12]
    assert [float(row["epoch"]) for row in epoch_ends] == [1.0, 2.0]
    for row in epoch_ends:
        assert 0.0 <= float(row["full_valid_mean_token_accuracy"]) <= 1.0
        assert row["valid_loss"] == ""  # the full validation replaces the one-batch one
    assert all(row["valid_loss"] for row in rows if not row["full_valid_loss"])

    checkpoints = sorted(
        (job_dir(job.id, services=services) / "checkpoints").iterdir(),
        key=lambda path: int(path.name.split("-")[-1]),
    )
    assert [c.name for c in checkpoints] == ["checkpoint-6", "checkpoint-12"]
    assert (checkpoints[-1] / "adapter_model.safetensors").is_file()
    assert json.loads((checkpoints[-1] / CONFIG_FILE).read_text()) == saved
    assert not (checkpoints[-1] / "model.safetensors").exists()  # adapter only

    stored = services.jobs.get(job.id)
    assert stored.metrics["step"] == 12
    assert stored.metrics["max_steps"] == 12


def test_every_epoch_leaves_a_checkpoint(tiny_base: Path, services: Services) -> None:
    job = run(submit(tiny_config(tiny_base, epochs=3), services=services).id, services=services)
    assert job.status is JobStatus.SUCCEEDED, job.error
    checkpoints = (job_dir(job.id, services=services) / "checkpoints").iterdir()
    steps = sorted(int(path.name.split("-")[-1]) for path in checkpoints)
    assert steps == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]


def test_the_demo_recipes_options_are_flags_of_train(tiny_base: Path, services: Services) -> None:
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--base",
            str(tiny_base),
            "--train",
            str(SAMPLE_TRAIN),
            "--validation",
            str(SAMPLE_VALIDATION),
            "--name",
            "recipe",
            "--epochs",
            "2",
            "--batch-size",
            "14",
            "--learning-rate",
            "5e-3",
            "--lora-r",
            "4",
            "--modules-to-save",
            "lm_head",
            "--also-without-system",
            "--save-total-limit",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    model = services.registry.get("recipe")
    config = TrainConfig.from_json(model.hyperparameters)
    assert (config.modules_to_save, config.also_without_system) == (("lm_head",), True)
    assert (config.save_total_limit, config.learning_rate, config.lora_r) == (1, 5e-3, 4)
    assert model.metrics["train_examples"] == 2 * 49  # each with and without its system prompt
    assert model.metrics["steps"] == 2 * 7
    [checkpoint] = (job_dir(model.job_id or "", services=services) / "checkpoints").iterdir()
    assert checkpoint.name == "checkpoint-14"  # only the newest is kept
    with safe_open(str(Path(model.path) / "adapter_model.safetensors"), framework="pt") as saved:
        assert any("lm_head" in name for name in saved.keys())  # noqa: SIM118


def test_also_without_system_adds_a_bare_copy_of_each_conversation_with_a_system_prompt(
    tiny_base: Path,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    conversations = load_conversations(SAMPLE_TRAIN)[:3]
    bare = without_system(conversations[0])
    assert bare is not None
    assert [m.role for m in bare.messages] == [Role.USER, Role.ASSISTANT]
    assert without_system(bare) is None
    both = encode_all(tokenizer, [*conversations, bare], max_length=512, also_without_system=True)
    assert (both.conversations, len(both.examples)) == (4, 7)
    assert both.examples[1] == both.examples[6]  # the bare copy is the bare conversation
    assert len(both.examples[1]) < len(both.examples[0])
    plain = encode_all(tokenizer, conversations, max_length=512)
    assert len(plain.examples) == 3


def test_without_a_validation_file_a_seeded_split_is_held_out(
    tiny_base: Path, services: Services
) -> None:
    config = tiny_config(
        tiny_base,
        name="split",
        validation_file=None,
        validation_fraction=0.25,
        epochs=1,
        packing=True,
        gradient_checkpointing=True,
    )
    job = run(submit(config, services=services).id, services=services)
    assert job.status is JobStatus.SUCCEEDED, job.error
    metrics = services.registry.get("split").metrics
    assert (metrics["train_examples"], metrics["valid_examples"]) == (37, 12)
    assert math.isfinite(metrics["full_valid_loss"])


def test_packing_puts_a_micro_batch_in_one_row_without_padding(tiny_base: Path) -> None:
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
        {"input_ids": [8, 9], "labels": [-100, 9], "attention_mask": [1, 1]},
    ]
    packed = make_collator(object(), packing=True, attn_implementation="sdpa")(features)  # type: ignore[arg-type]
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in packed
    padded = PaddingCollator(0)(features)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


class CancelAt(TrainerCallback):
    def __init__(self, services: Services, job_id: str, *, step: int) -> None:
        self.services, self.job_id, self.step = services, job_id, step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            self.services.jobs.request_cancel(self.job_id)


def test_a_cancelled_job_stops_and_registers_nothing(
    tiny_base: Path, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("finetune.training.callbacks.CANCEL_POLL_S", 0.0)
    job = submit(tiny_config(tiny_base, name="cancelled", epochs=3), services=services)
    finished = run(job.id, services=services, callbacks=[CancelAt(services, job.id, step=2)])
    assert finished.status is JobStatus.CANCELLED
    assert finished.metrics["step"] <= 4
    assert services.registry.find("cancelled") is None
    assert not (services.models_dir / "cancelled").exists()
    assert not any(services.models_dir.glob(".cancelled*"))
    assert last_checkpoint(job.id, services=services) is None


def test_a_killed_run_is_marked_failed_and_resumes_from_its_checkpoint(
    tiny_base: Path, services: Services
) -> None:
    runner = CliRunner()
    started = runner.invoke(
        app,
        [
            "train",
            "--base",
            str(tiny_base),
            "--train",
            str(SAMPLE_TRAIN),
            "--validation",
            str(SAMPLE_VALIDATION),
            "--name",
            "resumed",
            "--epochs",
            "3",
            "--batch-size",
            "1",
            "--logging-steps",
            "8",
            "--lora-r",
            "4",
            "--max-seq-length",
            "512",
            "--detach",
        ],
    )
    assert started.exit_code == 0, started.output
    job_id = started.stdout.strip().splitlines()[-1]
    job = services.jobs.get(job_id)
    assert job.status is JobStatus.RUNNING
    assert job.pid is not None
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while last_checkpoint(job_id, services=services) is None:
        assert time.monotonic() < deadline, (
            job_dir(job_id, services=services) / "train.log"
        ).read_text()
        assert services.jobs.get(job_id).status is JobStatus.RUNNING
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    [child] = [p for p in training_commands._DETACHED if p.pid == job.pid]
    child.wait()  # our child: reap it, as init would once the CLI has exited
    checkpoint = last_checkpoint(job_id, services=services)
    assert checkpoint is not None
    killed_at = int(checkpoint.name.split("-")[-1])
    assert killed_at < 3 * 49

    listed = runner.invoke(app, ["jobs", "--json"])
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert row["status"] == "failed"
    assert f"--resume {job_id}" in row["error"]
    assert services.registry.find("resumed") is None
    assert not (services.models_dir / "resumed").exists()

    resumed = runner.invoke(app, ["train", "--resume", job_id])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.strip().splitlines()[-1] == "resumed"
    model = services.registry.get("resumed")
    assert model.metrics["resumed_from_step"] == killed_at
    assert model.metrics["steps"] == 3 * 49
    steps = [int(row["step"]) for row in read_results(Path(model.path) / RESULTS_FILE)]
    assert steps == sorted(set(steps))  # no step twice after the resume
    assert steps[-1] == 3 * 49
    assert services.jobs.get(job_id).status is JobStatus.SUCCEEDED


def test_malformed_data_is_reported_by_line_and_no_job_is_created(
    tiny_base: Path, services: Services, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    good = SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([good[0], "{not json", *good[1:]]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        submit(tiny_config(tiny_base, train_file=bad), services=services)
    assert services.jobs.list() == []

    result = CliRunner().invoke(
        app, ["train", "--base", str(tiny_base), "--train", str(bad), "--name", "bad"]
    )
    assert result.exit_code == 1
    assert "line 2: not valid JSON" in result.output
    assert "Traceback" not in result.output


def test_a_base_that_cannot_be_loaded_offline_is_named_with_the_way_out(
    services: Services, tmp_path: Path
) -> None:
    missing = "safegate-tests/no-such-phi3"
    with pytest.raises(BaseModelError) as caught:
        submit(tiny_config(Path(missing)), services=services)
    message = str(caught.value)
    assert f"cannot load base model '{missing}' offline" in message
    assert "--base /path/to/model" in message
    assert "HF_HUB_OFFLINE=0" in message

    with pytest.raises(BaseModelError, match="'safegate finetune demo' builds it"):
        submit(tiny_config(Path("demo-base")), services=services)

    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(BaseModelError, match="has no config.json"):
        submit(tiny_config(empty), services=services)

    result = CliRunner().invoke(
        app, ["train", "--train", str(SAMPLE_TRAIN), "--name", "x", "--base", missing]
    )
    assert result.exit_code == 1
    assert f"cannot load base model '{missing}' offline" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be at least 1"),
        ("learning_rate", -1.0, "learning_rate"),
        ("learning_rate", math.nan, "learning_rate"),
        ("lora_dropout", 1.0, "lora_dropout"),
        ("validation_fraction", 1.0, "validation_fraction"),
        ("name", "no spaces", "name"),
        ("quantization", "8bit", "quantization"),
        ("target_modules", (), "target_modules"),
        ("save_total_limit", 0, "save_total_limit"),
    ],
)
def test_bad_settings_are_refused(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(Path("base"), **{field: value})


def test_cancel_and_jobs_from_the_command_line(tiny_base: Path, services: Services) -> None:
    runner = CliRunner()
    unknown = runner.invoke(app, ["cancel", "ftjob-nope"])
    assert unknown.exit_code == 1
    assert "no job 'ftjob-nope'" in unknown.output
    job = submit(tiny_config(tiny_base, name="queued"), services=services)
    cancelled = runner.invoke(app, ["cancel", job.id])
    assert cancelled.exit_code == 0, cancelled.output
    assert services.jobs.get(job.id).status is JobStatus.CANCELLED
    table = runner.invoke(app, ["jobs"])
    assert table.exit_code == 0
    assert job.id in table.stdout
    assert "cancelled" in table.stdout
    again = runner.invoke(app, ["train", "--resume", job.id])
    assert again.exit_code == 1
    assert "only a failed job can be resumed" in again.output


def test_data_changed_after_submit_fails_the_job_instead_of_training_on_it(
    tiny_base: Path, services: Services, tmp_path: Path
) -> None:
    copy = tmp_path / "train.jsonl"
    copy.write_bytes(SAMPLE_TRAIN.read_bytes())
    job = submit(tiny_config(tiny_base, train_file=copy), services=services)
    copy.write_bytes(SAMPLE_TRAIN.read_bytes() + b"\n")
    with pytest.raises(DataError, match="changed since job"):
        run(job.id, services=services)
    failed = services.jobs.get(job.id)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert "changed since job" in failed.error
