"""The fast path on a CUDA device: bf16 accuracy, CUDA graphs, sampling, and the weight update.

Marked ``gpu`` and skipped without CUDA (CI has none); run them on a GPU box
with ``pytest -m gpu tests/test_fast_gpu.py``. Models are GPT-2 shaped with
random weights (no download), 4 layers to keep the run short.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from gpu import teach_to_say
from transformers import GPT2Config, GPT2LMHeadModel

from collapse_tui.fast import FastGPT2Inference, cluster, fast_inference_for, persistent, skinny
from collapse_tui.fast.inference import PAD
from collapse_tui.fast.kernels import token_losses
from collapse_tui.fast.steps import StepLoop
from collapse_tui.fast.topk_race import RaceBuffers, race_winner, sample_token
from collapse_tui.inference import EagerInference, sequence_windows
from collapse_tui.sampling import filter_logits, sample_next

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = 50257
SHAPES = {"gpt2": (768, 12), "gpt2-medium": (1024, 16)}


def gpt2_model(seed: int = 0, n_layer: int = 4, n_embd: int = 768, n_head: int = 12) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    with torch.device("cuda"):
        model = GPT2LMHeadModel(config)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def fast_for(model: torch.nn.Module, block: int, top_k: int | None = 200, dtype=torch.bfloat16):
    fast = fast_inference_for(model, block=block, temperature=1.0, top_k=top_k, autocast_dtype=dtype)
    assert isinstance(fast, FastGPT2Inference)
    return fast


def test_bf16_logits_match_fp32_eager() -> None:
    model = gpt2_model()
    fast = fast_for(model, 100)
    tokens = torch.randint(0, VOCAB, (4, 100), device="cuda")
    with torch.no_grad():
        reference = model(tokens).logits
        logits = fast.weights.logits(fast.weights.hidden(tokens))
    err = rel_err(logits, reference)
    assert 0 < err < 2e-2, err
    assert fast.weights.use_triton and fast.weights.fused_gelu, fast.description


def test_window_logits_through_triton_products_match_fp32_eager() -> None:
    """One generation window (≤ 128 rows): the Triton products and split-K partial sums."""
    model = gpt2_model()
    fast = fast_for(model, 100)
    assert fast.weights.use_skinny, fast.description
    tokens = torch.randint(0, VOCAB, (1, 100), device="cuda")
    with torch.no_grad():
        reference = model(tokens).logits
        logits = fast.weights.logits(fast.weights.hidden(tokens))
    err = rel_err(logits, reference)
    assert 0 < err < 2e-2, err


@pytest.mark.parametrize("rows", [1, 7, 100, 128])
@pytest.mark.parametrize("kind", ["bias", "gelu", "partial", "plain"])
def test_skinny_linear_matches_an_fp32_product(rows: int, kind: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    n, k = (1000, 4096) if kind == "partial" else (2304, 768)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
    bias = (
        torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
        if kind in ("bias", "gelu")
        else None
    )
    assert skinny.usable(x, w)
    out = skinny.skinny_linear(x, w, bias, gelu=kind == "gelu", partial=kind == "partial")
    out = out.float().sum(0) if out.dim() == 3 else out.float()
    reference = x.double() @ w.double().T + (0 if bias is None else bias.double())
    if kind == "gelu":
        reference = F.gelu(reference, approximate="tanh")
    assert out.shape == (rows, n)
    assert rel_err(out, reference) < 1e-2


def test_bf16_evaluation_matches_fp32_eager() -> None:
    model = gpt2_model()
    windows = torch.randint(0, VOCAB, (40, 101))
    ours, n = fast_for(model, 100).loss_sum(windows)
    theirs, m = EagerInference(model, 100, 1.0, None).loss_sum(windows)
    assert n == m == 4000
    assert ours == pytest.approx(theirs, rel=5e-3)


@pytest.mark.parametrize(
    ("block", "gen_tokens"), [(32, 150), (100, 200), (256, 150)], ids=["slide", "pad-then-slide", "kv"]
)
def test_fp32_graphs_generate_the_eager_tokens(block: int, gen_tokens: int) -> None:
    """Graph replay, padding, window slide and KV cache against ``EagerInference``, fp32, same draws."""
    model = gpt2_model()
    prompt = [11, 12, 13]
    graphed = fast_for(model, block, dtype=None)
    ours = graphed.generate(prompt, gen_tokens, cuda_gen(1))
    assert all(d.graph is not None for d in graphed._decoders.values()), graphed.description
    # the graph's generator is seeded from the caller's: reproduce that seed for the eager paths
    seed = StepLoop.graph_seed(cuda_gen(1))
    eager_fast = FastGPT2Inference(model, block, 1.0, 200, dtype=torch.float32, use_graphs=False)
    assert eager_fast.generate(prompt, gen_tokens, cuda_gen(seed)) == ours
    assert EagerInference(model, block, 1.0, 200).generate(prompt, gen_tokens, cuda_gen(seed)) == ours


def test_generation_is_deterministic_given_the_seed() -> None:
    model = gpt2_model()
    fast = fast_for(model, 100)
    a = fast.generate([50256], 300, cuda_gen(7))
    b = fast.generate([50256], 300, cuda_gen(7))
    c = fast.generate([50256], 300, cuda_gen(8))
    assert a == b
    assert a != c
    assert len(set(a)) > 50  # fresh draws every token, not one replayed draw


@pytest.mark.parametrize(
    ("sampler", "dtype"),
    [(sample_next, torch.float32), (sample_token, torch.bfloat16)],
    ids=["sample_next", "sample_token-bf16"],
)
def test_graph_sampling_has_the_filtered_distribution(sampler, dtype: torch.dtype) -> None:
    """Replay a captured sampler with a registered generator and histogram the draws.

    ``sample_token`` on bf16 logits is the fast path's: the Triton top-k race.
    """
    torch.manual_seed(3)
    logits = (torch.randn(1, VOCAB, device="cuda") * 3).to(dtype)
    temperature, top_k, draws = 0.8, 20, 40000
    expected = torch.softmax(filter_logits(logits, temperature, top_k), dim=-1)[0]
    counts = torch.zeros(VOCAB, device="cuda")
    ones = torch.ones(1, device="cuda")
    generator = cuda_gen(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sampler(logits, temperature, top_k, generator)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        counts.index_add_(0, sampler(logits, temperature, top_k, generator), ones)
    for _ in range(draws):
        graph.replay()
    observed = counts / draws
    total_variation = 0.5 * float((observed - expected).abs().sum())
    assert float(observed[expected == 0].sum()) == 0.0
    assert total_variation < 0.02, total_variation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_top_k_race_picks_the_torch_race_token(dtype: torch.dtype) -> None:
    """The histogram select of the k-th largest and the race, on the GPU, against torch with the same draws.

    One set of ``RaceBuffers`` serves every race, as in generation: each race must leave its state zeroed.
    """
    gen = cuda_gen(11)
    buffers = RaceBuffers(VOCAB, torch.device("cuda"))
    for trial in range(40):
        logits = torch.randn(1, VOCAB, device="cuda", generator=gen) * 3
        if trial % 2:  # few distinct values: the k-th largest is shared by many logits
            logits = logits.round()
        logits = logits.to(dtype)
        draws = torch.empty(1, VOCAB, device="cuda").exponential_(generator=gen)
        zero_kth = int((logits > 0).sum()) + 1  # rounded: the k-th largest is ±0
        for k in (None, 1, 200, VOCAB - 1, zero_kth):
            ours = race_winner(logits, draws, 0.9, k, use_triton=True, buffers=buffers)
            theirs = race_winner(logits, draws, 0.9, k, use_triton=False)
            assert ours.tolist() == theirs.tolist(), (trial, k)
    assert not buffers.state.any()


@pytest.mark.parametrize(
    ("shape", "block"),
    [("gpt2", 32), ("gpt2", 1024), ("gpt2-medium", 1024)],
    ids=["window", "cache", "cache-medium"],
)
@pytest.mark.parametrize("notify", [True, False], ids=["weights_changed", "optimizer-hook"])
def test_the_next_generation_uses_the_updated_weights(notify: bool, shape: str, block: int) -> None:
    """Captured graphs read the bf16 copies, which the update refreshes in place (on a Hopper GPU the
    cached steps read the cluster kernel's layouts of them: gpt2's with one cluster a head, gpt2-medium's
    with q/k/v spread)."""
    width, heads = SHAPES[shape]
    model = gpt2_model(n_embd=width, n_head=heads)
    fast = fast_for(model, block, top_k=1)
    before = fast.generate([5], 64, cuda_gen(0))  # captures the graph with the old weights
    assert before.count(42) < 10
    teach_to_say(model, 42, VOCAB, fast.weights_changed if notify else lambda: None)
    after = fast.generate([5], 64, cuda_gen(0))
    assert after[1:].count(42) > 48
    tokens = torch.tensor([after[:32]], device="cuda")
    with torch.no_grad():
        reference = model(tokens).logits
        assert rel_err(fast.weights.logits(fast.weights.hidden(tokens)), reference) < 2e-2


def test_token_losses_on_lm_head_logits_match_torch_cross_entropy() -> None:
    """The Triton cross-entropy reads lm_head's bf16 logits where they lie (rows padded to 50,304) and gives
    torch's fp32 cross-entropy of the same logits; a padded target scores 0."""
    fast = fast_for(gpt2_model(), 100)
    x = (torch.randn(300, 768, device="cuda", generator=cuda_gen(3)) * 40).to(torch.bfloat16)  # spread logits
    logits = fast.weights.logits(x)
    assert logits.stride(0) != logits.size(1)  # a view of the padded rows
    targets = torch.randint(0, VOCAB, (300,), device="cuda", generator=cuda_gen(4))
    targets[::7] = PAD
    ours = token_losses(logits, targets, PAD, use_triton=True)
    theirs = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=PAD)
    assert bool((ours[::7] == 0).all())
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-5)


def test_one_batch_of_several_sets_gives_each_sets_own_mean() -> None:
    model = gpt2_model()
    fast = fast_for(model, 100)
    sets = [
        sequence_windows(torch.randint(0, VOCAB, (350,)).tolist(), 100),  # full windows and a short rest
        [torch.randint(0, VOCAB, (20, 101))],
    ]
    means = fast.mean_losses(sets)
    assert means == pytest.approx([fast.mean_loss(windows) for windows in sets], rel=1e-6)
    eager = EagerInference(model, 100, 1.0, None)
    assert means == pytest.approx([eager.mean_loss(windows) for windows in sets], rel=5e-3)


def test_gen_loss_windows_batch_like_eager() -> None:
    model = gpt2_model()
    fast = fast_for(model, 100)
    ids = fast.generate([50256], 1024, cuda_gen(2))
    groups = sequence_windows(ids, 100)
    ours = fast.mean_loss(groups)
    theirs = EagerInference(model, 100, 1.0, None).mean_loss(groups)
    assert ours == pytest.approx(theirs, rel=5e-3)


# -- the persistent forward (one launch a token) ---------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 37, 100, 128])
def test_persistent_window_forward_matches_fp32_eager(shape: str, rows: int) -> None:
    """Every CTA of the real grid, every barrier passed once (counter), logits within bf16 tolerance."""
    width, heads = SHAPES[shape]
    model = gpt2_model(n_embd=width, n_head=heads, n_layer=3)
    fast = fast_for(model, 128)
    forward = persistent.PersistentForward(fast.weights, rows)
    assert forward.grid == torch.cuda.get_device_properties(0).multi_processor_count
    tokens = torch.randint(0, VOCAB, (rows,), device="cuda")
    out = forward.run(tokens)
    forward.check()
    with torch.no_grad():
        reference = model(tokens.view(1, rows)).logits[0]
        layered = fast.weights.hidden(tokens.view(1, rows))[0]
    assert 0 < rel_err(fast.weights.logits(out[:rows]), reference) < 2e-2
    assert rel_err(out[:rows], layered) < 1e-2


@pytest.mark.parametrize("matvec", [True, False], ids=["decode_kernel", "forward_kernel"])
@pytest.mark.parametrize("length", [1, 2, 70, 1024])
def test_persistent_cached_decode_matches_fp32_eager(length: int, matvec: bool) -> None:
    model = gpt2_model(n_embd=1024, n_head=16, n_layer=3)
    fast = fast_for(model, 1024)
    cache = fast.weights.new_kv_cache(1024)
    plan = dataclasses.replace(persistent.default_plan(1024, 1), matvec=matvec)
    forward = persistent.PersistentForward(fast.weights, 1, cache=cache, plan=plan)
    tokens = torch.randint(0, VOCAB, (length,), device="cuda")
    with torch.no_grad():
        if length > 1:
            fast.weights.hidden(tokens[:-1].view(1, -1), cache)
        out = forward.run(tokens[-1:], torch.tensor([length - 1], device="cuda"))
        forward.check()
        reference = model(tokens.view(1, -1)).logits[0, -1]
    assert 0 < rel_err(fast.weights.logits(out[:1])[0], reference) < 2e-2


@pytest.mark.parametrize("block", [100, 1024], ids=["window", "cache"])
def test_generation_runs_on_the_persistent_forward(block: int) -> None:
    """The decoder takes it by default, deterministically, and the teacher-forced logits agree."""
    model = gpt2_model()
    fast = fast_for(model, block)
    a = fast.generate([50256], 300, cuda_gen(3))
    assert all(d.persistent is not None for d in fast._decoders.values()), fast.description
    assert "one launch a token" in fast.description
    assert fast.generate([50256], 300, cuda_gen(3)) == a
    assert len(set(a)) > 50
    for decoder in fast._decoders.values():
        assert not decoder.persistent.failed()
        decoder.persistent.check()  # the last launch's counts, and the live ones left zeroed by it


def test_a_failed_barrier_falls_back_to_layer_by_layer() -> None:
    model = gpt2_model()
    fast = fast_for(model, 32)
    fast.generate([50256], 64, cuda_gen(0))  # longer than the block: the sliding window
    decoder = fast._decoders[False]
    decoder.persistent.error.fill_(1)  # as a barrier that gave up would leave it
    ids = fast.generate([50256], 64, cuda_gen(0))
    assert decoder.persistent is None and decoder.graphs
    assert len(ids) == 65


# -- the CUDA cluster kernel (a cached token on a Hopper GPU) ------------------------------------


def cluster_weights_or_skip(model: torch.nn.Module, block: int) -> FastGPT2Inference:
    fast = fast_for(model, block)
    reason = cluster.cluster_unsupported(fast.weights)
    if reason is not None:
        pytest.skip(f"the cluster kernel: {reason}")
    return fast


def randomise_small_parameters(model: torch.nn.Module) -> None:
    """Biases and layer-norm parameters away from 0 and 1 (Hugging Face's init), so a dropped one shows."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.add_(0.02 * torch.randn_like(parameter))
            elif ".ln_" in name and name.endswith("weight"):
                parameter.add_(0.1 * torch.randn_like(parameter))


#: the widths the cluster kernel takes: gpt2-large's (not the Triton kernel's) in chunks of q/k/v rows
CLUSTER_SHAPES = {**SHAPES, "gpt2-large": (1280, 20)}


@pytest.mark.parametrize("shape", CLUSTER_SHAPES)
@pytest.mark.parametrize("length", [1, 2, 70, 1024])
def test_cluster_decode_matches_fp32_eager(shape: str, length: int) -> None:
    width, heads = CLUSTER_SHAPES[shape]
    model = gpt2_model(n_embd=width, n_head=heads, n_layer=3)
    randomise_small_parameters(model)
    fast = cluster_weights_or_skip(model, 1024)
    cache, reference_cache = fast.weights.new_kv_cache(1024), fast.weights.new_kv_cache(1024)
    decode = cluster.ClusterDecode(fast.weights, cache)
    tokens = torch.randint(0, VOCAB, (length,), device="cuda")
    with torch.no_grad():
        if length > 1:
            fast.weights.hidden(tokens[:-1].view(1, -1), cache)
        out = decode.run_sequence(tokens, torch.tensor([length - 1], device="cuda"))
        decode.check()
        reference = model(tokens.view(1, -1)).logits[0, -1]
        fast.weights.hidden(tokens.view(1, -1), reference_cache)
    assert 0 < rel_err(fast.weights.logits(out)[0], reference) < 2e-2
    row = length - 1  # the key and value the kernel wrote, against the layer-by-layer forward's
    assert rel_err(cache[:, :, :, row], reference_cache[:, :, :, row]) < 1e-2


@pytest.mark.parametrize("shape", CLUSTER_SHAPES)
def test_full_context_generation_runs_on_the_cluster_kernel(shape: str) -> None:
    width, heads = CLUSTER_SHAPES[shape]
    fast = cluster_weights_or_skip(gpt2_model(n_embd=width, n_head=heads), 1024)
    a = fast.generate([50256], 300, cuda_gen(3))
    decoder = fast._decoders[True]
    assert isinstance(decoder.persistent, cluster.ClusterDecode), fast.description
    assert "CUDA cluster decode" in fast.description
    assert fast.generate([50256], 300, cuda_gen(3)) == a  # its sums run in a fixed order
    assert len(set(a)) > 50
    decoder.persistent.check()


def test_a_failed_poll_hands_the_cached_step_to_the_triton_kernel() -> None:
    fast = cluster_weights_or_skip(gpt2_model(), 1024)
    fast.generate([50256], 64, cuda_gen(0))
    decoder = fast._decoders[True]
    assert isinstance(decoder.persistent, cluster.ClusterDecode)
    decoder.persistent.error.fill_(1)  # as a poll that gave up would leave it
    ids = fast.generate([50256], 64, cuda_gen(0))
    assert isinstance(decoder.persistent, persistent.PersistentForward) and decoder.graphs
    assert not decoder.persistent.failed() and len(ids) == 65


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("block", [100, 1024], ids=["window", "full-context"])
def test_a_run_on_the_second_gpu_runs_its_kernels_there_from_a_worker_thread(block: int, tmp_path) -> None:
    """``--device cuda:1`` crashed at the first Triton launch: kernels launch on the thread's current
    device, cuda:0 in a new thread (the TUI's worker, headless's main thread alike)."""
    import threading

    from tiny import make_text, make_tokenizer

    from collapse_tui.config import RunConfig
    from collapse_tui.engine import Engine

    folder = tmp_path / "model"
    tokenizer = make_tokenizer(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_layer=2, n_head=12, n_embd=768,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(make_text(200, seed=3), encoding="utf-8")
    run = RunConfig(model=str(folder), evals=[str(heldout)], max_iters=2, gen_tokens=150, block=block,
                    device="cuda:1", keep_going=True, out=str(tmp_path / "run"))  # fmt: skip
    engine = Engine(run)
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(summary=engine.run()), name="worker")
    worker.start()
    worker.join()
    assert outcome["summary"]["status"] == "finished", outcome
    assert engine.info.extra["inference"] == "FastGPT2Inference"
    assert {p.device for p in engine.model.parameters()} == {torch.device("cuda", 1)}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_capture_for_the_second_gpu_after_one_for_the_first_is_made_on_the_second() -> None:
    """torch's own capture stream is made once a process, on the device current then: a later capture
    for cuda:1 ran on cuda:0, and cuda:1's operations ran eagerly, outside an empty graph."""
    from collapse_tui.capture import capturing

    for index in (0, 1):
        with torch.cuda.device(index):
            counter = torch.zeros(4, device=f"cuda:{index}")
            graph = torch.cuda.CUDAGraph()
            with capturing(graph):
                counter.add_(1)  # captured, not run
            graph.replay()
            graph.replay()
            assert counter.tolist() == [2.0] * 4, index
