"""The labelled corpus the encoder heads are trained, calibrated and measured on.

Examples come from the public sets in ``../shared/data`` whose licences allow training
what the project ships (see that folder's README), plus the project's own hand-written
examples in ``data/safety/own_examples.jsonl``. Sets licensed for measurement only
(refusal-direction harmless, toxicchat, tensor-trust) are loaded by ``measurement_sets``
and never reach training.

Public sets annotate only some labels, so every example says which labels it *knows*:
a Davidson tweet marked hateful says nothing about self-harm, and a jailbreak prompt says
nothing about the harm categories it mentions. Training fits each head only on examples
that know its label (masked multi-label learning). Rows labelled clean by their set
count as known negatives for every label.

Splits: a set's official split where it has one (HateXplain), the project's own
``heldout`` flag for its examples, otherwise a stable hash of the text: 70% train,
15% dev (calibration and thresholds), 15% test (reported in the model card).
"""

from __future__ import annotations

import base64
import codecs
import csv
import hashlib
import json
import random
import re
import string
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gateway.safety.taxonomy import Category, Shield

C = Category

HEAD_LABELS: tuple[str, ...] = (
    *(c.value for c in Category),
    Shield.JAILBREAK,
    Shield.INDIRECT_ATTACK,
)
ALL_KNOWN: frozenset[str] = frozenset(HEAD_LABELS)
_CSV_FIELD_LIMIT = 10_000_000


class Split(StrEnum):
    TRAIN = "train"
    DEV = "dev"
    TEST = "test"


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled text. ``positives`` is a subset of ``known``."""

    text: str
    positives: frozenset[str]
    known: frozenset[str]
    source: str
    split: Split
    direction: str = "prompt"  # or "reply": what an assistant says
    language: str = "en"  # ISO 639-1 code, the row's "lang" in the own examples

    def __post_init__(self) -> None:
        if not self.positives <= self.known:
            raise ValueError(f"{self.source}: positives {set(self.positives)} are not all known")
        unknown = self.known - ALL_KNOWN
        if unknown:
            raise ValueError(f"{self.source}: unknown labels {sorted(unknown)}")

    @property
    def benign(self) -> bool:
        """No label positive and every label known: benign for every head (a public row
        labelled for hate only says nothing about harassment)."""
        return not self.positives and self.known == ALL_KNOWN


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A file the corpus read, for the model card."""

    path: str
    sha256: str
    licence: str


def hash_split(text: str, *, dev: int = 15, test: int = 15) -> Split:
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100
    if bucket < test:
        return Split.TEST
    if bucket < test + dev:
        return Split.DEV
    return Split.TRAIN


def with_parents(labels: Iterable[str]) -> frozenset[str]:
    """Add each subcategory's parent, as OpenAI's taxonomy implies."""
    out = set(labels)
    for label in list(out):
        if "/" in label:
            out.add(label.split("/", 1)[0])
    return frozenset(out)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Corpus:
    """Reads the training sources under ``data_dir`` and the project's own examples."""

    def __init__(
        self,
        data_dir: Path,
        own_examples: Path | Sequence[Path],
        *,
        cap_per_source: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.own_files = [own_examples] if isinstance(own_examples, Path) else list(own_examples)
        self.cap_per_source = cap_per_source
        self.files: list[SourceFile] = []
        csv.field_size_limit(_CSV_FIELD_LIMIT)

    def training_examples(self) -> list[Example]:
        """All permissively licensed examples, deduplicated by normalised text."""
        readers = (
            self._own,
            self._davidson,
            self._hatexplain,
            self._toxigen_annotated,
            self._toxigen_prompts,
            self._surge,
            self._deepset,
            self._jailbreak_prompts,
            self._giskard,
            self._forbidden_questions,
            self._advbench_behaviors,
            self._mtbench,
            self._indirect_attacks,
            self._noise,
            self._rot13_noise,
        )
        seen: set[str] = set()
        examples: list[Example] = []
        taken: Counter[str] = Counter()
        for reader in readers:
            for example in reader():
                key = " ".join(example.text.casefold().split())
                if len(key) < 3 or key in seen:
                    continue
                seen.add(key)
                if example.source != "own" and self.cap_per_source is not None:
                    # Public sets are capped per source and split, so the hand-written
                    # intent examples are not drowned by tens of thousands of tweets.
                    taken[f"{example.source}/{example.split}"] += 1
                    if taken[f"{example.source}/{example.split}"] > self.cap_per_source:
                        continue
                examples.append(example)
        return examples

    # -- helpers -----------------------------------------------------------------------

    def _path(self, relative: str, licence: str) -> Path:
        path = self.data_dir / relative
        if not path.exists():
            raise FileNotFoundError(f"training source missing: {path}")
        self.files.append(SourceFile(relative, file_sha256(path), licence))
        return path

    def _rows(self, relative: str, licence: str) -> Iterator[dict[str, str]]:
        with self._path(relative, licence).open(encoding="utf-8", newline="") as handle:
            yield from csv.DictReader(handle)

    # -- sources -----------------------------------------------------------------------

    def _own(self) -> Iterator[Example]:
        for path in self.own_files:
            yield from self._own_file(path)

    def _own_file(self, path: Path) -> Iterator[Example]:
        self.files.append(SourceFile(str(path.name), file_sha256(path), "project's own"))
        yield from own_examples(path)

    def _davidson(self) -> Iterator[Example]:
        # class 0 hate speech, 1 offensive language, 2 neither. "Offensive" means profane
        # or crude, not necessarily aimed at anyone: it is a known negative for hate and
        # says nothing about harassment (profane is not harassment). Capped for balance.
        offensive = 0
        for row in self._rows("davidson-hate-offensive/data/labeled_data.csv", "MIT"):
            text = _clean_tweet(row["tweet"])
            split = hash_split(text)
            if row["class"] == "0":
                yield Example(
                    text, frozenset({C.HATE}), frozenset({C.HATE, C.HARASSMENT}), "davidson", split
                )
            elif row["class"] == "1":
                offensive += 1
                if offensive % 4 == 0:
                    yield Example(text, frozenset(), frozenset({C.HATE}), "davidson", split)
            else:
                yield Example(text, frozenset(), ALL_KNOWN, "davidson", split)

    def _hatexplain(self) -> Iterator[Example]:
        divisions = json.loads(
            self._path("hatexplain-mbib/post_id_divisions.json", "MIT").read_text()
        )
        split_of = {
            post: Split.DEV if name == "val" else Split(name)
            for name, posts in divisions.items()
            for post in posts
        }
        for row in self._rows("hatexplain-mbib/092-HateXplain.csv", "MIT"):
            split = split_of.get(row[""])
            if split is None:
                continue  # no-majority rows belong to no split
            text = row["text"]
            if row["category"] == "1":
                yield Example(
                    text,
                    frozenset({C.HATE}),
                    frozenset({C.HATE, C.HARASSMENT}),
                    "hatexplain",
                    split,
                )
            elif row["category"] == "2":
                # HateXplain's "offensive": crude or insulting, not hate; whether it
                # harasses someone is not annotated, so only hate is known (negative).
                yield Example(text, frozenset(), frozenset({C.HATE}), "hatexplain", split)
            elif row["category"] == "0":
                yield Example(text, frozenset(), ALL_KNOWN, "hatexplain", split)

    def _toxigen_annotated(self) -> Iterator[Example]:
        # Human toxicity ratings are 1..5 means; keep the clear ends only.
        for row in self._rows("toxigen-annotated/toxigen.csv", "ToxiGen research terms (MIT code)"):
            text = _bytes_literal(row["text"])
            score = float(row["toxicity_human"])
            if score >= 3.5:
                yield Example(
                    text,
                    frozenset({C.HATE}),
                    frozenset({C.HATE}),
                    "toxigen-annotated",
                    hash_split(text),
                )
            elif score <= 2.0:
                yield Example(text, frozenset(), ALL_KNOWN, "toxigen-annotated", hash_split(text))

    def _toxigen_prompts(self) -> Iterator[Example]:
        # Each line lists example sentences; the file name gives hate or neutral.
        folder = self.data_dir / "toxigen/prompts"
        for path in sorted(folder.glob("*_1k.txt")):
            hateful = path.name.startswith("hate_")
            self.files.append(
                SourceFile(f"toxigen/prompts/{path.name}", file_sha256(path), "MIT (research use)")
            )
            sentences: dict[str, None] = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                for part in line.split("\\n"):
                    sentence = part.strip().lstrip("-").strip()
                    if len(sentence) > 15:
                        sentences.setdefault(sentence)
            for sentence in list(sentences)[:250]:
                if hateful:
                    yield Example(
                        sentence,
                        frozenset({C.HATE}),
                        frozenset({C.HATE}),
                        "toxigen",
                        hash_split(sentence),
                    )
                else:
                    yield Example(sentence, frozenset(), ALL_KNOWN, "toxigen", hash_split(sentence))

    def _surge(self) -> Iterator[Example]:
        for row in self._rows("surge-toxicity/toxicity_en.csv", "MIT"):
            text = row["text"]
            if row["is_toxic"] == "Toxic":
                yield Example(
                    text,
                    frozenset({C.HARASSMENT}),
                    frozenset({C.HARASSMENT}),
                    "surge",
                    hash_split(text),
                )
            else:
                yield Example(text, frozenset(), ALL_KNOWN, "surge", hash_split(text))

    def _deepset(self) -> Iterator[Example]:
        import pandas as pd

        for name, split in (
            ("train-00000-of-00001-9564e8b05b4757ab.parquet", None),
            ("test-00000-of-00001-701d16158af87368.parquet", Split.TEST),
        ):
            frame = pd.read_parquet(self._path(f"deepset-prompt-injections/{name}", "Apache-2.0"))
            for text, label in zip(frame["text"], frame["label"], strict=True):
                chosen = split or hash_split(text, dev=20, test=0)
                if int(label) == 1:
                    yield Example(
                        text,
                        frozenset({Shield.JAILBREAK}),
                        frozenset({Shield.JAILBREAK}),
                        "deepset",
                        chosen,
                    )
                else:
                    yield Example(text, frozenset(), ALL_KNOWN, "deepset", chosen)

    def _jailbreak_prompts(self) -> Iterator[Example]:
        for name in ("jailbreak_prompts_2023_05_07.csv", "jailbreak_prompts_2023_12_25.csv"):
            for row in self._rows(f"jailbreak-llms/{name}", "MIT"):
                text = row["prompt"].strip()
                if text:
                    yield Example(
                        text,
                        frozenset({Shield.JAILBREAK}),
                        frozenset({Shield.JAILBREAK}),
                        "jailbreak-llms",
                        hash_split(text),
                    )

    def _giskard(self) -> Iterator[Example]:
        for row in self._rows("giskard-prompt-injections/prompt_injections.csv", "MIT"):
            text = row["prompt"]
            yield Example(
                text,
                frozenset({Shield.JAILBREAK}),
                frozenset({Shield.JAILBREAK}),
                "giskard",
                hash_split(text),
            )

    _FORBIDDEN: dict[str, frozenset[str]] = {
        "Illegal Activity": frozenset({C.ILLICIT}),
        "Malware": frozenset({C.ILLICIT}),
        "Fraud": frozenset({C.ILLICIT}),
        "Privacy Violence": frozenset({C.ILLICIT}),
        "Physical Harm": frozenset({C.ILLICIT, C.ILLICIT_VIOLENT, C.VIOLENCE}),
        "Hate Speech": frozenset({C.HATE}),
        "Pornography": frozenset({C.SEXUAL}),
        # Not harmful under OpenAI's moderation taxonomy: known negatives.
        "Political Lobbying": frozenset(),
        "Legal Opinion": frozenset(),
        "Financial Advice": frozenset(),
        "Health Consultation": frozenset(),
        # "Economic Harm" and "Gov Decision" mix benign and harmful questions: left out.
    }

    def _forbidden_questions(self) -> Iterator[Example]:
        for row in self._rows("jailbreak-llms/forbidden_question_set.csv", "MIT"):
            positives = self._FORBIDDEN.get(row["content_policy_name"])
            if positives is None:
                continue
            text = row["question"]
            known = (
                ALL_KNOWN
                if not positives
                else positives | {Shield.JAILBREAK, Shield.INDIRECT_ATTACK}
            )
            yield Example(text, positives, known, "forbidden-questions", hash_split(text))

    _ADVBENCH_RULES: tuple[tuple[re.Pattern[str], frozenset[str]], ...] = (
        (
            re.compile(r"suicide|self-harm|self harm|cutting|anorexi|bulimi|eating disorder", re.I),
            frozenset({C.SELF_HARM, C.SELF_HARM_INSTRUCTIONS}),
        ),
        (
            re.compile(
                r"bomb|explosive|weapon|firearm|gun|kill|murder|poison|assassinat|terror|shoot"
                r"|attack (?:on|a) |violen|harm (?:someone|others|people)|mass",
                re.I,
            ),
            frozenset({C.ILLICIT, C.ILLICIT_VIOLENT, C.VIOLENCE}),
        ),
        (re.compile(r"hate|racis|discriminat|minorit|ethnic", re.I), frozenset({C.HATE})),
    )

    def _advbench_behaviors(self) -> Iterator[Example]:
        # Harmful requests without category labels: weak labels by keyword rules, every
        # row at least illicit. Only the labels a rule sets are known.
        for row in self._rows("advbench/data/advbench/harmful_behaviors.csv", "MIT"):
            text = row["goal"]
            positives: set[str] = set()
            for pattern, labels in self._ADVBENCH_RULES:
                if pattern.search(text):
                    positives |= labels
            if not positives & {C.SELF_HARM, C.HATE}:
                positives.add(C.ILLICIT)
            known = frozenset(positives | {Shield.JAILBREAK, Shield.INDIRECT_ATTACK})
            yield Example(text, frozenset(positives), known, "advbench", hash_split(text))

    def _mtbench(self) -> Iterator[Example]:
        # Benign questions and reference answers (Apache-2.0 questions).
        for relative in (
            "fastchat-mtbench/mt_bench/question.jsonl",
            "fastchat-mtbench/vicuna_bench/question.jsonl",
        ):
            for line in self._path(relative, "Apache-2.0").read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                turns = row.get("turns") or [row.get("text", "")]
                for turn in turns:
                    if turn:
                        yield Example(turn, frozenset(), ALL_KNOWN, "mtbench", hash_split(turn))

    def _noise(self) -> Iterator[Example]:
        for text in noise_texts():
            yield Example(text, frozenset(), ALL_KNOWN, "noise", hash_split(text))

    def _rot13_noise(self) -> Iterator[Example]:
        # The engine reads a ROT13 text through its decoded view (gateway.safety.normalize);
        # the raw letters mean nothing and no head may flag them. Without these a
        # fine-tuned encoder flagged about one ROT13 text in six as harm. Every
        # ROT13_EVERY-th own example, kept in its original's split, so the held-out
        # examples' readings stay held out.
        own = (example for path in self.own_files for example in own_examples(path))
        for index, example in enumerate(own):
            if index % ROT13_EVERY == 0:
                text = codecs.encode(example.text, "rot13")
                yield Example(text, frozenset(), ALL_KNOWN, "noise", example.split)

    def _indirect_attacks(self) -> Iterator[Example]:
        # Indirect attacks: injection sentences from deepset's training split, embedded in
        # benign documents as retrieved text would carry them. Carriers are MT-Bench and
        # Vicuna reference answers cut into passages, and pages of several benign
        # questions; each carrier appears clean (a negative) and with an injection at two
        # positions (positives), each time a different injection.
        import pandas as pd

        frame = pd.read_parquet(
            self.data_dir
            / "deepset-prompt-injections/train-00000-of-00001-9564e8b05b4757ab.parquet"
        )
        injections = [
            text
            for text, label in zip(frame["text"], frame["label"], strict=True)
            if int(label) == 1 and len(text) < 400
        ]
        documents = self._carrier_documents()
        known = frozenset({Shield.INDIRECT_ATTACK})
        for number, document in enumerate(documents):
            split = hash_split(document)
            yield Example(document, frozenset(), ALL_KNOWN, "carrier-documents", split)
            for variant in range(2):
                injection = injections[(2 * number + variant) % len(injections)]
                sentences = [m.end() for m in re.finditer(r"[.!?]\s", document)]
                cut = (
                    sentences[len(sentences) // 2] if variant == 0 and sentences else len(document)
                )
                poisoned = f"{document[:cut].rstrip()} {injection} {document[cut:].lstrip()}"
                yield Example(
                    poisoned.strip(),
                    frozenset({Shield.INDIRECT_ATTACK}),
                    known,
                    "injected-documents",
                    split,
                )

    def _carrier_documents(self) -> list[str]:
        passages: list[str] = []
        for relative in (
            "fastchat-mtbench/mt_bench/reference_answer/gpt-4.jsonl",
            "fastchat-mtbench/vicuna_bench/reference_answer/gpt-4.jsonl",
        ):
            path = self.data_dir / relative
            for line in path.read_text(encoding="utf-8").splitlines():
                for choice in json.loads(line).get("choices", []):
                    for turn in choice.get("turns", []):
                        for start in range(0, len(turn), 700):
                            passage = turn[start : start + 700]
                            if len(passage) > 200:
                                passages.append(passage)
        questions: list[str] = []
        for relative in (
            "fastchat-mtbench/mt_bench/question.jsonl",
            "fastchat-mtbench/vicuna_bench/question.jsonl",
        ):
            path = self.data_dir / relative
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                questions.extend(row.get("turns") or [row.get("text", "")])
        pages = [
            "\n".join(questions[start : start + 4]) for start in range(0, len(questions) - 3, 4)
        ]
        return passages + pages


def own_examples(path: Path, *, split: Split | None = None) -> Iterator[Example]:
    """The labelled rows of one of the project's own JSONL files, with their splits:
    the held-out rows are the test split, the rest fall into train and dev by hash.

    ``split``, when given, is every row's split instead (a measurement-only file, such as
    the multilingual evaluation file, has no ``split`` of its own)."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: {error}") from error
            chosen = split or (
                Split.TEST if row["split"] == "heldout" else hash_split(row["text"], dev=20, test=0)
            )
            direction = row.get("direction", "prompt")
            if direction not in {"prompt", "reply"}:
                raise ValueError(f"{path}: line {number}: unknown direction {direction!r}")
            labels = with_parents(row["labels"])
            language = str(row.get("lang", "en"))
            yield Example(row["text"], labels, ALL_KNOWN, "own", chosen, direction, language)


NOISE_EXAMPLES = 900
ROT13_EVERY = 8
_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm", "1234567890")


def noise_texts(count: int = NOISE_EXAMPLES, *, seed: int = 0) -> list[str]:
    """Strings that mean nothing, which no head may flag: random letters and words,
    repeated characters, keyboard mashes, identifiers, digits, hex and base64 of random
    bytes. Public sets hold none, so without them such input lands anywhere (random
    strings and "aaaa..." were flagged as harassment). Generated, not written: they are a
    source of their own, never counted among the project's written examples."""
    generator = random.Random(seed)  # noqa: S311 - data, not secrets
    letters = string.ascii_lowercase

    def word(low: int = 2, high: int = 10) -> str:
        return "".join(generator.choices(letters, k=generator.randint(low, high)))

    makers = (
        lambda: " ".join(word() for _ in range(generator.randint(1, 8))),
        lambda: word(4, 24),
        lambda: generator.choice(letters + "!?.-*") * generator.randint(3, 60),
        lambda: "".join(
            generator.choice(_KEYBOARD_ROWS)[generator.randint(0, 3) :][: generator.randint(3, 9)]
            for _ in range(generator.randint(1, 4))
        ),
        lambda: str(uuid.UUID(int=generator.getrandbits(128))),
        lambda: "".join(generator.choices(string.digits, k=generator.randint(3, 20))),
        lambda: generator.randbytes(generator.randint(4, 32)).hex(),
        lambda: base64.b64encode(generator.randbytes(generator.randint(6, 48))).decode(),
        lambda: "".join(
            generator.choices(string.ascii_letters + string.digits + string.punctuation, k=12)
        ),
        lambda: " ".join(word(1, 3).upper() for _ in range(generator.randint(2, 6))),
    )
    return [makers[i % len(makers)]() for i in range(count)]


def _clean_tweet(text: str) -> str:
    text = re.sub(r"&amp;", "&", text)
    text = re.sub(r"@\w+:?", "@user", text)
    text = re.sub(r"https?://\S+", "", text)
    text = re.sub(r"^(?:!+\s*)?RT\s+", "", text)
    return " ".join(text.split())


def _bytes_literal(text: str) -> str:
    """ToxiGen's CSV stores ``b'...'`` literals; return the decoded text."""
    if len(text) >= 3 and text[0] == "b" and text[1] in "'\"" and text[-1] == text[1]:
        inner = text[2:-1]
        try:
            return (
                inner.encode("latin-1", "backslashreplace")
                .decode("unicode_escape")
                .encode("latin-1")
                .decode("utf-8")
            )
        except (UnicodeDecodeError, UnicodeEncodeError):
            return inner
    return text
