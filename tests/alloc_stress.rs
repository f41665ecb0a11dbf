//! Multi-threaded stress: 8 threads allocate, write secrets, free and record streams on a
//! shared allocator with several tenants. Every allocation must read zero, no pointer may be
//! handed to two threads at once, and accounting must balance at the end.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use common::{secret, Fixture};
use kvhygiene::backend::StreamHandle;
use kvhygiene::config::Config;
use kvhygiene::context::Context;

#[test]
fn eight_threads_keep_the_invariants() {
    let f = Arc::new(Fixture::new(Config {
        batch_size: 16,
        batch_max_delay_us: 200,
        ..Config::default()
    }));
    let live_set = Arc::new(Mutex::new(HashSet::new()));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let f = f.clone();
            let live_set = live_set.clone();
            std::thread::spawn(move || {
                let ctx = Context::new(
                    Some(&format!("tenant-{}", t % 3)),
                    Some(&format!("req-{t}")),
                    None,
                )
                .unwrap();
                Context::set_current(ctx);
                let mut mine: Vec<(u64, usize)> = Vec::new();
                let mut rng = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for i in 0..1500u64 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if mine.len() < 16 && (rng % 3 != 0 || mine.is_empty()) {
                        let size = [64usize, 500, 4096, 20_000, 65_536][(rng >> 8) as usize % 5];
                        let addr = f.alloc.malloc(size as i64, 0, StreamHandle(t)).unwrap();
                        let bytes = f.read(0, addr, size);
                        assert!(
                            bytes.iter().all(|&b| b == 0),
                            "thread {t}: dirty allocation"
                        );
                        assert!(live_set.lock().unwrap().insert(addr), "pointer live twice");
                        f.write(0, addr, &secret(size, t as u8));
                        if i % 7 == 0 {
                            f.alloc.record_stream(addr, StreamHandle(100 + t));
                        }
                        mine.push((addr, size));
                    } else {
                        let (addr, size) = mine.swap_remove((rng >> 16) as usize % mine.len());
                        assert!(live_set.lock().unwrap().remove(&addr));
                        f.alloc.free(addr, size as i64, 0, StreamHandle(t)).unwrap();
                    }
                }
                for (addr, size) in mine {
                    assert!(live_set.lock().unwrap().remove(&addr));
                    f.alloc.free(addr, size as i64, 0, StreamHandle(t)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    f.alloc.synchronize().unwrap();
    let st = f.alloc.stats();
    assert_eq!(st.accounting.live.blocks, 0);
    assert_eq!(st.accounting.pending.blocks, 0);
    assert_eq!(st.counters.verifications_failed, 0);
    assert!(st.counters.pool_hits > 0);
    assert_eq!(st.counters.allocations, st.counters.frees);
    f.assert_balanced();
}

/// `free_checked` reports the outcome of its own block's scrub even while other threads
/// submit, wait for and apply batches at the same time: exactly the sabotaged scrubs fail.
#[test]
fn free_checked_outcomes_under_concurrency() {
    let f = Arc::new(Fixture::new(Config {
        batch_size: 8,
        batch_max_delay_us: 100,
        ..Config::default()
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syncer = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.alloc.synchronize().unwrap();
            }
        })
    };
    f.backend.host.inject_skip_tail(5);
    let failures: u64 = (0..4u64)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut failed = 0;
                for _ in 0..200 {
                    let addr = f.alloc.malloc(2048, 0, StreamHandle(t)).unwrap();
                    f.write(0, addr, &secret(2048, 0xC3));
                    match f.alloc.free_checked(addr, 2048, 0, StreamHandle(t)) {
                        Ok(_) => {}
                        Err(kvhygiene::alloc::FreeError::VerifyFailed { .. }) => failed += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                failed
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    syncer.join().unwrap();
    f.alloc.synchronize().unwrap();
    let st = f.alloc.stats();
    // A sabotaged segment is either a free's scrub (reported to that caller, quarantined) or
    // a quarantine re-scrub (the block stays quarantined for good).
    assert_eq!(
        failures, st.counters.quarantined,
        "each failure reported to its own caller"
    );
    assert_eq!(st.counters.quarantined + st.counters.rescrub_failed, 5);
    assert!(failures >= 3);
    f.assert_balanced();
}
