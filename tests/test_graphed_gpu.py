"""The graphed path for any causal LM on a CUDA device: captured graphs, the eager tokens, the weight update.

Marked ``gpu`` and skipped without CUDA (CI has none); run on a GPU box with
``pytest -m gpu tests/test_graphed_gpu.py``. The model is a small Llama with
random weights (no download).
"""

from __future__ import annotations

import pytest
import torch
from gpu import teach_to_say
from transformers import LlamaConfig, LlamaForCausalLM

from collapse_tui.fast import GraphedInference, fast_inference_for
from collapse_tui.fast.steps import StepLoop
from collapse_tui.inference import EagerInference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = 32000


def llama_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.eval()


def cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def graphed_for(model: torch.nn.Module, block: int, top_k: int | None = 200, dtype=torch.bfloat16):
    graphed = fast_inference_for(model, block=block, temperature=1.0, top_k=top_k, autocast_dtype=dtype)
    assert isinstance(graphed, GraphedInference)
    return graphed


@pytest.mark.parametrize(
    ("block", "gen_tokens"), [(32, 150), (100, 200), (256, 150)], ids=["slide", "pad-then-slide", "kv"]
)
def test_fp32_graphs_generate_the_eager_tokens(block: int, gen_tokens: int) -> None:
    """Graph replay, padding, window slide and static cache against ``EagerInference``, fp32, same draws."""
    model = llama_model()
    prompt = [11, 12, 13]
    graphed = graphed_for(model, block, dtype=None)
    ours = graphed.generate(prompt, gen_tokens, cuda_gen(1))
    kv = block >= len(prompt) + gen_tokens - 1
    assert list(graphed._steps) == [kv] and graphed._steps[kv].graph is not None, graphed.description
    assert "compiled" in graphed.description  # torch.compile is the default on CUDA
    # the graphs' generator is seeded from the caller's: reproduce that seed for the eager paths
    seed = StepLoop.graph_seed(cuda_gen(1))
    eager_steps = GraphedInference(model, block, 1.0, 200, use_graphs=False)
    assert eager_steps.generate(prompt, gen_tokens, cuda_gen(seed)) == ours
    assert EagerInference(model, block, 1.0, 200).generate(prompt, gen_tokens, cuda_gen(seed)) == ours


@pytest.mark.parametrize("block", [100, 512], ids=["window", "cache"])
def test_generation_is_deterministic_given_the_seed(block: int) -> None:
    graphed = graphed_for(llama_model(), block)
    a = graphed.generate([1], 300, cuda_gen(7))
    b = graphed.generate([1], 300, cuda_gen(7))
    c = graphed.generate([1], 300, cuda_gen(8))
    assert a == b
    assert a != c
    assert len(set(a)) > 50  # fresh draws every token, not one replayed draw


@pytest.mark.parametrize("notify", [True, False], ids=["weights_changed", "optimizer-hook"])
def test_the_next_generation_uses_the_updated_weights(notify: bool) -> None:
    """Captured graphs read the bf16 copy, which the update refreshes in place."""
    model = llama_model()
    graphed = graphed_for(model, 32, top_k=1)
    before = graphed.generate([5], 64, cuda_gen(0))  # captures the graphs with the old weights
    assert graphed._steps[False].graph is not None
    assert before.count(42) < 10
    teach_to_say(model, 42, VOCAB, graphed.weights_changed if notify else lambda: None)
    after = graphed.generate([5], 64, cuda_gen(0))
    assert after[1:].count(42) > 48
