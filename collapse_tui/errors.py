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
