// Row-wise and elementwise kernels of the model layers (fla-nn/src/cuda.rs launches them; the CPU
// twins are fla-nn/src/ops.rs and conv.rs): RMSNorm (plain, 1 + w, gated by SiLU or sigmoid, with
// the residual add fused in front), the depthwise causal short convolution with SiLU and its
// cache, SiLU(gate) * up, column splits and row copies, the latent cache append of multi-head
// latent attention (fla-nn/src/mla.rs). Activations in
// f32, bf16 or f16 (read and written in that dtype, f32 arithmetic), weights and caches in f32.
#include "common/dtype.cuh"
#include "common/math.cuh"

// Keep in sync with `SplitOut` in fla-nn/src/cuda.rs (repr(C)). Up to three contiguous outputs
// that split the `c` columns of a row: columns [0, c1) go to y[0] ([rows, c1]), [c1, c2) to y[1]
// ([rows, c2 - c1]), [c2, c) to y[2] ([rows, c - c2]); unused outputs have zero width.
struct SplitOut {
    void* y[3];
    int c1, c2;
};

// Stores v as column `col` of row `row` of the split of `c` columns.
__device__ __forceinline__ void split_store(const SplitOut& s, int dtype, int c, long long row, int col, float v) {
    if (col < s.c1) {
        fla_store(s.y[0], dtype, row * s.c1 + col, v);
    } else if (col < s.c2) {
        fla_store(s.y[1], dtype, row * (s.c2 - s.c1) + col - s.c1, v);
    } else {
        fla_store(s.y[2], dtype, row * (c - s.c2) + col - s.c2, v);
    }
}

// Keep in sync with `NormParams` in fla-nn/src/cuda.rs (repr(C)).
struct NormParams {
    const void* x;   // [rows, dim]; with `res`, the residual stream, updated in place
    const float* w;  // [dim]
    const void* z;   // gate input, or null: row r at (r / z_group) ld_z + (r % z_group) dim
    void* y;         // [rows, dim], dtype of x
    const void* res; // [rows, dim] added into x first (x += res, rounded to the dtype), or null
    int dtype, rows, dim;
    int gate;        // 0: none, 1: silu(z), 2: sigmoid(z)
    float eps, offset;
    int ld_z, z_group; // z's row stride, rows of x per row of z (dim and 1: z shaped like x)
};

// One CTA (128 threads) per row: [x += res, then] y = x rsqrt(mean(x^2) + eps) (offset + w)
// [act(z)], for rows of up to 128 PER elements. The dtype DT is a template parameter and the row
// stays in registers between the two passes, all of a thread's loads issued before its first
// store, so a short row costs a few memory latencies, not one per element (a 1024-wide row took
// 5.7 us when each element was stored and read back in turn). The norm sees x rounded to its
// dtype, as the layers' residual stream holds it.
template <int DT, int PER>
__device__ __forceinline__ void rms_norm(const NormParams& p) {
    __shared__ float part[4];
    const long long base = (long long)blockIdx.x * p.dim;
    float v[PER];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c = threadIdx.x + i * 128;
        v[i] = 0.0f;
        if (c < p.dim) {
            v[i] = fla_ld<DT>(p.x, base + c);
            if (p.res) v[i] = fla_round(DT, v[i] + fla_ld<DT>(p.res, base + c));
        }
        ss += v[i] * v[i];
    }
    if (p.res) {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int c = threadIdx.x + i * 128;
            if (c < p.dim) fla_st<DT>(const_cast<void*>(p.x), base + c, v[i]);
        }
    }
    float unused = 0.0f;
    fla_warp_sum2(ss, unused);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    const float r = rsqrtf((part[0] + part[1] + part[2] + part[3]) / p.dim + p.eps);
    const long long zbase = (long long)(blockIdx.x / p.z_group) * p.ld_z + (long long)(blockIdx.x % p.z_group) * p.dim;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c = threadIdx.x + i * 128;
        if (c < p.dim) {
            float y = v[i] * r * (p.offset + p.w[c]);
            if (p.gate) {
                const float z = fla_ld<DT>(p.z, zbase + c);
                y *= p.gate == 1 ? z * fla_sigmoidf(z) : fla_sigmoidf(z);
            }
            fla_st<DT>(p.y, base + c, y);
        }
    }
}

// nn_rms_norm_<dtype>_<PER>: rows of up to 128 PER elements (the launcher picks the smallest PER).
#define FLA_RMS_NORM(NAME, DT, PER) \
    extern "C" __global__ void __launch_bounds__(128) nn_rms_norm_##NAME##_##PER(const NormParams p) { rms_norm<DT, PER>(p); }
#define FLA_RMS_NORM_DT(NAME, DT) \
    FLA_RMS_NORM(NAME, DT, 1) FLA_RMS_NORM(NAME, DT, 2) FLA_RMS_NORM(NAME, DT, 4) FLA_RMS_NORM(NAME, DT, 8) \
    FLA_RMS_NORM(NAME, DT, 16) FLA_RMS_NORM(NAME, DT, 32) FLA_RMS_NORM(NAME, DT, 64)
FLA_RMS_NORM_DT(f32, FLA_F32)
FLA_RMS_NORM_DT(bf16, FLA_BF16)
FLA_RMS_NORM_DT(f16, FLA_F16)

// Keep in sync with `ConvParams` in fla-nn/src/cuda.rs (repr(C)).
struct ConvParams {
    const void* x;          // [tokens, ld_x]: the input is the first C columns of each row
    const float* weight;    // [C, W]
    float* state;           // [N, C, W]: the last W inputs of each sequence, oldest first;
                            // read by nn_short_conv_w*, then updated in place by nn_short_conv_state
    SplitOut y;             // the C output channels, dtype of x
    const int* cu_seqlens;  // [N + 1]
    const int* seq_of;      // [tokens]: the sequence of each token
    int dtype, tokens, n, c, w, ld_x;  // w: the kernel width W
    int state_in_conv;      // 1: every sequence lies in one run of FLA_CONV_TOKENS tokens, so
                            // nn_short_conv_w* writes the new cache itself (no state kernel)
};

// The input at position k of sequence n (k < 0: from the cache, k = -W .. -1), channel ch.
__device__ __forceinline__ float conv_input(const ConvParams& p, int n, int start, int k, int ch) {
    return k >= 0 ? fla_load(p.x, p.dtype, (long long)(start + k) * p.ld_x + ch)
                  : p.state[((long long)n * p.c + ch) * p.w + p.w + k];
}

// The widest convolution kernel (taps) with an `nn_short_conv_w*` instance.
#define FLA_MAX_CONV 8

// Tokens per thread of the short convolution.
#define FLA_CONV_TOKENS 16

// A thread per (channel, run of FLA_CONV_TOKENS tokens): y_t = silu(sum_j w_j x_{t - W + 1 + j}),
// the inputs before a sequence's first token from its cache. The W taps and the last W inputs
// stay in registers (W is a template parameter), so each input is loaded once; a warp covers 32
// consecutive channels of one token, so the loads are coalesced. The window is refilled where
// the run starts and where a new sequence starts.
template <int W>
__device__ __forceinline__ void short_conv(const ConvParams& p) {
    const int ch = blockIdx.x * 256 + threadIdx.x;
    if (ch >= p.c) return;
    const int t0 = blockIdx.y * FLA_CONV_TOKENS, t1 = min(t0 + FLA_CONV_TOKENS, p.tokens);
    float w[W], win[W];
#pragma unroll
    for (int j = 0; j < W; ++j) w[j] = p.weight[(long long)ch * W + j];
    int n = -1;
    for (int t = t0; t < t1; ++t) {
        const int nt = p.seq_of[t];
        if (nt != n) {
            n = nt;
            const int start = p.cu_seqlens[n];
#pragma unroll
            for (int j = 0; j < W - 1; ++j) win[j] = conv_input(p, n, start, t - start - (W - 1) + j, ch);
        } else {
#pragma unroll
            for (int j = 0; j < W - 1; ++j) win[j] = win[j + 1];
        }
        win[W - 1] = fla_load(p.x, p.dtype, (long long)t * p.ld_x + ch);
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < W; ++j) acc += w[j] * win[j];
        split_store(p.y, p.dtype, p.c, t, ch, acc * fla_sigmoidf(acc));
        // The sequence's last token, its whole window read by this thread alone: the new cache.
        if (p.state_in_conv && t == p.cu_seqlens[n + 1] - 1) {
#pragma unroll
            for (int j = 0; j < W; ++j) p.state[((long long)n * p.c + ch) * W + j] = win[j];
        }
    }
}

#define FLA_SHORT_CONV(W) \
    extern "C" __global__ void __launch_bounds__(256) nn_short_conv_w##W(const ConvParams p) { short_conv<W>(p); }
FLA_SHORT_CONV(1)
FLA_SHORT_CONV(2)
FLA_SHORT_CONV(3)
FLA_SHORT_CONV(4)
FLA_SHORT_CONV(5)
FLA_SHORT_CONV(6)
FLA_SHORT_CONV(7)
FLA_SHORT_CONV(8)

// A thread per (sequence, channel): the new cache, the last W inputs of the sequence, written in
// place over the old one (which the convolution kernel, launched before, has read). Input j of
// the new window is the old window's element len + j when len + j < W, so each thread reads all
// W before it writes any.
extern "C" __global__ void __launch_bounds__(256) nn_short_conv_state(const ConvParams p) {
    const long long e = (long long)blockIdx.x * 256 + threadIdx.x;
    if (e >= (long long)p.n * p.c) return;
    const int n = (int)(e / p.c), ch = (int)(e % p.c);
    const int start = p.cu_seqlens[n], len = p.cu_seqlens[n + 1] - start;
    float win[FLA_MAX_CONV];
#pragma unroll
    for (int j = 0; j < FLA_MAX_CONV; ++j) {
        if (j < p.w) win[j] = conv_input(p, n, start, len + j - p.w, ch);
    }
#pragma unroll
    for (int j = 0; j < FLA_MAX_CONV; ++j) {
        if (j < p.w) p.state[e * p.w + j] = win[j];
    }
}

// Keep in sync with `GluParams` in fla-nn/src/cuda.rs (repr(C)).
struct GluParams {
    const void* ab;  // [n / half, 2 half]: gate | up in each row
    void* y;         // [n / half, half], dtype of ab
    int dtype;
    long long n, half;
};

// y = silu(a) b for the two halves a | b of each row of the fused gate | up product (the SwiGLU
// MLP), a thread per output element.
extern "C" __global__ void __launch_bounds__(256) nn_swiglu(const GluParams p) {
    const long long e = (long long)blockIdx.x * 256 + threadIdx.x;
    if (e >= p.n) return;
    const long long ia = e / p.half * 2 * p.half + e % p.half;
    const float a = fla_load(p.ab, p.dtype, ia);
    fla_store(p.y, p.dtype, e, a * fla_sigmoidf(a) * fla_load(p.ab, p.dtype, ia + p.half));
}

// Keep in sync with `ColsParams` in fla-nn/src/cuda.rs (repr(C)).
struct ColsParams {
    const void* x;  // [rows, cols]
    SplitOut y;     // columns start .. start + len of x, split
    int dtype, rows, cols, start, len;
};

// A thread per copied element.
extern "C" __global__ void __launch_bounds__(256) nn_split_cols(const ColsParams p) {
    const long long e = (long long)blockIdx.x * 256 + threadIdx.x;
    if (e >= (long long)p.rows * p.len) return;
    const long long r = e / p.len;
    const int c = (int)(e % p.len);
    split_store(p.y, p.dtype, p.len, r, c, fla_load(p.x, p.dtype, r * p.cols + p.start + c));
}

// Keep in sync with `PoolParams` in fla-nn/src/cuda.rs (repr(C)).
struct PoolParams {
    const void* src;  // [N, cap_old, width]
    void* dst;        // [N, cap_new, width]
    int dtype, n, cap_old, cap_new, width, rows;  // rows: the leading rows of each sequence to copy
};

// Grows a cache: the first `rows` rows of each sequence, a thread per element.
extern "C" __global__ void __launch_bounds__(256) nn_copy_pool(const PoolParams p) {
    const long long e = (long long)blockIdx.x * 256 + threadIdx.x;
    const long long per = (long long)p.rows * p.width;
    if (e >= p.n * per) return;
    const long long n = e / per, r = e % per;
    fla_store(p.dst, p.dtype, n * p.cap_new * p.width + r, fla_load(p.src, p.dtype, n * p.cap_old * p.width + r));
}

// Keep in sync with `RowsParams` in fla-nn/src/cuda.rs (repr(C)).
struct RowsParams {
    const void* x;     // gather: [*, width] source; scatter: [n, width] rows to add
    void* y;           // gather: [n, width]; scatter: [*, width] accumulated in place
    const int* rows;   // [n] row indices into the [*, width] side, or null for 0 .. n - 1
    const float* w;    // [n] row weights, or null for 1
    const void* gate;  // [n] per-row gate inputs (dtype), weight times sigmoid(gate), or null
    int dtype, n, width;
};

// y[i] = x[rows[i]], a thread per element (the tokens routed to one expert).
extern "C" __global__ void __launch_bounds__(256) nn_gather_rows(const RowsParams p) {
    const long long e = (long long)blockIdx.x * 256 + threadIdx.x;
    if (e >= (long long)p.n * p.width) return;
    const long long i = e / p.width, c = e % p.width;
    fla_store(p.y, p.dtype, e, fla_load(p.x, p.dtype, (long long)p.rows[i] * p.width + c));
}

// y[rows[i]] += w[i] sigmoid(gate[i]) x[i], a thread per element; the rows must be distinct
// (one expert's tokens), so no two threads add to the same element.
extern "C" __global__ void __launch_bounds__(256) nn_scatter_add_rows(const RowsParams p) {
    const long long e = (long long)blockIdx.x * 256 + threadIdx.x;
    if (e >= (long long)p.n * p.width) return;
    const long long i = e / p.width, c = e % p.width;
    float s = p.w ? p.w[i] : 1.0f;
    if (p.gate) s *= fla_sigmoidf(fla_load(p.gate, p.dtype, i));
    const long long d = (p.rows ? (long long)p.rows[i] : i) * p.width + c;
    fla_store(p.y, p.dtype, d, fla_load(p.y, p.dtype, d) + s * fla_load(p.x, p.dtype, e));
}

// Keep in sync with `MlaAppendParams` in fla-nn/src/cuda.rs (repr(C)).
struct MlaAppendParams {
    const void* kva;     // [tokens, r + rope]: kv_a_proj_with_mqa output, c | k_pe
    const float* w;      // [r]: kv_a_layernorm
    void* pool;          // [N, cap, r + rope]: the latent cache, dtype of kva
    const int* seq_of;   // [tokens]: the sequence of each token
    const int* pos;      // [tokens]: its position (cached tokens before it included)
    int dtype, tokens, r, rope, cap;
    float eps;
};

// One CTA (128 threads) per token: the row c rsqrt(mean(c^2) + eps) w | k_pe into the pool at
// the token's sequence and position (plain RMSNorm of c, k_pe as it is).
extern "C" __global__ void __launch_bounds__(128) nn_mla_append(const MlaAppendParams p) {
    __shared__ float part[4];
    const int t = blockIdx.x, lat = p.r + p.rope;
    const long long src = (long long)t * lat;
    const long long dst = ((long long)p.seq_of[t] * p.cap + p.pos[t]) * lat;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < p.r; c += 128) {
        const float v = fla_load(p.kva, p.dtype, src + c);
        ss += v * v;
    }
    float unused = 0.0f;
    fla_warp_sum2(ss, unused);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    const float rs = rsqrtf((part[0] + part[1] + part[2] + part[3]) / p.r + p.eps);
    for (int c = threadIdx.x; c < lat; c += 128) {
        const float v = fla_load(p.kva, p.dtype, src + c);
        fla_store(p.pool, p.dtype, dst + c, c < p.r ? v * rs * p.w[c] : v);
    }
}
