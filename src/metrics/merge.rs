//! One exposition from the snapshots of several processes, for `kvh serve-metrics` with a
//! per-process pattern. Concatenating the files is not a valid exposition: each declares its
//! families (`# HELP`, `# TYPE`), and a family may be declared once and its samples may not be
//! split by another family's. So the merge regroups: each family once, in the order families
//! first appear, declared by the first snapshot that declares it, followed by every
//! snapshot's samples of it in the order the snapshots are given. The samples stay byte for
//! byte as written: per-process files carry a `pid` label, so no series repeats. A series in
//! two files, or a family two files declare with different types, is refused naming both
//! files (the operator looks at files, not at the merged text); the result is parsed again
//! before it is served all the same.

use std::collections::HashMap;

use super::cli::Snapshot;
use super::parse::{self, family_of, sample_name, BLANKS};

#[derive(Default)]
struct Family {
    help: Option<String>,
    /// Its type, the `# TYPE` line declaring it, and the name of the snapshot it is from.
    kind: Option<(String, String, usize)>,
    samples: Vec<String>,
}

/// The snapshots, each with the name it is known by (its file), as one exposition, or why
/// they cannot be one (two that declare a family with different types, a series in two),
/// naming the snapshots.
pub fn merge(snapshots: &[(&str, &Snapshot)]) -> Result<String, String> {
    no_series_twice(snapshots)?;
    no_family_split(snapshots)?;
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, Family> = HashMap::new();
    for (at, (name_of_snap, snap)) in snapshots.iter().enumerate() {
        for line in snap.text.lines() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let Some((name, entry)) = entry_of(line, snap) else {
                continue;
            };
            let family = families.entry(name.to_string()).or_insert_with(|| {
                order.push(name.to_string());
                Family::default()
            });
            match entry {
                Entry::Help => {
                    family.help.get_or_insert_with(|| line.to_string());
                }
                Entry::Type(kind) => match &family.kind {
                    None => family.kind = Some((kind.to_string(), line.to_string(), at)),
                    Some((k, _, _)) if k == kind => {}
                    Some((k, _, first)) => {
                        return Err(format!(
                            "{} and {} declare {name} with different types ({k} and {kind})",
                            crate::printable(snapshots[*first].0),
                            crate::printable(name_of_snap)
                        ))
                    }
                },
                Entry::Sample => family.samples.push(line.to_string()),
            }
        }
    }
    let mut out = String::new();
    for name in &order {
        let f = &families[name];
        for line in f.help.iter().chain(f.kind.as_ref().map(|(_, l, _)| l)) {
            out.push_str(line);
            out.push('\n');
        }
        for line in &f.samples {
            out.push_str(line);
            out.push('\n');
        }
    }
    parse::parse(&out).map_err(|e| format!("the merged snapshots are not one exposition: {e}"))?;
    Ok(out)
}

/// Refuses a name one snapshot gives a family or a sample of its own (declared, or untyped)
/// that another's summary or histogram owns (`X_sum` and `X_count` of a summary or histogram
/// `X`, `X_bucket` of a histogram), naming both: merged, its samples would fall under either family by the
/// order of the files.
fn no_family_split(snapshots: &[(&str, &Snapshot)]) -> Result<(), String> {
    // Every summary and histogram, with the first snapshot that types it so.
    let mut owners: HashMap<&str, (usize, &str)> = HashMap::new();
    for (at, (_, snap)) in snapshots.iter().enumerate() {
        for (family, kind) in &snap.exposition.types {
            if matches!(kind.as_str(), "summary" | "histogram") {
                owners.entry(family.as_str()).or_insert((at, kind.as_str()));
            }
        }
    }
    for (at, (name, snap)) in snapshots.iter().enumerate() {
        let types = &snap.exposition.types;
        let declared = types.keys().map(String::as_str);
        let sampled = snap.exposition.samples.iter().map(|s| s.name.as_str());
        for used in declared.chain(sampled) {
            // Its own family here: one this snapshot's summary or histogram owns is not split.
            if family_of(used, types) != used {
                continue;
            }
            let owner = ["_sum", "_count", "_bucket"]
                .into_iter()
                .filter_map(|suffix| used.strip_suffix(suffix).map(|base| (base, suffix)))
                .find_map(|(base, suffix)| {
                    owners
                        .get(base)
                        .filter(|(_, kind)| parse::owned_suffixes(kind).contains(&suffix))
                        .map(|o| (base, *o))
                });
            if let Some((base, (first, kind))) = owner.filter(|(_, (first, _))| *first != at) {
                return Err(format!(
                    "{} has {used} of its own, which in {} is a sample of the {kind} {base}",
                    crate::printable(name),
                    crate::printable(snapshots[first].0),
                ));
            }
        }
    }
    Ok(())
}

/// A series: its name and its labels, sorted.
type Series<'a> = (&'a str, Vec<(&'a str, &'a str)>);

/// Refuses a series that two snapshots both hold, naming them.
fn no_series_twice(snapshots: &[(&str, &Snapshot)]) -> Result<(), String> {
    let mut holder: HashMap<Series<'_>, usize> = HashMap::new();
    for (at, (name, snap)) in snapshots.iter().enumerate() {
        for sample in &snap.exposition.samples {
            let mut labels: Vec<(&str, &str)> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            labels.sort_unstable();
            let without_pid = sample.label("pid").is_none();
            if let Some(first) = holder.insert((sample.name.as_str(), labels), at) {
                if first == at {
                    // A file's own repeat: its parse refused it already.
                    continue;
                }
                return Err(format!(
                    "{} and {} both hold the series {}{}",
                    crate::printable(snapshots[first].0),
                    crate::printable(name),
                    sample.name,
                    if without_pid {
                        " without a pid label (a snapshot written through the {pid} \
                         placeholder of KVH_METRICS_FILE carries one)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    Ok(())
}

enum Entry<'a> {
    Help,
    Type(&'a str),
    Sample,
}

/// The family a line belongs to and what it is; `None` for blank lines and plain comments.
/// The snapshot parsed already, so every line is well formed.
fn entry_of<'a>(line: &'a str, snap: &'a Snapshot) -> Option<(&'a str, Entry<'a>)> {
    // Read as the parser reads it (spaces and tabs alone separate), so that a line it took
    // for a plain comment is one here too.
    if line.trim_matches(BLANKS).is_empty() {
        return None;
    }
    if let Some(comment) = line.strip_prefix('#') {
        let mut words = comment.trim_start_matches(BLANKS).splitn(3, BLANKS);
        let keyword = words.next().unwrap_or("");
        let name = words.next().unwrap_or("");
        return match keyword {
            "HELP" => Some((name, Entry::Help)),
            "TYPE" => Some((
                name,
                Entry::Type(words.next().unwrap_or("").trim_matches(BLANKS)),
            )),
            _ => None,
        };
    }
    let name = sample_name(line);
    Some((family_of(name, &snap.exposition.types), Entry::Sample))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Snapshot {
        Snapshot {
            text: text.to_string(),
            exposition: parse::parse(text).expect("test snapshot parses"),
            timestamp: 0.0,
        }
    }

    const A: &str = "# HELP kvh_a_total A.\n# TYPE kvh_a_total counter\nkvh_a_total{pid=\"1\"} 3\n\
                     # HELP kvh_lat_seconds L.\n# TYPE kvh_lat_seconds summary\n\
                     kvh_lat_seconds{pid=\"1\",quantile=\"0.5\"} 0.1\n\
                     kvh_lat_seconds_sum{pid=\"1\"} 1\nkvh_lat_seconds_count{pid=\"1\"} 10\n";
    const B: &str = "# HELP kvh_a_total A.\n# TYPE kvh_a_total counter\nkvh_a_total{pid=\"2\"} 5\n\
                     # HELP kvh_b Only here.\n# TYPE kvh_b gauge\nkvh_b{pid=\"2\"} 1\n\
                     # HELP kvh_lat_seconds L.\n# TYPE kvh_lat_seconds summary\n\
                     kvh_lat_seconds{pid=\"2\",quantile=\"0.5\"} 0.2\n\
                     kvh_lat_seconds_sum{pid=\"2\"} 2\nkvh_lat_seconds_count{pid=\"2\"} 20\n";

    #[test]
    fn families_are_declared_once_with_every_process_s_samples_under_them() {
        let (a, b) = (snap(A), snap(B));
        let merged = merge(&[("a", &a), ("b", &b)]).unwrap();
        let parsed = parse::parse(&merged).unwrap();
        assert_eq!(merged.matches("# TYPE kvh_a_total counter").count(), 1);
        assert_eq!(merged.matches("# HELP kvh_lat_seconds").count(), 1);
        assert_eq!(parsed.value("kvh_a_total", &[("pid", "1")]), Some(3.0));
        assert_eq!(parsed.value("kvh_a_total", &[("pid", "2")]), Some(5.0));
        assert_eq!(parsed.value("kvh_b", &[("pid", "2")]), Some(1.0));
        assert_eq!(
            parsed.value("kvh_lat_seconds_count", &[("pid", "1")]),
            Some(10.0)
        );
        assert_eq!(parsed.samples.len(), 9);
        // Families in the order they first appear; a process's samples in the order given.
        let a_at = merged.find("kvh_a_total{pid=\"1\"}").unwrap();
        let a2_at = merged.find("kvh_a_total{pid=\"2\"}").unwrap();
        let lat_at = merged.find("# HELP kvh_lat_seconds").unwrap();
        let b_at = merged.find("# HELP kvh_b").unwrap();
        assert!(a_at < a2_at && a2_at < lat_at && lat_at < b_at, "{merged}");
    }

    /// Two processes' real expositions (`pid` labels, as per-process files carry them),
    /// the free → clean latency histogram among their families, merge into one that parses,
    /// each process's buckets under the one family.
    #[test]
    fn real_expositions_with_their_histogram_merge() {
        use crate::metrics::encode::{encode_labelled, ExporterStats};
        use crate::stats::{PoolCounters, Stats};
        let expo = |pid: &str, latency_us: u64| {
            let mut p = PoolCounters::default();
            p.record_scrub_latency(latency_us);
            let stats = Stats::merge("host".into(), &[p], None);
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
            snap(&encode_labelled(
                &stats,
                &ExporterStats::default(),
                at,
                &[("pid", pid)],
            ))
        };
        let (a, b) = (expo("1", 700), expo("2", 70_000));
        let merged = merge(&[("a", &a), ("b", &b)]).unwrap();
        let parsed = parse::parse(&merged).unwrap();
        assert_eq!(
            merged
                .matches("# TYPE kvh_free_to_clean_seconds histogram")
                .count(),
            1
        );
        let bucket = |pid, le| {
            parsed.value(
                "kvh_free_to_clean_seconds_bucket",
                &[("pid", pid), ("le", le)],
            )
        };
        assert_eq!(bucket("1", "0.001"), Some(1.0));
        assert_eq!(bucket("2", "0.001"), Some(0.0));
        assert_eq!(bucket("2", "0.1"), Some(1.0));
    }

    #[test]
    fn one_snapshot_merges_to_its_own_samples() {
        let a = snap(A);
        let merged = merge(&[("a", &a)]).unwrap();
        assert_eq!(parse::parse(&merged).unwrap().samples, a.exposition.samples);
    }

    #[test]
    fn a_series_in_two_files_is_refused() {
        let (a, again) = (snap(A), snap(A));
        let err = merge(&[("kvh-1.prom", &a), ("kvh-2.prom", &again)]).unwrap_err();
        assert!(
            err.contains("kvh-1.prom and kvh-2.prom both hold the series kvh_a_total"),
            "{err}"
        );
    }

    /// A comment the parser reads as plain (its keyword after a no-break space, which does
    /// not separate) is plain here too: neither a type the processes disagree on nor the
    /// family's `# TYPE` line in place of the real one.
    #[test]
    fn a_comment_the_parser_reads_as_plain_is_no_type_line() {
        let a = snap(A);
        let odd = snap(&format!(
            "#\u{a0}TYPE kvh_a_total gauge\n{}",
            A.replace("pid=\"1\"", "pid=\"3\"")
        ));
        let merged = merge(&[("a", &a), ("odd", &odd)]).unwrap();
        assert!(merged.contains("# TYPE kvh_a_total counter\n"), "{merged}");
        assert!(!merged.contains("TYPE kvh_a_total gauge"), "{merged}");
        parse::parse(&merged).unwrap();
    }

    #[test]
    fn processes_that_disagree_on_a_family_s_type_are_refused() {
        let a = snap(A);
        let g = snap("# TYPE kvh_a_total gauge\nkvh_a_total{pid=\"9\"} 1\n");
        let err = merge(&[("kvh-1.prom", &a), ("kvh-9.prom", &g)]).unwrap_err();
        assert!(
            err.contains("kvh-1.prom and kvh-9.prom declare kvh_a_total with different types"),
            "{err}"
        );
    }
}
