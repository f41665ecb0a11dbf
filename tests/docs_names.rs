//! The names the user and operator documentation gives (README.md, ARCHITECTURE.md, docs/,
//! deploy/README.md) are names the code has: every `kvh_*` metric is one the exporter writes,
//! every `KVH_*` variable one the library (or its Python package, or the interposers) reads,
//! the README's configuration table gives each key's real default, every flag a documented
//! `kvh` command line uses is one its verb takes, and every verb has a row in the README's
//! table. deploy/ is held to the same names by tests/python/test_deploy.py,
//! test_alert_rules.py and test_dashboard.py.

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use cli_common::{host_demo, kvh, run};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The documents a user or an operator reads, with their text.
fn documents() -> Vec<(String, String)> {
    let mut files = vec![
        "README.md".to_string(),
        "ARCHITECTURE.md".to_string(),
        "deploy/README.md".to_string(),
    ];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| format!("docs/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(root().join(&f)).unwrap();
            (f, text)
        })
        .collect()
}

/// Words of `text` that start with `prefix` and go on with `[A-Za-z0-9_]`, not preceded by
/// such a character, each with its 1-based line.
fn words_with_prefix(text: &str, prefix: &str) -> Vec<(usize, String)> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut from = 0;
        while let Some(at) = line[from..].find(prefix) {
            let start = from + at;
            let before_ok = line[..start].chars().next_back().is_none_or(|c| !word(c));
            let end = line[start..]
                .char_indices()
                .find(|&(_, c)| !word(c))
                .map_or(line.len(), |(i, _)| start + i);
            if before_ok && end > start + prefix.len() {
                out.push((n + 1, line[start..end].to_string()));
            }
            from = end.max(start + prefix.len());
        }
    }
    out
}

/// Every word of the files at `paths` (relative to the root).
fn words_of(paths: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in paths {
        let text = std::fs::read_to_string(root().join(p)).unwrap();
        for w in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !w.is_empty() {
                out.insert(w.to_string());
            }
        }
    }
    out
}

/// The sample names of a metrics snapshot the built `kvh` writes for a run with the forensic
/// log and the anomaly detector on (`kvh demo --log-dir --metrics-file`), with each family name
/// (`_bucket`, `_sum`, `_count` of histograms and summaries taken off). The file is a
/// per-process one (`{pid}`), which holds every series a single file does and the writer's
/// identity besides.
fn exported_names(dir: &Path) -> BTreeSet<String> {
    let log = dir.join("log");
    let metrics = dir.join("metrics");
    std::fs::create_dir(&metrics).unwrap();
    let (code, out, err) = run(host_demo(2, 8)
        .arg("--log-dir")
        .arg(&log)
        .arg("--metrics-file")
        .arg(metrics.join("kvh-{pid}.prom")));
    assert_eq!(code, 0, "kvh demo failed:\n{out}\n{err}");
    let written: Vec<_> = std::fs::read_dir(&metrics)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    let text = std::fs::read_to_string(&written[0]).unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            names.insert(rest.split_whitespace().next().unwrap().to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    assert!(
        names.contains("kvh_anomalies_total") && names.contains("kvh_log_records_written_total"),
        "the snapshot lacks the anomaly or log series: {names:?}"
    );
    names
}

/// Every `kvh_*` name the documents give is real: a metric family or sample the exporter
/// writes (or, ending in `_`, the prefix of one, as in "`kvh_log_*`"), or a name of the C API
/// (include/kvhygiene.h), of a kernel (kernels/scrub.cu), of a benchmark (benches/) or the key
/// of `kvh tail-log`'s tampering line (src/forensic/tail/mod.rs).
#[test]
fn every_kvh_metric_name_the_documents_give_is_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let exported = exported_names(tmp.path());
    let other = words_of(&[
        "include/kvhygiene.h",
        "kernels/scrub.cu",
        "benches/host.rs",
        "benches/forensic.rs",
        "benches/gpu_scrub.rs",
        "src/forensic/tail/mod.rs",
    ]);
    let mut unknown = Vec::new();
    for (file, text) in documents() {
        for (line, name) in words_with_prefix(&text, "kvh_") {
            let known = exported.contains(&name)
                || (name.ends_with('_') && exported.iter().any(|e| e.starts_with(&name)))
                || other.contains(&name);
            if !known {
                unknown.push(format!("{file}:{line}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "names no metric the exporter writes (nor a C API, kernel or benchmark name):\n{}\n\
         exported: {exported:?}",
        unknown.join("\n")
    );
}

/// Every `KVH_*` name the documents give is a key of the policy
/// (`kvhygiene::config::Config::keys`), one of the variables other readers own (`KVH_CONFIG`,
/// `KVH_LIBRARY`, `KVH_PRELOAD`), a name of the C API (a result code) or a constant of the
/// kernel source.
#[test]
fn every_kvh_variable_the_documents_name_is_one_something_reads() {
    let mut known: BTreeSet<String> = kvhygiene::config::Config::keys()
        .map(|(_, env, _)| env)
        .collect();
    known.extend(["KVH_CONFIG", "KVH_LIBRARY", "KVH_PRELOAD"].map(String::from));
    known.extend(words_of(&["include/kvhygiene.h", "kernels/scrub.cu"]));
    let mut unknown = Vec::new();
    for (file, text) in documents() {
        for (line, name) in words_with_prefix(&text, "KVH_") {
            // "`KVH_*`" and "`KVH_`" stand for the family.
            if !known.contains(&name) {
                unknown.push(format!("{file}:{line}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "names no variable the library reads (an unknown KVH_* variable stops it):\n{}",
        unknown.join("\n")
    );
}

/// README.md's configuration table: one row per key, whose default column is the value
/// `kvh config --json` reports for the key in an empty environment ("unset" for a key
/// without one).
#[test]
fn the_readme_configuration_table_gives_every_keys_default() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 4 && cells[1].starts_with("`KVH_") {
            let env = cells[1].trim_matches('`').to_string();
            assert!(
                rows.insert(env.clone(), cells[2].to_string()).is_none(),
                "README.md: {env} has two rows"
            );
        }
    }
    let (code, out, err) = run(kvh()
        .args(["config", "--json"])
        .env_remove("FORENSIC_HMAC_SECRET"));
    assert_eq!(code, 0, "kvh config --json: {err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let mut wrong = Vec::new();
    for s in report["settings"].as_array().unwrap() {
        let env = s["env"].as_str().unwrap();
        let Some(doc) = rows.remove(env) else {
            wrong.push(format!("{env}: no row in README.md's configuration table"));
            continue;
        };
        let doc_value = doc.trim_matches('`');
        let agrees = match &s["value"] {
            Value::Null => doc.starts_with("unset"),
            Value::Bool(b) => {
                let words: &[&str] = if *b {
                    &["true", "on"]
                } else {
                    &["false", "off"]
                };
                words.contains(&doc_value)
            }
            Value::Number(n) => doc_value
                .parse::<f64>()
                .is_ok_and(|d| Some(d) == n.as_f64()),
            Value::String(v) => doc_value == v,
            other => panic!("{env}: value {other}"),
        };
        if !agrees {
            wrong.push(format!(
                "{env}: README.md says {doc}, kvh config reports {}",
                s["value"]
            ));
        }
    }
    // Rows for variables other readers own.
    rows.remove("KVH_CONFIG");
    rows.remove("KVH_PRELOAD");
    for env in rows.keys() {
        wrong.push(format!(
            "{env}: a row of README.md's table, not a key of the policy"
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The verbs `kvh --help` lists and the flags `kvh VERB --help` lists for each.
fn verbs_and_flags() -> BTreeMap<String, BTreeSet<String>> {
    let (code, help, err) = run(kvh().arg("--help"));
    assert_eq!(code, 0, "{err}");
    let commands = help.split("Commands:").nth(1).unwrap();
    let commands = commands.split("\n\n").next().unwrap();
    let mut out = BTreeMap::new();
    for line in commands.lines() {
        let Some(verb) = line
            .strip_prefix("  ")
            .and_then(|l| l.split_whitespace().next())
        else {
            continue;
        };
        if verb == "help" || line.starts_with("   ") {
            continue;
        }
        let (code, help, err) = run(kvh().args([verb, "--help"]));
        assert_eq!(code, 0, "kvh {verb} --help: {err}");
        let flags = help
            .lines()
            .filter_map(|l| {
                let l = l.trim_start();
                let l = l
                    .strip_prefix("-")
                    .filter(|r| r.len() > 3 && &r[1..3] == ", ")
                    .map_or(l, |r| &r[3..]);
                l.starts_with("--").then(|| {
                    l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                        .next()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        out.insert(verb.to_string(), flags);
    }
    assert!(
        out.contains_key("verify-log") && out.contains_key("gate"),
        "{out:?}"
    );
    out
}

/// The `--flags` of the text after "kvh VERB" on one line, up to the end of its code span or
/// table cell; a flag after "but " is one the text says the verb does not take.
fn flags_after(rest: &str) -> Vec<String> {
    let end = rest.find(['`', '|']).unwrap_or(rest.len());
    let span = &rest[..end];
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = span[from..].find("--") {
        let start = from + at;
        let flag: String = span[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let excluded = span[..start].ends_with("but ");
        if flag.len() > 2 && flag.as_bytes()[2].is_ascii_lowercase() && !excluded {
            out.push(flag.clone());
        }
        from = start + flag.len().max(2);
    }
    out
}

/// Every `kvh VERB ... --flag` the documents write (in a code span, a table cell or a code
/// block line) uses a flag `kvh VERB --help` lists, and every verb has a row in README.md's
/// table of verbs.
#[test]
fn every_documented_kvh_command_line_uses_flags_its_verb_takes() {
    let verbs = verbs_and_flags();
    let mut wrong = Vec::new();
    for (file, text) in documents() {
        for (n, line) in text.lines().enumerate() {
            let mut from = 0;
            while let Some(at) = line[from..].find("kvh ") {
                let start = from + at;
                from = start + 4;
                if line[..start]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '/')
                {
                    continue;
                }
                let rest = &line[start + 4..];
                let verb: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                    .collect();
                let Some(flags) = verbs.get(&verb) else {
                    continue;
                };
                for flag in flags_after(&rest[verb.len()..]) {
                    if !flags.contains(&flag) {
                        wrong.push(format!("{file}:{}: kvh {verb} {flag}", n + 1));
                    }
                }
            }
        }
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for verb in verbs.keys() {
        if !readme.contains(&format!("| `kvh {verb}")) {
            wrong.push(format!(
                "README.md: no row for `kvh {verb}` in the table of verbs"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// docs/cuda.md's table of the driver backend's layers gives the number of driver calls
/// `scripts/gen-cuda-sys.sh` allows (the ones `sys.rs` resolves): "allowlist of the N calls
/// used".
#[test]
fn the_cuda_doc_counts_the_driver_calls_the_bindings_allow() {
    let script = std::fs::read_to_string(root().join("scripts/gen-cuda-sys.sh")).unwrap();
    let list = script
        .split("functions=(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("scripts/gen-cuda-sys.sh has no functions=( ... ) list");
    let calls = list
        .split_whitespace()
        .filter(|w| w.starts_with("cu"))
        .count();
    let doc = std::fs::read_to_string(root().join("docs/cuda.md")).unwrap();
    let said = doc
        .split("allowlist of the ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .expect("docs/cuda.md no longer says \"allowlist of the N calls used\"");
    assert_eq!(
        said, calls,
        "docs/cuda.md says the bindings allow {said} driver calls; scripts/gen-cuda-sys.sh \
         lists {calls}"
    );
}

/// `kvh_backend_errors_total` does not count a scrub batch deferred for lack of memory (its
/// help text, the `KvhBackendErrors` alert's "not a lack of memory", and the runbook in
/// docs/operations.md say so). docs/cuda.md's out-of-memory paragraph, which describes that
/// deferral, says the same: it does not name `backend_errors` as the counter.
#[test]
fn the_cuda_doc_does_not_count_a_scrub_deferred_for_lack_of_memory_as_a_backend_error() {
    let text = std::fs::read_to_string(root().join("docs/cuda.md")).unwrap();
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let start = flat
        .find("**Out of memory.**")
        .expect("docs/cuda.md has an out-of-memory paragraph");
    let end = flat[start..]
        .find("**Multi-GPU.**")
        .map_or(flat.len(), |e| start + e);
    let paragraph = &flat[start..end];
    assert!(
        !paragraph.contains("counted in `backend_errors`"),
        "docs/cuda.md says a scrub deferred for lack of memory is counted in backend_errors, \
         which no longer counts it: {paragraph}"
    );
}
