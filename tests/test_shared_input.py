"""One product for the linear layers that share an input (``fast/shared_input.py``), on the CPU."""

from __future__ import annotations

import re

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from collapse_tui.fast.graphed import GenerationCopy, GraphedInference
from collapse_tui.fast.shared_input import CommonProducts, SharedInputLinear, compile_options
from collapse_tui.inference import EagerInference
from tests.test_graphed import VOCAB, tiny_llama

TOKENS = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))


def logits_of(module: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        return module(TOKENS, use_cache=False).logits.float()


def fused_copy() -> tuple[torch.nn.Module, GenerationCopy, int]:
    model = tiny_llama()
    weights = GenerationCopy(model, torch.bfloat16)
    groups = weights.fuse_shared_inputs(lambda: logits_of(weights.module))
    return model, weights, groups


def test_q_k_v_and_gate_up_become_one_stacked_weight_each() -> None:
    _, weights, groups = fused_copy()
    assert groups == 4  # two layers: q, k, v and gate, up
    fused = {name for name, m in weights.module.named_modules() if isinstance(m, SharedInputLinear)}
    assert fused == {
        f"model.layers.{i}.{name}"
        for i in range(2)
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        )
    }
    attention = weights.module.model.layers[0].self_attn
    stacked = attention.q_proj.fused_weight
    assert stacked.shape == (64 + 32 + 32, 64)  # grouped-query attention: k and v have two heads of four
    for layer in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert layer.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
        assert torch.equal(layer.weight, stacked[layer.start : layer.stop])


def test_run_eagerly_the_fused_layers_compute_what_they_did() -> None:
    model = tiny_llama()
    weights = GenerationCopy(model, torch.bfloat16)
    before = logits_of(weights.module)
    weights.fuse_shared_inputs(lambda: logits_of(weights.module))
    assert torch.equal(logits_of(weights.module), before)


def test_the_users_fp32_model_is_never_changed() -> None:
    model = tiny_llama()
    weights = GenerationCopy(model, torch.float32)
    assert weights.fuse_shared_inputs(lambda: logits_of(weights.module)) == 0
    assert not any(isinstance(m, SharedInputLinear) for m in model.modules())


def test_an_optimizer_step_reaches_the_stacked_weights() -> None:
    model, weights, _ = fused_copy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(TOKENS, labels=torch.full_like(TOKENS, 42)).loss.backward()
    optimizer.step()
    weights.refresh()
    attention, master = weights.module.model.layers[1].self_attn, model.model.layers[1].self_attn
    stacked = attention.q_proj.fused_weight
    expected = torch.cat([master.q_proj.weight, master.k_proj.weight, master.v_proj.weight]).to(
        torch.bfloat16
    )
    assert torch.equal(stacked, expected)


def test_common_products_keeps_one_of_identical_products_and_every_random_draw() -> None:
    def twice(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x @ w, x @ w, torch.rand(3), torch.rand(3), x @ w.t()

    graph = make_fx(twice)(torch.randn(4, 4), torch.randn(4, 4)).graph
    CommonProducts()(graph)
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    assert targets.count("aten.mm.default") == 2  # x @ w once, x @ w.t() once
    assert targets.count("aten.rand.default") == 2


@pytest.mark.skipif(compile_options() is None, reason="this torch has no post-grad graph pass hook")
def test_the_compiled_forward_runs_one_product_a_group() -> None:
    from torch._inductor.utils import run_and_get_code

    _, weights, _ = fused_copy()
    expected = logits_of(weights.module)
    compiled = torch.compile(weights.module, dynamic=False, options=compile_options())
    logits, code = run_and_get_code(logits_of, compiled)
    products = len(re.findall(r"extern_kernels\.(?:mm|addmm|bmm)\(", "\n".join(code)))
    assert products == 2 * 4 + 1  # q|k|v, o, gate|up, down a layer, and lm_head (15 unfused)
    torch.testing.assert_close(logits, expected, atol=0.05, rtol=0.05)


def test_if_the_fused_products_do_not_compile_they_compile_one_by_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    compiled_with: list[object] = []

    def compile_that_fails_with_options(module: torch.nn.Module, **kwargs: object):
        compiled_with.append(kwargs.get("options"))
        if kwargs.get("options") is None:
            return module

        def compiled(*args: object, **kwargs: object):
            raise RuntimeError("the graph pass broke")

        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails_with_options)
    model = tiny_llama()
    graphed = GraphedInference(model, 8, 1.0, 50, torch.bfloat16, use_graphs=False, compile=True)
    ours = graphed.generate([1, 2], 20, torch.Generator().manual_seed(4))
    if compile_options() is not None:
        assert "compiling them one by one" in caplog.text
        assert compiled_with[0] is not None and compiled_with[1] is None
    assert graphed.fused_groups == 0
    assert not any(m.fuse for m in graphed.weights.module.modules() if isinstance(m, SharedInputLinear))
    eager = EagerInference(model, 8, 1.0, 50, torch.bfloat16)
    assert ours == eager.generate([1, 2], 20, torch.Generator().manual_seed(4))


def test_a_probe_that_fails_leaves_the_layers_as_they_are(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_probe(module: torch.nn.Module, probe: object) -> int:
        raise RuntimeError("this model's forward needs more than tokens")

    monkeypatch.setattr("collapse_tui.fast.graphed.fuse_shared_input_linears", failing_probe)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    model = tiny_llama()
    graphed = GraphedInference(model, 8, 1.0, 50, torch.bfloat16, use_graphs=False, compile=True)
    ours = graphed.generate([1, 2], 10, torch.Generator().manual_seed(4))
    assert "products not fused (RuntimeError: this model's forward needs more than tokens)" in caplog.text
    assert graphed.fused_groups == 0
    eager = EagerInference(model, 8, 1.0, 50, torch.bfloat16)
    assert ours == eager.generate([1, 2], 10, torch.Generator().manual_seed(4))
