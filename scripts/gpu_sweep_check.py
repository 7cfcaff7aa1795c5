"""End-to-end check of ``collapse-tui sweep`` on a CUDA device, through the real command line.

Builds a random-weight model folder of a GPT-2 shape (random weights time
exactly like the real ones), then runs four sweeps as a researcher would,
each a real ``python -m collapse_tui.cli sweep`` process:

1. two learning rates, one after the other on one GPU;
2. the same two, both at once: on that GPU (``--device cuda --device cuda``), or
   one on each of ``--at-once cuda:0,cuda:1``;
3. the first sweep again with a larger ``--max-iters``: both runs go on from
   their final snapshots;
4. three learning rates, two at once (on ``--at-once``'s devices), and a
   Ctrl-C once both are going: both stop with their final snapshots, the
   third never starts.

It checks each sweep's exit code, the runs' statuses and iteration counts,
the figure and the logs, and prints the seconds an iteration took (the
median of the runs' own ``seconds``) alone and two at once::

    python scripts/gpu_sweep_check.py --tokenizer path/to/gpt2-tokenizer --eval wikitext.txt

Meant for a GPU machine (CI has none); exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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

FAILURES: list[str] = []


def non_empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def check(ok: bool, what: str) -> None:
    print(f"  {'ok ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILURES.append(what)


def sweep(args: list[str], label: str) -> tuple[int, float, str]:
    """Run one sweep; its exit code, wall seconds and output."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "collapse_tui.cli", "sweep", *args], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - start
    print(f"\n== {label}: exit {result.returncode}, {wall:.1f} s wall", flush=True)
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith("sweep:")), flush=True)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
    return result.returncode, wall, result.stdout


def sweep_stopped(args: list[str]) -> tuple[int, float, str]:
    """A sweep of two at once, sent SIGINT once both runs have done three iterations."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    out = Path(args[args.index("--out") + 1])
    start = time.perf_counter()
    sweep = subprocess.Popen([sys.executable, "-m", "collapse_tui.cli", "sweep", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    while sweep.poll() is None and time.perf_counter() - start < 240:
        runs = runs_of(out) if out.is_dir() else {}
        if len(runs) == 2 and all(len(r) >= 3 for r in runs.values()):
            sweep.send_signal(signal.SIGINT)
            break
        time.sleep(0.5)
    text, _ = sweep.communicate(timeout=300)
    wall = time.perf_counter() - start
    print(f"\n== Ctrl-C with two going: exit {sweep.returncode}, {wall:.1f} s wall", flush=True)
    print("\n".join(line for line in text.splitlines() if line.startswith("sweep:")), flush=True)
    return sweep.returncode, wall, text


def runs_of(out: Path) -> dict[str, list[dict]]:
    """Each run folder's records, by folder name (read as the tool reads them: a sample may hold
    characters that str.splitlines takes for line ends, such as U+2028)."""
    return {
        run.name: read_jsonl(run / "metrics.jsonl")
        for run in sorted(out.iterdir())
        if (run / "metrics.jsonl").exists()
    }


def seconds_per_iteration(records: list[dict]) -> float:
    """The median of an iteration's phases, after the first two (graph captures)."""
    totals = [sum(r["seconds"].values()) for r in records[2:]]
    return statistics.median(totals) if totals else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--device", default="cuda", help="where the runs go (cpu: to try the script out)")
    parser.add_argument("--at-once", help="the two devices of the sweeps that run two at once, comma-separated "
                        "(default: --device twice, both on one GPU)")  # fmt: skip
    parser.add_argument("--model", type=Path, help="an existing model folder instead of a random --shape")
    parser.add_argument("--keep", type=Path, help="copy the second sweep's figure and a log here")
    args = parser.parse_args()
    at_once = (args.at_once or f"{args.device},{args.device}").split(",")
    where = "on one GPU" if len(set(at_once)) == 1 else f"on {' and '.join(at_once)}"
    at_once_options = [option for device in at_once for option in ("--device", device)]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(args.shape, args.tokenizer, Path(tmp) / args.shape)
        # random weights collapse within a few iterations: --keep-going, so that every run goes to --max-iters
        common = ["--model", str(model), "--eval", args.eval, "--lr", "1e-4", "--lr", "4e-4", "--keep-going"]
        names = [f"{model.name}-lr0.0001-seed1337", f"{model.name}-lr0.0004-seed1337"]

        one = Path(tmp) / "one"
        code, wall_one, _ = sweep(
            [*common, "--max-iters", str(args.iters), "--device", args.device, "--out", str(one)],
            "one at a time",
        )
        check(code == 0, "one at a time: exit 0")
        runs = runs_of(one)
        check(sorted(runs) == names, f"one at a time: runs {sorted(runs)}")
        check(
            all(len(r) == args.iters for r in runs.values()), f"one at a time: {args.iters} iterations each"
        )
        check(non_empty(one / "sweep.png"), "one at a time: sweep.png")
        alone = {name: seconds_per_iteration(r) for name, r in runs.items()}

        two = Path(tmp) / "two"
        code, wall_two, out = sweep(
            [*common, "--max-iters", str(args.iters), *at_once_options, "--out", str(two)],
            f"two at once {where}",
        )
        check(code == 0, "two at once: exit 0")
        runs = runs_of(two)
        check(all(len(r) == args.iters for r in runs.values()) and len(runs) == 2, "two at once: both whole")
        check(all(non_empty(two / "logs" / f"{name}.log") for name in names), "two at once: logs")
        # a run going on after its collapse (--keep-going) ends as "collapsed after N iterations"
        check(out.count(f"after {args.iters} iterations") == 2, "two at once: each end said")
        together = {name: seconds_per_iteration(r) for name, r in runs.items()}
        if len(set(at_once)) > 1:
            devices = {
                json.loads((two / name / "config.json").read_text()).get("resolved_device") for name in runs
            }
            check(
                devices == set(at_once), f"two at once: one run on each device ({sorted(map(str, devices))})"
            )
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            (args.keep / "sweep.png").write_bytes((two / "sweep.png").read_bytes())
            (args.keep / "run.log").write_text((two / "logs" / f"{names[0]}.log").read_text())

        code, _, out = sweep(
            [*common, "--max-iters", str(args.iters + 3), "--device", args.device, "--out", str(one)],
            "going on",
        )
        check(code == 0, "going on: exit 0")
        check(out.count("going on from") == 2, "going on: both resumed from their snapshots")
        runs = runs_of(one)
        check(all([r["iteration"] for r in recs] == list(range(args.iters + 3)) for recs in runs.values()),
              f"going on: iterations 0..{args.iters + 2} each")  # fmt: skip

        stopped = Path(tmp) / "stopped"
        code, _, out = sweep_stopped(
            [*common, "--lr", "1e-3", "--max-iters", "1000", *at_once_options, "--out", str(stopped)]
        )
        check(code == 130, "Ctrl-C with two going: exit 130")
        runs = runs_of(stopped)
        check(len(runs) == 2, f"Ctrl-C with two going: the third never started ({sorted(runs)})")
        for name in runs:
            summary = json.loads((stopped / name / "summary.json").read_text())
            check(summary["reason"] == "SIGINT" and Path(summary["last_snapshot"], "state.json").exists(),
                  f"Ctrl-C: {name} stopped with its final snapshot")  # fmt: skip

    print(f"\n{model.name}: s/iteration (median of the runs' own phases, after two warm-up iterations)")
    for name in names:
        print(f"  {name}: alone {alone[name]:.3f}, two at once {where} {together[name]:.3f}")
    print(f"  wall: one at a time {wall_one:.1f} s, two at once {where} {wall_two:.1f} s")
    if FAILURES:
        print(f"\n{len(FAILURES)} checks failed")
        sys.exit(1)
    print("\nevery check ok")


if __name__ == "__main__":
    main()
