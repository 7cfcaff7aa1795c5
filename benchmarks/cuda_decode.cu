// A hand-written persistent kernel for one cached GPT-2 token: every layer in one launch.
//
// A prototype that benchmarks/cuda_decode.py compiles (NVRTC) and times against the
// Triton decode kernel (collapse_tui/fast/persistent_kernel.py): does a layer written
// in CUDA, with its stages near their own floor, reach the ~10 µs that
// benchmarks/RESULTS.md ("What a hand-off costs in plain CUDA") estimated?
//
// The shape comes in as macros (D, NH, NL, LC, GRID) prepended by the script; D must be
// a multiple of 256 and the ring must fit in shared memory (gpt2 and gpt2-medium on an
// H100/H200; not gpt2-large, whose slots would need ~480 KB). One CTA per SM: THREADS consumer
// threads and one producer warp. The consumers run the chain, one warp per output row of
// every product (a warp reads its row's K contiguous bf16 values from shared memory, 16
// bytes a lane a step, and sums across its lanes): no tiles, no cross-warp reductions in
// the products. The producer streams the weights into a ring of three shared-memory slots
// (one bulk copy a row), each slot refilled as soon as the consumers let go of it, three
// or four stages before the stage that reads it; so after a barrier a stage waits only for
// its input vector. Every CTA computes a layer norm itself from the residual row, warp by
// warp: no hand-off for the norms. Five grid barriers a layer:
//   ln_1 + qkv | attention (items: head x chunk of CH keys) | projection (combines
//   the chunks' partial softmax first) | ln_2 + MLP up | MLP down |
// Rounding mirrors the Triton kernel: the normed rows, qkv, the attention output and
// the MLP's hidden row are bf16; the residual and all sums are fp32.
//
// Macros: PACE (SM clock cycles the producer waits per KiB of the row it has just copied;
// default 100, 0: none). For diagnosis: NO_COPY (no weights copied: the chain alone; wrong
// results), NO_PREFETCH (no L2 prefetch of the attention's keys and values), NO_FENCE (the
// grid barrier's release without the fence before it). Commit e9970e8 has the version whose
// consumer warps issue the copies themselves (LANE_COPIES, NO_WAIT); the other versions
// RESULTS.md's eighth session measured (weights in registers, EVICT_FIRST) were not kept.

// (HD, THREADS, WARPS, the bf16 helpers, wait_parity, consumer_sync, the layer norm and the attention's
// softmax partial are in collapse_tui/fast/cuda/common.cuh, which cuda_decode.py compiles in front of this
// file. They came there in the ninth session, shared with the cluster kernel (cluster_decode.cu beside it). The norm's sums now run as four
// chains (the same norm, summed in another order); the partial's guard for an item without keys changes
// no result. This kernel was not run again after that.)
#ifndef PACE
#define PACE 100  // measured best of 0, 100, 200 for gpt2-medium on an H200
#endif
#define G (GRID * WARPS)  // warps in the grid
#define RQ ((3 * D + G - 1) / G)  // qkv rows a warp
#define RF ((FF + G - 1) / G)     // MLP up rows a warp
#define RD ((D + G - 1) / G)      // projection and MLP down rows a warp
#define FF (4 * D)
#define KF (FF / 256)  // ... of FF values
#define CH 128         // keys an attention item covers
#define PASSES (CH / WARPS / 4)  // a warp takes 4 keys a pass (8 lanes a key)
#define NCHMAX ((LC + CH - 1) / CH)
#define PART (HD + 2)  // an attention item's partial: o[HD], max, sum

__device__ __forceinline__ float dot8(uint4 w, const float* x) {
    return bf_lo(w.x) * x[0] + bf_hi(w.x) * x[1] + bf_lo(w.y) * x[2] + bf_hi(w.y) * x[3] +
           bf_lo(w.z) * x[4] + bf_hi(w.z) * x[5] + bf_lo(w.w) * x[6] + bf_hi(w.w) * x[7];
}
#ifndef NO_PREFETCH  // (diagnosis) the keys' and values' prefetch left out
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
#else
__device__ __forceinline__ void prefetch_l2(const void* p) {}
#endif

// A slot's size: the largest of the products' rows for all of a CTA's consumer warps (bf16 values).
#define SLOT_A (WARPS * RQ * D)
#define SLOT_B (WARPS * RF * D)
#define SLOT_C (WARPS * RD * FF)
#define SLOT (SLOT_A > SLOT_B ? (SLOT_A > SLOT_C ? SLOT_A : SLOT_C) : (SLOT_B > SLOT_C ? SLOT_B : SLOT_C))
static_assert(D % 256 == 0, "a lane steps through a row 8 values at a time, 32 lanes a step");
static_assert(CH % (WARPS * 4) == 0 && THREADS >= HD, "an attention item's keys split evenly over the warps");
// The ring of three weight slots. A slot holds one product's rows for every consumer warp of the CTA:
// warp w's row r (of R) at (w * R + r) * K. A producer warp (one thread of it) fills the slots with bulk
// copies (cp.async.bulk, one a row), each fill counted on the slot's `full` mbarrier; the consumer warps
// wait on `full`, read, and count themselves out on the slot's `empty` mbarrier, which the producer waits
// on before it fills the slot again. So the copies run as far ahead as the ring allows, issued off the
// chain's critical path, and, with PACE, spread out in time: PACE cycles a KB after each row, so that
// the stream does not arrive in bursts at full bandwidth (the traffic that slowed the chain when the
// consumers issued a whole product at once; RESULTS.md, eighth session).
struct Ring {
    u16* slots;
    unsigned long long* full;   // [3], one arrival (the producer's) plus the bytes
    unsigned long long* empty;  // [3], WARPS arrivals (the consumer warps)
    u32 uses;                   // consumer side: bit s = parity of slot s's fills consumed so far
};

// The producer: fill slot s with the CTA's rows of W [rows, K] (R a warp), after the consumers let go of
// the slot's previous fill (the `fill`-th of this slot; the first needs no wait).
template <int R, int K>
__device__ __forceinline__ void fill_slot(Ring& ring, int s, int fill, const u16* W, int rows) {
    if (fill > 0) wait_parity(ring.empty + s, (fill - 1) & 1);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the consumers' reads before the copy's writes
    u32 bytes = 0;
#ifndef NO_COPY
    for (int w = 0; w < WARPS; ++w)
#pragma unroll
        for (int r = 0; r < R; ++r) bytes += blockIdx.x * WARPS + w + r * G < rows ? K * 2 : 0;
#endif
    const u32 bar = shared_address(ring.full + s);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#ifndef NO_COPY
    for (int w = 0; w < WARPS; ++w)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int row = blockIdx.x * WARPS + w + r * G;
            if (row < rows) {
                asm volatile(
                    "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                        shared_address(ring.slots + s * SLOT + (w * R + r) * K)),
                    "l"(W + (long long)row * K), "r"(K * 2), "r"(bar) : "memory");
#if PACE > 0  // (PACE is always defined: 100 unless the script sets it)
                const long long start = clock64();
                while (clock64() - start < (long long)PACE * K * 2 / 1024) {
                }
#endif
            }
        }
#endif
}

// The whole sequence of fills, in the order the consumers free the slots (see the ring in the kernel).
__device__ void produce(Ring& ring, const u16* qkv_w, const u16* proj_w, const u16* fc_w, const u16* out_w) {
    int fills[3] = {0, 0, 0};
    fill_slot<RQ, D>(ring, 0, fills[0]++, qkv_w, 3 * D);
    fill_slot<RD, D>(ring, 1, fills[1]++, proj_w, D);
    fill_slot<RF, D>(ring, 2, fills[2]++, fc_w, FF);
    for (int l = 0; l < NL; ++l) {
        const int q = l % 3, p = (l + 1) % 3, u = (l + 2) % 3;
        fill_slot<RD, FF>(ring, q, fills[q]++, out_w + (long long)l * D * FF, D);  // down(l) where qkv(l) was
        if (l + 1 == NL) break;
        fill_slot<RQ, D>(ring, p, fills[p]++, qkv_w + (long long)(l + 1) * 3 * D * D, 3 * D);  // where proj(l) was
        fill_slot<RD, D>(ring, u, fills[u]++, proj_w + (long long)(l + 1) * D * D, D);  // where up(l) was
        fill_slot<RF, D>(ring, q, fills[q]++, fc_w + (long long)(l + 1) * FF * D, FF);  // where down(l) was
    }
}

// A consumer warp: wait for slot s's next fill; then, once read, let it go.
__device__ __forceinline__ void wait_stage(Ring& ring, int s) {
    wait_parity(ring.full + s, (ring.uses >> s) & 1u);
    ring.uses ^= 1u << s;
}
__device__ __forceinline__ void release_stage(Ring& ring, int s, int lane) {
    __syncwarp();
    if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(ring.empty + s)) : "memory");
}
template <int R, int K>
__device__ __forceinline__ uint4 slot_piece(const Ring& ring, int s, int warp, int r, int i, int lane) {
    return *reinterpret_cast<const uint4*>(ring.slots + s * SLOT + (warp * R + r) * K + i * 256 + lane * 8);
}
// this warp's row r (of R, K long, in slot s) times an input whose lane values for step i sit at
// x + i * step (8 of them), summed across the warp
template <int R, int K>
__device__ __forceinline__ float row_times(const Ring& ring, int s, int warp, int r, int lane, const float* x, int step) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < K / 256; ++i) acc += dot8(slot_piece<R, K>(ring, s, warp, r, i, lane), x + i * step);
    return group_sum<32>(acc);
}
// The projection and MLP down: this warp's rows (RD of them, K long, in slot s) times the input row x
// in shared memory, added to the residual: h[row] = hs[row] + product + bias.
template <int K>
__device__ __forceinline__ void add_rows(const Ring& ring, int s, const float* x, const float* bias, const float* hs,
                                         float* h, int g, int warp, int lane) {
#pragma unroll
    for (int r = 0; r < RD; ++r) {
        const int row = g + r * G;
        if (row < D) {
            const float acc = row_times<RD, K>(ring, s, warp, r, lane, x + lane * 8, 256);  // x in shared memory
            if (lane == 0) h[row] = hs[row] + acc + bias[r];
        }
    }
}

// all CTAs meet: one thread a CTA counts itself in (release) and polls (acquire)
__device__ __forceinline__ void grid_sync(int* counter, int* error, int& target) {
    target += gridDim.x;
    consumer_sync();
    if (threadIdx.x == 0) {
        int seen, spins = 0;
#ifndef NO_FENCE  // (diagnosis) the release alone, without the fence before it
        __threadfence();
#endif
        asm volatile("atom.add.release.gpu.global.s32 %0, [%1], 1;" : "=r"(seen) : "l"(counter) : "memory");
        do {
            asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
            // after one barrier gave up the others do not wait their whole budget too
        } while (seen < target && ++spins < SPIN_LIMIT && ((spins & 255) || !*(volatile int*)error));
        if (seen < target) atomicExch(error, 1);
    }
    consumer_sync();
}


// The CTA copies N rows of D fp32 values into shared memory. Every load is issued before the first
// store: a loop that stored each value before loading the next would wait one L2 round trip (~0.7 µs)
// per step. FRESH: rows written this launch, read from L2 (never a stale L1 line).
#define PER_THREAD_UP ((D + THREADS - 1) / THREADS)  // values of a D-row a thread copies
template <int N, bool FRESH>
__device__ __forceinline__ void copy_rows(float* const (&dst)[N], const float* const (&src)[N]) {
    float v[N][PER_THREAD_UP];
#pragma unroll
    for (int k = 0; k < PER_THREAD_UP; ++k) {
        const int i = threadIdx.x + k * THREADS;
        if (i < D)
#pragma unroll
            for (int n = 0; n < N; ++n) v[n][k] = FRESH ? __ldcg(src[n] + i) : src[n][i];
    }
#pragma unroll
    for (int k = 0; k < PER_THREAD_UP; ++k) {
        const int i = threadIdx.x + k * THREADS;
        if (i < D)
#pragma unroll
            for (int n = 0; n < N; ++n) dst[n][i] = v[n][k];
    }
}
// the residual row, written this launch
__device__ __forceinline__ void load_row(float* dst, const float* src) { copy_rows<1, true>({dst}, {src}); }
// a layer norm's parameters (constant through the launch)
__device__ __forceinline__ void load_params(float* gs, float* bs, const float* g, const float* b) {
    copy_rows<2, false>({gs, bs}, {g, b});
}

extern "C" __global__ void __launch_bounds__(THREADS + 32, 1) decode_layers(
    const long long* token_ptr, const long long* pos_ptr, const float* wte, const float* wpe,
    const u16* qkv_w, const u16* qkv_b, const u16* proj_w, const float* proj_b, const u16* fc_w,
    const u16* fc_b, const u16* out_w, const float* out_b, const float* ln1_w, const float* ln1_b,
    const float* ln2_w, const float* ln2_b, u16* cache, float* h, u16* qkv, float* part, u16* ff,
    u16* out, int* sync, int* error) {
    __shared__ __align__(16) float xs[FF];  // a product's input row: the attention output, or the MLP's hidden row
    __shared__ __align__(16) float hs[D];   // the residual row
    __shared__ __align__(16) float gs[D];   // a layer norm's weight ...
    __shared__ __align__(16) float bs[D];   // ... and bias
    __shared__ float red_m[WARPS], red_l[WARPS], red_o[WARPS][HD];
    extern __shared__ __align__(128) u16 slots[];  // 3 x SLOT: the ring of weight slots
    __shared__ __align__(8) unsigned long long full[3], empty[3];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = blockIdx.x * WARPS + warp;  // this warp's first row of every product; the next are G apart
    const int pos = (int)pos_ptr[0];
    const int token = (int)token_ptr[0];
    const int nch = pos / CH + 1;  // attention items a head: keys 0..pos
    const float scale = 0.125f;    // 1 / sqrt(HD)
    int target = 0;
    int* counter = sync;

    // The ring: layer l's qkv in slot l % 3, its projection in (l + 1) % 3, MLP up in (l + 2) % 3, MLP down in
    // l % 3 again once qkv is read; the producer fills each slot as soon as the consumers let go of it:
    // down(l) after qkv(l), qkv(l + 1) after proj(l), proj(l + 1) after up(l), up(l + 1) after down(l).
    Ring ring{slots, full, empty, 0u};
    if (threadIdx.x == 0) {
        for (int s = 0; s < 3; ++s) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(full + s)) : "memory");
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(empty + s)), "n"(WARPS) : "memory");
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();  // every thread, the producer warp's too, sees the initialised barriers
    if (warp == WARPS) {  // the producer warp: one thread issues every copy, then leaves
        if (lane == 0) produce(ring, qkv_w, proj_w, fc_w, out_w);
        return;
    }

    // the embedding, in every CTA (no hand-off); the first layer's norm parameters
    for (int i = threadIdx.x; i < D; i += THREADS) hs[i] = wte[(long long)token * D + i] + wpe[(long long)pos * D + i];
    load_params(gs, bs, ln1_w, ln1_b);
    float bq[RQ];
#pragma unroll
    for (int r = 0; r < RQ; ++r) bq[r] = bf_lo(qkv_b[min(g + r * G, 3 * D - 1)]);
    consumer_sync();

    for (int l = 0; l < NL; ++l) {
        u16* kcache = cache + (long long)l * 2 * NH * LC * HD;
        u16* vcache = kcache + (long long)NH * LC * HD;
        const bool more = l + 1 < NL;
        const int slot_q = l % 3;        // qkv(l), then down(l)
        const int slot_p = (l + 1) % 3;  // proj(l), then qkv(l + 1)
        const int slot_u = (l + 2) % 3;  // up(l), then proj(l + 1)

        // this CTA's attention item's earlier keys and values (written by earlier launches) from HBM into
        // L2 now, so that after the barrier they come back with the query in one L2 round trip
        if (blockIdx.x < NH * nch) {
            const int head = blockIdx.x / nch, chunk = blockIdx.x % nch;
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const int key = chunk * CH + (warp * PASSES + p) * 4 + (lane >> 3);
                if (key < pos && (lane & 7) == 0) {  // one 128-byte line a key
                    prefetch_l2(kcache + ((long long)head * LC + key) * HD);
                    prefetch_l2(vcache + ((long long)head * LC + key) * HD);
                }
            }
        }
        // ---- ln_1 + qkv (hs, gs, bs hold the residual and ln_1's parameters) ----
        {
            float x[KD * 8];
            norm_lane(hs, gs, bs, x, lane);
            wait_stage(ring, slot_q);
#pragma unroll
            for (int r = 0; r < RQ; ++r) {
                const int row = g + r * G;
                if (row < 3 * D) {
                    const float acc = row_times<RQ, D>(ring, slot_q, warp, r, lane, x, 8);  // x in registers
                    if (lane == 0) {
                        const u32 value = to_bf(acc + bq[r]);
                        qkv[row] = (u16)value;
                        if (row >= D) {
                            const int which = row / D - 1, head = (row % D) / HD, dim = row % HD;
                            cache[((((long long)l * 2 + which) * NH + head) * LC + pos) * HD + dim] = (u16)value;
                        }
                    }
                }
            }
        }
        release_stage(ring, slot_q, lane);  // the producer copies down(l) there next
        const int kk = lane >> 3, dg = lane & 7;  // attention: a pass takes 4 keys, 8 lanes a key, 8 dims a lane
        grid_sync(counter, error, target);

        // ---- attention: item (head, chunk of CH keys); warp w takes CH / WARPS of them ----
        for (int item = blockIdx.x; item < NH * nch; item += gridDim.x) {
            const int head = item / nch, chunk = item % nch;
            float s[PASSES];
            const uint4 q4 = load16_cg(qkv + head * HD + dg * 8);
            float q[8] = {bf_lo(q4.x), bf_hi(q4.x), bf_lo(q4.y), bf_hi(q4.y),
                          bf_lo(q4.z), bf_hi(q4.z), bf_lo(q4.w), bf_hi(q4.w)};
            float m = NEG_INF;
            uint4 kr[PASSES], vr[PASSES];
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const int key = chunk * CH + (warp * PASSES + p) * 4 + kk;
                if (key <= pos) {  // this token's key and value were written this launch: from L2
                    kr[p] = load16_cg(kcache + ((long long)head * LC + key) * HD + dg * 8);
                    vr[p] = load16_cg(vcache + ((long long)head * LC + key) * HD + dg * 8);
                }
            }
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const int key = chunk * CH + (warp * PASSES + p) * 4 + kk;
                float part_s = key <= pos ? dot8(kr[p], q) : 0.f;
                part_s += __shfl_xor_sync(0xffffffffu, part_s, 1);
                part_s += __shfl_xor_sync(0xffffffffu, part_s, 2);
                part_s += __shfl_xor_sync(0xffffffffu, part_s, 4);
                s[p] = key <= pos ? part_s * scale : NEG_INF;
                m = fmaxf(m, s[p]);
            }
            float mm, ll, oo;
            softmax_partial<PASSES>(s, m, vr, warp, kk, dg, red_m, red_l, red_o, mm, ll, oo);
            if (threadIdx.x < HD) {
                float* dst = part + ((long long)head * NCHMAX + chunk) * PART;
                dst[threadIdx.x] = oo;
                if (threadIdx.x == 0) {
                    dst[HD] = mm;
                    dst[HD + 1] = ll;
                }
            }
            consumer_sync();
        }
        float bp[RD];
#pragma unroll
        for (int r = 0; r < RD; ++r) bp[r] = proj_b[l * D + min(g + r * G, D - 1)];
        grid_sync(counter, error, target);

        // ---- projection: the chunks' partial softmax combined per (head, dim), then rows ----
#pragma unroll
        for (int k = 0; k < PER_THREAD_UP; ++k) {
            const int c = threadIdx.x + k * THREADS;
            if (c < D) {
                const float* src = part + (long long)(c / HD) * NCHMAX * PART;
                float pm[NCHMAX], pl[NCHMAX], po[NCHMAX];  // every chunk's loads issued before the first is used
#pragma unroll
                for (int n = 0; n < NCHMAX; ++n)
                    if (n < nch) {
                        pm[n] = __ldcg(src + n * PART + HD);
                        pl[n] = __ldcg(src + n * PART + HD + 1);
                        po[n] = __ldcg(src + n * PART + c % HD);
                    }
                float mm = NEG_INF;
#pragma unroll
                for (int n = 0; n < NCHMAX; ++n)
                    if (n < nch) mm = fmaxf(mm, pm[n]);
                float ll = 0.f, oo = 0.f;
#pragma unroll
                for (int n = 0; n < NCHMAX; ++n)
                    if (n < nch) {
                        const float f = __expf(pm[n] - mm);
                        ll += pl[n] * f;
                        oo += po[n] * f;
                    }
                xs[c] = round_bf(oo / ll);
            }
        }
        wait_stage(ring, slot_p);
        consumer_sync();
        add_rows<D>(ring, slot_p, xs, bp, hs, h, g, warp, lane);
        release_stage(ring, slot_p, lane);  // qkv(l + 1) next
        float bf[RF];
#pragma unroll
        for (int r = 0; r < RF; ++r) bf[r] = bf_lo(fc_b[l * FF + min(g + r * G, FF - 1)]);
        load_params(gs, bs, ln2_w + l * D, ln2_b + l * D);  // ln_1's were last read in the qkv stage
        grid_sync(counter, error, target);

        // ---- ln_2 + MLP up + GELU ----
        load_row(hs, h);
        consumer_sync();
        {
            float x[KD * 8];
            norm_lane(hs, gs, bs, x, lane);
            wait_stage(ring, slot_u);
#pragma unroll
            for (int r = 0; r < RF; ++r) {
                const int row = g + r * G;
                if (row < FF) {
                    float acc = row_times<RF, D>(ring, slot_u, warp, r, lane, x, 8) + bf[r];
                    acc = gelu_tanh(acc);
                    if (lane == 0) ff[row] = (u16)to_bf(acc);
                }
            }
        }
        release_stage(ring, slot_u, lane);  // proj(l + 1) next
        float bd[RD];
#pragma unroll
        for (int r = 0; r < RD; ++r) bd[r] = out_b[l * D + min(g + r * G, D - 1)];
        grid_sync(counter, error, target);

        // ---- MLP down, added to the residual ----
        {
            constexpr int STEPS = (FF / 8 + THREADS - 1) / THREADS;  // 16-byte loads a thread
            uint4 v[STEPS];  // every load issued before the first store
#pragma unroll
            for (int k = 0; k < STEPS; ++k)
                if (threadIdx.x + k * THREADS < FF / 8) v[k] = load16_cg(ff + (threadIdx.x + k * THREADS) * 8);
#pragma unroll
            for (int k = 0; k < STEPS; ++k)
                if (threadIdx.x + k * THREADS < FF / 8) {
                    float* dst = xs + (threadIdx.x + k * THREADS) * 8;
                    dst[0] = bf_lo(v[k].x); dst[1] = bf_hi(v[k].x); dst[2] = bf_lo(v[k].y); dst[3] = bf_hi(v[k].y);
                    dst[4] = bf_lo(v[k].z); dst[5] = bf_hi(v[k].z); dst[6] = bf_lo(v[k].w); dst[7] = bf_hi(v[k].w);
                }
        }
        wait_stage(ring, slot_q);
        consumer_sync();
        add_rows<FF>(ring, slot_q, xs, bd, hs, h, g, warp, lane);
        release_stage(ring, slot_q, lane);  // up(l + 1) next
        {
            const int next = more ? l + 1 : l;
#pragma unroll
            for (int r = 0; r < RQ; ++r) bq[r] = bf_lo(qkv_b[next * 3 * D + min(g + r * G, 3 * D - 1)]);
        }
        load_params(gs, bs, ln1_w + (l + 1) * D, ln1_b + (l + 1) * D);  // ln_f rides as ln_1 of layer NL
        grid_sync(counter, error, target);
        load_row(hs, h);
        consumer_sync();
    }

    // ln_f of the token, by CTA 0's first warp
    if (blockIdx.x == 0 && warp == 0) {
        float x[KD * 8];
        norm_lane(hs, gs, bs, x, lane);
        store_lane_row(out, x, lane);
    }
    if (last_out(sync + 32)) {  // the barrier counter zeroed for the next launch
        sync[0] = 0;
        __threadfence();
    }
}
