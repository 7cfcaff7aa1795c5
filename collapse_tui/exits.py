"""How a run's end becomes the process's exit code and last line: one rule for the TUI and headless.

A script running a sweep reads the exit code, so it must tell apart a run
that did what was asked (0), one whose result is not whole (1: a crash, a
non-finite loss, or a final snapshot that could not be written), a stop by a
signal (130) and a user's mistake (2, raised before or while loading).
Which signals end a run at all is decided here too, for both front ends: a
hang-up stops it as ``q`` does, and never ends the process early
(``ignore_later_hangups``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType
from typing import Any

EXIT_OK = 0
#: A run that crashed, stopped on a non-finite loss, or could not save its end.
EXIT_RUN_FAILED = 1
#: A user's mistake: one line on stderr, as ``cli.user_errors`` prints it.
EXIT_USER_ERROR = 2
#: Stopped by Ctrl-C, ``kill`` or a hang-up, as shells report a SIGINT.
EXIT_INTERRUPTED = 130
#: The signals that stop a run as q does; a run they stop gives the signal's name as its reason.
STOP_SIGNAL_NAMES = ("SIGINT", "SIGTERM", "SIGHUP")
#: Set by ``sweep`` for each run it starts: the sweep's pid, whose death stops the run as a SIGTERM does.
STOP_WITH = "COLLAPSE_TUI_STOP_WITH"


def run_exit_code(summary: dict[str, Any], *, signalled: bool) -> int:
    """The exit code for a run that ended with ``summary``.

    ``signalled``: a stop signal arrived while the run was going. It makes the
    exit 130 only where the run really stopped early for it; a signal landing
    while a finished run writes its final snapshot leaves the run's own outcome.
    """
    if summary.get("status") == "crashed" or summary.get("reason") == "non-finite loss":
        return EXIT_RUN_FAILED
    reason = summary.get("reason")
    if reason in ("interrupted", *STOP_SIGNAL_NAMES) or (signalled and reason == "requested"):
        return EXIT_INTERRUPTED
    if summary.get("final_snapshot_failed"):
        return EXIT_RUN_FAILED
    return EXIT_OK


def closing_line(summary: dict[str, Any]) -> str | None:
    """The one line on stderr for a run whose result is not whole (a crash has its own), else None."""
    if summary.get("unchanged"):
        return unchanged_line(summary.get("run_dir", "the run"))
    if summary.get("reason") == "non-finite loss":
        return "collapse-tui: the run stopped on a non-finite loss; its data is kept"
    failed = summary.get("final_snapshot_failed")
    if failed:
        return (
            f"collapse-tui: the final snapshot could not be saved ({failed}); "
            "the run's records are kept, its last weights are not"
        )
    return None


def unchanged_line(run_dir: object) -> str:
    """The one line for a resume that ended before its first iteration, leaving its run as it stood."""
    return (
        f"collapse-tui: the resume ended before its first iteration; {run_dir} "
        "stands as it was (its later iterations and snapshots are kept)"
    )


def stop_with_parent() -> None:
    """Stop this run, as a SIGTERM does, when the sweep that started it dies (Linux).

    Why: a sweep's run has a session of its own (so that the terminal's
    signals reach the sweep alone, which passes them on once); a sweep killed
    without a word (``kill -9``) would otherwise leave it running, holding the GPU.
    The system sends SIGCONT, not SIGTERM, on the sweep's death: a run the
    sweep had suspended (Ctrl-Z, then ``kill -9 %1``) would hold a SIGTERM
    unseen for ever, while SIGCONT wakes it (and whatever its process group
    holds); its handler then finds the sweep gone and sends the SIGTERM. A
    SIGCONT with the sweep alive (``fg``) changes nothing.
    """
    parent = os.environ.pop(STOP_WITH, None)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    def on_continue(signum: int, frame: FrameType | None) -> None:
        if str(os.getppid()) != parent and signal.getsignal(signal.SIGCONT) is on_continue:
            signal.signal(signal.SIGCONT, signal.SIG_DFL)  # once: the SIGCONT sent below reaches us too
            with contextlib.suppress(OSError):
                os.killpg(os.getpgrp(), signal.SIGCONT)  # what the run started, stopped with it
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGCONT, on_continue)
    signal.siginterrupt(signal.SIGCONT, False)  # every fg runs it: system calls go on, not fail with EINTR
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGCONT)
    if str(os.getppid()) != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def changes_nothing_once_stopping(signum: int) -> bool:
    """For a front end's stop-signal handler, once a stop is under way: whether ``signum`` is to be ignored.

    Every stop signal but SIGINT is: a dropped SSH session sends two hang-ups,
    and a scheduler (SLURM, systemd) signals every process of a job, a sweep's
    run and the sweep that passes its own on. Only a second Ctrl-C (or
    ``kill -INT``) means "leave now".
    """
    return signum != signal.SIGINT


def ignore_later_hangups(signum: int) -> bool:
    """For a front end's stop-signal handler: whether ``signum`` is a hang-up, after which SIGHUP is ignored.

    A dropped SSH session sends SIGHUP twice (the shell passes one on to its
    job, then the kernel sends its own). The second is not a user's second
    Ctrl-C ("leave now"), and no hang-up may end the process before it has
    completed its run folder, so from the first one on they are ignored.
    """
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None or signum != hangup:
        return False
    signal.signal(hangup, signal.SIG_IGN)
    return True


#: A ``kill -INT`` that reached a process whose SIGINT was ignored, before a front end took SIGINT.
_early_interrupts: list[int] = []


def _remember_interrupt(signum: int, frame: FrameType | None) -> None:
    _early_interrupts.append(signum)


def hold_early_interrupts() -> None:
    """Where this process started with SIGINT ignored, keep a ``kill -INT`` until a front end can act on it.

    Why: a script's background job (``collapse-tui headless … &``) starts
    with SIGINT ignored, and ``kill -INT`` must still stop it (its front end
    takes SIGINT even so). Before it does, while torch loads (seconds), the
    signal was lost and the run went on to its end. Held here, it is passed
    on by ``pass_on_early_interrupt``; a command that never takes SIGINT
    (``runs``, ``plot``) goes on ignoring it.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, _remember_interrupt)


def pass_on_early_interrupt() -> None:
    """Once a front end has taken SIGINT: deliver to it a ``kill -INT`` held from before."""
    if _early_interrupts:
        _early_interrupts.clear()
        os.kill(os.getpid(), signal.SIGINT)
