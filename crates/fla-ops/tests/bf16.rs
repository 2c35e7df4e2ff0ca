//! Half-precision inputs (FLA's tests run in bf16 with `assert_close(..., ratio)`): chunk forward
//! and backward with bf16 (and once f16) `q k v g beta` and an f32 state, against the f32 result on
//! the same half-rounded inputs. Relative RMSE `‖a − b‖ / ‖b‖` ≤ 5e-3 for outputs and ≤ 1e-2 for
//! gradients (DESIGN.md); outputs and gradients come back in the input dtype, states in f32.
mod common;

use common::{Checker, Data, DtBias, Spec};
use fla_core::{DType, Tensor};
use fla_ops::{chunk, naive, recurrent, Family, Inputs};

const OUT_TOL: f64 = 5e-3;
const GRAD_TOL: f64 = 1e-2;
/// A realistic head: `[B, T, H, HV, K, V]`.
const SHAPE: [usize; 6] = [1, 200, 2, 2, 32, 32];

fn half_vs_f32(spec: &Spec, dtype: DType, c: &mut Checker) {
    let family = spec.family;
    let ctx = format!("{} ({dtype})", spec.label());
    let half = spec.data().cast(dtype);
    // The same values, widened: what the half inputs hold exactly.
    let full = half.cast(DType::F32);
    let opts = spec.opts();
    let (d_o, dht) = spec.upstream();
    let d_o_half = d_o.to_dtype(dtype).unwrap();
    let d_o_full = d_o_half.to_dtype(DType::F32).unwrap();
    let dht = dht.to_dtype(DType::F32).unwrap();

    let got = chunk::forward(family, &half.inputs(), &opts).unwrap();
    let want = chunk::forward(family, &full.inputs(), &opts).unwrap();
    assert_eq!(got.o.dtype(), dtype, "{ctx}: o in the input dtype");
    let ht = got.final_state.as_ref().unwrap();
    assert_eq!(ht.dtype(), DType::F32, "{ctx}: final state in f32");
    c.close(&ctx, "o", &got.o, &want.o, OUT_TOL);
    c.close(&ctx, "ht", ht, want.final_state.as_ref().unwrap(), OUT_TOL);
    // The f32 result itself is right: against the f64 reference on the same inputs.
    let reference = naive::forward(family, &full.cast(DType::F64).inputs(), &opts).unwrap();
    c.close(&ctx, "o (f32 vs f64)", &want.o, &reference.o, 1e-4);

    let got = chunk::backward(family, &half.inputs(), &opts, &d_o_half, Some(&dht)).unwrap();
    let want = chunk::backward(family, &full.inputs(), &opts, &d_o_full, Some(&dht)).unwrap();
    for (name, g) in common::all_grads(&got) {
        let Some(g) = g else { continue };
        let expected = match name {
            "dh0" | "da_log" | "ddt_bias" => DType::F32,
            _ => dtype,
        };
        assert_eq!(g.dtype(), expected, "{ctx}: {name} dtype");
    }
    c.grads(&ctx, &got, &want, GRAD_TOL);

    // Decoding in half precision: the recurrent step against its f32 twin.
    let step = |x: &Data| {
        let mut state = x.h0.clone().unwrap_or_else(|| Tensor::zeros(&[spec.n(), spec.hv, spec.k, spec.v], DType::F32));
        let inputs = Inputs { initial_state: None, ..x.inputs() };
        let o = recurrent::step(family, &inputs, &opts, &mut state).unwrap();
        (o, state)
    };
    let ((o_half, s_half), (o_full, s_full)) = (step(&half), step(&full));
    assert_eq!(o_half.dtype(), dtype, "{ctx}: recurrent o dtype");
    c.close(&ctx, "recurrent o", &o_half, &o_full, OUT_TOL);
    c.close(&ctx, "recurrent state", &s_half, &s_full, OUT_TOL);
}

#[test]
fn bf16_gated_delta_rule() {
    let mut c = Checker::default();
    for h0 in [false, true] {
        let spec = Spec::new(Family::GatedDeltaRule, SHAPE).h0(h0);
        half_vs_f32(&spec, DType::BF16, &mut c);
    }
    let spec = Spec::new(Family::GatedDeltaRule, SHAPE)
        .cu(&[0, 1, 77, 200])
        .l2norm()
        .sigmoid()
        .gate_in_kernel(DtBias::Head)
        .h0(true)
        .seed(5);
    half_vs_f32(&spec, DType::BF16, &mut c);
    c.finish(3 * 9);
}

#[test]
fn bf16_kda() {
    let mut c = Checker::default();
    for h0 in [false, true] {
        let spec = Spec::new(Family::Kda, SHAPE).h0(h0).seed(7);
        half_vs_f32(&spec, DType::BF16, &mut c);
    }
    let spec = Spec::new(Family::Kda, SHAPE).l2norm().gate_in_kernel(DtBias::Flat).h0(true).seed(8);
    half_vs_f32(&spec, DType::BF16, &mut c);
    c.finish(3 * 9);
}

#[test]
fn bf16_gla() {
    let mut c = Checker::default();
    for h0 in [false, true] {
        let spec = Spec::new(Family::Gla, SHAPE).h0(h0).seed(9);
        half_vs_f32(&spec, DType::BF16, &mut c);
    }
    c.finish(2 * 9);
}

#[test]
fn f16_gated_delta_rule() {
    let mut c = Checker::default();
    let spec = Spec::new(Family::GatedDeltaRule, SHAPE).h0(true).seed(11);
    half_vs_f32(&spec, DType::F16, &mut c);
    c.finish(9);
}

/// The half-precision path is not a no-op: bf16 rounding of the inputs changes `o` by about
/// bf16's precision, far more than the f32 tolerance (so the comparisons above are not vacuous
/// in what they feed the op).
#[test]
fn bf16_rounding_is_visible() {
    let spec = Spec::new(Family::GatedDeltaRule, SHAPE).h0(true);
    let exact = spec.data().cast(DType::F32);
    let rounded = spec.data().cast(DType::BF16).cast(DType::F32);
    let opts = spec.opts();
    let a = chunk::forward(spec.family, &exact.inputs(), &opts).unwrap();
    let b = chunk::forward(spec.family, &rounded.inputs(), &opts).unwrap();
    let e = b.o.rel_err(&a.o).unwrap();
    assert!(e > 1e-4 && e < 5e-2, "bf16 input rounding moved o by {e}");
}

/// Each gradient comes back in its input's dtype (Grads docs): with Qwen3-Next's mixed-precision
/// parameters, `A_log` f32 and `dt_bias` in the model dtype bf16, `ddt_bias` must be bf16 and
/// `da_log` f32.
#[test]
fn gate_parameter_grads_in_their_dtypes() {
    let spec = Spec::new(Family::GatedDeltaRule, [1, 70, 1, 2, 8, 8]).gate_in_kernel(DtBias::Head);
    let mut x = spec.data().cast(DType::BF16);
    x.dt_bias = Some(x.dt_bias.unwrap().to_dtype(DType::BF16).unwrap());
    let (d_o, _) = spec.upstream();
    let grads = chunk::backward(spec.family, &x.inputs(), &spec.opts(), &d_o, None).unwrap();
    assert_eq!(grads.da_log.unwrap().dtype(), DType::F32, "da_log");
    assert_eq!(grads.ddt_bias.unwrap().dtype(), DType::BF16, "ddt_bias");
}
