//! The committed kernel artifacts are current (no GPU needed):
//! - kernels/scrub.ptx and kernels/scrub.resources.txt record the SHA-256 of the scrub.cu they
//!   were generated from (scripts/gen-ptx.sh); a changed kernel without regeneration fails here;
//! - when the pinned toolchain is installed (scripts/install-nvcc.sh), the library embeds a
//!   fresh NVRTC compile, and the committed PTX must equal it byte for byte.

use std::fs;
use std::path::PathBuf;

use kvhygiene::backend::cuda::kernel;
use sha2::{Digest, Sha256};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn source_hash() -> String {
    let src = fs::read(repo("kernels/scrub.cu")).expect("read scrub.cu");
    Sha256::digest(&src)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn recorded_hash(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.split("kvhygiene-source-sha256: ").nth(1))
        .map(str::trim)
}

#[test]
fn ptx_is_fresh() {
    let ptx = fs::read_to_string(repo("kernels/scrub.ptx")).expect("read scrub.ptx");
    assert_eq!(
        recorded_hash(&ptx),
        Some(source_hash().as_str()),
        "kernels/scrub.ptx is stale: run scripts/gen-ptx.sh"
    );
}

#[test]
fn resource_report_is_fresh_and_spill_free() {
    let report = fs::read_to_string(repo("kernels/scrub.resources.txt")).expect("read report");
    assert_eq!(
        recorded_hash(&report),
        Some(source_hash().as_str()),
        "kernels/scrub.resources.txt is stale: run scripts/gen-ptx.sh"
    );
    for arch in ["sm_80", "sm_86", "sm_89", "sm_90"] {
        assert!(
            report.contains(&format!("## {arch}")),
            "no report for {arch}"
        );
    }
    let spill_lines: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("spill stores"))
        .collect();
    assert_eq!(spill_lines.len(), 8, "two kernels x four architectures");
    for line in spill_lines {
        assert_eq!(
            line.trim(),
            "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
            "the kernels must not spill or use a stack frame"
        );
    }
}

#[test]
fn embedded_ptx_matches_the_committed_one() {
    let committed = fs::read_to_string(repo("kernels/scrub.ptx")).expect("read scrub.ptx");
    let embedded = kernel::embedded_ptx();
    let embedded = String::from_utf8_lossy(&embedded[..embedded.len() - 1]);
    if kernel::KERNEL_ORIGIN.starts_with("nvrtc") {
        // The committed file is the three-line provenance header plus this very compile.
        let body: String = committed
            .lines()
            .skip(3)
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            body.trim_end(),
            embedded.trim_end(),
            "kernels/scrub.ptx differs from a fresh compile: run scripts/gen-ptx.sh"
        );
    } else if kernel::KERNEL_ORIGIN.starts_with("committed") {
        assert_eq!(committed, embedded);
    } else {
        eprintln!(
            "built with {}: PTX comparison skipped",
            kernel::KERNEL_ORIGIN
        );
    }
}
