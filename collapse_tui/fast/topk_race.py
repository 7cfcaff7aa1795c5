"""``sample_token``: the next token from one row of logits on the device, with temperature and top-k.

It draws from the distribution of ``collapse_tui.sampling.sample_next`` by
the same exponential race, written as ``argmax(x / T - log E)`` over the
top-k logits (the log of ``p / E`` up to a constant), so it needs no
softmax. On CUDA the whole draw is five launches (the exponential draws,
zeroing a small state, two histograms that find the k-th largest bf16 logit
exactly, the race; ``topk_race_kernel.py``; four with ``RaceBuffers``,
below) instead of ``torch.topk``'s dozen,
and nothing comes back to the host, so it can be captured in a CUDA graph.
Elsewhere (the CPU, or no Triton) it is plain torch.

A generation loop that samples every token passes ``RaceBuffers`` (the
state lives on, and the race's last block zeroes it for the next token:
one launch fewer) and an ``Append`` (the race's last block writes the token
into the sequence and advances the loop's counter: two launches fewer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import ModuleType

import torch

#: Logits per block of the Triton kernels: 25 blocks for GPT-2's 50,257.
BLOCK = 2048
#: Slots of the int32 state the kernels share, zeroed for each token: two 256-bin
#: histograms (``state[0:256]``, ``state[256:512]``), then the count of finished race blocks.
STATE_SLOTS = 2 * 256 + 1


#: One kernel launch: the kernel's name in ``topk_race_kernel``, its grid, arguments and constants.
Launch = tuple[str, tuple[int], tuple, dict]


@dataclass
class Append:
    """Where a generation loop keeps its tokens: the winner goes to ``seq[counter + offset]``, then ``counter += 1``.

    ``seq`` and ``counter`` are int64 tensors on the logits' device; ``offset``
    is 0 when the counter holds the position written, 1 when it holds the
    position fed (a KV-cache step writes the token after the one it feeds).
    """

    seq: torch.Tensor
    counter: torch.Tensor
    offset: int = 0

    def torch_append(self, token: torch.Tensor) -> None:
        """The same write without the kernels (the CPU, no Triton)."""
        self.seq.index_copy_(0, self.counter + self.offset, token.view(1))
        self.counter.add_(1)


@dataclass
class RaceBuffers:
    """The race's scratch for one row of ``vocab`` logits, allocated once and reused token after token.

    ``state`` starts zeroed and the race's last block zeroes it again when it
    is done, so a loop needs no zeroing launch per token.
    """

    vocab: int
    device: torch.device
    state: torch.Tensor = field(init=False)
    best: torch.Tensor = field(init=False)
    index: torch.Tensor = field(init=False)
    token: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        blocks = -(-self.vocab // BLOCK)
        self.state = torch.zeros(STATE_SLOTS, dtype=torch.int32, device=self.device)
        self.best = torch.empty(blocks, dtype=torch.float32, device=self.device)
        self.index = torch.empty(blocks, dtype=torch.int64, device=self.device)
        self.token = torch.empty(1, dtype=torch.int64, device=self.device)


def launches(
    logits: torch.Tensor,
    draws: torch.Tensor,
    top_k: int | None,
    temperature: float,
    buffers: RaceBuffers | None = None,
    append: Append | None = None,
) -> tuple[list[Launch], torch.Tensor]:
    """The kernel launches that race one row of ``logits`` [V] with ``draws`` [V], and the token [1] they write.

    Without ``buffers`` each call makes its own (one zeroing launch). Needs
    Triton only to run them: scripts/compile_kernels.py builds the same
    launches for a GPU on a machine without one.
    """
    n = logits.size(-1)
    blocks = -(-n // BLOCK)
    device = logits.device
    if buffers is None or buffers.vocab != n or buffers.device != device:
        buffers = RaceBuffers(n, device)
    state, best, index, token = buffers.state, buffers.best, buffers.index, buffers.token
    common = {"BLOCK": BLOCK, "num_warps": 4}
    plan: list[Launch] = []
    kth = logits  # read only with THRESHOLD 2
    if top_k is None or top_k >= n:
        threshold, k = 0, 0
    elif logits.dtype == torch.bfloat16:
        threshold, k = 1, top_k
        plan.append(("high_histogram", (blocks,), (logits, state, n), common))
        plan.append(("low_histogram", (blocks,), (logits, state, n, k), common))
    else:  # other dtypes (fp32, fp16) would need other digits: torch.topk finds the k-th largest
        threshold, k = 2, top_k
        kth = torch.topk(logits, top_k, sorted=False).values.amin().view(1)
    seq, counter = (append.seq, append.counter) if append is not None else (token, token)
    race_args = (logits, draws, kth, state, best, index, token, seq, counter, n, k, 1.0 / temperature)
    blocks_p2 = 1 << (blocks - 1).bit_length()
    constants = {
        "THRESHOLD": threshold, "BLOCKS": blocks_p2, "APPEND": append is not None,
        "OFFSET": append.offset if append is not None else 0, **common,
    }  # fmt: skip
    plan.append(("race", (blocks,), race_args, constants))
    return plan, token


@functools.cache
def _kernels() -> ModuleType | None:
    """``topk_race_kernel``, imported on first use; ``None`` without Triton."""
    try:
        from collapse_tui.fast import topk_race_kernel
    except ImportError:
        return None
    return topk_race_kernel


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    buffers: RaceBuffers | None = None,
    append: Append | None = None,
) -> torch.Tensor:
    """One token id ``[1]`` from logits ``[1, V]``: the distribution of ``sampling.sample_next``.

    With the same generator it consumes the same draws as ``sample_next``
    and picks the same token (up to rounding). ``buffers`` and ``append``:
    see the module's docstring. With ``buffers`` the tensor returned is
    ``buffers.token``, which the next race with them overwrites.
    """
    draws = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    draws.exponential_(1.0, generator=generator)
    return race_winner(
        logits, draws, temperature, top_k, use_triton=logits.is_cuda, buffers=buffers, append=append
    )


def race_winner(
    logits: torch.Tensor,
    draws: torch.Tensor,
    temperature: float,
    top_k: int | None,
    *,
    use_triton: bool,
    buffers: RaceBuffers | None = None,
    append: Append | None = None,
) -> torch.Tensor:
    """``argmax(x / T - log E)`` ``[1]`` over the logits at or above the k-th largest (ties all take part).

    ``use_triton`` runs the kernels of ``topk_race_kernel.py`` where Triton
    is installed (on the CPU only under Triton's interpreter, which the tests
    use); otherwise plain torch. With ``append`` the token also goes into the
    loop's sequence (``Append``).
    """
    kernels = _kernels() if use_triton else None
    if kernels is not None:
        plan, token = launches(
            logits.reshape(-1).contiguous(), draws.reshape(-1), top_k, temperature, buffers, append
        )
        for name, grid, args, constants in plan:
            getattr(kernels, name)[grid](*args, **constants)
        return token
    x = logits.float().view(1, -1)
    score = x / temperature - draws.view(1, -1).log()
    if top_k is not None and top_k < x.size(-1):
        kth = torch.topk(x, top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        score = score.masked_fill(x < kth, float("-inf"))
    token = score.argmax(dim=-1)
    if append is not None:
        append.torch_append(token)
    return token
