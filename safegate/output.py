"""Where commands print tables: the terminal's width, or full width when piped.

Output that is not a terminal (a pipe, a file, CI) has no width of its own, and rich
would fold it at 80 columns, breaking table rows across lines. ``table_console`` keeps
each row on one line there; ``--json`` remains the format for programs.
"""

from __future__ import annotations

from rich.console import Console

PIPED_COLUMNS = 1000  # wider than any row: a table keeps its natural width


def table_console() -> Console:
    """A console on stdout for tables: the terminal's width, else ``PIPED_COLUMNS``."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_COLUMNS)
