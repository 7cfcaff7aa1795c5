"""A functional GPT-2 forward over a compute-dtype copy of a Hugging Face model's weights.

Why a copy: the engine keeps fp32 master weights for the optimizer (a small
AdamW step would be lost to bf16 rounding), but generation reads every weight
once per token, so it should read 2 bytes a weight, not 4. ``GPT2Weights``
holds bf16 copies of the matrices, in ``nn.Linear`` layout ``[out, in]``, and
refreshes them in place (one ``_foreach_copy_``) after every optimizer step:
the tensors never move, so CUDA graphs captured over them stay valid and
always see the current weights. Each kind is one stacked tensor ``[layers,
...]`` (layer i a slice of it), which the persistent kernel (persistent.py)
needs. The layer-by-layer forward reads norm parameters, position and token
embeddings and the residual biases from the fp32 masters themselves; the
persistent kernel reads stacked fp32 copies of the norms and residual biases,
refreshed with the rest. Either way a change through ``p.data`` is seen only
after ``refresh`` (``stale`` cannot notice it), and so is an optimizer step
replayed from a CUDA graph (``training.GraphedTrainStep``): it calls no
``optimizer.step()``, so no hook sees it, and the fused kernel bumps no
version counter. The engine calls ``Inference.weights_changed()`` after every
step for that reason.

The forward follows ``GPT2LMHeadModel`` (pre-norm blocks, tanh GELU, scaled
dot-product attention, lm_head tied to wte) with the residual stream in fp32
and matrix products in the compute dtype, which is what bf16 autocast does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from collapse_tui.fast import skinny
from collapse_tui.fast.kernels import add_layernorm, fused_gelu_is_tanh, linear_gelu, triton_available
from collapse_tui.fast.staleness import watch_optimizer_steps

#: lm_head's copy has its rows (the vocabulary) padded with zeros to a multiple of this: cuBLAS
#: runs a product with 50,257 output columns on an sm75 kernel at a sixth of the rate it gets with
#: 50,304 (evaluation's logits, H200: benchmarks/profile_phases.py).
LM_HEAD_ROWS_MULTIPLE = 64
#: ``config.activation_function`` values that mean GELU with the tanh approximation.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why this model cannot use the functional forward, or ``None`` when it can."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "gpt2":
        return "not a GPT-2 model"
    if not hasattr(model, "transformer") or not hasattr(model, "lm_head"):
        return "not a GPT2LMHeadModel"
    if getattr(config, "activation_function", "gelu_new") not in TANH_GELU:
        return f"activation {config.activation_function!r}"
    if not getattr(config, "scale_attn_weights", True):
        return "unscaled attention"
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return "attention scaled by inverse layer index"
    if getattr(config, "add_cross_attention", False):
        return "cross-attention"
    if getattr(model.lm_head, "bias", None) is not None:
        return "lm_head with a bias"
    return None


@dataclass
class _Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor


class GPT2Weights:
    """Compute-dtype copies of a ``GPT2LMHeadModel``'s weights, refreshed in place."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        config = model.config
        self.dtype = dtype
        self.n_head = config.n_head
        self.eps = config.layer_norm_epsilon
        self._sources: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self._matrix_bytes = 0
        self._layouts: dict[str, torch.Tensor] = {}
        tf = model.transformer
        blocks = list(tf.h)
        self._blocks = blocks
        self.wte = tf.wte.weight  # fp32 master: embedding lookups read one row a token
        self.wpe = tf.wpe.weight
        self.lnf_w, self.lnf_b = tf.ln_f.weight, tf.ln_f.bias
        self.lm_head_padded = self._padded_rows(model.lm_head.weight, LM_HEAD_ROWS_MULTIPLE)
        self.lm_head = self.lm_head_padded[: model.lm_head.weight.size(0)]
        # Every layer's copy of a kind is a slice of one stacked tensor, so that the
        # persistent kernel (persistent.py) finds layer i at a fixed stride.
        self.qkv_w_all = self._stack([b.attn.c_attn.weight for b in blocks], transpose=True)
        self.qkv_b_all = self._stack([b.attn.c_attn.bias for b in blocks])
        self.proj_w_all = self._stack([b.attn.c_proj.weight for b in blocks], transpose=True)
        self.fc_w_all = self._stack([b.mlp.c_fc.weight for b in blocks], transpose=True)
        self.fc_b_all = self._stack([b.mlp.c_fc.bias for b in blocks])
        self.out_w_all = self._stack([b.mlp.c_proj.weight for b in blocks], transpose=True)
        # fp32 copies of the small per-layer vectors, for the same reason (ln_f rides
        # as layer n_layer of ln_1); the layer-by-layer forward reads the masters.
        fp32 = torch.float32
        self.proj_b_all = self._stack([b.attn.c_proj.bias for b in blocks], dtype=fp32)
        self.out_b_all = self._stack([b.mlp.c_proj.bias for b in blocks], dtype=fp32)
        self.ln1_w_all = self._stack([b.ln_1.weight for b in blocks] + [tf.ln_f.weight], dtype=fp32)
        self.ln1_b_all = self._stack([b.ln_1.bias for b in blocks] + [tf.ln_f.bias], dtype=fp32)
        self.ln2_w_all = self._stack([b.ln_2.weight for b in blocks], dtype=fp32)
        self.ln2_b_all = self._stack([b.ln_2.bias for b in blocks], dtype=fp32)
        self.layers = [
            _Layer(
                ln1_w=block.ln_1.weight,
                ln1_b=block.ln_1.bias,
                qkv_w=self.qkv_w_all[i],
                qkv_b=self.qkv_b_all[i],
                proj_w=self.proj_w_all[i],
                proj_b=block.attn.c_proj.bias,
                ln2_w=block.ln_2.weight,
                ln2_b=block.ln_2.bias,
                fc_w=self.fc_w_all[i],
                fc_b=self.fc_b_all[i],
                out_w=self.out_w_all[i],
                out_b=block.mlp.c_proj.bias,
            )
            for i, block in enumerate(blocks)
        ]
        self.n_embd = self.wte.size(1)
        self.use_triton = self.wte.is_cuda and triton_available()
        self.fused_gelu = self.wte.is_cuda and fused_gelu_is_tanh(self.wte.device)
        #: Triton products for windows of at most ``skinny.MAX_ROWS`` rows (generation steps)
        self.use_skinny = self.use_triton and skinny.available()
        #: ... and for ``lm_head`` too (a few rows against the whole vocabulary)
        self.skinny_lm_head = self.use_skinny
        self._versions: list[int] = []
        self.dirty = True
        self.refresh()
        watch_optimizer_steps(self)

    def _stack(
        self,
        sources: list[torch.Tensor],
        transpose: bool = False,
        dtype: torch.dtype | None = None,
        counted: bool = True,
    ) -> torch.Tensor:
        """One ``[len(sources), ...]`` copy of same-shaped master tensors, each slice refreshed from its own.

        ``counted``: its bytes are read once a token (``nbytes_per_token``).
        """
        views = [s.detach().t() if transpose else s.detach() for s in sources]
        stacked = torch.empty(
            (len(views), *views[0].shape), dtype=dtype or self.dtype, device=sources[0].device
        )
        self._sources.extend(views)
        self._copies.extend(stacked.unbind(0))
        if counted and dtype is None and views[0].dim() == 2:
            self._matrix_bytes += stacked.numel() * stacked.element_size()
        return stacked

    def layout_copy(self, name: str, per_layer: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
        """A stacked copy ``[layers, ...]`` of ``per_layer(block)``, a view of a block's master weight in the
        layout a kernel reads (cluster.py), refreshed with the rest; made once per ``name``.

        It stands in for a copy the token reads anyway, so its bytes are not
        counted again.
        """
        if name not in self._layouts:
            first = len(self._copies)
            self._layouts[name] = self._stack([per_layer(b) for b in self._blocks], counted=False)
            with torch.no_grad():  # filled now, from the masters as they are
                torch._foreach_copy_(self._copies[first:], self._sources[first:])
            self._versions += [t._version for t in self._sources[first:]]
        return self._layouts[name]

    def _padded_rows(self, source: torch.Tensor, multiple: int) -> torch.Tensor:
        """Register a matrix copied into the first rows of a zeroed one whose rows are a multiple of ``multiple``."""
        rows = -(-source.size(0) // multiple) * multiple
        padded = torch.zeros((rows, source.size(1)), dtype=self.dtype, device=source.device)
        self._sources.append(source.detach())
        self._copies.append(padded[: source.size(0)])
        self._matrix_bytes += source.numel() * padded.element_size()
        return padded

    @property
    def masters(self) -> list[torch.Tensor]:
        return self._sources

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the master weights into the compute-dtype copies (same tensors, new values)."""
        torch._foreach_copy_(self._copies, self._sources)
        self._versions = [t._version for t in self._sources]
        self.dirty = False

    def stale(self) -> bool:
        """Whether the master weights may have changed since the last refresh.

        True after any ``optimizer.step()`` call (a global post-step hook sets
        ``dirty``) and after any other in-place change that bumps a version
        counter (``p.mul_(...)``). Changes through ``p.data`` and steps
        replayed from a CUDA graph are invisible: call ``refresh`` (or the
        inference's ``weights_changed``). Cheap enough to ask before every
        forward.
        """
        return self.dirty or any(t._version != v for t, v in zip(self._sources, self._versions, strict=True))

    @property
    def nbytes_per_token(self) -> int:
        """Bytes of weights one generated token must read: every copied matrix, once."""
        return self._matrix_bytes

    # -- the forward -----------------------------------------------------------------

    def add_ln(
        self,
        h: torch.Tensor,
        y: torch.Tensor | None,
        bias: torch.Tensor | None,
        w: torch.Tensor,
        b: torch.Tensor,
    ) -> torch.Tensor:
        return add_layernorm(h, y, bias, w, b, self.eps, self.dtype, self.use_triton)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """fp32 residual stream ``wte[tokens] + wpe[positions]``."""
        return F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        gelu: bool = False,
        partial: bool = False,
    ) -> torch.Tensor:
        """``x @ weight.T (+ bias)``, tanh-GELU'd when ``gelu``.

        With ``partial`` the result may come as split-K partial sums
        ``[splits, ..., N]``, which only ``add_ln`` takes: for the products
        that feed the residual stream. Those, with few rows, go to the Triton
        split-K product; the rest to cuBLAS, which measured faster for them
        (benchmarks/bench_gemm.py).
        """
        if partial and self.use_skinny and skinny.usable(x, weight):
            return skinny.skinny_linear(x, weight, bias, gelu=gelu, partial=partial)
        if gelu:
            return linear_gelu(x, weight, bias, self.fused_gelu)  # type: ignore[arg-type]
        return F.linear(x, weight, bias)

    def mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """The MLP without its output bias (``add_ln`` adds it with the residual)."""
        return self.linear(self.linear(x, layer.fc_w, layer.fc_b, gelu=True), layer.out_w, partial=True)

    def hidden(self, tokens: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        """``ln_f`` of the last hidden states for ``tokens`` [B, T] at positions 0..T-1, causal.

        Returns ``[B, T, C]`` in the compute dtype, ready for ``lm_head``. With
        ``cache`` (batch 1), also stores the keys and values of positions
        0..T-1 there: the prefill of a prompt before full-context decoding.
        """
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device)
        h = self.embed(tokens, positions).contiguous()
        y: torch.Tensor | None = None
        bias: torch.Tensor | None = None
        heads, dim = self.n_head, self.n_embd // self.n_head
        for i, layer in enumerate(self.layers):
            x = self.add_ln(h, y, bias, layer.ln1_w, layer.ln1_b)
            qkv = self.linear(x, layer.qkv_w, layer.qkv_b).view(batch, length, 3, heads, dim)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            if cache is not None:
                cache[i][:, :, :length] = torch.stack((k[0], v[0]))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = self.linear(a.transpose(1, 2).reshape(batch, length, self.n_embd), layer.proj_w, partial=True)
            x = self.add_ln(h, y, layer.proj_b, layer.ln2_w, layer.ln2_b)
            y, bias = self.mlp(x, layer), layer.out_b
        return self.add_ln(h, y, bias, self.lnf_w, self.lnf_b)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny_lm_head and skinny.usable(x, self.lm_head):
            return skinny.skinny_linear(x, self.lm_head)
        # the padded rows keep cuBLAS on its fast kernels (LM_HEAD_ROWS_MULTIPLE); their logits are cut off
        return F.linear(x, self.lm_head_padded)[..., : self.lm_head.size(0)]

    def new_kv_cache(self, length: int) -> torch.Tensor:
        """The key/value cache ``[layers, 2, heads, length, head_dim]``, zeroed (never NaN).

        One tensor, so that layer i's ``[2, heads, length, head_dim]`` is
        ``cache[i]`` and the persistent kernel finds it at a fixed stride.
        """
        dim = self.n_embd // self.n_head
        shape = (len(self.layers), 2, self.n_head, length, dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.wte.device)

    def decode_one(
        self, token: torch.Tensor, position: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[1, V]`` for one token at ``position`` (both ``[1]`` on the device), full context.

        Writes this token's keys and values into ``cache`` at ``position``;
        ``mask`` is the additive ``[1, 1, 1, cache length]`` mask that hides the
        slots after ``position``. Fixed shapes throughout, so it can be captured.
        """
        heads, dim = self.n_head, self.n_embd // self.n_head
        h = self.embed(token, position).view(1, 1, self.n_embd)
        y: torch.Tensor | None = None
        bias: torch.Tensor | None = None
        for layer, kv in zip(self.layers, cache, strict=True):
            x = self.add_ln(h, y, bias, layer.ln1_w, layer.ln1_b)
            qkv = self.linear(x, layer.qkv_w, layer.qkv_b).view(3, heads, 1, dim)
            kv.index_copy_(2, position, qkv[1:])
            a = F.scaled_dot_product_attention(qkv[0:1], kv[0:1], kv[1:2], attn_mask=mask)
            y = self.linear(a.reshape(1, 1, self.n_embd), layer.proj_w, partial=True)
            x = self.add_ln(h, y, layer.proj_b, layer.ln2_w, layer.ln2_b)
            y, bias = self.mlp(x, layer), layer.out_b
        return self.logits(self.add_ln(h, y, bias, self.lnf_w, self.lnf_b).view(1, self.n_embd))
