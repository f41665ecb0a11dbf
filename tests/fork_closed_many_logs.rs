//! A process that writes many forensic logs at once and also serves metrics over HTTP, and a
//! child forked from it: the child inherits the exporter's listening socket without its
//! thread, and must not keep it, however many logs the process has open. One test in this
//! binary, so that the fork copies no other test's sockets.

mod forensic_common;
mod forked_exporter;

use std::sync::Arc;

use kvhygiene::forensic::ForensicLog;

/// How many logs the process keeps open while its exporter runs (one per tenant or model of
/// an engine that keeps their records apart).
const LOGS: usize = 64;

/// With many logs open, a child forked after the exporter started still does not keep the
/// exporter's address once the exporter stops: the next process's exporter can bind it.
#[test]
fn a_forked_child_does_not_keep_the_exporter_s_address_while_many_logs_are_open() {
    let tmp: Vec<tempfile::TempDir> = (0..LOGS).map(|_| tempfile::tempdir().unwrap()).collect();
    let logs: Vec<Arc<ForensicLog>> = tmp
        .iter()
        .map(|t| {
            let dir = forensic_common::log_dir(t);
            let c = forensic_common::cfg(&dir, 1 << 20);
            ForensicLog::open_with_secret(&c, forensic_common::start(), None).unwrap()
        })
        .collect();

    let (addr, bound) = forked_exporter::rebind_after_a_forked_child();
    for log in &logs {
        log.stop();
    }
    assert!(
        bound.is_ok(),
        "with {LOGS} forensic logs open, the exporter's address {addr} is still bound after \
         the exporter stopped, by the forked child that inherited its listening socket: {:?}",
        bound.err()
    );
}
