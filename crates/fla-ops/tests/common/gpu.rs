//! The GPU side of the test helpers: finding the device, and [`Data`] uploaded to it.
use std::sync::Arc;

use fla_core::cuda::{self, CudaDevice, CudaTensor};
use fla_core::Tensor;
use fla_ops::Inputs;

use super::{Data, Gate, Spec};
use fla_ops::Family;

/// The first GPU, or `None` (after saying so) where there is none or no kernels were built.
pub fn gpu(test: &str) -> Option<Arc<CudaDevice>> {
    if !cuda::is_available() {
        eprintln!("{test}: skipped: no CUDA device");
        return None;
    }
    if !fla_kernels::compiled() {
        eprintln!("{test}: skipped: {}", fla_kernels::NOT_COMPILED);
        return None;
    }
    let dev = CudaDevice::get(0).expect("a device is present");
    eprintln!("{test}: on {} ({})", dev.name(), fla_kernels::NVCC_VERSION);
    Some(dev)
}

/// [`Data`] uploaded to the device.
pub struct GpuData {
    pub q: CudaTensor,
    pub k: CudaTensor,
    pub v: CudaTensor,
    pub g: Option<CudaTensor>,
    pub beta: Option<CudaTensor>,
    pub b: Option<CudaTensor>,
    pub w: Option<CudaTensor>,
    pub h0: Option<CudaTensor>,
    pub a_log: Option<CudaTensor>,
    pub dt_bias: Option<CudaTensor>,
    pub cu_seqlens: Option<Vec<usize>>,
}

impl GpuData {
    /// Uploads every tensor of `x`.
    pub fn new(x: &Data, dev: &Arc<CudaDevice>) -> Self {
        let up = |t: &Tensor| CudaTensor::from_host(t, dev).unwrap();
        let upo = |t: &Option<Tensor>| t.as_ref().map(up);
        GpuData {
            q: up(&x.q),
            k: up(&x.k),
            v: up(&x.v),
            g: upo(&x.g),
            beta: upo(&x.beta),
            b: upo(&x.b),
            w: upo(&x.w),
            h0: upo(&x.h0),
            a_log: upo(&x.a_log),
            dt_bias: upo(&x.dt_bias),
            cu_seqlens: x.cu_seqlens.clone(),
        }
    }

    /// The uploaded inputs, with the initial state when `with_h0` (the chunk form) and without
    /// (the recurrent step takes the state apart).
    pub fn inputs(&self, with_h0: bool) -> Inputs<'_, CudaTensor> {
        Inputs {
            g: self.g.as_ref(),
            beta: self.beta.as_ref(),
            b: self.b.as_ref(),
            w: self.w.as_ref(),
            initial_state: if with_h0 { self.h0.as_ref() } else { None },
            a_log: self.a_log.as_ref(),
            dt_bias: self.dt_bias.as_ref(),
            cu_seqlens: self.cu_seqlens.as_deref(),
            ..Inputs::new(&self.q, &self.k, &self.v)
        }
    }
}

/// The case of the value-block tests (forward and backward): several value blocks, a varlen
/// batch with a one-token sequence, grouped value heads, K = V = 128, strong decay.
pub fn value_block_spec(family: Family, seed: u64) -> Spec {
    Spec::new(family, [1, 300, 2, 4, 128, 128]).cu(&[0, 64, 65, 300]).h0(true).l2norm().gate(Gate::Strong).seed(seed)
}
