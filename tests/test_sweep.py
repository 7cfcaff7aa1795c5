"""``collapse-tui sweep``: the grid it plans, what it does with each run folder, and real sweeps end to end."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from runfolders import dead_pid, ending_summary, make_run, wait_for, write_process
from test_cli import ENV, cli, run_checking_textual_is_not_imported
from typer.testing import CliRunner

import collapse_tui.sweep as sweep_module
from collapse_tui.cli import app
from collapse_tui.errors import UserError
from collapse_tui.records import Event
from collapse_tui.runfolder import RunWriter, read_run
from collapse_tui.runs import run_status
from collapse_tui.sweep import (
    Step,
    SweepStop,
    _earlier_runs,
    _run_plan,
    _settings,
    _threads,
    check_eval_texts,
    check_models,
    command_again,
    decide,
    headless_argv,
    lock_sweep_dir,
    plan_sweep,
)


def options(**given: Any) -> dict[str, Any]:
    """Sweep options as the command line gives them: the swept ones as lists, the rest single values."""
    return {"model": [], "lr": [], "seed": [], "evals": ["wikitext-2"], "max_iters": None, **given}


def test_the_grid_runs_models_then_lrs_then_seeds_in_the_order_given(tmp_path: Path) -> None:
    plan = plan_sweep(options(model=["gpt2", "gpt2-medium"], lr=[1e-4, 4e-5], seed=[1, 2]), tmp_path)
    assert [run.name for run in plan][:5] == [
        "gpt2-lr0.0001-seed1", "gpt2-lr0.0001-seed2", "gpt2-lr4e-05-seed1", "gpt2-lr4e-05-seed2",
        "gpt2-medium-lr0.0001-seed1",
    ]  # fmt: skip
    assert len(plan) == 8
    assert (plan[3].config.seed, plan[3].config.lr, plan[3].run_dir) == (2, 4e-5, tmp_path / plan[3].name)


def test_the_defaults_fill_what_is_not_swept_and_every_name_has_its_seed(tmp_path) -> None:
    plan = plan_sweep(options(lr=[1e-3]), tmp_path)
    assert [run.name for run in plan] == ["gpt2-lr0.001-seed1337"]  # seeds added later leave it as it is
    assert (plan[0].config.model, plan[0].config.seed, plan[0].config.max_iters) == ("gpt2", 1337, 1000)
    paper = plan_sweep(options(preset="paper", lr=[1e-4], evals=[]), tmp_path)[0].config
    assert (paper.lr, paper.evals, paper.seed) == (1e-4, ["wikitext-2-v1"], 1337)  # the preset, lr given wins


def test_runs_that_would_share_a_folder_are_refused_naming_what_differs(tmp_path: Path) -> None:
    (tmp_path / "a" / "m").mkdir(parents=True)
    (tmp_path / "b" / "m").mkdir(parents=True)
    models = [str(tmp_path / "a" / "m"), str(tmp_path / "b" / "m")]
    with pytest.raises(
        UserError, match=f"--model {models[0]} and --model {models[1]} would share the folder"
    ):
        plan_sweep(options(model=models), tmp_path / "sweep")
    with pytest.raises(UserError, match=r"--lr 0.0001 and --lr 0.00010000001 \(a folder name keeps 6 digits"):
        plan_sweep(options(lr=[1e-4, 1.0000001e-4]), tmp_path / "sweep")


def test_one_model_given_twice_under_two_spellings_is_one_run(tmp_path, monkeypatch) -> None:
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    plan = plan_sweep(options(model=["./m", str(tmp_path / "m"), "./m/."]), tmp_path / "sweep")
    assert [run.name for run in plan] == ["m-lr4e-05-seed1337"]


def test_a_missing_model_folder_or_evaluation_file_is_refused_before_anything_runs(tmp_path) -> None:
    with pytest.raises(UserError, match=f"--model {tmp_path / 'nope'}: there is no such model folder"):
        plan_sweep(options(model=["gpt2", str(tmp_path / "nope")]), tmp_path / "sweep")
    with pytest.raises(UserError, match=r"no-such\.txt"):
        plan_sweep(options(evals=[str(tmp_path / "no-such.txt")]), tmp_path / "sweep")


def test_an_evaluation_pipe_is_refused_as_its_runs_could_not_read_it(tmp_path) -> None:
    """``--eval <(zcat valid.txt.gz)``: the sweep's check reads the pipe, its runs get nothing."""
    read, write = os.pipe()
    os.write(write, b"held-out text\n")
    os.close(write)
    try:
        with pytest.raises(
            UserError,
            match=rf"--eval /dev/fd/{read} is not a regular file \(a pipe\?\), .* write it to a file",
        ):
            plan_sweep(options(evals=[f"/dev/fd/{read}"]), tmp_path / "sweep")
    finally:
        os.close(read)


def test_a_run_starts_with_all_its_options_and_goes_on_with_only_what_a_resume_may_change(tmp_path) -> None:
    given = options(lr=[1e-3], max_iters=7, keep_going=True, final_snapshot=False, device="cpu", block=50,
                    gen_tokens=64, evals=["wikitext-2", "ptb"])  # fmt: skip
    run = plan_sweep(given, tmp_path)[0]
    argv = headless_argv(run, Step("start"))
    assert argv[0] == "headless"
    words = " ".join(argv)
    assert "--model" not in words and "--seed" not in words  # not given: the default (or a preset's)
    for fragment in ("--eval wikitext-2 --eval ptb", "--lr 0.001", "--max-iters 7",
                     "--keep-going", "--no-final-snapshot", "--block 50", f"--out {run.run_dir}"):  # fmt: skip
        assert fragment in words
    assert " ".join(headless_argv(run, Step("start"), "cuda:1")).count("--device cuda:1") == 1  # its slot's
    snapshot = run.run_dir / "snapshots" / "iter-3"
    resumed = headless_argv(run, Step("resume", snapshot=snapshot))
    # the lr is left to the snapshot (a key may have changed it); what decides the computation is the run's
    assert resumed[0] == "headless"
    words = " ".join(resumed)
    assert words.count("--") == 7
    for fragment in ("--max-iters 7", "--device cpu", "--keep-going", "--no-final-snapshot", "--resume",
                     "--eval wikitext-2 --eval ptb"):  # fmt: skip
        assert fragment in words  # the sets: the sweep may have been given them at a new path


def test_runs_on_the_cpu_side_by_side_share_its_cores(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert _threads("cpu", ["cpu", "cpu:0", "cuda"]) == {"OMP_NUM_THREADS": "8"}
    assert _threads("cuda", ["cpu", "cpu:0", "cuda"]) == {}  # a GPU run keeps what it has
    assert _threads("cpu", ["cpu", "cuda"]) == {}  # alone on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _threads("auto", ["auto", "auto"]) == {"OMP_NUM_THREADS": "8"}  # auto is the CPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _threads("auto", ["auto", "auto"]) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _threads("cpu", ["cpu", "cpu"]) == {}  # the user's own choice stands


def save_snapshot(run_dir: Path, iteration: int) -> Path:
    """A snapshot folder a resume would take: its files (empty) and its ``state.json``."""
    path = run_dir / "snapshots" / f"iter-{iteration}"
    path.mkdir(parents=True)
    for name in ("optimizer.pt", "rng.pt", "config.json"):
        (path / name).write_bytes(b"")
    (path / "state.json").write_text(json.dumps({"iteration": iteration, "time": 2e9}))
    return path


def planned(tmp_path: Path, **given: Any):
    return plan_sweep(options(lr=[4e-5], **given), tmp_path)[0]


def test_a_finished_run_is_left_as_it_is_unless_more_iterations_are_asked(tmp_path: Path) -> None:
    run = planned(tmp_path, max_iters=5)
    make_run(run.run_dir, "finished", n=5)
    step = decide(run)
    assert (step.action, step.failed, step.why) == ("skip", False, "done already (finished, 5 iterations)")
    snapshot = save_snapshot(run.run_dir, 5)
    longer = decide(planned(tmp_path, max_iters=8))
    assert (longer.action, longer.snapshot) == ("resume", snapshot)


def test_a_collapsed_run_goes_on_only_with_keep_going(tmp_path: Path) -> None:
    run = planned(tmp_path, max_iters=10)
    make_run(run.run_dir, "collapsed", n=5, collapse_at=3)
    save_snapshot(run.run_dir, 5)
    assert decide(run).action == "skip" and "collapsed at iteration 3" in decide(run).why
    assert decide(planned(tmp_path, max_iters=10, keep_going=True)).action == "resume"


def test_a_run_killed_while_saving_the_final_snapshot_of_its_collapse_is_done_all_the_same(tmp_path):
    run = planned(tmp_path, max_iters=10)
    root = make_run(run.run_dir, "running", n=3)
    write_process(root, dead_pid())  # a time limit or the OOM killer, during the final snapshot
    save_snapshot(root, 2)  # a periodic one, from before the collapse
    writer = RunWriter(root, resuming=True)
    writer.write_event(Event("collapse", 3, data={"at": 2, "rep4": 0.95}))
    writer.write_summary({**ending_summary(root, "collapsed", 3), "collapsed_at": 2})
    writer.close()
    assert run_status(read_run(root)) == "collapsed*"
    step = decide(run)
    assert (step.action, step.failed) == ("skip", False)
    assert step.why == "done already (collapsed at iteration 2; its final snapshot was not saved)"


def test_a_stopped_or_killed_run_goes_on_from_its_newest_snapshot_and_one_without_any_is_a_failure(tmp_path):
    stopped = planned(tmp_path, max_iters=10)
    make_run(stopped.run_dir, "stopped", n=5)
    save_snapshot(stopped.run_dir, 2)
    newest = save_snapshot(stopped.run_dir, 4)
    (newest.parent / "iter-5").mkdir()  # a torn folder (no state.json) is not taken
    step = decide(stopped)
    assert (step.action, step.snapshot) == ("resume", newest) and "stopped after 5 iterations" in step.why

    killed = planned(tmp_path / "other", max_iters=10)
    make_run(killed.run_dir, "killed", n=3)
    step = decide(killed)
    assert (step.action, step.failed) == ("skip", True) and "no snapshot to go on from" in step.why


def test_a_snapshot_of_an_abandoned_branch_is_not_gone_on_from(tmp_path: Path) -> None:
    run = planned(tmp_path, max_iters=10)
    make_run(run.run_dir, "stopped", n=3)  # resumed from an earlier snapshot, it has 3 iterations now
    save_snapshot(run.run_dir, 2)
    save_snapshot(run.run_dir, 6)  # saved by the branch the resume abandoned
    assert decide(run).snapshot == run.run_dir / "snapshots" / "iter-2"


def test_a_run_still_going_or_of_another_configuration_stops_the_sweep_before_it_starts(tmp_path) -> None:
    run = planned(tmp_path, max_iters=10)
    make_run(run.run_dir, "killed", n=3)
    write_process(run.run_dir, os.getpid())  # its process lives
    with pytest.raises(UserError, match="its process is running"):
        decide(run)
    other = planned(tmp_path / "b", max_iters=10)
    make_run(other.run_dir, "stopped", n=3, lr=1e-4)  # the folder of lr 4e-5 holds a run of lr 1e-4?
    with pytest.raises(
        UserError, match=r"holds a run with --lr 0.0001, not 4e-05; a sweep's runs share every setting"
    ):
        decide(other)


def test_a_run_stopped_on_a_non_finite_loss_is_not_run_again_but_counts_as_failed(tmp_path: Path) -> None:
    run = planned(tmp_path, max_iters=10)
    make_run(run.run_dir, "stopped", n=3)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    (run.run_dir / "summary.json").write_text(json.dumps({**summary, "reason": "non-finite loss"}))
    step = decide(run)
    assert (step.action, step.failed) == ("skip", True) and "non-finite loss" in step.why


def test_a_bad_value_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", "--lr", "1e-4", "--lr", "-1", "--out", str(out)])
    assert result.exit_code == 2
    assert "--lr must be a positive number, not -1.0" in result.stderr
    assert not out.exists()


def test_a_sweep_folder_inside_a_run_is_refused(tmp_path: Path) -> None:
    make_run(tmp_path / "run", "finished")
    result = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "run" / "sweep")])
    assert result.exit_code == 2
    assert f"is inside the run folder {tmp_path / 'run'}" in result.stderr


def test_a_folder_of_runs_of_no_sweep_is_refused_as_a_sweeps_folder(tmp_path: Path) -> None:
    """``sweep --out runs``: its runs would be mixed into a sweep's table and figure."""
    make_run(tmp_path / "runs" / "20261129-gpt2-lr4e-05", "finished")
    result = CliRunner().invoke(app, ["sweep", "--lr", "1e-3", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert (
        "holds runs or sweeps of no sweep (20261129-gpt2-lr4e-05); give the sweep a new folder"
        in result.stderr
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20261129-gpt2-lr4e-05"]
    (tmp_path / "sweeps" / "sweep-20261129").mkdir(parents=True)  # runs/ holding only a sweep
    (tmp_path / "sweeps" / "sweep-20261129" / "sweep.json").write_text("{}")
    result = CliRunner().invoke(app, ["sweep", "--lr", "1e-3", "--out", str(tmp_path / "sweeps")])
    assert result.exit_code == 2 and "holds runs or sweeps of no sweep (sweep-20261129)" in result.stderr


def test_a_sweep_started_below_a_run_folder_is_refused_whatever_its_out_or_none(tmp_path, monkeypatch):
    make_run(tmp_path / "run", "finished")
    (tmp_path / "run" / "notes").mkdir()
    monkeypatch.chdir(tmp_path / "run" / "notes")  # relative names: their parents are . and ..
    for out in (["--out", "sweep"], []):
        result = CliRunner().invoke(app, ["sweep", "--lr", "1e-3", *out])
        assert result.exit_code == 2
        assert f"is inside the run folder {tmp_path / 'run'}" in result.stderr
    assert list((tmp_path / "run" / "notes").iterdir()) == []  # the default folder claimed, then removed


def test_run_options_before_the_command_name_are_one_value_each(monkeypatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_sweep(given: dict[str, Any], out: Path | None) -> int:
        seen.update(given, out=out)
        return 0

    monkeypatch.setattr("collapse_tui.sweep.run_sweep", fake_sweep)
    result = CliRunner().invoke(
        app, ["--lr", "1e-3", "--block", "50", "sweep", "--model", "gpt2", "--model", "m"]
    )
    assert result.exit_code == 0, result.output
    assert (seen["lr"], seen["block"], seen["model"], seen["out"]) == ([1e-3], 50, ["gpt2", "m"], None)


def test_a_swept_option_given_before_and_after_the_command_name_is_refused(monkeypatch) -> None:
    """``collapse-tui --lr 1e-3 sweep --lr 1e-2`` ran lr 1e-2 alone, 1e-3 dropped without a word."""
    monkeypatch.setattr("collapse_tui.sweep.run_sweep", lambda given, out: 0)
    result = CliRunner().invoke(app, ["--lr", "1e-3", "sweep", "--lr", "1e-2"])
    assert result.exit_code == 2
    assert "--lr is given both before and after 'sweep'; give all its values after it" in result.stderr


def test_evaluation_sets_given_before_and_after_the_command_name_are_refused(monkeypatch) -> None:
    """``collapse-tui --eval wikitext-2 sweep --eval ptb`` evaluated on ptb alone."""
    monkeypatch.setattr("collapse_tui.sweep.run_sweep", lambda given, out: 0)
    for command in ("sweep", "headless"):
        result = CliRunner().invoke(app, ["--eval", "wikitext-2", command, "--eval", "ptb"])
        assert result.exit_code == 2
        assert f"--eval is given both before and after '{command}'" in result.stderr


def test_resume_given_before_the_command_name_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--resume", str(tmp_path), "sweep", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "a sweep goes on by itself when given the same command (and --out) again" in result.stderr
    assert not (tmp_path / "s").exists()


def test_the_command_that_goes_on_works_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "sub" / "n").mkdir(parents=True)
    (tmp_path / "held.txt").write_text("some words")
    monkeypatch.chdir(tmp_path)
    given = options(model=["./m", "sub/n", "gpt2"], evals=["held.txt", "ptb"], prompt="-x\n")
    again = command_again(given, Path("s"))
    assert shlex.split(again) == [
        "collapse-tui", "sweep", "--model", str(tmp_path / "m"), "--model", str(tmp_path / "sub" / "n"),
        "--model", "gpt2", "--eval",
        str(tmp_path / "held.txt"), "--eval", "ptb", "--prompt", "-x\n", "--out", str(tmp_path / "s"),
    ]  # fmt: skip


def test_a_sweep_of_other_settings_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    plan = plan_sweep(options(block=16), out)
    (out / "sweep.json").write_text(
        json.dumps({"settings": _settings(plan), "runs": ["a"], "commands": ["c"]})
    )
    make_run(out / "a", "stopped", n=2)
    result = CliRunner().invoke(app, ["sweep", "--block", "32", "--lr", "1e-3", "--out", str(out)])
    assert result.exit_code == 2
    assert f"the sweep in {out} has --block 16, not 32" in result.stderr
    assert json.loads((out / "sweep.json").read_text())["commands"] == ["c"]  # left as it was


def test_a_sweep_given_again_with_another_collapse_rule_is_refused(tmp_path: Path) -> None:
    """The collapse iteration is what a sweep compares: runs judged by two rules cannot share its table."""
    out = tmp_path / "sweep"
    out.mkdir()
    plan = plan_sweep(options(), out)
    (out / "sweep.json").write_text(
        json.dumps({"settings": _settings(plan), "runs": ["a"], "commands": ["c"]})
    )
    make_run(out / "a", "stopped", n=2)
    result = CliRunner().invoke(
        app, ["sweep", "--collapse-threshold", "0.5", "--lr", "1e-3", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert f"the sweep in {out} has --collapse-threshold 0.9, not 0.5" in result.stderr


def test_a_sweep_of_an_earlier_versions_text_reading_goes_on(tmp_path: Path) -> None:
    """``text_reading`` is no option a user could give to match it: a sweep whose sweep.json and runs
    recorded 2 was refused as "--text-reading 2, not 3" once new runs were planned with 3."""
    out = tmp_path / "sweep"
    out.mkdir()
    plan = plan_sweep(options(), out)
    settings = {**_settings(plan), "text_reading": 2}  # as the version before wrote it
    (out / "sweep.json").write_text(
        json.dumps({"settings": settings, "runs": [plan[0].name], "commands": []})
    )
    make_run(plan[0].run_dir, "stopped", n=2)
    recorded = json.loads((plan[0].run_dir / "config.json").read_text())
    run_config = {**plan[0].config.to_dict(), "text_reading": 2}
    (plan[0].run_dir / "config.json").write_text(json.dumps({**recorded, **run_config}))
    assert _earlier_runs(out, plan) == [plan[0].name]
    sweep_module._check_same_run(plan[0], read_run(plan[0].run_dir))


def with_eval_text(run_dir: Path, name: str, text: str) -> None:
    """Record in a run's config.json that it was evaluated on ``text`` as set ``name``, as the engine does."""
    config = json.loads((run_dir / "config.json").read_text())
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    config["eval_sets"] = {name: {"split_tokens": 10, "text_sha256": digest}}
    (run_dir / "config.json").write_text(json.dumps(config))


def test_an_evaluation_file_edited_since_the_sweeps_runs_began_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    """It was found only by each resumed run once it had loaded its model, while new runs went on with
    the new text beside the old runs."""
    held = tmp_path / "held.txt"
    held.write_text("the words the runs were evaluated on")
    out = tmp_path / "sweep"
    plan = plan_sweep(options(lr=[1e-3, 1e-2], evals=[str(held)]), out)
    make_run(plan[0].run_dir, "stopped", n=2, evals=("held",))
    with_eval_text(plan[0].run_dir, "held", held.read_text())
    check_eval_texts(plan, [], out)  # the same text: nothing to say
    held.write_text("the words the runs were evaluated on. Extra sentence .")
    with pytest.raises(UserError, match=r"--eval held: the text differs from the one the sweep's run "):
        check_eval_texts(plan, [], out)


def test_a_sweep_moved_with_its_evaluation_file_goes_on(tmp_path: Path) -> None:
    """The same set at a new path (a project copied to another disk): as ``--resume`` takes it."""
    old, new = tmp_path / "old" / "held.txt", tmp_path / "new" / "held.txt"
    for path in (old, new):
        path.parent.mkdir()
        path.write_text("the same words")
    out = tmp_path / "sweep"
    out.mkdir()
    before = plan_sweep(options(lr=[1e-3], evals=[str(old)]), out)
    (out / "sweep.json").write_text(
        json.dumps({"settings": _settings(before), "runs": ["a"], "commands": []})
    )
    make_run(out / "a", "stopped", n=2, evals=("held",))
    after = plan_sweep(options(lr=[1e-3], evals=[str(new)]), out)
    assert _earlier_runs(out, after) == ["a"]
    other = tmp_path / "new" / "other.txt"
    other.write_text("the same words")
    with pytest.raises(UserError, match=r'has --eval \[".*held.txt"\], not \[".*other.txt"\]'):
        _earlier_runs(out, plan_sweep(options(lr=[1e-3], evals=[str(other)]), out))


def test_settings_compare_hub_sets_apart_from_files_of_their_name_and_skip_an_old_threshold_of_1() -> None:
    assert sweep_module._first_difference({"evals": ["wikitext-2"]}, {"evals": ["/x/wikitext-2.txt"]})
    assert not sweep_module._first_difference({"evals": ["/a/held.txt"]}, {"evals": ["/b/held.txt"]})
    # a run of a version that let the threshold be 1: no value given now may be 1, so none is held against it
    assert not sweep_module._first_difference({"collapse_threshold": 1.0}, {"collapse_threshold": 0.9})
    assert sweep_module._first_difference({"collapse_threshold": 0.8}, {"collapse_threshold": 0.9})


def test_a_sweep_refused_on_a_filesystem_without_locks_leaves_no_folder(tmp_path, monkeypatch) -> None:
    import errno

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(sweep_module.fcntl, "flock", no_locks)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", "--lr", "1e-3", "--eval", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2
    assert list(tmp_path.iterdir()) == []  # runs/sweep-<time>/ claimed, then removed with its lock file


def test_a_second_sweep_in_a_folder_a_sweep_is_going_on_in_is_refused(tmp_path: Path) -> None:
    """Each decides at its start what to do with every run: the second started runs the first then
    started again, and the first reported a failure that was none."""
    out = tmp_path / "sweep"
    out.mkdir()
    held = lock_sweep_dir(out)
    assert held is not None
    try:
        result = CliRunner().invoke(app, ["sweep", "--lr", "1e-3", "--out", str(out)])
        assert result.exit_code == 2
        assert f"another sweep is going on in {out}" in result.stderr
    finally:
        held.close()
    again = lock_sweep_dir(out)  # free once the first has ended
    assert again is not None
    again.close()


def test_a_sweep_given_again_with_no_run_to_start_looks_up_no_model() -> None:
    """Every run resumed or done (a stopped one-run sweep, given again): nothing to check, no crash."""
    check_models([])


def test_a_sweep_none_of_whose_runs_started_may_be_given_again_with_other_settings(tmp_path: Path) -> None:
    """Every run failed to start (a --block too long, say) and left no folder: the fix is not refused."""
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(
        json.dumps(
            {"settings": _settings(plan_sweep(options(block=200), out)), "runs": ["a"], "commands": ["c"]}
        )
    )
    assert _earlier_runs(out, plan_sweep(options(block=32), out)) == []


def test_a_run_that_ended_before_its_first_iteration_is_started_again(tmp_path: Path) -> None:
    run = planned(tmp_path, max_iters=10)
    make_run(run.run_dir, "stopped", n=0)
    (run.run_dir / "config.json").write_text(json.dumps({**json.loads((run.run_dir / "config.json").read_text()),
                                                         "run_dir": str(run.run_dir)}))  # fmt: skip
    assert decide(run).action == "start"  # as headless --out takes such a folder over


def test_a_run_of_another_machine_goes_on_as_resume_would_take_it(tmp_path: Path) -> None:
    run = planned(tmp_path, max_iters=10)
    make_run(run.run_dir, "killed", n=3)
    write_process(run.run_dir, os.getpid(), hostname="elsewhere")
    snapshot = save_snapshot(run.run_dir, 3)
    step = decide(run)
    assert (step.action, step.snapshot) == ("resume", snapshot)
    assert "its process is on another machine, or not recorded" in step.why


def tiny_sweep(model: Path, eval_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        "--model",
        str(model),
        "--eval",
        str(eval_file),
        "--gen-tokens",
        "40",
        "--block",
        "16",
        "--eval-tokens",
        "160",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]  # fmt: skip (a second --device cpu in extra: two runs at once)


def iterations(run_dir: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def start_sweep(args: list[str], until: str) -> subprocess.Popen[str]:
    """A sweep in its own process, once a line starting with ``until`` has come."""
    sweep = subprocess.Popen(
        [sys.executable, "-m", "collapse_tui.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert sweep.stdout is not None
    for line in sweep.stdout:
        if line.startswith(until):
            break
    return sweep


def test_a_sweep_moved_with_its_evaluation_file_goes_on_from_its_snapshots(
    tiny_model_dir, eval_file, tmp_path
):
    """The old path gone: each resumed run refused it ("is not there any more") after the sweep took the new."""
    old, new = tmp_path / "old" / "held.txt", tmp_path / "new" / "held.txt"
    old.parent.mkdir()
    shutil.copy(eval_file, old)
    out = tmp_path / "sweep"
    assert cli(*tiny_sweep(tiny_model_dir, old, out, "--lr", "1e-3", "--max-iters", "1")).returncode == 0
    new.parent.mkdir()
    old.rename(new)
    again = cli(*tiny_sweep(tiny_model_dir, new, out, "--lr", "1e-3", "--max-iters", "2"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert iterations(out / "tiny-model0-lr0.001-seed1337") == [0, 1]


def test_a_sweep_runs_every_run_then_goes_on_where_it_was_asked_to(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "sweep"
    args = tiny_sweep(tiny_model_dir, eval_file, out, "--lr", "1e-3", "--lr", "3e-3")
    first = cli(*args, "--max-iters", "2")
    assert first.returncode == 0, first.stderr
    names = ["tiny-model0-lr0.001-seed1337", "tiny-model0-lr0.003-seed1337"]
    assert json.loads((out / "sweep.json").read_text())["runs"] == names
    for name, lr in zip(names, (1e-3, 3e-3), strict=True):
        assert iterations(out / name) == [0, 1]
        assert json.loads((out / name / "config.json").read_text())["lr"] == lr
    assert (out / "sweep.png").stat().st_size > 0
    table = first.stdout.split(f"wrote {out / 'sweep.png'}")[1]  # after the last run and the figure
    assert [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")] == names

    again = cli(*args, "--max-iters", "3", "--lr", "1e-2")
    assert again.returncode == 0, again.stderr
    assert (
        again.stdout.count("going on from") == 2
        and "[3/3] tiny-model0-lr0.01-seed1337: start" in again.stdout
    )
    for name in names:
        assert iterations(out / name) == [0, 1, 2]
        assert json.loads((out / name / "summary.json").read_text())["status"] == "finished"
    assert json.loads((out / "sweep.json").read_text())["runs"] == [*names, "tiny-model0-lr0.01-seed1337"]
    assert len(json.loads((out / "sweep.json").read_text())["commands"]) == 2


def test_a_run_that_fails_costs_only_itself(tiny_model_dir, eval_file, tmp_path):
    broken = tmp_path / "broken"  # its config reads, so the sweep takes it; its weights do not load
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a tensor file")
    out = tmp_path / "sweep"
    result = cli(*tiny_sweep(tiny_model_dir, eval_file, out, "--model", str(broken), "--max-iters", "1"))
    assert result.returncode == 1
    assert "[2/2] broken-lr4e-05-seed1337: ended with exit code 2; the sweep goes on" in result.stdout
    assert iterations(out / "tiny-model0-lr4e-05-seed1337") == [0]
    # last, below the table, which cannot show a run that failed before its first iteration
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("sweep: 1 of 2 runs failed or could not go on (broken-lr4e-05-seed1337; "), last
    assert "to go on: collapse-tui sweep " in last
    assert "Traceback" not in result.stderr


def test_a_model_that_cannot_be_loaded_is_refused_before_anything_runs(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "sweep"
    for model, why in (
        ("no-such-org/no-such-model", "is not in the Hugging Face cache, and the hub cannot be reached"),
        (str(eval_file.parent), "is not a model folder: it has no config.json"),
    ):
        result = cli(*tiny_sweep(tiny_model_dir, eval_file, out, "--model", model, "--max-iters", "1"))
        assert result.returncode == 2
        assert why in result.stderr and "Traceback" not in result.stderr
        assert not out.exists()  # the tiny model's run, first in the grid, did not start
    # a block longer than the model's context (the tiny one's: 128) fails every run: refused at once
    result = cli(*tiny_sweep(tiny_model_dir, eval_file, out, "--block", "200", "--gen-tokens", "300"))
    assert f"--block 200 is longer than the context of {tiny_model_dir} (128 tokens); give --block 128" in (
        result.stderr
    )
    assert result.returncode == 2 and not out.exists()
    # an evaluation file shorter than one window: it failed every run, each after loading its model
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    result = cli(*tiny_sweep(tiny_model_dir, short, out, "--max-iters", "1"))
    assert result.returncode == 2 and "evaluation set short has" in result.stderr, result.stderr
    assert "it needs at least 17 (--block 16 + 1)" in result.stderr and not out.exists()


def test_ctrl_c_stops_the_run_going_with_its_snapshot_and_starts_no_other(
    tiny_model_dir, eval_file, tmp_path
):
    out = tmp_path / "sweep"
    args = tiny_sweep(tiny_model_dir, eval_file, out, "--lr", "1e-3", "--lr", "3e-3", "--max-iters", "100000")
    sweep = start_sweep(args, until="it 2/")
    sweep.send_signal(signal.SIGINT)  # to the sweep alone (its run has a session of its own): passed on
    rest, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    summary = json.loads((out / "tiny-model0-lr0.001-seed1337" / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("stopped", "SIGINT")
    assert Path(summary["last_snapshot"], "state.json").exists()  # one Ctrl-C: the run saved its end
    assert not (out / "tiny-model0-lr0.003-seed1337").exists()
    assert f"sweep: stopped (SIGINT); to go on: collapse-tui sweep --model {tiny_model_dir}" in rest
    assert rest.rstrip().endswith(f"--out {out}")


def test_a_sweep_killed_without_a_word_stops_its_run_as_a_kill_does(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "sweep"
    args = tiny_sweep(tiny_model_dir, eval_file, out, "--max-iters", "100000")
    sweep = start_sweep(args, until="it 2/")
    sweep.kill()
    sweep.communicate(timeout=60)
    run = out / "tiny-model0-lr4e-05-seed1337"
    wait_for(lambda: (run / "summary.json").exists() and "ending" not in json.loads((run / "summary.json").read_text()),
             timeout=120, what="the orphaned run to stop")  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("stopped", "SIGTERM")
    assert Path(summary["last_snapshot"], "state.json").exists()


def test_a_closed_output_costs_neither_the_runs_nor_the_figure(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "sweep"
    sweep = start_sweep(
        tiny_sweep(tiny_model_dir, eval_file, out, "--max-iters", "1"), until="sweep: 1 run in"
    )
    assert sweep.stdout is not None
    sweep.stdout.close()  # like `| head -1`
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr
    assert (out / "sweep.png").stat().st_size > 0
    assert "Traceback" not in stderr and "Exception ignored" not in stderr


def test_with_two_devices_two_runs_go_on_at_once_and_the_third_takes_the_first_freed(
    tiny_model_dir, eval_file, tmp_path
):
    out = tmp_path / "sweep"
    args = tiny_sweep(tiny_model_dir, eval_file, out, "--lr", "1e-3", "--lr", "3e-3", "--lr", "1e-2",
                      "--max-iters", "2", "--device", "cpu:0")  # fmt: skip
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    names = ["tiny-model0-lr0.001-seed1337", "tiny-model0-lr0.003-seed1337", "tiny-model0-lr0.01-seed1337"]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sweep: [")]
    started = {line.split("] ")[1].split(":")[0]: line.split(" on ")[1].split(" ")[0] for line in lines
               if ": start on " in line}  # fmt: skip
    assert (started[names[0]], started[names[1]]) == ("cpu", "cpu:0")  # one on each device given
    first_done = next(line.split("] ")[1].split(":")[0] for line in lines if "finished after 2" in line)
    assert started[names[2]] == started[first_done]  # the device the first run to end gave back
    assert lines.index(next(line for line in lines if names[2] in line)) > lines.index(
        next(line for line in lines if first_done in line and "finished" in line)
    )
    for name in names:
        assert json.loads((out / name / "config.json").read_text())["device"] == started[name]
        assert "it 2/2" in (out / "logs" / f"{name}.log").read_text()  # its output, not the sweep's


def test_with_two_devices_a_ctrl_c_stops_both_runs_and_starts_no_other(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "sweep"
    args = tiny_sweep(tiny_model_dir, eval_file, out, "--lr", "1e-3", "--lr", "3e-3", "--lr", "1e-2",
                      "--max-iters", "100000", "--device", "cpu:0")  # fmt: skip
    sweep = start_sweep(args, until="sweep: [2/3]")
    names = ["tiny-model0-lr0.001-seed1337", "tiny-model0-lr0.003-seed1337", "tiny-model0-lr0.01-seed1337"]
    wait_for(lambda: all(len(iterations_so_far(out / name)) >= 2 for name in names[:2]), timeout=120,
             what="both runs to be going")  # fmt: skip
    sweep.send_signal(signal.SIGINT)
    rest, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    for name in names[:2]:
        summary = json.loads((out / name / "summary.json").read_text())
        assert (summary["status"], summary["reason"]) == ("stopped", "SIGINT")
        assert f"{name}: stopped after" in rest and "its newest snapshot is iter-" in rest
    assert not (out / names[2]).exists()


def test_a_run_stopped_on_its_own_leaves_the_sweep_going_and_is_named_at_the_end(
    tiny_model_dir, eval_file, tmp_path
):
    out = tmp_path / "sweep"
    args = tiny_sweep(
        tiny_model_dir, eval_file, out, "--lr", "1e-3", "--lr", "3e-3", "--max-iters", "200", "--keep-going"
    )
    sweep = start_sweep(args, until="it 1/")
    names = ["tiny-model0-lr0.001-seed1337", "tiny-model0-lr0.003-seed1337"]
    os.kill(json.loads((out / names[0] / "process.json").read_text())["pid"], signal.SIGTERM)  # the run's own
    rest, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 130, stderr
    assert json.loads((out / names[0] / "summary.json").read_text())["reason"] == "SIGTERM"
    assert len(iterations(out / names[1])) == 200  # the sweep went on
    assert f"sweep: {names[0]} stopped on its own; to go on with it: collapse-tui sweep" in rest


def test_a_device_that_is_not_there_is_refused_before_anything_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["sweep", "--device", "cpu", "--device", "tpu", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2
    assert "--device 'tpu' is not a device" in result.stderr
    assert not (tmp_path / "s").exists()


def iterations_so_far(run_dir: Path) -> list[str]:
    try:
        return (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []


def test_a_sweep_does_not_import_textual(tiny_model_dir, eval_file, tmp_path):
    args = tiny_sweep(tiny_model_dir, eval_file, tmp_path / "sweep", "--max-iters", "1")
    result = run_checking_textual_is_not_imported(args)
    assert result.returncode == 0, result.stderr


def process_state(pid: int) -> str:
    """The state letter of ``/proc/PID/stat``: ``T`` for stopped."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


#: Ctrl-Z tests: they read process states from /proc, and need SIGTSTP not ignored (job control).
needs_job_control = pytest.mark.skipif(
    not Path("/proc/self/stat").exists() or signal.getsignal(signal.SIGTSTP) is signal.SIG_IGN,
    reason="needs /proc and job control (Ctrl-Z not ignored)",
)


def suspended_sweep(tiny_model_dir, eval_file, out: Path) -> tuple[subprocess.Popen, Path, int]:
    """A sweep whose run is going, then Ctrl-Z'd: the sweep, its run's folder and the run's pid, both stopped."""
    sweep = start_sweep(tiny_sweep(tiny_model_dir, eval_file, out, "--max-iters", "100000"), until="it 2/")
    run = out / "tiny-model0-lr4e-05-seed1337"
    child = json.loads((run / "process.json").read_text())["pid"]
    try:
        sweep.send_signal(signal.SIGTSTP)
        wait_for(lambda: process_state(sweep.pid) == "T" and process_state(child) == "T", timeout=30,
                 what="the sweep and its run to stop")  # fmt: skip
    except BaseException:  # leave no stopped process behind
        sweep.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
        raise
    return sweep, run, child


@needs_job_control
def test_ctrl_z_suspends_the_run_going_with_the_sweep_and_fg_continues_both(
    tiny_model_dir, eval_file, tmp_path
):
    sweep, run, child = suspended_sweep(tiny_model_dir, eval_file, tmp_path / "sweep")
    try:
        stopped_at = len(iterations_so_far(run))
        sweep.send_signal(signal.SIGCONT)  # what fg or bg sends
        wait_for(lambda: len(iterations_so_far(run)) > stopped_at + 1, timeout=60, what="the run to go on")
        sweep.send_signal(signal.SIGINT)
        _, stderr = sweep.communicate(timeout=120)
    finally:  # on a failure: its run follows the sweep (a SIGTERM from the system), once continued
        sweep.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
    assert sweep.returncode == 130, stderr
    assert json.loads((run / "summary.json").read_text())["reason"] == "SIGINT"


@needs_job_control
def test_a_suspended_sweep_killed_without_a_word_stops_its_run_as_a_kill_does(
    tiny_model_dir, eval_file, tmp_path
):
    """Ctrl-Z, then ``kill -9 %1``: the run the sweep had suspended must not stay stopped for ever."""
    sweep, run, child = suspended_sweep(tiny_model_dir, eval_file, tmp_path / "sweep")
    try:
        sweep.kill()
        sweep.communicate(timeout=60)
        wait_for(lambda: (run / "summary.json").exists() and "ending" not in json.loads((run / "summary.json").read_text()),
                 timeout=120, what="the orphaned run to stop")  # fmt: skip
    finally:  # on a failure: leave no stopped process behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("stopped", "SIGTERM")
    assert Path(summary["last_snapshot"], "state.json").exists()


def test_a_ctrl_z_while_a_run_is_being_started_suspends_that_run_too(monkeypatch) -> None:
    """A Ctrl-Z between a run's Popen and its adoption waits for it: the new run stops with the rest."""
    sent: list[tuple[str, int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pid, signum: sent.append(("group", pid, signum)))
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append(("process", pid, signum)))
    stop = SweepStop()
    with stop.starting():
        stop._suspend(signal.SIGTSTP, None)  # the handler, run between Popen and adopt
        assert sent == []
        stop.adopt(RunningChild(4242))
    assert sent == [
        ("group", 4242, signal.SIGSTOP),
        ("process", os.getpid(), signal.SIGSTOP),  # the sweep itself, as Ctrl-Z would
        ("group", 4242, signal.SIGCONT),  # once the sweep is continued
    ]


class RunningChild:
    """A run's process still going: what ``SweepStop`` passes signals to."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> None:
        return None


class FinishedChild:
    """A run's process that has already ended with ``returncode``: what ``_run_plan`` waits on."""

    def __init__(self, returncode: int) -> None:
        self.returncode = returncode

    def poll(self) -> int:
        return self.returncode

    def wait(self) -> int:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        raise AssertionError("no signal was sent")


def devices_given(
    tmp_path: Path,
    monkeypatch,
    failing: set[str],
    runs: int = 6,
    after_an_iteration: bool = False,
    everywhere_from: int | None = None,
) -> tuple[list[str], str]:
    """The device each of ``runs`` runs went to, on cuda:0 and cuda:1, where every run on a device of
    ``failing`` fails before its first iteration (or after one), and from run ``everywhere_from`` on
    (counting from 1) every run fails on every device; and what the sweep said."""
    given: list[str] = []

    def start_child(argv: list[str], stop: SweepStop, log: Path | None, env: dict[str, str]) -> FinishedChild:
        device = argv[argv.index("--device") + 1]
        given.append(device)
        if after_an_iteration:
            run_dir = Path(argv[argv.index("--out") + 1])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").write_text('{"iteration": 0}\n')
        everywhere = everywhere_from is not None and len(given) >= everywhere_from
        child = FinishedChild(2 if device in failing or everywhere else 0)
        stop.adopt(child)  # type: ignore[arg-type]
        return child

    monkeypatch.setattr(sweep_module, "_start_child", start_child)
    plan = plan_sweep(options(lr=[10.0**-k for k in range(1, runs + 1)]), tmp_path / "sweep")
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        outcome = _run_plan(
            plan, [Step("start")] * runs, SweepStop(), ["cuda:0", "cuda:1"], tmp_path / "logs"
        )
    assert outcome.failed
    return given, said.getvalue()


def test_a_device_on_which_runs_keep_failing_at_once_takes_no_more_of_them(tmp_path, monkeypatch) -> None:
    given, said = devices_given(tmp_path, monkeypatch, failing={"cuda:1"})
    assert given == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0", "cuda:0"]
    assert "2 runs in a row failed on cuda:1 before their first iteration; it takes no more runs" in said


def test_runs_failing_on_every_device_in_turn_retire_none_of_them(tmp_path, monkeypatch) -> None:
    """A model that fails everywhere (too large for any GPU): the failures come cuda:0, cuda:1, cuda:0…
    cuda:0's second came after cuda:1's, which says the runs are at fault; it was retired all the same."""
    given, said = devices_given(tmp_path, monkeypatch, failing={"cuda:0", "cuda:1"})
    assert given == ["cuda:0", "cuda:1"] * 3
    assert "takes no more runs" not in said
    assert said.count("ended with exit code 2") == 6  # every run was tried, each failure said


def test_a_retired_device_comes_back_once_runs_fail_on_the_others_too(tmp_path, monkeypatch) -> None:
    given, said = devices_given(tmp_path, monkeypatch, failing={"cuda:1"}, runs=8, everywhere_from=6)
    # cuda:1 retired after runs 2 and 4; runs from the sixth fail on cuda:0 too: cuda:1 is back
    assert given[:6] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0", "cuda:0"]
    assert "cuda:1" in given[6:]
    assert said.count("takes no more runs") == 1 and said.count("cuda:1 take runs again") == 1


def test_a_failure_long_ago_on_another_device_does_not_keep_a_failing_one_working() -> None:
    """cuda:1's first run failed at once, its next has run for hours: cuda:0 failing every run at once
    (another job's memory) must still be retired, not take every queued run."""
    retiring = sweep_module.DeviceRetirement(["cuda:0", "cuda:1"])
    with contextlib.redirect_stdout(io.StringIO()):
        assert retiring.freed("cuda:1", True) == ["cuda:1"]
        assert retiring.freed("cuda:0", True) == ["cuda:0"]
        assert retiring.freed("cuda:0", True) == []  # retired
    assert retiring.working == ["cuda:1"]


def test_runs_that_fail_after_an_iteration_retire_no_device(tmp_path, monkeypatch) -> None:
    given, said = devices_given(tmp_path, monkeypatch, failing={"cuda:1"}, after_an_iteration=True)
    assert given.count("cuda:1") == 3 and "takes no more runs" not in said  # a failure of the run's own


def test_a_sweep_without_out_gets_a_folder_of_its_own_and_a_refused_one_leaves_none(
    tiny_model_dir, eval_file, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    named = Path("runs") / "sweep-20261129-030000"
    monkeypatch.setattr(sweep_module, "default_sweep_dir", lambda: named)  # two sweeps in the same second
    refused = CliRunner().invoke(app, ["sweep", "--lr", "-1"])
    assert refused.exit_code == 2 and not Path("runs").exists()
    named.mkdir(parents=True)  # the other sweep's
    args = tiny_sweep(tiny_model_dir, eval_file, Path("unused"), "--max-iters", "1")
    args.remove("--out"), args.remove("unused")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert iterations(named.with_name(named.name + "-2") / "tiny-model0-lr4e-05-seed1337") == [0]
    assert not any(named.iterdir())


def test_a_sweep_folder_below_a_file_or_a_device_is_refused_as_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile" / "s", Path("/dev/null/s")):
        with pytest.raises(UserError, match=r"is not a folder; give --out another folder"):
            sweep_module.check_sweep_dir(out)


def test_a_resume_stopped_while_it_loaded_is_not_reported_as_how_the_run_ended(tmp_path: Path) -> None:
    """A run extended from 5 to 10 iterations, stopped by a signal to its own process before its first
    new one: "finished after 5 iterations" read as if the run had ended so."""
    run = planned(tmp_path, max_iters=10)
    make_run(run.run_dir, "finished", n=5)
    ended = sweep_module._Going(run, FinishedChild(130), None, "sweep: [1/1] r", None, 5)  # type: ignore[arg-type]
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        failed = sweep_module._report_end(ended, SweepStop(), sweep_module.Outcome())
    assert not failed
    assert said.getvalue().startswith(
        "sweep: [1/1] r: stopped before going on; it stands as before: finished"
    )
