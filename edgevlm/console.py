"""The one ``rich`` console factory: terminal width on a TTY, 160 columns when piped (logs, CI), so tables are not
cut to 80 columns in a log file. Every CLI verb that prints rich output makes its console here.

    >>> from edgevlm.console import make_console, print_rows
    >>> console = make_console()
    >>> print_rows(console, table)      # a table whose rows must each stay on one line when piped

Piped output carries no colour or cursor codes (rich only emits them to a terminal, or when ``FORCE_COLOR`` asks
for them).
"""

from __future__ import annotations

import sys
from typing import Any

PIPED_WIDTH = 160


def make_console(stderr: bool = False, **kwargs: Any) -> Any:
    """A ``rich.console.Console`` on stdout (or stderr) whose width is the terminal's, or 160 when not a TTY."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else PIPED_WIDTH
    return Console(stderr=stderr, width=kwargs.pop("width", width), **kwargs)


def print_rows(console: Any, renderable: Any) -> None:
    """Print a table whose rows must each stay on one line (``edgevlm targets``: one grep-able line per row).

    On a terminal it is printed at the terminal's width, like anything else. Piped, the console is widened to the
    table's natural width for this print when that is above ``PIPED_WIDTH``, so no row is wrapped or cut with "…".
    """
    if console.is_terminal:
        console.print(renderable)
        return
    from rich.measure import Measurement

    need = Measurement.get(console, console.options.update_width(10_000), renderable).maximum
    if need <= console.width:
        console.print(renderable)
        return
    width = console.width
    console.width = need
    try:
        console.print(renderable)
    finally:
        console.width = width


__all__ = ["make_console", "print_rows", "PIPED_WIDTH"]
