//! fla-kernels: the CUDA C++ kernels of fla-rs, compiled ahead of time.
//!
//! The sources live in `cuda/` (one `.cu` per module, shared device code in `cuda/common/`).
//! When the build finds an `nvcc` — `$FLA_NVCC`, or `<repo>/.cuda/nvidia/cu13/bin/nvcc` put
//! there by `scripts/install-nvcc.sh` — every `.cu` becomes an sm_90a (Hopper) cubin embedded
//! in the binary. Without one the crate still builds, [`CUBINS`] is empty and [`cubin`] says
//! why. Kernels are launched only from `fla-ops`' `cuda` modules.
//!
//! ```
//! match fla_kernels::cubin("recurrent") {
//!     Ok(image) => assert!(!image.is_empty()),
//!     Err(why) => assert!(why.contains("install-nvcc")),
//! }
//! ```
#![deny(missing_docs)]

include!(concat!(env!("OUT_DIR"), "/cubins.rs"));

/// What to do when a kernel is missing because the build had no nvcc.
pub const NOT_COMPILED: &str = "kernels not compiled into this build: run scripts/install-nvcc.sh and rebuild";

/// Whether this build embeds compiled kernels.
pub fn compiled() -> bool {
    !CUBINS.is_empty()
}

/// The cubin of module `name` (a path under `cuda/` without `.cu`, e.g. `"recurrent"`), or why
/// there is none.
pub fn cubin(name: &str) -> Result<&'static [u8], String> {
    if !compiled() {
        return Err(NOT_COMPILED.to_string());
    }
    CUBINS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b).ok_or_else(|| {
        format!("no module `{name}` in this build (modules: {:?})", CUBINS.iter().map(|c| c.0).collect::<Vec<_>>())
    })
}
