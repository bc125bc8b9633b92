"""A durable, append-only spool of JSON records on local disk.

The audit store (``gateway.audit``) writes here whatever the database cannot take at the
moment, and drains it back later. Nothing here knows what a record means.

Layout: one directory (mode 0700), every file in it 0600 and opened without following
links::

    spool.jsonl                     records being appended, one JSON object per line
    spool.lock                      flock'd around every append and every rotation
    <stamp>.draining                a rotated spool.jsonl, claimed (flock) by one drainer
    <stamp>.set-aside.jsonl         lines a drain could not use, one JSON object each:
                                    {"file", "line", "reason", "raw_base64"}

Appending
    :meth:`Spool.append` writes each record as one line of ASCII JSON, then flushes and
    fsyncs before it returns (a file it creates also fsyncs the directory). A crash can
    leave a half-written last line; the next append starts a fresh line first, so the damage
    stays in that one line.
Draining
    :meth:`Spool.drain` renames ``spool.jsonl`` to a fresh ``.draining`` name (later appends
    start a new ``spool.jsonl``), then works through every ``.draining`` file, leftovers of
    crashed drains included, oldest first. Lines go to ``consume`` in batches; ``consume``
    stores them idempotently (after a crash a line is handed over again) and returns the
    lines it refuses for good. A line that is not a JSON object (a half-written last line,
    say) or that ``consume`` refuses is reported (file and line number, never content) and
    kept aside byte for byte in the ``.set-aside.jsonl`` file. A ``.draining`` file is
    deleted only after every batch of it was consumed and its set-aside file is on disk. If
    ``consume`` raises (the database went away), the drain stops there, the file stays for
    the next drain, and the exception propagates.

Several processes may share the directory: appends and rotations are serialised by
``flock`` on ``spool.lock``, and a ``.draining`` file is drained by whoever holds its
``flock``. :meth:`Spool.pending` is this process's count: exact after a drain, plus its
own appends since.

Errors: ``OSError`` from the file system (disk full, permissions) propagates from
``append`` and ``drain``; nothing else is raised here.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("safegate.spool")

SPOOL_FILE = "spool.jsonl"
LOCK_FILE = "spool.lock"
DRAINING_SUFFIX = ".draining"
SET_ASIDE_SUFFIX = ".set-aside.jsonl"
DIR_MODE = 0o700
FILE_MODE = 0o600
DEFAULT_BATCH_SIZE = 500
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True, slots=True)
class SpooledLine:
    """One record read back from the spool, and where it was."""

    file: str
    line: int  # 1-based
    record: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SetAside:
    """A line the drain could not use: kept in the set-aside file, reported by number."""

    file: str
    line: int
    reason: str  # never quotes the line


@dataclass(frozen=True, slots=True)
class DrainReport:
    files: int  # ``.draining`` files drained completely and deleted
    consumed: int  # lines handed to ``consume`` and accepted
    set_aside: tuple[SetAside, ...]


# ``consume`` stores a batch and returns the lines it refuses for good (with reasons).
Consume = Callable[[Sequence[SpooledLine]], Sequence[SetAside]]


class Spool:
    """An append-only JSONL spool in one directory; see the module docstring."""

    def __init__(self, directory: Path, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        self.directory = directory
        self.batch_size = batch_size
        self._lock = threading.Lock()  # this process's appends, rotations and count
        self._drain_lock = threading.Lock()  # one drain at a time in this process
        self._pending = 0
        self._counted = False

    # -- appending ---------------------------------------------------------------------------

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append ``records``, one line each, and fsync before returning."""
        if not records:
            return
        payload = b"".join(
            json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
            for record in records
        )
        self._ensure_directory()
        with self._lock, self._locked():
            path = self.directory / SPOOL_FILE
            created = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _OPEN_FLAGS, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    payload = b"\n" + payload  # a crash cut the last line: start a new one
                _write_all(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_directory(self.directory)
            self._pending += len(records)

    def pending(self) -> int:
        """Records waiting on disk: exact as of the last drain, plus this process's appends."""
        with self._lock:
            return self._pending

    # -- draining ----------------------------------------------------------------------------

    def drain(self, consume: Consume) -> DrainReport:
        """Hand every spooled line to ``consume``; see the module docstring."""
        with self._drain_lock:
            if not self.directory.is_dir():
                return DrainReport(files=0, consumed=0, set_aside=())
            self._ensure_directory()
            if not self._counted:
                with self._lock:
                    self._pending = sum(_count_lines(path) for path in self._waiting())
                    self._counted = True
            self._rotate()
            files = 0
            consumed = 0
            problems: list[SetAside] = []
            for path in sorted(self.directory.glob(f"*{DRAINING_SUFFIX}")):
                result = self._drain_file(path, consume)
                if result is None:
                    continue  # another drainer holds it, or it is gone
                lines, accepted, refused = result
                files += 1
                consumed += accepted
                problems.extend(refused)
                with self._lock:
                    self._pending = max(0, self._pending - lines)
            return DrainReport(files=files, consumed=consumed, set_aside=tuple(problems))

    def has_waiting(self) -> bool:
        """True when a spool or draining file exists (cheap: a directory listing)."""
        return any(True for _ in self._waiting())

    def _rotate(self) -> None:
        with self._lock, self._locked():
            path = self.directory / SPOOL_FILE
            try:
                if path.lstat().st_size == 0:
                    return
            except FileNotFoundError:
                return
            stamp = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(path, self.directory / f"{stamp}{DRAINING_SUFFIX}")
            _fsync_directory(self.directory)

    def _drain_file(self, path: Path, consume: Consume) -> tuple[int, int, list[SetAside]] | None:
        """Drain one claimed file: (lines, accepted, set aside), or None if not ours."""
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            if os.fstat(handle.fileno()).st_nlink == 0:  # drained and deleted meanwhile
                return None
            lines = 0
            accepted = 0
            aside: list[tuple[SetAside, bytes]] = []
            batch: list[tuple[SpooledLine, bytes]] = []

            def flush() -> None:
                nonlocal accepted
                refused = {item.line: item for item in consume([spooled for spooled, _ in batch])}
                for spooled, raw in batch:
                    problem = refused.get(spooled.line)
                    if problem is None:
                        accepted += 1
                    else:
                        aside.append((problem, raw))
                batch.clear()

            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                lines += 1
                parsed = _parse(path.name, number, raw)
                if isinstance(parsed, SetAside):
                    aside.append((parsed, raw))
                    continue
                batch.append((parsed, raw))
                if len(batch) >= self.batch_size:
                    flush()
            if batch:
                flush()
            aside.sort(key=lambda entry: entry[0].line)
            if aside:
                self._write_set_aside(path, aside)
            for problem, _ in aside:
                log.warning(
                    "spooled line set aside",
                    extra={"file": problem.file, "line": problem.line, "reason": problem.reason},
                )
            os.unlink(path)
            _fsync_directory(self.directory)
        return lines, accepted, [problem for problem, _ in aside]

    def _write_set_aside(self, path: Path, aside: Sequence[tuple[SetAside, bytes]]) -> None:
        """Write the set-aside lines next to ``path`` atomically (a retry rewrites the same)."""
        target = path.with_name(path.name.removesuffix(DRAINING_SUFFIX) + SET_ASIDE_SUFFIX)
        temporary = target.with_name(target.name + ".tmp")
        payload = b"".join(
            json.dumps(
                {
                    "file": problem.file,
                    "line": problem.line,
                    "reason": problem.reason,
                    "raw_base64": base64.b64encode(raw).decode("ascii"),
                },
                sort_keys=True,
            ).encode()
            + b"\n"
            for problem, raw in aside
        )
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _OPEN_FLAGS, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
        _fsync_directory(self.directory)

    # -- the directory -----------------------------------------------------------------------

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if self.directory.is_symlink():
            raise OSError(f"the spool directory {self.directory} is a symbolic link")
        os.chmod(self.directory, DIR_MODE)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _waiting(self) -> Iterator[Path]:
        spool = self.directory / SPOOL_FILE
        if spool.exists():
            yield spool
        yield from self.directory.glob(f"*{DRAINING_SUFFIX}")


def _parse(file: str, number: int, raw: bytes) -> SpooledLine | SetAside:
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        return SetAside(file, number, "not UTF-8")
    except json.JSONDecodeError as error:
        if not raw.endswith(b"\n"):
            return SetAside(file, number, "incomplete last line (a write was cut off)")
        return SetAside(file, number, f"not valid JSON: {error.msg} (column {error.colno})")
    except RecursionError:
        return SetAside(file, number, "not valid JSON: nested too deeply")
    if not isinstance(record, dict):
        return SetAside(file, number, f"not a JSON object but {type(record).__name__}")
    return SpooledLine(file, number, record)


def _count_lines(path: Path) -> int:
    count = 0
    last = b"\n"
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                count += chunk.count(b"\n")
                last = chunk[-1:]
    except FileNotFoundError:
        return 0
    return count + (last != b"\n")


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
