"""The ``collapse-tui`` command (and ``python -m collapse_tui``): the command line, quiet from its first instant.

Why a module of its own in front of ``cli``: importing the command line
(typer, rich, then torch) takes a second or so, before ``cli.main`` can
catch anything. A Ctrl-C in that second (pressed at once, or passed on by
a sweep to a run it has just started) raised KeyboardInterrupt inside some
import and printed its traceback. Here, until ``cli`` is loaded, a Ctrl-C
ends the process quietly with the code of an interruption (nothing has
been made yet), and a sweep's run is tied to its sweep
(``exits.stop_with_parent``) before anything else.
"""

from __future__ import annotations

import signal
from types import FrameType

from collapse_tui.exits import EXIT_INTERRUPTED, hold_early_interrupts, stop_with_parent


def _stopped_while_loading(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_INTERRUPTED)


def main() -> None:
    """Load the command line with a quiet Ctrl-C, then run it with Python's own again."""
    stop_with_parent()
    # only where Ctrl-C would raise KeyboardInterrupt: a job started with & by a script ignores it, and must
    quiet = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if quiet:
        signal.signal(signal.SIGINT, _stopped_while_loading)
    hold_early_interrupts()  # a kill -INT before the run takes SIGINT, where it starts ignored: kept
    from collapse_tui.cli import main as cli_main

    if quiet:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    cli_main()


if __name__ == "__main__":
    main()
