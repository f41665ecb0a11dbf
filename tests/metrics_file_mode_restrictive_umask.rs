//! README ("Metrics"): "The file is created 0644: metrics hold counts, sizes and the version,
//! never payload bytes, keys or tenant ids", so node-exporter's textfile collector, running as
//! another user, can read it. That holds also when the inference process runs under a
//! restrictive umask (077 is common in hardened images).
//! (A test binary of its own: the umask is process-wide.)

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use kvhygiene::config::MetricsConfig;
use kvhygiene::metrics::{Exporter, Source};
use kvhygiene::stats::{PoolCounters, Stats};

#[test]
fn the_metrics_file_is_readable_by_others_under_a_restrictive_umask() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvh.prom");
    let source: Source = Arc::new(|| Stats::merge("host".into(), &[PoolCounters::default()], None));
    let cfg = MetricsConfig {
        file: Some(path.clone()),
        interval_ms: 3_600_000,
        addr: None,
    };
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o077) };
    let exporter = Exporter::start(&cfg, source).unwrap();
    let written = exporter.write_file_now();
    drop(exporter);
    unsafe { libc::umask(old) };
    written.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "metrics file mode {mode:o}");
}
