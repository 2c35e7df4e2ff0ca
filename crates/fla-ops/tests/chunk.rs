//! Chunk form against the reference (FLA: `tests/ops/test_gated_delta.py::test_chunk` and
//! friends): the f32 chunk forward against the f64 naive recurrence on the same (f32-rounded)
//! inputs, and the f32 chunk backward against the f64 chunk backward, over shapes that cross and
//! straddle chunk boundaries, grouped value heads, K ≠ V, packed batches, strong decay,
//! beta ∈ {0, 1}, initial states and the in-kernel options.
mod common;

use common::{Beta, Checker, DtBias, Gate, Spec};
use fla_core::DType;
use fla_ops::{chunk, naive, Decay, Erase, Family};

/// f32 against f64 references (DESIGN.md).
const TOL: f64 = 1e-4;

/// Sizes `[B, T, H, HV, K, V]` and packed-batch offsets of the shape sweep.
fn shapes() -> Vec<([usize; 6], Option<Vec<usize>>)> {
    vec![
        ([2, 1, 2, 2, 16, 16], None),
        ([1, 63, 2, 2, 16, 16], None),
        ([2, 64, 1, 1, 16, 16], None),
        ([1, 65, 2, 2, 16, 16], None),
        ([2, 128, 1, 2, 16, 16], None),
        ([1, 150, 2, 2, 32, 32], None),
        // a model-sized head
        ([1, 130, 1, 1, 128, 64], None),
        // K ≠ V
        ([1, 100, 1, 1, 16, 24], None),
        ([2, 100, 1, 1, 32, 8], None),
        // degenerate and odd head sizes
        ([1, 70, 1, 1, 1, 1], None),
        ([1, 70, 1, 2, 5, 17], None),
        // grouped value heads, HV / H = 3
        ([1, 70, 1, 3, 8, 8], None),
        ([2, 70, 2, 6, 8, 8], None),
        // packed batches: length-1 sequences, boundaries inside chunks
        ([1, 130, 2, 4, 16, 16], Some(vec![0, 1, 65, 66, 130])),
        ([1, 201, 1, 2, 16, 8], Some(vec![0, 30, 100, 200, 201])),
        // empty sequences
        ([1, 150, 1, 2, 8, 8], Some(vec![0, 0, 64, 64, 65, 150, 150])),
    ]
}

/// Every case of the sweep for `family`: shapes × {no initial state, initial state}, plus
/// strong decay, constant beta and the in-kernel options where the family has them.
fn cases(family: Family) -> Vec<Spec> {
    let mut out = Vec::new();
    for (i, (sizes, cu)) in shapes().into_iter().enumerate() {
        for h0 in [false, true] {
            let mut s = Spec::new(family, sizes).h0(h0).seed(1000 + 2 * i as u64 + h0 as u64);
            if let Some(cu) = &cu {
                s = s.cu(cu);
            }
            out.push(s);
        }
    }
    let base = [1, 150, 2, 2, 16, 16];
    if family.decay() != Decay::None {
        for h0 in [false, true] {
            out.push(Spec::new(family, base).gate(Gate::Strong).h0(h0).seed(7));
        }
        out.push(
            Spec::new(family, [1, 130, 1, 2, 16, 16]).cu(&[0, 1, 65, 66, 130]).gate(Gate::Strong).h0(true).seed(8),
        );
    }
    if family.gate_optional() {
        out.push(Spec::new(family, base).without_g().h0(true).seed(9));
    }
    if family.erase() != Erase::None {
        for beta in [Beta::Zero, Beta::One] {
            for h0 in [false, true] {
                out.push(Spec::new(family, [2, 130, 2, 2, 16, 16]).beta(beta).h0(h0));
            }
        }
        out.push(Spec::new(family, base).sigmoid().h0(true).seed(10));
    }
    out.push(Spec::new(family, base).l2norm().h0(true).seed(11));
    let dt = match family.decay() {
        Decay::None => None,
        Decay::Head => Some(DtBias::Head),
        Decay::Channel if family == Family::Gla => Some(DtBias::Matrix),
        Decay::Channel => Some(DtBias::Flat),
    };
    if let Some(dt) = dt {
        out.push(Spec::new(family, base).gate_in_kernel(dt).h0(true).seed(12));
        out.push(Spec::new(family, base).gate_in_kernel(dt).l2norm().sigmoid().seed(13));
    }
    out
}

fn forward_sweep(family: Family) {
    let mut c = Checker::default();
    let cases = cases(family);
    let min = 2 * cases.len();
    for spec in cases {
        let ctx = spec.label();
        let x32 = spec.data().cast(DType::F32);
        let x64 = x32.cast(DType::F64);
        let opts = spec.opts();
        let want = naive::forward(family, &x64.inputs(), &opts).unwrap();
        let got = chunk::forward(family, &x32.inputs(), &opts).unwrap();
        assert_eq!(got.o.dtype(), DType::F32, "{ctx}: o dtype");
        let ht = got.final_state.as_ref().expect("output_final_state");
        assert_eq!(ht.dtype(), DType::F32, "{ctx}: final state dtype");
        assert_eq!(ht.shape(), [spec.n(), spec.hv, spec.k, spec.v], "{ctx}");
        c.close(&ctx, "o", &got.o, &want.o, TOL);
        c.close(&ctx, "ht", ht, want.final_state.as_ref().unwrap(), TOL);
    }
    c.finish(min);
}

fn backward_sweep(family: Family) {
    let mut c = Checker::default();
    let cases = cases(family);
    let min = 3 * cases.len();
    for spec in cases {
        let ctx = spec.label();
        let x32 = spec.data().cast(DType::F32);
        let x64 = x32.cast(DType::F64);
        let (d_o, dht) = spec.upstream();
        let opts = spec.opts();
        let want = chunk::backward(family, &x64.inputs(), &opts, &d_o, Some(&dht)).unwrap();
        let d_o32 = d_o.to_dtype(DType::F32).unwrap();
        let dht32 = dht.to_dtype(DType::F32).unwrap();
        let got = chunk::backward(family, &x32.inputs(), &opts, &d_o32, Some(&dht32)).unwrap();
        assert_eq!(got.dq.dtype(), DType::F32, "{ctx}: dq dtype");
        // Every input that was given has a gradient of its size, and nothing else does (exact
        // shapes are checked in `chunk_grad_shapes_are_input_shapes`).
        let given = x32.fields();
        for (name, t) in &given {
            let g = common::grad_of(&got, name).unwrap_or_else(|| panic!("{ctx}: no gradient for given input {name}"));
            assert_eq!(g.elem_count(), t.elem_count(), "{ctx}: size of the gradient of {name}");
        }
        let n_grads = common::all_grads(&got).iter().filter(|(_, g)| g.is_some()).count();
        assert_eq!(n_grads, given.len(), "{ctx}: gradients of absent inputs");
        c.grads(&ctx, &got, &want, TOL);
    }
    c.finish(min);
}

#[test]
fn chunk_fwd_delta_rule() {
    forward_sweep(Family::DeltaRule);
}
#[test]
fn chunk_fwd_gated_delta_rule() {
    forward_sweep(Family::GatedDeltaRule);
}
#[test]
fn chunk_fwd_kda() {
    forward_sweep(Family::Kda);
}
#[test]
fn chunk_fwd_gdn2() {
    forward_sweep(Family::Gdn2);
}
#[test]
fn chunk_fwd_gla() {
    forward_sweep(Family::Gla);
}
#[test]
fn chunk_fwd_simple_gla() {
    forward_sweep(Family::SimpleGla);
}
#[test]
fn chunk_fwd_linear_attn() {
    forward_sweep(Family::LinearAttn);
}

#[test]
fn chunk_bwd_delta_rule() {
    backward_sweep(Family::DeltaRule);
}
#[test]
fn chunk_bwd_gated_delta_rule() {
    backward_sweep(Family::GatedDeltaRule);
}
#[test]
fn chunk_bwd_kda() {
    backward_sweep(Family::Kda);
}
#[test]
fn chunk_bwd_gdn2() {
    backward_sweep(Family::Gdn2);
}
#[test]
fn chunk_bwd_gla() {
    backward_sweep(Family::Gla);
}
#[test]
fn chunk_bwd_simple_gla() {
    backward_sweep(Family::SimpleGla);
}
#[test]
fn chunk_bwd_linear_attn() {
    backward_sweep(Family::LinearAttn);
}

/// Without `output_final_state` there is no final state, and `o` does not change.
#[test]
fn chunk_final_state_only_on_request() {
    for family in Family::ALL {
        let spec = Spec::new(family, [1, 70, 1, 2, 8, 8]).h0(true);
        let x = spec.data().cast(DType::F32);
        let with = chunk::forward(family, &x.inputs(), &spec.opts()).unwrap();
        let opts = fla_ops::Options { output_final_state: false, ..spec.opts() };
        let without = chunk::forward(family, &x.inputs(), &opts).unwrap();
        assert!(without.final_state.is_none(), "{family}");
        assert_eq!(without.o.to_vec::<f32>().unwrap(), with.o.to_vec::<f32>().unwrap(), "{family}");
    }
}

/// An explicit `scale` is used (and differs from the default `K^-1/2`).
#[test]
fn chunk_explicit_scale() {
    let mut c = Checker::default();
    for family in Family::ALL {
        let spec = Spec::new(family, [1, 80, 1, 1, 16, 8]).h0(true);
        let x32 = spec.data().cast(DType::F32);
        let x64 = x32.cast(DType::F64);
        let opts = fla_ops::Options { scale: Some(0.37), ..spec.opts() };
        let want = naive::forward(family, &x64.inputs(), &opts).unwrap();
        let got = chunk::forward(family, &x32.inputs(), &opts).unwrap();
        let default = naive::forward(family, &x64.inputs(), &spec.opts()).unwrap();
        c.close(&spec.label(), "o (scale 0.37)", &got.o, &want.o, TOL);
        let e = default.o.rel_err(&want.o).unwrap();
        assert!(e > 1e-2, "{family}: scale had no effect ({e})");
        // The state does not depend on the scale, so o is linear in it: o(0.37) = 0.37·4·o(1/4).
        let scaled = default.o.map(|x| x * 0.37 * 4.0).unwrap();
        c.close(&spec.label(), "o linear in scale", &want.o, &scaled, 1e-12);
    }
    c.finish(14);
}

/// Strided (non-contiguous) inputs give the same result as their contiguous copies: q and k
/// stored head-major `[B,H,T,K]` and viewed as `[B,T,H,K]`, v a narrowed view.
#[test]
fn chunk_non_contiguous_inputs() {
    let mut c = Checker::default();
    for family in Family::ALL {
        let spec = Spec::new(family, [2, 70, 2, 2, 8, 8]).h0(true).seed(21);
        let x = spec.data().cast(DType::F32);
        let head_major = |t: &fla_core::Tensor| {
            // [B,T,H,K] → contiguous [B,H,T,K] → view [B,T,H,K].
            let hm = t.transpose(1, 2).unwrap().contiguous().unwrap();
            let view = hm.transpose(1, 2).unwrap();
            assert!(!view.is_contiguous());
            view
        };
        let wide = common::cat(&[x.v.clone(), x.v.clone()], 3).to_dtype(DType::F32).unwrap();
        let mut y = x.clone();
        y.q = head_major(&x.q);
        y.k = head_major(&x.k);
        y.v = wide.narrow(3, 8, 8).unwrap();
        assert!(!y.v.is_contiguous());
        let opts = spec.opts();
        let want = chunk::forward(family, &x.inputs(), &opts).unwrap();
        let got = chunk::forward(family, &y.inputs(), &opts).unwrap();
        c.close(&spec.label(), "o", &got.o, &want.o, 1e-6);
        let (d_o, dht) = spec.upstream();
        let want = chunk::backward(family, &x.inputs(), &opts, &d_o, Some(&dht)).unwrap();
        let got = chunk::backward(family, &y.inputs(), &opts, &d_o, Some(&dht)).unwrap();
        c.grads(&spec.label(), &got, &want, 1e-6);
    }
    c.finish(7 * 5);
}

/// Omitting `dht` is the same as passing zeros.
#[test]
fn chunk_backward_without_dht_is_zero_dht() {
    let mut c = Checker::default();
    for family in Family::ALL {
        let spec = Spec::new(family, [1, 70, 1, 2, 8, 8]).h0(true).seed(22);
        let x = spec.data().cast(DType::F32);
        let opts = spec.opts();
        let (d_o, dht) = spec.upstream();
        let zero = fla_core::Tensor::zeros(dht.shape(), DType::F32);
        let none = chunk::backward(family, &x.inputs(), &opts, &d_o, None).unwrap();
        let zeros = chunk::backward(family, &x.inputs(), &opts, &d_o, Some(&zero)).unwrap();
        let with = chunk::backward(family, &x.inputs(), &opts, &d_o, Some(&dht)).unwrap();
        c.grads(&spec.label(), &none, &zeros, 1e-7);
        // ... and dht does contribute (to dv of the last tokens; its path to dh0 decays away).
        let e = with.dv.rel_err(&none.dv).unwrap();
        assert!(e > 1e-2, "{family}: dht changed dv by only {e}");
    }
    c.finish(7 * 4);
}

/// An empty time axis (T = 0): `o` is empty, the final state is the initial state, `dh0 = dht`,
/// and every input that was given still gets a gradient (an empty one for the activations,
/// zeros for `A_log` and `dt_bias`).
#[test]
fn chunk_empty_time_axis() {
    let mut failures = Vec::new();
    for family in Family::ALL {
        let mut specs = vec![Spec::new(family, [2, 0, 1, 2, 4, 3]).h0(true)];
        match family.decay() {
            Decay::Head => specs.push(specs[0].clone().gate_in_kernel(DtBias::Head)),
            Decay::Channel => specs.push(specs[0].clone().gate_in_kernel(DtBias::Flat)),
            Decay::None => {}
        }
        for spec in specs {
            let ctx = spec.label();
            let x = spec.data().cast(DType::F32);
            let opts = spec.opts();
            let out = chunk::forward(family, &x.inputs(), &opts).unwrap();
            assert_eq!(out.o.shape(), [2, 0, 2, 3], "{ctx}");
            let ht = out.final_state.unwrap();
            assert_eq!(ht.rel_err(x.h0.as_ref().unwrap()).unwrap(), 0.0, "{ctx}");
            let (d_o, dht) = spec.upstream();
            let dht = dht.to_dtype(DType::F32).unwrap();
            let g = chunk::backward(family, &x.inputs(), &opts, &d_o, Some(&dht)).unwrap();
            assert_eq!(g.dh0.as_ref().unwrap().rel_err(&dht).unwrap(), 0.0, "{ctx}");
            for (name, t) in x.fields() {
                match common::grad_of(&g, name) {
                    Some(d) if d.elem_count() == t.elem_count() => {
                        if name == "a_log" || name == "dt_bias" {
                            assert_eq!(d.norm().unwrap(), 0.0, "{ctx}: d{name}");
                        }
                    }
                    Some(d) => failures.push(format!("{ctx}: d{name} has shape {:?}", d.shape())),
                    None => failures.push(format!("{ctx}: no d{name} for the given {name}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The input shapes of `specs` whose gradient comes back in another shape.
fn grad_shape_mismatches(specs: Vec<Spec>) -> Vec<String> {
    let mut failures = Vec::new();
    for spec in specs {
        let x = spec.data().cast(DType::F32);
        let (d_o, dht) = spec.upstream();
        let g = chunk::backward(spec.family, &x.inputs(), &spec.opts(), &d_o, Some(&dht)).unwrap();
        for (name, t) in x.fields() {
            let d = common::grad_of(&g, name).unwrap();
            if d.shape() != t.shape() {
                failures.push(format!(
                    "{}: d{name} has shape {:?}, {name} has {:?}",
                    spec.label(),
                    d.shape(),
                    t.shape()
                ));
            }
        }
    }
    failures
}

/// Each gradient has exactly its input's shape.
#[test]
fn chunk_grad_shapes_are_input_shapes() {
    let mut specs = Vec::new();
    for family in Family::ALL {
        specs.push(Spec::new(family, [2, 70, 1, 2, 4, 3]).h0(true));
        specs.push(Spec::new(family, [1, 70, 2, 4, 5, 3]).cu(&[0, 3, 70]).h0(true));
        match family.decay() {
            Decay::Head => specs.push(Spec::new(family, [1, 70, 1, 2, 4, 3]).gate_in_kernel(DtBias::Head)),
            Decay::Channel => specs.push(Spec::new(family, [1, 70, 1, 2, 4, 3]).gate_in_kernel(DtBias::Flat)),
            Decay::None => {}
        }
    }
    let failures = grad_shape_mismatches(specs);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// With `K = 1`, a channel gate `g [B,T,HV,1]` must get a `[B,T,HV,1]` gradient, not a head
/// gate's `[B,T,HV]`.
#[test]
fn chunk_dg_keeps_the_channel_shape_when_k_is_1() {
    let mut specs = Vec::new();
    for family in [Family::Kda, Family::Gla, Family::Gdn2] {
        specs.push(Spec::new(family, [1, 70, 1, 1, 1, 1]).h0(true));
        specs.push(Spec::new(family, [1, 70, 1, 2, 1, 5]).cu(&[0, 3, 70]).h0(true));
        specs.push(Spec::new(family, [1, 70, 1, 2, 1, 3]).gate_in_kernel(DtBias::Flat));
    }
    let failures = grad_shape_mismatches(specs);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A `dt_bias` given as `[HV, K]` (accepted for channel decay) must get a `[HV, K]` gradient
/// back, as autograd would return, so that an optimizer can apply it.
#[test]
fn chunk_ddt_bias_has_the_shape_of_dt_bias() {
    let specs = [Family::Kda, Family::Gla, Family::Gdn2]
        .into_iter()
        .map(|f| Spec::new(f, [1, 70, 1, 2, 4, 3]).gate_in_kernel(DtBias::Matrix))
        .collect();
    let failures = grad_shape_mismatches(specs);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
