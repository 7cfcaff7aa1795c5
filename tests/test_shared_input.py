"""One product for the linear layers that share an input (``fast/shared_input.py``), on the CPU."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from collapse_tui.fast import shared_input
from collapse_tui.fast.graphed import GenerationCopy, GraphedInference
from collapse_tui.fast.shared_input import (
    CommonProducts,
    SharedInputLinear,
    compile_options,
    fuse_shared_input_linears,
)
from collapse_tui.inference import EagerInference
from tests.test_graphed import VOCAB, tiny_llama

SEED = 4
TOKENS = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))


def logits_of(module: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        return module(TOKENS, use_cache=False).logits.float()


def fused_copy() -> tuple[torch.nn.Module, GenerationCopy, int]:
    model = tiny_llama()
    weights = GenerationCopy(model, torch.bfloat16)
    groups = weights.fuse_shared_inputs(lambda: logits_of(weights.module))
    return model, weights, groups


def compiling_graphed(model: torch.nn.Module) -> GraphedInference:
    """The graphed path on the CPU as CUDA runs it: a bf16 copy, compiled (``torch.compile`` is patched by the tests)."""
    return GraphedInference(model, 8, 1.0, 50, torch.bfloat16, use_graphs=False, compile=True)


def eager_tokens(model: torch.nn.Module, gen_tokens: int) -> list[int]:
    """What the eager path samples from the prompt [1, 2] with the tests' seed."""
    eager = EagerInference(model, 8, 1.0, 50, torch.bfloat16)
    return eager.generate([1, 2], gen_tokens, torch.Generator().manual_seed(SEED))


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


def common_products_of(fn: Callable[..., object], *args: torch.Tensor) -> list[str]:
    """The operations left in ``fn``'s traced graph after ``CommonProducts``."""
    graph = make_fx(fn)(*args).graph
    CommonProducts()(graph)
    return [str(node.target) for node in graph.nodes if node.op == "call_function"]


def test_common_products_keeps_one_of_identical_products_and_every_random_draw() -> None:
    def twice(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x @ w) + 1, (x @ w) + 2, torch.rand(3), torch.rand(3), (x @ w.t()) + 3

    targets = common_products_of(twice, torch.randn(4, 4), torch.randn(4, 4))
    assert targets.count("aten.mm.default") == 2  # x @ w once, x @ w.t() once
    assert targets.count("aten.rand.default") == 2


def test_common_products_never_makes_two_outputs_one_tensor_or_mixes_scalar_types() -> None:
    def outputs(x: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x * 2, x * 2, flags * True, flags * 1

    targets = common_products_of(outputs, torch.randn(3), torch.tensor([True, False]))
    assert targets.count("aten.mul.Tensor") == 4
    # merged, ``flags * True`` (bool) would take ``flags * 1``'s int64, or the other way round
    graph = make_fx(lambda flags: (flags * True).float() + (flags * 1).float())(torch.tensor([True])).graph
    CommonProducts()(graph)
    assert [str(n.target) for n in graph.nodes if n.op == "call_function"].count("aten.mul.Tensor") == 2


def test_a_failure_while_stacking_changes_no_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    weights = GenerationCopy(model, torch.bfloat16)
    real_stacked, stacks = shared_input._stacked, []

    def stacked_that_fails_the_second_time(layers: list[torch.nn.Linear]):
        stacks.append(layers)
        if len(stacks) == 2:
            raise torch.OutOfMemoryError("no room for the second group")
        return real_stacked(layers)

    monkeypatch.setattr(shared_input, "_stacked", stacked_that_fails_the_second_time)
    with pytest.raises(torch.OutOfMemoryError):
        weights.fuse_shared_inputs(lambda: logits_of(weights.module))
    assert not any(isinstance(m, SharedInputLinear) for m in weights.module.modules())
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    weights.refresh()
    twin = weights.module.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(twin, model.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16))


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
    graphed = compiling_graphed(model)
    ours = graphed.generate([1, 2], 20, torch.Generator().manual_seed(SEED))
    if compile_options() is not None:
        assert "compiling them one by one" in caplog.text
        assert compiled_with[0] is not None and compiled_with[1] is None
    assert graphed.fused_groups == 0
    assert not any(m.fuse for m in graphed.weights.module.modules() if isinstance(m, SharedInputLinear))
    assert ours == eager_tokens(model, 20)


def test_a_probe_that_fails_leaves_the_layers_as_they_are(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    model = tiny_llama()
    graphed = compiling_graphed(model)
    copies_before = [t.data_ptr() for t in graphed.weights._copies]
    failures = []

    def fail_once(module: torch.nn.Module, args: object) -> None:  # the probe is the copy's first forward
        if not failures:
            failures.append(1)
            raise RuntimeError("this model's forward needs more than tokens")

    hook = graphed.weights.module.model.layers[1].register_forward_pre_hook(fail_once)
    ours = graphed.generate([1, 2], 10, torch.Generator().manual_seed(SEED))
    hook.remove()
    assert "products not fused (RuntimeError: this model's forward needs more than tokens)" in caplog.text
    assert graphed.fused_groups == 0
    assert not any(isinstance(m, SharedInputLinear) for m in graphed.weights.module.modules())
    assert [t.data_ptr() for t in graphed.weights._copies] == copies_before  # refresh writes where it did
    assert ours == eager_tokens(model, 10)


def test_a_torch_that_refuses_the_graph_pass_compiles_the_layers_one_by_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch 2.4 and 2.5 refuse ``options`` whose value is not of the default's type, in ``torch.compile`` itself."""
    compiled_with: list[object] = []

    def compile_that_refuses_options(module: torch.nn.Module, **kwargs: object):
        compiled_with.append(kwargs.get("options"))
        if kwargs.get("options") is not None:
            raise RuntimeError("Unexpected type of attr post_grad_custom_pre_pass")
        return module

    monkeypatch.setattr(torch, "compile", compile_that_refuses_options)
    monkeypatch.setattr(
        "collapse_tui.fast.graphed.compile_options", lambda: {"post_grad_custom_pre_pass": object()}
    )
    model = tiny_llama()
    graphed = compiling_graphed(model)
    ours = graphed.generate([1, 2], 10, torch.Generator().manual_seed(SEED))
    assert (
        "products not fused (RuntimeError: Unexpected type of attr post_grad_custom_pre_pass)" in caplog.text
    )
    assert compiled_with[0] is not None and compiled_with[1] is None
    assert graphed.fused_groups == 0
    assert not any(m.fuse for m in graphed.weights.module.modules() if isinstance(m, SharedInputLinear))
    assert ours == eager_tokens(model, 10)


def test_layers_on_one_input_group_by_dtype_and_bias_and_keyword_calls_count() -> None:
    """GPT-J's q, k and v (no bias) read the input its MLP's fc_in (bias) reads: q, k, v still fuse."""

    class ParallelBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
            self.fc_in = torch.nn.Linear(8, 16)
            self.gate, self.up = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
            self.twice = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            attention = self.q(x) * self.k(input=x) + self.v(x)
            y = torch.relu(x)
            mlp = self.fc_in(x).sum(-1, keepdim=True) + self.gate(y).sum(-1, keepdim=True) * self.up(y).sum(
                -1, keepdim=True
            )
            return attention + mlp + self.twice(self.twice(x))  # a layer called twice never fuses

    block = ParallelBlock().requires_grad_(False)
    x = torch.randn(2, 8)
    expected = block(x)
    assert fuse_shared_input_linears(block, lambda: block(x)) == 2
    fused = {name for name, m in block.named_modules() if isinstance(m, SharedInputLinear)}
    assert fused == {"q", "k", "v", "gate", "up"}
    assert torch.equal(block(x), expected)
