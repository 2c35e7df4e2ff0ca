//! `fla bench ops --device cuda`: the GPU decode step, the chunk forward (Gated DeltaNet at
//! several shapes, DeltaNet) and the one-row products of a decode step (`gemv`: our kernel and
//! cuBLAS on the same weights) next to the HBM ceiling measured in the same run (a
//! device-to-device copy, bytes read + written). FLA's times on the same shapes come from
//! `scripts/fla_side_by_side.py`, run on the same card.
//!
//! Timing: CUDA events around a batch of back-to-back calls (so a launch-bound step shows its
//! launch rate), many batches, median per call, after a warm-up. State buffers rotate so that
//! the bytes they hold exceed the L2 cache several times: every call streams its state from HBM.
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fla_core::cuda::{self, CudaDevice, CudaTensor};
use fla_core::{cuda_blas, DType, Tensor};
use fla_nn::matmul;
use fla_ops::{chunk, recurrent, Family, Inputs, Options};

use super::bench::Row;

/// Which device `fla bench ops` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchDevice {
    /// The op forms on every CPU core.
    Cpu,
    /// The GPU forms on CUDA device 0.
    Cuda,
}

/// Bytes the rotating buffers of one row must span (several times the 50–60 MB L2 of Hopper).
const ROTATE_BYTES: usize = 512 << 20;

/// Median milliseconds per call of `f(i)` (`i` counts calls), timed with CUDA events, and the
/// median host milliseconds per call spent submitting (when it reaches the GPU time, the row
/// measures the launch path rather than the kernel).
fn time_gpu_ms(dev: &CudaDevice, seconds: f64, mut f: impl FnMut(usize) -> Result<()>) -> Result<(f64, f64)> {
    let mut i = 0;
    for _ in 0..3 {
        f(i)?;
        i += 1;
    }
    dev.synchronize()?;
    // Calibrate: batches of about 1 ms of GPU time.
    let probe = 10;
    let a = dev.record_event()?;
    for _ in 0..probe {
        f(i)?;
        i += 1;
    }
    let b = dev.record_event()?;
    b.synchronize()?;
    let per = (a.elapsed_ms(&b)? as f64 / probe as f64).max(1e-4);
    let reps = ((1.0 / per) as usize).clamp(1, 1000);
    let start = Instant::now();
    let (mut samples, mut host) = (Vec::new(), Vec::new());
    while samples.len() < 7 || (start.elapsed().as_secs_f64() < seconds && samples.len() < 500) {
        let a = dev.record_event()?;
        let h = Instant::now();
        for _ in 0..reps {
            f(i)?;
            i += 1;
        }
        host.push(h.elapsed().as_secs_f64() * 1e3 / reps as f64);
        let b = dev.record_event()?;
        b.synchronize()?;
        samples.push(a.elapsed_ms(&b)? as f64 / reps as f64);
    }
    samples.sort_by(f64::total_cmp);
    host.sort_by(f64::total_cmp);
    Ok((samples[samples.len() / 2], host[host.len() / 2]))
}

fn random(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    Tensor::from_vec(data, shape).expect("shape matches")
}

/// The HBM ceiling row: a 1 GiB device-to-device copy, bytes read + written per second.
pub(crate) fn hbm_ceiling(dev: &Arc<CudaDevice>, seconds: f64) -> Result<Row> {
    let bytes = 1usize << 30;
    let src = CudaTensor::from_host(&random(&[bytes / 4], 11, -1.0, 1.0), dev)?;
    let mut dst = CudaTensor::zeros(&[bytes / 4], DType::F32, dev)?;
    let (ms, _) = time_gpu_ms(dev, seconds, |_| Ok(dst.copy_from(&src)?))?;
    Ok(Row {
        name: "hbm_ceiling".into(),
        shape: "1 GiB".into(),
        ms,
        rate: 2.0 * bytes as f64 / ms / 1e6,
        unit: "GB/s",
        fraction: None,
        note: "device-to-device copy, bytes read + written".into(),
    })
}

/// One decode row: `T = 1` for each of `n` sequences with `h` query/key and `hv` value heads,
/// bf16 inputs, f32 state, in-op L2 norm.
fn decode_row(
    dev: &Arc<CudaDevice>,
    seconds: f64,
    family: Family,
    n: usize,
    [h, hv]: [usize; 2],
    hbm: f64,
) -> Result<Row> {
    let d = 128;
    let up = |t: Tensor| -> Result<CudaTensor> { Ok(CudaTensor::from_host(&t.to_dtype(DType::BF16)?, dev)?) };
    let q = up(random(&[n, 1, h, d], 1, -1.0, 1.0))?;
    let k = up(random(&[n, 1, h, d], 2, -1.0, 1.0))?;
    let v = up(random(&[n, 1, hv, d], 3, -1.0, 1.0))?;
    let g = match family {
        Family::Kda => up(random(&[n, 1, hv, d], 4, -0.2, -0.01))?,
        _ => up(random(&[n, 1, hv], 4, -0.2, -0.01))?,
    };
    let beta = up(random(&[n, 1, hv], 5, 0.1, 0.9))?;
    let state_bytes = n * hv * d * d * 4;
    let copies = ROTATE_BYTES.div_ceil(state_bytes).clamp(2, 256);
    let mut states = (0..copies)
        .map(|i| Ok(CudaTensor::from_host(&random(&[n, hv, d, d], 10 + i as u64, -0.1, 0.1), dev)?))
        .collect::<Result<Vec<_>>>()?;
    let x = Inputs { g: Some(&g), beta: Some(&beta), ..Inputs::new(&q, &k, &v) };
    let opts = Options { use_qk_l2norm_in_kernel: true, ..Options::default() };
    let (ms, host_ms) = time_gpu_ms(dev, seconds, |i| {
        recurrent::step_cuda(family, &x, &opts, &mut states[i % copies], None)?;
        Ok(())
    })?;
    let in_out = n * (2 * h * d + 2 * hv * d + hv * if family == Family::Kda { d + 1 } else { 2 }) * 2;
    let bytes = (2 * state_bytes + in_out) as f64;
    let rate = bytes / ms / 1e6;
    let name = match family {
        Family::Kda => "kda_decode",
        _ if h != hv => "decode_gva",
        _ => "decode",
    };
    let heads = if h == hv { format!("H=HV={hv}") } else { format!("H={h} HV={hv}") };
    Ok(Row {
        name: name.into(),
        shape: format!("N={n} {heads} K=V={d} T=1 bf16 in, f32 state {family}"),
        ms,
        rate,
        unit: "GB/s",
        fraction: Some(rate / hbm),
        note: format!("{:.1} µs/step (host {:.1} µs/call); state r+w + inputs", ms * 1e3, host_ms * 1e3),
    })
}

/// One chunk-forward case: its row name, `[B, T, H, HV]` (K = V = 128) and `cu_seqlens`.
struct ChunkCase {
    name: &'static str,
    family: Family,
    bthv: [usize; 4],
    cu_seqlens: Option<&'static [usize]>,
}

/// The chunk-forward rows: issue 3's two Gated DeltaNet shapes, grouped value heads, a varlen
/// batch of mixed lengths, and DeltaNet (no decay) at the first shape.
const CHUNK_CASES: &[ChunkCase] = &[
    ChunkCase { name: "chunk_fwd", family: Family::GatedDeltaRule, bthv: [8, 2048, 16, 16], cu_seqlens: None },
    ChunkCase { name: "chunk_fwd_long", family: Family::GatedDeltaRule, bthv: [1, 32768, 16, 16], cu_seqlens: None },
    ChunkCase { name: "chunk_fwd_gva", family: Family::GatedDeltaRule, bthv: [8, 2048, 16, 32], cu_seqlens: None },
    ChunkCase {
        name: "chunk_fwd_varlen",
        family: Family::GatedDeltaRule,
        bthv: [1, 16384, 16, 16],
        cu_seqlens: Some(&[0, 2048, 10240, 10752, 16384]),
    },
    ChunkCase { name: "delta_chunk_fwd", family: Family::DeltaRule, bthv: [8, 2048, 16, 16], cu_seqlens: None },
    ChunkCase { name: "kda_chunk_fwd", family: Family::Kda, bthv: [8, 2048, 16, 16], cu_seqlens: None },
];

/// The forward + backward rows (issue 3's training shape), as FLA's autograd runs them: the
/// forward, then the backward from a random `do`.
const FWD_BWD_CASES: &[ChunkCase] = &[
    ChunkCase { name: "chunk_fwd_bwd", family: Family::GatedDeltaRule, bthv: [8, 2048, 16, 16], cu_seqlens: None },
    ChunkCase { name: "kda_chunk_fwd_bwd", family: Family::Kda, bthv: [8, 2048, 16, 16], cu_seqlens: None },
];

/// Random bf16 inputs of one case on the device: q, k, v, g (none for DeltaNet, per key channel
/// for KDA), beta.
fn chunk_inputs(dev: &Arc<CudaDevice>, case: &ChunkCase) -> Result<[Option<CudaTensor>; 5]> {
    let [b, t, h, hv] = case.bthv;
    let d = 128;
    let up = |t: Tensor| -> Result<CudaTensor> { Ok(CudaTensor::from_host(&t.to_dtype(DType::BF16)?, dev)?) };
    let g = match case.family {
        Family::DeltaRule => None,
        Family::Kda => Some(up(random(&[b, t, hv, d], 24, -0.2, -0.01))?),
        _ => Some(up(random(&[b, t, hv], 24, -0.2, -0.01))?),
    };
    Ok([
        Some(up(random(&[b, t, h, d], 21, -1.0, 1.0))?),
        Some(up(random(&[b, t, h, d], 22, -1.0, 1.0))?),
        Some(up(random(&[b, t, hv, d], 23, -1.0, 1.0))?),
        g,
        Some(up(random(&[b, t, hv], 25, 0.1, 0.9))?),
    ])
}

/// The chunk forward of one case, bf16 inputs, K = V = 128, in-op L2 norm, final state out; the
/// rate is tokens·heads per second, and the fraction is of the memory floor: the bytes a fused
/// forward must move (q, k, v, g, beta read and o written once, in bf16) over the HBM rate.
fn chunk_fwd_row(dev: &Arc<CudaDevice>, seconds: f64, case: &ChunkCase, hbm: f64) -> Result<Row> {
    let [b, t, h, hv] = case.bthv;
    let d = 128;
    let [q, k, v, g, beta] = chunk_inputs(dev, case)?;
    let (q, k, v) = (q.expect("q"), k.expect("k"), v.expect("v"));
    let x = Inputs { g: g.as_ref(), beta: beta.as_ref(), cu_seqlens: case.cu_seqlens, ..Inputs::new(&q, &k, &v) };
    let opts = Options { use_qk_l2norm_in_kernel: true, output_final_state: true, ..Options::default() };
    let (ms, host_ms) = time_gpu_ms(dev, seconds, |_| {
        chunk::forward_cuda(case.family, &x, &opts)?;
        Ok(())
    })?;
    let n = case.cu_seqlens.map_or(b, |c| c.len() - 1);
    let tokens = b * t;
    let g_per_token = match case.family {
        Family::DeltaRule => 0,
        Family::Kda => hv * d,
        _ => hv,
    };
    let bytes = tokens * (2 * h * d + 2 * hv * d + hv + g_per_token) * 2 + n * hv * d * d * 4;
    let floor_ms = bytes as f64 / hbm / 1e6;
    Ok(chunk_row(
        case,
        ms,
        Some(floor_ms / ms),
        format!(
            "host {host_ms:.3} ms/call; memory floor {floor_ms:.3} ms ({:.0} MB at the HBM rate)",
            bytes as f64 / 1e6
        ),
    ))
}

/// Forward + backward of one case, bf16 inputs, K = V = 128, in-op L2 norm, no final state (as
/// FLA's autograd call in the side-by-side script): the saving forward, then the backward from
/// its context (no recompute, as FLA keeps its forward's `A`); the rate is tokens·heads per
/// second.
fn chunk_fwd_bwd_row(dev: &Arc<CudaDevice>, seconds: f64, case: &ChunkCase) -> Result<Row> {
    let [b, t, _, hv] = case.bthv;
    let d = 128;
    let [q, k, v, g, beta] = chunk_inputs(dev, case)?;
    let (q, k, v) = (q.expect("q"), k.expect("k"), v.expect("v"));
    let d_o = CudaTensor::from_host(&random(&[b, t, hv, d], 26, -1.0, 1.0).to_dtype(DType::BF16)?, dev)?;
    let x = Inputs { g: g.as_ref(), beta: beta.as_ref(), ..Inputs::new(&q, &k, &v) };
    let opts = Options { use_qk_l2norm_in_kernel: true, ..Options::default() };
    let (ms, host_ms) = time_gpu_ms(dev, seconds, |_| {
        let (_, _, saved) = chunk::forward_cuda_saving(case.family, &x, &opts)?;
        chunk::backward_cuda(case.family, &x, &opts, &d_o, None, Some(&saved))?;
        Ok(())
    })?;
    Ok(chunk_row(case, ms, None, format!("host {host_ms:.3} ms/call; saving forward + backward")))
}

/// The row of one chunk case (K = V = 128, bf16) timed at `ms`: the rate is tokens·heads per
/// second.
fn chunk_row(case: &ChunkCase, ms: f64, fraction: Option<f64>, note: String) -> Row {
    let [b, t, h, hv] = case.bthv;
    let cu = case.cu_seqlens.map_or(String::new(), |c| format!(" cu_seqlens={c:?}"));
    Row {
        name: case.name.into(),
        shape: format!("B={b} T={t} H={h} HV={hv} K=V=128 bf16{cu} {}", case.family),
        ms,
        rate: (b * t) as f64 * hv as f64 / ms / 1e3,
        unit: "Mtok·head/s",
        fraction,
        note,
    }
}

/// The weights `[N, K]` of the `gemv` rows: a Qwen3.5-0.8B-shaped decoder's projections
/// (`--only gemv` runs them all, `--only gemv_<name>` one).
const GEMV_CASES: &[(&str, [usize; 2])] = &[
    ("out_proj", [1024, 2048]),
    ("down_proj", [1024, 3584]),
    ("gate_up_proj", [7168, 1024]),
    ("in_proj", [8224, 1024]),
    ("lm_head", [248320, 1024]),
];

/// One `gemv` row: `x [1, K] · Wᵀ` in bf16 through the GEMV kernel, and through cuBLAS on the
/// same weights in the note. Weight copies rotate so that their bytes exceed the L2 cache
/// several times (as a decode step's layers do): every call streams its weight from HBM. The
/// rate is the weight's bytes per second.
fn gemv_row(dev: &Arc<CudaDevice>, seconds: f64, (label, [n, k]): (&str, [usize; 2]), hbm: f64) -> Result<Row> {
    let x = CudaTensor::from_host(&random(&[1, k], 31, -1.0, 1.0).to_dtype(DType::BF16)?, dev)?;
    let w0 = CudaTensor::from_host(&random(&[n, k], 32, -0.05, 0.05).to_dtype(DType::BF16)?, dev)?;
    let bytes = n * k * 2;
    let copies = ROTATE_BYTES.div_ceil(bytes).clamp(2, 256);
    let mut ws = vec![w0];
    while ws.len() < copies {
        let mut w = CudaTensor::zeros(&[n, k], DType::BF16, dev)?;
        w.copy_from(&ws[0])?;
        ws.push(w);
    }
    let (ms, host_ms) = time_gpu_ms(dev, seconds, |i| {
        matmul::gemv(&x, &ws[i % copies])?;
        Ok(())
    })?;
    let (blas_ms, blas_host_ms) = time_gpu_ms(dev, seconds, |i| {
        cuda_blas::matmul(&x, &ws[i % copies], true)?;
        Ok(())
    })?;
    let rate = bytes as f64 / ms / 1e6;
    Ok(Row {
        name: "gemv".into(),
        shape: format!("M=1 W [{n}, {k}] bf16 ({label})"),
        ms,
        rate,
        unit: "GB/s",
        fraction: Some(rate / hbm),
        note: format!(
            "{:.1} µs/call (host {:.1} µs); cuBLAS {:.1} µs/call = {:.0} GB/s (host {:.1} µs): {:.2}x",
            ms * 1e3,
            host_ms * 1e3,
            blas_ms * 1e3,
            bytes as f64 / blas_ms / 1e6,
            blas_host_ms * 1e3,
            blas_ms / ms
        ),
    })
}

/// The CUDA rows of `fla bench ops --device cuda`.
pub(crate) fn rows(seconds: f64, only: Option<&str>) -> Result<Vec<Row>> {
    if !cuda::is_available() {
        bail!("--device cuda: no CUDA device (libcuda not found, or no GPU)");
    }
    let dev = CudaDevice::get(0)?;
    let variant = std::env::var("FLA_RECURRENT_VARIANT").unwrap_or_default();
    eprintln!("device: {} (cuda:0, {} SMs); FLA_RECURRENT_VARIANT={variant:?}", dev.name(), dev.sm_count());
    let want = |name: &str| only.is_none_or(|o| o.split(',').any(|n| n == name));
    let hbm = hbm_ceiling(&dev, seconds)?;
    let mut out = Vec::new();
    for n in [1, 64, 256] {
        if want("decode") || want(&format!("decode{n}")) {
            out.push(decode_row(&dev, seconds, Family::GatedDeltaRule, n, [32, 32], hbm.rate).context("decode row")?);
        }
    }
    // Grouped value heads: 16 query/key heads shared by 32 and 64 value heads.
    for hv in [32, 64] {
        if want("decode_gva") {
            let row = decode_row(&dev, seconds, Family::GatedDeltaRule, 64, [16, hv], hbm.rate);
            out.push(row.context("decode_gva row")?);
        }
    }
    if want("kda_decode") {
        out.push(decode_row(&dev, seconds, Family::Kda, 64, [32, 32], hbm.rate).context("kda_decode row")?);
    }
    for case in CHUNK_CASES {
        if want(case.name) {
            out.push(chunk_fwd_row(&dev, seconds, case, hbm.rate).with_context(|| format!("{} row", case.name))?);
        }
    }
    for case in FWD_BWD_CASES {
        if want(case.name) {
            out.push(chunk_fwd_bwd_row(&dev, seconds, case).with_context(|| format!("{} row", case.name))?);
        }
    }
    for &case in GEMV_CASES {
        if want("gemv") || want(&format!("gemv_{}", case.0)) {
            out.push(gemv_row(&dev, seconds, case, hbm.rate).with_context(|| format!("gemv {} row", case.0))?);
        }
    }
    out.push(hbm);
    Ok(out)
}
