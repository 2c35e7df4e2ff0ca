//! GPU forms against their CPU twins (`cuda_vs_cpu`): the recurrent step on random inputs for
//! every family, f32 / bf16 / f16 inputs, varlen batches with an empty sequence, several tokens
//! per sequence, grouped value heads, head dims 64, 128 and non-powers of two, the in-op
//! options, and a state pool indexed per sequence. Plus the typed errors of the GPU entry.
//!
//! Every test prints "skipped: no CUDA device" and passes where there is no GPU (CI).
mod common;

use std::sync::Arc;

use common::gpu::{gpu, GpuData};
use common::{Checker, DtBias, Spec};
use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Tensor};
use fla_ops::{recurrent, Decay, Erase, Family, Inputs};

/// f32 inputs: the same f32 arithmetic in another order.
const TOL_F32: f64 = 1e-4;
/// bf16 / f16 inputs: outputs rounded to 16 bits (relative RMSE).
const TOL_HALF: f64 = 5e-3;

/// `[B, T, H, HV, K, V]` and `cu_seqlens`: one decode token per sequence, several tokens per
/// sequence, a packed batch with an empty sequence and dims that are not powers of two, and a
/// V that is not a multiple of 4 (the scalar-column kernel).
fn shapes() -> Vec<([usize; 6], Option<Vec<usize>>)> {
    vec![
        ([3, 1, 2, 4, 64, 64], None),
        ([2, 5, 1, 2, 128, 128], None),
        ([1, 13, 2, 4, 100, 96], Some(vec![0, 4, 4, 13])),
        ([2, 3, 1, 2, 32, 50], None),
        ([1, 7, 1, 2, 200, 72], Some(vec![0, 1, 7])),
    ]
}

fn specs(family: Family) -> Vec<Spec> {
    let mut out = Vec::new();
    for (i, (shape, cu)) in shapes().into_iter().enumerate() {
        let mut s = Spec::new(family, shape).h0(true).seed(1000 + i as u64);
        if let Some(cu) = cu {
            s = s.cu(&cu);
        }
        // Every other case with the in-op options (L2 norm, sigmoid, gate).
        if i % 2 == 1 {
            s = s.l2norm();
            if family.erase() != Erase::None {
                s = s.sigmoid();
            }
            s = match family.decay() {
                Decay::None => s,
                Decay::Head => s.gate_in_kernel(DtBias::Head),
                Decay::Channel => s.gate_in_kernel(if i == 1 { DtBias::Flat } else { DtBias::Matrix }),
            };
        }
        out.push(s);
    }
    out
}

/// Pool rows of the `n` sequences in a pool of `2n + 1`: reversed and spread, so that a kernel
/// using row `n` instead of `state_indices[n]` is caught.
fn pool_rows(n: usize) -> (usize, Vec<usize>) {
    let pool = 2 * n + 1;
    (pool, (0..n).map(|i| pool - 1 - 2 * i).collect())
}

/// One spec in one dtype: GPU step (with a pool) against the CPU step; checks `o`, the updated
/// rows and that the other rows are untouched.
fn check_case(c: &mut Checker, dev: &Arc<CudaDevice>, spec: &Spec, dtype: DType, pooled: bool) {
    let ctx = format!("{} {dtype}{}", spec.label(), if pooled { " pool" } else { "" });
    let x = spec.data().cast(dtype);
    let (n, hv, k, v) = (spec.n(), spec.hv, spec.k, spec.v);
    let kv = hv * k * v;
    let h0: Vec<f32> = x.h0.as_ref().unwrap().to_vec().unwrap();

    // CPU twin.
    let mut cpu_state = Tensor::from_vec(h0.clone(), &[n, hv, k, v]).unwrap();
    let cpu_o =
        recurrent::step(spec.family, &Inputs { initial_state: None, ..x.inputs() }, &spec.opts(), &mut cpu_state)
            .unwrap();

    // GPU, the sequences' states at pool rows (or the plain [N,HV,K,V] state).
    let (pool, rows) = if pooled { pool_rows(n) } else { (n, (0..n).collect()) };
    let mut pool_host: Vec<f32> = (0..pool * kv).map(|i| ((i % 97) as f32 - 48.0) * 1e-2).collect();
    for (i, &r) in rows.iter().enumerate() {
        pool_host[r * kv..][..kv].copy_from_slice(&h0[i * kv..][..kv]);
    }
    let mut state =
        CudaTensor::from_host(&Tensor::from_vec(pool_host.clone(), &[pool, hv, k, v]).unwrap(), dev).unwrap();
    let g = GpuData::new(&x, dev);
    let o = recurrent::step_cuda(spec.family, &g.inputs(false), &spec.opts(), &mut state, pooled.then_some(&rows[..]));
    let o = match o {
        Ok(o) => o.to_host().unwrap(),
        Err(e) => return c.fail(format!("{ctx}: {e}")),
    };
    let tol = if dtype == DType::F32 { TOL_F32 } else { TOL_HALF };
    c.close(&ctx, "o", &o, &cpu_o, tol);
    assert_eq!(o.dtype(), dtype);
    let got: Vec<f32> = state.to_host().unwrap().to_vec().unwrap();
    let want: Vec<f32> = cpu_state.to_vec().unwrap();
    for (i, &r) in rows.iter().enumerate() {
        let g = Tensor::from_vec(got[r * kv..][..kv].to_vec(), &[hv, k, v]).unwrap();
        let w = Tensor::from_vec(want[i * kv..][..kv].to_vec(), &[hv, k, v]).unwrap();
        // The state is f32 in both, computed from the same (rounded) inputs.
        c.close(&ctx, &format!("state[{i}] (pool row {r})"), &g, &w, TOL_F32);
    }
    let untouched = (0..pool).filter(|r| !rows.contains(r)).all(|r| got[r * kv..][..kv] == pool_host[r * kv..][..kv]);
    if !untouched {
        c.fail(format!("{ctx}: a pool row no sequence owns was changed"));
    }
}

fn family_vs_cpu(family: Family) {
    let Some(dev) = gpu(&format!("recurrent_step_vs_cpu({family})")) else { return };
    let mut c = Checker::default();
    for (i, spec) in specs(family).iter().enumerate() {
        check_case(&mut c, &dev, spec, DType::F32, i % 2 == 0);
        check_case(&mut c, &dev, spec, DType::BF16, i % 2 == 1);
    }
    check_case(&mut c, &dev, &specs(family)[1], DType::F16, true);
    eprintln!("{family}: {} checks, {} failures", c.checks, c.failures.len());
    c.finish(10);
}

#[test]
fn gated_delta_rule_step_vs_cpu() {
    family_vs_cpu(Family::GatedDeltaRule);
}

#[test]
fn kda_step_vs_cpu() {
    family_vs_cpu(Family::Kda);
}

#[test]
fn delta_rule_step_vs_cpu() {
    family_vs_cpu(Family::DeltaRule);
}

#[test]
fn gdn2_step_vs_cpu() {
    family_vs_cpu(Family::Gdn2);
}

#[test]
fn gla_family_step_vs_cpu() {
    family_vs_cpu(Family::Gla);
    family_vs_cpu(Family::SimpleGla);
    family_vs_cpu(Family::LinearAttn);
}

/// Decoding one token per call, carrying the state on the device, equals one call over all tokens.
#[test]
fn step_by_step_equals_one_call() {
    let Some(dev) = gpu("step_by_step_equals_one_call") else { return };
    let spec = Spec::new(Family::GatedDeltaRule, [2, 6, 2, 4, 128, 128]).h0(true).l2norm().seed(5);
    let x = spec.data().cast(DType::F32);
    let opts = spec.opts();
    let h0 = CudaTensor::from_host(x.h0.as_ref().unwrap(), &dev).unwrap();
    let mut whole = CudaTensor::zeros(h0.shape(), DType::F32, &dev).unwrap();
    whole.copy_from(&h0).unwrap();
    let g = GpuData::new(&x, &dev);
    let o_all =
        recurrent::step_cuda(spec.family, &g.inputs(false), &opts, &mut whole, None).unwrap().to_host().unwrap();
    let mut state = CudaTensor::zeros(h0.shape(), DType::F32, &dev).unwrap();
    state.copy_from(&h0).unwrap();
    let mut c = Checker::default();
    for t in 0..spec.t {
        let xt = common::data_tokens(&x, t, 1);
        let gt = GpuData::new(&xt, &dev);
        let o =
            recurrent::step_cuda(spec.family, &gt.inputs(false), &opts, &mut state, None).unwrap().to_host().unwrap();
        c.close(&format!("token {t}"), "o", &o, &common::tokens(&o_all, t, 1), 1e-5);
    }
    c.close("final", "state", &state.to_host().unwrap(), &whole.to_host().unwrap(), 1e-5);
    c.finish(spec.t + 1);
}

/// Bad pools, shapes and devices are typed errors, not panics or silent corruption.
#[test]
fn step_cuda_errors() {
    let Some(dev) = gpu("step_cuda_errors") else { return };
    let spec = Spec::new(Family::GatedDeltaRule, [2, 1, 1, 2, 64, 64]).seed(9);
    let x = spec.data().cast(DType::F32);
    let g = GpuData::new(&x, &dev);
    let opts = spec.opts();
    let run = |state: &mut CudaTensor, idx: Option<&[usize]>| {
        recurrent::step_cuda(spec.family, &g.inputs(false), &opts, state, idx).unwrap_err()
    };
    let mut pool = CudaTensor::zeros(&[4, 2, 64, 64], DType::F32, &dev).unwrap();
    assert!(matches!(run(&mut pool, None), Error::Shape { arg: "state", .. }));
    assert!(matches!(run(&mut pool, Some(&[1, 1])), Error::Size { .. }));
    assert!(matches!(run(&mut pool, Some(&[0, 4])), Error::Size { .. }));
    assert!(matches!(run(&mut pool, Some(&[0])), Error::Shape { arg: "state_indices", .. }));
    let mut half = CudaTensor::zeros(&[2, 2, 64, 64], DType::BF16, &dev).unwrap();
    assert!(matches!(run(&mut half, None), Error::DType { arg: "state", .. }));
    let mut wrong = CudaTensor::zeros(&[2, 2, 64, 32], DType::F32, &dev).unwrap();
    assert!(matches!(run(&mut wrong, None), Error::Shape { arg: "state", .. }));
    let mut ok = CudaTensor::zeros(&[4, 2, 64, 64], DType::F32, &dev).unwrap();
    recurrent::step_cuda(spec.family, &g.inputs(false), &opts, &mut ok, Some(&[3, 0])).unwrap();
    let with_h0 = Inputs { initial_state: Some(&ok), ..g.inputs(false) };
    let mut s = CudaTensor::zeros(&[2, 2, 64, 64], DType::F32, &dev).unwrap();
    assert!(recurrent::step_cuda(spec.family, &with_h0, &opts, &mut s, None).is_err());
}

/// Without kernels in the build, asking for one says what to do (runs everywhere).
#[test]
fn missing_kernels_are_a_typed_error() {
    match fla_kernels::cubin("recurrent") {
        Ok(image) => assert!(!image.is_empty()),
        Err(msg) => assert!(msg.contains("scripts/install-nvcc.sh"), "{msg}"),
    }
    assert!(fla_kernels::cubin("no_such_module").is_err());
}
