//! `fla verify FIXTURE.safetensors...`
use std::path::PathBuf;

use fla_ops::verify::verify_fixture_on;

use super::generate::Device;

/// Arguments of `fla verify`.
#[derive(clap::Args)]
pub struct Args {
    /// Kernel fixtures (`op` in their metadata names the family).
    #[arg(required = true)]
    fixtures: Vec<PathBuf>,
    /// `cuda`: also run the forms that have GPU kernels (the recurrent step; the chunk forward of
    /// Gated DeltaNet) on the first GPU.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

/// Prints one JSON line per form and fixture, then `N passed, M failed`; exit status 1 on any failure.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let cuda = matches!(args.device, Device::Cuda);
    if cuda && !fla_core::cuda::is_available() {
        anyhow::bail!("--device cuda: no CUDA driver or GPU found");
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for path in &args.fixtures {
        match verify_fixture_on(path, cuda) {
            Ok(reports) => {
                for r in reports {
                    println!("{}", r.to_json());
                    if r.passed() {
                        passed += 1;
                    } else {
                        failed += 1;
                    }
                }
            }
            Err(e) => {
                println!(
                    "{}",
                    serde_json::json!({ "fixture": path.display().to_string(), "pass": false, "error": e.to_string() })
                );
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { 0 } else { 1 })
}
