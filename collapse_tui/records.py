"""What the engine emits: one record per iteration and events between them.

These two types are the whole vocabulary between the engine and its front
ends (TUI, headless runner, run-folder writer, watchers of a run folder), so
they are plain data that round-trips through JSON.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from collapse_tui.metrics import format_rep4


def phase_seconds(record: IterationRecord) -> float:
    """The seconds the iteration took (its phases' sum); a hand-edited phase that is no number counts 0."""
    return sum(v for v in record.seconds.values() if isinstance(v, int | float) and math.isfinite(v))


@dataclass
class IterationRecord:
    """One line of metrics.jsonl: the model θ_i, measured before its update."""

    iteration: int
    lr: float
    gen_loss: float
    #: One validation loss per evaluation set, keyed by its ``--eval`` name.
    valid: dict[str, float]
    rep4: float
    distinct1: float
    unique_tokens: int
    compression_ratio: float
    collapsed: bool
    #: Wall-clock seconds of each phase: generate, evaluate, train.
    seconds: dict[str, float]
    text: str
    #: The loss of the training step itself (on the window it trained on).
    train_loss: float = float("nan")
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IterationRecord:
        """Read a metrics line, tolerating older runs that lack optional keys."""
        return cls(
            iteration=int(data["iteration"]),
            lr=float(data.get("lr", float("nan"))),
            gen_loss=float(data.get("gen_loss", float("nan"))),
            valid={str(k): float(v) for k, v in (data.get("valid") or {}).items()},
            rep4=float(data.get("rep4", float("nan"))),
            distinct1=float(data.get("distinct1", float("nan"))),
            unique_tokens=int(data.get("unique_tokens", 0)),
            compression_ratio=float(data.get("compression_ratio", float("nan"))),
            collapsed=bool(data.get("collapsed", False)),
            seconds=dict(data.get("seconds") or {}),
            text=str(data.get("text", "")),
            train_loss=float(data.get("train_loss", float("nan"))),
            time=float(data.get("time", 0.0)),
        )


#: The kinds of event a run records in events.jsonl.
EVENT_KINDS = (
    "start",
    "pause",
    "resume",
    "lr",
    "snapshot",
    "snapshot_failed",
    "collapse",
    "stop",
    "error",
    "resumed_from",
    # Never written by a run: a watcher of a run folder emits it when the run's process is gone.
    "process_gone",
)


@dataclass
class Event:
    """One line of events.jsonl: something that happened between iterations."""

    event: str
    #: The iteration the event applies before (the next one to run); for a non-finite loss's error,
    #: the iteration whose loss it was (a collapse keeps the collapsed iteration in ``at``).
    iteration: int
    time: float = field(default_factory=time.time)
    #: Details that depend on the kind: ``lr`` for a learning-rate change,
    #: ``path`` for a snapshot, ``reason`` for a stop, ``message`` for an error.
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, "iteration": self.iteration, "time": self.time, **self.data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        rest = {k: v for k, v in data.items() if k not in ("event", "iteration", "time")}
        return cls(
            event=str(data["event"]),
            iteration=int(data.get("iteration", 0)),
            time=float(data.get("time", 0.0)),
            data=rest,
        )

    def describe(self) -> str:
        """A short human line for event logs."""
        details = {
            "lr": lambda: f"lr {self.data.get('old_lr', 0):.3g} → {self.data.get('lr', 0):.3g}",
            "snapshot": lambda: (
                f"snapshot → {self.data.get('path', '?')}"
                + (" (saved already)" if self.data.get("again") else "")
            ),
            "snapshot_failed": lambda: f"snapshot failed: {self.data.get('message', '')}",
            "stop": lambda: f"stopped ({self.data.get('reason', 'requested')})",
            "error": lambda: f"error: {self.data.get('message', '')}",
            "collapse": lambda: f"collapsed (rep4 {format_rep4(self.data.get('rep4', 0))})",
            "resumed_from": lambda: (
                f"resumed from {self.data.get('path', '?')}"
                + (
                    " (on another device: a new sampling stream)"
                    if self.data.get("new_sampling_stream")
                    else ""
                )
            ),
            "process_gone": lambda: f"the run's process is gone ({self.data.get('message', 'no summary')})",
        }
        try:
            text = details[self.event]() if self.event in details else self.event
        except (TypeError, ValueError):  # a hand-edited line ("lr": "x"): shown as it is, not a crash
            text = f"{self.event} {self.data}"
        # A collapse is found after the iteration that completes it: name that iteration.
        iteration = self.data.get("at", self.iteration) if self.event == "collapse" else self.iteration
        return f"it {iteration}: {text}"
