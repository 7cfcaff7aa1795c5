// What the two cached-token kernels share (cluster_decode.cu, the engine's; benchmarks/cuda_decode.cu, a
// prototype): bf16 bit handling, shared-memory addresses and mbarrier waits, the consumer threads'
// barrier, sums across lanes, a warp's layer norm and its row stored as bf16, and the attention item's
// softmax partial. collapse_tui/fast/cluster.py and benchmarks/cuda_decode.py compile it in front of
// either kernel (after the shape's macros, so THREADS is known).

#define HD 64  // GPT-2's head width
#ifndef THREADS
#define THREADS 256
#endif
#define WARPS (THREADS / 32)
#define KD (D / 256)  // 16-byte steps a lane takes through a row of D values (8 values a lane, 32 lanes)
#define SPIN_LIMIT (1 << 20)
#ifndef EPS
#define EPS 1e-5f  // the layer norms' epsilon (GPT-2's)
#endif
#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no math.h

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ float bf_lo(u32 u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf_hi(u32 u) { return __uint_as_float(u & 0xffff0000u); }
__device__ __forceinline__ u32 to_bf(float f) {  // round to nearest even
    u32 u = __float_as_uint(f);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ float round_bf(float f) { return __uint_as_float(to_bf(f) << 16); }
// data this launch wrote on other SMs: from L2, never a stale L1 line
__device__ __forceinline__ uint4 load16_cg(const u16* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ u32 shared_address(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void wait_parity(const unsigned long long* bar, u32 parity) {
    u32 done = 0;
    while (!done)
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done) : "r"(shared_address(bar)), "r"(parity) : "memory");
}
template <int LANES>  // sum across groups of LANES adjacent lanes
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = LANES / 2; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// the layer norm of hs at this lane's elements of a D-row, rounded to bf16 (every warp for itself; KD steps of 8 values a lane)
__device__ __forceinline__ void norm_lane(const float* hs, const float* gs, const float* bs, float* x, int lane) {
    float sum[4] = {0.f, 0.f, 0.f, 0.f};  // four chains, not one
#pragma unroll
    for (int i = 0; i < KD; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            x[i * 8 + j] = hs[i * 256 + lane * 8 + j];
            sum[j & 3] += x[i * 8 + j];
        }
    const float mean = group_sum<32>((sum[0] + sum[1]) + (sum[2] + sum[3])) / D;
    float sq[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < KD * 8; ++i) {
        x[i] -= mean;
        sq[i & 3] += x[i] * x[i];
    }
    const float rstd = rsqrtf(group_sum<32>((sq[0] + sq[1]) + (sq[2] + sq[3])) / D + EPS);
#pragma unroll
    for (int i = 0; i < KD; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int c = i * 256 + lane * 8 + j;
            x[i * 8 + j] = round_bf(x[i * 8 + j] * rstd * gs[c] + bs[c]);
        }
}
// GPT-2's GELU (the tanh form), as x sigmoid(2u): one exponential
__device__ __forceinline__ float gelu_tanh(float x) {
    const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.f + __expf(-2.f * inner));
}
// a row a warp holds, lane by lane (x: the lane's elements 256 i + 8 lane + j), into out as bf16
__device__ __forceinline__ void store_lane_row(u16* out, const float* x, int lane) {
#pragma unroll
    for (int i = 0; i < KD; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) out[i * 256 + lane * 8 + j] = (u16)to_bf(x[i * 8 + j]);
}
// the consumer threads meet (named barrier 1: the producer warp is not among them)
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;" ::"n"(THREADS) : "memory"); }

// After the consumers' sync: true in thread 0 of the last CTA to get here, which then does what the
// next launch needs (the count of CTAs out, `gone`, is zeroed for it here).
__device__ __forceinline__ bool last_out(int* gone) {
    consumer_sync();
    if (threadIdx.x != 0 || atomicAdd(gone, 1) != (int)gridDim.x - 1) return false;
    *gone = 0;
    return true;
}

// An attention item's softmax partial. Each warp holds P passes of 4 keys (8 lanes a key, 8 dimensions
// a lane: lane = 8 kk + dg): scores s (NEG_INF where there is no key), the warp's max m so far, the
// keys' values vr. The exp-weighted values and the weights are summed over the warp, then over the
// CTA's warps (through red_*). Threads below HD get their dimension's sum oo, the max mm and the
// weights' sum ll (mm = NEG_INF: no key at all). Every consumer thread must call it (it syncs).
template <int P>
__device__ __forceinline__ void softmax_partial(const float* s, float m, const uint4* vr, int warp, int kk, int dg,
                                                float* red_m, float* red_l, float (*red_o)[HD], float& mm, float& ll,
                                                float& oo) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
    float lsum = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int p = 0; p < P; ++p) {
        if (s[p] != NEG_INF) {  // masked keys' registers were never loaded
            const float e = __expf(s[p] - m);
            lsum += e;
            const u32 v[4] = {vr[p].x, vr[p].y, vr[p].z, vr[p].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                o[2 * j] += e * bf_lo(v[j]);
                o[2 * j + 1] += e * bf_hi(v[j]);
            }
        }
    }
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 8);
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 16);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        o[j] += __shfl_xor_sync(0xffffffffu, o[j], 8);
        o[j] += __shfl_xor_sync(0xffffffffu, o[j], 16);
    }
    if (kk == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) red_o[warp][dg * 8 + j] = o[j];
        if (dg == 0) {
            red_m[warp] = m;
            red_l[warp] = lsum;
        }
    }
    consumer_sync();
    mm = NEG_INF, ll = 0.f, oo = 0.f;
    if (threadIdx.x < HD) {
        for (int w = 0; w < WARPS; ++w) mm = fmaxf(mm, red_m[w]);
        if (mm != NEG_INF)
            for (int w = 0; w < WARPS; ++w)
                if (red_m[w] != NEG_INF) {
                    const float f = __expf(red_m[w] - mm);
                    ll += red_l[w] * f;
                    oo += red_o[w][threadIdx.x] * f;
                }
    }
}
