"""``safegate dashboard [--port P]``: the Streamlit dashboard on http://127.0.0.1:8501.

It runs over the same ``SAFEGATE_HOME`` and database as the gateway (the environment is
passed on unchanged). Before Streamlit starts, every package's tables are upgraded and,
on a first start with no reviewer or admin key, a reviewer key is made and kept in
``SAFEGATE_HOME/local-reviewer.key`` (see ``dashboard.access``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from safegate.offline import offline_defaults

APP = Path(__file__).resolve().parent / "app.py"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501

app = typer.Typer(help="The Streamlit dashboard.")
console = Console(stderr=True, soft_wrap=True)  # paths and keys stay whole


def streamlit_command(*, host: str, port: int) -> list[str]:
    """The command that serves the dashboard: headless, no usage statistics, no watcher."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]


@app.command()
def dashboard(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = DEFAULT_HOST,
) -> None:
    """Start the dashboard (default http://127.0.0.1:8501): compare, review, training, traffic."""
    from dashboard.access import ensure_reviewer_key
    from dashboard.stores import Stores
    from gateway.config import Settings

    offline_defaults()
    settings = Settings()
    stores = Stores.open(settings)  # migrates every package's tables
    try:
        local = ensure_reviewer_key(stores.keys, settings.home_dir)
    finally:
        stores.close()
    if local is not None and local.created is not None:
        console.print(
            f"created a reviewer API key (saved to {escape(str(local.path))}, readable only "
            f"by you); sign in with:\n  [bold]{local.created}[/]",
            soft_wrap=True,
        )
    elif local is not None:
        console.print(f"sign in with the reviewer key in {escape(str(local.path))}")
    else:
        console.print(
            "sign in with a reviewer or admin key "
            "(safegate keys create --name NAME --role reviewer)"
        )
    console.print(
        f"safegate dashboard on http://{host}:{port}  (state in {escape(str(settings.home_dir))})"
    )
    become(streamlit_command(host=host, port=port))


def become(command: list[str]) -> NoReturn:
    """Replace this process with ``command`` (exec): Streamlit keeps this process id, so
    SIGTERM or Ctrl-C to ``safegate dashboard`` reaches Streamlit itself, and stopping it
    leaves no child behind."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)  # noqa: S606 - this interpreter, fixed arguments
