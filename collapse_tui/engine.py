"""The self-training engine: the paper's loop, read top to bottom.

One iteration (DESIGN section 1), on the model θ_i:

1. generate ``gen_tokens`` tokens from the prompt (sliding ``block`` window);
2. evaluate θ_i before its update: loss on its own sample (``gen_loss``), loss
   on each held-out set, repetition metrics of the sample;
3. take one AdamW step on a random ``block``-token window of the sample;
4. record the iteration (run folder + listener).

The engine knows nothing of any user interface. Front ends call ``run`` with an
``EngineListener`` (the TUI in a worker thread, headless in its main thread,
where its signal handler's KeyboardInterrupt lands) and steer through
``self.controls``; every command applies at the next iteration boundary and is
recorded as an event, except a stop, which also cuts a generation in flight
short (that iteration is not recorded).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import platform
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec, TypeVar

import torch

from collapse_tui import __version__
from collapse_tui.config import (
    DEFAULT_RUNS_ROOT,
    HUB_SETS,
    RunConfig,
    absolute,
    claim_default_run_dir,
    missing_folders,
    model_name,
)
from collapse_tui.controls import RunControls
from collapse_tui.data import EvalSet, check_eval_specs, eval_set_name, load_eval_set, puts_bos_first
from collapse_tui.errors import RunInterrupted, UserError, in_one_line
from collapse_tui.follow import is_alive
from collapse_tui.inference import EagerInference, Inference, as_text_reads, sequence_windows
from collapse_tui.metrics import CollapseDetector, repetition_metrics
from collapse_tui.modeling import (
    load_model,
    needs_download,
    on_device,
    out_of_memory_error,
    resolve_autocast,
    resolve_device,
)
from collapse_tui.records import Event, IterationRecord, phase_seconds
from collapse_tui.runfolder import (
    CONFIG,
    ENDING_SNAPSHOT,
    METRICS,
    PARTIAL,
    REPLACED,
    RunFolder,
    RunWriter,
    check_new_run_folder,
    enclosing_run_folder,
    make_summary,
    partial_snapshot,
    read_run,
    replaced_snapshot,
    restore_replaced_snapshots,
    snapshot_iteration,
    sync_folder,
    sync_folder_entries,
)
from collapse_tui.source import EngineListener, NullListener, RunInfo
from collapse_tui.training import build_optimizer, load_optimizer_state, make_train_step

#: How long a paused engine sleeps between looks at its controls.
PAUSE_POLL_SECONDS = 0.2


#: ``final_snapshot_failed`` of a run whose final snapshot a second Ctrl-C cut short.
INTERRUPTED_SNAPSHOT = "interrupted before it was written (a second Ctrl-C)"


class SavedStates(NamedTuple):
    """What a snapshot's state.json and rng.pt hold, read and checked before a resume opens its folder."""

    iteration: int
    lr: float
    collapse_streak: int
    collapsed_at: int | None
    rngs: dict[str, Any]


class NonFiniteLoss(Exception):
    """A loss came out NaN or inf: the run stops cleanly, its data kept."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"non-finite loss at iteration {iteration}; the run stops here")
        #: The iteration whose record holds the loss (the event names it, not the next one).
        self.iteration = iteration


def make_inference(
    model: torch.nn.Module, config: RunConfig, device: torch.device, autocast_dtype: torch.dtype | None
) -> Inference:
    """The fastest generation path that keeps the semantics: the fast GPU path where supported."""
    if device.type == "cuda":
        try:
            from collapse_tui.fast import fast_inference_for
        except ImportError:
            fast_inference_for = None
        if fast_inference_for is not None:
            fast = fast_inference_for(
                model,
                block=config.block,
                temperature=config.temperature,
                top_k=config.top_k,
                autocast_dtype=autocast_dtype,
            )
            if fast is not None:
                return fast
    return EagerInference(model, config.block, config.temperature, config.top_k, autocast_dtype)


def torch_seed(seed: int) -> int:
    """The seed given to torch's generators: ``seed`` itself from 0 to 2³² − 1 (the paper's 1337 as
    its code gives it), any other folded into that range by a hash.

    Why: the CPU generator keeps only the low 32 bits of its seed, so
    ``--seed 1`` and ``--seed 4294967297`` sampled the same text.
    """
    if 0 <= seed < 2**32:
        return seed
    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:4], "little")


def _check_default_root(root: Path = DEFAULT_RUNS_ROOT) -> None:
    """A run given no --out goes into ``runs/`` here; not where that is inside a run's folder."""
    around = enclosing_run_folder(root / "new-run")
    if around is not None:
        raise UserError(
            f"the current folder is inside the run folder {around}, where a new run's default folder "
            f"({root}/…) would be lost to `runs`; start from another folder, or give --out"
        )


def _saved_lr(snapshot: Path | None) -> float | None:
    """The lr a snapshot saved (a key may have changed it since the run's config.json), read ahead of
    loading so that the screen shows it, and ``+`` and ``-`` start from it, from the first frame; None
    where it cannot be read (``_load_saved_states`` then says why, once loading gets there)."""
    if snapshot is None:
        return None
    try:
        lr = float(json.loads((snapshot / "state.json").read_text(encoding="utf-8"))["lr"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return lr if math.isfinite(lr) and lr > 0 else None


Params = ParamSpec("Params")
Result = TypeVar("Result")


def on_run_device(method: Callable[Params, Result]) -> Callable[Params, Result]:
    """Run an engine method with the run's device current in the calling thread (``modeling.on_device``).

    On the methods a front end calls (``load``, ``step``, ``run``, ``snapshot``), since
    any thread may drive the engine: the TUI's worker, headless's main thread, a test.
    """

    @functools.wraps(method)
    def with_run_device(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        engine = args[0]
        assert isinstance(engine, Engine)
        with on_device(engine.device):
            return method(*args, **kwargs)

    return with_run_device


class Engine:
    """One self-training run. Construct cheaply, then call ``run`` (blocking; the TUI's worker thread, headless's own).

    Constructing a new run with no ``--out`` makes its (default-named) folder,
    to claim the name (and ``runs/`` where there is none yet);
    ``follow.serving_watchers(..., made=engine.made_dirs)`` removes them again if
    the run never gets as far as its config.
    """

    def __init__(self, config: RunConfig, *, resume_lr: float | None = None) -> None:
        """``resume_lr``: a learning rate given with ``--resume``, applied from the first resumed iteration."""
        self.config = config
        self.controls = RunControls()
        self.device = resolve_device(config.device)
        self.autocast_dtype = resolve_autocast(config.dtype, self.device)
        check_eval_specs(config.evals)
        #: The folders this process made for the run (a default-named one and a new ``runs/``),
        #: innermost first: a start that fails removes them.
        self.made_dirs: list[Path] = []
        if config.resume:
            # absolute, as every path the run writes down: a summary's or event's path must still
            # name the same folder when read (or passed to --resume) from another working folder
            self.resume_dir: Path | None = absolute(config.resume)
            self.run_dir = self.resume_dir.parent.parent
            _check_snapshot(self.resume_dir)
            #: the run as it now stands, read once: checked here, its earlier records kept by ``_restore``
            self.resumed_records: list[IterationRecord] = records_on_current_branch(
                self.resume_dir, self.run_dir
            )
            if is_alive(self.run_dir):
                raise UserError(
                    f"--resume: the run in {self.run_dir} is still being written by another process"
                )
        else:
            self.resume_dir = None
            self.resumed_records = []
            if config.out:
                self.run_dir = absolute(config.out)
            else:
                _check_default_root()  # before a folder is made for it: a refusal leaves nothing behind
                new_root = missing_folders(absolute(DEFAULT_RUNS_ROOT))
                self.run_dir = absolute(claim_default_run_dir(config))
                self.made_dirs = [self.run_dir, *new_root]
            check_new_run_folder(self.run_dir)  # before loading; again, under the folder's lock, by RunWriter
        self.info = RunInfo(
            model=model_name(config.model),
            device=str(self.device),
            max_iters=config.max_iters,
            lr=_saved_lr(self.resume_dir) or config.lr,
            eval_names=[eval_set_name(spec) for spec in config.evals],
            collapse_threshold=config.collapse_threshold,
            collapse_patience=config.collapse_patience,
            keep_going=config.keep_going,
            run_dir=str(self.run_dir),
        )
        # State of the loop; the rest is set by ``load``.
        self.iteration = 0
        #: A resume's events, its ``resumed_from`` first, kept from the file until its first iteration
        #: is recorded (the listener hears them at once). Why: ``resumed_from`` abandons every later
        #: iteration and snapshot of the run; a resume that never did one (a Ctrl-C, the wrong
        #: snapshot given, a crash in its first iteration) must leave the run as it stood.
        self.held_events: list[Event] | None = None
        #: Set at the end of such a resume: it left the folder as it stood.
        self.unchanged = False
        self.lr = config.lr
        self.detector = CollapseDetector(config.collapse_threshold, config.collapse_patience)
        self.collapsed_at: int | None = None
        #: (iteration, lr) of the newest snapshot on disk (taken, or resumed from): one asked for again
        #: unchanged is not rewritten, and the final snapshot is not taken where it would be the same.
        self.snapshot_state: tuple[int, float] | None = None
        #: Why the final snapshot could not be written (a full disk), if it could not: the run's end
        #: is then not saved, which the summary and the exit code say.
        self.final_snapshot_failed: str | None = None
        #: The run has ended (its last iteration, a stop) and is saving its final snapshot.
        self.ending = False
        #: Where this process's iterations began (0, or the snapshot's), once the run has started.
        self.first_iteration: int | None = None
        #: The time of this process's ``start`` event, which the summary before the final snapshot names.
        self.started_at: float | None = None
        #: The random states as the iteration in flight began, and what a snapshot saves instead of the
        #: live ones once a stop has cut that iteration short.
        self.rngs_before_iteration: dict[str, Any] | None = None
        self.saved_rngs: dict[str, Any] | None = None
        self.first_record: IterationRecord | None = None
        self.last_record: IterationRecord | None = None
        #: The seconds of the run's iterations so far (generate + evaluate + train), every process's: what
        #: comparing runs' time to collapse needs, which ``elapsed_seconds`` (this process's) is not.
        self.iteration_seconds = 0.0
        self.writer: RunWriter | None = None
        self.listener: EngineListener = NullListener()
        self.started = time.time()
        if resume_lr is not None:
            self.controls.set_lr(resume_lr)

    # -- loading -------------------------------------------------------------------

    @on_run_device
    def load(self, listener: EngineListener | None = None) -> None:
        """Load model, tokenizer and evaluation sets; open the run folder. Reports progress."""
        self.listener = listener or self.listener
        status = self.listener.on_status
        _quiet_libraries()
        config = self.config
        source = str(self.resume_dir) if self.resume_dir else config.model
        if self.resume_dir:
            status(f"loading the model from {source}", None)
        elif needs_download(source):
            status(f"downloading model {source} from the hub (the first time only)", None)
        else:
            status(f"loading model {source}", None)
        loaded = load_model(source, self.device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if loaded.max_positions is not None and config.block > loaded.max_positions:
            raise UserError(
                f"--block {config.block} is longer than the model's context of {loaded.max_positions} tokens; "
                f"give --block {loaded.max_positions} or less"
            )
        self.prompt_ids = self._encode_prompt(config.prompt)
        #: The prompt's leading special tokens (end-of-text, for an empty prompt): read as text
        #: again, they would turn into characters the model never saw (``as_text_reads``).
        special = set(self.tokenizer.all_special_ids) if config.text_reading >= 2 else set()
        self.special_start = next(
            (i for i, token in enumerate(self.prompt_ids) if token not in special), len(self.prompt_ids)
        )
        self.eval_sets: list[EvalSet] = []
        for index, spec in enumerate(config.evals):
            status(f"loading evaluation set {spec}", index / len(config.evals))
            self.eval_sets.append(
                load_eval_set(
                    spec,
                    self.tokenizer,
                    config.block,
                    config.eval_tokens,
                    specials_as_text=config.text_reading >= 2,
                )
            )
        if self.resume_dir is not None:
            self._check_same_eval_sets()
        status("preparing generation", 1.0)
        torch.manual_seed(torch_seed(config.seed))
        self.rng = random.Random(config.seed)
        self.sampler = torch.Generator(device=self.device)
        self.sampler.manual_seed(torch_seed(config.seed))
        self.optimizer = build_optimizer(self.model, config.lr, self.device)
        self.trainer = make_train_step(self.model, self.optimizer, self.device, self.autocast_dtype)
        self.inference = make_inference(self.model, config, self.device, self.autocast_dtype)
        self.info.extra["dtype"] = str(self.autocast_dtype or torch.float32).replace("torch.", "")
        self.info.extra["inference"] = type(self.inference).__name__
        # read before the folder is opened: a damaged file is then one line, and the run stays as it was
        saved = self._load_saved_states(self.resume_dir) if self.resume_dir is not None else None
        self.writer = RunWriter(self.run_dir, resuming=self.resume_dir is not None)
        if self.resume_dir is None:
            self.writer.write_config(self._config_record())
        else:  # from here on: a failure while generation is prepared (minutes of capture) changes nothing
            self.held_events = []
        if self.inference.preparing:
            # before the random states of a resumed snapshot are restored: whatever building draws, they replace
            status(self.inference.preparing, None)
            self.inference.prepare(len(self.prompt_ids), config.gen_tokens)
        if self.resume_dir is not None and saved is not None:
            self._restore(self.resume_dir, saved)
        status("ready", 1.0)

    def _encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's ids: after the tokenizer's begin-of-text token where it puts one before any text.

        Why the begin token: Llama-2, Mistral and Gemma were trained with it
        first, and a prompt without it starts them from text of a kind they
        never saw. GPT-2's tokenizer puts none: the paper's prompt stays the
        one newline token. Runs of earlier versions (``text_reading`` below 3)
        go on without it.
        """
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        bos = self.tokenizer.bos_token_id
        if ids and ids[0] != bos and self.config.text_reading >= 3 and puts_bos_first(self.tokenizer):
            ids = [bos, *ids]  # once: a prompt typed with the begin token's text has it already
        if not ids:  # an empty prompt starts from the end-of-text token, as GPT-2 was trained
            token = self.tokenizer.eos_token_id if bos is None else bos
            if token is None:
                raise UserError("--prompt is empty and the tokenizer has no begin/end token to start from")
            ids = [token]
        if len(ids) >= self.config.block:
            raise UserError(
                f"--prompt is {len(ids)} tokens; it must be shorter than --block {self.config.block}"
            )
        return list(ids)

    def _config_record(self) -> dict[str, Any]:
        import transformers

        device_name = (
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor()
        )
        return {
            **self.config.to_dict(),
            "run_dir": str(self.run_dir),
            "device_name": device_name or platform.machine(),
            "resolved_device": str(self.device),
            "autocast_dtype": self.info.extra["dtype"],
            "inference": type(self.inference).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "prompt_ids": self.prompt_ids,
            "eval_sets": {
                s.name: {
                    "split_tokens": s.split_tokens,
                    "text_sha256": s.text_sha256,
                    "windows": s.windows.size(0),
                    "block": self.config.block,
                }
                for s in self.eval_sets
            },
            "versions": {
                "collapse_tui": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "created": time.time(),
        }

    # -- one iteration ---------------------------------------------------------------

    @on_run_device
    def step(self) -> IterationRecord:
        """Run iteration ``self.iteration`` and return its record (not yet written)."""
        config = self.config
        t0 = time.perf_counter()
        self.rngs_before_iteration = self._rng_states()
        ids = self.inference.generate(
            self.prompt_ids, config.gen_tokens, self.sampler, lambda: self.controls.stop_requested
        )
        t1 = time.perf_counter()
        generated = ids[len(self.prompt_ids) :]
        trained_on = (
            as_text_reads(self.tokenizer, ids, self.special_start) if config.train_on == "text" else ids
        )
        gen_loss, *set_losses = self.inference.mean_losses(
            [sequence_windows(trained_on, config.block), *([s.windows] for s in self.eval_sets)]
        )
        valid = {s.name: loss for s, loss in zip(self.eval_sets, set_losses, strict=True)}
        text = self.tokenizer.decode(generated)
        repetition = repetition_metrics(generated, text)
        collapsed = self.detector.update(repetition.rep4)
        t2 = time.perf_counter()
        losses = [gen_loss, *valid.values()]
        train_loss = self._train_step(trained_on) if all(math.isfinite(x) for x in losses) else float("nan")
        t3 = time.perf_counter()
        return IterationRecord(
            iteration=self.iteration,
            lr=self.lr,
            gen_loss=gen_loss,
            valid=valid,
            rep4=repetition.rep4,
            distinct1=repetition.distinct1,
            unique_tokens=repetition.unique_tokens,
            compression_ratio=repetition.compression_ratio,
            collapsed=collapsed,
            seconds={"generate": t1 - t0, "evaluate": t2 - t1, "train": t3 - t2},
            text=text,
            train_loss=train_loss,
        )

    def _train_step(self, ids: list[int]) -> float:
        """One AdamW step on a window of the sample cut at a random offset (batch 1)."""
        length = min(self.config.block, len(ids) - 1)
        start = self.rng.randrange(len(ids) - length)
        window = torch.tensor(ids[start : start + length + 1], dtype=torch.long, device=self.device)
        loss_value = self.trainer.step(window)
        if math.isfinite(loss_value):  # a NaN takes no step: the weights stay as they were
            self.inference.weights_changed()
        return loss_value

    # -- the loop ----------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether loading is over and the run has its folder open: a stop from here on ends it cleanly."""
        return self.writer is not None

    @on_run_device
    def run(self, listener: EngineListener | None = None) -> dict[str, Any]:
        """Load, then iterate until max_iters, collapse, a stop or an error. Returns the summary."""
        self.listener = listener or self.listener
        status, reason = "stopped", "requested"
        try:
            try:
                if self.writer is None:  # a caller may have loaded already
                    self.load()
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory_error(self.config.model, self.device) from None
            start = Event("start", self.iteration, data={"lr": self.lr})
            self._emit(start)
            self.first_iteration, self.started_at = self.iteration, start.time
            status, reason = self._loop()
            self._final_snapshot(status, reason)
        except RunInterrupted:
            status, reason = "stopped", self.controls.stop_reason
            # snapshots from here on save the random states as the cut iteration began, as if it never had
            # (the live generators are left alone: CUDA graphs may hold them)
            self.saved_rngs = self.rngs_before_iteration
            self._apply_pending()  # a snapshot asked for just before the quit is still taken
            self._final_snapshot(status, reason)
        except NonFiniteLoss as error:
            self._emit(Event("error", error.iteration, data={"message": str(error)}))
            status, reason = "stopped", "non-finite loss"  # no final snapshot: its weights give NaN
        except torch.cuda.OutOfMemoryError:
            error = out_of_memory_error(self.config.model, self.device)
            self._emit(Event("error", self.iteration, data={"message": str(error), "user_error": True}))
            status, reason = "crashed", "out of GPU memory"
            raise error from None
        except UserError as error:  # "user_error": the command line prints it as its one line too
            self._emit(Event("error", self.iteration, data={"message": str(error), "user_error": True}))
            status, reason = "crashed", str(error)
            raise
        except KeyboardInterrupt:
            if not self.ending:  # during the final snapshot the run had ended (finished, say): that stands
                status, reason = "stopped", "interrupted"
            raise
        except BaseException as error:
            status, reason = "crashed", type(error).__name__
            with contextlib.suppress(Exception):  # the listener may be what failed: the file still gets it
                self._emit(
                    Event("error", self.iteration, data={"message": f"{type(error).__name__}: {error}"})
                )
            raise
        finally:
            summary = self._finish(status, reason)
        return summary

    def _loop(self) -> tuple[str, str]:
        while self.iteration < self.config.max_iters:
            self._apply_commands()
            if self.controls.stop_requested:
                return "stopped", self.controls.stop_reason
            record = self.step()
            self._record(record)
            if not all(
                math.isfinite(x) for x in [record.gen_loss, *record.valid.values(), record.train_loss]
            ):
                raise NonFiniteLoss(record.iteration)
            if record.collapsed and self.collapsed_at is None:
                self.collapsed_at = record.iteration
                self._emit(
                    Event("collapse", self.iteration, data={"rep4": record.rep4, "at": record.iteration})
                )
                if not self.config.keep_going:
                    self._apply_pending()  # a snapshot asked for during the last iteration still happens
                    return "collapsed", "collapsed"
            every = self.config.snapshot_every
            if every and self.iteration % every == 0:  # after the checks: it holds the collapse too
                # an lr asked for during the iteration first: the snapshot then holds the rate the
                # next iteration runs at, and a resume from it (after a kill) does not undo the change
                self._apply_pending()
                if self.snapshot_state != (self.iteration, self.lr):  # not just taken for an s
                    self._take_snapshot()
        self._apply_pending()  # likewise; but a pause pressed now must not keep a finished run waiting
        return ("collapsed" if self.collapsed_at is not None else "finished"), "max_iters"

    def _apply_commands(self) -> None:
        """Apply what the controls ask for, at this iteration boundary; wait here while paused."""
        self._apply_pending()
        if not self.controls.paused or self.controls.stop_requested:
            return
        self._emit(Event("pause", self.iteration))
        while self.controls.paused and not self.controls.stop_requested:
            self.controls.wait(PAUSE_POLL_SECONDS)
            self._apply_pending()
        if not self.controls.stop_requested:
            self._emit(Event("resume", self.iteration))

    def _apply_pending(self) -> None:
        pending = self.controls.take_pending()
        if pending.lr is not None and pending.lr != self.lr:
            old, self.lr = self.lr, pending.lr
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            self._emit(Event("lr", self.iteration, data={"lr": self.lr, "old_lr": old}))
        if pending.snapshot:
            self._take_snapshot()

    def _take_snapshot(self, *, final: bool = False) -> str | None:
        """A snapshot of the run as it stands, logged; one that fails (a full disk) is logged, the run goes on.

        Returns why it failed, or None.
        """
        assert self.writer is not None
        target = self.writer.snapshot_dir(self.iteration)
        # a resume that has not recorded an iteration yet leaves the run's own iter-N as it is (with an
        # lr given since, it would be written over, and a resume stopped now must change nothing)
        if (
            self.snapshot_state == (self.iteration, self.lr) or self.held_events is not None
        ) and target.is_dir():
            # saved already at this boundary (--snapshot-every, then s): writing it again would only
            # replace the folder, and the screen.svg the TUI put into it
            self._emit(Event("snapshot", self.iteration, data={"path": str(target), "again": True}))
            return None
        self.listener.on_status(f"saving snapshot {target.name}", None)
        try:
            path = self.snapshot()
        except Exception as error:  # torch and safetensors raise their own types on ENOSPC and EFBIG
            message = snapshot_failure(error, target.parent)  # before the partial files free the disk
            shutil.rmtree(partial_snapshot(target), ignore_errors=True)
            # final: the run's end has no snapshot, which a watcher is told of (not only one that asked)
            data = {"message": message, **({"final": True} if final else {})}
            self._emit(Event("snapshot_failed", self.iteration, data=data))
            return message
        self.snapshot_state = (self.iteration, self.lr)
        self._emit(Event("snapshot", self.iteration, data={"path": str(path)}))
        return None

    def _final_snapshot(self, status: str, reason: str) -> None:
        """The run as it ends, if it took a step here and is not saved yet (``--no-final-snapshot``: never).

        A large model's snapshot takes a while, and a second Ctrl-C or a
        kill may end the process during it: the summary is written first,
        marked ``ending`` (``_finish`` writes it again, without the mark),
        so the folder says how the run ended either way.
        """
        self.ending = True
        stepped = self.first_iteration is not None and self.iteration > self.first_iteration
        if self.config.final_snapshot and stepped and self.snapshot_state != (self.iteration, self.lr):
            assert self.writer is not None
            ending = {"ending": ENDING_SNAPSHOT, "started": self.started_at}
            try:
                self.writer.write_summary({**self.summary(status, reason), **ending})
                self.final_snapshot_failed = self._take_snapshot(final=True)
            except KeyboardInterrupt:  # a second Ctrl-C: the run's end stands (``run``), unsaved
                if not self.writer.snapshot_dir(self.iteration).is_dir():  # or saved, just before it
                    self.final_snapshot_failed = INTERRUPTED_SNAPSHOT
                    data = {"message": INTERRUPTED_SNAPSHOT, "final": True}
                    with contextlib.suppress(Exception):  # leaving at once: the summary still says it
                        self._emit(Event("snapshot_failed", self.iteration, data=data))
                raise

    def _record(self, record: IterationRecord) -> None:
        """Write the iteration and count it done, then tell: a listener that fails must not cost it."""
        self.first_record = self.first_record or record
        self.last_record = record
        self.iteration_seconds += phase_seconds(record)
        assert self.writer is not None
        held, self.held_events = self.held_events or [], None  # first: an interrupt mid-way must not
        for event in held:  # leave resumed_from written and the resume taken as one that did nothing
            self.writer.write_event(event)
        self.writer.write_record(record)
        self.iteration += 1
        self.listener.on_record(record)

    def _emit(self, event: Event, *, notify: bool = True) -> None:
        """Write the event (files first: a listener that fails must not cost the record), then tell."""
        if self.held_events is not None:
            self.held_events.append(event)
        elif self.writer is not None:
            self.writer.write_event(event)
        if notify:
            self.listener.on_event(event)

    # -- snapshots and resume ------------------------------------------------------------

    @on_run_device
    def snapshot(self) -> Path:
        """Save θ_i with all a resume needs: weights, tokenizer, optimizer, RNG, counters, sample.

        Written into a hidden ``.partial-iter-N`` folder and renamed into place
        once complete, so a snapshot is either whole or not there: a full disk,
        a second Ctrl-C or a kill mid-write never leaves a torn ``iter-N``. One
        that replaces an ``iter-N`` (the same iteration, saved again) moves the
        old one aside first; a kill between the two renames leaves it there, and
        the next resume puts it back (``restore_replaced_snapshots``).
        """
        assert self.writer is not None
        final = self.writer.snapshot_dir(self.iteration)
        path = partial_snapshot(final)
        shutil.rmtree(path, ignore_errors=True)  # a leftover of a write that was killed
        path.mkdir(parents=True)
        try:
            self._write_snapshot(path)
            sync_folder(path)  # on disk before the name says it is whole
        except BaseException as error:
            if not isinstance(error, Exception):  # a second Ctrl-C: nothing else will remove it
                shutil.rmtree(path, ignore_errors=True)
            raise  # an Exception: ``_take_snapshot`` says why (the free space among it), then removes it
        if final.exists():  # the same iteration saved before (the snapshot resumed from, say): replace it
            replaced = replaced_snapshot(final)  # put back by the next resume if killed before the swap ends
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
            path.rename(final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            path.rename(final)
        with contextlib.suppress(OSError):  # the rename itself; the snapshot is whole and in place either way
            sync_folder_entries(final.parent)
        return final

    def _write_snapshot(self, path: Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        share_weights_as_config(path)
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        torch.save(self.saved_rngs or self._rng_states(), path / "rng.pt")
        state = {
            "iteration": self.iteration,
            "lr": self.lr,
            "collapse_streak": self.detector.streak,
            "collapsed_at": self.collapsed_at,
            "time": time.time(),
        }
        (path / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        sample = self.last_record.text if self.last_record else ""
        (path / "sample.txt").write_bytes(sample.encode("utf-8"))

    def _check_same_eval_sets(self) -> None:
        """A resumed run must evaluate on the very text it started with, wherever its files are now."""
        try:
            recorded = json.loads((self.run_dir / CONFIG).read_text(encoding="utf-8")).get("eval_sets") or {}
        except (OSError, ValueError):
            return
        for eval_set in self.eval_sets:
            record = recorded.get(eval_set.name) or {}
            was = record.get("split_tokens")
            if isinstance(was, int) and was != eval_set.split_tokens:
                # a hub set read by an earlier version, before it was rebuilt to its original file
                why = " (hub sets are now read as their original files)" if eval_set.name in HUB_SETS else ""
                raise UserError(
                    f"--eval {eval_set.name}: {eval_set.split_tokens} tokens now, {was} when the run "
                    f"started{why}; a resume must evaluate on the same text"
                )
            digest = record.get("text_sha256")  # runs from before it was recorded have only the count
            if digest and eval_set.text_sha256 and digest != eval_set.text_sha256:
                raise UserError(
                    f"--eval {eval_set.name}: the text differs from the one the run started with "
                    "(same length, other words); a resume must evaluate on the same text"
                )

    def _rng_states(self) -> dict[str, Any]:
        """Every random state an iteration draws from: what a snapshot saves."""
        return {
            "python": self.rng.getstate(),
            "torch": torch.get_rng_state(),
            "sampler": self.sampler.get_state(),
        }

    def _restore_rngs(self, states: dict[str, Any]) -> bool:
        """Restore the random states; False when the sampler's could not be (saved on another device).

        A generator's state is the device's own format (5,056 bytes on the
        CPU, 16 on CUDA), so a run resumed with another ``--device`` cannot
        go on with the saved sampling stream. It then samples from a stream
        seeded from the saved state: the same on every resume of that
        snapshot on that device, but not the samples the first device would
        have drawn.
        """
        self.rng.setstate(states["python"])
        torch.set_rng_state(states["torch"])
        saved = states["sampler"]
        try:
            self.sampler.set_state(saved)
        except RuntimeError:
            digest = hashlib.sha256(saved.cpu().numpy().tobytes()).digest()
            self.sampler.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            return False
        return True

    def _load_saved_states(self, path: Path) -> SavedStates:
        """Load the optimizer's state from snapshot ``path``, and read and check its counters and
        random states (returned, for ``_restore``).

        A file that is damaged (cut short by a full disk, say) is a ``UserError``.
        """
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            lr, collapsed_at = float(state["lr"]), state.get("collapsed_at")
            if not math.isfinite(lr) or not (collapsed_at is None or isinstance(collapsed_at, int)):
                raise ValueError("a value out of its range")
            iteration, streak = int(state["iteration"]), int(state.get("collapse_streak", 0))
        except (OSError, ValueError, KeyError, TypeError, OverflowError, AttributeError) as error:
            raise UserError(
                f"--resume {path}: its state.json cannot be read ({in_one_line(error)})"
            ) from None
        try:
            load_optimizer_state(self.optimizer, torch.load(path / "optimizer.pt", map_location=self.device))
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            raise UserError(
                f"--resume {path}: its optimizer.pt cannot be read ({in_one_line(error)})"
            ) from None
        try:
            rngs = torch.load(path / "rng.pt", weights_only=False)
            byte_states = [rngs["torch"], rngs["sampler"]]
            if not isinstance(rngs["python"], tuple) or not all(
                isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in byte_states
            ):
                raise ValueError("not the random states a snapshot saves")
        except Exception as error:
            raise UserError(f"--resume {path}: its rng.pt cannot be read ({in_one_line(error)})") from None
        return SavedStates(iteration, lr, streak, collapsed_at, rngs)

    def _restore(self, path: Path, saved: SavedStates) -> None:
        """Continue from a snapshot: counters, the lr and RNG states as they were (the optimizer's: loaded)."""
        self.iteration, self.lr = saved.iteration, saved.lr
        self.snapshot_state = (self.iteration, self.lr)
        self.detector.streak = saved.collapse_streak
        self.collapsed_at = saved.collapsed_at
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        same_stream = self._restore_rngs(saved.rngs)
        earlier = [r for r in self.resumed_records if r.iteration < self.iteration]
        self.first_record = earlier[0] if earlier else None
        self.last_record = earlier[-1] if earlier else None
        self.iteration_seconds = sum(phase_seconds(r) for r in earlier)
        self.info.lr = self.lr
        data = {
            "path": str(path),
            "lr": self.lr,
            "max_iters": self.config.max_iters,
            "collapsed_at": self.collapsed_at,
        }
        if not same_stream:
            data["new_sampling_stream"] = True
        self._emit(Event("resumed_from", self.iteration, data=data))  # config.json keeps the first start's

    # -- the end -------------------------------------------------------------------------

    def _finish(self, status: str, reason: str) -> dict[str, Any]:
        """Complete the run folder, then tell the listener (which may be a dead terminal by now)."""
        stop = Event("stop", self.iteration, data={"reason": reason, "status": status})
        # names its stop event: until this summary replaces a resumed run's old one, readers can tell
        summary = {**self.summary(status, reason), "stopped": stop.time}
        if self.writer is not None and self.held_events is not None:
            # a resume that recorded no iteration: the folder stands as it was (``held_events``)
            self.held_events = None
            self.unchanged = True
            self.writer.close()
            summary["unchanged"] = True
            with contextlib.suppress(Exception):
                self.listener.on_event(stop)
        elif self.writer is not None:
            self._emit(stop, notify=False)
            self.writer.write_summary(summary)
            self.writer.close()
            with contextlib.suppress(Exception):  # the files are complete; nothing more to lose
                self.listener.on_event(stop)
        return summary

    @property
    def left_as_it_stood(self) -> bool:
        """Whether this is a resume that wrote nothing into its run's folder: refused or stopped before
        it opened the folder, or ended before its first record (``held_events``)."""
        return self.resume_dir is not None and (self.writer is None or self.unchanged)

    @property
    def end_saved(self) -> bool:
        """Whether the newest snapshot holds the run as it stands (its final one, once it has ended)."""
        return self.snapshot_state is not None and self.snapshot_state[0] == self.iteration

    @property
    def last_snapshot(self) -> Path | None:
        """The newest snapshot this run has on disk (taken here, or resumed from), for the summary."""
        if self.snapshot_state is None or self.writer is None:
            return None
        return self.writer.snapshot_dir(self.snapshot_state[0])

    @property
    def go_on_from(self) -> tuple[Path | None, int]:
        """After a crash: the snapshot to resume (the newest of the run as it stands, or the one this
        resume had not restored yet) and the iterations recorded since it, which resuming it gives up."""
        if self.snapshot_state is None:  # none taken, nor restored yet
            return (self.resume_dir, 0) if self.resume_dir is not None else (None, self.iteration)
        return self.last_snapshot, self.iteration - self.snapshot_state[0]

    def summary(self, status: str, reason: str) -> dict[str, Any]:
        return make_summary(
            status=status,
            reason=reason,
            iterations=self.iteration,
            collapsed_at=self.collapsed_at,
            first=self.first_record,
            last=self.last_record,
            lr=self.lr,
            model=self.config.model,
            run_dir=self.run_dir,
            elapsed_seconds=time.time() - self.started,
            iteration_seconds=round(self.iteration_seconds, 3),
            last_snapshot=None if self.last_snapshot is None else str(self.last_snapshot),
            **({"final_snapshot_failed": self.final_snapshot_failed} if self.final_snapshot_failed else {}),
        )


#: Free space below which a failed snapshot write is put down to a full disk.
LOW_DISK_BYTES = 64 * 2**20


def share_weights_as_config(folder: Path) -> None:
    """Give a saved model's weight files the permissions of its config.json (the umask's).

    Why: safetensors writes its files 0600, so on a shared machine a
    colleague could read every file of a snapshot but its weights, and
    ``--model RUN/snapshots/iter-N`` failed for them.
    """
    with contextlib.suppress(OSError):  # a filesystem that takes no chmod (some FUSE or CIFS mounts)
        mode = (folder / "config.json").stat().st_mode & 0o777
        for weights in folder.glob("*.safetensors"):
            weights.chmod(mode)


def snapshot_failure(error: Exception, folder: Path) -> str:
    """Why a snapshot could not be written, in one line that names a full disk as such.

    Why: torch.save reports a full disk as "unexpected pos 576 vs 534" (its
    writer's short write, with no errno), and the optimizer's state, twice
    the model's size, is the file most likely to meet it.
    """
    message = str(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error}"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return message  # the system's own words say it already
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return message
    if free >= LOW_DISK_BYTES:
        limit = _file_size_limit()  # the other short write: a file past ``ulimit -f`` (EFBIG, no errno)
        if limit is not None:
            return f"a file may have passed this process's size limit (ulimit -f: {limit / 2**20:.0f} MiB; {message})"
        return message
    return f"no space left on device ({free / 2**20:.0f} MiB free in {folder}; {message})"


def _file_size_limit() -> int | None:
    """The largest file this process may write, in bytes (``ulimit -f``); None where there is no limit."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


#: What a snapshot folder must hold to be resumed from (the model's weights beside its config.json).
SNAPSHOT_FILES = ("state.json", "optimizer.pt", "rng.pt", CONFIG)


def _check_snapshot(path: Path) -> None:
    needed = SNAPSHOT_FILES
    # a resume clears these away as it starts: its own weights with them
    if path.name.startswith(PARTIAL):
        raise UserError(
            f"--resume {path}: that snapshot was still being written when its run stopped, and may be "
            "incomplete; resume from a snapshots/iter-N folder (or, if you know it is whole, rename it to one)"
        )
    if path.name.startswith(REPLACED):
        final = path.with_name(path.name.removeprefix(REPLACED))
        raise UserError(
            f"--resume {path}: that snapshot was moved aside while a new one of its iteration was written; "
            f"--resume {final} (it is put back there if the new one never took its place)"
        )
    if not path.is_dir() and replaced_snapshot(path).is_dir():
        if is_alive(path.parent.parent) is not False:  # a run on another host may be mid-swap
            raise UserError(
                f"--resume {path}: it was moved aside to {replaced_snapshot(path).name} while being "
                "replaced; if no run is writing the folder, rename it back"
            )
        restore_replaced_snapshots(path.parent)  # its run was killed while replacing it
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such snapshot folder")
    missing = [name for name in needed if not (path / name).exists()]
    if missing:
        raise UserError(f"--resume {path} is not a complete snapshot (missing {', '.join(missing)})")
    if not (path.parent.parent / CONFIG).exists():
        raise UserError(
            f"--resume {path}: the snapshot is not inside a run folder (snapshots/iter-N of a run)"
        )


def records_on_current_branch(snapshot: Path, run_dir: Path) -> list[IterationRecord]:
    """The run's records; refuse a snapshot of iterations that a resume from an older snapshot abandoned.

    Its folder stays on disk, but going on from it would splice two histories
    into one run (the readers no longer count those iterations).
    """
    run = read_run(run_dir)
    check_on_current_branch(snapshot, run)
    return run.records


def check_on_current_branch(snapshot: Path, run: RunFolder) -> None:
    """``records_on_current_branch`` for a run already read (a sweep weighs each of its snapshots)."""
    iteration = snapshot_iteration(snapshot)
    if iteration is None:
        raise UserError(f"--resume {snapshot}: its state.json cannot be read")
    records = run.records
    last = records[-1].iteration if records else -1
    abandoned = f"--resume {snapshot}: that snapshot belongs to iterations a later resume abandoned"
    if iteration > last + 1:  # counted as iter-N counts: iterations done
        if not any(event.event == "resumed_from" for event in run.events):
            # no resume ever abandoned anything: the records themselves were cut or removed
            raise UserError(
                f"--resume {snapshot}: it was saved after {iteration} iterations, but the run's "
                f"{METRICS} holds {last + 1}: the run's records were cut short or removed, and a "
                "resume would leave a gap in them; restore the file, or resume from an earlier snapshot"
            )
        latest = (run.current_summary or {}).get("last_snapshot")
        go_on = f"; go on from {latest}" if latest and Path(latest).name != snapshot.name else ""
        raise UserError(
            f"{abandoned} (it was saved after {iteration} iterations; the run as it now stands "
            f"has {last + 1}{go_on})"
        )
    if _abandoned_by_a_resume(snapshot, iteration, run.events):
        raise UserError(f"{abandoned} (the run was resumed from an earlier iteration after it was saved)")


def _abandoned_by_a_resume(snapshot: Path, iteration: int, events: list[Event]) -> bool:
    """Whether a resume from before ``iteration`` happened after the snapshot was saved.

    The resumed branch may since have run past ``iteration`` again (so the
    iteration count alone cannot tell), but unless it saved this iteration
    anew (replacing the folder, with a later time), the weights in it are the
    old branch's. Snapshots from versions that kept no time are not judged.
    (``events`` as ``read_run`` gives them: it keeps every ``resumed_from``.)
    """
    try:
        saved = float(json.loads((snapshot / "state.json").read_text(encoding="utf-8"))["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return any(e.event == "resumed_from" and e.iteration < iteration and e.time > saved for e in events)


def _quiet_libraries() -> None:
    """Download bars and warnings would garble a full-screen UI; the engine reports progress itself."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
