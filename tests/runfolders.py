"""Run folders written by hand with ``RunWriter``, in every status, for tests that need no model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from collapse_tui.records import Event, IterationRecord
from collapse_tui.runfolder import ENDING_SNAPSHOT, RunWriter, read_jsonl


def record(
    i: int,
    *,
    lr: float = 4e-5,
    evals: tuple[str, ...] = ("wikitext-2",),
    gen_loss: float | None = None,
    resumed: bool = False,
) -> IterationRecord:
    """Iteration ``i``: validation loss rising, generated-text loss falling, as in a collapse.

    ``resumed``: written by a resume, so now (its first branch's are at 1000 + i): after the resume's
    ``resumed_from`` event, as the engine's are, which is how a reader tells the branches apart."""
    return IterationRecord(
        iteration=i,
        lr=lr,
        gen_loss=3.0 - 0.2 * i if gen_loss is None else gen_loss,
        valid={name: 3.4 + 0.1 * i + k for k, name in enumerate(evals)},
        rep4=min(0.1 + 0.1 * i, 1.0),
        distinct1=0.5,
        unique_tokens=100 - i,
        compression_ratio=2.0 + i,
        collapsed=False,
        seconds={"generate": 0.1, "evaluate": 0.1, "train": 0.1},
        text=f"sample {i}",
        time=time.time() if resumed else 1_000.0 + i,
    )


def config(model: str = "gpt2", lr: float = 4e-5, evals: tuple[str, ...] = ("wikitext-2",), **extra) -> dict:
    return {
        "model": model,
        "lr": lr,
        "evals": list(evals),
        "max_iters": 100,
        "eval_sets": {name: {"windows": 4} for name in evals},
        "resolved_device": "cpu",
        **extra,
    }


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_process(run_dir: Path, pid: int, *, state: str = "running", hostname: str | None = None) -> None:
    info = {"pid": pid, "hostname": hostname or socket.gethostname(), "started": time.time(), "state": state}
    (run_dir / "process.json").write_text(json.dumps(info), encoding="utf-8")


def make_run(
    path: Path,
    status: str = "finished",
    *,
    n: int = 5,
    lr: float = 4e-5,
    model: str = "gpt2",
    evals: tuple[str, ...] = ("wikitext-2",),
    collapse_at: int | None = None,
    created: float | None = None,
) -> Path:
    """A run folder of ``n`` iterations ending in ``status``.

    finished, collapsed, stopped, crashed: with events and a summary, as the
    engine ends them. "running": no summary, this process announced as its
    writer (alive). "killed": no summary, a dead pid in process.json.
    "unknown": no summary and no process.json.
    """
    writer = RunWriter(path)
    writer.write_config(config(model, lr, evals, created=created if created is not None else time.time()))
    writer.write_event(Event("start", 0, data={"lr": lr}))
    if status == "collapsed" and collapse_at is None:
        collapse_at = n - 1
    for i in range(n):
        rec = record(i, lr=lr, evals=evals)
        rec.collapsed = collapse_at is not None and i >= collapse_at
        writer.write_record(rec)
        if collapse_at == i:
            writer.write_event(Event("collapse", i + 1, data={"rep4": rec.rep4, "at": i}))
    if status in ("finished", "collapsed", "stopped", "crashed"):
        if status == "crashed":
            writer.write_event(Event("error", n, data={"message": "boom"}))
        stop = Event("stop", n, data={"reason": status, "status": status})
        writer.write_event(stop)
        # naming its stop event, as the engine's does: a resume's own stop then tells it is not the last word
        writer.write_summary(
            {
                "status": status,
                "reason": status,
                "iterations": n,
                "collapsed_at": collapse_at,
                "stopped": stop.time,
            }
        )
    elif status == "running":
        write_process(path, os.getpid())
    elif status == "killed":
        write_process(path, dead_pid())
    writer.close()
    return path


def ending_summary(run_dir: Path, status: str, iterations: int) -> dict:
    """The summary an engine writes before its final snapshot: marked ``ending``, naming its start event."""
    starts = [row["time"] for row in read_jsonl(run_dir / "events.jsonl") if row["event"] == "start"]
    return {
        "status": status,
        "reason": status,
        "iterations": iterations,
        "ending": ENDING_SNAPSHOT,
        "started": starts[-1],
    }


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until true; fail (not hang) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
