"""Detoxify (Unitary's Jigsaw toxicity models) as a member of the ensemble.

The member loads a Detoxify checkpoint through Detoxify's own API
(``detoxify.Detoxify``) and scores the ``folded`` view of each text. Detoxify's
outputs map onto safegate's labels as follows; where several outputs feed one label,
the label's score is the maximum of them.

=================  ==============================================  ============================
Detoxify output    safegate label(s)                               present in
=================  ==============================================  ============================
toxicity           ``harassment``                                  original, unbiased, multiling.
severe_toxicity    ``harassment``                                  original, unbiased, multiling.
insult             ``harassment``                                  original, unbiased, multiling.
threat             ``harassment/threatening`` and ``violence``     original, unbiased, multiling.
identity_attack    ``hate``                                        original, unbiased, multiling.
sexual_explicit    ``sexual``                                      unbiased, multilingual
obscene            ``profanity`` (``Shield.PROFANITY``)            original, unbiased, multiling.
=================  ==============================================  ============================

Only the outputs the loaded checkpoint has are mapped, so ``labels`` depends on the
checkpoint (``original`` has no ``sexual_explicit``, so it does not score ``sexual``).
Detoxify's older spellings (``toxic``, ``severe_toxic``, ``identity_hate``) are renamed by
Detoxify itself; outputs not in the table (the identity columns of ``unbiased``) are
ignored.

Checkpoints are pickles, and unpickling runs code, so a checkpoint loads only if its
sha256 is in ``allowed_sha256``. The file is read once, hashed, and the very bytes that
were hashed are what ``torch.load`` reads (an in-memory buffer, never the path again), so
the file cannot be swapped between the check and the load (loading therefore briefly
holds the checkpoint in memory twice, as bytes and as tensors). The official checkpoints
are downloaded into ``cache_dir`` from Detoxify's ``MODEL_URLS`` and checked the same way.

Workarounds for detoxify 0.5.x, all scoped to one load (see :func:`_detoxify_loading`):

* Detoxify asks the Hugging Face Hub for the config named by the checkpoint's
  ``model_type`` (``bert-base-uncased``...) even when ``huggingface_config_path`` is
  given (unitaryai/detoxify#126). With a config directory, the member points that lookup
  at the directory, so loading needs no network.
* transformers initialises missing weights at random and only logs it, so a checkpoint
  whose keys do not match the architecture would load as a random classifier. The member
  checks that every parameter of the model was in the checkpoint's state dict.
* detoxify 0.5.2 calls ``torch.load`` without ``weights_only``, which torch >= 2.6 turns
  into ``weights_only=True``; for the verified buffer only, the member supplies
  ``weights_only=False`` (0.5.3+ passes it itself, so there this changes nothing).

Every failure to load raises :class:`MemberLoadError`. The class is registered under
``MemberKind.DETOXIFY``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol
from urllib.parse import urlparse

import detoxify.detoxify as detoxify_lib
import torch

from gateway.safety.members import MEMBERS, MemberKind, MemberLoadError
from gateway.safety.normalize import NormalizedText
from gateway.safety.taxonomy import Category, Label, Shield
from gateway.safety.verdict import Detection

logger = logging.getLogger(__name__)

DEFAULT_ID: Final = "detoxify"
DEFAULT_MODEL_TYPE: Final = "original"
DEFAULT_DEVICE: Final = "cpu"
DEFAULT_BATCH_SIZE: Final = 16
DEFAULT_MAX_LENGTH: Final = 256  # tokens per text, [CLS] and [SEP] included
MODEL_TYPES: Final = frozenset({"original", "unbiased", "multilingual"})
_MIN_MAX_LENGTH: Final = 3  # [CLS], one token, [SEP]
_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")

# The table in the module docstring, as code.
OUTPUT_LABELS: Final[Mapping[str, tuple[Label, ...]]] = MappingProxyType(
    {
        "toxicity": (Category.HARASSMENT,),
        "severe_toxicity": (Category.HARASSMENT,),
        "insult": (Category.HARASSMENT,),
        "threat": (Category.HARASSMENT_THREATENING, Category.VIOLENCE),
        "identity_attack": (Category.HATE,),
        "sexual_explicit": (Category.SEXUAL,),
        "obscene": (Shield.PROFANITY,),
    }
)

# Loads swap module attributes for their duration; one load at a time.
_LOAD_LOCK = threading.Lock()


class _Detoxify(Protocol):
    """The part of ``detoxify.Detoxify`` the member uses."""

    class_names: list[str]
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer

    def predict(self, text: list[str]) -> dict[str, list[float] | float]: ...


class DetoxifyClassifier:
    """A Detoxify checkpoint, loaded once, scoring batches of texts (see module doc)."""

    def __init__(
        self,
        *,
        id: str = DEFAULT_ID,
        model_type: str = DEFAULT_MODEL_TYPE,
        checkpoint: Path | None = None,
        allowed_sha256: frozenset[str],
        huggingface_config_path: Path | None = None,
        cache_dir: Path | None = None,
        device: str = DEFAULT_DEVICE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        """Check the options, fetch or read the checkpoint, verify it, and load it.

        ``checkpoint`` None means Detoxify's official checkpoint for ``model_type``,
        downloaded into ``cache_dir`` (by default torch.hub's checkpoint directory, where
        Detoxify itself would put it). ``huggingface_config_path`` is a local directory
        with the transformer's ``config.json`` (declaring the checkpoint's number of
        outputs) and tokenizer files; without it transformers resolves them by name
        through its cache or the Hub. Raises :class:`MemberLoadError` on any failure.
        """
        if not id:
            raise MemberLoadError("a detoxify member needs a non-empty id")
        if model_type not in MODEL_TYPES:
            known = ", ".join(sorted(MODEL_TYPES))
            raise MemberLoadError(f"{id}: unknown model_type {model_type!r}; known: {known}")
        if batch_size < 1:
            raise MemberLoadError(f"{id}: batch_size must be at least 1, got {batch_size}")
        if max_length < _MIN_MAX_LENGTH:
            raise MemberLoadError(
                f"{id}: max_length must be at least {_MIN_MAX_LENGTH}, got {max_length}"
            )
        self._id = id
        self._allowed = _check_allowed(id, allowed_sha256)
        self._batch_size = batch_size
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise MemberLoadError(f"{id}: bad device {device!r}: {exc}") from exc
        if huggingface_config_path is not None and not huggingface_config_path.is_dir():
            raise MemberLoadError(
                f"{id}: huggingface_config_path {huggingface_config_path} is not a directory"
            )

        if checkpoint is None:
            path, downloaded = _fetch_official(id, model_type, cache_dir)
        else:
            path, downloaded = checkpoint, False
        data, sha256 = _read_verified(id, path, self._allowed, remove_if_refused=downloaded)

        try:
            with _detoxify_loading(huggingface_config_path, data) as buffer:
                loaded: _Detoxify = detoxify_lib.Detoxify(
                    model_type,
                    checkpoint=buffer,
                    device=device,
                    huggingface_config_path=(
                        None if huggingface_config_path is None else str(huggingface_config_path)
                    ),
                )
        except Exception as exc:
            raise MemberLoadError(f"{id}: detoxify could not load {path}: {exc}") from exc
        del data

        self._detoxify = loaded
        # Detoxify.predict mutates shared state on every call (model.eval(), the fast
        # tokenizer's truncation and padding settings; sharing a fast tokenizer across
        # threads has failed with "Already borrowed", huggingface/tokenizers#537), so
        # one forward pass at a time per member; the engine batches concurrent texts.
        self._predict_lock = threading.Lock()
        self._checkpoint = path
        self._sha256 = sha256
        self._sources = {
            name: OUTPUT_LABELS[name] for name in loaded.class_names if name in OUTPUT_LABELS
        }
        if not self._sources:
            raise MemberLoadError(
                f"{id}: checkpoint {path} has none of the outputs safegate maps "
                f"({', '.join(OUTPUT_LABELS)}); it has {loaded.class_names}"
            )
        self._labels = frozenset(label for labels in self._sources.values() for label in labels)
        _limit_length(id, loaded, max_length)
        logger.info(
            "detoxify member %s loaded %s (sha256 %s) on %s; outputs %s",
            id,
            path,
            sha256,
            device,
            ", ".join(self._sources),
        )

    @property
    def id(self) -> str:
        return self._id

    @property
    def labels(self) -> frozenset[Label]:
        return self._labels

    @property
    def checkpoint(self) -> Path:
        """The checkpoint file that was loaded."""
        return self._checkpoint

    @property
    def sha256(self) -> str:
        """The sha256 of the checkpoint that was loaded."""
        return self._sha256

    @property
    def class_names(self) -> tuple[str, ...]:
        """Detoxify's outputs for this checkpoint, in the checkpoint's order."""
        return tuple(self._detoxify.class_names)

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        """Score the ``folded`` view of each text, ``batch_size`` texts per forward pass."""
        folded = [text.folded for text in texts]
        detections: list[Detection] = []
        for start in range(0, len(folded), self._batch_size):
            batch = folded[start : start + self._batch_size]
            with self._predict_lock:
                raw = self._detoxify.predict(batch)
            columns = {name: _column(name, raw[name], len(batch)) for name in self._sources}
            for row in range(len(batch)):
                scores: dict[Label, float] = {}
                for name, labels in self._sources.items():
                    probability = _probability(name, columns[name][row])
                    for label in labels:
                        scores[label] = max(scores.get(label, 0.0), probability)
                detections.append(Detection(scores=scores))
        return detections


def _check_allowed(member: str, allowed_sha256: frozenset[str]) -> frozenset[str]:
    if isinstance(allowed_sha256, str) or not allowed_sha256:
        raise MemberLoadError(
            f"{member}: allowed_sha256 must be a non-empty set of sha256 digests: a "
            "Detoxify checkpoint is a pickle, and loading an unpinned pickle runs its code"
        )
    digests = frozenset(digest.strip().lower() for digest in allowed_sha256)
    bad = sorted(digest for digest in digests if not _SHA256.match(digest))
    if bad:
        raise MemberLoadError(f"{member}: not sha256 hex digests: {', '.join(bad)}")
    return digests


def _fetch_official(member: str, model_type: str, cache_dir: Path | None) -> tuple[Path, bool]:
    """Return the cached official checkpoint, downloading it first if it is missing.

    The second value says whether this call downloaded the file.
    """
    url = detoxify_lib.MODEL_URLS[model_type]
    directory = cache_dir if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    target = directory / Path(urlparse(url).path).name
    if target.is_file():
        return target, False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Writes to a temporary file next to the target and renames it when complete.
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as exc:
        raise MemberLoadError(f"{member}: could not download {url} to {target}: {exc}") from exc
    logger.info("detoxify member %s downloaded %s to %s", member, url, target)
    return target, True


def _read_verified(
    member: str, path: Path, allowed: frozenset[str], *, remove_if_refused: bool
) -> tuple[bytes, str]:
    """Read ``path`` and return its bytes and sha256 if the digest is allowed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MemberLoadError(f"{member}: cannot read checkpoint {path}: {exc}") from exc
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 not in allowed:
        if remove_if_refused:
            path.unlink(missing_ok=True)
        raise MemberLoadError(
            f"{member}: refusing checkpoint {path}: its sha256 {sha256} is not in allowed_sha256"
        )
    return data, sha256


@contextlib.contextmanager
def _detoxify_loading(config_dir: Path | None, data: bytes) -> Iterator[io.BytesIO]:
    """Yield a buffer of the verified checkpoint bytes for ``Detoxify(checkpoint=...)``.

    While the context is open (under a lock, one load at a time):

    * ``detoxify.detoxify.get_model_and_tokenizer`` is wrapped. With a config directory
      the wrapper passes the directory as ``model_type``, so Detoxify's
      ``config_class.from_pretrained(model_type, ...)`` reads it instead of asking the
      Hub (detoxify#126); Detoxify still builds the model from the directory and the
      checkpoint's state dict itself. The wrapper then checks that no weight was left at
      its random initialisation.
    * ``torch.load`` is wrapped so that a call on this buffer, and only on it, defaults
      to ``weights_only=False``. detoxify >= 0.5.3 passes ``weights_only=False`` itself
      (its checkpoints hold a config beside the weights), so there the wrapper changes
      nothing; detoxify 0.5.2, which the project still allows, passes nothing and would
      hit torch >= 2.6's ``weights_only=True`` default. Either way the full unpickler
      runs only on bytes whose sha256 was checked against the allow-list before this
      context was entered. Every other ``torch.load`` call passes through untouched.
    """
    original_build = getattr(detoxify_lib, "get_model_and_tokenizer", None)
    if original_build is None:
        raise RuntimeError(
            "this detoxify version has no get_model_and_tokenizer; safegate supports 0.5.x"
        )
    build: Callable[..., tuple[Any, Any]] = original_build
    buffer = io.BytesIO(data)

    def build_checked(
        model_type: str,
        model_name: str,
        tokenizer_name: str,
        num_classes: int,
        state_dict: Mapping[str, torch.Tensor],
        huggingface_config_path: str | None = None,
    ) -> tuple[Any, Any]:
        model, tokenizer = build(
            model_type if config_dir is None else str(config_dir),
            model_name,
            tokenizer_name,
            num_classes,
            state_dict,
            huggingface_config_path,
        )
        _check_weights_loaded(model, state_dict)
        return model, tokenizer

    original_load = torch.load

    def load_verified(f: object, *args: Any, **kwargs: Any) -> Any:
        if f is buffer:
            kwargs.setdefault("weights_only", False)
        return original_load(f, *args, **kwargs)  # type: ignore[arg-type]

    with _LOAD_LOCK:
        detoxify_lib.get_model_and_tokenizer = build_checked
        torch.load = load_verified
        try:
            yield buffer
        finally:
            torch.load = original_load
            detoxify_lib.get_model_and_tokenizer = original_build


# Pre-2019 checkpoints name LayerNorm parameters gamma/beta; transformers renames them.
_LEGACY_NAMES: Final = (
    ("LayerNorm.weight", "LayerNorm.gamma"),
    ("LayerNorm.bias", "LayerNorm.beta"),
)


def _check_weights_loaded(model: Any, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise if any parameter of ``model`` was not in ``state_dict``.

    transformers fills such parameters with random values and only logs a report, so a
    checkpoint whose keys do not match (a ``model.`` prefix, another architecture) would
    otherwise load as a classifier that scores at random.
    """
    missing: list[str] = []
    for name, _ in model.named_parameters():
        aliases = [name] + [name.replace(new, old) for new, old in _LEGACY_NAMES if new in name]
        if not any(alias in state_dict for alias in aliases):
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(
            f"the checkpoint's state dict lacks {len(missing)} of the model's weights "
            f"({shown}); they would be left random"
        )


def _limit_length(member: str, loaded: _Detoxify, max_length: int) -> None:
    """Make Detoxify's tokenizer truncate to ``max_length`` tokens.

    ``Detoxify.predict`` tokenizes with ``truncation=True`` and no explicit length, so the
    tokenizer's ``model_max_length`` is the limit; it must not exceed what the model's
    position embeddings (and its own tokenizer) allow.
    """
    limits = [int(loaded.model.config.max_position_embeddings)]
    tokenizer_limit = int(loaded.tokenizer.model_max_length)
    if tokenizer_limit < 1_000_000:  # transformers' "no limit" is a huge sentinel
        limits.append(tokenizer_limit)
    if max_length > min(limits):
        raise MemberLoadError(
            f"{member}: max_length {max_length} exceeds the model's limit of {min(limits)} tokens"
        )
    loaded.tokenizer.model_max_length = max_length


def _column(name: str, values: list[float] | float, expected: int) -> list[float]:
    """Detoxify squeezes a batch of one to a bare float; make every output a list."""
    column = [float(values)] if isinstance(values, int | float) else [float(v) for v in values]
    if len(column) != expected:
        raise RuntimeError(f"detoxify returned {len(column)} {name} scores for {expected} texts")
    return column


def _probability(name: str, value: float) -> float:
    if math.isnan(value):
        raise ValueError(f"detoxify returned NaN for {name}")
    return min(1.0, max(0.0, value))


MEMBERS.add(MemberKind.DETOXIFY, DetoxifyClassifier)
