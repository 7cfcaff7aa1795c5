"""Waiting, from a test, until another process has taken up a signal: not a sleep a loaded machine outruns."""

from __future__ import annotations

import os
import time
from pathlib import Path


def wait_until_ignoring(pid: int, signum: int, seconds: float) -> bool:
    """Whether process ``pid`` came to ignore ``signum`` within ``seconds`` (Linux: its /proc status).

    Why: a test that sends a signal twice must send the second only once the
    first has been handled (the front ends ignore later hang-ups from the
    first on), or the two, pending together, merge into one and the test no
    longer tests a second signal. Where the process never ignores it (a bug,
    or no /proc), this waits out ``seconds``, by which time it has handled the
    first, so the second still comes as a second.
    """
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # gone, or no /proc: wait out the time while it lives, as said above
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            return False
        if int(fields.get("SigIgn", "0").strip(), 16) & (1 << (signum - 1)):
            return True
        time.sleep(0.01)
    return False


def wait_until_catching(pid: int, signum: int, seconds: float) -> bool:
    """Whether process ``pid`` came to catch ``signum`` (a handler of its own) within ``seconds`` (Linux)."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            return False
        if int(fields.get("SigCgt", "0").strip(), 16) & (1 << (signum - 1)):
            return True
        time.sleep(0.01)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
