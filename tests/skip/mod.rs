//! How a test steps aside where this machine lacks what it needs (a compiler, root, a mount,
//! `chattr`, a user namespace). By default it says so on stderr and passes, so a developer
//! without root can run the suite. `cargo test` hides a passing test's stderr, though, so a
//! check that stopped running for good (a helper broken, a tool gone from the image) would
//! pass unseen: with `KVHYGIENE_NO_SKIP=1`, which `.ci/run` sets (it runs as root on a
//! machine that has all of these), a skip fails the test instead.
#![allow(dead_code)]

/// The switch that turns a skip into a failure.
pub const NO_SKIP: &str = "KVHYGIENE_NO_SKIP";

/// Steps aside for `why` (what is missing here): says so on stderr, or panics under
/// [`NO_SKIP`]. The caller returns after it.
#[track_caller]
pub fn skipped(why: &str) {
    if std::env::var_os(NO_SKIP).is_some_and(|v| v == "1") {
        panic!("{NO_SKIP}=1, and this test would skip: {why}");
    }
    eprintln!("skipped: {why}");
}
