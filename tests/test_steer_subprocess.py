"""A watcher steers a headless run in another process through its run folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_cli import ENV, small_run

from collapse_tui.follow import is_alive, send_command
from collapse_tui.runfolder import read_jsonl


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def events(out: Path) -> list[dict]:
    return read_jsonl(out / "events.jsonl")


def test_pause_and_lr_change_from_a_watcher_land_in_a_headless_run(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "run"
    args = small_run(tiny_model_dir, eval_file, out)
    args[args.index("--max-iters") + 1] = "100000"
    process = subprocess.Popen(
        [sys.executable, "-m", "collapse_tui.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        wait_for(lambda: len(read_jsonl(out / "metrics.jsonl")) >= 1)
        assert is_alive(out) is True
        send_command(out, "pause")
        wait_for(lambda: any(e["event"] == "pause" for e in events(out)))
        send_command(out, "lr", lr=2e-3)
        wait_for(lambda: any(e["event"] == "lr" for e in events(out)))
        paused_at = len(read_jsonl(out / "metrics.jsonl"))
        send_command(out, "resume")
        wait_for(lambda: len(read_jsonl(out / "metrics.jsonl")) >= paused_at + 1)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    lr_event = next(e for e in events(out) if e["event"] == "lr")
    assert lr_event["lr"] == 2e-3
    records = read_jsonl(out / "metrics.jsonl")
    assert all(r["lr"] == 4e-5 for r in records[: lr_event["iteration"]])  # the default
    assert all(r["lr"] == 2e-3 for r in records[lr_event["iteration"] :])
    assert json.loads((out / "process.json").read_text())["state"] == "ended"
    assert is_alive(out) is False
