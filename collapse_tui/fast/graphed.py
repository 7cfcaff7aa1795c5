"""``GraphedInference``: any Hugging Face causal LM's generation, replayed from CUDA graphs.

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

In full context (prompt and new tokens fit in the block) a step feeds one
token against a static KV cache of ``block`` slots (``CachedSteps``, the
Hugging Face ``StaticCache``), as the eager path's KV cache does without
graphs. A model or a transformers release whose cache cannot do that (with
bf16, transformers before 5.24) keeps the eager path there. Evaluation runs
the copy (below) uncompiled, with as many windows a forward as
``EVAL_LOGITS_BYTES`` of logits allow.

Precision: with the engine's autocast dtype (bf16) the graphs run a copy of
the model whose linear weights are already in that dtype, under autocast:
the same products autocast makes of the fp32 weights, without casting every
weight for every token. Compiled, the copy's layers that read one input
(q, k and v; gate and up) compute one product together (``shared_input``).
The copy is refreshed after each optimizer step (``weights_changed``), and
before generating if a weight changed without it.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from collapse_tui.errors import in_one_line
from collapse_tui.fast.shared_input import compile_options, fuse_shared_input_linears, set_fused
from collapse_tui.fast.staleness import watch_optimizer_steps
from collapse_tui.fast.steps import StepLoop
from collapse_tui.inference import EagerInference, full_context

log = logging.getLogger(__name__)

#: Generation steps captured in one CUDA graph (a power of two), as for GPT-2.
TOKENS_PER_REPLAY = 32
#: Bytes of logits one evaluation forward may make (bf16, and their fp32 copy for the cross-entropy):
#: as many windows a forward as fit, for fewer launches of the eager forward.
EVAL_LOGITS_BYTES = 1 << 30


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
        self.master = model
        self._sources: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        if dtype == torch.float32:
            self.module = model
        else:
            self.module = _copy_with_linear_weights_in(model, dtype)
            self.module.requires_grad_(False).eval()
            self._pair()
        self._versions = [t._version for t in self._sources]
        self.dirty = False
        if self._copies:
            watch_optimizer_steps(self)

    def _pair(self) -> None:
        """Each master parameter and the copy's tensor that ``refresh`` writes it into."""
        self._sources, self._copies = [], []
        for master, twin in zip(self.master.modules(), self.module.modules(), strict=True):
            for name, source in master.named_parameters(recurse=False):
                self._sources.append(source.detach())
                self._copies.append(getattr(twin, name).detach())

    def fuse_shared_inputs(self, probe: Callable[[], object]) -> int:
        """Stack the weights of the copy's linear layers that share an input (``shared_input``); the number of groups.

        Never in fp32, where the copy is the model itself: the user's model is not changed.
        """
        if self.module is self.master:
            return 0
        try:
            return fuse_shared_input_linears(self.module, probe)
        finally:
            self._pair()  # the layers' weights are now views of the stacked ones

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


def _copy_with_linear_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy of ``model`` whose linear weights are ``dtype`` and untied from any other module.

    The weights of linear layers are converted as they are copied, so the
    copy never holds them in fp32 too (a transient twice the size). A weight
    a linear layer shares with another module (an lm_head tied to the
    embedding) is copied as it is for the other one and converted after.
    """
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    elsewhere = {
        id(parameter)
        for module in model.modules()
        if not isinstance(module, torch.nn.Linear)
        for parameter in module.parameters(recurse=False)
    }
    memo: dict[int, Any] = {
        id(linear.weight): torch.nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        for linear in linears
        if id(linear.weight) not in elsewhere
    }
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype != dtype:
            module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    return twin


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
        self.sample(owner.next_logits(window, last), owner.temperature, owner.top_k, generator)


class CachedSteps(StepLoop):
    """Full context: a step feeds one token at the counter's position against a static KV cache and samples the next."""

    append_offset = 1  # the token goes after the one fed

    def __init__(self, owner: GraphedInference, capacity: int) -> None:
        super().__init__(owner.device, capacity, owner.tokens_per_replay, owner.graph_pool)
        self.owner = owner
        self.cache = owner.new_static_cache(self.seq[:1].view(1, 1))

    def step(self, generator: torch.Generator) -> None:
        owner = self.owner
        position = self.counter  # the token at ``position`` is fed; the next one is written after it
        fed = self.seq.index_select(0, position).view(1, 1)
        self.sample(owner.cached_logits(fed, position, self.cache), owner.temperature, owner.top_k, generator)

    def start(self, prompt_len: int) -> None:
        # the cache writes where its own count says (transformers 5) or at the positions given (4):
        # empty it, so that both agree with the positions given
        self.cache.reset()
        if prompt_len > 1:  # keys and values of the prompt but its last token, in one uncompiled forward
            positions = torch.arange(prompt_len - 1, device=self.device)
            self.owner.cached_logits(
                self.seq[: prompt_len - 1].view(1, -1), positions, self.cache, compiled=False
            )
        self.counter.fill_(prompt_len - 1)

    def warm_up(self, generator: torch.Generator) -> None:
        self.cache.reset()
        super().warm_up(generator)


class GraphedInference(EagerInference):
    """``EagerInference`` whose generation runs from CUDA graphs: the window slides, or a static cache fills."""

    preparing = "compiling the model and capturing generation (up to a minute or two)"

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
        fuse_products: bool = True,
    ) -> None:
        """``compile``: run the copy's forward through ``torch.compile`` (default: on CUDA, unless
        ``COLLAPSE_TUI_COMPILE=0`` is in the environment). ``fuse_products``: when compiling a
        bf16 copy, one product for the linear layers that share an input (``shared_input``)."""
        super().__init__(model, block, temperature, top_k, autocast_dtype)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = head.weight.size(0) if head is not None else model.config.vocab_size
        self.eval_batch = max(self.eval_batch, EVAL_LOGITS_BYTES // (block * vocab * 6))
        self.weights = GenerationCopy(model, autocast_dtype or torch.float32)
        #: what the steps call: the copy's forward, compiled on first use where that works
        self.forward: Callable[..., Any] = self.weights.module
        if compile is None:
            compile = self.device.type == "cuda" and os.environ.get("COLLAPSE_TUI_COMPILE", "1") != "0"
        self.compile = compile
        self.fuse_products = fuse_products
        #: groups of linear layers whose products the compiled forward computes as one
        self.fused_groups = 0
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.tokens_per_replay = tokens_per_replay
        #: whether the forward takes ``logits_to_keep`` as a tensor of positions (transformers ≥ 4.50)
        self.keeps_given_logits = self._keep_last_only
        self._steps: dict[bool, StepLoop] = {}  # by ``kv``: full context or window
        #: set when full-context steps could not be built: that case then runs the eager KV cache
        self.eager_full_context = False

    @property
    def description(self) -> str:
        """How generation runs, for logs and the benchmark table."""
        graphed = [steps.graph is not None for steps in self._steps.values()]
        how = f"CUDA graphs of {self.tokens_per_replay} steps" if graphed and all(graphed) else "eager steps"
        compiled = self.forward is not self.weights.module
        forward = "compiled Hugging Face forward" if compiled else "Hugging Face forward"
        if compiled and self.fused_groups:
            forward += f" ({self.fused_groups} groups of products fused)"
        return f"{str(self.weights.dtype).replace('torch.', '')} copy, {forward}, {how}"

    def autocast(self) -> torch.autocast:
        """The engine's autocast for the copy's forward (disabled in fp32); no cast cache, which graphs cannot keep."""
        dtype = self.weights.dtype
        return torch.autocast(
            self.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False
        )

    def weights_changed(self) -> None:
        self.weights.refresh()

    def window_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Evaluation through the copy generation uses, uncompiled (its shapes are not generation's).

        The same products as autocast over the master weights (the copy holds
        them cast as autocast casts them), without casting every linear
        layer's weight again in every forward.
        """
        if self.weights.stale():
            self.weights.refresh()
        with torch.autocast(self.device.type, enabled=False), self.autocast():
            return self.weights.module(tokens, use_cache=False).logits

    def next_logits(self, window: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Logits ``[1, V]`` at position ``last`` [1] of ``window`` [1, block]: only that row goes through lm_head."""
        with self.autocast():
            if self.keeps_given_logits:
                logits = self.forward(window, use_cache=False, logits_to_keep=last).logits
            else:
                logits = self.forward(window, use_cache=False).logits.index_select(1, last)
        return logits.view(1, -1)

    def cached_logits(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: Any, compiled: bool = True
    ) -> torch.Tensor:
        """Logits ``[1, V]`` of the last of ``tokens`` [1, n] at ``positions`` [n], their keys and values into ``cache``."""
        forward = self.forward if compiled else self.weights.module
        cache_argument = {self._cache_argument: cache}
        with self.autocast():
            out = forward(tokens, use_cache=True, cache_position=positions, **cache_argument)
        return out.logits[:, -1]

    def new_static_cache(self, first: torch.Tensor) -> Any:
        """A Hugging Face ``StaticCache`` of ``block`` slots, allocated by one uncompiled forward of ``first`` [1, 1].

        Allocated here, so that the compiled step never traces the
        allocation. A cache that cannot store what the model's attention
        gives it raises here, and the full-context case stays eager: under
        bf16 autocast Llama's keys leave the rotary embedding in fp32 while
        its values are bf16, and transformers before 5.24 (5.17 measured)
        allocates both in the keys' dtype.
        """
        from transformers import StaticCache

        cache = StaticCache(
            config=self.model.config, max_cache_len=self.block, max_batch_size=1, device=self.device
        )
        self.cached_logits(first, torch.zeros(1, dtype=torch.long, device=self.device), cache, compiled=False)
        return cache

    def _steps_for(self, kv: bool, total: int) -> StepLoop | None:
        """The steps for this case, built (compiled, captured) on first use; ``None``: use the eager path."""
        steps = self._steps.get(kv)
        if steps is not None and steps.capacity >= total:
            return steps
        if kv and self.eager_full_context:
            return None
        capacity = StepLoop.capacity_for(self.block, total)
        try:
            steps = CachedSteps(self, capacity) if kv else WindowSteps(self, capacity)
            self._try_steps(steps)
        except Exception as error:  # a model or cache that cannot step this way: the eager path can
            if not kv:
                raise
            log.warning("full-context steps not graphed (%s): eager KV cache", in_one_line(error))
            self.eager_full_context = True
            return None
        if self.use_graphs:
            steps.capture()
        self._steps[kv] = steps
        return steps

    def _try_steps(self, steps: StepLoop) -> None:
        """Run two steps, compiling the forward for their shapes; give up what fails, one thing at a time.

        Inductor fuses the elementwise kernels around the products (norms,
        rotary embeddings, activations, residual adds), and the layers that
        read one input run one product (``shared_input``), so a step
        launches far fewer kernels (benchmarks/RESULTS.md, "Models other
        than GPT-2"). The first call compiles (tens of seconds for a large
        model). Fused products that do not compile compile one by one; a
        forward that does not compile runs uncompiled; one whose
        ``logits_to_keep`` takes no tensor of positions (older or custom
        models) computes all the window's logits and keeps one row.
        """
        if self.compile and self.forward is self.weights.module:
            self._compile()
        generator = torch.Generator(device=self.device)
        while True:
            try:
                steps.warm_up(generator)
                return
            except Exception as error:
                # before anything ran fused, the fusion may be what fails
                if self.fused_groups and not self._steps:
                    log.warning("torch.compile of the fused products failed (%s): compiling them one by one",
                                in_one_line(error))  # fmt: skip
                    self._compile_unfused()
                elif self.forward is not self.weights.module:
                    log.warning(
                        "torch.compile of the model failed (%s): its forward runs uncompiled",
                        in_one_line(error),
                    )
                    self.forward, self.compile = self.weights.module, False
                elif self.keeps_given_logits and isinstance(steps, WindowSteps):
                    log.warning("the forward took no positions as logits_to_keep (%s): all logits computed",
                                in_one_line(error))  # fmt: skip
                    self.keeps_given_logits = False
                else:
                    raise

    def _compile(self) -> None:
        """``torch.compile`` the copy's forward, with the products of layers that share an input fused where that works."""
        options = compile_options() if self.fuse_products else None
        if options is not None:
            probe = torch.zeros((1, min(self.block, 8)), dtype=torch.long, device=self.device)

            def forward() -> object:
                with self.autocast():
                    return self.weights.module(probe, use_cache=False)

            try:
                self.fused_groups = self.weights.fuse_shared_inputs(forward)
            except Exception as error:  # the probe or a stack failed: no layer was changed
                log.warning("products not fused (%s)", in_one_line(error))
        if self.fused_groups:
            try:
                self.forward = torch.compile(self.weights.module, dynamic=False, options=options)
                return
            except Exception as error:  # this torch takes no such option: compile the layers one by one
                log.warning("products not fused (%s)", in_one_line(error))
        self._compile_unfused()

    def _compile_unfused(self) -> None:
        """``torch.compile`` the copy's forward with every layer tracing its own product."""
        set_fused(self.weights.module, False)
        self.fused_groups = 0
        self.forward = torch.compile(self.weights.module, dynamic=False)

    @torch.no_grad()
    def prepare(self, prompt_len: int, gen_tokens: int) -> None:
        total = prompt_len + gen_tokens
        with torch.autocast(self.device.type, enabled=False):
            self._steps_for(full_context(total, self.block), total)

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
        total = len(prompt_ids) + gen_tokens
        kv = full_context(total, self.block)
        if self.weights.stale():
            self.weights.refresh()
        with torch.autocast(self.device.type, enabled=False):  # the caller's: ours is inside the step
            steps = self._steps_for(kv, total) if gen_tokens > 0 else None
            if steps is not None:
                return steps.run(prompt_ids, gen_tokens, generator, should_stop)
        return super().generate(prompt_ids, gen_tokens, generator, should_stop)
