"""The few fused operations the fast GPT-2 forward needs, each with a plain-torch fallback.

Generating one token re-runs a whole window through every layer, so on the GPU
the time goes to the number of kernels per layer as much as to the bytes of
weights read. Two fusions remove most of the small kernels:

- ``add_layernorm``: the residual update ``h += y + bias`` and the layer norm
  that follows it, one Triton kernel instead of three or four. The residual
  stream ``h`` stays in fp32 (as it does under autocast), the normalised
  output is in the compute dtype for the next matrix product.
- ``linear_gelu``: the MLP's up-projection with its bias and the tanh GELU as
  one cuBLASLt call (``torch._addmm_activation``), used only where a probe
  shows it computes the tanh form GPT-2 uses (on the CPU it computes erf GELU).
- ``token_losses``: each evaluated token's cross-entropy straight from the
  bf16 logits, one Triton program a token, instead of an fp32 copy of the
  logits, a log-softmax over it and a gather (a 2,048-token chunk of
  gpt2-medium's validation set: ~0.66 ms of kernels, mostly those three).

Without Triton or CUDA the same functions run as ordinary torch operations,
which is what the CPU tests exercise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _add_layernorm_torch(
    h: torch.Tensor,
    y: torch.Tensor | None,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if y is not None:
        h.add_(y.sum(0) if y.dim() > h.dim() else y)
        if bias is not None:
            h.add_(bias)
    return F.layer_norm(h, (h.size(-1),), weight, shift, eps).to(out_dtype)


@functools.cache
def _triton_add_layernorm() -> Callable[..., torch.Tensor] | None:
    """Build the Triton kernel once; ``None`` when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(h_ptr, y_ptr, bias_ptr, w_ptr, b_ptr, out_ptr, n_cols, split_stride, eps,
               HAS_Y: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        offsets = row * n_cols + cols
        h = tl.load(h_ptr + offsets, mask=mask, other=0.0)
        if HAS_Y:
            for split in tl.static_range(SPLITS):  # split-K partial sums, in a fixed order
                h += tl.load(y_ptr + split * split_stride + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                h += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(h_ptr + offsets, h, mask=mask)
        mean = tl.sum(h, axis=0) / n_cols
        centred = tl.where(mask, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (centred * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)

    def add_layernorm(
        h: torch.Tensor,
        y: torch.Tensor | None,
        bias: torch.Tensor | None,
        weight: torch.Tensor,
        shift: torch.Tensor,
        eps: float,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        n_cols = h.size(-1)
        out = torch.empty(h.shape, dtype=out_dtype, device=h.device)
        block = triton.next_power_of_2(n_cols)
        splits = 1 if y is None or y.dim() == h.dim() else y.size(0)
        kernel[(h.numel() // n_cols,)](
            h, h if y is None else y, weight if bias is None else bias, weight, shift, out, n_cols,
            h.numel(), eps, HAS_Y=y is not None, SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=4 if block <= 1024 else 8,
        )  # fmt: skip
        return out

    return add_layernorm


def add_layernorm(
    h: torch.Tensor,
    y: torch.Tensor | None,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    use_triton: bool,
) -> torch.Tensor:
    """``h += y + bias`` in place (when ``y`` is given), then ``layer_norm(h)`` in ``out_dtype``.

    ``h`` is the fp32 residual stream, contiguous; ``y`` the output of the last
    matrix product (any float dtype, same shape, contiguous), or its split-K
    partial sums ``[splits, *h.shape]`` (``skinny.skinny_linear``); ``bias``
    that product's bias.
    """
    if use_triton and h.is_cuda:
        fused = _triton_add_layernorm()
        if fused is not None:
            return fused(h, y, bias, weight, shift, eps, out_dtype)
    return _add_layernorm_torch(h, y, bias, weight, shift, eps, out_dtype)


#: float32's lowest value, below every finite bf16 logit: where the running maximum starts and what masked
#: vocabulary columns read (they never enter the sum).
_LOWEST = -3.4028234663852886e38


@functools.cache
def _triton_token_losses() -> Callable[..., torch.Tensor] | None:
    """Build the cross-entropy kernel once; ``None`` when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(logits_ptr, targets_ptr, out_ptr, n_cols, row_stride, ignore, lowest,
               BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        running_max = tl.full([BLOCK], lowest, tl.float32)
        running_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):  # an online log-sum-exp, a column a lane
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            x = tl.load(base + cols, mask=valid, other=lowest).to(tl.float32)
            # maximum() drops a NaN logit, but its exp() is NaN, and so is exp(inf - inf): the loss is NaN
            # then; a -inf logit adds 0, as in torch
            new_max = tl.maximum(running_max, x)
            term = tl.where(valid, tl.exp(x - new_max), 0.0)
            running_sum = running_sum * tl.exp(running_max - new_max) + term
            running_max = new_max
        top = tl.max(running_max, axis=0)
        total = tl.sum(running_sum * tl.exp(running_max - top), axis=0)
        target = tl.load(targets_ptr + row)
        scored = target != ignore
        picked = tl.load(base + tl.where(scored, target, 0)).to(tl.float32)
        tl.store(out_ptr + row, tl.where(scored, top + tl.log(total) - picked, 0.0))

    def token_losses(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        out = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        kernel[(logits.size(0),)](
            logits, targets.contiguous(), out, logits.size(1), logits.stride(0), ignore_index, _LOWEST, BLOCK=4096,
            num_warps=8,
        )  # fmt: skip
        return out

    return token_losses


def token_losses(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, use_triton: bool
) -> torch.Tensor:
    """Each row's cross-entropy (fp32 ``[n]``; 0 where the target is ``ignore_index``), as torch's.

    ``logits`` ``[n, vocab]`` in any float dtype with unit column stride (a
    view cut from padded rows is fine); the sums run in fp32 either way. A
    NaN or +inf logit makes its row's loss NaN, a -inf one adds nothing (the
    engine stops a run on a NaN loss). Targets lie in ``[0, vocab)`` or are
    ``ignore_index``.
    """
    if use_triton and logits.is_cuda and logits.stride(1) == 1:
        fused = _triton_token_losses()
        if fused is not None:
            return fused(logits, targets, ignore_index)
    return F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=ignore_index)


def triton_available() -> bool:
    return _triton_add_layernorm() is not None


@functools.cache
def fused_gelu_is_tanh(device: torch.device) -> bool:
    """Whether ``torch._addmm_activation(..., use_gelu=True)`` computes tanh GELU on ``device``.

    On CUDA it is cuBLASLt's GELU epilogue (the tanh approximation, which is
    GPT-2's ``gelu_new``); on the CPU it is erf GELU. Probe rather than assume,
    in fp32: the two forms differ by at most 5e-4, under bf16's resolution.
    """
    if not hasattr(torch, "_addmm_activation"):
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = (torch.randn(64, 256, generator=gen) * 2).to(device)
    w = (torch.randn(256, 128, generator=gen) / 8).to(device)
    b = torch.randn(128, generator=gen).to(device)
    try:
        fused = torch._addmm_activation(b, a, w, use_gelu=True)
    except RuntimeError:
        return False
    pre = torch.addmm(b, a, w)
    err_tanh = (fused - F.gelu(pre, approximate="tanh")).abs().max().item()
    err_erf = (fused - F.gelu(pre)).abs().max().item()
    return err_tanh < err_erf / 4


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fused: bool) -> torch.Tensor:
    """``gelu_tanh(x @ weight.T + bias)`` for ``x`` [..., in], ``weight`` [out, in]."""
    if fused:
        flat = x.reshape(-1, x.size(-1))
        return torch._addmm_activation(bias, flat, weight.t(), use_gelu=True).view(*x.shape[:-1], -1)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")
