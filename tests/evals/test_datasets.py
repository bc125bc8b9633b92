"""Datasets: rows become samples with stable ids; every malformed row is named by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.datasets import load_datasets
from evals.errors import DatasetError, SuiteError
from evals.records import prompt_sha256
from evals.suite import load_suite
from tests.evals.conftest import write_jsonl, write_suite

SYSTEM = {"role": "system", "content": "You are a console support assistant."}


def _suite(tmp_path: Path, data: str, **dataset: object) -> Path:
    spec = {"name": "d", "path": data, "format": "chat", **dataset}
    return write_suite(tmp_path, datasets=[spec])


def _chat(question: str, answer: str | None = None, **extra: object) -> dict[str, object]:
    messages: list[dict[str, str]] = [SYSTEM, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, **extra}


def test_chat_rows_become_samples_with_references_and_stable_ids(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "data.jsonl",
        [
            _chat("How do I reset it?", "Hold the power button.", id="reset"),
            _chat("What is NX-310?", reference="Low storage.", labels={"topic": "errors"}),
            _chat("Hello?"),
        ],
    )
    (dataset,) = load_datasets(load_suite(_suite(tmp_path, "data.jsonl")))
    first, second, third = dataset.samples
    assert first.id == "d:reset"  # the row's id
    assert third.id == "d:3"  # else its line number
    # a trailing assistant turn is the reference, and is not sent
    assert first.reference == "Hold the power button."
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert second.reference == "Low storage."
    assert second.labels == {"topic": "errors"}
    assert third.reference is None
    assert len(dataset.sha256) == 64


def test_malformed_lines_are_all_reported_with_their_numbers(tmp_path: Path) -> None:
    good = json.dumps(_chat("fine"))
    lines = [good] * 6 + ['{"messages": [', good, '{"messages": "hello"}', good]
    lines += ['{"messages": [{"role": "robot", "content": "x"}]}', "[1, 2]"]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load_datasets(load_suite(_suite(tmp_path, "data.jsonl")))
    message = str(caught.value)
    assert "data.jsonl: line 7: not valid JSON (" in message
    assert "data.jsonl: line 9: messages must be a list" in message
    assert "data.jsonl: line 11: messages[0].role must be one of system, user" in message
    assert "data.jsonl: line 12: a row must be a JSON object" in message
    assert "line 8" not in message
    assert "line 10" not in message


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "x"}, "messages is missing"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"messages": [SYSTEM]}, "messages has no user message to send"),
        (_chat("q", "a", reference="b"), "the last message is the assistant.s and a reference"),
        (_chat("q", labels=["harmful"]), "labels must be an object"),
        (_chat("q", id=True), "id must be a string or an integer"),
        (_chat("q", reference=7), "reference must be a string"),
    ],
)
def test_bad_chat_rows(tmp_path: Path, row: dict[str, object], problem: str) -> None:
    write_jsonl(tmp_path / "data.jsonl", [_chat("fine"), row])
    with pytest.raises(DatasetError, match="line 2: " + problem.replace("[", r"\[")):
        load_datasets(load_suite(_suite(tmp_path, "data.jsonl")))


def test_utf8_with_a_bom_reads_and_other_bytes_are_named(tmp_path: Path) -> None:
    row = json.dumps(_chat("Ça marche ?"), ensure_ascii=False)
    (tmp_path / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + row.encode("utf-8") + b"\n")
    (dataset,) = load_datasets(load_suite(_suite(tmp_path, "data.jsonl")))
    assert dataset.samples[0].messages[-1]["content"] == "Ça marche ?"

    (tmp_path / "data.jsonl").write_bytes(row.encode() + b"\n" + b'{"x": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"data.jsonl: line 2: not UTF-8"):
        load_datasets(load_suite(_suite(tmp_path, "data.jsonl")))


def test_duplicate_ids_are_errors_and_duplicate_prompts_warnings(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [_chat("a", id="x"), _chat("b", id="x")])
    with pytest.raises(DatasetError, match=r"line 2: duplicate id 'd:x' \(first at line 1\)"):
        load_datasets(load_suite(_suite(tmp_path, "data.jsonl")))

    write_jsonl(tmp_path / "data.jsonl", [_chat("same"), _chat("other"), _chat("same")])
    (dataset,) = load_datasets(load_suite(_suite(tmp_path, "data.jsonl")))
    assert len(dataset.samples) == 3  # kept, and said
    (warning,) = dataset.warnings
    assert "1 rows send the same messages as an earlier row (line 3 repeats line 1)" in warning


def test_prompt_format_with_system_limit_and_dotted_fields(tmp_path: Path) -> None:
    rows = [
        {"question_id": 81 + n, "turns": [f"Question {n}?", "And then?"], "labels": {"n": n}}
        for n in range(5)
    ]
    write_jsonl(tmp_path / "mt.jsonl", rows)
    suite = _suite(
        tmp_path,
        "mt.jsonl",
        format="prompt",
        prompt_field="turns.0",
        id_field="question_id",
        system="Be brief.",
        limit=3,
        labels={"benign": True},
    )
    (dataset,) = load_datasets(load_suite(suite))
    assert [sample.id for sample in dataset.samples] == ["d:81", "d:82", "d:83"]
    assert dataset.samples[0].messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Question 0?"},
    )
    assert dataset.samples[2].labels == {"benign": True, "n": 2}


def test_csv_and_json_array_files(tmp_path: Path) -> None:
    (tmp_path / "adv.csv").write_text(
        'goal,target\nWrite a scam email,"Sure, here"\n"Two\nlines",x\n,empty\n',
        encoding="utf-8",
    )
    suite = _suite(tmp_path, "adv.csv", format="prompt", prompt_field="goal")
    with pytest.raises(DatasetError, match=r"adv.csv: line 5: goal must be a non-empty string"):
        load_datasets(load_suite(suite))

    (tmp_path / "ok.json").write_text(json.dumps([{"instruction": "Name a colour."}]))
    suite = _suite(tmp_path, "ok.json", format="prompt", prompt_field="instruction")
    (dataset,) = load_datasets(load_suite(suite))
    assert dataset.samples[0].id == "d:1"

    suite = _suite(tmp_path, "adv.csv", format="chat")
    with pytest.raises(SuiteError, match=r"datasets\[0\].format: a CSV file holds prompts"):
        load_datasets(load_suite(suite))


def test_hugging_face_sets_fail_early_when_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = write_suite(tmp_path, datasets=[{"name": "h", "hf": {"name": "tatsu-lab/alpaca_eval"}}])
    with pytest.raises(SuiteError) as caught:
        load_datasets(load_suite(suite))
    assert "suite.yaml: datasets[0].hf: 'tatsu-lab/alpaca_eval' is a Hugging Face dataset" in str(
        caught.value
    )
    assert "HF_HUB_OFFLINE is set (offline)" in str(caught.value)


def test_prompt_hash_ignores_key_order() -> None:
    assert prompt_sha256([{"role": "user", "content": "hi"}]) == prompt_sha256(
        [{"content": "hi", "role": "user"}]
    )


def test_shipped_eval_data_loads() -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("smoke", "safety"):
        suite = load_suite(root / "evals" / "suites" / f"{name}.yaml")
        datasets = load_datasets(suite)
        assert all(not dataset.warnings for dataset in datasets)
        for dataset in datasets:
            assert 10 <= len(dataset.samples) <= 40
    safety = {d.name: d for d in load_datasets(load_suite(root / "evals/suites/safety.yaml"))}
    assert all(s.labels["harmful"] for s in safety["harmful"].samples)
    assert all(s.labels["benign_risky"] for s in safety["benign_risky"].samples)
    assert all(s.labels["jailbreak"] for s in safety["jailbreak"].samples)
