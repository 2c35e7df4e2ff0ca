//! cuBLAS GEMM (`fla_core::cuda_blas`) against the CPU `Tensor::matmul` on random inputs: f32,
//! bf16 and f16; `b` as `[K, N]` and as a `Linear` weight `[N, K]`; one row (GEMV), odd sizes,
//! leading batch dimensions on `a`, `N = 1`, empty dimensions; `matmul_into` overwriting its
//! output; and the typed errors of bad arguments.
//!
//! Every test prints "skipped: no CUDA device" and passes where there is no GPU (CI).
use std::sync::Arc;

use fla_core::cuda::{self, CudaDevice, CudaTensor};
use fla_core::{cuda_blas, DType, Error, Tensor};

/// f32: the same f32 products summed in another order (TF32 would be ~1e-3 and fail).
const TOL_F32: f64 = 1e-5;
/// bf16: the output is rounded once to 8 significant bits (unit roundoff 2⁻⁸ ≈ 3.9e-3 bounds
/// the relative error of every element); twice that leaves room for the f32 sum order.
const TOL_BF16: f64 = 2.0 / 256.0;
/// f16: the same with 11 significant bits (2⁻¹¹ ≈ 4.9e-4).
const TOL_F16: f64 = 2.0 / 2048.0;

/// The first GPU, or `None` (after saying so) where there is none.
fn gpu(test: &str) -> Option<Arc<CudaDevice>> {
    if !cuda::is_available() {
        eprintln!("{test}: skipped: no CUDA device");
        return None;
    }
    let dev = CudaDevice::get(0).expect("a device is present");
    eprintln!("{test}: on {}", dev.name());
    Some(dev)
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

/// A random tensor of `dtype` (f32 values rounded to it).
fn random(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    let t = Tensor::from_vec(uniform(seed, shape.iter().product()), shape).unwrap();
    t.to_dtype(dtype).unwrap()
}

/// `(leading dims of a, K, N)`: one row (GEMV, with and without a leading dim), odd sizes,
/// batch dims, `N = 1`, `1×1×1`, and sizes large enough for the tensor-core paths.
fn shapes() -> Vec<(Vec<usize>, usize, usize)> {
    vec![
        (vec![1], 64, 96),
        (vec![], 33, 9),
        (vec![3], 37, 5),
        (vec![2, 3], 19, 7),
        (vec![17], 128, 1),
        (vec![1], 1, 1),
        (vec![64], 256, 96),
        (vec![5], 1024, 384),
    ]
}

/// The CPU reference: `a · b` (`a · bᵀ` when `b_transposed`) in f32 of the same (rounded)
/// inputs, in the output shape `[.., N]`.
fn cpu_product(a: &Tensor, b: &Tensor, b_transposed: bool) -> Tensor {
    let (lead, k) = a.shape().split_at(a.rank() - 1);
    let m: usize = lead.iter().product();
    let a = a.to_dtype(DType::F32).unwrap().reshape(&[m, k[0]]).unwrap();
    let mut b = b.to_dtype(DType::F32).unwrap();
    if b_transposed {
        b = b.transpose(0, 1).unwrap();
    }
    let n = b.shape()[1];
    let mut shape = lead.to_vec();
    shape.push(n);
    a.matmul(&b).unwrap().reshape(&shape).unwrap()
}

/// Every shape, with `b` as `[K, N]` and as `[N, K]`, in `dtype`, against the CPU.
fn vs_cpu(test: &str, dtype: DType, tol: f64) {
    let Some(dev) = gpu(test) else { return };
    let mut worst = 0.0f64;
    for (i, (lead, k, n)) in shapes().into_iter().enumerate() {
        for b_transposed in [false, true] {
            let mut a_shape = lead.clone();
            a_shape.push(k);
            let b_shape = if b_transposed { [n, k] } else { [k, n] };
            let seed = 2 * i as u64 + b_transposed as u64;
            let (a, b) = (random(100 + seed, &a_shape, dtype), random(200 + seed, &b_shape, dtype));
            let (ga, gb) = (CudaTensor::from_host(&a, &dev).unwrap(), CudaTensor::from_host(&b, &dev).unwrap());
            let got = cuda_blas::matmul(&ga, &gb, b_transposed).unwrap();
            let want = cpu_product(&a, &b, b_transposed);
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.shape(), want.shape(), "a {a_shape:?}, b {b_shape:?}");
            let err = got.to_host().unwrap().to_dtype(DType::F32).unwrap().rel_err(&want).unwrap();
            eprintln!("{test}: a {a_shape:?} b {b_shape:?} b_transposed={b_transposed}: rel err {err:.2e}");
            assert!(
                err <= tol,
                "a {a_shape:?}, b {b_shape:?}, b_transposed={b_transposed}: rel err {err:.3e} > {tol:e}"
            );
            worst = worst.max(err);
        }
    }
    eprintln!("{test}: worst rel err {worst:.2e} (tolerance {tol:e})");
}

#[test]
fn matmul_f32_vs_cpu() {
    vs_cpu("matmul_f32_vs_cpu", DType::F32, TOL_F32);
}

#[test]
fn matmul_bf16_vs_cpu() {
    vs_cpu("matmul_bf16_vs_cpu", DType::BF16, TOL_BF16);
}

#[test]
fn matmul_f16_vs_cpu() {
    vs_cpu("matmul_f16_vs_cpu", DType::F16, TOL_F16);
}

#[test]
fn matmul_into_overwrites_out() {
    let Some(dev) = gpu("matmul_into_overwrites_out") else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tol = match dtype {
            DType::F32 => TOL_F32,
            DType::BF16 => TOL_BF16,
            _ => TOL_F16,
        };
        let (a, w) = (random(1, &[2, 3, 40], dtype), random(2, &[24, 40], dtype));
        let (ga, gw) = (CudaTensor::from_host(&a, &dev).unwrap(), CudaTensor::from_host(&w, &dev).unwrap());
        // Garbage in `out` must be overwritten, not accumulated into.
        let mut out = CudaTensor::from_host(&random(3, &[2, 3, 24], dtype), &dev).unwrap();
        cuda_blas::matmul_into(&ga, &gw, true, &mut out).unwrap();
        let err = out.to_host().unwrap().to_dtype(DType::F32).unwrap().rel_err(&cpu_product(&a, &w, true)).unwrap();
        assert!(err <= tol, "{dtype}: rel err {err:.3e} > {tol:e}");
    }
}

#[test]
fn empty_k_gives_zeros() {
    let Some(dev) = gpu("empty_k_gives_zeros") else { return };
    let a = CudaTensor::zeros(&[3, 0], DType::BF16, &dev).unwrap();
    let b = CudaTensor::zeros(&[0, 5], DType::BF16, &dev).unwrap();
    let c = cuda_blas::matmul(&a, &b, false).unwrap();
    assert_eq!(c.to_host().unwrap().to_vec::<f32>().unwrap(), vec![0.0; 15]);
    let mut out = CudaTensor::from_host(&random(4, &[3, 5], DType::BF16), &dev).unwrap();
    cuda_blas::matmul_into(&a, &b, false, &mut out).unwrap();
    assert_eq!(out.to_host().unwrap().to_vec::<f32>().unwrap(), vec![0.0; 15]);
    let none = CudaTensor::zeros(&[0, 4], DType::F32, &dev).unwrap();
    let w = CudaTensor::zeros(&[6, 4], DType::F32, &dev).unwrap();
    assert_eq!(cuda_blas::matmul(&none, &w, true).unwrap().shape(), &[0, 6]);
}

/// The argument named by a shape error.
fn shape_arg(e: Error) -> &'static str {
    match e {
        Error::Shape { arg, .. } => arg,
        e => panic!("expected a shape error, got {e}"),
    }
}

#[test]
fn shape_errors_name_the_argument() {
    let Some(dev) = gpu("shape_errors_name_the_argument") else { return };
    let t = |shape: &[usize]| CudaTensor::zeros(shape, DType::F32, &dev).unwrap();
    let a = t(&[4, 8]);
    // K of `b` unlike K of `a`, in both layouts.
    assert_eq!(shape_arg(cuda_blas::matmul(&a, &t(&[7, 3]), false).unwrap_err()), "b");
    assert_eq!(shape_arg(cuda_blas::matmul(&a, &t(&[8, 3]), true).unwrap_err()), "b");
    // `b` not a matrix; `a` a scalar.
    assert_eq!(shape_arg(cuda_blas::matmul(&a, &t(&[1, 8, 3]), false).unwrap_err()), "b");
    assert_eq!(shape_arg(cuda_blas::matmul(&a, &t(&[8]), false).unwrap_err()), "b");
    assert_eq!(shape_arg(cuda_blas::matmul(&t(&[]), &t(&[1, 3]), false).unwrap_err()), "a");
    // `out` of the wrong shape.
    let mut out = t(&[4, 4]);
    let e = cuda_blas::matmul_into(&a, &t(&[8, 3]), false, &mut out).unwrap_err();
    assert!(e.to_string().contains("[4, 3]"), "{e}");
    assert_eq!(shape_arg(e), "out");
}

#[test]
fn dtype_errors_name_the_argument() {
    let Some(dev) = gpu("dtype_errors_name_the_argument") else { return };
    let a = CudaTensor::zeros(&[4, 8], DType::F32, &dev).unwrap();
    let b = CudaTensor::zeros(&[3, 8], DType::BF16, &dev).unwrap();
    let e = cuda_blas::matmul(&a, &b, true).unwrap_err();
    assert!(matches!(e, Error::DType { arg: "b", got: DType::BF16, .. }), "{e}");
    let b = CudaTensor::zeros(&[3, 8], DType::F32, &dev).unwrap();
    let mut out = CudaTensor::zeros(&[4, 3], DType::F16, &dev).unwrap();
    let e = cuda_blas::matmul_into(&a, &b, true, &mut out).unwrap_err();
    assert!(matches!(e, Error::DType { arg: "out", got: DType::F16, .. }), "{e}");
}

#[test]
fn cublas_presence_never_panics() {
    let present = cuda_blas::cublas_present();
    if !cuda::is_available() {
        eprintln!("cublas_presence_never_panics: skipped: no CUDA device (libcublas present: {present})");
        return;
    }
    assert!(present, "a GPU machine without libcublas");
}
