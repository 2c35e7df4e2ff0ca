//! Element types.
use half::{bf16, f16};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE double precision (references and gradient checks).
    F64,
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }
    /// Name as used in safetensors headers and messages (`f32`, `bf16`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that can be a tensor element.
pub trait WithDType: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widen to f64.
    fn to_f64(self) -> f64;
    /// Narrow from f64 (round to nearest).
    fn from_f64(x: f64) -> Self;
    /// Widen to f32.
    fn to_f32(self) -> f32;
    /// Narrow from f32 (round to nearest).
    fn from_f32(x: f32) -> Self;
}

macro_rules! with_dtype {
    ($t:ty, $d:ident, $to64:expr, $from64:expr, $to32:expr, $from32:expr) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$d;
            #[inline]
            fn to_f64(self) -> f64 {
                $to64(self)
            }
            #[inline]
            fn from_f64(x: f64) -> Self {
                $from64(x)
            }
            #[inline]
            fn to_f32(self) -> f32 {
                $to32(self)
            }
            #[inline]
            fn from_f32(x: f32) -> Self {
                $from32(x)
            }
        }
    };
}
with_dtype!(f32, F32, |x: f32| x as f64, |x: f64| x as f32, |x| x, |x| x);
with_dtype!(f64, F64, |x| x, |x| x, |x: f64| x as f32, |x: f32| x as f64);
with_dtype!(bf16, BF16, |x: bf16| x.to_f64(), bf16::from_f64, |x: bf16| x.to_f32(), bf16::from_f32);
with_dtype!(f16, F16, |x: f16| x.to_f64(), f16::from_f64, |x: f16| x.to_f32(), f16::from_f32);
