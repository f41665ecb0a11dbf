//! The in-process HTTP exporter and a child forked from its process: the child inherits the
//! exporter without its thread, and must not keep its listening socket either. Only loopback
//! networking; one test in this binary, so that the fork copies no other test's sockets.

mod forked_exporter;

/// A pre-fork server (or an engine that forks workers after the allocator started) starts the
/// HTTP exporter, forks a child that lives on, and then its exporter stops (the process shuts
/// it down, or exits and is restarted). The child serves no metrics (it has no server
/// thread), so it must not keep the address either: once the exporter that bound it is gone,
/// the address is free for the next process's exporter, rather than held by a socket whose
/// connections the kernel accepts and nobody answers.
#[test]
fn a_forked_child_does_not_keep_the_exporter_s_address() {
    let (addr, bound) = forked_exporter::rebind_after_a_forked_child();
    assert!(
        bound.is_ok(),
        "the exporter's address {addr} is still bound after the exporter stopped, by the \
         forked child that inherited its listening socket: {:?}",
        bound.err()
    );
}
