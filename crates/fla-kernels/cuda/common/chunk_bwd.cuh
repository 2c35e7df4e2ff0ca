// Parameters of the chunk backward kernels (chunk_bwd.cu: f32 path; chunk_bwd_tc.cu: tensor
// cores).
#pragma once
#include "common/chunk.cuh"

// Keep in sync with `ChunkBwdParams` in fla-ops/src/cuda.rs (repr(C)).
struct ChunkBwdParams {
    ChunkParams f;        // inputs, options and the forward's scratch (qn, kn, gf, bf, w, gc, tm, hs, vn)
    const void* d_o;      // [tokens, HV, V], dtype of q
    const float* dht;     // [N, HV, K, V] or null
    void* dq;             // [tokens, H, K], dtype of q (as dk, dv, dg, dbeta)
    void* dk;             // [tokens, H, K]
    void* dv;             // [tokens, HV, V]
    void* dg;             // [tokens, HV(, K)] or null (no decay)
    void* dbeta;          // [tokens, HV]
    float* dh0;           // [N, HV, K, V] or null
    void* da_log;         // [HV] (dtype of A_log) or null
    void* ddt_bias;       // [HV] or [HV K] (dtype of dt_bias) or null
    // Scratch.
    void* dhs;            // [nc, HV, K, V]: gradient of the state leaving each chunk (f32, or 16-bit on the tensor-core path)
    void* du;             // [tokens, HV, V]: dU (f32, or 16-bit on the tensor-core path)
    float* dp;            // [tokens, HV, C]: dP rows
    float* da;            // [tokens, HV, C]: dA rows
    float* dqa;           // [tokens, HV, K]: dq per value head (f32 path: dQg first)
    float* dka;           // [tokens, HV, K]: dk per value head (f32 path: dKt first)
    float* dkb;           // [tokens, HV, K]: dKb
    float* dgl;           // [nc, HV, K]: dG_L from the state decay
    float* dbh;           // [tokens, HV]: dbeta before the sigmoid
    float* dgh;           // [tokens, HV(, K)]: dg before the gate
    float* gate_acc;      // [HV + HV K], zeroed: sums of dA_log, then of ddt_bias
    int qk_done;          // 1: dq, dk written by chunk_bwd_tc_dqk (HV = H); chunk_bwd_post skips them
};
