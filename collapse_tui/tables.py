"""Printing the tables the commands end with (``headless``'s summary, ``runs``, ``sweep``'s), and
giving up on an output that nothing reads any more.

Why a module of its own: a pipe or a file has no width, and rich then lays a
table out at 80 columns, cutting or folding what a researcher copies or greps
(a run's name, the snapshot path ``--resume`` takes). Both commands print
through ``print_table`` and keep those whole.
"""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.table import Table

#: As wide as any table here may need to be laid out on one line.
_UNBOUNDED = 10_000


def print_table(console: Console, table: Table) -> None:
    """``table`` on ``console``: at the terminal's width, or as wide as it needs into a pipe or file."""
    if not console.is_terminal:
        natural = console.measure(table, options=console.options.update_width(_UNBOUNDED)).maximum
        console.width = max(console.width, natural)
    console.print(table)


def stop_writing_stdout() -> None:
    """Nothing reads standard output any more (a closed pipe, a terminal gone): send the rest nowhere,
    so that even Python's last flush at exit does not fail (exit code 120, and a complaint)."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
