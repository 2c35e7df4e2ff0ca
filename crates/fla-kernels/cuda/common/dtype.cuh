// Loads and stores of the input dtypes (f32, bf16, f16) as f32, chosen at run time.
// Header-free conversions through PTX `cvt`, so the kernels need no CUDA headers.
#pragma once

// Input dtype codes; keep in sync with `fla-ops/src/cuda.rs`.
#define FLA_F32 0
#define FLA_BF16 1
#define FLA_F16 2

__device__ __forceinline__ float fla_bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

__device__ __forceinline__ float fla_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short fla_f32_to_bf16(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ unsigned short fla_f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Element `i` of `p` (dtype `dt`) as f32.
__device__ __forceinline__ float fla_load(const void* p, int dt, long long i) {
    if (dt == FLA_F32) return static_cast<const float*>(p)[i];
    unsigned short h = static_cast<const unsigned short*>(p)[i];
    return dt == FLA_BF16 ? fla_bf16_to_f32(h) : fla_f16_to_f32(h);
}

// Stores `x` as element `i` of `p` (dtype `dt`), rounding to nearest even.
__device__ __forceinline__ void fla_store(void* p, int dt, long long i, float x) {
    if (dt == FLA_F32) {
        static_cast<float*>(p)[i] = x;
    } else {
        static_cast<unsigned short*>(p)[i] = dt == FLA_BF16 ? fla_f32_to_bf16(x) : fla_f32_to_f16(x);
    }
}

// `x` rounded to dtype `dt` (to nearest even) and back: what storing and reloading it gives.
__device__ __forceinline__ float fla_round(int dt, float x) {
    if (dt == FLA_F32) return x;
    return dt == FLA_BF16 ? fla_bf16_to_f32(fla_f32_to_bf16(x)) : fla_f16_to_f32(fla_f32_to_f16(x));
}

// Element `i` of `p`, of compile-time dtype `DT`, as f32 (branch-free, so loads batch up).
template <int DT>
__device__ __forceinline__ float fla_ld(const void* p, long long i) {
    if constexpr (DT == FLA_F32) {
        return static_cast<const float*>(p)[i];
    } else {
        const unsigned short h = static_cast<const unsigned short*>(p)[i];
        if constexpr (DT == FLA_BF16) return fla_bf16_to_f32(h);
        else return fla_f16_to_f32(h);
    }
}

// Stores `x` as element `i` of `p`, of compile-time dtype `DT`.
template <int DT>
__device__ __forceinline__ void fla_st(void* p, long long i, float x) {
    if constexpr (DT == FLA_F32) static_cast<float*>(p)[i] = x;
    else if constexpr (DT == FLA_BF16) static_cast<unsigned short*>(p)[i] = fla_f32_to_bf16(x);
    else static_cast<unsigned short*>(p)[i] = fla_f32_to_f16(x);
}
