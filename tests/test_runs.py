"""``collapse-tui runs``: finding run folders, their statuses, the table; reading resumed runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console
from runfolders import dead_pid, ending_summary, make_run, record, write_process
from typer.testing import CliRunner

from collapse_tui.cli import app
from collapse_tui.errors import UserError
from collapse_tui.records import Event
from collapse_tui.runfolder import RunWriter, read_run
from collapse_tui.runs import find_runs, run_status, runs_table

STATUSES = ("finished", "collapsed", "stopped", "crashed", "running", "killed", "unknown")


def render(table) -> str:
    console = Console(record=True, width=240, color_system=None)
    console.print(table)
    return console.export_text()


def test_runs_in_every_status_are_found_oldest_first(tmp_path: Path) -> None:
    for k, status in enumerate(reversed(STATUSES)):  # made newest first, listed oldest first
        make_run(tmp_path / "sweep" / f"run-{status}", status, created=2_000.0 - k)
    runs = find_runs(tmp_path)
    assert [run.root.name for run in runs] == [f"run-{s}" for s in STATUSES]
    assert [run_status(run) for run in runs] == [
        "finished",
        "collapsed",
        "stopped",
        "crashed",
        "running",
        "crashed",  # no summary and its process is gone
        "running?",  # no summary, and no way to tell
    ]


def test_the_table_shows_each_run(tmp_path: Path) -> None:
    make_run(tmp_path / "a", "collapsed", n=6, collapse_at=3, lr=1e-4, created=1.0)
    make_run(tmp_path / "b", "running", n=2, model="/models/tiny-gpt", created=2.0)
    table = runs_table(find_runs(tmp_path))
    assert table.row_count == 2
    text = render(table)
    lines = [line for line in text.splitlines() if line.startswith(("│ a", "│ b"))]
    assert [cell.strip() for cell in lines[0].split("│")[1:-1]] == [
        "a",
        "gpt2",
        "0.0001",
        "6",
        "3",
        "3.400",
        "3.900",
        "collapsed",
    ]
    assert "tiny-gpt" in lines[1] and "running" in lines[1] and "—" in lines[1]
    assert "first, last = validation loss on wikitext-2" in " ".join(text.split())
    assert "running? =" not in text  # no such row: no footnote for it
    make_run(tmp_path / "c", "unknown", n=1, created=3.0)
    assert "running? = its process is not on this machine" in " ".join(
        render(runs_table(find_runs(tmp_path))).split()
    )


def test_a_changed_lr_shows_where_it_ended(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"model": "gpt2", "lr": 4e-5})
    writer.write_record(record(0, lr=4e-5))
    writer.write_record(record(1, lr=8e-5))
    writer.close()
    assert "4e-05 → 8e-05" in render(runs_table(find_runs(tmp_path)))


def test_malformed_folders_are_skipped_with_a_reason(tmp_path: Path) -> None:
    make_run(tmp_path / "good", "finished", n=3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{oops", encoding="utf-8")
    (bad / "metrics.jsonl").write_text("", encoding="utf-8")
    model_folder = tmp_path / "downloaded-model"  # a config.json alone is not a run
    model_folder.mkdir()
    (model_folder / "config.json").write_text("{}", encoding="utf-8")
    with open(tmp_path / "good" / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"iteration": 3, "gen_lo')  # the writer was killed mid-line
    skipped: list[str] = []
    runs = find_runs(tmp_path, skipped=skipped)
    assert [run.root.name for run in runs] == ["good"]
    assert len(runs[0].records) == 3
    assert len(skipped) == 1 and "bad/config.json is not valid JSON" in skipped[0]
    with pytest.raises(UserError, match="is not a folder"):
        find_runs(tmp_path / "nowhere")


def test_snapshots_inside_a_run_are_not_runs(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "finished")
    snapshot = run_dir / "snapshots" / "iter-2"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    (snapshot / "metrics.jsonl").write_text("", encoding="utf-8")
    assert [run.root for run in find_runs(tmp_path)] == [run_dir]


def test_a_run_resumed_from_an_older_snapshot_reads_as_it_now_stands(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "stopped", n=5)
    writer = RunWriter(run_dir, resuming=True)
    writer.write_event(Event("resumed_from", 3, data={"path": "snapshots/iter-3"}))
    writer.write_event(Event("start", 3))
    writer.write_record(record(3, gen_loss=9.0, resumed=True))
    writer.write_record(record(4, gen_loss=9.5, resumed=True))
    writer.write_record(record(5, gen_loss=9.9, resumed=True))
    writer.close()

    run = read_run(run_dir)
    assert [r.iteration for r in run.records] == [0, 1, 2, 3, 4, 5]
    assert [r.gen_loss for r in run.records[3:]] == [9.0, 9.5, 9.9]  # the last written wins
    assert run.summary is not None and run.current_summary is None  # the old summary is outdated
    assert run.status == "running"


def test_a_resume_from_an_older_snapshot_drops_the_abandoned_iterations_and_their_collapse(
    tmp_path: Path,
) -> None:
    run_dir = make_run(tmp_path / "run", "collapsed", n=8, collapse_at=6)
    writer = RunWriter(run_dir, resuming=True)  # went on from iteration 3, and stopped at 5
    writer.write_event(Event("resumed_from", 3, data={"path": "snapshots/iter-3"}))
    writer.write_event(Event("start", 3))
    writer.write_record(record(3, gen_loss=9.0, resumed=True))
    writer.write_record(record(4, gen_loss=9.5, resumed=True))
    writer.write_event(Event("stop", 5, data={"reason": "requested", "status": "stopped"}))
    writer.close()

    run = read_run(run_dir)
    assert [r.iteration for r in run.records] == [0, 1, 2, 3, 4]  # 5, 6, 7 were the old branch's
    assert [r.gen_loss for r in run.records[3:]] == [9.0, 9.5]
    assert run.collapsed_at is None  # the old branch collapsed at 6; this one has not


def test_a_resume_that_has_not_written_its_first_iteration_shows_the_run_as_it_resumed(
    tmp_path: Path,
) -> None:
    """A resume from an older snapshot is loading or in its first iteration: the old branch's later
    iterations are gone already, with their collapse, not only once the new branch writes one."""
    run_dir = make_run(tmp_path / "run", "collapsed", n=8, collapse_at=6)
    writer = RunWriter(run_dir, resuming=True)
    writer.write_event(Event("resumed_from", 3, data={"path": "snapshots/iter-3"}))
    writer.write_event(Event("start", 3))
    writer.close()
    run = read_run(run_dir)
    assert [r.iteration for r in run.records] == [0, 1, 2]
    assert run.collapsed_at is None


@pytest.mark.parametrize(
    ("pid", "saved", "status"),
    [
        (None, None, "running"),
        ("dead", "after the start", "stopped"),
        ("dead", None, "stopped*"),
        # an iter-2 of a branch a resume abandoned: this end was not saved
        ("dead", "before the start", "stopped*"),
    ],
)
def test_a_run_saving_its_final_snapshot_runs_until_its_process_ends(
    tmp_path: Path, pid, saved, status
) -> None:
    root = make_run(tmp_path / "run", "running", n=2)
    if pid == "dead":  # killed during the snapshot (or just after it): the summary written before it stands
        write_process(root, dead_pid())
    summary = ending_summary(root, "stopped", 2)
    if saved:
        snapshot = root / "snapshots" / "iter-2"
        snapshot.mkdir(parents=True)
        saved_at = summary["started"] + (5.0 if saved == "after the start" else -5.0)
        (snapshot / "state.json").write_text(json.dumps({"iteration": 2, "time": saved_at}))
    writer = RunWriter(root, resuming=True)
    writer.write_summary(summary)
    writer.close()
    assert run_status(read_run(root)) == status
    table = render(runs_table([read_run(root)]))
    assert ("final snapshot was not saved" in " ".join(table.split())) == status.endswith("*")


@pytest.mark.parametrize("why", ["interrupted before it was written (a second Ctrl-C)", "the disk is full"])
def test_a_run_whose_final_snapshot_failed_is_marked(tmp_path: Path, why: str) -> None:
    """Its summary is whole (not ``ending``), but its end has no snapshot to go on from."""
    root = make_run(tmp_path / "run", "stopped", n=2)
    summary = json.loads((root / "summary.json").read_text())
    (root / "summary.json").write_text(json.dumps({**summary, "final_snapshot_failed": why}))
    assert run_status(read_run(root)) == "stopped*"
    assert "final snapshot was not saved" in " ".join(render(runs_table([read_run(root)])).split())


def test_a_run_whose_resume_is_still_loading_is_running(tmp_path: Path) -> None:
    root = make_run(tmp_path / "run", "finished", n=2)
    assert run_status(read_run(root)) == "finished"
    write_process(root, os.getpid())  # a resume announced itself after the stop; no resumed_from yet
    assert run_status(read_run(root)) == "running"
    write_process(root, dead_pid())  # it died while loading: the run is as it was
    assert run_status(read_run(root)) == "finished"


def test_a_run_stopped_by_a_non_finite_loss_is_not_shown_as_a_plain_stop(tmp_path: Path) -> None:
    root = make_run(tmp_path / "run", "stopped", n=2)
    writer = RunWriter(root, resuming=True)
    writer.write_summary({"status": "stopped", "reason": "non-finite loss", "iterations": 2})
    writer.close()
    assert run_status(read_run(root)) == "NaN loss"
    assert "NaN loss" in render(runs_table([read_run(root)]))


def test_a_resumed_run_that_has_stopped_is_not_shown_with_its_old_summary(tmp_path: Path) -> None:
    """Its stop event lands a moment before its summary: in between, the old summary is not its own."""
    root = tmp_path / "run"
    writer = RunWriter(root)
    writer.write_config({"model": "gpt2", "lr": 4e-5})
    writer.write_event(Event("start", 0))
    for i in range(3):
        writer.write_record(record(i))
    first_stop = Event("stop", 3, data={"reason": "max_iters", "status": "finished"})
    writer.write_event(first_stop)
    writer.write_summary(
        {"status": "finished", "reason": "max_iters", "iterations": 3, "stopped": first_stop.time}
    )
    writer.close()
    assert read_run(root).current_summary is not None
    writer = RunWriter(root, resuming=True)  # resumed, one more iteration, stopped; no summary yet
    writer.write_event(Event("resumed_from", 3, data={"path": str(root / "snapshots" / "iter-3")}))
    writer.write_event(Event("start", 3))
    writer.write_record(record(3, resumed=True))
    writer.write_event(Event("stop", 4, data={"reason": "max_iters", "status": "finished"}))
    assert read_run(root).current_summary is None
    second_stop = read_run(root).events[-1]
    writer.write_summary(
        {"status": "finished", "reason": "max_iters", "iterations": 4, "stopped": second_stop.time}
    )
    writer.close()
    summary = read_run(root).current_summary
    assert summary is not None and summary["iterations"] == 4


def test_runs_of_one_name_in_different_folders_are_told_apart_in_the_table(tmp_path: Path) -> None:
    for sweep in ("sweep-a", "sweep-b"):
        make_run(tmp_path / sweep / "lr", "finished", n=2)
    text = render(runs_table(find_runs(tmp_path)))
    assert "sweep-a/lr" in text and "sweep-b/lr" in text


def test_the_runs_command_into_a_pipe_keeps_each_run_on_one_line(tmp_path: Path, monkeypatch) -> None:
    # `collapse-tui runs | grep lr0.0003` must find whole names: a pipe has no width to fold them to
    names = [f"20261128-22350{i}-gpt2-medium-lr0.0003" for i in range(3)]
    for name in names:
        make_run(tmp_path / "runs" / name, "finished", n=2, model="gpt2-medium")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["runs"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "finished" in line]
    assert [next(name for name in names if name in row) for row in rows] == names


def test_the_runs_command_without_a_runs_folder_says_where_it_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["runs"])
    assert result.exit_code == 2
    assert "there is no folder runs" in result.output and "collapse-tui runs FOLDER" in result.output
    result = CliRunner().invoke(app, ["runs", "elsewhere"])
    assert result.exit_code == 2 and "FOLDER" not in result.output
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(app, ["runs", "afile"])
    assert result.exit_code == 2 and "afile is not a folder" in result.output


def test_names_with_brackets_are_shown_as_they_are_not_taken_for_markup(tmp_path: Path) -> None:
    root = tmp_path / "[bold]sweep:fire:"
    make_run(root / "lr[red]1e-4", "stopped", model="/models/[b]tiny", evals=("notes[/]",))
    text = render(runs_table(find_runs(root), title=str(root)))
    assert "lr[red]1e-4" in text and "[b]tiny" in text
    assert "[bold]sweep:fi" in text and "\N{FIRE}" not in text  # the title: no markup, no emoji codes
    assert "validation loss on notes[/]" in text  # the caption: no MarkupError


def test_a_folder_that_cannot_be_looked_into_is_passed_over(tmp_path: Path, monkeypatch) -> None:
    """Another user's folder beside one's runs (a shared disk): ``runs`` and ``plot`` gave a traceback.
    (Tests may run as root, which chmod 000 does not stop: the refusal is made by hand.)"""
    make_run(tmp_path / "mine", "finished", n=2)
    locked = tmp_path / "theirs"
    locked.mkdir()
    is_file = Path.is_file

    def refused_in_locked(path: Path) -> bool:
        if locked in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", refused_in_locked)
    assert [run.root.name for run in find_runs(tmp_path)] == ["mine"]
    result = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0 and "mine" in result.stdout
