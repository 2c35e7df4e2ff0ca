//! The one error type of fla-rs libraries.

/// Errors returned by fla-rs library calls. Variants name the operation (`op`) and the argument
/// (`arg`) at fault, so that a message alone says what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // === Shape errors ===
    /// An argument has the wrong shape.
    #[error("{op}: argument `{arg}` has shape {got:?}, expected {expected}")]
    Shape {
        /// Operation that checked the argument.
        op: &'static str,
        /// Argument name, as in the op's signature.
        arg: &'static str,
        /// What was expected, in words or as a shape.
        expected: String,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// Two sizes that must agree do not (for example `HV` not a multiple of `H`).
    #[error("{op}: {msg}")]
    Size {
        /// Operation that checked the sizes.
        op: &'static str,
        /// What disagrees, with the values.
        msg: String,
    },

    // === DType and device errors ===
    /// An argument has a dtype the operation does not take.
    #[error("{op}: argument `{arg}` has dtype {got}, expected {expected}")]
    DType {
        /// Operation that checked the argument.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// Accepted dtypes, in words.
        expected: String,
        /// The dtype given.
        got: crate::DType,
    },
    /// Arguments live on devices the operation cannot combine.
    #[error("{op}: argument `{arg}` is on {got}, expected {expected}")]
    Device {
        /// Operation that checked the argument.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// Expected device.
        expected: String,
        /// Device given.
        got: String,
    },

    // === Variable-length batches ===
    /// `cu_seqlens` is malformed.
    #[error("{op}: cu_seqlens {msg}")]
    CuSeqlens {
        /// Operation that checked it.
        op: &'static str,
        /// What is wrong, with the offending values.
        msg: String,
    },

    // === CUDA ===
    /// A CUDA driver call failed, or no usable CUDA device is present.
    #[error("cuda: {0}")]
    Cuda(String),
    /// A GPU kernel is missing from this build (compiled without `nvcc`) or from its module.
    #[error("CUDA kernel `{kernel}` unavailable: {msg}")]
    NoCudaKernel {
        /// Kernel (or module) name.
        kernel: String,
        /// Why it is unavailable and what to do.
        msg: String,
    },

    // === Everything else ===
    /// An argument that does not fit the others for a reason other than its shape, dtype or
    /// device (for example a saved forward context passed with other inputs).
    #[error("{op}: argument `{arg}`: {msg}")]
    Argument {
        /// Operation.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A valid request the operation does not support (yet).
    #[error("{op}: unsupported: {msg}")]
    Unsupported {
        /// Operation.
        op: &'static str,
        /// What is unsupported.
        msg: String,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// Full tensor name.
        name: String,
        /// Shape the model expects.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
    },
    /// A configuration field is missing, malformed or unsupported.
    #[error("config field `{field}`: {msg}")]
    Config {
        /// Field name as in config.json.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor name is missing from a file or map.
    #[error("tensor `{name}` not found{context}")]
    MissingTensor {
        /// The name looked up.
        name: String,
        /// Where it was looked up (may be empty).
        context: String,
    },
    /// Malformed metadata or configuration.
    #[error("{0}")]
    Msg(String),
    /// I/O error, with the path involved.
    #[error("{path}: {error}")]
    Io {
        /// File involved.
        path: String,
        /// Underlying error.
        error: std::io::Error,
    },
    /// safetensors parse or write error.
    #[error("safetensors: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Shape`].
    pub fn shape(op: &'static str, arg: &'static str, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape { op, arg, expected: expected.into(), got: got.to_vec() }
    }
    /// Shorthand for [`Error::Size`].
    pub fn size(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Size { op, msg: msg.into() }
    }
}
