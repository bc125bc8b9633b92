"""Train, calibrate and tune the encoder heads; write the weights and their model card.

Run it as ``safegate safety train`` (see ``gateway.cli``). Steps, top to bottom:

1. Build the corpus (``gateway.safety.training.corpus``): permissive public sets (capped per
   source) plus the project's own examples, with known-label masks and train/dev/test
   splits (the own examples' held-out rows are the test split, never tuned on). Add to
   the training split benign pieces of its benign texts and its harmful texts set inside
   benign ones (``gateway.safety.training.augment``): the engine scores stream increments
   and whole windows too.
2. Embed every text once with the frozen sentence encoder, on the same normalised view
   the engine classifies at run time. Embeddings are cached by text hash.
3. Candidates, all fitted with a masked, weighted binary cross-entropy: a linear head and
   a one-hidden-layer MLP on the frozen embeddings, and (``tune_encoder``) the encoder
   itself fine-tuned together with a linear head (``tune_method``: its top blocks in full
   over cached outputs of the frozen lower ones, ``gateway.safety.training.top_layers``,
   the default; or LoRA on every block, ``gateway.safety.training.encoder_tuning``), and
   an MLP refitted on that tuned encoder's embeddings. Keep whichever has the best mean
   dev AUPRC; the model card records every candidate's score, overall and on the own
   examples' dev rows.
4. Calibrate each label with Platt scaling on the dev split.
5. Tune thresholds: each label's best-F1 threshold on dev, then raised greedily (each
   raise the one that clears the most benign texts per dev positive it loses) until
   every benign tuning set (refusal-direction's harmless validation split; the benign dev
   rows of the own prompts, of the own replies, of the public sets, and of the noise) is
   flagged at most ``benign_flag_budget`` of the time and, with ``benign_reference``, no
   more often than the reference model (the one that ships) flags it. Benign texts are
   scored as the engine serves them: the highest score of the text, its sentence chunks
   under ``chunking`` and its decoded views (``encoder_heads.served_segments``).
6. Measure on the test split and the benign test sets; write heads.safetensors and
   model_card.json.

The fitting, calibrating, tuning and measuring of steps 3 to 6 live in ``heads_fit``,
shared with the multilingual heads (``multilingual``).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from gateway.safety.encoder import BUNDLED_ENCODER, Q8_BLOCK, SentenceEncoder
from gateway.safety.heads import Heads
from gateway.safety.members import MemberLoadError
from gateway.safety.members.encoder_heads import card_value, served_segments, verify_card_files
from gateway.safety.normalize import normalize
from gateway.safety.settings import Backend
from gateway.safety.training import augment, loop, top_layers
from gateway.safety.training.corpus import (
    HEAD_LABELS,
    Corpus,
    Example,
    Split,
    file_sha256,
)
from gateway.safety.training.embedding_cache import Embed, cached_embedder
from gateway.safety.training.encoder_tuning import TuningConfig, tune
from gateway.safety.training.heads_fit import (
    CALIBRATION_BINS,
    FloatArray,
    Matrix,
    Served,
    averaged,
    calibrate,
    calibration_error,
    fit,
    flag_rate,
    joined,
    label_metrics,
    mean_auprc,
    reliability,
    tune_thresholds,
)
from gateway.safety.training.loop import Progress, TunedEncoder, TuningData

TUNE_METHODS = ("top-layers", "lora")
PAIRED = "mlp|tuned+mlp"
SERVING_BACKENDS = (Backend.ONNX.value, Backend.ONNX_Q8.value, Backend.ONNX_INT8.value)


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``safegate safety train``; saved inside the model card."""

    data_dir: Path = field(metadata={"help": "folder holding the public data sets"})
    own_examples: tuple[Path, ...] = field(
        metadata={"help": "the project's own labelled examples (JSONL files)"}
    )
    output_dir: Path = field(metadata={"help": "where heads.safetensors and model_card.json go"})
    cache_dir: Path = field(metadata={"help": "embedding cache"})
    encoder: str = field(default=BUNDLED_ENCODER, metadata={"help": "sentence encoder"})
    hidden: int = field(default=256, metadata={"help": "hidden units of the MLP variant"})
    epochs: int = field(default=60, metadata={"help": "passes over the training split"})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    own_weight: float = field(default=4.0, metadata={"help": "sample weight of own examples"})
    max_pos_weight: float = field(default=10.0, metadata={"help": "cap on positive re-weighting"})
    benign_flag_budget: float = field(
        default=0.04, metadata={"help": "max share of benign prompts flagged"}
    )
    benign_reference: Path | None = field(
        default=None,
        metadata={
            "help": "weights folder whose flag rate on each benign tuning set the new "
            "thresholds may not exceed"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    tune_encoder: bool = field(
        default=True, metadata={"help": "also fine-tune the encoder (engine v2)"}
    )
    tune_method: str = field(
        default="top-layers",
        metadata={"help": "'top-layers' (upper blocks over cached lower ones) or 'lora'"},
    )
    tune_layers: int = field(default=2, metadata={"help": "blocks trained by 'top-layers'"})
    tune_epochs: int = field(default=3, metadata={"help": "fine-tuning passes"})
    tune_rank: int = field(default=16, metadata={"help": "LoRA rank of the fine-tuning"})
    cap_per_source: int | None = field(
        default=3000, metadata={"help": "most rows per public set and split"}
    )
    max_tune_steps: int | None = field(
        default=None, metadata={"help": "stop fine-tuning after this many steps (tests)"}
    )
    languages: tuple[str, ...] = field(
        default=("en",),
        metadata={"help": "languages the model covers; others are marked low-confidence"},
    )
    chunking: str = field(
        default="always",
        metadata={
            "help": "sentence chunks for every text past 100 chars, or only for texts past "
            "one window ('long': a text that fits in one window is encoded once)"
        },
    )
    fragment_rows: int = field(
        default=4000,
        metadata={"help": "benign pieces of benign training texts added (stream increments)"},
    )
    embedded_rows: int = field(
        default=4000,
        metadata={"help": "harmful training texts set inside benign ones, added"},
    )
    pair_frozen: bool = field(
        default=True,
        metadata={
            "help": "with a tuned encoder, ship heads that read the frozen and the tuned "
            "embeddings side by side, averaging the two MLPs (two encoder passes)"
        },
    )
    backend: str = field(
        default=Backend.ONNX.value,
        metadata={
            "help": "encoder backend the heads are fitted on and served with: 'onnx' "
            "(fp32; embedded with torch, which matches it within 2e-6), 'onnx-q8' or "
            "'onnx-int8'"
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.benign_flag_budget < 1.0:
            raise ValueError("benign_flag_budget must be within (0, 1)")
        if self.fragment_rows < 0 or self.embedded_rows < 0:
            raise ValueError("fragment_rows and embedded_rows must be >= 0")
        if self.epochs < 1 or self.hidden < 0:
            raise ValueError("epochs must be >= 1 and hidden >= 0")
        if self.chunking not in {"always", "long"}:
            raise ValueError("chunking must be 'always' or 'long'")
        if self.tune_method not in TUNE_METHODS:
            raise ValueError(f"tune_method must be one of {', '.join(TUNE_METHODS)}")
        if self.backend not in SERVING_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(SERVING_BACKENDS)}")

    def to_json(self) -> dict[str, object]:
        def plain(value: object) -> object:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return [plain(item) for item in value]
            return value

        return {key: plain(value) for key, value in sorted(asdict(self).items())}


def run(config: TrainConfig, *, progress: Progress | None = None) -> dict[str, object]:
    """Train and write the artifacts; return the model card."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    corpus = Corpus(config.data_dir, config.own_examples, cap_per_source=config.cap_per_source)
    examples = corpus.training_examples()
    examples += augment.fragments(examples, count=config.fragment_rows, seed=config.seed)
    examples += augment.embedded(examples, count=config.embedded_rows, seed=config.seed)
    benign_tune, benign_test = _benign_sets(config, examples)
    frozen_encoder = _encoder(config, None, config.backend)
    embed = _embedder(frozen_encoder, config.cache_dir, progress)
    by_split = {split: [e for e in examples if e.split == split] for split in Split}
    matrices = {split: training_matrix(by_split[split], embed, config) for split in Split}
    chosen_embed = embed

    variants = {"linear": 0, "mlp": config.hidden}
    fitted = {name: fit(matrices[Split.TRAIN], hidden, config) for name, hidden in variants.items()}
    dev_of = dict.fromkeys(fitted, matrices[Split.DEV])
    delta_path: Path | None = None
    method = config.tune_method
    if config.tune_encoder:
        tuned = _tune_encoder(config, _tuning_data(matrices[Split.TRAIN]), progress)
        tuned_encoder = _encoder(config, tuned.delta_path, config.backend)
        tuned_embed = _embedder(tuned_encoder, config.cache_dir, progress)
        tuned_matrices = {
            split: training_matrix(by_split[split], tuned_embed, config) for split in Split
        }
        fitted[method] = tuned.head
        variants[method] = 0
        # The head trained with the encoder sees each example only ``tune_epochs`` times,
        # too few for the rare labels; an MLP refitted on the tuned encoder's embeddings
        # (as the frozen candidate is fitted) separates the encoder's worth from the head's.
        fitted[f"{method}+mlp"] = fit(tuned_matrices[Split.TRAIN], config.hidden, config)
        variants[f"{method}+mlp"] = config.hidden
        dev_of.update(dict.fromkeys((method, f"{method}+mlp"), tuned_matrices[Split.DEV]))
        # The tuned encoder learns intent from the training sets and forgets some of what
        # pre-training knew: on public sets never trained on it ranks worse than the
        # frozen one (docs/BENCHMARKS.md). The pair keeps both, at two encoder passes.
        paired_matrices = {split: joined(matrices[split], tuned_matrices[split]) for split in Split}
        fitted[PAIRED] = averaged(fitted["mlp"], fitted[f"{method}+mlp"])
        variants[PAIRED] = 2 * config.hidden
        dev_of[PAIRED] = paired_matrices[Split.DEV]
    dev_scores = {name: mean_auprc(model, dev_of[name]) for name, model in fitted.items()}
    own_dev_scores = {
        name: mean_auprc(model, _own_rows(dev_of[name])) for name, model in fitted.items()
    }
    if config.tune_encoder and config.pair_frozen:
        chosen = PAIRED  # dev rows share the training sets' sources: they cannot show it
    else:
        chosen = max(dev_scores, key=lambda name: dev_scores[name])
    if chosen == PAIRED:
        matrices.update(paired_matrices)
        chosen_embed = _side_by_side(embed, tuned_embed)
        delta_path = tuned.delta_path
    elif chosen.startswith(method):
        matrices.update(tuned_matrices)
        chosen_embed = tuned_embed
        delta_path = tuned.delta_path
    # Benign texts are scored as the engine will serve them, sentence chunks and decoded
    # views included: thresholds tuned on whole texts alone flag more once served.
    count_windows = frozen_encoder.count_windows
    benign_tune_x = {
        name: _served(texts, chosen_embed, config.chunking, count_windows)
        for name, texts in benign_tune.items()
    }
    benign_test_x = {
        name: _served(texts, chosen_embed, config.chunking, count_windows)
        for name, texts in benign_test.items()
    }
    heads = calibrate(fitted[chosen], matrices[Split.DEV], encoder=config.encoder)
    budgets = _benign_budgets(config, benign_tune, embed, progress, count_windows=count_windows)
    heads = tune_thresholds(
        heads,
        matrices[Split.DEV],
        [benign_tune_x[name] for name in budgets],
        list(budgets.values()),
    )

    card: dict[str, object] = {
        "schema_version": 1,
        "name": "safegate-encoder-heads",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "encoder": config.encoder,
        "backend": config.backend,
        "languages": list(config.languages),
        "chunking": config.chunking,
        # What the heads read: the tuned encoder's embedding alone (or the frozen one's
        # when no delta ships), or the frozen and the tuned side by side.
        "inputs": "frozen+tuned" if chosen == PAIRED else "single",
        "architecture": {
            "variant": chosen,
            "hidden": variants[chosen],
            "labels": list(HEAD_LABELS),
        },
        "selection": {
            "dev_mean_auprc": {name: round(score, 4) for name, score in dev_scores.items()},
            "dev_mean_auprc_own_examples": {
                name: None if np.isnan(score) else round(score, 4)
                for name, score in own_dev_scores.items()
            },
        },
        "calibration": (
            "Platt scaling per label on the dev split (scale and shift of the head logit)"
        ),
        "thresholds": {label: round(value, 4) for label, value in heads.thresholds().items()},
        "metrics": {
            "dev": label_metrics(heads, matrices[Split.DEV]),
            "test": label_metrics(heads, matrices[Split.TEST]),
            "calibration": {
                "expected_calibration_error_test": calibration_error(heads, matrices[Split.TEST]),
                "reliability_test": reliability(heads, matrices[Split.TEST]),
                "bins": CALIBRATION_BINS,
                "note": "every known (text, label) pair of the test split (the own examples' "
                "held-out part and the public sets' test splits), calibrated probability "
                "against the label",
            },
            "benign_flag_rate": {
                **{
                    f"tuning: {name}": flag_rate(heads, x)
                    for name, x in benign_tune_x.items()
                    if x.count  # a set the data lacks has no rate
                },
                **{
                    f"test: {name}": flag_rate(heads, x)
                    for name, x in benign_test_x.items()
                    if x.count
                },
            },
            "benign_flag_budget": {name: round(value, 4) for name, value in budgets.items()},
        },
        "data": {
            "files": [asdict(source) for source in corpus.files],
            "examples": {split.value: len(matrices[split].examples) for split in Split},
            "positives_train": _positive_counts(matrices[Split.TRAIN]),
            "measurement_only": [
                "refusal-direction harmless (CC-BY-NC-4.0 via Alpaca): threshold tuning "
                "and benign test only, never fitted"
            ],
            "notes": [
                "ToxiGen data (toxigen, toxigen-annotated) is released for research use.",
                "Self-harm, sexual, violence and illicit have little public labelled data "
                "here; the project's own hand-written examples "
                "(data/safety/own_examples.jsonl) fill that gap; their held-out part is "
                "the test split for those labels.",
                "AdvBench behaviours carry weak category labels from keyword rules "
                "(gateway/safety/training/corpus.py).",
                "Indirect-attack positives are deepset injections embedded in MT-Bench "
                "reference answers, plus own examples.",
            ],
        },
        "training": {
            "command": _command(),
            "code": _code_version(),
            "config": config.to_json(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    config.output_dir.mkdir(parents=True, exist_ok=True)
    heads.save(config.output_dir / "heads.safetensors")
    files = {"heads.safetensors": file_sha256(config.output_dir / "heads.safetensors")}
    stale = config.output_dir / "encoder_delta.safetensors"
    if delta_path is not None:
        shutil.copyfile(delta_path, stale)
        files[stale.name] = file_sha256(stale)
        card["encoder_delta"] = stale.name
    elif stale.exists():
        stale.unlink()
    card["files"] = files
    card["weights_sha256"] = files["heads.safetensors"]
    (config.output_dir / "model_card.json").write_text(
        json.dumps(card, indent=2, sort_keys=True) + "\n"
    )
    return card


def _command() -> str:
    """The command line this run was started with, as a user would type it."""
    program = Path(sys.argv[0]).name
    if program != "safegate":
        return "safegate safety train (called from Python: see config)"
    return shlex.join([program, *sys.argv[1:]])


def _code_version() -> str | None:
    """The git commit of the code that trained, with ``+changes`` when the checkout had
    uncommitted changes; None outside a git checkout. Training reads text as the engine
    folds it, so the same command on other code can train other weights."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str:
        return subprocess.run(  # noqa: S603 - git, in this package's own checkout
            ["git", "-C", str(root), *args],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+changes" if changed else commit


def _tune_encoder(config: TrainConfig, data: TuningData, progress: Progress | None) -> TunedEncoder:
    if config.tune_method == "lora":
        return tune(
            data,
            TuningConfig(
                encoder=config.encoder,
                work_dir=config.cache_dir,
                epochs=config.tune_epochs,
                rank=config.tune_rank,
                alpha=2 * config.tune_rank,
                seed=config.seed,
                max_steps=config.max_tune_steps,
            ),
            progress=progress,
        )
    return top_layers.tune(
        data,
        top_layers.TopLayersConfig(
            encoder=config.encoder,
            work_dir=config.cache_dir,
            top_layers=config.tune_layers,
            epochs=config.tune_epochs,
            seed=config.seed,
            max_steps=config.max_tune_steps,
        ),
        progress=progress,
    )


# -- data --------------------------------------------------------------------------------


def _benign_sets(
    config: TrainConfig, examples: Sequence[Example]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Benign texts for threshold tuning and for the benign test, by kind.

    refusal-direction's harmless prompts are measurement-only data: they constrain the
    thresholds and are never fitted. Every other set is the benign rows (no label
    positive, every label known) of one kind: tuned on their dev split and tested on their
    test split, never on what the heads were fitted on. The noise set leaves out the ROT13
    readings of harmful texts, which the engine decodes and must flag.
    """
    folder = config.data_dir / "refusal-direction"
    val = [row["instruction"] for row in json.loads((folder / "harmless_val.json").read_text())]
    test = [row["instruction"] for row in json.loads((folder / "harmless_test.json").read_text())]
    # The ROT13 noise of a harmful text is harmful as served: the engine decodes it.
    encoded_harm = {codecs.encode(e.text, "rot13") for e in examples if e.positives}
    benign = [e for e in examples if e.benign and e.text not in encoded_harm]
    kinds: dict[str, Callable[[Example], bool]] = {
        "own benign prompts": lambda e: e.source == "own" and e.direction == "prompt",
        "own benign replies": lambda e: e.source == "own" and e.direction == "reply",
        "public benign": lambda e: e.source not in {"own", "noise"},
        "noise": lambda e: e.source == "noise",
    }

    def of(split: Split) -> dict[str, list[str]]:
        return {
            name: [e.text for e in benign if e.split == split and kind(e)]
            for name, kind in kinds.items()
        }

    tune = {"refusal-direction harmless val": val[:2000]}
    tune.update({f"{name} dev": texts for name, texts in of(Split.DEV).items()})
    held = {"refusal-direction harmless test": test[:2000]}
    held.update({f"{name} held-out": texts for name, texts in of(Split.TEST).items()})
    return tune, held


def _benign_budgets(
    config: TrainConfig,
    benign_tune: dict[str, list[str]],
    frozen: Embed,
    progress: Progress | None,
    *,
    count_windows: Callable[[Sequence[str]], list[int]],
) -> dict[str, float]:
    """The share of each benign tuning set the new thresholds may flag: the budget, and
    with a reference no more than the reference's own rate on that set, served as its
    model card says (its chunking). ``frozen`` embeds with the plain encoder on
    ``config.backend``, which a reference without a delta on the same backend reads; any
    other reference is read with its own delta and backend, and a reference on the frozen
    and tuned pair with both embeddings side by side."""
    budgets = dict.fromkeys(benign_tune, config.benign_flag_budget)
    if config.benign_reference is None:
        return budgets
    folder = config.benign_reference
    heads_path = folder / "heads.safetensors"
    try:
        delta = verify_card_files(heads_path)
    except MemberLoadError as error:
        raise ValueError(
            f"benign reference {folder} does not match its model card: {error}"
        ) from error
    reference = Heads.load(heads_path)
    if reference.encoder != config.encoder:
        raise ValueError(
            f"benign reference {folder} uses {reference.encoder}, not {config.encoder}"
        )
    backend = card_value(heads_path, "backend", Backend.ONNX.value)

    def reader(with_delta: Path | None) -> Embed:
        if with_delta is None and backend == config.backend:
            return frozen
        return _embedder(_encoder(config, with_delta, backend), config.cache_dir, progress)

    embed = reader(delta)
    if card_value(heads_path, "inputs", "single") == "frozen+tuned":
        if delta is None:
            raise ValueError(f"benign reference {folder} reads a pair but ships no delta")
        embed = _side_by_side(reader(None), embed)
    chunking = card_value(heads_path, "chunking", "always")
    for name, texts in benign_tune.items():
        if texts:
            served = _served(texts, embed, chunking, count_windows)
            budgets[name] = min(budgets[name], flag_rate(reference, served))
    return budgets


def _side_by_side(frozen: Embed, tuned: Embed) -> Embed:
    """Embeddings for heads that read the frozen and the tuned encoder side by side."""

    def embed(texts: Sequence[str]) -> FloatArray:
        return np.hstack([frozen(texts), tuned(texts)])

    return embed


def _served(
    texts: Sequence[str],
    embed: Embed,
    chunking: str,
    count_windows: Callable[[Sequence[str]], list[int]],
) -> Served:
    """``texts`` as the engine scores them: every segment it reads, embedded (each
    segment's first window, as the training rows are)."""
    segments, owners = served_segments([normalize(text) for text in texts], chunking, count_windows)
    return Served(embed(segments), np.asarray(owners, dtype=np.int64), len(texts))


def _encoder(config: TrainConfig, delta: Path | None, backend: str) -> SentenceEncoder:
    """The encoder whose embeddings heads for ``backend`` are fitted on: torch for fp32
    (ONNX Runtime's fp32 graph matches it within 2e-6), on the GPU when there is one, and
    the quantised graph for q8 and int8 (ONNX Runtime on the CPU)."""
    if backend in (Backend.ONNX_Q8.value, Backend.ONNX_INT8.value):
        return SentenceEncoder(
            config.encoder, backend=Backend(backend), cache_dir=config.cache_dir, delta=delta
        )
    return SentenceEncoder(config.encoder, delta=delta, device=str(loop.training_device()))


def _embedder(encoder: SentenceEncoder, cache_dir: Path, progress: Progress | None) -> Embed:
    """Embeddings of the folded view, cached per encoder, window length, delta and
    backend (fp32 torch and ONNX share one cache: they match within 2e-6)."""
    delta = "" if encoder.delta is None else file_sha256(encoder.delta)
    key = f"{encoder.name}|{encoder.max_tokens}|{delta}"
    if encoder.backend is Backend.ONNX_INT8:
        key += "|int8-per-channel"
    elif encoder.backend is Backend.ONNX_Q8:
        key += f"|q8-block{Q8_BLOCK}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cached_embedder(
        cache_dir / f"embeddings-{tag}.npz",
        lambda texts: encoder.embed(texts, batch_size=32, first_window_only=True).vectors,
        view=lambda text: normalize(text).folded,
        dimension=encoder.dimension,
        progress=progress,
    )


def training_matrix(examples: Sequence[Example], embed: Embed, config: TrainConfig) -> Matrix:
    """Embeddings, labels, known-label mask and sample weights (own rows weigh
    ``config.own_weight``) of ``examples``."""
    index = {label: i for i, label in enumerate(HEAD_LABELS)}
    y = np.zeros((len(examples), len(HEAD_LABELS)), np.float32)
    known = np.zeros_like(y)
    weight = np.ones(len(examples), np.float32)
    for row, example in enumerate(examples):
        for label in example.known:
            known[row, index[label]] = 1.0
        for label in example.positives:
            y[row, index[label]] = 1.0
        if example.source == "own":
            weight[row] = config.own_weight
    return Matrix(embed([e.text for e in examples]), y, known, weight, list(examples))


def _own_rows(matrix: Matrix) -> Matrix:
    """The rows of ``matrix`` that are the project's own examples."""
    rows = np.array([e.source == "own" for e in matrix.examples], dtype=bool)
    return Matrix(
        matrix.x[rows],
        matrix.y[rows],
        matrix.known[rows],
        matrix.weight[rows],
        [e for e, own in zip(matrix.examples, rows, strict=True) if own],
    )


def _tuning_data(matrix: Matrix) -> TuningData:
    return TuningData(
        texts=[normalize(e.text).folded for e in matrix.examples],
        y=matrix.y,
        known=matrix.known,
        weight=matrix.weight,
    )


def _positive_counts(matrix: Matrix) -> dict[str, int]:
    return {label: int(matrix.y[:, i].sum()) for i, label in enumerate(HEAD_LABELS)}
