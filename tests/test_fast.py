"""The fast GPT-2 path on the CPU (fp32, no graphs): same function, same tokens as the eager path.

On CUDA the same code runs in bf16 inside CUDA graphs (tests/test_fast_gpu.py);
here it must match ``GPT2LMHeadModel`` and ``EagerInference`` exactly enough
that sampled sequences agree token for token.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from collapse_tui.errors import RunInterrupted
from collapse_tui.fast import FastGPT2Inference, fast_inference_for, kernels
from collapse_tui.fast.gpt2 import unsupported_reason
from collapse_tui.fast.inference import PAD, _Decoder
from collapse_tui.fast.kernels import add_layernorm, linear_gelu, token_losses
from collapse_tui.inference import EagerInference, sequence_windows

VOCAB = 300


def tiny_model(seed: int = 0, n_positions: int = 128) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=n_positions,
        n_layer=2,
        n_head=4,
        n_embd=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def fast_cpu(model: torch.nn.Module, block: int, top_k: int | None = 50) -> FastGPT2Inference:
    return FastGPT2Inference(model, block, 1.0, top_k, dtype=torch.float32, use_graphs=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_logits_match_hugging_face() -> None:
    model = tiny_model()
    fast = fast_cpu(model, block=32)
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens).logits
        logits = fast.weights.logits(fast.weights.hidden(tokens))
    assert rel_err(logits, reference) < 1e-5


@pytest.mark.parametrize(
    ("block", "prompt_len", "gen_tokens"),
    [(16, 3, 40), (16, 20, 10), (64, 1, 40), (64, 5, 40), (44, 1, 43)],
    ids=["sliding", "long-prompt", "full", "full-prompt", "full-exact-fit"],
)
def test_generation_matches_eager_token_for_token(block: int, prompt_len: int, gen_tokens: int) -> None:
    model = tiny_model()
    prompt = list(range(7, 7 + prompt_len))
    fast = fast_cpu(model, block)
    eager = EagerInference(model, block, 1.0, 50)
    ours = fast.generate(prompt, gen_tokens, torch.Generator().manual_seed(5))
    theirs = eager.generate(prompt, gen_tokens, torch.Generator().manual_seed(5))
    assert len(ours) == prompt_len + gen_tokens
    assert ours == theirs


def test_generation_twice_reuses_buffers_and_stays_exact() -> None:
    model = tiny_model()
    fast, eager = fast_cpu(model, 16), EagerInference(model, 16, 1.0, 50)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for gen_tokens in (30, 30, 70):
        assert fast.generate([1, 2], gen_tokens, g1) == eager.generate([1, 2], gen_tokens, g2)


@pytest.mark.parametrize("length", [16, 100])
def test_loss_sum_matches_eager(length: int) -> None:
    model = tiny_model()
    windows = torch.randint(0, VOCAB, (9, length + 1), generator=torch.Generator().manual_seed(2))
    ours = fast_cpu(model, length).loss_sum(windows)
    theirs = EagerInference(model, length, 1.0, None).loss_sum(windows)
    assert ours[1] == theirs[1] == 9 * length
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)


def test_mean_loss_over_sequence_windows() -> None:
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (95,), generator=torch.Generator().manual_seed(4)).tolist()
    groups = sequence_windows(ids, 16)
    ours = fast_cpu(model, 16).mean_loss(groups)
    assert ours == pytest.approx(EagerInference(model, 16, 1.0, None).mean_loss(groups), rel=1e-5)


def test_mean_losses_of_several_sets_in_one_batch_match_each_alone() -> None:
    """The engine's evaluation: the generated text (full windows and a short rest) and two held-out sets of
    other widths, padded into one batch; each set's mean is still over its own tokens only."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(11)
    text = sequence_windows(torch.randint(0, VOCAB, (60,), generator=gen).tolist(), 16)
    held_out = [torch.randint(0, VOCAB, (5, 17), generator=gen)]
    short = [torch.randint(0, VOCAB, (3, 9), generator=gen)]
    eager = EagerInference(model, 16, 1.0, None)
    means = fast_cpu(model, 16).mean_losses([text, held_out, [], short])
    assert means[0] == pytest.approx(eager.mean_loss(text), rel=1e-5)
    assert means[1] == pytest.approx(eager.mean_loss(held_out), rel=1e-5)
    assert means[2] != means[2]  # an empty set: NaN, as mean_loss gives
    assert means[3] == pytest.approx(eager.mean_loss(short), rel=1e-5)
    assert len({round(m, 6) for m in (means[0], means[1], means[3])}) == 3  # three sets, three means


try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True


@pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs under Triton's interpreter (machines without a GPU); on GPUs see test_fast_gpu.py",
)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, on purpose
@pytest.mark.parametrize(("vocab", "stride"), [(5000, 5008), (300, 300)], ids=["two-blocks", "under-a-block"])
def test_token_losses_kernel_matches_cross_entropy(vocab: int, stride: int) -> None:
    """The Triton cross-entropy on bf16 logits (a view of padded rows, as lm_head gives them): a padded
    target scores 0, a row with a NaN or +inf logit scores NaN and one with -inf does not (as torch's),
    the rest match torch's within fp32 rounding."""
    gen = torch.Generator().manual_seed(12)
    logits = (torch.randn(5, stride, generator=gen) * 4).to(torch.bfloat16)[:, :vocab]
    targets = torch.randint(0, vocab, (5,), generator=gen)
    targets[1] = PAD
    expected = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none", ignore_index=PAD)
    kernel = kernels._triton_token_losses()
    assert kernel is not None
    ours = kernel(logits, targets, PAD)
    assert ours[1] == 0.0
    assert torch.allclose(ours, expected, atol=1e-5)
    logits[3, 7], logits[4, 0], logits[0, 5] = float("nan"), float("inf"), float("-inf")
    expected = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none", ignore_index=PAD)
    ours = kernel(logits, targets, PAD)
    assert torch.isnan(expected[3:]).all() and torch.isnan(ours[3:]).all()
    assert torch.allclose(ours[:3], expected[:3], atol=1e-5)  # a -inf logit adds nothing, as in torch
    # off CUDA the dispatcher takes torch's, whatever use_triton says
    assert torch.equal(token_losses(logits, targets, PAD, use_triton=True)[:3], expected[:3])


@pytest.mark.parametrize("notify", [True, False], ids=["weights_changed", "optimizer-hook"])
def test_an_optimizer_step_is_seen_by_the_next_forward(notify: bool) -> None:
    model = tiny_model()
    fast = fast_cpu(model, 16)
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = fast.weights.logits(fast.weights.hidden(tokens))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    loss = model(tokens, labels=torch.full_like(tokens, 42)).loss
    loss.backward()
    optimizer.step()
    if notify:
        fast.weights_changed()
    else:
        assert fast.weights.stale()
    windows = torch.cat([tokens, tokens[:, :1]], dim=1)
    assert fast.loss_sum(windows)[0] == pytest.approx(  # loss_sum refreshes a stale copy itself
        EagerInference(model, 16, 1.0, None).loss_sum(windows)[0], rel=1e-5
    )
    assert not fast.weights.stale()
    with torch.no_grad():
        reference = model(tokens).logits
        after = fast.weights.logits(fast.weights.hidden(tokens))
    assert rel_err(after, reference) < 1e-5
    assert rel_err(after, before) > 1e-2


def test_stop_request_interrupts_generation() -> None:
    fast = fast_cpu(tiny_model(), 16)
    with pytest.raises(RunInterrupted):
        fast.generate([1], 100, torch.Generator().manual_seed(0), should_stop=lambda: True)


def test_fast_inference_is_for_cuda_gpt2_only() -> None:
    model = tiny_model()
    assert fast_inference_for(model, block=16, temperature=1.0, top_k=50, autocast_dtype=None) is None
    assert unsupported_reason(model) is None
    other = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))
    assert unsupported_reason(other) == "not a GPT-2 model"  # type: ignore[arg-type]
    model.config.activation_function = "relu"
    assert unsupported_reason(model) is not None


def test_fused_helpers_fall_back_to_torch() -> None:
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(5, 64, generator=gen)
    y, bias = torch.randn(5, 64, generator=gen), torch.randn(64, generator=gen)
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    expected_h = h + y + bias
    out = add_layernorm(h, y, bias, w, b, 1e-5, torch.float32, use_triton=True)
    assert torch.allclose(h, expected_h)
    assert torch.allclose(out, torch.nn.functional.layer_norm(expected_h, (64,), w, b, 1e-5), atol=1e-5)
    x, weight = torch.randn(3, 64, generator=gen), torch.randn(32, 64, generator=gen)
    expected = torch.nn.functional.gelu(x @ weight.T + bias[:32], approximate="tanh")
    assert torch.allclose(linear_gelu(x, weight, bias[:32], fused=False), expected, atol=1e-5)


def test_chunks_cover_the_tokens_largest_first() -> None:
    """Graph replays: the largest captured chunk while it fits, then smaller ones, summing exactly."""
    fast = fast_cpu(tiny_model(), 16)
    decoder = fast._decoder(kv=False, total=200)
    assert list(decoder._chunks(5)) == [1] * 5  # no graphs on the CPU: one step at a time
    decoder.graphs = {size: None for size in (1, 2, 4, 8)}  # type: ignore[misc]
    assert list(decoder._chunks(27)) == [8, 8, 8, 2, 1]
    assert list(decoder._chunks(3)) == [2, 1]


def test_add_layernorm_sums_split_k_partials() -> None:
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(5, 64, generator=gen)
    partials = torch.randn(4, 5, 64, generator=gen)
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    expected_h = h + partials.sum(0)
    out = add_layernorm(h, partials, None, w, b, 1e-5, torch.float32, use_triton=True)
    assert torch.allclose(h, expected_h, atol=1e-6)
    assert torch.allclose(out, torch.nn.functional.layer_norm(expected_h, (64,), w, b, 1e-5), atol=1e-5)


class _BrokenForward:
    """Stands in for a window's persistent forward that does not build, or whose barrier gave up.

    When it runs it computes the right row (as the layer-by-layer forward), so
    only ``failed`` tells that its sample is not to be trusted. With
    ``broken=False`` it is a kernel that works.
    """

    def __init__(self, weights, block: int, raises: bool, broken: bool = True) -> None:
        self.weights, self.block, self.raises, self.broken = weights, block, raises, broken
        self.runs = 0

    def run_sequence(self, seq: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
        if self.raises:
            raise ValueError("no kernel for this GPU")
        self.runs += 1
        target = int(counter)
        start = max(0, target - self.block)
        window = seq[start : start + self.block].view(1, -1)
        return self.weights.hidden(window)[0, min(target, self.block) - 1].view(1, -1)

    def failed(self) -> bool:
        return self.broken


@pytest.mark.parametrize(
    ("raises", "logged"),
    [(True, "ValueError: no kernel for this GPU"), (False, "a grid barrier or poll gave up")],
    ids=["does-not-build", "barrier-gave-up"],
)
def test_a_failing_persistent_forward_is_dropped_before_generating(
    raises: bool, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model()
    fast = fast_cpu(model, block=16)
    decoder = fast._decoder(False, 64)
    decoder.persistent = _BrokenForward(fast.weights, 16, raises)
    decoder.check_persistent()
    assert decoder.persistent is None
    assert f"_BrokenForward dropped ({logged}): generating with layer by layer" in caplog.text
    ids = fast.generate([1, 2, 3], 40, torch.Generator().manual_seed(0))
    seed = torch.Generator().manual_seed(0)
    assert ids == EagerInference(model, 16, 1.0, 50).generate([1, 2, 3], 40, seed)


def test_a_failing_kernel_hands_over_to_the_next_in_line(caplog: pytest.LogCaptureFixture) -> None:
    """As the CUDA cluster kernel does to the Triton one: checked before generating, and after a sample."""
    model = tiny_model()
    fast = fast_cpu(model, block=16)
    decoder = fast._decoder(False, 64)
    broken = _BrokenForward(fast.weights, 16, raises=False)
    first, second = (_BrokenForward(fast.weights, 16, raises=False, broken=False) for _ in range(2))
    decoder.persistent, decoder.fallbacks = broken, [first, second]
    decoder.check_persistent()
    assert decoder.persistent is first and decoder.fallbacks == [second]
    assert "_BrokenForward dropped (a grid barrier or poll gave up)" in caplog.text
    ids = fast.generate([1, 2, 3], 40, torch.Generator().manual_seed(0))
    assert first.runs == 2 + 26 and second.runs == 0  # its warm-up, then the window's steps (14 cached)
    first.broken = True  # gives up during the next sample: that sample runs again on the second
    again = fast.generate([1, 2, 3], 40, torch.Generator().manual_seed(0))
    assert decoder.persistent is second and second.runs == 2 + 26  # checked before it took over
    seed = torch.Generator().manual_seed(0)
    assert ids == EagerInference(model, 16, 1.0, 50).generate([1, 2, 3], 40, seed)
    assert len(again) == 43


def test_a_barrier_that_gave_up_during_a_sample_regenerates_its_window_part(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found after the sample: the window part runs again layer by layer, after the same cached start."""
    samples = []
    for _ in range(2):
        fast = fast_cpu(tiny_model(), block=16)
        fast.prepare(3, 40)
        decoder = fast._decoders[False]
        decoder.persistent = _BrokenForward(fast.weights, 16, raises=False)
        cached_start = fast.generate([1, 2, 3], 14, torch.Generator().manual_seed(4))  # full context
        samples.append(fast.generate([1, 2, 3], 40, torch.Generator().manual_seed(4)))
        assert decoder.persistent is None  # dropped for good
        assert samples[-1][:17] == cached_start
        assert len(samples[-1]) == 43
    assert "a grid barrier or poll gave up during a sample): generating with layer by layer" in caplog.text
    assert samples[0] == samples[1]


@pytest.mark.parametrize(("block", "kinds"), [(16, {True, False}), (64, {True})], ids=["window", "cache"])
def test_prepare_builds_the_decoders_the_first_sample_uses(block: int, kinds: set[bool]) -> None:
    """A window sample takes both decoders (it starts on the KV cache), a full-context one only the cache's."""
    model = tiny_model()
    fast = fast_cpu(model, block)
    assert fast.preparing
    fast.prepare(3, 40)
    prepared = dict(fast._decoders)
    assert set(prepared) == kinds
    ours = fast.generate([1, 2, 3], 40, torch.Generator().manual_seed(1))
    assert fast._decoders == prepared  # none built again
    assert ours == EagerInference(model, block, 1.0, 50).generate(
        [1, 2, 3], 40, torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize(
    ("prompt_len", "cached", "windowed"),
    [(1, 16, 24), (3, 14, 26), (16, 1, 39), (17, 0, 40), (30, 0, 40)],
    ids=["one-token-prompt", "short-prompt", "prompt-of-a-block", "prompt-past-the-block", "long-prompt"],
)
def test_a_window_sample_starts_on_the_kv_cache(
    prompt_len: int, cached: int, windowed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens that still see the sequence from position 0 (up to block + 1 in all) come from the cache, exactly."""
    model = tiny_model()
    block = 16
    fast = fast_cpu(model, block)
    steps = {True: 0, False: 0}
    real_step = _Decoder.step

    def counted(decoder: _Decoder, generator: torch.Generator) -> None:
        steps[decoder.kv] += 1
        real_step(decoder, generator)

    prompt = list(range(5, 5 + prompt_len))
    fast.prepare(prompt_len, 40)
    monkeypatch.setattr(_Decoder, "step", counted)
    ours = fast.generate(prompt, 40, torch.Generator().manual_seed(2))
    assert steps == {True: cached, False: windowed}
    assert ours == EagerInference(model, block, 1.0, 50).generate(
        prompt, 40, torch.Generator().manual_seed(2)
    )
