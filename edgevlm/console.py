"""The one ``rich`` console factory: terminal width on a TTY, 160 columns when piped (logs, CI), so tables are not
cut to 80 columns in a log file."""

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


__all__ = ["make_console", "PIPED_WIDTH"]
