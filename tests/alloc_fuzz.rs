//! Property test: random sequences of alloc / write-secret / free / record-stream / sync /
//! empty-cache across tenants and requests. After every step: every new allocation reads
//! zero, no pointer is live twice, and accounting balances (live + pending + clean +
//! quarantined equals what the backend holds).

mod common;

use std::collections::HashMap;

use common::{manual_config, secret, Fixture};
use kvhygiene::backend::StreamHandle;
use kvhygiene::config::{Config, TenantIsolation};
use kvhygiene::context::Context;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        size: u32,
        tenant: u8,
        request: u8,
        device: u8,
        stream: u8,
    },
    Free {
        pick: usize,
        lie_about_size: bool,
    },
    RecordStream {
        pick: usize,
        stream: u8,
    },
    InjectFault,
    Synchronize,
    EmptyCache,
    BadFree {
        offset: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u32..70_000, 0u8..3, 0u8..4, 0u8..2, 0u8..3).prop_map(|(size, tenant, request, device, stream)| Op::Alloc { size, tenant, request, device, stream }),
        5 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(pick, lie_about_size)| Op::Free { pick, lie_about_size }),
        1 => (any::<usize>(), 0u8..4).prop_map(|(pick, stream)| Op::RecordStream { pick, stream }),
        1 => Just(Op::InjectFault),
        1 => Just(Op::Synchronize),
        1 => Just(Op::EmptyCache),
        1 => (1u16..512).prop_map(|offset| Op::BadFree { offset }),
    ]
}

fn config() -> impl Strategy<Value = Config> {
    (1usize..8, any::<bool>(), 0u32..4).prop_map(|(batch_size, strict, max_reuse)| Config {
        batch_size,
        tenant_isolation: if strict {
            TenantIsolation::Strict
        } else {
            TenantIsolation::Off
        },
        max_reuse,
        ..manual_config()
    })
}

struct Live {
    addr: u64,
    size: u32,
    device: u8,
}

fn run(config: Config, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let f = Fixture::new(config);
    let mut live: Vec<Live> = Vec::new();
    let mut owner_of: HashMap<u64, usize> = HashMap::new();
    let mut tag = 0u8;
    for op in ops {
        match op {
            Op::Alloc {
                size,
                tenant,
                request,
                device,
                stream,
            } => {
                let ctx = Context::new(
                    Some(&format!("tenant-{tenant}")),
                    Some(&format!("req-{request}")),
                    None,
                )
                .unwrap();
                Context::set_current(ctx);
                let addr = f
                    .alloc
                    .malloc(size as i64, device as i32, StreamHandle(stream as u64))
                    .unwrap();
                let bytes = f.read(device as u32, addr, size as usize);
                prop_assert!(bytes.iter().all(|&b| b == 0), "new allocation not zero");
                prop_assert!(
                    owner_of.insert(addr, live.len()).is_none(),
                    "pointer live twice"
                );
                tag = tag.wrapping_add(1);
                f.write(device as u32, addr, &secret(size as usize, tag));
                live.push(Live { addr, size, device });
            }
            Op::Free {
                pick,
                lie_about_size,
            } if !live.is_empty() => {
                let l = live.swap_remove(pick % live.len());
                owner_of.clear();
                for (i, x) in live.iter().enumerate() {
                    owner_of.insert(x.addr, i);
                }
                let size = if lie_about_size {
                    l.size as i64 + 1
                } else {
                    l.size as i64
                };
                let r = f
                    .alloc
                    .free(l.addr, size, l.device as i32, StreamHandle(0))
                    .unwrap();
                prop_assert_eq!(r.size_mismatch, lie_about_size);
            }
            Op::RecordStream { pick, stream } if !live.is_empty() => {
                prop_assert!(f.alloc.record_stream(
                    live[pick % live.len()].addr,
                    StreamHandle(10 + stream as u64)
                ));
            }
            Op::InjectFault => f.backend.inject_fault_next(),
            Op::Synchronize => f.alloc.synchronize().unwrap(),
            Op::EmptyCache => f.alloc.empty_cache(),
            Op::BadFree { offset } if !live.is_empty() => {
                let l = &live[offset as usize % live.len()];
                // Interior (or wrong device when the block is 1 byte); never accepted.
                let target = l.addr + (offset as u64 % l.size.max(2) as u64).max(1);
                prop_assert!(f
                    .alloc
                    .free(target, 1, l.device as i32, StreamHandle(0))
                    .is_err());
            }
            _ => {}
        }
        let acct = f.alloc.check_consistency().map_err(TestCaseError::fail)?;
        prop_assert_eq!(acct.live.blocks as usize, live.len());
        f.assert_balanced();
    }
    Context::set_current(Context::none());
    // Everything freed and synchronized: no PENDING block remains, and every failed
    // verification shows up as a quarantine.
    for l in live.drain(..) {
        f.alloc
            .free(l.addr, l.size as i64, l.device as i32, StreamHandle(0))
            .unwrap();
    }
    f.alloc.synchronize().unwrap();
    let st = f.alloc.stats();
    prop_assert_eq!(st.accounting.pending.blocks, 0);
    prop_assert_eq!(st.accounting.live.blocks, 0);
    // A quarantine the flusher applied is counted under the pool lock and its event emitted
    // just after, on the flusher's thread: waited for, bounded.
    let quarantines = || {
        let c = f.alloc.stats().counters;
        (
            (c.quarantined + c.rescrub_failed) as usize,
            f.sink.count("quarantine"),
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (counted, emitted) = loop {
        let (counted, emitted) = quarantines();
        if counted == emitted || std::time::Instant::now() > deadline {
            break (counted, emitted);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    prop_assert_eq!(counted, emitted);
    prop_assert!(
        st.counters.verifications_failed <= st.counters.quarantined + st.counters.rescrub_failed
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_sequences_keep_the_invariants(config in config(), ops in prop::collection::vec(op(), 1..120)) {
        run(config, ops)?;
    }
}
