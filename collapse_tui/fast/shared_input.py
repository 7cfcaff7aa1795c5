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
    was called once, on a tensor at least one other layer was called on,
    with the same dtype, device and bias-or-not. Returns the number of groups.
    """
    calls: list[tuple[torch.nn.Linear, torch.Tensor]] = []
    hooks = [
        layer.register_forward_pre_hook(lambda layer, args: calls.append((layer, args[0])))
        for layer in module.modules()
        if type(layer) is torch.nn.Linear
    ]
    try:
        with torch.no_grad():
            probe()
    finally:
        for hook in hooks:
            hook.remove()
    times_called: dict[int, int] = {}
    for layer, _ in calls:
        times_called[id(layer)] = times_called.get(id(layer), 0) + 1
    by_input: dict[int, list[torch.nn.Linear]] = {}
    for layer, tensor in calls:  # ``calls`` holds every input, so no id is reused while grouping
        if times_called[id(layer)] == 1:
            by_input.setdefault(id(tensor), []).append(layer)
    groups = 0
    for layers in by_input.values():
        first = layers[0]
        if len(layers) < 2 or any(
            layer.weight.dtype != first.weight.dtype
            or layer.weight.device != first.weight.device
            or (layer.bias is None) != (first.bias is None)
            for layer in layers
        ):
            continue
        _stack(layers)
        groups += 1
    return groups


@torch.no_grad()
def _stack(layers: list[torch.nn.Linear]) -> None:
    """One weight (and bias) tensor for ``layers``, each layer's own a view of its rows."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
    start = 0
    for layer in layers:
        stop = start + layer.out_features
        requires_grad = layer.weight.requires_grad
        layer.__class__ = SharedInputLinear
        layer.weight = torch.nn.Parameter(weight[start:stop], requires_grad=requires_grad)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias[start:stop], requires_grad=requires_grad)
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
    of the same input; this leaves one. Operations that mutate or draw
    random numbers are never merged.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        first: dict[Any, torch.fx.Node] = {}
        for node in list(graph.nodes):
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            if node.target._schema.is_mutable or torch.Tag.nondeterministic_seeded in node.target.tags:
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
    """``value`` with its lists and dicts made tuples, so that equal arguments hash equal."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    return value


def compile_options() -> dict[str, Any] | None:
    """``torch.compile`` options that install ``CommonProducts``; ``None`` where this torch has no such hook."""
    from torch._inductor import config

    if not hasattr(config, "post_grad_custom_pre_pass"):
        return None
    return {"post_grad_custom_pre_pass": CommonProducts()}
