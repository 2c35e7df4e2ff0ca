// Chunk backward of Gated DeltaNet, DeltaNet and KDA (decay per head, none, or per key channel;
// erase = write = beta), chunk C = 64, in f32 arithmetic. The CPU form it matches, with the
// equations, is fla-ops/src/chunk/backward.rs. The forward is recomputed first by the f32 path
// (chunk_gdn.cu: prep, intra saving T, the sweep saving the state S0 entering each chunk and the
// new values U = Vn = T(beta V - beta e^G K S0)); then:
//
//   1. chunk_bwd_dh    one CTA per (sequence, value head, 64 value columns), chunks in reverse,
//                      carrying dS (gradient of the state leaving the chunk) in shared memory:
//                        dU  = P^T dO + Kt dS                       Kt = K e^(G_L - G)
//                        dS0 = e^(G_L) dS + Qg^T dO - W^T dU        Qg = scale Q e^G
//                      saves dS per chunk and dU; dS of the first chunk is dh0.
//   2. chunk_bwd_dqk   one CTA per (chunk, value head), summing over value columns:
//                        dY = T^T dU, dv = beta dY, dbeta += sum_v v dY
//                        dP = dO U^T, dA = -dY U^T, dQg = dO S0^T, dKt = U dS^T, dKb = -dY S0^T
//                        dG_L = e^(G_L) sum_v dS S0
//   3. chunk_bwd_gate  one CTA per (chunk, value head): the chunk-local products (P, A, Qg, Kt,
//                      Kb) pass their gradients to q, k, beta and the cumulative gate G, and the
//                      in-chunk cumulative sum is undone: dg_t = sum_{i >= t} dG_i + dG_L.
//   4. chunk_bwd_post  one CTA per token: sums the value heads of a group into their q/k head,
//                      chains through the in-op L2 norm, beta sigmoid and gate, casts to the
//                      input dtype; A_log / dt_bias gradients are summed with atomics and cast by
//   5. chunk_bwd_gate_params.
#include "common/dtype.cuh"
#include "common/chunk.cuh"
#include "common/chunk_bwd.cuh"

#define FLA_KMAX 128  // largest K served
#define FLA_KS 129    // row stride of [C][K] tiles in shared memory
#define FLA_CS 65     // row stride of [C][C] tiles
#define FLA_BV 64     // value columns per CTA of chunk_bwd_dh
#define FLA_VB 32     // value columns per step of chunk_bwd_dqk
#define FLA_VS 33     // row stride of its [*][VB] tiles
#define FLA_NT 256    // threads per CTA


// Bytes of dynamic shared memory of chunk_bwd_dh.
#define FLA_DH_SMEM ((FLA_KMAX * FLA_BV + 2 * FLA_C * FLA_KS + 2 * FLA_C * FLA_BV + FLA_C * FLA_C + FLA_C * FLA_KMAX) * 4)

extern "C" __global__ void __launch_bounds__(FLA_NT) chunk_bwd_dh(const ChunkBwdParams bp) {
    const ChunkParams& p = bp.f;
    extern __shared__ float sm[];
    float* dS = sm;                     // [KMAX][BV]
    float* qb = dS + FLA_KMAX * FLA_BV; // [C][KS]: q rows
    float* kb = qb + FLA_C * FLA_KS;    // [C][KS]: k rows, then W rows
    float* dob = kb + FLA_C * FLA_KS;   // [C][BV]: dO
    float* dub = dob + FLA_C * FLA_BV;  // [C][BV]: dU
    float* P = dub + FLA_C * FLA_BV;    // [C][C]
    float* gcs = P + FLA_C * FLA_C;     // [C][KG]
    float* dhs = static_cast<float*>(bp.dhs);
    float* du = static_cast<float*>(bp.du);
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
        dS[e] = bp.dht && x < nv ? bp.dht[sbase + (long long)c * V + v0 + x] : 0.0f;
    }
    for (int ci = chunk_first(p, n + 1) - 1; ci >= chunk_first(p, n); --ci) {
        long long bos;
        int l;
        chunk_at(p, ci, bos, l);
        __syncthreads();
        for (int e = tid; e < K * FLA_BV; e += FLA_NT) {
            const int c = e / FLA_BV, x = e % FLA_BV;
            if (x < nv) dhs[(((long long)ci * p.hv + hv) * K + c) * V + v0 + x] = dS[e];
        }
        for (int e = tid; e < FLA_C * K; e += FLA_NT) {
            const int i = e / K, c = e % K;
            const bool ok = i < l;
            qb[i * FLA_KS + c] = ok ? p.qn[((bos + i) * p.h + hk) * K + c] : 0.0f;
            kb[i * FLA_KS + c] = ok ? p.kn[((bos + i) * p.h + hk) * K + c] : 0.0f;
        }
        for (int e = tid; e < FLA_C * KG; e += FLA_NT)
            gcs[e] = e / KG < l ? p.gc[((bos + e / KG) * p.hv + hv) * KG + e % KG] : 0.0f;
        for (int e = tid; e < FLA_C * FLA_BV; e += FLA_NT) {
            const int i = e / FLA_BV, x = e % FLA_BV;
            dob[e] = i < l && x < nv ? fla_load(bp.d_o, p.dtype, ((bos + i) * p.hv + hv) * V + v0 + x) : 0.0f;
        }
        __syncthreads();
        // P = scale Q K^T . exp(G_i - G_j), lower triangle including the diagonal.
        for (int e = tid; e < FLA_C * FLA_C; e += FLA_NT) {
            const int i = e / FLA_C, j = e % FLA_C;
            P[e] = j <= i && i < l ? p.scale * chunk_decayed_dot(p, qb, kb, FLA_KS, gcs, i, j) : 0.0f;
        }
        __syncthreads();
        // dU = P^T dO + Kt dS.
        for (int e = tid; e < FLA_C * FLA_BV; e += FLA_NT) {
            const int i = e / FLA_BV, x = e % FLA_BV;
            float s = 0.0f;
            if (i < l && x < nv) {
                for (int j = i; j < l; ++j) s += P[j * FLA_C + i] * dob[j * FLA_BV + x];
                for (int c = 0; c < K; ++c) {
                    const int cg = p.channel ? c : 0;
                    s += kb[i * FLA_KS + c] * expf(gcs[(l - 1) * KG + cg] - gcs[i * KG + cg]) * dS[c * FLA_BV + x];
                }
                du[((bos + i) * p.hv + hv) * V + v0 + x] = s;
            }
            dub[e] = s;
        }
        __syncthreads();
        for (int e = tid; e < FLA_C * K; e += FLA_NT) {
            const int i = e / K, c = e % K;
            kb[i * FLA_KS + c] = i < l ? p.w[((bos + i) * p.hv + hv) * K + c] : 0.0f;
        }
        __syncthreads();
        // dS0 = e^(G_L) dS + Qg^T dO - W^T dU (each thread updates its own elements of dS).
        for (int e = tid; e < K * FLA_BV; e += FLA_NT) {
            const int c = e / FLA_BV, x = e % FLA_BV, cg = p.channel ? c : 0;
            float s = expf(gcs[(l - 1) * KG + cg]) * dS[e];
            for (int i = 0; i < l; ++i)
                s += p.scale * qb[i * FLA_KS + c] * expf(gcs[i * KG + cg]) * dob[i * FLA_BV + x]
                     - kb[i * FLA_KS + c] * dub[i * FLA_BV + x];
            dS[e] = s;
        }
    }
    if (bp.dh0) {
        __syncthreads();
        for (int e = tid; e < K * FLA_BV; e += FLA_NT) {
            const int c = e / FLA_BV, x = e % FLA_BV;
            if (x < nv) bp.dh0[sbase + (long long)c * V + v0 + x] = dS[e];
        }
    }
}

// Bytes of dynamic shared memory of chunk_bwd_dqk.
#define FLA_DQK_SMEM \
    ((3 * FLA_C * FLA_CS + 3 * FLA_C * FLA_KS + 4 * FLA_C * FLA_VS + 2 * FLA_KMAX * FLA_VS + 2 * FLA_C + FLA_KMAX) * 4)

extern "C" __global__ void __launch_bounds__(FLA_NT) chunk_bwd_dqk(const ChunkBwdParams bp) {
    const ChunkParams& p = bp.f;
    extern __shared__ float sm[];
    float* T = sm;                       // [C][CS]
    float* dPa = T + FLA_C * FLA_CS;     // [C][CS]: dP
    float* dAa = dPa + FLA_C * FLA_CS;   // [C][CS]: dA
    float* dQg = dAa + FLA_C * FLA_CS;   // [C][KS]
    float* dKt = dQg + FLA_C * FLA_KS;   // [C][KS]
    float* dKb = dKt + FLA_C * FLA_KS;   // [C][KS]
    float* dob = dKb + FLA_C * FLA_KS;   // [C][VS]: dO
    float* ub = dob + FLA_C * FLA_VS;    // [C][VS]: U
    float* dub = ub + FLA_C * FLA_VS;    // [C][VS]: dU
    float* dyb = dub + FLA_C * FLA_VS;   // [C][VS]: dY
    float* s0b = dyb + FLA_C * FLA_VS;   // [KMAX][VS]: S0
    float* dsb = s0b + FLA_KMAX * FLA_VS; // [KMAX][VS]: dS
    float* bs = dsb + FLA_KMAX * FLA_VS; // [C]: beta
    float* dbw = bs + FLA_C;             // [C]: sum_v v dY
    float* dglb = dbw + FLA_C;           // [KMAX]: sum_v dS S0
    const int ci = blockIdx.x, hv = blockIdx.y, tid = threadIdx.x;
    long long bos;
    int l;
    chunk_at(p, ci, bos, l);
    const int K = p.dk, V = p.dv;
    const long long sbase = ((long long)ci * p.hv + hv) * K * V;
    const float* tm = static_cast<const float*>(p.tm);
    const float* hs = static_cast<const float*>(p.hs);
    const float* vn = static_cast<const float*>(p.vn);
    const float* dhs = static_cast<const float*>(bp.dhs);
    const float* du = static_cast<const float*>(bp.du);

    for (int e = tid; e < FLA_C * FLA_C; e += FLA_NT) {
        const int i = e / FLA_C, j = e % FLA_C;
        T[i * FLA_CS + j] = i < l ? tm[((bos + i) * p.hv + hv) * FLA_C + j] : 0.0f;
        dPa[i * FLA_CS + j] = 0.0f;
        dAa[i * FLA_CS + j] = 0.0f;
    }
    for (int e = tid; e < FLA_C * K; e += FLA_NT) {
        const int i = e / K, c = e % K;
        dQg[i * FLA_KS + c] = dKt[i * FLA_KS + c] = dKb[i * FLA_KS + c] = 0.0f;
    }
    if (tid < FLA_C) {
        bs[tid] = tid < l ? p.bf[(bos + tid) * p.hv + hv] : 0.0f;
        dbw[tid] = 0.0f;
    }
    if (tid < FLA_KMAX) dglb[tid] = 0.0f;
    for (int v0 = 0; v0 < V; v0 += FLA_VB) {
        const int nv = min(FLA_VB, V - v0);
        __syncthreads();
        for (int e = tid; e < FLA_C * FLA_VB; e += FLA_NT) {
            const int i = e / FLA_VB, x = e % FLA_VB;
            const bool ok = i < l && x < nv;
            const long long r = ((bos + i) * p.hv + hv) * V + v0 + x;
            dob[i * FLA_VS + x] = ok ? fla_load(bp.d_o, p.dtype, r) : 0.0f;
            ub[i * FLA_VS + x] = ok ? vn[r] : 0.0f;
            dub[i * FLA_VS + x] = ok ? du[r] : 0.0f;
        }
        for (int e = tid; e < K * FLA_VB; e += FLA_NT) {
            const int c = e / FLA_VB, x = e % FLA_VB;
            const bool ok = x < nv;
            s0b[c * FLA_VS + x] = ok ? hs[sbase + (long long)c * V + v0 + x] : 0.0f;
            dsb[c * FLA_VS + x] = ok ? dhs[sbase + (long long)c * V + v0 + x] : 0.0f;
        }
        __syncthreads();
        // dY = T^T dU; dv = beta dY; sum_v v dY per row.
        for (int e = tid; e < FLA_C * FLA_VB; e += FLA_NT) {
            const int i = e / FLA_VB, x = e % FLA_VB;
            float s = 0.0f;
            if (i < l && x < nv) {
                for (int j = i; j < l; ++j) s += T[j * FLA_CS + i] * dub[j * FLA_VS + x];
                const long long r = ((bos + i) * p.hv + hv) * V + v0 + x;
                fla_store(bp.dv, p.dtype, r, bs[i] * s);
                atomicAdd(&dbw[i], fla_load(p.v, p.dtype, r) * s);
            }
            dyb[i * FLA_VS + x] = s;
        }
        if (tid < K) {
            float s = 0.0f;
            for (int x = 0; x < nv; ++x) s += dsb[tid * FLA_VS + x] * s0b[tid * FLA_VS + x];
            dglb[tid] += s;
        }
        __syncthreads();
        // dP = dO U^T (lower incl.), dA = -dY U^T (strictly lower).
        for (int e = tid; e < FLA_C * FLA_C; e += FLA_NT) {
            const int i = e / FLA_C, j = e % FLA_C;
            if (j > i || i >= l) continue;
            float a = 0.0f, b = 0.0f;
            for (int x = 0; x < nv; ++x) {
                a += dob[i * FLA_VS + x] * ub[j * FLA_VS + x];
                b += dyb[i * FLA_VS + x] * ub[j * FLA_VS + x];
            }
            dPa[i * FLA_CS + j] += a;
            if (j < i) dAa[i * FLA_CS + j] -= b;
        }
        // dQg = dO S0^T, dKt = U dS^T, dKb = -dY S0^T.
        for (int e = tid; e < l * K; e += FLA_NT) {
            const int i = e / K, c = e % K;
            float a = 0.0f, b = 0.0f, d = 0.0f;
            for (int x = 0; x < nv; ++x) {
                a += dob[i * FLA_VS + x] * s0b[c * FLA_VS + x];
                b += ub[i * FLA_VS + x] * dsb[c * FLA_VS + x];
                d += dyb[i * FLA_VS + x] * s0b[c * FLA_VS + x];
            }
            dQg[i * FLA_KS + c] += a;
            dKt[i * FLA_KS + c] += b;
            dKb[i * FLA_KS + c] -= d;
        }
    }
    __syncthreads();
    for (int e = tid; e < l * FLA_C; e += FLA_NT) {
        const int i = e / FLA_C, j = e % FLA_C;
        const long long r = ((bos + i) * p.hv + hv) * FLA_C + j;
        bp.dp[r] = dPa[i * FLA_CS + j];
        bp.da[r] = dAa[i * FLA_CS + j];
    }
    for (int e = tid; e < l * K; e += FLA_NT) {
        const int i = e / K, c = e % K;
        const long long r = ((bos + i) * p.hv + hv) * K + c;
        bp.dqa[r] = dQg[i * FLA_KS + c];
        bp.dka[r] = dKt[i * FLA_KS + c];
        bp.dkb[r] = dKb[i * FLA_KS + c];
    }
    if (tid < l) bp.dbh[(bos + tid) * p.hv + hv] = dbw[tid];
    if (tid < K) {
        const int KG = p.channel ? K : 1;
        const float gl = p.gc[((bos + l - 1) * p.hv + hv) * KG + (p.channel ? tid : 0)];
        bp.dgl[((long long)ci * p.hv + hv) * K + tid] = expf(gl) * dglb[tid];
    }
}

// Bytes of dynamic shared memory of chunk_bwd_gate.
#define FLA_GATE_SMEM ((3 * FLA_C * FLA_KS + FLA_C * FLA_KMAX + 2 * FLA_C * FLA_CS + 3 * FLA_C + FLA_KMAX) * 4)

extern "C" __global__ void __launch_bounds__(FLA_NT) chunk_bwd_gate(const ChunkBwdParams bp) {
    const ChunkParams& p = bp.f;
    extern __shared__ float sm[];
    float* qb = sm;                      // [C][KS]: q rows
    float* kb = qb + FLA_C * FLA_KS;     // [C][KS]: k rows
    float* dgc = kb + FLA_C * FLA_KS;    // [C][KS]: per-element gate gradient (channel decay)
    float* gcs = dgc + FLA_C * FLA_KS;   // [C][KG]
    float* dN = gcs + FLA_C * FLA_KMAX;  // [C][CS]: dP, then scale dP . E (head decay)
    float* dM = dN + FLA_C * FLA_CS;     // [C][CS]: dA, then dA . E (head decay)
    float* bs = dM + FLA_C * FLA_CS;     // [C]: beta
    float* rowg = bs + FLA_C;            // [C]: per-row gate gradient (head decay)
    float* rowb = rowg + FLA_C;          // [C]: sum_c k dbk
    float* dglc = rowb + FLA_C;          // [KMAX]: dG_L
    const int ci = blockIdx.x, hv = blockIdx.y, tid = threadIdx.x;
    long long bos;
    int l;
    chunk_at(p, ci, bos, l);
    const int hk = hv / (p.hv / p.h);
    const int K = p.dk, KG = p.channel ? K : 1;
    const bool channel = p.channel;

    for (int e = tid; e < FLA_C * K; e += FLA_NT) {
        const int i = e / K, c = e % K;
        const bool ok = i < l;
        qb[i * FLA_KS + c] = ok ? p.qn[((bos + i) * p.h + hk) * K + c] : 0.0f;
        kb[i * FLA_KS + c] = ok ? p.kn[((bos + i) * p.h + hk) * K + c] : 0.0f;
        dgc[i * FLA_KS + c] = 0.0f;
    }
    for (int e = tid; e < FLA_C * KG; e += FLA_NT)
        gcs[e] = e / KG < l ? p.gc[((bos + e / KG) * p.hv + hv) * KG + e % KG] : 0.0f;
    for (int e = tid; e < FLA_C * FLA_C; e += FLA_NT) {
        const int i = e / FLA_C, j = e % FLA_C;
        const bool ok = i < l;
        dN[i * FLA_CS + j] = ok ? bp.dp[((bos + i) * p.hv + hv) * FLA_C + j] : 0.0f;
        dM[i * FLA_CS + j] = ok ? bp.da[((bos + i) * p.hv + hv) * FLA_C + j] : 0.0f;
    }
    if (tid < FLA_C) {
        bs[tid] = tid < l ? p.bf[(bos + tid) * p.hv + hv] : 0.0f;
        rowg[tid] = rowb[tid] = 0.0f;
    }
    if (tid < K) dglc[tid] = bp.dgl[((long long)ci * p.hv + hv) * K + tid];
    __syncthreads();
    if (!channel) {
        // Head decay: the gate terms dG_i += t, dG_j -= t with t = dP_ij P_ij + dA_ij A_ij
        // (P, A recomputed), then dN = scale dP . E and dM = dA . E in place.
        for (int e = tid; e < FLA_C * FLA_C; e += FLA_NT) {
            const int i = e / FLA_C, j = e % FLA_C;
            if (j > i || i >= l) continue;
            float qk = 0.0f, kk = 0.0f;
            for (int c = 0; c < K; ++c) {
                qk += qb[i * FLA_KS + c] * kb[j * FLA_KS + c];
                kk += kb[i * FLA_KS + c] * kb[j * FLA_KS + c];
            }
            const float E = expf(gcs[i] - gcs[j]);
            const float dp = dN[i * FLA_CS + j], da = j < i ? dM[i * FLA_CS + j] : 0.0f;
            const float t = dp * p.scale * qk * E + da * bs[i] * kk * E;
            if (j < i) {
                atomicAdd(&rowg[i], t);
                atomicAdd(&rowg[j], -t);
            }
            dN[i * FLA_CS + j] = p.scale * dp * E;
            dM[i * FLA_CS + j] = da * E;
        }
        __syncthreads();
    }
    // Per element (i, c): dq, dk, dbk and the gate gradient.
    for (int e = tid; e < l * K; e += FLA_NT) {
        const int i = e / K, c = e % K, cg = channel ? c : 0;
        const long long r = ((bos + i) * p.hv + hv) * K + c;
        const float q = qb[i * FLA_KS + c], k = kb[i * FLA_KS + c], b = bs[i];
        const float g = gcs[i * KG + cg], gl = gcs[(l - 1) * KG + cg];
        const float eg = expf(g), et = expf(gl - g);
        const float dqg = bp.dqa[r], dkt = bp.dka[r], dkb = bp.dkb[r];
        float dq = p.scale * eg * dqg;
        float dk = dkt * et;
        float dbk = dkb * eg;
        float dg = dqg * p.scale * q * eg - dkt * k * et + dkb * b * eg * k;
        atomicAdd(&dglc[c], dkt * k * et);
        if (channel) {
            // Row role: pairs (i, j <= i).
            for (int j = 0; j <= i; ++j) {
                const float E = expf(g - gcs[j * K + c]);
                const float kj = kb[j * FLA_KS + c] * E;
                const float dp = p.scale * dN[i * FLA_CS + j];
                dq += dp * kj;
                if (j < i) {
                    const float da = dM[i * FLA_CS + j];
                    dbk += da * kj;
                    dg += (dp * q + da * b * k) * kj;
                }
            }
            // Key role: pairs (m >= i, i).
            for (int m = i; m < l; ++m) {
                const float E = expf(gcs[m * K + c] - g);
                const float dp = p.scale * dN[m * FLA_CS + i];
                const float da = m > i ? dM[m * FLA_CS + i] : 0.0f;
                const float coef = (dp * qb[m * FLA_KS + c] + da * bs[m] * kb[m * FLA_KS + c]) * E;
                dk += coef;
                if (m > i) dg -= coef * k;
            }
        } else {
            for (int j = 0; j <= i; ++j) {
                dq += dN[i * FLA_CS + j] * kb[j * FLA_KS + c];
                dbk += dM[i * FLA_CS + j] * kb[j * FLA_KS + c];
            }
            for (int m = i; m < l; ++m)
                dk += dN[m * FLA_CS + i] * qb[m * FLA_KS + c] + dM[m * FLA_CS + i] * bs[m] * kb[m * FLA_KS + c];
        }
        dk += b * dbk;
        atomicAdd(&rowb[i], k * dbk);
        dgc[i * FLA_KS + c] = dg;
        bp.dqa[r] = dq;
        bp.dka[r] = dk;
    }
    __syncthreads();
    if (tid < l) bp.dbh[(bos + tid) * p.hv + hv] += rowb[tid];
    // Undo the in-chunk cumulative sum.
    if (channel) {
        if (tid < K) {
            float acc = dglc[tid];
            for (int i = l - 1; i >= 0; --i) {
                acc += dgc[i * FLA_KS + tid];
                bp.dgh[((bos + i) * p.hv + hv) * K + tid] = acc;
            }
        }
        return;
    }
    // Head decay: row sums of dgc into rowg, then one scan.
    if (tid < l) {
        float s = 0.0f;
        for (int c = 0; c < K; ++c) s += dgc[tid * FLA_KS + c];
        rowg[tid] += s;
    }
    __syncthreads();
    if (tid == 0) {
        float acc = 0.0f;
        for (int c = 0; c < K; ++c) acc += dglc[c];
        for (int i = l - 1; i >= 0; --i) {
            acc += rowg[i];
            bp.dgh[(bos + i) * p.hv + hv] = acc;
        }
    }
}

// One CTA (128 threads) per token: a warp per q/k head row, a thread per value head (or
// (value head, channel) for the gate).
extern "C" __global__ void __launch_bounds__(128) chunk_bwd_post(const ChunkBwdParams bp) {
    const ChunkParams& p = bp.f;
    const long long tok = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = p.hv / p.h;
    for (int hh = warp; hh < p.h && !bp.qk_done; hh += 4) {
        float dq[FLA_KMAX / 32], dk[FLA_KMAX / 32], qv[FLA_KMAX / 32], kv[FLA_KMAX / 32];
        float sq = 0.0f, sk = 0.0f;
        const long long base = (tok * p.h + hh) * p.dk;
#pragma unroll
        for (int r = 0; r < FLA_KMAX / 32; ++r) {
            const int c = lane + 32 * r;
            dq[r] = dk[r] = qv[r] = kv[r] = 0.0f;
            if (c >= p.dk) continue;
            for (int g = 0; g < group; ++g) {
                const long long i = (tok * p.hv + hh * group + g) * p.dk + c;
                dq[r] += bp.dqa[i];
                dk[r] += bp.dka[i];
            }
            qv[r] = fla_load(p.q, p.dtype, base + c);
            kv[r] = fla_load(p.k, p.dtype, base + c);
            sq += qv[r] * qv[r];
            sk += kv[r] * kv[r];
        }
        if (p.l2norm) {
            // y = x r with r = 1/sqrt(sum x^2 + eps): dx = r (dy - y (y . dy)).
            fla_warp_sum2(sq, sk);
            const float rq = chunk_rnorm(sq), rk = chunk_rnorm(sk);
            float yq = 0.0f, yk = 0.0f;
#pragma unroll
            for (int r = 0; r < FLA_KMAX / 32; ++r) {
                yq += qv[r] * rq * dq[r];
                yk += kv[r] * rk * dk[r];
            }
            fla_warp_sum2(yq, yk);
#pragma unroll
            for (int r = 0; r < FLA_KMAX / 32; ++r) {
                dq[r] = rq * (dq[r] - qv[r] * rq * yq);
                dk[r] = rk * (dk[r] - kv[r] * rk * yk);
            }
        }
#pragma unroll
        for (int r = 0; r < FLA_KMAX / 32; ++r) {
            const int c = lane + 32 * r;
            if (c < p.dk) {
                fla_store(bp.dq, p.dtype, base + c, dq[r]);
                fla_store(bp.dk, p.dtype, base + c, dk[r]);
            }
        }
    }
    for (int j = threadIdx.x; j < p.hv; j += blockDim.x) {
        const long long i = tok * p.hv + j;
        float db = bp.dbh[i];
        if (p.beta_sigmoid) {
            const float s = fla_sigmoidf(fla_load(p.beta, p.dtype, i));
            db *= s * (1.0f - s);
        }
        fla_store(bp.dbeta, p.dtype, i, db);
    }
    if (!bp.dg) return;
    const int KG = p.channel ? p.dk : 1;
    for (int e = threadIdx.x; e < p.hv * KG; e += blockDim.x) {
        const int j = e / KG, c = e % KG;
        const long long i = (tok * p.hv + j) * KG + c;
        float dg = bp.dgh[i];
        if (p.use_gate) {
            // g = -e_a softplus(r), r = raw + dt_bias: dA_log = sum dg g, dr = dg (-e_a) sigmoid(r).
            const int di = p.dt_per_channel ? j * p.dk + c : j;
            const float ea = expf(fla_load(p.a_log, p.a_log_dtype, j));
            const float r = fla_load(p.g, p.dtype, i) + fla_load(p.dt_bias, p.dt_bias_dtype, di);
            atomicAdd(&bp.gate_acc[j], dg * -ea * fla_softplusf(r));
            dg *= -ea * fla_sigmoidf(r);
            atomicAdd(&bp.gate_acc[p.hv + di], dg);
        }
        fla_store(bp.dg, p.dtype, i, dg);
    }
}

// One CTA: the summed A_log and dt_bias gradients into their dtypes.
extern "C" __global__ void __launch_bounds__(128) chunk_bwd_gate_params(const ChunkBwdParams bp) {
    const ChunkParams& p = bp.f;
    const int dt_len = p.dt_per_channel ? p.hv * p.dk : p.hv;
    for (int j = threadIdx.x; j < p.hv; j += blockDim.x) fla_store(bp.da_log, p.a_log_dtype, j, bp.gate_acc[j]);
    for (int j = threadIdx.x; j < dt_len; j += blockDim.x)
        fla_store(bp.ddt_bias, p.dt_bias_dtype, j, bp.gate_acc[p.hv + j]);
}
