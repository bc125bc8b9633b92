"""One generation's inputs and outputs, independent of HTTP: the conversation's turns,
sampling parameters and the base's sampling defaults, the tokenized prompt, the
completion, and stop strings (cut from text, streamed or not, and stopping generation).

A request that leaves out ``temperature`` or ``top_p`` gets the base's own defaults where
its ``generation_config.json`` sets them, as vLLM applies them (``SamplingDefaults``):
``"do_sample": false`` answers greedily (the demo base says so: its adapters answer what
they learned), ``temperature`` and ``top_p`` are taken as they are. Otherwise, and for
Phi-3's own files, which set none of them, OpenAI's defaults (1.0 and 1.0) apply.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

from finetune.errors import InvalidRequest, failure_reason

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("safegate.finetune.serving")

DEFAULT_MAX_TOKENS = 256  # when a request gives neither max_tokens nor max_completion_tokens
MAX_TOKENS_CAP = 2048  # a request asking for more is refused
DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults, unless the base's generation config sets its own
DEFAULT_TOP_P = 1.0
GENERATION_CONFIG = "generation_config.json"
MAX_STOP_SEQUENCES = 4
DEFAULT_GENERATION_TIMEOUT_S = 300.0  # a generation running longer stops, finish_reason "length"

FinishReason = Literal["stop", "length"]


TurnRole = Literal["system", "user", "assistant"]  # a request's roles, "developer" as system
ROLES: dict[str, TurnRole] = {"system": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Turn:
    role: TurnRole
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, or what the context has left
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    stop: tuple[str, ...] = ()
    seed: int | None = None
    timeout_s: float = DEFAULT_GENERATION_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_TOKENS_CAP:
            raise InvalidRequest(
                f"max_tokens must be between 1 and {MAX_TOKENS_CAP}, got {self.max_tokens}",
                param="max_tokens",
            )
        if not 0 <= self.temperature <= 2:
            raise InvalidRequest("temperature must be between 0 and 2", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(not s for s in self.stop):
            raise InvalidRequest(
                f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings", param="stop"
            )
        if self.timeout_s <= 0:
            raise InvalidRequest("timeout_s must be positive", param="timeout_s")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves out ``temperature`` or ``top_p`` gets."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P

    @classmethod
    def of(cls, generation_config: Mapping[str, Any]) -> SamplingDefaults:
        """A base's defaults from its ``generation_config.json``: ``do_sample: false`` is
        greedy, ``temperature`` and ``top_p`` count where set; OpenAI's otherwise. A value
        out of OpenAI's range is ignored (logged), never an error for every request."""
        if generation_config.get("do_sample") is False:
            return cls(temperature=0.0)
        temperature = generation_config.get("temperature", DEFAULT_TEMPERATURE)
        top_p = generation_config.get("top_p", DEFAULT_TOP_P)
        if _number(temperature) and _number(top_p) and 0 <= temperature <= 2 and 0 < top_p <= 1:
            return cls(temperature=float(temperature), top_p=float(top_p))
        log.warning("the base's generation config has sampling values out of range; ignored")
        return cls()

    @classmethod
    def of_base(cls, location: str) -> SamplingDefaults:
        """The defaults of a local folder, or of a hub id from the local cache only."""
        folder = Path(location).expanduser()
        if folder.is_dir():
            found: object = folder / GENERATION_CONFIG
        else:
            from huggingface_hub import try_to_load_from_cache

            try:
                found = try_to_load_from_cache(location, GENERATION_CONFIG)
            except Exception:  # noqa: BLE001 - not a hub id: no file, no defaults
                found = None
        if not isinstance(found, str | Path) or not Path(found).is_file():
            return cls()
        try:
            data = json.loads(Path(found).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("cannot read the base's %s: %s", GENERATION_CONFIG, failure_reason(exc))
            return cls()
        return cls.of(data) if isinstance(data, dict) else cls()


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Prompt:
    """A tokenized request, checked against the model's context window."""

    model: str
    adapter: str | None  # None: the bare base
    input_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


def finish(
    text: str,
    new_ids: Sequence[int],
    *,
    params: SamplingParams,
    stop_ids: Sequence[int],
    prompt_tokens: int,
) -> Completion:
    cut = first_stop(text, params.stop)
    if cut is not None:
        text, reason = text[:cut], "stop"
    elif new_ids and new_ids[-1] in stop_ids:
        reason = "stop"
    else:
        reason = "length"  # max_tokens, or the generation timed out or was cancelled
    return Completion(
        text=text,
        finish_reason="stop" if reason == "stop" else "length",
        prompt_tokens=prompt_tokens,
        completion_tokens=len(new_ids),
    )


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [index for index in (text.find(s) for s in stops) if index >= 0]
    return min(found) if found else None


class StopFilter:
    """Streamed text minus everything from the first stop string on.

    Holds back the end of the text that could be the start of a stop string, so a stop
    string split across chunks never reaches the client.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut = first_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._send(cut)
        hold = max((_overlap(self.text, stop) for stop in self.stops), default=0)
        return self._send(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._send(len(self.text))

    def _send(self, end: int) -> str:
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that begins ``stop``."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


class StopWhen:
    """Stops generation at a stop string, on cancel (client gone) or past the deadline."""

    def __init__(
        self,
        *,
        decode: Callable[[Sequence[int]], str],
        start: int,
        stops: Sequence[str],
        cancel: threading.Event,
        deadline: float,
    ) -> None:
        self.decode = decode
        self.start = start
        self.stops = tuple(stops)
        self.cancel = cancel
        self.deadline = deadline

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        import torch

        done = self.cancel.is_set() or time.monotonic() > self.deadline
        if not done and self.stops:
            text = self.decode(input_ids[0, self.start :].tolist())
            done = first_stop(text, self.stops) is not None
        flags = torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
        return flags  # type: ignore[return-value]
