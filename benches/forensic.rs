//! Forensic log benchmarks.
//!
//! - `append/{hmac,no_hmac}`: records/s through `EventSink::emit` to records on disk (open,
//!   emit N events, `stop` which flushes and joins), fsync=never.
//! - `verify/{verify_all,sha256sum}`: MB/s of `verify_all` (with the HMAC key) and of the
//!   `sha256sum` tool over the same files, in the same run. The ratio is printed at the end.
//! - `prune/{prune_all,verify_all}`: MB/s of `prune::prune_all` moving a whole ended chain to
//!   an archive on the same file system (verify, re-check and copy each file, sync, manifest,
//!   remove, verify what is left), against `verify_all` of the same log in the same run: the
//!   cost of retention in verifications.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvhygiene::config::{Config, FsyncPolicy, LogConfig};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::prune::{prune_all, PruneRequest};
use kvhygiene::forensic::{verify_all, ForensicLog, SealKey, StartInfo, VerifyOptions};
use zeroize::Zeroizing;

#[path = "support/quarantine_event.rs"]
mod quarantine_event;

const SECRET: &[u8] = b"bench-secret-0123456789abcdef";
const APPEND_RECORDS: u64 = 100_000;
const VERIFY_RECORDS: u64 = 150_000;

fn cfg(dir: &Path) -> LogConfig {
    LogConfig {
        dir: Some(dir.to_path_buf()),
        max_bytes: 16 << 20,
        fsync: FsyncPolicy::Never,
        queue_capacity: 65_536,
        ..Config::default().log
    }
}

/// Writes `n` records; returns the time from the first emit to the end of `stop`.
fn write_log(dir: &Path, n: u64, keyed: bool) -> Duration {
    let secret = keyed.then(|| Zeroizing::new(SECRET.to_vec()));
    let start = StartInfo::current(Config::default().canonical_json());
    let log = ForensicLog::open_with_secret(&cfg(dir), start, secret).expect("open log");
    let ctx = quarantine_event::context();
    let t = Instant::now();
    for i in 0..n {
        log.emit(quarantine_event::event(i, &ctx));
    }
    log.stop();
    t.elapsed()
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("append");
    g.throughput(Throughput::Elements(APPEND_RECORDS));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for keyed in [true, false] {
        let name = if keyed { "hmac" } else { "no_hmac" };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let tmp = tempfile::tempdir().expect("tempdir");
                        write_log(&tmp.path().join("log"), APPEND_RECORDS, keyed)
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

fn chain_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    v.sort();
    v
}

fn sha256sum(files: &[PathBuf]) {
    let out = Command::new("sha256sum")
        .args(files)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
}

/// A keyed log of `VERIFY_RECORDS` records in `dir`: its files and their total size.
fn verify_log(dir: &Path) -> (Vec<PathBuf>, u64) {
    write_log(dir, VERIFY_RECORDS, true);
    let files = chain_files(dir);
    let bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    (files, bytes)
}

/// Verification with the HMAC key.
fn keyed() -> VerifyOptions {
    VerifyOptions {
        hmac_keys: vec![SealKey::new("hmac.key", Zeroizing::new(SECRET.to_vec()))],
        ..Default::default()
    }
}

fn verify(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");
    let (files, bytes) = verify_log(&dir);
    let opts = keyed();
    let report = verify_all(&dir, &opts).expect("verify");
    assert!(report.ok(), "{report:?}");

    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("verify_all", |b| {
        b.iter(|| verify_all(&dir, &opts).expect("verify"))
    });
    g.bench_function("sha256sum", |b| b.iter(|| sha256sum(&files)));
    g.finish();

    // Same files, same run, interleaved: the ratio the target is stated in. Only when
    // benchmarking: `cargo test --all-targets` runs this file once, unoptimised, and a ratio
    // from that build would only mislead.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let (mut tv, mut ts) = (Duration::MAX, Duration::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        let _ = verify_all(&dir, &opts);
        tv = tv.min(t.elapsed());
        let t = Instant::now();
        sha256sum(&files);
        ts = ts.min(t.elapsed());
    }
    let mb = bytes as f64 / 1e6;
    eprintln!(
        "verify-vs-sha256sum: {mb:.1} MB in {} files; verify_all {:.0} MB/s, sha256sum {:.0} MB/s, ratio {:.2}",
        files.len(),
        mb / tv.as_secs_f64(),
        mb / ts.as_secs_f64(),
        ts.as_secs_f64() / tv.as_secs_f64()
    );
}

/// A private copy of the log directory `src`, and an empty private archive, in a new
/// temporary directory (the writer's modes: 0700 directories, 0600 files).
fn fresh_copy(src: &Path) -> (tempfile::TempDir, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (log, archive) = (tmp.path().join("log"), tmp.path().join("archive"));
    for d in [&log, &archive] {
        std::fs::create_dir(d).expect("mkdir");
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    for f in chain_files(src) {
        let name = f.file_name().expect("file name");
        std::fs::copy(&f, log.join(name)).expect("copy");
    }
    (tmp, log, archive)
}

fn prune(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("log");
    let (files, bytes) = verify_log(&src);
    let opts = VerifyOptions {
        allow_pruned: true,
        ..keyed()
    };

    let mut g = c.benchmark_group("prune");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("prune_all", |b| {
        b.iter_batched(
            || fresh_copy(&src),
            |(tmp, log, archive)| {
                let req = PruneRequest {
                    dir: &log,
                    archive: &archive,
                    older_than_days: 0,
                    dry_run: false,
                    opts: &opts,
                    checkpoint_place: None,
                };
                let run = prune_all(&req, |_| {}).expect("prune");
                let moved: usize = run.moved.iter().map(|c| c.files.len()).sum();
                assert!(
                    run.refused.is_empty() && moved == files.len(),
                    "moved {moved}"
                );
                tmp // removed after the measurement
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("verify_all", |b| {
        b.iter(|| verify_all(&src, &opts).expect("verify"))
    });
    g.finish();
}

criterion_group!(benches, append, verify, prune);
criterion_main!(benches);
