"""What reviewing a flagged item does besides labelling it, for the review API
(``gateway.routes.review``) and the dashboard (``dashboard.review``) alike: export it as
an eval example, and check and add a term from it to a blocklist."""

from __future__ import annotations

from gateway.audit import ReviewState, StoredItem
from gateway.blocklists import (
    BlocklistStore,
    ItemKind,
    TermTrie,
    checked_regex,
    regex_spans,
    term_tokens,
)
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.safety.normalize import normalize
from gateway.safety.taxonomy import Direction

CREATED_BLOCKLIST_DESCRIPTION = "created from the review of flagged items"


def eval_example(stored: StoredItem) -> dict[str, object]:
    """One labelled item as an eval example: the text as a chat turn and what to expect.

    ``labels`` is what ``safegate eval`` suites read: a prompt reviewers confirmed is
    ``harmful`` (a model should refuse it: ``refusal_rate``), one they called a false
    positive is ``benign_risky`` (a model should answer it: ``over_refusal_rate``), so the
    prompt items of an export load as a suite dataset (``format: chat``). Completion items
    carry only the assistant's text (the prompt behind them is not kept).
    """
    item = stored.item
    role = "user" if item.direction is Direction.PROMPT else "assistant"
    expected = {
        ReviewState.TRUE_POSITIVE: "flag",
        ReviewState.FALSE_POSITIVE: "allow",
    }.get(stored.review_state)
    labels: dict[str, object] = {
        "review": stored.review_state.value,
        "direction": item.direction.value,
        "categories": list(item.categories),
    }
    if expected is not None:
        labels["harmful" if expected == "flag" else "benign_risky"] = True
    return {
        "id": item.id,
        "messages": [{"role": role, "content": item.text}],
        "direction": item.direction.value,
        "categories": list(item.categories),
        "label": stored.review_state.value,
        "expected": expected,
        "labels": labels,
    }


def check_term_occurs(kind: ItemKind, value: str, text: str) -> None:
    """Raise unless ``value`` matches ``text`` the way the blocklist member would."""
    folded = normalize(text).folded
    if kind is ItemKind.TERM:
        tokens = term_tokens(value)
        if not tokens:
            raise InvalidRequest(
                "the term is empty after normalisation", param="term", code="empty_term"
            )
        if TermTrie.build([("review", tokens)]).search(folded):
            return
        raise InvalidRequest(
            "the term does not occur in the item's text (terms match whole words, after "
            "case, accents, homoglyphs, spacing and leetspeak are folded)",
            param="term",
            code="term_not_in_item",
        )
    pattern = checked_regex(value, param="term")
    if next(regex_spans(pattern, folded), None) is None:
        raise InvalidRequest(
            "the regex does not match the item's text (regexes search the folded text: "
            "lower case, leetspeak and homoglyphs folded)",
            param="term",
            code="term_not_in_item",
        )


def ensure_blocklist(blocklists: BlocklistStore, name: str) -> bool:
    """Create the list unless it exists; True when this call created it."""
    try:
        blocklists.get(name)
        return False
    except NotFound:
        pass
    try:
        blocklists.create(name, CREATED_BLOCKLIST_DESCRIPTION)
    except Conflict:  # created concurrently: it exists, which is all we need
        return False
    except InvalidRequest as error:
        raise InvalidRequest(error.message, param="blocklist", code=error.code) from None
    return True
