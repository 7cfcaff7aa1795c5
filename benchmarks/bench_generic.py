"""Generation of models other than GPT-2: the eager path against the graphed one (``fast/graphed.py``).

One CUDA device, random-weight models of a few popular shapes (no download):
the time of one sample of ``--tokens`` new tokens at each of ``--blocks``
(the paper's sliding window; a block of at least ``--tokens`` takes
block - 1 tokens instead, in full context), bf16 autocast over fp32 master weights as the
engine runs them, after a warm-up sample (which compiles and captures): the
eager path, the graphed path without ``torch.compile`` and with it (the
engine's default on CUDA).

    python benchmarks/bench_generic.py --models smollm2-135m,pythia-160m,qwen2.5-0.5b --blocks 100,1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collapse_tui.fast.graphed import GraphedInference
from collapse_tui.inference import EagerInference


def build_model(name: str) -> torch.nn.Module:
    """A random-weight model of the named shape, fp32, on the GPU."""
    import transformers as tf

    configs = {
        "smollm2-135m": lambda: tf.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
        ),
        "pythia-160m": lambda: tf.GPTNeoXConfig(
            vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, rotary_pct=0.25, max_position_embeddings=2048, tie_word_embeddings=False,
        ),
        "qwen2.5-0.5b": lambda: tf.Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
        ),
    }  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(configs[name]())
    return model.eval()


def sample_seconds(inference: EagerInference, tokens: int, warm_up: int) -> float:
    """Seconds for one sample of ``tokens`` new tokens from a one-token prompt, after ``warm_up`` tokens.

    The graphed path must warm up with a sample as long as the timed one: its
    buffers (and graphs) are sized by the longest sample so far.
    """
    generator = torch.Generator(device="cuda").manual_seed(0)
    inference.generate([1], warm_up, generator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    inference.generate([1], tokens, generator)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2-135m,pythia-160m,qwen2.5-0.5b")
    parser.add_argument("--blocks", default="100", help="100: the paper's window; 1024: full context")
    parser.add_argument("--tokens", type=int, default=1024, help="new tokens (block - 1 where that is fewer)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| model | parameters | block | tokens | eager s | graphs s | graphs + torch.compile s | speed-up | ms a token |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        model = build_model(name)
        params = sum(p.numel() for p in model.parameters())
        for block in (int(b) for b in args.blocks.split(",")):
            tokens = (
                args.tokens if block < args.tokens else block - 1
            )  # else: full context, as in bench_iteration
            eager = EagerInference(model, block, 1.0, 200, torch.bfloat16)
            eager_s = sample_seconds(eager, tokens, warm_up=min(tokens, 2 * block + 8))
            del eager
            seconds = []
            for compile in (False, True):
                graphed = GraphedInference(model, block, 1.0, 200, torch.bfloat16, compile=compile)
                seconds.append(sample_seconds(graphed, tokens, warm_up=tokens))
                print(f"  {graphed.description}", flush=True)
                del graphed
                torch.cuda.empty_cache()
            print(
                f"| {name} | {params / 1e6:.0f}M | {block} | {tokens} | {eager_s:.2f} | {seconds[0]:.3f} "
                f"| {seconds[1]:.3f} | {eager_s / seconds[1]:.1f}× | {seconds[1] / tokens * 1e3:.2f} |",
                flush=True,
            )
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
