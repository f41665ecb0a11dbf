//! `kvh gate`, run as the built binary: admit (0), evict (1) and usage errors (2), from metrics
//! snapshots written by the library's own encoder and from real forensic logs.

#[path = "cli_common/mod.rs"]
mod cli_common;
#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use cli_common::{kvh, run, runtime_stats};
use kvhygiene::metrics::{encode, ExporterStats};
use kvhygiene::stats::PoolCounters;

/// A snapshot taken `age` ago of a pool whose counters `set` adjusts, with `anomalies`
/// (signal, count) series in place of the encoder's own, when given.
fn snapshot(
    path: &Path,
    age: Duration,
    set: impl FnOnce(&mut PoolCounters),
    anomalies: &[(&str, u64)],
) {
    let mut pool = PoolCounters::default();
    pool.counters.allocations = 5;
    set(&mut pool);
    let text = encode(
        &runtime_stats(pool),
        &ExporterStats::default(),
        SystemTime::now() - age,
    );
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| anomalies.is_empty() || !l.starts_with("kvh_anomalies_total"))
        .map(str::to_string)
        .collect();
    // As the encoder writes them with the detector on: a series for every signal.
    if !anomalies.is_empty() {
        detector_on(&mut lines);
        for signal in kvhygiene::gate::CONTROL_SIGNALS
            .iter()
            .chain(kvhygiene::gate::CALLER_SIGNALS)
        {
            let n = anomalies
                .iter()
                .find(|(s, _)| s == signal)
                .map_or(0, |(_, n)| *n);
            lines.push(format!("kvh_anomalies_total{{signal=\"{signal}\"}} {n}"));
        }
        for (signal, n) in anomalies {
            if !kvhygiene::gate::CONTROL_SIGNALS.contains(signal)
                && !kvhygiene::gate::CALLER_SIGNALS.contains(signal)
            {
                lines.push(format!("kvh_anomalies_total{{signal=\"{signal}\"}} {n}"));
            }
        }
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Turns the snapshot's `kvh_anomaly_enabled 0` (the detector off, as `runtime_stats` exports
/// it) into the 1 of a process whose detector is on.
fn detector_on(lines: &mut [String]) {
    let gauge = lines
        .iter_mut()
        .find(|l| l.as_str() == "kvh_anomaly_enabled 0")
        .expect("the detector's gauge");
    *gauge = "kvh_anomaly_enabled 1".to_string();
}

/// A whole snapshot, as the encoder writes it now, of a process whose anomaly detector is on
/// with the default policy.
fn with_the_detector_on() -> String {
    use kvhygiene::anomaly;
    use kvhygiene::config::AnomalyConfig;
    let mut stats = runtime_stats(PoolCounters::default());
    stats.anomaly = anomaly::layer(&AnomalyConfig::default(), None).stats_json();
    encode(&stats, &ExporterStats::default(), SystemTime::now())
}

fn gate(file: &Path, extra: &[&str]) -> (i32, String, String) {
    run(kvh().args(["gate", "--metrics-file"]).arg(file).args(extra))
}

#[test]
fn a_healthy_process_is_admitted_with_notes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(
        &f,
        Duration::ZERO,
        |p| {
            // Of the gate's five scrubbed blocks, two were a new cache's first claims.
            p.counters.kv_gate_scrubbed_blocks = 5;
            p.counters.kv_gate_owner_changed_blocks = 3;
            p.counters.invalid_frees = 1;
            p.counters.kv_scrubs_refused = 3;
            p.counters.kv_claims_refused = 2;
        },
        &[("residue", 0)],
    );
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ADMIT"), "{out}");
    // A refused `kvh_scrub_blocks` call (bad layout or ids, memory not live) leaves the KV
    // blocks the engine freed unzeroed: like a refused claim, it deserves a look.
    assert!(out.contains("kvh_kv_claims_refused_total = 2"), "{out}");
    assert!(
        out.contains("kvh_kv_scrubs_refused_total = 3"),
        "3 kvh_scrub_blocks calls were refused (their blocks left unzeroed), yet no note \
         names them:\n{out}"
    );
    assert!(
        out.contains("note: KV blocks changed owner without the engine's scrub")
            && out.contains("kvh_kv_gate_owner_changed_blocks_total = 3"),
        "{out}"
    );
    assert!(out.contains("kvh_invalid_frees_total = 1"), "{out}");
    // JSON for scripts; the file can come from the environment.
    let (code, out, _) = run(kvh().args(["gate", "--json"]).env("KVH_METRICS_FILE", &f));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "admit");
    assert_eq!(v["reasons"].as_array().unwrap().len(), 0);
    assert_eq!(v["max_age_seconds"], 60);
}

#[test]
fn a_new_caches_first_claims_scrubbed_by_the_gate_are_no_note() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(
        &f,
        Duration::ZERO,
        |p| p.counters.kv_gate_scrubbed_blocks = 64,
        &[("residue", 0)],
    );
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("changed owner"), "{out}");
}

#[test]
fn a_snapshot_without_the_owner_changed_series_notes_every_gate_scrub() {
    // A library older than kvh_kv_gate_owner_changed_blocks_total (a rolling upgrade): its
    // gate scrubs cannot be told apart, so all of them are noted, as such.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(
        &f,
        Duration::ZERO,
        |p| p.counters.kv_gate_scrubbed_blocks = 7,
        &[("residue", 0)],
    );
    let text = std::fs::read_to_string(&f).unwrap();
    let older: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("kvh_kv_gate_owner_changed_blocks_total"))
        .collect();
    std::fs::write(&f, older.join("\n") + "\n").unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("does not tell them apart")
            && out.contains("kvh_kv_gate_scrubbed_blocks_total = 7"),
        "{out}"
    );
}

#[test]
fn a_failed_control_evicts_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(
        &f,
        Duration::ZERO,
        |p| {
            p.counters.verifications_failed = 2;
            p.counters.residue_detected = 1;
        },
        &[],
    );
    let (code, out, _) = gate(&f, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("EVICT"), "{out}");
    assert!(out.contains("scrub verifications failed"), "{out}");
    assert!(out.contains("kvh_residue_detected_total = 1"), "{out}");
}

#[test]
fn a_stale_snapshot_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::from_secs(120), |_| {}, &[]);
    let (code, out, _) = gate(&f, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("stopped exporting"), "{out}");
    let (code, out, _) = gate(&f, &["--max-age", "600"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn anomalies_of_a_failed_control_evict_and_caller_errors_are_notes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    // A burst of invalid frees: caller bugs the allocator refused without harm.
    snapshot(
        &f,
        Duration::ZERO,
        |_| {},
        &[("invalid_free", 2), ("residue", 0)],
    );
    let (code, out, _) = gate(&f, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("note: the anomaly detector flagged bursts of caller errors")
            && out.contains("invalid_free=2"),
        "{out}"
    );
    let (code, out, _) = gate(&f, &["--strict-anomalies"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("anomaly detector flagged anomalies (invalid_free=2)"),
        "{out}"
    );
    // Anomalies of a failed control evict, whatever else is there.
    for signal in ["verify_failed", "residue", "quarantine"] {
        snapshot(
            &f,
            Duration::ZERO,
            |_| {},
            &[(signal, 1), ("invalid_free", 3)],
        );
        let (code, out, _) = gate(&f, &[]);
        assert_eq!(code, 1, "{signal}: {out}");
        assert!(out.contains(&format!("({signal}=1)")), "{out}");
    }
    // A signal the gate does not know is judged as a failed control.
    snapshot(&f, Duration::ZERO, |_| {}, &[("new_signal", 1)]);
    let (code, _, _) = gate(&f, &[]);
    assert_eq!(code, 1);
    // Values a counter cannot have are never a pass, and never cancel out.
    for bad in [
        &[("residue", f64::NAN)][..],
        &[("residue", 3.0), ("quarantine", -3.0)],
        &[("invalid_free", f64::NAN)],
        &[("policy_violation", -5.0)],
    ] {
        write_raw_anomalies(&f, bad);
        let (code, out, _) = gate(&f, &[]);
        assert_eq!(code, 1, "{bad:?}: {out}");
    }
}

/// A caller signal's series holding a value no counter can have (NaN, negative) is judged as
/// a failed control even when every control signal's series is present and zero: the value
/// alone evicts, not the missing series around it.
#[test]
fn an_impossible_caller_signal_value_evicts_with_every_control_series_present() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    for (signal, bad) in [("invalid_free", f64::NAN), ("policy_violation", -5.0)] {
        let mut values: Vec<(&str, f64)> = kvhygiene::gate::CONTROL_SIGNALS
            .iter()
            .chain(kvhygiene::gate::CALLER_SIGNALS)
            .map(|s| (*s, 0.0))
            .collect();
        // The same snapshot with a zero there is admitted: only the value differs.
        write_raw_anomalies(&f, &values);
        let (code, out, _) = gate(&f, &[]);
        assert_eq!(code, 0, "{signal}: {out}");
        for v in values.iter_mut().filter(|(s, _)| *s == signal) {
            v.1 = bad;
        }
        write_raw_anomalies(&f, &values);
        let (code, out, _) = gate(&f, &[]);
        assert_eq!(code, 1, "{signal}={bad}: {out}");
        assert!(out.contains("anomaly detector flagged anomalies"), "{out}");
    }
}

/// Like [`snapshot`], with raw anomaly values (which may be ones a counter cannot have).
fn write_raw_anomalies(path: &Path, values: &[(&str, f64)]) {
    snapshot(path, Duration::ZERO, |_| {}, &[]);
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("kvh_anomalies_total"))
        .map(str::to_string)
        .collect();
    detector_on(&mut lines);
    for (signal, v) in values {
        let v = if v.is_nan() {
            "NaN".to_string()
        } else {
            v.to_string()
        };
        lines.push(format!("kvh_anomalies_total{{signal=\"{signal}\"}} {v}"));
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn the_forensic_log_is_verified_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let log = dir.path().join("log");
    forensic_common::write_log(&forensic_common::cfg(&log, 1 << 20), 20, false);
    let (code, out, err) = gate(&f, &["--log-dir", log.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verified"), "{out}");
    // The checkpoint options reach the verification: with a pinned public key, a chain that
    // no signed checkpoint covers fails (its tail could have been cut).
    let prefix = dir.path().join("ckpt");
    let (code, _, err) = run(kvh().args(["keygen", "--out"]).arg(&prefix));
    assert_eq!(code, 0, "{err}");
    let public = prefix.with_extension("pub");
    let (code, out, _) = gate(
        &f,
        &[
            "--log-dir",
            log.to_str().unwrap(),
            "--public-key",
            public.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{out}");
    // A record rewritten: the log no longer verifies, the process is evicted.
    let file = &forensic_common::chain_files(&log)[0];
    let mut lines = forensic_common::read_lines(file);
    assert!(lines[5].contains("req-4"), "{}", lines[5]);
    lines[5] = lines[5].replace("req-4", "req-X");
    forensic_common::write_lines(file, &lines);
    let (code, out, _) = gate(&f, &["--log-dir", log.to_str().unwrap(), "--json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "evict");
    assert_eq!(v["log"]["verified"], false);
    assert!(
        v["reasons"][0]
            .as_str()
            .unwrap()
            .contains("forensic log does not verify"),
        "{v}"
    );
}

/// After an HMAC key rotation the log holds chains sealed with each secret: every key file
/// given reaches the verification.
#[test]
fn a_log_sealed_with_a_rotated_key_is_admitted_with_every_key() {
    use kvhygiene::events::EventSink;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let log = dir.path().join("log");
    let mut keys = Vec::new();
    for (name, secret) in [
        ("old", "old-secret-0123456789abcdef"),
        ("new", "new-secret-0123456789abcdef"),
    ] {
        let secret = zeroize::Zeroizing::new(secret.as_bytes().to_vec());
        let cfg = forensic_common::cfg(&log, 1 << 20);
        let w = kvhygiene::forensic::ForensicLog::open_with_secret(
            &cfg,
            forensic_common::start(),
            Some(secret.clone()),
        )
        .unwrap();
        w.emit(forensic_common::event(0));
        w.stop();
        let key = dir.path().join(format!("{name}.key"));
        std::fs::write(&key, &*secret).unwrap();
        keys.push(key.to_str().unwrap().to_string());
    }
    let l = log.to_str().unwrap();
    let (code, out, _) = gate(&f, &["--log-dir", l, "--key-file", &keys[1]]);
    assert_eq!(code, 1, "{out}");
    let (code, out, err) = gate(
        &f,
        &[
            "--log-dir",
            l,
            "--key-file",
            &keys[1],
            "--key-file",
            &keys[0],
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// A snapshot dated over 5 s ahead of the clock (the clock stepped back after it was written)
/// has no age to judge: a usage error (2), which fails a readiness probe as an eviction
/// would, until the process writes its next snapshot; 4 s ahead is still judged.
#[test]
fn a_snapshot_from_the_future_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let write_at = |at: SystemTime| {
        let text = encode(
            &runtime_stats(PoolCounters::default()),
            &ExporterStats::default(),
            at,
        );
        std::fs::write(&f, text).unwrap();
    };
    write_at(SystemTime::now() + Duration::from_secs(3600));
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("in the future"), "{err}");
    write_at(SystemTime::now() + Duration::from_secs(4));
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn bad_input_is_a_usage_error_not_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.prom");
    let (code, _, err) = gate(&missing, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("nope.prom"), "{err}");
    let junk = dir.path().join("junk.prom");
    std::fs::write(&junk, "hello world\n").unwrap();
    let (code, _, err) = gate(&junk, &[]);
    assert_eq!(code, 2, "{err}");
    // No file named and none configured.
    let (code, _, err) = run(kvh().arg("gate"));
    assert_eq!(code, 2);
    assert!(err.contains("no metrics file"), "{err}");
    // A per-process pattern whose directory does not exist: nothing to judge.
    let absent = dir.path().join("absent/kvh-{pid}.prom");
    let (code, _, err) = run(kvh().arg("gate").env("KVH_METRICS_FILE", &absent));
    assert_eq!(code, 2);
    assert!(
        err.contains("absent") && err.contains("kvh-{pid}.prom"),
        "{err}"
    );
    // An empty log directory is evidence that is missing: evict, not a usage error; a
    // directory that does not exist is a usage error.
    let good = dir.path().join("kvh.prom");
    snapshot(&good, Duration::ZERO, |_| {}, &[]);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, out, err) = gate(&good, &["--log-dir", empty.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("no forensic log records"), "{out}");
    let (code, _, err) = gate(&good, &["--log-dir", "/nonexistent/kvh-log"]);
    assert_eq!(code, 2, "{err}");
    // --key-file and --public-key need --log-dir, --checkpoint needs --public-key;
    // --max-age must be positive.
    for args in [
        &["--key-file", "/dev/null"][..],
        &["--public-key", "/dev/null"],
        &["--log-dir", "/tmp", "--checkpoint", "/dev/null"],
    ] {
        let (code, _, _) = gate(&good, args);
        assert_eq!(code, 2, "{args:?}");
    }
    let (code, _, _) = gate(&good, &["--max-age", "0"]);
    assert_eq!(code, 2);
}

#[test]
fn a_pruned_log_is_admitted_only_with_allow_pruned() {
    use kvhygiene::events::EventSink;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let log = dir.path().join("log");
    // An open chain of several files: its writer is still running.
    let writer = kvhygiene::forensic::ForensicLog::open_with_secret(
        &forensic_common::cfg(&log, 4096),
        forensic_common::start(),
        Some(forensic_common::secret()),
    )
    .unwrap();
    let key = dir.path().join("hmac.key");
    std::fs::write(&key, &*forensic_common::secret()).unwrap();
    for i in 0..60 {
        writer.emit(forensic_common::event(i));
    }
    writer.flush();
    std::mem::forget(writer);
    prune_into_archive(&log, &dir.path().join("archive"), &key);
    let l = log.to_str().unwrap();
    let k = key.to_str().unwrap();
    let (code, out, _) = gate(&f, &["--log-dir", l, "--key-file", k]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing"), "{out}");
    let (code, out, err) = gate(&f, &["--log-dir", l, "--key-file", k, "--allow-pruned"]);
    assert_eq!(code, 0, "{out}{err}");
    // The manifests are taken only with their key.
    let (code, _, err) = gate(&f, &["--log-dir", l, "--allow-pruned"]);
    assert_eq!(code, 2, "{err}");
}

/// A checked series with several samples (a label the checks do not name: a second device, a
/// second process's `pid`) is judged by every sample: a non-zero one after a zero one evicts,
/// as the anomaly check beside it reads every series.
#[test]
fn a_failure_in_any_sample_of_a_checked_series_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let text = std::fs::read_to_string(&f).unwrap();
    let text = text.replace(
        "kvh_residue_detected_total 0\n",
        "kvh_residue_detected_total{device=\"0\"} 0\nkvh_residue_detected_total{device=\"1\"} 3\n",
    );
    assert!(text.contains("{device=\"1\"} 3"), "{text}");
    std::fs::write(&f, text).unwrap();
    // The file is a valid exposition (two distinct series).
    let (code, out, err) = run(kvh()
        .args(["metrics", "--fail-on-security", "--file"])
        .arg(&f));
    assert_eq!(
        code, 1,
        "kvh metrics --fail-on-security passed residue = 3: {out}{err}"
    );
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 1, "kvh gate admitted residue = 3: {out}{err}");
    assert!(out.contains("kvh_residue_detected_total"), "{out}");
}

/// `--strict-anomalies` makes the anomalies a check: a snapshot without them (the detector off)
/// cannot pass it, where the default judges the control and notes the missing series.
#[test]
fn strict_anomalies_evict_when_the_anomaly_series_are_missing() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(!text.contains("kvh_anomalies_total"), "{text}");
    let (code, out, _) = gate(&f, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("kvh_anomalies_total is not in the snapshot"),
        "{out}"
    );
    let (code, out, _) = gate(&f, &["--strict-anomalies"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("kvh_anomalies_total is missing from the snapshot: --strict-anomalies cannot be checked"),
        "{out}"
    );
}

/// The snapshot is written by the inference process (or whoever can write its shared
/// volume): label values it holds reach the verdict's reasons and notes. Control characters
/// in them are shown escaped, as `kvh metrics` shows the same snapshot, never written raw to
/// the operator's terminal (where they can retitle the window, rewrite earlier lines, or hide
/// the reason behind a cursor move).
#[test]
fn control_characters_of_the_snapshot_never_reach_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(
        &f,
        Duration::ZERO,
        |_| {},
        &[
            ("\u{1b}]0;admit\u{7}\u{1b}[2K\u{1b}[1A", 1),
            ("invalid_free", 0),
        ],
    );
    let (_, metrics_out, _) = run(kvh().args(["metrics", "--file"]).arg(&f));
    assert!(!metrics_out.contains('\u{1b}'), "{metrics_out:?}");
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 1, "an unknown anomaly signal evicts: {out}{err}");
    assert!(
        !out.contains('\u{1b}') && !out.contains('\u{7}'),
        "raw control characters from the snapshot in the verdict: {out:?}"
    );
}

/// `kvh gate --help` and the README: exit 2 when "the metrics file (or log) is missing,
/// unreadable or not kvhygiene's"; 1 (evict) is a verdict on the process. A log the probe
/// cannot read (it runs under another uid than the writer, whose files are 0600) is an
/// input the gate could not judge, not a log that "does not verify": evicting every replica
/// with a reason that reads as tampering sends the operator after the wrong problem.
#[test]
fn a_log_the_gate_cannot_read_is_a_usage_error_not_an_eviction() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let open = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(tmp.path(), 0o755);
    let dir = tmp.path().join("log");
    forensic_common::write_log(&forensic_common::cfg(&dir, 1 << 20), 3, false);
    open(&dir, 0o755);
    let chain = forensic_common::chain_files(&dir);
    assert_eq!(chain.len(), 1);
    // The writer's files: its own uid only (root reads anything: the probe runs as nobody).
    open(&chain[0], 0o000);
    let f = tmp.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[("residue", 0)]);
    open(&f, 0o644);
    let mut cmd = kvh();
    cmd.args(["gate", "--metrics-file"])
        .arg(&f)
        .arg("--log-dir")
        .arg(&dir);
    // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::geteuid() == 0
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (code, out, err) = run(&mut cmd);
    assert!(
        out.contains("Permission denied") || err.contains("Permission denied"),
        "the chain file must be unreadable to the probe: {out}{err}"
    );
    assert_eq!(
        code, 2,
        "an unreadable log is judged as a log that does not verify: {out}{err}"
    );
}

/// A snapshot of a process whose anomaly detector is on (`kvh_anomaly_enabled 1`, which the
/// encoder writes with a series for every signal from the start) that lacks the series of the
/// signals that mean the control failed (`verify_failed`, `residue`, `quarantine`) cannot show
/// those anomalies: the snapshot is cut short or not the encoder's. What was not checked is not
/// a pass (the security checks beside it fail on a missing series), and the detector is not
/// "off" when the snapshot says it is on.
#[test]
fn a_snapshot_with_the_detector_on_but_without_its_control_signals_is_not_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let full = with_the_detector_on();
    assert!(full.contains("kvh_anomaly_enabled 1\n"), "{full}");
    assert!(
        full.contains("kvh_anomalies_total{signal=\"quarantine\"} 0\n"),
        "{full}"
    );
    // The whole file, as the encoder writes it: admitted.
    std::fs::write(&f, &full).unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 0, "{out}{err}");

    // Cut after the caller signals' series: the control signals' series are gone, and the
    // anomaly family reads as all zero.
    let cut = full
        .find("kvh_anomalies_total{signal=\"verify_failed\"}")
        .expect("verify_failed series");
    std::fs::write(&f, &full[..cut]).unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(
        code, 1,
        "admitted without the verify_failed, residue and quarantine anomaly series: {out}{err}"
    );

    // Cut before every anomaly series, after `kvh_anomaly_enabled 1`: the detector is on,
    // its counts are missing.
    let cut = full
        .find("# HELP kvh_anomalies_total")
        .expect("the anomaly family");
    std::fs::write(&f, &full[..cut]).unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert!(
        !out.contains("the anomaly detector is off"),
        "the verdict says the detector is off of a snapshot that says it is on: {out}"
    );
    assert_eq!(
        code, 1,
        "admitted without any anomaly series from a detector that is on: {out}{err}"
    );
}

/// A snapshot whose `kvh_snapshot_timestamp_seconds` is there but not a time (NaN, ±Inf) has
/// no age and is refused (exit 2); the message says what is wrong with the series rather than
/// that it is absent, which sends the operator looking for a missing line that is there.
#[test]
fn a_timestamp_that_is_not_a_number_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let text = std::fs::read_to_string(&f).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with("kvh_snapshot_timestamp_seconds "))
        .expect("the timestamp sample");
    for bad in ["NaN", "+Inf", "-Inf"] {
        lines[i] = format!("kvh_snapshot_timestamp_seconds {bad}");
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        let (code, out, err) = gate(&f, &[]);
        assert_eq!(code, 2, "{bad}: {out}{err}");
        assert!(
            !err.contains("(no kvh_snapshot_timestamp_seconds)"),
            "a {bad} timestamp is reported as a missing series: {err}"
        );
        assert!(
            err.contains(bad),
            "the message does not name the value {bad}: {err}"
        );
    }
}

/// With `--log-dir` the gate reads the whole log, which takes a while on a large one; the
/// staleness it judges is the snapshot's age when it was read, not that age plus the time the
/// log took to verify. Here the process rewrites its snapshot every 100 ms throughout the run
/// (never more than a fraction of a second old), so "stopped exporting" is not a true verdict.
#[test]
fn the_time_spent_verifying_the_log_does_not_age_the_snapshot() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let log = dir.path().join("log");
    // About three seconds of verification in a debug build.
    forensic_common::write_log(&forensic_common::cfg(&log, 64 << 20), 100_000, false);
    // The exporter's atomic replacement, every 100 ms.
    let write = {
        let f = f.clone();
        move || {
            let tmp = f.with_extension("tmp");
            snapshot(&tmp, Duration::ZERO, |_| {}, &[]);
            std::fs::rename(&tmp, &f).unwrap();
        }
    };
    write();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let write = write.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                write();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let started = std::time::Instant::now();
    let (code, out, err) = gate(&f, &["--max-age", "1", "--log-dir", log.to_str().unwrap()]);
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(
        !out.contains("stopped exporting"),
        "judged stale after {took:?} of log verification while the snapshot was rewritten \
         every 100 ms: {out}{err}"
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// A multi-process engine writes one file per process (`{pid}` in `KVH_METRICS_FILE`): the
/// gate given the pattern judges every live process's file, evicts when one process fails,
/// lists the files of processes that are gone without judging them, and judges nothing (exit
/// 2) when no live process has a file.
#[test]
fn a_per_process_pattern_judges_every_live_process() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let live = std::process::id();
    let gone = {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    let file = |pid: u32| dir.path().join(format!("kvh-{pid}.prom"));
    snapshot(&file(live), Duration::ZERO, |_| {}, &[]);
    // A worker that ended left a failed snapshot: not judged.
    snapshot(
        &file(gone),
        Duration::ZERO,
        |p| p.counters.verifications_failed = 1,
        &[],
    );
    let (code, out, err) = gate(&pattern, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ADMIT: 0 of 1 processes"), "{out}");
    assert!(
        out.contains(&format!("note: process {gone} is gone")),
        "{out}"
    );
    // The live process fails: evicted, and the JSON says which.
    snapshot(
        &file(live),
        Duration::ZERO,
        |p| p.counters.residue_detected = 1,
        &[],
    );
    let (code, out, err) = gate(&pattern, &["--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "evict");
    assert_eq!(v["processes"][0]["pid"], live);
    assert_eq!(v["processes"][0]["verdict"], "evict");
    assert_eq!(v["gone"][0]["pid"], gone);
    // No live process's file: nothing judged.
    std::fs::remove_file(file(live)).unwrap();
    let (code, out, err) = gate(&pattern, &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("no metrics file of a live process"), "{err}");
    // `{pid}` in a directory is refused.
    let (code, _, err) = gate(&dir.path().join("{pid}/kvh.prom"), &[]);
    assert_eq!(code, 2);
    assert!(err.contains("in the file name only"), "{err}");
}

/// A snapshot only a little older than --max-age evicts; the same one within it is admitted.
#[test]
fn a_snapshot_just_past_max_age_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::from_secs(65), |_| {}, &[]);
    let (code, out, _) = gate(&f, &["--max-age", "60"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("stopped exporting"), "{out}");
    let (code, out, _) = gate(&f, &["--max-age", "70"]);
    assert_eq!(code, 0, "{out}");
}

/// An anomaly series without a `signal` label cannot be told to be a caller's error: a count
/// on it evicts, even with every known signal's series present and zero.
#[test]
fn an_anomaly_count_without_a_signal_label_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let values: Vec<(&str, f64)> = kvhygiene::gate::CONTROL_SIGNALS
        .iter()
        .chain(kvhygiene::gate::CALLER_SIGNALS)
        .map(|s| (*s, 0.0))
        .collect();
    write_raw_anomalies(&f, &values);
    let (code, out, _) = gate(&f, &[]);
    assert_eq!(code, 0, "{out}");
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, text + "kvh_anomalies_total 3\n").unwrap();
    let (code, out, _) = gate(&f, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("anomaly detector flagged anomalies (3)"),
        "{out}"
    );
}

/// A snapshot with anomaly series but no `kvh_anomaly_enabled` line (an older or hand-made
/// file) still has its control signals checked: without their series it is not admitted.
#[test]
fn anomaly_series_without_the_control_signals_evict_even_without_the_enabled_gauge() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let callers: Vec<(&str, f64)> = kvhygiene::gate::CALLER_SIGNALS
        .iter()
        .map(|s| (*s, 0.0))
        .collect();
    write_raw_anomalies(&f, &callers);
    let text = std::fs::read_to_string(&f)
        .unwrap()
        .replace("kvh_anomaly_enabled 1\n", "");
    assert!(!text.contains("\nkvh_anomaly_enabled "), "{text}");
    std::fs::write(&f, &text).unwrap();
    let (code, out, _) = gate(&f, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("kvh_anomalies_total{signal=\"verify_failed\"} is missing"),
        "{out}"
    );
}

/// A snapshot missing one caller signal's series is not admitted, with --strict-anomalies
/// or without: the encoder writes every signal's series, so the snapshot is cut short or not
/// its own.
#[test]
fn a_snapshot_missing_one_caller_signal_series_is_evicted_with_or_without_strict_anomalies() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let values: Vec<(&str, f64)> = kvhygiene::gate::CONTROL_SIGNALS
        .iter()
        .chain(kvhygiene::gate::CALLER_SIGNALS)
        .filter(|s| **s != "size_mismatch")
        .map(|s| (*s, 0.0))
        .collect();
    write_raw_anomalies(&f, &values);
    for flags in [&[][..], &["--strict-anomalies"][..]] {
        let (code, out, _) = gate(&f, flags);
        assert_eq!(code, 1, "{flags:?}: {out}");
        assert!(
            out.contains("kvh_anomalies_total{signal=\"size_mismatch\"} is missing"),
            "{flags:?}: {out}"
        );
    }
}

/// --checkpoint reaches the log verification: a log whose signed checkpoints are kept outside
/// its directory is admitted when they are named, and evicted when they are not.
#[test]
fn checkpoints_kept_outside_the_log_are_read_from_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let log = dir.path().join("log");
    let ck = dir.path().join("ckpt");
    let (key, public) = kvhygiene::forensic::cli::keygen(&dir.path().join("signer")).unwrap();
    let mut c = forensic_common::cfg(&log, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ck.clone());
    forensic_common::write_log(&c, 20, false);
    let (log, ck, public) = (
        log.to_str().unwrap(),
        ck.to_str().unwrap(),
        public.to_str().unwrap(),
    );
    let named = ["--log-dir", log, "--public-key", public, "--checkpoint", ck];
    let (code, out, err) = gate(&f, &named);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = gate(&f, &named[..4]);
    assert_eq!(code, 1, "{out}{err}");
}

/// A checked series whose value is `+Inf` evicts, and the reason spells the value as the
/// exposition and `kvh metrics` do (`+Inf`), not as Rust prints an f64 (`inf`).
#[test]
fn a_failed_control_of_infinite_value_is_spelled_as_in_the_exposition() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
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
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("kvh_residue_detected_total = +Inf"),
        "the eviction reason spells the value otherwise than the snapshot (+Inf): {out}"
    );
}

/// A forensic log whose writes failed without losing records (a failed fsync; a chain file
/// removed from the directory while in use, its records gone with it) is not a security
/// failure of the snapshot, but it is named: the process is admitted with a note.
#[test]
fn forensic_write_errors_without_lost_records_are_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let mut stats = runtime_stats(PoolCounters::default());
    stats.log = serde_json::to_value(kvhygiene::forensic::LogStats {
        enabled: true,
        write_errors: 2,
        ..Default::default()
    })
    .ok();
    let text = encode(&stats, &ExporterStats::default(), SystemTime::now());
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("note: the forensic log's writes or fsyncs failed")
            && out.contains("kvh_log_write_errors_total = 2"),
        "{out}"
    );
}

/// A snapshot cut short before the anomaly detector's family (the file ends after the
/// forensic log's series, or inside the detector's `# HELP` line, both of which still parse)
/// holds every security series but neither `kvh_anomaly_enabled` nor any anomaly count. The
/// process that wrote it has the detector on, and nothing in the file shows whether an anomaly
/// of a failed control was flagged: what was not checked is not a pass, as for a snapshot cut
/// after `kvh_anomaly_enabled 1`. The reason given is the missing gauge, not also a detector
/// "on" that nothing in the file says.
#[test]
fn a_snapshot_cut_before_the_anomaly_family_is_not_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let full = with_the_detector_on();
    assert!(full.contains("kvh_anomaly_enabled 1\n"), "{full}");
    let help = full
        .find("# HELP kvh_anomaly_enabled")
        .expect("the detector's gauge");
    // At a line boundary, and inside the gauge's help text.
    for cut in [help, help + "# HELP kvh_anomaly_enabled 1 when".len()] {
        std::fs::write(&f, &full[..cut]).unwrap();
        let (code, out, err) = gate(&f, &[]);
        assert_ne!(
            code,
            0,
            "admitted a snapshot cut {} bytes short, before the anomaly detector's series: \
             {out}{err}",
            full.len() - cut
        );
        // (Cut inside a line, the file is refused as cut short instead.)
        if cut == help {
            let said = format!("{out}{err}");
            assert!(
                said.contains("kvh_anomaly_enabled is missing from the snapshot"),
                "{said}"
            );
            assert!(!said.contains("says the anomaly detector is on"), "{said}");
            assert!(!said.contains("signal cannot be checked"), "{said}");
        }
    }
}

/// `kvh gate --help` lists, beside exit 0, what is printed as notes. A refused
/// `kvh_scrub_blocks` call (its KV blocks were not zeroed) is one of them, as the module
/// documentation, the README and docs/operations.md ("see `kvh gate`'s notes") say.
#[test]
fn the_help_names_every_note_the_gate_prints() {
    let (code, out, err) = run(kvh().args(["gate", "--help"]));
    assert_eq!(code, 0, "{out}{err}");
    let notes = out
        .split("  0  admit")
        .nth(1)
        .and_then(|s| s.split("  1  evict").next())
        .expect("the exit 0 paragraph");
    let flat = notes.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains("refused claims") && flat.contains("KV scrubs"),
        "the help's notes omit refused KV scrubs (kvh_kv_scrubs_refused_total), which the gate \
         prints as a note:\n{notes}"
    );
}

/// A snapshot whose `kvh_anomaly_enabled` gauge holds a value no gauge of the encoder can
/// have (NaN: it writes 0 or 1) and that has no anomaly counts is corrupt: the gate cannot
/// tell whether the detector was on, so its anomalies were not checked. Values that are not
/// understood are not a pass, as for the anomaly counters themselves.
#[test]
fn an_impossible_detector_gauge_without_anomaly_counts_is_not_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let full = with_the_detector_on();
    let cut = full
        .find("# HELP kvh_anomalies_total")
        .expect("the anomaly family");
    let text = full[..cut].replace("kvh_anomaly_enabled 1\n", "kvh_anomaly_enabled NaN\n");
    assert!(text.contains("kvh_anomaly_enabled NaN\n"), "{text}");
    std::fs::write(&f, &text).unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert_ne!(
        code, 0,
        "admitted a snapshot whose kvh_anomaly_enabled is NaN and that has no anomaly counts: \
         {out}{err}"
    );
}

/// A snapshot that says the anomaly detector is on (`kvh_anomaly_enabled 1`) carries a series
/// for every signal from the start. One that lacks a caller signal's series (here the file
/// ends after the control signals' series, a cut at a line boundary) is cut short or not the
/// encoder's: a signal of a detector that is on is missing, and what was not checked is not a
/// pass, with or without `--strict-anomalies`.
#[test]
fn a_snapshot_with_the_detector_on_missing_a_caller_signal_series_is_not_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let full = with_the_detector_on();
    let cut = full
        .find("kvh_anomalies_total{signal=\"ttl_exceeded\"}")
        .expect("ttl_exceeded series");
    let text = &full[..cut];
    assert!(text.contains("kvh_anomaly_enabled 1\n"), "{text}");
    assert!(
        text.contains("kvh_anomalies_total{signal=\"quarantine\"} 0\n"),
        "{text}"
    );
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(
        code, 1,
        "admitted a snapshot whose detector is on but which has no ttl_exceeded or \
         policy_violation series: {out}{err}"
    );
}

/// A reason the gate gives for a log it cannot verify may point to options that would make it
/// verify; each option it names is one `kvh gate` accepts, so that the probe's operator can
/// follow it. Here every file of a stopped chain was moved by `kvh prune-log`, and the gate
/// is given the log without the key.
#[test]
fn the_options_a_reason_points_to_are_options_of_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let log = dir.path().join("log");
    forensic_common::write_log(&forensic_common::cfg(&log, 1 << 20), 3, true);
    let key = dir.path().join("hmac.key");
    std::fs::write(&key, &*forensic_common::secret()).unwrap();
    prune_into_archive(&log, &dir.path().join("archive"), &key);
    let (code, out, err) = gate(&f, &["--log-dir", log.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let (_, help, _) = run(kvh().args(["gate", "--help"]));
    let said = format!("{out}{err}");
    let unknown: Vec<&str> = said
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .filter(|w| !help.contains(&format!("{w} ")) && !help.contains(&format!("{w}\n")))
        .collect();
    assert!(
        unknown.is_empty(),
        "the verdict points to {unknown:?}, which `kvh gate` does not accept:\n{said}"
    );
}

/// Moves every file of the log in `log` older than 0 days into a new private archive
/// directory `archive` with `kvh prune-log`, which must succeed.
fn prune_into_archive(log: &std::path::Path, archive: &std::path::Path, key: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(archive).unwrap();
    std::fs::set_permissions(archive, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, out, err) = run(kvh()
        .arg("prune-log")
        .arg(log)
        .args(["--older-than", "0", "--archive-dir"])
        .arg(archive)
        .arg("--key-file")
        .arg(key));
    assert_eq!(code, 0, "{out}{err}");
}

/// `kvh_shut_down 1` says the allocator has shut down (`kvh_shutdown`, or process exit began):
/// no scrub or release runs any more. The exporter writes that last snapshot fresh, and it
/// stays under `--max-age` for up to a minute. A readiness gate asked "may this process keep
/// serving tenants" is expected to answer no for it at once (not "the hygiene control
/// working"), rather than only once the snapshot has aged past `--max-age`.
#[test]
fn a_fresh_snapshot_of_a_shut_down_allocator_is_not_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    let mut stats = runtime_stats(PoolCounters::default());
    stats.shut_down = true;
    let text = encode(&stats, &ExporterStats::default(), SystemTime::now());
    assert!(text.lines().any(|l| l == "kvh_shut_down 1"), "{text}");
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = gate(&f, &["--max-age", "60"]);
    assert_ne!(
        code, 0,
        "a snapshot saying the allocator shut down (no scrub runs any more) was admitted:\n{out}{err}"
    );
}

/// `kvh_shut_down` with several samples (a label the check does not name: a second device, a
/// second process's `pid`) is judged by every sample, as the security checks are: a sample
/// saying the allocator shut down evicts even after one that says 0.
#[test]
fn a_shut_down_sample_after_a_running_one_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(text.contains("kvh_shut_down 0\n"), "{text}");
    let text = text.replace(
        "kvh_shut_down 0\n",
        "kvh_shut_down{device=\"0\"} 0\nkvh_shut_down{device=\"1\"} 1\n",
    );
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(
        code, 1,
        "a snapshot with a kvh_shut_down sample of 1 was admitted: {out}{err}"
    );
    assert!(out.contains("kvh_shut_down"), "{out}");
}

/// A snapshot without `kvh_shut_down` (cut short, or not the encoder's, which writes it in
/// every snapshot) does not say the allocator still runs: it evicts, naming the series.
#[test]
fn a_snapshot_without_the_shut_down_series_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let text: String = std::fs::read_to_string(&f)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("kvh_shut_down"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(
        code, 1,
        "a snapshot without kvh_shut_down was admitted: {out}{err}"
    );
    assert!(
        out.contains("kvh_shut_down is missing from the snapshot"),
        "{out}"
    );
}

/// A `kvh_shut_down` value that is neither 0 nor 1 evicts, and the reason spells the value the
/// snapshot holds (as the exposition does), not another one.
#[test]
fn the_shut_down_reason_spells_the_value_of_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(text.contains("kvh_shut_down 0\n"), "{text}");
    std::fs::write(&f, text.replace("kvh_shut_down 0\n", "kvh_shut_down NaN\n")).unwrap();
    let (code, out, err) = gate(&f, &["--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let reasons: Vec<&str> = v["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .filter(|r| r.contains("kvh_shut_down"))
        .collect();
    assert_eq!(reasons.len(), 1, "{out}");
    assert!(
        reasons[0].contains("NaN") && !reasons[0].contains("kvh_shut_down 1"),
        "the reason names a value the snapshot does not hold (it holds NaN): {}",
        reasons[0]
    );
}

#[test]
fn each_failed_control_alone_evicts_naming_its_series() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvh.prom");
    snapshot(&f, Duration::ZERO, |_| {}, &[]);
    let healthy = std::fs::read_to_string(&f).unwrap();
    let (code, out, err) = gate(&f, &[]);
    assert_eq!(code, 0, "the healthy snapshot is admitted: {out}{err}");
    for series in cli_common::SECURITY_SERIES {
        let zero = format!("\n{series} 0\n");
        assert!(
            healthy.contains(&zero),
            "{series} is not in the snapshot at 0"
        );
        std::fs::write(&f, healthy.replace(&zero, &format!("\n{series} 3\n"))).unwrap();
        let (code, out, err) = gate(&f, &[]);
        assert_eq!(code, 1, "{series} = 3 was not evicted: {out}{err}");
        assert!(out.starts_with("EVICT"), "{series}: {out}");
        // Named by the metric (the check's line says which sample: "scrub verifications failed").
        let metric = series.split('{').next().unwrap_or(series);
        assert!(out.contains(&format!("{metric} = 3")), "{series}: {out}");
    }
}
