//! The GPU layer primitives (`fla_nn::cuda`) and layers against their CPU twins on random
//! inputs: RMSNorm (plain, 1 + w, gated by SiLU and sigmoid — the gate also read out of a wider
//! tensor —, with the residual add), the short convolution over a varlen batch with a cache (a
//! sequence of one token, an empty one; also reading columns of a wider input and writing its
//! output split in parts), column splits, SwiGLU, row gather / scatter-add, the MLP, the mixtures
//! of experts, the Gated DeltaNet, KDA, gated attention (long varlen prefills on the split-KV and
//! the tensor-core kernels, prefill in two calls, decode after ~600 tokens) and MLA layers; f32,
//! bf16 and f16 activations; the typed
//! errors. Every test prints "skipped: no CUDA device" and passes where there is no GPU (CI).
use std::sync::Arc;

use fla_core::cuda::{self, CudaDevice, CudaTensor};
use fla_core::{DType, Error, Tensor};
use fla_nn::conv::{ConvState, ShortConv};
use fla_nn::cuda::{
    add_rms_norm_cuda, rms_norm_cuda, rms_norm_gate_cols_cuda, short_conv_cuda, short_conv_split_cuda, split_cols_cuda,
    swiglu_cuda,
};
use fla_nn::ops::{rms_norm, rms_norm_gated, silu, GateAct};
use fla_nn::Batch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu(test: &str) -> Option<Arc<CudaDevice>> {
    if !cuda::is_available() {
        eprintln!("{test}: skipped: no CUDA device");
        return None;
    }
    if !fla_kernels::compiled() {
        eprintln!("{test}: skipped: {}", fla_kernels::NOT_COMPILED);
        return None;
    }
    Some(CudaDevice::get(0).expect("a device is present"))
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
}

/// `v` rounded to `dtype` and back (the CPU twin's input when the GPU gets `dtype`).
fn rounded(v: &[f32], dtype: DType) -> Vec<f32> {
    Tensor::from_vec(v.to_vec(), &[v.len()]).unwrap().to_dtype(dtype).unwrap().to_vec::<f32>().unwrap()
}

fn up(v: &[f32], shape: &[usize], dtype: DType, dev: &Arc<CudaDevice>) -> CudaTensor {
    let t = Tensor::from_vec(v.to_vec(), shape).unwrap().to_dtype(dtype).unwrap();
    CudaTensor::from_host(&t, dev).unwrap()
}

fn down(t: &CudaTensor) -> Vec<f32> {
    t.to_host().unwrap().to_vec::<f32>().unwrap()
}

/// `narrow [rows, width]` placed at columns `start ..` of rows of `cols` columns, the rest random
/// (a fused projection holding it among others).
fn widen(rng: &mut StdRng, narrow: &[f32], width: usize, start: usize, cols: usize) -> Vec<f32> {
    let rows = narrow.len() / width;
    let mut wide = random(rng, rows * cols, 5.0);
    for (r, row) in narrow.chunks(width).enumerate() {
        wide[r * cols + start..][..width].copy_from_slice(row);
    }
    wide
}

/// Columns `start .. start + width` of `x [rows, cols]`.
fn cols_of(x: &[f32], cols: usize, start: usize, width: usize) -> Vec<f32> {
    x.chunks(cols).flat_map(|r| r[start..start + width].to_vec()).collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

#[test]
fn rms_norm_vs_cpu() {
    let Some(dev) = gpu("rms_norm_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for dtype in [DType::F32, DType::BF16] {
        for (rows, dim) in [(37, 1024), (5, 100), (1, 2048)] {
            let x = rounded(&random(&mut rng, rows * dim, 2.0), dtype);
            let z = rounded(&random(&mut rng, rows * dim, 3.0), dtype);
            let w = random(&mut rng, dim, 1.0);
            let (xg, zg, wg) = (
                up(&x, &[rows, dim], dtype, &dev),
                up(&z, &[rows, dim], dtype, &dev),
                up(&w, &[dim], DType::F32, &dev),
            );
            for offset in [0.0, 1.0] {
                let mut want = x.clone();
                rms_norm(&mut want, &w, 1e-6, offset);
                let got = down(&rms_norm_cuda(&xg, &wg, 1e-6, offset, None).unwrap());
                let e = rel_err(&got, &want);
                assert!(e < tol(dtype), "{dtype} [{rows}, {dim}] offset {offset}: rel err {e:.2e}");
            }
            for act in [GateAct::Silu, GateAct::Sigmoid] {
                let mut want = x.clone();
                rms_norm_gated(&mut want, &z, &w, 1e-6, act);
                let got = down(&rms_norm_cuda(&xg, &wg, 1e-6, 0.0, Some((&zg, act))).unwrap());
                let e = rel_err(&got, &want);
                assert!(e < tol(dtype), "{dtype} [{rows}, {dim}] gated {act:?}: rel err {e:.2e}");
            }
        }
        // The gate read out of a wider tensor: `group` rows of x (heads) per row of z (token),
        // at a column offset (the Gated DeltaNet layer's z in its fused projection).
        for (zrows, group, dim) in [(5, 3, 100), (4, 1, 256), (1, 16, 128)] {
            let rows = zrows * group;
            let (start, cols) = (7, 7 + group * dim + 11);
            let x = rounded(&random(&mut rng, rows * dim, 2.0), dtype);
            let z = rounded(&random(&mut rng, rows * dim, 3.0), dtype);
            let w = random(&mut rng, dim, 1.0);
            let wide = widen(&mut rng, &z, group * dim, start, cols);
            let (xg, zg, wg) = (
                up(&x, &[rows, dim], dtype, &dev),
                up(&wide, &[zrows, cols], dtype, &dev),
                up(&w, &[dim], DType::F32, &dev),
            );
            for act in [GateAct::Silu, GateAct::Sigmoid] {
                let mut want = x.clone();
                rms_norm_gated(&mut want, &z, &w, 1e-6, act);
                let got = down(&rms_norm_gate_cols_cuda(&xg, &wg, 1e-6, 0.0, &zg, start, act).unwrap());
                let e = rel_err(&got, &want);
                assert!(e < tol(dtype), "{dtype} {zrows}×{group} rows of {dim}, gate at {start}: rel err {e:.2e}");
            }
        }
    }
}

#[test]
fn short_conv_vs_cpu() {
    let Some(dev) = gpu("short_conv_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(12);
    // Sequences start and end inside and across the 16-token runs of a thread; channels past a
    // multiple of 256; kernels of 1, 2, 4 and 8 taps.
    let c = 300;
    let lens = [1, 4, 0, 25, 3, 40];
    let past = [3, 0, 5, 7, 1, 0];
    let batch = Batch::new(&lens, &past);
    let tokens = batch.tokens();
    let cu = batch.cu_seqlens();
    for w in [1, 2, 4, 8] {
        let weight = random(&mut rng, c * w, 0.7);
        let conv = ShortConv::from_weight(weight.clone(), c, w).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = rounded(&random(&mut rng, tokens * c, 1.5), dtype);
            let state0 = random(&mut rng, lens.len() * c * w, 1.0);
            let mut state = ConvState { data: state0.clone() };
            let want = conv.forward(&x, &batch, &mut state);
            let mut st = up(&state0, &[lens.len(), c, w], DType::F32, &dev);
            let y = short_conv_cuda(
                &up(&x, &[tokens, c], dtype, &dev),
                &up(&weight, &[c, w], DType::F32, &dev),
                &mut st,
                &cu,
            )
            .unwrap();
            let e = rel_err(&down(&y), &want);
            assert!(e < tol(dtype), "{dtype} kernel {w} y: rel err {e:.2e}");
            // The cache holds inputs as given (rounded to the dtype): exact.
            assert_eq!(down(&st), state.data, "{dtype} kernel {w} new cache");
            // The same input at columns 5 .. 5 + C of a wider tensor, the output split in parts
            // (q | k | v; boundaries inside a warp's 32 channels), and whole.
            let (start, cols) = (5, 5 + c + 9);
            let wide = up(&widen(&mut rng, &x, c, start, cols), &[tokens, cols], dtype, &dev);
            for parts in [vec![64, 64, 172], vec![100, 37, 163], vec![150, 150], vec![c]] {
                let mut st = up(&state0, &[lens.len(), c, w], DType::F32, &dev);
                let ys =
                    short_conv_split_cuda(&wide, start, &up(&weight, &[c, w], DType::F32, &dev), &mut st, &cu, &parts)
                        .unwrap();
                assert_eq!(ys.len(), parts.len());
                let mut first = 0;
                for (y, &width) in ys.iter().zip(&parts) {
                    assert_eq!(y.shape(), [tokens, width]);
                    let e = rel_err(&down(y), &cols_of(&want, c, first, width));
                    assert!(e < tol(dtype), "{dtype} kernel {w} parts {parts:?}, part at {first}: rel err {e:.2e}");
                    first += width;
                }
                assert_eq!(down(&st), state.data, "{dtype} kernel {w} parts {parts:?}: new cache");
            }
        }
    }
    let x = up(&[0.0; 9 * 2], &[2, 9], DType::F32, &dev);
    let too_wide = short_conv_cuda(
        &x,
        &up(&[0.0; 9 * 9], &[9, 9], DType::F32, &dev),
        &mut up(&[0.0; 9 * 9], &[1, 9, 9], DType::F32, &dev),
        &[0, 2],
    );
    assert!(matches!(too_wide, Err(Error::Unsupported { .. })), "a 9-tap kernel");
}

/// Column slices copied apart in one launch: exact.
#[test]
fn split_cols_vs_cpu() {
    let Some(dev) = gpu("split_cols_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(14);
    let (rows, cols) = (9, 70);
    for dtype in [DType::F32, DType::BF16] {
        let x = rounded(&random(&mut rng, rows * cols, 2.0), dtype);
        let xg = up(&x, &[rows, cols], dtype, &dev);
        for (start, parts) in [(50, vec![8, 8]), (0, vec![70]), (3, vec![1, 30, 2]), (66, vec![4])] {
            let ys = split_cols_cuda(&xg, start, &parts).unwrap();
            let mut first = start;
            for (y, &width) in ys.iter().zip(&parts) {
                assert_eq!(down(y), cols_of(&x, cols, first, width), "{dtype} {parts:?} from {start}");
                first += width;
            }
        }
    }
}

/// SwiGLU over the halves of a fused gate | up product, f32 and bf16.
#[test]
fn swiglu_vs_cpu() {
    let Some(dev) = gpu("swiglu_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(13);
    for dtype in [DType::F32, DType::BF16] {
        let (rows, half) = (3, 3584 + 5);
        let ab = rounded(&random(&mut rng, rows * 2 * half, 4.0), dtype);
        let want: Vec<f32> =
            ab.chunks(2 * half).flat_map(|r| (0..half).map(|c| silu(r[c]) * r[half + c]).collect::<Vec<_>>()).collect();
        let got = down(&swiglu_cuda(&up(&ab, &[rows, 2 * half], dtype, &dev)).unwrap());
        let e = rel_err(&got, &want);
        assert!(e < tol(dtype), "{dtype}: rel err {e:.2e}");
    }
}

/// The fused residual add and RMSNorm: x += res in x's dtype, then the norm of the new x.
#[test]
fn add_rms_norm_vs_cpu() {
    let Some(dev) = gpu("add_rms_norm_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(20);
    for dtype in [DType::F32, DType::BF16] {
        let (rows, dim) = (5, 1024);
        let (x, res) =
            (rounded(&random(&mut rng, rows * dim, 2.0), dtype), rounded(&random(&mut rng, rows * dim, 1.0), dtype));
        let w = random(&mut rng, dim, 0.5);
        let sum: Vec<f32> = rounded(&x.iter().zip(&res).map(|(a, b)| a + b).collect::<Vec<_>>(), dtype);
        let mut want = sum.clone();
        rms_norm(&mut want, &w, 1e-6, 1.0);
        let mut gx = up(&x, &[rows, dim], dtype, &dev);
        let got = add_rms_norm_cuda(
            &mut gx,
            &up(&res, &[rows, dim], dtype, &dev),
            &up(&w, &[dim], DType::F32, &dev),
            1e-6,
            1.0,
        )
        .unwrap();
        assert_eq!(down(&gx), sum, "{dtype}: the residual stream");
        let e = rel_err(&down(&got), &want);
        assert!(e < tol(dtype), "{dtype}: rel err {e:.2e}");
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let Some(dev) = gpu("bad_arguments_are_typed_errors") else { return };
    let z = |shape: &[usize], dt: DType| CudaTensor::zeros(shape, dt, &dev).unwrap();
    let x = z(&[4, 8], DType::BF16);
    assert!(matches!(rms_norm_cuda(&x, &z(&[7], DType::F32), 1e-6, 0.0, None), Err(Error::Shape { arg: "w", .. })));
    assert!(matches!(rms_norm_cuda(&x, &z(&[8], DType::BF16), 1e-6, 0.0, None), Err(Error::DType { arg: "w", .. })));
    let gate = z(&[4, 8], DType::F32);
    assert!(matches!(
        rms_norm_cuda(&x, &z(&[8], DType::F32), 1e-6, 0.0, Some((&gate, GateAct::Silu))),
        Err(Error::DType { arg: "z", .. })
    ));
    let (wt, mut st) = (z(&[8, 4], DType::F32), z(&[2, 8, 4], DType::F32));
    assert!(matches!(short_conv_cuda(&x, &wt, &mut st, &[0, 1, 3]), Err(Error::CuSeqlens { .. })));
    assert!(matches!(
        short_conv_cuda(&x, &wt, &mut z(&[3, 8, 4], DType::F32), &[0, 1, 4]),
        Err(Error::Shape { arg: "state", .. })
    ));
    assert!(matches!(
        short_conv_cuda(&x, &z(&[8, 4], DType::BF16), &mut st, &[0, 1, 4]),
        Err(Error::DType { arg: "weight", .. })
    ));
    let wide = z(&[4, 20], DType::BF16);
    let mut split =
        |start: usize, parts: &[usize]| short_conv_split_cuda(&wide, start, &wt, &mut st, &[0, 1, 4], parts);
    assert!(matches!(split(13, &[8]), Err(Error::Argument { arg: "start", .. })), "columns 13..21 of 20");
    assert!(matches!(split(12, &[4, 3]), Err(Error::Argument { arg: "parts", .. })), "7 of 8 channels");
    assert!(matches!(split(0, &[2, 2, 2, 2]), Err(Error::Argument { arg: "parts", .. })), "four parts");
    assert!(matches!(split(0, &[]), Err(Error::Argument { arg: "parts", .. })), "no part");
    assert!(matches!(split_cols_cuda(&wide, 15, &[3, 3]), Err(Error::Argument { arg: "parts", .. })));
    let w8 = z(&[8], DType::F32);
    let gate = |x: &CudaTensor, start: usize| rms_norm_gate_cols_cuda(x, &w8, 1e-6, 0.0, &wide, start, GateAct::Silu);
    assert!(matches!(gate(&z(&[6, 8], DType::BF16), 0), Err(Error::Shape { arg: "z", .. })), "6 rows over 4");
    assert!(matches!(gate(&z(&[8, 8], DType::BF16), 5), Err(Error::Argument { arg: "start", .. })), "5 + 16 > 20");
    assert!(matches!(gate(&z(&[8, 8], DType::F32), 0), Err(Error::DType { arg: "z", .. })));
    assert!(matches!(swiglu_cuda(&z(&[4, 9], DType::BF16)), Err(Error::Shape { arg: "gate_up", .. })));
    let mut xm = z(&[4, 8], DType::BF16);
    assert!(matches!(
        add_rms_norm_cuda(&mut xm, &z(&[4, 8], DType::F32), &z(&[8], DType::F32), 1e-6, 0.0),
        Err(Error::DType { arg: "res", .. })
    ));
}

/// Random weights of a Gated DeltaNet layer in `layout`, each value representable in bf16 (so a
/// bf16 upload loses nothing).
fn gdn_weights(
    rng: &mut StdRng,
    cfg: &fla_nn::gated_deltanet::GatedDeltaNetConfig,
    layout: fla_nn::gated_deltanet::ProjLayout,
) -> std::collections::HashMap<String, Tensor> {
    let (h, hv) = (cfg.hidden, cfg.value_heads);
    let (kt, vt) = (cfg.key_heads * cfg.key_dim, hv * cfg.value_dim);
    let cd = 2 * kt + vt;
    let mut m = std::collections::HashMap::new();
    let mut put = |name: &str, shape: &[usize], scale: f32| {
        let n = shape.iter().product();
        let v = rounded(&random(rng, n, scale), DType::BF16);
        m.insert(name.to_string(), Tensor::from_vec(v, shape).unwrap());
    };
    let s = 1.0 / (h as f32).sqrt();
    match layout {
        fla_nn::gated_deltanet::ProjLayout::Split => {
            put("in_proj_qkv.weight", &[cd, h], s);
            put("in_proj_z.weight", &[vt, h], s);
            put("in_proj_b.weight", &[hv, h], s);
            put("in_proj_a.weight", &[hv, h], s);
        }
        fla_nn::gated_deltanet::ProjLayout::Interleaved => {
            put("in_proj_qkvz.weight", &[2 * kt + 2 * vt, h], s);
            put("in_proj_ba.weight", &[2 * hv, h], s);
        }
    }
    put("conv1d.weight", &[cd, 1, cfg.conv_kernel], 0.5);
    put("A_log", &[hv], 1.0);
    put("dt_bias", &[hv], 1.0);
    put("norm.weight", &[cfg.value_dim], 1.0);
    put("out_proj.weight", &[h, vt], 1.0 / (vt as f32).sqrt());
    m
}

/// The GPU Gated DeltaNet layer against its CPU twin: a varlen prefill of three prompts (one of
/// a single token), then two decode steps, through both projection layouts; f32 (the f32 chunk
/// path, K = 32) and bf16 (tensor cores, K = V = 64).
#[test]
fn gated_deltanet_layer_vs_cpu() {
    use fla_nn::gated_deltanet::{GatedDeltaNet, GatedDeltaNetConfig, GdnCache, ProjLayout};
    use fla_nn::linear_cuda::LinearCacheCuda;
    let Some(dev) = gpu("gated_deltanet_layer_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(14);
    for (dtype, dk, dv) in [(DType::F32, 32, 48), (DType::BF16, 64, 64)] {
        for layout in [ProjLayout::Split, ProjLayout::Interleaved] {
            let cfg = GatedDeltaNetConfig {
                hidden: 96,
                key_heads: 2,
                value_heads: 4,
                key_dim: dk,
                value_dim: dv,
                conv_kernel: 4,
                eps: 1e-6,
                layout,
            };
            let vb = fla_nn::VarBuilder::from_tensors(gdn_weights(&mut rng, &cfg, layout));
            let cpu = GatedDeltaNet::load(&cfg, &vb).unwrap();
            let gpu_layer = cpu.to_cuda(&dev, dtype).unwrap();
            let (mut cc, mut gc) = (GdnCache::default(), LinearCacheCuda::default());
            let lens = [[70, 1, 130], [1, 1, 1], [1, 1, 1]];
            let mut past = [0usize; 3];
            for (step, lens) in lens.iter().enumerate() {
                let batch = Batch::new(lens, &past);
                let x = rounded(&random(&mut rng, batch.tokens() * cfg.hidden, 1.0), dtype);
                let want = cpu.forward(&x, &batch, &mut cc).unwrap();
                let got = down(
                    &gpu_layer.forward(&up(&x, &[batch.tokens(), cfg.hidden], dtype, &dev), &batch, &mut gc).unwrap(),
                );
                let e = rel_err(&got, &want);
                let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
                assert!(e < tol, "{dtype} {layout:?} step {step}: rel err {e:.2e}");
                past.iter_mut().zip(lens).for_each(|(p, l)| *p += l);
            }
        }
    }
}

/// The GPU SwiGLU MLP against its CPU twin, f32 and bf16.
#[test]
fn mlp_vs_cpu() {
    let Some(dev) = gpu("mlp_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(15);
    let (h, f, tokens) = (96, 352, 37);
    let w = |rng: &mut StdRng, r: usize, c: usize| {
        Tensor::from_vec(rounded(&random(rng, r * c, 1.0 / (c as f32).sqrt()), DType::BF16), &[r, c]).unwrap()
    };
    let mlp = fla_nn::mlp::Mlp::from_parts(
        fla_nn::Linear::new(w(&mut rng, f, h), None).unwrap(),
        fla_nn::Linear::new(w(&mut rng, f, h), None).unwrap(),
        fla_nn::Linear::new(w(&mut rng, h, f), None).unwrap(),
    );
    for dtype in [DType::F32, DType::BF16] {
        let x = rounded(&random(&mut rng, tokens * h, 1.0), dtype);
        let want = mlp.forward(&x).unwrap();
        let got = down(&mlp.to_cuda(&dev, dtype).unwrap().forward(&up(&x, &[tokens, h], dtype, &dev)).unwrap());
        let e = rel_err(&got, &want);
        assert!(e < if dtype == DType::F32 { 1e-5 } else { 2e-2 }, "{dtype}: rel err {e:.2e}");
    }
}

/// The GPU gated attention layer against its CPU twin: a varlen prefill of three prompts (one of
/// a single token), a second prefill chunk that grows the cache past its first 64 rows, then a
/// decode step; GQA, partial RoPE, the output gate; f32 and bf16.
#[test]
fn gated_attention_vs_cpu() {
    use fla_nn::attention::{AttentionConfig, GatedAttention, KvCache, KvCacheCuda};
    let Some(dev) = gpu("gated_attention_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(16);
    let cfg = AttentionConfig {
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        rope_dim: 16,
        rope_theta: 10000.0,
        eps: 1e-6,
        output_gate: true,
    };
    let mut w = |r: usize, c: usize, s: f32| {
        Tensor::from_vec(rounded(&random(&mut rng, r * c, s), DType::BF16), &[r, c]).unwrap()
    };
    let m = std::collections::HashMap::from([
        ("q_proj.weight".to_string(), w(4 * 32 * 2, 64, 0.15)),
        ("k_proj.weight".to_string(), w(2 * 32, 64, 0.15)),
        ("v_proj.weight".to_string(), w(2 * 32, 64, 0.15)),
        ("o_proj.weight".to_string(), w(64, 4 * 32, 0.1)),
        (
            "q_norm.weight".to_string(),
            Tensor::from_vec(rounded(&random(&mut rng, 32, 0.2), DType::BF16), &[32]).unwrap(),
        ),
        (
            "k_norm.weight".to_string(),
            Tensor::from_vec(rounded(&random(&mut rng, 32, 0.2), DType::BF16), &[32]).unwrap(),
        ),
    ]);
    let cpu = GatedAttention::load(&cfg, &fla_nn::VarBuilder::from_tensors(m)).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let layer = cpu.to_cuda(&dev, dtype).unwrap();
        let (mut cc, mut gc) = (KvCache::default(), KvCacheCuda::default());
        let mut past = [0usize; 3];
        for (step, lens) in [[5, 1, 40], [1, 2, 30], [1, 1, 1]].iter().enumerate() {
            let batch = Batch::new(lens, &past);
            let x = rounded(&random(&mut rng, batch.tokens() * cfg.hidden, 1.0), dtype);
            let want = cpu.forward(&x, &batch, &mut cc).unwrap();
            let got =
                down(&layer.forward(&up(&x, &[batch.tokens(), cfg.hidden], dtype, &dev), &batch, &mut gc).unwrap());
            let e = rel_err(&got, &want);
            let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
            assert!(e < tol, "{dtype} step {step}: rel err {e:.2e}");
            past.iter_mut().zip(lens).for_each(|(p, l)| *p += l);
        }
    }
}

/// Both mixtures of experts on the GPU against their CPU twins (f32, so that the routing is the
/// same): Qwen's softmax top-k with the sigmoid-gated shared expert, Kimi's grouped biased
/// sigmoid top-k with routed scaling and an ungated shared expert.
#[test]
fn moe_vs_cpu() {
    use fla_nn::moe::{KimiMoe, KimiMoeConfig, QwenMoe, QwenMoeConfig};
    let Some(dev) = gpu("moe_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(17);
    let (h, e, i, si, tokens) = (48, 6, 40, 24, 37);
    let mut m = std::collections::HashMap::new();
    let mut put = |name: String, shape: &[usize]| {
        let n = shape.iter().product();
        let scale = 1.0 / (*shape.last().unwrap() as f32).sqrt();
        m.insert(name, Tensor::from_vec(random(&mut rng, n, scale), shape).unwrap());
    };
    put("gate.weight".into(), &[e, h]);
    for x in 0..e {
        for (g, u, d) in [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")] {
            put(format!("experts.{x}.{g}.weight"), &[i, h]);
            put(format!("experts.{x}.{u}.weight"), &[i, h]);
            put(format!("experts.{x}.{d}.weight"), &[h, i]);
        }
    }
    for s in ["shared_expert", "shared_experts"] {
        put(format!("{s}.gate_proj.weight"), &[si, h]);
        put(format!("{s}.up_proj.weight"), &[si, h]);
        put(format!("{s}.down_proj.weight"), &[h, si]);
    }
    put("shared_expert_gate.weight".into(), &[1, h]);
    put("gate.e_score_correction_bias".into(), &[e]);
    let vb = fla_nn::VarBuilder::from_tensors(m);
    let qcfg = QwenMoeConfig {
        hidden: h,
        num_experts: e,
        top_k: 2,
        intermediate: i,
        shared_intermediate: si,
        norm_topk_prob: true,
    };
    let kcfg = KimiMoeConfig {
        hidden: h,
        num_experts: e,
        top_k: 2,
        intermediate: i,
        shared_intermediate: si,
        renormalize: true,
        routed_scaling_factor: 2.5,
        n_group: 2,
        topk_group: 1,
    };
    let qwen = QwenMoe::load(&qcfg, &vb).unwrap();
    let kimi = KimiMoe::load(&kcfg, &vb).unwrap();
    let x = random(&mut rng, tokens * h, 1.0);
    let gx = up(&x, &[tokens, h], DType::F32, &dev);
    let pairs = [
        ("qwen", qwen.forward(&x).unwrap(), qwen.to_cuda(&dev, DType::F32).unwrap().forward(&gx).unwrap()),
        ("kimi", kimi.forward(&x).unwrap(), kimi.to_cuda(&dev, DType::F32).unwrap().forward(&gx).unwrap()),
    ];
    for (name, want, got) in pairs {
        let e = rel_err(&down(&got), &want);
        assert!(e < 1e-5, "{name}: rel err {e:.2e}");
    }
}

/// Row gather and weighted, gated scatter-add in bf16 against the host, and their typed errors.
#[test]
fn gather_scatter_rows_vs_host() {
    use fla_nn::cuda::{gather_rows_cuda, scatter_add_rows_cuda};
    let Some(dev) = gpu("gather_scatter_rows_vs_host") else { return };
    let mut rng = StdRng::seed_from_u64(18);
    let (r, w) = (9, 70);
    let x = rounded(&random(&mut rng, r * w, 1.0), DType::BF16);
    let gx = up(&x, &[r, w], DType::BF16, &dev);
    let rows = [7, 0, 3, 3, 8];
    let got = down(&gather_rows_cuda(&gx, &rows).unwrap());
    let want: Vec<f32> = rows.iter().flat_map(|&i| x[i * w..][..w].to_vec()).collect();
    assert_eq!(got, want, "gather");
    let (add_rows, weights) = ([2usize, 6, 4], [0.5f32, -1.0, 2.0]);
    let y = rounded(&random(&mut rng, 3 * w, 1.0), DType::BF16);
    let gate = rounded(&[0.3, -2.0, 1.1], DType::BF16);
    let mut out = gx.to_host().unwrap();
    let mut gout = CudaTensor::from_host(&out, &dev).unwrap();
    let (gy, gg) = (up(&y, &[3, w], DType::BF16, &dev), up(&gate, &[3], DType::BF16, &dev));
    scatter_add_rows_cuda(&mut gout, &gy, Some(&add_rows), Some(&weights), Some(&gg)).unwrap();
    let mut host: Vec<f32> = out.to_vec().unwrap();
    for (j, &row) in add_rows.iter().enumerate() {
        let s = weights[j] / (1.0 + (-gate[j]).exp());
        for c in 0..w {
            host[row * w + c] += s * y[j * w + c];
        }
    }
    let e = rel_err(&down(&gout), &host);
    assert!(e < 1e-2, "scatter-add: rel err {e:.2e}");
    out = Tensor::from_vec(vec![0.0f32; 4], &[2, 2]).unwrap();
    let mut small = CudaTensor::from_host(&out, &dev).unwrap();
    let two = up(&[1.0; 4], &[2, 2], DType::F32, &dev);
    assert!(matches!(gather_rows_cuda(&gx, &[9]), Err(Error::Argument { arg: "rows", .. })));
    assert!(matches!(
        scatter_add_rows_cuda(&mut small, &two, Some(&[1, 1]), None, None),
        Err(Error::Argument { arg: "rows", .. })
    ));
    assert!(matches!(
        scatter_add_rows_cuda(&mut small, &two, None, Some(&[1.0]), None),
        Err(Error::Argument { arg: "weights", .. })
    ));
    assert!(matches!(scatter_add_rows_cuda(&mut small, &gy, None, None, None), Err(Error::DType { arg: "y", .. })));
}

/// The GPU KDA layer against its CPU twin: a varlen prefill of three prompts (one of a single
/// token), two decode steps, then a second prefill chunk on the cached states; f32 (the f32 chunk
/// path, dk = 32) and bf16 (tensor cores, dk = 64). The safe gate is a typed error on the GPU.
#[test]
fn kda_layer_vs_cpu() {
    use fla_nn::kda::{KdaCache, KdaConfig, KdaGate, KimiDeltaAttention};
    use fla_nn::linear_cuda::LinearCacheCuda;
    let Some(dev) = gpu("kda_layer_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(19);
    for (dtype, d) in [(DType::F32, 32), (DType::BF16, 64)] {
        let (hidden, h, rank, ker) = (80, 2, 24, 4);
        let dim = h * d;
        let mut m = std::collections::HashMap::new();
        let mut put = |name: &str, shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            m.insert(
                name.to_string(),
                Tensor::from_vec(rounded(&random(&mut rng, n, scale), DType::BF16), shape).unwrap(),
            );
        };
        for p in ["q_proj", "k_proj", "v_proj"] {
            put(&format!("{p}.weight"), &[dim, hidden], 0.15);
        }
        for c in ["q_conv1d", "k_conv1d", "v_conv1d"] {
            put(&format!("{c}.weight"), &[dim, 1, ker], 0.4);
        }
        put("f_a_proj.weight", &[rank, hidden], 0.15);
        put("f_b_proj.weight", &[dim, rank], 0.2);
        put("b_proj.weight", &[h, hidden], 0.15);
        put("g_a_proj.weight", &[rank, hidden], 0.15);
        put("g_b_proj.weight", &[dim, rank], 0.2);
        put("A_log", &[h], 0.5);
        put("dt_bias", &[dim], 0.5);
        put("o_norm.weight", &[d], 0.2);
        put("o_proj.weight", &[hidden, dim], 0.1);
        let cfg = KdaConfig {
            hidden,
            heads: h,
            head_dim: d,
            conv_kernel: ker,
            rms_norm_eps: 1e-5,
            low_rank: None,
            gate: KdaGate::Softplus,
        };
        let vb = fla_nn::VarBuilder::from_tensors(m);
        let cpu = KimiDeltaAttention::load(&cfg, &vb).unwrap();
        let layer = cpu.to_cuda(&dev, dtype).unwrap();
        let (mut cc, mut gc) = (KdaCache::default(), LinearCacheCuda::default());
        let mut past = [0usize; 3];
        for (step, lens) in [[70, 1, 130], [1, 1, 1], [1, 1, 1], [9, 65, 2]].iter().enumerate() {
            let batch = Batch::new(lens, &past);
            let x = rounded(&random(&mut rng, batch.tokens() * hidden, 1.0), dtype);
            let want = cpu.forward(&x, &batch, &mut cc).unwrap();
            let got = down(&layer.forward(&up(&x, &[batch.tokens(), hidden], dtype, &dev), &batch, &mut gc).unwrap());
            let e = rel_err(&got, &want);
            let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
            assert!(e < tol, "{dtype} step {step}: rel err {e:.2e}");
            past.iter_mut().zip(lens).for_each(|(p, l)| *p += l);
        }
        let safe = KdaConfig { gate: KdaGate::Safe { lower_bound: -5.0 }, ..cfg };
        let cpu = KimiDeltaAttention::load(&safe, &vb).unwrap();
        assert!(matches!(cpu.to_cuda(&dev, dtype), Err(Error::Unsupported { .. })));
    }
}

/// A gated attention layer with random weights (each value representable in bf16): hidden 128,
/// `h` query heads over `kvh` key/value heads of `hd` dims, a quarter of each head rotated, the
/// output gate.
fn attention_layer(
    rng: &mut StdRng,
    h: usize,
    kvh: usize,
    hd: usize,
) -> (fla_nn::attention::GatedAttention, fla_nn::attention::AttentionConfig) {
    use fla_nn::attention::{AttentionConfig, GatedAttention};
    let hidden = 128;
    let cfg = AttentionConfig {
        hidden,
        heads: h,
        kv_heads: kvh,
        head_dim: hd,
        rope_dim: hd / 4,
        rope_theta: 10000.0,
        eps: 1e-6,
        output_gate: true,
    };
    let mut w =
        |r: usize, c: usize, s: f32| Tensor::from_vec(rounded(&random(rng, r * c, s), DType::BF16), &[r, c]).unwrap();
    let s = 1.0 / (hidden as f32).sqrt();
    let m = std::collections::HashMap::from([
        ("q_proj.weight".to_string(), w(h * hd * 2, hidden, s)),
        ("k_proj.weight".to_string(), w(kvh * hd, hidden, s)),
        ("v_proj.weight".to_string(), w(kvh * hd, hidden, s)),
        ("o_proj.weight".to_string(), w(hidden, h * hd, 1.0 / ((h * hd) as f32).sqrt())),
        ("q_norm.weight".to_string(), w(1, hd, 0.2).reshape(&[hd]).unwrap()),
        ("k_norm.weight".to_string(), w(1, hd, 0.2).reshape(&[hd]).unwrap()),
    ]);
    (GatedAttention::load(&cfg, &fla_nn::VarBuilder::from_tensors(m)).unwrap(), cfg)
}

/// Runs the calls `steps` (new tokens per sequence in each) through the CPU layer and the GPU
/// layer in `dtype`, the caches carried from call to call, and compares every call's output.
fn attention_steps(
    dev: &Arc<CudaDevice>,
    rng: &mut StdRng,
    h: usize,
    kvh: usize,
    hd: usize,
    dtype: DType,
    steps: &[Vec<usize>],
) {
    use fla_nn::attention::{KvCache, KvCacheCuda};
    let (cpu, cfg) = attention_layer(rng, h, kvh, hd);
    let layer = cpu.to_cuda(dev, dtype).unwrap();
    let (mut cc, mut gc) = (KvCache::default(), KvCacheCuda::default());
    let mut past = vec![0usize; steps[0].len()];
    for (step, lens) in steps.iter().enumerate() {
        let batch = Batch::new(lens, &past);
        let x = rounded(&random(rng, batch.tokens() * cfg.hidden, 1.0), dtype);
        let want = cpu.forward(&x, &batch, &mut cc).unwrap();
        let got = down(&layer.forward(&up(&x, &[batch.tokens(), cfg.hidden], dtype, dev), &batch, &mut gc).unwrap());
        let e = rel_err(&got, &want);
        let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
        eprintln!("{dtype} H {h} KVH {kvh} hd {hd} step {step} lens {lens:?} past {past:?}: rel err {e:.2e}");
        assert!(!got.iter().any(|v| v.is_nan()), "{dtype} hd {hd} step {step}: NaN");
        assert!(e < tol, "{dtype} H {h} KVH {kvh} hd {hd} step {step} lens {lens:?}: rel err {e:.2e}");
        past.iter_mut().zip(lens).for_each(|(p, l)| *p += l);
    }
}

/// One long varlen prefill against the CPU twin: sequences of 1, 70, 300 and 1000 tokens at
/// head_dim 256 (8 query heads over 2 KV heads, Qwen3.5's shape), then head_dim 128 with a GQA
/// group of 3 and head_dim 64 with a group of 8. f32 goes through the split-KV kernel, bf16 and
/// f16 through the tensor-core prefill kernel.
#[test]
fn attention_prefill_vs_cpu() {
    let Some(dev) = gpu("attention_prefill_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(17);
    for dtype in [DType::F32, DType::BF16] {
        attention_steps(&dev, &mut rng, 8, 2, 256, dtype, &[vec![1, 70, 300, 1000]]);
    }
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        attention_steps(&dev, &mut rng, 6, 2, 128, dtype, &[vec![65, 3, 200]]);
        attention_steps(&dev, &mut rng, 8, 1, 64, dtype, &[vec![130, 64, 1]]);
    }
}

/// A prefill in two calls, the second continuing each sequence from the cache (and growing the
/// pools from 256 to 512 rows), so the causal limit of a query block starts past 0.
#[test]
fn attention_prefill_in_two_calls_vs_cpu() {
    let Some(dev) = gpu("attention_prefill_in_two_calls_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(18);
    for dtype in [DType::F32, DType::BF16] {
        attention_steps(&dev, &mut rng, 8, 2, 256, dtype, &[vec![40, 130], vec![300, 77]]);
        attention_steps(&dev, &mut rng, 4, 2, 128, dtype, &[vec![100, 5], vec![3, 150]]);
    }
}

/// Decode steps after a prefill of about 600 tokens: the split-KV kernel with several slices per
/// context and the combine pass, f32, bf16 and f16.
#[test]
fn attention_decode_vs_cpu() {
    let Some(dev) = gpu("attention_decode_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(19);
    let steps = [vec![600, 257], vec![1, 1], vec![1, 1], vec![1, 1]];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        attention_steps(&dev, &mut rng, 8, 2, 256, dtype, &steps);
    }
    attention_steps(&dev, &mut rng, 6, 2, 128, DType::BF16, &steps);
    attention_steps(&dev, &mut rng, 1, 1, 64, DType::F32, &[vec![700], vec![1], vec![1]]);
}

/// The GPU MLA layer against its CPU twin, random weights (each value representable in bf16) of
/// Kimi-like small sizes (hidden 64, 4 heads, kv_lora_rank 32, nope 16, rope 8, v 16: one head
/// dim of 64 on the GPU), a plain q projection and a q LoRA: a varlen prefill of three prompts
/// (80 tokens, so bf16 takes the tensor-core kernel, 1 and 7), two decode steps, a second
/// prefill chunk that grows the latent pool, then a call that restarts sequence 0; f32 and bf16.
/// Wrong dtypes and cache mismatches are typed errors.
#[test]
fn mla_layer_vs_cpu() {
    use fla_nn::mla::{MlaCache, MlaCacheCuda, MlaConfig, MultiLatentAttention};
    let Some(dev) = gpu("mla_layer_vs_cpu") else { return };
    let mut rng = StdRng::seed_from_u64(23);
    for q_lora_rank in [None, Some(24)] {
        let cfg = MlaConfig {
            hidden: 64,
            heads: 4,
            q_lora_rank,
            kv_lora_rank: 32,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            norm_eps: 1e-6,
        };
        let (hidden, h, r) = (cfg.hidden, cfg.heads, cfg.kv_lora_rank);
        let (qk, rope, vd) = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
        let mut m = std::collections::HashMap::new();
        let mut put = |name: &str, shape: &[usize], scale: f32, offset: f32| {
            let n = shape.iter().product();
            let v: Vec<f32> = random(&mut rng, n, scale).iter().map(|v| v + offset).collect();
            m.insert(name.to_string(), Tensor::from_vec(rounded(&v, DType::BF16), shape).unwrap());
        };
        let s = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        match q_lora_rank {
            None => put("q_proj.weight", &[h * qk, hidden], s(hidden), 0.0),
            Some(qr) => {
                put("q_a_proj.weight", &[qr, hidden], s(hidden), 0.0);
                put("q_a_layernorm.weight", &[qr], 0.2, 1.0);
                put("q_b_proj.weight", &[h * qk, qr], s(qr), 0.0);
            }
        }
        put("kv_a_proj_with_mqa.weight", &[r + rope, hidden], s(hidden), 0.0);
        put("kv_a_layernorm.weight", &[r], 0.2, 1.0);
        put("kv_b_proj.weight", &[h * (qk - rope + vd), r], s(r), 0.0);
        put("o_proj.weight", &[hidden, h * vd], s(h * vd), 0.0);
        let cpu = MultiLatentAttention::load(&cfg, &fla_nn::VarBuilder::from_tensors(m)).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let layer = cpu.to_cuda(&dev, dtype).unwrap();
            let (mut cc, mut gc) = (MlaCache::empty(), MlaCacheCuda::default());
            let mut past = [0usize; 3];
            let steps: [([usize; 3], bool); 5] =
                [([80, 1, 7], false), ([1, 1, 1], false), ([1, 1, 1], false), ([60, 65, 2], false), ([3, 1, 1], true)];
            for (step, (lens, restart)) in steps.iter().enumerate() {
                if *restart {
                    past[0] = 0;
                }
                let batch = Batch::new(lens, &past);
                let x = rounded(&random(&mut rng, batch.tokens() * hidden, 1.0), dtype);
                let want = cpu.forward(&x, &batch, &mut cc).unwrap();
                let got =
                    down(&layer.forward(&up(&x, &[batch.tokens(), hidden], dtype, &dev), &batch, &mut gc).unwrap());
                let e = rel_err(&got, &want);
                let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
                eprintln!("q_lora {q_lora_rank:?} {dtype} step {step} lens {lens:?} past {past:?}: rel err {e:.2e}");
                assert!(!got.iter().any(|v| v.is_nan()), "q_lora {q_lora_rank:?} {dtype} step {step}: NaN");
                assert!(e < tol, "q_lora {q_lora_rank:?} {dtype} step {step} lens {lens:?}: rel err {e:.2e}");
                past.iter_mut().zip(lens).for_each(|(p, l)| *p += l);
            }
            assert_eq!(gc.len, past.to_vec());
            let other = if dtype == DType::F32 { DType::BF16 } else { DType::F32 };
            let x = up(&vec![0.1; hidden], &[1, hidden], other, &dev);
            let batch = Batch::new(&[1], &[0]);
            assert!(matches!(layer.forward(&x, &batch, &mut MlaCacheCuda::default()), Err(Error::DType { .. })));
            let x = up(&vec![0.1; hidden], &[1, hidden], dtype, &dev);
            assert!(layer.forward(&x, &Batch::new(&[1], &[5]), &mut MlaCacheCuda::default()).is_err());
            assert!(layer.forward(&x, &Batch::new(&[1], &[past[0] + 1]), &mut gc).is_err());
            let x2 = up(&vec![0.1; 2 * hidden], &[2, hidden], dtype, &dev);
            assert!(matches!(layer.forward(&x2, &batch, &mut gc), Err(Error::Shape { .. })));
        }
    }
}
