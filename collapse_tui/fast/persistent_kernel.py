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
def arrive(counter_ptr):
    """This CTA's half of a grid barrier: its stores of the stage are issued, then counted (release).

    The release waits for every memory operation the CTA has in flight, so
    the weight tiles loaded ahead for the next stage must be issued after
    this, not before (measured: 2–3 µs a barrier instead of ~1).
    """
    tl.debug_barrier()  # every warp of this CTA has issued its stores
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def wait(counter_ptr, error_ptr, target, spin):
    """The other half: poll until ``target`` arrivals, then every CTA's stores are visible (acquire).

    One thread per CTA polls with an atomic read. (Polling with ``ld.acquire``
    from every thread measured slower: 1.4 µs a barrier against 0.9 µs.)
    A barrier that does not fill within ``spin`` polls gives up and flags it;
    the budget returned for the next barrier is then 0, so a launch whose
    CTAs are not all resident ends in about a second instead of hanging.
    """
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < spin):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if seen < target:
        tl.store(error_ptr, 1)
    tl.debug_barrier()
    return tl.where(seen < target, 0, spin)


@triton.jit
def spin_budget(error_ptr, SPIN: tl.constexpr):
    """Polls a barrier may take: none once an earlier launch gave up (its results are discarded anyway)."""
    return tl.where(tl.load(error_ptr) == 0, SPIN, 0)


@triton.jit
def leave(sync_ptr, final_ptr, nprog, SLOTS: tl.constexpr):
    """Count this CTA out; the last one out copies the barrier counter and flags to ``final_ptr`` and zeroes them.

    ``sync_ptr [SLOTS]`` (a power of two) is the counter, the flags, unused
    slots, and last this exit count. Every other CTA has passed its last
    wait when it counts itself out, so nobody reads them any more: the next
    launch finds them zeroed without a zeroing launch of its own, and
    ``final_ptr`` keeps what this one counted (``PersistentForward.check``).
    """
    tl.debug_barrier()
    done = tl.atomic_add(sync_ptr + SLOTS - 1, 1, sem="acq_rel", scope="gpu")
    if done == nprog - 1:
        slots = tl.arange(0, SLOTS)
        tl.store(final_ptr + slots, tl.load(sync_ptr + slots, cache_modifier=".cg"))
        tl.store(sync_ptr + slots, tl.zeros([SLOTS], dtype=tl.int32))


@triton.jit
def signal(flag_ptr, first, COLS: tl.constexpr, GROUP: tl.constexpr):
    """Count one finished item, covering columns ``first .. first+COLS-1``, on the flag of each group it touches.

    A dependency flag replaces a grid barrier where a consumer needs only
    part of a stage: columns are counted in groups of ``GROUP`` (a head, a
    K split of the next product), and the consumer of a group waits for its
    own count (``wait``) instead of for every CTA. Release, as ``arrive``.
    """
    tl.debug_barrier()
    for group in range(first // GROUP, (first + COLS - 1) // GROUP + 1):
        tl.atomic_add(flag_ptr + group, 1, sem="release", scope="gpu")


@triton.jit
def rows_stage(h_ptr, part_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, xn_ptr, tok_ptr, wte_ptr, wpe_ptr,
               rows_ptr, row0, M, pos, eps, pid, nprog, last_ptr, last_row,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               SPLITS: tl.constexpr, EMBED: tl.constexpr):  # fmt: skip
    """Per row ``row0 .. M - 1``: h = embedding, or h += partial sums + bias; then xn = layer_norm(h) in bf16.

    Row ``last_row`` (-1: none) also goes to ``last_ptr``: the row lm_head
    reads, so that no gather launch picks it out of ``xn``.

    The rows a CTA did are counted on ``rows_ptr`` (release) once all are
    stored, in one atomic: the product after waits for all ``M`` rows
    there, instead of at a grid barrier that every CTA, with a row or
    without, must reach.
    """
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    # the norm's parameters first: their latency hides behind the rows' loads, not after the reductions
    w = tl.load(ln_w_ptr + cols, mask=ok, other=0.0)
    b = tl.load(ln_b_ptr + cols, mask=ok, other=0.0)
    for r in range(row0 + pid, M, nprog):
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
        normed = (centred * rstd * w + b).to(xn_ptr.dtype.element_ty)
        tl.store(xn_ptr + r * D + cols, normed, mask=ok)
        if r == last_row:
            tl.store(last_ptr + cols, normed, mask=ok)
    if pid < M - row0:  # one count (release) for all of this CTA's rows, once they are all stored
        tl.debug_barrier()
        tl.atomic_add(rows_ptr, tl.cdiv(M - row0 - pid, nprog), sem="release", scope="gpu")


@triton.jit
def gemm_stage(x_ptr, w_ptr, b_ptr, out_ptr, cache_ptr, row0, M, pos, pid, nprog,
               wait_ptr, wait_target, signal_ptr, error_ptr, spin,
               N: tl.constexpr, K: tl.constexpr, SPLITS: tl.constexpr, EPILOGUE: tl.constexpr,
               TO_CACHE: tl.constexpr, D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr,
               LC: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               UPCAST: tl.constexpr, WAITS: tl.constexpr, SIGNAL_MOD: tl.constexpr,
               SIGNAL_GROUP: tl.constexpr):  # fmt: skip
    """``x [M, K] @ w[N, K].T`` for rows ``row0 .. M - 1`` (fewer than ``BLOCK_M``); EPILOGUE 0: + bias,
    1: + bias then tanh GELU, 2: fp32 partials.

    Items are (column tile, K split) pairs. With ``TO_CACHE`` (the qkv
    product of a cached decode) the key and value columns also go to the
    cache at position ``pos + row``. With ``WAITS`` an item first waits for
    ``wait_ptr[split]`` to reach ``wait_target`` (its slice of ``x`` is
    written); with ``SIGNAL_GROUP`` > 0 it counts itself done on
    ``signal_ptr`` per group of ``SIGNAL_GROUP`` columns (modulo
    ``SIGNAL_MOD``). Returns the barrier budget (``wait``).
    """
    N_TILES: tl.constexpr = N // BN
    KS: tl.constexpr = K // SPLITS
    STEPS: tl.constexpr = KS // BK
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows[:, None] < M
    for item in range(pid, N_TILES * SPLITS, nprog):
        tile = item % N_TILES
        split = item // N_TILES
        cols = tile * BN + tl.arange(0, BN)
        if EPILOGUE != 2:  # the bias does not depend on the wait: its latency hides behind it and the K loop
            bias = tl.load(b_ptr + cols).to(tl.float32)
        if WAITS:
            spin = wait(wait_ptr + split, error_ptr, wait_target, spin)
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        # addresses from the step's offsets, not pointer tensors carried and advanced through the loop:
        # a [BLOCK_M, BK] tensor of 64-bit pointers holds registers the pipelined loads can use
        for step in range(0, STEPS):
            ks = split * KS + step * BK + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok, other=0.0, cache_modifier=".cg")
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :])
            acc = mma(x, tl.trans(w), acc, UPCAST)
        if EPILOGUE == 2:
            out_ptrs = out_ptr + (split * BLOCK_M + rows[:, None]) * N + cols[None, :]
            tl.store(out_ptrs, acc, mask=row_ok)
        else:
            acc += bias[None, :]
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
        if SIGNAL_GROUP > 0:
            signal(signal_ptr, (tile * BN) % SIGNAL_MOD, BN, SIGNAL_GROUP)
    return spin


@triton.jit
def attention_stage(qkv_ptr, cache_ptr, attn_ptr, M, pos, scale, pid, nprog,
                    wait_ptr, wait_target, signal_ptr, error_ptr, spin,
                    D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, LC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                    CACHED: tl.constexpr, UPCAST: tl.constexpr, SIGNAL_GROUP: tl.constexpr):  # fmt: skip
    """Causal attention: query row r (position pos + r) sees keys 0..pos + r.

    Items are (head, block of ``BLOCK_Q`` query rows), so that more CTAs
    share the stage (it lies between qkv and the projection on every
    layer's critical path), and a block reads only the keys its rows see.
    An item waits for its head's qkv columns (``wait_ptr[head]`` reaching
    ``wait_target``) and counts itself done on ``signal_ptr`` per group of
    ``SIGNAL_GROUP`` output columns (the projection's K splits). Returns the
    barrier budget.
    """
    ROW_BLOCKS: tl.constexpr = BLOCK_M // BLOCK_Q
    dims = tl.arange(0, HD)
    for item in range(pid, H * ROW_BLOCKS, nprog):
        head = item // ROW_BLOCKS
        first = (item % ROW_BLOCKS) * BLOCK_Q
        spin = wait(wait_ptr + head, error_ptr, wait_target, spin)
        if first < M:
            rows = first + tl.arange(0, BLOCK_Q)
            row_ok = rows[:, None] < M
            q_pos = pos + rows
            n_keys = pos + tl.minimum(first + BLOCK_Q, M)
            q = tl.load(qkv_ptr + rows[:, None] * (3 * D) + head * HD + dims[None, :], mask=row_ok,
                        other=0.0, cache_modifier=".cg")  # fmt: skip
            best = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
            total = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_Q, HD), dtype=tl.float32)
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
                s = mma(q, tl.trans(k), tl.zeros((BLOCK_Q, BLOCK_KV), dtype=tl.float32), UPCAST) * scale
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
        signal(signal_ptr, head * HD, HD, SIGNAL_GROUP)
    return spin


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
def next_layer(qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b, ln1_w, ln1_b, ln2_w, ln2_b, cache,
               D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, LC: tl.constexpr):  # fmt: skip
    """The pointers to the next layer's slices: each stacked tensor holds its layers at a fixed stride."""
    F: tl.constexpr = 4 * D
    return (
        qkv_w + 3 * D * D, qkv_b + 3 * D, proj_w + D * D, proj_b + D, fc_w + F * D, fc_b + F, out_w + D * F,
        out_b + D, ln1_w + D, ln1_b + D, ln2_w + D, ln2_b + D, cache + 2 * H * LC * HD,
    )  # fmt: skip


@triton.jit
def forward_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr,
                   qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b, ln1_w, ln1_b, ln2_w, ln2_b,
                   h_ptr, xn_ptr, last_ptr, qkv_ptr, attn_ptr, ff_ptr, part_ptr, cache_ptr, counter_ptr, flag_ptr,
                   final_ptr, error_ptr, trace_ptr, M, n_layer, eps, scale,
                   D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, LC: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, CACHED: tl.constexpr, FROM_SEQ: tl.constexpr,
                   SYNC_SLOTS: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                   PROJ_SPLITS: tl.constexpr, OUT_SPLITS: tl.constexpr, SPIN: tl.constexpr,
                   QKV_COUNT: tl.constexpr, ATTN_COUNT: tl.constexpr, UP_COUNT: tl.constexpr,
                   UPCAST: tl.constexpr, PREFETCH: tl.constexpr, WORK: tl.constexpr,
                   TRACE: tl.constexpr):  # fmt: skip
    """Embedding, every layer, and the final layer norm (``ln1_w[n_layer]`` is ``ln_f``) into ``xn``.

    The tokens are ``tok_ptr[0:M]``; with ``FROM_SEQ`` ``tok_ptr`` is a
    generation loop's whole sequence and ``pos_ptr`` its counter, and the
    kernel finds its tokens itself: the window ending before the counter
    (rows from 0, padded while the sequence is shorter than ``M``), or with
    ``CACHED`` the ``M`` tokens from the cache position. The row the next
    token is sampled from (the window's last real row) also goes to
    ``last_ptr``. The last CTA out zeroes the counter and flags (``leave``).

    A layer: ln_1 > qkv > attention > projection | residual + ln_2 > MLP up
    > MLP down | residual + ln_1 of the next layer, where ``|`` is a grid
    barrier (the rows of a layer norm need every K split of the product
    before) and ``>`` a dependency flag in ``flag_ptr`` (``[H]`` per head,
    then ``[PROJ_SPLITS]`` per K split of the projection, ``[OUT_SPLITS]``
    per K split of MLP down, then one count of layer-norm rows; the counts
    grow by ``QKV_COUNT``, ``ATTN_COUNT``, ``UP_COUNT`` and ``2 M`` a
    layer): two barriers a layer. Each product's weight tiles are requested
    from L2 (``PREFETCH``) right after the product before it is done.
    ``WORK=False`` keeps only the barriers: to time them alone. In the last
    layer of a window from the sequence (``FROM_SEQ``, not ``CACHED``) the
    projection, ln_2, the MLP and ln_f take only the row lm_head reads: the
    other rows' keys and values are all that layer needs of them, and the
    products read 1 row of activations instead of ``M`` (the row count then
    grows by 2 instead of ``2 M``).

    ``TRACE`` adds up, per CTA, the SM cycles of each step of a layer into
    ``trace_ptr [grid, 16]``: 0 qkv (with its wait for ln_1's rows), 1
    attention, 2 projection (both with their flag waits), 3 the barrier
    after it, 4 residual + ln_2, 6 MLP up (with its wait for ln_2's rows),
    7 MLP down (with its flag waits), 8 the barrier, 9 residual + ln_1.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    F: tl.constexpr = 4 * D
    head_flags = flag_ptr
    proj_flags = flag_ptr + H
    out_flags = flag_ptr + H + PROJ_SPLITS
    rows_flag = out_flags + OUT_SPLITS
    pos = 0
    last_row = M - 1
    if CACHED:
        pos = tl.load(pos_ptr).to(tl.int32)
        if FROM_SEQ:
            tok_ptr += pos
    elif FROM_SEQ:
        target = tl.load(pos_ptr).to(tl.int32)  # where the token sampled from this forward goes
        tok_ptr += tl.maximum(target - M, 0)
        last_row = tl.minimum(target, M) - 1
    barrier = 0
    spin = spin_budget(error_ptr, SPIN)
    if WORK:
        prefetch_tiles(qkv_w, pid, nprog, 3 * D, D, 1, BN, PREFETCH)
        prefetch_tiles(proj_w, pid, nprog, D, D, PROJ_SPLITS, BN, PREFETCH)
        rows_stage(h_ptr, part_ptr, proj_b, ln1_w, ln1_b, xn_ptr, tok_ptr, wte_ptr, wpe_ptr, rows_flag, 0, M, pos,
                   eps, pid, nprog, last_ptr, -1, D, BLOCK_D, BLOCK_M, 1, True)  # fmt: skip
    cache = cache_ptr
    if TRACE:
        cycles = tl.zeros([16], dtype=tl.int64)
        cycles, since = tick(cycles, 0, 15)
    for layer in range(n_layer):
        # rows lo .. hi - 1 go on after the attention: all of them, but in the last layer of a window from
        # the sequence only the row lm_head reads (of the others that layer needs only the keys and values)
        lo = 0
        hi = M
        if FROM_SEQ and not CACHED:
            lo = tl.where(layer + 1 == n_layer, tl.maximum(last_row, 0), 0)  # (a counter of 0: row 0)
            hi = tl.where(layer + 1 == n_layer, lo + 1, M)
        if WORK:
            spin = gemm_stage(xn_ptr, qkv_w, qkv_b, qkv_ptr, cache, 0, M, pos, pid, nprog, rows_flag,
                              M * (2 * layer + 1), head_flags, error_ptr, spin, 3 * D, D, 1, 0, CACHED, D, H, HD,
                              LC, BLOCK_M, BN, BK, UPCAST, True, D, HD)  # fmt: skip
            prefetch_tiles(fc_w, pid, nprog, F, D, 1, BN, PREFETCH)
            if TRACE:
                cycles, since = tick(cycles, since, 0)
            spin = attention_stage(qkv_ptr, cache, attn_ptr, M, pos, scale, pid, nprog, head_flags,
                                   QKV_COUNT * (layer + 1), proj_flags, error_ptr, spin, D, H, HD, LC,
                                   BLOCK_M, BLOCK_Q, BLOCK_KV, CACHED, UPCAST, D // PROJ_SPLITS)  # fmt: skip
            if TRACE:
                cycles, since = tick(cycles, since, 1)
            spin = gemm_stage(attn_ptr, proj_w, proj_b, part_ptr, cache, lo, hi, pos, pid, nprog, proj_flags,
                              ATTN_COUNT * (layer + 1), proj_flags, error_ptr, spin, D, D, PROJ_SPLITS, 2,
                              False, D, H, HD, LC, BLOCK_M, BN, BK, UPCAST, True, D, 0)  # fmt: skip
        if TRACE:
            cycles, since = tick(cycles, since, 2)
        arrive(counter_ptr)
        if WORK:
            prefetch_tiles(out_w, pid, nprog, D, F, OUT_SPLITS, BN, PREFETCH)
        barrier += nprog
        spin = wait(counter_ptr, error_ptr, barrier, spin)
        if TRACE:
            cycles, since = tick(cycles, since, 3)
        if WORK:
            rows_stage(h_ptr, part_ptr, proj_b, ln2_w, ln2_b, xn_ptr, tok_ptr, wte_ptr, wpe_ptr, rows_flag, lo, hi, pos,
                       eps, pid, nprog, last_ptr, -1, D, BLOCK_D, BLOCK_M, PROJ_SPLITS, False)  # fmt: skip
        if TRACE:
            cycles, since = tick(cycles, since, 4)
        if WORK:
            spin = gemm_stage(xn_ptr, fc_w, fc_b, ff_ptr, cache, lo, hi, pos, pid, nprog, rows_flag,
                              M * (2 * layer + 1) + hi - lo,
                              out_flags, error_ptr, spin, F, D, 1, 1, False, D, H, HD, LC, BLOCK_M, BN, BK, UPCAST,
                              True, F, F // OUT_SPLITS)  # fmt: skip
            if layer + 1 < n_layer:
                prefetch_tiles(qkv_w + 3 * D * D, pid, nprog, 3 * D, D, 1, BN, PREFETCH)
            if TRACE:
                cycles, since = tick(cycles, since, 6)
            spin = gemm_stage(ff_ptr, out_w, out_b, part_ptr, cache, lo, hi, pos, pid, nprog, out_flags,
                              UP_COUNT * (layer + 1), out_flags, error_ptr, spin, D, F, OUT_SPLITS, 2, False,
                              D, H, HD, LC, BLOCK_M, BN, BK, UPCAST, True, D, 0)  # fmt: skip
            if TRACE:
                cycles, since = tick(cycles, since, 7)
        arrive(counter_ptr)
        if WORK and layer + 1 < n_layer:
            prefetch_tiles(proj_w + D * D, pid, nprog, D, D, PROJ_SPLITS, BN, PREFETCH)
        barrier += nprog
        spin = wait(counter_ptr, error_ptr, barrier, spin)
        if TRACE:
            cycles, since = tick(cycles, since, 8)
        if WORK:
            final_row = tl.where(layer + 1 == n_layer, last_row, -1)  # after the last layer: ln_f
            rows_stage(h_ptr, part_ptr, out_b, ln1_w + D, ln1_b + D, xn_ptr, tok_ptr, wte_ptr, wpe_ptr, rows_flag, lo, hi,
                       pos, eps, pid, nprog, last_ptr, final_row, D, BLOCK_D, BLOCK_M, OUT_SPLITS, False)  # fmt: skip
        if TRACE:
            cycles, since = tick(cycles, since, 9)
        qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b, ln1_w, ln1_b, ln2_w, ln2_b, cache = next_layer(
            qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b, ln1_w, ln1_b, ln2_w, ln2_b, cache, D, H, HD, LC
        )  # fmt: skip
    if TRACE:
        tl.store(trace_ptr + pid * 16 + tl.arange(0, 16), cycles)
    leave(counter_ptr, final_ptr, nprog, SYNC_SLOTS)


# -- one cached token (full-context decoding): products as matrix-vector products ---------------


@triton.jit
def gemv(x, w_ptr, cols, k0, K: tl.constexpr, KX: tl.constexpr, k_valid):
    """``w[cols, k0:k0+k_valid] @ x`` in fp32, the whole K range of the tile in one load.

    One load instead of a K loop: the tile's bytes are all in flight at once,
    so a product costs one round trip to L2/HBM plus the transfer.
    """
    ks = tl.arange(0, KX)
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * K + (k0 + ks)[None, :]
    w = tl.load(w_ptrs, mask=(ks < k_valid)[None, :], other=0.0)
    return tl.sum(w.to(tl.float32) * x[None, :], axis=1)


@triton.jit
def first_or_gemv(x, preloaded, first, w_ptr, cols, k0, K: tl.constexpr, KX: tl.constexpr, k_valid):
    """``gemv``, or for a CTA's ``first`` item the same product of the tile it loaded ahead (``load_tile``)."""
    if first:
        acc = tl.sum(preloaded.to(tl.float32) * x[None, :], axis=1)
    else:
        acc = gemv(x, w_ptr, cols, k0, K, KX, k_valid)
    return acc


@triton.jit
def load_tile(w_ptr, item, n_items, N_TILES: tl.constexpr, K: tl.constexpr, KS: tl.constexpr, KX: tl.constexpr,
              BN: tl.constexpr):  # fmt: skip
    """Weight tile ``item`` (column tile, K split) of ``w [N, K]`` as ``[BN, KX]``; zeros if ``item >= n_items``."""
    cols = (item % N_TILES) * BN + tl.arange(0, BN)
    ks = tl.arange(0, KX)
    limit = KS * (item < n_items)
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * K + (item // N_TILES) * KS + ks[None, :]
    return tl.load(w_ptrs, mask=(ks < limit)[None, :], other=0.0)


@triton.jit
def load_row(ptr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """``ptr[0:D]`` as ``[BLOCK_D]`` (zeros past D): a norm's parameters, loaded ahead of the wait before it."""
    cols = tl.arange(0, BLOCK_D)
    return tl.load(ptr + cols, mask=cols < D, other=0.0)


@triton.jit
def load_bias(b_ptr, item, n_items, BN: tl.constexpr):
    """The bias of column tile ``item`` (``[BN]`` in fp32; zeros if ``item >= n_items``), loaded ahead as ``load_tile``."""
    cols = item * BN + tl.arange(0, BN)
    return tl.load(b_ptr + cols, mask=cols < n_items * BN, other=0.0).to(tl.float32)


@triton.jit
def first_or_bias(preloaded, first, b_ptr, cols):
    """The bias of ``cols``: the one loaded ahead (``load_bias``) for a CTA's ``first`` tile, else loaded now."""
    if first:  # noqa: SIM108 (Triton compiles an if on a runtime value, not a conditional expression)
        bias = preloaded
    else:
        bias = tl.load(b_ptr + cols).to(tl.float32)
    return bias


@triton.jit
def layer_norm_row(h, w, b, eps, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """``layer_norm(h)`` of one row with parameters ``w``, ``b`` (``load_row``), rounded to bf16 as the
    layer-by-layer forward feeds its products."""
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    mean = tl.sum(h, axis=0) / D
    centred = tl.where(ok, h - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / D + eps)
    return (centred * rstd * w + b).to(tl.bfloat16).to(tl.float32)


@triton.jit
def add_residual(h_in_ptr, part_ptr, bias_ptr, h_out_ptr, pid, SPLITS: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr):  # fmt: skip
    """The residual row plus a product's split-K partial sums (fixed order) and bias; CTA 0 keeps it.

    Every CTA computes the same row itself (4 KB of reads) instead of waiting
    for one CTA to write it behind another barrier; CTA 0 writes it to the
    other half of the double buffer for the next layer norm.
    """
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    h = tl.load(h_in_ptr + cols, mask=ok, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(SPLITS):
        h += tl.load(part_ptr + s * D + cols, mask=ok, other=0.0, cache_modifier=".cg")
    h += tl.load(bias_ptr + cols, mask=ok, other=0.0)
    # CTA 0 only: pid * BLOCK_D pushes every column past D for the others (``& (pid == 0)``
    # would read better but Triton's interpreter rejects a Python bool in a mask)
    tl.store(h_out_ptr + cols, h, mask=cols + pid * BLOCK_D < D)
    return h


@triton.jit
def decode_attention(qkv_ptr, cache_ptr, o_ptr, ml_ptr, pos, scale, pid, nprog, wait_ptr, wait_target,
                     signal_ptr, error_ptr, spin, H: tl.constexpr, HD: tl.constexpr, LC: tl.constexpr,
                     KSPLIT: tl.constexpr, CH: tl.constexpr, SIGNAL_GROUP: tl.constexpr):  # fmt: skip
    """Attention of one query over the cache, split over keys: items are (head, key chunk).

    Each writes its chunk's unnormalised output, maximum and sum; the
    projection combines the chunks of its heads (``combine_heads``), so the
    split costs no extra barrier. An item waits for its head's qkv columns
    (``wait_ptr[head]``) and counts itself done on ``signal_ptr`` per group
    of ``SIGNAL_GROUP`` columns (the projection's K splits). Returns the
    barrier budget.
    """
    n_keys = pos + 1
    dims = tl.arange(0, HD)
    for item in range(pid, H * KSPLIT, nprog):
        head = item // KSPLIT
        chunk = item % KSPLIT
        keys = chunk * CH + tl.arange(0, CH)
        ok = keys < n_keys
        k_ptrs = cache_ptr + (head * LC + keys[:, None]) * HD + dims[None, :]
        # the keys and values of earlier tokens were written by earlier launches: read them before the
        # wait, so that their latency hides behind it; only this token's row needs the qkv stage
        old = (keys < pos)[:, None]
        k = tl.load(k_ptrs, mask=old, other=0.0, cache_modifier=".cg")
        v = tl.load(k_ptrs + H * LC * HD, mask=old, other=0.0, cache_modifier=".cg")
        spin = wait(wait_ptr + head, error_ptr, wait_target, spin)
        new = (keys == pos)[:, None]
        k = tl.where(new, tl.load(k_ptrs, mask=new, other=0.0, cache_modifier=".cg"), k)
        v = tl.where(new, tl.load(k_ptrs + H * LC * HD, mask=new, other=0.0, cache_modifier=".cg"), v)
        q = tl.load(qkv_ptr + head * HD + dims, cache_modifier=".cg").to(tl.float32)
        s = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
        best = tl.max(s, axis=0)
        p = tl.exp(s - tl.where(best == float("-inf"), 0.0, best))
        tl.store(o_ptr + item * HD + dims, tl.sum(p[:, None] * v.to(tl.float32), axis=0))
        tl.store(ml_ptr + item * 2, best)
        tl.store(ml_ptr + item * 2 + 1, tl.sum(p, axis=0))
        signal(signal_ptr, head * HD, HD, SIGNAL_GROUP)
    return spin


@triton.jit
def combine_heads(o_ptr, ml_ptr, k0, KX: tl.constexpr, k_valid, HD: tl.constexpr, KSPLIT: tl.constexpr):
    """Attention output columns ``k0 .. k0+k_valid`` from the key chunks of their heads, bf16-rounded."""
    j = tl.arange(0, KX)
    ok = (j < k_valid)[None, :]
    head = (k0 + j) // HD
    item = head[None, :] * KSPLIT + tl.arange(0, KSPLIT)[:, None]  # [KSPLIT, KX]
    best = tl.load(ml_ptr + item * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
    total = tl.load(ml_ptr + item * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
    out = tl.load(o_ptr + item * HD + ((k0 + j) % HD)[None, :], mask=ok, other=0.0, cache_modifier=".cg")
    top = tl.max(best, axis=0)
    weight = tl.exp(best - tl.where(top == float("-inf"), 0.0, top)[None, :])
    x = tl.sum(weight * out, axis=0) / tl.sum(weight * total, axis=0)
    return tl.where(j < k_valid, x, 0.0).to(tl.bfloat16).to(tl.float32)


@triton.jit
def tick(acc, since, SLOT: tl.constexpr):
    """Add the SM cycles since ``since`` to ``acc[SLOT]``; return ``(acc, now)`` (``TRACE`` builds only)."""
    stamp = tl.inline_asm_elementwise(
        "mov.u64 $0, %clock64;",
        "=l,r",
        [tl.zeros([1], dtype=tl.int32)],
        dtype=tl.int64,
        is_pure=False,
        pack=1,
    )
    now = tl.sum(stamp, axis=0)
    return acc + tl.where(tl.arange(0, 16) == SLOT, now - since, 0), now


@triton.jit
def decode_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr,
                  qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b, ln1_w, ln1_b, ln2_w, ln2_b,
                  h_ptr, xn_ptr, qkv_ptr, ff_ptr, part_ptr, o_ptr, ml_ptr, cache_ptr, counter_ptr, flag_ptr,
                  final_ptr, error_ptr, trace_ptr, n_layer, eps, scale,
                  D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, LC: tl.constexpr,
                  FROM_SEQ: tl.constexpr, SYNC_SLOTS: tl.constexpr,
                  BLOCK_D: tl.constexpr, BN: tl.constexpr, KSPLIT: tl.constexpr, CH: tl.constexpr,
                  PROJ_SPLITS: tl.constexpr, OUT_SPLITS: tl.constexpr, KX_PROJ: tl.constexpr,
                  KX_OUT: tl.constexpr, SPIN: tl.constexpr, QKV_COUNT: tl.constexpr,
                  ATTN_COUNT: tl.constexpr, UP_COUNT: tl.constexpr, PREFETCH: tl.constexpr,
                  TRACE: tl.constexpr):  # fmt: skip
    """One token at the position in ``pos_ptr``, over the cache: two grid barriers a layer.

    The token is ``tok_ptr[0]``, or with ``FROM_SEQ`` ``tok_ptr[pos]`` (a
    generation loop's sequence, ``pos_ptr`` its counter).

    The layer norms ride in the prologue of the product after them (every CTA
    normalises the one row itself), and the attention's key chunks are
    combined in the projection's prologue, so a layer is: ln_1 + qkv (keys
    and values into the cache) > attention chunks > projection | ln_2 + MLP
    up > MLP down |, where ``|`` is a grid barrier (the layer norms need the
    whole row) and ``>`` a dependency flag (``forward_kernel`` has the same
    flags). ``h_ptr`` is a double buffer ``[2, D]``: ln_1 reads half 0 and
    CTA 0 writes half 1, ln_2 the other way round. The projection's partial
    sums go to ``part_ptr[0:PROJ_SPLITS]``, MLP down's to the rows after
    them: a CTA may start MLP down while another still reads the projection's.

    ``TRACE`` adds up, per CTA, the SM cycles of each stage (slots 0-4, a
    stage's waits for its flags included) and of what follows it up to the
    next stage (slot 5 after qkv and 8 after MLP up: the next tiles' loads;
    7 and 9: the grid barriers after the projection and after MLP down;
    the attention is followed directly by the projection) into
    ``trace_ptr [grid, 16]``.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    F: tl.constexpr = 4 * D
    QKV_TILES: tl.constexpr = 3 * D // BN
    D_TILES: tl.constexpr = D // BN
    F_TILES: tl.constexpr = F // BN
    KS_PROJ: tl.constexpr = D // PROJ_SPLITS
    KS_OUT: tl.constexpr = F // OUT_SPLITS
    cols_d = tl.arange(0, BLOCK_D)
    pos = tl.load(pos_ptr).to(tl.int32)
    if FROM_SEQ:
        tok_ptr += pos
    token = tl.load(tok_ptr)
    h_a = h_ptr
    h_b = h_ptr + D
    head_flags = flag_ptr
    proj_flags = flag_ptr + H
    out_flags = flag_ptr + H + PROJ_SPLITS
    part_out = part_ptr + PROJ_SPLITS * D
    prefetch_tiles(proj_w, pid, nprog, D, D, PROJ_SPLITS, BN, PREFETCH)
    prefetch_tiles(fc_w, pid, nprog, F, D, 1, BN, PREFETCH)
    # a CTA's first tile of each product is loaded into registers before the barrier
    # that precedes the product: the weights' latency hides behind the wait
    w_qkv = load_tile(qkv_w, pid, QKV_TILES, QKV_TILES, D, D, BLOCK_D, BN)
    # so are its bias and the norm's parameters: a load after the reductions would wait a round trip
    b_qkv = load_bias(qkv_b, pid, QKV_TILES, BN)
    ln_w, ln_b = load_row(ln1_w, D, BLOCK_D), load_row(ln1_b, D, BLOCK_D)
    barrier = 0
    spin = spin_budget(error_ptr, SPIN)
    cache = cache_ptr
    if TRACE:
        cycles = tl.zeros([16], dtype=tl.int64)
        cycles, since = tick(cycles, 0, 15)
    for layer in range(n_layer):
        # ln_1 (+ the last layer's MLP output into the residual) and qkv
        if layer == 0:
            h = tl.load(wte_ptr + token * D + cols_d, mask=cols_d < D, other=0.0)
            h += tl.load(wpe_ptr + pos * D + cols_d, mask=cols_d < D, other=0.0)
            tl.store(h_b + cols_d, h, mask=cols_d + pid * BLOCK_D < D)  # CTA 0 only (see add_residual)
        else:
            h = add_residual(h_a, part_out, out_b - D, h_b, pid, OUT_SPLITS, D, BLOCK_D)
        x_ln1 = layer_norm_row(h, ln_w, ln_b, eps, D, BLOCK_D)
        for tile in range(pid, QKV_TILES, nprog):
            cols = tile * BN + tl.arange(0, BN)
            acc = first_or_gemv(x_ln1, w_qkv, tile == pid, qkv_w, cols, 0, D, BLOCK_D, D)
            value = (acc + first_or_bias(b_qkv, tile == pid, qkv_b, cols)).to(tl.bfloat16)
            tl.store(qkv_ptr + cols, value)
            which = cols // D - 1  # 0: key, 1: value (query columns are not cached)
            slot = ((which * H + (cols % D) // HD) * LC + pos) * HD + cols % HD
            tl.store(cache + slot, value, mask=cols >= D)
            signal(head_flags, (tile * BN) % D, BN, HD)
        if TRACE:
            cycles, since = tick(cycles, since, 0)
        w_proj = load_tile(proj_w, pid, D_TILES * PROJ_SPLITS, D_TILES, D, KS_PROJ, KX_PROJ, BN)
        prefetch_tiles(out_w, pid, nprog, D, F, OUT_SPLITS, BN, PREFETCH)
        if TRACE:
            cycles, since = tick(cycles, since, 5)
        spin = decode_attention(qkv_ptr, cache, o_ptr, ml_ptr, pos, scale, pid, nprog, head_flags,
                                QKV_COUNT * (layer + 1), proj_flags, error_ptr, spin, H, HD, LC, KSPLIT, CH,
                                KS_PROJ)  # fmt: skip
        if TRACE:
            cycles, since = tick(cycles, since, 1)
        # attention projection, split over K = groups of heads
        for item in range(pid, D_TILES * PROJ_SPLITS, nprog):
            cols = (item % D_TILES) * BN + tl.arange(0, BN)
            k0 = (item // D_TILES) * KS_PROJ
            spin = wait(proj_flags + item // D_TILES, error_ptr, ATTN_COUNT * (layer + 1), spin)
            x_attn = combine_heads(o_ptr, ml_ptr, k0, KX_PROJ, KS_PROJ, HD, KSPLIT)
            acc = first_or_gemv(x_attn, w_proj, item == pid, proj_w, cols, k0, D, KX_PROJ, KS_PROJ)
            tl.store(part_ptr + (item // D_TILES) * D + cols, acc)
        if TRACE:
            cycles, since = tick(cycles, since, 2)
        arrive(counter_ptr)
        w_fc = load_tile(fc_w, pid, F_TILES, F_TILES, D, D, BLOCK_D, BN)
        b_fc = load_bias(fc_b, pid, F_TILES, BN)
        ln_w, ln_b = load_row(ln2_w, D, BLOCK_D), load_row(ln2_b, D, BLOCK_D)
        if layer + 1 < n_layer:
            prefetch_tiles(qkv_w + 3 * D * D, pid, nprog, 3 * D, D, 1, BN, PREFETCH)
        barrier += nprog
        spin = wait(counter_ptr, error_ptr, barrier, spin)
        if TRACE:
            cycles, since = tick(cycles, since, 7)
        # ln_2 (+ the projection into the residual) and the MLP's up-projection with GELU
        h = add_residual(h_b, part_ptr, proj_b, h_a, pid, PROJ_SPLITS, D, BLOCK_D)
        x_ln2 = layer_norm_row(h, ln_w, ln_b, eps, D, BLOCK_D)
        for tile in range(pid, F_TILES, nprog):
            cols = tile * BN + tl.arange(0, BN)
            acc = first_or_gemv(x_ln2, w_fc, tile == pid, fc_w, cols, 0, D, BLOCK_D, D)
            acc += first_or_bias(b_fc, tile == pid, fc_b, cols)
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            tl.store(ff_ptr + cols, (acc * tl.sigmoid(2.0 * inner)).to(tl.bfloat16))
            signal(out_flags, tile * BN, BN, KS_OUT)
        if TRACE:
            cycles, since = tick(cycles, since, 3)
        w_out = load_tile(out_w, pid, D_TILES * OUT_SPLITS, D_TILES, F, KS_OUT, KX_OUT, BN)
        if layer + 1 < n_layer:
            prefetch_tiles(proj_w + D * D, pid, nprog, D, D, PROJ_SPLITS, BN, PREFETCH)
        if TRACE:
            cycles, since = tick(cycles, since, 8)
        # the MLP's down-projection, split over K
        for item in range(pid, D_TILES * OUT_SPLITS, nprog):
            cols = (item % D_TILES) * BN + tl.arange(0, BN)
            k0 = (item // D_TILES) * KS_OUT
            spin = wait(out_flags + item // D_TILES, error_ptr, UP_COUNT * (layer + 1), spin)
            ks = tl.arange(0, KX_OUT)
            x_ff = tl.load(ff_ptr + k0 + ks, mask=ks < KS_OUT, other=0.0, cache_modifier=".cg").to(tl.float32)
            acc = first_or_gemv(x_ff, w_out, item == pid, out_w, cols, k0, F, KX_OUT, KS_OUT)
            tl.store(part_out + (item // D_TILES) * D + cols, acc)
        if TRACE:
            cycles, since = tick(cycles, since, 4)
        arrive(counter_ptr)
        # the next layer's first qkv tile (none after the last layer)
        w_qkv = load_tile(
            qkv_w + 3 * D * D, pid, QKV_TILES * (layer + 1 < n_layer), QKV_TILES, D, D, BLOCK_D, BN
        )
        b_qkv = load_bias(qkv_b + 3 * D, pid, QKV_TILES * (layer + 1 < n_layer), BN)
        # the next layer's ln_1, or after the last layer ln_f (the stack's last row)
        ln_w, ln_b = load_row(ln1_w + D, D, BLOCK_D), load_row(ln1_b + D, D, BLOCK_D)
        if layer + 1 < n_layer:
            prefetch_tiles(fc_w + F * D, pid, nprog, F, D, 1, BN, PREFETCH)
        barrier += nprog
        spin = wait(counter_ptr, error_ptr, barrier, spin)
        if TRACE:
            cycles, since = tick(cycles, since, 9)
        qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b, ln1_w, ln1_b, ln2_w, ln2_b, cache = next_layer(
            qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b, ln1_w, ln1_b, ln2_w, ln2_b, cache, D, H, HD, LC
        )  # fmt: skip
    if TRACE:
        tl.store(trace_ptr + pid * 16 + tl.arange(0, 16), cycles)
    if pid == 0:  # ln_f (ln1_w now points at it) of the residual after the last layer
        h = add_residual(h_a, part_out, out_b - D, h_b, pid, OUT_SPLITS, D, BLOCK_D)
        x_f = layer_norm_row(h, ln_w, ln_b, eps, D, BLOCK_D)
        tl.store(xn_ptr + cols_d, x_f.to(xn_ptr.dtype.element_ty), mask=cols_d < D)
    leave(counter_ptr, final_ptr, nprog, SYNC_SLOTS)
