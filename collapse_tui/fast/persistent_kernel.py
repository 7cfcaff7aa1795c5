"""The Triton source of the persistent GPT-2 forward (see ``persistent.py``, which launches it).

A module of its own because Triton resolves the stages a kernel calls among
the module's globals, and because importing it needs Triton: ``persistent``
imports it only on first use.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """``tl.dot(a, b, acc)``; ``UPCAST`` for Triton's interpreter, whose bf16 ``dot`` is wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def grid_sync(counter_ptr, error_ptr, target, SPIN: tl.constexpr):
    """All CTAs arrive; nobody leaves before every write of the stage is visible (release/acquire)."""
    tl.debug_barrier()  # every warp of this CTA has issued its stores
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < SPIN):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if spins >= SPIN:
        tl.store(error_ptr, 1)
    tl.debug_barrier()


@triton.jit
def rows_stage(h_ptr, part_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, xn_ptr, tok_ptr, wte_ptr, wpe_ptr,
               M, pos, eps, pid, nprog,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               SPLITS: tl.constexpr, EMBED: tl.constexpr):  # fmt: skip
    """Per row: h = embedding, or h += partial sums + bias; then xn = layer_norm(h) in bf16."""
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    for r in range(pid, M, nprog):
        if EMBED:
            token = tl.load(tok_ptr + r)
            h = tl.load(wte_ptr + token * D + cols, mask=ok, other=0.0)
            h += tl.load(wpe_ptr + (pos + r) * D + cols, mask=ok, other=0.0)
        else:
            h = tl.load(h_ptr + r * D + cols, mask=ok, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(SPLITS):  # fixed order: deterministic
                h += tl.load(
                    part_ptr + (s * BLOCK_M + r) * D + cols, mask=ok, other=0.0, cache_modifier=".cg"
                )
            h += tl.load(bias_ptr + cols, mask=ok, other=0.0)
        tl.store(h_ptr + r * D + cols, h, mask=ok)
        mean = tl.sum(h, axis=0) / D
        centred = tl.where(ok, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / D + eps)
        w = tl.load(ln_w_ptr + cols, mask=ok, other=0.0)
        b = tl.load(ln_b_ptr + cols, mask=ok, other=0.0)
        tl.store(xn_ptr + r * D + cols, (centred * rstd * w + b).to(xn_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gemm_stage(x_ptr, w_ptr, b_ptr, out_ptr, cache_ptr, M, pos, pid, nprog,
               N: tl.constexpr, K: tl.constexpr, SPLITS: tl.constexpr, EPILOGUE: tl.constexpr,
               TO_CACHE: tl.constexpr, D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr,
               LC: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               UPCAST: tl.constexpr):  # fmt: skip
    """``x [M, K] @ w[N, K].T``; EPILOGUE 0: + bias, 1: + bias then tanh GELU, 2: fp32 partials.

    Items are (column tile, K split) pairs. With ``TO_CACHE`` (the qkv
    product of a cached decode) the key and value columns also go to the
    cache at position ``pos + row``.
    """
    N_TILES: tl.constexpr = N // BN
    KS: tl.constexpr = K // SPLITS
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows[:, None] < M
    for item in range(pid, N_TILES * SPLITS, nprog):
        tile = item % N_TILES
        split = item // N_TILES
        cols = tile * BN + tl.arange(0, BN)
        ks = split * KS + tl.arange(0, BK)
        x_ptrs = x_ptr + rows[:, None] * K + ks[None, :]
        w_ptrs = w_ptr + cols[:, None] * K + ks[None, :]
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        for _ in range(0, KS, BK):
            x = tl.load(x_ptrs, mask=row_ok, other=0.0, cache_modifier=".cg")
            w = tl.load(w_ptrs)
            acc = mma(x, tl.trans(w), acc, UPCAST)
            x_ptrs += BK
            w_ptrs += BK
        if EPILOGUE == 2:
            out_ptrs = out_ptr + (split * BLOCK_M + rows[:, None]) * N + cols[None, :]
            tl.store(out_ptrs, acc, mask=row_ok)
        else:
            acc += tl.load(b_ptr + cols)[None, :].to(tl.float32)
            if EPILOGUE == 1:  # tanh GELU, 0.5 x (1 + tanh u) = x sigmoid(2u)
                inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
                acc = acc * tl.sigmoid(2.0 * inner)
            value = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * N + cols[None, :], value, mask=row_ok)
            if TO_CACHE:
                which = cols // D - 1  # 0: key, 1: value (query columns are not cached)
                head = (cols % D) // HD
                slot = ((which * H + head) * LC)[None, :] + pos + rows[:, None]
                cache_ptrs = cache_ptr + slot * HD + (cols % HD)[None, :]
                tl.store(cache_ptrs, value, mask=row_ok & (cols >= D)[None, :])


@triton.jit
def attention_stage(qkv_ptr, cache_ptr, attn_ptr, M, pos, scale, pid, nprog,
                    D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, LC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr, CACHED: tl.constexpr,
                    UPCAST: tl.constexpr):  # fmt: skip
    """Causal attention, one head per item: query row r (position pos + r) sees keys 0..pos + r."""
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HD)
    row_ok = rows[:, None] < M
    q_pos = pos + rows
    n_keys = pos + M
    for head in range(pid, H, nprog):
        q = tl.load(qkv_ptr + rows[:, None] * (3 * D) + head * HD + dims[None, :], mask=row_ok,
                    other=0.0, cache_modifier=".cg")  # fmt: skip
        best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
        for start in range(0, n_keys, BLOCK_KV):
            keys = start + tl.arange(0, BLOCK_KV)
            key_ok = keys[:, None] < n_keys
            if CACHED:
                k_ptrs = cache_ptr + (head * LC + keys[:, None]) * HD + dims[None, :]
                v_ptrs = k_ptrs + H * LC * HD
            else:
                k_ptrs = qkv_ptr + keys[:, None] * (3 * D) + D + head * HD + dims[None, :]
                v_ptrs = k_ptrs + D
            k = tl.load(k_ptrs, mask=key_ok, other=0.0, cache_modifier=".cg")
            v = tl.load(v_ptrs, mask=key_ok, other=0.0, cache_modifier=".cg")
            s = mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_KV), dtype=tl.float32), UPCAST) * scale
            s = tl.where(keys[None, :] <= q_pos[:, None], s, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, axis=1))
            alpha = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
            best = new_best
        out = acc / total[:, None]
        out_ptrs = attn_ptr + rows[:, None] * D + head * HD + dims[None, :]
        tl.store(out_ptrs, out.to(attn_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def prefetch_tiles(w_ptr, pid, nprog, N: tl.constexpr, K: tl.constexpr, SPLITS: tl.constexpr, BN: tl.constexpr,
                   PREFETCH: tl.constexpr):  # fmt: skip
    """Ask L2 for this CTA's weight tiles of a coming product, one 128-byte line at a time.

    Weights do not depend on the data, so they can be fetched stages ahead:
    when the product starts, its K loop reads L2 instead of waiting on HBM.
    """
    if PREFETCH:
        N_TILES: tl.constexpr = N // BN
        KS: tl.constexpr = K // SPLITS
        LINES: tl.constexpr = KS // 64  # 64 bf16 values a line
        TOTAL: tl.constexpr = BN * LINES
        CHUNK: tl.constexpr = 512
        for item in range(pid, N_TILES * SPLITS, nprog):
            tile = item % N_TILES
            split = item // N_TILES
            for start in range(0, TOTAL, CHUNK):
                index = tl.minimum(start + tl.arange(0, CHUNK), TOTAL - 1)
                row = tile * BN + index // LINES
                ptrs = w_ptr + row.to(tl.int64) * K + split * KS + (index % LINES) * 64
                tl.inline_asm_elementwise(
                    "mov.u32 $0, 0; prefetch.global.L2 [$1];",
                    "=r,l",
                    [ptrs],
                    dtype=tl.int32,
                    is_pure=False,
                    pack=1,
                )


@triton.jit
def forward_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr,
                   qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b, ln1_w, ln1_b, ln2_w, ln2_b,
                   h_ptr, xn_ptr, qkv_ptr, attn_ptr, ff_ptr, part_ptr, cache_ptr, counter_ptr, error_ptr,
                   M, n_layer, eps, scale,
                   D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, LC: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, CACHED: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, BLOCK_KV: tl.constexpr,
                   PROJ_SPLITS: tl.constexpr, OUT_SPLITS: tl.constexpr, SPIN: tl.constexpr,
                   UPCAST: tl.constexpr, PREFETCH: tl.constexpr, WORK: tl.constexpr):  # fmt: skip
    """Embedding, every layer, and the final layer norm (``ln1_w[n_layer]`` is ``ln_f``) into ``xn``.

    Each product's weight tiles are requested from L2 (``PREFETCH``) right
    after the product before it is done, two stages ahead of their use.
    ``WORK=False`` keeps only the barriers: to time them alone.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    F: tl.constexpr = 4 * D
    pos = 0
    if CACHED:
        pos = tl.load(pos_ptr).to(tl.int32)
    barrier = 0
    if WORK:
        prefetch_tiles(qkv_w, pid, nprog, 3 * D, D, 1, BN, PREFETCH)
        prefetch_tiles(proj_w, pid, nprog, D, D, PROJ_SPLITS, BN, PREFETCH)
        rows_stage(h_ptr, part_ptr, proj_b, ln1_w, ln1_b, xn_ptr, tok_ptr, wte_ptr, wpe_ptr, M, pos, eps,
                   pid, nprog, D, BLOCK_D, BLOCK_M, 1, True)  # fmt: skip
    # each layer's tensors sit at a fixed stride from the last's: advance the pointers
    cache = cache_ptr
    for layer in range(n_layer):
        barrier += nprog
        grid_sync(counter_ptr, error_ptr, barrier, SPIN)
        if WORK:
            gemm_stage(xn_ptr, qkv_w, qkv_b, qkv_ptr, cache, M, pos, pid, nprog, 3 * D, D, 1, 0, CACHED, D, H,
                       HD, LC, BLOCK_M, BN, BK, UPCAST)  # fmt: skip
            prefetch_tiles(fc_w, pid, nprog, F, D, 1, BN, PREFETCH)
        barrier += nprog
        grid_sync(counter_ptr, error_ptr, barrier, SPIN)
        if WORK:
            attention_stage(qkv_ptr, cache, attn_ptr, M, pos, scale, pid, nprog, D, H, HD, LC, BLOCK_M,
                            BLOCK_KV, CACHED, UPCAST)  # fmt: skip
        barrier += nprog
        grid_sync(counter_ptr, error_ptr, barrier, SPIN)
        if WORK:
            gemm_stage(attn_ptr, proj_w, proj_b, part_ptr, cache, M, pos, pid, nprog, D, D, PROJ_SPLITS, 2,
                       False, D, H, HD, LC, BLOCK_M, BN, BK, UPCAST)  # fmt: skip
            prefetch_tiles(out_w, pid, nprog, D, F, OUT_SPLITS, BN, PREFETCH)
        barrier += nprog
        grid_sync(counter_ptr, error_ptr, barrier, SPIN)
        if WORK:
            rows_stage(h_ptr, part_ptr, proj_b, ln2_w, ln2_b, xn_ptr, tok_ptr, wte_ptr, wpe_ptr, M, pos, eps,
                       pid, nprog, D, BLOCK_D, BLOCK_M, PROJ_SPLITS, False)  # fmt: skip
        barrier += nprog
        grid_sync(counter_ptr, error_ptr, barrier, SPIN)
        if WORK:
            gemm_stage(xn_ptr, fc_w, fc_b, ff_ptr, cache, M, pos, pid, nprog, F, D, 1, 1, False, D, H, HD, LC,
                       BLOCK_M, BN, BK, UPCAST)  # fmt: skip
            if layer + 1 < n_layer:
                prefetch_tiles(qkv_w + 3 * D * D, pid, nprog, 3 * D, D, 1, BN, PREFETCH)
        barrier += nprog
        grid_sync(counter_ptr, error_ptr, barrier, SPIN)
        if WORK:
            gemm_stage(ff_ptr, out_w, out_b, part_ptr, cache, M, pos, pid, nprog, D, F, OUT_SPLITS, 2, False, D,
                       H, HD, LC, BLOCK_M, BN, BK, UPCAST)  # fmt: skip
            if layer + 1 < n_layer:
                prefetch_tiles(proj_w + D * D, pid, nprog, D, D, PROJ_SPLITS, BN, PREFETCH)
        barrier += nprog
        grid_sync(counter_ptr, error_ptr, barrier, SPIN)
        if WORK:
            rows_stage(h_ptr, part_ptr, out_b, ln1_w + D, ln1_b + D, xn_ptr, tok_ptr, wte_ptr, wpe_ptr, M, pos,
                       eps, pid, nprog, D, BLOCK_D, BLOCK_M, OUT_SPLITS, False)  # fmt: skip
        qkv_w += 3 * D * D
        qkv_b += 3 * D
        proj_w += D * D
        proj_b += D
        fc_w += F * D
        fc_b += F
        out_w += D * F
        out_b += D
        ln1_w += D
        ln1_b += D
        ln2_w += D
        ln2_b += D
        cache += 2 * H * LC * HD
