// Warp-level tensor-core helpers (sm_80+ `mma.sync` m16n8k16 with f32 accumulation, `ldmatrix`,
// `cp.async`) for 16-bit element types, chosen by a tag type.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A 16x16: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8:  b0 = (2t..2t+1, g), b1 = (2t+8.., g)
//   C 16x8:  c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
#pragma once
#include "common/dtype.cuh"

struct FlaBf16 { static constexpr int code = FLA_BF16; };
struct FlaF16 { static constexpr int code = FLA_F16; };

// Two f32 values rounded to the element type and packed (lo in the low half).
template <class E> __device__ __forceinline__ unsigned fla_pack2(float lo, float hi) {
    unsigned d;
    if constexpr (E::code == FLA_BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// One element of the type as f32.
template <class E> __device__ __forceinline__ float fla_to_f32(unsigned short h) {
    if constexpr (E::code == FLA_BF16) return fla_bf16_to_f32(h);
    else return fla_f16_to_f32(h);
}

// One f32 value rounded to the element type.
template <class E> __device__ __forceinline__ unsigned short fla_from_f32(float x) {
    if constexpr (E::code == FLA_BF16) return fla_f32_to_bf16(x);
    else return fla_f32_to_f16(x);
}

// c += a b for one m16n8k16 tile.
template <class E>
__device__ __forceinline__ void fla_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if constexpr (E::code == FLA_BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ unsigned fla_smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void fla_ldsm4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fla_smem_addr(p)));
}

// The same, each matrix transposed.
__device__ __forceinline__ void fla_ldsm4_t(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fla_smem_addr(p)));
}

// A fragment of the 16x16 block at (r0, c0) of a row-major tile `x` (row stride `ld` elements).
__device__ __forceinline__ void fla_frag_a(unsigned (&a)[4], const unsigned short* x, int ld, int r0, int c0) {
    const int lane = threadIdx.x & 31;
    fla_ldsm4(a, x + (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8);
}

// A fragment of the 16x16 block at (r0, c0) of A = x^T (A[m][k] = x[k][m], `x` row-major with
// stride `ld`): rows r0.. of A are columns r0.. of x, columns c0.. of A are rows c0.. of x.
__device__ __forceinline__ void fla_frag_a_t(unsigned (&a)[4], const unsigned short* x, int ld, int r0, int c0) {
    const int lane = threadIdx.x & 31;
    fla_ldsm4_t(a, x + (c0 + (lane >> 4) * 8 + (lane & 7)) * ld + r0 + ((lane >> 3) & 1) * 8);
}

// B fragments of two n-tiles (n0, n0 + 8) of B[k][n] = x[n][k] for k in k0..k0+16: b[0], b[1]
// for n0 and b[2], b[3] for n0 + 8 (`x` row-major with stride `ld`, e.g. K rows for Q K^T).
__device__ __forceinline__ void fla_frag_b_nk(unsigned (&b)[4], const unsigned short* x, int ld, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    fla_ldsm4(b, x + (n0 + (lane >> 4) * 8 + (lane & 7)) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// B fragments of two n-tiles (n0, n0 + 8) of B[k][n] = x[k][n] (row-major, stride `ld`).
__device__ __forceinline__ void fla_frag_b_kn(unsigned (&b)[4], const unsigned short* x, int ld, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    fla_ldsm4_t(b, x + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * ld + n0 + (lane >> 4) * 8);
}

// 16 bytes global -> shared, asynchronously; zero-filled when `valid` is false.
__device__ __forceinline__ void fla_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(fla_smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void fla_cp_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void fla_cp_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
// Waits for all but the most recently committed group.
__device__ __forceinline__ void fla_cp_wait_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// Starts copying ROWS x COLS 16-bit elements (COLS a multiple of 8) from global rows
// `src + r * gstride` into the shared tile `dst` (row stride `ld`); rows >= `valid` read as zero.
// Compile-time sizes keep the index arithmetic to shifts.
template <int NT, int ROWS, int COLS>
__device__ __forceinline__ void fla_load_tile(unsigned short* dst, int ld, const unsigned short* src,
                                              long long gstride, int valid) {
    constexpr int PER_ROW = COLS / 8;
#pragma unroll
    for (int e0 = 0; e0 < ROWS * PER_ROW; e0 += NT) {
        const int e = e0 + threadIdx.x;
        if (ROWS * PER_ROW % NT == 0 || e < ROWS * PER_ROW) {
            const int r = e / PER_ROW, c = (e % PER_ROW) * 8;
            const bool ok = r < valid;
            fla_cp16(dst + r * ld + c, src + (ok ? r : 0) * gstride + c, ok);
        }
    }
}

// x split into a TF32 head and a TF32 tail (x ≈ hi + lo to about 2^-22), for 3xTF32 products.
__device__ __forceinline__ void fla_tf32_split(float x, unsigned& hi, unsigned& lo) {
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(hi) : "f"(x));
    const float r = x - __uint_as_float(hi);
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(lo) : "f"(r));
}

// c += a b for one m16n8k8 TF32 tile.
__device__ __forceinline__ void fla_mma_tf32(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c (16 x 8, C-fragment layout) += a[r0.., k0..k0+8] b[k0.., n0..n0+8] for f32 tiles in shared
// memory (row strides lda, ldb), to about f32 accuracy (3xTF32: hi·hi + hi·lo + lo·hi).
__device__ __forceinline__ void fla_mma_f32x3(float (&c)[4], const float* a, int lda, const float* b, int ldb,
                                              int r0, int k0, int n0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float av[4] = {a[(r0 + g) * lda + k0 + t], a[(r0 + g + 8) * lda + k0 + t], a[(r0 + g) * lda + k0 + t + 4],
                         a[(r0 + g + 8) * lda + k0 + t + 4]};
    const float bv[2] = {b[(k0 + t) * ldb + n0 + g], b[(k0 + t + 4) * ldb + n0 + g]};
    unsigned ah[4], al[4], bh[2], bl[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) fla_tf32_split(av[i], ah[i], al[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) fla_tf32_split(bv[i], bh[i], bl[i]);
    fla_mma_tf32(c, al, bh[0], bh[1]);
    fla_mma_tf32(c, ah, bl[0], bl[1]);
    fla_mma_tf32(c, ah, bh[0], bh[1]);
}
