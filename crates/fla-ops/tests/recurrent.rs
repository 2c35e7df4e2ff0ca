//! The fused recurrent step (FLA: `test_fused_recurrent`, and the decode-equals-prefill checks of
//! the model tests): token-by-token decoding equals the chunk forward, split calls equal one call
//! (for both the step and the chunk form carrying its final state), and packed and fixed batches
//! equal their sequences run one at a time.
mod common;

use common::{cat, data_row, data_tokens, slice, tensor, Checker, Data, DtBias, Spec};
use fla_core::{DType, Tensor};
use fla_ops::{chunk, naive, recurrent, Decay, Family, Inputs};

/// f32 against an f32 computation in another order.
const TOL: f64 = 1e-4;
/// The same arithmetic cut at another place.
const SPLIT_TOL: f64 = 1e-5;

/// `[B, T, H, HV, K, V]`: V = 20 walks one full 16-column block of the state and 4 single
/// columns; V = 40 two blocks and 8 columns.
const SHAPES: [[usize; 6]; 2] = [[2, 70, 2, 4, 16, 20], [1, 67, 1, 2, 8, 40]];

/// Runs `recurrent::step` on `x` (its `h0` as the starting state, zeros without), returning `o`
/// and the updated state.
fn step(spec: &Spec, x: &Data, state: Option<Tensor>) -> (Tensor, Tensor) {
    let n = x.cu_seqlens.as_ref().map_or(x.q.shape()[0], |c| c.len() - 1);
    let mut state =
        state.or_else(|| x.h0.clone()).unwrap_or_else(|| Tensor::zeros(&[n, spec.hv, spec.k, spec.v], DType::F32));
    let inputs = Inputs { initial_state: None, ..x.inputs() };
    let o = recurrent::step(spec.family, &inputs, &spec.opts(), &mut state).unwrap();
    (o, state)
}

fn specs(family: Family) -> Vec<Spec> {
    let mut out = Vec::new();
    for (i, shape) in SHAPES.into_iter().enumerate() {
        for h0 in [false, true] {
            out.push(Spec::new(family, shape).h0(h0).seed(100 + 2 * i as u64 + h0 as u64));
        }
    }
    let dt = match family.decay() {
        Decay::None => None,
        Decay::Head => Some(DtBias::Head),
        Decay::Channel => Some(DtBias::Flat),
    };
    let mut s = Spec::new(family, SHAPES[0]).l2norm().h0(true).seed(7);
    if family.erase() != fla_ops::Erase::None {
        s = s.sigmoid();
    }
    if let Some(dt) = dt {
        s = s.gate_in_kernel(dt);
    }
    out.push(s);
    out
}

/// One token at a time, the state carried between calls, equals the chunk forward and the f64
/// reference.
fn token_by_token(family: Family) {
    let mut c = Checker::default();
    for spec in specs(family) {
        let ctx = spec.label();
        let x = spec.data().cast(DType::F32);
        let want = chunk::forward(family, &x.inputs(), &spec.opts()).unwrap();
        let reference = naive::forward(family, &x.cast(DType::F64).inputs(), &spec.opts()).unwrap();
        let mut state = x.h0.clone();
        let mut outs = Vec::new();
        for t in 0..spec.t {
            let (o, s) = step(&spec, &data_tokens(&x, t, 1), state.take());
            assert_eq!(o.shape(), [spec.b, 1, spec.hv, spec.v], "{ctx}");
            assert_eq!(o.dtype(), DType::F32, "{ctx}");
            outs.push(o);
            state = Some(s);
        }
        let o = cat(&outs, 1);
        let state = state.unwrap();
        assert_eq!(state.dtype(), DType::F32, "{ctx}");
        c.close(&ctx, "o vs chunk", &o, &want.o, TOL);
        c.close(&ctx, "state vs chunk", &state, want.final_state.as_ref().unwrap(), TOL);
        c.close(&ctx, "o vs f64", &o, &reference.o, TOL);
        c.close(&ctx, "state vs f64", &state, reference.final_state.as_ref().unwrap(), TOL);
        // All tokens in one call is the same recurrence.
        let (o_all, s_all) = step(&spec, &x, None);
        c.close(&ctx, "one call o vs chunk", &o_all, &want.o, TOL);
        c.close(&ctx, "one call state", &s_all, want.final_state.as_ref().unwrap(), TOL);
    }
    c.finish(6 * 5);
}

#[test]
fn recurrent_token_by_token_delta_rule() {
    token_by_token(Family::DeltaRule);
}
#[test]
fn recurrent_token_by_token_gated_delta_rule() {
    token_by_token(Family::GatedDeltaRule);
}
#[test]
fn recurrent_token_by_token_kda() {
    token_by_token(Family::Kda);
}
#[test]
fn recurrent_token_by_token_gdn2() {
    token_by_token(Family::Gdn2);
}
#[test]
fn recurrent_token_by_token_gla() {
    token_by_token(Family::Gla);
}
#[test]
fn recurrent_token_by_token_simple_gla() {
    token_by_token(Family::SimpleGla);
}
#[test]
fn recurrent_token_by_token_linear_attn() {
    token_by_token(Family::LinearAttn);
}

/// `T1` tokens then `T2` tokens in two step calls equal one call on all `T1 + T2`.
#[test]
fn recurrent_two_calls_equal_one() {
    let mut c = Checker::default();
    for family in Family::ALL {
        for spec in specs(family) {
            let ctx = spec.label();
            let x = spec.data().cast(DType::F32);
            let (o_all, s_all) = step(&spec, &x, None);
            for t1 in [1, 29, 64] {
                let (o1, s1) = step(&spec, &with_h0(data_tokens(&x, 0, t1), &x), None);
                let (o2, s2) = step(&spec, &data_tokens(&x, t1, spec.t - t1), Some(s1));
                let ctx = format!("{ctx} split at {t1}");
                c.close(&ctx, "o", &cat(&[o1, o2], 1), &o_all, SPLIT_TOL);
                c.close(&ctx, "state", &s2, &s_all, SPLIT_TOL);
            }
        }
    }
    c.finish(7 * 5 * 3 * 2);
}

/// The chunk form carrying its final state into a second call equals one call on the whole, for
/// splits inside a chunk and on a chunk boundary.
#[test]
fn chunk_two_calls_equal_one() {
    let mut c = Checker::default();
    for family in Family::ALL {
        let spec = Spec::new(family, [2, 150, 1, 2, 16, 16]).h0(true).seed(31);
        let ctx = spec.label();
        let opts = spec.opts();
        let x = spec.data().cast(DType::F32);
        let all = chunk::forward(family, &x.inputs(), &opts).unwrap();
        for t1 in [1, 50, 64, 128] {
            let first = with_h0(data_tokens(&x, 0, t1), &x);
            let a = chunk::forward(family, &first.inputs(), &opts).unwrap();
            let mut second = data_tokens(&x, t1, spec.t - t1);
            second.h0 = a.final_state;
            let b = chunk::forward(family, &second.inputs(), &opts).unwrap();
            let ctx = format!("{ctx} split at {t1}");
            c.close(&ctx, "o", &cat(&[a.o, b.o], 1), &all.o, SPLIT_TOL);
            c.close(&ctx, "final state", b.final_state.as_ref().unwrap(), all.final_state.as_ref().unwrap(), SPLIT_TOL);
        }
    }
    c.finish(7 * 4 * 2);
}

/// A packed batch (`cu_seqlens`, including an empty and a one-token sequence) in one step call
/// equals each sequence stepped on its own, and the chunk form on the packed batch.
#[test]
fn recurrent_varlen_equals_per_sequence() {
    let mut c = Checker::default();
    let cu = [0, 1, 65, 65, 66, 130];
    for family in Family::ALL {
        for h0 in [false, true] {
            let spec = Spec::new(family, [1, 130, 2, 4, 8, 20]).cu(&cu).h0(h0).seed(40 + h0 as u64);
            let ctx = spec.label();
            let x = spec.data().cast(DType::F32);
            let (o, state) = step(&spec, &x, None);
            let chunked = chunk::forward(family, &x.inputs(), &spec.opts()).unwrap();
            c.close(&ctx, "o vs chunk", &o, &chunked.o, TOL);
            let ht = chunked.final_state.as_ref().unwrap();
            c.close(&ctx, "state vs chunk", &state, ht, TOL);
            let zero = Tensor::zeros(&[1, spec.hv, spec.k, spec.v], DType::F32);
            let mut outs = Vec::new();
            let mut states = Vec::new();
            for (n, w) in cu.windows(2).enumerate() {
                let s0 = x.h0.as_ref().map_or(zero.clone(), |h| slice(h, 0, n, 1));
                if w[1] == w[0] {
                    // An empty sequence passes its state through untouched.
                    states.push(s0);
                    continue;
                }
                let (o, s) = step(&spec, &data_tokens(&x, w[0], w[1] - w[0]), Some(s0));
                outs.push(o);
                states.push(s);
            }
            c.close(&ctx, "o vs per sequence", &o, &cat(&outs, 1), SPLIT_TOL);
            c.close(&ctx, "state vs per sequence", &state, &cat(&states, 0), SPLIT_TOL);
            if !h0 {
                // The empty sequence's state stays exactly zero.
                let empty = slice(&state, 0, 2, 1).to_vec::<f32>().unwrap();
                assert!(empty.iter().all(|&v| v == 0.0), "{ctx}: empty sequence");
            }
        }
    }
    c.finish(7 * 2 * 4);
}

/// A fixed batch of B = 3 equals each row stepped on its own.
#[test]
fn recurrent_batch_equals_per_sequence() {
    let mut c = Checker::default();
    for family in Family::ALL {
        let spec = Spec::new(family, [3, 40, 2, 2, 16, 16]).h0(true).seed(50);
        let ctx = spec.label();
        let x = spec.data().cast(DType::F32);
        let (o, state) = step(&spec, &x, None);
        let (mut outs, mut states) = (Vec::new(), Vec::new());
        for i in 0..3 {
            let (o, s) = step(&spec, &data_row(&x, i), None);
            outs.push(o);
            states.push(s);
        }
        c.close(&ctx, "o", &o, &cat(&outs, 0), SPLIT_TOL);
        c.close(&ctx, "state", &state, &cat(&states, 0), SPLIT_TOL);
        // The batch rows differ, so a mix-up of rows would show.
        let d = slice(&o, 0, 0, 1).rel_err(&slice(&o, 0, 1, 1)).unwrap();
        assert!(d > 0.1, "{ctx}: rows 0 and 1 agree ({d})");
    }
    c.finish(7 * 2);
}

/// The step updates the caller's state tensor in place and leaves tensors sharing its old storage
/// alone (copy on write).
#[test]
fn recurrent_state_is_updated_in_place_only() {
    let spec = Spec::new(Family::GatedDeltaRule, [1, 5, 1, 1, 4, 4]).h0(true);
    let x = spec.data().cast(DType::F32);
    let before = x.h0.clone().unwrap();
    let snapshot = before.to_vec::<f32>().unwrap();
    let mut state = before.clone();
    let inputs = Inputs { initial_state: None, ..x.inputs() };
    recurrent::step(spec.family, &inputs, &spec.opts(), &mut state).unwrap();
    assert_eq!(before.to_vec::<f32>().unwrap(), snapshot, "shared storage changed");
    assert_ne!(state.to_vec::<f32>().unwrap(), snapshot, "state not updated");
    let want = chunk::forward(spec.family, &x.inputs(), &spec.opts()).unwrap();
    let e = state.rel_err(want.final_state.as_ref().unwrap()).unwrap();
    assert!(e <= TOL, "state rel err {e}");
}

/// Zero-decay limits: simple GLA without `g`, with `g = 0` and linear attention agree, and so do
/// DeltaNet and Gated DeltaNet with `g = 0` (the knobs are independent).
#[test]
fn families_agree_in_their_limits() {
    let mut c = Checker::default();
    let shape = [1, 90, 1, 2, 8, 8];
    let base = Spec::new(Family::LinearAttn, shape).h0(true);
    let x = base.data().cast(DType::F32);
    let opts = base.opts();
    let zero_g = Tensor::zeros(&[1, 90, 2], DType::F32);
    let lin = chunk::forward(Family::LinearAttn, &x.inputs(), &opts).unwrap();
    let sgla = chunk::forward(Family::SimpleGla, &Inputs { g: Some(&zero_g), ..x.inputs() }, &opts).unwrap();
    let sgla_none = chunk::forward(Family::SimpleGla, &x.inputs(), &opts).unwrap();
    c.close("limits", "simple_gla g=0 vs linear_attn", &sgla.o, &lin.o, 1e-6);
    c.close("limits", "simple_gla no g vs linear_attn", &sgla_none.o, &lin.o, 1e-6);
    let zero_gk = Tensor::zeros(&[1, 90, 2, 8], DType::F32);
    let gla = chunk::forward(Family::Gla, &Inputs { g: Some(&zero_gk), ..x.inputs() }, &opts).unwrap();
    c.close("limits", "gla g=0 vs linear_attn", &gla.o, &lin.o, 1e-6);

    let beta = tensor(vec![0.7; 90 * 2], &[1, 90, 2]).to_dtype(DType::F32).unwrap();
    let with_beta = Inputs { beta: Some(&beta), ..x.inputs() };
    let delta = chunk::forward(Family::DeltaRule, &with_beta, &opts).unwrap();
    let gdn = chunk::forward(Family::GatedDeltaRule, &Inputs { g: Some(&zero_g), ..with_beta }, &opts).unwrap();
    let kda = chunk::forward(Family::Kda, &Inputs { g: Some(&zero_gk), ..with_beta }, &opts).unwrap();
    c.close("limits", "gdn g=0 vs delta", &gdn.o, &delta.o, 1e-6);
    c.close("limits", "kda g=0 vs delta", &kda.o, &delta.o, 1e-6);
    // GDN-2 with b = beta broadcast over K and w = beta over V is KDA.
    let g = common::Spec::new(Family::Kda, shape).seed(3).data().g.unwrap();
    let g = g.to_dtype(DType::F32).unwrap();
    let b = tensor(vec![0.7; 90 * 2 * 8], &[1, 90, 2, 8]).to_dtype(DType::F32).unwrap();
    let kda = chunk::forward(Family::Kda, &Inputs { g: Some(&g), ..with_beta }, &opts).unwrap();
    let gdn2 =
        chunk::forward(Family::Gdn2, &Inputs { g: Some(&g), b: Some(&b), w: Some(&b), ..x.inputs() }, &opts).unwrap();
    c.close("limits", "gdn2 b=w=beta vs kda", &gdn2.o, &kda.o, 1e-6);
    c.close(
        "limits",
        "gdn2 b=w=beta vs kda (state)",
        gdn2.final_state.as_ref().unwrap(),
        kda.final_state.as_ref().unwrap(),
        1e-6,
    );
    c.finish(7);
}

/// `data` with the initial state of `full`.
fn with_h0(mut data: Data, full: &Data) -> Data {
    data.h0 = full.h0.clone();
    data
}
