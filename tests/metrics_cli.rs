//! `kvh metrics` and `kvh serve-metrics`, run as the built binary: exit codes, messages and
//! the sidecar's HTTP answers (loopback only).

#[path = "cli_common/mod.rs"]
mod cli_common;
#[path = "http_common/mod.rs"]
mod http_common;
#[path = "skip/mod.rs"]
mod skip;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, SystemTime};

use cli_common::{kvh, run, runtime_stats};
use http_common::read_reply;
use kvhygiene::metrics::{encode, ExporterStats};
use kvhygiene::stats::{PoolCounters, Stats};

/// Writes a snapshot taken `age` ago, with `failed` failed verifications.
fn write_snapshot(path: &Path, age: Duration, failed: u64) {
    let mut pool = PoolCounters::default();
    pool.counters.allocations = 17;
    pool.counters.verifications_failed = failed;
    let text = encode(
        &runtime_stats(pool),
        &ExporterStats::default(),
        SystemTime::now() - age,
    );
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_fresh_snapshot_passes_and_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::ZERO, 0);
    let (code, out, err) = run(kvh()
        .args(["metrics", "--file"])
        .arg(&f)
        .args(["--max-age", "60"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("kvh_allocations_total 17"), "{out}");
    assert!(out.contains("backend host"), "{out}");
    assert!(out.contains("security: no failures"), "{out}");
    assert_eq!(out.lines().last(), Some("OK"));
    // The file can also come from the environment, as the writer was configured.
    let (code, out, _) = run(kvh().arg("metrics").env("KVH_METRICS_FILE", &f));
    assert_eq!(code, 0);
    assert!(out.contains(&f.display().to_string()), "{out}");
}

#[test]
fn a_stale_snapshot_fails_the_liveness_check() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::from_secs(600), 0);
    let (code, out, _) = run(kvh()
        .args(["metrics", "--file"])
        .arg(&f)
        .args(["--max-age", "60"]));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("STALE") && out.contains("--max-age 60"),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("FAILED"));
    assert!(!out.contains("age not checked"), "{out}");
    // Without --max-age, age alone is not a failure, and the summary says it was not checked.
    let (code, out, _) = run(kvh().args(["metrics", "--file"]).arg(&f));
    assert_eq!(code, 0);
    assert!(
        out.contains(" s ago; age not checked without --max-age"),
        "{out}"
    );
    // --max-age 0 is a usage error (clap), not "always stale".
    let (code, _, _) = run(kvh()
        .args(["metrics", "--file"])
        .arg(&f)
        .args(["--max-age", "0"]));
    assert_eq!(code, 2);
}

#[test]
fn security_failures_fail_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::ZERO, 2);
    let (code, out, _) = run(kvh().args(["metrics", "--file"]).arg(&f));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("security: FAILURES: kvh_verifications_total{result=\"failed\"} = 2"),
        "{out}"
    );
    // Exit 0, but the verdict line does not read as a plain pass under the failures.
    let verdict = out.lines().last().unwrap_or_default();
    assert!(
        verdict.starts_with("OK") && verdict.contains("--fail-on-security"),
        "{out}"
    );
    let (code, out, _) = run(kvh()
        .args(["metrics", "--fail-on-security", "--file"])
        .arg(&f));
    assert_eq!(code, 1, "{out}");
    write_snapshot(&f, Duration::ZERO, 0);
    let (code, _, _) = run(kvh()
        .args(["metrics", "--fail-on-security", "--file"])
        .arg(&f));
    assert_eq!(code, 0);
    // A paged KV cache block whose scrub failed is a failure too.
    let mut pool = PoolCounters::default();
    pool.counters.kv_blocks_failed = 1;
    std::fs::write(
        &f,
        encode(
            &runtime_stats(pool),
            &ExporterStats::default(),
            SystemTime::now(),
        ),
    )
    .unwrap();
    let (code, out, _) = run(kvh()
        .args(["metrics", "--fail-on-security", "--file"])
        .arg(&f));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("kvh_kv_failed_blocks_total = 1"), "{out}");
}

#[test]
fn each_security_series_alone_fails_the_security_check() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::ZERO, 0);
    let healthy = std::fs::read_to_string(&f).unwrap();
    let check = || {
        run(kvh()
            .args(["metrics", "--fail-on-security", "--file"])
            .arg(&f))
    };
    let (code, out, err) = check();
    assert_eq!(code, 0, "the healthy snapshot passes: {out}{err}");
    for name in cli_common::SECURITY_SERIES {
        let zero = format!("\n{name} 0\n");
        assert!(
            healthy.contains(&zero),
            "{name} is not in the snapshot at 0"
        );
        std::fs::write(&f, healthy.replace(&zero, &format!("\n{name} 3\n"))).unwrap();
        let (code, out, err) = check();
        assert_eq!(code, 1, "{name} = 3 passed: {out}{err}");
        assert!(out.contains(&format!("{name} = 3")), "{name}: {out}");
    }
}

#[test]
fn a_missing_checked_series_fails_the_security_check() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    // No forensic log statistics: kvh_log_records_lost_total is absent.
    let stats = Stats::merge("host".into(), &[PoolCounters::default()], None);
    std::fs::write(
        &f,
        encode(&stats, &ExporterStats::default(), SystemTime::now()),
    )
    .unwrap();
    let (code, out, _) = run(kvh().args(["metrics", "--file"]).arg(&f));
    assert_eq!(code, 0, "listed, not failed, without the flag: {out}");
    assert!(
        out.contains("kvh_log_records_lost_total missing from the snapshot: not checked"),
        "{out}"
    );
    let (code, out, _) = run(kvh()
        .args(["metrics", "--fail-on-security", "--file"])
        .arg(&f));
    assert_eq!(code, 1, "{out}");
    let (code, out, _) = run(kvh()
        .args(["metrics", "--fail-on-security", "--json", "--file"])
        .arg(&f));
    assert_eq!(code, 1, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let failures = j["security_failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{out}");
    assert_eq!(failures[0]["metric"], "kvh_log_records_lost_total");
    assert_eq!(failures[0]["missing"], true);
    assert!(failures[0]["value"].is_null());
}

#[test]
fn a_snapshot_from_the_future_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let at = |t: SystemTime| {
        let text = encode(
            &runtime_stats(PoolCounters::default()),
            &ExporterStats::default(),
            t,
        );
        std::fs::write(&f, text).unwrap();
    };
    at(SystemTime::now() + Duration::from_secs(600));
    let (code, _, err) = run(kvh().args(["metrics", "--file"]).arg(&f));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("in the future"), "{err}");
    // Within the tolerance for clock adjustments: accepted, age 0.
    at(SystemTime::now() + Duration::from_secs(1));
    let (code, out, err) = run(kvh().args(["metrics", "--max-age", "60", "--file"]).arg(&f));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn json_summary() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::from_secs(30), 1);
    let (code, out, err) = run(kvh()
        .args([
            "metrics",
            "--json",
            "--fail-on-security",
            "--max-age",
            "3600",
            "--file",
        ])
        .arg(&f));
    assert_eq!(code, 1, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["stale"], false);
    assert_eq!(j["ok"], false);
    assert_eq!(j["backend"], "host");
    assert_eq!(j["security_failures"][0]["missing"], false);
    assert_eq!(j["security_failures"][0]["value"], 1.0);
    assert_eq!(j["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(j["max_age_seconds"], 3600);
    let age = j["age_seconds"].as_f64().unwrap();
    assert!((29.0..60.0).contains(&age), "{age}");
    assert_eq!(
        j["security_failures"][0]["metric"],
        "kvh_verifications_total{result=\"failed\"}"
    );
    let m = j["metrics"].as_array().unwrap();
    assert!(m
        .iter()
        .any(|s| s["name"] == "kvh_allocations_total" && s["value"] == 17.0));
}

#[test]
fn unusable_input_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.prom");
    let (code, _, err) = run(kvh().args(["metrics", "--file"]).arg(&missing));
    assert_eq!(code, 2);
    assert!(err.contains("absent.prom"), "{err}");

    let bad = dir.path().join("bad.prom");
    std::fs::write(&bad, "kvh_snapshot_timestamp_seconds 1\nkvh_x{a=1} 2\n").unwrap();
    let (code, _, err) = run(kvh().args(["metrics", "--file"]).arg(&bad));
    assert_eq!(code, 2);
    assert!(err.contains("bad.prom") && err.contains("line 2"), "{err}");

    // A time before 1970 is no snapshot's: a usage error, not a very stale snapshot.
    let early = dir.path().join("early.prom");
    std::fs::write(&early, "kvh_snapshot_timestamp_seconds -5\n").unwrap();
    let (code, _, err) = run(kvh().args(["metrics", "--file"]).arg(&early));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("early.prom") && err.contains("not a time"),
        "{err}"
    );

    let foreign = dir.path().join("node.prom");
    std::fs::write(&foreign, "# TYPE up gauge\nup 1\n").unwrap();
    let (code, _, err) = run(kvh().args(["metrics", "--file"]).arg(&foreign));
    assert_eq!(code, 2);
    assert!(
        err.contains("node.prom") && err.contains("kvh_snapshot_timestamp_seconds"),
        "{err}"
    );

    let (code, _, err) = run(kvh().args(["metrics", "--file"]).arg(dir.path()));
    assert_eq!(code, 2);
    assert!(err.contains("not a regular file"), "{err}");

    let (code, _, err) = run(kvh().arg("metrics"));
    assert_eq!(code, 2);
    assert!(err.contains("KVH_METRICS_FILE"), "{err}");

    // An invalid environment is reported, naming the key.
    let (code, _, err) = run(kvh().arg("metrics").env("KVH_METRICS_INTERVAL_MS", "5"));
    assert_eq!(code, 2);
    assert!(err.contains("KVH_METRICS_INTERVAL_MS"), "{err}");
}

/// A key file named as the metrics file by mistake is refused (exit 2) by every reader,
/// naming the file and the line and quoting nothing of it: a probe's output and a
/// container's log are read by more people than the key is.
#[test]
fn a_key_file_named_as_the_metrics_file_is_refused_without_quoting_it() {
    let dir = tempfile::tempdir().unwrap();
    // A hex secret that begins with a letter reads as a metric name without a value; one
    // that begins with a digit as an invalid name; a later line is read as readily.
    let letter = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let digit = "5e9d86e5aa0f4c3b9bb4b3bd2c1ad1f0d6b59f3f2d4c1f7e0a9b8c7d6e5f4a3b";
    let files = [
        ("letter.key", format!("{letter}\n"), "line 1"),
        ("digit.key", format!("{digit}\n"), "line 1"),
        (
            "second.key",
            format!("kvh_snapshot_timestamp_seconds 1\n{letter} x\n"),
            "line 2",
        ),
    ];
    for (name, text, line) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        for args in [
            &["metrics", "--file"][..],
            &["metrics", "--json", "--file"],
            &["gate", "--metrics-file"],
            &["gate", "--json", "--metrics-file"],
        ] {
            let (code, out, err) = run(kvh().args(args).arg(&path));
            assert_eq!(code, 2, "{args:?} {name}: {err}");
            assert!(err.contains(name) && err.contains(line), "{args:?}: {err}");
            for secret in [letter, digit] {
                assert!(
                    !err.contains(&secret[..12]) && !out.contains(&secret[..12]),
                    "{args:?} quoted the file: {err}{out}"
                );
            }
        }
    }
}

/// A snapshot time before 1970 is refused (exit 2) by `metrics` and `gate`; the message
/// names the value the file holds (`-5`), as it does for `NaN` and the infinities, so that
/// an operator can find the line: a finite negative time is not reported as `-Inf`.
#[test]
fn a_negative_snapshot_time_is_named_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let early = dir.path().join("early.prom");
    std::fs::write(&early, "kvh_snapshot_timestamp_seconds -5\n").unwrap();
    for verb in [&["metrics", "--file"][..], &["gate", "--metrics-file"]] {
        let (code, _, err) = run(kvh().args(verb).arg(&early));
        assert_eq!(code, 2, "{verb:?}: {err}");
        assert!(
            err.contains("is -5,") && !err.contains("-Inf"),
            "{verb:?}: the message names another value than the file's -5: {err}"
        );
    }
}

/// A running `kvh serve-metrics`, killed on drop; its stderr goes to a file.
struct Sidecar {
    child: Child,
    addr: SocketAddr,
    stderr: tempfile::NamedTempFile,
}

impl Sidecar {
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sidecar(file: &Path, extra: &[&str]) -> Sidecar {
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = kvh()
        .args(["serve-metrics", "--listen", "127.0.0.1:0", "--file"])
        .arg(file)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|s| s.strip_suffix("/metrics"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Sidecar {
        child,
        addr,
        stderr,
    }
}

fn http(addr: SocketAddr, raw: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let r = read_reply(&mut s);
    (r.status, r.head, r.body)
}

const UNAVAILABLE: &str =
    "kvh serve-metrics: metrics file missing, stale or not a kvhygiene snapshot\n";

#[test]
fn serve_metrics_serves_the_file_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let side = sidecar(&f, &["--max-age", "60"]);
    let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    // Missing file: 503, the same body as every refusal; the reason on stderr.
    let (status, _, body) = http(side.addr, get);
    assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
    // Present and fresh: served byte for byte.
    write_snapshot(&f, Duration::ZERO, 0);
    let (status, head, body) = http(side.addr, get);
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert_eq!(body, std::fs::read_to_string(&f).unwrap());
    // Stale: 503.
    write_snapshot(&f, Duration::from_secs(600), 0);
    let (status, _, body) = http(side.addr, get);
    assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
    // Not a snapshot: 503, never a file a scraper would choke on, nor its content.
    std::fs::write(&f, "secret-token-value here\n").unwrap();
    for _ in 0..3 {
        let (status, _, body) = http(side.addr, get);
        assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
    }
    assert_eq!(http(side.addr, "GET /healthz HTTP/1.1\r\n\r\n").0, 200);
    assert_eq!(http(side.addr, "GET /stats HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(side.addr, "POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    // The reasons are on stderr, each change once.
    let err = side.stderr();
    assert!(err.contains("kvh.prom: No such file"), "{err}");
    assert!(err.contains("--max-age 60"), "{err}");
    assert_eq!(err.matches("line 1").count(), 1, "{err}");
    assert!(err.contains("serving"), "{err}");
}

/// The sidecar's refusals are in no snapshot it serves: it says them on stderr, the first one
/// within seconds (a 431 for a head over the limit here), with the count.
#[test]
fn serve_metrics_says_the_requests_it_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::ZERO, 0);
    let side = sidecar(&f, &["--max-age", "60"]);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(http(side.addr, &huge).0, 431);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let said = loop {
        let err = side.stderr();
        if err.contains("refused 1 request(s) since it started") {
            break err;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report of the refusal:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(said.contains("1 in all"), "{said}");
    assert_eq!(http(side.addr, "GET /metrics HTTP/1.1\r\n\r\n").0, 200);
}

/// The text format 0.0.4 ends every line, the last one included, with a line feed, and only
/// a line feed: Prometheus's parsers refuse a body whose last sample has no line end
/// ("unexpected end of input stream") and read a carriage return as part of the value. A
/// file that lacks its final line end (a copy cut short at a line's end) or that has CRLF
/// line ends is therefore either refused (503) or served as a body a scraper parses: ending
/// in a line feed, without carriage returns.
#[test]
fn serve_metrics_serves_only_bodies_whose_lines_end_as_the_format_requires() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let side = sidecar(&f, &["--max-age", "60"]);
    let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    write_snapshot(&f, Duration::ZERO, 0);
    let text = std::fs::read_to_string(&f).unwrap();

    // Without the final line end.
    std::fs::write(&f, text.trim_end_matches('\n')).unwrap();
    let (status, _, body) = http(side.addr, get);
    assert!(
        status == 503 || body.ends_with('\n'),
        "served {status} with a body whose last line has no line end: {:?}",
        &body[body.len().saturating_sub(60)..]
    );

    // CRLF line ends.
    std::fs::write(&f, text.replace('\n', "\r\n")).unwrap();
    let (status, _, body) = http(side.addr, get);
    assert!(
        status == 503 || !body.contains('\r'),
        "served {status} with CRLF line ends: {:?}",
        &body[..body.len().min(120)]
    );
}

#[test]
fn serve_metrics_neither_blocks_on_a_fifo_nor_serves_a_linked_secret() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.prom");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let side = sidecar(&fifo, &[]);
    let get = "GET /metrics HTTP/1.1\r\n\r\n";
    // A FIFO without a writer: answered (the client's read timeout is 10 s), not hung.
    let (status, _, body) = http(side.addr, get);
    assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
    assert!(
        side.stderr().contains("not a regular file"),
        "{}",
        side.stderr()
    );

    let secret = dir.path().join("token");
    std::fs::write(&secret, "hunter2-token\n").unwrap();
    let link = dir.path().join("link.prom");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let side = sidecar(&link, &[]);
    let (status, _, body) = http(side.addr, get);
    // The same body as every refusal: nothing of the linked file is served, nor logged.
    assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
    assert!(
        side.stderr().contains("line 1") && !side.stderr().contains("hunter2"),
        "{}",
        side.stderr()
    );
}

#[test]
fn serve_metrics_exits_2_when_the_address_is_taken() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run(kvh().args([
        "serve-metrics",
        "--file",
        "/nonexistent.prom",
        "--listen",
        &addr,
    ]));
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("cannot listen on {addr}")),
        "the bind failure names the address: {err}"
    );
}

/// A process that may start no further thread (`ulimit -u 1` for an unprivileged uid, set
/// from root through `setpriv`): the address was free, so the error must not send the
/// operator looking for a port conflict.
#[test]
fn serve_metrics_that_cannot_start_its_thread_does_not_blame_the_address() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("needs root to run kvh as another uid");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = cli_common::kvh_copy_in(tmp.path());
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&exe)
        .args([
            "serve-metrics",
            "--file",
            "/nonexistent.prom",
            "--listen",
            &addr,
        ])
        .env_clear();
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Where the limit does not bind, the server starts and runs until killed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    let Some(status) = status.filter(|_| !err.contains("Permission denied")) else {
        skip::skipped(&format!(
            "uid 65534 cannot run the built kvh here, or its threads are not limited: {err}"
        ));
        return;
    };
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        !err.contains("cannot listen") && err.contains("cannot start the thread that serves"),
        "{err}"
    );
}

/// A complexity bound, not a speed target: a 1 MiB file (the largest accepted) of ~116,000
/// one-sample families is judged in linear time. Quadratic parsing took some 44 s for it in a
/// debug build, which `kvh gate` as a probe (5 s timeout) and each `serve-metrics` scrape, on
/// its only thread, cannot afford; linear parsing takes well under a second, so the 20 s
/// limit holds on a loaded machine.
#[test]
fn a_largest_accepted_file_is_judged_within_a_probe_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut text = format!("kvh_snapshot_timestamp_seconds {now}\n");
    let mut i = 0u64;
    loop {
        let line = format!("a{i} 0\n");
        if text.len() + line.len() > 1 << 20 {
            break;
        }
        text.push_str(&line);
        i += 1;
    }
    std::fs::write(&f, &text).unwrap();
    let mut child = kvh()
        .args(["metrics", "--file"])
        .arg(&f)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let limit = Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.is_some(),
        "kvh metrics took over {limit:?} on a {} byte file of {i} families",
        text.len()
    );
}

/// `--json`'s `security_failures[].value` is documented as the non-zero value, `null` only when
/// the series is missing. A checked series whose value is NaN fails the check (the text says
/// `= NaN`); the JSON must carry that value too, not the `null` that means "missing" while
/// `missing` says false.
#[test]
fn json_failure_values_agree_with_the_text_for_a_nan_sample() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::ZERO, 0);
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(text.contains("kvh_residue_detected_total 0\n"), "{text}");
    std::fs::write(
        &f,
        text.replace(
            "kvh_residue_detected_total 0\n",
            "kvh_residue_detected_total NaN\n",
        ),
    )
    .unwrap();
    let (code, out, err) = run(kvh()
        .args(["metrics", "--fail-on-security", "--file"])
        .arg(&f));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("kvh_residue_detected_total = NaN"), "{out}");
    let (code, out, err) = run(kvh()
        .args(["metrics", "--fail-on-security", "--json", "--file"])
        .arg(&f));
    assert_eq!(code, 1, "{out}{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let failure = j["security_failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["metric"] == "kvh_residue_detected_total")
        .unwrap_or_else(|| panic!("no residue failure: {out}"))
        .clone();
    assert_eq!(failure["missing"], false, "{failure}");
    assert!(
        !failure["value"].is_null(),
        "a NaN value is written as null, the value of a missing series: {failure}"
    );
}

/// Writes a snapshot of process `pid` as a per-process file carries it: a `pid` label on
/// every sample.
fn write_process_snapshot(path: &Path, pid: u32, age: Duration, failed: u64) {
    let mut pool = PoolCounters::default();
    pool.counters.allocations = u64::from(pid % 1000) + 1;
    pool.counters.verifications_failed = failed;
    let pid = pid.to_string();
    let text = kvhygiene::metrics::encode_labelled(
        &runtime_stats(pool),
        &ExporterStats::default(),
        SystemTime::now() - age,
        &[("pid", &pid)],
    );
    std::fs::write(path, text).unwrap();
}

/// The id of a process that has ended.
fn ended_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// A process that lives until dropped.
struct LiveChild(Child);

impl LiveChild {
    fn start() -> Self {
        LiveChild(
            std::process::Command::new("sleep")
                .arg("300")
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for LiveChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A multi-process engine writes one file per process (`{pid}` in `KVH_METRICS_FILE`):
/// `kvh metrics` given the pattern (or finding it in the environment) checks every live
/// process's file, fails when one fails, lists the files of processes that are gone without
/// checking them (their last snapshot only ages), and checks nothing (exit 2) when no live
/// process has a file.
#[test]
fn metrics_with_a_per_process_pattern_checks_every_live_process() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let file = |pid: u32| dir.path().join(format!("kvh-{pid}.prom"));
    let me = std::process::id();
    let worker = LiveChild::start();
    let gone = ended_pid();
    write_process_snapshot(&file(me), me, Duration::ZERO, 0);
    write_process_snapshot(&file(worker.pid()), worker.pid(), Duration::ZERO, 0);
    // The ended worker's file is an hour old: not judged stale.
    write_process_snapshot(&file(gone), gone, Duration::from_secs(3600), 0);
    let metrics =
        |extra: &[&str]| run(kvh().arg("metrics").arg("--file").arg(&pattern).args(extra));
    let (code, out, err) = metrics(&["--max-age", "60"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("process {me}:")), "{out}");
    assert!(out.contains(&format!("process {}:", worker.pid())), "{out}");
    assert!(
        out.contains(&format!("note: process {gone} is gone")),
        "{out}"
    );
    assert!(
        out.trim_end()
            .ends_with(&format!("OK: 2 processes of {}", pattern.display())),
        "{out}"
    );
    // The pattern may come from the environment, as the engine was configured.
    let (code, out, err) = run(kvh()
        .args(["metrics", "--max-age", "60"])
        .env("KVH_METRICS_FILE", &pattern));
    assert_eq!(code, 0, "{out}{err}");
    // One live process stopped exporting: the check fails and the JSON says which.
    write_process_snapshot(
        &file(worker.pid()),
        worker.pid(),
        Duration::from_secs(600),
        0,
    );
    let (code, out, err) = metrics(&["--max-age", "60", "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    let by_pid = |pid: u32| {
        v["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(by_pid(worker.pid())["stale"], true, "{out}");
    assert_eq!(by_pid(me)["stale"], false, "{out}");
    assert_eq!(v["gone"][0]["pid"], gone, "{out}");
    // A security failure of one process, with --fail-on-security.
    write_process_snapshot(&file(worker.pid()), worker.pid(), Duration::ZERO, 0);
    write_process_snapshot(&file(me), me, Duration::ZERO, 2);
    let (code, out, _) = metrics(&["--fail-on-security"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: 1 of 2 processes"), "{out}");
    // A live process's file that is not a snapshot: exit 2, naming it.
    std::fs::write(file(me), "garbage\n").unwrap();
    let (code, _, err) = metrics(&[]);
    assert_eq!(code, 2);
    assert!(err.contains(&format!("kvh-{me}.prom")), "{err}");
    // No live process's file: nothing checked.
    std::fs::remove_file(file(me)).unwrap();
    std::fs::remove_file(file(worker.pid())).unwrap();
    let (code, out, err) = metrics(&[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("no metrics file of a live process"), "{err}");
    assert!(err.contains("1 file of a process that is gone"), "{err}");
    // `{pid}` in a directory is refused.
    let (code, _, err) = run(kvh()
        .args(["metrics", "--file"])
        .arg(dir.path().join("{pid}/kvh.prom")));
    assert_eq!(code, 2);
    assert!(err.contains("in the file name only"), "{err}");
}

/// With `{pid}` in the file name, a process whose snapshot lists security failures passes
/// without --fail-on-security (exit 0), as with one file; the summary line that ends the
/// report says that the failures listed fail only with the flag, rather than reading as a
/// plain pass under them, as the verdict of a single file does.
#[test]
fn the_per_process_summary_under_listed_security_failures_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let me = std::process::id();
    write_process_snapshot(
        &dir.path().join(format!("kvh-{me}.prom")),
        me,
        Duration::ZERO,
        2,
    );
    let (code, out, err) = run(kvh().arg("metrics").arg("--file").arg(&pattern));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("security: FAILURES:"), "{out}");
    let summary = out.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("OK") && summary.contains("--fail-on-security"),
        "the last line reads as a plain pass under the failures listed above it: {summary:?}\n{out}"
    );
}

/// `serve-metrics` given a per-process pattern serves the live processes' files as one
/// exposition (each family declared once, every process's samples under it, told apart by
/// their `pid` label), leaves out the files of processes that are gone once their last
/// snapshot is older than `--max-age`, and answers 503 when one live process's file cannot
/// be served, as for one file.
#[test]
fn serve_metrics_with_a_per_process_pattern_serves_every_live_process_as_one_exposition() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let file = |pid: u32| dir.path().join(format!("kvh-{pid}.prom"));
    let me = std::process::id();
    let worker = LiveChild::start();
    let gone = ended_pid();
    let side = sidecar(&pattern, &["--max-age", "60"]);
    let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    // No file yet: 503.
    let (status, _, body) = http(side.addr, get);
    assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
    write_process_snapshot(&file(me), me, Duration::ZERO, 0);
    write_process_snapshot(&file(worker.pid()), worker.pid(), Duration::ZERO, 0);
    write_process_snapshot(&file(gone), gone, Duration::from_secs(3600), 0);
    let (status, _, body) = http(side.addr, get);
    assert_eq!(status, 200, "{body}\n{}", side.stderr());
    let parsed = kvhygiene::metrics::parse::parse(&body).expect("one valid exposition");
    let me_s = me.to_string();
    let worker_s = worker.pid().to_string();
    let gone_s = gone.to_string();
    for (pid, want) in [(&me_s, me % 1000 + 1), (&worker_s, worker.pid() % 1000 + 1)] {
        assert_eq!(
            parsed.value("kvh_allocations_total", &[("pid", pid.as_str())]),
            Some(f64::from(want)),
            "{body}"
        );
    }
    assert_eq!(
        parsed
            .values("kvh_allocations_total", &[("pid", gone_s.as_str())])
            .count(),
        0,
        "the file of a process that is gone is served: {body}"
    );
    assert_eq!(
        body.matches("# TYPE kvh_allocations_total ").count(),
        1,
        "{body}"
    );
    // A process that ended just after its last snapshot (a worker that failed closed): that
    // snapshot is served while it is no older than --max-age, then left out, without a 503.
    let just_gone = ended_pid();
    let just_gone_s = just_gone.to_string();
    write_process_snapshot(&file(just_gone), just_gone, Duration::ZERO, 0);
    let (status, _, body) = http(side.addr, get);
    assert_eq!(status, 200, "{body}\n{}", side.stderr());
    let parsed = kvhygiene::metrics::parse::parse(&body).unwrap();
    assert_eq!(
        parsed.value("kvh_allocations_total", &[("pid", just_gone_s.as_str())]),
        Some(f64::from(just_gone % 1000 + 1)),
        "the last snapshot of a process just gone is not served: {body}"
    );
    write_process_snapshot(&file(just_gone), just_gone, Duration::from_secs(61), 0);
    let (status, _, body) = http(side.addr, get);
    assert_eq!(status, 200, "{body}\n{}", side.stderr());
    assert!(!body.contains(&format!("pid=\"{just_gone}\"")), "{body}");
    // One live process stopped exporting: 503, its file named on stderr.
    write_process_snapshot(
        &file(worker.pid()),
        worker.pid(),
        Duration::from_secs(600),
        0,
    );
    let (status, _, body) = http(side.addr, get);
    assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
    let err = side.stderr();
    assert!(
        err.contains(&format!("kvh-{}.prom", worker.pid())) && err.contains("--max-age 60"),
        "{err}"
    );
    // The worker ends: its stale file is no longer a reason to refuse.
    drop(worker);
    let (status, _, body) = http(side.addr, get);
    assert_eq!(status, 200, "{body}\n{}", side.stderr());
    let parsed = kvhygiene::metrics::parse::parse(&body).unwrap();
    assert_eq!(
        parsed
            .values("kvh_allocations_total", &[("pid", worker_s.as_str())])
            .count(),
        0,
        "{body}"
    );
}

/// A live process's id may name a file an ended process wrote (the id was reused), modified
/// recently: the writer identity in it (`kvh_process_start_ticks`) is not the live process's,
/// so `serve-metrics` neither serves it nor refuses the whole exposition for its age. The
/// process's own file, once written, is judged: stale, it is refused.
#[test]
fn serve_metrics_with_a_per_process_pattern_skips_the_file_of_an_earlier_holder_of_an_id() {
    use kvhygiene::metrics::per_process::ProcessIdentity;
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let file = |pid: u32| dir.path().join(format!("kvh-{pid}.prom"));
    let me = std::process::id();
    let worker = LiveChild::start();
    let own = ProcessIdentity::of(worker.pid()).expect("the worker's identity, from /proc");
    let earlier = ProcessIdentity {
        start_ticks: own.start_ticks - 1,
        ..own.clone()
    };
    let write = |identity: &ProcessIdentity| {
        let text = kvhygiene::metrics::encode_process(
            &runtime_stats(PoolCounters::default()),
            &ExporterStats::default(),
            SystemTime::now() - Duration::from_secs(600),
            &worker.pid().to_string(),
            Some(identity),
        );
        std::fs::write(file(worker.pid()), text).unwrap();
    };
    write_process_snapshot(&file(me), me, Duration::ZERO, 0);
    write(&earlier);
    let side = sidecar(&pattern, &["--max-age", "60"]);
    let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let (status, _, body) = http(side.addr, get);
    assert_eq!(status, 200, "{body}\n{}", side.stderr());
    let worker_s = worker.pid().to_string();
    let parsed = kvhygiene::metrics::parse::parse(&body).unwrap();
    assert_eq!(
        parsed
            .values("kvh_allocations_total", &[("pid", worker_s.as_str())])
            .count(),
        0,
        "the file of an earlier holder of id {worker_s} is served: {body}"
    );
    write(&own);
    let (status, _, body) = http(side.addr, get);
    assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
}

/// `--listen` takes an IP address and a port; what a user is likely to try instead (a host
/// name, a port alone) is refused with an example of what it takes.
#[test]
fn serve_metrics_listen_address_errors_give_an_example() {
    for bad in ["localhost:9464", ":9464", "9464"] {
        let (code, _, err) =
            run(kvh().args(["serve-metrics", "--file", "x.prom", "--listen", bad]));
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(
            err.contains("127.0.0.1:9464") && err.contains(bad),
            "{bad}: {err}"
        );
    }
}

/// A file with two snapshot times (a merged exposition, whose samples each carry a `pid`
/// label) has no one age: it is refused, not judged by its first time.
#[test]
fn a_file_with_two_snapshot_times_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::ZERO, 0);
    let text = std::fs::read_to_string(&f).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("kvh_snapshot_timestamp_seconds "))
        .expect("the snapshot's time")
        .to_string();
    let fresh: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let two = format!(
        "kvh_snapshot_timestamp_seconds{{pid=\"1\"}} {fresh}\n\
         kvh_snapshot_timestamp_seconds{{pid=\"2\"}} {}",
        fresh - 3600.0
    );
    std::fs::write(&f, text.replace(&line, &two)).unwrap();
    let (code, out, err) = run(kvh()
        .args(["metrics", "--file"])
        .arg(&f)
        .args(["--max-age", "60"]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("more than one kvh_snapshot_timestamp_seconds"),
        "{err}"
    );
}

/// Staleness is judged against --max-age itself: a snapshot half as old again as the limit
/// fails `kvh metrics` and is not served by `serve-metrics`.
#[test]
fn a_snapshot_just_past_max_age_is_stale_for_both_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::from_secs(90), 0);
    let (code, out, _) = run(kvh()
        .args(["metrics", "--file"])
        .arg(&f)
        .args(["--max-age", "60"]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("STALE"), "{out}");
    let side = sidecar(&f, &["--max-age", "60"]);
    let (status, _, body) = http(side.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
    // Well within the limit: served.
    write_snapshot(&f, Duration::from_secs(30), 0);
    let (status, _, _) = http(side.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
}

/// The sidecar is its container's entrypoint, so it runs as PID 1 of the container's pid
/// namespace, where the kernel delivers a signal from outside only when the process has a
/// handler for it. A pod's deletion sends SIGTERM: the sidecar must end on it (exit 0), not
/// wait for the SIGKILL after the termination grace period. Run here as PID 1 of a new pid
/// namespace (`unshare`; skipped where user namespaces are not available).
#[test]
fn serve_metrics_as_pid_1_of_its_namespace_ends_on_sigterm() {
    let probe = std::process::Command::new("unshare")
        .args(["-Urpf", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        skip::skipped("unshare -Urpf is not available here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::ZERO, 0);
    let mut outer = std::process::Command::new("unshare")
        .args(["-Urpf", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_kvh"))
        .args(["serve-metrics", "--listen", "127.0.0.1:0", "--file"])
        .arg(&f)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(outer.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("serving"), "{line:?}");
    // The sidecar: the only child of `unshare`, PID 1 inside the new namespace.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", outer.id())).unwrap();
    let inner: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: sends a signal to the test's own grandchild.
    unsafe { libc::kill(inner, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = outer.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.is_none() {
        // SAFETY: as above.
        unsafe { libc::kill(inner, libc::SIGKILL) };
        let _ = outer.wait();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "serve-metrics as PID 1 did not end within 5 s of SIGTERM ({status:?})"
    );
}

/// A checked series whose value is `+Inf` fails `--fail-on-security`; the text names the
/// value as the exposition format and `--json` spell it (`+Inf`), so that the two reports
/// and the file agree.
#[test]
fn text_failure_values_spell_an_infinity_as_the_exposition_does() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::ZERO, 0);
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(text.contains("kvh_residue_detected_total 0\n"), "{text}");
    std::fs::write(
        &f,
        text.replace(
            "kvh_residue_detected_total 0\n",
            "kvh_residue_detected_total +Inf\n",
        ),
    )
    .unwrap();
    let (code, out, err) = run(kvh()
        .args(["metrics", "--fail-on-security", "--json", "--file"])
        .arg(&f));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("\"+Inf\""), "{out}");
    let (code, out, err) = run(kvh()
        .args(["metrics", "--fail-on-security", "--file"])
        .arg(&f));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("kvh_residue_detected_total = +Inf"),
        "the text report spells the value otherwise than the file and --json (+Inf): {out}"
    );
}

/// When the live processes' files cannot be merged into one exposition (here: files written
/// without the `pid` label, so every series repeats), the reason `serve-metrics` gives names
/// the files (or process ids) involved, not only a line number of a merged text the operator
/// never sees.
#[test]
fn a_per_process_merge_conflict_names_the_files_involved() {
    use kvhygiene::metrics::cli::FileRoutes;
    use kvhygiene::metrics::per_process::Target;
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let (a, b) = (LiveChild::start(), LiveChild::start());
    for pid in [a.pid(), b.pid()] {
        write_snapshot(
            &dir.path().join(format!("kvh-{pid}.prom")),
            Duration::ZERO,
            0,
        );
    }
    let routes = FileRoutes::new(Target::PerProcess(pattern), None);
    let err = routes
        .check(SystemTime::now())
        .expect_err("series repeat across the files");
    assert!(
        [a.pid(), b.pid()]
            .iter()
            .any(|pid| err.contains(&format!("kvh-{pid}.prom"))
                || err.contains(&format!("process {pid}"))),
        "the reason names neither file nor process: {err}"
    );
}

/// Two live processes (the lower pid first) whose snapshot files `serve-metrics` merges
/// through a per-process pattern.
struct TwoProcesses {
    dir: tempfile::TempDir,
    low: u32,
    high: u32,
    _children: (LiveChild, LiveChild),
}

impl TwoProcesses {
    fn new() -> Self {
        let (a, b) = (LiveChild::start(), LiveChild::start());
        let (low, high) = (a.pid().min(b.pid()), a.pid().max(b.pid()));
        TwoProcesses {
            dir: tempfile::tempdir().unwrap(),
            low,
            high,
            _children: (a, b),
        }
    }

    /// Writes each process's file, `text(pid, now)` (a fresh snapshot timestamp and the series
    /// every snapshot carries first), and checks the merge; an error must name both files (or
    /// processes).
    fn merge(
        &self,
        low: impl Fn(u32) -> String,
        high: impl Fn(u32) -> String,
    ) -> Result<(), String> {
        use kvhygiene::metrics::cli::FileRoutes;
        use kvhygiene::metrics::per_process::Target;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for (pid, text) in [(self.low, low(self.low)), (self.high, high(self.high))] {
            let mut stamp = format!(
                "# TYPE kvh_snapshot_timestamp_seconds gauge\n\
                 kvh_snapshot_timestamp_seconds{{pid=\"{pid}\"}} {now}\n\
                 kvh_verifications_total{{pid=\"{pid}\",result=\"failed\"}} 0\n"
            );
            for series in [
                "kvh_residue_detected_total",
                "kvh_rescrub_failures_total",
                "kvh_kv_failed_blocks_total",
                "kvh_log_records_lost_total",
                "kvh_async_error",
                "kvh_shut_down",
                "kvh_anomaly_enabled",
            ] {
                stamp += &format!("{series}{{pid=\"{pid}\"}} 0\n");
            }
            let file = self.dir.path().join(format!("kvh-{pid}.prom"));
            std::fs::write(file, stamp + &text).unwrap();
        }
        let pattern = self.dir.path().join("kvh-{pid}.prom");
        let outcome = FileRoutes::new(Target::PerProcess(pattern), None)
            .check(SystemTime::now())
            .map(|_| ());
        if let Err(err) = &outcome {
            assert!(
                [self.low, self.high]
                    .iter()
                    .all(|pid| err.contains(&format!("kvh-{pid}.prom"))
                        || err.contains(&format!("process {pid}"))),
                "the reason does not name both files or processes: {err}"
            );
        }
        outcome
    }
}

/// A summary `kvh_lat_seconds` in one process's file, the samples of `kvh_lat_seconds_sum`
/// and `_count`.
fn summary(pid: u32) -> String {
    format!(
        "# TYPE kvh_lat_seconds summary\n\
         kvh_lat_seconds_sum{{pid=\"{pid}\"}} 1\n\
         kvh_lat_seconds_count{{pid=\"{pid}\"}} 2\n\
         # TYPE kvh_z gauge\n\
         kvh_z{{pid=\"{pid}\"}} 1\n"
    )
}

/// Two processes' files that type a family otherwise in another way than two `# TYPE` lines
/// for one name: one declares `kvh_lat_seconds` a summary (so `kvh_lat_seconds_sum` is its
/// sum), the other declares `kvh_lat_seconds_sum` a gauge of its own. When `serve-metrics`
/// cannot merge them, the reason names the two files (or processes), as it does for a
/// series both hold or a family both declare with different types, not only a line number
/// of the merged text.
#[test]
fn a_per_process_merge_of_a_summary_and_a_gauge_named_as_its_sum_names_the_files() {
    let two = TwoProcesses::new();
    let gauge = |pid: u32| {
        format!("# TYPE kvh_lat_seconds_sum gauge\nkvh_lat_seconds_sum{{pid=\"{pid}\"}} 3\n")
    };
    let _ = two.merge(summary, gauge);
}

/// Two processes' files: one declares `kvh_lat_seconds` a summary; the other holds samples
/// named `kvh_lat_seconds_sum` and `kvh_lat_seconds_count` under no `# TYPE` line (untyped, a
/// family of their own there). Merged, those samples would fall under the summary or not by
/// the order of the files. `serve-metrics` judges the two files alike in either order, and
/// when it cannot merge them the reason names the two files (or processes).
#[test]
fn a_per_process_merge_of_a_summary_and_untyped_samples_named_as_its_sum_names_the_files() {
    let two = TwoProcesses::new();
    let untyped = |pid: u32| {
        format!(
            "kvh_lat_seconds_sum{{pid=\"{pid}\"}} 3\n\
             # TYPE kvh_y gauge\n\
             kvh_y{{pid=\"{pid}\"}} 1\n\
             kvh_lat_seconds_count{{pid=\"{pid}\"}} 4\n"
        )
    };
    let summary_first = two.merge(summary, untyped).is_ok();
    let untyped_first = two.merge(untyped, summary).is_ok();
    assert_eq!(
        summary_first, untyped_first,
        "the two files are merged in one order and refused in the other"
    );
}

/// A pattern that ends in `/.` names a directory, as one with a trailing slash does (and as
/// KVH_METRICS_FILE refuses it): `{pid}` there is in a directory, not in a file name, and
/// the readers refuse it.
#[test]
fn a_pid_pattern_that_ends_in_a_dot_component_is_refused_as_a_directory() {
    use kvhygiene::metrics::per_process::Target;
    let err = Target::of("/run/kvh/{pid}/".into()).unwrap_err();
    assert!(err.contains("file name only"), "{err}");
    let got = Target::of("/run/kvh/{pid}/.".into());
    assert!(
        got.as_ref().is_err_and(|e| e.contains("file name only")),
        "/run/kvh/{{pid}}/. was taken as a pattern: {got:?}"
    );
}

/// A finite snapshot time before 1970 is named as the file writes it (the line an operator
/// searches for): one written in exponent notation too.
#[test]
fn a_negative_snapshot_time_in_exponent_notation_is_named_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let early = dir.path().join("early.prom");
    std::fs::write(&early, "kvh_snapshot_timestamp_seconds -1e-7\n").unwrap();
    let (code, _, err) = run(kvh().args(["metrics", "--file"]).arg(&early));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is -1e-7,"),
        "the message names another spelling than the file's -1e-7: {err}"
    );
}

/// A snapshot cut at a line end (a writer that is not atomic, a copy into the shared volume)
/// still parses and has its time, but lacks the series the alerts read: served with a 200,
/// those series would vanish and the alerts go quiet. It is answered 503, as a file that is
/// not a snapshot, the missing series named on stderr.
#[test]
fn serve_metrics_refuses_a_snapshot_cut_short_at_a_line_end() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    write_snapshot(&f, Duration::ZERO, 0);
    let whole = std::fs::read_to_string(&f).unwrap();
    let side = sidecar(&f, &[]);
    let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(http(side.addr, get).0, 200);
    // Cut just after the snapshot's time.
    let at = whole.find("\nkvh_snapshot_timestamp_seconds ").unwrap();
    let end = at + 1 + whole[at + 1..].find('\n').unwrap() + 1;
    std::fs::write(&f, &whole[..end]).unwrap();
    let (status, _, body) = http(side.addr, get);
    assert_eq!((status, body.as_str()), (503, UNAVAILABLE));
    // One series the alerts read gone: refused too.
    let without: String = whole
        .lines()
        .filter(|l| !l.starts_with("kvh_residue_detected_total "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&f, without).unwrap();
    assert_eq!(http(side.addr, get).0, 503);
    std::fs::write(&f, &whole).unwrap();
    assert_eq!(http(side.addr, get).0, 200);
    let err = side.stderr();
    assert!(
        err.contains("kvh_residue_detected_total") && err.contains("cut short"),
        "{err}"
    );
}

/// The last snapshot of a process that is gone whose series collide with a live process's
/// (a copy of the live one's file left under a gone process's id) is left out, not a reason
/// to answer 503 for the live ones.
#[test]
fn serve_metrics_leaves_out_a_gone_processs_file_that_collides_with_a_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let me = std::process::id();
    let mine = dir.path().join(format!("kvh-{me}.prom"));
    write_process_snapshot(&mine, me, Duration::ZERO, 0);
    let gone = ended_pid();
    std::fs::copy(&mine, dir.path().join(format!("kvh-{gone}.prom"))).unwrap();
    let side = sidecar(&pattern, &["--max-age", "60"]);
    let (status, _, body) = http(side.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200, "{body}\n{}", side.stderr());
    let parsed = kvhygiene::metrics::parse::parse(&body).unwrap();
    assert_eq!(
        parsed.value("kvh_allocations_total", &[("pid", me.to_string().as_str())]),
        Some(f64::from(me % 1000 + 1)),
        "{body}"
    );
}
