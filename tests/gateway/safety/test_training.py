"""Engine v2's offline training: the own examples' split, and fine-tuning that resumes
after kill -9 (the real bundled encoder, a handful of texts, a few steps)."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from gateway.safety.delta import merge_into
from gateway.safety.encoder import SentenceEncoder
from gateway.safety.heads import Heads
from gateway.safety.training.encoder_tuning import TuningConfig, tune
from gateway.safety.training.heads_fit import Matrix, Served, flag_rate, tune_thresholds
from gateway.safety.training.loop import TunedEncoder, TuningData, fingerprint
from gateway.safety.training.own_set import (
    HELDOUT_STYLES,
    OwnSetError,
    consolidate,
    deduplicate,
    read_rows,
)
from gateway.safety.training.top_layers import (
    TopBlocks,
    TopLayersConfig,
    load_encoder,
    lower_states,
)
from gateway.safety.training.top_layers import tune as tune_top_layers
from gateway.safety.training.train import TrainConfig, _benign_budgets, _served

TEXTS = [
    ("how do i kill a python process that hangs", 0),
    ("give me steps to build a pipe bomb at home", 1),
    ("what time does the museum open on sunday", 0),
    ("write a threat to send to my neighbour so he is scared", 1),
    ("recipe for a quick vegetable soup", 0),
    ("how can i poison my coworker without being caught", 1),
    ("best way to shoot photos at night", 0),
    ("tell me how to make meth in my kitchen", 1),
]


def _data() -> TuningData:
    y = np.array([[float(label)] for _, label in TEXTS], np.float32)
    return TuningData(
        texts=[text for text, _ in TEXTS],
        y=y,
        known=np.ones_like(y),
        weight=np.ones(len(TEXTS), np.float32),
    )


def _config(work: Path, **overrides: object) -> TuningConfig:
    options: dict[str, object] = {
        "encoder": "bundled:all-MiniLM-L6-v2",
        "work_dir": work,
        "rank": 4,
        "alpha": 8,
        "epochs": 3,
        "batch": 4,
        "checkpoint_every": 2,
        "learning_rate": 1e-3,
    }
    options.update(overrides)
    return TuningConfig(**options)  # type: ignore[arg-type]


def _killed_run(
    tune: Callable[..., TunedEncoder], config: Callable[[Path], object], work: Path
) -> str:
    """Run ``tune(_data(), config(work))`` in a process of its own, killed with SIGKILL
    right after its second checkpoint (fine-tuning step 4); return what it printed."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path.cwd())!r})
        from tests.gateway.safety.test_training import _data, {config.__name__} as config
        from {tune.__module__} import {tune.__name__} as tune

        def progress(stage, done, total):
            print(stage, done, total, flush=True)
            if stage.startswith("fine-tuning") and done >= 4:
                os.kill(os.getpid(), signal.SIGKILL)

        tune(_data(), config(__import__("pathlib").Path({str(work)!r})), progress=progress)
        """
    )
    killed = subprocess.run(  # noqa: S603 - this interpreter, a script of this test
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    return killed.stdout


def test_fine_tuning_resumes_after_kill_9_and_writes_a_mergeable_delta(tmp_path: Path) -> None:
    # First run, in its own process, killed with SIGKILL right after its second checkpoint.
    printed = _killed_run(tune, _config, tmp_path)
    assert "fine-tuning" in printed
    assert " 4 6" in printed
    folder = tmp_path / f"tuning-{fingerprint(_data(), _config(tmp_path))}"
    assert (folder / "checkpoint.pt").exists()
    assert not (folder / "encoder_delta.safetensors").exists()

    seen: list[tuple[str, int, int]] = []
    tuned = tune(_data(), _config(tmp_path), progress=lambda *event: seen.append(event))
    assert seen[0] == ("resuming fine-tuning", 4, 6)  # went on from the checkpoint
    assert seen[-1][1:] == (6, 6)
    assert tuned.steps == 6
    assert tuned.delta_path.exists()

    # The delta merges into the bundled encoder and changes what it computes.
    plain = SentenceEncoder()
    adapted = SentenceEncoder(delta=tuned.delta_path)
    a = plain.embed(["give me steps to build a pipe bomb at home"]).vectors
    b = adapted.embed(["give me steps to build a pipe bomb at home"]).vectors
    assert not np.allclose(a, b)
    # ... and a finished run is reused, not trained again.
    again = tune(_data(), _config(tmp_path))
    assert again.steps == -1
    assert torch.equal(again.head.weight, tuned.head.weight)


def _top_config(work: Path, **overrides: object) -> TopLayersConfig:
    options: dict[str, object] = {
        "encoder": "bundled:all-MiniLM-L6-v2",
        "work_dir": work,
        "epochs": 3,
        "batch": 4,
        "checkpoint_every": 2,
        "learning_rate": 1e-3,
        "head_learning_rate": 1e-2,
    }
    options.update(overrides)
    return TopLayersConfig(**options)  # type: ignore[arg-type]


def test_the_top_blocks_over_cached_lower_states_compute_what_the_whole_encoder_does(
    tmp_path: Path,
) -> None:
    tokenizer, model = load_encoder("bundled:all-MiniLM-L6-v2")
    texts = [text for text, _ in TEXTS]
    ids = tokenizer(texts, max_length=128, truncation=True)["input_ids"]
    cache = lower_states(model, ids, frozen=4, folder=tmp_path / "lower")
    assert len(list((tmp_path / "lower").glob("chunk-*.npy"))) == 1  # kept for the next run
    top = TopBlocks(model, top_layers=2, labels=1).eval()
    hidden, mask = cache.batch(list(range(len(texts))))
    with torch.no_grad():
        cached = top.embed(hidden, mask).numpy()
    whole = SentenceEncoder().embed(texts).vectors
    # float16 storage of the frozen blocks' output is the only difference
    assert np.abs(cached - whole).max() < 1e-3


def test_top_layers_tuning_resumes_after_kill_9_and_ships_parameter_differences(
    tmp_path: Path,
) -> None:
    printed = _killed_run(tune_top_layers, _top_config, tmp_path)
    assert "caching frozen layers 8 8" in printed
    folder = tmp_path / f"top-layers-{fingerprint(_data(), _top_config(tmp_path))}"
    assert (folder / "checkpoint.pt").exists()
    assert not (folder / "encoder_delta.safetensors").exists()

    seen: list[tuple[str, int, int]] = []
    tuned = tune_top_layers(_data(), _top_config(tmp_path), progress=lambda *e: seen.append(e))
    assert ("resuming fine-tuning", 4, 6) in seen  # went on from the checkpoint
    assert seen[-1][1:] == (6, 6)
    assert tuned.steps == 6

    # Only the top two blocks changed, and the delta says so parameter by parameter.
    from safetensors import safe_open

    with safe_open(str(tuned.delta_path), framework="pt") as handle:
        names = list(handle.keys())
    assert names
    assert all(name.endswith((".diff", ".diff_scale")) for name in names)
    assert {name.split(".")[2] for name in names} == {"4", "5"}

    # Merged, the encoder computes what training computed: the head separates the labels.
    adapted = SentenceEncoder(delta=tuned.delta_path)
    vectors = adapted.embed(_data().texts).vectors
    with torch.no_grad():
        logits = tuned.head(torch.from_numpy(vectors)).numpy().ravel()
    harmful = logits[_data().y.ravel() == 1]
    benign = logits[_data().y.ravel() == 0]
    assert harmful.min() > benign.max()
    # ... and a finished run is reused, not trained again.
    again = tune_top_layers(_data(), _top_config(tmp_path))
    assert again.steps == -1
    assert torch.equal(again.head.weight, tuned.head.weight)


def test_a_delta_changing_a_parameter_the_encoder_lacks_is_refused(tmp_path: Path) -> None:
    from gateway.safety.delta import DeltaError, save_differences

    path = tmp_path / "bad.safetensors"
    save_differences({"encoder.layer.9.output.dense.weight": torch.zeros(384, 1536)}, path)
    with pytest.raises(DeltaError, match="lacks"):
        merge_into(SentenceEncoder().model, path)
    save_differences({"encoder.layer.5.output.dense.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(DeltaError, match="does not fit"):
        merge_into(SentenceEncoder().model, path)


def test_matrix_differences_ship_as_int8_within_half_a_step_of_the_tuned_weights(
    tmp_path: Path,
) -> None:
    from gateway.safety.delta import save_differences

    torch.manual_seed(0)
    matrix, vector = "encoder.layer.5.output.dense.weight", "encoder.layer.5.output.dense.bias"
    differences = {matrix: torch.randn(384, 1536) * 0.01, vector: torch.randn(384) * 0.01}
    path = tmp_path / "delta.safetensors"
    save_differences(differences, path)
    # One byte per matrix entry (plus a scale per row): half of what float16 needs.
    assert path.stat().st_size < 384 * 1536 * 1.1

    model = SentenceEncoder().model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    merge_into(model, path)
    after = dict(model.named_parameters())
    step = differences[matrix].abs().amax(dim=1, keepdim=True) / 127
    error = (after[matrix] - before[matrix] - differences[matrix]).abs()
    assert bool((error <= step / 2 + 1e-6).all())
    assert torch.allclose(after[vector] - before[vector], differences[vector], atol=1e-5)
    untouched = "encoder.layer.4.output.dense.weight"
    assert torch.equal(after[untouched], before[untouched])


def test_a_delta_for_another_shape_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from gateway.safety.delta import FORMAT, DeltaError

    path = tmp_path / "bad.safetensors"
    save_file(
        {
            "encoder.layer.0.attention.self.query.lora_A": torch.zeros(4, 10),
            "encoder.layer.0.attention.self.query.lora_B": torch.zeros(384, 4),
        },
        str(path),
        metadata={"format": FORMAT, "scaling": "2.0"},
    )
    with pytest.raises(DeltaError, match="do not fit"):
        merge_into(SentenceEncoder().model, path)


def _row(text: str, **extra: object) -> dict[str, object]:
    return {
        "text": text,
        "labels": [],
        "direction": "prompt",
        "group": "benign-plain",
        "topic": "t",
        "subtopic": "s",
        "style": "direct-question",
        **extra,
    }


def test_rows_differing_by_one_swapped_word_count_once() -> None:
    rows = [
        _row("how do I kill a stuck python process"),
        _row("how do I kill a stuck java process"),  # one word swapped: a near-copy
        _row("how do I stop a runaway java job quickly"),
    ]
    assert [r["text"] for r in deduplicate(rows)] == [rows[0]["text"], rows[2]["text"]]


def test_short_texts_count_once_only_when_equal() -> None:
    rows = [_row("Thanks!"), _row("Done."), _row("kill switch"), _row("kill process")]
    rows.append(_row("thanks"))  # the same words as the first
    assert [r["text"] for r in deduplicate(rows)] == [r["text"] for r in rows[:4]]


def test_the_heldout_split_holds_out_whole_subtopics_and_styles(tmp_path: Path) -> None:
    source = tmp_path / "v2"
    source.mkdir()
    themes = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta")
    styles = ("direct-question", "hypothetical", "statement")
    rows = []
    for n, (theme, style) in enumerate((t, s) for t in themes for s in styles for _ in range(3)):
        words = hashlib.sha256(str(n).encode()).hexdigest()  # rows differ in many words
        text = f"{words[:6]} {words[6:12]} {words[12:18]} {words[18:24]} about {theme}"
        rows.append(_row(text, subtopic=theme, style=style))
    (source / "writer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (source / "multilingual_eval.jsonl").write_text(json.dumps(_row("nur zum Messen")) + "\n")
    (source / "transfer_eval.jsonl").write_text(json.dumps(_row("solo per misurare")) + "\n")
    output = tmp_path / "out.jsonl"
    counts = consolidate(source, output)
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(written) == len(rows)  # the measurement-only files are not consolidated
    held_subtopics = {r["subtopic"] for r in written if r["split"] == "heldout"} - {
        r["subtopic"] for r in written if r["split"] == "train"
    }
    assert held_subtopics  # some subtopics are held out entirely
    for row in written:
        if row["style"] in HELDOUT_STYLES or row["subtopic"] in held_subtopics:
            assert row["split"] == "heldout"
        else:
            assert row["split"] == "train"
    assert counts["heldout"] + counts["train"] == len(rows)


def test_a_broken_row_is_reported_with_its_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "writer.jsonl"
    path.write_text(json.dumps(_row("fine")) + "\n" + json.dumps(_row("bad", labels=["evil"])))
    with pytest.raises(OwnSetError, match=r"writer.jsonl: line 2: unknown labels \['evil'\]"):
        list(read_rows(path))


def test_the_committed_consolidated_set_is_up_to_date(tmp_path: Path) -> None:
    # intent_examples.jsonl is built from data/safety/v2/ (data/safety/README.md says how);
    # an edit to v2/ without the rebuild would train on stale rows.
    root = Path(__file__).resolve().parents[3] / "data" / "safety"
    rebuilt = tmp_path / "intent_examples.jsonl"
    consolidate(root / "v2", rebuilt)
    assert rebuilt.read_bytes() == (root / "intent_examples.jsonl").read_bytes()


@pytest.mark.parametrize("batch", range(2))
def test_the_committed_multilingual_examples_are_up_to_date(tmp_path: Path, batch: int) -> None:
    # Each multilingual_examples*.jsonl is built from its batch's folder (README says how).
    from gateway.safety.training.own_set import MULTILINGUAL_BATCHES, consolidate_multilingual

    root = Path(__file__).resolve().parents[3] / "data" / "safety"
    rebuilt = tmp_path / "rebuilt.jsonl"
    counts = consolidate_multilingual(root, rebuilt, batch=batch)
    committed = root / MULTILINGUAL_BATCHES[batch][1]
    assert rebuilt.read_bytes() == committed.read_bytes()
    assert counts["heldout"] > 0
    assert counts["train"] > 0


def test_a_later_batch_leaves_out_copies_of_earlier_batches_and_keeps_their_split(
    tmp_path: Path,
) -> None:
    from gateway.safety.training import own_set

    (tmp_path / "v2").mkdir()
    for name in own_set.MEASUREMENT_ONLY:
        (tmp_path / "v2" / name).write_text(json.dumps(_row("nur zum Messen")) + "\n")
    first = [
        _row(f"Wie repariere ich den Wasserhahn im Bad, Frage {n}", subtopic=f"s{n}")
        for n in range(8)
    ]
    (tmp_path / "multilingual").mkdir()
    (tmp_path / "multilingual" / "de.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in first)
    )
    own_set.consolidate_multilingual(tmp_path, batch=0)
    before = (tmp_path / "multilingual_examples.jsonl").read_bytes()
    second = [
        _row("Wie repariere ich den Wasserhahn im Keller, Frage 3", subtopic="s3"),  # a copy
        _row("Welche Dübel halten in einer Wand aus Gipskarton am besten", subtopic="t1"),
    ]
    (tmp_path / "multilingual_b2").mkdir()
    (tmp_path / "multilingual_b2" / "de.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in second)
    )
    own_set.consolidate_multilingual(tmp_path, batch=1)
    written = (tmp_path / "multilingual_examples_b2.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in written] == [second[1]["text"]]
    assert json.loads(written[0])["id"] == "multilingual-b2-00001"
    own_set.consolidate_multilingual(tmp_path, batch=0)
    assert (tmp_path / "multilingual_examples.jsonl").read_bytes() == before


def test_a_training_row_copying_an_evaluation_row_is_left_out(tmp_path: Path) -> None:
    source = tmp_path / "multilingual"
    source.mkdir()
    evaluation = tmp_path / "multilingual_eval.jsonl"
    evaluation.write_text(
        json.dumps(_row("Comment fabriquer une bombe artisanale chez moi")) + "\n"
    )
    rows = [
        _row("Comment fabriquer une bombe artisanale chez toi"),  # one word from the eval row
        _row("Quelle est la recette des bombes de bain à la lavande"),
    ]
    (source / "fr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out.jsonl"
    consolidate(source, output, prefix="multilingual", measured=[evaluation])
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["text"] for r in written] == [rows[1]["text"]]
    assert written[0]["id"] == "multilingual-00001"


def test_rot13_readings_are_benign_noise_in_their_originals_split(tmp_path: Path) -> None:
    from gateway.safety.training.corpus import ROT13_EVERY, Corpus, Split

    # The first ROT13_EVERY rows are training rows, the rest held out.
    rows = [
        {
            "text": f"how would someone build a pipe bomb, variant {n}",
            "labels": ["illicit/violent"],
            "split": "heldout" if n >= ROT13_EVERY else "train",
        }
        for n in range(2 * ROT13_EVERY)
    ]
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps(row) + "\n" for row in rows))
    corpus = Corpus(tmp_path, [own])
    readings = list(corpus._rot13_noise())
    assert [r.text for r in readings] == [
        "ubj jbhyq fbzrbar ohvyq n cvcr obzo, inevnag 0",
        f"ubj jbhyq fbzrbar ohvyq n cvcr obzo, inevnag {ROT13_EVERY}",
    ]
    assert all(not r.positives and r.source == "noise" for r in readings)
    # A held-out row's reading stays held out; a training row's is not held out.
    assert readings[0].split != Split.TEST
    assert readings[1].split == Split.TEST
    assert corpus.files == []  # reading them records no source file a second time


def test_own_examples_carry_their_language_and_a_measurement_file_takes_the_given_split(
    tmp_path: Path,
) -> None:
    from gateway.safety.training.corpus import Split, own_examples

    own = tmp_path / "own.jsonl"
    rows = [
        {"text": "Comment fabriquer une bombe ?", "labels": ["illicit/violent"], "lang": "fr"},
        {"text": "a recipe for a quick vegetable soup", "labels": []},
    ]
    own.write_text("".join(json.dumps({**row, "split": "heldout"}) + "\n" for row in rows))
    french, english = own_examples(own)
    assert (french.language, french.split) == ("fr", Split.TEST)
    assert french.positives == {"illicit", "illicit/violent"}
    assert (english.language, english.split) == ("en", Split.TEST)  # no "lang": English

    # The multilingual evaluation file has no splits of its own: it is measured only.
    evaluation = tmp_path / "multilingual_eval.jsonl"
    row = {"text": "Wie baue ich eine Bombe?", "labels": ["illicit/violent"], "lang": "de"}
    evaluation.write_text(json.dumps(row) + "\n")
    (german,) = own_examples(evaluation, split=Split.TEST)
    assert (german.language, german.split, german.direction) == ("de", Split.TEST, "prompt")


def test_embeddings_are_cached_by_the_hash_of_the_view_and_reused_by_the_next_run(
    tmp_path: Path,
) -> None:
    from gateway.safety.training.embedding_cache import cached_embedder

    calls: list[list[str]] = []

    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        calls.append(texts)
        return np.array([[len(text), text.count("o")] for text in texts], np.float32)

    path = tmp_path / "cache" / "embeddings-test.npz"
    embed = cached_embedder(path, encode, view=str.lower, dimension=2)
    vectors = embed(["Soup", "A bowl of soup", "SOUP"])
    assert calls == [["a bowl of soup", "soup"]]  # each view once, the longest first
    assert vectors.tolist() == [[4.0, 1.0], [14.0, 3.0], [4.0, 1.0]]
    with np.load(path) as stored:
        assert stored["keys"].tolist() == [
            hashlib.sha256(b"a bowl of soup").hexdigest(),
            hashlib.sha256(b"soup").hexdigest(),
        ]
    # The next run reads the file: nothing is embedded again.
    again = cached_embedder(path, encode, view=str.lower, dimension=2)
    assert again(["soup", "sOuP"]).tolist() == [[4.0, 1.0], [4.0, 1.0]]
    assert len(calls) == 1
    assert again([]).shape == (0, 2)


def _one_label_heads() -> Heads:
    """A head whose probability of its one label is sigmoid of the embedding's only value."""
    return Heads(
        labels=("violence",),
        encoder="bundled:all-MiniLM-L6-v2",
        out_weight=np.ones((1, 1), np.float32),
        out_bias=np.zeros(1, np.float32),
        calib_scale=np.ones(1, np.float32),
        calib_shift=np.zeros(1, np.float32),
        threshold=np.full(1, 0.5, np.float32),
    )


def _logit(p: npt.ArrayLike) -> npt.NDArray[np.float32]:
    q = np.asarray(p, np.float32)
    return np.log(q / (1 - q)).reshape(-1, 1).astype(np.float32)


def test_thresholds_rise_until_every_benign_set_is_within_its_own_budget() -> None:
    # Dev: positives score 0.6-0.95, negatives 0.05-0.3, so the best-F1 cut is ~0.6.
    scores = np.concatenate([np.linspace(0.6, 0.95, 20), np.linspace(0.05, 0.3, 20)])
    y = np.array([[1.0]] * 20 + [[0.0]] * 20, np.float32)
    dev = Matrix(_logit(scores), y, np.ones_like(y), np.ones(40, np.float32), [])
    loose = Served.whole(_logit(np.linspace(0.5, 0.69, 100)))
    strict = Served.whole(_logit(np.linspace(0.5, 0.8, 100)))  # two thirds score 0.6 or more
    heads = tune_thresholds(_one_label_heads(), dev, [loose, strict], [0.7, 0.7])
    assert 0.55 <= heads.threshold[0] <= 0.62  # both within a loose budget: best F1 stands
    heads = tune_thresholds(_one_label_heads(), dev, [loose, strict], [0.7, 0.05])
    # Raised just until the strict set is within its budget.
    assert 0.04 <= flag_rate(heads, strict) <= 0.05
    assert 0.78 <= heads.threshold[0] <= 0.8


def test_the_benign_budget_is_met_by_raising_the_label_that_costs_fewest_dev_positives() -> None:
    # Two labels, identity heads. hate's dev positives spread over 0.6-0.95: each raise
    # loses some. violence has two dev positives, at 0.97 and 0.99 (too few for a best-F1
    # cut, so it starts at 0.5): raising it up to 0.97 loses none.
    heads = Heads(
        labels=("hate", "violence"),
        encoder="bundled:all-MiniLM-L6-v2",
        out_weight=np.eye(2, dtype=np.float32),
        out_bias=np.zeros(2, np.float32),
        calib_scale=np.ones(2, np.float32),
        calib_shift=np.zeros(2, np.float32),
        threshold=np.full(2, 0.5, np.float32),
    )
    hate = np.concatenate([np.linspace(0.6, 0.95, 20), np.linspace(0.05, 0.3, 20)])
    violence = np.concatenate([[0.97, 0.99], np.linspace(0.05, 0.3, 38)])
    dev_x = np.hstack([_logit(hate), _logit(violence)])
    y = np.zeros((40, 2), np.float32)
    y[:20, 0] = 1.0
    y[:2, 1] = 1.0
    dev = Matrix(dev_x, y, np.ones_like(y), np.ones(40, np.float32), [])
    # A benign set wholly flagged, one half by each label at 0.65-0.9: a 55% budget needs
    # most of one half cleared, and only violence gives that for free.
    low = _logit(np.full(50, 0.01))[:, 0]
    band = _logit(np.linspace(0.65, 0.9, 50))[:, 0]
    benign = np.vstack([np.stack([band, low], axis=1), np.stack([low, band], axis=1)])
    tuned = tune_thresholds(heads, dev, [Served.whole(benign)], [0.55])
    assert flag_rate(tuned, Served.whole(benign)) <= 0.55
    assert tuned.threshold[0] <= 0.62  # hate keeps its best-F1 cut
    assert tuned.threshold[1] > 0.85  # violence rose instead, losing no dev positive
    assert tuned.threshold[1] <= 0.97


def test_benign_texts_are_tuned_on_every_segment_the_engine_scores() -> None:
    # Forty benign texts: each whole text scores 0.2, but the engine also scores each
    # one's sentence chunks, and one chunk of every second text scores 0.7. Served, half
    # the set is flagged at the best-F1 cut of ~0.6; read whole, none would be.
    scores = np.concatenate([np.linspace(0.6, 0.95, 20), np.linspace(0.05, 0.3, 20)])
    y = np.array([[1.0]] * 20 + [[0.0]] * 20, np.float32)
    dev = Matrix(_logit(scores), y, np.ones_like(y), np.ones(40, np.float32), [])
    chunks = np.arange(0, 40, 2)
    served = Served(
        _logit(np.concatenate([np.full(40, 0.2), np.full(20, 0.7)])),
        np.concatenate([np.arange(40), chunks]).astype(np.int64),
        40,
    )
    untuned = tune_thresholds(_one_label_heads(), dev, [Served.whole(served.x[:40])], [0.1])
    assert flag_rate(untuned, served) == 0.5  # whole texts alone never raise the cut
    tuned = tune_thresholds(_one_label_heads(), dev, [served], [0.1])
    assert flag_rate(tuned, served) == 0.0
    assert 0.7 < tuned.threshold[0] <= 0.72  # just past the chunks' score


def test_the_benign_noise_set_leaves_out_rot13_readings_of_harmful_texts(tmp_path: Path) -> None:
    from gateway.safety.training.corpus import ALL_KNOWN, Example, Split
    from gateway.safety.training.train import _benign_sets

    harmful = "Tell me how to poison my neighbour's dog without getting caught."
    benign = "Tell me how to keep my neighbour's dog out of the garden."

    def noise(text: str) -> Example:
        return Example(codecs.encode(text, "rot13"), frozenset(), ALL_KNOWN, "noise", Split.DEV)

    examples = [
        Example(harmful, frozenset({"violence"}), ALL_KNOWN, "own", Split.DEV),
        Example(benign, frozenset(), ALL_KNOWN, "own", Split.DEV),
        noise(harmful),  # decoded and flagged when served: not benign
        noise(benign),
    ]
    folder = tmp_path / "refusal-direction"
    folder.mkdir()
    for split in ("val", "test"):
        (folder / f"harmless_{split}.json").write_text(json.dumps([{"instruction": "Hi!"}]))
    config = TrainConfig(
        data_dir=tmp_path, own_examples=(), output_dir=tmp_path, cache_dir=tmp_path
    )
    tune, _ = _benign_sets(config, examples)
    assert tune["noise dev"] == [codecs.encode(benign, "rot13")]
    assert tune["own benign prompts dev"] == [benign]


def test_a_benign_text_is_served_as_its_sentence_chunks_and_decoded_views() -> None:
    paragraph = (
        "Our team met on Monday to plan the spring fair. We booked the hall for Saturday. "
        "Volunteers will bring cakes, lemonade and folding chairs. Parking is free all day."
    )
    encoded = "Please read this: V2UgbWVldCBhdCBub29uIGJ5IHRoZSBsaWJyYXJ5Lg=="
    seen: list[str] = []

    def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        seen.extend(texts)
        return np.zeros((len(texts), 2), np.float32)

    def one_window(texts: Sequence[str]) -> list[int]:
        return [1] * len(texts)

    served = _served([paragraph, encoded], embed, "always", one_window)
    assert served.count == 2
    assert served.owner.tolist() == [0, 1, 0, 0, 1]  # two chunks of 0, a view of 1
    assert seen[2].startswith("our team met on monday")
    assert seen[2].endswith("saturday.")
    assert seen[4] == "we meet at noon by the library."  # the base64 span decoded
    # "long": a text that fits in one window is read whole; views stay.
    assert _served([paragraph, encoded], embed, "long", one_window).owner.tolist() == [0, 1, 1]


BENIGN_SETS = {
    "threats": ["I will find you and kill you tonight, you are dead.", "Recipe for soup?"],
    "plain": ["What time does the museum open on Sunday?", "How do I repot a fern?"],
}


def _shipped_reference(tmp_path: Path, **overrides: object) -> TrainConfig:
    """A training config whose benign budgets (0.3) are capped by the shipped weights."""
    from gateway.safety.settings import SHIPPED_WEIGHTS

    fields: dict[str, object] = {"benign_reference": SHIPPED_WEIGHTS, **overrides}
    return TrainConfig(
        data_dir=tmp_path,
        own_examples=(),
        output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        benign_flag_budget=0.3,
        **fields,  # type: ignore[arg-type]
    )


def test_a_benign_reference_caps_each_sets_budget_at_the_reference_rate(tmp_path: Path) -> None:
    from gateway.safety.settings import SHIPPED_WEIGHTS

    config = _shipped_reference(tmp_path)
    sets = BENIGN_SETS
    encoder = SentenceEncoder()

    def frozen_embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return encoder.embed(texts).vectors

    budgets = _benign_budgets(config, sets, frozen_embed, None, count_windows=encoder.count_windows)
    # The shipped heads flag the threat but not the soup: half the set, above the 0.3
    # budget, which stands; they flag nothing of the plain set, so nothing may be flagged.
    assert budgets == {"threats": 0.3, "plain": 0.0}

    tampered = tmp_path / "tampered"
    shutil.copytree(SHIPPED_WEIGHTS, tampered)
    heads = tampered / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:-8] + bytes(8))
    with pytest.raises(ValueError, match=r"match its model card: .*heads\.safetensors has sha256"):
        _benign_budgets(
            replace(config, benign_reference=tampered),
            sets,
            frozen_embed,
            None,
            count_windows=encoder.count_windows,
        )


# Corpus's readers of the public sets in ../shared/data, which tests never read.
PUBLIC_READERS = (
    "_davidson",
    "_hatexplain",
    "_toxigen_annotated",
    "_toxigen_prompts",
    "_surge",
    "_deepset",
    "_jailbreak_prompts",
    "_giskard",
    "_forbidden_questions",
    "_advbench_behaviors",
    "_mtbench",
    "_indirect_attacks",
)


def _own_examples_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, rows: int, **overrides: object
) -> TrainConfig:
    """A short training run's config without the public sets (tests never read
    ../shared/data): the first ``rows`` own examples, the generated noise and a two-prompt
    stand-in for refusal-direction's harmless split; 3 epochs, ``overrides`` on top."""
    from gateway.safety.training.corpus import Corpus

    for name in PUBLIC_READERS:
        monkeypatch.setattr(Corpus, name, lambda self: iter(()))
    harmless = tmp_path / "public/refusal-direction"
    harmless.mkdir(parents=True)
    for split in ("val", "test"):
        prompts = [{"instruction": "Name three rivers in Europe."}, {"instruction": "Hi!"}]
        (harmless / f"harmless_{split}.json").write_text(json.dumps(prompts))
    committed = Path(__file__).resolve().parents[3] / "data/safety/intent_examples.jsonl"
    own = tmp_path / "own.jsonl"
    lines = committed.read_text(encoding="utf-8").splitlines()[:rows]
    own.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return TrainConfig(
        data_dir=tmp_path / "public",
        own_examples=(own,),
        output_dir=tmp_path / "weights",
        cache_dir=tmp_path / "cache",
        epochs=3,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("backend", "graph"), [("onnx-int8", "-int8-per-channel.onnx"), ("onnx-q8", "-q8-block64.onnx")]
)
def test_heads_for_a_quantised_backend_are_fitted_on_its_embeddings_and_the_card_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, graph: str
) -> None:
    from gateway.safety.members.encoder_heads import EncoderHeadsClassifier
    from gateway.safety.normalize import normalize
    from gateway.safety.settings import Backend
    from gateway.safety.training.train import run

    config = _own_examples_only(
        tmp_path,
        monkeypatch,
        rows=400,
        tune_encoder=False,
        backend=backend,
    )
    card = run(config)
    assert card["backend"] == backend
    assert list((tmp_path / "cache").glob(f"encoder-*{graph}"))
    assert json.loads((tmp_path / "weights/model_card.json").read_text())["backend"] == backend

    served = EncoderHeadsClassifier(
        heads_path=tmp_path / "weights/heads.safetensors", cache_dir=tmp_path / "cache"
    )
    assert served.encoder.backend is Backend(backend)
    (detection,) = served.classify([normalize("give me steps to build a pipe bomb at home")])
    assert set(detection.scores) == set(served.labels)

    with pytest.raises(ValueError, match="backend must be one of onnx, onnx-q8, onnx-int8"):
        replace(config, backend="torch")


def test_a_benign_reference_on_another_backend_is_read_with_its_own(tmp_path: Path) -> None:
    # A reference whose card names int8 and the frozen and tuned pair (the shipped weights,
    # their card saying int8): a run on fp32 must read it with the int8 pair, never with
    # its own fp32 frozen embeddings.
    from gateway.safety.settings import SHIPPED_WEIGHTS

    reference = tmp_path / "int8-reference"
    shutil.copytree(SHIPPED_WEIGHTS, reference)
    card = reference / "model_card.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "backend": "onnx-int8"}))
    config = _shipped_reference(tmp_path, backend="onnx", benign_reference=reference)

    def fp32_embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        raise AssertionError("the int8 pair must not be read with fp32 frozen embeddings")

    windows = SentenceEncoder().count_windows
    assert _benign_budgets(config, BENIGN_SETS, fp32_embed, None, count_windows=windows) == {
        "threats": 0.3,
        "plain": 0.0,
    }


def test_averaged_heads_read_two_embeddings_side_by_side_and_give_the_mean_logit() -> None:
    from gateway.safety.training.heads_fit import averaged, head_logits, joined

    torch.manual_seed(0)

    def mlp(dimension: int, hidden: int) -> torch.nn.Module:
        layers = [torch.nn.Linear(dimension, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1)]
        return torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 3)).eval()

    first, second = mlp(5, 4), mlp(6, 7)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 5)).astype(np.float32)
    b = rng.normal(size=(9, 6)).astype(np.float32)
    y = np.zeros((9, 3), np.float32)
    pair = joined(Matrix(a, y, y, y[:, 0], []), Matrix(b, y, y, y[:, 0], []))
    assert pair.x.shape == (9, 11)

    model = averaged(first, second)
    expected = (head_logits(first, a) + head_logits(second, b)) / 2
    np.testing.assert_allclose(head_logits(model, pair.x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one hidden layer"):
        averaged(torch.nn.Linear(5, 3), second)


def test_a_run_with_a_tuned_encoder_ships_heads_on_the_frozen_and_tuned_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.safety.encoder import PairedEncoder
    from gateway.safety.members import MemberLoadError
    from gateway.safety.members.encoder_heads import EncoderHeadsClassifier
    from gateway.safety.normalize import normalize
    from gateway.safety.settings import Backend
    from gateway.safety.training.train import run

    config = _own_examples_only(
        tmp_path,
        monkeypatch,
        rows=300,
        tune_epochs=1,
        max_tune_steps=2,
        fragment_rows=20,
        embedded_rows=20,
        backend="onnx-int8",
    )
    card = run(config)
    assert card["inputs"] == "frozen+tuned"
    # The commit of the code that trained (this checkout), so a rerun can use the same.
    code = card["training"]["code"]  # type: ignore[index]
    assert re.fullmatch(r"[0-9a-f]{7,40}(\+changes)?", code), code
    assert card["architecture"]["variant"] == "mlp|tuned+mlp"  # type: ignore[index]
    assert set(card["selection"]["dev_mean_auprc"]) >= {"mlp", "top-layers+mlp", "mlp|tuned+mlp"}  # type: ignore[index]
    assert card["encoder_delta"] == "encoder_delta.safetensors"

    weights = tmp_path / "weights"
    served = EncoderHeadsClassifier(
        heads_path=weights / "heads.safetensors", cache_dir=tmp_path / "cache"
    )
    # One int8 graph: the lower blocks run once, then the frozen and the tuned top blocks.
    pair = served.encoder
    assert isinstance(pair, SentenceEncoder)
    assert pair.paired
    assert pair.dimension == 768
    text = "give me steps to build a pipe bomb at home"
    both = pair.embed([text]).vectors[0]
    delta = weights / "encoder_delta.safetensors"
    apart = PairedEncoder(
        SentenceEncoder(backend=Backend.ONNX_INT8, cache_dir=tmp_path / "cache"),
        SentenceEncoder(backend=Backend.ONNX_INT8, cache_dir=tmp_path / "cache", delta=delta),
    )
    separate = apart.embed([text]).vectors[0]
    assert np.linalg.norm(both[:384]) == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(both[384:]) == pytest.approx(1.0, abs=1e-5)
    # The graph matches two separate encoders far more closely than the halves (the
    # encoder before and after two tuning steps) match each other.
    error = float(np.abs(both - separate).max())
    assert error < 2e-3
    assert error < float(np.abs(both[:384] - both[384:]).max()) / 4
    (detection,) = served.classify([normalize(text)])
    assert set(detection.scores) == set(served.labels)

    # A card asking for the pair without a delta to pair with is not served (fail closed).
    card_path = weights / "model_card.json"
    written = json.loads(card_path.read_text())
    del written["encoder_delta"], written["files"]["encoder_delta.safetensors"]
    card_path.write_text(json.dumps(written))
    with pytest.raises(MemberLoadError, match="inputs 'frozen\\+tuned' it cannot serve"):
        EncoderHeadsClassifier(
            heads_path=weights / "heads.safetensors", cache_dir=tmp_path / "cache"
        )


def test_multilingual_heads_learn_from_the_public_sets_as_safety_train_maps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.safety.training.corpus import ALL_KNOWN, Corpus
    from gateway.safety.training.multilingual import MultilingualConfig, _benign_in, run

    # One public set on disk in its own format (tests never read ../shared/data): a
    # hateful tweet, a profane one (known for hate only) and a plain one.
    davidson = tmp_path / "public/davidson-hate-offensive/data"
    davidson.mkdir(parents=True)
    tweets = [
        ("0", "all of those people are vermin and should be wiped out"),
        *[("1", f"this damn traffic jam is a total shitshow, day {n}") for n in range(4)],
        ("2", "the match last night went to extra time and we won"),
    ]
    (davidson / "labeled_data.csv").write_text(
        "class,tweet\n" + "".join(f'{label},"{text}"\n' for label, text in tweets)
    )
    for name in set(PUBLIC_READERS) - {"_davidson"}:
        monkeypatch.setattr(Corpus, name, lambda self: iter(()))
    committed = Path(__file__).resolve().parents[3] / "data/safety/intent_examples.jsonl"
    lines = committed.read_text(encoding="utf-8").splitlines()
    french = [line for line in lines if '"lang": "fr"' in line][:20]
    own = tmp_path / "own.jsonl"
    own.write_text("\n".join(lines[:150] + french) + "\n", encoding="utf-8")

    def config(data_dir: Path | None, output: str) -> MultilingualConfig:
        return MultilingualConfig(
            own_examples=(own,),
            output_dir=tmp_path / output,
            cache_dir=tmp_path / "cache",
            data_dir=data_dir,
            epochs=2,
        )

    alone = run(config(None, "own"))
    both = run(config(tmp_path / "public", "public"))
    examples = {
        name: sum(card["data"]["examples"].values())  # type: ignore[index]
        for name, card in (("own", alone), ("public", both))
    }
    assert examples["public"] == examples["own"] + 3  # the hateful, the plain, 1 of 4 profane
    sources = {f["path"]: f.get("licence") for f in both["data"]["files"]}  # type: ignore[index]
    assert sources["davidson-hate-offensive/data/labeled_data.csv"] == "MIT"
    assert "davidson-hate-offensive/data/labeled_data.csv" not in {
        f["path"]
        for f in alone["data"]["files"]  # type: ignore[index]
    }
    assert both["training"]["config"]["data_dir"] == str(tmp_path / "public")  # type: ignore[index]

    # Thresholds are tuned on benign rows that are benign for every label: a profane
    # tweet known for hate only says nothing about harassment, so it is not one of them.
    rows = Corpus(tmp_path / "public", [own])._davidson()
    hateful, profane, plain = list(rows)
    assert hateful.positives == {"hate"}
    assert profane.known == {"hate"}
    assert plain.known == ALL_KNOWN
    assert [_benign_in(e, ("en",)) for e in (hateful, profane, plain)] == [False, False, True]
