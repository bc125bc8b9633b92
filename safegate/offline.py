"""Defaults that keep safegate off the network unless a user asks for it.

Set before transformers, huggingface_hub or litellm is imported: no hub downloads (a hub
id can still be used with ``HF_HUB_OFFLINE=0``), litellm's bundled price map instead of
fetching one at import, and no tokenizer thread pools fighting the engine's. Values the
environment already holds win, so ``HF_HUB_OFFLINE=0`` lets a hub id download. The
one place the code sets them (tests/conftest.py and the Makefile set them for tests).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "TOKENIZERS_PARALLELISM": "false",
}


def offline_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set each of ``OFFLINE_DEFAULTS`` that ``environ`` does not set already."""
    for name, value in OFFLINE_DEFAULTS.items():
        environ.setdefault(name, value)
