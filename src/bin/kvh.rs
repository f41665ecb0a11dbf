//! `kvh`: the kvhygiene command line. Each verb's logic lives in the library; this file only
//! parses arguments and maps results to exit codes (0 ok, 1 check failed, 2 usage or I/O).

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use kvhygiene::backend;
use kvhygiene::config::{BackendChoice, Config};
use kvhygiene::demo::{self, DemoOptions};

#[derive(Parser)]
#[command(
    name = "kvh",
    version,
    about = "Verified zeroization of freed GPU memory for multi-tenant LLM inference",
    long_about = "kvhygiene makes sure memory one inference request freed is zeroed and verified \
                  before any other request can get it, and keeps tamper-evident evidence of it.\n\n\
                  Configuration comes from KVH_* environment variables or the TOML file named by \
                  KVH_CONFIG; every key is listed in the README."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate tenants running requests through the allocator and show that no byte leaks.
    ///
    /// Each tenant runs requests whose KV cache grows during decode and is freed at request
    /// end. Every new allocation is read back: any non-zero byte would be a leak. Exit status
    /// 0 when no allocation had residue (and, with --inject-fault, the fault was caught).
    Demo(DemoArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Number of tenants (one thread each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    tenants: u32,
    /// Requests each tenant runs.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    requests: u32,
    /// Tokens decoded per request (a KV block every 16 tokens).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=65_536))]
    decode_tokens: u32,
    /// Sabotage one scrub on purpose and show verification catch and quarantine it
    /// (host backend only).
    #[arg(long)]
    inject_fault: bool,
    /// Memory backend; overrides KVH_BACKEND. `auto` uses CUDA when a driver is installed.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Print the full report as JSON on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Auto,
    Host,
    Cuda,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => run_demo(args),
    }
}

fn run_demo(args: DemoArgs) -> ExitCode {
    let mut config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return usage_error(&format!("configuration: {e}")),
    };
    if let Some(b) = args.backend {
        config.backend = match b {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Host => BackendChoice::Host,
            BackendArg::Cuda => BackendChoice::Cuda,
        };
    }
    if args.inject_fault && config.backend == BackendChoice::Auto {
        // The drill sabotages a scrub: only ever on host memory.
        config.backend = BackendChoice::Host;
    }
    let backend = match backend::select(config.backend) {
        Ok(b) => b,
        Err(e) => return usage_error(&format!("backend: {e}")),
    };
    let opts = DemoOptions {
        tenants: args.tenants,
        requests_per_tenant: args.requests,
        decode_tokens: args.decode_tokens,
        inject_fault: args.inject_fault,
        ..DemoOptions::default()
    };
    if !args.json {
        println!(
            "kvhygiene demo: {} tenants x {} requests on the {} backend",
            opts.tenants,
            opts.requests_per_tenant,
            backend.kind()
        );
    }
    let progress = demo::stderr_progress();
    let report = match demo::run(backend, config, None, &opts, &progress) {
        Ok(r) => r,
        Err(e) => return usage_error(&e.to_string()),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", demo::render(&report));
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("kvh: {msg}");
    ExitCode::from(2)
}
