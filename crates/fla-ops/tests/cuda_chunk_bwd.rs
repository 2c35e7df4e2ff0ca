//! The GPU chunk backward (`chunk::backward_cuda`: Gated DeltaNet, DeltaNet, KDA) against the
//! CPU chunk backward on the same inputs and upstream gradients: every gradient (q, k, v, g,
//! beta, the initial state, A_log, dt_bias) for T = 1, 63, 64, 65, 200, a varlen batch with a
//! sequence of one token and an empty one, grouped and ungrouped value heads, K = V = 64 and 128,
//! dims that are not powers of two, strong decay, with and without an initial state and `dht`, the
//! in-op options, f32, bf16 and f16 inputs. Plus the typed errors of bad upstream gradients and
//! saved contexts.
//!
//! Every test prints "skipped: no CUDA device" and passes where there is no GPU (CI).
mod common;

use std::sync::Arc;

use common::gpu::{gpu, value_block_spec, GpuData};
use common::{Checker, DtBias, Gate, Spec};
use fla_core::cuda::{CudaDevice, CudaTensor};
use fla_core::{DType, Error, Tensor};
use fla_ops::{chunk, Family, Grads};

/// f32 inputs: the same f32 arithmetic as the CPU in another order, through more sums than the
/// forward (the state gradient over the whole sequence).
const TOL_F32: f64 = 2e-4;
/// bf16 / f16 inputs: the gradients are rounded to 16 bits on both sides, and the tensor-core
/// path (K, V of 64 or 128, every family) rounds its matmul operands to 16 bits as FLA does.
const TOL_HALF: f64 = 1e-2;

fn specs(fam: Family) -> Vec<Spec> {
    let mut out = Vec::new();
    let mut seed = 7000;
    let mut next = || {
        seed += 1;
        seed
    };
    for (k, v) in [(64, 64), (128, 128), (100, 96)] {
        for t in [1, 63, 64, 65, 200] {
            let mut s = Spec::new(fam, [2, t, 2, 4, k, v]).h0(t != 63).seed(next());
            if t == 65 || t == 200 {
                s = s.gate(Gate::Strong);
            }
            out.push(s);
        }
        out.push(Spec::new(fam, [1, 130, 2, 4, k, v]).cu(&[0, 1, 65, 65, 130]).h0(true).seed(next()));
    }
    let mut s = Spec::new(fam, [1, 150, 2, 4, 128, 128]).cu(&[0, 70, 70, 150]).h0(true).l2norm().sigmoid();
    match fam {
        Family::GatedDeltaRule => s = s.gate_in_kernel(DtBias::Head),
        Family::Kda => s = s.gate_in_kernel(DtBias::Flat),
        _ => {}
    }
    out.push(s.seed(next()));
    if fam == Family::Kda {
        out.push(Spec::new(fam, [2, 90, 1, 3, 64, 64]).gate_in_kernel(DtBias::Matrix).sigmoid().seed(next()));
    }
    out.push(Spec::new(fam, [2, 70, 3, 3, 32, 50]).h0(true).gate(Gate::Strong).l2norm().seed(next()));
    // H = HV with K = V of 128 and 64: the tensor-core dq/dk kernel finishes dq, dk itself
    // (through the L2 norm's backward) instead of leaving them to chunk_bwd_post.
    out.push(Spec::new(fam, [2, 100, 2, 2, 128, 128]).h0(true).l2norm().seed(next()));
    out.push(Spec::new(fam, [1, 90, 3, 3, 64, 64]).cu(&[0, 30, 90]).seed(next()));
    // K != V on the tensor-core path (its dq/dk kernel is instantiated per (K, V)).
    out.push(Spec::new(fam, [1, 100, 1, 2, 64, 128]).h0(true).l2norm().seed(next()));
    out.push(Spec::new(fam, [1, 80, 2, 2, 128, 64]).h0(true).seed(next()));
    out.push(Spec::new(fam, [1, 140, 1, 4, 64, 200]).h0(true).l2norm().seed(next()));
    // H = HV with the in-op gate and norm over a varlen batch (KDA: dq, dk finished in its dq/dk
    // kernel beside the per-channel gate gradient).
    if fam == Family::Kda {
        let s = Spec::new(fam, [1, 150, 2, 2, 128, 128]).cu(&[0, 20, 150]).h0(true).l2norm().sigmoid();
        out.push(s.gate_in_kernel(DtBias::Flat).seed(next()));
    }
    out
}

/// Whether the backward of `s` in 16 bits takes the tensor-core path (K and V of 64 or 128).
fn tensor_core_dims(s: &Spec) -> bool {
    [64, 128].contains(&s.k) && [64, 128].contains(&s.v)
}

fn to_host(g: Grads<CudaTensor>) -> Grads {
    let h = |t: CudaTensor| t.to_host().unwrap();
    let ho = |t: Option<CudaTensor>| t.map(h);
    Grads {
        dq: h(g.dq),
        dk: h(g.dk),
        dv: h(g.dv),
        dg: ho(g.dg),
        dbeta: ho(g.dbeta),
        db: ho(g.db),
        dw: ho(g.dw),
        dh0: ho(g.dh0),
        da_log: ho(g.da_log),
        ddt_bias: ho(g.ddt_bias),
    }
}

/// One spec in one dtype, with and without `dht`: every GPU gradient against the CPU's.
fn check_case(c: &mut Checker, dev: &Arc<CudaDevice>, spec: &Spec, dtype: DType, with_dht: bool, worst: &mut [f64; 2]) {
    let ctx = format!("{} {dtype} dht={with_dht}", spec.label());
    let x = spec.data().cast(dtype);
    let opts = spec.opts();
    let (d_o, dht) = spec.upstream();
    let d_o = d_o.to_dtype(dtype).unwrap();
    let dht = dht.to_dtype(DType::F32).unwrap();
    let dht = with_dht.then_some(&dht);
    let cpu = chunk::backward(spec.family, &x.inputs(), &opts, &d_o, dht).unwrap();
    let g = GpuData::new(&x, dev);
    let up = |t: &Tensor| CudaTensor::from_host(t, dev).unwrap();
    let (d_o_gpu, dht_gpu) = (up(&d_o), dht.map(up));
    // Half the cases through the saving forward (no recompute in the backward), checking its
    // outputs against the plain forward's.
    let inputs = g.inputs(true);
    let result = if spec.seed % 2 == 0 {
        let (o, ht, saved) = match chunk::forward_cuda_saving(spec.family, &inputs, &opts) {
            Ok(r) => r,
            Err(e) => return c.fail(format!("{ctx}: forward_cuda_saving: {e}")),
        };
        let (o_ref, ht_ref) = chunk::forward_cuda(spec.family, &inputs, &opts).unwrap();
        let tol = if dtype == DType::F32 { TOL_F32 } else { TOL_HALF };
        c.close(&ctx, "saving o", &o.to_host().unwrap(), &o_ref.to_host().unwrap(), tol);
        c.close(&ctx, "saving ht", &ht.unwrap().to_host().unwrap(), &ht_ref.unwrap().to_host().unwrap(), tol);
        chunk::backward_cuda(spec.family, &inputs, &opts, &d_o_gpu, dht_gpu.as_ref(), Some(&saved))
    } else {
        chunk::backward_cuda(spec.family, &inputs, &opts, &d_o_gpu, dht_gpu.as_ref(), None)
    };
    let got = match result {
        Ok(r) => to_host(r),
        Err(e) => return c.fail(format!("{ctx}: {e}")),
    };
    assert_eq!(got.dq.dtype(), dtype);
    let tol = if dtype == DType::F32 { TOL_F32 } else { TOL_HALF };
    c.grads(&ctx, &got, &cpu, tol);
    let slot = usize::from(dtype != DType::F32);
    for ((name, a), (_, b)) in common::all_grads(&got).into_iter().zip(common::all_grads(&cpu)) {
        if let (Some(a), Some(b)) = (a, b) {
            let e = a.rel_err(b).unwrap();
            if e > worst[slot] {
                eprintln!("  worst so far: {ctx} {name} {e:.2e}");
                worst[slot] = e;
            }
        }
    }
}

fn sweep(test: &str, family: Family) {
    let Some(dev) = gpu(test) else { return };
    let mut c = Checker::default();
    let specs = specs(family);
    let mut worst = [0.0f64; 2];
    for spec in &specs {
        check_case(&mut c, &dev, spec, DType::F32, true, &mut worst);
        check_case(&mut c, &dev, spec, DType::BF16, false, &mut worst);
    }
    for spec in specs.iter().filter(|s| s.t > 64 && (s.k == s.v || tensor_core_dims(s))) {
        check_case(&mut c, &dev, spec, DType::F16, true, &mut worst);
    }
    let summary = format!("{family} chunk backward: largest rel err: f32 {:.2e}, 16-bit {:.2e}", worst[0], worst[1]);
    c.report_and_finish(&summary, 8 * specs.len());
}

#[test]
fn gated_delta_rule_chunk_backward_vs_cpu() {
    sweep("gated_delta_rule_chunk_backward_vs_cpu", Family::GatedDeltaRule);
}

#[test]
fn delta_rule_chunk_backward_vs_cpu() {
    sweep("delta_rule_chunk_backward_vs_cpu", Family::DeltaRule);
}

#[test]
fn kda_chunk_backward_vs_cpu() {
    sweep("kda_chunk_backward_vs_cpu", Family::Kda);
}

#[test]
fn bad_upstream_gradients_are_typed_errors() {
    let Some(dev) = gpu("bad_upstream_gradients_are_typed_errors") else { return };
    let spec = Spec::new(Family::GatedDeltaRule, [1, 70, 2, 2, 64, 64]);
    let x = spec.data().cast(DType::F32);
    let g = GpuData::new(&x, &dev);
    let opts = spec.opts();
    let zeros = |shape: &[usize], dt: DType| CudaTensor::zeros(shape, dt, &dev).unwrap();
    let run = |d_o: &CudaTensor, dht: Option<&CudaTensor>| {
        chunk::backward_cuda(Family::GatedDeltaRule, &g.inputs(true), &opts, d_o, dht, None).unwrap_err()
    };
    let good_do = zeros(&[1, 70, 2, 64], DType::F32);
    assert!(matches!(run(&zeros(&[1, 69, 2, 64], DType::F32), None), Error::Shape { arg: "do", .. }));
    assert!(matches!(run(&zeros(&[1, 70, 2, 64], DType::BF16), None), Error::DType { arg: "do", .. }));
    assert!(matches!(run(&good_do, Some(&zeros(&[1, 2, 64, 63], DType::F32))), Error::Shape { arg: "dht", .. }));
    assert!(matches!(run(&good_do, Some(&zeros(&[1, 2, 64, 64], DType::BF16))), Error::DType { arg: "dht", .. }));
    let gla = chunk::backward_cuda(Family::Gla, &g.inputs(true), &opts, &good_do, None, None).unwrap_err();
    assert!(matches!(gla, Error::Unsupported { .. }), "{gla}");
    // A saved context from other inputs, another family or other options.
    let (_, _, saved) = chunk::forward_cuda_saving(Family::GatedDeltaRule, &g.inputs(true), &opts).unwrap();
    let other = GpuData::new(&x, &dev);
    let e = chunk::backward_cuda(Family::GatedDeltaRule, &other.inputs(true), &opts, &good_do, None, Some(&saved));
    assert!(matches!(e, Err(Error::Argument { arg: "saved", .. })), "{e:?}");
    let l2 = fla_ops::Options { use_qk_l2norm_in_kernel: true, ..opts };
    let e = chunk::backward_cuda(Family::GatedDeltaRule, &g.inputs(true), &l2, &good_do, None, Some(&saved));
    assert!(matches!(e, Err(Error::Argument { arg: "saved", .. })), "{e:?}");
    let without_g = fla_ops::Inputs { g: None, ..g.inputs(true) };
    let e = chunk::backward_cuda(Family::DeltaRule, &without_g, &opts, &good_do, None, Some(&saved));
    assert!(matches!(e, Err(Error::Argument { arg: "saved", .. })), "{e:?}");
}

/// Every value-block width of the tensor-core reverse sweep (the launcher picks 16 for the small
/// shapes above; 32 and 64 serve many heads), forced through `FLA_CHUNK_BV`, as the forward's
/// `tensor_core_value_blocks` does: Gated DeltaNet's and KDA's forms, the latter also through the
/// saving forward (whose sweep takes the same block).
#[test]
fn tensor_core_backward_value_blocks() {
    let Some(dev) = gpu("tensor_core_backward_value_blocks") else { return };
    let mut c = Checker::default();
    for family in [Family::GatedDeltaRule, Family::Kda] {
        let spec = value_block_spec(family, 78);
        let x = spec.data().cast(DType::BF16);
        let opts = spec.opts();
        let (d_o, dht) = spec.upstream();
        let d_o = d_o.to_dtype(DType::BF16).unwrap();
        let dht = dht.to_dtype(DType::F32).unwrap();
        let cpu = chunk::backward(spec.family, &x.inputs(), &opts, &d_o, Some(&dht)).unwrap();
        let g = GpuData::new(&x, &dev);
        let up = |t: &Tensor| CudaTensor::from_host(t, &dev).unwrap();
        let (d_o_gpu, dht_gpu) = (up(&d_o), up(&dht));
        for bv in ["16", "32", "64"] {
            // SAFETY (set_var): the tests of this binary run on one thread (`--test-threads=1` on
            // the GPU box); no other thread reads the environment meanwhile.
            unsafe { std::env::set_var("FLA_CHUNK_BV", bv) };
            let inputs = g.inputs(true);
            let got = chunk::backward_cuda(family, &inputs, &opts, &d_o_gpu, Some(&dht_gpu), None).unwrap();
            c.grads(&format!("{family} BV={bv}"), &to_host(got), &cpu, TOL_HALF);
            if family == Family::Kda {
                let (_, _, saved) = chunk::forward_cuda_saving(family, &inputs, &opts).unwrap();
                let got = chunk::backward_cuda(family, &inputs, &opts, &d_o_gpu, Some(&dht_gpu), Some(&saved)).unwrap();
                c.grads(&format!("{family} saved BV={bv}"), &to_host(got), &cpu, TOL_HALF);
            }
        }
        unsafe { std::env::remove_var("FLA_CHUNK_BV") };
    }
    c.finish(3 * 3 * 6);
}
