"""The safety engine: normalise, run every member under a time budget, combine, decide.

Flow for a batch of texts::

    normalize -> members (concurrently, each with its time budget) -> MemberReports
              -> per text and direction: combine scores per label (max over members),
                 apply the policy's thresholds and actions, derive Azure severities
              -> Verdict

Detection (the expensive part) does not depend on direction or policy, so concurrent
requests are micro-batched into one detection pass (``gateway.safety.batcher``) and each
request then gets its own decision.

Time budgets: in one ``detect`` call every member gets ``timeout_s`` plus
``timeout_per_kchar_s`` for each 1,000 characters of that call's texts
(``MemberSpec.budget``). The batcher bounds a call to one slice of
``max_batch_chars`` characters (a longer text runs alone), so a budget covers a text's
own work plus at most one slice of other requests' texts, never a whole queue.

Allowlists (``gateway.safety.allowlist``): when the engine has a source, ``detect`` also
searches each text for allowlisted terms and regexes; a text that matches is scored once
more, by the members that score categories, with the matches masked, in the same pass.
``decide`` uses the lower of the two scores only for the categories and direction the
lists name, and says so in the reasons when that unflagged a category. A source that
cannot be read fails like a member (``allowlist``), closed unless the policy lists it.

Fail closed: a member that raises or overruns its budget yields a report with an
``error``; the verdict is blocked, with that reason, unless the policy lists the member
under ``fail_open``.

Exceptions (all subclass ``SafetyError``)::

    SafetyError
     +-- InputTooLong      a text exceeds ``max_text_chars``
     +-- EngineNotReady    members failed to load, or the batcher stopped
     +-- EngineOverloaded  the batcher's queue is full; carries ``retry_after_s``
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from gateway.safety.allowlist import ALLOWLIST_MEMBER, AllowlistSource, Masking, maskings
from gateway.safety.classifier import Classifier
from gateway.safety.normalize import NormalizedText, normalize
from gateway.safety.policy import Policy
from gateway.safety.settings import (
    DEFAULT_MAX_TEXT_CHARS,
    DEFAULT_MEMBER_TIMEOUT_S,
    DEFAULT_TIMEOUT_PER_KCHAR_S,
)
from gateway.safety.severity import azure_results
from gateway.safety.taxonomy import Category, Direction, Label, Shield
from gateway.safety.verdict import (
    Action,
    Detection,
    Exemption,
    Finding,
    LabelResult,
    MemberReport,
    Verdict,
)

ALL_LABELS: tuple[Label, ...] = (*Category, *Shield)


class SafetyError(Exception):
    """Base class of the engine's errors."""


class InputTooLong(SafetyError):
    def __init__(self, *, index: int, length: int, limit: int) -> None:
        super().__init__(
            f"input {index} has {length} characters; the limit is {limit} "
            "(SAFEGATE_ENGINE__MAX_TEXT_CHARS)"
        )
        self.index = index
        self.length = length
        self.limit = limit


class EngineNotReady(SafetyError):
    """The engine has no loaded members, or its batcher has stopped."""


class EngineOverloaded(SafetyError):
    """The batcher's queue cannot take a request's characters; retry in ``retry_after_s``."""

    def __init__(
        self, *, characters: int, pending: int, capacity: int, retry_after_s: float
    ) -> None:
        super().__init__(
            f"the safety engine is overloaded: {pending} characters are waiting and this "
            f"request adds {characters}; the queue holds {capacity} "
            f"(SAFEGATE_ENGINE__QUEUE_CAPACITY_CHARS). Retry in {math.ceil(retry_after_s)} s"
        )
        self.characters = characters
        self.pending = pending
        self.capacity = capacity
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """A loaded member and its time budget."""

    classifier: Classifier
    timeout_s: float = DEFAULT_MEMBER_TIMEOUT_S
    timeout_per_kchar_s: float = DEFAULT_TIMEOUT_PER_KCHAR_S

    def budget(self, characters: int) -> float:
        """Seconds this member may take for one ``detect`` call over ``characters``."""
        return self.timeout_s + self.timeout_per_kchar_s * characters / 1000


class SafetyEngine:
    """Runs the ensemble and turns member reports into verdicts."""

    def __init__(
        self,
        members: Sequence[MemberSpec],
        *,
        policy: Policy,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        allowlists: AllowlistSource | None = None,
    ) -> None:
        if not members:
            raise EngineNotReady("the safety engine needs at least one member")
        ids = [spec.classifier.id for spec in members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"member ids must be unique, got {ids}")
        self.members = tuple(members)
        self.policy = policy
        self.max_text_chars = max_text_chars
        self._allowlists = allowlists
        self._pool = ThreadPoolExecutor(
            max_workers=max(2, 2 * len(members)), thread_name_prefix="safety-member"
        )
        self._tuned = self._tuned_thresholds()
        self.covered_languages = self._covered_languages()
        self._member_languages = {
            spec.classifier.id: tuple(languages)
            for spec in self.members
            if (languages := getattr(spec.classifier, "languages", None)) is not None
        }
        # Members that also score languages their model was not trained on (transfer).
        self._transfers: dict[str, Callable[[str], bool]] = {
            spec.classifier.id: transfers
            for spec in self.members
            if (transfers := getattr(spec.classifier, "transfers_to", None)) is not None
        }

    def attach_allowlists(self, source: AllowlistSource) -> None:
        """Apply ``source``'s allowlists from now on (start-up wiring, before serving)."""
        self._allowlists = source

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- detection ---------------------------------------------------------------------

    def validate(self, texts: Sequence[str]) -> None:
        """Raise ``InputTooLong`` for a text over the limit; never truncate silently."""
        for index, text in enumerate(texts):
            if len(text) > self.max_text_chars:
                raise InputTooLong(index=index, length=len(text), limit=self.max_text_chars)

    def detect(self, texts: Sequence[str]) -> list[tuple[MemberReport, ...]]:
        """Run every member over ``texts``; return each text's member reports.

        Each member's budget is computed from the characters it reads: ``texts``, and for
        the members that score categories also the masked readings allowlists ask for
        (which only texts that match them have; no other member reads them).
        """
        self.validate(texts)
        normalized = [normalize(text) for text in texts]
        plans, allowlist_ms, allowlist_report = self._allowlist_plans(normalized)
        masked = [masking.text for plan in plans for masking in plan]
        # Only the members whose category scores an exemption uses read the masked texts.
        scoring = (
            [i for i, spec in enumerate(self.members) if _scores_categories(spec.classifier)]
            if masked
            else []
        )
        batch = [*normalized, *masked]
        characters = sum(len(text) for text in texts)
        with_masked = characters + sum(len(m.folded) for m in masked)
        started = time.perf_counter()
        futures = [
            (spec, self._pool.submit(_timed, spec.classifier, read))
            for i, spec in enumerate(self.members)
            for read in [batch if i in scoring else normalized]
        ]
        per_member = [
            self._collect(
                spec,
                future,
                budget=spec.budget(with_masked if i in scoring else characters),
                count=len(batch) if i in scoring else len(texts),
                started=started,
            )
            for i, (spec, future) in enumerate(futures)
        ]
        results: list[tuple[MemberReport, ...]] = []
        position = len(texts)
        for index in range(len(texts)):
            reports = [member_reports[index] for member_reports in per_member]
            if allowlist_report is not None:
                reports.append(allowlist_report)
            elif plans[index]:
                exemptions: list[Exemption] = []
                for masking in plans[index]:
                    rescored = tuple(per_member[member][position] for member in scoring)
                    position += 1
                    exemptions += _exemptions(masking, rescored)
                detection = Detection(scores={}, exemptions=tuple(exemptions))
                reports.append(MemberReport(ALLOWLIST_MEMBER, allowlist_ms, detection=detection))
            results.append(tuple(reports))
        return results

    def _allowlist_plans(
        self, texts: Sequence[NormalizedText]
    ) -> tuple[list[list[Masking]], float, MemberReport | None]:
        """Each text's masked readings and the milliseconds finding them took; or, if the
        allowlists cannot be read, the failure to report for every text."""
        started = time.perf_counter()
        source = self._allowlists
        if source is None:
            return [[] for _ in texts], 0.0, None
        try:
            matcher = source.snapshot()
            plans = [maskings(text, matcher) for text in texts]
        except Exception as exc:  # noqa: BLE001 - an unreadable allowlist fails closed
            elapsed = (time.perf_counter() - started) * 1000
            error = f"{type(exc).__name__}: {_first_line(exc)}"
            failed = MemberReport(ALLOWLIST_MEMBER, elapsed, error=error)
            return [[] for _ in texts], elapsed, failed
        return plans, (time.perf_counter() - started) * 1000, None

    def _collect(
        self,
        spec: MemberSpec,
        future: Future[tuple[list[Detection], float]],
        *,
        budget: float,
        count: int,
        started: float,
    ) -> list[MemberReport]:
        member = spec.classifier.id
        remaining = max(0.0, budget - (time.perf_counter() - started))
        # wait() rather than result(timeout): a member that itself raises TimeoutError
        # must be reported as failing, not as overrunning its budget.
        done, _ = wait([future], timeout=remaining)
        if not done:
            future.cancel()
            error = f"timed out after {budget * 1000:.0f} ms"
            return [MemberReport(member, budget * 1000, error=error)] * count
        try:
            detections, latency_ms = future.result()
        except Exception as exc:  # noqa: BLE001 - any member failure must fail closed
            error = f"{type(exc).__name__}: {_first_line(exc)}"
            elapsed = (time.perf_counter() - started) * 1000
            return [MemberReport(member, elapsed, error=error)] * count
        if len(detections) != count:
            error = f"returned {len(detections)} results for {count} texts"
            return [MemberReport(member, latency_ms, error=error)] * count
        return [MemberReport(member, latency_ms, detection=d) for d in detections]

    # -- decision ----------------------------------------------------------------------

    def decide(
        self,
        reports: Sequence[MemberReport],
        *,
        direction: Direction,
        policy: Policy | None = None,
        ignore: Collection[Label] = (),
    ) -> Verdict:
        """Combine one text's member reports under ``policy`` (default: the engine's).

        Labels in ``ignore`` keep their scores but never flag: the chat gateway asks
        about indirect attacks only in documents and tool results, not in a user's turn.
        """
        policy = policy or self.policy
        language = next(
            (
                report.detection.language
                for report in reports
                if report.detection is not None and report.detection.language
            ),
            None,
        )
        heard = self._heard(reports, language)
        exempt = _usable_exemptions(reports, direction)
        before = self._combine(heard, direction=direction, policy=policy, ignore=ignore)
        labels = (
            self._combine(heard, direction=direction, policy=policy, ignore=ignore, exempt=exempt)
            if exempt
            else before
        )
        reasons: list[str] = []
        for label, result in labels.items():
            if result.flagged and result.action is Action.BLOCK:
                reasons.append(
                    f"{direction.value} flagged for {label.value} "
                    f"({_why_flagged(label, result, labels)}; "
                    f"members: {', '.join(result.members)})"
                )
        blocked = bool(reasons)
        for report in reports:
            if report.error is None:
                continue
            if report.member in policy.fail_open:
                reasons.append(f"member {report.member} failed open: {report.error}")
            else:
                blocked = True
                reasons.append(
                    f"member {report.member} failed ({report.error}); blocked because the "
                    "policy fails closed"
                )
        reasons += _exemption_reasons(before, labels, exempt)
        findings: tuple[Finding, ...] = tuple(
            finding
            for report in reports
            if report.detection is not None
            for finding in report.detection.findings
        )
        low_confidence = (
            language is not None
            and self.covered_languages is not None
            and language not in self.covered_languages
        )
        if low_confidence and policy.unsupported_language == "block":
            blocked = True
            reasons.append(
                f"{direction.value} is in a language ({language}) the engine's model does not "
                "cover; the policy blocks low-confidence verdicts"
            )
        return Verdict(
            direction=direction,
            labels=labels,
            azure=azure_results(labels),
            members=tuple(reports),
            blocked=blocked,
            reasons=tuple(reasons),
            findings=findings,
            language=language,
            low_confidence=low_confidence,
        )

    def _heard(
        self, reports: Sequence[MemberReport], language: str | None
    ) -> Sequence[MemberReport]:
        """The reports whose scores count for a text in ``language``.

        A member whose model card names its languages is not heard on a text clearly in
        another language that some other member's model covers: the English encoder reads
        French as noise, so on a French text only the multilingual member's scores count
        (with the members that name no languages: PII, blocklists...). A text in a
        language no member covers is heard by the members that score it by transfer
        (and those that name no languages) when there are any, by every member when
        there are none; either way it is marked low-confidence.
        """
        if language is None:
            return reports
        if language in (self.covered_languages or ()):
            return [
                report
                for report in reports
                if language in self._member_languages.get(report.member, (language,))
            ]
        transferring = {member for member, covers in self._transfers.items() if covers(language)}
        if not transferring:
            return reports
        return [
            report
            for report in reports
            if report.member in transferring or report.member not in self._member_languages
        ]

    def _combine(
        self,
        reports: Sequence[MemberReport],
        *,
        direction: Direction,
        policy: Policy,
        ignore: Collection[Label],
        exempt: Mapping[Label, Exemption] | None = None,
    ) -> dict[Label, LabelResult]:
        """Each label's result: the highest member score against its threshold.

        For a label in ``exempt`` each member scores the lower of the text and the masked
        text (an allowlist only ever lowers a score).
        """
        labels: dict[Label, LabelResult] = {}
        for label in ALL_LABELS:
            threshold = policy.threshold(direction, label, self._tuned)
            scores = {
                report.member: report.detection.scores[label]
                for report in reports
                if report.detection is not None and label in report.detection.scores
            }
            exemption = exempt.get(label) if exempt else None
            if exemption is not None:
                scores = _lowered(scores, exemption, label)
            score = max(scores.values(), default=0.0)
            fired = (
                ()
                if label in ignore
                else tuple(member for member, value in scores.items() if value >= threshold)
            )
            labels[label] = LabelResult(
                label=label,
                score=score,
                threshold=threshold,
                flagged=bool(fired),
                action=policy.action(direction, label),
                members=fired,
            )
        _flag_parents(labels)
        return labels

    def check(
        self,
        texts: Sequence[str],
        *,
        direction: Direction = Direction.PROMPT,
        policy: Policy | None = None,
    ) -> list[Verdict]:
        """Detect and decide in one synchronous call (CLI, evals, tests)."""
        return [
            self.decide(reports, direction=direction, policy=policy)
            for reports in self.detect(texts)
        ]

    def _covered_languages(self) -> frozenset[str] | None:
        """Languages some member's model was trained and measured in; None if no member
        says (then nothing is marked low-confidence)."""
        covered: set[str] = set()
        declared = False
        for spec in self.members:
            languages: Collection[str] | None = getattr(spec.classifier, "languages", None)
            if languages is not None:
                declared = True
                covered.update(languages)
        return frozenset(covered) if declared else None

    def _tuned_thresholds(self) -> Mapping[Label, float]:
        tuned: dict[Label, float] = {}
        for spec in self.members:
            thresholds: Mapping[Label, float] | None = getattr(spec.classifier, "thresholds", None)
            if thresholds:
                for label, value in thresholds.items():
                    tuned[label] = max(tuned.get(label, 0.0), value)
        return tuned


def _scores_categories(classifier: Classifier) -> bool:
    """Whether a member scores harm categories; one that cannot say is taken to (its
    failure on the masked text then voids the exemption: fail closed)."""
    try:
        return any(isinstance(label, Category) for label in classifier.labels)
    except Exception:  # noqa: BLE001 - a broken member must not break detection
        return True


def _exemptions(masking: Masking, reports: tuple[MemberReport, ...]) -> list[Exemption]:
    return [
        Exemption(
            direction=direction,
            categories=categories,
            allowlists=masking.allowlists,
            reports=reports,
        )
        for direction, categories in masking.scopes
    ]


def _usable_exemptions(
    reports: Sequence[MemberReport], direction: Direction
) -> dict[Label, Exemption]:
    """The exemptions for ``direction`` by category; one whose masked text a member failed
    to score is not used (the text's own scores stand)."""
    exempt: dict[Label, Exemption] = {}
    for report in reports:
        if report.detection is None:
            continue
        for exemption in report.detection.exemptions:
            if exemption.direction is not direction:
                continue
            if any(masked.detection is None for masked in exemption.reports):
                continue
            for category in exemption.categories:
                exempt[category] = exemption
    return exempt


def _lowered(scores: Mapping[str, float], exemption: Exemption, label: Label) -> dict[str, float]:
    masked = {
        report.member: report.detection.scores[label]
        for report in exemption.reports
        if report.detection is not None and label in report.detection.scores
    }
    return {
        member: min(value, masked[member]) if member in masked else value
        for member, value in scores.items()
    }


def _exemption_reasons(
    before: Mapping[Label, LabelResult],
    after: Mapping[Label, LabelResult],
    exempt: Mapping[Label, Exemption],
) -> list[str]:
    """A reason for each category an allowlist unflagged, naming the lists (a parent that
    was flagged only through an exempted subcategory goes with it, unnamed)."""
    reasons: list[str] = []
    for label in before:  # the taxonomy's order, whatever order the lists came in
        exemption = exempt.get(label)
        if exemption is None:
            continue
        crossed = before[label].score >= before[label].threshold
        if crossed and before[label].flagged and not after[label].flagged:
            names = ", ".join(f"'{name}'" for name in exemption.allowlists)
            noun = "allowlist" if len(exemption.allowlists) == 1 else "allowlists"
            reasons.append(
                f"{noun} {names} exempted {label.value} (score {before[label].score:.2f} "
                f"with the text as sent, {after[label].score:.2f} with its matches masked; "
                f"threshold {after[label].threshold:.2f})"
            )
    return reasons


def _why_flagged(label: Label, result: LabelResult, labels: Mapping[Label, LabelResult]) -> str:
    """The score against the threshold, or, for a category flagged only because one of
    its subcategories is (``_flag_parents``), which one."""
    if result.score >= result.threshold:
        return f"score {result.score:.2f} >= threshold {result.threshold:.2f}"
    children = [
        other.value
        for other, found in labels.items()
        if isinstance(other, Category) and other is not label and other.parent is label
        if found.flagged
    ]
    return f"its subcategory {', '.join(children)} is flagged"


def _flag_parents(labels: dict[Label, LabelResult]) -> None:
    """A flagged subcategory flags its parent, as in OpenAI's taxonomy (in place)."""
    for label, result in list(labels.items()):
        if not (isinstance(label, Category) and result.flagged and label.parent is not label):
            continue
        parent = labels[label.parent]
        if not parent.flagged:
            labels[label.parent] = replace(
                parent,
                score=max(parent.score, result.score),
                flagged=True,
                members=tuple(dict.fromkeys((*parent.members, *result.members))),
            )


def _timed(classifier: Classifier, texts: list[NormalizedText]) -> tuple[list[Detection], float]:
    started = time.perf_counter()
    detections = classifier.classify(texts)
    return detections, (time.perf_counter() - started) * 1000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no message"
