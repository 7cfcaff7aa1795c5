"""Resume rules and the edges of a run: the end, a collapse, a dead listener, a torn line."""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from runfolders import dead_pid, write_process
from test_engine import Collector, RepeatingInference

from collapse_tui.cli import _moved, build_config, resume_lr
from collapse_tui.config import RunConfig, resolve_config
from collapse_tui.engine import Engine
from collapse_tui.errors import RunInterrupted, UserError
from collapse_tui.runfolder import read_run


def stopped_run_with_snapshot(config: RunConfig, tmp_path: Path) -> Path:
    """Run two iterations with a snapshot at the end; return the snapshot folder."""
    config.out = str(tmp_path / "run")
    config.max_iters = 2
    engine = Engine(config)
    engine.run(Collector(lambda r: engine.controls.request_snapshot() if r.iteration == 1 else None))
    return tmp_path / "run" / "snapshots" / "iter-2"


def test_an_lr_given_with_resume_applies_from_the_first_resumed_iteration(tiny_config, tmp_path):
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)
    options = {"resume": snapshot, "max_iters": 4, "lr": 5e-3}
    config = build_config(options)
    listener = Collector()
    Engine(config, resume_lr=resume_lr(options)).run(listener)
    assert [(r.iteration, r.lr) for r in listener.records] == [(2, 5e-3), (3, 5e-3)]
    assert listener.statuses[0] == f"loading the model from {snapshot}"  # not the model it started from
    lr_events = [e for e in listener.events if e.event == "lr"]
    assert [(e.iteration, e.data["old_lr"], e.data["lr"]) for e in lr_events] == [(2, 1e-3, 5e-3)]


def test_a_resumed_run_shows_the_lr_its_snapshot_saved_before_it_has_loaded(tiny_config, tmp_path):
    tiny_config.out = str(tmp_path / "run")
    tiny_config.max_iters = 10
    engine = Engine(tiny_config)

    def change_lr_and_quit(record) -> None:
        if record.iteration == 1:
            engine.controls.set_lr(5e-3)  # a key: config.json keeps the lr the run started with
            engine.controls.stop()

    engine.run(Collector(change_lr_and_quit))
    resumed = Engine(build_config({"resume": tmp_path / "run" / "snapshots" / "iter-2", "max_iters": 4}))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == tiny_config.lr
    assert resumed.info.lr == 5e-3  # what the screen shows and + and - work from, while it loads


def test_resume_keeps_the_runs_own_settings_and_refuses_to_change_what_it_computes(tiny_config, tmp_path):
    tiny_config.eval_tokens = None  # --eval-tokens all
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)
    config = build_config({"resume": snapshot, "max_iters": 5})
    assert config.eval_tokens is None
    assert config.block == tiny_config.block and config.max_iters == 5
    with pytest.raises(UserError, match="--block cannot change"):
        build_config({"resume": snapshot, "block": 8})
    with pytest.raises(UserError, match="--seed cannot change"):
        build_config({"resume": snapshot, "seed": 99})
    with pytest.raises(UserError, match="--preset cannot be given with --resume"):
        build_config({"resume": snapshot, "preset": "paper"})
    # the same model folder spelled another way is the same model; another folder is not
    spelled = str(Path(tiny_config.model) / ".." / Path(tiny_config.model).name) + "/"
    resumed = build_config({"resume": snapshot, "model": spelled, "max_iters": 5})
    assert resumed.model == os.path.abspath(tiny_config.model)  # kept as one absolute path
    with pytest.raises(UserError, match="--model cannot change"):
        build_config({"resume": snapshot, "model": str(tmp_path)})


def test_a_run_still_being_written_cannot_be_resumed(tiny_config, tmp_path):
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)
    (tmp_path / "run" / "process.json").write_text(
        json.dumps({"pid": os.getpid(), "hostname": os.uname().nodename, "state": "running"})
    )
    with pytest.raises(UserError, match="still being written"):
        Engine(build_config({"resume": snapshot, "max_iters": 4}))


def test_a_torn_last_line_does_not_swallow_the_first_resumed_record(tiny_config, tmp_path):
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"iteration": 2, "gen_lo')  # a process killed mid-line
    Engine(build_config({"resume": snapshot, "max_iters": 3})).run()
    assert [r.iteration for r in read_run(tmp_path / "run").records] == [0, 1, 2]


def test_a_pause_pressed_during_the_last_iteration_does_not_keep_the_run_from_ending(tiny_config):
    tiny_config.max_iters = 2
    engine = Engine(tiny_config)
    listener = Collector(lambda r: engine.controls.pause() if r.iteration == 1 else None)
    thread = threading.Thread(target=engine.run, args=(listener,))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert read_run(Path(tiny_config.out)).summary["status"] == "finished"


def test_a_snapshot_asked_for_in_the_collapsing_iteration_is_still_taken(tiny_config):
    tiny_config.max_iters = 6
    tiny_config.gen_tokens = 100
    engine = Engine(tiny_config)
    engine.load()
    engine.inference = RepeatingInference(engine.model, tiny_config.block, 1.0, 50)
    engine.run(Collector(lambda r: engine.controls.request_snapshot() if r.iteration == 2 else None))
    assert (Path(tiny_config.out) / "snapshots" / "iter-3" / "state.json").exists()


class DeadTerminal(Collector):
    """A listener whose output has gone away (an SSH hang-up under a progress bar)."""

    def on_event(self, event):
        if event.event == "stop":
            raise OSError(5, "Input/output error")
        super().on_event(event)


def test_a_listener_that_fails_at_the_end_does_not_cost_the_summary(tiny_config):
    summary = Engine(tiny_config).run(DeadTerminal())
    run = read_run(Path(tiny_config.out))
    assert run.summary == json.loads(json.dumps(summary))
    assert run.events[-1].event == "stop"


def test_resume_refuses_a_bad_lr_and_a_max_iters_it_has_already_reached(tiny_config, tmp_path):
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)  # at iteration 2
    for lr in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="--lr must be a positive number"):
            build_config({"resume": snapshot, "max_iters": 4, "lr": lr})
    with pytest.raises(UserError, match="--max-iters 2: the snapshot is at iteration 2 already"):
        build_config({"resume": snapshot, "max_iters": 2})
    with pytest.raises(UserError, match="--max-iters 2: the snapshot is at iteration 2 already"):
        build_config({"resume": snapshot})  # the run's own max_iters, reached


def test_a_relative_eval_file_is_kept_absolute_and_may_move_before_a_resume(
    tiny_config, tmp_path, monkeypatch
):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "heldout.txt").write_text(Path(tiny_config.evals[0]).read_text())
    monkeypatch.chdir(workdir)
    options = {
        **tiny_config.to_dict(),
        "evals": ["heldout.txt"],
        "out": str(tmp_path / "run"),
        "max_iters": 2,
    }
    config = resolve_config(options)
    assert config.evals == [str(workdir / "heldout.txt")]
    engine = Engine(config)
    engine.run(Collector(lambda r: engine.controls.request_snapshot() if r.iteration == 1 else None))
    snapshot = tmp_path / "run" / "snapshots" / "iter-2"

    monkeypatch.chdir(tmp_path)  # elsewhere: the stored path still finds the file
    assert build_config({"resume": snapshot, "max_iters": 3}).evals == [str(workdir / "heldout.txt")]
    moved = tmp_path / "moved" / "heldout.txt"  # the same set, moved: accepted under its new path
    moved.parent.mkdir()
    moved.write_text((workdir / "heldout.txt").read_text())
    assert build_config({"resume": snapshot, "max_iters": 3, "evals": [str(moved)]}).evals == [str(moved)]
    (workdir / "heldout.txt").unlink()  # gone from where the run found it: the error says what to give
    with pytest.raises(
        UserError, match=r"heldout.txt is not there any more; .*\(named heldout\.\*, .*: --eval NEW_PATH$"
    ):
        build_config({"resume": snapshot, "max_iters": 3})
    assert build_config({"resume": snapshot, "max_iters": 3, "evals": [str(moved)]}).evals == [str(moved)]
    with pytest.raises(UserError, match="--eval cannot change"):
        build_config({"resume": snapshot, "max_iters": 3, "evals": ["wikitext-2"]})
    other = tmp_path / "other" / "heldout.txt"  # the same name, other text: refused once loaded
    other.parent.mkdir()
    other.write_text(moved.read_text() * 2)
    with pytest.raises(UserError, match="a resume must evaluate on the same text"):
        Engine(build_config({"resume": snapshot, "max_iters": 3, "evals": [str(other)]})).load()
    text = moved.read_text()
    assert " the " in text and " of " in text
    swapped = text.replace(" the ", " \0 ", 1).replace(" of ", " the ", 1).replace(" \0 ", " of ", 1)
    other.write_text(swapped)  # two words swapped: as many tokens, other text
    with pytest.raises(UserError, match="the text differs from the one the run started with"):
        Engine(build_config({"resume": snapshot, "max_iters": 3, "evals": [str(other)]})).load()


def test_a_moved_file_beside_a_hub_set_is_the_same_set_and_a_hub_set_stays_itself() -> None:
    base = RunConfig(evals=["wikitext-2", "/data/held.txt"])
    assert _moved("evals", ["wikitext-2", "/moved/held.txt"], base)  # what the error tells you to give
    assert not _moved("evals", ["ptb", "/moved/held.txt"], base)
    assert not _moved("evals", ["/moved/wikitext-2.txt", "/moved/held.txt"], base)  # a file is no hub set
    assert not _moved("evals", ["/moved/held.txt"], base)


def test_a_run_started_before_the_top_limits_resumes_with_its_own_settings(tiny_config, tmp_path):
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)
    config_file = tmp_path / "run" / "config.json"  # as an earlier version let it start
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "collapse_threshold": 1.0, "temperature": 2e6})
    )
    resumed = build_config({"resume": snapshot, "max_iters": 5})
    assert (resumed.collapse_threshold, resumed.temperature) == (1.0, 2e6)
    with pytest.raises(UserError, match="--temperature must be at most"):
        resolve_config({**tiny_config.to_dict(), "temperature": 2e6, "out": None})  # a new run: refused
    with pytest.raises(UserError, match="rep4 never reaches 1"):  # a threshold given anew: held to the rule
        build_config({"resume": snapshot, "max_iters": 5, "collapse_threshold": 1.0})


def test_an_eval_file_stored_resolved_by_an_earlier_version_is_the_same_set_through_its_link(tmp_path):
    blob = tmp_path / "blobs" / "9f86d081884c"
    blob.parent.mkdir()
    blob.write_text("held-out text\n")
    (tmp_path / "wiki.txt").symlink_to(blob)
    assert _moved("evals", [str(tmp_path / "wiki.txt")], RunConfig(evals=[str(blob)]))


def test_a_run_cut_mid_iteration_and_resumed_from_its_final_snapshot_equals_one_never_stopped(
    tiny_config, tmp_path
):
    tiny_config.max_iters = 4
    tiny_config.out = str(tmp_path / "straight")
    straight = Collector()
    Engine(tiny_config).run(straight)

    cut = RunConfig.from_dict({**tiny_config.to_dict(), "out": str(tmp_path / "cut")})
    engine = Engine(cut)
    engine.load()
    real_generate = engine.inference.generate

    def generate(prompt_ids, gen_tokens, generator, should_stop=lambda: False):
        if engine.iteration == 2:  # q in the middle of iteration 2: some tokens drawn, then the stop
            torch.rand(100, generator=generator)
            engine.controls.stop()
            raise RunInterrupted
        return real_generate(prompt_ids, gen_tokens, generator, should_stop)

    engine.inference.generate = generate
    engine.run(Collector())
    resumed = Collector()
    Engine(build_config({"resume": tmp_path / "cut" / "snapshots" / "iter-2", "max_iters": 4})).run(resumed)
    assert [r.text for r in resumed.records] == [r.text for r in straight.records[2:]]


def test_a_snapshot_on_the_collapsing_iteration_knows_the_collapse(tiny_config, tmp_path):
    tiny_config.max_iters = 6
    tiny_config.gen_tokens = 100
    tiny_config.keep_going = True
    tiny_config.snapshot_every = 3  # the detector needs 3 iterations in a row: collapse at iteration 2
    engine = Engine(tiny_config)
    engine.load()
    engine.inference = RepeatingInference(engine.model, tiny_config.block, 1.0, 50)
    engine.run(Collector())
    state = json.loads((Path(tiny_config.out) / "snapshots" / "iter-3" / "state.json").read_text())
    assert state["collapsed_at"] == 2


def test_a_snapshot_of_iterations_a_later_resume_abandoned_is_refused(tiny_config, tmp_path):
    tiny_config.out = str(tmp_path / "run")
    tiny_config.max_iters = 4
    tiny_config.snapshot_every = 2
    Engine(tiny_config).run(Collector())  # snapshots iter-2 and iter-4
    Engine(build_config({"resume": tmp_path / "run" / "snapshots" / "iter-2", "max_iters": 3})).run()
    assert [r.iteration for r in read_run(tmp_path / "run").records] == [0, 1, 2]
    newest = tmp_path / "run" / "snapshots" / "iter-3"
    with pytest.raises(
        UserError, match=f"after 4 iterations; the run as it now stands has 3; go on from {newest}"
    ):
        Engine(build_config({"resume": tmp_path / "run" / "snapshots" / "iter-4", "max_iters": 6}))


def test_an_abandoned_snapshot_stays_refused_once_the_resumed_branch_has_run_past_it(tiny_config, tmp_path):
    tiny_config.out = str(tmp_path / "run")
    tiny_config.max_iters = 4
    tiny_config.snapshot_every = 2
    Engine(tiny_config).run(Collector())  # snapshots iter-2 and iter-4
    snapshots = tmp_path / "run" / "snapshots"
    # resumed from iter-2 with a new lr, run past 4 without saving iteration 4 again
    options = {"resume": snapshots / "iter-2", "max_iters": 6, "lr": 5e-3, "snapshot_every": 0}
    Engine(build_config(options), resume_lr=5e-3).run()
    assert [r.iteration for r in read_run(tmp_path / "run").records] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(UserError, match="resumed from an earlier iteration after it was saved"):
        Engine(build_config({"resume": snapshots / "iter-4", "max_iters": 8}))
    # the snapshot the resumed branch saved itself goes on
    Engine(build_config({"resume": snapshots / "iter-6", "max_iters": 7})).run()
    assert [r.iteration for r in read_run(tmp_path / "run").records] == [0, 1, 2, 3, 4, 5, 6]


class Reacting(Collector):
    """Does ``act()`` at the first reported event ``when`` holds for: a key pressed as the screen hears of it."""

    def __init__(self, when=lambda event: False, act=lambda: None) -> None:
        super().__init__()
        self.when, self.act, self.acted = when, act, False

    def on_event(self, event) -> None:
        super().on_event(event)
        if not self.acted and self.when(event):
            self.acted = True
            self.act()


class ScreenWriter(Reacting):
    """Puts a file into a snapshot when it is first reported, as the TUI does with its screen.svg."""

    def on_event(self, event) -> None:
        screen = Path(event.data.get("path", "")) / "screen.svg"
        if event.event == "snapshot" and not screen.exists():
            screen.write_text("the screen")
        super().on_event(event)


def test_a_snapshot_asked_for_where_a_periodic_one_was_just_taken_keeps_that_one(tiny_config):
    tiny_config.max_iters = 3
    tiny_config.snapshot_every = 2
    engine = Engine(tiny_config)
    # s pressed as the periodic snapshot of iteration 2 is reported, before the run goes on
    listener = ScreenWriter(
        when=lambda event: event.event == "snapshot" and event.iteration == 2,
        act=engine.controls.request_snapshot,
    )
    engine.run(listener)
    snapshots = [e for e in listener.events if e.event == "snapshot" and e.iteration == 2]
    assert [bool(e.data.get("again")) for e in snapshots] == [False, True]
    assert "saved already" in snapshots[1].describe()
    # not written again: the file put into it at the first report is still there
    assert (Path(tiny_config.out) / "snapshots" / "iter-2" / "screen.svg").exists()


def test_an_lr_change_and_a_quit_where_a_periodic_snapshot_was_just_taken_save_the_new_lr(tiny_config):
    tiny_config.max_iters = 10
    tiny_config.snapshot_every = 2
    engine = Engine(tiny_config)

    def change_lr_and_quit(record) -> None:
        if record.iteration == 1:  # the periodic snapshot of iteration 2 comes next, then this boundary
            engine.controls.set_lr(5e-3)
            engine.controls.stop()

    engine.run(Collector(change_lr_and_quit))
    state = json.loads((Path(tiny_config.out) / "snapshots" / "iter-2" / "state.json").read_text())
    assert state["lr"] == 5e-3  # the final snapshot was taken again, with the lr a resume must use


def test_out_naming_the_folder_of_the_snapshot_is_no_change_even_for_a_default_named_run(
    tiny_config, tmp_path
):
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)
    config_file = tmp_path / "run" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "out": None}))  # no --out given
    for spelled in (str(tmp_path / "run"), str(tmp_path / "run") + "/", str(tmp_path / "." / "run")):
        build_config({"resume": snapshot, "out": spelled, "max_iters": 5})
    with pytest.raises(
        UserError, match=f"--out cannot change when resuming \\(the run used {tmp_path / 'run'}\\)"
    ):
        build_config({"resume": snapshot, "out": str(tmp_path / "elsewhere"), "max_iters": 5})


def test_a_snapshot_whose_sampler_was_saved_on_another_device_resumes_with_a_stream_seeded_from_it(
    tiny_config, tmp_path
):
    # A CUDA generator's state is 16 bytes; the CPU's cannot take it. Such a
    # resume used to crash (and mark the finished run crashed).
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)
    states = torch.load(snapshot / "rng.pt", weights_only=False)
    texts = []
    for saved in (0, 0, 1):  # the same saved state twice, then another
        states["sampler"] = torch.arange(saved, saved + 16, dtype=torch.uint8)
        torch.save(states, snapshot / "rng.pt")
        listener = Collector()
        Engine(build_config({"resume": snapshot, "max_iters": 3})).run(listener)
        resumed = [e for e in listener.events if e.event == "resumed_from"]
        assert resumed[0].data["new_sampling_stream"] is True
        assert "another device" in resumed[0].describe()
        assert [r.iteration for r in listener.records] == [2]
        texts.append(listener.records[0].text)
    assert texts[0] == texts[1]  # seeded from the saved state: a resume of it samples the same
    assert texts[2] != texts[0]  # and not from the run's --seed alone
    assert read_run(tmp_path / "run").summary["status"] == "finished"


def test_a_snapshot_moved_aside_for_a_replacement_that_never_came_is_put_back(tiny_config, tmp_path):
    # killed between the two renames that replace iter-N by a new one of its iteration
    tiny_config.out = str(tmp_path / "run")
    tiny_config.max_iters = 2
    Engine(tiny_config).run(Collector())  # its final snapshot: iter-2
    snapshots = tmp_path / "run" / "snapshots"
    (snapshots / "iter-2").rename(snapshots / ".replaced-iter-2")
    shutil.copytree(snapshots / ".replaced-iter-2", snapshots / ".partial-iter-2")
    # no process.json: whether a run is writing the folder cannot be told, so it is not touched
    with pytest.raises(UserError, match=r"moved aside to \.replaced-iter-2 while being replaced"):
        Engine(build_config({"resume": snapshots / "iter-2", "max_iters": 3}))
    write_process(tmp_path / "run", dead_pid())  # as the killed front end left it
    engine = Engine(build_config({"resume": snapshots / "iter-2", "max_iters": 3}))
    engine.run(Collector())
    assert sorted(path.name for path in snapshots.iterdir()) == ["iter-2", "iter-3"]
    assert json.loads((snapshots / "iter-2" / "state.json").read_text())["iteration"] == 2


@pytest.mark.parametrize(
    "content",
    [
        b"[]",
        b"\xff\xfe{",
        b'{"model": 5}',
        b'{"lr": "fast"}',
        b'{"evals": [1]}',
        b'{"eval_tokens": "all"}',
        b'{"max_iters": true}',
    ],
)
def test_a_damaged_run_config_is_one_line_when_resuming(tmp_path, content: bytes) -> None:
    run = tmp_path / "run"
    (run / "snapshots" / "iter-1").mkdir(parents=True)
    (run / "config.json").write_bytes(content)
    with pytest.raises(UserError, match=r"config.json is not a valid run config"):
        build_config({"resume": run / "snapshots" / "iter-1", "max_iters": 3})


def test_a_resume_goes_on_counting_the_streak_towards_a_collapse(tiny_config, tmp_path):
    # two looping iterations before the snapshot, patience 3: the first resumed one is the third
    tiny_config.out = str(tmp_path / "run")
    tiny_config.max_iters = 2
    tiny_config.gen_tokens = 100
    engine = Engine(tiny_config)
    engine.load()
    engine.inference = RepeatingInference(engine.model, tiny_config.block, 1.0, 50)
    engine.run(Collector())
    assert (
        json.loads((tmp_path / "run" / "snapshots" / "iter-2" / "state.json").read_text())["collapse_streak"]
        == 2
    )
    resumed = Engine(build_config({"resume": tmp_path / "run" / "snapshots" / "iter-2", "max_iters": 6}))
    resumed.load()
    resumed.inference = RepeatingInference(resumed.model, tiny_config.block, 1.0, 50)
    summary = resumed.run(Collector())
    assert summary["collapsed_at"] == 2 and summary["iterations"] == 3


def test_resume_given_the_run_folder_names_its_newest_snapshot(tiny_config, tmp_path):
    abandon_a_branch(tiny_config, tmp_path)
    newest = tmp_path / "run" / "snapshots" / "iter-3"  # not iter-4: that one a resume abandoned
    with pytest.raises(UserError, match=f"not the run {tmp_path / 'run'}; its newest is {newest}$"):
        build_config({"resume": tmp_path / "run", "max_iters": 6})


@pytest.mark.parametrize(
    ("damaged", "how"),
    [
        ("optimizer.pt", "cut"),
        ("rng.pt", "cut"),
        ("rng.pt", "wrong states"),
        ("state.json", "no lr"),
        ("state.json", "a streak of x"),
    ],
)
def test_a_snapshot_with_a_damaged_state_file_is_one_line_and_leaves_the_run_as_it_was(
    tiny_config, tmp_path, damaged: str, how: str
):
    tiny_config.out = str(tmp_path / "run")
    tiny_config.max_iters = 2
    Engine(tiny_config).run(Collector())
    run = tmp_path / "run"
    state_file = run / "snapshots" / "iter-2" / damaged
    if how == "cut":
        state_file.write_bytes(state_file.read_bytes()[:100])  # cut short, as by a full disk
    elif how == "wrong states":
        torch.save({"python": (), "torch": torch.zeros(3), "sampler": torch.zeros(3)}, state_file)
    else:
        state = json.loads(state_file.read_text())
        state.pop("lr") if how == "no lr" else state.update(collapse_streak="x")
        state_file.write_text(json.dumps(state))
    before = {name: (run / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "events.jsonl")}
    engine = Engine(build_config({"resume": run / "snapshots" / "iter-2", "max_iters": 4}))
    with pytest.raises(UserError, match=f"iter-2: its {damaged} cannot be read"):
        engine.run(Collector())
    assert {name: (run / name).read_bytes() for name in before} == before  # still the finished run


def test_an_abandoned_snapshot_is_refused_as_such_whatever_max_iters_says(tiny_config, tmp_path):
    abandon_a_branch(tiny_config, tmp_path)
    with pytest.raises(UserError, match="a later resume abandoned"):  # not "give a larger --max-iters"
        build_config({"resume": tmp_path / "run" / "snapshots" / "iter-4", "max_iters": 4})


def test_a_resume_whose_run_lost_its_records_or_its_config_says_which(tiny_config, tmp_path):
    """It blamed "a later resume" that never was, and pointed at the very snapshot it refused; a missing
    config.json read as "not a snapshot folder" of a path of just that shape."""
    tiny_config.out = str(tmp_path / "run")
    tiny_config.max_iters = 3
    Engine(tiny_config).run(Collector())
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:1]))
    with pytest.raises(UserError, match=r"the run's metrics.jsonl holds 1: the run's records were cut short"):
        Engine(build_config({"resume": run / "snapshots" / "iter-3", "max_iters": 5})).run(Collector())
    with pytest.raises(UserError, match=r"iter-9: there is no such folder"):
        build_config({"resume": run / "snapshots" / "iter-9", "max_iters": 5})
    (run / "config.json").unlink()
    with pytest.raises(UserError, match=r"iter-3: its run's config.json \(.*\) is not there"):
        build_config({"resume": run / "snapshots" / "iter-3", "max_iters": 5})


def abandon_a_branch(tiny_config, tmp_path) -> None:
    """A run to iteration 4 with snapshots iter-2 and iter-4, resumed from iter-2 to 3: iter-4 abandoned."""
    tiny_config.out = str(tmp_path / "run")
    tiny_config.max_iters = 4
    tiny_config.snapshot_every = 2
    Engine(tiny_config).run(Collector())
    Engine(build_config({"resume": tmp_path / "run" / "snapshots" / "iter-2", "max_iters": 3})).run()


@pytest.mark.parametrize("hidden", [".partial-iter-2", ".replaced-iter-2"])
def test_a_snapshot_left_half_saved_or_moved_aside_is_not_resumed_from(tiny_config, tmp_path, hidden):
    """A resume clears such folders as it starts: resumed from, its weights would be gone with them."""
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)
    left = snapshot.rename(snapshot.with_name(hidden))
    said = (
        "may be incomplete; resume from a snapshots/iter-N"
        if "partial" in hidden
        else "--resume .*iter-2 \\(it is put back"
    )
    with pytest.raises(UserError, match=said):
        Engine(build_config({"resume": left, "max_iters": 4}))
    assert (left / "state.json").exists()


def test_a_resume_stopped_before_its_first_iteration_leaves_the_run_as_it_stood(tiny_config, tmp_path):
    """Resumed from iter-2 by mistake and stopped at once: iterations 2..3 and iter-4 are not abandoned."""
    tiny_config.out, tiny_config.max_iters, tiny_config.snapshot_every = str(tmp_path / "run"), 4, 2
    Engine(tiny_config).run(Collector())
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("events.jsonl", "metrics.jsonl", "summary.json")}
    engine = Engine(build_config({"resume": run / "snapshots" / "iter-2", "max_iters": 4}))
    # a Ctrl-C (or q) as the resume is announced, before its first iteration
    listener = Reacting(
        when=lambda event: event.event == "resumed_from", act=lambda: engine.controls.stop("SIGINT")
    )
    summary = engine.run(listener)
    assert [e.event for e in listener.events] == ["resumed_from", "start", "stop"]  # the screen heard it
    assert summary["unchanged"] and summary["status"] == "stopped" and engine.left_as_it_stood
    assert {name: (run / name).read_bytes() for name in before} == before
    # the newest snapshot still goes on, and the run reads as it did
    resumed = Engine(build_config({"resume": run / "snapshots" / "iter-4", "max_iters": 5}))
    assert [r.iteration for r in resumed.resumed_records] == [0, 1, 2, 3]
    assert read_run(run).status == "finished"


def test_a_resume_writes_what_it_held_back_before_its_first_record(tiny_config, tmp_path):
    tiny_config.out, tiny_config.max_iters, tiny_config.snapshot_every = str(tmp_path / "run"), 4, 2
    Engine(tiny_config).run(Collector())
    run = tmp_path / "run"
    engine = Engine(build_config({"resume": run / "snapshots" / "iter-2", "max_iters": 3}))
    engine.run(Collector())
    assert not engine.left_as_it_stood
    rows = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [(r["event"], r["iteration"]) for r in rows[-4:]] == [
        ("resumed_from", 2),
        ("start", 2),
        ("snapshot", 3),
        ("stop", 3),
    ]
    assert [r.iteration for r in read_run(run).records] == [0, 1, 2]
    resumed_at = next(r["time"] for r in rows if r["event"] == "resumed_from")
    third = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert third["iteration"] == 2 and third["time"] > resumed_at
    assert json.loads((run / "summary.json").read_text())["iterations"] == 3


def test_a_run_of_an_earlier_version_is_resumed_reading_special_tokens_as_it_did(tiny_config, tmp_path):
    """Its evaluation file holds a written-out <|endoftext|>, which it read as the token: resumed, it
    still does (same windows, same split_tokens), and its empty prompt's end-of-text is read back as text."""
    held = tmp_path / "held.txt"
    held.write_text(Path(tiny_config.evals[0]).read_text().replace(". ", ". <|endoftext|>", 40))
    tiny_config.evals, tiny_config.prompt, tiny_config.text_reading = [str(held)], "", 1
    snapshot = stopped_run_with_snapshot(tiny_config, tmp_path)
    config_path = tmp_path / "run" / "config.json"
    saved = json.loads(config_path.read_text())
    assert saved["text_reading"] == 1
    del saved["text_reading"]  # as a run written before the key was kept
    config_path.write_text(json.dumps(saved))
    config = build_config({"resume": snapshot, "max_iters": 3})
    assert config.text_reading == 1
    engine = Engine(config)
    engine.run(Collector())  # the split_tokens check passes: the file reads as it did
    assert engine.special_start == 0
    assert engine.tokenizer.eos_token_id in engine.eval_sets[0].windows.flatten().tolist()
    new = Engine(replace(config, resume=None, out=str(tmp_path / "new"), text_reading=2))
    new.load()
    assert new.special_start == 1
    assert new.tokenizer.eos_token_id not in new.eval_sets[0].windows.flatten().tolist()


def test_a_resume_that_fails_while_generation_is_prepared_leaves_the_run_as_it_stood(
    tiny_config, tmp_path, monkeypatch
):
    """On a GPU, capturing generation comes after the folder is opened (and may run out of memory)."""
    import collapse_tui.engine as engine_module

    tiny_config.out, tiny_config.max_iters, tiny_config.snapshot_every = str(tmp_path / "run"), 4, 2
    Engine(tiny_config).run(Collector())
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("events.jsonl", "metrics.jsonl", "summary.json")}
    real = engine_module.make_inference

    def capture_that_fails(*args, **kwargs):
        inference = real(*args, **kwargs)
        inference.preparing = "capturing generation"

        def prepare(*_args, **_kwargs):
            raise RuntimeError("CUDA out of memory while capturing")

        inference.prepare = prepare
        return inference

    monkeypatch.setattr(engine_module, "make_inference", capture_that_fails)
    with pytest.raises(RuntimeError, match="while capturing"):
        Engine(build_config({"resume": run / "snapshots" / "iter-2", "max_iters": 4})).run(Collector())
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_snapshot_asked_for_before_a_resumes_first_iteration_leaves_the_runs_own_as_it_is(
    tiny_config, tmp_path
):
    """Resumed from iter-2 with a new --lr, s pressed, then stopped: iter-2 keeps the rate its run had."""
    tiny_config.out, tiny_config.max_iters, tiny_config.snapshot_every = str(tmp_path / "run"), 4, 2
    Engine(tiny_config).run(Collector())
    state = tmp_path / "run" / "snapshots" / "iter-2" / "state.json"
    before = state.read_bytes()
    options = {"resume": state.parent, "max_iters": 4, "lr": 5e-3}
    engine = Engine(build_config(options), resume_lr=resume_lr(options))

    def snapshot_then_stop() -> None:
        engine.controls.request_snapshot()
        engine.controls.stop()

    listener = Reacting(when=lambda event: event.event == "start", act=snapshot_then_stop)
    assert engine.run(listener)["unchanged"]
    assert state.read_bytes() == before
    snapshot = next(e for e in listener.events if e.event == "snapshot")
    assert snapshot.data.get("again")  # said as saved already: the run's own, as it stands
