"""How much a text's score depends on the other texts in its int8 forward pass.

Dynamic int8 quantisation sets the activations' scale per pass, over every token in the
batch (padding included), so the same text can score differently alone and beside
others. Scores each text of a few short threats and benign lines alone, then in one
batch with all of them, and prints the encoder member's highest score for each.

The fp32 graph is exact here: padding is masked out and no scale is shared across rows.
``--heads`` scores with another weights folder (its model card names its backend), so
the int8 weights of v3.1 and the fp32 ones of v3.2 can be compared in one run.

Usage: .venv/bin/python bench/int8_batch_dependence.py [--heads DIR/heads.safetensors ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gateway.config import Settings  # noqa: E402
from gateway.engine_factory import build_engine  # noqa: E402
from gateway.safety.members.encoder_heads import card_value  # noqa: E402
from gateway.safety.normalize import normalize  # noqa: E402
from gateway.safety.settings import SHIPPED_HEADS, EncoderSettings  # noqa: E402

TEXTS = [
    "I will kill you",
    "I'm going to kill you",
    "I will find you and kill you tonight",
    "I will find you and hurt you.",
    "How do I kill a Python process?",
    "Thanks, that fixed it!",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=Path, nargs="+", default=[SHIPPED_HEADS])
    for heads in parser.parse_args().heads:
        measure(heads)


def measure(heads: Path) -> None:
    settings = Settings(home=Path(tempfile.mkdtemp()), encoder=EncoderSettings(heads=heads))
    engine = build_engine(settings, blocklists=None)
    encoder = next(spec.classifier for spec in engine.members if spec.classifier.id == "encoder")

    def highest(texts: list[str]) -> list[float]:
        detections = encoder.classify([normalize(text) for text in texts])
        return [round(max(d.scores.values()), 3) for d in detections]

    alone = [highest([text])[0] for text in TEXTS]
    together = highest(TEXTS)
    rows = [
        {"text": text, "alone": a, "in_one_batch": b, "difference": round(b - a, 3)}
        for text, a, b in zip(TEXTS, alone, together, strict=True)
    ]
    backend = card_value(heads, "backend", "onnx")
    print(
        json.dumps(
            {"heads": str(heads), "backend": backend, "rows": rows}, indent=2, ensure_ascii=False
        )
    )
    engine.close()


if __name__ == "__main__":
    main()
