"""``collapse-tui sweep``: the grid it plans, what it does with each run folder, and real sweeps end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from runfolders import make_run, write_process
from test_cli import ENV, cli
from typer.testing import CliRunner

from collapse_tui.cli import app
from collapse_tui.errors import UserError
from collapse_tui.sweep import Step, decide, headless_argv, plan_sweep


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


def test_one_seed_gives_no_seed_in_the_names_and_the_defaults_fill_what_is_not_swept(tmp_path) -> None:
    plan = plan_sweep(options(lr=[1e-3]), tmp_path)
    assert [run.name for run in plan] == ["gpt2-lr0.001"]
    assert (plan[0].config.model, plan[0].config.seed, plan[0].config.max_iters) == ("gpt2", 1337, 1000)
    paper = plan_sweep(options(preset="paper", lr=[1e-4], evals=[]), tmp_path)[0].config
    assert (paper.lr, paper.evals, paper.seed) == (1e-4, ["wikitext-2-v1"], 1337)  # the preset, lr given wins


def test_runs_that_would_share_a_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a" / "m").mkdir(parents=True)
    (tmp_path / "b" / "m").mkdir(parents=True)
    with pytest.raises(UserError, match="would share the folder"):
        plan_sweep(options(model=[str(tmp_path / "a" / "m"), str(tmp_path / "b" / "m")]), tmp_path / "sweep")


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
    snapshot = run.run_dir / "snapshots" / "iter-3"
    resumed = headless_argv(run, Step("resume", snapshot=snapshot))
    # the lr is left to the snapshot (a key may have changed it); what decides the computation is the run's
    assert resumed[0] == "headless"
    words = " ".join(resumed)
    assert words.count("--") == 5
    for fragment in ("--max-iters 7", "--device cpu", "--keep-going", "--no-final-snapshot", "--resume"):
        assert fragment in words


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
        UserError, match=r"holds a run with --lr 0.0001, not 4e-05; give the sweep another --out"
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


def test_run_options_before_the_command_name_are_one_value_each(monkeypatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_sweep(given: dict[str, Any], out: Path | None, command: list[str]) -> int:
        seen.update(given, out=out, command=command)
        return 0

    monkeypatch.setattr("collapse_tui.sweep.run_sweep", fake_sweep)
    result = CliRunner().invoke(
        app, ["--lr", "1e-3", "--block", "50", "sweep", "--model", "gpt2", "--model", "m"]
    )
    assert result.exit_code == 0, result.output
    assert (seen["lr"], seen["block"], seen["model"], seen["out"]) == ([1e-3], 50, ["gpt2", "m"], None)
    assert seen["command"][:5] == ["sweep", "--model", "gpt2", "--model", "m"]


def tiny_sweep(model: Path, eval_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sweep", "--model", str(model), "--eval", str(eval_file), "--gen-tokens", "40", "--block", "16",
        "--eval-tokens", "160", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def iterations(run_dir: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_sweep_runs_every_run_then_goes_on_where_it_was_asked_to(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "sweep"
    args = tiny_sweep(tiny_model_dir, eval_file, out, "--lr", "1e-3", "--lr", "3e-3")
    first = cli(*args, "--max-iters", "2")
    assert first.returncode == 0, first.stderr
    names = ["tiny-model0-lr0.001", "tiny-model0-lr0.003"]
    assert json.loads((out / "sweep.json").read_text())["runs"] == names
    for name, lr in zip(names, (1e-3, 3e-3), strict=True):
        assert iterations(out / name) == [0, 1]
        assert json.loads((out / name / "config.json").read_text())["lr"] == lr
    assert (out / "sweep.png").stat().st_size > 0
    assert "tiny-model0-lr0.003" in first.stdout.split("sweep: [2/2]")[1]  # the table, after the last run

    again = cli(*args, "--max-iters", "3")
    assert again.returncode == 0, again.stderr
    assert "going on from" in again.stdout
    for name in names:
        assert iterations(out / name) == [0, 1, 2]
        assert json.loads((out / name / "summary.json").read_text())["status"] == "finished"


def test_a_run_that_fails_costs_only_itself(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "sweep"
    missing = tmp_path / "no-such-model"
    result = cli(*tiny_sweep(tiny_model_dir, eval_file, out, "--model", str(missing), "--max-iters", "1"))
    assert result.returncode == 1
    assert "[2/2] no-such-model-lr4e-05: ended with exit code 2; the sweep goes on" in result.stdout
    assert iterations(out / "tiny-model0-lr4e-05") == [0]
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_the_run_going_with_its_snapshot_and_starts_no_other(
    tiny_model_dir, eval_file, tmp_path
):
    out = tmp_path / "sweep"
    args = tiny_sweep(tiny_model_dir, eval_file, out, "--lr", "1e-3", "--lr", "3e-3", "--max-iters", "100000")
    sweep = subprocess.Popen(
        [sys.executable, "-m", "collapse_tui.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert sweep.stdout is not None
    lines = []
    for line in sweep.stdout:
        lines.append(line)
        if line.startswith("it 2/"):
            sweep.send_signal(signal.SIGINT)  # to the sweep alone: it passes it on to its run
            break
    rest, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    first = out / "tiny-model0-lr0.001"
    summary = json.loads((first / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("stopped", "SIGINT")
    assert Path(summary["last_snapshot"], "state.json").exists()  # one Ctrl-C: the run saved its end
    assert not (out / "tiny-model0-lr0.003").exists()
    assert f"sweep: stopped (SIGINT); to go on: collapse-tui sweep --model {tiny_model_dir}" in rest
    assert rest.rstrip().endswith(f"--out {out}")


def test_a_sweep_does_not_import_textual(tiny_model_dir, eval_file, tmp_path):
    args = tiny_sweep(tiny_model_dir, eval_file, tmp_path / "sweep", "--max-iters", "1")
    code = (
        "import sys; from collapse_tui.cli import app; "
        f"app({args!r}, standalone_mode=False); "
        "assert 'textual' not in sys.modules, 'textual was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert result.returncode == 0, result.stderr
