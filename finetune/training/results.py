"""What a training run reports: ``results.csv`` (one row per logging step, Azure AI
Foundry's columns plus safegate's) and the adapter's ``metrics.json``.

``results_row`` turns one Trainer log into the columns it holds; the callbacks
(``finetune.training.callbacks``) write the rows, the dashboard reads them.
"""

from __future__ import annotations

import math
from typing import Any

METRICS_FILE = "metrics.json"
METRICS_SCHEMA_VERSION = 1
RESULTS_FILE = "results.csv"
RESULTS_COLUMNS = (
    # Azure AI Foundry's results.csv, in its order ...
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
    # ... and safegate's additions
    "epoch",
    "learning_rate",
    "train_perplexity",
    "valid_perplexity",
    "full_valid_perplexity",
)
# Trainer log keys -> results.csv columns
_LOG_COLUMNS = {
    "loss": "train_loss",
    "mean_token_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
    "eval_loss": "full_valid_loss",
    "eval_mean_token_accuracy": "full_valid_mean_token_accuracy",
    "learning_rate": "learning_rate",
    "epoch": "epoch",
}
_PERPLEXITY = {
    "train_loss": "train_perplexity",
    "valid_loss": "valid_perplexity",
    "full_valid_loss": "full_valid_perplexity",
}
_MAX_PERPLEXITY_LOSS = 50.0  # exp() of a larger loss is reported as inf, not an overflow


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < _MAX_PERPLEXITY_LOSS else math.inf


def results_row(step: int, logs: dict[str, float]) -> dict[str, Any]:
    """The results.csv columns found in one Trainer log (empty if none)."""
    row: dict[str, Any] = {}
    for key, column in _LOG_COLUMNS.items():
        if key in logs:
            row[column] = logs[key]
    if not set(row) - {"epoch", "learning_rate"}:
        return {}
    for loss, column in _PERPLEXITY.items():
        if loss in row:
            row[column] = perplexity(row[loss])
    row["step"] = step
    return row


def rounded(row: dict[str, Any]) -> dict[str, Any]:
    """Finite floats to 6 places (what results.csv and metrics.json store); the rest as is."""
    return {
        key: round(value, 6) if isinstance(value, float) and math.isfinite(value) else value
        for key, value in row.items()
    }
