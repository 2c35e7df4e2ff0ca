//! `fla`: the command-line front of fla-rs.
use clap::{Parser, Subcommand};

mod commands;

/// Linear-attention kernels and models in Rust.
#[derive(Parser)]
#[command(name = "fla", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a checkpoint (Qwen3.5, Qwen3-Next, Kimi Linear).
    Generate(commands::generate::Args),
    /// Write the logits of `input_ids` from one forward pass.
    Logits(commands::logits::Args),
    /// Check every form of the ops against kernel fixtures (float64 references).
    Verify(commands::verify::Args),
    /// Measure op throughput next to the machine's GEMM and memory-copy ceilings.
    Bench(commands::bench::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Verify(a) => commands::verify::run(a),
        Command::Bench(a) => commands::bench::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
