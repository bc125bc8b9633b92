"""How many HTTP requests this process is serving, for the encoder to size its threads.

ONNX Runtime runs the encoder's forward pass on every core by default, which is fastest
when the pass is all the process does. Under concurrent requests the other cores are
wanted by the rest of the request (HTTP, litellm, the audit) and ONNX Runtime's spinning
threads take them away: one intra-op thread served 56 moderated chat requests a second at
concurrency 16 against 42 with two, and cost 2.6 ms at concurrency 1
(docs/BENCHMARKS.md). So the encoder asks ``busy()`` before each pass: all cores when one
request is in flight, one core when others are.

The counter changes on the event loop's thread (``gateway.middleware.RequestContext``)
and is read from the engine's threads; an int read is atomic in CPython, and a stale read
costs only one pass on the other thread count.
"""

from __future__ import annotations

_in_flight = 0


def enter() -> None:
    """A request started."""
    global _in_flight  # noqa: PLW0603 - one counter per process, by design
    _in_flight += 1


def leave() -> None:
    """A request ended."""
    global _in_flight  # noqa: PLW0603
    _in_flight = max(0, _in_flight - 1)


def in_flight() -> int:
    return _in_flight


def busy() -> bool:
    """More than one request in flight: the cores are shared."""
    return _in_flight > 1
