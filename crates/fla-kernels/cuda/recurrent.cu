// The fused recurrent step (decode) of the whole linear-attention family, one kernel for every
// (decay, erase, write) point. See fla-ops/src/naive.rs for the recurrence:
//
//   S <- S * exp(g_t)                  (per head, or row c scaled by exp(g_t[c]))
//   e  = S^T (b_t . k_t)               (erase; b = beta, a per-channel gate, or 0)
//   S <- S + k_t (w_t . v_t - e)^T     (write; w = beta, a per-channel gate, or 1)
//   o_t = S^T (scale . q_t)
//
// One CTA of 128 threads per (sequence, value head, block of 32 value columns). Thread
// (ks, col) owns VW adjacent columns of rows c = r*KS + ks of the f32 state tile, in registers,
// for every token of the sequence: the state is read from memory once and written once per
// call, which is what bounds the decode step (it is memory-bound). Reductions over K (e and o)
// go through warp shuffles and a 4-warp shared-memory step.
#include "common/dtype.cuh"

// Keep in sync with `RecurrentParams` in fla-ops/src/cuda.rs (repr(C)).
struct RecurrentParams {
    const void* q;        // [tokens, H, K]
    const void* k;        // [tokens, H, K]
    const void* v;        // [tokens, HV, V]
    const void* g;        // [tokens, HV] or [tokens, HV, K] (raw gate input with use_gate), or null
    const void* beta;     // [tokens, HV] or null
    const void* b;        // [tokens, HV, K] erase gate (GDN-2) or null
    const void* w;        // [tokens, HV, V] write gate (GDN-2) or null
    const void* a_log;    // [HV] (use_gate) or null
    const void* dt_bias;  // [HV] or [HV*K] (use_gate) or null
    void* o;              // [tokens, HV, V], dtype of q
    float* state;         // [pool, HV, K, V]
    const int* cu_seqlens;     // [N+1] token offsets, or null: sequence n is [n*T, (n+1)*T)
    const int* state_indices;  // [N] pool rows, or null: row n
    int dtype, a_log_dtype, dt_bias_dtype;
    int n, t, h, hv, dk, dv;
    int decay;  // 0 none, 1 per head, 2 per key channel
    int erase;  // 0 none, 1 beta, 2 per key channel (b)
    int write;  // 0 one, 1 beta, 2 per value channel (w)
    int l2norm, beta_sigmoid, use_gate, dt_per_channel;
    float scale;
};

constexpr int NT = 128;  // threads per CTA
constexpr int BV = 32;   // value columns per CTA
constexpr int NWARPS = NT / 32;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float softplusf_(float x) { return x > 20.0f ? x : logf(1.0f + expf(x)); }

// Log decay of (token row, hv[, channel c]) after the optional in-op gate.
__device__ __forceinline__ float log_decay(const RecurrentParams& p, long long gi, int hv, int c) {
    float a = fla_load(p.g, p.dtype, gi);
    if (!p.use_gate) return a;
    float dt = fla_load(p.dt_bias, p.dt_bias_dtype, p.dt_per_channel ? (long long)hv * p.dk + c : hv);
    return -expf(fla_load(p.a_log, p.a_log_dtype, hv)) * softplusf_(a + dt);
}

template <int KMAX, int VW>
__device__ __forceinline__ void recurrent_step(const RecurrentParams& p) {
    constexpr int CT = BV / VW;   // column threads
    constexpr int KS = NT / CT;   // row groups
    constexpr int R = KMAX / KS;  // rows per thread
    static_assert(KMAX % KS == 0, "rows split evenly");

    __shared__ float sq[KMAX], sk[KMAX], sdec[KMAX], sb[KMAX];
    __shared__ float red_e[NWARPS][BV], red_o[NWARPS][BV], red_n[NWARPS][2];

    const int nvb = (p.dv + BV - 1) / BV;
    const int vb = blockIdx.x % nvb;
    const int hv = (blockIdx.x / nvb) % p.hv;
    const int n = blockIdx.x / (nvb * p.hv);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int col = tid % CT, ks = tid / CT;
    const int j0 = vb * BV + col * VW;
    const bool jok = j0 < p.dv;  // the host checks V % VW == 0
    const int hk = hv / (p.hv / p.h);

    long long bos, len;
    if (p.cu_seqlens) {
        bos = p.cu_seqlens[n];
        len = p.cu_seqlens[n + 1] - bos;
    } else {
        bos = (long long)n * p.t;
        len = p.t;
    }
    if (len <= 0) return;  // the state is left as it is
    const long long slot = p.state_indices ? p.state_indices[n] : n;
    float* S = p.state + (slot * p.hv + hv) * (long long)p.dk * p.dv;

    float s[R][VW];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int c = r * KS + ks;
        if (c < p.dk && jok) {
            const float* src = S + (long long)c * p.dv + j0;
            if constexpr (VW == 4) {
                float4 x = __ldcs(reinterpret_cast<const float4*>(src));
                s[r][0] = x.x; s[r][1] = x.y; s[r][2] = x.z; s[r][3] = x.w;
            } else {
#pragma unroll
                for (int i = 0; i < VW; ++i) s[r][i] = __ldcs(src + i);
            }
        } else {
#pragma unroll
            for (int i = 0; i < VW; ++i) s[r][i] = 0.0f;
        }
    }

    for (long long i = 0; i < len; ++i) {
        const long long tok = bos + i;
        const long long head_row = tok * p.hv + hv;  // index of (tok, hv) in [tokens, HV]
        // Per-token vectors over K into shared memory, and the squares for the L2 norms.
        float ssq = 0.0f, ssk = 0.0f;
        for (int c = tid; c < KMAX; c += NT) {
            float qv = 0.0f, kv = 0.0f, dec = 1.0f, bv = 0.0f;
            if (c < p.dk) {
                const long long qi = (tok * p.h + hk) * p.dk + c;
                qv = fla_load(p.q, p.dtype, qi);
                kv = fla_load(p.k, p.dtype, qi);
                if (p.decay == 2) dec = expf(log_decay(p, head_row * p.dk + c, hv, c));
                if (p.erase == 2) {
                    bv = fla_load(p.b, p.dtype, head_row * p.dk + c);
                    if (p.beta_sigmoid) bv = sigmoidf_(bv);
                }
            }
            sq[c] = qv;
            sk[c] = kv;
            sdec[c] = dec;
            sb[c] = bv;
            ssq += qv * qv;
            ssk += kv * kv;
        }
        // Per-token scalars, the same in every thread.
        float dech = 1.0f, beta = 0.0f;
        if (p.decay == 1) dech = expf(log_decay(p, head_row, hv, 0));
        if (p.erase == 1 || p.write == 1) {
            beta = fla_load(p.beta, p.dtype, head_row);
            if (p.beta_sigmoid) beta = sigmoidf_(beta);
        }
        float vv[VW], ww[VW];
#pragma unroll
        for (int x = 0; x < VW; ++x) {
            const long long vi = head_row * p.dv + j0 + x;
            vv[x] = jok ? fla_load(p.v, p.dtype, vi) : 0.0f;
            float wx = p.write == 0 ? 1.0f : beta;
            if (p.write == 2 && jok) {
                wx = fla_load(p.w, p.dtype, vi);
                if (p.beta_sigmoid) wx = sigmoidf_(wx);
            }
            ww[x] = wx;
        }
        float rq = 1.0f, rk = 1.0f;
        if (p.l2norm) {
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                ssq += __shfl_xor_sync(0xffffffffu, ssq, off);
                ssk += __shfl_xor_sync(0xffffffffu, ssk, off);
            }
            if (lane == 0) {
                red_n[warp][0] = ssq;
                red_n[warp][1] = ssk;
            }
        }
        __syncthreads();
        if (p.l2norm) {
            float a = 0.0f, b = 0.0f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                a += red_n[w][0];
                b += red_n[w][1];
            }
            rq = rsqrtf(a + 1e-6f);
            rk = rsqrtf(b + 1e-6f);
        }
        const float qs = rq * p.scale;

        // Decay, then the erase e = S^T (b . k).
        float e[VW];
#pragma unroll
        for (int x = 0; x < VW; ++x) e[x] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int c = r * KS + ks;
            const float d = p.decay == 2 ? sdec[c] : dech;
            const float bk = (p.erase == 1 ? beta : sb[c]) * sk[c] * rk;
#pragma unroll
            for (int x = 0; x < VW; ++x) {
                s[r][x] *= d;
                e[x] += bk * s[r][x];
            }
        }
        if (p.erase != 0) {
#pragma unroll
            for (int off = CT; off < 32; off <<= 1)
#pragma unroll
                for (int x = 0; x < VW; ++x) e[x] += __shfl_xor_sync(0xffffffffu, e[x], off);
            if (lane < CT)
#pragma unroll
                for (int x = 0; x < VW; ++x) red_e[warp][col * VW + x] = e[x];
            __syncthreads();
#pragma unroll
            for (int x = 0; x < VW; ++x) {
                float t = 0.0f;
#pragma unroll
                for (int w = 0; w < NWARPS; ++w) t += red_e[w][col * VW + x];
                e[x] = t;
            }
        }
        // Write k (w . v - e)^T, then o = S^T (scale . q).
        float u[VW], o[VW];
#pragma unroll
        for (int x = 0; x < VW; ++x) {
            u[x] = ww[x] * vv[x] - e[x];
            o[x] = 0.0f;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int c = r * KS + ks;
            const float kc = sk[c] * rk, qc = sq[c] * qs;
#pragma unroll
            for (int x = 0; x < VW; ++x) {
                s[r][x] += kc * u[x];
                o[x] += qc * s[r][x];
            }
        }
#pragma unroll
        for (int off = CT; off < 32; off <<= 1)
#pragma unroll
            for (int x = 0; x < VW; ++x) o[x] += __shfl_xor_sync(0xffffffffu, o[x], off);
        if (lane < CT)
#pragma unroll
            for (int x = 0; x < VW; ++x) red_o[warp][col * VW + x] = o[x];
        __syncthreads();
        if (ks == 0 && jok) {
#pragma unroll
            for (int x = 0; x < VW; ++x) {
                float t = 0.0f;
#pragma unroll
                for (int w = 0; w < NWARPS; ++w) t += red_o[w][col * VW + x];
                fla_store(p.o, p.dtype, head_row * p.dv + j0 + x, t);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int c = r * KS + ks;
        if (c < p.dk && jok) {
            float* dst = S + (long long)c * p.dv + j0;
            if constexpr (VW == 4) {
                __stcs(reinterpret_cast<float4*>(dst), make_float4(s[r][0], s[r][1], s[r][2], s[r][3]));
            } else {
#pragma unroll
                for (int x = 0; x < VW; ++x) __stcs(dst + x, s[r][x]);
            }
        }
    }
}

// Entry points: recurrent_step_k{KMAX}_v{VW}; the host picks the smallest KMAX >= K and VW = 4
// when V % 4 == 0.
#define FLA_RECURRENT_STEP(KMAX, VW)                                                        \
    extern "C" __global__ void __launch_bounds__(NT) recurrent_step_k##KMAX##_v##VW(const RecurrentParams p) { \
        recurrent_step<KMAX, VW>(p);                                                        \
    }
FLA_RECURRENT_STEP(64, 4)
FLA_RECURRENT_STEP(128, 4)
FLA_RECURRENT_STEP(256, 4)
FLA_RECURRENT_STEP(64, 1)
FLA_RECURRENT_STEP(128, 1)
FLA_RECURRENT_STEP(256, 1)
