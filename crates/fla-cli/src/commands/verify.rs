//! `fla verify FIXTURE.safetensors...`
use std::path::PathBuf;

use fla_ops::verify::verify_fixture;

/// Arguments of `fla verify`.
#[derive(clap::Args)]
pub struct Args {
    /// Kernel fixtures (`op` in their metadata names the family).
    #[arg(required = true)]
    fixtures: Vec<PathBuf>,
}

/// Prints one JSON line per form and fixture, then `N passed, M failed`; exit status 1 on any failure.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let (mut passed, mut failed) = (0usize, 0usize);
    for path in &args.fixtures {
        match verify_fixture(path) {
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
