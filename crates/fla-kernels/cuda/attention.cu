// Gated softmax attention of the Qwen3.5 / Qwen3-Next "full_attention" layers over a KV cache
// pool (fla-nn/src/attention.rs is the CPU twin; `attention_launch` in fla-nn/src/cuda.rs
// launches these and picks the path):
//
// attn_prep: q / k RMSNorm (1 + w) and partial rotate-half RoPE; k and v into the cache pools
//   [N, cap, KVH, hd] at each token's position. Null norms skip the norm, rot = 0 the RoPE, and
//   null kn / vn the cache writes (the caller filled the pools): multi-head latent attention
//   (fla-nn/src/mla.rs) expands its keys and values into the pools itself, q / k / v zero-padded
//   to one head_dim, and uses only the attention kernels.
// attn_split_<dt>_e<EPL>_g<GC>: split-KV ("flash-decoding") attention for any dtype. A CTA (4
//   warps) takes one query token, one KV head and GC query heads of its GQA group, over one slice
//   of split_len keys of the token's causal context (keys 0..=pos of its sequence). Each warp
//   takes U keys at a time (keys warp U.., then 4 U on): one key row per warp load, lane l holding
//   elements l EPL .. l EPL + EPL - 1 (head_dim 256 in bf16: 16-byte loads), so K and V are read
//   once for the GC heads. Scores are reduced across the warp; each warp keeps, per head, an
//   online softmax (running max and sum, log2 domain) and o in f32 registers; the 4 warps merge
//   in shared memory. With one split the CTA writes the gated output, otherwise its partial
//   (unnormalised o, max, sum) to the f32 scratch `part`.
// attn_combine: one CTA (8 warps) per (token, query head) merges the splits (log-sum-exp) and applies the
//   output gate sigmoid(gate).
// attn_prefill_tc_<dt>_d<HD>: FA2-style causal attention on tensor cores (mma.sync m16n8k16,
//   f32 accumulation) for bf16 / f16 and head_dim 64, 128, 256. A CTA (4 warps) takes a block of
//   64 query rows of one sequence (a row of the `qblk` table) and one query head; warp w owns rows
//   16 w .. 16 w + 15. Q [64][HD] stays in shared memory (its A fragments are reloaded per
//   k-step: for HD = 256 the O accumulator alone is 128 f32 per thread); K and V blocks of 64
//   cache rows are staged in shared memory, double-buffered with cp.async, up to the last row's
//   causal limit. Per block: S = Q K^T (16 x 64 per warp, in registers), causal mask, online
//   softmax in registers, P rounded to 16 bits as A fragments, O += P V.
#include "common/dtype.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"

typedef unsigned short u16;

#define ATTN_NT 128           // threads per CTA of every attention kernel (4 warps)
#define ATTN_WARPS 4
#define ATTN_MAX_SPLITS 256   // keep in sync with `MAX_SPLITS` in fla-nn/src/cuda.rs
#define ATTN_LOG2E 1.4426950408889634f

// Keep in sync with `AttnParams` in fla-nn/src/cuda.rs (repr(C)).
struct AttnParams {
    const void* qg;         // [tokens, H, per]: q_proj output, per = hd (or 2 hd: [q | gate] per head)
    const void* kn;         // [tokens, KVH, hd]: k_proj output, or null: the caches are filled already
    const void* vn;         // [tokens, KVH, hd]: v_proj output (null with kn)
    const float* q_norm;    // [hd] (1 + w form), or null: no norm
    const float* k_norm;    // [hd], or null
    const float* inv_freq;  // [rot / 2] (unread when rot = 0)
    void* q;                // [tokens, H, hd] scratch: q after norm and RoPE
    void* kc;               // [N, cap, KVH, hd]: the key cache (after norm and RoPE)
    void* vc;               // [N, cap, KVH, hd]: the value cache
    void* o;                // [tokens, H, hd], gated
    const int* seq_of;      // [tokens]: the sequence of each token
    const int* pos;         // [tokens]: its position (tokens before it in its sequence, cached ones included)
    float* part;            // split-KV scratch: [tokens, H, splits, hd] unnormalised o, then [tokens, H, splits, 2] (max, sum)
    const int* qblk;        // tensor-core prefill: [blocks, 2] (first token, rows <= 64) of each query block
    int dtype, tokens, h, kvh, hd, per, rot, cap, gate;
    int splits, split_len;  // split-KV: slices per token context and keys per slice
    float eps, scale;
};

// RMSNorm (1 + w; none when w is null) then rotate-half RoPE on the first `rot` dims of one head
// row in shared memory `x` (hd values): the angle pos * inv_freq in f32, its cosine and sine in
// f64, as transformers.
__device__ __forceinline__ void attn_norm_rope(const AttnParams& p, float* x, const float* w, int pos, float* red) {
    if (w) {  // the same for the whole CTA, so the barriers inside are reached by every thread
        float ss = 0.0f;
        for (int d = threadIdx.x; d < p.hd; d += ATTN_NT) ss += x[d] * x[d];
        float unused = 0.0f;
        fla_warp_sum2(ss, unused);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
        __syncthreads();
        const float r = rsqrtf((red[0] + red[1] + red[2] + red[3]) / p.hd + p.eps);
        __syncthreads();
        for (int d = threadIdx.x; d < p.hd; d += ATTN_NT) x[d] *= r * (1.0f + w[d]);
        __syncthreads();
    }
    const int half = p.rot / 2;
    for (int i = threadIdx.x; i < half; i += ATTN_NT) {
        const double a = (double)((float)pos * p.inv_freq[i]);
        const float c = (float)cos(a), s = (float)sin(a);
        const float x0 = x[i], x1 = x[i + half];
        x[i] = x0 * c - x1 * s;
        x[i + half] = x1 * c + x0 * s;
    }
    __syncthreads();
}

// One CTA per (token, head) for the H query heads, then the KVH key/value heads: q normed and
// rotated into `q`; k normed and rotated, and v, into the caches at the token's position (not
// with null kn: the key/value CTAs return at once).
extern "C" __global__ void __launch_bounds__(ATTN_NT) attn_prep(const AttnParams p) {
    __shared__ float x[512];
    __shared__ float red[4];
    const int t = blockIdx.x, j = blockIdx.y;
    const int n = p.seq_of[t], pos = p.pos[t];
    if (j < p.h) {
        for (int d = threadIdx.x; d < p.hd; d += ATTN_NT) x[d] = fla_load(p.qg, p.dtype, ((long long)t * p.h + j) * p.per + d);
        __syncthreads();
        attn_norm_rope(p, x, p.q_norm, pos, red);
        for (int d = threadIdx.x; d < p.hd; d += ATTN_NT) fla_store(p.q, p.dtype, ((long long)t * p.h + j) * p.hd + d, x[d]);
        return;
    }
    if (!p.kn) return;
    const int kh = j - p.h;
    const long long src = ((long long)t * p.kvh + kh) * p.hd;
    const long long dst = (((long long)n * p.cap + pos) * p.kvh + kh) * p.hd;
    for (int d = threadIdx.x; d < p.hd; d += ATTN_NT) {
        x[d] = fla_load(p.kn, p.dtype, src + d);
        fla_store(p.vc, p.dtype, dst + d, fla_load(p.vn, p.dtype, src + d));
    }
    __syncthreads();
    attn_norm_rope(p, x, p.k_norm, pos, red);
    for (int d = threadIdx.x; d < p.hd; d += ATTN_NT) fla_store(p.kc, p.dtype, dst + d, x[d]);
}

// The output gate sigmoid(gate) of (token row `row` = t H + j, column d), or 1 without a gate.
__device__ __forceinline__ float attn_gate(const AttnParams& p, long long row, int d) {
    return p.gate ? fla_sigmoidf(fla_load(p.qg, p.dtype, row * p.per + p.hd + d)) : 1.0f;
}

// ---------------------------------------------------------------------------------------------
// Split-KV attention.

// Lane `lane`'s EPL elements (lane EPL ..) of the row at element offset `row` of `base` as f32,
// zero past hd. A full row (hd = 32 EPL) is read with vector loads: the row offset is a multiple
// of hd, so each lane's piece is aligned to its size.
template <int DT, int EPL>
__device__ __forceinline__ void attn_row(float (&x)[EPL], const void* base, long long row, int lane, int hd) {
    constexpr int ES = DT == FLA_F32 ? 4 : 2, BYTES = EPL * ES, WORDS = BYTES / 4;
    const int d0 = lane * EPL;
    if (hd == 32 * EPL) {
        unsigned w[WORDS];
        const char* src = static_cast<const char*>(base) + (row + d0) * ES;
        if constexpr (BYTES >= 16) {
#pragma unroll
            for (int i = 0; i < BYTES / 16; ++i) {
                const uint4 v = reinterpret_cast<const uint4*>(src)[i];
                w[4 * i] = v.x;
                w[4 * i + 1] = v.y;
                w[4 * i + 2] = v.z;
                w[4 * i + 3] = v.w;
            }
        } else if constexpr (BYTES == 8) {
            const uint2 v = *reinterpret_cast<const uint2*>(src);
            w[0] = v.x;
            w[1] = v.y;
        } else {
            w[0] = *reinterpret_cast<const unsigned*>(src);
        }
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            if constexpr (DT == FLA_F32) {
                x[e] = __uint_as_float(w[e]);
            } else {
                const u16 h = (u16)(w[e >> 1] >> (16 * (e & 1)));
                x[e] = DT == FLA_BF16 ? fla_bf16_to_f32(h) : fla_f16_to_f32(h);
            }
        }
    } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) x[e] = d0 + e < hd ? fla_ld<DT>(base, row + d0 + e) : 0.0f;
    }
}

// grid (tokens, KVH * ceil(G / GC), splits), G = H / KVH: see the top of the file. Query heads
// past the group's end (G not a multiple of GC) are computed on zeros and not written.
template <int DT, int EPL, int GC>
__device__ __forceinline__ void attn_split(const AttnParams& p) {
    constexpr int U = GC * EPL <= 32 ? 4 : 2;  // keys per warp and step (register budget)
    __shared__ float so[ATTN_WARPS][GC][32 * EPL];
    __shared__ float sml[ATTN_WARPS][GC][2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x, s = blockIdx.z, hd = p.hd;
    const int group = p.h / p.kvh, chunks = (group + GC - 1) / GC;
    const int kh = blockIdx.y / chunks, g0 = (blockIdx.y % chunks) * GC;
    const int n = p.seq_of[t], ctx = p.pos[t] + 1;
    const int k0 = s * p.split_len, k1 = min(ctx, k0 + p.split_len);
    if (k0 >= ctx) return;  // the token's context ends before this slice (the combine skips it)

    float q[GC][EPL], o[GC][EPL], m[GC], l[GC];
    const float qscale = p.scale * ATTN_LOG2E;  // scores in the log2 domain
#pragma unroll
    for (int gi = 0; gi < GC; ++gi) {
        if (g0 + gi < group) {
            attn_row<DT, EPL>(q[gi], p.q, ((long long)t * p.h + kh * group + g0 + gi) * hd, lane, hd);
        } else {
#pragma unroll
            for (int e = 0; e < EPL; ++e) q[gi][e] = 0.0f;
        }
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            q[gi][e] *= qscale;
            o[gi][e] = 0.0f;
        }
        m[gi] = -INFINITY;
        l[gi] = 0.0f;
    }
    const long long rs = (long long)p.kvh * hd;                     // cache row stride
    const long long base = ((long long)n * p.cap * p.kvh + kh) * hd;  // row 0 of (n, kh)
    for (int i0 = k0 + warp * U; i0 < k1; i0 += ATTN_WARPS * U) {
        float kx[U][EPL], vx[U][EPL];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const long long r = base + (long long)min(i0 + u, k1 - 1) * rs;  // past k1: read, masked below
            attn_row<DT, EPL>(kx[u], p.kc, r, lane, hd);
            attn_row<DT, EPL>(vx[u], p.vc, r, lane, hd);
        }
        float sc[GC][U];
#pragma unroll
        for (int gi = 0; gi < GC; ++gi)
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float a = 0.0f;
#pragma unroll
                for (int e = 0; e < EPL; ++e) a += q[gi][e] * kx[u][e];
                sc[gi][u] = a;
            }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
#pragma unroll
            for (int gi = 0; gi < GC; ++gi)
#pragma unroll
                for (int u = 0; u < U; ++u) sc[gi][u] += __shfl_xor_sync(0xffffffffu, sc[gi][u], off);
#pragma unroll
        for (int gi = 0; gi < GC; ++gi) {
            float mx = m[gi];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (i0 + u < k1) mx = fmaxf(mx, sc[gi][u]);
            const float corr = exp2f(m[gi] - mx);  // 0 on the first step (m = -inf, mx finite)
            float pr[U], sum = 0.0f;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                pr[u] = i0 + u < k1 ? exp2f(sc[gi][u] - mx) : 0.0f;
                sum += pr[u];
            }
            l[gi] = l[gi] * corr + sum;
            m[gi] = mx;
#pragma unroll
            for (int e = 0; e < EPL; ++e) {
                float a = o[gi][e] * corr;
#pragma unroll
                for (int u = 0; u < U; ++u) a += pr[u] * vx[u][e];
                o[gi][e] = a;
            }
        }
    }
    // Merge the 4 warps (a warp without keys has m = -inf, l = 0, o = 0; warp 0 always has one).
#pragma unroll
    for (int gi = 0; gi < GC; ++gi) {
#pragma unroll
        for (int e = 0; e < EPL; ++e) so[warp][gi][lane * EPL + e] = o[gi][e];
        if (lane == 0) {
            sml[warp][gi][0] = m[gi];
            sml[warp][gi][1] = l[gi];
        }
    }
    __syncthreads();
    float* ml = p.part + (long long)p.tokens * p.h * p.splits * hd;
    for (int x = threadIdx.x; x < GC * hd; x += ATTN_NT) {
        const int gi = x / hd, d = x - gi * hd;
        if (g0 + gi >= group) break;  // x only grows, and so does gi
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) mx = fmaxf(mx, sml[w][gi][0]);
        float sum = 0.0f, acc = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) {
            const float f = exp2f(sml[w][gi][0] - mx);
            sum += f * sml[w][gi][1];
            acc += f * so[w][gi][d];
        }
        const long long row = (long long)t * p.h + kh * group + g0 + gi;
        if (p.splits == 1) {
            fla_st<DT>(p.o, row * hd + d, acc / sum * attn_gate(p, row, d));
        } else {
            const long long ps = row * p.splits + s;
            p.part[ps * hd + d] = acc;
            if (d == 0) {
                ml[2 * ps] = mx;
                ml[2 * ps + 1] = sum;
            }
        }
    }
}

#define ATTN_SPLIT(NAME, DT, EPL, GC)                                                                        \
    extern "C" __global__ void __launch_bounds__(ATTN_NT) attn_split_##NAME##_e##EPL##_g##GC(const AttnParams p) { \
        attn_split<DT, EPL, GC>(p);                                                                          \
    }
#define ATTN_SPLIT_G(NAME, DT, EPL) \
    ATTN_SPLIT(NAME, DT, EPL, 1) ATTN_SPLIT(NAME, DT, EPL, 2) ATTN_SPLIT(NAME, DT, EPL, 4) ATTN_SPLIT(NAME, DT, EPL, 8)
// GC EPL <= 64 keeps the registers and the merge buffer (<= 32 KB) in bounds; keep the shapes
// in sync with `split_shape` in fla-nn/src/cuda.rs.
#define ATTN_SPLIT_DT(NAME, DT)                                                                      \
    ATTN_SPLIT_G(NAME, DT, 2) ATTN_SPLIT_G(NAME, DT, 4) ATTN_SPLIT_G(NAME, DT, 8) ATTN_SPLIT(NAME, DT, 16, 1) \
        ATTN_SPLIT(NAME, DT, 16, 2) ATTN_SPLIT(NAME, DT, 16, 4)
ATTN_SPLIT_DT(f32, FLA_F32)
ATTN_SPLIT_DT(bf16, FLA_BF16)
ATTN_SPLIT_DT(f16, FLA_F16)

#define ATTN_COMBINE_WARPS 8  // keep in sync with `COMBINE_NT` in fla-nn/src/cuda.rs (32 x this)

// grid (tokens, H), 8 warps: o = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over the splits s
// that hold keys of the token's context (M = max m_s), times the output gate. Thread s computes
// split s's weight; warp w sums the rows o_s of the splits s = w, w + 8, .. (lane: columns
// lane + 32 i, several rows in flight), and the 8 warps' sums meet in shared memory.
extern "C" __global__ void __launch_bounds__(32 * ATTN_COMBINE_WARPS) attn_combine(const AttnParams p) {
    constexpr int NT = 32 * ATTN_COMBINE_WARPS;
    static_assert(ATTN_MAX_SPLITS <= NT, "one split per thread");
    __shared__ float w[ATTN_MAX_SPLITS];
    __shared__ float red[ATTN_COMBINE_WARPS];
    __shared__ float acc_s[ATTN_COMBINE_WARPS][512];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int t = blockIdx.x, hd = p.hd;
    const long long row = (long long)t * p.h + blockIdx.y;
    const int ns = (p.pos[t] + p.split_len) / p.split_len;  // ceil((pos + 1) / split_len) <= splits
    const float* ml = p.part + (long long)p.tokens * p.h * p.splits * hd + 2 * row * p.splits;
    const float* po = p.part + row * p.splits * hd;
    // M = max_s m_s (one split per thread: ns <= ATTN_MAX_SPLITS = NT).
    const float ms = tid < ns ? ml[2 * tid] : -INFINITY;
    float mx = ms;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = red[0];
#pragma unroll
    for (int i = 1; i < ATTN_COMBINE_WARPS; ++i) mx = fmaxf(mx, red[i]);
    __syncthreads();
    // L = sum_s 2^(m_s - M) l_s.
    const float ws = tid < ns ? exp2f(ms - mx) : 0.0f;
    if (tid < ns) w[tid] = ws;
    float sum = tid < ns ? ws * ml[2 * tid + 1] : 0.0f, unused = 0.0f;
    fla_warp_sum2(sum, unused);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    sum = 0.0f;
#pragma unroll
    for (int i = 0; i < ATTN_COMBINE_WARPS; ++i) sum += red[i];
    float acc[16];  // columns lane + 32 i (hd <= 512)
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.0f;
#pragma unroll 4
    for (int s = warp; s < ns; s += ATTN_COMBINE_WARPS) {
        const float f = w[s];
        const float* r = po + (long long)s * hd;
#pragma unroll
        for (int i = 0; i < 16; ++i)
            if (lane + 32 * i < hd) acc[i] += f * r[lane + 32 * i];
    }
#pragma unroll
    for (int i = 0; i < 16; ++i)
        if (lane + 32 * i < hd) acc_s[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    const float inv = 1.0f / sum;
    for (int d = tid; d < hd; d += NT) {
        float o = 0.0f;
#pragma unroll
        for (int i = 0; i < ATTN_COMBINE_WARPS; ++i) o += acc_s[i][d];
        fla_store(p.o, p.dtype, row * hd + d, o * inv * attn_gate(p, row, d));
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core prefill.

#define ATTN_BQ 64  // query rows per CTA (16 per warp)

// grid (H, query blocks): see the top of the file. Heads vary fastest, so the blocks with the
// longest contexts (first in `qblk`) start first for every head.
template <class E, int HD>
__device__ __forceinline__ void attn_prefill_tc(const AttnParams& p) {
    // BK cache rows per K / V block: 32 for HD = 256, where the O accumulator takes 128 registers.
    constexpr int BK = HD == 256 ? 32 : 64, NTS = BK / 8, LD = HD + 8, NTO = HD / 8, KS = HD / 16;
    // Dynamic shared memory: Q [64][HD + 8], then K and V double-buffered, [BK][HD + 8] each, 16-bit
    // (a 16-byte pad per row keeps ldmatrix conflict-free): (64 + 4 BK) (HD + 8) 2 bytes, `tc_smem`
    // in fla-nn/src/cuda.rs.
    extern __shared__ __align__(16) unsigned char smem[];
    u16* qs = reinterpret_cast<u16*>(smem);
    u16* ks0 = qs + ATTN_BQ * LD;             // K buffers 0, 1: ks0 + buf * BK LD
    u16* vs0 = qs + (ATTN_BQ + 2 * BK) * LD;  // V buffers 0, 1
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3, m0 = warp * 16;
    const int t0 = p.qblk[2 * blockIdx.y], qn = p.qblk[2 * blockIdx.y + 1], j = blockIdx.x;
    const int n = p.seq_of[t0], pos0 = p.pos[t0], kh = j / (p.h / p.kvh);
    // Row r of the block is token t0 + r at position pos0 + r; it sees cache rows 0 ..= pos0 + r.
    const int kv_end = pos0 + qn, nkb = (kv_end + BK - 1) / BK;
    const long long rs = (long long)p.kvh * HD;
    const u16* kg = static_cast<const u16*>(p.kc) + ((long long)n * p.cap * p.kvh + kh) * HD;
    const u16* vg = static_cast<const u16*>(p.vc) + ((long long)n * p.cap * p.kvh + kh) * HD;
    fla_load_tile<ATTN_NT, ATTN_BQ, HD>(qs, LD, static_cast<const u16*>(p.q) + ((long long)t0 * p.h + j) * HD,
                                        (long long)p.h * HD, qn);
    fla_load_tile<ATTN_NT, BK, HD>(ks0, LD, kg, rs, min(BK, kv_end));
    fla_load_tile<ATTN_NT, BK, HD>(vs0, LD, vg, rs, min(BK, kv_end));
    fla_cp_commit();

    float acc[NTO][4];  // O: rows m0 + gq (+ 8), columns 8 nt + 2 tq (+ 1)
#pragma unroll
    for (int nt = 0; nt < NTO; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][r] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};  // rows gq, gq + 8 (lrow: this thread's columns)
    const float qscale = p.scale * ATTN_LOG2E;
    const int qpos = pos0 + m0 + gq;  // position of this thread's first row

    for (int b = 0; b < nkb; ++b) {
        const int cur = (b & 1) * BK * LD, next = BK * LD - cur;
        const u16 *kt = ks0 + cur, *vt = vs0 + cur;
        if (b + 1 < nkb) {
            const int r0 = (b + 1) * BK;
            fla_load_tile<ATTN_NT, BK, HD>(ks0 + next, LD, kg + r0 * rs, rs, min(BK, kv_end - r0));
            fla_load_tile<ATTN_NT, BK, HD>(vs0 + next, LD, vg + r0 * rs, rs, min(BK, kv_end - r0));
            fla_cp_commit();
            fla_cp_wait_one();
        } else {
            fla_cp_wait_all();
        }
        __syncthreads();
        // S = Q K^T for this warp's 16 rows and the block's BK keys.
        float s[NTS][4];
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[nt][r] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            unsigned a[4];
            fla_frag_a(a, qs, LD, m0, ks * 16);
#pragma unroll
            for (int np = 0; np < NTS / 2; ++np) {
                unsigned bb[4];
                fla_frag_b_nk(bb, kt, LD, ks * 16, np * 16);
                fla_mma<E>(s[2 * np], a, bb[0], bb[1]);
                fla_mma<E>(s[2 * np + 1], a, bb[2], bb[3]);
            }
        }
        // Causal mask, scale to the log2 domain, running max per row (over the quad's lanes).
        float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int key = b * BK + nt * 8 + 2 * tq + (r & 1);
                const float v = key <= qpos + 8 * (r >> 1) ? s[nt][r] * qscale : -INFINITY;
                s[nt][r] = v;
                mx[r >> 1] = fmaxf(mx[r >> 1], v);
            }
        float corr[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
            mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 1));
            mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 2));
            // Finite: key 0 is visible to every row, and block 0 comes first.
            corr[h2] = exp2f(mrow[h2] - mx[h2]);
            mrow[h2] = mx[h2];
            lrow[h2] *= corr[h2];
        }
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                s[nt][r] = exp2f(s[nt][r] - mrow[r >> 1]);
                lrow[r >> 1] += s[nt][r];
            }
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[nt][r] *= corr[r >> 1];
        // O += P V: the C fragments of S n-tiles 2 kk, 2 kk + 1 are the A fragment of keys
        // 16 kk .. 16 kk + 15.
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            const unsigned a[4] = {fla_pack2<E>(s[2 * kk][0], s[2 * kk][1]), fla_pack2<E>(s[2 * kk][2], s[2 * kk][3]),
                                   fla_pack2<E>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   fla_pack2<E>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                unsigned bb[4];
                fla_frag_b_kn(bb, vt, LD, kk * 16, dp * 16);
                fla_mma<E>(acc[2 * dp], a, bb[0], bb[1]);
                fla_mma<E>(acc[2 * dp + 1], a, bb[2], bb[3]);
            }
        }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
    // o = O / l, gated, rows < qn.
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
        lrow[h2] += __shfl_xor_sync(0xffffffffu, lrow[h2], 1);
        lrow[h2] += __shfl_xor_sync(0xffffffffu, lrow[h2], 2);
    }
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
        const int r = m0 + gq + 8 * h2;
        if (r >= qn) continue;
        const long long row = (long long)(t0 + r) * p.h + j;
        const float inv = 1.0f / lrow[h2];
        const u16* gate = static_cast<const u16*>(p.qg) + row * p.per + HD;
        u16* out = static_cast<u16*>(p.o) + row * HD;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
            const int c = nt * 8 + 2 * tq;
            float y0 = acc[nt][2 * h2] * inv, y1 = acc[nt][2 * h2 + 1] * inv;
            if (p.gate) {
                y0 *= fla_sigmoidf(fla_to_f32<E>(gate[c]));
                y1 *= fla_sigmoidf(fla_to_f32<E>(gate[c + 1]));
            }
            *reinterpret_cast<unsigned*>(out + c) = fla_pack2<E>(y0, y1);
        }
    }
}

#define ATTN_TC(NAME, E, HD)                                                                            \
    extern "C" __global__ void __launch_bounds__(ATTN_NT) attn_prefill_tc_##NAME##_d##HD(const AttnParams p) { \
        attn_prefill_tc<E, HD>(p);                                                                      \
    }
ATTN_TC(bf16, FlaBf16, 64)
ATTN_TC(bf16, FlaBf16, 128)
ATTN_TC(bf16, FlaBf16, 256)
ATTN_TC(f16, FlaF16, 64)
ATTN_TC(f16, FlaF16, 128)
ATTN_TC(f16, FlaF16, 256)
