"""The graphed path for any causal LM, on the CPU (no graphs): same tokens as the eager path, fresh weights.

On CUDA the same steps are captured in CUDA graphs (tests/test_graphed_gpu.py);
here they run one by one and must sample, from the same draws, exactly the
tokens ``EagerInference`` samples.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from collapse_tui.errors import RunInterrupted
from collapse_tui.fast import fast_inference_for
from collapse_tui.fast.graphed import GenerationCopy, GraphedInference
from collapse_tui.inference import EagerInference

VOCAB = 300


def tiny_llama(seed: int = 0, tied: bool = True) -> LlamaForCausalLM:
    """Two layers, grouped-query attention, rotary positions, lm_head tied to the embedding (or not)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def graphed_cpu(model: torch.nn.Module, block: int, dtype: torch.dtype | None = None) -> GraphedInference:
    return GraphedInference(model, block, 1.0, 50, autocast_dtype=dtype, use_graphs=False)


@pytest.mark.parametrize(
    ("block", "prompt_len", "gen_tokens"),
    [(16, 3, 40), (16, 20, 10), (8, 1, 30)],
    ids=["sliding", "long-prompt", "short-block"],
)
def test_sliding_window_generation_matches_eager_token_for_token(
    block: int, prompt_len: int, gen_tokens: int
) -> None:
    model = tiny_llama()
    prompt = list(range(7, 7 + prompt_len))
    graphed = graphed_cpu(model, block)
    ours = graphed.generate(prompt, gen_tokens, torch.Generator().manual_seed(5))
    theirs = EagerInference(model, block, 1.0, 50).generate(
        prompt, gen_tokens, torch.Generator().manual_seed(5)
    )
    assert list(graphed._steps) == [False]  # the window steps ran, not the eager path
    assert len(ours) == prompt_len + gen_tokens
    assert ours == theirs


@pytest.mark.parametrize(
    ("block", "prompt_len", "gen_tokens"),
    [(64, 1, 40), (64, 5, 40), (44, 1, 43)],
    ids=["full", "full-prompt", "full-exact-fit"],
)
def test_full_context_generation_against_a_static_cache_matches_eager(
    block: int, prompt_len: int, gen_tokens: int
) -> None:
    model = tiny_llama()
    prompt = list(range(3, 3 + prompt_len))
    graphed = graphed_cpu(model, block)
    ours = graphed.generate(prompt, gen_tokens, torch.Generator().manual_seed(2))
    assert list(graphed._steps) == [True]  # the cached steps ran, not the eager path
    eager = EagerInference(model, block, 1.0, 50)
    assert ours == eager.generate(prompt, gen_tokens, torch.Generator().manual_seed(2))


def test_the_static_cache_is_emptied_for_each_sample() -> None:
    """A second, shorter sample must not see the keys the first one left in the cache."""
    model = tiny_llama()
    graphed, eager = graphed_cpu(model, 64), EagerInference(model, 64, 1.0, 50)
    for prompt, gen_tokens in (([1, 2, 3, 4], 50), ([9, 8], 20), ([5], 30)):
        seeds = torch.Generator().manual_seed(len(prompt)), torch.Generator().manual_seed(len(prompt))
        assert graphed.generate(prompt, gen_tokens, seeds[0]) == eager.generate(prompt, gen_tokens, seeds[1])


def test_a_model_without_a_static_cache_keeps_the_eager_kv_cache(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_static_cache(self: GraphedInference, first: torch.Tensor) -> None:
        raise TypeError("this model has no static cache")

    monkeypatch.setattr(GraphedInference, "new_static_cache", no_static_cache)
    model = tiny_llama()
    graphed = graphed_cpu(model, block=64)
    ours = graphed.generate([1], 40, torch.Generator().manual_seed(2))
    assert "full-context steps not graphed (TypeError: this model has no static cache)" in caplog.text
    assert graphed.eager_full_context and not graphed._steps
    assert ours == EagerInference(model, 64, 1.0, 50).generate([1], 40, torch.Generator().manual_seed(2))
    graphed.generate([1], 40, torch.Generator().manual_seed(2))
    assert caplog.text.count("full-context steps not graphed") == 1  # tried once, not every sample


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_copy_computes_what_autocast_computes_from_the_master(tied: bool) -> None:
    model = tiny_llama(tied=tied)
    weights = GenerationCopy(model, torch.bfloat16)
    copy = weights.module
    linears = [m for m in copy.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 15 and all(m.weight.dtype == torch.bfloat16 for m in linears)
    # untied: the embedding, and with it the residual stream, stays fp32 as under autocast
    assert copy.model.embed_tokens.weight.dtype == torch.float32
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied  # the master is left as it was
    masters = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in masters for p in copy.parameters())  # nothing shared with the master
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(copy(tokens).logits, model(tokens).logits)


def test_an_optimizer_step_reaches_the_copy() -> None:
    model = tiny_llama()
    graphed = graphed_cpu(model, block=16, dtype=torch.bfloat16)
    weights = graphed.weights
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(tokens, labels=torch.full_like(tokens, 42)).loss.backward()
    optimizer.step()
    assert weights.stale()
    changed = weights.module.model.embed_tokens.weight.clone()
    graphed.weights_changed()
    assert not weights.stale()
    assert not torch.equal(weights.module.model.embed_tokens.weight, changed)
    for master, twin in zip(model.parameters(), weights.module.parameters(), strict=False):
        assert torch.equal(twin, master.detach().to(twin.dtype))
    assert torch.equal(weights.module.lm_head.weight, model.lm_head.weight.detach().to(torch.bfloat16))


def test_a_stale_copy_is_refreshed_before_generating() -> None:
    model = tiny_llama()
    graphed = graphed_cpu(model, block=8, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)  # in place, no weights_changed: the version counter tells
    graphed.generate([1, 2], 20, torch.Generator().manual_seed(0))
    assert torch.equal(graphed.weights.module.model.norm.weight, model.model.norm.weight)


def test_stop_request_interrupts_generation() -> None:
    graphed = graphed_cpu(tiny_llama(), 8)
    with pytest.raises(RunInterrupted):
        graphed.generate([1], 100, torch.Generator().manual_seed(0), should_stop=lambda: True)


def test_no_fast_inference_off_cuda() -> None:
    assert fast_inference_for(tiny_llama(), block=16, temperature=1.0, top_k=50, autocast_dtype=None) is None


def test_a_model_that_does_not_compile_generates_uncompiled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_compile(module: torch.nn.Module, **options: object):
        def compiled(*args: object, **kwargs: object):
            raise RuntimeError("inductor cannot build this\nsecond line")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    model = tiny_llama()
    graphed = GraphedInference(model, 8, 1.0, 50, use_graphs=False, compile=True)
    ours = graphed.generate([1, 2], 30, torch.Generator().manual_seed(4))
    assert "torch.compile of the model failed (RuntimeError: inductor cannot build this)" in caplog.text
    assert graphed.forward is graphed.weights.module
    assert "compiled" not in graphed.description
    assert ours == EagerInference(model, 8, 1.0, 50).generate([1, 2], 30, torch.Generator().manual_seed(4))


@pytest.mark.parametrize(("block", "kv"), [(8, False), (64, True)], ids=["window", "cache"])
def test_prepare_builds_the_steps_the_first_sample_uses(block: int, kv: bool) -> None:
    model = tiny_llama()
    graphed = graphed_cpu(model, block)
    assert graphed.preparing
    graphed.prepare(2, 40)
    prepared = graphed._steps[kv]
    ours = graphed.generate([1, 2], 40, torch.Generator().manual_seed(1))
    assert graphed._steps == {kv: prepared}  # not built again
    assert ours == EagerInference(model, block, 1.0, 50).generate(
        [1, 2], 40, torch.Generator().manual_seed(1)
    )


def test_evaluation_takes_as_many_windows_a_forward_as_the_logits_allow() -> None:
    model = tiny_llama()
    graphed = graphed_cpu(model, block=16)
    assert graphed.eval_batch == (1 << 30) // (16 * VOCAB * 6)  # bf16 logits and their fp32 copy
    windows = torch.randint(0, VOCAB, (40, 17), generator=torch.Generator().manual_seed(3))
    ours, count = graphed.loss_sum(windows)
    theirs, their_count = EagerInference(model, 16, 1.0, 50).loss_sum(windows)  # 16 windows a forward
    assert count == their_count == 40 * 16
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_bf16_evaluation_reads_the_copy_and_computes_what_autocast_over_the_master_computes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The copy holds the weights as autocast casts them: the same loss, exactly, without the master's forward.

    A change to the master that nobody announced (the version counter tells) reaches the loss too.
    """
    model = tiny_llama()
    graphed = graphed_cpu(model, block=16, dtype=torch.bfloat16)
    windows = torch.randint(0, VOCAB, (6, 17), generator=torch.Generator().manual_seed(8))
    eager = EagerInference(model, 16, 1.0, 50, autocast_dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    theirs = eager.loss_sum(windows)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluation ran the master's forward")

    monkeypatch.setattr(model, "forward", refuse)
    assert graphed.loss_sum(windows) == theirs


class _IntOnlyLogitsToKeep(LlamaForCausalLM):
    """A model whose ``logits_to_keep`` takes a count only, as before transformers 4.50 or in custom code."""

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        if isinstance(logits_to_keep, torch.Tensor):
            raise TypeError("logits_to_keep must be an int")
        return super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the eager path's cache argument, by its older name
def test_a_forward_that_keeps_no_given_positions_computes_all_logits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _IntOnlyLogitsToKeep(tiny_llama().config).eval()
    model.load_state_dict(tiny_llama().state_dict())
    graphed = graphed_cpu(model, block=8)
    ours = graphed.generate([1, 2], 30, torch.Generator().manual_seed(6))
    assert (
        "the forward took no positions as logits_to_keep (TypeError: logits_to_keep must be an int)"
        in caplog.text
    )
    assert not graphed.keeps_given_logits
    assert ours == EagerInference(model, 8, 1.0, 50).generate([1, 2], 30, torch.Generator().manual_seed(6))


def test_the_eager_kv_cache_uses_the_forwards_own_name_for_it() -> None:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns when the old one is read.

    The engine silences transformers' warnings, but scripts and notebooks
    that use the inference classes directly would see it.
    """
    import io
    import logging

    from transformers.utils import logging as transformers_logging

    model = tiny_llama()
    eager = EagerInference(model, 16, 1.0, 50)
    if eager._cache_argument != "cache":
        pytest.skip("this transformers release knows only past_key_values")
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    library = transformers_logging.get_logger("transformers")
    verbosity = transformers_logging.get_verbosity()
    library.addHandler(handler)
    transformers_logging.set_verbosity_warning()
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers warns once a process
    try:
        eager.generate([1, 2], 6, torch.Generator().manual_seed(0))
    finally:
        transformers_logging.set_verbosity(verbosity)
        library.removeHandler(handler)
    assert "deprecated" not in seen.getvalue()
