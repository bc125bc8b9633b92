"""The engine fixes glibc's mmap threshold, so large buffers stay off the heap."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# Free an 8 MiB block (glibc then raises its mmap threshold past 8 MiB unless it is fixed)
# and count the mappings a 1 MiB allocation adds: 1 when it is mapped, 0 from the heap.
SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    from gateway.safety.allocator import fix_mmap_threshold

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else None
    libc.free(libc.malloc(8 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(1 << 20)
    print(fixed, libc.mallinfo2().hblks - before)
    libc.free(block)
    """
)


def _run(mode: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run(  # noqa: S603 - this interpreter, a script of this test
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**environment, **env},
    )
    return done.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_megabyte_buffer_is_mapped_after_a_larger_one_was_freed_once_fixed() -> None:
    assert _run("leave") == "None 0"  # glibc's own rule: the heap serves it
    assert _run("fix") == "True 1"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_an_operators_threshold_in_the_environment_is_kept() -> None:
    # glibc reads the variable at start; the engine leaves that choice alone.
    assert _run("fix", MALLOC_MMAP_THRESHOLD_="33554432") == "False 0"
