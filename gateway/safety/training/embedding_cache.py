"""Embeddings cached on disk by text hash, so each text is embedded once per encoder.

The English heads (``train``) and the multilingual ones (``multilingual``) both embed
every text of a run with a frozen encoder, and embed the same texts again on the next
run. ``cached_embedder`` keeps the vectors in one ``.npz`` file (arrays ``keys``, the
sha256 of the view of the text the encoder read, and ``vectors``), saved as it goes so an
interrupted run resumes where it stopped. The caller names the file (one per encoder and
delta) and chooses the view.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.safety.training.loop import Progress

FloatArray = npt.NDArray[np.float32]
Embed = Callable[[Sequence[str]], FloatArray]


def cached_embedder(
    path: Path,
    encode: Callable[[list[str]], FloatArray],
    *,
    view: Callable[[str], str],
    dimension: int,
    progress: Progress | None = None,
    stage: str = "embedding",
    chunk: int = 512,
    save_every: int = 8,
    longest_first: bool = True,
) -> Embed:
    """``embed(texts)``: the vector of ``view(text)`` for each text, from the cache file
    at ``path`` or from ``encode``, which gets the missing ones ``chunk`` at a time
    (longest first with ``longest_first``, so each batch pads little). The file is saved
    every ``save_every`` chunks and after the last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cache: dict[str, FloatArray] = {}
    if path.exists():
        with np.load(path) as stored:
            cache = dict(zip(stored["keys"].tolist(), stored["vectors"], strict=True))

    def save() -> None:
        np.savez(path, keys=np.array(list(cache)), vectors=np.stack(list(cache.values())))

    def embed(texts: Sequence[str]) -> FloatArray:
        viewed = [view(text) for text in texts]
        keys = [hashlib.sha256(text.encode()).hexdigest() for text in viewed]
        pending = {key: text for key, text in zip(keys, viewed, strict=True) if key not in cache}
        missing = list(pending.items())
        if longest_first:
            missing.sort(key=lambda item: -len(item[1]))
        for number, start in enumerate(range(0, len(missing), chunk)):
            part = missing[start : start + chunk]
            cache.update(zip([key for key, _ in part], encode([t for _, t in part]), strict=True))
            if number % save_every == save_every - 1 or start + chunk >= len(missing):
                save()
            if progress:
                progress(stage, start + len(part), len(missing))
        if not keys:
            return np.zeros((0, dimension), np.float32)
        return np.stack([cache[key] for key in keys])

    return embed
