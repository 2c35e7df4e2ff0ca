// Chunk forward of Gated DeltaNet, DeltaNet and KDA (decay per head, none, or per key channel with
// `p.channel`; erase = write = beta), chunk C = 64: the f32 path (f32 arithmetic throughout, no tensor cores), serving f32
// inputs and the head dims the tensor-core path (chunk_gdn_tc.cu) does not; see
// fla-ops/src/chunk/{mod.rs,intra.rs} for the CPU form it matches:
//
//   G  = in-chunk cumulative sum of g                      (per token)
//   A  = strictly lower (beta K K^T) . exp(G_i - G_j)       T = (I + A)^-1
//   W  = T (beta exp(G) K)          U = T (beta V)          (kernel 2: chunk_gdn_intra)
//   Vn = U - W S                                             (kernel 3: chunk_gdn_fwd, per chunk)
//   O  = scale (Q exp(G)) S + (P . mask) Vn,  P = scale Q K^T . exp(G_i - G_j)
//   S <- exp(G_L) S + (K exp(G_L - G))^T Vn
//
// Kernel 1 (chunk_gdn_prep) converts q, k to f32 (L2-normalised with the in-op option) and
// g, beta to f32 (with the in-op gate / sigmoid) into scratch buffers the two others read.
#include "common/dtype.cuh"
#include "common/chunk.cuh"

#define FLA_KMAX 128  // largest K served
#define FLA_KS 129    // row stride of [C][K] tiles in shared memory (odd: no bank conflicts)
#define FLA_BV 64     // value columns per CTA of chunk_gdn_fwd
#define FLA_NT 256    // threads per CTA of the chunk kernels

// One CTA (128 threads) per token: a warp per q/k head row, a thread per value head.
extern "C" __global__ void __launch_bounds__(128) chunk_gdn_prep(const ChunkParams p) {
    const long long tok = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int hh = warp; hh < p.h; hh += 4) {
        float qv[FLA_KMAX / 32], kv[FLA_KMAX / 32];
        float sq = 0.0f, sk = 0.0f;
        const long long base = (tok * p.h + hh) * p.dk;
#pragma unroll
        for (int r = 0; r < FLA_KMAX / 32; ++r) {
            const int c = lane + 32 * r;
            const bool ok = c < p.dk;
            qv[r] = ok ? fla_load(p.q, p.dtype, base + c) : 0.0f;
            kv[r] = ok ? fla_load(p.k, p.dtype, base + c) : 0.0f;
            sq += qv[r] * qv[r];
            sk += kv[r] * kv[r];
        }
        float rq = 1.0f, rk = 1.0f;
        if (p.l2norm) {
            fla_warp_sum2(sq, sk);
            rq = chunk_rnorm(sq);
            rk = chunk_rnorm(sk);
        }
#pragma unroll
        for (int r = 0; r < FLA_KMAX / 32; ++r) {
            const int c = lane + 32 * r;
            if (c < p.dk) {
                p.qn[base + c] = qv[r] * rq;
                p.kn[base + c] = kv[r] * rk;
            }
        }
    }
    if (!p.channel) {
        for (int j = threadIdx.x; j < p.hv; j += blockDim.x) {
            const long long i = tok * p.hv + j;
            chunk_gate_beta(p, i, j, p.gf[i], p.bf[i]);
        }
        return;
    }
    // Per key channel: g [tokens, HV, K], dt_bias [HV] or [HV·K].
    for (int e = threadIdx.x; e < p.hv * p.dk; e += blockDim.x) {
        const int j = e / p.dk, c = e % p.dk;
        const long long i = tok * p.hv + j, gi = i * p.dk + c;
        float g = fla_load(p.g, p.dtype, gi);
        if (p.use_gate) {
            const float dt = fla_load(p.dt_bias, p.dt_bias_dtype, p.dt_per_channel ? j * p.dk + c : j);
            g = -expf(fla_load(p.a_log, p.a_log_dtype, j)) * fla_softplusf(g + dt);
        }
        p.gf[gi] = g;
        if (c == 0) {
            const float b = fla_load(p.beta, p.dtype, i);
            p.bf[i] = p.beta_sigmoid ? fla_sigmoidf(b) : b;
        }
    }
}

// Bytes of dynamic shared memory of chunk_gdn_intra.
#define FLA_INTRA_SMEM ((FLA_C * FLA_KS + FLA_C * FLA_C + 3 * FLA_C + FLA_C * FLA_KMAX) * 4)

// One CTA per (chunk, value head): G, A, T = (I + A)^-1 (forward substitution in shared
// memory), then W and U into the scratch buffers.
extern "C" __global__ void __launch_bounds__(FLA_NT) chunk_gdn_intra(const ChunkParams p) {
    extern __shared__ float sm[];
    float* ks = sm;                   // [C][KS]: k rows, later beta.V column blocks
    float* at = ks + FLA_C * FLA_KS;  // [C][C]: A, then T in place
    float* arow = at + FLA_C * FLA_C; // [C]
    float* coef = arow + FLA_C;       // [C] beta exp(G) (decay per head)
    float* bs = coef + FLA_C;         // [C] beta
    float* gcs = bs + FLA_C;          // [C][KG] cumulative log decay
    const int ci = blockIdx.x, hv = blockIdx.y, tid = threadIdx.x;
    long long bos;
    int l;
    chunk_at(p, ci, bos, l);
    const int hk = hv / (p.hv / p.h);
    const int K = p.dk, V = p.dv, KG = p.channel ? K : 1;

    for (int e = tid; e < FLA_C * K; e += FLA_NT) {
        const int i = e / K, c = e % K;
        ks[i * FLA_KS + c] = i < l ? p.kn[((bos + i) * p.h + hk) * K + c] : 0.0f;
    }
    if (tid < FLA_C) bs[tid] = tid < l ? p.bf[(bos + tid) * p.hv + hv] : 0.0f;
    // Cumulative gate, a thread per channel.
    if (tid < KG) {
        float acc = 0.0f;
        for (int i = 0; i < FLA_C; ++i) {
            if (i < l) acc += p.gf[((bos + i) * p.hv + hv) * KG + tid];
            gcs[i * KG + tid] = acc;
        }
    }
    __syncthreads();
    for (int e = tid; e < l * KG; e += FLA_NT) p.gc[((bos + e / KG) * p.hv + hv) * KG + e % KG] = gcs[e];
    if (tid < l && !p.channel) coef[tid] = bs[tid] * expf(gcs[tid]);
    // A, strictly lower: beta_i sum_c k_ic k_jc exp(G_ic - G_jc) (G_i - G_j <= 0 for j < i).
    for (int e = tid; e < FLA_C * FLA_C; e += FLA_NT) {
        const int i = e / FLA_C, j = e % FLA_C;
        at[e] = j < i && i < l ? bs[i] * chunk_decayed_dot(p, ks, ks, FLA_KS, gcs, i, j) : 0.0f;
    }
    __syncthreads();
    // T = (I + A)^-1 in place, row by row: T_ij = -sum_{m=j}^{i-1} A_im T_mj (T_mm = 1).
    for (int i = 1; i < l; ++i) {
        if (tid < i) arow[tid] = at[i * FLA_C + tid];
        __syncthreads();
        if (tid < i) {
            float s = -arow[tid];
            for (int m = tid + 1; m < i; ++m) s -= arow[m] * at[m * FLA_C + tid];
            at[i * FLA_C + tid] = s;
        }
        __syncthreads();
    }
    if (tid < FLA_C) at[tid * FLA_C + tid] = 1.0f;
    __syncthreads();
    if (p.tm)
        for (int e = tid; e < l * FLA_C; e += FLA_NT) static_cast<float*>(p.tm)[((bos + e / FLA_C) * p.hv + hv) * FLA_C + e % FLA_C] = at[e];
    // W = T (beta exp(G) K).
    for (int e = tid; e < l * K; e += FLA_NT) {
        const int i = e / K, c = e % K;
        float s = 0.0f;
        if (p.channel) {
            for (int j = 0; j <= i; ++j) s += at[i * FLA_C + j] * bs[j] * expf(gcs[j * K + c]) * ks[j * FLA_KS + c];
        } else {
            for (int j = 0; j <= i; ++j) s += at[i * FLA_C + j] * coef[j] * ks[j * FLA_KS + c];
        }
        p.w[((bos + i) * p.hv + hv) * K + c] = s;
    }
    // U = T (beta V), in blocks of 128 columns staged through `ks`.
    for (int v0 = 0; v0 < V; v0 += FLA_KMAX) {
        const int nv = min(FLA_KMAX, V - v0);
        __syncthreads();
        for (int e = tid; e < FLA_C * nv; e += FLA_NT) {
            const int j = e / nv, x = e % nv;
            ks[j * FLA_KS + x] = j < l ? bs[j] * fla_load(p.v, p.dtype, ((bos + j) * p.hv + hv) * V + v0 + x) : 0.0f;
        }
        __syncthreads();
        for (int e = tid; e < l * nv; e += FLA_NT) {
            const int i = e / nv, x = e % nv;
            float s = 0.0f;
            for (int j = 0; j <= i; ++j) s += at[i * FLA_C + j] * ks[j * FLA_KS + x];
            p.u[((bos + i) * p.hv + hv) * V + v0 + x] = s;
        }
    }
}

// Bytes of dynamic shared memory of chunk_gdn_fwd.
#define FLA_FWD_SMEM ((FLA_KMAX * FLA_BV + 2 * FLA_C * FLA_KS + FLA_C * FLA_BV + FLA_C * FLA_C + FLA_C * FLA_KMAX) * 4)

// One CTA per (sequence, value head, block of 64 value columns), walking the sequence's chunks
// in order with the state block S [K][64] in shared memory.
extern "C" __global__ void __launch_bounds__(FLA_NT) chunk_gdn_fwd(const ChunkParams p) {
    extern __shared__ float sm[];
    float* S = sm;                     // [KMAX][BV]
    float* qb = S + FLA_KMAX * FLA_BV; // [C][KS]
    float* kb = qb + FLA_C * FLA_KS;   // [C][KS]: W rows, then k rows
    float* vn = kb + FLA_C * FLA_KS;   // [C][BV]
    float* P = vn + FLA_C * FLA_BV;    // [C][C]
    float* gcs = P + FLA_C * FLA_C;    // [C][KG]
    const int tid = threadIdx.x;
    const int K = p.dk, V = p.dv, KG = p.channel ? K : 1;
    const int nvb = (V + FLA_BV - 1) / FLA_BV;
    const int vb = blockIdx.x % nvb;
    const int hv = (blockIdx.x / nvb) % p.hv;
    const int n = blockIdx.x / (nvb * p.hv);
    const int hk = hv / (p.hv / p.h);
    const int v0 = vb * FLA_BV, nv = min(FLA_BV, V - v0);
    const long long sbase = ((long long)n * p.hv + hv) * K * V;

    for (int e = tid; e < K * FLA_BV; e += FLA_NT) {
        const int c = e / FLA_BV, x = e % FLA_BV;
        S[e] = p.h0 && x < nv ? p.h0[sbase + (long long)c * V + v0 + x] : 0.0f;
    }
    for (int ci = chunk_first(p, n); ci < chunk_first(p, n + 1); ++ci) {
        long long bos;
        int l;
        chunk_at(p, ci, bos, l);
        __syncthreads();
        if (p.hs)
            for (int e = tid; e < K * FLA_BV; e += FLA_NT) {
                const int c = e / FLA_BV, x = e % FLA_BV;
                if (x < nv) static_cast<float*>(p.hs)[(((long long)ci * p.hv + hv) * K + c) * V + v0 + x] = S[e];
            }
        for (int e = tid; e < FLA_C * K; e += FLA_NT) {
            const int i = e / K, c = e % K;
            const bool ok = i < l;
            kb[i * FLA_KS + c] = ok ? p.w[((bos + i) * p.hv + hv) * K + c] : 0.0f;
            qb[i * FLA_KS + c] = ok ? p.qn[((bos + i) * p.h + hk) * K + c] : 0.0f;
        }
        for (int e = tid; e < FLA_C * KG; e += FLA_NT)
            gcs[e] = e / KG < l ? p.gc[((bos + e / KG) * p.hv + hv) * KG + e % KG] : 0.0f;
        __syncthreads();
        // Vn = U - W S.
        for (int e = tid; e < FLA_C * FLA_BV; e += FLA_NT) {
            const int i = e / FLA_BV, x = e % FLA_BV;
            float s = 0.0f;
            if (i < l && x < nv) {
                s = p.u[((bos + i) * p.hv + hv) * V + v0 + x];
                for (int c = 0; c < K; ++c) s -= kb[i * FLA_KS + c] * S[c * FLA_BV + x];
                if (p.vn) static_cast<float*>(p.vn)[((bos + i) * p.hv + hv) * V + v0 + x] = s;
            }
            vn[e] = s;
        }
        __syncthreads();
        for (int e = tid; e < FLA_C * K; e += FLA_NT) {
            const int i = e / K, c = e % K;
            kb[i * FLA_KS + c] = i < l ? p.kn[((bos + i) * p.h + hk) * K + c] : 0.0f;
        }
        __syncthreads();
        // P = scale Q K^T . exp(G_i - G_j), lower triangle including the diagonal (skipped,
        // with the outputs, when only the states are wanted: the backward's recompute).
        for (int e = tid; e < FLA_C * FLA_C && p.o; e += FLA_NT) {
            const int i = e / FLA_C, j = e % FLA_C;
            P[e] = j <= i && i < l ? p.scale * chunk_decayed_dot(p, qb, kb, FLA_KS, gcs, i, j) : 0.0f;
        }
        __syncthreads();
        // O = scale exp(G) Q S + P Vn.
        for (int e = tid; e < l * FLA_BV && p.o; e += FLA_NT) {
            const int i = e / FLA_BV, x = e % FLA_BV;
            if (x >= nv) continue;
            float a = 0.0f;
            if (p.channel) {
                for (int c = 0; c < K; ++c) a += qb[i * FLA_KS + c] * expf(gcs[i * K + c]) * S[c * FLA_BV + x];
            } else {
                for (int c = 0; c < K; ++c) a += qb[i * FLA_KS + c] * S[c * FLA_BV + x];
                a *= expf(gcs[i]);
            }
            float b = 0.0f;
            for (int j = 0; j <= i; ++j) b += P[i * FLA_C + j] * vn[j * FLA_BV + x];
            fla_store(p.o, p.dtype, ((bos + i) * p.hv + hv) * V + v0 + x, p.scale * a + b);
        }
        __syncthreads();
        // S <- exp(G_L) S + (K exp(G_L - G))^T Vn, G per row c of S with channel decay.
        for (int e = tid; e < K * FLA_BV; e += FLA_NT) {
            const int c = e / FLA_BV, x = e % FLA_BV, cg = p.channel ? c : 0;
            const float gl = gcs[(l - 1) * KG + cg];
            float s = expf(gl) * S[e];
            for (int i = 0; i < l; ++i) s += kb[i * FLA_KS + c] * expf(gl - gcs[i * KG + cg]) * vn[i * FLA_BV + x];
            S[e] = s;
        }
    }
    if (p.ht) {
        __syncthreads();
        for (int e = tid; e < K * FLA_BV; e += FLA_NT) {
            const int c = e / FLA_BV, x = e % FLA_BV;
            if (x < nv) p.ht[sbase + (long long)c * V + v0 + x] = S[e];
        }
    }
}
