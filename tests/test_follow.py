"""Watching a run folder: liveness, commands through the folder, following new lines."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from runfolders import dead_pid, ending_summary, make_run, record, wait_for, write_process

from collapse_tui.controls import RunControls
from collapse_tui.errors import UserError
from collapse_tui.follow import (
    COMMANDS,
    CommandInbox,
    FolderControls,
    FolderSource,
    RunProcess,
    is_alive,
    read_process,
    run_info,
    send_command,
    serving_watchers,
    wait_until_started,
)
from collapse_tui.records import Event, IterationRecord
from collapse_tui.runfolder import ENDING_SNAPSHOT, RunWriter, read_jsonl, read_run


class Collect:
    """A listener that keeps everything, in order."""

    def __init__(self) -> None:
        self.items: list[IterationRecord | Event] = []
        self.statuses: list[str] = []

    def on_status(self, message: str, fraction: float | None = None) -> None:
        self.statuses.append(message)

    def on_record(self, record: IterationRecord) -> None:
        self.items.append(record)

    def on_event(self, event: Event) -> None:
        self.items.append(event)

    @property
    def iterations(self) -> list[int]:
        return [i.iteration for i in self.items if isinstance(i, IterationRecord)]

    @property
    def events(self) -> list[str]:
        return [i.event for i in self.items if isinstance(i, Event)]


def follow_in_thread(source: FolderSource, listener: Collect) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        result.update(source.run(listener))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


# -- liveness ---------------------------------------------------------------------------------


def test_run_process_announces_itself_and_marks_a_clean_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RunProcess(run_dir):
        assert read_process(run_dir)["pid"] == os.getpid()
        assert is_alive(run_dir) is True
    assert read_process(run_dir)["state"] == "ended"
    assert is_alive(run_dir) is False


def test_a_dead_pid_is_not_alive_and_unknowns_are_none(tmp_path: Path) -> None:
    assert is_alive(tmp_path) is None  # no process.json: an older run
    write_process(tmp_path, dead_pid())
    assert is_alive(tmp_path) is False
    write_process(tmp_path, os.getpid(), hostname="another-machine")
    assert is_alive(tmp_path) is None
    (tmp_path / "process.json").write_text('{"pid": 1', encoding="utf-8")
    assert is_alive(tmp_path) is None


# -- commands ---------------------------------------------------------------------------------


def test_the_inbox_applies_sent_commands_in_order(tmp_path: Path) -> None:
    controls = RunControls()
    send_command(tmp_path, "pause")  # meant for an earlier process of this run: skipped
    with CommandInbox(tmp_path, controls, poll_s=0.01) as inbox:
        send_command(tmp_path, "lr", lr=1e-4)
        send_command(tmp_path, "pause")
        send_command(tmp_path, "lr", lr=2e-4)
        send_command(tmp_path, "snapshot")
        with open(tmp_path / COMMANDS, "a", encoding="utf-8") as handle:
            handle.write('{"command": "stop"}\n{"command": "lr", "lr": -1}\nnot json\n')
        wait_for(lambda: len(inbox.applied) + len(inbox.ignored) == 6, what="the commands")
    assert [(c["command"], c.get("lr")) for c in inbox.applied] == [
        ("lr", 1e-4),
        ("pause", None),
        ("lr", 2e-4),
        ("snapshot", None),
    ]
    assert controls.paused and controls.pending_lr == 2e-4
    assert controls.take_pending().snapshot
    assert [row["command"] for row, _ in inbox.ignored] == ["stop", "lr"]  # watchers cannot stop a run
    assert not controls.stop_requested


def test_send_command_refuses_what_a_run_would_not_take(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        send_command(tmp_path, "lr", lr=0)
    with pytest.raises(UserError, match="unknown run command 'stop'"):
        send_command(tmp_path, "stop")
    with pytest.raises(UserError, match="cannot send"):
        send_command(tmp_path / "missing", "pause")
    assert not (tmp_path / COMMANDS).exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_command_that_cannot_be_written_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / COMMANDS).symlink_to("/dev/full")  # every write: no space left on device
    with pytest.raises(UserError, match=r"cannot send 'pause'.*No space left"):
        send_command(tmp_path, "pause")
    controls = FolderControls(tmp_path)
    with pytest.raises(UserError):
        controls.set_lr(1e-4)
    assert controls.pending_lr is None  # not shown as pending: the run never heard of it


def test_a_pause_or_lr_another_watcher_undid_at_the_same_boundary_stops_showing_as_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = 1_800_000_000.0
    monkeypatch.setattr(time, "time", lambda: asked)  # both requests at one known moment: no race
    controls = FolderControls(tmp_path)
    controls.pause()
    controls.set_lr(1e-3)
    assert controls.paused and controls.pending_lr == 1e-3  # at once, for the screen: PAUSING, lr→

    def ending(at: float) -> IterationRecord:  # an iteration of 0.3 s ending ``at`` seconds from the request
        return replace(record(5), time=asked + at)

    controls.observe_record(ending(0.4))  # begun 0.1 s after: the run may not have read it yet
    assert controls.paused and controls.pending_lr == 1e-3
    controls.observe_record(ending(1.0))  # begun after the run had read it, and neither took: undone
    assert not controls.paused and controls.pending_lr is None
    controls.pause()
    controls.observe(Event("pause", 7))  # made: later records (after a resume elsewhere) change nothing here
    controls.observe_record(replace(record(7), time=asked + 5.0))
    assert controls.paused


def test_watchers_sending_at_once_never_interleave_lines(tmp_path: Path) -> None:
    def send(k: int) -> None:
        for i in range(50):
            send_command(tmp_path, "lr", lr=1e-5 * (k + 1) + 1e-9 * i, note="x" * 500)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(read_jsonl(tmp_path / COMMANDS)) == 200


# -- following --------------------------------------------------------------------------------


def test_a_finished_run_is_replayed_in_order_and_its_summary_returned(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "collapsed", n=4, collapse_at=2)
    listener = Collect()
    source = FolderSource(run_dir, read_only=True)
    summary = source.run(listener)
    assert summary["status"] == "collapsed"
    assert listener.iterations == [0, 1, 2, 3]
    # each event comes before the record of the iteration it applies before
    kinds = [i.event if isinstance(i, Event) else i.iteration for i in listener.items]
    assert kinds == ["start", 0, 1, 2, "collapse", 3, "stop"]
    assert source.info.model == "gpt2" and source.info.eval_names == ["wikitext-2"]


def follow_a_live_run(
    tmp_path: Path,
) -> tuple[Path, Collect, FolderSource, threading.Thread, dict, RunWriter]:
    """A run of two iterations whose process lives, a watcher following it, and a writer to go on with."""
    run_dir = make_run(tmp_path / "run", "running", n=2)
    listener = Collect()
    source = FolderSource(run_dir, read_only=True, poll_s=0.01)
    thread, result = follow_in_thread(source, listener)
    wait_for(lambda: len(listener.iterations) == 2, what="the replay")
    return run_dir, listener, source, thread, result, RunWriter(run_dir, resuming=True)


def test_a_live_run_is_followed_until_its_summary_appears(tmp_path: Path) -> None:
    run_dir, listener, source, thread, result, writer = follow_a_live_run(tmp_path)
    for i in range(2, 6):
        if i == 3:
            writer.write_event(Event("pause", 3))
            writer.write_event(Event("resume", 3))
        writer.write_record(record(i))
        wait_for(lambda i=i: i in listener.iterations, what=f"iteration {i}")  # each appears as it lands
    # a half-written line is not delivered until it is finished
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"iteration": 6, "gen_')
    writer.write_event(Event("stop", 6, data={"reason": "max_iters"}))
    writer.write_summary({"status": "finished", "reason": "max_iters", "iterations": 6})
    writer.close()
    thread.join(timeout=10)

    assert not thread.is_alive()
    assert result["status"] == "finished"
    assert listener.iterations == [0, 1, 2, 3, 4, 5]
    assert listener.events == ["start", "pause", "resume", "stop"]
    assert not source.controls.paused


def test_a_summary_written_before_the_final_snapshot_keeps_a_watcher_following(tmp_path: Path) -> None:
    run_dir, listener, _, thread, result, writer = follow_a_live_run(tmp_path)
    writer.write_summary(ending_summary(run_dir, "finished", 2))
    writer.write_event(Event("snapshot", 2, data={"path": str(run_dir / "snapshots" / "iter-2")}))
    wait_for(lambda: "snapshot" in listener.events, what="the snapshot event, after that summary")
    writer.write_event(Event("stop", 2, data={"reason": "max_iters"}))
    writer.write_summary({"status": "finished", "reason": "max_iters", "iterations": 2})
    writer.close()
    thread.join(timeout=10)

    assert not thread.is_alive() and result["status"] == "finished" and "ending" not in result
    assert listener.events[-2:] == ["snapshot", "stop"]


def test_a_run_killed_during_its_final_snapshot_shows_the_summary_it_left(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "killed", n=2)
    writer = RunWriter(run_dir, resuming=True)
    writer.write_summary(ending_summary(run_dir, "stopped", 2))
    writer.close()
    listener = Collect()
    summary = FolderSource(run_dir, read_only=True).run(listener)
    assert (summary["status"], summary["ending"]) == ("stopped", ENDING_SNAPSHOT)
    # and the watcher is told that this end has no snapshot (runs marks it stopped*)
    lost = listener.items[-1]
    assert isinstance(lost, Event) and lost.event == "snapshot_failed" and lost.iteration == 2
    assert "ended while saving its final snapshot iter-2" in lost.describe()


def test_a_run_whose_final_snapshot_was_saved_before_its_process_ended_has_no_such_word(
    tmp_path: Path,
) -> None:
    run_dir = make_run(tmp_path / "run", "killed", n=2)
    writer = RunWriter(run_dir, resuming=True)
    summary = ending_summary(run_dir, "stopped", 2)
    writer.write_summary(summary)
    writer.close()
    final = run_dir / "snapshots" / "iter-2"
    final.mkdir(parents=True)
    (final / "state.json").write_text(json.dumps({"iteration": 2, "time": summary["started"] + 1.0}))
    listener = Collect()
    FolderSource(run_dir, read_only=True).run(listener)
    assert not any(isinstance(item, Event) and item.event == "snapshot_failed" for item in listener.items)


def test_a_run_whose_process_is_gone_is_reported_crashed(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "killed", n=3)
    listener = Collect()
    summary = FolderSource(run_dir, read_only=True).run(listener)
    assert summary["status"] == "crashed" and summary["reason"] == "process gone"
    assert summary["iterations"] == 3 and summary["last"]["iteration"] == 2
    gone = listener.items[-1]
    assert isinstance(gone, Event) and gone.event == "process_gone" and gone.iteration == 3
    assert "without writing a summary" in gone.describe()


def test_a_run_being_resumed_is_followed_though_its_old_summary_is_still_there(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "finished", n=3)
    write_process(run_dir, os.getpid())  # a resume has announced itself and is loading the model
    listener = Collect()
    source = FolderSource(run_dir, read_only=True, poll_s=0.01)
    thread, result = follow_in_thread(source, listener)
    wait_for(lambda: len(listener.iterations) == 3, what="the replay")
    writer = RunWriter(run_dir, resuming=True)
    writer.write_event(Event("resumed_from", 3, data={"path": str(run_dir / "snapshots" / "iter-3")}))
    writer.write_record(record(3, resumed=True))
    wait_for(lambda: 3 in listener.iterations, what="the resumed iteration")
    stop = Event("stop", 4, data={"reason": "max_iters"})
    writer.write_event(stop)  # the old summary, read between these two lines, names another stop: not taken
    writer.write_summary({"status": "finished", "reason": "max_iters", "iterations": 4, "stopped": stop.time})
    writer.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and result["iterations"] == 4


def test_a_replay_leaves_out_the_events_of_iterations_a_resume_abandoned(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "collapsed", n=4, collapse_at=2)
    writer = RunWriter(run_dir, resuming=True)  # went on from iteration 2, and did not collapse
    writer.write_event(Event("resumed_from", 2, data={"path": str(run_dir / "snapshots" / "iter-2")}))
    writer.write_record(record(2, resumed=True))
    writer.write_event(Event("stop", 3, data={"reason": "max_iters", "status": "finished"}))
    writer.write_summary({"status": "finished", "reason": "max_iters", "iterations": 3})
    writer.close()
    listener = Collect()
    FolderSource(run_dir, read_only=True).run(listener)
    assert "collapse" not in listener.events
    assert listener.events == ["start", "stop", "resumed_from", "stop"]


def test_a_replay_leaves_out_the_iterations_a_resume_abandoned_before_it_writes_its_own(
    tmp_path: Path,
) -> None:
    run_dir = make_run(tmp_path / "run", "collapsed", n=6, collapse_at=4)
    writer = RunWriter(run_dir, resuming=True)  # going on from iteration 2: still in its first iteration
    writer.write_event(Event("resumed_from", 2, data={"path": str(run_dir / "snapshots" / "iter-2")}))
    writer.close()
    write_process(run_dir, os.getpid())
    listener = Collect()
    source = FolderSource(run_dir, read_only=True, poll_s=0.01)
    thread, _ = follow_in_thread(source, listener)
    wait_for(lambda: "resumed_from" in listener.events, what="the resume")
    source.controls.stop()
    thread.join(timeout=10)
    assert listener.iterations == [0, 1]
    assert [r.iteration for r in source.folder.records] == [0, 1]


def test_stopping_a_watcher_ends_the_follow_not_the_run(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "running", n=2)
    listener = Collect()
    source = FolderSource(run_dir, poll_s=10.0)  # a long poll: stop must wake it
    thread, result = follow_in_thread(source, listener)
    wait_for(lambda: len(listener.iterations) == 2, what="the replay")
    source.controls.stop()  # what the TUI calls on quit
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert result["status"] == "running" and result["reason"] == "watcher detached"
    assert not (run_dir / COMMANDS).exists()  # nothing was sent to the run
    assert is_alive(run_dir) is True


def test_a_watcher_steers_the_run_through_its_inbox(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "running", n=2)
    engine_controls = RunControls()
    with CommandInbox(run_dir, engine_controls, poll_s=0.01) as inbox:
        source = FolderSource(run_dir)
        source.controls.pause()
        assert source.controls.paused  # at once, before the run confirms
        source.controls.set_lr(1e-4)
        source.controls.request_snapshot()
        with pytest.raises(ValueError):
            source.controls.set_lr(-1.0)
        wait_for(lambda: len(inbox.applied) == 3, what="the commands")
    assert engine_controls.paused and engine_controls.pending_lr == 1e-4
    # the run's lr event clears the watcher's pending lr
    assert source.controls.pending_lr == 1e-4
    source.controls.observe(Event("lr", 2, data={"lr": 1e-4, "old_lr": 4e-5}))
    assert source.controls.pending_lr is None


def test_a_read_only_watcher_cannot_send(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "running", n=2)
    controls = FolderSource(run_dir, read_only=True).controls
    assert controls.read_only
    controls.pause()
    controls.set_lr(1e-4)
    controls.request_snapshot()
    controls.resume()
    assert not (run_dir / COMMANDS).exists()
    assert not controls.paused and controls.pending_lr is None


def test_watch_waits_for_a_run_that_is_still_loading(tmp_path: Path) -> None:
    # "start it, then watch it": the watcher waits for the config a loading run writes
    run_dir = tmp_path / "starting"
    calls: list[str] = []
    with RunProcess(run_dir):
        timer = threading.Timer(0.3, lambda: make_run(run_dir, "running", n=1))
        timer.start()
        wait_until_started(run_dir, poll_s=0.02, waiting=lambda: calls.append("waiting"))
        timer.join()
        assert (run_dir / "config.json").exists() and calls == ["waiting"]
        FolderSource(run_dir)  # a run now
    wait_until_started(run_dir, poll_s=0.02, waiting=lambda: calls.append("again"))
    assert calls == ["waiting"]  # a run that has started: no wait


def test_watch_waits_a_moment_for_a_run_folder_a_start_has_not_made_yet(tmp_path: Path) -> None:
    run_dir = tmp_path / "just-started"  # its process is still importing: no folder yet
    calls: list[str] = []
    # made whole elsewhere, then moved into place: the wait never sees a half-made folder
    timer = threading.Timer(0.3, lambda: make_run(tmp_path / "elsewhere", "running", n=1).rename(run_dir))
    timer.start()
    wait_until_started(run_dir, poll_s=0.02, waiting=lambda: calls.append("waiting"), appearing_s=30.0)
    timer.join()
    assert calls == ["waiting"] and (run_dir / "config.json").exists()
    # a folder that never comes, or that stays with no run announced in it, is waited for only so long
    wait_until_started(
        tmp_path / "never", poll_s=0.02, waiting=lambda: calls.append("never"), appearing_s=0.2
    )
    (tmp_path / "empty").mkdir()  # what a start has made before its process.json
    wait_until_started(
        tmp_path / "empty", poll_s=0.02, waiting=lambda: calls.append("empty"), appearing_s=0.2
    )
    assert calls == ["waiting", "never", "empty"]


def test_watch_does_not_wait_on_what_can_never_become_a_run(tmp_path: Path) -> None:
    """A file, or a folder of runs (``runs/``, a sweep's): no start could take it; no 10 s wait."""
    (tmp_path / "held.txt").write_text("some text")
    RunWriter(tmp_path / "runs" / "a").write_config(
        {"model": "gpt2", "run_dir": str(tmp_path / "runs" / "a")}
    )
    calls: list[str] = []
    for path in (tmp_path / "held.txt", tmp_path / "runs"):
        wait_until_started(path, poll_s=0.02, waiting=lambda: calls.append("waiting"), appearing_s=30.0)
    assert calls == []


def test_watch_does_not_wait_for_a_start_that_died(tmp_path: Path) -> None:
    run_dir = tmp_path / "died"
    run_dir.mkdir()
    write_process(run_dir, dead_pid())
    calls: list[str] = []
    wait_until_started(run_dir, poll_s=0.02, waiting=lambda: calls.append("waiting"))
    assert calls == []
    with pytest.raises(UserError, match="not a run folder"):
        FolderSource(run_dir)


def test_watching_a_folder_that_is_not_a_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a run folder"):
        FolderSource(tmp_path)
    with RunProcess(tmp_path / "starting"), pytest.raises(UserError, match="still starting"):
        FolderSource(tmp_path / "starting")
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        FolderSource(tmp_path)


def test_a_watcher_pauses_and_changes_the_lr_of_a_real_engine(tiny_config) -> None:
    """The whole path on the tiny model: watcher → commands.jsonl → inbox → engine → events → watcher."""
    from collapse_tui.engine import Engine

    tiny_config.max_iters = 1000
    engine = Engine(tiny_config)
    run_dir = Path(tiny_config.out)
    process = RunProcess(run_dir).start()
    inbox = CommandInbox(run_dir, engine.controls, poll_s=0.01).start()
    engine_thread = threading.Thread(target=engine.run, daemon=True)
    engine_thread.start()
    try:
        wait_for(lambda: (run_dir / "config.json").exists(), timeout=60, what="the run folder")
        watcher = Collect()
        source = FolderSource(run_dir, poll_s=0.01)
        watch_thread, result = follow_in_thread(source, watcher)
        wait_for(lambda: watcher.iterations, timeout=60, what="a first iteration")
        source.controls.pause()
        source.controls.set_lr(2e-3)
        wait_for(lambda: "pause" in watcher.events, timeout=60, what="the pause event")
        source.controls.resume()
        wait_for(
            lambda: any(isinstance(i, IterationRecord) and i.lr == 2e-3 for i in watcher.items),
            timeout=60,
            what="an iteration at the new lr",
        )
    finally:
        engine.controls.stop()  # the run's owner stops it (a watcher cannot)
        engine_thread.join(timeout=60)
        inbox.close()
        process.close()
    watch_thread.join(timeout=10)
    assert not watch_thread.is_alive()
    assert result["status"] == "stopped"
    assert {"pause", "lr", "resume", "stop"} <= set(watcher.events)
    lr_event = next(i for i in watcher.items if isinstance(i, Event) and i.event == "lr")
    assert lr_event.data == {"lr": 2e-3, "old_lr": 1e-3}


def test_a_resumed_runs_info_takes_max_iters_and_lr_from_its_resume(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "finished", n=3)
    writer = RunWriter(run_dir, resuming=True)
    writer.write_event(
        Event("resumed_from", 3, data={"path": "snapshots/iter-3", "lr": 1e-3, "max_iters": 9})
    )
    writer.close()
    info = run_info(read_run(run_dir))
    assert info.max_iters == 9 and info.lr == 1e-3


def test_a_pid_no_process_can_have_is_not_known_alive_or_dead(tmp_path: Path) -> None:
    for pid in (10**30, 0, -1):  # a garbled process.json: OverflowError, or a process group that exists
        write_process(tmp_path, pid)
        assert is_alive(tmp_path) is None


@pytest.mark.parametrize("records_one", [False, True])
@pytest.mark.parametrize("torn", [False, True])
def test_a_resume_that_adds_no_iteration_leaves_the_process_json_of_the_run_before(
    tmp_path: Path, records_one: bool, torn: bool
) -> None:
    """Refused while loading (or stopped at once), it must not leave its own pid where a crashed run's was:
    a watcher would name it as the process that died. (``torn``: the crash left half a line, which the
    resume's writer ends with a newline: no iteration for all that.)"""
    run_dir = make_run(tmp_path / "run", "killed", n=2)
    if torn:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write('{"iteration": 2, "gen_')
    before = (run_dir / "process.json").read_text()
    with serving_watchers(run_dir, RunControls()):
        assert json.loads((run_dir / "process.json").read_text())["pid"] == os.getpid()
        writer = RunWriter(run_dir, resuming=True)
        if records_one:
            writer.write_record(record(2, resumed=True))
        writer.close()
    after = json.loads((run_dir / "process.json").read_text())
    if records_one:
        assert (after["pid"], after["state"]) == (os.getpid(), "ended")
    else:
        assert (run_dir / "process.json").read_text() == before


def test_a_watcher_of_an_ended_run_follows_on_when_a_resume_takes_it_up(tmp_path: Path) -> None:
    """Watched after its end (or in the moment before its resume announced itself): run() returns the end;
    once a live process has announced itself in process.json, run() follows on from where it stopped."""
    run_dir = make_run(tmp_path / "run", "finished", n=3)
    source = FolderSource(run_dir, read_only=True, poll_s=0.01)
    first = Collect()
    assert source.run(first)["status"] == "finished"
    assert not source.taken_up()  # nothing has changed
    write_process(run_dir, os.getpid(), state="ended")
    assert not source.taken_up()  # a process that has ended takes nothing up
    write_process(run_dir, os.getpid())  # the resume announces itself (this process stands in for it)
    assert source.taken_up() and source.info.process_ended is None
    assert source.info.process_started == pytest.approx(
        json.loads((run_dir / "process.json").read_text())["started"]
    )

    again = Collect()
    thread, result = follow_in_thread(source, again)
    writer = RunWriter(run_dir, resuming=True)  # the old summary stands meanwhile: not the end (it lives)
    writer.write_event(Event("resumed_from", 2, data={"path": "iter-2", "lr": 4e-5, "max_iters": 4}))
    writer.write_event(Event("start", 2))
    for i in (2, 3):
        writer.write_record(record(i, resumed=True))
    stop = Event("stop", 4, data={"reason": "max_iters", "status": "finished"})
    writer.write_event(stop)
    writer.write_summary({"status": "finished", "reason": "max_iters", "iterations": 4, "stopped": stop.time})
    writer.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and result["iterations"] == 4  # the resume's end, not the old one
    assert again.iterations == [2, 3] and not again.statuses  # only what came after: no replay
    assert again.events == ["resumed_from", "start", "stop"]


def test_a_resume_announced_just_as_the_watcher_saw_the_end_is_still_taken_up(
    tmp_path: Path, monkeypatch
) -> None:
    """Its process.json lands between the liveness check that ended the run and the end itself."""
    import collapse_tui.follow as follow_module

    run_dir = make_run(tmp_path / "run", "finished", n=3)
    write_process(run_dir, dead_pid(), state="ended")  # the run's own process, gone
    real = follow_module.read_summary
    announced: list[bool] = []

    def announcing_first(root):
        if not announced:
            write_process(run_dir, os.getpid())  # the resume (this process stands in for it)
            announced.append(True)
        return real(root)

    monkeypatch.setattr(follow_module, "read_summary", announcing_first)
    source = FolderSource(run_dir, read_only=True, poll_s=0.01)
    assert source.run(Collect())["status"] == "finished"  # its liveness was read before: the end stands
    assert source.taken_up()


def test_a_followed_resume_that_fails_leaves_the_watcher_as_the_run_stood(tmp_path: Path) -> None:
    """The resume's process.json is put back by its serving_watchers: the elapsed time is the run's again,
    and a crashed run's process is not reported gone a second time."""
    run_dir = make_run(tmp_path / "run", "killed", n=2)
    old = (run_dir / "process.json").read_text()
    first = Collect()
    source = FolderSource(run_dir, read_only=True, poll_s=0.01)
    assert source.run(first)["status"] == "crashed"
    assert [e for e in first.events if e == "process_gone"] == ["process_gone"]
    old_start = source.info.process_started
    write_process(run_dir, os.getpid())
    assert source.taken_up() and source.info.process_started != old_start
    (run_dir / "process.json").write_text(old)  # the resume failed while loading
    again = Collect()
    assert source.run(again)["status"] == "crashed"
    assert again.items == []  # nothing new, and no second "process gone"
    assert source.info.process_started == old_start


@pytest.mark.parametrize("as_it_stood", [False, True])
def test_the_engines_word_on_whether_a_resume_changed_the_run_wins_over_counting_records(
    tmp_path: Path, as_it_stood: bool
) -> None:
    """A crash's torn line that is whole JSON but for its newline becomes a record once the resume ends
    it: counting would take that for an iteration the resume did."""
    run_dir = make_run(tmp_path / "run", "killed", n=2)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record(2).to_dict()))  # no newline: the crash came before it
    before = (run_dir / "process.json").read_text()
    with serving_watchers(run_dir, RunControls(), left_as_it_stood=lambda: as_it_stood):
        RunWriter(run_dir, resuming=True).close()  # ends the line: three records now
    put_back = (run_dir / "process.json").read_text() == before
    assert put_back == as_it_stood
