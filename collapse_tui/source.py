"""The small interface between a run and whatever shows it.

The TUI and the headless runner never touch the engine's internals: they get
a ``RunSource`` (the engine in this process, or a follower of a run folder
another process writes), call ``run`` in a background thread with an
``EngineListener``, and steer it through ``controls``. Tests feed the TUI a
fake source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from collapse_tui.controls import RunControls
from collapse_tui.records import Event, IterationRecord


@dataclass
class RunInfo:
    """What a front end shows about a run before and while it runs."""

    model: str
    device: str
    max_iters: int
    lr: float
    eval_names: list[str]
    collapse_threshold: float = 0.9
    collapse_patience: int = 3
    keep_going: bool = False
    run_dir: str = ""
    #: For a watcher: when the run's process started and (if it has) ended, by the wall clock, so
    #: that elapsed is the run's time, not the watcher's. None for the engine in this process.
    process_started: float | None = None
    process_ended: float | None = None
    #: For a watcher: the time of the last event already in the folder when it was opened, by the
    #: clock of the run's host. Events up to it are history, replayed; only later ones are news.
    #: None for the engine in this process, whose events are all news.
    history_until: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class EngineListener(Protocol):
    """Callbacks from the run's thread. Implementations must be thread-safe."""

    def on_status(self, message: str, fraction: float | None = None) -> None:
        """Loading progress: what is being done, and how far (0..1) if known."""

    def on_record(self, record: IterationRecord) -> None:
        """One finished iteration."""

    def on_event(self, event: Event) -> None:
        """Something that happened between iterations (pause, lr change, collapse, …)."""


class NullListener:
    """A listener that ignores everything."""

    def on_status(self, message: str, fraction: float | None = None) -> None:
        pass

    def on_record(self, record: IterationRecord) -> None:
        pass

    def on_event(self, event: Event) -> None:
        pass


class RunSource(Protocol):
    """A run a front end can show and steer."""

    controls: RunControls
    info: RunInfo

    def run(self, listener: EngineListener) -> dict[str, Any]:
        """Run (or follow) to the end, blocking; return the summary."""
        ...
