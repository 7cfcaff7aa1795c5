"""The engine on a tiny model: the update, the controls, snapshots, the exact semantics."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import stat
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from collapse_tui import engine as engine_module
from collapse_tui.config import RunConfig
from collapse_tui.engine import INTERRUPTED_SNAPSHOT, Engine
from collapse_tui.errors import RunInterrupted
from collapse_tui.inference import EagerInference, sequence_windows
from collapse_tui.records import Event, IterationRecord
from collapse_tui.runfolder import read_run, read_summary
from collapse_tui.sampling import sample_next


class Collector:
    """A listener that keeps everything and lets a test react to records."""

    def __init__(self, on_record=None) -> None:
        self.records: list[IterationRecord] = []
        self.events: list[Event] = []
        self.statuses: list[str] = []
        self._on_record = on_record

    def on_status(self, message: str, fraction: float | None = None) -> None:
        self.statuses.append(message)

    def on_record(self, record: IterationRecord) -> None:
        self.records.append(record)
        if self._on_record:
            self._on_record(record)

    def on_event(self, event: Event) -> None:
        self.events.append(event)


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_step_changes_the_weights(tiny_config: RunConfig) -> None:
    engine = Engine(tiny_config)
    engine.load()
    before = parameters(engine.model)
    engine.step()
    after = parameters(engine.model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before)


def test_a_run_makes_its_device_current_in_whichever_thread_drives_it(
    tiny_config: RunConfig, monkeypatch
) -> None:
    """Kernels launch on the thread's current CUDA device, cuda:0 in every new thread: a run on cuda:1
    crashed at its first Triton launch. The engine's entry points make the run's device current
    (``modeling.on_device``; tests/test_fast_gpu.py runs it on a second GPU where there is one)."""
    entered: list[tuple[torch.device, str]] = []
    real_on_device = engine_module.on_device

    def recording_on_device(device: torch.device):
        entered.append((device, threading.current_thread().name))
        return real_on_device(device)

    monkeypatch.setattr(engine_module, "on_device", recording_on_device)
    tiny_config.max_iters = 2
    engine = Engine(tiny_config)
    worker = threading.Thread(target=engine.run, name="worker")
    worker.start()
    worker.join()
    # run, and load, the steps and the final snapshot inside it: each in the thread that drives the run
    assert set(entered) == {(engine.device, "worker")}


def test_loading_says_when_the_model_is_downloaded_first(tiny_config: RunConfig, monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "needs_download", lambda model: True)  # a hub id not cached yet
    listener = Collector()
    Engine(tiny_config).load(listener)
    assert listener.statuses[0] == f"downloading model {tiny_config.model} from the hub (the first time only)"
    monkeypatch.setattr(engine_module, "needs_download", lambda model: False)
    listener = Collector()
    tiny_config.out = str(Path(tiny_config.out).with_name("again"))
    Engine(tiny_config).load(listener)
    assert listener.statuses[0] == f"loading model {tiny_config.model}"


def test_first_adam_step_moves_a_bias_by_the_learning_rate(tiny_config: RunConfig) -> None:
    # AdamW's first step is lr * g / (|g| + eps) ≈ lr * sign(g); biases have no weight decay.
    engine = Engine(tiny_config)
    engine.load()
    bias = engine.model.transformer.h[0].ln_1.bias
    before = bias.detach().clone()
    engine.step()
    moved = (bias.detach() - before).abs()
    assert moved.max().item() == pytest.approx(tiny_config.lr, rel=1e-3)


def test_lr_change_applies_from_the_next_iteration_and_not_before(tiny_config: RunConfig) -> None:
    tiny_config.max_iters = 3
    engine = Engine(tiny_config)
    moves: list[float] = []
    bias_before: list[torch.Tensor] = []

    def on_record(record: IterationRecord) -> None:
        bias = engine.model.transformer.h[0].ln_1.bias.detach().clone()
        if bias_before:
            moves.append((bias - bias_before[-1]).abs().max().item())
        bias_before.append(bias)
        if record.iteration == 0:
            engine.controls.set_lr(tiny_config.lr * 2)  # asked for after iteration 0's step

    listener = Collector(on_record)
    engine.run(listener)
    assert [r.lr for r in listener.records] == [1e-3, 2e-3, 2e-3]
    lr_events = [e for e in listener.events if e.event == "lr"]
    assert len(lr_events) == 1
    assert lr_events[0].iteration == 1
    assert lr_events[0].data == {"lr": 2e-3, "old_lr": 1e-3}
    # Iteration 1's Adam step is sized by the new rate (second steps are ≲ lr).
    assert 1e-3 < moves[0] <= 2e-3 * 1.01


def test_a_periodic_snapshot_holds_an_lr_asked_for_during_the_iteration_before_it(
    tiny_config: RunConfig,
) -> None:
    """Resumed from iter-1 after a kill in iteration 1, the run goes on at the rate iteration 1 ran at."""
    tiny_config.max_iters, tiny_config.snapshot_every = 2, 1
    engine = Engine(tiny_config)

    def ask(record: IterationRecord) -> None:
        if record.iteration == 0:
            engine.controls.set_lr(tiny_config.lr * 2)
            engine.controls.request_snapshot()  # and an s: one snapshot at the boundary, not two

    engine.run(Collector(ask))
    state = json.loads((Path(tiny_config.out) / "snapshots" / "iter-1" / "state.json").read_text())
    assert state["lr"] == 2e-3
    events = [(e.event, e.iteration) for e in read_run(Path(tiny_config.out)).events]
    assert events.index(("lr", 1)) < events.index(("snapshot", 1))
    assert events.count(("snapshot", 1)) == 1


def test_an_lr_asked_for_mid_iteration_waits_for_the_next_one(tiny_config: RunConfig) -> None:
    """A change that arrives while iteration 1 generates leaves iteration 1's step alone."""
    tiny_config.max_iters = 3
    engine = Engine(tiny_config)
    engine.load()
    generate = engine.inference.generate

    def generate_then_ask(*args, **kwargs):
        if engine.iteration == 1:
            engine.controls.set_lr(tiny_config.lr * 2)  # asked for while iteration 1 is in flight
        return generate(*args, **kwargs)

    engine.inference.generate = generate_then_ask
    seen: list[float] = []
    engine.run(Collector(lambda record: seen.append(engine.optimizer.param_groups[0]["lr"])))
    assert seen == [1e-3, 1e-3, 2e-3]  # the rate of each iteration's step, read as it was recorded
    lr_events = [e for e in read_run(Path(tiny_config.out)).events if e.event == "lr"]
    assert [(e.iteration, e.data["lr"]) for e in lr_events] == [(2, 2e-3)]


def test_pause_stops_iterations_and_resume_continues(tiny_config: RunConfig) -> None:
    tiny_config.max_iters = 1000
    engine = Engine(tiny_config)
    listener = Collector()
    thread = threading.Thread(target=engine.run, args=(listener,))
    thread.start()
    try:
        wait_until(lambda: len(listener.records) >= 1)
        engine.controls.pause()
        wait_until(lambda: any(e.event == "pause" for e in listener.events))
        count = len(listener.records)
        time.sleep(0.5)
        assert len(listener.records) == count
        engine.controls.resume()
        wait_until(lambda: len(listener.records) >= count + 2)
        assert any(e.event == "resume" for e in listener.events)
    finally:
        engine.controls.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    run = read_run(Path(tiny_config.out))
    assert run.summary is not None
    assert run.summary["status"] == "stopped"
    assert run.events[-1].event == "stop"


def test_a_snapshot_loads_back_with_the_same_logits(tiny_config: RunConfig) -> None:
    tiny_config.max_iters = 2
    engine = Engine(tiny_config)
    listener = Collector(lambda record: engine.controls.request_snapshot() if record.iteration == 0 else None)
    engine.run(listener)
    path = Path(tiny_config.out) / "snapshots" / "iter-1"
    assert any(e.event == "snapshot" and e.data["path"] == str(path) for e in listener.events)
    assert (path / "sample.txt").read_bytes().decode() == listener.records[0].text
    assert {"optimizer.pt", "rng.pt", "state.json", "config.json"} <= {p.name for p in path.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(path)
    probe = torch.arange(12)[None]
    # the engine's model has since taken iteration 1's step: rebuild θ_1 from the snapshot of a rerun
    rerun_config = copy.deepcopy(tiny_config)
    rerun_config.out = str(Path(tiny_config.out).parent / "rerun")
    rerun_config.max_iters = 1
    rerun = Engine(rerun_config)
    rerun.run()
    with torch.no_grad():
        assert torch.allclose(loaded(probe).logits, rerun.model(probe).logits, atol=1e-6)


def test_a_snapshots_weights_are_as_readable_as_its_other_files(tiny_config: RunConfig) -> None:
    """safetensors writes 0600: a colleague on a shared machine could read all of a snapshot but its
    weights, and could not take it as --model."""
    tiny_config.max_iters = 1
    umask = os.umask(0o027)
    try:
        Engine(tiny_config).run()
    finally:
        os.umask(umask)
    path = Path(tiny_config.out) / "snapshots" / "iter-1"
    weights = list(path.glob("*.safetensors"))
    assert weights and {w.stat().st_mode & 0o777 for w in weights} == {0o640}
    assert (path / "config.json").stat().st_mode & 0o777 == 0o640


def test_a_filesystem_that_takes_no_chmod_still_takes_snapshots(tiny_config: RunConfig, monkeypatch) -> None:
    """The weights' permissions are a courtesy: some FUSE and CIFS mounts refuse chmod, and a snapshot
    must not fail for it."""
    tiny_config.max_iters = 1

    def refused(self: Path, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "chmod", refused)
    summary = Engine(tiny_config).run()
    assert "final_snapshot_failed" not in summary
    assert (Path(tiny_config.out) / "snapshots" / "iter-1" / "model.safetensors").is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_a_snapshot_is_on_disk_before_it_is_renamed_into_place(tiny_config: RunConfig, monkeypatch) -> None:
    """A power cut after the rename must not leave an ``iter-N`` whose files were never written."""
    log: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(descriptor: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def rename(source, target) -> None:
        log.append(("rename", str(Path(source).resolve())))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    tiny_config.max_iters = 1
    Engine(tiny_config).run()  # its final snapshot, iter-1
    snapshots = (Path(tiny_config.out) / "snapshots").resolve()
    partial = str(snapshots / ".partial-iter-1")
    renamed = log.index(("rename", partial))
    synced = {path for kind, path in log[:renamed] if kind == "fsync"}
    final = snapshots / "iter-1"
    files = {str(Path(partial) / p.relative_to(final)) for p in final.rglob("*") if p.is_file()}
    assert files and files <= synced
    assert partial in synced  # the folder's entries too
    assert ("fsync", str(snapshots)) in log[renamed:]  # and the rename itself


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_a_filesystem_that_cannot_sync_folders_still_takes_snapshots(
    tiny_config: RunConfig, monkeypatch
) -> None:
    """Some network and FUSE filesystems refuse fsync on a folder (EINVAL): not a failed snapshot.
    A file that cannot be put on disk (EIO) is one."""
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        if failing_files and ".partial-iter-" in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(descriptor)

    failing_files: list[bool] = []
    monkeypatch.setattr(os, "fsync", fsync)
    tiny_config.max_iters = 2
    engine = Engine(tiny_config)

    def on_record(record: IterationRecord) -> None:
        if record.iteration == 0:
            engine.controls.request_snapshot()  # iter-1: folders refuse fsync, files do not
        else:
            failing_files.append(True)  # the final snapshot, iter-2: a file cannot be put on disk

    listener = Collector(on_record)
    engine.run(listener)
    kinds = [(e.event, e.iteration) for e in listener.events if e.event.startswith("snapshot")]
    assert kinds == [("snapshot", 1), ("snapshot_failed", 2)]
    snapshots = Path(tiny_config.out) / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["iter-1"]


def test_a_second_ctrl_c_during_the_final_snapshot_leaves_the_runs_end_and_no_partial_files(
    tiny_config: RunConfig,
) -> None:
    tiny_config.max_iters = 2
    engine = Engine(tiny_config)
    engine.load()

    def interrupted(*args, **kwargs) -> None:  # the model's files are written by now
        raise KeyboardInterrupt

    engine.tokenizer.save_pretrained = interrupted
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    summary = read_summary(Path(tiny_config.out))
    assert summary is not None and "ending" not in summary
    assert (summary["status"], summary["reason"]) == ("finished", "max_iters")  # both iterations were done
    assert summary["final_snapshot_failed"] == INTERRUPTED_SNAPSHOT
    assert list((Path(tiny_config.out) / "snapshots").iterdir()) == []  # no hidden .partial-iter-2
    # and a watcher is told: the event comes before the stop, with the same words as the summary
    events = read_run(Path(tiny_config.out)).events
    assert [(e.event, e.data.get("final")) for e in events[-2:]] == [
        ("snapshot_failed", True),
        ("stop", None),
    ]
    assert events[-2].data["message"] == INTERRUPTED_SNAPSHOT


@pytest.mark.parametrize("train_on", ["text", "ids"])
def test_gen_loss_and_validation_loss_equal_a_direct_computation(
    tiny_config: RunConfig, train_on: str
) -> None:
    tiny_config.train_on = train_on
    engine = Engine(tiny_config)
    engine.load()
    theta0 = copy.deepcopy(engine.model)
    sampler_state = engine.sampler.get_state()
    record = engine.step()

    generator = torch.Generator().manual_seed(0)
    generator.set_state(sampler_state)
    inference = EagerInference(theta0, tiny_config.block, tiny_config.temperature, tiny_config.top_k)
    ids = inference.generate(engine.prompt_ids, tiny_config.gen_tokens, generator)
    assert engine.tokenizer.decode(ids[len(engine.prompt_ids) :]) == record.text

    def direct_loss(windows: list[list[int]]) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for window in windows:
                x = torch.tensor(window[:-1])[None]
                logits = theta0(x).logits[0]
                total += F.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
                count += len(window) - 1
        return total / count

    block = tiny_config.block
    if train_on == "text":  # the paper's "train" loss: on the sample's text, tokenized again
        text = engine.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        reads = engine.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert reads != ids  # this sample reads back otherwise, so the two cases differ here
        ids = reads
    gen_windows = [ids[i : i + block + 1] for i in range(0, len(ids) - 1, block)]
    assert record.gen_loss == pytest.approx(direct_loss(gen_windows), rel=1e-5)
    windows = engine.eval_sets[0].windows.tolist()
    assert record.valid["heldout"] == pytest.approx(direct_loss(windows), rel=1e-5)


def test_evaluation_windows_are_spread_evenly_over_the_split(tiny_config: RunConfig) -> None:
    engine = Engine(tiny_config)
    engine.load()
    evalset = engine.eval_sets[0]
    assert evalset.windows.shape == (tiny_config.eval_tokens // tiny_config.block, tiny_config.block + 1)
    from collapse_tui.data import tokenize

    ids = tokenize(engine.tokenizer, Path(tiny_config.evals[0]).read_text())
    assert evalset.windows[0].tolist() == ids[: tiny_config.block + 1]
    assert evalset.windows[-1].tolist() == ids[-(tiny_config.block + 1) :]


def test_sliding_window_generates_what_an_explicit_last_block_loop_generates(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    block, gen, prompt = 8, 30, [5, 6]
    ids = EagerInference(model, block, 1.0, 20).generate(prompt, gen, torch.Generator().manual_seed(3))

    generator = torch.Generator().manual_seed(3)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(gen):
            window = torch.tensor(seq[-block:])[None]  # positions restart at 0 for the window
            logits = model(window).logits[:, -1]
            seq.append(int(sample_next(logits, 1.0, 20, generator)[0]))
    assert ids == seq


def test_sequence_windows_cover_every_target_once() -> None:
    groups = sequence_windows(list(range(11)), 4)
    assert [g.tolist() for g in groups] == [[[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]], [[8, 9, 10]]]


def test_top_k_sampling_never_leaves_the_top_k_and_follows_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(20000, 1)
    draws = sample_next(logits, 1.0, 3, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), 0)
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], expected, atol=0.015)


class RepeatingInference(EagerInference):
    """Generates the same four tokens over and over: a collapsed model, on demand."""

    def generate(self, prompt_ids, gen_tokens, generator, should_stop=lambda: False):
        return list(prompt_ids) + [10, 11, 12, 13] * (gen_tokens // 4) + [10] * (gen_tokens % 4)


@pytest.mark.parametrize("keep_going", [False, True])
def test_collapse_is_recorded_and_stops_the_run_unless_told_to_keep_going(
    tiny_config: RunConfig, keep_going: bool
) -> None:
    tiny_config.max_iters = 6
    tiny_config.gen_tokens = 100  # rep4 = 1 - 4/97 ≈ 0.96
    tiny_config.keep_going = keep_going
    engine = Engine(tiny_config)
    engine.load()
    engine.inference = RepeatingInference(engine.model, tiny_config.block, 1.0, 50)
    listener = Collector()
    summary = engine.run(listener)
    collapses = [e for e in listener.events if e.event == "collapse"]
    assert len(collapses) == 1
    assert collapses[0].data["at"] == 2  # patience 3: iterations 0, 1, 2
    assert [r.collapsed for r in listener.records][:3] == [False, False, True]
    assert len(listener.records) == (6 if keep_going else 3)
    assert summary["status"] == "collapsed"
    assert summary["collapsed_at"] == 2
    # the recorded metrics are the sample's own (not the prompt's too), worked out by hand:
    # 100 tokens of "10 11 12 13" over and over have 97 4-grams, 4 of them unique
    record = listener.records[0]
    assert record.rep4 == pytest.approx(1 - 4 / 97)
    assert (record.distinct1, record.unique_tokens) == (pytest.approx(4 / 100), 4)
    raw = record.text.encode()
    assert record.compression_ratio == pytest.approx(len(raw) / len(zlib.compress(raw, 9)))
    assert record.compression_ratio > 5  # the text of 25 repeats, not of the prompt alone


class NanInference(EagerInference):
    def loss_sum(self, windows):
        return float("nan"), 1


def test_a_nan_loss_stops_the_run_cleanly_with_its_data_kept(tiny_config: RunConfig) -> None:
    engine = Engine(tiny_config)
    engine.load()
    weights = parameters(engine.model)
    engine.inference = NanInference(engine.model, tiny_config.block, 1.0, 50)
    summary = engine.run(Collector())
    run = read_run(Path(tiny_config.out))
    assert summary["reason"] == "non-finite loss"
    assert len(run.records) == 1 and math.isnan(run.records[0].gen_loss)
    # no final snapshot: the weights it would hold are the ones that gave the non-finite loss
    assert [e.event for e in run.events][-2:] == ["error", "stop"]
    assert run.events[-2].iteration == 0  # the iteration whose loss it was, not the next
    assert all(torch.equal(weights[n], p) for n, p in engine.model.named_parameters())


def test_stop_mid_generation_discards_the_iteration_in_flight(tiny_config: RunConfig) -> None:
    tiny_config.gen_tokens = 100_000  # far longer than the test would wait for
    tiny_config.max_iters = 1
    engine = Engine(tiny_config)
    listener = Collector()
    thread = threading.Thread(target=engine.run, args=(listener,))
    thread.start()
    wait_until(lambda: any(e.event == "start" for e in listener.events))
    engine.controls.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert listener.records == []
    assert read_run(Path(tiny_config.out)).summary["status"] == "stopped"


def test_a_run_stopped_before_its_first_iteration_saves_no_final_snapshot(tiny_config: RunConfig) -> None:
    engine = Engine(tiny_config)
    engine.controls.stop()  # q while the model was loading
    summary = engine.run(Collector())
    run = read_run(Path(tiny_config.out))
    assert summary["status"] == "stopped" and [e.event for e in run.events] == ["start", "stop"]
    assert not (Path(tiny_config.out) / "snapshots").exists()


def test_the_summary_is_on_disk_before_the_final_snapshot_starts(tiny_config: RunConfig) -> None:
    """A kill during a large model's final snapshot still leaves a folder that says how the run ended."""
    tiny_config.max_iters = 2
    engine = Engine(tiny_config)
    engine.load()
    on_disk = []
    real_snapshot = engine.snapshot

    def snapshot():  # what a SIGKILL at this moment would leave
        on_disk.append(read_run(Path(tiny_config.out)).current_summary)
        return real_snapshot()

    engine.snapshot = snapshot
    summary = engine.run(Collector())
    assert len(on_disk) == 1 and on_disk[0] is not None
    assert (on_disk[0]["status"], on_disk[0]["iterations"]) == (summary["status"], 2)
    assert read_summary(Path(tiny_config.out)) == summary


def test_a_snapshot_asked_for_just_before_a_quit_mid_iteration_is_saved(tiny_config: RunConfig) -> None:
    engine = Engine(tiny_config)
    engine.load()

    def quit_mid_generation(*args, **kwargs):  # s, then q, while the first sample is being generated
        engine.controls.request_snapshot()
        engine.controls.stop()
        raise RunInterrupted

    engine.inference.generate = quit_mid_generation
    summary = engine.run(Collector())
    run = read_run(Path(tiny_config.out))
    assert summary["status"] == "stopped" and run.records == []
    assert [e.event for e in run.events][-2:] == ["snapshot", "stop"]
    assert (Path(tiny_config.out) / "snapshots" / "iter-0" / "state.json").is_file()


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), RuntimeError("No space left on device")]
)
def test_a_snapshot_that_fails_on_a_full_disk_is_reported_and_the_run_goes_on(
    tiny_config: RunConfig, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    tiny_config.max_iters = 2
    engine = Engine(tiny_config)
    engine.load()

    def disk_full(*args, **kwargs):  # torch.save raises RuntimeError on ENOSPC, the OS an OSError
        raise error

    monkeypatch.setattr(engine.model, "save_pretrained", disk_full)
    summary = engine.run(
        Collector(lambda r: engine.controls.request_snapshot() if r.iteration == 0 else None)
    )
    run = read_run(Path(tiny_config.out))
    assert summary["status"] == "finished" and len(run.records) == 2
    failed = [e for e in run.events if e.event == "snapshot_failed"]  # the one asked for, the final one
    assert [e.iteration for e in failed] == [1, 2] and "No space left on device" in failed[0].data["message"]
    assert [bool(e.data.get("final")) for e in failed] == [False, True]  # a watcher is told of the end's
    assert "snapshot failed: " in failed[0].describe() and "No space left on device" in failed[0].describe()
    assert not (Path(tiny_config.out) / "snapshots").exists() or not any(
        (Path(tiny_config.out) / "snapshots").iterdir()
    )


def test_a_snapshot_write_cut_short_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch) -> None:
    import collapse_tui.engine as engine_module
    from collapse_tui.engine import snapshot_failure

    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=3 * 2**20))
    assert snapshot_failure(short_write, tmp_path) == (
        f"no space left on device (3 MiB free in {tmp_path}; RuntimeError: [enforce fail at "
        "inline_container.cc:672] . unexpected pos 576 vs 534)"
    )
    enospc = OSError(28, "No space left on device")
    assert snapshot_failure(enospc, tmp_path) == "[Errno 28] No space left on device"  # said already
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**30))
    monkeypatch.setattr(engine_module, "_file_size_limit", lambda: None)
    assert snapshot_failure(short_write, tmp_path).startswith("RuntimeError: [enforce fail")  # another cause
    monkeypatch.setattr(engine_module, "_file_size_limit", lambda: 100 * 2**20)  # ulimit -f 102400
    assert snapshot_failure(short_write, tmp_path) == (
        "a file may have passed this process's size limit (ulimit -f: 100 MiB; RuntimeError: [enforce fail "
        "at inline_container.cc:672] . unexpected pos 576 vs 534)"
    )


def test_a_stopped_and_resumed_run_equals_one_never_stopped(tiny_config: RunConfig, tmp_path: Path) -> None:
    tiny_config.max_iters = 4
    tiny_config.out = str(tmp_path / "straight")
    straight = Collector()
    Engine(tiny_config).run(straight)

    stopped = copy.deepcopy(tiny_config)
    stopped.out = str(tmp_path / "stopped")
    stopped.max_iters = 2
    first = Engine(stopped)
    first.run(Collector(lambda r: first.controls.request_snapshot() if r.iteration == 1 else None))

    resumed_config = copy.deepcopy(stopped)
    resumed_config.max_iters = 4
    resumed_config.resume = str(tmp_path / "stopped" / "snapshots" / "iter-2")
    resumed = Collector()
    Engine(resumed_config).run(resumed)

    assert [r.iteration for r in resumed.records] == [2, 3]
    for mine, theirs in zip(resumed.records, straight.records[2:], strict=True):
        assert mine.text == theirs.text
        assert mine.gen_loss == pytest.approx(theirs.gen_loss, rel=1e-6)
        assert mine.valid == pytest.approx(theirs.valid, rel=1e-6)
    run = read_run(tmp_path / "stopped")
    assert [r.iteration for r in run.records] == [0, 1, 2, 3]
    assert any(e.event == "resumed_from" for e in run.events)
    # the run's time, both processes' iterations: comparing runs' time to collapse must survive a resume
    assert run.summary is not None
    all_four = sum(sum(r.seconds.values()) for r in run.records)
    assert run.summary["iteration_seconds"] == pytest.approx(all_four, abs=2e-3)
    assert run.summary["iteration_seconds"] > sum(sum(r.seconds.values()) for r in resumed.records)


def test_a_failed_snapshot_leaves_the_one_already_in_its_place(
    tiny_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(tiny_config)
    engine.load()
    engine._take_snapshot()  # iter-0, as a resume would have found it

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.model, "save_pretrained", disk_full)
    engine._take_snapshot()
    assert (Path(tiny_config.out) / "snapshots" / "iter-0" / "state.json").is_file()
    assert [p.name for p in (Path(tiny_config.out) / "snapshots").iterdir()] == ["iter-0"]  # no partial left
    monkeypatch.undo()
    engine._take_snapshot()  # the same iteration again, whole: it replaces the one there
    assert [p.name for p in (Path(tiny_config.out) / "snapshots").iterdir()] == ["iter-0"]
    assert (Path(tiny_config.out) / "snapshots" / "iter-0" / "optimizer.pt").is_file()


def test_generation_is_prepared_while_loading_not_in_the_first_iteration(
    tiny_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inference that builds things (compiles, captures) does it under a status line before "ready"."""
    import collapse_tui.engine as engine_module

    calls: list[tuple[int, int]] = []

    class Preparing(EagerInference):
        preparing = "building the test's kernels"

        def prepare(self, prompt_len: int, gen_tokens: int) -> None:
            calls.append((prompt_len, gen_tokens))

    def make(model, config, device, autocast_dtype):
        return Preparing(model, config.block, config.temperature, config.top_k, autocast_dtype)

    monkeypatch.setattr(engine_module, "make_inference", make)
    engine, listener = Engine(tiny_config), Collector()
    engine.load(listener)
    assert calls == [(len(engine.prompt_ids), tiny_config.gen_tokens)]
    assert listener.statuses[-2:] == ["building the test's kernels", "ready"]


def test_eager_inference_has_nothing_to_prepare(tiny_config: RunConfig) -> None:
    engine, listener = Engine(tiny_config), Collector()
    engine.load(listener)
    assert listener.statuses[-2:] == ["preparing generation", "ready"]


def test_the_text_reads_back_canonically_and_an_end_of_text_as_its_literal(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from collapse_tui.inference import as_text_reads

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    canonical = tokenizer("The river city .\nThe king", add_special_tokens=False)["input_ids"]
    assert as_text_reads(tokenizer, canonical) == canonical  # text the tokenizer made reads the same
    # drawn one byte at a time, a word reads back as the tokenizer's own pieces
    spelled = [token for piece in tokenizer.convert_ids_to_tokens(canonical) for token in
               tokenizer.convert_tokens_to_ids(list(piece))]  # fmt: skip
    assert len(spelled) > len(canonical) and as_text_reads(tokenizer, spelled) == canonical
    # an end-of-text token drawn mid-sample reads back as the characters "<|endoftext|>" (encode_ordinary)
    eos = tokenizer.eos_token_id
    reads = as_text_reads(tokenizer, [*canonical, eos, *canonical])
    assert eos not in reads and len(reads) > 2 * len(canonical) + 1
    assert tokenizer.decode(reads) == tokenizer.decode([*canonical, eos, *canonical])
    # the special tokens a run started from stay tokens; what follows is read as text
    spelled_after_start = as_text_reads(tokenizer, [eos, *spelled], start=1)
    assert spelled_after_start == [eos, *canonical]


def test_an_empty_prompts_end_of_text_stays_a_token_when_the_sample_is_read_as_text(
    tiny_config: RunConfig,
) -> None:
    """The run starts from end-of-text, which the model did not draw: it is not scored as its characters."""
    tiny_config.prompt = ""
    engine = Engine(tiny_config)
    engine.load()
    eos = engine.tokenizer.eos_token_id
    assert engine.prompt_ids == [eos] and engine.special_start == 1
    losses: list[list[list[int]]] = []
    mean_losses = engine.inference.mean_losses
    engine.inference.mean_losses = lambda groups: (
        losses.append([g.tolist() for g in groups[0]]) or mean_losses(groups)
    )
    engine.step()
    first_window = losses[0][0][0]
    assert first_window[0] == eos
    literal = engine.tokenizer("<|endoftext|>", add_special_tokens=False, split_special_tokens=True)[
        "input_ids"
    ]
    assert first_window[1 : 1 + len(literal)] != literal


def test_a_prompt_starts_with_the_begin_token_where_the_tokenizer_puts_one(
    tiny_model_dir: Path, tiny_config: RunConfig, tmp_path: Path
) -> None:
    """Llama-2's, Mistral's and Gemma's tokenizers put a begin token before text, and their models
    generate from a prompt without it as from text they never saw. GPT-2's puts none: the paper's
    prompt is its text alone. Runs of earlier versions, resumed, go on as they were."""
    from dataclasses import replace

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    folder = tmp_path / "model-with-bos"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)]
    )
    tokenizer.save_pretrained(folder)
    text_ids = tokenizer("The river", add_special_tokens=False)["input_ids"]
    assert tokenizer("The river")["input_ids"] == [bos, *text_ids]

    runs = iter(range(10))

    def prompt_of(**changes) -> tuple[list[int], int]:
        changes = {"prompt": "The river", **changes}
        engine = Engine(replace(tiny_config, out=str(tmp_path / f"run{next(runs)}"), **changes))
        engine.load()
        return engine.prompt_ids, engine.special_start

    assert prompt_of(model=str(folder)) == ([bos, *text_ids], 1)  # the begin token stays a token
    typed = prompt_of(model=str(folder), prompt=f"{tokenizer.bos_token}The river")
    assert typed == ([bos, *text_ids], 1)  # typed with the begin token's text: it is there once
    assert prompt_of() == (text_ids, 0)  # the tiny GPT-2-style tokenizer puts none
    assert prompt_of(model=str(folder), text_reading=2) == (text_ids, 0)


def test_the_training_step_reads_the_sample_as_text(tiny_config: RunConfig) -> None:
    from collapse_tui.inference import as_text_reads

    engine = Engine(tiny_config)
    engine.load()
    windows: list[list[int]] = []
    step = engine.trainer.step
    engine.trainer.step = lambda window: windows.append(window.tolist()) or step(window)
    samples: list[list[int]] = []
    generate = engine.inference.generate
    engine.inference.generate = lambda *a, **k: samples.append(generate(*a, **k)) or samples[-1]
    engine.step()
    reads = as_text_reads(engine.tokenizer, samples[0])
    window = windows[0]
    assert len(window) == tiny_config.block + 1
    assert any(reads[i : i + len(window)] == window for i in range(len(reads)))


def test_seeds_that_share_their_low_32_bits_sample_differently() -> None:
    from collapse_tui.engine import torch_seed

    assert torch_seed(1337) == 1337  # the paper's seed, as its code gives it to torch
    draws = set()
    for seed in (1, 2**32 + 1, -(2**63) + 1, 2**63 + 1):
        generator = torch.Generator()
        generator.manual_seed(torch_seed(seed))
        draws.add(tuple(torch.randn(4, generator=generator).tolist()))
    assert len(draws) == 4
