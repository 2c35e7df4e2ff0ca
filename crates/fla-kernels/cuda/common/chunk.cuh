// Parameters and small helpers shared by the chunk kernels (chunk_gdn.cu: f32 scalar path;
// chunk_gdn_tc.cu: tensor-core path for 16-bit inputs).
#pragma once
#include "common/dtype.cuh"
#include "common/math.cuh"

#define FLA_C 64  // chunk length

// Keep in sync with `ChunkParams` in fla-ops/src/cuda.rs (repr(C)).
struct ChunkParams {
    const void* q;        // [tokens, H, K]
    const void* k;        // [tokens, H, K]
    const void* v;        // [tokens, HV, V]
    const void* g;        // [tokens, HV] (raw gate input with use_gate); null: no decay (DeltaNet)
    const void* beta;     // [tokens, HV]
    const void* a_log;    // [HV] (use_gate) or null
    const void* dt_bias;  // [HV] (use_gate) or null
    const float* h0;      // [N, HV, K, V] or null
    void* o;              // [tokens, HV, V], dtype of q
    float* ht;            // [N, HV, K, V] or null
    // Scratch of the f32 path (chunk_gdn.cu).
    float* qn;            // [tokens, H, K]
    float* kn;            // [tokens, H, K]
    float* gf;            // [tokens, HV(, K)]: log decay
    float* bf;            // [tokens, HV]: beta
    float* w;             // [tokens, HV, K]
    float* u;             // [tokens, HV, V]
    // Scratch of both paths.
    float* gc;            // [tokens, HV(, K)]: in-chunk cumulative log decay
    // Scratch of the tensor-core path (chunk_gdn_tc.cu), 16-bit in the dtype of q.
    void* w16;            // [tokens, HV, K]: W = T (beta exp(G) K)
    void* u16;            // [tokens, HV, V]: U = T (beta V)
    void* aqk;            // [tokens, HV, C]: scale Q K^T . exp(G_i - G_j), lower incl. diagonal
    void* qg16;           // [tokens, HV, K]: q^ . e^G (KDA on tensor cores)
    void* kt16;           // [tokens, HV, K]: k^ . e^(G_L - G) (KDA on tensor cores)
    float* rq;            // [tokens, HV]: 1/|q| (1 without the in-op L2 norm)
    float* rk;            // [tokens, HV]: 1/|k|
    // Saved for the backward (chunk_bwd.cu, chunk_bwd_tc.cu); null in a plain forward. f32 on
    // the f32 path, 16-bit (the dtype of q) on the tensor-core path.
    void* tm;             // [tokens, HV, C]: row i of T = (I + A)^-1 of the token's chunk
    void* hs;             // [nc, HV, K, V]: state entering each chunk
    void* vn;             // [tokens, HV, V]: new values Vn = U - W S
    // The chunk table (cu_seqlens given); null for N sequences of `seq_len` tokens each.
    const int* chunk_start;  // [nc] first token of each chunk
    const int* chunk_len;    // [nc] tokens in each chunk (1..=64)
    const int* seq_chunk;    // [N+1] chunks of sequence n: seq_chunk[n] .. seq_chunk[n+1]
    int channel;             // 1: per-key-channel decay (KDA), g / gf / gc are [.., HV, K] (f32 path)
    int dt_per_channel;      // 1: dt_bias is [HV·K]
    int dtype, a_log_dtype, dt_bias_dtype;
    int tokens, n, nc, h, hv, dk, dv;
    int seq_len;             // tokens per sequence without a chunk table
    int l2norm, beta_sigmoid, use_gate;
    float scale;
};


// Beta of token `i` (index into [tokens, HV]), with the in-op sigmoid applied.
__device__ __forceinline__ float chunk_beta(const ChunkParams& p, long long i) {
    float b = fla_load(p.beta, p.dtype, i);
    if (p.beta_sigmoid) b = fla_sigmoidf(b);
    return b;
}

// The log decay and beta of token `i` (index into [tokens, HV]) of value head `hv`, with the
// in-op gate and sigmoid applied; no decay (0) when `g` is null.
__device__ __forceinline__ void chunk_gate_beta(const ChunkParams& p, long long i, int hv, float& g, float& b) {
    g = 0.0f;
    if (p.g) {
        g = fla_load(p.g, p.dtype, i);
        if (p.use_gate)
            g = -expf(fla_load(p.a_log, p.a_log_dtype, hv)) * fla_softplusf(g + fla_load(p.dt_bias, p.dt_bias_dtype, hv));
    }
    b = chunk_beta(p, i);
}

// First token `bos` and length `l` of chunk `ci`.
__device__ __forceinline__ void chunk_at(const ChunkParams& p, int ci, long long& bos, int& l) {
    if (p.chunk_start) {
        bos = p.chunk_start[ci];
        l = p.chunk_len[ci];
    } else {
        const int per_seq = (p.seq_len + FLA_C - 1) / FLA_C, c = ci % per_seq;
        bos = (long long)(ci / per_seq) * p.seq_len + c * FLA_C;
        l = min(FLA_C, p.seq_len - c * FLA_C);
    }
}

// The first chunk of sequence `n` (n = N: the number of chunks).
__device__ __forceinline__ int chunk_first(const ChunkParams& p, int n) {
    return p.seq_chunk ? p.seq_chunk[n] : n * ((p.seq_len + FLA_C - 1) / FLA_C);
}

// 1 / sqrt(sum of squares + 1e-6): the in-op L2 norm's scale (fla-ops/src/prepare.rs).
__device__ __forceinline__ float chunk_rnorm(float ss) { return 1.0f / sqrtf(ss + 1e-6f); }

// sum_c x_ic y_jc exp(G_ic - G_jc) for f32 row tiles x, y (row stride ks) and the cumulative
// gate gcs ([C][K] with channel decay, else [C]): an element of the f32 path's chunk-local
// products (A with x = y = K, P with x = Q), before its beta or scale.
__device__ __forceinline__ float chunk_decayed_dot(const ChunkParams& p, const float* x, const float* y, int ks,
                                                   const float* gcs, int i, int j) {
    const int K = p.dk;
    float d = 0.0f;
    if (p.channel) {
        for (int c = 0; c < K; ++c) d += x[i * ks + c] * y[j * ks + c] * expf(gcs[i * K + c] - gcs[j * K + c]);
        return d;
    }
    for (int c = 0; c < K; ++c) d += x[i * ks + c] * y[j * ks + c];
    return d * expf(gcs[i] - gcs[j]);
}
