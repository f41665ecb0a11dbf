//! The CUDA backend on a machine without a GPU or driver (CI): loading fails cleanly and
//! `auto` may fall back to host memory; on a GPU machine the same tests check the converse.

use kvhygiene::backend::cuda::{loader, probe, probe_library, Probe};
use kvhygiene::backend::{Backend, BackendKind};

fn driver_installed() -> bool {
    loader::load().is_ok()
}

#[test]
fn probe_agrees_with_the_loader() {
    match probe() {
        Probe::NoDriver(why) => {
            assert!(!driver_installed());
            assert!(
                why.contains(loader::LIBCUDA),
                "the message names the library: {why}"
            );
        }
        Probe::Available(b) => {
            assert!(driver_installed());
            assert_eq!(b.kind(), BackendKind::Cuda);
            assert!(b.device_count() > 0);
        }
        Probe::Broken(e) => {
            assert!(driver_installed(), "Broken needs a driver: {e}");
        }
    }
}

#[test]
fn loader_error_is_clear_when_no_driver_is_installed() {
    if driver_installed() {
        eprintln!("a CUDA driver is installed here; nothing to check");
        return;
    }
    let err = loader::load().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("cannot load the CUDA driver"), "{msg}");
    assert!(msg.contains("libcuda.so.1"), "{msg}");
}

#[test]
fn a_present_but_unusable_driver_fails_closed() {
    // A library that opens but is not the driver stands for a broken installation: this must
    // never be reported as "no driver", which would let `auto` hand out host memory.
    assert!(matches!(probe_library("libm.so.6"), Probe::Broken(_)));
}
