"""The watchdog behind the database deadline (``safegate.deadline``), on plain sockets.

A socket pair stands in for a connection to a frozen server: the kernel holds the
connection open and nothing ever answers, so a ``recv`` on it waits for ever unless the
watchdog cuts it. The PostgreSQL side (the dialects, a real frozen backend) is in
``tests/gateway/test_db.py``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from safegate.deadline import Watchdog, lifted

WAIT_S = 0.3  # a deadline that ends a test quickly
MARGIN_S = 2.0  # what a busy two-core machine may add to it


@contextmanager
def silent_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of sockets: whatever waits on the first hears nothing."""
    ours, theirs = socket.socketpair()
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def wait_for_answer(watchdog: Watchdog, sock: socket.socket, seconds: float) -> tuple[bool, float]:
    """A blocking read under ``watchdog``: whether it was cut, and how long it waited."""
    started = time.monotonic()
    call = watchdog.arm(sock.fileno(), seconds=seconds, what="recv")
    try:
        assert sock.recv(1) == b""  # the end of the stream: the socket was shut down
    finally:
        cut = watchdog.disarm(call)
    return cut, time.monotonic() - started


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_call_that_gets_no_answer_is_cut_at_its_deadline() -> None:
    watchdog = Watchdog(name="test-deadline")
    with silent_pair() as (ours, _):
        cut, waited = wait_for_answer(watchdog, ours, WAIT_S)
    assert cut
    assert WAIT_S <= waited < WAIT_S + MARGIN_S
    assert watchdog.in_flight() == 0


def test_a_call_that_ends_in_time_is_never_touched() -> None:
    watchdog = Watchdog(name="test-deadline")
    with silent_pair() as (ours, theirs):
        call = watchdog.arm(ours.fileno(), seconds=WAIT_S, what="recv")
        theirs.sendall(b"x")
        assert ours.recv(1) == b"x"
        assert watchdog.disarm(call) is False
        time.sleep(WAIT_S * 2)  # past the deadline it no longer has
        theirs.sendall(b"y")
        assert ours.recv(1) == b"y"  # the socket still works both ways
        ours.sendall(b"z")
        assert theirs.recv(1) == b"z"


def test_every_blocked_call_is_cut_and_none_is_left_behind() -> None:
    """Twenty calls wait at once: all are cut by the one watchdog thread, and every
    thread that made one gets it back; no descriptor is left open."""
    watchdog = Watchdog(name="test-deadline-many")
    before = open_descriptors()
    pairs = [socket.socketpair() for _ in range(20)]
    try:
        with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
            started = time.monotonic()
            results = list(pool.map(lambda pair: wait_for_answer(watchdog, pair[0], WAIT_S), pairs))
            elapsed = time.monotonic() - started
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    assert [cut for cut, _ in results] == [True] * len(pairs)
    assert elapsed < WAIT_S + MARGIN_S
    assert watchdog.in_flight() == 0
    assert [t.name for t in threading.enumerate()].count("test-deadline-many") == 1
    assert open_descriptors() == before


def test_many_quick_calls_leave_nothing_behind() -> None:
    watchdog = Watchdog(name="test-deadline-quick")
    with silent_pair() as (ours, _):
        before = open_descriptors()
        for _ in range(500):
            assert watchdog.disarm(watchdog.arm(ours.fileno(), seconds=60.0, what="x")) is False
        assert open_descriptors() == before
    assert watchdog.in_flight() == 0


def test_an_earlier_deadline_armed_later_is_still_kept() -> None:
    """The thread sleeps towards the first call's deadline; a shorter call armed after it
    wakes it up."""
    watchdog = Watchdog(name="test-deadline-order")
    with silent_pair() as (long_wait, _), silent_pair() as (short_wait, _):
        first = watchdog.arm(long_wait.fileno(), seconds=60.0, what="long")
        try:
            cut, waited = wait_for_answer(watchdog, short_wait, WAIT_S)
        finally:
            assert watchdog.disarm(first) is False
    assert cut
    assert waited < WAIT_S + MARGIN_S


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("inf"), float("nan")])
def test_a_lifted_deadline_must_be_a_positive_number_of_seconds(seconds: float) -> None:
    with pytest.raises(ValueError, match="positive"), lifted(seconds):
        pass
