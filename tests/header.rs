//! The committed C header must match what cbindgen generates from src/ffi.
//! Regenerate with `KVH_BLESS=1 cargo test --test header`.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"))
        .with_src(root.join("src/ffi/error.rs"))
        .generate()
        .expect("cbindgen generation")
        .write(&mut generated);
    let path = root.join("include/kvhygiene.h");
    if std::env::var_os("KVH_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write header");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/kvhygiene.h is stale: run `KVH_BLESS=1 cargo test --test header` and commit it"
    );
}
