//! Fills a forensic log directory with one keyed chain of quarantine records in one file: a
//! large log on which to measure the tools that read logs (`kvh verify-log`, `kvh evidence`,
//! `kvh prune-log`, and crash recovery when a writer opens a directory). docs/benchmarks.md,
//! "Reading large logs", gives the figures it was used for.
//!
//! ```text
//! cargo run --release --example forensic_fill -- DIR RECORDS KEY_FILE [--crash]
//! ```
//!
//! A record is about 550 bytes: 1,950,000 make one file of about 1.07 GB. The file limit is
//! 1 GiB (the largest `KVH_LOG_MAX_BYTES`): more records go on in a second file. KEY_FILE
//! holds the HMAC secret (as `KVH_HMAC_KEY_FILE`); check the log with
//! `kvh verify-log DIR --key-file KEY_FILE`.
//!
//! `--crash` ends the process once the records are written, without the log's `stop`, as a
//! crash would: the chain is left without a `stop` record, and the next writer to open DIR
//! (`forensic_fill DIR 0 KEY_FILE`) recovers it and continues it.

use std::path::PathBuf;
use std::process::ExitCode;

use kvhygiene::config::{Config, FsyncPolicy, LogConfig};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::{ForensicLog, StartInfo};

#[path = "../benches/support/quarantine_event.rs"]
mod quarantine_event;

const USAGE: &str = "usage: forensic_fill DIR RECORDS KEY_FILE [--crash]";

struct Args {
    dir: PathBuf,
    records: u64,
    key_file: PathBuf,
    crash: bool,
}

fn parse_args() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let crash = match args.get(3).map(String::as_str) {
        None => false,
        Some("--crash") => true,
        Some(other) => return Err(format!("unknown argument {other:?}\n{USAGE}")),
    };
    if args.len() < 3 || args.len() > 4 {
        return Err(USAGE.to_string());
    }
    let records = args[1]
        .parse()
        .map_err(|e| format!("RECORDS {:?}: {e}\n{USAGE}", args[1]))?;
    Ok(Args {
        dir: PathBuf::from(&args[0]),
        records,
        key_file: PathBuf::from(&args[2]),
        crash,
    })
}

fn fill(args: &Args) -> Result<(), String> {
    let cfg = LogConfig {
        dir: Some(args.dir.clone()),
        max_bytes: 1 << 30,
        fsync: FsyncPolicy::Never,
        queue_capacity: 65_536,
        hmac_key_file: Some(args.key_file.clone()),
        ..Config::default().log
    };
    let start = StartInfo::current(Config::default().canonical_json());
    let log = ForensicLog::open(&cfg, start)
        .map_err(|e| format!("{}: {e}", args.dir.display()))?
        .ok_or("the log did not open")?;
    let ctx = quarantine_event::context();
    for i in 0..args.records {
        log.emit(quarantine_event::event(i, &ctx));
        if i % 500_000 == 499_999 {
            eprintln!("{} records", i + 1);
        }
    }
    if args.crash {
        // Every record queued is on disk (the page cache) before the process dies; only the
        // `stop` record is missing.
        log.flush();
        std::process::abort();
    }
    log.stop();
    let stats = log.stats();
    if stats.records_lost > 0 || stats.write_errors > 0 {
        return Err(format!(
            "{} records lost, {} write errors",
            stats.records_lost, stats.write_errors
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| fill(&args));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forensic_fill: {e}");
            ExitCode::from(2)
        }
    }
}
