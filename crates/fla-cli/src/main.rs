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
    /// Check every form of the ops against kernel fixtures (float64 references).
    Verify(commands::verify::Args),
    /// Measure op throughput next to the machine's GEMM and memory-copy ceilings.
    Bench(commands::bench::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
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
