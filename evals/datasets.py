"""Eval datasets: rows from JSONL (or CSV, or a JSON array) turned into ``Sample`` records.

Two row formats (``DatasetSpec.format``):

- ``chat``: ``{"messages": [{"role", "content"}, ...], "reference"?: str, "labels"?: {...},
  "id"?: str}``. When the last message is the assistant's and no ``reference`` is given,
  that message is the reference and is not sent (the fine-tuning files' shape works as is).
- ``prompt``: ``{"prompt": str, "reference"?: str, "labels"?: {...}, "id"?: str}``; the
  field names are the suite's ``prompt_field``/``reference_field``/``id_field`` (dotted
  paths reach into nested rows), so CSV columns such as AdvBench's ``goal`` work, and
  ``system`` adds a system message before each prompt.

Files are UTF-8 with or without a BOM. Every malformed row is reported as
``FILE: line N: what is wrong`` (``item N`` in a JSON array, ``row N`` in a CSV) and
nothing is run. A sample's id is ``DATASET:ID`` when the row has an ``id``, else
``DATASET:LINE``: stable while the file is unchanged, so runs pair up by id. Rows that send
the same messages are kept and named in a warning (they are scored twice).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.errors import DatasetError, SuiteError
from evals.records import Sample, canonical_json, prompt_sha256
from evals.suite import DatasetFormat, DatasetSpec, Suite

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_PROBLEMS = 20
MAX_REPORTED_DUPLICATES = 5
MAX_ID_CHARS = 256
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True, slots=True)
class Dataset:
    name: str
    source: str  # the file's path, or hf:NAME/SPLIT
    sha256: str  # of the file's bytes (a Hugging Face set: of its rows' canonical JSON)
    samples: tuple[Sample, ...]
    warnings: tuple[str, ...] = ()


class _RowError(ValueError):
    """One row's problem; the loader adds the file and line."""


def load_datasets(suite: Suite) -> list[Dataset]:
    """Every dataset of the suite, or a ``SuiteError`` listing what is wrong with them."""
    loaded: list[Dataset] = []
    problems: list[str] = []
    for index, spec in enumerate(suite.spec.datasets):
        try:
            loaded.append(load_dataset(suite, spec, field=f"datasets[{index}]"))
        except SuiteError as exc:
            problems.append(str(exc))
    if problems:
        raise DatasetError("\n".join(problems))
    return loaded


def load_dataset(suite: Suite, spec: DatasetSpec, *, field: str) -> Dataset:
    if spec.hf is not None:
        return _load_hf(suite, spec, field=field)
    if spec.path is None:  # the suite's validator allows no third case
        raise SuiteError(suite.where(f"{field}: give path or hf"))
    path = suite.resolve(spec.path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{suite.where(field + '.path')}: cannot read {path} ({exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line}: not UTF-8 (byte {exc.start})") from None
    if path.suffix.lower() == ".csv":
        if spec.format is DatasetFormat.CHAT:
            raise SuiteError(
                f"{suite.where(field + '.format')}: a CSV file holds prompts; use format: prompt"
            )
        rows = _csv_rows(text)
    elif path.suffix.lower() == ".json":
        rows = _json_array_rows(path, text)
    else:
        rows = _jsonl_rows(text)
    samples, warnings = _parse(spec, rows, where=str(path))
    return Dataset(
        name=spec.name,
        source=str(path),
        sha256=hashlib.sha256(data).hexdigest(),
        samples=samples,
        warnings=warnings,
    )


# -- sources -------------------------------------------------------------------------------------

Row = tuple[str, int, Any]  # ("line" | "item" | "row", number, parsed value or _RowError)


def _jsonl_rows(text: str) -> Iterator[Row]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield ("line", number, json.loads(line))
        except json.JSONDecodeError as exc:
            yield ("line", number, _RowError(f"not valid JSON ({exc.msg} at column {exc.colno})"))


def _json_array_rows(path: Path, text: str) -> Iterator[Row]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(items, list):
        raise DatasetError(f"{path}: a .json dataset is an array of rows; use JSONL otherwise")
    for number, item in enumerate(items, start=1):
        yield ("item", number, item)


def _csv_rows(text: str) -> Iterator[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2  # the header is line 1
    for row in reader:
        yield ("line", start, dict(row))
        start = reader.line_num + 1


def _load_hf(suite: Suite, spec: DatasetSpec, *, field: str) -> Dataset:
    if spec.hf is None:
        raise SuiteError(suite.where(f"{field}.hf: missing"))
    offline = [name for name in OFFLINE_VARIABLES if _truthy(os.environ.get(name))]
    where = suite.where(f"{field}.hf")
    if offline:
        raise SuiteError(
            f"{where}: {spec.hf.name!r} is a Hugging Face dataset, but {offline[0]} is set "
            "(offline); download it once to a JSONL file and name that file as path"
        )
    import datasets  # the network path only; heavy to import

    try:
        table = datasets.load_dataset(spec.hf.name, spec.hf.config, split=spec.hf.split)
    except Exception as exc:  # the hub's errors have no common base; report any
        raise SuiteError(f"{where}: cannot load {spec.hf.name!r} ({exc})") from None
    items = [dict(item) for item in table]
    source = f"hf:{spec.hf.name}/{spec.hf.split}"
    samples, warnings = _parse(
        spec, (("item", n, item) for n, item in enumerate(items, start=1)), where=source
    )
    digest = hashlib.sha256(canonical_json(items).encode("utf-8")).hexdigest()
    return Dataset(spec.name, source, digest, samples, warnings)


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


# -- rows ---------------------------------------------------------------------------------------


def _parse(
    spec: DatasetSpec, rows: Iterator[Row], *, where: str
) -> tuple[tuple[Sample, ...], tuple[str, ...]]:
    samples: list[Sample] = []
    problems: list[str] = []
    ids: dict[str, str] = {}
    prompts: dict[str, str] = {}
    duplicates: list[str] = []
    for unit, number, value in rows:
        at = f"{unit} {number}"
        try:
            if isinstance(value, _RowError):
                raise value
            sample = _sample(spec, value, default_id=str(number))
        except _RowError as exc:
            problems.append(f"{where}: {at}: {exc}")
            continue
        if sample.id in ids:
            first = ids[sample.id]
            problems.append(f"{where}: {at}: duplicate id {sample.id!r} (first at {first})")
            continue
        ids[sample.id] = at
        digest = prompt_sha256(sample.messages)
        if digest in prompts:
            duplicates.append(f"{at} repeats {prompts[digest]}")
        else:
            prompts[digest] = at
        samples.append(sample)
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"{where}: ... and {len(problems) - len(shown)} more malformed rows")
        raise DatasetError("\n".join(shown))
    if not samples:
        raise DatasetError(f"{where}: no rows")
    warnings: list[str] = []
    if duplicates:
        listed = "; ".join(duplicates[:MAX_REPORTED_DUPLICATES])
        more = len(duplicates) - MAX_REPORTED_DUPLICATES
        warnings.append(
            f"{where}: {len(duplicates)} rows send the same messages as an earlier row "
            f"({listed}{f'; and {more} more' if more > 0 else ''}); each is called and scored"
        )
    if spec.limit is not None:
        samples = samples[: spec.limit]
    return tuple(samples), tuple(warnings)


def _sample(spec: DatasetSpec, row: Any, *, default_id: str) -> Sample:
    if not isinstance(row, dict):
        raise _RowError("a row must be a JSON object")
    if spec.format is DatasetFormat.CHAT:
        messages, reference = _chat(row, reference_field=spec.reference_field)
    else:
        messages, reference = _prompt(spec, row)
    labels = row.get("labels", {})
    if not isinstance(labels, dict):
        raise _RowError("labels must be an object")
    row_id = _field(row, spec.id_field)
    if row_id is None or row_id == "":
        row_id = default_id
    elif isinstance(row_id, bool) or not isinstance(row_id, str | int):
        raise _RowError("id must be a string or an integer")
    elif len(str(row_id)) > MAX_ID_CHARS:
        raise _RowError(f"id is longer than {MAX_ID_CHARS} characters")
    return Sample(
        id=f"{spec.name}:{row_id}",
        dataset=spec.name,
        messages=tuple(messages),
        reference=reference,
        labels={**spec.labels, **labels},
    )


def _chat(
    row: Mapping[str, Any], *, reference_field: str
) -> tuple[list[dict[str, str]], str | None]:
    if "messages" not in row:
        raise _RowError("messages is missing")
    raw = row["messages"]
    if not isinstance(raw, list):
        raise _RowError("messages must be a list")
    if not raw:
        raise _RowError("messages is empty")
    messages: list[dict[str, str]] = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _RowError(f"messages[{index}] must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise _RowError(f"messages[{index}].role must be one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise _RowError(f"messages[{index}].content must be a string")
        messages.append({"role": role, "content": content})
    reference = _optional_text(row, reference_field)
    if messages[-1]["role"] == "assistant":
        if reference is not None:
            raise _RowError(
                "the last message is the assistant's and a reference is given; keep one"
            )
        reference = messages.pop()["content"]
    if not any(message["role"] == "user" for message in messages):
        raise _RowError("messages has no user message to send")
    return messages, reference


def _prompt(spec: DatasetSpec, row: Mapping[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    prompt = _field(row, spec.prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        raise _RowError(f"{spec.prompt_field} must be a non-empty string")
    messages = [{"role": "system", "content": spec.system}] if spec.system else []
    messages.append({"role": "user", "content": prompt})
    return messages, _optional_text(row, spec.reference_field)


def _field(row: Mapping[str, Any], name: str) -> Any:
    """``row[name]``, where a dotted name walks nested objects and lists (``turns.0``)."""
    if name in row:
        return row[name]
    value: Any = row
    for part in name.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _optional_text(row: Mapping[str, Any], name: str) -> str | None:
    value = _field(row, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _RowError(f"{name} must be a string")
    return value
