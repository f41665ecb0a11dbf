//! `FORENSIC_HMAC_SECRET` in the memory of `kvh config` and `kvh preflight`: the verbs that
//! only ask whether the secret is set, and how long it is, leave no copy of it behind in
//! memory the process frees (keys.rs reads it without copying it for the same reason: "Not
//! `var_os`, which would copy the secret into a buffer freed unzeroized"; `kvh config --help`:
//! "Of FORENSIC_HMAC_SECRET only the presence and the length are checked").
//!
//! The test binary's global allocator looks, while a test arms it, at every block freed (and
//! every block a `realloc` moves away from) for bytes of the secret.

mod freed_needle;

use freed_needle::{freed_copies, SERIAL};

#[global_allocator]
static GLOBAL: freed_needle::Watch = freed_needle::Watch;

fn clear_kvh_vars() {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KVH_") {
            std::env::remove_var(k);
        }
    }
}

#[test]
fn kvh_config_frees_no_copy_of_the_environment_secret() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    clear_kvh_vars();
    let secret = "Kc7-unique-env-secret-for-the-kvh-config-test-0123";
    std::env::set_var("FORENSIC_HMAC_SECRET", secret);
    // With a log, so that the secret's length is checked too.
    std::env::set_var("KVH_LOG_DIR", "/var/log/kvh");
    let args = kvhygiene::config::cli::ConfigArgs {
        file: None,
        strict: false,
        json: true,
    };
    let mut report = None;
    let copies = freed_copies(&secret.as_bytes()[..16], || {
        report = Some(kvhygiene::config::cli::report(&args));
    });
    std::env::remove_var("FORENSIC_HMAC_SECRET");
    std::env::remove_var("KVH_LOG_DIR");
    let report = report.unwrap().unwrap();
    assert!(report.hmac_secret_in_environment);
    assert_eq!(
        copies, 0,
        "{copies} freed heap block(s) held FORENSIC_HMAC_SECRET after kvh config asked \
         whether it is set"
    );
}

#[test]
fn kvh_preflight_frees_no_copy_of_the_environment_secret() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    clear_kvh_vars();
    let tmp = tempfile::tempdir().unwrap();
    let secret = "Pf3-unique-env-secret-for-the-kvh-preflight-test-42";
    std::env::set_var("FORENSIC_HMAC_SECRET", secret);
    let mut config = kvhygiene::config::Config::default();
    config.log.dir = Some(tmp.path().join("log"));
    let mut report = None;
    let copies = freed_copies(&secret.as_bytes()[..16], || {
        report = Some(kvhygiene::preflight::preflight(&config, false));
    });
    std::env::remove_var("FORENSIC_HMAC_SECRET");
    let report = report.unwrap();
    let hmac = report
        .checks
        .iter()
        .find(|c| c.check == "hmac key")
        .expect("an hmac key check");
    assert_eq!(
        hmac.status,
        kvhygiene::preflight::Status::Ok,
        "{}",
        hmac.detail
    );
    assert_eq!(
        copies, 0,
        "{copies} freed heap block(s) held FORENSIC_HMAC_SECRET after kvh preflight read it"
    );
}

/// The library's start-up reads its policy (`Config::from_env`, from the `KVH_*` variables)
/// before the forensic log takes the secret out of the environment, zeroized: reading the
/// policy must not leave a copy of `FORENSIC_HMAC_SECRET`, which is no policy variable, in
/// memory the inference server frees (docs/forensic-log.md: the secret is "held in memory
/// that is zeroized on drop").
#[test]
fn reading_the_policy_frees_no_copy_of_the_environment_secret() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    clear_kvh_vars();
    let secret = "Rp9-unique-env-secret-for-the-policy-read-test-7777";
    std::env::set_var("FORENSIC_HMAC_SECRET", secret);
    std::env::set_var("KVH_BATCH_SIZE", "32");
    let mut config = None;
    let copies = freed_copies(&secret.as_bytes()[..16], || {
        config = Some(kvhygiene::config::Config::from_env());
    });
    std::env::remove_var("FORENSIC_HMAC_SECRET");
    std::env::remove_var("KVH_BATCH_SIZE");
    assert_eq!(config.unwrap().unwrap().batch_size, 32);
    assert_eq!(
        copies, 0,
        "{copies} freed heap block(s) held FORENSIC_HMAC_SECRET after the policy was read"
    );
}
