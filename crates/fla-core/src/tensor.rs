//! The strided CPU tensor.
use std::sync::Arc;

use half::{bf16, f16};

use crate::{cpu, DType, Error, Float, Result, WithDType};

/// Where a tensor's memory lives: host memory ([`Tensor`]) or a CUDA device by ordinal
/// ([`CudaTensor`](crate::cuda::CudaTensor)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// Memory of the CUDA device with this ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// What every tensor type says about itself — shape, dtype and device — so that argument checks
/// are written once for host ([`Tensor`]) and device
/// ([`CudaTensor`](crate::cuda::CudaTensor)) tensors.
pub trait TensorMeta {
    /// Sizes of the dimensions.
    fn shape(&self) -> &[usize];
    /// Element type.
    fn dtype(&self) -> DType;
    /// Where the elements live.
    fn device(&self) -> Device;
    /// Number of dimensions.
    fn rank(&self) -> usize {
        self.shape().len()
    }
    /// Number of elements.
    fn elem_count(&self) -> usize {
        self.shape().iter().product()
    }
}

impl TensorMeta for Tensor {
    fn shape(&self) -> &[usize] {
        Tensor::shape(self)
    }
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }
    fn device(&self) -> Device {
        Tensor::device(self)
    }
}

#[derive(Debug)]
/// Owned element buffer of one dtype.
pub enum Storage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// Element types a [`Tensor`] can be built from and read into (f32, f64, bf16, f16).
pub trait Element: WithDType + private::Sealed {}

mod private {
    /// Storage access, hidden from users so that only the four element types implement it.
    pub trait Sealed: Sized {
        fn slice_of(s: &super::Storage) -> Option<&[Self]>;
        fn wrap_vec(v: Vec<Self>) -> super::Storage;
        fn slice_of_mut(s: &mut super::Storage) -> Option<&mut [Self]>;
    }
}

macro_rules! element {
    ($t:ty, $v:ident) => {
        impl private::Sealed for $t {
            fn slice_of(s: &Storage) -> Option<&[Self]> {
                match s {
                    Storage::$v(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap_vec(v: Vec<Self>) -> Storage {
                Storage::$v(v)
            }
            fn slice_of_mut(s: &mut Storage) -> Option<&mut [Self]> {
                match s {
                    Storage::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
        impl Element for $t {}
    };
}
element!(f32, F32);
element!(f64, F64);
element!(bf16, BF16);
element!(f16, F16);

/// An n-dimensional array: shape, strides (in elements) and an offset over shared, immutable
/// storage. Views (`transpose`, `narrow`) share storage; operations return new tensors.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor[{:?}, {}]", self.shape, self.dtype())
    }
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl Tensor {
    /// A contiguous tensor owning `data`, laid out row-major in `shape`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape("from_vec", "data", format!("{n} elements"), &[data.len()]));
        }
        Ok(Self::from_storage(<T as private::Sealed>::wrap_vec(data), shape))
    }

    fn from_storage(storage: Storage, shape: &[usize]) -> Self {
        Tensor { storage: Arc::new(storage), strides: contiguous_strides(shape), shape: shape.to_vec(), offset: 0 }
    }

    /// A contiguous tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        let n = shape.iter().product();
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::F64 => Storage::F64(vec![0.0; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
        };
        Self::from_storage(storage, shape)
    }

    /// Sizes of the dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Strides of the dimensions, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
        }
    }
    /// Device of the storage.
    pub fn device(&self) -> Device {
        Device::Cpu
    }
    /// Whether the elements are laid out row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// The elements as a slice, when the tensor is contiguous and of element type `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        let data = <T as private::Sealed>::slice_of(&self.storage).ok_or_else(|| Error::DType {
            op: "as_slice",
            arg: "self",
            expected: T::DTYPE.to_string(),
            got: self.dtype(),
        })?;
        if !self.is_contiguous() {
            return Err(Error::Unsupported { op: "as_slice", msg: "tensor is not contiguous".into() });
        }
        Ok(&data[self.offset..self.offset + self.elem_count()])
    }

    /// The elements as a mutable slice, when the tensor is contiguous and of element type `T`.
    /// Storage shared with other tensors is copied first (copy on write), so views elsewhere
    /// never see the change.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DType {
                op: "as_mut_slice",
                arg: "self",
                expected: T::DTYPE.to_string(),
                got: self.dtype(),
            });
        }
        if !self.is_contiguous() || self.offset != 0 || Arc::strong_count(&self.storage) > 1 {
            *self = Tensor::from_vec(self.to_vec::<T>()?, &self.shape)?;
        }
        let storage = Arc::get_mut(&mut self.storage).expect("unique after copy");
        let n = self.shape.iter().product::<usize>();
        Ok(&mut <T as private::Sealed>::slice_of_mut(storage).expect("dtype checked")[..n])
    }

    /// Row-major copy of the elements converted to `T` (any dtype to any dtype).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        fn gather<S: WithDType, T: WithDType>(t: &Tensor, data: &[S]) -> Vec<T> {
            let mut out = Vec::with_capacity(t.elem_count());
            if t.is_contiguous() {
                let s = &data[t.offset..t.offset + t.elem_count()];
                if S::DTYPE == T::DTYPE {
                    // SAFETY: S and T are the same type when their DTYPEs agree.
                    out.extend_from_slice(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const T, s.len()) });
                } else if T::DTYPE == DType::F64 || S::DTYPE == DType::F64 {
                    out.extend(s.iter().map(|&x| T::from_f64(x.to_f64())));
                } else {
                    out.extend(s.iter().map(|&x| T::from_f32(x.to_f32())));
                }
                return out;
            }
            let mut idx = vec![0usize; t.rank()];
            for _ in 0..t.elem_count() {
                let pos = t.offset + idx.iter().zip(&t.strides).map(|(i, s)| i * s).sum::<usize>();
                out.push(T::from_f64(data[pos].to_f64()));
                for d in (0..t.rank()).rev() {
                    idx[d] += 1;
                    if idx[d] < t.shape[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            out
        }
        Ok(match &*self.storage {
            Storage::F32(v) => gather(self, v),
            Storage::F64(v) => gather(self, v),
            Storage::BF16(v) => gather(self, v),
            Storage::F16(v) => gather(self, v),
        })
    }

    /// A contiguous copy in `dtype` (a cheap clone when nothing changes).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() && self.is_contiguous() {
            return Ok(self.clone());
        }
        let storage = match dtype {
            DType::F32 => Storage::F32(self.to_vec()?),
            DType::F64 => Storage::F64(self.to_vec()?),
            DType::BF16 => Storage::BF16(self.to_vec()?),
            DType::F16 => Storage::F16(self.to_vec()?),
        };
        Ok(Self::from_storage(storage, &self.shape))
    }

    /// A contiguous tensor with the same elements (a cheap clone if already contiguous).
    pub fn contiguous(&self) -> Result<Self> {
        self.to_dtype(self.dtype())
    }

    /// The same elements in a new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return Err(Error::shape("reshape", "shape", format!("{} elements", self.elem_count()), shape));
        }
        let mut t = self.contiguous()?;
        t.strides = contiguous_strides(shape);
        t.shape = shape.to_vec();
        Ok(t)
    }

    /// A view with dimensions `a` and `b` swapped.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Self> {
        if a >= self.rank() || b >= self.rank() {
            return Err(Error::shape("transpose", "dims", format!("dims below rank {}", self.rank()), &[a, b]));
        }
        let mut t = self.clone();
        t.shape.swap(a, b);
        t.strides.swap(a, b);
        Ok(t)
    }

    /// A view of `len` entries of dimension `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        if dim >= self.rank() || start + len > self.shape[dim] {
            return Err(Error::shape(
                "narrow",
                "self",
                format!("dim {dim} with at least {} entries", start + len),
                &self.shape,
            ));
        }
        let mut t = self.clone();
        t.offset += start * t.strides[dim];
        t.shape[dim] = len;
        Ok(t)
    }

    /// Elementwise `f(x)` computed in f64 and stored in this tensor's dtype.
    pub fn map(&self, f: impl Fn(f64) -> f64 + Sync) -> Result<Self> {
        let v: Vec<f64> = self.to_vec()?;
        let out: Vec<f64> = cpu::par_map(&v, f);
        Tensor::from_vec(out, &self.shape)?.to_dtype(self.dtype())
    }

    /// Elementwise `f(a, b)` of two tensors of the same shape, computed in f64, in `self`'s dtype.
    pub fn zip_map(&self, other: &Tensor, f: impl Fn(f64, f64) -> f64 + Sync) -> Result<Self> {
        if other.shape != self.shape {
            return Err(Error::shape("zip_map", "other", format!("{:?}", self.shape), &other.shape));
        }
        let (a, b): (Vec<f64>, Vec<f64>) = (self.to_vec()?, other.to_vec()?);
        let out: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| f(x, y)).collect();
        Tensor::from_vec(out, &self.shape)?.to_dtype(self.dtype())
    }

    /// Sum of all elements, accumulated in f64.
    pub fn sum_all(&self) -> Result<f64> {
        Ok(self.to_vec::<f64>()?.iter().sum())
    }

    /// Euclidean norm of all elements, accumulated in f64.
    pub fn norm(&self) -> Result<f64> {
        Ok(self.to_vec::<f64>()?.iter().map(|x| x * x).sum::<f64>().sqrt())
    }

    /// `‖self − reference‖ / ‖reference‖` in f64 (`‖self − reference‖` when the reference is 0).
    /// NaN anywhere gives NaN, so a comparison `err <= tol` fails on it.
    pub fn rel_err(&self, reference: &Tensor) -> Result<f64> {
        if reference.shape != self.shape {
            return Err(Error::shape("rel_err", "reference", format!("{:?}", self.shape), &reference.shape));
        }
        let (a, b): (Vec<f64>, Vec<f64>) = (self.to_vec()?, reference.to_vec()?);
        Ok(cpu::rel_err(&a, &b))
    }

    /// Matrix product of the last two dimensions, batched over the leading ones (which must
    /// agree). f32 and f64 compute natively; bf16 and f16 compute in f32 and round back.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Self> {
        let (ra, rb) = (self.rank(), rhs.rank());
        if ra < 2 || ra != rb || self.shape[..ra - 2] != rhs.shape[..rb - 2] || self.shape[ra - 1] != rhs.shape[rb - 2]
        {
            return Err(Error::shape(
                "matmul",
                "rhs",
                format!("[.., {}, n] matching {:?}", self.shape[ra.max(1) - 1], self.shape),
                &rhs.shape,
            ));
        }
        if rhs.dtype() != self.dtype() {
            return Err(Error::DType {
                op: "matmul",
                arg: "rhs",
                expected: self.dtype().to_string(),
                got: rhs.dtype(),
            });
        }
        let (m, k, n) = (self.shape[ra - 2], self.shape[ra - 1], rhs.shape[rb - 1]);
        let batch: usize = self.shape[..ra - 2].iter().product();
        let mut shape = self.shape.clone();
        shape[ra - 1] = n;
        fn run<T: Float + Element>(
            a: &Tensor,
            b: &Tensor,
            batch: usize,
            m: usize,
            k: usize,
            n: usize,
            shape: &[usize],
        ) -> Result<Tensor> {
            let (a, b): (Vec<T>, Vec<T>) = (a.to_vec()?, b.to_vec()?);
            let mut c = vec![T::zero(); batch * m * n];
            cpu::par_chunks_mut(&mut c, m * n, |i, c| {
                let a = cpu::MatRef::new(&a[i * m * k..], m, k, k, 1);
                let b = cpu::MatRef::new(&b[i * k * n..], k, n, n, 1);
                cpu::gemm(T::one(), a, b, T::zero(), cpu::MatMut::new(c, m, n, n, 1));
            });
            Tensor::from_vec(c, shape)
        }
        match self.dtype() {
            DType::F64 => run::<f64>(self, rhs, batch, m, k, n, &shape),
            dt => run::<f32>(self, rhs, batch, m, k, n, &shape)?.to_dtype(dt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_and_conversions() {
        let t = Tensor::from_vec((0..6).map(|x| x as f32).collect(), &[2, 3]).unwrap();
        let tt = t.transpose(0, 1).unwrap();
        assert!(!tt.is_contiguous());
        assert_eq!(tt.to_vec::<f32>().unwrap(), vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(t.narrow(1, 1, 2).unwrap().to_vec::<f64>().unwrap(), vec![1., 2., 4., 5.]);
        let h = t.to_dtype(DType::F16).unwrap();
        assert_eq!(h.to_vec::<f32>().unwrap(), t.to_vec::<f32>().unwrap());
        assert!(Tensor::from_vec(vec![1.0f32; 5], &[2, 3]).is_err());
        assert!(t.as_slice::<f64>().is_err());
        assert!(t.narrow(1, 2, 2).is_err());
        let mut m = t.clone();
        m.as_mut_slice::<f32>().unwrap()[0] = 9.0;
        assert_eq!(t.to_vec::<f32>().unwrap()[0], 0.0, "copy on write keeps the original");
        assert_eq!(m.to_vec::<f32>().unwrap()[0], 9.0);
    }

    #[test]
    fn batched_matmul_matches_definition() {
        let a: Vec<f64> = (0..2 * 3 * 4).map(|x| (x as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..2 * 4 * 5).map(|x| (x as f64 * 0.91).cos()).collect();
        let c = Tensor::from_vec(a.clone(), &[2, 3, 4])
            .unwrap()
            .matmul(&Tensor::from_vec(b.clone(), &[2, 4, 5]).unwrap())
            .unwrap();
        let c = c.to_vec::<f64>().unwrap();
        for bt in 0..2 {
            for i in 0..3 {
                for j in 0..5 {
                    let r: f64 = (0..4).map(|l| a[bt * 12 + i * 4 + l] * b[bt * 20 + l * 5 + j]).sum();
                    assert!((c[bt * 15 + i * 5 + j] - r).abs() < 1e-12);
                }
            }
        }
        let e = Tensor::from_vec(vec![0f32; 6], &[2, 3]).unwrap();
        assert!(e.matmul(&e).is_err());
    }
}
