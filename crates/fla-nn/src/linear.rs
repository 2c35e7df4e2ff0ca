//! `y = x Wᵀ (+ b)` with the weight kept in its checkpoint dtype (f32, bf16 or f16).
//!
//! Activations are f32. Few rows (decoding) take a GEMV that widens each weight row to f32 in L1
//! as it streams it, so memory sees the weight once in its own dtype; many rows (prefill) widen
//! blocks of rows and run an f32 GEMM on them. Both split the output features over the cores.
use fla_core::cpu::{gemm, MatMut, MatRef};
use fla_core::{DType, Error, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::VarBuilder;

thread_local! {
    /// Per-thread buffer for weight rows widened to f32 (reused: fresh large allocations fault
    /// in zeroed pages on every call).
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Weight element types widened to f32 on the fly.
trait Widen: Copy {
    fn widen(self) -> f32;
}
impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}
impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}
impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `Σ x·widen(w)` with 32 partial sums: four independent 8-lane FMA chains hide the FMA latency,
/// so one core can stream a weight row at memory speed.
#[inline(always)]
fn dot_widen<W: Widen>(x: &[f32], w: &[W]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0.0f32; LANES];
    let (xc, wc) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
    let tail: f32 = xc.remainder().iter().zip(wc.remainder()).map(|(&a, &b)| a * b.widen()).sum();
    for (a, b) in xc.zip(wc) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l].widen();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rows up to which the GEMV path is used.
const GEMV_ROWS: usize = 4;
/// Output features per parallel block of the GEMV path.
const BLOCK: usize = 64;

/// A linear layer `[out, in]`.
#[derive(Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Vec<f32>>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    /// A layer over `weight [out, in]` (f32, bf16 or f16) and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Vec<f32>>) -> Result<Self> {
        let &[out_dim, in_dim] = weight.shape() else {
            return Err(Error::shape("Linear::new", "weight", "[out, in]", weight.shape()));
        };
        if weight.dtype() == DType::F64 {
            return Err(Error::DType {
                op: "Linear::new",
                arg: "weight",
                expected: "f32, bf16 or f16".into(),
                got: DType::F64,
            });
        }
        if bias.as_ref().is_some_and(|b| b.len() != out_dim) {
            return Err(Error::shape("Linear::new", "bias", format!("[{out_dim}]"), &[bias.map_or(0, |b| b.len())]));
        }
        Ok(Linear { weight: weight.contiguous()?, bias, in_dim, out_dim })
    }

    /// Loads `weight` (and `bias` when `with_bias`) under `vb`.
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, with_bias: bool) -> Result<Self> {
        let w = vb.get("weight", &[out_dim, in_dim])?;
        let b = if with_bias { Some(vb.get_f32("bias", &[out_dim])?) } else { None };
        Linear::new(w, b)
    }

    /// The weight `[out, in]` in its checkpoint dtype.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    /// Bytes of the weight as stored (what one decoding step reads).
    pub fn weight_bytes(&self) -> usize {
        self.weight.elem_count() * self.weight.dtype().size_in_bytes()
    }

    /// `x [rows, in]` → `[rows, out]`; an input that is not whole rows is an error.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        if self.in_dim == 0 || x.len() % self.in_dim != 0 {
            return Err(Error::shape(
                "Linear::forward",
                "x",
                format!("[rows, {}] as a flat slice", self.in_dim),
                &[x.len()],
            ));
        }
        let rows = x.len() / self.in_dim;
        let mut y = vec![0.0f32; rows * self.out_dim];
        if rows == 0 || self.out_dim == 0 {
            return Ok(y);
        }
        let (o, i) = (self.out_dim, self.in_dim);
        // Each task computes the output columns [c0, c0 + BLOCK) for every row into its own buffer.
        // GEMV: small blocks balance the cores; GEMM: one block per core and a half, so that the
        // activations are packed few times.
        let block = if rows <= GEMV_ROWS {
            BLOCK
        } else {
            o.div_ceil(2 * rayon::current_num_threads()).next_multiple_of(BLOCK)
        };
        let blocks: Vec<(usize, Vec<f32>)> = (0..o)
            .step_by(block)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|c0| {
                let n = block.min(o - c0);
                let mut out = vec![0.0f32; rows * n];
                if rows <= GEMV_ROWS {
                    match self.weight.dtype() {
                        DType::F32 => self.gemv::<f32>(x, rows, c0, n, &mut out),
                        DType::BF16 => self.gemv::<bf16>(x, rows, c0, n, &mut out),
                        DType::F16 => self.gemv::<f16>(x, rows, c0, n, &mut out),
                        DType::F64 => unreachable!("rejected in Linear::new"),
                    }
                } else {
                    WIDE.with(|buf| {
                        let mut buf = buf.borrow_mut();
                        let w = self.rows_f32(c0, n, &mut buf);
                        gemm(
                            1.0,
                            MatRef::new(x, rows, i, i, 1),
                            MatRef::new(w, n, i, i, 1).t(),
                            0.0,
                            MatMut::new(&mut out, rows, n, n, 1),
                        );
                    });
                }
                (c0, out)
            })
            .collect();
        for (c0, out) in blocks {
            let n = block.min(o - c0);
            for r in 0..rows {
                y[r * o + c0..][..n].copy_from_slice(&out[r * n..][..n]);
            }
        }
        if let Some(b) = &self.bias {
            y.chunks_mut(o).for_each(|row| row.iter_mut().zip(b).for_each(|(v, &b)| *v += b));
        }
        Ok(y)
    }

    /// `out[r, c] = x[r] · w[c0 + c]` for few rows, widening the weight as it streams.
    fn gemv<W: Widen + fla_core::Element>(&self, x: &[f32], rows: usize, c0: usize, n: usize, out: &mut [f32]) {
        let i = self.in_dim;
        let w = &self.weight.as_slice::<W>().expect("dtype matched")[c0 * i..(c0 + n) * i];
        for (c, wr) in w.chunks_exact(i).enumerate() {
            for r in 0..rows {
                out[r * n + c] = dot_widen(&x[r * i..][..i], wr);
            }
        }
    }

    /// Weight rows `[c0, c0 + n)` as f32: borrowed when stored in f32, widened into `buf` otherwise.
    fn rows_f32<'a>(&'a self, c0: usize, n: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let i = self.in_dim;
        let range = c0 * i..(c0 + n) * i;
        match self.weight.dtype() {
            DType::F32 => &self.weight.as_slice::<f32>().expect("f32 weight")[range],
            DType::BF16 => {
                buf.clear();
                buf.extend(self.weight.as_slice::<bf16>().expect("bf16 weight")[range].iter().map(|v| v.widen()));
                buf
            }
            DType::F16 => {
                buf.clear();
                buf.extend(self.weight.as_slice::<f16>().expect("f16 weight")[range].iter().map(|v| v.widen()));
                buf
            }
            DType::F64 => unreachable!("rejected in Linear::new"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], x: &[f32], o: usize, i: usize) -> Vec<f32> {
        let rows = x.len() / i;
        let mut y = vec![0.0; rows * o];
        for r in 0..rows {
            for c in 0..o {
                y[r * o + c] = (0..i).map(|k| x[r * i + k] * w[c * i + k]).sum();
            }
        }
        y
    }

    #[test]
    fn every_dtype_and_path_matches_reference() {
        let (o, i) = (150, 37);
        let w: Vec<f32> = (0..o * i).map(|v| ((v * 7919) % 113) as f32 / 113.0 - 0.5).collect();
        for rows in [1, 3, 9] {
            let x: Vec<f32> = (0..rows * i).map(|v| ((v * 31) % 17) as f32 / 17.0 - 0.5).collect();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let wt = Tensor::from_vec(w.clone(), &[o, i]).unwrap().to_dtype(dt).unwrap();
                let rounded: Vec<f32> = wt.to_vec().unwrap();
                let lin = Linear::new(wt, Some(vec![0.25; o])).unwrap();
                let want: Vec<f32> = reference(&rounded, &x, o, i).iter().map(|v| v + 0.25).collect();
                let got = lin.forward(&x).unwrap();
                let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(err < 1e-4, "rows {rows} {dt}: max err {err}");
            }
        }
        assert!(Linear::new(Tensor::zeros(&[3], DType::F32), None).is_err());
        let lin = Linear::new(Tensor::zeros(&[2, 3], DType::F32), None).unwrap();
        assert!(lin.forward(&[1.0; 4]).is_err(), "4 values are not rows of 3");
    }
}
