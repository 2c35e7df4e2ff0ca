//! The GPU chunk forward (`chunk::forward_cuda`: Gated DeltaNet, DeltaNet, KDA) against the CPU
//! chunk forward on random inputs: T = 1, 63, 64, 65, 200, a varlen batch, grouped value heads,
//! K = V = 64 and 128, dims that are not powers of two (and V > 128), with and without an initial
//! state, the in-op options, strong decay, f32 / bf16 / f16 inputs — through both kernel paths
//! (tensor cores for 16-bit inputs with K = 64 or 128 and V a multiple of 16; f32 otherwise),
//! and every value-block width of the tensor-core path. Plus the typed errors.
//!
//! Every test prints "skipped: no CUDA device" and passes where there is no GPU (CI).
mod common;

use std::sync::Arc;

use common::gpu::{gpu, value_block_spec, GpuData};
use common::{Checker, DtBias, Gate, Spec};
use fla_core::cuda::CudaDevice;
use fla_core::{DType, Error};
use fla_ops::{chunk, Family};

/// f32 path, f32 inputs: the same f32 arithmetic in another order (also the f32 final state of
/// the f32 path from 16-bit inputs).
const TOL_F32: f64 = 1e-4;
/// f32 path, bf16 / f16 inputs: outputs rounded to 16 bits.
const TOL_HALF: f64 = 5e-3;
/// Tensor-core path: the matmul operands (T, W, U, P, the state and the new values) are rounded
/// to 16 bits, as in FLA's kernels; measured up to ~EST on an H200 (printed by the sweep).
const TOL_TC: f64 = 1e-2;

/// Whether the GPU forward takes the tensor-core path for these sizes and dtype.
fn tensor_cores(spec: &Spec, dtype: DType) -> bool {
    dtype != DType::F32 && matches!(spec.k, 64 | 128) && spec.v % 16 == 0
}

/// The cases: `[B, T, H, HV, K, V]`, `cu_seqlens`, initial state, strong decay, in-op options.
fn specs(fam: Family) -> Vec<Spec> {
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
    // In-op L2 norm, beta sigmoid and gate (gated_delta_rule: DeltaNet has no gate); an empty
    // sequence; V > 128 (two V blocks in the intra kernel); K below 64.
    let mut s = Spec::new(fam, [1, 150, 2, 4, 128, 128]).cu(&[0, 70, 70, 150]).h0(true).l2norm().sigmoid();
    match fam {
        Family::GatedDeltaRule => s = s.gate_in_kernel(DtBias::Head),
        Family::Kda => s = s.gate_in_kernel(DtBias::Flat),
        _ => {}
    }
    out.push(s.seed(next()));
    out.push(Spec::new(fam, [1, 100, 1, 2, 64, 200]).h0(true).l2norm().seed(next()));
    out.push(Spec::new(fam, [2, 70, 3, 3, 32, 50]).h0(true).gate(Gate::Strong).seed(next()));
    // V = 192: three 64-column blocks of V in the tensor-core intra kernel.
    out.push(Spec::new(fam, [1, 100, 1, 2, 64, 192]).h0(true).l2norm().seed(next()));
    // K = 64 with V = 32 and 48 (narrow value blocks), grouped value heads with HV / H = 4.
    out.push(Spec::new(fam, [1, 140, 1, 4, 64, 48]).h0(true).l2norm().seed(next()));
    out.push(Spec::new(fam, [1, 140, 2, 4, 128, 32]).cu(&[0, 3, 140]).l2norm().seed(next()));
    out
}

/// One spec in one dtype: GPU chunk forward against the CPU chunk forward on the same (rounded)
/// inputs; checks `o` and the final state, and raises `worst` to the largest relative error of
/// the tensor-core path.
fn check_case(c: &mut Checker, dev: &Arc<CudaDevice>, spec: &Spec, dtype: DType, worst: &mut f64) {
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
    let tc = tensor_cores(spec, dtype);
    let (tol_o, tol_ht) = match (tc, dtype) {
        (true, _) => (TOL_TC, TOL_TC),
        (false, DType::F32) => (TOL_F32, TOL_F32),
        // f32 arithmetic on the same rounded inputs: only `o` is rounded to 16 bits.
        (false, _) => (TOL_HALF, TOL_F32),
    };
    c.close(&ctx, "o", &o, &cpu.o, tol_o);
    if tc {
        *worst = worst.max(o.rel_err(&cpu.o).unwrap());
    }
    match ht {
        Some(ht) => {
            let ht = ht.to_host().unwrap();
            assert_eq!(ht.dtype(), DType::F32);
            let want = cpu.final_state.as_ref().unwrap();
            c.close(&ctx, "ht", &ht, want, tol_ht);
            if tc {
                *worst = worst.max(ht.rel_err(want).unwrap());
            }
        }
        None => c.fail(format!("{ctx}: no final state returned")),
    }
}

/// Every spec of `family` in f32 and bf16 (and f16 for a few) through the GPU forward.
fn sweep(test: &str, family: Family) {
    let Some(dev) = gpu(test) else { return };
    let mut c = Checker::default();
    let specs = specs(family);
    let mut worst = 0.0f64;
    for spec in &specs {
        check_case(&mut c, &dev, spec, DType::F32, &mut worst);
        check_case(&mut c, &dev, spec, DType::BF16, &mut worst);
    }
    for spec in &specs[specs.len() - 6..] {
        check_case(&mut c, &dev, spec, DType::F16, &mut worst);
    }
    let summary =
        format!("{family} chunk forward: tensor-core path: largest rel err {worst:.2e} (tolerance {TOL_TC:.0e})");
    c.report_and_finish(&summary, 4 * specs.len());
}

#[test]
fn gated_delta_rule_chunk_forward_vs_cpu() {
    sweep("gated_delta_rule_chunk_forward_vs_cpu", Family::GatedDeltaRule);
}

#[test]
fn delta_rule_chunk_forward_vs_cpu() {
    sweep("delta_rule_chunk_forward_vs_cpu", Family::DeltaRule);
}

#[test]
fn kda_chunk_forward_vs_cpu() {
    sweep("kda_chunk_forward_vs_cpu", Family::Kda);
}

/// Every value-block width of the tensor-core path (`FLA_CHUNK_BV`) gives the same result on a
/// case with several blocks, a varlen batch and grouped value heads.
#[test]
fn tensor_core_value_blocks() {
    let Some(dev) = gpu("tensor_core_value_blocks") else { return };
    let mut c = Checker::default();
    // Gated DeltaNet's sweep and KDA's (per-row state decay) in every block width.
    for family in [Family::GatedDeltaRule, Family::Kda] {
        let spec = value_block_spec(family, 77);
        let x = spec.data().cast(DType::BF16);
        let cpu = chunk::forward(spec.family, &x.inputs(), &spec.opts()).unwrap();
        let g = GpuData::new(&x, &dev);
        for bv in ["16", "32", "64"] {
            // SAFETY (set_var): the tests of this binary run on one thread (`--test-threads=1` on
            // the GPU box); no other thread reads the environment meanwhile.
            unsafe { std::env::set_var("FLA_CHUNK_BV", bv) };
            let (o, ht) = chunk::forward_cuda(spec.family, &g.inputs(true), &spec.opts()).unwrap();
            let ctx = format!("{family} BV={bv}");
            c.close(&ctx, "o", &o.to_host().unwrap(), &cpu.o, TOL_TC);
            c.close(&ctx, "ht", &ht.unwrap().to_host().unwrap(), cpu.final_state.as_ref().unwrap(), TOL_TC);
        }
    }
    unsafe { std::env::remove_var("FLA_CHUNK_BV") };
    c.finish(12);
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

/// Other families, K > 128, a missing gate and a wrong-dtype initial state are typed errors.
#[test]
fn chunk_forward_cuda_errors() {
    let Some(dev) = gpu("chunk_forward_cuda_errors") else { return };
    let gla = Spec::new(Family::Gla, [1, 8, 1, 1, 64, 64]).seed(3).data().cast(DType::F32);
    let g = GpuData::new(&gla, &dev);
    let e = chunk::forward_cuda(Family::Gla, &g.inputs(true), &Default::default()).unwrap_err();
    assert!(matches!(&e, Error::Unsupported { msg, .. } if msg.contains("gla")), "{e}");
    let big = Spec::new(Family::GatedDeltaRule, [1, 8, 1, 1, 192, 64]).seed(4).data().cast(DType::F32);
    let g = GpuData::new(&big, &dev);
    let e = chunk::forward_cuda(Family::GatedDeltaRule, &g.inputs(true), &Default::default()).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let nog = Spec::new(Family::DeltaRule, [1, 8, 1, 1, 64, 64]).seed(6).data().cast(DType::BF16);
    let g = GpuData::new(&nog, &dev);
    let e = chunk::forward_cuda(Family::GatedDeltaRule, &g.inputs(true), &Default::default()).unwrap_err();
    assert!(matches!(&e, Error::Unsupported { msg, .. } if msg.contains("`g`")), "{e}");
    let spec = Spec::new(Family::GatedDeltaRule, [1, 8, 1, 1, 64, 64]).h0(true).seed(5);
    let mut x = spec.data().cast(DType::BF16);
    x.h0 = Some(x.h0.unwrap().to_dtype(DType::BF16).unwrap());
    let g = GpuData::new(&x, &dev);
    assert!(chunk::forward_cuda(spec.family, &g.inputs(true), &spec.opts()).is_err());
}
