"""The Detoxify member, on a tiny checkpoint trained by the test session itself.

Detoxify's official checkpoints (GitHub releases) and configs (Hugging Face Hub) are not
reachable from tests; ``tiny_detoxify`` trains a small BERT in Detoxify's checkpoint
format instead, so the member is tested through Detoxify's real loading and prediction
code, with real text.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import detoxify.detoxify as detoxify_lib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.safety.classifier import Classifier
from gateway.safety.members import MEMBERS, MemberKind, MemberLoadError
from gateway.safety.members.detoxify_model import DetoxifyClassifier
from gateway.safety.normalize import normalize
from gateway.safety.taxonomy import Category, Label, Shield
from tests.gateway.safety.tiny_detoxify import (
    CORPUS,
    MAX_POSITIONS,
    UNBIASED_CLASSES,
    TinyDetoxify,
    tiny_detoxify,
)

ORIGINAL_LABELS = frozenset(
    {
        Category.HARASSMENT,
        Category.HARASSMENT_THREATENING,
        Category.VIOLENCE,
        Category.HATE,
        Shield.PROFANITY,
    }
)
MAX_LENGTH = 48  # within the tiny model's 64 positions
THREATENING_INSULT = "you worthless idiot i will kill you"  # not in CORPUS, its words are
BENIGN = "thank you for your help"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The model is tiny: with several intra-op threads on a busy machine each forward
    # pass spends ~100x longer waiting on threads than computing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny() -> TinyDetoxify:
    return tiny_detoxify()


@pytest.fixture(scope="session")
def member(tiny: TinyDetoxify) -> DetoxifyClassifier:
    return _member(tiny)


def _member(tiny: TinyDetoxify, **options: Any) -> DetoxifyClassifier:
    settings: dict[str, Any] = {
        "checkpoint": tiny.checkpoint,
        "allowed_sha256": frozenset({tiny.sha256}),
        "huggingface_config_path": tiny.config_dir,
        "max_length": MAX_LENGTH,
    }
    settings.update(options)
    return DetoxifyClassifier(**settings)


def _fail_if_called(what: str) -> Callable[..., Any]:
    def fail(*args: object, **kwargs: object) -> Any:
        pytest.fail(f"{what} was called")

    return fail


# --- the pickle gate ---------------------------------------------------------------


def test_checkpoint_with_unlisted_sha256_is_refused_before_torch_load(
    tiny: TinyDetoxify, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "load", _fail_if_called("torch.load"))
    other = hashlib.sha256(b"another checkpoint").hexdigest()

    with pytest.raises(MemberLoadError) as refused:
        _member(tiny, allowed_sha256=frozenset({other}))

    message = str(refused.value)
    assert str(tiny.checkpoint) in message
    assert tiny.sha256 in message


def test_allowed_checkpoint_loads_through_detoxify_from_the_verified_bytes(
    tiny: TinyDetoxify, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[detoxify_lib.Detoxify] = []
    build_model = detoxify_lib.get_model_and_tokenizer
    loads: list[tuple[object, object]] = []
    real_load = torch.load

    class RecordingDetoxify(detoxify_lib.Detoxify):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    def recording_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append((f, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(detoxify_lib, "Detoxify", RecordingDetoxify)
    monkeypatch.setattr(torch, "load", recording_load)

    loaded = _member(tiny)

    assert len(built) == 1
    assert built[0].class_names == list(loaded.class_names)
    # torch.load read an in-memory copy of the hashed bytes, not the path again.
    assert len(loads) == 1
    source, weights_only = loads[0]
    assert isinstance(source, io.BytesIO)
    assert hashlib.sha256(source.getvalue()).hexdigest() == tiny.sha256
    assert weights_only is False
    assert loaded.sha256 == tiny.sha256
    # The scoped patches are gone once loading is over.
    assert torch.load is recording_load
    assert detoxify_lib.get_model_and_tokenizer is build_model


def test_empty_allow_list_is_refused_at_construction(tiny: TinyDetoxify) -> None:
    with pytest.raises(MemberLoadError, match="allowed_sha256"):
        _member(tiny, allowed_sha256=frozenset())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"allowed_sha256": frozenset({"abc123"})}, "not sha256 hex digests"),
        ({"model_type": "original-small"}, "unknown model_type"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 2}, "max_length"),
        ({"id": ""}, "non-empty id"),
        ({"device": "not-a-device"}, "bad device"),
    ],
)
def test_bad_options_are_refused(tiny: TinyDetoxify, options: dict[str, Any], message: str) -> None:
    with pytest.raises(MemberLoadError, match=message):
        _member(tiny, **options)


def test_missing_checkpoint_is_refused_naming_the_path(tiny: TinyDetoxify, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "toxic.ckpt"

    with pytest.raises(MemberLoadError, match="cannot read checkpoint") as refused:
        _member(tiny, checkpoint=missing)

    assert str(missing) in str(refused.value)


def test_state_dict_that_does_not_fit_the_model_is_refused(
    tiny: TinyDetoxify, tmp_path: Path
) -> None:
    # Keys under a prefix: transformers would leave every weight random and only log it.
    loaded = torch.load(tiny.checkpoint, weights_only=True)
    loaded["state_dict"] = {f"model.{key}": value for key, value in loaded["state_dict"].items()}
    shifted = tmp_path / "prefixed.ckpt"
    torch.save(loaded, shifted)
    sha256 = hashlib.sha256(shifted.read_bytes()).hexdigest()

    with pytest.raises(MemberLoadError, match="left random"):
        _member(tiny, checkpoint=shifted, allowed_sha256=frozenset({sha256}))


def test_max_length_beyond_the_model_is_refused(tiny: TinyDetoxify) -> None:
    with pytest.raises(MemberLoadError, match=f"limit of {MAX_POSITIONS} tokens"):
        _member(tiny, max_length=MAX_POSITIONS + 1)


# --- official checkpoints: the download is the only replaced edge -----------------------


def test_official_checkpoint_is_downloaded_into_the_cache_and_verified(
    tiny: TinyDetoxify, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requested: list[str] = []

    def download(url: str, dst: str, *args: object, **kwargs: object) -> None:
        requested.append(url)
        shutil.copyfile(tiny.checkpoint, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)

    loaded = _member(tiny, checkpoint=None, model_type="original", cache_dir=tmp_path)

    assert requested == [detoxify_lib.MODEL_URLS["original"]]
    assert loaded.checkpoint == tmp_path / "toxic_original-c1212f89.ckpt"
    assert loaded.sha256 == tiny.sha256

    # A second member finds it in the cache and downloads nothing.
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fail_if_called("download"))
    again = _member(tiny, checkpoint=None, model_type="original", cache_dir=tmp_path)
    assert again.checkpoint == loaded.checkpoint


def test_downloaded_checkpoint_with_unlisted_sha256_is_refused_and_removed(
    tmp_path: Path, tiny: TinyDetoxify, monkeypatch: pytest.MonkeyPatch
) -> None:
    def download(url: str, dst: str, *args: object, **kwargs: object) -> None:
        Path(dst).write_bytes(b"not the checkpoint you pinned")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(torch, "load", _fail_if_called("torch.load"))

    with pytest.raises(MemberLoadError, match="not in allowed_sha256"):
        _member(tiny, checkpoint=None, model_type="unbiased", cache_dir=tmp_path)

    assert list(tmp_path.iterdir()) == []


def test_failed_download_is_a_load_error(
    tmp_path: Path, tiny: TinyDetoxify, monkeypatch: pytest.MonkeyPatch
) -> None:
    def download(url: str, dst: str, *args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)

    with pytest.raises(MemberLoadError, match="could not download .*network is unreachable"):
        _member(tiny, checkpoint=None, model_type="multilingual", cache_dir=tmp_path)


# --- labels and scores --------------------------------------------------------------------


def test_member_is_a_registered_classifier(member: DetoxifyClassifier) -> None:
    assert isinstance(member, Classifier)
    assert member.id == "detoxify"
    assert MEMBERS.get(MemberKind.DETOXIFY) is DetoxifyClassifier


@pytest.mark.parametrize(
    ("classes", "labels"),
    [
        pytest.param(None, ORIGINAL_LABELS, id="original"),
        pytest.param(UNBIASED_CLASSES, ORIGINAL_LABELS | {Category.SEXUAL}, id="unbiased"),
    ],
)
def test_labels_follow_the_checkpoint_classes(
    classes: tuple[str, ...] | None, labels: frozenset[Label]
) -> None:
    tiny = tiny_detoxify() if classes is None else tiny_detoxify(classes)

    loaded = _member(tiny)

    assert loaded.labels == labels
    (detection,) = loaded.classify([normalize("send me your naked pictures")])
    assert detection.scores.keys() == labels


@pytest.mark.parametrize(
    ("text", "label", "flagged"),
    [
        (THREATENING_INSULT, Category.HARASSMENT_THREATENING, True),
        (THREATENING_INSULT, Category.VIOLENCE, True),
        (THREATENING_INSULT, Category.HARASSMENT, True),
        ("Y0U w0rthl3ss 1d10t, I W1LL K1LL Y0U!", Category.HARASSMENT_THREATENING, True),
        ("you are a stupid idiot", Category.HARASSMENT, True),
        ("this damn crap is shit", Shield.PROFANITY, True),
        (BENIGN, Category.HARASSMENT_THREATENING, False),
        (BENIGN, Category.HARASSMENT, False),
        ("i will see you at the park", Category.HARASSMENT_THREATENING, False),
        ("have a nice day my friend", Category.VIOLENCE, False),
    ],
)
def test_scores_separate_toxic_from_benign(
    member: DetoxifyClassifier, text: str, label: Label, flagged: bool
) -> None:
    (detection,) = member.classify([normalize(text)])

    assert (detection.scores[label] > 0.5) is flagged


def test_threatening_insult_outscores_benign_text(member: DetoxifyClassifier) -> None:
    threat, benign = member.classify([normalize(THREATENING_INSULT), normalize(BENIGN)])

    label = Category.HARASSMENT_THREATENING
    assert threat.scores[label] > 0.5 > benign.scores[label]
    assert threat.scores[label] > benign.scores[label]


def test_batches_give_the_scores_of_one_pass(
    tiny: TinyDetoxify, member: DetoxifyClassifier
) -> None:
    texts = [normalize(text) for text, _ in CORPUS[:5]]
    small_batches = _member(tiny, batch_size=2)  # 2 + 2 + 1: Detoxify squeezes a lone text

    one_pass = member.classify(texts)
    batched = small_batches.classify(texts)

    assert len(batched) == len(one_pass) == 5
    for single, many in zip(one_pass, batched, strict=True):
        assert dict(many.scores) == pytest.approx(dict(single.scores), abs=1e-4)


def test_concurrent_calls_share_one_member(member: DetoxifyClassifier) -> None:
    texts = [normalize(THREATENING_INSULT), normalize(BENIGN)]
    expected = [dict(detection.scores) for detection in member.classify(texts)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: member.classify(texts), range(16)))

    for detections in results:
        for detection, scores in zip(detections, expected, strict=True):
            assert dict(detection.scores) == pytest.approx(scores, abs=1e-5)


def test_no_texts_give_no_detections(member: DetoxifyClassifier) -> None:
    assert member.classify([]) == []


def test_long_text_is_truncated_not_rejected(member: DetoxifyClassifier) -> None:
    (detection,) = member.classify([normalize("you worthless idiot " * 100)])

    assert detection.scores[Category.HARASSMENT] > 0.5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=5))
def test_every_score_is_a_probability(member: DetoxifyClassifier, texts: list[str]) -> None:
    detections = member.classify([normalize(text) for text in texts])

    assert len(detections) == len(texts)
    for detection in detections:
        assert detection.scores.keys() == member.labels
        assert all(0.0 <= score <= 1.0 for score in detection.scores.values())
