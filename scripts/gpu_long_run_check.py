"""A run as long as the paper's (1000 iterations) on a CUDA device, through the real command line.

Why: every other GPU check runs a handful of iterations. A researcher's run
goes for hours; what only a long run shows is a slow leak (GPU memory that
grows an iteration), time an iteration that drifts (graphs captured again,
a cache that fills) and periodic snapshots that cost more as the run goes.

Builds a random-weight model folder of a GPT-2 shape (random weights time
exactly like the real ones), runs ``collapse-tui headless`` on it with
``--keep-going`` (a random model collapses at once) and ``--snapshot-every``,
reads the GPU's used memory with ``nvidia-smi`` every two seconds, then
prints seconds an iteration over the first, middle and last stretch of the
run, the memory after the first stretch and at its highest, and checks::

    python scripts/gpu_long_run_check.py --shape gpt2 --tokenizer path/to/gpt2-tokenizer --eval wikitext.txt

Meant for a GPU machine (CI has none); exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_engine_check import SHAPES, make_model  # noqa: E402

from collapse_tui.runfolder import read_jsonl  # noqa: E402

#: Iterations in each stretch whose seconds are compared (after two warm-up iterations: graph captures).
STRETCH = 50


def used_mib(index: int) -> float | None:
    """The GPU's used memory (all processes: the run is the only one), or None if nvidia-smi cannot say.

    ``index`` is nvidia-smi's numbering, which is CUDA's under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and with
    no ``CUDA_VISIBLE_DEVICES`` (on a host of identical GPUs the two orders usually agree).
    """
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def iterations_written(metrics: Path) -> int:
    try:
        with open(metrics, "rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--snapshot-every", type=int, default=250)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--model", type=Path, help="an existing model folder instead of a random --shape")
    parser.add_argument(
        "--gen-tokens", type=int, default=1024, help="tokens an iteration (smaller: to try on a CPU)"
    )
    args = parser.parse_args()
    index = int(args.device.partition(":")[2] or 0)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(args.shape, args.tokenizer, Path(tmp) / args.shape)
        run, log = Path(tmp) / "run", Path(tmp) / "run.log"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
        command = [sys.executable, "-m", "collapse_tui.cli", "headless", "--model", str(model), "--eval", args.eval,
                   "--max-iters", str(args.iters), "--keep-going", "--snapshot-every", str(args.snapshot_every),
                   "--gen-tokens", str(args.gen_tokens), "--device", args.device, "--out", str(run)]  # fmt: skip
        started = time.perf_counter()
        memory: list[tuple[int, float]] = []  # (iterations written, MiB)
        # its output to a file, not a pipe read at the end: a line an iteration fills a pipe's 64 KiB
        # within a few hundred iterations, and the run then waits on its next line for good
        with open(log, "w") as output_file:
            child = subprocess.Popen(command, env=env, stdout=output_file, stderr=subprocess.STDOUT)
            reported = 0
            while child.poll() is None:
                done = iterations_written(run / "metrics.jsonl")
                mib = used_mib(index) if args.device != "cpu" else None
                if mib is not None:
                    memory.append((done, mib))
                if done >= reported + 100:  # progress, so that a run cut short still says how far it went
                    reported = done - done % 100
                    print(f"  {done} iterations, {time.perf_counter() - started:.0f} s"
                          + (f", {mib:.0f} MiB" if mib is not None else ""), flush=True)  # fmt: skip
                time.sleep(2)
        output = log.read_text(errors="replace")
        wall = time.perf_counter() - started
        print(
            f"{model.name}, {args.iters} iterations on {args.device}: exit {child.returncode}, {wall:.0f} s wall"
        )
        print("\n".join(output.splitlines()[-4:]))

        check(child.returncode == 0, "the run ended by itself (exit 0)")
        records = read_jsonl(run / "metrics.jsonl")
        check(
            [r["iteration"] for r in records] == list(range(args.iters)), f"{args.iters} iterations recorded"
        )
        every = range(args.snapshot_every, args.iters + 1, args.snapshot_every) if args.snapshot_every else []
        check(
            all((run / "snapshots" / f"iter-{n}" / "state.json").is_file() for n in every),
            f"snapshots {', '.join(f'iter-{n}' for n in every)} on disk",
        )
        try:
            status = json.loads((run / "summary.json").read_text()).get("status")
        except (OSError, ValueError):
            status = "none written"
        check(status in ("finished", "collapsed"), f"summary: {status}")

    def seconds(stretch: list[dict]) -> float:
        return statistics.median(sum(r["seconds"].values()) for r in stretch) if stretch else float("nan")

    middle = len(records) // 2
    first = seconds(records[2 : 2 + STRETCH])
    halfway = seconds(records[middle : middle + STRETCH])
    last = seconds(records[-STRETCH:])
    print(
        f"seconds an iteration (median of {STRETCH}): first {first:.3f}, middle {halfway:.3f}, last {last:.3f}"
    )
    check(last <= 1.1 * first, "the last stretch is no more than 10 % slower than the first")
    settled = [mib for done, mib in memory if done >= 2 + STRETCH]
    if settled:
        print(f"GPU memory used after {2 + STRETCH} iterations: {settled[0]:.0f} MiB; highest after: "
              f"{max(settled):.0f} MiB; at the end: {settled[-1]:.0f} MiB ({len(memory)} readings)")  # fmt: skip
        check(
            settled[-1] <= settled[0] + 256, "GPU memory at the end within 256 MiB of its level after warm-up"
        )
    else:
        print("GPU memory: nvidia-smi gave no readings")
    if failures:
        print(f"\n{len(failures)} checks failed")
        return 1
    print("\nevery check ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
