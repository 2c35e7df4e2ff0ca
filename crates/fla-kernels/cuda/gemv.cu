// y = x·Wᵀ for a few rows of x (decode): x [M, K], W [N, K] row-major (a Linear weight), y [M, N],
// all three in one dtype (f32, bf16 or f16), f32 accumulation, 1 <= M <= 8. Launched from
// fla-nn/src/matmul.rs (`matmul_t`), which sends anything else to cuBLAS.
//
// The product is bound by streaming W once from HBM, so everything is shaped for bandwidth:
//
// - A warp owns a tile of 8 rows of W and a slice of K. Lane (g = lane / 4, t = lane % 4) reads
//   row g of the tile in 16-byte vectors: at each step the four lanes of a row read 64 contiguous
//   bytes (two full sectors), and U = 8 (or 16) steps are issued before any is used, so a thread
//   has eight (sixteen) 16-byte loads of W in flight. W loads bypass L1
//   (`ld.global.nc.L1::no_allocate`), ask L2 to fetch the whole 256-byte block (the next steps
//   of the row hit it) and are marked evict-first (the weights do not fit L2 anyway; the
//   activations should stay).
// - x is tiny and read through L1 with the same 16-byte vectors (lane (g, t) reads row g of x at
//   the same K position as its W vector).
// - bf16 / f16: the products run on tensor cores. With A = x (rows m = g, the upper 8 rows zero)
//   and B = Wᵀ (column n = g), one m16n8k16 `mma` per 8-byte half of the lane's vectors: the A and
//   B fragments of lane (g, t) both cover the logical k slots {2t, 2t+1, 2t+8, 2t+9}, and a dot
//   product does not care which physical k a slot stands for, as long as A and B agree. So the
//   16-byte vectors feed the mma as loaded: no conversion, no shuffle, two `mma` per vector, and
//   any M up to 8 costs the same. The accumulator holds y[m = g][n = 2t, 2t + 1] of the tile.
// - f32: FMAs with one f32 accumulator per row of x (TF32 would not hold f32 accuracy), reduced
//   over the four lanes of a row by shuffles.
// - A CTA is GEMV_WARPS = 8 warps = 8 / S tiles, each split over S warps along K (S = 1, 2, 4, 8,
//   chosen by the launcher so that even N = 1024 gives every SM a CTA); the S partial tiles are
//   summed in shared memory and written once.
// - K must be a multiple of one vector (8 bf16 / f16, 4 f32) and x, W 16-byte aligned; the
//   launcher checks. Ragged ends (K not a multiple of 32 vectors, N not a multiple of 8, a split
//   shorter than the unroll) are predicated loads of zeros. Row offsets are 64-bit.
#include "common/dtype.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"

#define GEMV_WARPS 8
#define GEMV_MAX_M 8

// Most norm groups per row of x of the norm prologue.
#define GEMV_MAX_GROUPS 64

// Keep in sync with `GemvParams` in fla-nn/src/matmul.rs (repr(C)).
struct GemvParams {
    const void* x; // [m, k] (the swiglu prologue: [m, 2k], gate | up)
    const void* w; // [n, k]
    void* y;       // [m, n]
    // The norm prologue (mode 2): x (+ res, rounded to the dtype) normalised over groups of
    // `group` columns, times (offset + nw[col % group]), times act(z) when gated, rounded.
    const void* res;  // [m, k] or null
    void* x_out;      // [m, k]: x + res, written by CTA 0 (with res)
    const float* nw;  // [group]
    const void* z;    // gate: row r at r * ld_z (dtype of x), or null
    int n, k, m;   // k a multiple of the vector (16 bytes), 1 <= m <= GEMV_MAX_M
    int splits;    // warps per tile along K: 1, 2, 4 or 8
    int mode;      // the entry's prologue (0: x as is; 1: silu(gate) * up; 2: the norm), unused
    int group, ld_z, gate;  // gate: 1 silu(z), 2 sigmoid(z)
    float eps, offset;
};

// An L2 cache policy that evicts first what it marks (the streamed weights).
__device__ __forceinline__ unsigned long long gemv_evict_first() {
    unsigned long long policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

// 16 bytes of W: streamed once, so not kept in L1, the 256-byte block prefetched into L2, and
// marked by `policy` (evict first).
__device__ __forceinline__ uint4 gemv_ld_w(const uint4* p, unsigned long long policy) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "l"(policy));
    return v;
}

// 16 bytes of x (read by every tile: kept in L1).
__device__ __forceinline__ uint4 gemv_ld_x(const uint4* p) { return __ldg(p); }

// c += a b (m16n8k16) in the 16-bit dtype DT.
template <int DT>
__device__ __forceinline__ void gemv_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if constexpr (DT == FLA_BF16) fla_mma<FlaBf16>(c, a, b0, b1);
    else fla_mma<FlaF16>(c, a, b0, b1);
}

// The VEC elements of a 16-byte vector in dtype DT, as f32, and back (rounded to nearest even).
template <int DT>
__device__ __forceinline__ void gemv_unpack(uint4 v, float (&e)[DT == FLA_F32 ? 4 : 8]) {
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if constexpr (DT == FLA_F32) {
            e[j] = __uint_as_float(u[j]);
        } else {
            e[2 * j] = DT == FLA_BF16 ? fla_bf16_to_f32(u[j] & 0xffffu) : fla_f16_to_f32(u[j] & 0xffffu);
            e[2 * j + 1] = DT == FLA_BF16 ? fla_bf16_to_f32(u[j] >> 16) : fla_f16_to_f32(u[j] >> 16);
        }
    }
}
template <int DT>
__device__ __forceinline__ uint4 gemv_pack(const float (&e)[DT == FLA_F32 ? 4 : 8]) {
    unsigned u[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if constexpr (DT == FLA_F32) {
            u[j] = __float_as_uint(e[j]);
        } else {
            const unsigned lo = DT == FLA_BF16 ? fla_f32_to_bf16(e[2 * j]) : fla_f32_to_f16(e[2 * j]);
            const unsigned hi = DT == FLA_BF16 ? fla_f32_to_bf16(e[2 * j + 1]) : fla_f32_to_f16(e[2 * j + 1]);
            u[j] = lo | (hi << 16);
        }
    }
    return make_uint4(u[0], u[1], u[2], u[3]);
}

// The 16-byte vector at element `off` of `p` (16-byte aligned: the launcher checks).
__device__ __forceinline__ uint4 gemv_vec(const void* p, long long off, int elem) {
    return __ldg(reinterpret_cast<const uint4*>(static_cast<const char*>(p) + off * elem));
}

// Vector `v` of row m of x after the prologue (MODE 1: silu(gate) * up; MODE 2: the norm, with
// the scales `rs` of gemv_norm_scales), rounded to the dtype as the prologue's own kernel stores it.
template <int DT, int MODE>
__device__ __forceinline__ uint4 gemv_x(const GemvParams& p, const float* rs, int m, int v) {
    constexpr int VEC = DT == FLA_F32 ? 4 : 8, ELEM = DT == FLA_F32 ? 4 : 2;
    const int k0 = v * VEC;
    float e[VEC];
    if constexpr (MODE == 1) {
        float u[VEC];
        const long long b = (long long)m * 2 * p.k + k0;
        gemv_unpack<DT>(gemv_vec(p.x, b, ELEM), e);
        gemv_unpack<DT>(gemv_vec(p.x, b + p.k, ELEM), u);
#pragma unroll
        for (int j = 0; j < VEC; ++j) e[j] = e[j] * fla_sigmoidf(e[j]) * u[j];
    } else {
        const long long b = (long long)m * p.k + k0;
        gemv_unpack<DT>(gemv_vec(p.x, b, ELEM), e);
        if (p.res) {
            float r[VEC];
            gemv_unpack<DT>(gemv_vec(p.res, b, ELEM), r);
#pragma unroll
            for (int j = 0; j < VEC; ++j) e[j] = fla_round(DT, e[j] + r[j]);
        }
        const float sc = rs[m * GEMV_MAX_GROUPS + k0 / p.group];
        const float4* nw = reinterpret_cast<const float4*>(p.nw + k0 % p.group);
        float z[VEC];
        if (p.gate) gemv_unpack<DT>(gemv_vec(p.z, (long long)m * p.ld_z + k0, ELEM), z);
#pragma unroll
        for (int q = 0; q < VEC / 4; ++q) {
            const float4 w4 = __ldg(nw + q);
            const float w[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float y = e[4 * q + j] * sc * (p.offset + w[j]);
                if (p.gate) {
                    const float zz = z[4 * q + j];
                    y *= p.gate == 1 ? zz * fla_sigmoidf(zz) : fla_sigmoidf(zz);
                }
                e[4 * q + j] = y;
            }
        }
    }
    return gemv_pack<DT>(e);
}

// The norm prologue's first pass: rs[m][g] = rsqrt(mean over group g of row m of (x + res)^2 +
// eps), a warp per (row, group) reading 16-byte vectors; CTA 0 also writes x + res to x_out.
template <int DT>
__device__ __forceinline__ void gemv_norm_scales(const GemvParams& p, float* rs) {
    constexpr int VEC = DT == FLA_F32 ? 4 : 8, ELEM = DT == FLA_F32 ? 4 : 2;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int groups = p.k / p.group, gv = p.group / VEC;
    for (int q = warp; q < p.m * groups; q += GEMV_WARPS) {
        const long long b = (long long)(q / groups) * p.k + (long long)(q % groups) * p.group;
        float ss = 0.0f;
#pragma unroll 4
        for (int v = lane; v < gv; v += 32) {
            float e[VEC];
            gemv_unpack<DT>(gemv_vec(p.x, b + v * VEC, ELEM), e);
            if (p.res) {
                float r[VEC];
                gemv_unpack<DT>(gemv_vec(p.res, b + v * VEC, ELEM), r);
#pragma unroll
                for (int j = 0; j < VEC; ++j) e[j] = fla_round(DT, e[j] + r[j]);
                if (blockIdx.x == 0) {
                    *reinterpret_cast<uint4*>(static_cast<char*>(p.x_out) + (b + v * VEC) * ELEM) = gemv_pack<DT>(e);
                }
            }
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss += e[j] * e[j];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) rs[(q / groups) * GEMV_MAX_GROUPS + q % groups] = rsqrtf(ss / p.group + p.eps);
    }
    __syncthreads();
}

// DT: the dtype; U: steps whose loads are issued together.
template <int DT, int U, int MODE>
__device__ __forceinline__ void gemv(const GemvParams& p) {
    __shared__ float red[GEMV_WARPS][64]; // partial tile of each warp: [m][n], 8 x 8
    __shared__ float rs[GEMV_MAX_M * GEMV_MAX_GROUPS]; // the norm prologue's scales
    extern __shared__ uint4 xs[];                       // a prologue's x: [m][k / VEC] vectors
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int S = p.splits, tiles_per_cta = GEMV_WARPS / S;
    const int split = warp % S;
    const long long tile = (long long)blockIdx.x * tiles_per_cta + warp / S;
    const long long row = tile * 8 + g;
    const bool row_ok = row < p.n;
    // K in 16-byte vectors, in steps of 4 vectors (the four lanes of a row), split in S slices.
    constexpr int VEC = DT == FLA_F32 ? 4 : 8;
    const int kv = p.k / VEC;
    const int steps = (kv + 3) >> 2;
    const int per = (steps + S - 1) / S;
    const int s0 = split * per, s1 = min(steps, s0 + per);
    const uint4* w = static_cast<const uint4*>(p.w) + (row_ok ? row : 0) * (long long)kv;
    const unsigned long long policy = gemv_evict_first();
    // A prologue computes x once per CTA into shared memory; the loop then reads it from there.
    if constexpr (MODE != 0) {
        if constexpr (MODE == 2) gemv_norm_scales<DT>(p, rs);
        for (int i = threadIdx.x; i < p.m * kv; i += 32 * GEMV_WARPS) xs[i] = gemv_x<DT, MODE>(p, rs, i / kv, i % kv);
        __syncthreads();
    }

    // This warp's partial tile, P[m][n] over its slice of K.
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}; // 16-bit: y[g][2t], y[g][2t + 1] (c[2], c[3] unused)
    float acc[GEMV_MAX_M];                 // f32: y[m][g], this lane's part
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = 0.0f;

    for (int st0 = s0; st0 < s1; st0 += U) {
        uint4 wv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = (st0 + u) * 4 + t;
            wv[u] = make_uint4(0, 0, 0, 0);
            if (row_ok && st0 + u < s1 && v < kv) wv[u] = gemv_ld_w(w + v, policy);
        }
        if constexpr (DT == FLA_F32) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = (st0 + u) * 4 + t;
                if (st0 + u < s1 && v < kv) {
                    const float w0 = __uint_as_float(wv[u].x), w1 = __uint_as_float(wv[u].y),
                                w2 = __uint_as_float(wv[u].z), w3 = __uint_as_float(wv[u].w);
#pragma unroll
                    for (int m = 0; m < GEMV_MAX_M; ++m) {
                        if (m < p.m) {
                            const uint4 xv = (MODE == 0 ? gemv_ld_x(static_cast<const uint4*>(p.x) + (long long)m * kv + v) : xs[m * kv + v]);
                            acc[m] = fmaf(__uint_as_float(xv.x), w0, acc[m]);
                            acc[m] = fmaf(__uint_as_float(xv.y), w1, acc[m]);
                            acc[m] = fmaf(__uint_as_float(xv.z), w2, acc[m]);
                            acc[m] = fmaf(__uint_as_float(xv.w), w3, acc[m]);
                        }
                    }
                }
            }
        } else {
            uint4 xv[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = (st0 + u) * 4 + t;
                xv[u] = make_uint4(0, 0, 0, 0);
                if (g < p.m && st0 + u < s1 && v < kv) xv[u] = (MODE == 0 ? gemv_ld_x(static_cast<const uint4*>(p.x) + (long long)g * kv + v) : xs[g * kv + v]);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const unsigned a0[4] = {xv[u].x, 0u, xv[u].y, 0u};
                gemv_mma<DT>(c, a0, wv[u].x, wv[u].y);
                const unsigned a1[4] = {xv[u].z, 0u, xv[u].w, 0u};
                gemv_mma<DT>(c, a1, wv[u].z, wv[u].w);
            }
        }
    }

    if constexpr (DT == FLA_F32) {
        // Sum the four lanes of each row; lane t then writes y[m][g] for m = t and t + 4.
#pragma unroll
        for (int m = 0; m < GEMV_MAX_M; ++m) {
            acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], 1);
            acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], 2);
        }
        red[warp][t * 8 + g] = t == 0 ? acc[0] : t == 1 ? acc[1] : t == 2 ? acc[2] : acc[3];
        red[warp][(t + 4) * 8 + g] = t == 0 ? acc[4] : t == 1 ? acc[5] : t == 2 ? acc[6] : acc[7];
    } else {
        red[warp][g * 8 + 2 * t] = c[0];
        red[warp][g * 8 + 2 * t + 1] = c[1];
    }
    __syncthreads();

    // The S partial tiles of each tile summed, y[m][n] written for m < M, n < N.
    for (int e = threadIdx.x; e < tiles_per_cta * 64; e += 32 * GEMV_WARPS) {
        const int j = e >> 6, mn = e & 63, m = mn >> 3;
        const long long n = ((long long)blockIdx.x * tiles_per_cta + j) * 8 + (mn & 7);
        if (m < p.m && n < p.n) {
            float s = 0.0f;
            for (int i = 0; i < S; ++i) s += red[j * S + i][mn];
            fla_st<DT>(p.y, (long long)m * p.n + n, s);
        }
    }
}

// Entries `gemv_<dtype>_u<U>` (x as is), `gemv_<dtype>_glu_u<U>` (the SwiGLU prologue) and
// `gemv_<dtype>_norm_u<U>` (the norm prologue; both stage x in dynamic shared memory). U = 8 for most shapes (at most 85 registers: three CTAs
// an SM; f32, two). U = 16, bf16 / f16 only, for grids of at most one CTA per SM whose warps have
// more than 8 steps (N = 1024, K = 3584): one CTA an SM, sixteen loads of W in flight per thread.
// The prologue entries with U = 8 run two CTAs an SM (up to 95 registers).
#define GEMV_ENTRY(NAME, DT, U, MODE, MIN_CTAS)                                               \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS, MIN_CTAS)                     \
        gemv_##NAME(const GemvParams p) {                                                       \
        gemv<DT, U, MODE>(p);                                                                   \
    }
GEMV_ENTRY(f32_u8, FLA_F32, 8, 0, 2)
GEMV_ENTRY(bf16_u8, FLA_BF16, 8, 0, 3)
GEMV_ENTRY(f16_u8, FLA_F16, 8, 0, 3)
GEMV_ENTRY(bf16_u16, FLA_BF16, 16, 0, 1)
GEMV_ENTRY(f16_u16, FLA_F16, 16, 0, 1)
GEMV_ENTRY(f32_glu_u8, FLA_F32, 8, 1, 2)
GEMV_ENTRY(bf16_glu_u8, FLA_BF16, 8, 1, 2)
GEMV_ENTRY(f16_glu_u8, FLA_F16, 8, 1, 2)
GEMV_ENTRY(bf16_glu_u16, FLA_BF16, 16, 1, 1)
GEMV_ENTRY(f16_glu_u16, FLA_F16, 16, 1, 1)
GEMV_ENTRY(f32_norm_u8, FLA_F32, 8, 2, 2)
GEMV_ENTRY(bf16_norm_u8, FLA_BF16, 8, 2, 2)
GEMV_ENTRY(f16_norm_u8, FLA_F16, 8, 2, 2)
GEMV_ENTRY(bf16_norm_u16, FLA_BF16, 16, 2, 1)
GEMV_ENTRY(f16_norm_u16, FLA_F16, 16, 2, 1)
