"""The shared encoder (both backends), the heads artifact and the shipped model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.safety.encoder import DEFAULT_BATCH_TOKENS, SentenceEncoder, WindowEmbeddings
from gateway.safety.engine import MemberSpec
from gateway.safety.heads import Heads, HeadsFormatError
from gateway.safety.settings import SHIPPED_HEADS, Backend
from gateway.safety.training.corpus import HEAD_LABELS

WEIGHTS = SHIPPED_HEADS.parent
TEXTS = [
    "Can you recommend a good book about the history of Rome?",
    "ok",
    "The quick brown fox jumps over the lazy dog. " * 120,  # several 256-token windows
]


@pytest.fixture(scope="module")
def torch_encoder() -> SentenceEncoder:
    return SentenceEncoder()


def test_onnx_backend_matches_torch(torch_encoder: SentenceEncoder, tmp_path: Path) -> None:
    onnx = SentenceEncoder(backend=Backend.ONNX, cache_dir=tmp_path)
    expected = torch_encoder.embed(TEXTS)
    actual = onnx.embed(TEXTS)
    assert np.array_equal(expected.owner, actual.owner)
    assert np.abs(expected.vectors - actual.vectors).max() < 1e-4
    assert list(tmp_path.glob("encoder-*.onnx")), "the exported graph is cached"


@pytest.fixture(scope="module")
def q8_encoder(tmp_path_factory: pytest.TempPathFactory) -> SentenceEncoder:
    return SentenceEncoder(backend=Backend.ONNX_Q8, cache_dir=tmp_path_factory.mktemp("q8"))


def test_q8_backend_stays_near_fp32(
    torch_encoder: SentenceEncoder, q8_encoder: SentenceEncoder
) -> None:
    expected = torch_encoder.embed(TEXTS)
    actual = q8_encoder.embed(TEXTS)
    assert np.array_equal(expected.owner, actual.owner)
    cosines = (expected.vectors * actual.vectors).sum(axis=1)  # both L2-normalised
    assert cosines.min() > 0.995
    assert np.abs(expected.vectors - actual.vectors).max() > 1e-6  # it is quantised
    assert q8_encoder._onnx_target is not None
    assert q8_encoder._onnx_target.name.endswith("-q8-block64.onnx")


def test_q8_embeds_a_text_alike_alone_and_beside_texts_of_any_length(
    q8_encoder: SentenceEncoder,
) -> None:
    # Dynamic int8 scales a pass's activations by all of its tokens, padding included; the
    # q8 graph quantises each token row on its own, so batch and padding change nothing.
    texts = ["I will find you", "ok", "How do I kill a Python process that hangs?", TEXTS[0]]
    alone = np.vstack([q8_encoder.embed([text]).vectors for text in texts])
    q8_encoder.batch_tokens = 4096  # every text in one padded pass
    try:
        together = q8_encoder.embed([*texts, "The quick brown fox. " * 30]).vectors[: len(texts)]
    finally:
        q8_encoder.batch_tokens = DEFAULT_BATCH_TOKENS
    assert np.array_equal(alone, together)


def test_long_text_is_split_into_overlapping_windows_not_truncated(
    torch_encoder: SentenceEncoder,
) -> None:
    counts = torch_encoder.count_windows(TEXTS)
    assert counts[:2] == [1, 1]
    tokens = len(torch_encoder.tokenizer(TEXTS[2])["input_ids"])
    usable = torch_encoder.max_tokens - 2 - torch_encoder.stride
    assert counts[2] >= tokens // usable
    embedded = torch_encoder.embed(TEXTS)
    assert (embedded.owner == 2).sum() == counts[2]
    norms = np.linalg.norm(embedded.vectors, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_a_forward_pass_holds_at_most_its_token_budget_and_embeds_as_one_pass_would(
    torch_encoder: SentenceEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [*TEXTS, *(f"Short message number {n} about the weather." for n in range(30))]
    whole = SentenceEncoder()
    whole.batch_tokens = 10**9  # every window in one pass
    expected = whole.embed(texts)
    shapes: list[tuple[int, int]] = []
    forward = torch_encoder._forward

    def spy(batch: dict[str, Any]) -> Any:
        shapes.append(batch["input_ids"].shape)
        return forward(batch)

    monkeypatch.setattr(torch_encoder, "_forward", spy)
    actual = torch_encoder.embed(texts)
    assert torch_encoder.batch_tokens == 256
    assert all(rows * width <= 256 or rows == 1 for rows, width in shapes)
    full = [rows for rows, width in shapes if width == torch_encoder.max_tokens]
    assert full
    assert set(full) == {1}  # a full window goes alone
    assert max(rows for rows, _ in shapes) > 10  # short texts still share a pass
    assert np.array_equal(expected.owner, actual.owner)
    assert np.abs(expected.vectors - actual.vectors).max() < 1e-5


WINDOW_TEXTS = [
    *TEXTS,
    "",
    "Ünïcödé naïve café, “quotes” and emoji 🙂 in one line",
    "word " * 700,  # past two strides
    "x" * 3000,  # one token run that needs many windows
]


def test_windows_are_cut_as_transformers_cuts_them(torch_encoder: SentenceEncoder) -> None:
    expected = torch_encoder.tokenizer(
        WINDOW_TEXTS,
        max_length=torch_encoder.max_tokens,
        truncation=True,
        stride=torch_encoder.stride,
        return_overflowing_tokens=True,
        padding=True,
    )
    encoded, owner = torch_encoder._tokenize(WINDOW_TEXTS)
    assert owner.tolist() == list(expected["overflow_to_sample_mapping"])
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert np.array_equal(encoded[key], np.asarray(expected[key])), key


def test_the_onnx_backend_serves_without_torch(tmp_path: Path) -> None:
    SentenceEncoder(backend=Backend.ONNX, cache_dir=tmp_path)  # exports the graph (torch)
    script = (
        "import sys, pathlib\n"
        "from gateway.safety.encoder import SentenceEncoder\n"
        "from gateway.safety.settings import Backend\n"
        f"cache = pathlib.Path({str(tmp_path)!r})\n"
        "encoder = SentenceEncoder(backend=Backend.ONNX, cache_dir=cache)\n"
        "vectors = encoder.embed(['how do I kill a python process', 'hi ' * 400]).vectors\n"
        "print(vectors.shape[0], 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run(  # noqa: S603 - this interpreter, a script of this test
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.stdout.split() == ["3", "False", "False"]


def test_heads_round_trip_through_safetensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    heads = Heads(
        labels=("hate", "jailbreak"),
        encoder="bundled:all-MiniLM-L6-v2",
        out_weight=rng.normal(size=(2, 8)).astype(np.float32),
        out_bias=np.zeros(2, np.float32),
        calib_scale=np.ones(2, np.float32),
        calib_shift=np.zeros(2, np.float32),
        threshold=np.array([0.4, 0.6], np.float32),
        hidden_weight=rng.normal(size=(8, 4)).astype(np.float32),
        hidden_bias=np.zeros(8, np.float32),
    )
    heads.save(tmp_path / "h.safetensors")
    loaded = Heads.load(tmp_path / "h.safetensors")
    x = rng.normal(size=(3, 4)).astype(np.float32)
    assert np.allclose(heads.probabilities(x), loaded.probabilities(x))
    assert loaded.thresholds() == pytest.approx({"hate": 0.4, "jailbreak": 0.6})
    probabilities = loaded.probabilities(x * 1000)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()


def test_heads_refuse_a_foreign_file(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HeadsFormatError, match="format"):
        Heads.load(tmp_path / "other.safetensors")
    with pytest.raises(HeadsFormatError, match="not found"):
        Heads.load(tmp_path / "missing.safetensors")


def test_shipped_weights_are_small_and_documented() -> None:
    total = sum(path.stat().st_size for path in WEIGHTS.iterdir() if path.is_file())
    assert total <= 5 * 2**20
    heads = Heads.load(SHIPPED_HEADS)
    assert heads.labels == HEAD_LABELS
    card = json.loads((WEIGHTS / "model_card.json").read_text())
    assert card["training"]["command"].startswith("safegate safety train")
    assert all(len(entry["sha256"]) == 64 for entry in card["data"]["files"])
    assert set(card["thresholds"]) == set(HEAD_LABELS)
    assert card["metrics"]["test"]["hate"]["auprc"] > 0.5


def test_sentence_chunks_pack_whole_sentences() -> None:
    from gateway.safety.members.encoder_heads import sentence_chunks

    assert sentence_chunks("Short text. Two sentences.") == []
    text = "One sentence here. " * 30 + "The last one!"
    chunks = sentence_chunks(text, limit=100)
    assert all(len(chunk) <= 100 for chunk in chunks)
    assert " ".join(chunks) == " ".join(text.split())
    assert chunks[-1].endswith("The last one!")


def _tampered_copy(tmp_path: Path, name: str) -> Path:
    """The shipped weights folder with one matrix of ``name`` zeroed: still a valid
    safetensors file, no longer the one the model card describes."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    folder = tmp_path / "weights"
    folder.mkdir()
    for path in WEIGHTS.iterdir():
        if path.is_file():  # the multilingual heads have their own folder and card
            (folder / path.name).write_bytes(path.read_bytes())
    target = folder / name
    with safe_open(str(target), framework="numpy") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    first = sorted(tensors)[0]
    tensors[first] = np.zeros_like(tensors[first])
    save_file(tensors, str(target), metadata=metadata)
    return folder / "heads.safetensors"


@pytest.mark.parametrize(
    "name",
    sorted(json.loads((WEIGHTS / "model_card.json").read_text()).get("files", {}))
    or ["heads.safetensors"],
)
def test_weights_that_differ_from_the_model_card_never_load(tmp_path: Path, name: str) -> None:
    from gateway.safety.members import MemberLoadError
    from gateway.safety.members.encoder_heads import EncoderHeadsClassifier

    heads = _tampered_copy(tmp_path, name)
    with pytest.raises(MemberLoadError, match="sha256"):
        EncoderHeadsClassifier(heads_path=heads)


def test_every_shipped_weights_file_matches_the_model_card() -> None:
    from gateway.safety.delta import sha256_of

    card = json.loads((WEIGHTS / "model_card.json").read_text())
    files = card.get("files") or {"heads.safetensors": card["weights_sha256"]}
    for name, sha256 in files.items():
        assert sha256_of(WEIGHTS / name) == sha256, name


def test_a_failed_onnx_export_is_an_error_that_names_it(tmp_path: Path) -> None:
    from gateway.safety.encoder import resolve_model_path

    model = tmp_path / "model"  # a tokenizer and a config, but no weights to export
    model.mkdir()
    bundled = Path(resolve_model_path("bundled:all-MiniLM-L6-v2"))
    for name in ("tokenizer.json", "config.json"):
        (model / name).write_bytes((bundled / name).read_bytes())
    with pytest.raises(RuntimeError, match="exporting the encoder to ONNX failed"):
        SentenceEncoder(str(model), backend=Backend.ONNX, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.onnx"))


def _weights_with_card(tmp_path: Path, **card_fields: object) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    for path in WEIGHTS.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    card = json.loads((folder / "model_card.json").read_text())
    card.update(card_fields)
    card = {key: value for key, value in card.items() if value is not None}  # None: drop it
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder / "heads.safetensors"


def test_the_heads_are_served_on_the_backend_their_model_card_names(tmp_path: Path) -> None:
    from gateway.safety.members import MemberLoadError
    from gateway.safety.members.encoder_heads import EncoderHeadsClassifier

    cache = tmp_path / "cache"
    shipped = EncoderHeadsClassifier(cache_dir=cache)
    assert shipped.encoder.backend is Backend.ONNX  # the shipped card names fp32
    assert not list(cache.glob("encoder-*-int8-per-channel*.onnx"))
    overridden = EncoderHeadsClassifier(backend=Backend.ONNX_INT8, cache_dir=cache)
    assert overridden.encoder.backend is Backend.ONNX_INT8  # SAFEGATE_ENCODER__BACKEND wins
    assert list(cache.glob("encoder-*-int8-per-channel*.onnx"))

    int8 = _weights_with_card(tmp_path, backend="onnx-int8")
    served = EncoderHeadsClassifier(heads_path=int8, cache_dir=cache)
    assert served.encoder.backend is Backend.ONNX_INT8  # a card naming int8: int8
    (tmp_path / "weights").rename(tmp_path / "int8-weights")

    unnamed = _weights_with_card(tmp_path, backend=None)
    assert EncoderHeadsClassifier(heads_path=unnamed, cache_dir=cache).encoder.backend is (
        Backend.ONNX  # a card naming none: fp32 ONNX
    )

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (tmp_path / "weights").rename(unknown / "weights")
    card = unknown / "weights/model_card.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "backend": "tpu"}))
    with pytest.raises(MemberLoadError, match="unknown backend 'tpu'"):
        EncoderHeadsClassifier(heads_path=unknown / "weights/heads.safetensors", cache_dir=cache)


def test_int8_weights_are_quantised_per_channel_and_stay_close_to_fp32(
    torch_encoder: SentenceEncoder, tmp_path: Path
) -> None:
    import onnx

    int8 = SentenceEncoder(backend=Backend.ONNX_INT8, cache_dir=tmp_path)
    (graph,) = tmp_path.glob("encoder-*-int8-per-channel.onnx")
    scales = [
        tensor
        for tensor in onnx.load(str(graph)).graph.initializer
        if tensor.name.endswith("_scale") and len(tensor.dims) == 1 and tensor.dims[0] > 1
    ]
    assert scales, "weights quantised with one scale per output channel"
    expected = torch_encoder.embed(TEXTS[:2]).vectors
    actual = int8.embed(TEXTS[:2]).vectors
    cosine = (expected * actual).sum(axis=1)
    assert cosine.min() > 0.95  # measured 0.996 and 0.968 ("ok")
    assert np.abs(expected - actual).max() > 1e-4  # not the fp32 graph under another name


def test_the_onnx_encoder_runs_on_one_thread_while_other_requests_are_in_flight(
    tmp_path: Path,
) -> None:
    from gateway.safety import contention

    encoder = SentenceEncoder(backend=Backend.ONNX, cache_dir=tmp_path)
    alone = encoder.embed(TEXTS[:2]).vectors
    assert encoder._single is None  # noqa: SLF001 - one request: no second session made
    contention.enter()
    contention.enter()
    try:
        assert contention.busy()
        shared = encoder.embed(TEXTS[:2]).vectors
        single = encoder._single  # noqa: SLF001
        assert single is not None
        assert single is not encoder._session  # noqa: SLF001
        assert single.get_session_options().intra_op_num_threads == 1
    finally:
        contention.leave()
        contention.leave()
    assert not contention.busy()
    assert np.abs(alone - shared).max() < 1e-5  # the same graph, the same vectors

    fixed = SentenceEncoder(backend=Backend.ONNX, cache_dir=tmp_path, threads=2)
    contention.enter()
    contention.enter()
    try:
        fixed.embed(TEXTS[:1])
    finally:
        contention.leave()
        contention.leave()
    assert fixed._single is None  # noqa: SLF001 - an explicit thread count is kept


class _CountingEncoder(SentenceEncoder):
    """The real encoder, recording the segments each call embeds."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.segments: list[list[str]] = []

    def embed(
        self, texts: Sequence[str], *, batch_size: int = 64, first_window_only: bool = False
    ) -> WindowEmbeddings:
        self.segments.append(list(texts))
        return super().embed(texts, batch_size=batch_size, first_window_only=first_window_only)


@pytest.mark.parametrize("chunking", ["long", "always"])
def test_a_text_that_fits_in_one_window_is_encoded_once_with_long_chunking(
    tmp_path: Path, chunking: str
) -> None:
    from gateway.safety.members.encoder_heads import EncoderHeadsClassifier
    from gateway.safety.normalize import normalize

    heads = _weights_with_card(tmp_path, chunking=chunking, backend="onnx")
    encoder = _CountingEncoder(  # what the shipped card asks for: the pair in one graph
        backend=Backend.ONNX,
        delta=WEIGHTS / "encoder_delta.safetensors",
        paired=True,
        cache_dir=tmp_path / "cache",
    )
    member = EncoderHeadsClassifier(heads_path=heads, encoder=encoder)
    paragraph = (
        "Thanks for the question about the garden. Tomatoes like six hours of sun. Water "
        "them at the roots in the morning. Yellow lower leaves are usually old leaves. "
        "Pinch them off and feed the plants once a fortnight."
    )
    assert encoder.count_windows([paragraph]) == [1]
    member.classify([normalize(paragraph)])
    embedded = encoder.segments[-1]
    if chunking == "long":
        assert len(embedded) == 1  # one window, one pass of the encoder
    else:
        assert len(embedded) > 1  # the whole text and its sentence chunks

    long = paragraph + " " + "The quick brown fox jumps over the lazy dog. " * 60
    assert encoder.count_windows([long])[0] > 1
    member.classify([normalize(long)])
    assert len(encoder.segments[-1]) > 2  # longer than a window: chunks in both modes


def test_a_texts_scores_do_not_depend_on_what_shares_its_forward_pass(
    loaded_members: list[MemberSpec],
) -> None:
    """The shipped encoder scores a text the same alone and in a batch beside others: a
    verdict must not move with the traffic it happened to share a pass with (dynamic int8
    quantisation scaled each pass by all of its tokens: 0.79 alone, 0.53 in a batch)."""
    from gateway.safety.normalize import normalize

    member = next(spec.classifier for spec in loaded_members if spec.classifier.id == "encoder")
    texts = [
        "I'm going to kill you",
        "I will find you and kill you tonight",
        "How do I kill a Python process?",
        "Thanks, that fixed it!",
        "Write a long, detailed essay on the causes of the First World War, with dates.",
        "ok",
    ]
    alone = [member.classify([normalize(text)])[0].scores for text in texts]
    together = [detection.scores for detection in member.classify([normalize(t) for t in texts])]
    for text, one, batched in zip(texts, alone, together, strict=True):
        for label, score in one.items():
            assert batched[label] == pytest.approx(score, abs=1e-4), (text, label)
