"""End-to-end check of the engine on a CUDA device, the way the front ends drive it.

Builds a random-weight model folder of a GPT-2 shape, or of SmolLM2-135M's
Llama shape with GPT-2's vocabulary, which takes the graphed path for other
models (random weights time exactly like the real ones), then runs the real engine in a background thread
as the TUI does: a learning-rate change, a snapshot, a stop; then resumes from
the snapshot. Prints each iteration's phases and checks the run folder::

    python scripts/gpu_engine_check.py --tokenizer path/to/gpt2-tokenizer --eval wikitext.txt

Meant for a GPU machine (CI has none); exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig  # noqa: E402

from collapse_tui.config import RunConfig  # noqa: E402
from collapse_tui.engine import Engine  # noqa: E402
from collapse_tui.records import Event, IterationRecord  # noqa: E402
from collapse_tui.runfolder import read_run  # noqa: E402

SHAPES = {
    "gpt2": lambda: GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": lambda: GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": lambda: GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": lambda: GPT2Config(n_layer=48, n_head=25, n_embd=1600),
    "smollm2-135m": lambda: LlamaConfig(
        vocab_size=50257, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
}  # fmt: skip


def make_model(shape: str, tokenizer_dir: str, folder: Path) -> Path:
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(SHAPES[shape]())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


class Printer:
    def __init__(self, engine: Engine, script: dict[int, callable]) -> None:
        self.engine, self.script = engine, script
        self.records: list[IterationRecord] = []
        self.events: list[Event] = []

    def on_status(self, message: str, fraction: float | None = None) -> None:
        print(f"  [{message}]", flush=True)

    def on_record(self, record: IterationRecord) -> None:
        self.records.append(record)
        phases = "  ".join(f"{k} {v:.3f}s" for k, v in record.seconds.items())
        valid = "  ".join(f"{k} {v:.3f}" for k, v in record.valid.items())
        print(
            f"  it {record.iteration}: lr {record.lr:.2g}  gen_loss {record.gen_loss:.3f}  {valid}  {phases}",
            flush=True,
        )
        action = self.script.get(record.iteration)
        if action:
            action(self.engine)

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        print(f"  event: {event.describe()}", flush=True)


def run_in_thread(engine: Engine, listener: Printer) -> dict:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(engine.run(listener)))
    thread.start()
    thread.join()
    return result


def check(condition: bool, message: str, failures: list[str]) -> None:
    print(("ok   " if condition else "FAIL ") + message, flush=True)
    if not condition:
        failures.append(message)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="gpt2-medium", choices=SHAPES)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--eval", action="append", required=True)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument(
        "--device", default="cuda", help="the run's CUDA device (cuda:1: a run off the default one)"
    )
    parser.add_argument(
        "--cpu-resume",
        action="store_true",
        help="also resume the CUDA snapshot on the CPU for one iteration (another device: a new sampling stream)",
    )
    args = parser.parse_args()
    failures: list[str] = []
    work = Path(tempfile.mkdtemp())
    model_dir = make_model(args.shape, args.tokenizer, work / "model")
    config = RunConfig(
        model=str(model_dir), evals=args.eval, max_iters=args.iters, out=str(work / "run"), device=args.device
    )
    device = torch.device(args.device)

    print(
        f"{args.shape} on {torch.cuda.get_device_name(device)} ({args.device}): lr x2 after it 1, "
        "snapshot after it 2",
        flush=True,
    )
    engine = Engine(config)
    script = {1: lambda e: e.controls.set_lr(e.lr * 2), 2: lambda e: e.controls.request_snapshot()}
    listener = Printer(engine, script)
    started = time.perf_counter()
    summary = run_in_thread(engine, listener)
    print(f"  {time.perf_counter() - started:.1f}s in all; inference: {type(engine.inference).__name__}")
    records = listener.records
    # A random-weight model may collapse within a few iterations at lr 8e-5: that is a legitimate end.
    ended = summary["status"] == "finished" and len(records) == args.iters
    check(ended or summary["status"] == "collapsed", "the run ended by itself", failures)
    check(all(math.isfinite(r.gen_loss) and all(map(math.isfinite, r.valid.values())) for r in records),
          "all losses finite", failures)  # fmt: skip
    check(
        [r.lr for r in records[:3]] == [4e-5, 4e-5, 8e-5],
        "lr change applied from the next iteration",
        failures,
    )
    fast_path = "GraphedInference" if args.shape.startswith("smollm2") else "FastGPT2Inference"
    check(
        type(engine.inference).__name__ == fast_path, f"the fast path ({fast_path}) is used on CUDA", failures
    )
    check(
        {p.device for p in engine.model.parameters()} == {torch.device("cuda", device.index or 0)},
        f"the weights are on {args.device}",
        failures,
    )
    snapshot = work / "run" / "snapshots" / "iter-3"
    check((snapshot / "model.safetensors").exists(), "snapshot written", failures)

    print("resume from the snapshot for two more iterations", flush=True)
    resumed = Engine(RunConfig(**{**config.to_dict(), "resume": str(snapshot), "max_iters": 5}))
    listener2 = Printer(resumed, {})
    run_in_thread(resumed, listener2)
    check([r.iteration for r in listener2.records] == [3, 4], "resumed at iteration 3", failures)
    check(
        listener2.records[0].text == records[3].text, "resumed sample equals the uninterrupted one", failures
    )
    run = read_run(work / "run")
    check(  # as it now stands: resumed at 3 and ended at 5, so the first run's iteration 5 is abandoned
        [r.iteration for r in run.records] == [0, 1, 2, 3, 4],
        "run folder reads back",
        failures,
    )
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    if args.cpu_resume:
        print("resume the same snapshot on the CPU for one iteration", flush=True)
        on_cpu = Engine(
            RunConfig(**{**config.to_dict(), "resume": str(snapshot), "max_iters": 4, "device": "cpu"})
        )
        listener3 = Printer(on_cpu, {})
        run_in_thread(on_cpu, listener3)
        resumes = [e for e in listener3.events if e.event == "resumed_from"]
        check(
            bool(resumes) and resumes[0].data.get("new_sampling_stream") is True,
            "a CUDA sampler state resumed on the CPU: a new sampling stream, said in resumed_from",
            failures,
        )
        check(
            [r.iteration for r in listener3.records] == [3] and math.isfinite(listener3.records[0].gen_loss),
            "the CPU resume ran iteration 3",
            failures,
        )
    print(f"peak GPU memory {peak:.1f} GiB")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
