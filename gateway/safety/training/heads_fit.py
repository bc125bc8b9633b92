"""Fit, calibrate, tune and measure label heads on embeddings.

Shared by the English heads (``train``) and the multilingual ones (``multilingual``). A
``Matrix`` holds one split: embeddings, labels, the known-label mask and row weights.
``fit`` trains a linear head or a one-hidden-layer MLP with the masked, weighted binary
cross-entropy of ``loop``; ``averaged`` joins two fitted heads that read two embeddings
side by side into one whose logits are their mean; ``calibrate`` fits Platt scaling per
label on dev and packs the result as ``Heads``; ``tune_thresholds`` picks each label's
threshold on dev under the benign sets' budgets; the rest measure (AUPRC, per-label
metrics, calibration, flag rates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, precision_recall_curve

from gateway.safety.heads import Heads
from gateway.safety.members.encoder_heads import highest_per_text
from gateway.safety.training.corpus import HEAD_LABELS, Example
from gateway.safety.training.loop import masked_loss, positive_weight

FloatArray = npt.NDArray[np.float32]


@dataclass
class Matrix:
    """One split: embeddings ``x``, labels ``y``, known-label mask, row weights, examples."""

    x: FloatArray
    y: FloatArray
    known: FloatArray
    weight: FloatArray
    examples: list[Example]


@dataclass(frozen=True)
class Served:
    """A set of texts as the engine scores them: the embedding of every segment it reads
    (the text, its sentence chunks, its decoded views: ``encoder_heads.served_segments``),
    the text each segment belongs to, and the number of texts. A text's probability per
    label is the highest of its segments'."""

    x: FloatArray
    owner: npt.NDArray[np.int64]
    count: int

    @classmethod
    def whole(cls, x: FloatArray) -> Served:
        """Texts read as one segment each."""
        return cls(x, np.arange(len(x), dtype=np.int64), len(x))

    def probabilities(self, heads: Heads) -> FloatArray:
        return highest_per_text(heads.probabilities(self.x), self.owner, self.count)


class FitRecipe(Protocol):
    """The options ``fit`` reads (``train.TrainConfig`` has them)."""

    @property
    def seed(self) -> int: ...
    @property
    def epochs(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def max_pos_weight(self) -> float: ...


# -- fitting -----------------------------------------------------------------------------


def fit(matrix: Matrix, hidden: int, config: FitRecipe) -> torch.nn.Module:
    """A linear head (``hidden`` 0) or an MLP with ``hidden`` units, fitted on ``matrix``."""
    torch.manual_seed(config.seed)
    dimension, labels = matrix.x.shape[1], matrix.y.shape[1]
    layers: list[torch.nn.Module] = []
    if hidden:
        layers += [torch.nn.Linear(dimension, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1)]
    layers.append(torch.nn.Linear(hidden or dimension, labels))
    model = torch.nn.Sequential(*layers)
    x, y = torch.from_numpy(matrix.x), torch.from_numpy(matrix.y)
    known, weight = torch.from_numpy(matrix.known), torch.from_numpy(matrix.weight)
    pos_weight = positive_weight(y, known, config.max_pos_weight)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    batch = 256
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            loss = masked_loss(model(x[index]), y[index], known[index], weight[index], pos_weight)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    return model.eval()


def averaged(first: torch.nn.Module, second: torch.nn.Module) -> torch.nn.Sequential:
    """One MLP over two embeddings side by side (``first``'s input, then ``second``'s)
    whose logits are the mean of the two MLPs' logits: their hidden layers on the
    diagonal of one block matrix, their output layers halved and joined."""
    (hidden_a, out_a), (hidden_b, out_b) = (_mlp_layers(first), _mlp_layers(second))
    rows_a, columns_a = hidden_a.weight.shape
    rows_b, columns_b = hidden_b.weight.shape
    hidden = torch.nn.Linear(columns_a + columns_b, rows_a + rows_b)
    out = torch.nn.Linear(rows_a + rows_b, out_a.weight.shape[0])
    with torch.no_grad():
        hidden.weight.zero_()
        hidden.weight[:rows_a, :columns_a] = hidden_a.weight
        hidden.weight[rows_a:, columns_a:] = hidden_b.weight
        hidden.bias.copy_(torch.cat([hidden_a.bias, hidden_b.bias]))
        out.weight.copy_(torch.cat([out_a.weight, out_b.weight], dim=1) / 2)
        out.bias.copy_((out_a.bias + out_b.bias) / 2)
    return torch.nn.Sequential(hidden, torch.nn.ReLU(), out).eval()


def _mlp_layers(model: torch.nn.Module) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    linear = [layer for layer in model.modules() if isinstance(layer, torch.nn.Linear)]
    if len(linear) != 2:
        raise ValueError(f"expected an MLP with one hidden layer, got {len(linear)} linear layers")
    return linear[0], linear[1]


def joined(first: Matrix, second: Matrix) -> Matrix:
    """The same rows with ``first``'s and ``second``'s embeddings side by side."""
    if first.examples is not second.examples and first.examples != second.examples:
        raise ValueError("the two matrices hold different rows")
    return Matrix(
        np.hstack([first.x, second.x]), first.y, first.known, first.weight, first.examples
    )


def head_logits(model: torch.nn.Module, x: FloatArray) -> FloatArray:
    with torch.inference_mode():
        logits: FloatArray = model(torch.from_numpy(x)).numpy()
    return logits


def mean_auprc(model: torch.nn.Module, matrix: Matrix) -> float:
    logits = head_logits(model, matrix.x)
    scores = []
    for i in range(len(HEAD_LABELS)):
        mask = matrix.known[:, i] > 0
        if matrix.y[mask, i].sum() >= 3 and (1 - matrix.y[mask, i]).sum() >= 3:
            scores.append(average_precision_score(matrix.y[mask, i], logits[mask, i]))
    return float(np.mean(scores)) if scores else float("nan")


def calibrate(model: torch.nn.Module, dev: Matrix, *, encoder: str) -> Heads:
    linear_layers = [layer for layer in model.modules() if isinstance(layer, torch.nn.Linear)]
    out = linear_layers[-1]
    hidden = linear_layers[0] if len(linear_layers) > 1 else None
    logits = head_logits(model, dev.x)
    scale = np.ones(len(HEAD_LABELS), np.float32)
    shift = np.zeros(len(HEAD_LABELS), np.float32)
    for i in range(len(HEAD_LABELS)):
        mask = dev.known[:, i] > 0
        target = dev.y[mask, i]
        if target.sum() < 3 or (1 - target).sum() < 3:
            continue  # too few dev examples to fit; keep the identity calibration
        platt = LogisticRegression(C=1e4).fit(logits[mask, i, None], target)
        scale[i], shift[i] = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    return Heads(
        labels=HEAD_LABELS,
        encoder=encoder,
        out_weight=out.weight.detach().numpy().astype(np.float32),
        out_bias=out.bias.detach().numpy().astype(np.float32),
        calib_scale=scale,
        calib_shift=shift,
        threshold=np.full(len(HEAD_LABELS), 0.5, np.float32),
        hidden_weight=None if hidden is None else hidden.weight.detach().numpy().astype(np.float32),
        hidden_bias=None if hidden is None else hidden.bias.detach().numpy().astype(np.float32),
    )


def tune_thresholds(
    heads: Heads, dev: Matrix, benign_sets: Sequence[Served], budgets: Sequence[float]
) -> Heads:
    """Each label's best-F1 threshold on dev, raised until each benign set, scored as the
    engine serves it, is flagged at most its own budget (a share of its texts)."""
    probabilities = heads.probabilities(dev.x)
    thresholds = np.full(len(heads.labels), 0.5, np.float32)
    for i in range(len(heads.labels)):
        mask = dev.known[:, i] > 0
        target = dev.y[mask, i]
        if target.sum() < 3:
            continue
        precision, recall, cuts = precision_recall_curve(target, probabilities[mask, i])
        f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-9, None)
        # Never below 0.3: a calibrated score under that is more likely benign than not.
        thresholds[i] = float(np.clip(cuts[int(np.argmax(f1))], 0.3, 0.95))
    # Raise one label's threshold at a time until every benign set is within its budget.
    # Each raise serves the set furthest over its budget and picks the label that buys the
    # most for the least: it goes just past the lowest of that set's texts that only this
    # label flags, and the value is the texts it clears per share of the label's dev
    # positives it loses on the way. A label whose raise costs no positive goes first.
    # When every flagged text is flagged by several labels, the label flagging most of
    # them rises one step.
    sets = [(x, b) for x, b in zip(benign_sets, budgets, strict=True) if x.count]
    benign_p = [x.probabilities(heads) for x, _ in sets]
    positives = [
        probabilities[(dev.known[:, i] > 0) & (dev.y[:, i] > 0), i]
        for i in range(len(heads.labels))
    ]
    for _ in range(20_000):
        excess = [
            (p >= thresholds).any(axis=1).mean() - budget
            for p, (_, budget) in zip(benign_p, sets, strict=True)
        ]
        worst = int(np.argmax(excess))
        if excess[worst] <= 1e-9:
            break
        label, raised = _cheapest_raise(benign_p[worst], thresholds, positives)
        thresholds[label] = raised
    return Heads(**{**heads.__dict__, "threshold": thresholds})


_STEP = 0.01
_CEILING = 0.99


def _cheapest_raise(
    benign: FloatArray, thresholds: FloatArray, positives: Sequence[FloatArray]
) -> tuple[int, float]:
    """The label to raise and its new threshold: see ``tune_thresholds``."""
    flags = benign >= thresholds
    alone = flags & (flags.sum(axis=1) == 1)[:, None]
    best, best_value, best_threshold = -1, 0.0, 0.0
    for i in range(benign.shape[1]):
        if not alone[:, i].any() or thresholds[i] >= _CEILING:
            continue
        lowest = float(benign[alone[:, i], i].min())
        raised = min(_CEILING, lowest + 1e-4)
        cleared = int((alone[:, i] & (benign[:, i] < raised)).sum())
        lost = ((positives[i] >= thresholds[i]) & (positives[i] < raised)).sum()
        value = cleared / (lost / max(len(positives[i]), 1) + 1e-3)
        if value > best_value:
            best, best_value, best_threshold = i, value, raised
    if best >= 0:
        return best, best_threshold
    counts = np.where(thresholds < _CEILING, flags.sum(axis=0), -1)
    label = int(np.argmax(counts))
    return label, min(_CEILING, float(thresholds[label]) + _STEP)


# -- measuring ---------------------------------------------------------------------------


def label_metrics(heads: Heads, matrix: Matrix) -> dict[str, dict[str, float | int]]:
    probabilities = heads.probabilities(matrix.x)
    out: dict[str, dict[str, float | int]] = {}
    for i, label in enumerate(heads.labels):
        mask = matrix.known[:, i] > 0
        target = matrix.y[mask, i]
        predicted = probabilities[mask, i] >= heads.threshold[i]
        positives = int(target.sum())
        row: dict[str, float | int] = {
            "positives": positives,
            "negatives": int(len(target) - positives),
        }
        if positives and positives < len(target):
            true_pos = int((predicted & (target > 0)).sum())
            precision = true_pos / max(int(predicted.sum()), 1)
            recall = true_pos / positives
            row["auprc"] = round(float(average_precision_score(target, probabilities[mask, i])), 4)
            row["f1"] = round(2 * precision * recall / max(precision + recall, 1e-9), 4)
            row["false_positive_rate"] = round(
                float((predicted & (target == 0)).sum() / (len(target) - positives)), 4
            )
        out[label] = row
    return out


CALIBRATION_BINS = 10


def _known_pairs(heads: Heads, matrix: Matrix) -> tuple[FloatArray, FloatArray]:
    probabilities = heads.probabilities(matrix.x)
    mask = matrix.known > 0
    return probabilities[mask], matrix.y[mask]


def reliability(heads: Heads, matrix: Matrix) -> list[dict[str, float | int]]:
    """Per probability bin: how many pairs, their mean score, and how many were positive."""
    scores, truth = _known_pairs(heads, matrix)
    bins = np.minimum((scores * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    rows: list[dict[str, float | int]] = []
    for b in range(CALIBRATION_BINS):
        chosen = bins == b
        if chosen.any():
            rows.append(
                {
                    "bin": round(b / CALIBRATION_BINS, 2),
                    "pairs": int(chosen.sum()),
                    "mean_score": round(float(scores[chosen].mean()), 4),
                    "positive_rate": round(float(truth[chosen].mean()), 4),
                }
            )
    return rows


def calibration_error(heads: Heads, matrix: Matrix) -> float:
    """Expected calibration error over ``CALIBRATION_BINS`` equal-width bins."""
    scores, _ = _known_pairs(heads, matrix)
    total = len(scores)
    if not total:
        return 0.0
    error = sum(
        row["pairs"] / total * abs(float(row["mean_score"]) - float(row["positive_rate"]))
        for row in reliability(heads, matrix)
    )
    return round(float(error), 4)


def flag_rate(heads: Heads, texts: Served) -> float:
    """The share of ``texts`` flagged on any label, scored as the engine serves them."""
    return round(float((texts.probabilities(heads) >= heads.threshold).any(axis=1).mean()), 4)
