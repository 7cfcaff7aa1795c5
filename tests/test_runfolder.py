"""The run folder: append-only lines, a tolerant reader, NaN kept as null."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from runfolders import make_run

import collapse_tui
from collapse_tui import runfolder
from collapse_tui.controls import RunControls
from collapse_tui.errors import UserError
from collapse_tui.follow import serving_watchers
from collapse_tui.records import EVENT_KINDS, Event, IterationRecord
from collapse_tui.runfolder import (
    RunWriter,
    drop_abandoned_events,
    parse_metrics,
    read_jsonl,
    read_run,
    read_summary,
    why_not_take_over,
)
from collapse_tui.runs import runs_table


def record(iteration: int, gen_loss: float = 2.0) -> IterationRecord:
    return IterationRecord(
        iteration=iteration,
        lr=4e-5,
        gen_loss=gen_loss,
        valid={"wikitext-2": 3.4},
        rep4=0.1,
        distinct1=0.5,
        unique_tokens=10,
        compression_ratio=2.0,
        collapsed=False,
        seconds={"generate": 0.1, "evaluate": 0.1, "train": 0.1},
        text="hello",
    )


def test_reader_skips_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0}\n{"iteration": 1}\n{"iterat', encoding="utf-8")
    assert read_jsonl(path) == [{"iteration": 0}, {"iteration": 1}]


def test_a_line_cut_inside_a_character_and_ended_by_a_resume_is_skipped(tmp_path: Path) -> None:
    """Samples are written as UTF-8 (not ASCII escapes): a kill mid-line may cut a character in two,
    and a resume ends that fragment with a newline before writing on."""
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"model": "tiny", "lr": 4e-5})
    writer.write_record(record(0))
    writer.close()
    torn = json.dumps({"iteration": 1, "text": "café"}, ensure_ascii=False).encode()[:-3]
    with open(tmp_path / "run" / "metrics.jsonl", "ab") as handle:
        handle.write(torn)
    writer = RunWriter(tmp_path / "run", resuming=True)
    writer.write_record(record(1))
    writer.close()
    assert [r.iteration for r in read_run(tmp_path / "run").records] == [0, 1]


def test_a_config_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_bytes(b'{"model": "caf\xc3"}')
    with pytest.raises(UserError, match="not UTF-8"):
        read_run(tmp_path / "run")


def test_written_folder_reads_back(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"model": "tiny", "lr": 4e-5})
    writer.write_record(record(0))
    writer.write_record(record(1, gen_loss=float("nan")))
    writer.write_event(Event("pause", 2))
    writer.write_summary({"status": "stopped", "reason": "requested"})
    writer.close()

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["gen_loss"] is None  # valid JSON: NaN written as null
    run = read_run(tmp_path / "run")
    assert [r.iteration for r in run.records] == [0, 1]
    assert math.isnan(run.records[1].gen_loss)
    assert run.records[0].valid == {"wikitext-2": 3.4}
    assert [e.event for e in run.events] == ["pause"]
    assert run.status == "stopped"


def read_run_records(root: Path) -> list[IterationRecord]:
    return parse_metrics(read_jsonl(root / "metrics.jsonl"))


def run_start(root: Path) -> RunWriter:
    """What a run writes before its first iteration ends: its config and its start event."""
    writer = RunWriter(root)
    writer.write_config({"model": "tiny", "lr": 4e-5, "run_dir": str(root)})
    writer.write_event(Event("start", 0))
    return writer


def test_a_folder_holding_a_run_is_not_overwritten(tmp_path: Path) -> None:
    writer = run_start(tmp_path / "run")
    writer.write_record(record(0))
    writer.close()
    with pytest.raises(UserError, match="already holds a run"):
        RunWriter(tmp_path / "run")
    assert [r.iteration for r in read_run(tmp_path / "run").records] == [0]


def test_a_folder_holding_a_snapshot_is_not_overwritten(tmp_path: Path) -> None:
    run_start(tmp_path / "run").close()
    (tmp_path / "run" / "snapshots" / "iter-0").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds a run"):
        RunWriter(tmp_path / "run")


def test_a_start_that_never_finished_an_iteration_is_taken_over(tmp_path: Path) -> None:
    """A quit or a crash while the model loads leaves a config and events: the same --out works again."""
    root = tmp_path / "run"
    writer = run_start(root)
    writer.write_event(Event("stop", 0, data={"reason": "requested"}))
    writer.write_summary({"status": "stopped", "iterations": 0})
    writer.close()
    (root / "traceback.txt").write_text("Traceback ...")

    writer = RunWriter(root)
    writer.write_config({"model": "other", "lr": 1e-4, "run_dir": str(root)})
    writer.write_record(record(0))
    writer.close()

    run = read_run(root)
    assert run.config["model"] == "other"
    assert [r.iteration for r in run.records] == [0]
    assert run.events == [] and run.summary is None
    assert not (root / "traceback.txt").exists()


def test_a_folder_whose_config_is_not_a_runs_is_left_alone(tmp_path: Path) -> None:
    model = tmp_path / "gpt2-tiny"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match=r"holds a config\.json that is not a run's"):
        RunWriter(model)
    assert (model / "config.json").read_text() == '{"model_type": "gpt2"}'


def test_an_out_inside_a_file_is_not_taken_for_a_foreign_config(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert why_not_take_over(tmp_path / "notes.txt" / "run") is None  # mkdir then says "Not a directory"


def test_a_run_inside_another_runs_folder_is_refused_where_runs_would_not_find_it(tmp_path: Path) -> None:
    outer = make_run(tmp_path / "outer", "finished", n=2)
    for inside in (outer / "sub", outer / "a" / "b"):
        with pytest.raises(UserError, match=f"is inside the run folder {outer}; choose another --out"):
            RunWriter(inside)
    assert not (outer / "sub").exists()
    model = tmp_path / "models" / "gpt2"  # a model folder's config.json is not a run's
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    assert why_not_take_over(model / "runs" / "new") is None


def test_a_summary_that_cannot_be_read_is_no_summary(tmp_path: Path) -> None:
    (tmp_path / "summary.json").mkdir()  # a folder of that name: watch and plot must not fail on it
    assert read_summary(tmp_path) is None


def test_files_named_like_a_runs_that_no_run_left_are_left_alone(tmp_path: Path) -> None:
    # A new start deletes what an unfinished start left: only where a run's config says it was one.
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "notes"}')
    (mine / "traceback.txt").write_text("a log of mine")
    with pytest.raises(UserError, match=r"holds summary.json, traceback.txt of no run of this tool"):
        RunWriter(mine)
    assert (mine / "summary.json").read_text() == '{"my": "notes"}'
    assert (mine / "traceback.txt").read_text() == "a log of mine"
    stray = tmp_path / "stray"  # a metrics.jsonl with a line, but no run's config: not "holds a run"
    stray.mkdir()
    (stray / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match=r"holds metrics.jsonl of no run of this tool"):
        RunWriter(stray)

    # empty line files and no config: a start killed before it wrote its config; taken over
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "metrics.jsonl").touch()
    (cut / "events.jsonl").touch()
    RunWriter(cut).close()


def test_a_folder_of_run_folders_is_refused_and_a_folder_of_other_files_is_not(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for name in ("lr-1e-4", "lr-1e-3"):
        run_start(sweep / name).close()
    with pytest.raises(
        UserError, match=r"holds run folders \(lr-1e-3, lr-1e-4\); give a new folder inside it"
    ):
        RunWriter(sweep)  # a run of its own there would hide these from `runs`
    assert not (sweep / "config.json").exists()

    runs = tmp_path / "runs"  # a runs/ that holds only sweeps: their runs two levels down
    run_start(runs / "sweep-a" / "lr-1e-3").close()
    with pytest.raises(UserError, match=r"holds run folders \(sweep-a/lr-1e-3\)"):
        RunWriter(runs)  # it would hide every sweep from `runs` and `plot`
    assert not (runs / "config.json").exists()

    notes = tmp_path / "notes"
    (notes / "figures").mkdir(parents=True)
    (notes / "plan.txt").write_text("try lr 1e-3")
    writer = RunWriter(notes)
    writer.write_config({"model": "tiny", "lr": 4e-5, "run_dir": str(notes)})
    writer.close()
    assert (notes / "plan.txt").read_text() == "try lr 1e-3"


@contextlib.contextmanager
def held_by_another_process(root: Path) -> Iterator[None]:
    """The folder's lock taken by a second Python process, as another run would hold it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root / runfolder.LOCK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()  # it lets go when its stdin ends
        holder.wait(timeout=30)


HOLD_LOCK = """
import fcntl, sys
handle = open(sys.argv[1], "ab")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(runfolder.fcntl is None, reason="no advisory locks on this OS")
def test_a_folder_that_another_run_writes_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run_start(root).close()
    with held_by_another_process(root):
        with pytest.raises(UserError, match="in use by another collapse-tui run"):
            RunWriter(root, resuming=True)
        with pytest.raises(UserError, match="in use by another collapse-tui run"):
            RunWriter(root)  # a start with no iteration yet is not taken over while it runs
    assert json.loads((root / "config.json").read_text())["model"] == "tiny"
    RunWriter(root, resuming=True).close()


@pytest.mark.skipif(runfolder.fcntl is None, reason="no advisory locks on this OS")
def test_a_new_run_into_a_live_runs_folder_is_pointed_at_watch_not_at_resume(tmp_path: Path) -> None:
    """A live run refuses a --resume too: the message offers what can be done, watching it."""
    root = tmp_path / "run"
    writer = run_start(root)
    writer.write_record(record(0))
    writer.close()
    with held_by_another_process(root):
        with pytest.raises(UserError, match="another process is writing now") as refused:
            runfolder.check_new_run_folder(root)
        assert f"collapse-tui watch {root}" in str(refused.value) and "--resume" not in str(refused.value)
        assert not runfolder.is_locked_elsewhere(tmp_path)  # no .lock there: nothing holds it
    with pytest.raises(UserError, match="already holds a run; choose another --out, or --resume"):
        runfolder.check_new_run_folder(root)  # its process gone: resuming it is the way on


@pytest.mark.skipif(runfolder.fcntl is None, reason="no advisory locks on this OS")
def test_a_start_into_a_folder_another_process_holds_is_refused_before_it_announces_itself(tmp_path):
    """A second start while the first is still loading: the folder has no iteration yet, only its lock."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "process.json").write_text('{"pid": 1, "state": "running"}')  # the first run's
    refused = pytest.raises(UserError, match="in use by another collapse-tui run")
    with held_by_another_process(root), refused, serving_watchers(root, RunControls()):
        pass
    assert json.loads((root / "process.json").read_text()) == {"pid": 1, "state": "running"}
    assert (root / runfolder.LOCK).exists()


def test_one_process_shares_the_folder_lock_and_drops_it_with_its_last_holder(tmp_path: Path) -> None:
    """The front end takes the folder before the engine's writer does; both hold it, then neither."""
    root = tmp_path / "run"
    root.mkdir()
    announcing = runfolder.FolderLock(root).acquire()
    writer = run_start(root)  # the same process: not refused
    writer.close()
    assert root.resolve() in runfolder.FolderLock._held  # the front end still holds it
    announcing.release()
    announcing.release()  # idempotent
    assert root.resolve() not in runfolder.FolderLock._held


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_lock_file_removed_under_its_lock_is_not_taken_for_the_folders(tmp_path: Path, monkeypatch) -> None:
    """A failed start removes its .lock while holding it; one that opened that file just before would
    lock a file no one can find, and a third start would lock a new .lock: two runs in one folder."""
    import fcntl

    root = tmp_path / "run"
    root.mkdir()
    real_flock = fcntl.flock
    removed = []

    def flock_after_the_failed_start_left(descriptor: int, operation: int) -> None:
        if not removed:  # the failed start's cleanup, between this start's open and its lock
            (root / runfolder.LOCK).unlink()
            removed.append(True)
        real_flock(descriptor, operation)

    monkeypatch.setattr(runfolder.fcntl, "flock", flock_after_the_failed_start_left)
    lock = runfolder.FolderLock(root).acquire()
    monkeypatch.setattr(runfolder.fcntl, "flock", real_flock)
    try:
        assert removed and lock.locked
        # the third start, through the name
        with open(root / runfolder.LOCK, "ab") as third, pytest.raises(OSError):
            real_flock(third.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        lock.release()


def test_the_folder_is_looked_at_again_under_its_lock(tmp_path: Path, monkeypatch) -> None:
    """Between the first look and the lock, another run may have written an iteration there."""
    root = tmp_path / "run"
    run_start(root).close()
    looks = iter([None, "already holds a run"])  # empty at the first look, an iteration under the lock
    monkeypatch.setattr(runfolder, "why_not_take_over", lambda _root: next(looks))
    with pytest.raises(UserError, match="already holds a run"):
        RunWriter(root)
    assert (root / "config.json").exists()
    RunWriter(root, resuming=True).close()  # the refused writer let go of the lock


def test_a_filesystem_without_locks_still_takes_a_run(tmp_path: Path, monkeypatch) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runfolder.fcntl, "flock", no_locks)
    writer = RunWriter(tmp_path / "run")
    writer.write_record(record(0))
    writer.close()
    assert [r.iteration for r in read_run_records(tmp_path / "run")] == [0]


def test_a_resume_clears_snapshots_a_killed_process_left_unfinished(tmp_path: Path) -> None:
    root = tmp_path / "run"
    writer = run_start(root)
    writer.write_record(record(0))
    writer.close()
    (root / "snapshots" / "iter-1").mkdir(parents=True)
    (root / "snapshots" / ".partial-iter-2").mkdir()
    (root / "snapshots" / ".partial-iter-2" / "model.safetensors").write_bytes(b"half")
    RunWriter(root, resuming=True).close()
    assert [p.name for p in (root / "snapshots").iterdir()] == ["iter-1"]


def test_a_summary_left_by_a_final_snapshot_counts_until_another_process_starts(tmp_path: Path) -> None:
    root = tmp_path / "run"
    writer = run_start(root)  # started at the start event's time
    writer.write_record(record(0))
    started = read_run(root).events[0].time
    writer.write_summary({"status": "stopped", "iterations": 1, "ending": "saving", "started": started})
    writer.close()  # killed during the snapshot: no stop event
    assert read_run(root).current_summary["status"] == "stopped"

    writer = RunWriter(root, resuming=True)  # resumed from an earlier snapshot: a new process
    writer.write_event(Event("resumed_from", 0, data={"path": "snapshots/iter-0"}))
    writer.write_event(Event("start", 0, time=started + 1))
    writer.close()
    assert read_run(root).current_summary is None and read_run(root).status == "running"


def test_reading_a_folder_that_is_not_a_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a run folder"):
        read_run(tmp_path)


def test_a_model_folder_is_not_taken_for_a_run(tmp_path) -> None:
    model = tmp_path / "gpt2-tiny"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(UserError, match="is a model folder, not a run folder"):
        read_run(model)


def test_an_atomic_write_that_fails_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    # a full disk: the write fails, the file it was to replace stays whole, nothing is left beside it
    (tmp_path / "summary.json").write_text('{"status": "finished"}\n')

    def full_disk(fd: int) -> None:  # the written text is flushed to the disk, which has no room left
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runfolder.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        runfolder.write_atomic(tmp_path / "summary.json", '{"status": "stopped"}\n')
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert (tmp_path / "summary.json").read_text() == '{"status": "finished"}\n'


def test_a_resume_drops_what_the_iterations_it_abandoned_logged() -> None:
    # resumed from the snapshot of iteration 3 (three iterations done, 0..2)
    events = [
        Event("start", 0),
        Event("lr", 3, data={"lr": 1e-4}),  # at the boundary the snapshot was taken: kept
        Event("collapse", 3, data={"at": 2}),  # iteration 2's sample: before the snapshot, kept
        Event("error", 2),  # in iteration 2: before it, kept
        Event("error", 3),  # in iteration 3, which the resume runs again: dropped
        Event("collapse", 5, data={"at": 4}),  # dropped
        Event("pause", 4),  # dropped
        Event("stop", 5),
        Event("resumed_from", 3),
        Event("start", 3),
    ]
    kept = drop_abandoned_events(events)
    assert [(e.event, e.iteration) for e in kept] == [
        ("start", 0), ("lr", 3), ("collapse", 3), ("error", 2), ("stop", 5), ("resumed_from", 3), ("start", 3)
    ]  # fmt: skip


def test_infinite_numbers_in_a_hand_edited_folder_are_skipped_not_a_traceback(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "collapsed", n=3)
    with (run / "metrics.jsonl").open("a") as lines:
        lines.write('{"iteration": 1e400}\n')
        lines.write(json.dumps(record(3).to_dict() | {"unique_tokens": float("-inf")}) + "\n")
    with (run / "events.jsonl").open("a") as lines:
        lines.write('{"event": "pause", "iteration": Infinity, "time": 1.0}\n')
        lines.write('{"event": "collapse", "iteration": 4, "time": 1.0, "at": Infinity}\n')
    folder = read_run(run)
    assert [r.iteration for r in folder.records] == [0, 1, 2]
    assert folder.collapsed_at == 2  # the run's own collapse event comes first
    Console(width=200, file=io.StringIO()).print(runs_table([folder]))


def test_temporary_files_of_a_killed_write_are_cleared_when_the_run_goes_on(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    writer.write_config({"model": "gpt2", "lr": 4e-5})
    writer.close()
    (tmp_path / ".summary.json.99999999.tmp").write_text("{half")  # killed between write and rename
    RunWriter(tmp_path, resuming=True).close()
    assert not list(tmp_path.glob(".*.tmp"))


def test_lines_of_the_wrong_shape_are_skipped_and_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    rows = [{"iteration": 5, "valid": [3.4]}, {"iteration": 6, "seconds": "x"}, record(7).to_dict()]
    assert [r.iteration for r in parse_metrics(rows)] == [7]
    run = make_run(tmp_path / "run", "finished", n=2)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()  # stands in for a file this user may not read (the tests may run as root)
    with pytest.raises(UserError, match=f"cannot read {run / 'metrics.jsonl'}"):
        read_run(run)


def test_an_event_line_with_a_value_of_the_wrong_kind_is_described_not_a_crash() -> None:
    assert Event("lr", 3, data={"lr": "x", "old_lr": 1e-3}).describe().startswith("it 3: lr ")


def test_event_kinds_name_every_event_the_code_makes() -> None:
    """``records.EVENT_KINDS`` is the list a reader of events.jsonl goes by: it must not drift from the
    ``Event("kind", …)`` the engine and the watcher make."""
    package = Path(collapse_tui.__file__).parent
    made = {
        kind
        for source in package.rglob("*.py")
        for kind in re.findall(r'\bEvent\(\s*"(\w+)"', source.read_text(encoding="utf-8"))
    }
    assert made == set(EVENT_KINDS)


def test_the_search_for_runs_below_a_new_runs_folder_stops_at_a_bound(tmp_path: Path, monkeypatch) -> None:
    """--out . in a project with a large data tree walked it all, three times a start (/usr: a second)."""
    import collapse_tui.runfolder as runfolder

    for name in ("a", "b", "c", "d"):
        (tmp_path / "data" / name).mkdir(parents=True)
    run_start(tmp_path / "data" / "d" / "run").close()  # deep in the tree, past the bound
    run_start(tmp_path / "sweep" / "run").close()  # near the top: found first, level by level
    monkeypatch.setattr(runfolder, "SEARCH_FOLDERS", 7)  # the two levels above d/run
    assert list(runfolder._runs_below(tmp_path, 4)) == ["sweep/run"]
    monkeypatch.setattr(runfolder, "SEARCH_FOLDERS", 100)
    assert list(runfolder._runs_below(tmp_path, 4)) == ["sweep/run", "data/d/run"]


def test_reading_a_folder_that_is_no_run_says_what_it_is(tmp_path: Path) -> None:
    """`watch runs/nope` said "is not a folder" of a path that is not there; `watch runs` gave no hint."""
    with pytest.raises(UserError, match=r"there is no folder .*nope$"):
        read_run(tmp_path / "nope")
    run_start(tmp_path / "runs" / "lr-1e-3").close()
    with pytest.raises(
        UserError, match=r"runs is not a run folder: it has no config.json \(it holds runs: give one"
    ):
        read_run(tmp_path / "runs")
