//! One module per subcommand: `Args` and `run(args) -> anyhow::Result<exit code>`.
pub mod bench;
mod bench_cuda;
mod bench_model;
pub mod generate;
pub mod logits;
pub mod verify;
