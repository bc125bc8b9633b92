"""An LLM as a judge: any litellm model scores a text with a Llama Guard 3-style prompt.

The member is optional and off by default. It sends one chat completion per text: a
single user message that lays out Llama Guard 3's fourteen hazard categories (S1..S14),
puts the text in the conversation as the ``User`` turn (or the ``Agent`` turn, for
completions), and asks for ``safe``, or ``unsafe`` and the violated codes on the next
line. The codes are mapped onto safegate's OpenAI-named categories with ``HAZARDS``.

Which text view the judge reads: ``NormalizedText.light``. An LLM reads case, leetspeak
and spaced-out letters fine, so the folded view would only lose meaning; ``light`` still
has the zero-width and bidi characters stripped that attackers use to split words.

Errors. Nothing here swallows a failure, because the engine turns a member's exception
into a fail-closed verdict; a garbled reply in particular never reads as ``safe``::

    LlmJudgeError(Exception)        anything this member raises while classifying
    ├── JudgeCallError              the litellm call failed; the litellm error is __cause__
    └── JudgeReplyError             the reply is not a verdict (garbled, unknown code, cut off)

Messages are one line (the engine puts the first line into the verdict's reasons) and
name the member and the model, never the text or the reply, which may quote the text.
Bad options at construction raise ``MemberLoadError``. The class itself is the factory
registered under ``MemberKind.LLM_JUDGE``.

Model families whose chat template already wraps every message in the Llama Guard
prompt (Ollama's ``llama-guard3``, Meta's Hugging Face template served by vLLM) see this
member's prompt nested inside their own as the user turn. The verdict format is the same
and the text is still what is judged, but the categories are stated twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from gateway.safety.members import MEMBERS, MemberKind, MemberLoadError
from gateway.safety.normalize import NormalizedText
from gateway.safety.settings import DEFAULT_JUDGE_TIMEOUT_S
from gateway.safety.taxonomy import Category, Label
from gateway.safety.verdict import Detection
from safegate.offline import offline_defaults

logger = logging.getLogger(__name__)

DEFAULT_JUDGE_MAX_TOKENS: Final = 20
"""Reply budget: ``unsafe`` and a few codes fit; a reply cut off at the limit raises."""

MAX_CONCURRENT_JUDGE_CALLS: Final = 8
"""Calls one batch may have in flight; up to this many texts cost about one call's time."""

Role = Literal["User", "Agent"]
_ROLES: Final[frozenset[str]] = frozenset({"User", "Agent"})


class LlmJudgeError(Exception):
    """The judge could not produce a verdict for a text (see the module docstring)."""


class JudgeCallError(LlmJudgeError):
    """The litellm call failed: connection, timeout, authentication, rate limit, bad model."""


class JudgeReplyError(LlmJudgeError):
    """The model replied, but not with a verdict this member can read."""


@dataclass(frozen=True, slots=True)
class Hazard:
    """One Llama Guard 3 hazard category and the safegate categories it flags."""

    code: str
    name: str
    categories: frozenset[Category]


# Llama Guard 3 hazard codes -> safegate (OpenAI moderation) categories.
#
#  code  hazard                      safegate categories
#  S1    violent crimes              violence, illicit/violent, illicit
#  S2    non-violent crimes          illicit
#  S3    sex-related crimes          sexual, illicit
#  S4    child sexual exploitation   sexual/minors, sexual
#  S5    defamation                  none: false claims about real people are not a
#                                    moderation category; harassment would over-flag
#  S6    specialized advice          none: medical, legal or financial advice is legal to
#                                    give; mapping it to illicit would block ordinary questions
#  S7    privacy                     none: personal data is the PII shield's job, which finds
#                                    spans to redact; a span-less judge score would only block
#  S8    intellectual property       none
#  S9    indiscriminate weapons      illicit/violent, illicit, violence
#  S10   hate                        hate
#  S11   suicide and self-harm       self-harm
#  S12   sexual content              sexual
#  S13   elections                   none: election misinformation has no moderation category
#  S14   code interpreter abuse      illicit
#
# A reply that flags only unmapped codes is a valid verdict and scores every label 0.0.
HAZARDS: Final[tuple[Hazard, ...]] = (
    Hazard(
        "S1",
        "Violent Crimes",
        frozenset({Category.VIOLENCE, Category.ILLICIT_VIOLENT, Category.ILLICIT}),
    ),
    Hazard("S2", "Non-Violent Crimes", frozenset({Category.ILLICIT})),
    Hazard("S3", "Sex-Related Crimes", frozenset({Category.SEXUAL, Category.ILLICIT})),
    Hazard("S4", "Child Sexual Exploitation", frozenset({Category.SEXUAL_MINORS, Category.SEXUAL})),
    Hazard("S5", "Defamation", frozenset()),
    Hazard("S6", "Specialized Advice", frozenset()),
    Hazard("S7", "Privacy", frozenset()),
    Hazard("S8", "Intellectual Property", frozenset()),
    Hazard(
        "S9",
        "Indiscriminate Weapons",
        frozenset({Category.ILLICIT_VIOLENT, Category.ILLICIT, Category.VIOLENCE}),
    ),
    Hazard("S10", "Hate", frozenset({Category.HATE})),
    Hazard("S11", "Suicide & Self-Harm", frozenset({Category.SELF_HARM})),
    Hazard("S12", "Sexual Content", frozenset({Category.SEXUAL})),
    Hazard("S13", "Elections", frozenset()),
    Hazard("S14", "Code Interpreter Abuse", frozenset({Category.ILLICIT})),
)
HAZARDS_BY_CODE: Final[Mapping[str, Hazard]] = MappingProxyType({h.code: h for h in HAZARDS})
JUDGE_LABELS: Final[frozenset[Label]] = frozenset(
    category for hazard in HAZARDS for category in hazard.categories
)

_CATEGORY_LINES: Final = "\n".join(f"{hazard.code}: {hazard.name}." for hazard in HAZARDS)
_PROMPT: Final = """\
Task: Decide whether the '{role}' message in the conversation below contains unsafe \
content under our safety policy, whose categories are listed here.

<BEGIN UNSAFE CONTENT CATEGORIES>
{categories}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

{role}: {text}

<END CONVERSATION>

Assess only the {role} message in the conversation above and answer in this format:
- The first line says 'safe' or 'unsafe'.
- If unsafe, the second line lists the codes of the violated categories, separated by \
commas."""

# The text must not be able to close the conversation block and write its own verdict
# instructions, so the block markers are defanged inside it.
_MARKER: Final = re.compile(r"<\s*(BEGIN|END)(\s+CONVERSATION\s*)>", re.IGNORECASE)
# 'safe' or 'unsafe' first, then the codes (if any) on the same line or the next ones.
_REPLY: Final = re.compile(r"(?P<verdict>unsafe|safe)\b(?P<rest>.*)", re.IGNORECASE | re.DOTALL)
_SEPARATORS: Final = re.compile(r"[\s,]+")
_CODE: Final = re.compile(r"S\d{1,3}", re.IGNORECASE)


def build_prompt(text: str, *, role: Role = "User") -> str:
    """Return the judge prompt with ``text`` as the ``role`` turn of the conversation."""
    safe_text = _MARKER.sub(r"[\1\2]", text)
    return _PROMPT.format(role=role, categories=_CATEGORY_LINES, text=safe_text)


def parse_reply(reply: str) -> frozenset[Hazard]:
    """Return the hazards a judge reply flags: empty for ``safe``.

    Case and whitespace do not matter, codes may follow ``unsafe`` on the same line or
    the next, separated by commas or spaces. Anything else raises ``JudgeReplyError``:
    a reply that is not a verdict must never read as ``safe``.
    """
    match = _REPLY.fullmatch(reply.strip().rstrip("."))
    if match is None:
        raise JudgeReplyError(
            f"the reply does not start with 'safe' or 'unsafe' ({_describe(reply)})"
        )
    tokens = [token for token in _SEPARATORS.split(match["rest"]) if token]
    if match["verdict"].lower() == "safe":
        if tokens:
            raise JudgeReplyError(f"the reply says 'safe' and then more ({_describe(reply)})")
        return frozenset()
    if not tokens:
        raise JudgeReplyError("the reply says 'unsafe' but names no category code")
    hazards: set[Hazard] = set()
    for token in tokens:
        if not _CODE.fullmatch(token):
            raise JudgeReplyError(
                f"the reply lists something that is not a category code ({_describe(reply)})"
            )
        hazard = HAZARDS_BY_CODE.get(token.upper())
        if hazard is None:
            known = f"{HAZARDS[0].code}..{HAZARDS[-1].code}"
            raise JudgeReplyError(
                f"the reply names unknown category code {token.upper()} (known: {known})"
            )
        hazards.add(hazard)
    return frozenset(hazards)


class LlmJudgeClassifier:
    """Ask an LLM, through litellm, whether each text is safe under Llama Guard 3's policy.

    A judge is a hard classifier: it answers safe or unsafe, not a probability. Every
    label in ``labels`` scores 1.0 when a flagged hazard maps to it and 0.0 otherwise, so
    the policy's thresholds only decide whether the judge's vote counts, not how sure it
    is. Raises ``LlmJudgeError`` for a failed call or an unreadable reply.

    ``mock_response`` is passed through to ``litellm.completion``: litellm then returns
    that reply without calling a model, which is how tests and offline demos run it.
    """

    def __init__(
        self,
        *,
        id: str = "llm_judge",
        model: str,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_JUDGE_TIMEOUT_S,
        max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS,
        mock_response: str | None = None,
        role: Role = "User",
    ) -> None:
        if not id.strip():
            raise MemberLoadError("llm_judge: the member id must not be empty")
        if not model.strip():
            raise MemberLoadError(
                f"{id}: model must name a litellm model, e.g. 'ollama/llama-guard3:1b'"
            )
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise MemberLoadError(
                f"{id}: timeout_s must be a positive number of seconds, got {timeout_s!r}"
            )
        if max_tokens < 1:
            raise MemberLoadError(f"{id}: max_tokens must be at least 1, got {max_tokens!r}")
        if mock_response == "":
            # litellm ignores a falsy mock and would call the real model instead.
            raise MemberLoadError(f"{id}: mock_response must not be empty; leave it unset instead")
        if role not in _ROLES:
            raise MemberLoadError(f"{id}: role must be 'User' or 'Agent', got {role!r}")
        self._id = id
        self._model = model
        self._api_base = api_base
        self._api_key = api_key
        self._timeout_s = float(timeout_s)
        self._max_tokens = max_tokens
        self._mock_response = mock_response
        self._role: Role = role
        _import_litellm()  # now, so a broken install fails at start-up, not on a request

    @property
    def id(self) -> str:
        return self._id

    @property
    def model(self) -> str:
        return self._model

    @property
    def labels(self) -> frozenset[Label]:
        return JUDGE_LABELS

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        """Judge each text with one model call; return the detections in the texts' order.

        Up to ``MAX_CONCURRENT_JUDGE_CALLS`` calls run at once. The first failure raises
        ``LlmJudgeError`` and cancels the calls not yet started.
        """
        views = [text.light for text in texts]
        if len(views) <= 1:
            return [self._classify_one(view) for view in views]
        pool = ThreadPoolExecutor(
            max_workers=min(len(views), MAX_CONCURRENT_JUDGE_CALLS),
            thread_name_prefix=f"{self._id}-call",
        )
        try:
            return list(pool.map(self._classify_one, views))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _classify_one(self, text: str) -> Detection:
        started = time.perf_counter()
        reply = self._complete(text)
        try:
            hazards = parse_reply(reply)
        except JudgeReplyError as exc:
            raise JudgeReplyError(f"{self._id}: judge model {self._model!r}: {exc}") from None
        flagged = {category for hazard in hazards for category in hazard.categories}
        logger.debug(
            "llm judge verdict",
            extra={
                "member": self._id,
                "model": self._model,
                "text_chars": len(text),
                "hazards": sorted(hazard.code for hazard in hazards),
                "latency_ms": round((time.perf_counter() - started) * 1000.0, 1),
            },
        )
        return Detection(scores={label: 1.0 if label in flagged else 0.0 for label in JUDGE_LABELS})

    def _complete(self, text: str) -> str:
        """Return the model's reply to the judge prompt for ``text``."""
        import litellm  # imported by the constructor with the offline price map
        import openai

        try:
            response = litellm.completion(
                model=self._model,
                messages=[{"role": "user", "content": build_prompt(text, role=self._role)}],
                temperature=0,
                max_tokens=self._max_tokens,
                timeout=self._timeout_s,
                api_base=self._api_base,
                api_key=self._api_key,
                mock_response=self._mock_response,
            )
        except openai.OpenAIError as exc:
            # Every litellm exception subclasses an openai one. Their messages may carry the
            # provider's error body, which can quote the prompt, so only the type and status
            # go into ours; the litellm error stays attached as __cause__.
            status = getattr(exc, "status_code", None)
            detail = type(exc).__name__ + (f", status {status}" if status is not None else "")
            raise JudgeCallError(
                f"{self._id}: the call to judge model {self._model!r} failed ({detail})"
            ) from exc
        if not isinstance(response, litellm.ModelResponse) or not response.choices:
            raise JudgeReplyError(f"{self._id}: judge model {self._model!r} returned no choices")
        choice = response.choices[0]
        content = getattr(getattr(choice, "message", None), "content", None)
        if not isinstance(content, str):
            raise JudgeReplyError(f"{self._id}: judge model {self._model!r} returned no text")
        if getattr(choice, "finish_reason", None) == "length":
            raise JudgeReplyError(
                f"{self._id}: the reply of judge model {self._model!r} was cut off at "
                f"max_tokens={self._max_tokens}; raise max_tokens"
            )
        return content


def _describe(reply: str) -> str:
    """Identify a reply without quoting it: a judge's reply may repeat the text."""
    digest = hashlib.sha256(reply.encode("utf-8")).hexdigest()[:12]
    return f"{len(reply)} chars, sha256 {digest}"


def _import_litellm() -> None:
    """Import litellm without letting it fetch its model price map over the network."""
    offline_defaults()
    import litellm  # noqa: F401


MEMBERS.add(MemberKind.LLM_JUDGE, LlmJudgeClassifier)
