// Scalar functions shared by the kernels (the in-op beta sigmoid and gate softplus).
#pragma once

__device__ __forceinline__ float fla_sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// softplus(x) = log(1 + e^x), exact to f32 for x > 20 (as in FLA and PyTorch's threshold).
__device__ __forceinline__ float fla_softplusf(float x) { return x > 20.0f ? x : logf(1.0f + expf(x)); }

// a and b summed over the 32 lanes of the warp (butterfly: every lane gets both sums).
__device__ __forceinline__ void fla_warp_sum2(float& a, float& b) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, off);
        b += __shfl_xor_sync(0xffffffffu, b, off);
    }
}

// Inclusive prefix sums of 64 values held two per lane (lane l: element l in a, element 32 + l in
// b): afterwards a = sum of elements 0..l, b = sum of elements 0..32 + l.
__device__ __forceinline__ void fla_warp_scan64(float& a, float& b) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const float x = __shfl_up_sync(0xffffffffu, a, off), y = __shfl_up_sync(0xffffffffu, b, off);
        if (lane >= off) {
            a += x;
            b += y;
        }
    }
    b += __shfl_sync(0xffffffffu, a, 31);
}
