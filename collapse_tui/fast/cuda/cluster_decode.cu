// One cached GPT-2 token in hand-written CUDA with no grid barrier at all: thread block clusters.
//
// The engine's full-context step on Hopper GPUs (collapse_tui/fast/cluster.py compiles it with NVRTC;
// elsewhere the Triton decode kernel of persistent_kernel.py runs). benchmarks/cuda_decode.py (--kernel
// cluster) checks it and times it against the Triton kernel, with the diagnostic macros below. The
// five-barrier CUDA kernel (benchmarks/cuda_decode.cu) showed that a layer's time is its chain of
// grid-wide hand-offs, ~3.5 µs each (RESULTS.md, eighth session). Here no hand-off waits for the whole
// grid:
//
// - The CTAs come in clusters of CS (Hopper thread block clusters); the first NH clusters hold a head
//   each, and every cluster takes a share of the MLP. Inside a cluster, CTAs hand off by pushing their
//   values straight into each other's shared memory (st.async, counted in bytes on the receiver's
//   mbarrier): no fence, no round trip.
// - Across clusters, a value travels with its own flag: the value and a tag (launch, layer) in one
//   64-bit store that a reader polls (NCCL's LL protocol). No barrier, no fence.
// - The projection and MLP down are linear, so each is split by its input (K): a head's share of the
//   projection, a CTA's hidden rows' share of MLP down, each a partial of the whole row. Rank r of every
//   cluster sums slice r of the partials (a fixed order) and pushes it to its cluster, so every CTA holds
//   the same residual, whatever the timing.
//
// A layer, for a head cluster's CTA (the other clusters skip to "every head's partial"):
//
//   ln_1 + its q/k/v rows      (its head's share; with SPREAD_QKV every CTA takes 3D / GRID rows of all
//                               heads, written out tagged, and the head clusters read their 3 x HD)
//   push / gather              the head's q, the new token's k and v, in every CTA of the cluster
//   attention                  over the CTA's share of the keys 0..pos (split evenly over the cluster)
//   push / combine             the chunks' partial softmax combined; its share of the projection, tagged
//   every head's partial       a slice summed in each cluster, pushed: the residual after attention
//   ln_2 + its MLP up rows     (rows b FF / GRID .. (b + 1) FF / GRID of CTA b) + GELU
//   MLP down                   every output over its hidden rows: the CTA's partial
//   push / in cluster          the cluster's partials of a slice summed, tagged
//   every cluster's partial    a slice summed, pushed: the residual after the MLP
//
// Weights come pre-arranged (cluster.py): a head CTA's q/k/v rows as one block, its projection share
// as [HD][outputs], MLP up as rows, MLP down transposed ([hidden][width]). A producer warp streams each
// CTA's chunks (up to CHUNK_BYTES, 64 KB) into a ring of SLOTS (3) shared-memory slots, round robin.
// Rounding mirrors the Triton kernel: normed rows, q/k/v, the attention output and the hidden values are
// bf16; the residual and all sums fp32.
//
// Macros: D, NH, NL, LC (cache length), THREADS (consumer threads), CS (cluster size), NCL (clusters,
// at least NH; all of them must be resident at once: cluster.py asks the driver), FROM_SEQ (the token is
// token_ptr[pos], the sequence being generated, instead of token_ptr[0]), SPREAD_QKV,
// NORM_ONCE (default 1: the CTA norms the row once into shared memory; 0: every warp for itself), MMA_ROWS
// (with SPREAD_QKV: q/k/v and MLP up on tensor cores, mma.sync with the weights stored as fragments;
// RESULTS.md's ninth and eleventh sessions: no gain the engine would keep), PACE (cycles the producer
// waits a KiB copied; default 0), SLOTS and CHUNK_BYTES (the weight ring's slots, default 3, and a chunk's
// largest size, default 64 KB; cluster.py sizes shared memory from both). For diagnosis: NO_COPY (no
// weights copied; wrong results), TRACE (clock stamps at each stage's end, cuda_decode.py prints where a
// layer's time goes).

// (HD, THREADS, WARPS, the bf16 helpers, wait_parity, consumer_sync, group_sum, the layer norm and the
// attention's softmax partial are in common.cuh, which cluster.py compiles in front of this file.)
#ifndef PACE
#define PACE 0
#endif
#ifndef NORM_ONCE  // RESULTS.md, eleventh session: layers 0.4-4 % shorter than with every warp norming for itself
#define NORM_ONCE 1
#endif
#ifndef SLOTS
#define SLOTS 3  // the weight ring's slots
#endif
#ifndef CHUNK_BYTES
#define CHUNK_BYTES 65536  // a weight chunk's largest size (q/k/v with SPREAD_QKV, MLP up and down)
#endif
#ifndef CS
#define CS 8
#endif
#ifndef NCL
#define NCL NH  // clusters: the first NH hold a head each; all of them share the MLP
#endif
#define GRID (NCL * CS)
#define HGRID (NH * CS)  // the head clusters' CTAs
#define FF (4 * D)
#define QR (3 * HD / CS)     // q/k/v rows a CTA: its share of its head's 3 x HD
#define PR (D / CS)          // projection outputs a CTA (its head's share of them)
#define FR ((FF + GRID - 1) / GRID)  // MLP up rows a CTA at most (CTA b: rows b FF / GRID .. (b + 1) FF / GRID)
#define FC ((FR * D * 2 + CHUNK_BYTES - 1) / CHUNK_BYTES)  // chunks of MLP up (and of MLP down): up to CHUNK_BYTES each
#define FCR ((FR + FC - 1) / FC)            // rows a chunk at most
#define FT ((FCR + WARPS - 1) / WARPS)      // rows a warp a chunk at most
#define OPL (D / 32 / WARPS)                // MLP down outputs a lane
#define CH ((LC / CS + WARPS * 4 - 1) / (WARPS * 4) * (WARPS * 4))  // keys a CTA's attention covers at most
#define PASSES (CH / WARPS / 4)
#define QRC (QR < 3 * WARPS ? QR : 3 * WARPS)  // q/k/v rows a weight chunk (3 a warp)
#ifdef SPREAD_QKV  // q/k/v rows split over every CTA (b: rows b 3D / GRID ..), handed to the heads through L2
#define QRS ((3 * D + GRID - 1) / GRID)        // q/k/v rows a CTA at most
#define QT ((QRS + WARPS - 1) / WARPS)         // ... a warp
#define QC ((QRS * D * 2 + CHUNK_BYTES - 1) / CHUNK_BYTES)  // chunks of them: up to CHUNK_BYTES each (gpt2-large: 2)
#define QCR ((QRS + QC - 1) / QC)              // rows a chunk at most
#define QCHUNK (QCR * D)
#else
#define QC (QR / QRC)                          // q/k/v chunks
#define QT (QR / WARPS)
#define QCHUNK (QRC * D)
#endif
#define ATT (HD + 4)         // an attention chunk's partial: o[HD], max, sum, padded to 16 bytes
#define PIECE 4096           // bytes a bulk copy (pacing steps by it)

#define QB (QR * D)  // a CTA's block of each product's weights (bf16 values)
#define PB (PR * HD)
#define MAX2(a, b) ((a) > (b) ? (a) : (b))
#ifdef MMA_ROWS  // q/k/v and MLP up on tensor cores: weights as mma.m16n8k16 A fragments (benchmarks/mma_layout.py)
#ifndef SPREAD_QKV
#error "MMA_ROWS takes the q/k/v rows of SPREAD_QKV"
#endif
#undef NORM_ONCE
#define NORM_ONCE 1  // the B operand is the normed row in shared memory
#define KS (D / 16)                      // k-steps of a row
#define KSW (KS / WARPS)                 // ... a warp's share
#define QT16 ((QRS + 15) / 16)           // q/k/v tiles of 16 rows a CTA (its rows padded with zero rows)
#define FT16 ((FR + 15) / 16)            // MLP up tiles a CTA
#define FCU ((FT16 + 1) / 2)             // MLP up chunks: two tiles each
#define UCHUNK ((FT16 < 2 ? FT16 : 2) * 16 * D)
#undef QCHUNK
#define QCHUNK (QT16 * 16 * D)
static_assert(KS % WARPS == 0 && QT16 <= 2, "k-steps split evenly over the warps; q/k/v in one chunk of two tiles");
#define SLOT MAX2(MAX2(QCHUNK, PB), MAX2(UCHUNK, FCR * D))
#else
#define FCU FC
#define SLOT MAX2(MAX2(QCHUNK, PB), FCR * D)  // a chunk of any product
#endif

static_assert(D % 256 == 0, "a lane steps through a row 8 values at a time");
#ifndef SPREAD_QKV  // a head cluster computes its head's q/k/v rows itself
static_assert(3 * HD % CS == 0 && QR % WARPS == 0, "a head's q/k/v rows split evenly over the cluster's warps");
static_assert(QR % QRC == 0 && QRC % WARPS == 0, "q/k/v rows split evenly into chunks and warps");
#endif
static_assert(D % CS == 0 && PR <= THREADS, "a thread a projection output");
static_assert(NCL >= NH, "a cluster for every head");
// Clusters without a head feed the next layer's heads only through SPREAD_QKV's q/k/v rows. Without it
// such a cluster could still be reading this layer's `delta` and `cluster_parts` when the head clusters'
// next-layer values overwrite them; so extra clusters need SPREAD_QKV.
#if NCL > NH && !defined(SPREAD_QKV)
#error "clusters beyond the heads (NCL > NH) need SPREAD_QKV"
#endif
static_assert(SLOTS * SLOT * 2 <= 227 * 1024, "the slots fit in shared memory (cluster.py checks the rest)");
static_assert(D % (32 * WARPS) == 0, "MLP down: every output a lane's");
#ifdef SPREAD_QKV
static_assert(3 * HD <= THREADS, "a thread a value of the head's q, k and v");
static_assert((QC - 1) * QCR < 3 * D / GRID, "every CTA's last q/k/v chunk holds a row");
#endif
static_assert(NL < 64, "a tag holds the layer in 6 bits");
static_assert(D / CS <= THREADS, "a thread reduces one column of the cluster's slice");
static_assert(LC <= CS * CH, "the cluster's chunks of keys cover the cache");
static_assert(QR % 8 == 0 && (D / CS) % 4 == 0, "pushes go in 16-byte pieces");
static_assert(CS * QR / 8 <= THREADS && CS * ATT / 4 <= THREADS && D / 4 <= THREADS, "a thread a piece");

// TRACE: thread 0 of every CTA stamps the SM clock at each stage's end (trace[CTA][layer][stage]), and
// the global timer at the launch's start and end (to turn cycles into time).
#define STAGES 10
#ifdef TRACE
#define STAMP(k) \
    if (threadIdx.x == 0) trace[((long long)blockIdx.x * NL + l) * STAGES + (k)] = clock64()
// (and STAMPX(k), k < 3: finer stamps inside ln_2 + MLP up, after the clocks and times; a fourth slot spare)
#define STAMPX(k) \
    if (threadIdx.x == 0) trace[(long long)GRID * (NL * STAGES + 4) + ((long long)blockIdx.x * NL + l) * 4 + (k)] = clock64()
#else
#define STAMP(k)
#define STAMPX(k)
#endif

// two chains of four, not one of eight: the sums are latency, not throughput
__device__ __forceinline__ float dot8(uint4 w, const float* x) {
    const float a = bf_lo(w.x) * x[0] + bf_hi(w.x) * x[1] + bf_lo(w.y) * x[2] + bf_hi(w.y) * x[3];
    const float b = bf_lo(w.z) * x[4] + bf_hi(w.z) * x[5] + bf_lo(w.w) * x[6] + bf_hi(w.w) * x[7];
    return a + b;
}

// ---- the weight ring: SLOTS slots, filled round robin with each CTA's chunks in the order they are used ----
struct Ring {
    u16* slots;
    unsigned long long* full;   // [SLOTS]: the producer's arrival plus the chunk's bytes
    unsigned long long* empty;  // [SLOTS]: WARPS arrivals (the consumer warps)
    u32 count;                  // chunks taken (consumer) or filled (producer) so far
};
// the producer: the next chunk, `values` bf16 values from src, once the consumers let go of its slot
__device__ __forceinline__ void fill(Ring& ring, const u16* src, u32 values) {
    const int s = ring.count % SLOTS;
    if (ring.count >= SLOTS) wait_parity(ring.empty + s, (ring.count / SLOTS - 1) & 1);
    ++ring.count;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    const u32 bytes = values * 2;
    const u32 bar = shared_address(ring.full + s);
#ifdef NO_COPY
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(0) : "memory");
#else
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    for (u32 done = 0; done < bytes; done += PIECE) {
        const u32 n = bytes - done < PIECE ? bytes - done : PIECE;
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                         shared_address(reinterpret_cast<char*>(ring.slots + s * SLOT) + done)),
                     "l"(reinterpret_cast<const char*>(src) + done), "r"(n), "r"(bar) : "memory");
#if PACE > 0
        const long long start = clock64();
        while (clock64() - start < (long long)PACE * n / 1024) {
        }
#endif
    }
#endif
}
// every chunk of every layer, in the consumers' order: q/k/v (QC chunks), projection, MLP up (FC), MLP down (FC)
// (MLP chunk c of a CTA's n rows: rows c n / FC .. (c + 1) n / FC of them; MLP down's weights come as
// [FF][D], a row for each hidden value, so a CTA's share is its rows of both.)
__device__ void produce(Ring& ring, const u16* wq, const u16* wp, const u16* wf, const u16* wd) {
    const int first = blockIdx.x * FF / GRID, rows = (blockIdx.x + 1) * FF / GRID - first;
#ifdef SPREAD_QKV
    const int qfirst = blockIdx.x * 3 * D / GRID, qrows = (blockIdx.x + 1) * 3 * D / GRID - qfirst;
#endif
    for (int l = 0; l < NL; ++l) {
#if defined(MMA_ROWS)
        fill(ring, wq + ((long long)l * GRID + blockIdx.x) * QCHUNK, QCHUNK);  // wq: [layer][CTA][tiles] fragments
        if (blockIdx.x < HGRID) fill(ring, wp + ((long long)l * HGRID + blockIdx.x) * PB, PB);
#elif defined(SPREAD_QKV)
        for (int c = 0; c < QC; ++c)  // wq: the plain [3D][D] rows; chunk c: rows c QCR .. of the CTA's
            fill(ring, wq + ((long long)l * 3 * D + qfirst + c * QCR) * D, (min(qrows, (c + 1) * QCR) - c * QCR) * D);
        if (blockIdx.x < HGRID) fill(ring, wp + ((long long)l * HGRID + blockIdx.x) * PB, PB);
#else
        if (blockIdx.x < HGRID) {
            const long long block = (long long)l * HGRID + blockIdx.x;
            for (int c = 0; c < QC; ++c) fill(ring, wq + block * QB + c * QRC * D, QRC * D);
            fill(ring, wp + block * PB, PB);
        }
#endif
        const long long base = ((long long)l * FF + first) * D;
#ifdef MMA_ROWS  // wf: [layer][CTA][FT16 tiles] fragments, two tiles a chunk
        for (int c = 0; c < FCU; ++c)
            fill(ring, wf + (((long long)l * GRID + blockIdx.x) * FT16 + 2 * c) * 16 * D, (FT16 - 2 * c < 2 ? 1 : 2) * 16 * D);
#else
        for (int c = 0; c < FC; ++c) fill(ring, wf + base + c * rows / FC * D, ((c + 1) * rows / FC - c * rows / FC) * D);
#endif
        for (int c = 0; c < FC; ++c) fill(ring, wd + base + c * rows / FC * D, ((c + 1) * rows / FC - c * rows / FC) * D);
    }
}
// a consumer thread: the next chunk, once it has landed
__device__ __forceinline__ const u16* take(Ring& ring) {
    const int s = ring.count % SLOTS;
    wait_parity(ring.full + s, (ring.count / SLOTS) & 1);
    return ring.slots + s * SLOT;
}
// ... and, once this warp has read it, its slot back to the producer
__device__ __forceinline__ void give_back(Ring& ring, int lane) {
    __syncwarp();
    if (lane == 0)
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(ring.empty + ring.count % SLOTS)) : "memory");
    ++ring.count;
}

// ---- hand-offs ----

// Hand-offs across clusters carry their own flag: a partial value and its tag (launch and layer) go
// out in one 64-bit store, which a reader sees whole or not at all; so a reader polls the data itself,
// with no barrier and no fence (the LL protocol of NCCL). The tags' launch count makes last launch's
// values stale; each buffer is rewritten only after every reader of its previous values is past them
// (their next write needs values that every CTA produces after reading).
__device__ __forceinline__ void store_tagged(unsigned long long* p, float value, u32 tag) {
    const unsigned long long v = ((unsigned long long)tag << 32) | __float_as_uint(value);
    asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// SPREAD_QKV: q/k/v value j (of 3D) out, rounded to bf16: tagged for the head clusters, and a key or value
// into the cache
__device__ __forceinline__ void qkv_out(unsigned long long* qkv_parts, u16* cache, int j, float sum, u32 tag, int l,
                                        int pos) {
    const u32 value = to_bf(sum);
    store_tagged(qkv_parts + j, __uint_as_float(value << 16), tag | 2);
    if (j >= D) cache[(((long long)l * 2 + j / D - 1) * NH + (j % D) / HD) * LC * HD + (long long)pos * HD + j % HD] = (u16)value;
}
__device__ __forceinline__ unsigned long long load_tagged(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
// One tagged value's 64 bits, once it carries `tag` (or flagged in error once the spin limit passes or
// another poll gave up). (Two loads kept in flight, staggered, measured 17 % slower for gpt2-medium:
// RESULTS.md, twelfth session.)
__device__ __forceinline__ unsigned long long poll_tagged(const unsigned long long* p, u32 tag, int* error) {
    unsigned long long v = load_tagged(p);
    for (int spins = 0; (u32)(v >> 32) != tag; ++spins) {
        if (spins >= SPIN_LIMIT || ((spins & 255) == 255 && *(volatile int*)error)) {
            atomicExch(error, 1);
            break;
        }
        v = load_tagged(p);
    }
    return v;
}
// column c of N tagged rows (D apart) plus a bias, summed in row order once every row carries `tag`
template <int N>
__device__ __forceinline__ float sum_tagged(const unsigned long long* rows, int c, float bias, u32 tag, int* error) {
    unsigned long long v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = load_tagged(rows + (long long)k * D + c);
    for (int spins = 0;; ++spins) {
        bool all = true;
#pragma unroll
        for (int k = 0; k < N; ++k) all &= (u32)(v[k] >> 32) == tag;
        if (all) break;
        if (spins >= SPIN_LIMIT || ((spins & 255) == 255 && *(volatile int*)error)) {
            atomicExch(error, 1);
            break;
        }
#pragma unroll
        for (int k = 0; k < N; ++k)
            if ((u32)(v[k] >> 32) != tag) v[k] = load_tagged(rows + (long long)k * D + c);
    }
    float sum = bias;
#pragma unroll
    for (int k = 0; k < N; ++k) sum += __uint_as_float((u32)v[k]);
    return sum;
}

// one tagged value, once it carries `tag`
__device__ __forceinline__ float wait_tagged(const unsigned long long* p, u32 tag, int* error) {
    return __uint_as_float((u32)poll_tagged(p, tag, error));
}

// Hand-offs inside the cluster are pushes: a CTA stores its values straight into its peers' shared
// memory with st.async, each store counted (in bytes) on the receiving CTA's mbarrier, which expects the
// phase's bytes (thread 0 announces them at the layer's start). No fence, no round trip: a receiver waits
// until its buffer is full, and the sender moves on at once.
__device__ __forceinline__ u32 cluster_address(const void* p, u32 rank) {
    u32 a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(shared_address(p)), "r"(rank));
    return a;
}
// 16 bytes from this CTA's shared memory at src into rank's copy of dst, counted on rank's bar
__device__ __forceinline__ void push16(void* dst, const void* src, unsigned long long* bar, u32 rank) {
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
                     cluster_address(dst, rank)),
                 "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(cluster_address(bar, rank)) : "memory");
}
__device__ __forceinline__ void push4(float* dst, float value, unsigned long long* bar, u32 rank) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(cluster_address(dst, rank)),
                 "r"(__float_as_uint(value)), "r"(cluster_address(bar, rank)) : "memory");
}
__device__ __forceinline__ void expect_bytes(unsigned long long* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void wait_pushes(unsigned long long* bar, u32 parity) {
    u32 done = 0;
    while (!done)
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done) : "r"(shared_address(bar)), "r"(parity) : "memory");
}

// ---- the stages' pieces ----
#ifdef MMA_ROWS
// A chunk's tiles (one or two, of 16 rows) times the normed row in xs, on tensor cores: warp w takes
// k-steps w KSW .., the row as column 0 of the B operand (lanes 0..3; the other columns zero), and
// leaves its column-0 sums in red[w][row] (lanes 4 g hold rows g and g + 8 of each tile). The caller
// syncs and sums red over the warps.
__device__ __forceinline__ void mma_rows(const u16* chunk, int tiles, const float* xs, float (*red)[32], int warp,
                                         int lane) {
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int s = 0; s < KSW; ++s) {
        const int ks = warp * KSW + s;
        u32 b0 = 0u, b1 = 0u;
        if (lane < 4) {  // rows k 2 lane, 2 lane + 1 and the same + 8 of column 0 (bf16 already: exact)
            const float* x = xs + ks * 16 + 2 * lane;
            b0 = (__float_as_uint(x[0]) >> 16) | (__float_as_uint(x[1]) & 0xffff0000u);
            b1 = (__float_as_uint(x[8]) >> 16) | (__float_as_uint(x[9]) & 0xffff0000u);
        }
#pragma unroll
        for (int m = 0; m < 2; ++m)
            if (m < tiles) {
                const uint4 a = *reinterpret_cast<const uint4*>(chunk + ((m * KS + ks) * 32 + lane) * 8);
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                    "{%0, %1, %2, %3};"
                    : "+f"(acc[m][0]), "+f"(acc[m][1]), "+f"(acc[m][2]), "+f"(acc[m][3])
                    : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
            }
    }
    if ((lane & 3) == 0)
#pragma unroll
        for (int m = 0; m < 2; ++m)
            if (m < tiles) {
                red[warp][m * 16 + (lane >> 2)] = acc[m][0];
                red[warp][m * 16 + (lane >> 2) + 8] = acc[m][2];
            }
}
// row t's sum over the warps (a fixed order)
__device__ __forceinline__ float warps_sum(float (*red)[32], int t) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += red[w][t];
    return v;
}
#endif

// NORM_ONCE: the CTA's threads norm the row together into xs (a thread D / THREADS columns, two CTA-wide
// sums), and each warp then reads its lanes' elements: one pass over hs, gs, bs instead of one a warp.
__device__ __forceinline__ void norm_shared(const float* hs, const float* gs, const float* bs, float* xs, float* red,
                                            int warp, int lane) {
    constexpr int PER = (D + THREADS - 1) / THREADS;
    float v[PER], sum = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int c = threadIdx.x + k * THREADS;
        v[k] = c < D ? hs[c] : 0.f;
        sum += v[k];
    }
    sum = group_sum<32>(sum);
    if (lane == 0) red[warp] = sum;
    consumer_sync();
    float mean = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) mean += red[w];
    mean /= D;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k)
        if (threadIdx.x + k * THREADS < D) {
            v[k] -= mean;
            sq += v[k] * v[k];
        }
    sq = group_sum<32>(sq);
    if (lane == 0) red[WARPS + warp] = sq;
    consumer_sync();
    float var = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) var += red[WARPS + w];
    const float rstd = rsqrtf(var / D + EPS);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int c = threadIdx.x + k * THREADS;
        if (c < D) xs[c] = round_bf(v[k] * rstd * gs[c] + bs[c]);
    }
    consumer_sync();
}
// the normed row for this lane's elements: from xs (NORM_ONCE) or computed by the warp itself
__device__ __forceinline__ void normed(const float* hs, const float* gs, const float* bs, float* xs, float* red,
                                       float* x, int warp, int lane) {
#if NORM_ONCE
    norm_shared(hs, gs, bs, xs, red, warp, lane);
#pragma unroll
    for (int i = 0; i < KD; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) x[i * 8 + j] = xs[i * 256 + lane * 8 + j];
#else
    norm_lane(hs, gs, bs, x, lane);
#endif
}
// row `row` (D long) of a chunk times the normed row this lane holds in x, summed across the warp
__device__ __forceinline__ float row_dot(const u16* chunk, int row, const float* x, int lane) {
    float part[KD];  // independent pieces, summed pairwise
#pragma unroll
    for (int i = 0; i < KD; ++i) part[i] = dot8(*reinterpret_cast<const uint4*>(chunk + row * D + i * 256 + lane * 8), x + i * 8);
#pragma unroll
    for (int step = 1; step < KD; step *= 2)
#pragma unroll
        for (int i = 0; i + step < KD; i += 2 * step) part[i] += part[i + step];
    return group_sum<32>(part[0]);
}
// this lane's earlier keys and values of the CTA's chunk (keys first_key .. below pos, from the cache) into
// registers (at the layer's start; RESULTS.md, eleventh session: 18.8 -> 17.9 µs a gpt2-medium layer at
// position 1000, against loads at the attention's start after an L2 prefetch)
__device__ __forceinline__ void load_keys(uint4* kr, uint4* vr, const u16* kcache, const u16* vcache, int first_key,
                                          int passes, int pos, int warp, int lane) {
    const int kk = lane >> 3, dg = lane & 7;
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        const int key = first_key + (p * WARPS + warp) * 4 + kk;
        if (p < passes && key < pos) {
            kr[p] = load16_cg(kcache + (long long)key * HD + dg * 8);
            vr[p] = load16_cg(vcache + (long long)key * HD + dg * 8);
        }
    }
}
// a layer norm's parameters into shared memory without waiting (cp.async); params_arrived() waits
__device__ __forceinline__ void prefetch_params(float* gs, float* bs, const float* g, const float* b) {
    for (int i = threadIdx.x; i < D / 4; i += THREADS) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(gs + 4 * i)), "l"(g + 4 * i) : "memory");
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(bs + 4 * i)), "l"(b + 4 * i) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ __forceinline__ void params_arrived() { asm volatile("cp.async.wait_all;" ::: "memory"); }

extern "C" __global__ void __cluster_dims__(CS, 1, 1) __launch_bounds__(THREADS + 32, 1) decode_layers(
    const long long* token_ptr, const long long* pos_ptr, const float* wte, const float* wpe,
    const u16* wq, const u16* qkv_b, const u16* wp, const float* proj_b, const u16* wf,
    const u16* fc_b, const u16* wd, const float* out_b, const float* ln1_w, const float* ln1_b,
    const float* ln2_w, const float* ln2_b, u16* cache, unsigned long long* head_parts,
    unsigned long long* cluster_parts, unsigned long long* qkv_parts, u16* out, int* sync, int* error,
    long long* trace) {
    __shared__ __align__(16) float hs[D];     // the residual row (the same in every CTA)
    __shared__ __align__(16) float gs[D];     // a layer norm's weight ...
    __shared__ __align__(16) float bs[D];     // ... and bias
    __shared__ __align__(16) float down[D];       // this CTA's partial of MLP down (pushed to the cluster)
    __shared__ __align__(16) float down_all[D];   // the cluster's partials of this CTA's slice: [rank][D / CS]
    __shared__ __align__(16) u16 qkv_s[QR];       // this CTA's q/k/v values (pushed to the cluster)
    __shared__ __align__(16) u16 head_qkv[3 * HD];  // the head's q, and the new token's k and v (pushed here)
    __shared__ __align__(16) float att[ATT];        // this CTA's chunk: o[HD], max, sum (pushed to the cluster)
    __shared__ __align__(16) float att_all[CS][ATT];  // every chunk's (pushed here)
    __shared__ __align__(16) float head_out[HD];    // the head's attention output
    __shared__ __align__(16) float delta[D];        // what the residual gains (pushed here by the cluster)
    __shared__ __align__(16) float hidden[FR];      // this CTA's MLP hidden values (rows first .. first + rows)
    __shared__ float red_m[WARPS], red_l[WARPS], red_o[WARPS][HD], red_n[2 * WARPS];
    __shared__ __align__(16) float xs[D];  // the normed row (NORM_ONCE)
#ifdef MMA_ROWS
    __shared__ float red_rows[WARPS][32];  // the warps' sums of a chunk's rows
#endif
    __shared__ __align__(8) unsigned long long full[SLOTS], empty[SLOTS], got[5];
    extern __shared__ __align__(128) u16 slots[];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const bool has_head = blockIdx.x < HGRID;
    const int head = has_head ? blockIdx.x / CS : 0;  // one cluster a head (the first NH clusters)
    const int first = blockIdx.x * FF / GRID, rows = (blockIdx.x + 1) * FF / GRID - first;  // MLP rows
    const int pos = (int)pos_ptr[0];
#ifdef FROM_SEQ
    const int token = (int)token_ptr[pos];  // the engine's step: the token at the position it feeds
#else
    const int token = (int)token_ptr[0];
#endif
    const float scale = 0.125f;
    const u32 launch = (u32)*(volatile int*)(sync + 40) + 1;  // tags of 0 (zeroed buffers) are never current
    // the attention's keys 0..pos split evenly over the cluster, in multiples of a pass (4 keys a warp)
    const int chunk_keys = min(CH, ((pos + CS) / CS + WARPS * 4 - 1) / (WARPS * 4) * (WARPS * 4));
    const int passes = chunk_keys / (WARPS * 4);

    Ring ring{slots, full, empty, 0u};
    if (threadIdx.x == 0) {
        for (int s = 0; s < SLOTS; ++s) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(full + s)) : "memory");
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(empty + s)), "n"(WARPS) : "memory");
        }
        for (int s = 0; s < 5; ++s)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(got + s)) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    // the whole cluster, producer warps too: every CTA's mbarriers are initialised before any remote arrival
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    if (warp == WARPS) {
        if (lane == 0) produce(ring, wq, wp, wf, wd);
        return;
    }

    for (int i = threadIdx.x; i < D; i += THREADS) hs[i] = wte[(long long)token * D + i] + wpe[(long long)pos * D + i];
    prefetch_params(gs, bs, ln1_w, ln1_b);
    // this warp's rows of a CTA's block: chunk c's rows warp, warp + WARPS, ...: row (rr / per) * chunk + ...
#define QROW(rr) ((rr) / (QRC / WARPS) * QRC + warp + (rr) % (QRC / WARPS) * WARPS)
// MLP up: chunk c's rows (of the CTA's) c rows / FC + warp + t WARPS, t < FT, below (c + 1) rows / FC
#define FROW(c, t) ((c) * rows / FC + warp + (t) * WARPS)
#define FEND(c) (((c) + 1) * rows / FC)
#ifdef SPREAD_QKV
    const int qfirst = blockIdx.x * 3 * D / GRID, qrows = (blockIdx.x + 1) * 3 * D / GRID - qfirst;
#define QKV_ROW(rr) (qfirst + warp + (rr) * WARPS)  // row of q/k/v (of 3D) of this warp's rr-th
#define QKV_HAS(rr) (warp + (rr) * WARPS < qrows)
#else
#define QKV_ROW(rr) ((rank * QR + QROW(rr)) / HD * D + head * HD + (rank * QR + QROW(rr)) % HD)
#define QKV_HAS(rr) has_head
#endif
    float bq[QT];  // this warp's q/k/v biases, loaded a layer ahead
#pragma unroll
    for (int rr = 0; rr < QT; ++rr) bq[rr] = QKV_HAS(rr) ? bf_lo(qkv_b[QKV_ROW(rr)]) : 0.f;
#ifdef MMA_ROWS
    float bq_row = threadIdx.x < qrows ? bf_lo(qkv_b[qfirst + threadIdx.x]) : 0.f;  // a thread a row's bias
#endif
    params_arrived();
    consumer_sync();

#ifdef TRACE
    long long start_clock = clock64(), start_time;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start_time));
#endif
    for (int l = 0; l < NL; ++l) {
        STAMP(0);
        if (threadIdx.x == 0) {  // this layer's pushes into this CTA
            if (has_head) {
#ifndef SPREAD_QKV
                expect_bytes(got + 0, 3 * HD * 2);
#endif
                expect_bytes(got + 1, CS * ATT * 4);
            }
            expect_bytes(got + 2, D * 4);
            expect_bytes(got + 3, D * 4);
            expect_bytes(got + 4, D * 4);
        }
        const u32 tag = (launch << 8) | (l << 2);  // the heads' partials; | 1 the clusters', | 2 q/k/v
#ifdef MMA_ROWS
        float bf[FCU];  // this thread's MLP up bias, row 32 c + thread of each chunk
#pragma unroll
        for (int c = 0; c < FCU; ++c)
            bf[c] = threadIdx.x < 32 && 32 * c + threadIdx.x < rows ? bf_lo(fc_b[(long long)l * FF + first + 32 * c + threadIdx.x]) : 0.f;
#else
        float bf[FC][FT];  // this warp's MLP up biases, for later in the layer
#pragma unroll
        for (int c = 0; c < FC; ++c)
#pragma unroll
            for (int t = 0; t < FT; ++t)
                bf[c][t] = FROW(c, t) < FEND(c) ? bf_lo(fc_b[(long long)l * FF + first + FROW(c, t)]) : 0.f;
#endif
        u16* kcache = cache + ((long long)l * 2 * NH + head) * LC * HD;
        u16* vcache = kcache + (long long)NH * LC * HD;
        const u32 parity = l & 1;
        const int first_key = rank * chunk_keys;
        // this lane's keys and values of the CTA's chunk (8 lanes a key), asked for now: the loads' latency
        // overlaps the norm and the q/k/v rows instead of opening the attention (the cache's rows below pos
        // were written by earlier launches)
        uint4 kr[PASSES], vr[PASSES];
        if (has_head) load_keys(kr, vr, kcache, vcache, first_key, passes, pos, warp, lane);
#ifdef SPREAD_QKV
        // ---- ln_1 + this CTA's q/k/v rows, every CTA; out as tagged values (and into the cache) ----
#ifdef MMA_ROWS
        {
            norm_shared(hs, gs, bs, xs, red_n, warp, lane);
            const u16* chunk = take(ring);
            mma_rows(chunk, QT16, xs, red_rows, warp, lane);
            give_back(ring, lane);
            consumer_sync();
            if (threadIdx.x < qrows)  // a thread a row: its sum, bias, out tagged and into the cache
                qkv_out(qkv_parts, cache, qfirst + threadIdx.x, warps_sum(red_rows, threadIdx.x) + bq_row, tag, l, pos);
        }
#else
        {
            float x[KD * 8];
            normed(hs, gs, bs, xs, red_n, x, warp, lane);
#if QC == 1
            const u16* chunk = take(ring);
#pragma unroll
            for (int rr = 0; rr < QT; ++rr) {  // every row computed, as in MLP up; stored if it is this CTA's
                const float acc = row_dot(chunk, QKV_HAS(rr) ? warp + rr * WARPS : 0, x, lane);
                if (QKV_HAS(rr) && lane == 0) qkv_out(qkv_parts, cache, QKV_ROW(rr), acc + bq[rr], tag, l, pos);
            }
            give_back(ring, lane);
#else  // the rows in QC chunks: this warp's rows (warp + rr WARPS) each in its chunk
#pragma unroll
            for (int c = 0; c < QC; ++c) {
                const u16* chunk = take(ring);
#pragma unroll
                for (int rr = 0; rr < QT; ++rr) {
                    const int i = warp + rr * WARPS;  // the row among the CTA's (the same for the whole warp)
                    if (i / QCR == c && QKV_HAS(rr)) {
                        const float acc = row_dot(chunk, i - c * QCR, x, lane);
                        if (lane == 0) qkv_out(qkv_parts, cache, QKV_ROW(rr), acc + bq[rr], tag, l, pos);
                    }
                }
                give_back(ring, lane);
            }
#endif
        }
#endif
        consumer_sync();  // every warp's norm done with gs, bs
#endif
        if (has_head) {  // ---- the head clusters: q/k/v, attention, projection ----
#ifdef SPREAD_QKV
        STAMP(1);
        if (threadIdx.x < 3 * HD) {  // the head's q, and the new token's k and v, from L2
            const int j = threadIdx.x / HD * D + head * HD + threadIdx.x % HD;
            head_qkv[threadIdx.x] = (u16)(__float_as_uint(wait_tagged(qkv_parts + j, tag | 2, error)) >> 16);
        }
        consumer_sync();
#else
        // ---- ln_1 + this CTA's q/k/v rows of its head ----
        {
            float x[KD * 8];
            normed(hs, gs, bs, xs, red_n, x, warp, lane);
#pragma unroll
            for (int c = 0; c < QC; ++c) {
                const u16* chunk = take(ring);
#pragma unroll
                for (int r = 0; r < QRC / WARPS; ++r) {
                    const int rr = c * (QRC / WARPS) + r, i = QROW(rr);  // row in the CTA's block
                    const int j = rank * QR + i;                          // row in the head's q, k, v
                    const int which = j / HD, dim = j % HD;
                    const float acc = row_dot(chunk, i - c * QRC, x, lane);
                    if (lane == 0) {
                        const u16 value = (u16)to_bf(acc + bq[rr]);
                        qkv_s[i] = value;
                        if (which > 0) cache[(((long long)l * 2 + which - 1) * NH + head) * LC * HD + (long long)pos * HD + dim] = value;
                    }
                }
                give_back(ring, lane);
            }
        }
        STAMP(1);
        consumer_sync();  // qkv_s complete; every warp's norm done with gs, bs
        if (threadIdx.x < CS * QR / 8) {
            const int to = threadIdx.x / (QR / 8), piece = threadIdx.x % (QR / 8);
            push16(head_qkv + rank * QR + piece * 8, qkv_s + piece * 8, got + 0, to);
        }
        wait_pushes(got + 0, parity);
#endif
        STAMP(2);

        // ---- attention over keys first_key .. first_key + CH - 1 (up to pos) ----
        {
            const int kk = lane >> 3, dg = lane & 7;
            float q[8];
            {
                const uint4 q4 = *reinterpret_cast<const uint4*>(head_qkv + dg * 8);
                q[0] = bf_lo(q4.x); q[1] = bf_hi(q4.x); q[2] = bf_lo(q4.y); q[3] = bf_hi(q4.y);
                q[4] = bf_lo(q4.z); q[5] = bf_hi(q4.z); q[6] = bf_lo(q4.w); q[7] = bf_hi(q4.w);
            }
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const int key = first_key + (p * WARPS + warp) * 4 + kk;
                if (p < passes && key == pos) {  // this token's: from the cluster, not the cache
                    kr[p] = *reinterpret_cast<const uint4*>(head_qkv + HD + dg * 8);
                    vr[p] = *reinterpret_cast<const uint4*>(head_qkv + 2 * HD + dg * 8);
                }
            }
            float s[PASSES], m = NEG_INF;
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const int key = first_key + (p * WARPS + warp) * 4 + kk;
                const bool valid = p < passes && key <= pos;
                float part = valid ? dot8(kr[p], q) : 0.f;
                part = group_sum<8>(part);
                s[p] = valid ? part * scale : NEG_INF;
                m = fmaxf(m, s[p]);
            }
            float mm, ll, oo;
            softmax_partial<PASSES>(s, m, vr, warp, kk, dg, red_m, red_l, red_o, mm, ll, oo);
            if (threadIdx.x < HD) {
                att[threadIdx.x] = oo;
                if (threadIdx.x == 0) {
                    att[HD] = mm;
                    att[HD + 1] = ll;
                }
            }
        }
        STAMP(3);
        consumer_sync();
        if (threadIdx.x < CS * ATT / 4) {
            const int to = threadIdx.x / (ATT / 4), piece = threadIdx.x % (ATT / 4);
            push16(&att_all[rank][piece * 4], att + piece * 4, got + 1, to);
        }
        wait_pushes(got + 1, parity);

        // ---- the cluster's chunks combined; this CTA's share of the head's projection ----
        if (threadIdx.x < HD) {
            float pm[CS], pl[CS], po[CS];
#pragma unroll
            for (int r = 0; r < CS; ++r) {
                pm[r] = att_all[r][HD];
                pl[r] = att_all[r][HD + 1];
                po[r] = att_all[r][threadIdx.x];
            }
            float mm = NEG_INF;
#pragma unroll
            for (int r = 0; r < CS; ++r) mm = fmaxf(mm, pm[r]);
            float ll = 0.f, oo = 0.f;
#pragma unroll
            for (int r = 0; r < CS; ++r)
                if (pm[r] != NEG_INF) {
                    const float f = __expf(pm[r] - mm);
                    ll += pl[r] * f;
                    oo += po[r] * f;
                }
            head_out[threadIdx.x] = round_bf(oo / ll);
        }
        consumer_sync();
        STAMP(4);
        {  // a thread an output of the CTA's share; the weights come as [HD][PR], so a warp reads a row at a time
            const u16* chunk = take(ring);
            if (threadIdx.x < PR) {
                float acc = 0.f;
#pragma unroll 16
                for (int k = 0; k < HD; ++k) acc += bf_lo(chunk[k * PR + threadIdx.x]) * head_out[k];
                store_tagged(head_parts + (long long)head * D + rank * PR + threadIdx.x, acc, tag);
            }
            give_back(ring, lane);
        }
        }  // has_head
        // ln_2's parameters over ln_1's: every warp's norm is behind a consumer_sync by now (the q/k/v push's,
        // or the one after SPREAD_QKV's rows)
        prefetch_params(gs, bs, ln2_w + l * D, ln2_b + l * D);
        STAMP(5);
        // ---- residual + every head's partial (this CTA sums a slice and pushes it to the cluster) ----
        if (threadIdx.x < D / CS) {
            const int c = rank * (D / CS) + threadIdx.x;
            const float value = sum_tagged<NH>(head_parts, c, proj_b[l * D + c], tag, error);
#pragma unroll
            for (int to = 0; to < CS; ++to) push4(delta + c, value, got + 3, to);
        }
        wait_pushes(got + 3, parity);
        for (int c = threadIdx.x; c < D; c += THREADS) hs[c] += delta[c];
        params_arrived();  // ln_2's
        consumer_sync();
        STAMP(6);
#ifdef MMA_ROWS
        {
            norm_shared(hs, gs, bs, xs, red_n, warp, lane);
            STAMPX(0);
#pragma unroll
            for (int c = 0; c < FCU; ++c) {  // chunk c: tiles 2c, 2c + 1, rows 32 c ..
                const u16* chunk = take(ring);
                if (c == 0) STAMPX(1);
                const int tiles = FT16 - 2 * c < 2 ? 1 : 2;
                mma_rows(chunk, tiles, xs, red_rows, warp, lane);
                give_back(ring, lane);
                consumer_sync();
                const int i = 32 * c + threadIdx.x;  // a thread a row
                if (threadIdx.x < 16 * tiles && i < rows) {
                    float acc = warps_sum(red_rows, threadIdx.x) + bf[c];
                    acc = gelu_tanh(acc);
                    hidden[i] = round_bf(acc);
                }
                consumer_sync();  // red_rows read before the next chunk's sums; hidden complete
            }
            STAMPX(2);
        }
#else
        {
            float x[KD * 8];
            normed(hs, gs, bs, xs, red_n, x, warp, lane);
            STAMPX(0);
#pragma unroll
            for (int c = 0; c < FC; ++c) {
                const u16* chunk = take(ring);
                if (c == 0) STAMPX(1);
#pragma unroll
                for (int t = 0; t < FT; ++t) {  // every row computed (past the chunk's end: its first again,
                    const int i = FROW(c, t);   // not stored), so that no branch keeps the rows from overlapping
                    const int row = i < FEND(c) ? i - c * rows / FC : 0;
                    float acc = row_dot(chunk, row, x, lane) + bf[c][t];
                    acc = gelu_tanh(acc);
                    if (lane == 0 && i < FEND(c)) hidden[i] = round_bf(acc);
                }
                give_back(ring, lane);
            }
            STAMPX(2);
        }
#endif
        consumer_sync();
        STAMP(7);

        // ---- this CTA's share of MLP down: every output, over its FR hidden values ----
        {  // a lane's outputs: warp D / WARPS + 4 lane + j (OPL 4) or + lane + 32 j; hidden values in order
            float acc[OPL];
#pragma unroll
            for (int j = 0; j < OPL; ++j) acc[j] = 0.f;
#pragma unroll
            for (int c = 0; c < FC; ++c) {
                const u16* chunk = take(ring);
                for (int k = c * rows / FC; k < FEND(c); ++k) {
                    const float h = hidden[k];
#if OPL == 4  // 4 adjacent outputs a lane, one 8-byte load
                    const uint2 w = *reinterpret_cast<const uint2*>(chunk + (k - c * rows / FC) * D + warp * (D / WARPS) + lane * 4);
                    acc[0] += bf_lo(w.x) * h;
                    acc[1] += bf_hi(w.x) * h;
                    acc[2] += bf_lo(w.y) * h;
                    acc[3] += bf_hi(w.y) * h;
#else
                    const u16* row = chunk + (k - c * rows / FC) * D + warp * (D / WARPS) + lane;
#pragma unroll
                    for (int j = 0; j < OPL; ++j) acc[j] += bf_lo(row[32 * j]) * h;
#endif
                }
                give_back(ring, lane);
            }
#pragma unroll
            for (int j = 0; j < OPL; ++j) down[warp * (D / WARPS) + (OPL == 4 ? lane * 4 + j : lane + 32 * j)] = acc[j];
        }
        STAMP(8);
        consumer_sync();  // down complete; every warp's norm done with gs, bs
        if (threadIdx.x < D / 4) {  // rank `to` gets this CTA's partial of its slice of D / CS columns
            const int to = threadIdx.x / (D / CS / 4), piece = threadIdx.x % (D / CS / 4);
            push16(down_all + rank * (D / CS) + piece * 4, down + to * (D / CS) + piece * 4, got + 2, to);
        }
        prefetch_params(gs, bs, ln1_w + (l + 1) * D, ln1_b + (l + 1) * D);  // ln_f rides as ln_1 of layer NL
        if (l + 1 < NL) {
#pragma unroll
            for (int rr = 0; rr < QT; ++rr)
                bq[rr] = QKV_HAS(rr) ? bf_lo(qkv_b[(long long)(l + 1) * 3 * D + QKV_ROW(rr)]) : 0.f;
#ifdef MMA_ROWS
            bq_row = threadIdx.x < qrows ? bf_lo(qkv_b[(long long)(l + 1) * 3 * D + qfirst + threadIdx.x]) : 0.f;
#endif
        }
        wait_pushes(got + 2, parity);
        // the cluster's partials summed, this CTA a slice of D / CS columns, in rank order
        if (threadIdx.x < D / CS) {
            const int c = rank * (D / CS) + threadIdx.x;
            float sum = 0.f;
#pragma unroll
            for (int r = 0; r < CS; ++r) sum += down_all[r * (D / CS) + threadIdx.x];
            store_tagged(cluster_parts + (long long)(blockIdx.x / CS) * D + c, sum, tag | 1);  // this cluster's row
            STAMP(9);
            // ---- residual + every cluster's partial (a slice, pushed to the cluster) ----
            const float value = sum_tagged<NCL>(cluster_parts, c, out_b[l * D + c], tag | 1, error);
#pragma unroll
            for (int to = 0; to < CS; ++to) push4(delta + c, value, got + 4, to);
        }
        wait_pushes(got + 4, parity);
        for (int c = threadIdx.x; c < D; c += THREADS) hs[c] += delta[c];
        params_arrived();  // ln_1's of the next layer
        consumer_sync();
    }

#ifdef TRACE
    if (threadIdx.x == 0) {
        long long end_time;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(end_time));
        long long* times = trace + (long long)GRID * NL * STAGES + blockIdx.x * 4;
        times[0] = start_clock;
        times[1] = clock64();
        times[2] = start_time;
        times[3] = end_time;
    }
#endif
    if (blockIdx.x == 0 && warp == 0) {
        float x[KD * 8];
        norm_lane(hs, gs, bs, x, lane);
        store_lane_row(out, x, lane);
    }
    if (last_out(sync + 32)) {  // the launch counted: the tags' launch count
        sync[40] += 1;
        __threadfence();
    }
}
