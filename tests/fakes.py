"""A fake ``RunSource`` for front-end tests: scripted records, real controls, no model.

It honours ``RunControls`` the way the engine must: commands are applied at
iteration boundaries and reported as events, a pause blocks between
iterations, and a stop is seen in the middle of a (slow) iteration.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from collapse_tui.controls import RunControls
from collapse_tui.errors import UserError
from collapse_tui.records import Event, IterationRecord
from collapse_tui.source import EngineListener, RunInfo

HEALTHY = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction "
    "it surpassed the Washington Monument to become the tallest man-made structure in the world. "
)
MORE = (
    "The first floor has a restaurant and a shop, and the top can be reached by the stairs "
    "or the lifts. Radio antennas were added later, which made it taller still."
)
LOOPING = "T-2 and the " * 40


def make_record(
    i: int, n: int, *, lr: float = 4e-5, eval_names: tuple[str, ...] = ("wikitext-2",)
) -> IterationRecord:
    """Iteration ``i`` of ``n`` of a run sliding smoothly into collapse: deterministic numbers and times."""
    progress = i / max(n - 1, 1)
    rep4 = 0.07 + 0.92 / (1 + math.exp(-12 * (progress - 0.6)))
    looping = progress > 0.55
    text = (HEALTHY[: int(len(HEALTHY) * (1 - progress))] + LOOPING) if looping else HEALTHY + MORE
    return IterationRecord(
        iteration=i,
        lr=lr,
        gen_loss=3.0 * (1 - progress) ** 2 + 0.05,
        valid={name: 3.4 + k * 0.5 + 2.5 * progress**1.5 for k, name in enumerate(eval_names)},
        rep4=rep4,
        distinct1=0.45 - 0.43 * progress,
        unique_tokens=int(420 - 400 * progress),
        compression_ratio=2.3 + 30 * progress**3,
        collapsed=False,
        seconds={"generate": 0.3, "evaluate": 0.1, "train": 0.05},
        text=text,
        time=1_000.0 + 0.5 * i,
    )


class FakeSource:
    """A scripted run.

    ``records`` are emitted first, one iteration each; ``script`` maps an
    iteration to events emitted just before its record. Then ``after``
    decides: ``"return"`` ends the run, ``"wait"`` idles at boundaries
    (applying controls, emitting no records) until stopped, ``"live"`` makes
    endless records that each take ``iteration_s`` seconds.
    """

    def __init__(
        self,
        records: list[IterationRecord] | None = None,
        *,
        info: RunInfo | None = None,
        script: dict[int, list[Event]] | None = None,
        after: str = "wait",
        iteration_s: float = 0.0,
        load_error: Exception | None = None,
        snapshot_root: Path | None = None,
        load_gate: threading.Event | None = None,
        fail_with: Exception | None = None,
    ) -> None:
        self.controls = RunControls()
        self.info = info or RunInfo(
            model="fake-model", device="cpu", max_iters=100, lr=4e-5, eval_names=["wikitext-2"]
        )
        self.records = records or []
        self.script = script or {}
        self.after = after
        self.iteration_s = iteration_s
        self.load_error = load_error
        self.snapshot_root = snapshot_root
        self.load_gate = load_gate
        self.fail_with = fail_with
        self.lr = self.info.lr
        #: Everything emitted, and what the controls asked for, for tests to check.
        self.events: list[Event] = []
        self.lr_changes: list[float] = []
        self.snapshots: list[Path] = []
        self.in_iteration = False
        self.stopped_mid_iteration = False
        self.finished = False
        #: records emitted so far
        self.emitted = 0
        #: what the run says while it loads
        self.status_text = "loading the fake model"

    def run(self, listener: EngineListener) -> dict[str, Any]:
        listener.on_status(self.status_text, 0.5)
        if self.load_gate is not None:
            while not self.load_gate.wait(0.01):
                if self.controls.stop_requested:
                    return {"status": "stopped", "iterations": 0}
        if self.load_error is not None:
            raise self.load_error
        self._emit(listener, Event("start", 0, time=0.0))
        if self.fail_with is not None:
            raise self.fail_with
        iteration = 0
        reason = "finished"
        try:
            while not self.controls.stop_requested:
                if not self._boundary(listener, iteration):
                    break
                if iteration < len(self.records):
                    record = self.records[iteration]
                elif self.after == "live":
                    record = self._slow_iteration(iteration)
                elif self.after == "wait":
                    self.controls.wait(0.01)
                    continue
                else:
                    break
                for event in self.script.get(iteration, []):
                    self._emit(listener, event)
                listener.on_record(record)
                iteration += 1
                self.emitted = iteration
            if self.controls.stop_requested:
                reason = "requested"
        except InterruptedError:
            reason = "requested"
        self._emit(listener, Event("stop", iteration, time=0.0, data={"reason": reason}))
        self.finished = True
        return {"status": "stopped" if reason == "requested" else "finished", "iterations": iteration}

    def _emit(self, listener: EngineListener, event: Event) -> None:
        self.events.append(event)
        listener.on_event(event)

    def _boundary(self, listener: EngineListener, iteration: int) -> bool:
        """Apply what the controls ask for, as the engine does between iterations; False on stop."""
        if self.controls.paused:
            self._emit(listener, Event("pause", iteration, time=0.0))
            while self.controls.paused and not self.controls.stop_requested:
                self.controls.wait(0.01)
            if self.controls.stop_requested:
                return False
            self._emit(listener, Event("resume", iteration, time=0.0))
        pending = self.controls.take_pending()
        if pending.lr is not None:
            self.lr_changes.append(pending.lr)
            self._emit(listener, Event("lr", iteration, time=0.0, data={"lr": pending.lr, "old_lr": self.lr}))
            self.lr = pending.lr
        if pending.snapshot:
            # a test that takes a snapshot gives its own folder: none is written where pytest runs
            assert self.snapshot_root is not None, "a FakeSource that takes snapshots needs snapshot_root"
            path = self.snapshot_root / "snapshots" / f"iter-{iteration}"
            path.mkdir(parents=True, exist_ok=True)
            self.snapshots.append(path)
            self._emit(listener, Event("snapshot", iteration, time=0.0, data={"path": str(path)}))
        return not self.controls.stop_requested

    def _slow_iteration(self, iteration: int) -> IterationRecord:
        """An iteration that takes ``iteration_s`` but gives up at once on a stop, like a long generation."""
        self.in_iteration = True
        deadline = time.monotonic() + self.iteration_s
        try:
            while time.monotonic() < deadline:
                if self.controls.stop_requested:
                    self.stopped_mid_iteration = True
                    raise InterruptedError
                time.sleep(0.005)
        finally:
            self.in_iteration = False
        record = make_record(iteration % 50, 50, lr=self.lr, eval_names=tuple(self.info.eval_names))
        record.iteration = iteration
        return record


def user_error_source() -> FakeSource:
    """A run whose model cannot be found while loading."""
    return FakeSource(load_error=UserError("model 'nope' not found: check the name or the path"))
