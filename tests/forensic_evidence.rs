//! `kvh evidence`: the auditor's report is built from verified records only, counts what the
//! log holds, lists every exception with its file:line, and exits as verify-log does.

mod forensic_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use forensic_common::{cfg, chain_files, forge_from, secret_key_file, start, write_log};
use kvhygiene::context::Context;
use kvhygiene::events::{
    Event, EventKind, EventSink, InvalidFreeReason, KvScrubRecord, KvScrubTrigger,
};
use kvhygiene::forensic::ForensicLog;
use serde_json::Value;

fn kvh(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    cmd.args(args);
    // Only the settings a test names: the developer's own KVH_* must not leak in.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd.envs(envs.iter().copied());
    cmd.output().expect("run kvh")
}

/// A demo run with the fault drill, logged into `dir`.
fn demo_log(dir: &Path, envs: &[(&str, &str)]) {
    let d = dir.to_str().expect("utf-8 path");
    let out = kvh(
        &[
            "demo",
            "--tenants",
            "2",
            "--requests",
            "3",
            "--inject-fault",
            "--log-dir",
            d,
        ],
        envs,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn evidence_json(dir: &Path, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["evidence", dir.to_str().expect("utf-8 path"), "--json"];
    args.extend_from_slice(extra);
    let out = kvh(&args, &[]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), v)
}

#[test]
fn a_verified_log_reports_activity_and_every_exception() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["integrity"]["verified"], true);
    assert_eq!(v["integrity"]["chains"], 1);
    let by_kind = &v["exceptions_by_kind"];
    assert_eq!(by_kind["verify_failed"], 1, "{v}");
    assert_eq!(by_kind["kv_verify_failed"], 1, "{v}");
    assert_eq!(by_kind["quarantine"], 1, "{v}");
    // The drill's failures also trip the anomaly detector: residue (the sabotaged free read
    // non-zero) and verify_failed (it and the sabotaged KV block), once each.
    assert_eq!(by_kind["anomaly"], 2, "{v}");
    assert_eq!(v["anomalies_by_signal"]["residue"], 1, "{v}");
    assert_eq!(v["anomalies_by_signal"]["verify_failed"], 1, "{v}");
    assert_eq!(v["exceptions"].as_array().unwrap().len(), 5);
    let first = &v["exceptions"][0];
    assert_eq!(first["kind"], "verify_failed");
    assert_eq!(first["tenant_id"], "tenant-victim");
    assert!(first["file"].as_str().unwrap().starts_with("kvh-"));
    assert!(first["detail"]
        .as_str()
        .unwrap()
        .contains("samples_nonzero="));
    // The counters come from the process's last summary; the KV figures from kv_scrub records.
    assert_eq!(v["counters"]["verifications_failed"], 1);
    assert!(v["counters"]["verifications_passed"].as_u64().unwrap() > 0);
    assert_eq!(v["kv_scrubs"]["failed_blocks"], 1);
    assert_eq!(
        v["kv_scrubs"]["calls"], v["records_by_kind"]["kv_scrub"],
        "one kv_scrub record per call"
    );
    assert_eq!(v["processes"][0]["clean_stop"], true);
    assert_eq!(v["tenants"], 3, "tenant-0, tenant-1 and the drill's victim");

    // The Markdown form says the same.
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&md.stdout);
    assert_eq!(md.status.code(), Some(0));
    assert!(text.contains("- VERIFIED: 1 chains"), "{text}");
    assert!(
        text.contains(
            "5 security records: anomaly 2, kv_verify_failed 1, quarantine 1, verify_failed 1."
        ),
        "{text}"
    );
    assert!(text.contains("SOC 2 CC6.5"), "{text}");
    assert!(
        text.contains("each is listed under Exceptions): residue 1, verify_failed 1."),
        "{text}"
    );

    // Listing is bounded; counting is not.
    let (_, few) = evidence_json(&dir, &["--max-exceptions", "1"]);
    assert_eq!(few["exceptions"].as_array().unwrap().len(), 1);
    assert_eq!(few["exceptions_by_kind"]["quarantine"], 1);
}

#[test]
fn a_tampered_chain_fails_and_is_left_out_of_the_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replacen("tenant-victim", "tenant-hidden", 1)).unwrap();
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["integrity"]["verified"], false);
    let problem = v["integrity"]["problems"][0].as_str().unwrap();
    assert!(problem.contains(".jsonl:"), "{problem}");
    // Nothing from the unverified chain is reported as fact.
    assert_eq!(v["processes"].as_array().unwrap().len(), 0);
    assert_eq!(v["exceptions"].as_array().unwrap().len(), 0);
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&md.stdout).contains("cannot be relied on"));
}

#[test]
fn never_reuse_retirements_are_the_control_not_exceptions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    // idle_ttl_ms = 0: every freed block is retired through quarantine (policy never_reuse).
    demo_log(&dir, &[("KVH_IDLE_TTL_MS", "0")]);
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert!(
        v["records_by_kind"]["quarantine"].as_u64().unwrap() > 1,
        "{v}"
    );
    // Only the drill's sabotaged block is an exception.
    assert_eq!(v["exceptions_by_kind"]["quarantine"], 1, "{v}");
}

#[test]
fn no_log_or_no_directory_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = kvh(&["evidence", tmp.path().to_str().unwrap()], &[]);
    assert_eq!(empty.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no forensic log records"));
    let missing = kvh(
        &["evidence", tmp.path().join("nope").to_str().unwrap()],
        &[],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope"));
}

#[test]
fn a_kv_scrub_that_did_not_finish_is_an_exception() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    let record = |error: Option<&str>| KvScrubRecord {
        device: 0,
        blocks: 2,
        verified_blocks: if error.is_some() { 0 } else { 2 },
        failed_blocks: 0,
        segments: 4,
        unverified_segments: if error.is_some() { 4 } else { 0 },
        bytes: 4096,
        first_seed: 10,
        stream: 0,
        regions: 2,
        block_bytes: 1024,
        block_stride: 1024,
        blocks_per_region: 8,
        layout_sha256: [7; 32],
        block_ids: Some(vec![1, 2]),
        block_ids_sha256: [9; 32],
        error: error.map(str::to_string),
        // The finished call is the gate's.
        trigger: if error.is_some() {
            KvScrubTrigger::Engine
        } else {
            KvScrubTrigger::Gate
        },
        // Of the gate's two blocks, one was a new cache's first claim, and the other was
        // dirty only because another scrub of it was in flight: no change of owner.
        unknown_owner_blocks: u64::from(error.is_none()),
        owner_changed_blocks: 0,
        withdrawn_blocks: 0,
    };
    for error in [None, Some("stream 0x4 is capturing a CUDA graph")] {
        log.emit(Event {
            at: SystemTime::now(),
            kind: EventKind::KvScrubbed(Box::new(record(error))),
            context: Context::new(Some("tenant-a"), Some("req-1"), None).unwrap(),
            block: None,
            addr: None,
        });
    }
    log.stop();
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["kv_scrubs"]["calls"], 2);
    assert_eq!(v["kv_scrubs"]["unfinished_calls"], 1);
    assert_eq!(
        (
            v["kv_scrubs"]["gate_calls"].as_u64(),
            v["kv_scrubs"]["gate_blocks"].as_u64(),
            v["kv_scrubs"]["gate_unknown_owner_blocks"].as_u64(),
            v["kv_scrubs"]["gate_owner_changed_blocks"].as_u64()
        ),
        (Some(1), Some(2), Some(1), Some(0))
    );
    assert_eq!(
        (
            v["kv_scrubs"]["blocks"].as_u64(),
            v["kv_scrubs"]["verified_blocks"].as_u64()
        ),
        (Some(4), Some(2)),
        "named and verified are told apart"
    );
    assert_eq!(v["exceptions_by_kind"]["kv_scrub"], 1, "{v}");
    let e = &v["exceptions"][0];
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("error=stream 0x4 is capturing"),
        "{e}"
    );
    assert!(
        e["detail"].as_str().unwrap().contains("block_ids=[1,2]"),
        "{e}"
    );
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    let md = String::from_utf8_lossy(&md.stdout);
    assert!(
        md.contains("the eviction gate made 1 calls for 2 blocks: 0 changed owner without the engine's scrub, 1 had an owner the gate did not know"),
        "{md}"
    );
}

#[test]
fn a_tenant_report_counts_that_tenants_records_and_the_shared_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let (code, whole) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{whole}");
    let tenants = ["tenant-0", "tenant-1", "tenant-victim"];
    let reports: Vec<Value> = tenants
        .iter()
        .map(|t| {
            let (code, v) = evidence_json(&dir, &["--tenant", t]);
            assert_eq!(code, Some(0), "{v}");
            v
        })
        .collect();
    // The kv_scrub records without a tenant: the scrub of the whole cache at start.
    let records: Vec<Value> = chain_files(&dir)
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let unnamed: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "kv_scrub" && r["tenant_id"].is_null())
        .collect();
    // Every other kv_scrub, and every exception, names one of the demo's tenants: the tenant
    // reports split them without overlap.
    let sum = |f: &dyn Fn(&Value) -> u64| reports.iter().map(f).sum::<u64>();
    for field in [
        "calls",
        "blocks",
        "verified_blocks",
        "failed_blocks",
        "gate_blocks",
    ] {
        let unnamed_part: u64 = unnamed
            .iter()
            .map(|r| match field {
                "calls" => 1,
                "gate_blocks" if r["trigger"] == "claim_gate" => r["blocks"].as_u64().unwrap(),
                "gate_blocks" => 0,
                f => r[f].as_u64().unwrap(),
            })
            .sum();
        assert_eq!(
            sum(&|v| v["kv_scrubs"][field].as_u64().unwrap()) + unnamed_part,
            whole["kv_scrubs"][field].as_u64().unwrap(),
            "{field}"
        );
    }
    assert!(reports[0]["kv_scrubs"]["calls"].as_u64().unwrap() > 0);
    let exceptions = |v: &Value| v["exceptions"].as_array().unwrap().len() as u64;
    assert_eq!(sum(&exceptions), exceptions(&whole));
    for (t, v) in tenants.iter().zip(&reports) {
        assert_eq!(v["tenant"]["tenant_id"], *t, "{v}");
        assert_eq!(v["tenants"], 1, "{v}");
        for e in v["exceptions"].as_array().unwrap() {
            assert_eq!(e["tenant_id"], *t, "{e}");
        }
        // Starts, summaries and stops concern every tenant; the counters stay the process's.
        assert_eq!(v["records_by_kind"]["start"], 1, "{v}");
        assert_eq!(v["records_by_kind"]["stop"], 1, "{v}");
        assert_eq!(v["counters"], whole["counters"]);
        // What is counted and what is left out make up the log.
        let counted: u64 = v["records_by_kind"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(
            counted + v["tenant"]["records_left_out"].as_u64().unwrap(),
            whole["integrity"]["records"].as_u64().unwrap(),
            "{v}"
        );
    }
    // The drill's failures are the victim's.
    assert_eq!(reports[2]["exceptions_by_kind"]["verify_failed"], 1);
    assert!(reports[0]["exceptions_by_kind"]
        .get("verify_failed")
        .is_none());
    // A report without --tenant says nothing of one.
    assert!(whole.get("tenant").is_none(), "{whole}");
}

#[test]
fn a_refused_free_is_in_the_report_of_the_caller_and_of_the_blocks_tenant() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    log.emit(Event {
        at: SystemTime::now(),
        kind: EventKind::InvalidFree {
            reason: InvalidFreeReason::DoubleFree,
            device: 0,
            caller: Context::new(Some("tenant-a"), Some("req-a"), None).unwrap(),
        },
        context: Context::new(Some("tenant-b"), Some("req-b"), None).unwrap(),
        block: None,
        addr: Some(0x1000),
    });
    log.stop();
    let invalid = |tenant: &str| {
        let (code, v) = evidence_json(&dir, &["--tenant", tenant]);
        assert_eq!(code, Some(0), "{v}");
        v["exceptions_by_kind"]["invalid_free"]
            .as_u64()
            .unwrap_or(0)
    };
    assert_eq!((invalid("tenant-a"), invalid("tenant-b")), (1, 1));
    let md = kvh(
        &["evidence", dir.to_str().unwrap(), "--tenant", "tenant-a"],
        &[],
    );
    assert_eq!(md.status.code(), Some(0));
    let text = String::from_utf8_lossy(&md.stdout);
    assert!(text.contains("## Tenant tenant-a"), "{text}");
    // A tenant no record names is a usage error (in case the id was mistyped): see
    // a_tenant_no_verified_record_names_is_a_usage_error_listing_the_logs_tenants.
    // An empty id is a usage error.
    let empty = kvh(&["evidence", dir.to_str().unwrap(), "--tenant", ""], &[]);
    assert_eq!(empty.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&empty.stderr).contains("a tenant id cannot be empty"),
        "{}",
        String::from_utf8_lossy(&empty.stderr)
    );
    // So is an id no release of `kvh_set_context` took, which no record can hold: too long,
    // or with a control character (which would also reach the report's heading as it is).
    let long = "t".repeat(129);
    for (id, says) in [
        (long.as_str(), "129 bytes long"),
        ("acme\u{1}", "control character (U+0001)"),
    ] {
        let out = kvh(&["evidence", dir.to_str().unwrap(), "--tenant", id], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{id:?}: {err}");
        assert!(err.contains(says) && out.stdout.is_empty(), "{id:?}: {err}");
    }
}

/// A log of `n` quarantine events and a stop record, written by the real writer, whose lines
/// the caller then rewrites (re-sealed, as a writer without a MAC key could): the records a
/// crashed and recovered chain, or a lossy one, would hold.
fn crafted_log(tmp: &tempfile::TempDir, n: u64) -> (std::path::PathBuf, Vec<std::path::PathBuf>) {
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), n, false);
    let files = chain_files(&dir);
    (dir, files)
}

/// Sets `fields` in record `m`. A record made a `recovery` record names the record before it
/// as the crashed chain's last whole one, and no torn bytes, unless `fields` say otherwise:
/// the verification holds a recovery record to that.
fn set(m: &mut serde_json::Map<String, Value>, fields: Value) {
    for (k, v) in fields.as_object().unwrap() {
        m.insert(k.clone(), v.clone());
    }
    if m.get("kind").and_then(Value::as_str) == Some("recovery") {
        let before = m["seq"].as_u64().and_then(|s| s.checked_sub(1));
        let prev = m["prev"].clone();
        m.entry("last_good_seq").or_insert_with(|| before.into());
        m.entry("last_good_hash").or_insert(prev);
        m.entry("torn_bytes").or_insert_with(|| 0.into());
    }
}

#[test]
fn a_tampered_first_record_is_a_failed_log_not_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    std::fs::write(
        &files[0],
        text.replacen("\"kind\":\"start\"", "\"kind\":\"stort\"", 1),
    )
    .unwrap();
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["integrity"]["verified"], false);
}

#[test]
fn each_process_of_a_recovered_chain_counts_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 6);
    // Lines: 1 start, 2..7 events, 8 stop. Process 1 writes a summary and loses 2 records
    // (a `lost` record), then crashes; process 2 recovers the chain, writes its summary and
    // stops cleanly having lost 7 in all (its stop total counts its own `lost` record of 7).
    let summary = |frees: u64, failed: u64| serde_json::json!({"kind": "summary", "counters": {"frees": frees, "verifications_failed": failed}});
    let edits: Vec<(usize, Value)> = vec![
        (2, summary(100, 3)),
        (3, serde_json::json!({"kind": "lost", "records_lost": 2})),
        (
            4,
            serde_json::json!({"kind": "recovery", "pid": 2, "host": "node-2", "version": "0.1.0",
                               "config_digest": "ab", "torn_bytes": 10}),
        ),
        (5, serde_json::json!({"kind": "lost", "records_lost": 7})),
        (6, summary(5, 0)),
        (8, serde_json::json!({"records_lost": 7})),
    ];
    for (line, fields) in edits {
        forge_from(&files, 0, line, None, |m| set(m, fields.clone()));
    }
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        v["counters"]["frees"], 105,
        "both processes' last summaries"
    );
    assert_eq!(v["counters"]["verifications_failed"], 3);
    assert_eq!(
        v["records_lost"], 9,
        "2 lost by process 1, 7 by process 2, none twice"
    );
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 2, "{v}");
    assert_eq!(
        (
            procs[0]["clean_stop"].as_bool(),
            procs[0]["recovered"].as_bool()
        ),
        (Some(false), Some(false))
    );
    assert_eq!(
        (procs[1]["pid"].as_u64(), procs[1]["recovered"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(procs[1]["clean_stop"], true);
}

#[test]
fn text_from_the_log_cannot_reshape_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    forge_from(&files, 0, 2, None, |m| {
        set(m, serde_json::json!({"tenant_id": "evil | - | all clean"}))
    });
    forge_from(&files, 0, 3, None, |m| {
        set(
            m,
            serde_json::json!({"kind": "policy_violation", "policy": "x",
                               "detail": "a\n\n## Exceptions\n\nNone: forged"}),
        )
    });
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    assert_eq!(md.status.code(), Some(0));
    let text = String::from_utf8_lossy(&md.stdout);
    // The forged heading stays inside its cell: one section heading, no forged line.
    let headings = text
        .lines()
        .filter(|l| l.starts_with("## Exceptions"))
        .count();
    assert_eq!(headings, 1, "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("None: forged")),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.contains("evil"))
        .expect("the tenant's row");
    assert!(row.contains("evil \\| - \\| all clean"), "{row}");
    // Every row of the exceptions table keeps its six cells.
    for line in text.lines().filter(|l| l.starts_with("| 20")) {
        assert_eq!(line.matches(" | ").count(), 5, "{line}");
    }
}

#[test]
fn huge_figures_saturate_instead_of_overflowing() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 2);
    for line in [2, 3] {
        forge_from(&files, 0, line, None, |m| {
            set(
                m,
                serde_json::json!({"kind": "kv_scrub", "blocks": u64::MAX, "bytes": u64::MAX}),
            )
        });
    }
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["kv_scrubs"]["blocks"].as_u64(), Some(u64::MAX));
}

/// A gate record written before `owner_changed_blocks` existed counts every block named whose
/// owner the gate knew as a change of owner; one that claims more changes than it names blocks
/// of known owners counts only those.
#[test]
fn a_gate_record_counts_at_most_its_known_owner_blocks_as_changes_of_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    forge_from(&files, 0, 2, None, |m| {
        set(
            m,
            serde_json::json!({"kind": "kv_scrub", "trigger": "claim_gate", "blocks": 3,
                               "unknown_owner_blocks": 1}),
        )
    });
    forge_from(&files, 0, 3, None, |m| {
        set(
            m,
            serde_json::json!({"kind": "kv_scrub", "trigger": "claim_gate", "blocks": 4,
                               "unknown_owner_blocks": 1, "owner_changed_blocks": 1000}),
        )
    });
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    let kv = &v["kv_scrubs"];
    assert_eq!(
        (
            kv["gate_blocks"].as_u64(),
            kv["gate_owner_changed_blocks"].as_u64()
        ),
        (Some(7), Some(2 + 3)),
        "{kv}"
    );
}

#[test]
fn a_gate_record_claiming_more_unknown_blocks_than_it_names_counts_only_those_it_names() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 2);
    forge_from(&files, 0, 2, None, |m| {
        set(
            m,
            serde_json::json!({"kind": "kv_scrub", "trigger": "claim_gate", "blocks": 3,
                               "unknown_owner_blocks": 1000}),
        )
    });
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    let kv = &v["kv_scrubs"];
    assert_eq!(
        (
            kv["gate_blocks"].as_u64(),
            kv["gate_unknown_owner_blocks"].as_u64()
        ),
        (Some(3), Some(3)),
        "{kv}"
    );
}

mod crafted_values {
    use super::*;
    use kvhygiene::forensic::cli::VerifyLogArgs;
    use kvhygiene::forensic::evidence::{collect, render, EvidenceArgs};
    use proptest::prelude::*;

    /// Any JSON value a record's field could hold once someone without the MAC key rewrote
    /// and re-sealed the chain.
    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            Just(Value::from(u64::MAX)),
            Just(Value::from(u64::MAX)),
            any::<i64>().prop_map(Value::from),
            "[\\PC\n|`<\\[*]{0,12}".prop_map(Value::from),
            prop::collection::vec(any::<u32>(), 0..4).prop_map(|v| serde_json::json!(v)),
            Just(serde_json::json!({"frees": u64::MAX, "x": "y"})),
        ]
    }

    /// (kind, field) pairs the report reads: each edit rewrites one record into that kind
    /// with that field set to an arbitrary value.
    const EDITS: &[(&str, &str)] = &[
        ("kv_scrub", "blocks"),
        ("kv_scrub", "verified_blocks"),
        ("kv_scrub", "bytes"),
        ("kv_scrub", "error"),
        ("kv_scrub", "trigger"),
        ("kv_scrub", "unknown_owner_blocks"),
        ("kv_scrub", "owner_changed_blocks"),
        ("summary", "counters"),
        ("stop", "records_lost"),
        ("lost", "records_lost"),
        ("start", "pid"),
        ("recovery", "host"),
        ("recovery", "config_digest"),
        ("quarantine", "reason"),
        ("quarantine", "tenant_id"),
        ("policy_violation", "detail"),
        ("anomaly", "detail"),
        ("anomaly", "signal"),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever verified records hold, the report is built and rendered without a panic.
        #[test]
        fn crafted_records_never_panic_the_report(
            edits in prop::collection::vec((2usize..10, prop::sample::select(EDITS), any_value()), 1..8)
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let (dir, files) = crafted_log(&tmp, 9);
            for (line, (kind, field), value) in edits {
                forge_from(&files, 0, line, None, |m| {
                    m.insert("kind".into(), Value::from(kind));
                    m.insert(field.into(), value.clone());
                });
            }
            let args = EvidenceArgs {
                max_exceptions: 200,
                ..EvidenceArgs::of(VerifyLogArgs::of(dir))
            };
            // Whether the report is built (the log verified) or refused, nothing panics.
            if let Ok(ev) = collect(&args) {
                let md = render(&ev);
                prop_assert!(md.contains("## Exceptions"));
            }
        }
    }
}

/// A short demo run on the host backend whose policy is `envs` plus `KVH_LOG_DIR=dir`.
fn policy_run(dir: &Path, envs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut all = vec![
        ("KVH_LOG_DIR".to_string(), dir.to_str().unwrap().to_string()),
        ("KVH_BACKEND".to_string(), "host".to_string()),
    ];
    all.extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let pairs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = kvh(&["demo", "--tenants", "1", "--requests", "2"], &pairs);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    all
}

/// `kvh config --json`'s digest under the variables `envs`.
fn digest_of(envs: &[(String, String)]) -> String {
    let pairs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let v = json_of(&kvh(&["config", "--json"], &pairs));
    v["config_digest"].as_str().unwrap().to_string()
}

/// The JSON a command that must succeed printed.
fn json_of(out: &Output) -> Value {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {err}"))
}

#[test]
fn approved_configs_split_the_processes_by_the_policy_they_ran() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let reviewed = policy_run(&dir, &[("KVH_BATCH_SIZE", "8")]);
    let other = policy_run(&dir, &[("KVH_BATCH_SIZE", "9")]);
    let (reviewed, other) = (digest_of(&reviewed), digest_of(&other));
    assert_ne!(reviewed, other);

    // The Markdown report lists each digest in full, as --approved-config takes it.
    let out = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    let md = String::from_utf8_lossy(&out.stdout);
    for d in [&reviewed, &other] {
        assert!(
            md.contains(&format!("- `{d}`: 1 process")),
            "{d} not in full:\n{md}"
        );
    }

    let (code, v) = evidence_json(&dir, &["--approved-config", &reviewed.to_uppercase()]);
    assert_eq!(code, Some(0), "{v}");
    let policy = &v["policy"];
    assert_eq!(policy["approved"], serde_json::json!([reviewed]));
    assert_eq!(policy["processes_approved"], 1);
    let unapproved = policy["unapproved"].as_array().unwrap();
    assert_eq!(unapproved.len(), 1, "{policy}");
    assert_eq!(
        unapproved[0]["config_digest"].as_str(),
        Some(other.as_str())
    );

    // The same policy as a reviewed file: the digest depends on the values, not their source.
    let file = tmp.path().join("reviewed.toml");
    let toml = format!(
        "log_dir = \"{}\"\nbackend = \"host\"\nbatch_size = 8\n",
        dir.display()
    );
    std::fs::write(&file, toml).unwrap();
    let (code, v) = evidence_json(&dir, &["--approved-config", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["policy"]["approved"], serde_json::json!([reviewed]));
    assert_eq!(v["policy"]["processes_approved"], 1);

    // Both approved: no process is listed; without the option, no policy section at all.
    let (_, v) = evidence_json(
        &dir,
        &["--approved-config", &reviewed, "--approved-config", &other],
    );
    assert_eq!(v["policy"]["processes_approved"], 2);
    assert_eq!(v["policy"]["unapproved"], serde_json::json!([]));
    let (_, v) = evidence_json(&dir, &[]);
    assert!(v.get("policy").is_none(), "{v}");

    let out = kvh(
        &[
            "evidence",
            dir.to_str().unwrap(),
            "--approved-config",
            &reviewed,
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Policy: 1 of 2 processes ran an approved policy"),
        "{text}"
    );
    assert!(text.contains(&format!("`{other}`")), "{text}");
}

#[test]
fn an_approved_config_that_is_neither_digest_nor_policy_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    policy_run(&dir, &[]);
    let bad_file = tmp.path().join("bad.toml");
    std::fs::write(&bad_file, "batch_size = 0\n").unwrap();
    for value in [
        "abc123",
        "g".repeat(64).as_str(),
        bad_file.to_str().unwrap(),
    ] {
        let out = kvh(
            &[
                "evidence",
                dir.to_str().unwrap(),
                "--approved-config",
                value,
            ],
            &[],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {err}");
        assert!(
            err.contains("--approved-config") && err.contains(value),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "a report was written for {value}");
    }
    let out = kvh(
        &[
            "evidence",
            dir.to_str().unwrap(),
            "--approved-config",
            bad_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("batch_size"));
}

#[test]
fn a_file_named_like_a_digest_is_ambiguous() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let env = policy_run(&dir, &[]);
    let name = "ab".repeat(32);
    // The file is the policy the run had: named as a file, it is approved.
    let toml = format!("log_dir = \"{}\"\nbackend = \"host\"\n", dir.display());
    std::fs::write(tmp.path().join(&name), toml).unwrap();
    let evidence = |value: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
        cmd.current_dir(tmp.path()).args([
            "evidence",
            dir.to_str().unwrap(),
            "--json",
            "--approved-config",
            value,
        ]);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
            cmd.env_remove(k);
        }
        cmd.output().unwrap()
    };
    let out = evidence(&name);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("./{name}")));
    let v = json_of(&evidence(&format!("./{name}")));
    assert_eq!(
        v["policy"]["approved"],
        serde_json::json!([digest_of(&env)])
    );
    assert_eq!(v["policy"]["processes_approved"], 1);
}

/// 2026-01-01T00:00:00Z plus `minutes`, as the log's Unix nanoseconds.
fn at(minutes: u64) -> u64 {
    20_454 * 86_400 * 1_000_000_000 + minutes * 60_000_000_000
}

/// A crafted log of one chain whose lines are rewritten to `lines` (kind's fields and a time
/// in minutes after 2026-01-01), line 1 first; `n` is how many lines the writer wrote.
fn timed_log(tmp: &tempfile::TempDir, lines: &[(u64, Value)]) -> std::path::PathBuf {
    let (dir, files) = crafted_log(tmp, lines.len() as u64 - 2);
    for (i, (minutes, fields)) in lines.iter().enumerate() {
        let mut fields = fields.clone();
        fields["ts"] = at(*minutes).into();
        forge_from(&files, 0, i + 1, None, |m| set(m, fields.clone()));
    }
    dir
}

fn summary(frees: u64, failed: u64) -> Value {
    serde_json::json!({"kind": "summary", "counters": {"frees": frees, "verifications_failed": failed}})
}

/// One process: start at 0, a lost record at 60, a summary at 120, a quarantine at 180, a lost
/// record at 210, a summary at 240, a quarantine at 360 and a stop at 420 (minutes).
fn one_process_day(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    timed_log(
        tmp,
        &[
            (0, serde_json::json!({})),
            (60, serde_json::json!({"kind": "lost", "records_lost": 1})),
            (120, summary(10, 1)),
            (180, serde_json::json!({})),
            (210, serde_json::json!({"kind": "lost", "records_lost": 2})),
            (240, summary(25, 4)),
            (360, serde_json::json!({})),
            (420, serde_json::json!({"records_lost": 5})),
        ],
    )
}

fn rfc(minutes: u64) -> String {
    kvhygiene::forensic::verify::rfc3339(at(minutes))
}

#[test]
fn an_audit_period_counts_its_own_records_and_the_counters_it_saw_grow() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = one_process_day(&tmp);
    // The records of the period are at most an hour apart: no gap of 61 minutes.
    let (code, v) = evidence_json(
        &dir,
        &[
            "--since",
            "2026-01-01T02:30:00Z",
            "--until",
            "2026-01-01T05:00:00+00:00",
            "--max-gap",
            "61",
        ],
    );
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        v["integrity"]["records"], 8,
        "the whole log is verified: {v}"
    );
    assert_eq!(v["period"], serde_json::json!([rfc(180), rfc(240)]));
    assert_eq!(
        v["records_by_kind"],
        serde_json::json!({"quarantine": 1, "lost": 1, "summary": 1})
    );
    assert_eq!(v["exceptions_by_kind"]["quarantine"], 1, "{v}");
    assert_eq!(v["exceptions"][0]["time"], rfc(180).as_str());
    assert_eq!(
        v["counters"],
        serde_json::json!({"frees": 15, "verifications_failed": 3}),
        "the summary in the period less the one before it"
    );
    assert_eq!(
        v["records_lost"], 2,
        "only the period's lost record: the stop is after it"
    );
    let p = &v["audit_period"];
    assert_eq!(p["since"], rfc(150).as_str());
    assert_eq!(p["until"], rfc(300).as_str());
    assert_eq!(p["records_outside"], 5);
    assert_eq!(p["still_running"], false);
    assert_eq!(
        p["gaps"],
        serde_json::json!([]),
        "the process ran throughout: {v}"
    );
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1);
    assert_eq!(
        procs[0]["started"],
        rfc(0).as_str(),
        "the row shows the whole run"
    );
    assert_eq!(
        procs[0]["clean_stop"], true,
        "its stop, after the period, still says how it ended"
    );

    // A period holding the stop: its total, less the losses reported before the period.
    let (_, v) = evidence_json(&dir, &["--since", "2026-01-01T02:30:00Z"]);
    assert_eq!(v["records_lost"], 4, "{v}");
    assert_eq!(v["exceptions_by_kind"]["quarantine"], 2);
    assert_eq!(v["audit_period"]["until"], Value::Null);
    assert_eq!(v["audit_period"]["still_running"], true);
    // Without a period, the whole log, as before.
    let (_, v) = evidence_json(&dir, &[]);
    assert_eq!(v["records_lost"], 5);
    assert_eq!(v["counters"]["frees"], 25);
    assert!(v.get("audit_period").is_none(), "{v}");
    // A period with no record of the log in it lists nothing and says so.
    let (code, v) = evidence_json(&dir, &["--since", "2026-02-01", "--until", "2026-03-01"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["processes"], serde_json::json!([]));
    assert_eq!(v["period"], Value::Null);
    assert_eq!(v["audit_period"]["records_outside"], 8);
    assert_eq!(
        v["audit_period"]["gaps"],
        serde_json::json!([{"from": "2026-02-01T00:00:00.000000000Z", "to": "2026-03-01T00:00:00.000000000Z", "minutes": 40_320}])
    );
}

#[test]
fn stretches_of_the_period_without_any_process_are_listed() {
    let tmp = tempfile::tempdir().unwrap();
    // Process 1 runs from minute 0 to 30 and crashes; process 2 recovers the chain at 300
    // and stops at 330.
    let dir = timed_log(
        &tmp,
        &[
            (0, serde_json::json!({})),
            (30, summary(3, 0)),
            (
                300,
                serde_json::json!({"kind": "recovery", "pid": 2, "host": "node-2", "version": "0.1.0",
                                   "config_digest": "ab", "torn_bytes": 0}),
            ),
            (310, serde_json::json!({})),
            (320, summary(7, 0)),
            (330, serde_json::json!({})),
        ],
    );
    let (code, v) = evidence_json(
        &dir,
        &[
            "--since",
            "2025-12-31T23:00:00Z",
            "--until",
            "2026-01-01T06:00:00Z",
            "--max-gap",
            "60",
        ],
    );
    assert_eq!(code, Some(0), "{v}");
    let gap = |from: &str, to: &str, minutes: u64| serde_json::json!({"from": from, "to": to, "minutes": minutes});
    assert_eq!(
        v["audit_period"]["gaps"],
        serde_json::json!([
            gap("2025-12-31T23:00:00.000000000Z", &rfc(0), 60),
            gap(&rfc(30), &rfc(300), 270),
        ]),
        "before the log, and between the crash and the recovery; the 30 minutes after the stop \
         are under --max-gap: {v}"
    );
    assert_eq!(v["processes"].as_array().unwrap().len(), 2);
    // A period inside the second run, whose records are 10 minutes apart: only that process
    // is listed, and no stretch of 11 minutes lacks a record.
    let (_, v) = evidence_json(
        &dir,
        &[
            "--since",
            "2026-01-01T05:05:00Z",
            "--until",
            "2026-01-01T05:25:00Z",
            "--max-gap",
            "11",
        ],
    );
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{v}");
    assert_eq!(procs[0]["pid"], 2);
    assert_eq!(v["audit_period"]["gaps"], serde_json::json!([]));
    assert_eq!(
        v["counters"]["frees"], 7,
        "a run started in the period counts from zero"
    );

    let text = kvh(
        &[
            "evidence",
            dir.to_str().unwrap(),
            "--since",
            "2025-12-31T23:00:00Z",
            "--max-gap",
            "60",
        ],
        &[],
    );
    let report = String::from_utf8_lossy(&text.stdout);
    assert!(report.contains("## Audit period"), "{report}");
    assert!(
        report.contains(&format!(
            "- Attention: no record from {} to {} (270 minutes)",
            rfc(30),
            rfc(300)
        )),
        "{report}"
    );
    assert!(
        report.contains("Over the audit period, from each process's periodic counters"),
        "{report}"
    );
}

#[test]
fn an_empty_or_unreadable_period_is_a_usage_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = one_process_day(&tmp);
    let d = dir.to_str().unwrap();
    let out = kvh(
        &[
            "evidence",
            d,
            "--since",
            "2026-01-02",
            "--until",
            "2026-01-01",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--since 2026-01-02T00:00:00.000000000Z is not before --until"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no report for an empty period");
    for (flag, bad) in [
        ("--since", "last week"),
        ("--until", "2026-02-30"),
        ("--max-gap", "0"),
    ] {
        let out = kvh(&["evidence", d, flag, bad], &[]);
        assert_eq!(out.status.code(), Some(2), "{flag} {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains(bad), "{err}");
    }
}

#[test]
fn an_open_ended_period_does_not_hide_that_logging_stopped_long_before_the_report() {
    // `--since` alone: the period runs on to the report's time, and so does the search for
    // gaps: a deployment whose last process stopped months ago shows that stretch.
    let tmp = tempfile::tempdir().unwrap();
    let dir = one_process_day(&tmp); // the last record is at 2026-01-01T07:00Z
    let (code, v) = evidence_json(&dir, &["--since", "2026-01-01"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["audit_period"]["still_running"], true, "{v}");
    let gaps = v["audit_period"]["gaps"].as_array().unwrap();
    assert!(
        gaps.iter().any(|g| g["from"] == rfc(420).as_str()),
        "no record from the last one (2026-01-01T07:00Z) to the report's time, yet no gap: {v}"
    );
}

#[test]
fn a_stretch_inside_a_run_without_any_record_is_a_gap() {
    // "Every stretch of the period in which no process wrote a record": 190 minutes in which
    // the one running process wrote nothing (its summaries stopped) are a gap, although the
    // run spans them.
    let tmp = tempfile::tempdir().unwrap();
    let dir = timed_log(
        &tmp,
        &[
            (0, serde_json::json!({})),
            (10, summary(1, 0)),
            (200, summary(2, 0)),
            (210, serde_json::json!({})),
        ],
    );
    let (code, v) = evidence_json(
        &dir,
        &[
            "--since",
            "2026-01-01",
            "--until",
            "2026-01-01T03:30:00Z",
            "--max-gap",
            "60",
        ],
    );
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        v["audit_period"]["gaps"],
        serde_json::json!([{"from": rfc(10), "to": rfc(200), "minutes": 190}]),
        "{v}"
    );
}

#[test]
fn a_period_that_has_not_begun_claims_no_coverage() {
    // `--since` after the report's time: nothing of the period has happened, so the report
    // must not say that it found no gap in it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = one_process_day(&tmp);
    let out = kvh(
        &["evidence", dir.to_str().unwrap(), "--since", "2400-01-01"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("## Audit period"), "{report}");
    assert!(
        !report.contains("no stretch of 10 minutes or more without a record"),
        "a period with no record and not yet begun is reported as covered: {report}"
    );
    assert!(
        report.contains(
            "None of the period lies between the log's first record and the report's time"
        ),
        "{report}"
    );
    let (_, v) = evidence_json(&dir, &["--since", "2400-01-01"]);
    assert_eq!(v["audit_period"]["searched"], Value::Null, "{v}");
    // Ending before the log's first record: nothing to search either.
    let (_, v) = evidence_json(&dir, &["--until", "2025-12-31"]);
    assert_eq!(v["audit_period"]["searched"], Value::Null, "{v}");
    assert_eq!(v["processes"], serde_json::json!([]));
}

/// The nightly report is made on the log of a server that keeps writing. Records appended
/// after the verified head while the report is made are not a change of anything it counts
/// (it counts each chain up to that head): the report is verified and exits 0.
#[test]
fn records_appended_while_the_report_is_made_leave_it_verified() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Arc::new(ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap());
    for i in 0..2000 {
        log.emit(forensic_common::event(i));
    }
    log.flush();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 2000;
            while !stop.load(Ordering::Relaxed) {
                log.emit(forensic_common::event(i));
                log.flush();
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let (code, v) = evidence_json(&dir, &[]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    log.stop();
    assert_eq!(code, Some(0), "{}", v["integrity"]);
    assert_eq!(v["integrity"]["verified"], true, "{}", v["integrity"]);
}

/// A report made while a writer still runs, rotating its small files as it goes (every record
/// here starts a file). The chains verified at the start are read up to their verified heads
/// and the log is verified again: the report is made, and says the log changed meanwhile
/// (status 1) or that nothing did (status 0). A file the writer creates between the listing
/// of the files and their verification is the writer still running, not a file swapped after
/// the verification: it does not end the run without a report (status 2).
#[test]
fn a_report_on_a_log_still_being_written_is_made() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Arc::new(ForensicLog::open_with_secret(&cfg(&dir, 4096), start(), None).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (log, done) = (Arc::clone(&log), Arc::clone(&done));
        std::thread::spawn(move || {
            // Bounded, so that the log stays small whatever the machine's speed.
            for i in 0..12_000u64 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                log.record_anomaly(serde_json::json!({"n": i, "pad": "x".repeat(2500)}));
            }
        })
    };
    // A log of a few thousand files, still growing by a file a record.
    let began = Instant::now();
    while std::fs::read_dir(&dir).map_or(0, Iterator::count) < 2000
        && began.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut runs = Vec::new();
    for _ in 0..3 {
        let out = kvh(&["evidence", dir.to_str().unwrap(), "--json"], &[]);
        let code = out.status.code();
        runs.push((code, String::from_utf8_lossy(&out.stderr).into_owned()));
        if code == Some(2) {
            break;
        }
    }
    done.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    log.stop();
    for (code, err) in &runs {
        assert!(
            matches!(code, Some(0 | 1)),
            "a report on a log still being written ended with {code:?}: {err}"
        );
    }
}

/// The list of configuration digests in full puts a value in a code span only when it is a
/// digest (64 lower-case hex digits), as the coverage table and the policy section do
/// (backslash escapes do not work inside a code span): a `config_digest` rewritten in a log
/// without a MAC key must neither end its code span early nor read as a digest to copy.
#[test]
fn the_full_digest_list_puts_only_real_digests_in_code_spans() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    forge_from(&files, 0, 1, None, |m| {
        set(m, serde_json::json!({"config_digest": "`x` | y"}))
    });
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    assert_eq!(
        md.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&md.stderr)
    );
    let text = String::from_utf8_lossy(&md.stdout);
    for line in text
        .lines()
        .filter(|l| l.contains("1 process") && l.contains('x'))
    {
        assert!(
            !line.starts_with("- `"),
            "a config_digest that is not a digest is listed in a code span: {line}\n{text}"
        );
    }
}

/// `--since` equal to `--until` names an empty period: a usage error, not a report that
/// finds nothing in it.
#[test]
fn an_audit_period_that_begins_where_it_ends_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = one_process_day(&tmp);
    let instant = rfc(60);
    let out = kvh(
        &[
            "evidence",
            dir.to_str().unwrap(),
            "--since",
            &instant,
            "--until",
            &instant,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the audit period is empty"), "{err}");
}

/// A period that ends after the report's time is searched for gaps up to that time only:
/// what has not happened yet is neither a gap nor covered.
#[test]
fn a_period_still_running_is_searched_up_to_the_reports_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = one_process_day(&tmp);
    let (code, v) = evidence_json(
        &dir,
        &[
            "--since",
            &rfc(0),
            "--until",
            "2200-01-01",
            "--max-gap",
            "61",
        ],
    );
    assert_eq!(code, Some(0), "{v}");
    // The report's time lies between the start of its making and this instant.
    let after = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let generated = kvhygiene::forensic::verify::rfc3339(after);
    let period = &v["audit_period"];
    assert_eq!(period["still_running"], true, "{v}");
    let searched_to = period["searched"][1].as_str().unwrap();
    assert!(
        searched_to <= generated.as_str(),
        "{searched_to} > {generated}"
    );
    let gaps = period["gaps"].as_array().unwrap();
    // After the stop at 420 minutes, nothing: one gap, from the stop to the report's time.
    let last = gaps
        .last()
        .unwrap_or_else(|| panic!("no gap after the stop: {v}"));
    assert_eq!(last["from"], rfc(420), "{v}");
    let to = last["to"].as_str().unwrap();
    assert!(
        to <= generated.as_str(),
        "a gap reaching past the report's time: {v}"
    );
}

/// Records exactly --max-gap apart leave stretches of --max-gap minutes without a record,
/// listed as the stretch of that length at the period's end is.
#[test]
fn a_stretch_of_exactly_max_gap_between_records_is_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = timed_log(
        &tmp,
        &[
            (0, serde_json::json!({})),
            (10, serde_json::json!({})),
            (20, summary(1, 0)),
        ],
    );
    let (code, v) = evidence_json(
        &dir,
        &["--since", &rfc(0), "--until", &rfc(30), "--max-gap", "10"],
    );
    assert_eq!(code, Some(0), "{v}");
    let gap = |from: u64, to: u64| serde_json::json!({"from": rfc(from), "to": rfc(to), "minutes": to - from});
    assert_eq!(
        v["audit_period"]["gaps"],
        serde_json::json!([gap(0, 10), gap(10, 20), gap(20, 30)]),
        "{v}"
    );
}

/// A log whose one event is a refused free: `caller` made it, aimed at a block of `owner`.
fn refused_free_log(dir: &Path, owner: (&str, &str), caller: (&str, &str)) {
    let log = ForensicLog::open_with_secret(&cfg(dir, 1 << 20), start(), None).unwrap();
    log.emit(Event {
        at: SystemTime::now(),
        kind: EventKind::InvalidFree {
            reason: InvalidFreeReason::DoubleFree,
            device: 0,
            caller: Context::new(Some(caller.0), Some(caller.1), None).unwrap(),
        },
        context: Context::new(Some(owner.0), Some(owner.1), None).unwrap(),
        block: None,
        addr: Some(0x1000),
    });
    log.stop();
}

/// The `## Tenant` heading's text as a CommonMark renderer shows it: an ATX heading's closing
/// sequence (a run of `#` preceded by a space or tab, or the whole content) is not part of it
/// (CommonMark 0.31, 4.2).
fn heading_text(line: &str) -> String {
    let content = line.trim_start_matches('#').trim().to_string();
    let body = content.trim_end_matches('#');
    if body.len() < content.len() && (body.is_empty() || body.ends_with([' ', '\t'])) {
        body.trim_end().to_string()
    } else {
        content
    }
}

/// Tenant ids are any printable text (`kvh_set_context` refuses only control characters and
/// overlong ids): one ending in `#` is still shown whole in the report's heading, not taken
/// for the heading's closing sequence (which would show tenant "acme #" as tenant "acme").
#[test]
fn a_tenant_heading_shows_an_id_that_ends_in_hashes_whole() {
    for id in ["acme #", "acme ##", "#"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        refused_free_log(&dir, (id, "req-1"), (id, "req-1"));
        let md = kvh(&["evidence", dir.to_str().unwrap(), "--tenant", id], &[]);
        assert_eq!(md.status.code(), Some(0));
        let text = String::from_utf8_lossy(&md.stdout);
        let heading = text
            .lines()
            .find(|l| l.starts_with("## Tenant"))
            .unwrap_or_else(|| panic!("no tenant heading: {text}"));
        let shown = heading_text(heading);
        assert!(
            shown.ends_with('#'),
            "tenant {id:?}: the heading {heading:?} renders as {shown:?}, without the id's \
             trailing `#`"
        );
    }
}

/// An id with underscores at its ends (`_acme_`) is not rendered as emphasis in the heading:
/// the report shows the id as it is.
#[test]
fn a_tenant_heading_does_not_turn_underscores_of_the_id_into_emphasis() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    refused_free_log(&dir, ("_acme_", "req-1"), ("_acme_", "req-1"));
    let md = kvh(
        &["evidence", dir.to_str().unwrap(), "--tenant", "_acme_"],
        &[],
    );
    assert_eq!(md.status.code(), Some(0));
    let text = String::from_utf8_lossy(&md.stdout);
    let heading = text
        .lines()
        .find(|l| l.starts_with("## Tenant"))
        .unwrap_or_else(|| panic!("no tenant heading: {text}"));
    // `_acme_` after a space opens and closes emphasis (CommonMark 0.31, 6.2).
    assert!(
        !heading.contains(" _acme_"),
        "the heading {heading:?} renders the id as emphasised `acme`"
    );
}

/// A one-tenant report counts one tenant: a refused free names two (the block's owner and the
/// caller), and is in both tenants' reports, each of which still counts only its own tenant.
#[test]
fn a_tenant_report_counts_only_its_tenant_when_a_record_names_two() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    refused_free_log(&dir, ("tenant-b", "req-b"), ("tenant-a", "req-a"));
    for t in ["tenant-a", "tenant-b"] {
        let (code, v) = evidence_json(&dir, &["--tenant", t]);
        assert_eq!(code, Some(0), "{v}");
        assert_eq!(v["exceptions_by_kind"]["invalid_free"], 1, "{v}");
        assert_eq!(
            v["tenants"], 1,
            "the report of {t} counts the other tenant of the refused free: {v}"
        );
    }
}

/// A one-tenant report is given to that tenant (its own audit): the refused free of tenant-a
/// aimed at a block of tenant-b is in both reports, but neither shows the other tenant's ids
/// (tenant and request), and each listed exception is shown under the report's tenant.
#[test]
fn a_tenant_report_does_not_show_another_tenants_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    refused_free_log(&dir, ("tenant-b", "req-b"), ("tenant-a", "req-a"));
    for (t, other) in [
        ("tenant-a", ["tenant-b", "req-b"]),
        ("tenant-b", ["tenant-a", "req-a"]),
    ] {
        let v = tenant_report_without(&dir, t, &other);
        let exceptions = v["exceptions"].as_array().unwrap();
        assert_eq!(exceptions.len(), 1, "{v}");
        assert_eq!(exceptions[0]["tenant_id"], t, "{v}");
    }
}

/// The `--tenant` report of `tenant` on `dir`, whose JSON and Markdown both leave out every
/// one of `ids`; returns the JSON.
fn tenant_report_without(dir: &Path, tenant: &str, ids: &[&str]) -> Value {
    let (code, v) = evidence_json(dir, &["--tenant", tenant]);
    assert_eq!(code, Some(0), "{v}");
    let md = kvh(
        &["evidence", dir.to_str().unwrap(), "--tenant", tenant],
        &[],
    );
    let text = String::from_utf8_lossy(&md.stdout).into_owned();
    for id in ids {
        assert!(
            !v.to_string().contains(id) && !text.contains(id),
            "the report of {tenant} shows {id}: {v}\n{text}"
        );
    }
    v
}

/// A record every tenant shares (here a `lost` record) that names a tenant anyway: a report
/// for another tenant lists it, without that tenant's id.
#[test]
fn a_shared_record_naming_another_tenant_is_listed_without_its_id() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    forge_from(&files, 0, 2, None, |m| {
        set(
            m,
            serde_json::json!({"kind": "lost", "records_lost": 1, "tenant_id": "tenant-b",
                               "request_id": "req-b"}),
        )
    });
    let v = tenant_report_without(&dir, "tenant-a", &["tenant-b", "req-b"]);
    let lost: Vec<&Value> = v["exceptions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "lost")
        .collect();
    assert_eq!(lost.len(), 1, "the shared record is in the report: {v}");
    assert_eq!(lost[0]["tenant_id"], "(another tenant)", "{v}");
}

/// Each run names the sampling rule its seeds select words by (`sample_rule` in its `start`
/// record, the writer's `SAMPLE_RULE`), so that an auditor reproducing a verification's
/// samples knows the positions; a run of an earlier version, whose `start` names none, is
/// reported as such, not given the current rule.
#[test]
fn each_run_reports_the_sampling_rule_its_start_record_names() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    let first = std::fs::read_to_string(&files[0]).unwrap();
    let start: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(start["kind"], "start");
    assert_eq!(
        start["sample_rule"],
        kvhygiene::backend::verify::SAMPLE_RULE
    );
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        v["processes"][0]["sample_rule"],
        kvhygiene::backend::verify::SAMPLE_RULE
    );
    let row = |md: &str| {
        md.lines()
            .find(|l| l.contains(&format!("| {} |", std::process::id())))
            .map(str::to_string)
    };
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&md.stdout).into_owned();
    let want = format!("| {} |", kvhygiene::backend::verify::SAMPLE_RULE);
    assert!(row(&text).is_some_and(|r| r.contains(&want)), "{text}");

    forge_from(&files, 0, 1, None, |m| {
        assert_eq!(m["kind"], "start");
        m.remove("sample_rule");
    });
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["processes"][0]["sample_rule"], Value::Null, "{v}");
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&md.stdout).into_owned();
    assert!(
        row(&text).is_some_and(|r| r.contains("| not recorded |")),
        "{text}"
    );
}

/// A run whose `start` record names no policy digest has no approved policy to show: it is
/// listed as unapproved, never counted as approved.
#[test]
fn a_run_whose_start_names_no_policy_digest_is_not_approved() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    forge_from(&files, 0, 1, None, |m| {
        assert_eq!(m["kind"], "start");
        m.remove("config_digest");
    });
    let approved = "ab".repeat(32);
    let (code, v) = evidence_json(&dir, &["--approved-config", &approved]);
    assert_eq!(code, Some(0), "{v}");
    let policy = &v["policy"];
    assert_eq!(policy["processes_approved"], 0, "{policy}");
    assert_eq!(
        policy["unapproved"].as_array().unwrap().len(),
        1,
        "{policy}"
    );
}

/// `--max-gap` lists the stretches without any record "with --since or --until". Given
/// without either, it must not be accepted and then do nothing: an auditor who asks for the
/// gaps of the whole log and gets a report without any would read it as a log without gaps.
/// The other options that only work beside another one (`--checkpoint` without
/// `--public-key`, `--allow-pruned` without `--key-file`) are usage errors; so is this one,
/// or the report lists the gaps of the whole log.
#[test]
fn max_gap_without_an_audit_period_is_refused_or_lists_the_gaps() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = one_process_day(&tmp); // records 60 to 120 minutes apart
    let d = dir.to_str().expect("utf-8 path");
    let out = kvh(&["evidence", d, "--json", "--max-gap", "30"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let refused = out.status.code() == Some(2) && err.contains("--max-gap");
    let listed = v["audit_period"]["gaps"]
        .as_array()
        .is_some_and(|g| !g.is_empty());
    assert!(
        refused || listed,
        "--max-gap 30 over a log whose records are up to 120 minutes apart was accepted \
         (exit {:?}) and no gap was listed: {err}{v}",
        out.status.code()
    );
}

/// A chain whose last line was cut short (a writer that died mid-write, or a file cut by
/// hand) verifies, and `verify-log` says so: "torn tail of N bytes (writer crashed)". Those
/// bytes were (part of) a record that is not in the log. The auditor's report, made from the
/// same verification, must not drop that: a report that reads "VERIFIED" with no word of the
/// cut record hides what the verifier found.
#[test]
fn the_report_names_a_torn_tail_that_verify_log_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let files = chain_files(&dir);
    let last = files.last().unwrap();
    let bytes = std::fs::read(last).unwrap();
    std::fs::write(last, &bytes[..bytes.len() - 20]).unwrap();
    let d = dir.to_str().expect("utf-8 path");
    let verify = kvh(&["verify-log", d], &[]);
    let verify_out = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(0), "{verify_out}");
    assert!(verify_out.contains("torn tail"), "{verify_out}");
    let out = kvh(&["evidence", d], &[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        report.to_lowercase().contains("torn"),
        "verify-log reports a torn tail ({verify_out}), the evidence report does not:\n{report}"
    );
}

/// "Signed checkpoints: matched for N of M chains" counts the chains that verified and whose
/// checkpoint matched: a chain whose checkpoint's head was found, but which failed further
/// on (a line after its `stop` record), is not among them.
#[test]
fn a_chain_that_failed_after_its_checkpoint_matched_is_not_counted_as_matched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("logs");
    let ck = tmp.path().join("ckpt");
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ck.clone());
    write_log(&c, 20, false);
    std::thread::sleep(std::time::Duration::from_millis(5));
    write_log(&c, 20, false);
    let files = chain_files(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let last = files.last().unwrap();
    let text = std::fs::read_to_string(last).unwrap();
    let first_line = text.lines().next().unwrap().to_owned();
    std::fs::write(last, format!("{text}{first_line}\n")).unwrap();
    let out = kvh(
        &[
            "evidence",
            dir.to_str().unwrap(),
            "--public-key",
            public.to_str().unwrap(),
            "--checkpoint",
            ck.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ev["integrity"]["chains"], 2, "{ev}");
    assert_eq!(ev["integrity"]["checkpoints_matched"], 1, "{ev}");
}

/// The Exceptions section of the Markdown report of `dir` with `extra` arguments.
fn exceptions_section(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["evidence", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = kvh(&args, &[]);
    assert_eq!(out.status.code(), Some(0));
    let md = String::from_utf8_lossy(&out.stdout).into_owned();
    md.split("## Exceptions")
        .nth(1)
        .and_then(|s| s.split("## ").next())
        .unwrap_or_default()
        .to_string()
}

/// A one-tenant report of a tenant with no security record: the verified chain holds other
/// tenants' security records, so the report says the tenant has none, not that the verified
/// chains (or the period's records) have none.
#[test]
fn a_tenant_report_without_exceptions_does_not_say_the_log_has_none() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let (_, whole) = evidence_json(&dir, &[]);
    assert_eq!(whole["exceptions_by_kind"]["verify_failed"], 1, "{whole}");
    let (_, own) = evidence_json(&dir, &["--tenant", "tenant-0"]);
    assert_eq!(own["exceptions_by_kind"], serde_json::json!({}), "{own}");

    let section = exceptions_section(&dir, &["--tenant", "tenant-0"]);
    assert!(
        !section.contains("no security record in the verified chains"),
        "the verified chain holds 5 security records (of another tenant):\n{section}"
    );
    // The same within an audit period that holds every record of the log.
    let section = exceptions_section(&dir, &["--tenant", "tenant-0", "--since", "2020-01-01"]);
    assert!(
        !section.contains("no security record of the verified chains falls in the audit period"),
        "the period holds 5 security records (of another tenant):\n{section}"
    );
}

/// A one-tenant report over an audit period in which no record names the tenant, whose
/// records lie outside it: the report says no record of the period names the tenant, not
/// that no record names it (which tells the auditor the id is wrong).
#[test]
fn a_tenant_named_only_outside_the_period_is_not_said_to_be_named_by_no_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let (_, whole) = evidence_json(&dir, &["--tenant", "tenant-victim"]);
    assert_eq!(whole["tenants"], 1, "records name the tenant: {whole}");
    let out = kvh(
        &[
            "evidence",
            dir.to_str().unwrap(),
            "--tenant",
            "tenant-victim",
            "--until",
            "2020-01-01",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(
        !md.contains("No verified record names this tenant."),
        "the log's records name tenant-victim (none of them in the period):\n{md}"
    );
}

/// A log whose records name `tenants`, in that order: one refused free each, which the
/// tenant made of its own block.
fn tenants_log(dir: &Path, tenants: &[&str]) {
    let log = ForensicLog::open_with_secret(&cfg(dir, 1 << 20), start(), None).unwrap();
    for (i, t) in tenants.iter().enumerate() {
        let context = Context::new(Some(t), Some(&format!("req-{i}")), None).unwrap();
        log.emit(Event {
            at: SystemTime::now(),
            kind: EventKind::InvalidFree {
                reason: InvalidFreeReason::DoubleFree,
                device: 0,
                caller: context.clone(),
            },
            context,
            block: None,
            addr: Some(0x1000 + i as u64),
        });
    }
    log.stop();
}

/// `kvh evidence DIR --tenant ID extra...`: exit status, stdout, stderr.
fn tenant_evidence(dir: &Path, tenant: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args = vec!["evidence", dir.to_str().unwrap(), "--tenant", tenant];
    args.extend_from_slice(extra);
    let out = kvh(&args, &[]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A mistyped tenant id: no verified record of the whole log names it. A report saying "no
/// record names this tenant" under status 0 reads as a clean bill for that tenant, so the
/// command fails as a usage error (status 2, no report on stdout, in Markdown or JSON, with
/// or without an audit period) and names the tenants the log does name, so the typo shows.
#[test]
fn a_tenant_no_verified_record_names_is_a_usage_error_listing_the_logs_tenants() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    refused_free_log(&dir, ("tenant-b", "req-b"), ("tenant-a", "req-a"));
    for extra in [
        &[][..],
        &["--json"][..],
        &["--since", "2020-01-01"][..],
        &["--json", "--until", "2020-01-01"][..],
    ] {
        let (code, out, err) = tenant_evidence(&dir, "Tenant-A", extra);
        assert_eq!(code, Some(2), "{extra:?}: {err}\n{out}");
        if extra.contains(&"--json") {
            // No report: the error object alone, in the report's place.
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["error"], "{extra:?}: a report was written:\n{out}");
        } else {
            assert!(out.is_empty(), "{extra:?}: a report was written:\n{out}");
        }
        assert!(
            err.contains("\"Tenant-A\"")
                && err.contains("\"tenant-a\", \"tenant-b\"")
                && err.lines().count() == 1,
            "{extra:?}: the message does not name the tenant asked for and the log's two \
             tenants on one line: {err}"
        );
    }

    // Many tenants: the first 20 in sorted order are named, and the message says there are
    // more.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let ids: Vec<String> = (0..25).rev().map(|i| format!("t-{i:02}")).collect();
    tenants_log(&dir, &ids.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, out, err) = tenant_evidence(&dir, "t-25", &[]);
    assert_eq!(code, Some(2), "{err}\n{out}");
    let listed: Vec<String> = (0..20).map(|i| format!("\"t-{i:02}\"")).collect();
    assert!(
        err.contains(&listed.join(", ")) && !err.contains("\"t-20\"") && err.contains("more"),
        "the message does not name the first 20 tenants in order and say there are more: {err}"
    );

    // A log that names no tenant at all says so.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    tenants_log(&dir, &[]);
    let (code, out, err) = tenant_evidence(&dir, "tenant-a", &["--json"]);
    assert_eq!(code, Some(2), "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["error"].as_str().is_some_and(|e| err.contains(e)),
        "not the error object alone: {out}"
    );
    assert_eq!(
        v.as_object().unwrap().len(),
        1,
        "a report was written:\n{out}"
    );
    assert!(
        err.contains("\"tenant-a\"") && err.contains("names no tenant"),
        "the message does not say the log names no tenant: {err}"
    );
}

/// A tenant whose records all lie outside the audit period is no typo: its report is made
/// (status 0), and says plainly that the tenant has records outside the period and none in
/// it.
#[test]
fn a_tenant_with_records_only_outside_the_period_is_reported_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    refused_free_log(&dir, ("tenant-b", "req-b"), ("tenant-a", "req-a"));
    let (code, md, err) = tenant_evidence(&dir, "tenant-a", &["--until", "2020-01-01"]);
    assert_eq!(code, Some(0), "{err}\n{md}");
    assert!(
        md.contains("Tenant tenant-a has records outside the audit period, but none in it."),
        "the report does not say plainly that tenant-a has records only outside the \
         period:\n{md}"
    );
    let (code, v) = evidence_json(&dir, &["--tenant", "tenant-a", "--until", "2020-01-01"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["tenant"]["named_in_log"], true, "{v}");
    assert_eq!(v["tenants"], 0, "{v}");
}

/// Tenant ids come from the log, which callers write (a log rewritten without a MAC key can
/// hold anything): the tenants listed for a mistyped id, and the id as given, are shown
/// escaped, so that none can move the cursor, clear the screen or reorder the text of the
/// terminal that reads the message.
#[test]
fn tenant_ids_in_the_message_for_a_mistyped_tenant_are_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    forge_from(&files, 0, 2, None, |m| {
        set(
            m,
            serde_json::json!({"tenant_id": "evil\u{1b}[2J\u{1b}]0;pwned\u{7}\nkvh evidence: ok"}),
        )
    });
    forge_from(&files, 0, 3, None, |m| {
        set(m, serde_json::json!({"tenant_id": "\u{202e}gnp.exe"}))
    });
    let (code, out, err) = tenant_evidence(&dir, "acme\u{200b}", &[]);
    assert_eq!(code, Some(2), "{err}\n{out}");
    let raw: Vec<String> = err
        .trim_end_matches('\n')
        .chars()
        .filter(|&c| c.is_control() || matches!(c, '\u{200b}' | '\u{202e}'))
        .map(|c| format!("U+{:04X}", u32::from(c)))
        .collect();
    assert!(
        raw.is_empty(),
        "the message holds {raw:?} as they are: {err:?}"
    );
    for shown in [
        "evil\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\nkvh evidence: ok",
        "\\u{202e}gnp.exe",
        "\"tenant-a\"",
        "\"acme\\u{200b}\"",
    ] {
        assert!(
            err.contains(shown),
            "{shown:?} is not in the message: {err:?}"
        );
    }
}

/// `--approved-config ""` (an unset shell variable) names no reviewed policy: it is a usage
/// error, not the approval of the built-in default policy.
#[test]
fn an_empty_approved_config_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let out = kvh(
        &[
            "evidence",
            dir.to_str().unwrap(),
            "--approved-config",
            "",
            "--json",
        ],
        &[],
    );
    let approved = serde_json::from_slice::<Value>(&out.stdout)
        .map(|v| v["policy"]["approved"].clone())
        .unwrap_or(Value::Null);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an empty --approved-config was taken as a reviewed policy, approving {approved}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--approved-config"), "{err}");
}

/// The KV scrub line of the Markdown report: a block that failed verification is not counted
/// among the blocks it calls verified (`N blocks named, R read back: V verified clean, F failed`
/// with V + F <= N).
#[test]
fn kv_blocks_that_failed_are_not_reported_as_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let out = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    let md = String::from_utf8_lossy(&out.stdout);
    let line = md
        .lines()
        .find(|l| l.starts_with("Paged KV cache scrubs"))
        .expect("the KV scrub line");
    // The number just before `word` in the line.
    let before = |word: &str| -> u64 {
        let at = line
            .find(word)
            .unwrap_or_else(|| panic!("{word:?} in {line}"));
        line[..at]
            .trim_end()
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a number before {word:?} in {line}"))
    };
    let (named, verified, failed) = (
        before(" blocks named"),
        before(" verified clean,"),
        before(" failed."),
    );
    assert!(failed >= 1, "the drill fails a KV block: {line}");
    assert!(
        verified + failed <= named,
        "{named} blocks named, of which {failed} failed verification, yet {verified} are \
         reported verified: {line}"
    );
}

/// The cells of a Markdown table row as a GFM renderer shows them: split at the pipes that no
/// backslash escapes, each cell's text trimmed of the spaces around it (GFM 0.29, 4.10).
fn gfm_cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|');
    let mut cells = vec![String::new()];
    let mut escaped = false;
    for c in inner.chars() {
        match c {
            '|' if !escaped => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
        escaped = c == '\\' && !escaped;
    }
    if cells.last().is_some_and(|c| c.trim().is_empty()) {
        cells.pop();
    }
    cells.iter().map(|c| c.trim().to_string()).collect()
}

/// Tenant ids are any printable text up to 128 bytes (`kvh_set_context` takes spaces at their
/// ends), and two ids that differ are two tenants. The exceptions table shows each tenant as
/// itself: an exception of tenant "acme " (or " acme") is not shown as one of tenant "acme",
/// which a renderer would do with a cell whose spaces it trims.
#[test]
fn exceptions_of_tenants_whose_ids_differ_only_in_edge_spaces_are_told_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    for (line, tenant) in [(2, "acme"), (3, "acme "), (4, " acme")] {
        forge_from(&files, 0, line, None, |m| {
            set(
                m,
                serde_json::json!({"tenant_id": tenant, "request_id": "r1"}),
            )
        });
    }
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["tenants"], 3, "three tenants: {v}");
    let section = exceptions_section(&dir, &[]);
    let shown: Vec<String> = section
        .lines()
        .filter(|l| l.starts_with("| 20"))
        .map(|l| gfm_cells(l)[3].clone())
        .collect();
    assert_eq!(shown.len(), 3, "{section}");
    let distinct: std::collections::BTreeSet<&String> = shown.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "the exceptions of three tenants render under {shown:?}: {section}"
    );
}

/// A report on tenant "acme " is not titled as one on tenant "acme": a heading's text is
/// trimmed by a renderer (CommonMark 0.31, 4.2), so the id's edge spaces must stay in sight.
#[test]
fn a_tenant_heading_tells_an_id_with_edge_spaces_from_one_without() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    refused_free_log(&dir, ("acme ", "req-1"), ("acme", "req-2"));
    let heading = |id: &str| {
        let md = kvh(&["evidence", dir.to_str().unwrap(), "--tenant", id], &[]);
        let text = String::from_utf8_lossy(&md.stdout).into_owned();
        assert_eq!(md.status.code(), Some(0), "{id:?}: {text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("## Tenant"))
            .unwrap_or_else(|| panic!("no tenant heading: {text}"))
            .to_string();
        heading_text(&line)
    };
    let (spaced, plain) = (heading("acme "), heading("acme"));
    assert_ne!(
        spaced, plain,
        "the reports on tenants \"acme \" and \"acme\" are both titled {plain:?}"
    );
}

/// Whether process `pid` is reading `file` part way, as the report's reading of a verified
/// chain does between its two verifications (it streams the file; a verification reads a
/// file whole in one go).
fn reading_part_way(pid: u32, file: &Path) -> bool {
    let size = std::fs::metadata(file).map_or(0, |m| m.len());
    let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(fds) => fds,
        // `kvh` marks itself not dumpable (its keys stay out of core dumps): only a process
        // with CAP_SYS_PTRACE, root, may look at its descriptors.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            panic!("/proc/{pid}/fd: {e}: this test looks at kvh's open files, which needs root")
        }
        Err(_) => return false,
    };
    fds.filter_map(|e| e.ok()).any(|e| {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(file) {
            return false;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let pos = info
            .lines()
            .find_map(|l| l.strip_prefix("pos:"))
            .and_then(|p| p.trim().parse::<u64>().ok())
            .unwrap_or(0);
        pos > 0 && pos < size
    })
}

/// Runs `kvh evidence DIR --json` with `extra` arguments over a log whose one chain `big` is
/// large enough to take a while to read, and calls `meanwhile` once the report is reading
/// that chain (after its first verification, before its second). Returns the exit status,
/// the report, and whether `meanwhile` ran.
fn evidence_while(
    dir: &Path,
    big: &Path,
    extra: &[&str],
    meanwhile: impl FnOnce(),
) -> (Option<i32>, Value, bool) {
    let out = dir.with_extension("report.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    cmd.args(["evidence", dir.to_str().unwrap(), "--json"])
        .args(extra);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let big = big.canonicalize().unwrap();
    let mut meanwhile = Some(meanwhile);
    // Read part way for 50 ms on end: the streamed reading, not a verification's.
    let mut since: Option<std::time::Instant> = None;
    while child.try_wait().unwrap().is_none() {
        if meanwhile.is_some() {
            since = match (reading_part_way(child.id(), &big), since) {
                (false, _) => None,
                (true, None) => Some(std::time::Instant::now()),
                (true, Some(t)) if t.elapsed() >= std::time::Duration::from_millis(50) => {
                    (meanwhile.take().unwrap())();
                    None
                }
                (true, t) => t,
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let code = child.wait().unwrap().code();
    let v = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap_or(Value::Null);
    (code, v, meanwhile.is_none())
}

/// A report made while `what` happened is verified, with exit status 0.
fn assert_stays_verified(code: Option<i32>, v: &Value, what: &str) {
    assert_eq!(
        (code, &v["integrity"]["verified"]),
        (Some(0), &Value::Bool(true)),
        "{what} made the report unverified: {}",
        v["integrity"]["problems"]
    );
}

/// An empty first file of a chain whose writer died before its `start` record was whole (a
/// chain without a record, which verifies), named to sort after the log's other chain.
fn unstarted_chain_file(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("kvh-p99999999999-t1-000000.jsonl");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    path
}

/// A chain without any record (its writer died before its `start` record was whole) that
/// the next process's start removes while the report is being made (as the writer does
/// once such a file is idle) takes nothing from the report: no record of it was counted.
/// The report stays verified (exit 0), as for a writer that appends to a verified chain.
#[test]
fn a_chain_without_a_record_removed_while_the_report_is_made_leaves_it_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 64 << 20), 8_000, false);
    let big = chain_files(&dir).remove(0);
    let unstarted = unstarted_chain_file(&dir);
    let (alone, _) = evidence_json(&dir, &[]);
    assert_eq!(alone, Some(0), "the log with the empty chain file verifies");
    let (code, v, removed) = evidence_while(&dir, &big, &[], || {
        std::fs::remove_file(&unstarted).unwrap()
    });
    assert!(
        removed,
        "the file was not removed while the report was made"
    );
    assert_stays_verified(code, &v, "a chain without a record removed meanwhile");
}

/// A writer that started just before the report (its first file created, its `start`
/// record not yet written) and wrote its records while the report was being made added
/// records after the chain's verified head (none): the report stays verified (exit 0) and
/// counts the chain as it was at the first verification, as for any chain that grew.
#[test]
fn a_chain_whose_first_records_are_written_while_the_report_is_made_leaves_it_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 64 << 20), 8_000, true);
    let big = chain_files(&dir).remove(0);
    // The records the new writer writes: a whole chain of the same secret, under its id.
    let other = tmp.path().join("other");
    write_log(&cfg(&other, 64 << 20), 3, true);
    let written = chain_files(&other);
    forensic_common::reseal_all(&written, forensic_common::SECRET, |m| {
        m.insert("chain".into(), "p99999999999-t1".into());
    });
    let records = std::fs::read(&written[0]).unwrap();
    let unstarted = unstarted_chain_file(&dir);
    let key = secret_key_file(tmp.path());
    let key_arg = ["--key-file", key.to_str().unwrap()];
    let (alone, _) = evidence_json(&dir, &key_arg);
    assert_eq!(alone, Some(0), "the log with the empty chain file verifies");
    let (code, v, wrote) = evidence_while(&dir, &big, &key_arg, || {
        std::fs::write(&unstarted, &records).unwrap()
    });
    assert!(
        wrote,
        "the records were not written while the report was made"
    );
    assert_stays_verified(code, &v, "a chain that gained its first records meanwhile");
}

/// A record the report has yet to read, edited once the first verification is done and the
/// reading of the chain has begun: the reading fails, and the log no longer verifies. That is
/// tampering (exit 1, the report unverified, the edit named), not a report that could not be
/// made (exit 2), which a script would retry rather than page on.
#[test]
fn a_record_edited_ahead_of_the_reading_makes_the_report_unverified_not_failed() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 64 << 20), 8_000, false);
    let big = chain_files(&dir).remove(0);
    let edit_last_record = || {
        // A digit of the last record's time: the file keeps its length and its lines, the
        // record its form, but not its hash.
        let text = std::fs::read_to_string(&big).unwrap();
        let last = text.trim_end().rfind('\n').unwrap() + 1;
        let at = last + text[last..].find("\"ts\":").unwrap() + 6;
        let digit = text.as_bytes()[at];
        let other = if digit == b'1' { b'2' } else { b'1' };
        let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        f.write_all_at(&[other], at as u64).unwrap();
    };
    let (code, v, edited) = evidence_after_opens(&dir, &big, 2, edit_last_record);
    assert!(
        edited,
        "the record was not edited while the report was made"
    );
    assert_eq!(
        (code, &v["integrity"]["verified"]),
        (Some(1), &Value::Bool(false)),
        "an edit made while the report was read: {v}"
    );
    let problems = v["integrity"]["problems"].to_string();
    assert!(
        problems.contains("changed while the report"),
        "the edit met by the reading is not named: {problems}"
    );
}

/// Runs `kvh evidence DIR --json` and calls `meanwhile` as soon as it has opened `file` the
/// `opens`-th time (seen through inotify, before it reads anything of that opening). Returns
/// the exit status, the report, and whether `meanwhile` ran.
fn evidence_after_opens(
    dir: &Path,
    file: &Path,
    opens: usize,
    meanwhile: impl FnOnce(),
) -> (Option<i32>, Value, bool) {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: no arguments but flags.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    assert!(fd >= 0, "inotify: {}", std::io::Error::last_os_error());
    let path = std::ffi::CString::new(file.as_os_str().as_bytes()).unwrap();
    // SAFETY: `fd` is an inotify descriptor and `path` a NUL-terminated string.
    let watch = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_OPEN) };
    assert!(watch >= 0, "inotify: {}", std::io::Error::last_os_error());
    let out = dir.with_extension("report.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvh"))
        .args(["evidence", dir.to_str().unwrap(), "--json"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut meanwhile = Some(meanwhile);
    let mut seen = 0;
    let pid = child.id() as libc::pid_t;
    while child.try_wait().unwrap().is_none() && meanwhile.is_some() {
        let mut events = [0u8; 4096];
        // SAFETY: `events` is valid for writes of its length.
        let n = unsafe { libc::read(fd, events.as_mut_ptr().cast(), events.len()) };
        if n <= 0 {
            std::thread::sleep(std::time::Duration::from_micros(200));
            continue;
        }
        // Each event: a header and a name of `len` bytes (none for a watched file).
        let header = std::mem::size_of::<libc::inotify_event>();
        seen += (n as usize) / header;
        if seen >= opens {
            // Stopped while the file is edited: the edit lands before it reads much further.
            // SAFETY: `pid` is this function's child, not yet waited for.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            (meanwhile.take().unwrap())();
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
    let code = child.wait().unwrap().code();
    // SAFETY: `fd` is this function's descriptor, closed once.
    unsafe { libc::close(fd) };
    let v = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap_or(Value::Null);
    (code, v, meanwhile.is_none())
}

/// A chain `prune-log` moved whole verified without a record read from the log directory,
/// yet the report takes from it what its MAC-verified manifest says (the chain listed as
/// pruned, with its archive; the period and keys its records covered). Its manifest removed
/// while the report is being made (the evidence that the chain existed, deleted by hand) is
/// an edit of a chain the report describes, as the removal of any other chain it counted:
/// the report is expected not to stay verified.
#[test]
fn a_chain_moved_whole_whose_manifest_is_removed_while_the_report_is_made_is_a_change() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let key = secret_key_file(tmp.path());
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o700)).unwrap();
    // An ended chain, moved whole into the archive: only its manifest stays in the log.
    write_log(&cfg(&dir, 4096), 40, true);
    let out = kvh(
        &[
            "prune-log",
            dir.to_str().unwrap(),
            "--archive-dir",
            archive.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--older-than",
            "0",
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(chain_files(&dir).is_empty(), "precondition: moved whole");
    let manifest = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".pruned.json"))
        .expect("the manifest of the chain moved whole");
    // A running server's chain, large enough to take a while to read.
    write_log(&cfg(&dir, 64 << 20), 8_000, true);
    let big = chain_files(&dir).remove(0);
    let args = ["--key-file", key.to_str().unwrap(), "--allow-pruned"];
    let (alone, v) = evidence_json(&dir, &args);
    assert_eq!(alone, Some(0), "the log verifies: {v}");
    assert_eq!(
        v["integrity"]["pruned"].as_array().map(Vec::len),
        Some(1),
        "precondition: the report lists the chain moved whole: {}",
        v["integrity"]
    );
    let (code, v, removed) = evidence_while(&dir, &big, &args, || {
        std::fs::remove_file(&manifest).unwrap()
    });
    assert!(
        removed,
        "the manifest was not removed while the report was made"
    );
    assert!(
        code != Some(0) || v["integrity"]["verified"] != Value::Bool(true),
        "the manifest of a chain the report lists as pruned ({}) was removed while the report \
         was made, and the report stays verified",
        v["integrity"]["pruned"]
    );
}

/// Unicode's default-ignorable code points (a Hangul filler, a variation selector, the
/// combining grapheme joiner, a tag character) display as nothing, as the zero-width
/// characters do: `kvh_set_context` refuses them in an id, and a report is expected to show
/// an id holding one (a log from a library that took it, or an edited one) so that the
/// character stays in sight, not as the id "acme" a reader sees in its place.
#[test]
fn exceptions_of_ids_that_differ_in_a_default_ignorable_character_are_told_apart() {
    // Default_Ignorable_Code_Point, as a reader's renderer drops them.
    let displayed = |s: &str| -> String {
        s.chars()
            .filter(|&c| {
                !matches!(c,
                    '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}'..='\u{1160}'
                    | '\u{17B4}'..='\u{17B5}' | '\u{180B}'..='\u{180F}'
                    | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
                    | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}'
                    | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}'
                    | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
                    | '\u{E0000}'..='\u{E0FFF}')
            })
            .collect()
    };
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 5);
    let tenants = [
        "acme",
        "acme\u{3164}",
        "acme\u{FE0F}",
        "acme\u{034F}",
        "acme\u{E0041}",
    ];
    for (i, tenant) in tenants.iter().enumerate() {
        forge_from(&files, 0, i + 2, None, |m| {
            set(
                m,
                serde_json::json!({"tenant_id": tenant, "request_id": "r1"}),
            )
        });
    }
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["tenants"], 5, "five tenants: {v}");
    let section = exceptions_section(&dir, &[]);
    let shown: Vec<String> = section
        .lines()
        .filter(|l| l.starts_with("| 20"))
        .map(|l| displayed(&gfm_cells(l)[3]))
        .collect();
    assert_eq!(shown.len(), 5, "{section}");
    let distinct: std::collections::BTreeSet<&String> = shown.iter().collect();
    assert_eq!(
        distinct.len(),
        5,
        "the exceptions of five tenants display as {shown:?}: {section}"
    );
}

/// Logs outlive the library release that wrote them: one written before `kvh_set_context`
/// refused Unicode's default-ignorable code points may name tenant "acme\u{FE0F}" (an emoji
/// presentation selector after the id). `kvh evidence --tenant` for that tenant is expected to
/// report on its records, not to refuse the id as one "no record can name".
#[test]
fn a_tenant_report_is_made_for_an_id_an_earlier_release_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    let tenant = "acme\u{FE0F}";
    forge_from(&files, 0, 2, None, |m| {
        set(
            m,
            serde_json::json!({"tenant_id": tenant, "request_id": "r1"}),
        )
    });
    let out = kvh(
        &[
            "evidence",
            dir.to_str().unwrap(),
            "--json",
            "--tenant",
            tenant,
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "kvh evidence --tenant {tenant:?} on a log whose records name it: {err}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(v["tenant"]["named_in_log"], true, "{v}");
}

/// A record of tenant "beta" naming "acme\u{200B}" (a zero-width space after the id, from a
/// log an earlier release wrote) as the caller. The exceptions table shows every character
/// of an id that displays as nothing in sight, in every column: the detail column's
/// `caller_tenant_id` and `caller_request_id` too, in the full report and in the `--tenant`
/// report of that caller, so that the caller does not read as tenant "acme".
#[test]
fn an_exceptions_detail_shows_a_callers_invisible_characters_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    let caller = "acme\u{200B}";
    forge_from(&files, 0, 2, None, |m| {
        set(
            m,
            serde_json::json!({
                "tenant_id": "beta",
                "request_id": "r-b",
                "caller_tenant_id": caller,
                "caller_request_id": "r\u{2060}a",
            }),
        )
    });
    for extra in [&["--tenant", caller][..], &[][..]] {
        let section = exceptions_section(&dir, extra);
        let row = section
            .lines()
            .find(|l| l.contains("caller_tenant_id"))
            .unwrap_or_else(|| panic!("{extra:?}: no row names the caller: {section}"));
        let hidden: Vec<String> = row
            .chars()
            .filter(|c| matches!(c, '\u{200B}' | '\u{2060}'))
            .map(|c| format!("U+{:04X}", u32::from(c)))
            .collect();
        assert!(
            hidden.is_empty(),
            "{extra:?}: the row {row:?} holds {hidden:?} as it is, which displays as nothing"
        );
    }
}

/// The underscores of a Markdown line that are not backslash-escaped and do not stand between
/// two letters or digits of the line: those can open or close emphasis (CommonMark 0.31, 6.2).
fn bare_underscores_at_word_edges(line: &str) -> Vec<usize> {
    let chars: Vec<char> = line.chars().collect();
    let mut found = Vec::new();
    let mut escaped = false;
    for (i, &c) in chars.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        if c == '\\' {
            escaped = true;
            continue;
        }
        // As CommonMark sees a word: letters that are no punctuation or symbol; ASCII ones
        // are sure to be.
        let alnum = |j: Option<usize>| {
            j.and_then(|j| chars.get(j))
                .is_some_and(|c| c.is_ascii_alphanumeric())
        };
        if c == '_' && !(alnum(i.checked_sub(1)) && alnum(Some(i + 1))) {
            found.push(i);
        }
    }
    found
}

/// Text from the log cannot format the report: an underscore in a table cell is left bare only
/// where it stands inside a word of the Markdown written, so it opens or closes no emphasis.
/// That holds next to a character that displays as nothing (here the Hangul filler U+3164, a
/// letter to `char::is_alphanumeric`), which the report writes as an escape such as
/// `\u{3164}`: the underscores of `\u{3164}_node_\u{3164}` would render `node` emphasised.
#[test]
fn an_underscore_beside_an_escaped_character_opens_no_emphasis() {
    for (needle, row) in rows_between('\u{3164}', '\u{FFA0}') {
        let at = bare_underscores_at_word_edges(&row);
        assert!(
            at.is_empty(),
            "the row {row:?} holds underscores at a word's edge, unescaped (characters {at:?}): \
             they render {needle:?} emphasised"
        );
    }
}

/// The evidence report's table rows of a log whose host is `host_edge` + `_node_` +
/// `host_edge` and one of whose records is a policy violation of detail `detail_edge` +
/// `_all clean_` + `detail_edge`: each row with the text it shows between the edges.
fn rows_between(host_edge: char, detail_edge: char) -> Vec<(&'static str, String)> {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    forge_from(&files, 0, 1, None, |m| {
        set(
            m,
            serde_json::json!({"host": format!("{host_edge}_node_{host_edge}")}),
        )
    });
    forge_from(&files, 0, 3, None, |m| {
        set(
            m,
            serde_json::json!({"kind": "policy_violation", "policy": "x",
                               "detail": format!("{detail_edge}_all clean_{detail_edge}")}),
        )
    });
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    assert_eq!(md.status.code(), Some(0));
    let text = String::from_utf8_lossy(&md.stdout);
    ["node", "all clean"]
        .into_iter()
        .map(|needle| {
            let row = text
                .lines()
                .find(|l| l.starts_with('|') && l.contains(needle))
                .unwrap_or_else(|| panic!("no row shows {needle:?}: {text}"));
            (needle, row.to_string())
        })
        .collect()
}

/// An underscore in a table cell is left bare only where CommonMark cannot make emphasis of
/// it. CommonMark 0.31 (2.1, 6.2) takes a character of the Unicode P or S categories as
/// punctuation, and an underscore after punctuation and before a letter opens emphasis. The
/// circled letter U+24B6 (category So) is alphabetic to `char::is_alphanumeric`, but
/// punctuation to CommonMark: `Ⓐ_node_Ⓐ` renders `node` emphasised. Each underscore beside
/// it is expected to be backslash-escaped, in the coverage table's host and in the
/// exceptions' detail alike.
#[test]
fn an_underscore_beside_a_symbol_that_is_alphabetic_opens_no_emphasis() {
    for (needle, row) in rows_between('\u{24B6}', '\u{24B6}') {
        let escaped = format!("\u{24B6}\\_{needle}\\_\u{24B6}");
        assert!(
            row.contains(&escaped),
            "the row {row:?} does not hold {escaped:?}: its bare underscores beside U+24B6 \
             render {needle:?} emphasised"
        );
    }
}

/// A log whose chain files were all deleted, leaving only the signed checkpoint: the
/// verification fails. No HMAC key was given, so the report must not say MACs were checked;
/// a public key was given, so it must not say checkpoints went unchecked for want of one.
#[test]
fn a_log_of_only_a_checkpoint_does_not_claim_macs_checked_or_no_public_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let dir = tmp.path().join("log");
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    for i in 0..3 {
        log.emit(forensic_common::event(i));
    }
    log.stop();
    for f in chain_files(&dir) {
        std::fs::remove_file(f).unwrap();
    }
    let (code, v) = evidence_json(&dir, &["--public-key", public.to_str().unwrap()]);
    assert_eq!(code, Some(1), "the chain's files are gone: {v}");
    assert_eq!(v["integrity"]["verified"], false, "{v}");
    assert_eq!(
        v["integrity"]["macs_checked"], false,
        "no --key-file was given, yet the report says MACs were checked: {v}"
    );
    assert!(
        !v["integrity"]["checkpoints_matched"].is_null(),
        "--public-key was given, yet the report says checkpoints were not checked: {v}"
    );
}

/// A period still running is searched "to its end or the report's time, whichever comes
/// first": the stretch searched, and the gap after the last record, end no later than the
/// time the report says it was generated.
#[test]
fn the_stretch_searched_ends_no_later_than_the_reports_own_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = one_process_day(&tmp);
    let (code, v) = evidence_json(&dir, &["--since", &rfc(0)]);
    assert_eq!(code, Some(0), "{v}");
    let generated = v["generated_at"].as_str().unwrap();
    let searched_to = v["audit_period"]["searched"][1].as_str().unwrap();
    assert!(
        searched_to <= generated,
        "searched up to {searched_to}, after the report's time {generated}"
    );
    let last_gap_to = v["audit_period"]["gaps"]
        .as_array()
        .and_then(|g| g.last())
        .and_then(|g| g["to"].as_str())
        .unwrap();
    assert!(
        last_gap_to <= generated,
        "a gap reaching {last_gap_to}, after the report's time {generated}"
    );
}

/// Records a refused double free, made by `caller`, of a block of tenant-b's request req-b.
fn double_free_of_tenant_bs_block(log: &ForensicLog, caller: Context) {
    log.emit(Event {
        at: SystemTime::now(),
        kind: EventKind::InvalidFree {
            reason: InvalidFreeReason::DoubleFree,
            device: 0,
            caller,
        },
        context: Context::new(Some("tenant-b"), Some("req-b"), None).unwrap(),
        block: None,
        addr: Some(0x1000),
    });
}

/// An `anomaly` record written through `ForensicLog::record_anomaly` carries free-form
/// `detail` JSON, which may name any tenant. Written on a thread of tenant-a, it is in
/// tenant-a's report, which goes to tenant-a: the ids of tenant-b (whose own record is in the
/// log too) are not shown in it, in the JSON nor in the Markdown.
#[test]
fn a_tenant_report_does_not_show_another_tenants_ids_from_an_anomalys_free_form_detail() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    let before = Context::set_current(Context::new(Some("tenant-a"), Some("req-a"), None).unwrap());
    log.record_anomaly(serde_json::json!({"tenant": "tenant-b", "request": "req-b"}));
    Context::set_current(before);
    double_free_of_tenant_bs_block(
        &log,
        Context::new(Some("tenant-b"), Some("req-b"), None).unwrap(),
    );
    log.stop();
    let v = tenant_report_without(&dir, "tenant-a", &["tenant-b", "req-b"]);
    assert_eq!(v["exceptions_by_kind"]["anomaly"], 1, "{v}");
}

/// A refused free of tenant-b's block made by a thread that set a request and model id but no
/// tenant id: tenant-b's report lists it, and shows the caller's ids only when they are
/// tenant-b's, so the caller's request and model ids are not shown.
#[test]
fn a_tenant_report_does_not_show_the_ids_of_a_caller_without_a_tenant_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    double_free_of_tenant_bs_block(
        &log,
        Context::new(None, Some("req-of-caller"), Some("model-of-caller")).unwrap(),
    );
    log.stop();
    let v = tenant_report_without(&dir, "tenant-b", &["req-of-caller", "model-of-caller"]);
    assert_eq!(v["exceptions_by_kind"]["invalid_free"], 1, "{v}");
}

/// An `anomaly` record written through `ForensicLog::record_anomaly` (no `signal`) is not the
/// detector's summary of a burst or surge of other records: the report does not tell the
/// auditor that it is "not a further incident".
#[test]
fn an_anomaly_recorded_by_the_engine_is_not_described_as_a_summary_of_other_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    log.record_anomaly(serde_json::json!({"what": "prompt injection suspected"}));
    log.stop();
    let (_, v) = evidence_json(&dir, &[]);
    assert_eq!(v["anomalies_by_signal"]["unspecified"], 1, "{v}");
    let section = exceptions_section(&dir, &[]);
    assert!(
        !section.contains("it is not a further incident"),
        "the only anomaly is the engine's own finding, not a summary of other records:\n{section}"
    );
}

/// The text of the Markdown report from `heading` (a `## ` line) to the next `## ` heading.
fn md_section(report: &str, heading: &str) -> String {
    let mut lines = report.lines().skip_while(|l| *l != heading);
    let mut out = String::new();
    if let Some(h) = lines.next() {
        out.push_str(h);
        out.push('\n');
    }
    for l in lines.take_while(|l| !l.starts_with("## ")) {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// A log whose only chain failed verification has none of its records in the figures (its
/// quarantines are not listed). The "Criteria served" section of that report must not present
/// the exceptions as the record of every failure without saying the log failed verification:
/// the failures of the chain that failed are not among them.
#[test]
fn the_criteria_of_a_log_that_failed_verification_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    // Line 2 is the first quarantine: changed, the chain fails there.
    let text = std::fs::read_to_string(&files[0]).unwrap();
    std::fs::write(&files[0], text.replacen("\"req-0\"", "\"req-x\"", 1)).unwrap();
    let out = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let criteria = md_section(&report, "## Criteria served");
    assert!(!criteria.is_empty(), "{report}");
    assert!(
        [
            "failed verification",
            "FAILED",
            "cannot be relied on",
            "chains that verified"
        ]
        .iter()
        .any(|w| criteria.contains(w)),
        "the log failed verification, yet the criteria section claims the exceptions show \
         every failure without a word of it:\n{criteria}"
    );
}

/// "Only what a checkpoint covers is protected against truncation" (docs/forensic-log.md,
/// "Signed checkpoints"). A running or crashed writer's chain whose signed checkpoint covers
/// only its first record verifies, and its later records could be cut without the
/// verification noticing: the report must say which chain has records after its checkpoint,
/// not only that its checkpoint matched.
#[test]
fn a_chain_with_records_after_its_checkpoint_is_named_in_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, hmac, public, log) = signed_writer(tmp.path());
    for i in 0..20 {
        log.emit(forensic_common::event(i));
    }
    log.flush();
    // The writer is still running (or died here): no `stop`, no later checkpoint.
    std::mem::forget(log);
    let files = chain_files(&dir);
    let name = files[0].file_name().unwrap().to_str().unwrap().to_owned();
    let chain = name
        .strip_prefix("kvh-")
        .and_then(|n| n.strip_suffix("-000000.jsonl"))
        .unwrap()
        .to_owned();
    let d = dir.to_str().unwrap();
    let keys = [
        "--key-file",
        hmac.to_str().unwrap(),
        "--public-key",
        public.to_str().unwrap(),
    ];
    let verify = kvh(&[&["verify-log", d][..], &keys[..]].concat(), &[]);
    let verify_out = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(0), "{verify_out}");
    let out = kvh(&[&["evidence", d][..], &keys[..]].concat(), &[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    let integrity = md_section(&report, "## Integrity of the log");
    assert!(
        integrity
            .lines()
            .any(|l| l.contains(&chain) && l.contains("checkpoint")),
        "verify-log says of chain {chain} {verify_out:?}; the report says only that its \
         checkpoint matched, not that its records after it are unprotected:\n{integrity}"
    );
}

/// A tenant whose records are in a chain that failed verification is named by records of the
/// log: a `--tenant` report must not tell the auditor that no record names it (which reads as
/// a mistyped id), only that no verified record does.
#[test]
fn a_tenant_named_only_in_a_chain_that_failed_is_not_said_to_be_named_by_no_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = crafted_log(&tmp, 3);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(text.contains("\"tenant_id\":\"tenant-a\""), "{text}");
    // Line 2, tenant-a's first quarantine, changed: the chain fails there.
    std::fs::write(&files[0], text.replacen("\"req-0\"", "\"req-x\"", 1)).unwrap();
    let out = kvh(
        &["evidence", dir.to_str().unwrap(), "--tenant", "tenant-a"],
        &[],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("No verified record names this tenant.")
            && report.contains("Records this report did not read may name it"),
        "the chain that failed holds tenant-a's records, yet the report says no record \
         names it:\n{report}"
    );
}

/// A chain without a record (a writer that ended before its first record was whole) has no
/// checkpoint to match: the report says why the count of matched chains falls short.
#[test]
fn a_chain_without_a_record_is_said_when_checkpoints_are_counted() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (dir, hmac, public, log) = signed_writer(tmp.path());
    log.emit(forensic_common::event(0));
    drop(log);
    let empty = dir.join("kvh-p1-t1-000000.jsonl");
    std::fs::write(&empty, b"").unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = kvh(
        &[
            "evidence",
            dir.to_str().unwrap(),
            "--key-file",
            hmac.to_str().unwrap(),
            "--public-key",
            public.to_str().unwrap(),
        ],
        &[],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        report.contains(
            "Signed checkpoints: matched for 1 of 2 chains (1 without a record, which no \
             checkpoint covers)."
        ),
        "{report}"
    );
}

/// A sealed, signing writer on `root/log`: the directory, the HMAC key's file, the public
/// key's file and the open log.
fn signed_writer(root: &Path) -> (PathBuf, PathBuf, PathBuf, std::sync::Arc<ForensicLog>) {
    let (key, public) = kvhygiene::forensic::cli::keygen(&root.join("signer")).unwrap();
    let hmac = secret_key_file(root);
    let dir = root.join("log");
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    let log = ForensicLog::open_with_secret(&c, start(), Some(forensic_common::secret())).unwrap();
    (dir, hmac, public, log)
}

/// The wall clock stepped back an hour (NTP) while a process ran: its summaries at 110 and
/// 130 minutes lie in the period, the one written after the step (at 75) before it. Counters
/// only grow within a run, so the frees of the period are at least those between the last
/// summary before it in the run (at 50) and its last one in it (at 130).
#[test]
fn a_summary_dated_before_the_period_after_a_clock_step_does_not_cancel_the_periods_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = timed_log(
        &tmp,
        &[
            (0, serde_json::json!({})),
            (50, summary(5, 0)),
            (110, summary(20, 1)),
            (130, summary(30, 2)),
            (75, summary(40, 3)),
            (80, serde_json::json!({})),
        ],
    );
    let (code, v) = evidence_json(&dir, &["--since", &rfc(100), "--until", &rfc(200)]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        v["counters"],
        serde_json::json!({"frees": 25, "verifications_failed": 2}),
        "the last summary in the period less the run's last one before it: {v}"
    );
}

/// A process started in the period (at 110 minutes); the wall clock was then stepped back
/// (NTP) and its first summary is dated 75, before the period; its last one is at 130. The
/// run did nothing before the period (it had not started), so every count of its last summary
/// is the period's: the summary dated 75 is no baseline to take off.
#[test]
fn a_summary_dated_before_the_period_of_a_run_started_in_it_does_not_cancel_its_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = timed_log(
        &tmp,
        &[
            (110, serde_json::json!({})),
            (120, serde_json::json!({})),
            (75, summary(20, 1)),
            (130, summary(30, 2)),
            (140, serde_json::json!({})),
        ],
    );
    let (code, v) = evidence_json(&dir, &["--since", &rfc(100), "--until", &rfc(200)]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        v["counters"],
        serde_json::json!({"frees": 30, "verifications_failed": 2}),
        "the run's last summary, all of it counted in the period: {v}"
    );
}
