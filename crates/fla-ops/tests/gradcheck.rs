//! Finite-difference gradient checks (FLA: `torch.autograd.gradcheck` on the naive recurrence):
//! the f64 chunk backward against central differences of
//! `L = Σ o·do + Σ ht·dht` computed with the f64 naive forward, for every element of every input
//! of every family, on a small shape that crosses a chunk boundary (T = 70), with grouped value
//! heads, packed batches, strong decay and each in-kernel option (L2 norm, sigmoid, gate).
mod common;

use common::{dot, grad_of, tensor, Checker, Data, DtBias, Gate, Spec};
use fla_core::{DType, Tensor};
use fla_ops::{chunk, naive, Decay, Erase, Family};

const EPS: f64 = 1e-6;
/// Per element: `|fd − an| ≤ ELEM_TOL·max(1, |fd|)`.
const ELEM_TOL: f64 = 1e-6;
/// Over a whole gradient: `‖fd − an‖ ≤ NORM_TOL·‖fd‖`.
const NORM_TOL: f64 = 1e-5;

/// `[B, T, H, HV, K, V]` of the checks.
const SMALL: [usize; 6] = [1, 70, 1, 2, 4, 3];

fn loss(family: Family, x: &Data, opts: &fla_ops::Options, d_o: &Tensor, dht: &Tensor) -> f64 {
    let out = naive::forward(family, &x.inputs(), opts).unwrap();
    dot(&out.o, d_o) + dot(out.final_state.as_ref().unwrap(), dht)
}

/// Checks every gradient of `spec` against central differences; returns the number of elements
/// checked.
fn gradcheck(spec: &Spec, c: &mut Checker) -> usize {
    let family = spec.family;
    let ctx = spec.label();
    let x = spec.data();
    let (d_o, dht) = spec.upstream();
    let opts = spec.opts();
    let an = chunk::backward(family, &x.inputs(), &opts, &d_o, Some(&dht)).unwrap();
    let fields = x.fields();
    let present = common::all_grads(&an).iter().filter(|(_, g)| g.is_some()).count();
    assert_eq!(present, fields.len(), "{ctx}: gradients of absent inputs");
    let mut checked = 0;
    for (name, t) in fields {
        let grad = grad_of(&an, name).unwrap_or_else(|| panic!("{ctx}: no d{name}"));
        assert_eq!(grad.dtype(), DType::F64, "{ctx}: d{name} dtype");
        assert_eq!(grad.elem_count(), t.elem_count(), "{ctx}: d{name} size");
        let analytic: Vec<f64> = grad.to_vec().unwrap();
        let base: Vec<f64> = t.to_vec().unwrap();
        let shape = t.shape().to_vec();
        let mut fd = vec![0.0; base.len()];
        let mut bad = Vec::new();
        for i in 0..base.len() {
            let at = |delta: f64| {
                let mut y = x.clone();
                let mut v = base.clone();
                v[i] += delta;
                *y.field_mut(name) = tensor(v, &shape);
                loss(family, &y, &opts, &d_o, &dht)
            };
            fd[i] = (at(EPS) - at(-EPS)) / (2.0 * EPS);
            let diff = (fd[i] - analytic[i]).abs();
            if diff.is_nan() || diff > ELEM_TOL * fd[i].abs().max(1.0) {
                bad.push(format!("[{i}] fd {:.9e} an {:.9e}", fd[i], analytic[i]));
            }
        }
        checked += base.len();
        if !bad.is_empty() {
            let n = bad.len();
            bad.truncate(5);
            c.fail(format!("{ctx}: d{name}: {n} of {} elements off: {}", base.len(), bad.join(", ")));
        }
        let fd_norm = fd.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(fd_norm > 1e-8 || name == "g" && spec.t == 1, "{ctx}: d{name} is zero, the check would be vacuous");
        // (Compared in the gradient's own shape: a shape mismatch has its own test below.)
        c.close(&ctx, &format!("d{name} (norm)"), grad, &tensor(fd, grad.shape()), NORM_TOL);
    }
    checked
}

fn run(specs: Vec<Spec>) {
    let mut c = Checker::default();
    let mut elements = 0;
    let n = specs.len();
    for s in &specs {
        elements += gradcheck(s, &mut c);
    }
    assert!(elements >= 500 * n, "only {elements} elements checked");
    c.finish(3 * n);
}

/// The standard sweep of one family: plain with initial state, a packed batch with a length-1
/// and an empty sequence and one crossing the chunk boundary, B = 2 without initial state,
/// in-kernel L2 norm, and per family strong decay, no gate, in-kernel sigmoid.
fn family_specs(family: Family) -> Vec<Spec> {
    let mut out = vec![
        Spec::new(family, SMALL).h0(true),
        Spec::new(family, SMALL).cu(&[0, 1, 67, 67, 70]).h0(true).seed(3),
        Spec::new(family, [2, 40, 1, 2, 4, 3]).seed(4),
        Spec::new(family, SMALL).l2norm().h0(true).seed(5),
    ];
    if family.decay() != Decay::None {
        out.push(Spec::new(family, SMALL).gate(Gate::Strong).h0(true).seed(6));
    }
    if family.gate_optional() {
        out.push(Spec::new(family, SMALL).without_g().h0(true).seed(7));
    }
    if family.erase() != Erase::None {
        out.push(Spec::new(family, SMALL).sigmoid().h0(true).seed(8));
    }
    out
}

#[test]
fn gradcheck_delta_rule() {
    run(family_specs(Family::DeltaRule));
}
#[test]
fn gradcheck_gated_delta_rule() {
    run(family_specs(Family::GatedDeltaRule));
}
#[test]
fn gradcheck_kda() {
    run(family_specs(Family::Kda));
}
#[test]
fn gradcheck_gdn2() {
    run(family_specs(Family::Gdn2));
}
#[test]
fn gradcheck_gla() {
    run(family_specs(Family::Gla));
}
#[test]
fn gradcheck_simple_gla() {
    run(family_specs(Family::SimpleGla));
}
#[test]
fn gradcheck_linear_attn() {
    run(family_specs(Family::LinearAttn));
}

/// Grouped value heads: HV / H = 3, so dq and dk sum over three value heads.
#[test]
fn gradcheck_grouped_value_heads() {
    run(vec![
        Spec::new(Family::GatedDeltaRule, [1, 66, 1, 3, 4, 3]).h0(true),
        Spec::new(Family::Kda, [1, 66, 1, 3, 4, 3]).h0(true).seed(2),
        Spec::new(Family::Gla, [1, 66, 1, 3, 4, 3]).h0(true).seed(3),
        Spec::new(Family::Kda, [1, 66, 1, 3, 4, 3]).cu(&[0, 2, 66]).l2norm().h0(true).seed(4),
    ]);
}

/// `use_gate_in_kernel`: gradients of the raw gate input `a`, `A_log` and `dt_bias`, with a head
/// dt_bias `[HV]` (Gated DeltaNet, simple GLA) and a channel dt_bias `[HV·K]` (KDA, GDN-2) or
/// `[HV, K]` (GLA).
#[test]
fn gradcheck_gate_in_kernel() {
    run(vec![
        Spec::new(Family::GatedDeltaRule, SMALL).gate_in_kernel(DtBias::Head).h0(true),
        Spec::new(Family::Kda, SMALL).gate_in_kernel(DtBias::Flat).h0(true).seed(2),
        Spec::new(Family::SimpleGla, SMALL).gate_in_kernel(DtBias::Head).seed(3),
        Spec::new(Family::Gdn2, SMALL).gate_in_kernel(DtBias::Flat).h0(true).seed(4),
        Spec::new(Family::Gla, SMALL).gate_in_kernel(DtBias::Matrix).h0(true).seed(5),
    ]);
}

/// Every in-kernel option at once, on a packed batch.
#[test]
fn gradcheck_all_options() {
    run(vec![
        Spec::new(Family::Kda, SMALL).cu(&[0, 5, 70]).gate_in_kernel(DtBias::Flat).l2norm().sigmoid().h0(true).seed(9),
        Spec::new(Family::GatedDeltaRule, SMALL)
            .cu(&[0, 65, 70])
            .gate_in_kernel(DtBias::Head)
            .l2norm()
            .sigmoid()
            .h0(true)
            .seed(10),
    ]);
}
