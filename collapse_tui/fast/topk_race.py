"""``sample_token``: the next token from one row of logits on the device, with temperature and top-k.

It draws from the distribution of ``collapse_tui.sampling.sample_next`` by
the same exponential race, written as ``argmax(x / T - log E)`` over the
top-k logits (the log of ``p / E`` up to a constant), so it needs no
softmax. On CUDA the whole draw is five launches (the exponential draws,
zeroing a small state, two histograms that find the k-th largest bf16 logit
exactly, the race; ``topk_race_kernel.py``) instead of ``torch.topk``'s dozen,
and nothing comes back to the host, so it can be captured in a CUDA graph.
Elsewhere (the CPU, or no Triton) it is plain torch.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

#: Logits per block of the Triton kernels: 25 blocks for GPT-2's 50,257.
BLOCK = 2048
#: Slots of the int32 state the kernels share, zeroed for each token: two 256-bin
#: histograms (``state[0:256]``, ``state[256:512]``), then the count of finished race blocks.
STATE_SLOTS = 2 * 256 + 1


#: One kernel launch: the kernel's name in ``topk_race_kernel``, its grid, arguments and constants.
Launch = tuple[str, tuple[int], tuple, dict]


def launches(
    logits: torch.Tensor, draws: torch.Tensor, top_k: int | None, temperature: float
) -> tuple[list[Launch], torch.Tensor]:
    """The kernel launches that race one row of ``logits`` [V] with ``draws`` [V], and the token [1] they write.

    Needs Triton only to run them: scripts/compile_kernels.py builds the same
    launches for a GPU on a machine without one.
    """
    n = logits.size(-1)
    blocks = -(-n // BLOCK)
    device = logits.device
    state = torch.zeros(STATE_SLOTS, dtype=torch.int32, device=device)
    best = torch.empty(blocks, dtype=torch.float32, device=device)
    index = torch.empty(blocks, dtype=torch.int64, device=device)
    token = torch.empty(1, dtype=torch.int64, device=device)
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
    race_args = (logits, draws, kth, state, best, index, token, n, k, 1.0 / temperature)
    blocks_p2 = 1 << (blocks - 1).bit_length()
    plan.append(("race", (blocks,), race_args, {"THRESHOLD": threshold, "BLOCKS": blocks_p2, **common}))
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
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id ``[1]`` from logits ``[1, V]``: the distribution of ``sampling.sample_next``.

    With the same generator it consumes the same draws as ``sample_next``
    and picks the same token (up to rounding).
    """
    draws = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    draws.exponential_(1.0, generator=generator)
    return race_winner(logits, draws, temperature, top_k, use_triton=logits.is_cuda)


def race_winner(
    logits: torch.Tensor, draws: torch.Tensor, temperature: float, top_k: int | None, *, use_triton: bool
) -> torch.Tensor:
    """``argmax(x / T - log E)`` ``[1]`` over the logits at or above the k-th largest (ties all take part).

    ``use_triton`` runs the kernels of ``topk_race_kernel.py`` where Triton
    is installed (on the CPU only under Triton's interpreter, which the tests
    use); otherwise plain torch.
    """
    kernels = _kernels() if use_triton else None
    if kernels is not None:
        plan, token = launches(logits.reshape(-1).contiguous(), draws.reshape(-1), top_k, temperature)
        for name, grid, args, constants in plan:
            getattr(kernels, name)[grid](*args, **constants)
        return token
    x = logits.float().view(1, -1)
    score = x / temperature - draws.view(1, -1).log()
    if top_k is not None and top_k < x.size(-1):
        kth = torch.topk(x, top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        score = score.masked_fill(x < kth, float("-inf"))
    return score.argmax(dim=-1)
