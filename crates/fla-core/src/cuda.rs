//! The CUDA device: discovery that never panics, one context and stream per device ordinal,
//! cached kernel modules, and [`CudaTensor`], a contiguous tensor in device memory.
//!
//! Everything goes through `cudarc` with run-time loading of `libcuda`, so this module builds
//! and links on a machine without CUDA. [`is_available`] looks for the driver library before
//! touching it (cudarc panics on first use when the library is missing) and answers `false`
//! when there is no library, no driver or no device; every other call returns
//! [`Error::Cuda`] in those cases.
//!
//! All work on a device is ordered on that device's one stream ([`CudaDevice::stream`]); event
//! tracking between streams is turned off, so code that adds streams of its own must order them
//! itself.
//!
//! ```
//! use fla_core::cuda::{self, CudaDevice, CudaTensor};
//! use fla_core::Tensor;
//! if !cuda::is_available() {
//!     return Ok(()); // no GPU here: nothing to show
//! }
//! let dev = CudaDevice::get(0)?;
//! let host = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3])?;
//! let gpu = CudaTensor::from_host(&host, &dev)?;
//! assert_eq!(gpu.to_host()?.to_vec::<f32>()?, vec![1.0, 2.0, 3.0]);
//! # Ok::<(), fla_core::Error>(())
//! ```
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

pub use cudarc;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream};
use half::{bf16, f16};

use crate::{DType, Device, Error, Result, Tensor, TensorMeta};

/// Runs `f`, turning a panic inside cudarc (a missing library or symbol) into [`Error::Cuda`].
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic in the CUDA driver wrapper".into());
        Err(Error::Cuda(format!("{what}: {msg}")))
    })
}

/// Whether the CUDA driver library (`libcuda.so.1`) can be loaded. Never panics.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen the candidate library names.
    *PRESENT.get_or_init(|| catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false))
}

/// Number of CUDA devices the driver reports; 0 without a driver library, driver or device.
/// Never panics.
pub fn device_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        if !driver_present() {
            return 0;
        }
        guarded("device_count", || Ok(CudaContext::device_count()?)).map_or(0, |c| c.max(0) as usize)
    })
}

/// Whether at least one usable CUDA device is present. Never panics; tests use it to skip.
pub fn is_available() -> bool {
    device_count() > 0
}

/// One CUDA device: its primary context, the stream all fla-rs work on it is ordered on, and
/// the kernel modules loaded so far. Get one with [`CudaDevice::get`] (cached per ordinal).
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    sm_count: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(String, String), CudaFunction>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice(cuda:{}, {})", self.ordinal, self.name)
    }
}

/// Lets the device's default memory pool (behind cudarc's stream-ordered allocations) keep
/// freed memory instead of returning it to the driver at every synchronisation (its default
/// release threshold is 0). Otherwise each op call's scratch and output buffers are mapped
/// afresh after every sync, which on an H200 cost as much as the chunk kernels themselves; a
/// caching allocator (as PyTorch's) avoids the same cost.
fn keep_pool_memory(ctx: &CudaContext) -> std::result::Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    ctx.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` is a valid out pointer and `ctx.cu_device()` a device handle of a live
    // context; the attribute's value is a u64 read through the pointer during the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()?;
    }
    Ok(())
}

impl CudaDevice {
    /// The device with this ordinal, created on first use and shared afterwards. Errors (never
    /// panics) when there is no driver, no such device, or the context cannot be created.
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let count = device_count();
        if ordinal >= count {
            return Err(Error::Cuda(if driver_present() {
                format!("no CUDA device cuda:{ordinal} ({count} present)")
            } else {
                "no CUDA device: the driver library libcuda.so.1 was not found".into()
            }));
        }
        let mut map = DEVICES.get_or_init(Default::default).lock().map_err(|_| Error::Cuda("poisoned".into()))?;
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let dev = guarded("CudaDevice::get", || {
            let ctx = CudaContext::new(ordinal)?;
            // SAFETY: fla-rs orders all work on a device on its one stream, created just below,
            // so no cross-stream event tracking is needed; every slice is created afterwards.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream()?;
            keep_pool_memory(&ctx)?;
            let name = ctx.name()?;
            let sm =
                ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            Ok(Arc::new(CudaDevice {
                ordinal,
                name,
                sm_count: sm.max(1) as usize,
                ctx,
                stream,
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
            }))
        })?;
        map.insert(ordinal, dev.clone());
        Ok(dev)
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The [`Device`] value of this device.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }
    /// Marketing name of the card (`NVIDIA H200`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Number of streaming multiprocessors (132 on an H100 / H200 SXM).
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }
    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream every fla-rs operation on this device is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Blocks until all work queued on the stream has finished; reports asynchronous errors.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
    /// Records a timing event on the stream (pair two with [`CudaEvent::elapsed_ms`]).
    pub fn record_event(&self) -> Result<CudaEvent> {
        let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        Ok(self.stream.record_event(Some(flags))?)
    }

    /// Captures the work `f` enqueues on the stream into a [`CudaGraph`] instead of running it
    /// (nothing runs until [`CudaGraph::launch`]; host code in `f` does run, once). The work
    /// must not wait on the host (no copies to the host, no synchronisation); memory it
    /// allocates and frees comes from the stream-ordered pool and becomes part of the graph, so
    /// what it allocates must be freed within `f`. The capture ends even when `f` fails, and
    /// then its error is returned.
    pub fn capture<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(CudaGraph, T)> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let out = f();
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        let out = out?;
        let graph = graph?.ok_or_else(|| Error::Cuda("stream capture gave no graph".into()))?;
        Ok((graph, out))
    }

    /// Loads the module `name` from a cubin (or PTX) `image` once and keeps it.
    pub fn module(&self, name: &str, image: &[u8]) -> Result<Arc<CudaModule>> {
        let mut map = self.modules.lock().map_err(|_| Error::Cuda("poisoned".into()))?;
        if let Some(m) = map.get(name) {
            return Ok(m.clone());
        }
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
            .map_err(|e| Error::Cuda(format!("loading module `{name}`: {e}")))?;
        map.insert(name.to_string(), m.clone());
        Ok(m)
    }

    /// The kernel `function` of module `module` (loaded from `image` on first use), cached.
    pub fn function(&self, module: &str, image: &[u8], function: &str) -> Result<CudaFunction> {
        let key = (module.to_string(), function.to_string());
        if let Some(f) = self.functions.lock().map_err(|_| Error::Cuda("poisoned".into()))?.get(&key) {
            return Ok(f.clone());
        }
        let f = self.module(module, image)?.load_function(function).map_err(|e| Error::NoCudaKernel {
            kernel: format!("{module}::{function}"),
            msg: format!("not in the module ({e})"),
        })?;
        self.functions.lock().map_err(|_| Error::Cuda("poisoned".into()))?.insert(key, f.clone());
        Ok(f)
    }
}

/// A device buffer of one dtype (the float types the GPU kernels take).
#[derive(Debug)]
pub enum CudaStorage {
    /// f32 elements.
    F32(CudaSlice<f32>),
    /// bf16 elements.
    BF16(CudaSlice<bf16>),
    /// f16 elements.
    F16(CudaSlice<f16>),
}

/// A contiguous row-major tensor in the memory of one CUDA device.
///
/// A separate type rather than a [`Tensor`] storage variant: the CPU tensor's views, maps and
/// copy-on-write slices are all host code, and the GPU ops need only contiguous buffers and
/// raw pointers. Move data across with [`CudaTensor::from_host`] and [`CudaTensor::to_host`].
#[derive(Debug)]
pub struct CudaTensor {
    storage: CudaStorage,
    shape: Vec<usize>,
    dev: Arc<CudaDevice>,
}

impl CudaTensor {
    /// Copies a host tensor (f32, bf16 or f16; any strides) to `dev`.
    pub fn from_host(t: &Tensor, dev: &Arc<CudaDevice>) -> Result<Self> {
        let s = dev.stream();
        let storage = match t.dtype() {
            DType::F32 => CudaStorage::F32(s.clone_htod(&t.to_vec::<f32>()?)?),
            DType::BF16 => CudaStorage::BF16(s.clone_htod(&t.to_vec::<bf16>()?)?),
            DType::F16 => CudaStorage::F16(s.clone_htod(&t.to_vec::<f16>()?)?),
            dt => {
                return Err(Error::DType {
                    op: "CudaTensor::from_host",
                    arg: "t",
                    expected: "f32, bf16 or f16".into(),
                    got: dt,
                })
            }
        };
        Ok(CudaTensor { storage, shape: t.shape().to_vec(), dev: dev.clone() })
    }

    /// A tensor of zeros on `dev` (f32, bf16 or f16).
    pub fn zeros(shape: &[usize], dtype: DType, dev: &Arc<CudaDevice>) -> Result<Self> {
        let (s, n) = (dev.stream(), shape.iter().product::<usize>());
        let storage = match dtype {
            DType::F32 => CudaStorage::F32(s.alloc_zeros(n)?),
            DType::BF16 => CudaStorage::BF16(s.alloc_zeros(n)?),
            DType::F16 => CudaStorage::F16(s.alloc_zeros(n)?),
            dt => {
                return Err(Error::DType {
                    op: "CudaTensor::zeros",
                    arg: "dtype",
                    expected: "f32, bf16 or f16".into(),
                    got: dt,
                })
            }
        };
        Ok(CudaTensor { storage, shape: shape.to_vec(), dev: dev.clone() })
    }

    /// A tensor on `dev` whose elements are not initialised (no memset), for kernel outputs.
    ///
    /// # Safety
    /// The contents are undefined until written: the caller must write every element (through
    /// a kernel on the device's stream) before anything reads it.
    pub unsafe fn uninit(shape: &[usize], dtype: DType, dev: &Arc<CudaDevice>) -> Result<Self> {
        let (s, n) = (dev.stream(), shape.iter().product::<usize>());
        // SAFETY: forwarded to the caller (see above).
        let storage = unsafe {
            match dtype {
                DType::F32 => CudaStorage::F32(s.alloc(n)?),
                DType::BF16 => CudaStorage::BF16(s.alloc(n)?),
                DType::F16 => CudaStorage::F16(s.alloc(n)?),
                dt => {
                    return Err(Error::DType {
                        op: "CudaTensor::uninit",
                        arg: "dtype",
                        expected: "f32, bf16 or f16".into(),
                        got: dt,
                    })
                }
            }
        };
        Ok(CudaTensor { storage, shape: shape.to_vec(), dev: dev.clone() })
    }

    /// Copies the elements back into a host tensor (waits for the stream).
    pub fn to_host(&self) -> Result<Tensor> {
        let s = self.dev.stream();
        match &self.storage {
            CudaStorage::F32(b) => Tensor::from_vec(s.clone_dtoh(b)?, &self.shape),
            CudaStorage::BF16(b) => Tensor::from_vec(s.clone_dtoh(b)?, &self.shape),
            CudaStorage::F16(b) => Tensor::from_vec(s.clone_dtoh(b)?, &self.shape),
        }
    }

    /// Overwrites this tensor with the elements of `src` (same shape and dtype), device to device.
    pub fn copy_from(&mut self, src: &CudaTensor) -> Result<()> {
        const OP: &str = "CudaTensor::copy_from";
        if src.shape != self.shape {
            return Err(Error::shape(OP, "src", format!("{:?}", self.shape), &src.shape));
        }
        if src.dev.ordinal != self.dev.ordinal {
            return Err(Error::Device {
                op: OP,
                arg: "src",
                expected: self.dev.device().to_string(),
                got: src.dev.device().to_string(),
            });
        }
        let s = self.dev.stream().clone();
        match (&mut self.storage, &src.storage) {
            (CudaStorage::F32(d), CudaStorage::F32(x)) => s.memcpy_dtod(x, d)?,
            (CudaStorage::BF16(d), CudaStorage::BF16(x)) => s.memcpy_dtod(x, d)?,
            (CudaStorage::F16(d), CudaStorage::F16(x)) => s.memcpy_dtod(x, d)?,
            _ => return Err(Error::DType { op: OP, arg: "src", expected: self.dtype().to_string(), got: src.dtype() }),
        }
        Ok(())
    }

    /// The same elements under a new shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return Err(Error::shape("CudaTensor::reshape", "shape", format!("{} elements", self.elem_count()), shape));
        }
        Ok(CudaTensor { shape: shape.to_vec(), ..self })
    }

    /// The device buffer.
    pub fn storage(&self) -> &CudaStorage {
        &self.storage
    }
    /// The device buffer, for kernels that write it.
    pub fn storage_mut(&mut self) -> &mut CudaStorage {
        &mut self.storage
    }
    /// The device this tensor lives on.
    pub fn cuda_device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    /// The buffer's device address, for a kernel argument that reads it. cudarc's cross-stream
    /// event tracking is off (all work of a device is ordered on its one stream), so the guard
    /// cudarc returns has nothing to record and is dropped at once.
    pub fn raw_addr(&self) -> u64 {
        use cudarc::driver::DevicePtr;
        let s = self.dev.stream();
        match &self.storage {
            CudaStorage::F32(b) => b.device_ptr(s).0,
            CudaStorage::BF16(b) => b.device_ptr(s).0,
            CudaStorage::F16(b) => b.device_ptr(s).0,
        }
    }
    /// The buffer's device address, for a kernel argument that writes it.
    pub fn raw_addr_mut(&mut self) -> u64 {
        use cudarc::driver::DevicePtrMut;
        let s = self.dev.stream().clone();
        match &mut self.storage {
            CudaStorage::F32(b) => b.device_ptr_mut(&s).0,
            CudaStorage::BF16(b) => b.device_ptr_mut(&s).0,
            CudaStorage::F16(b) => b.device_ptr_mut(&s).0,
        }
    }
    /// Sizes of the dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self.storage {
            CudaStorage::F32(_) => DType::F32,
            CudaStorage::BF16(_) => DType::BF16,
            CudaStorage::F16(_) => DType::F16,
        }
    }
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    /// `Device::Cuda(ordinal)`.
    pub fn device(&self) -> Device {
        self.dev.device()
    }
}

impl TensorMeta for CudaTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> DType {
        CudaTensor::dtype(self)
    }
    fn device(&self) -> Device {
        CudaTensor::device(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_never_panics() {
        // On a machine without CUDA this is false and `get` is an error, not a panic.
        let n = device_count();
        assert_eq!(is_available(), n > 0);
        if n == 0 {
            let e = CudaDevice::get(0).unwrap_err();
            assert!(matches!(e, Error::Cuda(_)), "{e}");
            eprintln!("skipped: no CUDA device ({e})");
            return;
        }
        let dev = CudaDevice::get(0).unwrap();
        assert!(Arc::ptr_eq(&dev, &CudaDevice::get(0).unwrap()), "cached per ordinal");
        assert!(CudaDevice::get(n).is_err());
        let h = Tensor::from_vec((0..10).map(|x| x as f32 * 0.5).collect::<Vec<f32>>(), &[2, 5]).unwrap();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let t = CudaTensor::from_host(&h.to_dtype(dt).unwrap(), &dev).unwrap();
            assert_eq!((t.dtype(), t.shape()), (dt, &[2usize, 5][..]));
            let mut z = CudaTensor::zeros(&[2, 5], dt, &dev).unwrap();
            z.copy_from(&t).unwrap();
            assert_eq!(z.to_host().unwrap().to_vec::<f32>().unwrap(), h.to_vec::<f32>().unwrap());
        }
        assert!(CudaTensor::from_host(&h.to_dtype(DType::F64).unwrap(), &dev).is_err());
    }
}
