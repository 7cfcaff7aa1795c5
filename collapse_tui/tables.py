"""Printing the tables the commands end with (``headless``'s summary, ``runs``).

Why a module of its own: a pipe or a file has no width, and rich then lays a
table out at 80 columns, cutting or folding what a researcher copies or greps
(a run's name, the snapshot path ``--resume`` takes). Both commands print
through ``print_table`` and keep those whole.
"""

from __future__ import annotations

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
