"""One product instead of several for linear layers that read the same input (q, k, v; gate, up).

Why: at the paper's window of 100 tokens, a small model's products are too
small to be bound by anything but their launch and latency. SmolLM2-135M's
graphed step ran 210 products a token, each ~3.5 µs whatever its size
(benchmarks/profile_graphed.py, H200): seven a layer, of which q, k and v
read one input and gate and up another. Fused, a layer runs four.

How, without touching a model's code (any Hugging Face causal LM must work):

- ``fuse_shared_input_linears`` runs one probe forward with hooks on every
  ``nn.Linear``, groups the layers that were called on the same tensor
  object, stacks each group's weights (and biases) into one tensor and makes
  every layer's own weight a view of its rows: the optimizer's refresh of the
  copy still writes each weight where it always did.
- Each such layer becomes a ``SharedInputLinear``. Run eagerly it computes
  its own product, exactly as before. Traced by ``torch.compile`` it
  computes the whole group's product and keeps its own columns: the group's
  layers then trace the same product of the same input, and the compiler's
  graph pass ``CommonProducts`` keeps one of them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:  # a graph pass with a uuid keeps inductor's compile cache on (torch >= 2.6)
    from torch._inductor.custom_graph_pass import CustomGraphPass as _GraphPassBase
except ImportError:  # pragma: no cover - older torch

    class _GraphPassBase:  # type: ignore[no-redef]
        pass


class SharedInputLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose weight is rows ``start:stop`` of a group's stacked weight.

    ``fuse`` says whether a traced forward computes the group's product (set
    off to compile the layers one product each again).
    """

    fused_weight: torch.Tensor
    fused_bias: torch.Tensor | None
    start: int
    stop: int
    fuse: bool

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.fuse and torch.compiler.is_compiling():
            return F.linear(input, self.fused_weight, self.fused_bias)[..., self.start : self.stop]
        return F.linear(input, self.weight, self.bias)


def fuse_shared_input_linears(module: torch.nn.Module, probe: Callable[[], object]) -> int:
    """Make the ``nn.Linear`` layers of ``module`` that ``probe`` calls on one input a ``SharedInputLinear`` group.

    ``probe`` runs a forward of ``module``. A layer joins a group only if it
    was called once, needs no gradient, and was called on the same tensor as
    at least one other such layer with the same dtype, device and
    bias-or-not. Returns the number of groups. If anything fails, no layer
    has been changed.
    """
    calls: list[tuple[torch.nn.Linear, torch.Tensor | None]] = []

    def record(layer: torch.nn.Linear, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((layer, args[0] if args else kwargs.get("input")))

    hooks = [
        layer.register_forward_pre_hook(record, with_kwargs=True)
        for layer in module.modules()
        if type(layer) is torch.nn.Linear
    ]
    try:
        with torch.no_grad():
            probe()
    finally:
        for hook in hooks:
            hook.remove()
    times_called = Counter(id(layer) for layer, _ in calls)
    groups: dict[tuple[Any, ...], list[torch.nn.Linear]] = {}
    for layer, tensor in calls:  # ``calls`` holds every input, so no id is reused while grouping
        if tensor is None or times_called[id(layer)] != 1 or layer.weight.requires_grad:
            continue
        key = (id(tensor), layer.weight.dtype, layer.weight.device, layer.bias is None)
        groups.setdefault(key, []).append(layer)
    stacked = [(layers, _stacked(layers)) for layers in groups.values() if len(layers) > 1]
    for layers, (weight, bias) in stacked:  # every stack made first: a failure above changes nothing
        _share(layers, weight, bias)
    return len(stacked)


@torch.no_grad()
def _stacked(layers: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of ``layers``, one after the other in one tensor."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
    return weight, bias


def _share(layers: list[torch.nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Make each of ``layers`` a ``SharedInputLinear`` whose weight (and bias) are views of its rows of the stack."""
    start = 0
    for layer in layers:
        stop = start + layer.out_features
        layer.__class__ = SharedInputLinear
        layer.weight = torch.nn.Parameter(weight[start:stop], requires_grad=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias[start:stop], requires_grad=False)
        layer.fused_weight, layer.fused_bias = weight, bias
        layer.start, layer.stop, layer.fuse = start, stop, True
        start = stop


def set_fused(module: torch.nn.Module, fuse: bool) -> None:
    """Whether the ``SharedInputLinear`` layers of ``module`` trace their group's product or their own."""
    for layer in module.modules():
        if isinstance(layer, SharedInputLinear):
            layer.fuse = fuse


class CommonProducts(_GraphPassBase):
    """An inductor graph pass that keeps one of each set of identical pure operations (common subexpressions).

    The layers of a ``SharedInputLinear`` group each trace the same product
    of the same input; this leaves one. Never merged: operations that mutate,
    draw random numbers or have other effects (``Node.is_impure``), that
    make sizes known only at run time, and the graph's outputs (two outputs
    must not become one tensor). Scalar arguments compare with their type,
    so ``x * 1`` and ``x * True`` stay apart.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        outputs = {node for node in graph.nodes if node.op == "output"}
        first: dict[Any, torch.fx.Node] = {}
        for node in list(graph.nodes):
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            if (
                node.target._schema.is_mutable
                or torch.Tag.nondeterministic_seeded in node.target.tags
                or node.is_impure()
                or node.meta.get("unbacked_bindings")
                or any(user in outputs for user in node.users)
            ):
                continue
            try:
                key = _frozen((node.target, node.args, node.kwargs))
                hash(key)
            except TypeError:  # an argument that cannot be compared: leave the node
                continue
            if key in first:
                node.replace_all_uses_with(first[key])
                graph.erase_node(node)
            else:
                first[key] = node

    def uuid(self) -> Any:
        """What inductor's compile cache keys this pass by: this file's contents, so an edited pass recompiles."""
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _frozen(value: Any) -> Any:
    """``value`` as a hashable key: lists and dicts made tuples, scalars paired with their type (and floats by bits)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    if isinstance(value, float):
        return (float, value.hex())  # 0.0 and -0.0 apart, NaN equal to itself
    if isinstance(value, (bool, int, complex)):
        return (type(value), value)
    return value


def compile_options() -> dict[str, Any] | None:
    """``torch.compile`` options that install ``CommonProducts``; ``None`` where this torch takes no such pass.

    Before 2.6 ``torch.compile`` refuses an option whose value is not of its
    default's type, and this one's default is ``None``.
    """
    from torch._inductor import config

    if torch.__version__ < "2.6" or not hasattr(config, "post_grad_custom_pre_pass"):
        return None
    return {"post_grad_custom_pre_pass": CommonProducts()}
