"""The persistent forward kernels under Triton's interpreter, against the layer-by-layer forward.

The interpreter runs programs one after another on the CPU, so the kernel
tests launch one program: it does every stage's items itself, and each grid
barrier is passed by its own arrival. What they check is the arithmetic and
the indexing of every stage (embedding, layer norms with split-K partial
sums, products and their epilogues, causal attention from the window or
from the cache, the cache writes); the barrier across real CTAs is checked
on the GPU (tests/test_fast_gpu.py). They need Triton and run only on
machines without a GPU, where tests/conftest.py selects the interpreter.
What the interpreter does not check, the compiler's types, is checked by
building every launch for sm_90 (scripts/compile_kernels.py); the plans'
rules need neither.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from collapse_tui.fast import persistent
from collapse_tui.fast.gpt2 import GPT2Weights

try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
interpreted = pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs under Triton's interpreter (machines without a GPU); on GPUs see test_fast_gpu.py",
)


def tiny_weights(n_layer: int = 2, n_embd: int = 128, n_head: int = 2) -> GPT2Weights:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=64, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and norms away from their 0/1 initialisation, to be checked too
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return GPT2Weights(model, torch.bfloat16)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@interpreted
@pytest.mark.parametrize(("rows", "block_q"), [(20, 32), (32, 16), (7, 32), (40, 16)])
def test_window_forward_matches_layer_by_layer(rows: int, block_q: int) -> None:
    """``block_q`` 16: attention in blocks of query rows (40 rows: the third block part empty, the fourth empty)."""
    weights = tiny_weights()
    tokens = torch.randint(0, 97, (rows,), generator=torch.Generator().manual_seed(rows))
    plan = persistent.Plan(proj_splits=2, out_splits=4, block_q=block_q)
    forward = persistent.PersistentForward(weights, rows, plan=plan)
    out = forward.run(tokens)
    forward.check()
    with torch.no_grad():
        reference = weights.hidden(tokens.view(1, rows))[0]
    assert out.dtype == torch.bfloat16
    assert rel_err(out[:rows], reference) < 2e-2


@interpreted
@pytest.mark.parametrize(
    ("n_embd", "n_head", "plan"),
    [
        (64, 4, persistent.Plan(proj_splits=1, out_splits=4, block_q=16)),  # tiles (32) wider than heads (16)
        (
            256,
            2,
            persistent.Plan(block_n=16, proj_splits=4, out_splits=4),
        ),  # K splits (64) inside a head (128)
    ],
    ids=["wide-tiles", "split-heads"],
)
def test_the_flags_count_what_the_plan_expects_for_other_head_and_tile_sizes(
    n_embd: int, n_head: int, plan: persistent.Plan
) -> None:
    """``check()`` compares every flag's count with ``flag_counts``; both kernels, against layer by layer."""
    weights = tiny_weights(n_embd=n_embd, n_head=n_head)
    tokens = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(5))
    window = persistent.PersistentForward(weights, 20, plan=plan)
    out = window.run(tokens)
    window.check()
    with torch.no_grad():
        assert rel_err(out[:20], weights.hidden(tokens.view(1, 20))[0]) < 2e-2
        cache = weights.new_kv_cache(32)
        weights.hidden(tokens[:4].view(1, 4), cache)  # prefill, as the decoder does
        reference = weights.hidden(tokens[:5].view(1, 5), cache.clone())[0, -1]
    decode = persistent.PersistentForward(weights, 1, cache=cache, plan=dataclasses.replace(plan, chunk=8))
    assert decode.matvec
    out = decode.run(tokens[4:5], torch.tensor([4]))
    decode.check()
    assert rel_err(out[0], reference) < 2e-2


@interpreted
@pytest.mark.parametrize("matvec", [True, False], ids=["decode_kernel", "forward_kernel"])
@pytest.mark.parametrize(("length", "cache_len", "chunk"), [(1, 16, 4), (12, 16, 4), (40, 48, 16)])
def test_cached_decode_matches_layer_by_layer_and_fills_the_cache(
    matvec: bool, length: int, cache_len: int, chunk: int
) -> None:
    """Both kernels; decode_kernel's keys in chunks (48 slots: 3 chunks of 16 and an empty 4th)."""
    weights = tiny_weights()
    tokens = torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(3))
    cache = weights.new_kv_cache(cache_len)
    plan = dataclasses.replace(persistent.default_plan(128, 1), block_kv=16, chunk=chunk, matvec=matvec)
    forward = persistent.PersistentForward(weights, 1, cache=cache, plan=plan)
    assert forward.matvec == matvec
    with torch.no_grad():
        if length > 1:
            weights.hidden(tokens[: length - 1].view(1, -1), cache)  # prefill, as the decoder does
        reference_cache = cache.clone()
        reference = weights.hidden(tokens.view(1, length), reference_cache)[0, -1]
    position = torch.tensor([length - 1])
    out = forward.run(tokens[length - 1 :], position)
    forward.check()
    assert rel_err(out[0], reference) < 2e-2
    # the new token's keys and values went to slot length-1, the rest untouched
    assert rel_err(cache[:, :, :, length - 1], reference_cache[:, :, :, length - 1]) < 2e-2
    assert torch.equal(cache[:, :, :, : length - 1], reference_cache[:, :, :, : length - 1])
    assert not cache[:, :, :, length:].any()


@interpreted
def test_a_weight_change_is_seen_by_the_next_launch() -> None:
    weights = tiny_weights(n_layer=1)
    tokens = torch.arange(10)
    forward = persistent.PersistentForward(weights, 10)
    before = forward.run(tokens).clone()
    with torch.no_grad():
        weights.layers[0].fc_w.mul_(2.0)  # the copy the kernel reads, in place
    after = forward.run(tokens)
    assert not torch.equal(before[:10], after[:10])


@pytest.mark.parametrize(
    ("head_dim", "shared_bytes", "deep"),
    [
        (64, None, True),  # off CUDA, or torch does not say: the H100/H200 plan
        (64, 232_448, True),  # H100, H200 (sm_90)
        (64, 166_912, True),  # A100 (sm_80)
        (64, 101_376, False),  # RTX 30xx/40xx (sm_86, sm_89): 99 KB a CTA
        (128, 232_448, True),
        (128, 166_912, False),  # heads of 128 take about twice the shared memory
    ],
)
def test_a_window_plan_takes_four_stages_only_where_a_cta_has_the_shared_memory(
    head_dim: int, shared_bytes: int | None, deep: bool
) -> None:
    window = persistent.default_plan(1024, 100, head_dim, shared_bytes)
    assert (window.stages, window.block_kv) == ((4, 128) if deep else (3, 64))
    cached = persistent.default_plan(1024, 1, head_dim, shared_bytes)  # the same on every GPU
    assert (cached.stages, cached.block_kv, cached.block_k) == (3, 64, 128)


@pytest.mark.parametrize(
    ("told", "capability", "expected"),
    [(200_000, (9, 0), 200_000), (None, (9, 0), 232_448), (None, (8, 9), 101_376), (None, (8, 0), 166_912)],
    ids=["torch-says", "h100-by-capability", "rtx-4090-by-capability", "a100-by-capability"],
)
def test_shared_memory_per_block_comes_from_torch_or_else_from_the_capability(
    monkeypatch: pytest.MonkeyPatch, told: int | None, capability: tuple[int, int], expected: int
) -> None:
    props = (
        types.SimpleNamespace() if told is None else types.SimpleNamespace(shared_memory_per_block_optin=told)
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    assert persistent.shared_memory_per_block(torch.device("cuda", 0)) == expected
    assert persistent.shared_memory_per_block(torch.device("cpu")) is None


def test_default_plan_splits_k_into_whole_steps() -> None:
    assert persistent.default_plan(1024).proj_splits == 4
    assert persistent.default_plan(1600).proj_splits == 5
    assert persistent.default_plan(128).proj_splits == 2
    with pytest.raises(ValueError):
        persistent.check_plan(persistent.Plan(proj_splits=4), 128)
    assert persistent.supported_reason(1024, 16, 100, torch.bfloat16) is None
    assert persistent.supported_reason(1024, 16, 200, torch.bfloat16) is not None
    assert persistent.supported_reason(1024, 16, 100, torch.float32) is not None
    assert persistent.supported_reason(1024, 16, 100, torch.float16) is not None
    assert (
        persistent.supported_reason(128, 16, 100, torch.bfloat16) is not None
    )  # heads of 8: tl.dot needs 16
    for bad in (dict(block_n=24), dict(block_kv=8), dict(chunk=12), dict(proj_splits=32)):
        with pytest.raises(ValueError):
            persistent.check_plan(dataclasses.replace(persistent.default_plan(1024), **bad), 1024)


@needs_triton
def test_the_kernels_build_for_hopper(tmp_path) -> None:
    """What the interpreter cannot check: that Triton's compiler accepts every launch the engine makes.

    Seven persistent launches (three reading their tokens from a sequence, two traced), and eighteen of the
    top-k race (three kernels; bf16 and fp32 logits; with and without appending the token, at the counter
    or after it).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = Path(__file__).parents[1] / "scripts" / "compile_kernels.py"
    done = subprocess.run(
        [sys.executable, str(script), "--arch", "90", "--models", "gpt2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("gpt2: ") and "built for sm_90" in line for line in lines) == 7, done.stdout
    assert sum(line.startswith("sampling: ") and "built for sm_90" in line for line in lines) == 18, (
        done.stdout
    )


@interpreted
@pytest.mark.parametrize("target", [5, 20, 33], ids=["padded", "exactly-full", "sliding"])
def test_a_window_from_the_sequence_is_the_window_before_the_counter(target: int) -> None:
    """``run_sequence``: the kernel takes the ``rows`` tokens before the counter and returns their last real row.

    Launched twice: ``check`` after each finds the counts of that launch alone and the live ones zeroed
    (counts left over would let the second launch's barriers pass early and double its counts).
    """
    weights, rows = tiny_weights(), 20
    seq = torch.randint(0, 97, (64,), generator=torch.Generator().manual_seed(target))
    forward = persistent.PersistentForward(weights, rows, plan=persistent.Plan(proj_splits=2, out_splits=4))
    start = max(0, target - rows)
    with torch.no_grad():
        reference = weights.hidden(seq[start : start + rows].view(1, rows))[0, min(target, rows) - 1]
    for _ in range(2):
        last = forward.run_sequence(seq, torch.tensor([target]))
        forward.check()
        assert last.shape == (1, 128)
        assert rel_err(last[0], reference) < 2e-2


@interpreted
@pytest.mark.parametrize("matvec", [True, False], ids=["decode_kernel", "forward_kernel"])
def test_a_cached_token_from_the_sequence_is_the_one_at_the_counter(matvec: bool) -> None:
    weights = tiny_weights()
    seq = torch.randint(0, 97, (64,), generator=torch.Generator().manual_seed(9))
    cache = weights.new_kv_cache(16)
    plan = dataclasses.replace(persistent.default_plan(128, 1), block_kv=16, chunk=4, matvec=matvec)
    forward = persistent.PersistentForward(weights, 1, cache=cache, plan=plan)
    with torch.no_grad():
        weights.hidden(seq[:11].view(1, 11), cache)  # prefill, as the decoder does
        reference = weights.hidden(seq[:12].view(1, 12), cache.clone())[0, -1]
    out = forward.run_sequence(seq, torch.tensor([11]))
    forward.check()
    assert out.shape == (1, 128)
    assert rel_err(out[0], reference) < 2e-2
