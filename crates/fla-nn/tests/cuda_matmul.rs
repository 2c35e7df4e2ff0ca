//! The GEMV kernel (`fla_nn::matmul::gemv`) and its dispatcher `matmul_t` against a float64 CPU
//! product and cuBLAS on random inputs: 1, 2, 3, 5 and 8 rows; N of 1, 7 (a partial tile),
//! 1024 and 4099; K of 8, 1000 (ragged last step), 1024, 2056, 3584 and 7 (not a multiple of the
//! 16-byte vector: cuBLAS); f32, bf16 and f16; small ragged shapes (for compute-sanitizer);
//! leading dimensions on `x`; 9 rows (cuBLAS); empty dimensions; the typed errors of bad
//! arguments; the fused prologues (SwiGLU, RMSNorm of x + res with the sum returned, a per-group
//! norm gated by columns of a wider tensor) on the kernel (≤ 8 rows) and on their own kernels
//! (12 rows) against float64. Every test prints "skipped: no CUDA device"
//! and passes where there is no GPU (CI).
use std::sync::Arc;

use fla_core::cuda::{self, CudaDevice, CudaTensor};
use fla_core::{cuda_blas, DType, Error, Tensor};
use fla_nn::matmul::{gemv, gemv_supported, matmul_t, matmul_t_fused, NormPrologue, Prologue, GEMV_MAX_ROWS};
use fla_nn::ops::GateAct;

/// The first GPU with this build's kernels, or `None` (after saying so).
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

/// Relative RMS error against a float64 reference: the output is rounded once to the dtype, so
/// f32 keeps ~1e-7 plus the f32 sum order, f16 ~3e-4 (2⁻¹¹/√3), bf16 ~2e-3 (2⁻⁸/√3).
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

/// Uniform numbers in [-1, 1) from a seeded SplitMix64.
fn uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A random tensor of `dtype` on `dev`, with its values (rounded to `dtype`) as f64 on the host.
fn random(seed: u64, shape: &[usize], dtype: DType, dev: &Arc<CudaDevice>) -> (CudaTensor, Vec<f64>) {
    let t = Tensor::from_vec(uniform(seed, shape.iter().product()), shape).unwrap().to_dtype(dtype).unwrap();
    let host = t.to_vec::<f32>().unwrap().into_iter().map(f64::from).collect();
    (CudaTensor::from_host(&t, dev).unwrap(), host)
}

/// `x [m, k] · w [n, k]ᵀ` in float64.
fn reference(x: &[f64], w: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for (i, xr) in x.chunks(k).take(m).enumerate() {
        for (j, wr) in w.chunks(k).take(n).enumerate() {
            y[i * n + j] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
        }
    }
    y
}

fn down(t: &CudaTensor) -> Vec<f64> {
    t.to_host().unwrap().to_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
}

/// `‖got − want‖ / ‖want‖`; NaN when `got` has a NaN (and then no tolerance passes).
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g - w).powi(2);
        den += w.powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

/// Every (rows, N, K) of the sweep in `dtype`: the GEMV kernel where K fits its vectors (else
/// `gemv` refuses and `matmul_t` takes cuBLAS) against float64 and against cuBLAS.
fn sweep(test: &str, dtype: DType) {
    let Some(dev) = gpu(test) else { return };
    let tol = tol(dtype);
    let vec = if dtype == DType::F32 { 4 } else { 8 };
    let mut worst = 0.0f64;
    for (ni, n) in [1usize, 7, 1024, 4099].into_iter().enumerate() {
        for (ki, k) in [8usize, 1000, 1024, 2056, 3584, 7].into_iter().enumerate() {
            let seed = 100 * ni as u64 + 10 * ki as u64;
            let (gw, w) = random(seed, &[n, k], dtype, &dev);
            for m in [1usize, 2, 3, 5, 8] {
                let (gx, x) = random(seed + m as u64, &[m, k], dtype, &dev);
                let want = reference(&x, &w, m, n, k);
                let case = format!("{dtype} M={m} N={n} K={k}");
                let fits = k % vec == 0;
                assert_eq!(gemv_supported(&gx, &gw), fits, "{case}");
                let blas = cuda_blas::matmul(&gx, &gw, true).unwrap();
                let y = matmul_t(&gx, &gw).unwrap();
                assert_eq!((y.shape(), y.dtype()), (&[m, n][..], dtype), "{case}");
                let err = rel_err(&down(&y), &want);
                assert!(err <= tol, "{case}: matmul_t rel err {err:.3e} > {tol:e}");
                if fits {
                    let g = down(&gemv(&gx, &gw).unwrap());
                    let (e64, eblas) = (rel_err(&g, &want), rel_err(&g, &down(&blas)));
                    assert!(e64 <= tol, "{case}: gemv rel err {e64:.3e} > {tol:e} (vs float64)");
                    assert!(eblas <= 2.0 * tol, "{case}: gemv rel err {eblas:.3e} > {:e} (vs cuBLAS)", 2.0 * tol);
                    worst = worst.max(e64);
                } else {
                    let e = gemv(&gx, &gw).unwrap_err();
                    assert!(matches!(e, Error::Unsupported { .. }), "{case}: {e}");
                }
            }
        }
    }
    eprintln!("{test}: worst gemv rel err vs float64 {worst:.2e} (tolerance {tol:e})");
}

#[test]
fn gemv_f32_vs_f64_and_cublas() {
    sweep("gemv_f32_vs_f64_and_cublas", DType::F32);
}

#[test]
fn gemv_bf16_vs_f64_and_cublas() {
    sweep("gemv_bf16_vs_f64_and_cublas", DType::BF16);
}

#[test]
fn gemv_f16_vs_f64_and_cublas() {
    sweep("gemv_f16_vs_f64_and_cublas", DType::F16);
}

/// Small ragged shapes of every dtype (fast enough for compute-sanitizer): partial tiles, K
/// ending inside a step and inside an unrolled batch, splits of 2 to 8 warps and both unrolls
/// (N = 7, K = 2056: one CTA of 8 warps with 9 steps each takes U = 16).
#[test]
fn gemv_ragged_small() {
    let Some(dev) = gpu("gemv_ragged_small") else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (i, (m, n, k)) in
            [(1, 1, 8), (3, 7, 24), (8, 9, 1000), (2, 33, 264), (5, 7, 2056), (8, 130, 72)].into_iter().enumerate()
        {
            let (gw, w) = random(500 + i as u64, &[n, k], dtype, &dev);
            let (gx, x) = random(600 + i as u64, &[m, k], dtype, &dev);
            let err = rel_err(&down(&gemv(&gx, &gw).unwrap()), &reference(&x, &w, m, n, k));
            assert!(err <= tol(dtype), "{dtype} M={m} N={n} K={k}: rel err {err:.3e}");
        }
    }
}

#[test]
fn leading_dims_and_nine_rows() {
    let Some(dev) = gpu("leading_dims_and_nine_rows") else { return };
    let (n, k) = (300, 256);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (gw, w) = random(7, &[n, k], dtype, &dev);
        // [2, 3, K]: 6 rows through the kernel; [3, 3, K] and [9, K]: 9 rows through cuBLAS.
        for (i, shape) in [vec![2, 3, k], vec![1, 8, k], vec![3, 3, k], vec![9, k]].into_iter().enumerate() {
            let m: usize = shape[..shape.len() - 1].iter().product();
            let (gx, x) = random(20 + i as u64, &shape, dtype, &dev);
            assert_eq!(gemv_supported(&gx, &gw), m <= GEMV_MAX_ROWS, "{dtype} x {shape:?}");
            let y = matmul_t(&gx, &gw).unwrap();
            let mut out_shape = shape.clone();
            *out_shape.last_mut().unwrap() = n;
            assert_eq!(y.shape(), &out_shape[..]);
            let err = rel_err(&down(&y), &reference(&x, &w, m, n, k));
            assert!(err <= tol(dtype), "{dtype} x {shape:?}: rel err {err:.3e}");
            if m > GEMV_MAX_ROWS {
                assert!(matches!(gemv(&gx, &gw).unwrap_err(), Error::Unsupported { .. }));
            }
        }
    }
}

#[test]
fn empty_dims_go_to_cublas() {
    let Some(dev) = gpu("empty_dims_go_to_cublas") else { return };
    let z = |shape: &[usize]| CudaTensor::zeros(shape, DType::BF16, &dev).unwrap();
    // No rows, and K = 0 (zeros out).
    assert_eq!(matmul_t(&z(&[0, 16]), &z(&[5, 16])).unwrap().shape(), &[0, 5]);
    let y = matmul_t(&z(&[3, 0]), &z(&[5, 0])).unwrap();
    assert_eq!(down(&y), vec![0.0; 15]);
    for (x, w) in [(z(&[0, 16]), z(&[5, 16])), (z(&[3, 0]), z(&[5, 0])), (z(&[2, 16]), z(&[0, 16]))] {
        assert!(matches!(gemv(&x, &w).unwrap_err(), Error::Unsupported { .. }));
    }
}

/// The argument named by a shape error.
fn shape_arg(e: Error) -> &'static str {
    match e {
        Error::Shape { arg, .. } => arg,
        e => panic!("expected a shape error, got {e}"),
    }
}

#[test]
fn bad_arguments_give_typed_errors() {
    let Some(dev) = gpu("bad_arguments_give_typed_errors") else { return };
    let t = |shape: &[usize], dtype: DType| CudaTensor::zeros(shape, dtype, &dev).unwrap();
    let x = t(&[1, 64], DType::BF16);
    // The kernel's own checks name `x` and `w`.
    assert_eq!(shape_arg(gemv(&x, &t(&[8, 32], DType::BF16)).unwrap_err()), "w");
    assert_eq!(shape_arg(gemv(&x, &t(&[2, 8, 64], DType::BF16)).unwrap_err()), "w");
    assert_eq!(shape_arg(gemv(&t(&[], DType::BF16), &t(&[8, 1], DType::BF16)).unwrap_err()), "x");
    let e = gemv(&x, &t(&[8, 64], DType::F16)).unwrap_err();
    assert!(matches!(e, Error::DType { arg: "w", got: DType::F16, .. }), "{e}");
    // `matmul_t` hands bad arguments to cuBLAS, whose errors name `a` and `b`.
    assert_eq!(shape_arg(matmul_t(&x, &t(&[8, 32], DType::BF16)).unwrap_err()), "b");
    assert_eq!(shape_arg(matmul_t(&x, &t(&[64], DType::BF16)).unwrap_err()), "b");
    assert_eq!(shape_arg(matmul_t(&t(&[], DType::BF16), &t(&[8, 1], DType::BF16)).unwrap_err()), "a");
    let e = matmul_t(&x, &t(&[8, 64], DType::F32)).unwrap_err();
    assert!(matches!(e, Error::DType { arg: "b", got: DType::F32, .. }), "{e}");
    let e = matmul_t(&t(&[1, 64], DType::F32), &t(&[8, 64], DType::BF16)).unwrap_err();
    assert!(matches!(e, Error::DType { arg: "b", got: DType::BF16, .. }), "{e}");
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// `x` normalised over groups of `group` columns (`rows × k`), times `offset + w[col % group]`.
fn norm_ref(x: &[f64], w: &[f64], group: usize, offset: f64, eps: f64) -> Vec<f64> {
    x.chunks(group)
        .flat_map(|g| {
            let r = 1.0 / (g.iter().map(|v| v * v).sum::<f64>() / group as f64 + eps).sqrt();
            g.iter().zip(w).map(move |(v, w)| v * r * (offset + w)).collect::<Vec<_>>()
        })
        .collect()
}

/// The prologues fused into the GEMV kernel (1, 3 and 8 rows) and run on their own kernels
/// (12 rows) against float64: SwiGLU of gate | up; RMSNorm (1 + w) of x + res, the sum returned
/// exactly as x + res rounded to the dtype; an RMSNorm per group of 64 columns gated by silu of
/// columns 20.. of a wider tensor.
#[test]
fn fused_prologues_vs_f64() {
    let Some(dev) = gpu("fused_prologues_vs_f64") else { return };
    let (n, k, group) = (72, 256, 64);
    for dtype in [DType::F32, DType::BF16] {
        let tol = tol(dtype);
        let (gw, w) = random(1, &[n, k], dtype, &dev);
        let nw: Vec<f32> = uniform(2, k).iter().map(|v| 0.5 * v).collect();
        let gnw = CudaTensor::from_host(&Tensor::from_vec(nw.clone(), &[k]).unwrap(), &dev).unwrap();
        let gnw64 = CudaTensor::from_host(&Tensor::from_vec(nw[..group].to_vec(), &[group]).unwrap(), &dev).unwrap();
        let nw: Vec<f64> = nw.into_iter().map(f64::from).collect();
        for m in [1usize, 3, 8, 12] {
            let case = format!("{dtype} rows={m}");
            // SwiGLU.
            let (gx, x) = random(10 + m as u64, &[m, 2 * k], dtype, &dev);
            let h: Vec<f64> =
                x.chunks(2 * k).flat_map(|r| (0..k).map(|j| silu(r[j]) * r[k + j]).collect::<Vec<_>>()).collect();
            let (y, sum) = matmul_t_fused(gx, &gw, &Prologue::SwiGlu).unwrap();
            assert!(sum.is_none());
            let e = rel_err(&down(&y), &reference(&h, &w, m, n, k));
            assert!(e <= tol, "{case} swiglu: rel err {e:.2e}");
            // RMSNorm of x + res, the sum returned.
            let (gx, x) = random(20 + m as u64, &[m, k], dtype, &dev);
            let (gr, r) = random(30 + m as u64, &[m, k], dtype, &dev);
            let s32: Vec<f32> = x.iter().zip(&r).map(|(a, b)| (a + b) as f32).collect();
            let s: Vec<f64> = Tensor::from_vec(s32, &[m, k])
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_vec::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let np = NormPrologue { res: Some(&gr), weight: &gnw, offset: 1.0, eps: 1e-6, group: k, gate: None };
            let (y, sum) = matmul_t_fused(gx, &gw, &Prologue::Norm(np)).unwrap();
            assert_eq!(down(&sum.expect("the sum")), s, "{case}: x + res");
            let e = rel_err(&down(&y), &reference(&norm_ref(&s, &nw, k, 1.0, 1e-6), &w, m, n, k));
            assert!(e <= tol, "{case} add + norm: rel err {e:.2e}");
            // A norm per group of 64 columns gated by silu of columns 20 .. 20 + K of z.
            let (gx, x) = random(40 + m as u64, &[m * k / group, group], dtype, &dev);
            let (gz, z) = random(50 + m as u64, &[m, 300], dtype, &dev);
            let mut h = norm_ref(&x, &nw[..group].repeat(k / group), group, 0.0, 1e-5);
            for (i, v) in h.iter_mut().enumerate() {
                *v *= silu(z[(i / k) * 300 + 20 + i % k]);
            }
            let np = NormPrologue {
                res: None,
                weight: &gnw64,
                offset: 0.0,
                eps: 1e-5,
                group,
                gate: Some((&gz, 20, GateAct::Silu)),
            };
            let (y, _) = matmul_t_fused(gx, &gw, &Prologue::Norm(np)).unwrap();
            assert_eq!(y.shape(), [m, n]);
            let e = rel_err(&down(&y), &reference(&h, &w, m, n, k));
            assert!(e <= tol, "{case} gated group norm: rel err {e:.2e}");
        }
    }
}
