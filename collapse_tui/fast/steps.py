"""``StepLoop``: generation as a loop of device-side steps, replayed from CUDA graphs.

Why: a token's forward is hundreds of small kernels, and launching them one
by one from Python costs more than running them. A step here reads its
context from a token buffer on the device, samples on the device and writes
the new token back, advancing a counter that is also a device tensor; so no
step needs the host, and runs of 1, 2, 4, ... ``tokens_per_replay`` steps
can be captured once and replayed, one launch per chunk of tokens. Nothing
comes back to the host until the sample is complete.

A subclass says what one step computes (``step``) and how a sample starts
(``start``): the GPT-2 path (``fast/inference.py``) and the generic one for
any causal LM (``fast/graphed.py``) share the capture and the replay loop.

Randomness: inside a graph, sampling draws from a generator owned by the loop
(or shared by the loops that make one sample, ``capture``) and registered with
the graphs, seeded at the start of every sample from the caller's generator,
so a run is deterministic given its seed (it does not reproduce the eager
path's draws). Without graphs (the CPU, or a capture that failed) the
caller's generator is used directly, like ``EagerInference``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch

from collapse_tui.capture import capturing
from collapse_tui.errors import RunInterrupted
from collapse_tui.fast.topk_race import Append, RaceBuffers, sample_token
from collapse_tui.inference import STOP_CHECK_EVERY

log = logging.getLogger(__name__)


class StepLoop(ABC):
    """A token buffer and a counter on the device, and one captured step that extends the buffer."""

    #: where ``sample`` writes a step's token: at the counter (0), or after it (1: the counter holds the token fed)
    append_offset = 0

    def __init__(self, device: torch.device, capacity: int, tokens_per_replay: int, graph_pool: Any) -> None:
        self.device = device
        self.capacity = capacity
        self.tokens_per_replay = tokens_per_replay
        self.graph_pool = graph_pool
        self.seq = torch.zeros(capacity, dtype=torch.long, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.generator: torch.Generator | None = None
        #: the sampling race's scratch, made by the first step (a warm-up, never a capture)
        self.race: RaceBuffers | None = None

    @staticmethod
    def capacity_for(block: int, total: int) -> int:
        """Buffer length for samples of ``total`` tokens: rounded up to 1024, so that a few sizes serve every run."""
        return -(-max(block, total) // 1024) * 1024

    @staticmethod
    def graph_seed(generator: torch.Generator) -> int:
        """The seed the graphs' generator takes for a sample, drawn from the caller's (one host sync)."""
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))

    @abstractmethod
    def step(self, generator: torch.Generator) -> None:
        """One token: read the context from ``seq``, write the sampled token, advance ``counter``.

        Only device work, no host sync: it is captured in CUDA graphs.
        """

    def sample(
        self, logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator
    ) -> None:
        """Draw the next token from ``logits`` [1, V], write it into ``seq`` and advance ``counter``.

        On CUDA the race's last block does the writing (``topk_race.Append``)
        and keeps its scratch zeroed for the next step, so a step launches no
        copies of its own.
        """
        if self.race is None or self.race.vocab != logits.size(-1):
            self.race = RaceBuffers(logits.size(-1), logits.device)
        append = Append(self.seq, self.counter, self.append_offset)
        sample_token(logits, temperature, top_k, generator, self.race, append)

    def start(self, prompt_len: int) -> None:
        """Make the state a sample starts from, its prompt already in ``seq``: the first new token goes at ``prompt_len``."""
        self.counter.fill_(prompt_len)

    def warm_up(self, generator: torch.Generator) -> None:
        """Two steps from a valid state (``run`` sets the real one): compiles, tunes and allocates what a step needs."""
        self.counter.fill_(1)
        for _ in range(2):
            self.step(generator)

    def _capture_steps(self, steps: int, generator: torch.Generator) -> torch.cuda.CUDAGraph:
        """One CUDA graph of ``steps`` consecutive steps: one launch for ``steps`` tokens."""
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(generator)
        # thread_local: CUDA calls of another thread (a TUI) cannot break the capture
        with capturing(graph, pool=self.graph_pool, capture_error_mode="thread_local"):
            for _ in range(steps):
                self.step(generator)
        return graph

    def capture(self, generator: torch.Generator | None = None) -> None:
        """Capture chunks of steps in CUDA graphs; on failure keep running eagerly (still no host sync).

        One graph per power of two up to ``tokens_per_replay``: a sample of n
        tokens replays the largest chunk while it fits, then at most one graph
        of each smaller size. Several steps per graph remove the gap between
        replays (~0.15 ms a token for gpt2-medium with one step per replay);
        all graphs share one memory pool and the generator: ``generator``
        where loops take turns on one sample (so that the second continues
        the first's draws, ``run``'s ``continue_draws``), else a new one.
        """
        generator = generator if generator is not None else torch.Generator(device=self.device)
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            log.warning("this torch cannot register a generator with a CUDA graph: generation runs eagerly")
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        try:
            # warm up on a side stream, as capture requires: Triton compiles and tunes, cuBLAS picks its kernels
            with torch.cuda.stream(stream):
                self.warm_up(generator)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            chunk = 1
            while chunk <= self.tokens_per_replay:
                self.counter.fill_(1)  # the captured steps must stay inside the buffers
                graphs[chunk] = self._capture_steps(chunk, generator)
                chunk *= 2
        except RuntimeError as error:  # pragma: no cover - depends on the torch build and the model
            log.warning("CUDA graph capture failed (%s): generation runs eagerly", error)
            torch.cuda.synchronize(self.device)
            return
        self.graphs, self.generator = graphs, generator

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The one-step graph (``None`` when steps run eagerly)."""
        return self.graphs.get(1)

    def _chunks(self, gen_tokens: int) -> Iterator[int]:
        """Steps per launch: the largest captured chunk while it fits, then the smaller ones."""
        sizes = sorted(self.graphs, reverse=True) if self.graphs else [1]
        left = gen_tokens
        for size in sizes:
            while left >= size:
                yield size
                left -= size

    def run(
        self,
        prompt_ids: list[int],
        gen_tokens: int,
        generator: torch.Generator,
        should_stop: Callable[[], bool],
        continue_draws: bool = False,
    ) -> list[int]:
        """The prompt followed by ``gen_tokens`` sampled tokens; ``RunInterrupted`` when asked to stop.

        ``continue_draws``: the graphs' generator goes on from where another
        loop that shares it left it (that loop sampled the start of this
        sample), instead of being seeded for a new sample.
        """
        prompt_len = len(prompt_ids)
        self.seq[:prompt_len].copy_(torch.tensor(prompt_ids, dtype=torch.long))
        self.start(prompt_len)
        if self.graphs and not continue_draws:
            # one host sync per sample, to seed the graphs' generator from the caller's
            self.generator.manual_seed(self.graph_seed(generator))  # type: ignore[union-attr]
        done, checked = 0, -STOP_CHECK_EVERY
        for size in self._chunks(gen_tokens):
            if done - checked >= STOP_CHECK_EVERY:
                if should_stop():
                    raise RunInterrupted
                checked = done
            if self.graphs:
                self.graphs[size].replay()
            else:
                self.step(generator)
            done += size
        return self.seq[: prompt_len + gen_tokens].tolist()
