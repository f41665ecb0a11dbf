//! `kvh`: the kvhygiene command line. A thin dispatcher: every verb's logic is in the library.

use clap::{Parser, Subcommand};
use kvhygiene::forensic::cli::{self as forensic_cli, KeygenArgs, VerifyLogArgs};

#[derive(Parser)]
#[command(
    name = "kvh",
    version,
    about = "kvhygiene: verified zeroization of freed GPU memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify every forensic log chain in a directory (exit 0 ok, 1 tampered, 2 error).
    VerifyLog(VerifyLogArgs),
    /// Create an Ed25519 key pair for signed forensic-log checkpoints.
    Keygen(KeygenArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::VerifyLog(a) => forensic_cli::run_verify_log(a),
        Command::Keygen(a) => forensic_cli::run_keygen(a),
    };
    std::process::exit(code);
}
