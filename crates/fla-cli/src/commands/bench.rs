//! `fla bench ops [--json]`
/// Arguments of `fla bench`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the benchmarks.
pub fn run(_args: Args) -> anyhow::Result<i32> {
    Ok(0)
}
