//! The GPU chunk forward (`chunk::forward_cuda`, Gated DeltaNet) against the CPU chunk forward
//! on random inputs: T = 1, 63, 64, 65, 200, a varlen batch, grouped value heads, K = V = 64 and
//! 128, dims that are not powers of two (and V > 128), with and without an initial state, the
//! in-op options, strong decay, f32 / bf16 / f16 inputs. Plus the typed errors.
//!
//! Every test prints "skipped: no CUDA device" and passes where there is no GPU (CI).
mod common;

use std::sync::Arc;

use common::gpu::{gpu, GpuData};
use common::{Checker, DtBias, Gate, Spec};
use fla_core::cuda::CudaDevice;
use fla_core::{DType, Error};
use fla_ops::{chunk, Family};

/// f32 inputs: the same f32 arithmetic in another order.
const TOL_F32: f64 = 1e-4;
/// bf16 / f16 inputs: outputs rounded to 16 bits (relative RMSE).
const TOL_HALF: f64 = 5e-3;

/// The cases: `[B, T, H, HV, K, V]`, `cu_seqlens`, initial state, strong decay, in-op options.
fn specs() -> Vec<Spec> {
    let fam = Family::GatedDeltaRule;
    let mut out = Vec::new();
    let mut seed = 2000;
    let mut next = || {
        seed += 1;
        seed
    };
    for (k, v) in [(64, 64), (128, 128), (100, 96)] {
        for t in [1, 63, 64, 65, 200] {
            for h0 in [false, true] {
                let mut s = Spec::new(fam, [2, t, 2, 4, k, v]).h0(h0).seed(next());
                if t == 65 || t == 200 {
                    s = s.gate(Gate::Strong);
                }
                out.push(s);
            }
        }
        out.push(Spec::new(fam, [1, 130, 2, 4, k, v]).cu(&[0, 1, 65, 130]).h0(true).seed(next()));
        out.push(Spec::new(fam, [1, 130, 2, 4, k, v]).cu(&[0, 1, 65, 130]).gate(Gate::Strong).seed(next()));
    }
    // In-op L2 norm, beta sigmoid and gate; an empty sequence; V > 128 (two V blocks in the
    // intra kernel); K below 64.
    out.push(
        Spec::new(fam, [1, 150, 2, 4, 128, 128])
            .cu(&[0, 70, 70, 150])
            .h0(true)
            .l2norm()
            .sigmoid()
            .gate_in_kernel(DtBias::Head)
            .seed(next()),
    );
    out.push(Spec::new(fam, [1, 100, 1, 2, 64, 200]).h0(true).l2norm().seed(next()));
    out.push(Spec::new(fam, [2, 70, 3, 3, 32, 50]).h0(true).gate(Gate::Strong).seed(next()));
    out
}

/// One spec in one dtype: GPU chunk forward against the CPU chunk forward on the same (rounded)
/// inputs; checks `o` and the final state.
fn check_case(c: &mut Checker, dev: &Arc<CudaDevice>, spec: &Spec, dtype: DType) {
    let ctx = format!("{} {dtype}", spec.label());
    let x = spec.data().cast(dtype);
    let opts = spec.opts();
    let cpu = chunk::forward(spec.family, &x.inputs(), &opts).unwrap();
    let g = GpuData::new(&x, dev);
    let (o, ht) = match chunk::forward_cuda(spec.family, &g.inputs(true), &opts) {
        Ok(r) => r,
        Err(e) => return c.fail(format!("{ctx}: {e}")),
    };
    let o = o.to_host().unwrap();
    assert_eq!(o.dtype(), dtype);
    let tol = if dtype == DType::F32 { TOL_F32 } else { TOL_HALF };
    c.close(&ctx, "o", &o, &cpu.o, tol);
    match ht {
        Some(ht) => {
            let ht = ht.to_host().unwrap();
            assert_eq!(ht.dtype(), DType::F32);
            // f32 in both, from the same rounded inputs.
            c.close(&ctx, "ht", &ht, cpu.final_state.as_ref().unwrap(), TOL_F32);
        }
        None => c.fail(format!("{ctx}: no final state returned")),
    }
}

#[test]
fn gated_delta_rule_chunk_forward_vs_cpu() {
    let Some(dev) = gpu("gated_delta_rule_chunk_forward_vs_cpu") else { return };
    let mut c = Checker::default();
    let specs = specs();
    for spec in &specs {
        check_case(&mut c, &dev, spec, DType::F32);
        check_case(&mut c, &dev, spec, DType::BF16);
    }
    check_case(&mut c, &dev, &specs[specs.len() - 3], DType::F16);
    eprintln!("chunk forward: {} checks, {} failures", c.checks, c.failures.len());
    for f in c.failures.iter().take(20) {
        eprintln!("  {f}");
    }
    c.finish(4 * specs.len());
}

/// Without `output_final_state` no state comes back, and `o` is the same.
#[test]
fn chunk_forward_without_final_state() {
    let Some(dev) = gpu("chunk_forward_without_final_state") else { return };
    let spec = Spec::new(Family::GatedDeltaRule, [2, 90, 2, 4, 64, 64]).h0(true).seed(7);
    let x = spec.data().cast(DType::F32);
    let g = GpuData::new(&x, &dev);
    let opts = fla_ops::Options { output_final_state: false, ..spec.opts() };
    let (o, ht) = chunk::forward_cuda(spec.family, &g.inputs(true), &opts).unwrap();
    assert!(ht.is_none());
    let cpu = chunk::forward(spec.family, &x.inputs(), &opts).unwrap();
    let mut c = Checker::default();
    c.close("no final state", "o", &o.to_host().unwrap(), &cpu.o, TOL_F32);
    c.finish(1);
}

/// Other families, K > 128 and a wrong-dtype initial state are typed errors.
#[test]
fn chunk_forward_cuda_errors() {
    let Some(dev) = gpu("chunk_forward_cuda_errors") else { return };
    let kda = Spec::new(Family::Kda, [1, 8, 1, 1, 64, 64]).seed(3).data().cast(DType::F32);
    let g = GpuData::new(&kda, &dev);
    let e = chunk::forward_cuda(Family::Kda, &g.inputs(true), &Default::default()).unwrap_err();
    assert!(matches!(&e, Error::Unsupported { msg, .. } if msg.contains("kda")), "{e}");
    let big = Spec::new(Family::GatedDeltaRule, [1, 8, 1, 1, 192, 64]).seed(4).data().cast(DType::F32);
    let g = GpuData::new(&big, &dev);
    let e = chunk::forward_cuda(Family::GatedDeltaRule, &g.inputs(true), &Default::default()).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let spec = Spec::new(Family::GatedDeltaRule, [1, 8, 1, 1, 64, 64]).h0(true).seed(5);
    let mut x = spec.data().cast(DType::BF16);
    x.h0 = Some(x.h0.unwrap().to_dtype(DType::BF16).unwrap());
    let g = GpuData::new(&x, &dev);
    assert!(chunk::forward_cuda(spec.family, &g.inputs(true), &spec.opts()).is_err());
}
