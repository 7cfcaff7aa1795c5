"""Microseconds per token of the persistent forward, for a few tile plans, against layer by layer.

    python benchmarks/tune_persistent.py --models gpt2-medium,gpt2 --plans "bn=32,w=8;bn=32,w=8,pf=0"

A plan changes fields of the default ``Plan``: ``bn`` block_n, ``bk``
block_k, ``w`` warps, ``s`` stages, ``q`` block_q, ``kv`` block_kv, ``pf`` prefetch (0/1),
``ps``/``os`` the K splits of the projection / MLP down-projection, ``mv``
matrix-vector decode kernel for the cached token (0/1), ``ch`` its keys per
attention chunk; ``g`` is not a plan field but the grid (CTAs, default one
per SM; every CTA must be resident at once, so more than one per SM needs
registers and shared memory for them). Each forward (the window of
``--rows`` tokens, and one cached token at ``--position``) is timed by graph
replay (benchmarks/timing.py), so the time is the kernels' alone: what one
generated token costs before lm_head and sampling. The layer-by-layer
forward of ``GPT2Weights`` (7 kernels a layer) is the reference. Also gives
the floor: the layers' bf16 weight bytes over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_iteration import build_model, copy_bandwidth
from timing import graph_time

from collapse_tui.fast.gpt2 import GPT2Weights
from collapse_tui.fast.persistent import PersistentForward, Plan, default_plan

FIELDS = {
    "bn": "block_n",
    "bk": "block_k",
    "w": "warps",
    "s": "stages",
    "q": "block_q",
    "kv": "block_kv",
    "pf": "prefetch",
    "ps": "proj_splits",
    "os": "out_splits",
    "mv": "matvec",
    "ch": "chunk",
}


def parse_plan(text: str, width: int, rows: int) -> tuple[Plan, int | None]:
    """The plan ``text`` describes, and its grid (``None``: one CTA per SM)."""
    changes, grid = {}, None
    for field in filter(None, text.split(",")):
        key, value = field.split("=")
        if key == "g":
            grid = int(value)
            continue
        changes[FIELDS[key]] = bool(int(value)) if key in ("pf", "mv") else int(value)
    return replace(default_plan(width, rows), **changes), grid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2-medium,gpt2")
    parser.add_argument("--plans", default=";pf=0;mv=0;w=4")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument(
        "--position", type=int, default=511, help="cached token's position (keys = position + 1)"
    )
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| model | shape | plan | µs a token | layer by layer µs | layers' floor µs |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name in args.models.split(","):
        tune_model(name, args, bandwidth)
        torch.cuda.empty_cache()


def tune_model(name: str, args: argparse.Namespace, bandwidth: float) -> None:
    model = build_model(name)
    weights = GPT2Weights(model, torch.bfloat16)
    layer_bytes = weights.nbytes_per_token - weights.lm_head.numel() * weights.lm_head.element_size()
    floor = layer_bytes / bandwidth * 1e6
    tokens = torch.randint(0, 50257, (args.rows,), device="cuda")
    cache = weights.new_kv_cache(1024)
    position = torch.tensor([args.position], device="cuda")
    mask = torch.zeros(1, 1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    mask[..., args.position + 1 :] = float("-inf")
    with torch.no_grad():
        weights.hidden(tokens[:1].expand(args.position).reshape(1, -1), cache)
        layered = {
            "window": graph_time([lambda: weights.hidden(tokens.view(1, -1))]),
            "cache": graph_time([lambda: weights.decode_one(tokens[:1], position, cache, mask)]),
        }
        for shape, forward, inputs in (
            ("window", PersistentForward(weights, args.rows), (tokens,)),
            ("cache", PersistentForward(weights, 1, cache=cache), (tokens[:1], position)),
        ):
            micros = graph_time([lambda f=forward, i=inputs: f.run(*i, work=False)])
            print(f"| {name} | {shape} | barriers only ({forward.barriers}) | {micros:.1f} | | |", flush=True)
        for text in args.plans.split(";"):
            for shape, rows, inputs in (
                ("window", args.rows, (tokens,)),
                ("cache", 1, (tokens[:1], position)),
            ):
                try:
                    plan, grid = parse_plan(text, weights.n_embd, rows)
                    forward = PersistentForward(
                        weights, rows, cache=cache if rows == 1 else None, plan=plan, grid=grid
                    )
                    micros = graph_time([lambda f=forward, i=inputs: f.run(*i)])
                    forward.check()
                    cell = f"{micros:.1f}"
                except Exception as error:  # report and go on with the other plans
                    cell = f"failed: {type(error).__name__}: {str(error)[:120]}"
                print(
                    f"| {name} | {shape} | {text} | {cell} | {layered[shape]:.1f} | {floor:.1f} |", flush=True
                )


if __name__ == "__main__":
    main()
