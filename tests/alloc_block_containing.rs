//! `Allocator::block_containing`: the ownership query front ends ask before handing a pointer
//! to kvhygiene (the LD_PRELOAD interposers forward pointers it does not hold).

mod common;

use common::{manual_config, Fixture};
use kvhygiene::alloc::BlockSpan;
use kvhygiene::backend::StreamHandle;

const S: StreamHandle = StreamHandle(0);

#[test]
fn finds_starts_and_interior_addresses_in_every_state_until_release() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(1000, 0, 0);
    let b = f.malloc_zeroed(300, 3, 0);
    let span = f.alloc.block_containing(a).expect("live block");
    assert_eq!(
        span,
        BlockSpan {
            device: 0,
            addr: a,
            requested: 1000,
            capacity: span.capacity,
            live: true,
        }
    );
    assert!(span.capacity >= 1000);
    // Interior addresses, up to the last byte of the capacity, name the same block.
    assert_eq!(f.alloc.block_containing(a + 1).map(|s| s.addr), Some(a));
    let last = a + span.capacity - 1;
    assert_eq!(f.alloc.block_containing(last).map(|s| s.addr), Some(a));
    // Another device's block is found with its device.
    let sb = f.alloc.block_containing(b).expect("block on device 3");
    assert_eq!((sb.device, sb.addr, sb.requested), (3, b, 300));

    // Pending, then clean: still held (a second free of it is a double free, not foreign).
    f.alloc.free(a, 1000, 0, S).unwrap();
    let freed = f.alloc.block_containing(a).expect("pending block");
    assert_eq!((freed.addr, freed.live), (a, false));
    f.alloc.synchronize().unwrap();
    let clean = f.alloc.block_containing(a).expect("clean block");
    assert_eq!((clean.addr, clean.live), (a, false));

    // Released to the backend: no longer held.
    f.alloc.empty_cache();
    assert_eq!(f.alloc.block_containing(a), None);
    assert_eq!(f.alloc.block_containing(a + 1), None);
    f.alloc.check_consistency().unwrap();
}

#[test]
fn addresses_outside_every_block_are_not_held() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4096, 0, 0);
    let cap = f.alloc.block_containing(a).expect("held").capacity;
    assert_eq!(f.alloc.block_containing(0), None);
    assert_eq!(f.alloc.block_containing(a - 1), None);
    // One past the end belongs to no block unless another block starts there.
    match f.alloc.block_containing(a + cap) {
        None => {}
        Some(s) => assert_eq!(s.addr, a + cap, "one past the end must not name {a:#x}"),
    }
    let outside = Box::new(0u64);
    assert_eq!(
        f.alloc.block_containing(&*outside as *const u64 as u64),
        None
    );
    // The query changes nothing: no event, no counter.
    assert!(f.sink.snapshot().is_empty());
    assert_eq!(f.alloc.stats().counters.invalid_frees, 0);
}
