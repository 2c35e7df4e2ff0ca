//! `fla bench ops|model [--json]`: CPU throughput of the op forms (and of a whole model, in
//! `bench_model.rs`) next to two ceilings measured in the
//! same run — the f32 GEMM rate of the GEMM crate in use (`matrixmultiply`) and a large memory
//! copy — both on every core rayon uses.
use std::time::Instant;

use anyhow::{bail, Result};
use fla_core::Tensor;
use fla_ops::{chunk, naive, recurrent, Family, Inputs, Options};
use rayon::prelude::*;

/// Arguments of `fla bench`.
#[derive(clap::Args)]
pub struct Args {
    /// What to measure: `ops` (the op forms) or `model` (a Qwen3.5-0.8B-shaped model with random
    /// bf16 weights: prefill and decode).
    what: String,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Minimum seconds spent timing each row.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Run only these op rows, comma-separated (`chunk_fwd,decode`); the ceilings always run.
    #[arg(long)]
    only: Option<String>,
    /// The device to measure (`cuda`: GPU 0, next to the HBM copy ceiling).
    #[arg(long, value_enum, default_value_t = super::bench_cuda::BenchDevice::Cpu)]
    device: super::bench_cuda::BenchDevice,
    /// `model`: prompt tokens of the prefill row.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// `model`: tokens decoded (one at a time) in the decode row.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
}

/// FLOPs per token-head of the chunk forward at K = V = 128, chunk 64 (FLA's count).
const CHUNK_FWD_FLOP: f64 = 182e3;
/// FLOPs per token-head of the chunk forward + backward at K = V = 128, chunk 64.
const CHUNK_FWD_BWD_FLOP: f64 = 640e3;

pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) shape: String,
    pub(crate) ms: f64,
    pub(crate) rate: f64,
    pub(crate) unit: &'static str,
    pub(crate) fraction: Option<f64>,
    pub(crate) note: String,
}

/// Median milliseconds of `f` over at least `seconds` (and at least 3 runs), after one warm-up.
pub(crate) fn time_ms(seconds: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 3 || (start.elapsed().as_secs_f64() < seconds && samples.len() < 1000) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn random(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let data = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    Tensor::from_vec(data, shape).expect("shape matches")
}

fn gemm_ceiling(seconds: f64) -> Row {
    let n = 1024;
    let threads = rayon::current_num_threads();
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b = a.clone();
    let mut cs: Vec<Vec<f32>> = (0..threads).map(|_| vec![0.0; n * n]).collect();
    let ms = time_ms(seconds, || {
        cs.par_iter_mut().for_each(|c| {
            // SAFETY: a, b and c are n×n row-major buffers of exactly n·n elements.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    n,
                    n,
                    1.0,
                    a.as_ptr(),
                    n as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        })
    });
    let flop = 2.0 * (n * n * n) as f64 * threads as f64;
    Row {
        name: "gemm_ceiling".into(),
        shape: format!("{threads}x sgemm {n}x{n}x{n}"),
        ms,
        rate: flop / ms / 1e6,
        unit: "GFLOP/s",
        fraction: None,
        note: "matrixmultiply".into(),
    }
}

pub(crate) fn copy_ceiling(seconds: f64) -> Row {
    let bytes = 256usize << 20;
    let src = vec![1.0f32; bytes / 4];
    let mut dst = vec![0.0f32; bytes / 4];
    let piece = src.len() / rayon::current_num_threads();
    let ms = time_ms(seconds, || {
        dst.par_chunks_mut(piece).zip(src.par_chunks(piece)).for_each(|(d, s)| d.copy_from_slice(s))
    });
    Row {
        name: "copy_ceiling".into(),
        shape: "256 MiB".into(),
        ms,
        rate: 2.0 * bytes as f64 / ms / 1e6,
        unit: "GB/s",
        fraction: None,
        note: "bytes read + written".into(),
    }
}

struct Problem {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
}

fn gdn_problem(b: usize, t: usize, h: usize, d: usize) -> Problem {
    let norm = |x: Tensor| {
        let v = x.to_vec::<f32>().unwrap();
        let out: Vec<f32> = v
            .chunks(d)
            .flat_map(|r| {
                let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter().map(move |x| x / n)
            })
            .collect();
        Tensor::from_vec(out, x.shape()).unwrap()
    };
    Problem {
        q: random(&[b, t, h, d], 1, -1.0, 1.0),
        k: norm(random(&[b, t, h, d], 2, -1.0, 1.0)),
        v: random(&[b, t, h, d], 3, -1.0, 1.0),
        g: random(&[b, t, h], 4, -0.2, -0.01),
        beta: random(&[b, t, h], 5, 0.1, 0.9),
    }
}

fn rows(seconds: f64, only: Option<&str>) -> Result<Vec<Row>> {
    let want = |name: &str| only.is_none_or(|o| o.split(',').any(|n| n == name));
    let gemm = gemm_ceiling(seconds);
    let copy = copy_ceiling(seconds);
    let (b, t, h, d) = (1, 4096, 4, 128);
    let p = gdn_problem(b, t, h, d);
    let x = Inputs { g: Some(&p.g), beta: Some(&p.beta), ..Inputs::new(&p.q, &p.k, &p.v) };
    let opts = Options::default();
    let shape = format!("B={b} T={t} H=HV={h} K=V={d} f32 gated_delta_rule");
    let token_heads = (b * t * h) as f64;
    let skip = |name: &str, f: &mut dyn FnMut() -> f64| if want(name) { f() } else { f64::NAN };
    let fwd_ms = skip("chunk_fwd", &mut || {
        time_ms(seconds, || {
            chunk::forward(Family::GatedDeltaRule, &x, &opts).expect("valid inputs");
        })
    });
    let naive_ms = skip("naive_fwd", &mut || {
        time_ms(seconds, || {
            naive::forward(Family::GatedDeltaRule, &x, &opts).expect("valid inputs");
        })
    });
    let d_o = random(&[b, t, h, d], 6, -1.0, 1.0);
    let fwd_bwd_ms = skip("chunk_fwd_bwd", &mut || {
        time_ms(seconds, || {
            chunk::forward(Family::GatedDeltaRule, &x, &opts).expect("valid inputs");
            chunk::backward(Family::GatedDeltaRule, &x, &opts, &d_o, None).expect("valid inputs");
        })
    });
    let gflops = |flop: f64, ms: f64| flop * token_heads / ms / 1e6;
    let mut out = vec![];
    let fwd_rate = gflops(CHUNK_FWD_FLOP, fwd_ms);
    out.push(Row {
        name: "chunk_fwd".into(),
        shape: shape.clone(),
        ms: fwd_ms,
        rate: fwd_rate,
        unit: "GFLOP/s",
        fraction: Some(fwd_rate / gemm.rate),
        note: if naive_ms.is_finite() { format!("{:.1}x naive", naive_ms / fwd_ms) } else { String::new() },
    });
    let fb_rate = gflops(CHUNK_FWD_BWD_FLOP, fwd_bwd_ms);
    out.push(Row {
        name: "chunk_fwd_bwd".into(),
        shape: shape.clone(),
        ms: fwd_bwd_ms,
        rate: fb_rate,
        unit: "GFLOP/s",
        fraction: Some(fb_rate / gemm.rate),
        note: String::new(),
    });
    let naive_rate = gflops(CHUNK_FWD_FLOP, naive_ms);
    out.push(Row {
        name: "naive_fwd".into(),
        shape,
        ms: naive_ms,
        rate: naive_rate,
        unit: "GFLOP/s",
        fraction: Some(naive_rate / gemm.rate),
        note: "chunk-form FLOPs".into(),
    });

    // KDA: per-channel decay (per-pair products inside 16-row sub-chunks, GEMMs between them).
    let gk = random(&[b, t, h, d], 7, -0.2, -0.01);
    let xk = Inputs { g: Some(&gk), ..x };
    let kda_ms = skip("kda_chunk_fwd", &mut || {
        time_ms(seconds, || {
            chunk::forward(Family::Kda, &xk, &opts).expect("valid inputs");
        })
    });
    let kda_fb_ms = skip("kda_chunk_fwd_bwd", &mut || {
        time_ms(seconds, || {
            chunk::forward(Family::Kda, &xk, &opts).expect("valid inputs");
            chunk::backward(Family::Kda, &xk, &opts, &d_o, None).expect("valid inputs");
        })
    });
    for (name, ms, flop) in
        [("kda_chunk_fwd", kda_ms, CHUNK_FWD_FLOP), ("kda_chunk_fwd_bwd", kda_fb_ms, CHUNK_FWD_BWD_FLOP)]
    {
        let rate = gflops(flop, ms);
        out.push(Row {
            name: name.into(),
            shape: format!("B={b} T={t} H=HV={h} K=V={d} f32 kda"),
            ms,
            rate,
            unit: "GFLOP/s",
            fraction: Some(rate / gemm.rate),
            note: "GDN's FLOP count".into(),
        });
    }

    // Decode: one token for each of N sequences against an f32 state pool.
    let (n, hv) = (64, 16);
    let pd = gdn_problem(n, 1, hv, d);
    let xd = Inputs { g: Some(&pd.g), beta: Some(&pd.beta), ..Inputs::new(&pd.q, &pd.k, &pd.v) };
    let mut state = random(&[n, hv, d, d], 8, -0.1, 0.1);
    state.as_mut_slice::<f32>()?;
    let dec_ms = skip("decode", &mut || {
        time_ms(seconds, || {
            recurrent::step(Family::GatedDeltaRule, &xd, &opts, &mut state).expect("valid inputs");
        })
    });
    let bytes = (n * hv) as f64 * 2.0 * 4.0 * (d * d) as f64;
    let rate = bytes / dec_ms / 1e6;
    out.push(Row {
        name: "decode".into(),
        shape: format!("N={n} HV={hv} K=V={d} T=1 f32 state"),
        ms: dec_ms,
        rate,
        unit: "GB/s",
        fraction: Some(rate / copy.rate),
        note: "state read + written".into(),
    });
    out.retain(|r| r.ms.is_finite());
    out.push(gemm);
    out.push(copy);
    Ok(out)
}

/// Runs the benchmarks and prints a table (or JSON lines).
pub fn run(args: Args) -> Result<i32> {
    let rows = match args.what.as_str() {
        "ops" if args.device == super::bench_cuda::BenchDevice::Cuda => {
            super::bench_cuda::rows(args.seconds, args.only.as_deref())?
        }
        "ops" => rows(args.seconds, args.only.as_deref())?,
        "model" if args.device == super::bench_cuda::BenchDevice::Cuda => {
            super::bench_model::rows_cuda(args.seconds, args.prompt_tokens, args.decode_tokens)?
        }
        "model" => super::bench_model::rows(args.seconds, args.prompt_tokens, args.decode_tokens)?,
        other => bail!("unknown benchmark `{other}` (expected `ops` or `model`)"),
    };
    if args.json {
        for r in &rows {
            let mut j =
                serde_json::json!({ "name": r.name, "shape": r.shape, "ms": r.ms, "rate": r.rate, "unit": r.unit });
            if let Some(f) = r.fraction {
                j["fraction_of_ceiling"] = f.into();
            }
            if !r.note.is_empty() {
                j["note"] = r.note.clone().into();
            }
            println!("{j}");
        }
    } else {
        println!("{:<15} {:>10} {:>12} {:<8} {:>9}  {:<40} note", "name", "ms", "rate", "unit", "ceiling", "shape");
        for r in &rows {
            let f = r.fraction.map_or(String::new(), |f| format!("{:.1}%", f * 100.0));
            println!(
                "{:<15} {:>10.3} {:>12.1} {:<8} {:>9}  {:<40} {}",
                r.name, r.ms, r.rate, r.unit, f, r.shape, r.note
            );
        }
        println!("threads: {}", rayon::current_num_threads());
    }
    Ok(0)
}
