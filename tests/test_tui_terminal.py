"""The TUI in a real pseudo-terminal, in its own process: what a dropped SSH session or a kill does.

A unit test cannot show these: the hang-up is the terminal itself going away
under Textual's writer thread (which once left the process hanging after its
run had stopped), and the signals reach a process that is drawing a screen.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from signals import wait_until_ignoring

pty = pytest.importorskip("pty")

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TERM": "xterm-256color",
    "COLUMNS": "80",
    "LINES": "24",
}
#: Generous: a cold start imports torch and textual on a 2-core CI machine.
START_S = 180
STOP_S = 90


#: The command line's entry point with a widget that fails at its first update: a bug in the screen.
SCREEN_BUG = (
    "from collapse_tui.tui.widgets import RepetitionMeter\n"
    "def broken(self, *args, **kwargs):\n"
    "    raise RuntimeError('a bug in a widget')\n"
    "RepetitionMeter.update_metrics = broken\n"
    "from collapse_tui.cli import main\n"
    "main()\n"
)


#: The command line's entry point with a final snapshot that never ends: a huge model's, on a slow disk.
STUCK_SNAPSHOT = (
    "import time\n"
    "from collapse_tui.engine import Engine\n"
    "Engine._take_snapshot = lambda self, **kwargs: time.sleep(3600)\n"
    "from collapse_tui.cli import main\n"
    "main()\n"
)


def start_tui(model: Path, evalfile: Path, out: Path, *, entry_code: str | None = None) -> tuple[int, int]:
    """``collapse-tui`` in a new session on a fresh pty (its controlling terminal); (pid, master fd).

    ``entry_code``: Python to run instead of the command line's own entry (it ends by calling it)."""
    entry = ["-c", entry_code] if entry_code else ["-m", "collapse_tui.cli"]
    args = [
        sys.executable, *entry, "--model", str(model), "--eval", str(evalfile),
        "--max-iters", "100000", "--gen-tokens", "64", "--block", "32", "--out", str(out), "--device", "cpu",
    ]  # fmt: skip
    pid, master = pty.fork()
    if pid == 0:  # the child: pty.fork made the pty its controlling terminal
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        os.execve(sys.executable, args, ENV)
    return pid, master


def drain(master: int, done: threading.Event, seen: bytearray | None = None) -> None:
    """Read the screen as it is drawn (a full pty buffer would block the app), until ``done`` or the pty ends.

    It polls, so that it has let go of ``master`` before the test closes it (a read still blocked on a
    closed descriptor, or on its reused number, would confuse the hang-up). What it reads is kept
    in ``seen``, if given.
    """
    while not done.is_set():
        if not select.select([master], [], [], 0.05)[0]:
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:
            return
        if not chunk:
            return
        if seen is not None:
            seen.extend(chunk)


def wait_for_exit(pid: int, seconds: float) -> int | None:
    """The exit status, or None if the process is still running after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    return None


@pytest.mark.parametrize("how", ["hang up", "hang up twice", "SIGTERM", "SIGINT"])
def test_a_dropped_terminal_or_a_kill_stops_the_tui_run_cleanly_and_the_process_ends(
    how: str, tiny_model_dir: Path, eval_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    pid, master = start_tui(tiny_model_dir, eval_file, out)
    done = threading.Event()
    reader = threading.Thread(target=drain, args=(master, done), daemon=True)
    reader.start()
    code: int | None = None
    try:
        deadline = time.monotonic() + START_S
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline, "the TUI run did no iteration"
            assert not os.waitpid(pid, os.WNOHANG)[0], "the TUI ended before its first iteration"
            time.sleep(0.2)
        if how.startswith("hang up"):
            done.set()
            reader.join(timeout=10)
            os.close(master)  # what sshd does when the connection drops: the session gets SIGHUP
            master = -1
            if how == "hang up twice":  # and the shell the run was started from passes one on too
                # apart, as two deliveries: signals of one kind pending together merge
                wait_until_ignoring(pid, signal.SIGHUP, 5.0)
                os.kill(pid, signal.SIGHUP)
        else:
            os.kill(pid, getattr(signal, how))
        code = wait_for_exit(pid, STOP_S)
        assert code is not None, f"the process did not end after {how}"
    finally:
        if code is None:  # it is stuck, or the test failed before it ended
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        done.set()
        reader.join(timeout=10)
        if master >= 0:
            os.close(master)
    assert code == 130  # stopped by a signal (a hang-up is one too)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == (
        "stopped",
        "SIGHUP" if how.startswith("hang up") else how,
    )
    assert json.loads((out / "process.json").read_text())["state"] == "ended"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stop"
    assert summary["iterations"] == len(metrics.read_text().splitlines())


def test_a_bug_in_the_screen_stops_the_run_and_says_so_in_one_line(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    pid, master = start_tui(tiny_model_dir, eval_file, out, entry_code=SCREEN_BUG)
    done, seen = threading.Event(), bytearray()
    reader = threading.Thread(target=drain, args=(master, done, seen), daemon=True)
    reader.start()
    try:
        code = wait_for_exit(pid, START_S + STOP_S)
        if code is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        done.set()
        reader.join(timeout=10)
        os.close(master)
    assert code == 1  # a crash, not a stop the user asked for
    printed = seen.decode("utf-8", "replace")
    assert "the screen crashed (RuntimeError: a bug in a widget); the run was stopped" in printed
    assert "Traceback" not in printed and "a bug in a widget" in (out / "traceback.txt").read_text()
    summary = json.loads(
        (out / "summary.json").read_text()
    )  # the run folder completed, saying why it stopped
    assert (summary["status"], summary["reason"]) == ("stopped", "screen crashed")
    assert json.loads((out / "process.json").read_text())["state"] == "ended"


def test_a_second_kill_int_leaves_at_once_and_gives_the_terminal_back(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path
) -> None:
    """The first stops the run, whose final snapshot hangs; the second ends the process by its own action,
    which would skip Textual's way out: the shell must get its echo, its line mode and its screen back."""
    out = tmp_path / "run"
    pid, master = start_tui(tiny_model_dir, eval_file, out, entry_code=STUCK_SNAPSHOT)
    before = termios.tcgetattr(master)  # as the shell had it, before the screen took the terminal
    done, seen = threading.Event(), bytearray()
    reader = threading.Thread(target=drain, args=(master, done, seen), daemon=True)
    reader.start()
    code: int | None = None
    try:
        deadline = time.monotonic() + START_S
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            assert time.monotonic() < deadline and not os.waitpid(pid, os.WNOHANG)[0], "no iteration"
            time.sleep(0.2)
        raw = termios.tcgetattr(master)
        assert raw[3] & termios.ECHO == 0  # the screen's raw mode
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_S
        summary = out / "summary.json"
        while not (summary.exists() and "ending" in summary.read_text()):  # stuck in its final snapshot
            assert time.monotonic() < deadline, "the run did not reach its final snapshot"
            time.sleep(0.2)
        os.kill(pid, signal.SIGINT)
        code = wait_for_exit(pid, STOP_S)
    finally:
        if code is None:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        reader.join(timeout=10)  # it ends by itself once the process is gone (the pty reads EIO)
        done.set()
        after = termios.tcgetattr(master)
        os.close(master)
    assert code == -signal.SIGINT  # left at once, by the signal
    assert after[3] == before[3] and after[3] & termios.ECHO  # echo and line mode back
    screen = bytes(seen)
    assert screen.rfind(b"\x1b[?1049l") > screen.rfind(b"\x1b[?1049h") >= 0  # the alternate screen left
    assert screen.rfind(b"\x1b[?25h") > screen.rfind(b"\x1b[?25l")  # the cursor shown
