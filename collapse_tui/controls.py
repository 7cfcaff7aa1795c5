"""Thread-safe steering of a running engine: pause, resume, learning rate, snapshot, stop.

A front end (the TUI's key handlers, a watcher's command file, a signal
handler) calls these from any thread; the engine applies them at the next
iteration boundary and records each as an event. A stop is also seen in the
middle of an iteration (``stop_requested``), so a quit never waits for a
whole generation.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


@dataclass
class PendingCommands:
    """What the engine must apply at the boundary it is at."""

    lr: float | None = None
    snapshot: bool = False


class RunControls:
    #: Whether ``stop`` ends the run; a watcher's controls (``follow.FolderControls``) only stop following.
    stops_the_run: bool = True

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._paused = False
        self._stop = threading.Event()
        self._stop_reason = "requested"
        self._pending = PendingCommands()

    # -- called by front ends, from any thread --------------------------------

    def pause(self) -> None:
        with self._condition:
            self._paused = True
            self._condition.notify_all()

    def resume(self) -> None:
        with self._condition:
            self._paused = False
            self._condition.notify_all()

    def set_lr(self, lr: float) -> None:
        """Ask for a new learning rate from the next iteration on."""
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"learning rate must be a positive number, not {lr!r}")
        with self._condition:
            self._pending.lr = float(lr)
            self._condition.notify_all()

    def request_snapshot(self) -> None:
        with self._condition:
            self._pending.snapshot = True
            self._condition.notify_all()

    def stop(self, reason: str = "requested") -> None:
        """Ask the run to stop at its next safe point; ``reason`` (the first given) is what its stop
        event and summary say: "requested" for q, a signal's name (``SIGTERM``) for a kill."""
        with self._condition:
            if not self._stop.is_set():
                self._stop_reason = reason
            self._stop.set()
            self._condition.notify_all()

    # -- read by anyone ----------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def stop_reason(self) -> str:
        """Why the run was asked to stop (see ``stop``)."""
        return self._stop_reason

    @property
    def pending_lr(self) -> float | None:
        """A learning rate asked for but not yet applied, if any."""
        return self._pending.lr

    # -- called by the engine at iteration boundaries ---------------------------

    def take_pending(self) -> PendingCommands:
        with self._condition:
            pending, self._pending = self._pending, PendingCommands()
            return pending

    def wait(self, timeout: float) -> None:
        """Sleep until any command arrives or ``timeout`` passes (used while paused)."""
        with self._condition:
            self._condition.wait(timeout)
