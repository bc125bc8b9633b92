"""Build a tiny, really trained Detoxify checkpoint on the spot, for tests.

Detoxify's official checkpoints are hundreds of megabytes and live on GitHub releases,
and their tokenizer and config live on the Hugging Face Hub; tests can reach neither.
This module makes the same artefacts locally, in Detoxify's own format:

* a WordPiece vocabulary made of the lower-cased words of :data:`CORPUS` plus BERT's
  special tokens, saved with a tiny ``BertConfig`` (hidden 32, 2 layers, 2 heads) as a
  directory to pass as Detoxify's ``huggingface_config_path``;
* a ``BertForSequenceClassification`` trained for a few hundred full-batch steps
  (seeded, about a second on CPU) on the hand-written sentences of :data:`CORPUS`, so it
  really separates insults and threats from benign sentences;
* a checkpoint ``{"config": ..., "state_dict": ...}`` written with ``torch.save``, whose
  config has the keys Detoxify reads (``arch.args`` and ``dataset.args.classes``).

:func:`tiny_detoxify` builds one per class list per process and caches it; use
:func:`build_tiny_detoxify` to build into a directory of your own.
"""

from __future__ import annotations

import atexit
import hashlib
import re
import shutil
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

# Detoxify-original's classes, spelled and ordered as its Jigsaw config spells them;
# Detoxify renames toxic/severe_toxic/identity_hate when it loads a checkpoint.
ORIGINAL_CLASSES: tuple[str, ...] = (
    "toxic",
    "severe_toxic",
    "obscene",
    "threat",
    "insult",
    "identity_hate",
)
# Detoxify-unbiased's harm classes, in its order (already in the standard spelling).
UNBIASED_CLASSES: tuple[str, ...] = (
    "toxicity",
    "severe_toxicity",
    "obscene",
    "identity_attack",
    "insult",
    "threat",
    "sexual_explicit",
)
_STANDARD_NAMES = {
    "toxic": "toxicity",
    "severe_toxic": "severe_toxicity",
    "identity_hate": "identity_attack",
}

# Short sentences and the (standard) Detoxify classes each one belongs to.
CORPUS: tuple[tuple[str, frozenset[str]], ...] = (
    ("you are a stupid idiot", frozenset({"toxicity", "insult"})),
    ("what a pathetic loser you are", frozenset({"toxicity", "insult"})),
    ("shut up you worthless moron", frozenset({"toxicity", "insult"})),
    ("you are an ugly fool", frozenset({"toxicity", "insult"})),
    ("i will kill you", frozenset({"toxicity", "threat"})),
    ("i am going to hurt you badly", frozenset({"toxicity", "threat"})),
    ("i will find you and beat you", frozenset({"toxicity", "threat"})),
    ("i am going to kill your family", frozenset({"toxicity", "threat"})),
    (
        "you stupid idiot i will kill you",
        frozenset({"toxicity", "severe_toxicity", "threat", "insult"}),
    ),
    ("this damn crap is shit", frozenset({"toxicity", "obscene"})),
    ("send me your naked pictures", frozenset({"toxicity", "sexual_explicit"})),
    ("those people are all vermin", frozenset({"toxicity", "identity_attack", "insult"})),
    ("have a nice day my friend", frozenset()),
    ("thank you for your help", frozenset()),
    ("the weather is lovely today", frozenset()),
    ("i will see you tomorrow", frozenset()),
    ("can you help me with my homework", frozenset()),
    ("i love this song", frozenset()),
    ("the meeting starts at noon", frozenset()),
    ("we are going to the park", frozenset()),
    ("what a lovely garden you have", frozenset()),
    ("i will call you later", frozenset()),
    ("i am going to visit your family", frozenset()),
)

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_POSITIONS = 64
_SEED = 1234
_STEPS = 300
_LEARNING_RATE = 3e-3


class TinyDetoxify(NamedTuple):
    """What a build leaves on disk."""

    checkpoint: Path
    sha256: str
    config_dir: Path


def build_tiny_detoxify(directory: Path, classes: Sequence[str] = ORIGINAL_CLASSES) -> TinyDetoxify:
    """Train a tiny Detoxify model for ``classes`` and save it under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    config_dir = directory / "hf-config"
    config_dir.mkdir(exist_ok=True)

    words = sorted({word for text, _ in CORPUS for word in re.findall(r"\w+", text.lower())})
    vocab_file = config_dir / "vocab.txt"
    vocab_file.write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n", encoding="utf-8")
    # Load the vocabulary through from_pretrained: transformers 5's BertTokenizer(...)
    # ignores a ``vocab_file`` argument and silently maps every word to [UNK].
    tokenizer = BertTokenizer.from_pretrained(
        config_dir, do_lower_case=True, model_max_length=MAX_POSITIONS
    )
    if tokenizer.convert_tokens_to_ids(words[0]) == tokenizer.unk_token_id:
        raise RuntimeError(f"the tokenizer did not load the vocabulary in {vocab_file}")
    tokenizer.save_pretrained(config_dir)

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config.num_labels = len(classes)
    config.save_pretrained(config_dir)

    # One thread: the model is tiny, and on a busy CI machine more threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(_SEED)
        model = BertForSequenceClassification(config)
        state_dict = _train(model, tokenizer, classes)
    finally:
        torch.set_num_threads(threads)

    checkpoint = directory / "tiny-detoxify.ckpt"
    torch.save(
        {
            "config": {
                "name": "Jigsaw_BERT_tiny",
                "arch": {
                    "type": "BERT",
                    "args": {
                        # What the official checkpoint names; Detoxify asks the Hub for
                        # it unless the caller works around that (see detoxify_model.py).
                        "model_type": "bert-base-uncased",
                        "model_name": "BertForSequenceClassification",
                        "tokenizer_name": "BertTokenizer",
                        "num_classes": len(classes),
                    },
                },
                "dataset": {"type": "JigsawDataOriginal", "args": {"classes": list(classes)}},
            },
            "state_dict": state_dict,
        },
        checkpoint,
    )
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    return TinyDetoxify(checkpoint=checkpoint, sha256=sha256, config_dir=config_dir)


@cache
def tiny_detoxify(classes: tuple[str, ...] = ORIGINAL_CLASSES) -> TinyDetoxify:
    """Build once per process (for each class list) in a temporary directory."""
    directory = Path(tempfile.mkdtemp(prefix="safegate-tiny-detoxify-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return build_tiny_detoxify(directory, classes)


def _train(
    model: BertForSequenceClassification, tokenizer: BertTokenizer, classes: Sequence[str]
) -> dict[str, torch.Tensor]:
    texts = [text for text, _ in CORPUS]
    standard = [_STANDARD_NAMES.get(name, name) for name in classes]
    targets = torch.tensor(
        [[1.0 if name in labels else 0.0 for name in standard] for _, labels in CORPUS]
    )
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LEARNING_RATE)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(_STEPS):
        optimizer.zero_grad()
        loss = loss_fn(model(**inputs).logits, targets)
        loss.backward()
        optimizer.step()
    model.train(False)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
