//! One module per subcommand: `Args` and `run(args) -> anyhow::Result<exit code>`.
pub mod bench;
pub mod generate;
pub mod logits;
pub mod verify;
