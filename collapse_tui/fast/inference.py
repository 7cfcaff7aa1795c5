"""``FastGPT2Inference``: the engine's generation and evaluation for GPT-2, with fixed shapes.

Generation keeps the whole loop on the device and replays it from CUDA
graphs, 32 tokens a launch (``steps.StepLoop``, which also says how the
graphs draw their random numbers); this module gives it GPT-2's steps.

The two cases of DESIGN section 1 need two steps:

- sliding window (the sequence outgrows ``block``): a KV cache is not exact,
  because the window's positions restart at 0 every token, so each step
  re-runs a fixed ``[1, block]`` window. Until the sequence outgrows
  ``block`` every token sees the whole sequence from position 0, so a run
  starts on the KV cache (below) and switches to the window when it must.
  (The window's step itself, when the sequence is shorter, uses the same
  shape with the tail of the buffer as right padding and reads the logits
  at the last real token; causal attention makes the padding invisible.)
- full context (prompt + new tokens fit in ``block``): a static KV cache, one
  token per step, attention over the cache with an additive mask for the
  slots not yet written.

Evaluation runs all windows of a set in a few large forwards and computes the
cross-entropy over chunks of positions, so no more than a chunk of logits
exists at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from collapse_tui.errors import in_one_line
from collapse_tui.fast.cluster import ClusterDecode, cluster_unsupported
from collapse_tui.fast.gpt2 import GPT2Weights
from collapse_tui.fast.kernels import token_losses
from collapse_tui.fast.persistent import PersistentForward, Plan, check_plan, persistent_unsupported
from collapse_tui.fast.steps import StepLoop
from collapse_tui.inference import Inference, full_context

log = logging.getLogger(__name__)

#: Token positions per evaluation forward: bounds activation memory (MLP: 4 × width × this).
EVAL_TOKENS_PER_FORWARD = 16384
#: Generation steps captured in one CUDA graph: one launch per this many tokens (a power of two).
TOKENS_PER_REPLAY = 32
#: Positions per cross-entropy chunk: bounds the logits held at once (vocab × this; fp32 too off Triton).
LOGIT_CHUNK = 2048
#: Token id that pads a short evaluation window to its batch's length: never scored, fed as token 0.
PAD = -100


class _Decoder(StepLoop):
    """One way of generating GPT-2 tokens (window or KV cache), and its persistent forward where it applies."""

    def __init__(self, owner: FastGPT2Inference, capacity: int, kv: bool) -> None:
        super().__init__(owner.device, capacity, owner.tokens_per_replay, owner.graph_pool)
        self.owner = owner
        self.kv = kv
        device = owner.device
        if kv:
            self.cache_len = -(-owner.block // 16) * 16  # aligned rows for the attention kernels
            self.cache = owner.weights.new_kv_cache(self.cache_len)
            self.slots = torch.arange(self.cache_len, device=device)
        else:
            self.window = torch.arange(owner.block, device=device)
        self.append_offset = 1 if kv else 0  # a cached step writes the token after the one it feeds
        #: the whole forward in one launch a token, where the shape allows: a cached token on the CUDA
        #: cluster kernel where it runs (cluster.py), else on the Triton kernel (persistent.py)
        self.persistent: PersistentForward | ClusterDecode | None = None
        #: what takes over if the one in use fails, best first; then layer by layer
        self.fallbacks: list[PersistentForward | ClusterDecode] = []
        if owner.use_persistent:
            rows = 1 if kv else owner.block
            reason = persistent_unsupported(owner.weights, rows)
            if reason is None:
                self.fallbacks.append(
                    PersistentForward(
                        owner.weights, rows, cache=self.cache if kv else None, plan=owner.persistent_plan
                    )
                )
            else:
                log.info("persistent forward not used: %s", reason)
            if kv and owner.persistent_plan is None:  # also where the Triton kernel is not (gpt2-large)
                self.fallbacks[:0] = self._cluster_decode()
            self._next_kernel()

    def _cluster_decode(self) -> list[ClusterDecode]:
        """The CUDA cluster kernel for the cached step, if it runs here (built now: NVRTC, seconds)."""
        reason = cluster_unsupported(self.owner.weights)
        if reason is None:
            try:
                return [ClusterDecode(self.owner.weights, self.cache)]
            except Exception as error:  # an optional kernel: any failure to build it means the Triton one
                reason = in_one_line(error)
        log.info("CUDA cluster decode not used: %s", reason)
        return []

    def _next_kernel(self, problem: str | None = None) -> None:
        """The next one-launch forward in line (or layer by layer), dropping the one in use for ``problem``."""
        dropped, self.persistent = self.persistent, self.fallbacks.pop(0) if self.fallbacks else None
        if problem is not None:  # None: the first in line, at the start
            instead = type(self.persistent).__name__ if self.persistent is not None else "layer by layer"
            log.warning("%s dropped (%s): generating with %s", type(dropped).__name__, problem, instead)

    def step(self, generator: torch.Generator) -> None:
        weights, block = self.owner.weights, self.owner.block
        if self.persistent is not None:
            # the kernel finds its tokens in the sequence and the race appends the token: six launches
            # a token (forward, lm_head, the draws, two histograms, the race), no gathers or copies
            logits = weights.logits(self.persistent.run_sequence(self.seq, self.counter))
        elif self.kv:
            position = self.counter  # the token at ``position`` is fed; the next one is written after it
            fed = self.seq.index_select(0, position)
            mask = torch.where(self.slots <= position, 0.0, float("-inf")).to(weights.dtype)
            logits = weights.decode_one(fed, position, self.cache, mask.view(1, 1, 1, -1))
        else:
            target = self.counter  # the token written at ``target`` sees seq[max(0, target-block):target]
            start = (target - block).clamp_(min=0)
            window = self.seq.index_select(0, start + self.window)
            x = weights.hidden(window.view(1, block))[0]
            logits = weights.logits(x.index_select(0, target.clamp(max=block) - 1))
        self.sample(logits, self.owner.temperature, self.owner.top_k, generator)

    def start(self, prompt_len: int) -> None:
        if self.kv:
            # keys and values of the prompt but its last token, in one forward; the
            # steps then feed one token each, starting with the prompt's last
            if prompt_len > 1:
                self.owner.weights.hidden(self.seq[: prompt_len - 1].view(1, -1), self.cache)
            self.counter.fill_(prompt_len - 1)
        else:
            self.counter.fill_(prompt_len)

    def check_persistent(self) -> None:
        """Run two steps on the one-launch forward and drop it for the next in line while they fail.

        Failing here means a kernel that does not build on this GPU (Triton's
        compile errors are not ``RuntimeError``s) or a grid barrier or poll
        that gave up, e.g. when another process's kernels keep some SMs busy
        so that not all CTAs are resident. Generation then runs on the next
        kernel in line, or layer by layer when none is left, instead of
        finding out after a whole sample.
        """
        while self.persistent is not None:
            try:
                self.warm_up(torch.Generator(device=self.owner.device))
                problem = "a grid barrier or poll gave up" if self.persistent.failed() else None
            except Exception as error:  # any failure of the optional kernel means: go without it
                problem = in_one_line(error)
            if problem is None:
                return
            self._next_kernel(problem)

    def run(
        self,
        prompt_ids: list[int],
        gen_tokens: int,
        generator: torch.Generator,
        should_stop: Callable[[], bool],
        continue_draws: bool = False,
    ) -> list[int]:
        sample = super().run(prompt_ids, gen_tokens, generator, should_stop, continue_draws)
        if self.persistent is not None and self.persistent.failed():
            # a grid barrier or poll gave up (CTAs not all resident?): this sample is not to
            # be trusted; drop the kernel for good and generate it again (from a fresh seed
            # drawn from the caller's generator: not the draws a run that never used the
            # kernel would have made) on the next in line
            self._next_kernel("a grid barrier or poll gave up during a sample")
            self.check_persistent()  # the next in line has not run in this process yet
            if self.graphs:
                self.graphs = {}
                self.capture()
            return self.run(prompt_ids, gen_tokens, generator, should_stop)
        return sample

    def capture(self, generator: torch.Generator | None = None) -> None:
        """Capture with the generator both decoders share: a window sample's steps continue its cached start's draws."""
        super().capture(self.owner.graph_generator if generator is None else generator)


class FastGPT2Inference(Inference):
    """Generation and evaluation of a ``GPT2LMHeadModel`` through ``GPT2Weights``."""

    preparing = "building kernels and capturing generation"

    def __init__(
        self,
        model: torch.nn.Module,
        block: int,
        temperature: float,
        top_k: int | None,
        dtype: torch.dtype = torch.bfloat16,
        use_graphs: bool | None = None,
        tokens_per_replay: int = TOKENS_PER_REPLAY,
        use_persistent: bool = True,
        persistent_plan: Plan | None = None,
    ) -> None:
        super().__init__(block, temperature, top_k)
        self.model = model
        self.device = next(model.parameters()).device
        self.weights = GPT2Weights(model, dtype)
        self.max_positions = model.config.n_positions
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        #: the graphs' generator, shared by both decoders (a window sample starts on the KV cache's)
        self.graph_generator = torch.Generator(device=self.device) if self.use_graphs else None
        self.tokens_per_replay = tokens_per_replay
        #: try the one-launch-a-token forward (persistent.py) where the device and shape allow
        self.use_persistent = use_persistent
        self.persistent_plan = persistent_plan
        if persistent_plan is not None:
            check_plan(persistent_plan, model.config.n_embd)
        self._decoders: dict[bool, _Decoder] = {}

    @property
    def description(self) -> str:
        """How generation runs, for logs and the benchmark table."""
        parts = [str(self.weights.dtype).replace("torch.", "")]
        parts.append("triton add+layernorm" if self.weights.use_triton else "torch layernorm")
        parts.append("cuBLASLt gelu" if self.weights.fused_gelu else "torch gelu")
        kernels = [d.persistent for d in self._decoders.values()]
        if any(isinstance(k, PersistentForward) for k in kernels):
            parts.append("persistent forward (one launch a token)")
        parts += [k.description for k in kernels if isinstance(k, ClusterDecode)]
        if (None in kernels or not kernels) and self.weights.use_skinny:  # a decoder runs layer by layer
            parts.append("Triton split-K residual products")
        graphs = [d.graph is not None for d in self._decoders.values()]
        parts.append(
            f"CUDA graphs of {self.tokens_per_replay} steps" if graphs and all(graphs) else "eager steps"
        )
        return ", ".join(parts)

    def weights_changed(self) -> None:
        self.weights.refresh()

    def _fresh(self) -> None:
        """Refresh if a master weight changed without ``weights_changed`` being called."""
        if self.weights.stale():
            self.weights.refresh()

    def _forward_context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.autocast(self.device.type, enabled=False))  # the caller's autocast
        return stack

    def _decoder(self, kv: bool, total: int) -> _Decoder:
        decoder = self._decoders.get(kv)
        if decoder is None or decoder.capacity < total:
            capacity = StepLoop.capacity_for(self.block, total)
            decoder = _Decoder(self, capacity, kv)
            decoder.check_persistent()
            if self.use_graphs:
                decoder.capture()
            self._decoders[kv] = decoder
        return decoder

    def _cached_start(self, prompt_len: int, total: int) -> int:
        """How many of a sample's first tokens come from the KV cache: all of a full-context sample's;
        of a window sample's, those that still see the sequence from position 0 (up to ``block + 1``)."""
        if full_context(total, self.block):
            return total - prompt_len
        return max(0, self.block + 1 - prompt_len)

    def _decoders_for(self, prompt_len: int, total: int) -> tuple[_Decoder | None, _Decoder | None]:
        """The decoders a sample takes, built if need be: the cached start's (if it has one), the window's
        (if it outgrows the block). Both are built before either runs: building captures, and capturing
        draws from the generator the two share."""
        cached = (
            self._decoder(True, min(total, self.block + 1)) if self._cached_start(prompt_len, total) else None
        )
        window = None if full_context(total, self.block) else self._decoder(False, total)
        return cached, window

    def prepare(self, prompt_len: int, gen_tokens: int) -> None:
        with self._forward_context():
            self._fresh()
            self._decoders_for(prompt_len, prompt_len + gen_tokens)

    def generate(
        self,
        prompt_ids: list[int],
        gen_tokens: int,
        generator: torch.Generator,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> list[int]:
        if not prompt_ids:
            raise ValueError("generation needs a prompt of at least one token")
        if gen_tokens <= 0:
            return list(prompt_ids)
        total = len(prompt_ids) + gen_tokens
        kv = full_context(total, self.block)
        longest = total - 1 if kv else self.block  # positions one forward sees
        if longest > self.max_positions:
            raise ValueError(f"block {self.block} is longer than the model's {self.max_positions} positions")
        with self._forward_context():
            self._fresh()
            head = self._cached_start(len(prompt_ids), total)
            cached, window = self._decoders_for(len(prompt_ids), total)
            if cached is not None:
                # exact: these tokens see the whole sequence at its own positions, as the window would
                prompt_ids = cached.run(prompt_ids, head, generator, should_stop)
            if window is None:
                return prompt_ids
            # the window's graphs go on with the draws of the cached start's (one generator, seeded once)
            continued = cached is not None and bool(cached.graphs)
            return window.run(prompt_ids, gen_tokens - head, generator, should_stop, continue_draws=continued)

    def _row_batches(self, windows: torch.Tensor) -> Iterator[torch.Tensor]:
        rows = max(1, EVAL_TOKENS_PER_FORWARD // max(1, windows.size(1) - 1))
        yield from windows.split(rows)

    def mean_losses(self, sets: list[list[torch.Tensor]]) -> list[float]:
        """Every set's mean loss from one batch: all groups of all sets, shorter windows padded at their end
        with ``PAD``, which is not scored.

        Causal attention keeps a window's tokens blind to the padding after
        them, so each set's mean is over its own tokens, as one forward per
        group would give. One batch means one forward's launches and one host
        sync for the whole evaluation: the generated text's few windows alone
        were host-bound (gpt2-medium: ~12 ms of launching for ~2 ms of kernels).
        """
        kept = [[group for group in groups if group.numel()] for groups in sets]
        flat = [group for groups in kept for group in groups]
        if not flat:
            return [float("nan")] * len(sets)
        width = max(group.size(1) for group in flat)
        batch = torch.cat([F.pad(group, (0, width - group.size(1)), value=PAD) for group in flat])
        sums, counts = self._row_losses(batch)
        row_sums, row_counts = sums.tolist(), counts.tolist()  # the one host sync
        means, first = [], 0
        for groups in kept:
            last = first + sum(group.size(0) for group in groups)
            count = sum(row_counts[first:last])
            means.append(sum(row_sums[first:last]) / count if count else float("nan"))
            first = last
        return means

    def mean_loss(self, windows: list[torch.Tensor]) -> float:
        return self.mean_losses([windows])[0]

    def loss_sum(self, windows: torch.Tensor) -> tuple[float, int]:
        """Summed cross-entropy of ``windows`` [n, length + 1] (targets ``PAD`` not scored) and its count."""
        sums, counts = self._row_losses(windows)
        return float(sums.sum()), int(counts.sum())

    def _row_losses(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each window's summed cross-entropy (fp64, on the device) and its scored targets (on the host)."""
        if windows.size(1) - 1 > self.max_positions:
            raise ValueError(f"windows of {windows.size(1) - 1} tokens exceed the model's positions")
        counts = (windows[:, 1:] != PAD).sum(1).cpu()  # the engine's windows are on the host: no sync
        losses = torch.empty(windows.size(0) * (windows.size(1) - 1), device=self.device)
        with self._forward_context():
            self._fresh()
            windows = windows.to(self.device, non_blocking=True)
            done = 0
            for batch in self._row_batches(windows):
                x = self.weights.hidden(batch[:, :-1].clamp(min=0)).flatten(0, 1)
                targets = batch[:, 1:].flatten()
                for xs, ts in zip(x.split(LOGIT_CHUNK), targets.split(LOGIT_CHUNK), strict=True):
                    logits = self.weights.logits(xs)
                    losses[done : done + ts.numel()] = token_losses(logits, ts, PAD, self.weights.use_triton)
                    done += ts.numel()
        return losses.view(windows.size(0), -1).double().sum(1), counts
