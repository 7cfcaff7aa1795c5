"""``GraphedInference``: any Hugging Face causal LM's sliding-window generation, replayed from CUDA graphs.

Why: models other than GPT-2 have no hand-written forward here, and the eager
path launches every kernel of the model's forward from Python, token after
token: for the paper's window of 100 tokens a small model spends far longer
launching than computing. The model's own forward at the fixed shape
``[1, block]`` is captured instead (``steps.StepLoop``), 32 tokens a replay,
sampled on the device.

The semantics stay those of DESIGN section 1. A step runs the last ``block``
tokens at positions 0..block-1; while the sequence is shorter than the block,
the tail of the buffer is right padding and the logits are read at the last
real token, which causal attention keeps blind to the padding.

Only the sliding window is graphed. In full context (prompt and new tokens
fit in the block) re-running the whole window for every token would cost
``block`` times the work of a KV-cache step, so that case stays on the eager
path's KV cache, as does evaluation.

Precision: with the engine's autocast dtype (bf16) the graphs run a copy of
the model whose linear weights are already in that dtype, under autocast:
the same products autocast makes of the fp32 weights, without casting every
weight for every token. The copy is refreshed after each optimizer step
(``weights_changed``), and before generating if a weight changed without it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

from collapse_tui.fast.staleness import watch_optimizer_steps
from collapse_tui.fast.steps import StepLoop
from collapse_tui.fast.topk_race import sample_token
from collapse_tui.inference import EagerInference

log = logging.getLogger(__name__)

#: Generation steps captured in one CUDA graph (a power of two), as for GPT-2.
TOKENS_PER_REPLAY = 32


class GenerationCopy:
    """The weights the graphs read: the model itself in fp32, else a copy with linear weights in ``dtype``.

    In fp32 the graphs read the master weights themselves, which the
    optimizer updates in place, so there is nothing to refresh.

    Linear weights tied to an embedding (a shared lm_head) are untied in the
    copy, so the embedding, and with it the residual stream, stays fp32 as it
    does under autocast.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        if dtype == torch.float32:
            self.module = model
            self._sources: list[torch.Tensor] = []
            self._copies: list[torch.Tensor] = []
        else:
            self.module = copy.deepcopy(model)
            for module in self.module.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            self._sources, self._copies = [], []
            for master, twin in zip(model.modules(), self.module.modules(), strict=True):
                for name, source in master.named_parameters(recurse=False):
                    self._sources.append(source.detach())
                    self._copies.append(getattr(twin, name).detach())
            self.module.requires_grad_(False).eval()
        self._versions = [t._version for t in self._sources]
        self.dirty = False
        if self._copies:
            watch_optimizer_steps(self)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the master weights into the copy (same tensors, new values: the graphs see them)."""
        if self._copies:
            torch._foreach_copy_(self._copies, self._sources)
        self._versions = [t._version for t in self._sources]
        self.dirty = False

    def stale(self) -> bool:
        """Whether the master weights may have changed since the last refresh.

        True after any optimizer step (``staleness``) and after any other
        in-place change that bumps a version counter (``p.mul_(...)``).
        """
        return self.dirty or any(t._version != v for t, v in zip(self._sources, self._versions, strict=True))


class WindowSteps(StepLoop):
    """A step that runs the model on the fixed ``[1, block]`` window ending at the counter and samples its next token."""

    def __init__(self, owner: GraphedInference, capacity: int) -> None:
        super().__init__(owner.device, capacity, owner.tokens_per_replay, owner.graph_pool)
        self.owner = owner
        self.window = torch.arange(owner.block, device=owner.device)

    def step(self, generator: torch.Generator) -> None:
        owner, block = self.owner, self.owner.block
        target = self.counter  # the token written at ``target`` sees seq[max(0, target-block):target]
        start = (target - block).clamp_(min=0)
        window = self.seq.index_select(0, start + self.window).view(1, block)
        last = target.clamp(max=block) - 1
        token = sample_token(owner.next_logits(window, last), owner.temperature, owner.top_k, generator)
        self.seq.index_copy_(0, target, token)
        self.counter.add_(1)


class GraphedInference(EagerInference):
    """``EagerInference`` whose sliding-window generation runs from CUDA graphs."""

    def __init__(
        self,
        model: torch.nn.Module,
        block: int,
        temperature: float,
        top_k: int | None,
        autocast_dtype: torch.dtype | None = None,
        use_graphs: bool | None = None,
        tokens_per_replay: int = TOKENS_PER_REPLAY,
        compile: bool | None = None,
    ) -> None:
        """``compile``: run the copy's forward through ``torch.compile`` (default: on CUDA)."""
        super().__init__(model, block, temperature, top_k, autocast_dtype)
        self.weights = GenerationCopy(model, autocast_dtype or torch.float32)
        #: what the steps call: the copy's forward, compiled on first use where that works
        self.forward: Callable[..., Any] = self.weights.module
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.tokens_per_replay = tokens_per_replay
        #: whether the forward takes ``logits_to_keep`` as a tensor of positions (transformers ≥ 4.50)
        self.keeps_given_logits = self._keep_last_only
        self._steps: WindowSteps | None = None

    @property
    def description(self) -> str:
        """How generation runs, for logs and the benchmark table."""
        graphed = self._steps is not None and self._steps.graph is not None
        how = f"CUDA graphs of {self.tokens_per_replay} steps" if graphed else "eager steps"
        forward = (
            "compiled Hugging Face forward"
            if self.forward is not self.weights.module
            else "Hugging Face forward"
        )
        return f"{str(self.weights.dtype).replace('torch.', '')} copy, {forward}, {how}"

    def autocast(self) -> torch.autocast:
        """The engine's autocast for the copy's forward (disabled in fp32); no cast cache, which graphs cannot keep."""
        dtype = self.weights.dtype
        return torch.autocast(
            self.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False
        )

    def weights_changed(self) -> None:
        self.weights.refresh()

    def next_logits(self, window: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Logits ``[1, V]`` at position ``last`` [1] of ``window`` [1, block]: only that row goes through lm_head."""
        with self.autocast():
            if self.keeps_given_logits:
                logits = self.forward(window, use_cache=False, logits_to_keep=last).logits
            else:
                logits = self.forward(window, use_cache=False).logits.index_select(1, last)
        return logits.view(1, -1)

    def _compile_forward(self) -> None:
        """Compile the forward once, for the step's fixed shapes; keep it uncompiled if that fails.

        Inductor fuses the elementwise kernels around the products (norms,
        rotary embeddings, activations, residual adds), so a step launches
        far fewer kernels (benchmarks/RESULTS.md, "Models other than GPT-2").
        The first call compiles (tens of seconds for a large model); a model
        it cannot compile generates uncompiled, still from graphs.
        """
        if not self.compile or self.forward is not self.weights.module:
            return
        compiled = torch.compile(self.weights.module, dynamic=False)
        window = torch.zeros((1, self.block), dtype=torch.long, device=self.device)
        last = torch.full((1,), self.block - 1, dtype=torch.long, device=self.device)
        self.forward = compiled
        try:
            self.next_logits(window, last)
        except Exception as error:  # any failure of the optional compiler means: go without it
            first_line = str(error).splitlines()[0] if str(error) else ""
            log.warning("torch.compile of the model failed (%s: %s): its forward runs uncompiled",
                        type(error).__name__, first_line)  # fmt: skip
            self.forward = self.weights.module
            self.compile = False

    def _window_steps(self, total: int) -> WindowSteps:
        steps = self._steps
        if steps is None or steps.capacity < total:
            self._compile_forward()
            steps = WindowSteps(self, -(-max(self.block, total) // 1024) * 1024)
            if self.use_graphs:
                steps.capture()
            self._steps = steps
        return steps

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int],
        gen_tokens: int,
        generator: torch.Generator,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> list[int]:
        if not prompt_ids:
            raise ValueError("generation needs a prompt of at least one token")
        if gen_tokens <= 0 or len(prompt_ids) + gen_tokens - 1 <= self.block:
            return super().generate(prompt_ids, gen_tokens, generator, should_stop)  # full context
        if self.weights.stale():
            self.weights.refresh()
        with torch.autocast(
            self.device.type, enabled=False
        ):  # the caller's autocast: ours is inside the step
            return self._window_steps(len(prompt_ids) + gen_tokens).run(
                prompt_ids, gen_tokens, generator, should_stop
            )
