"""The local model server as a child of ``safegate serve``.

Deployed adapters (``safegate models deploy``, and the demo ``make run`` trains) are
served by ``safegate finetune serve``, an OpenAI-compatible server on 127.0.0.1 that the
gateway reaches through litellm like any other upstream. ``safegate serve`` starts it as
a separate process when the registry has a deployed adapter and nothing already listens
on its port, waits (up to ``DEFAULT_START_TIMEOUT_S``) until it answers, and stops it on
exit. It is a process, not an import: the gateway depends on ``finetune`` only through
the registry's read API, and a model that crashes takes only its own process down.

The child binds 127.0.0.1 alone: it does no filtering, so it must never be reachable
from outside the machine; clients reach its models only through the gateway.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger("safegate.local_models")

LOCAL_HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.5
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the child, before exec: have the kernel send SIGTERM when the parent dies.

    uvicorn re-raises the SIGTERM it caught once it has shut down, so ``safegate serve``
    dies by that signal without running ``stop()``; without this its model server would
    live on, holding the port and the model's memory.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def port_in_use(port: int, host: str = LOCAL_HOST) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


class LocalModelProcess:
    """``safegate finetune serve --host 127.0.0.1 --port PORT`` with its log in a file."""

    def __init__(self, *, port: int, log_file: Path) -> None:
        self.port = port
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCAL_HOST}:{self.port}"

    def start(self, *, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> bool:
        """Start the server and wait until it answers; False if it did not come up."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "safegate.cli",
            "finetune",
            "serve",
            "--host",
            LOCAL_HOST,
            "--port",
            str(self.port),
        ]
        with self.log_file.open("ab") as log_handle:
            self._process = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
                command,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/healthz", timeout=POLL_S).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(POLL_S)
        return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
