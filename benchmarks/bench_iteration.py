"""Seconds per iteration of the self-training loop, phase by phase: the engine against a naive loop.

One CUDA device, one process, random-weight models of the GPT-2 shapes (no
download, no tokenizer: token ids are random).

- engine: the engine's own pieces (``make_inference``, ``build_optimizer``,
  ``make_train_step``, ``Engine._train_step``) doing what ``Engine.step`` does: generate, the
  generated-text loss over ``block`` windows and one validation set of
  ``eval_tokens`` (12,800) tokens, repetition metrics, one AdamW step.
- naive: the paper's loop as DESIGN section 6 describes it: a Hugging Face
  model in eager fp32 re-running the window for every token, with a host sync
  per token; 200 evaluation forwards of one window, each followed by
  ``.item()``; the training step in fp32.

Every phase is timed with a device synchronisation on both ends; the engine's
numbers are the median of ``--iters`` iterations after two warm-up iterations
(the first captures generation's CUDA graphs and is reported as ``first``;
the second captures the training step's, which needs the optimizer state
a first step creates).

The floor of generation is the bytes of bf16 weights one token must read,
times the tokens, over the copy bandwidth measured here (or the matrix
products' FLOPs over the measured bf16 rate, where that is larger).

    python benchmarks/bench_iteration.py --models gpt2,gpt2-medium --blocks 100,1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collapse_tui.data import eval_windows
from collapse_tui.engine import Engine, make_inference
from collapse_tui.inference import sequence_windows
from collapse_tui.metrics import repetition_metrics
from collapse_tui.training import build_optimizer, make_train_step

#: (layers, heads, width) of the GPT-2 sizes; vocabulary 50257, 1024 positions.
SHAPES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
VOCAB = 50257
PHASES = ("generate", "evaluate", "train")
#: Where everything runs (a smoke test may point it at the CPU).
DEVICE = "cuda"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written."""
    src = torch.randn(2**28, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 4 * 20 / (start.elapsed_time(end) / 1e3)


def matmul_rate() -> float:
    """bf16 matrix-product rate in FLOP/s on random 8192-cubed operands."""
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3)


def build_model(name: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, heads, width = SHAPES[name]
    config = GPT2Config(n_layer=layers, n_head=heads, n_embd=width, vocab_size=VOCAB, n_positions=1024)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GPT2LMHeadModel(config)
    return model.eval()


class EngineLoop:
    """``Engine.step`` without the tokenizer and the run folder, timed phase by phase."""

    def __init__(self, model: torch.nn.Module, block: int, gen_tokens: int, val: torch.Tensor) -> None:
        device = torch.device(DEVICE)
        config = types.SimpleNamespace(block=block, temperature=1.0, top_k=200)
        inference = make_inference(model, config, device, torch.bfloat16)  # type: ignore[arg-type]
        optimizer = build_optimizer(model, 4e-5, device)
        # what Engine._train_step reads from its engine
        self.engine = types.SimpleNamespace(
            config=config,
            rng=random.Random(1337),
            device=device,
            inference=inference,
            trainer=make_train_step(model, optimizer, device, torch.bfloat16),
        )
        self.inference = inference
        self.block, self.gen_tokens, self.val = block, gen_tokens, val
        self.sampler = torch.Generator(device=device).manual_seed(1337)

    def iteration(self) -> dict[str, float]:
        inference = self.inference
        t_gen, ids = timed(lambda: inference.generate([50256], self.gen_tokens, self.sampler))

        def evaluate() -> None:
            inference.mean_losses([sequence_windows(ids, self.block), [self.val]])  # as Engine.step
            repetition_metrics(ids[1:], "")  # type: ignore[index]

        t_eval, _ = timed(evaluate)
        t_train, _ = timed(lambda: Engine._train_step(self.engine, ids))  # type: ignore[arg-type]
        return {"generate": t_gen, "evaluate": t_eval, "train": t_train}


class NaiveLoop:
    """The paper's loop: eager fp32, one token (and one evaluation window) at a time, host syncs."""

    def __init__(
        self,
        model: torch.nn.Module,
        block: int,
        gen_tokens: int,
        val_ids: torch.Tensor,
        last_only: bool = False,
    ) -> None:
        self.model, self.block, self.gen_tokens = model, block, gen_tokens
        # the paper's nanoGPT computes logits for the last position only when generating
        self.keep = {"logits_to_keep": 1} if last_only else {}
        groups = [
            {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=4e-5, betas=(0.9, 0.95))
        starts = torch.randint(
            0, val_ids.numel() - block - 1, (200,), generator=torch.Generator().manual_seed(0)
        )
        self.windows = [val_ids[s : s + block + 1].to(DEVICE) for s in starts.tolist()]

    @torch.no_grad()
    def generate(self) -> list[int]:
        ids = [50256]
        for _ in range(self.gen_tokens):
            context = torch.tensor([ids[-self.block :]], device=DEVICE)
            logits = self.model(context, use_cache=False, **self.keep).logits[:, -1, :]
            top = torch.topk(logits, 200).values
            logits[logits < top[:, [-1]]] = -float("inf")
            ids.append(int(torch.multinomial(F.softmax(logits, dim=-1), 1)))  # the host sync
        return ids

    @torch.no_grad()
    def evaluate(self) -> float:
        losses = []
        for window in self.windows:
            logits = self.model(window[None, :-1], use_cache=False).logits
            losses.append(F.cross_entropy(logits[0], window[1:]).item())
        return sum(losses) / len(losses)

    def train(self, ids: list[int]) -> None:
        length = min(self.block, len(ids) - 1)
        start = random.randrange(len(ids) - length)
        window = torch.tensor(ids[start : start + length + 1], device=DEVICE)
        loss = F.cross_entropy(self.model(window[None, :-1], use_cache=False).logits[0], window[1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def iteration(self) -> dict[str, float]:
        t_gen, ids = timed(self.generate)
        t_eval, _ = timed(self.evaluate)
        t_train, _ = timed(lambda: self.train(ids))  # type: ignore[arg-type]
        return {"generate": t_gen, "evaluate": t_eval, "train": t_train}


def generation_floor(
    inference: object, model: torch.nn.Module, block: int, tokens: int, bw: float, rate: float
):
    """Seconds generation cannot beat: weight bytes per token over bandwidth, or the window's FLOPs."""
    weights = inference.weights  # type: ignore[attr-defined]
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # tied lm_head counted once
    body = matrices - model.transformer.wte.weight.numel() - model.transformer.wpe.weight.numel()
    full_context = tokens <= block
    rows = 1 if full_context else block
    flops = 2 * body * rows + 2 * model.transformer.wte.weight.numel()
    per_token = max(weights.nbytes_per_token / bw, flops / rate)
    return per_token * tokens


def generation_variants(model: torch.nn.Module, block: int, gen_tokens: int) -> dict[str, float]:
    """Generation alone with each fusion switched off, to show what each one buys."""
    from collapse_tui.fast import FastGPT2Inference

    out = {}
    for label, triton, gelu, graphs in (
        ("all fusions + graph", True, True, True),
        ("no Triton add+layernorm", False, True, True),
        ("no cuBLASLt gelu", True, False, True),
        ("no CUDA graph", True, True, False),
    ):
        fast = FastGPT2Inference(model, block, 1.0, 200, use_graphs=graphs)
        fast.weights.use_triton &= triton
        fast.weights.fused_gelu &= gelu
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        fast.generate([50256], 8, gen)
        out[label] = timed(lambda f=fast, g=gen: f.generate([50256], gen_tokens, g))[0]
        del fast
    return out


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {phase: statistics.median(run[phase] for run in runs) for phase in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2,gpt2-medium")
    parser.add_argument("--blocks", default="100,1024")
    parser.add_argument("--naive", default="gpt2,gpt2-medium", help="models to also time the naive loop on")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--once", default="gpt2-xl", help="models timed for one iteration only")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    parser.add_argument("--variants", default="", help="model:block to time generation without each fusion")
    args = parser.parse_args()

    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False  # the paper's fp32 is fp32
    card = torch.cuda.get_device_name()
    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"{card}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    val_ids = torch.randint(0, VOCAB, (300_000,), generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, object]] = []
    for name in args.models.split(","):
        model = build_model(name)
        for block in (int(b) for b in args.blocks.split(",")):
            gen_tokens = 1024 if block < 1024 else 1023  # full context: 1 + 1023 = 1024 positions
            val = eval_windows(val_ids.tolist(), block, 12_800)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            loop = EngineLoop(model, block, gen_tokens, val)
            first = sum(loop.iteration().values())
            loop.iteration()  # the training step is captured at the second step (training.GraphedTrainStep)
            iters = 1 if name in args.once.split(",") else args.iters
            engine = median_phases([loop.iteration() for _ in range(iters)])
            peak = torch.cuda.max_memory_allocated() / 2**30
            floor = generation_floor(loop.inference, model, block, gen_tokens, bw, rate)
            row: dict[str, object] = dict(
                model=name, block=block, tokens=gen_tokens, engine=engine, first=first, floor=floor, peak=peak,
                path=getattr(loop.inference, "description", type(loop.inference).__name__),
            )  # fmt: skip
            print(f"{name} block {block}: engine {engine} first {first:.2f}s floor {floor:.3f}s", flush=True)
            del loop
            torch.cuda.empty_cache()
            if name in args.naive.split(","):
                naive = NaiveLoop(model, block, gen_tokens, val_ids)
                with torch.no_grad():  # warm up
                    naive.model(torch.zeros(1, block, dtype=torch.long, device=DEVICE))
                row["naive"] = naive.iteration()
                print(f"{name} block {block}: naive {row['naive']}", flush=True)
                # the same loop with last-position logits when generating (evaluation and training
                # do not change: their numbers are the naive row's)
                last = NaiveLoop(model, block, gen_tokens, val_ids, last_only=True)
                row["naive_last"] = {**row["naive"], "generate": timed(last.generate)[0]}  # type: ignore[dict-item]
                print(f"{name} block {block}: naive, last-position logits {row['naive_last']}", flush=True)
                del naive, last
            rows.append(row)
        del model
        torch.cuda.empty_cache()

    variants: dict[str, float] = {}
    if args.variants:
        name, block_text = args.variants.split(":")
        model = build_model(name)
        tokens = 1024 if int(block_text) < 1024 else 1023
        variants = generation_variants(model, int(block_text), tokens)
        print(f"variants {args.variants}: {variants}", flush=True)
        del model
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    command = "python " + " ".join(sys.argv)
    table = format_table(rows)
    print(table)
    header = [
        "# Seconds per iteration: engine vs naive loop",
        "",
        f"- card: {card}; measured copy bandwidth {bw / 1e12:.2f} TB/s (read + write), "
        f"bf16 matmul {rate / 1e12:.0f} TFLOP/s",
        f"- date: {datetime.date.today().isoformat()}; {versions}",
        f"- command: `{command}`",
        "- random-weight models of the GPT-2 shapes; 1024 new tokens at block 100, 1023 at block 1024 "
        "(full context); evaluation = generated text + 12,800 validation tokens; one AdamW step",
        "- speed-up: against the naive loop / against the same loop computing logits for the last position "
        "only when generating (as the paper's nanoGPT does; its evaluation and training are the naive row's)",
        "- engine: median of the timed iterations after two warm-up iterations (`first`, which captures "
        "generation's graphs, then one that captures the training step's); "
        "naive: one iteration of the paper's loop (eager fp32, host sync per token, 200 single-window "
        "evaluation forwards)",
        "- floor: generation only, bf16 weight bytes per token × tokens / copy bandwidth "
        "(or the window's FLOPs / matmul rate if larger)",
        "",
    ]
    if variants:
        table += f"\n\nGeneration alone, {args.variants} ({tokens} tokens), each fusion switched off:\n\n"
        table += "| variant | generate s |\n| --- | ---: |\n"
        table += "\n".join(f"| {label} | {seconds:.3f} |" for label, seconds in variants.items())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(header) + "\n" + table + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card, bw=bw, rate=rate, rows=rows), indent=1))


def format_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | block | path | generate s | evaluate s | train s | total s | first s | speed-up "
        "| gen floor s | gen / floor | peak GiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        engine: dict[str, float] = row["engine"]  # type: ignore[assignment]
        total = sum(engine.values())
        naive: dict[str, float] | None = row.get("naive")  # type: ignore[assignment]
        naive_last: dict[str, float] | None = row.get("naive_last")  # type: ignore[assignment]
        speedup = f"{sum(naive.values()) / total:.1f}×" if naive else "-"
        if naive_last:
            speedup += f" / {sum(naive_last.values()) / total:.1f}×"
        floor: float = row["floor"]  # type: ignore[assignment]
        lines.append(
            f"| {row['model']} | {row['block']} | engine ({row['path']}) | {engine['generate']:.3f} "
            f"| {engine['evaluate']:.3f} | {engine['train']:.3f} | **{total:.3f}** | {row['first']:.2f} "
            f"| {speedup} | {floor:.3f} | {engine['generate'] / floor:.2f} | {row['peak']:.1f} |"
        )
        if naive:
            lines.append(
                f"| {row['model']} | {row['block']} | naive | {naive['generate']:.2f} | {naive['evaluate']:.2f} "
                f"| {naive['train']:.3f} | {sum(naive.values()):.2f} | - | 1× | - | "
                f"{naive['generate'] / floor:.0f} | - |"
            )
        if naive_last:
            lines.append(
                f"| {row['model']} | {row['block']} | naive, last-position logits | {naive_last['generate']:.2f} "
                f"| (same) | (same) | {sum(naive_last.values()):.2f} | - | 1× | - | "
                f"{naive_last['generate'] / floor:.0f} | - |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
