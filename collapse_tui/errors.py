"""Errors a user can cause.

Every mistake a user can make (a bad option, a missing file, a model that is
not there) is raised as a ``UserError``; the command line turns it into one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""


class RunInterrupted(Exception):
    """Raised inside an iteration when a stop was requested mid-way.

    The engine catches it and discards the half-done iteration, so a quit in
    the middle of a long generation returns promptly.
    """


class ScreenCrashed(Exception):
    """The live screen failed (a bug in the TUI, not in the run): the run was stopped as q stops it.

    Raised from the screen's own error, so its traceback is kept; ``str`` is that error in one line.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(in_one_line(error))


def in_one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (just ``Type`` without one): an error fit for a status or log line.

    Compiler and CUDA errors run to dozens of lines; their first says what went wrong.
    """
    message = str(error).strip()
    first = message.splitlines()[0] if message else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
