//! Bad calls never crash or corrupt the pool: each produces an error and an event and leaves
//! every other block intact.

mod common;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::{AllocError, FreeError};
use kvhygiene::backend::StreamHandle;
use kvhygiene::events::{EventKind, InvalidFreeReason};

const S: StreamHandle = StreamHandle(0);

/// A fixture with a bystander block holding known bytes, checked after each bad call.
struct Bystander {
    f: Fixture,
    addr: u64,
    bytes: Vec<u8>,
}

impl Bystander {
    fn new() -> Self {
        let f = Fixture::new(manual_config());
        let addr = f.malloc_zeroed(4096, 0, 0);
        let bytes = secret(4096, 0x77);
        f.write(0, addr, &bytes);
        Bystander { f, addr, bytes }
    }

    fn assert_intact(&self) {
        assert_eq!(
            self.f.read(0, self.addr, 4096),
            self.bytes,
            "bystander changed"
        );
        self.f.alloc.check_consistency().unwrap();
        self.f.assert_balanced();
    }

    fn expect_invalid(
        &self,
        r: Result<kvhygiene::alloc::FreeReport, FreeError>,
        reason: InvalidFreeReason,
    ) {
        match r {
            Err(FreeError::Invalid { reason: got, .. }) => assert_eq!(got, reason),
            other => panic!("expected {reason:?}, got {other:?}"),
        }
        let last = self.f.sink.snapshot().pop().expect("an event");
        assert!(
            matches!(last.kind, EventKind::InvalidFree { reason: r, .. } if r == reason),
            "{last:?}"
        );
        self.assert_intact();
    }
}

#[test]
fn unknown_pointer() {
    let b = Bystander::new();
    b.expect_invalid(
        b.f.alloc.free(0xdead_beef_0000, 64, 0, S),
        InvalidFreeReason::UnknownPointer,
    );
}

#[test]
fn double_free() {
    let b = Bystander::new();
    let a = b.f.malloc_zeroed(256, 0, 0);
    b.f.alloc.free(a, 256, 0, S).unwrap();
    // Pending, then clean: both are double frees.
    b.expect_invalid(b.f.alloc.free(a, 256, 0, S), InvalidFreeReason::DoubleFree);
    b.f.alloc.synchronize().unwrap();
    b.expect_invalid(b.f.alloc.free(a, 256, 0, S), InvalidFreeReason::DoubleFree);
    // The double free did not put the block on a free list twice.
    let x = b.f.malloc_zeroed(256, 0, 0);
    let y = b.f.malloc_zeroed(256, 0, 0);
    assert_ne!(x, y);
}

#[test]
fn interior_pointer() {
    let b = Bystander::new();
    b.expect_invalid(
        b.f.alloc.free(b.addr + 8, 4096, 0, S),
        InvalidFreeReason::InteriorPointer,
    );
    b.expect_invalid(
        b.f.alloc.free(b.addr + 4095, 1, 0, S),
        InvalidFreeReason::InteriorPointer,
    );
}

/// The address just past a block's last byte is not inside it: with no block starting there,
/// its free is an unknown pointer (on the block's device) and not a wrong-device free (on
/// another), and the record names no block and no owner.
#[test]
fn one_past_the_end_is_an_unknown_pointer() {
    let b = Bystander::new();
    let capacity = b.f.alloc.block_info(b.addr).unwrap().capacity;
    let end = b.addr + capacity;
    assert!(b.f.alloc.block_info(end).is_none());
    b.expect_invalid(
        b.f.alloc.free(end, 64, 0, S),
        InvalidFreeReason::UnknownPointer,
    );
    let last = b.f.sink.snapshot().pop().unwrap();
    assert!(last.block.is_none(), "{last:?}");
    b.expect_invalid(
        b.f.alloc.free(end, 64, 1, S),
        InvalidFreeReason::UnknownPointer,
    );
}

#[test]
fn wrong_device() {
    let b = Bystander::new();
    b.expect_invalid(
        b.f.alloc.free(b.addr, 4096, 1, S),
        InvalidFreeReason::WrongDevice,
    );
    // A pointer inside a block of device 0, freed for device 1: the wrong device too, not
    // an unknown pointer.
    b.expect_invalid(
        b.f.alloc.free(b.addr + 8, 4096, 1, S),
        InvalidFreeReason::WrongDevice,
    );
    // The block is still live on device 0 and frees normally there.
    b.f.alloc.free(b.addr, 4096, 0, S).unwrap();
}

#[test]
fn invalid_device_on_free_and_malloc() {
    let b = Bystander::new();
    b.expect_invalid(
        b.f.alloc.free(b.addr, 4096, 99, S),
        InvalidFreeReason::InvalidDevice,
    );
    b.expect_invalid(
        b.f.alloc.free(b.addr, 4096, -1, S),
        InvalidFreeReason::InvalidDevice,
    );
    assert!(matches!(
        b.f.alloc.malloc(64, 8, S),
        Err(AllocError::InvalidDevice {
            device: 8,
            count: 8
        })
    ));
    assert!(matches!(
        b.f.alloc.malloc(64, -3, S),
        Err(AllocError::InvalidDevice { .. })
    ));
    b.assert_intact();
}

#[test]
fn negative_and_zero_sizes_on_malloc() {
    let b = Bystander::new();
    assert_eq!(b.f.alloc.malloc(-1, 0, S), Err(AllocError::InvalidSize(-1)));
    assert_eq!(b.f.alloc.malloc(0, 0, S), Err(AllocError::InvalidSize(0)));
    assert_eq!(
        b.f.alloc.malloc(i64::MIN, 0, S),
        Err(AllocError::InvalidSize(i64::MIN))
    );
    b.assert_intact();
}

#[test]
fn negative_size_on_free_is_a_mismatch_and_frees_by_the_table() {
    let b = Bystander::new();
    let a = b.f.malloc_zeroed(100, 0, 0);
    let r = b.f.alloc.free(a, -100, 0, S).unwrap();
    assert!(r.size_mismatch);
    match b.f.sink.snapshot().pop().unwrap().kind {
        EventKind::SizeMismatch { claimed, .. } => assert_eq!(claimed, -100),
        k => panic!("{k:?}"),
    }
    b.assert_intact();
}

#[test]
fn null_free_is_a_no_op() {
    let b = Bystander::new();
    b.f.alloc.free(0, 0, 0, S).unwrap();
    assert!(b.f.sink.snapshot().is_empty());
    b.assert_intact();
}

#[test]
fn huge_allocation_is_out_of_memory_not_a_crash() {
    let b = Bystander::new();
    let r = b.f.alloc.malloc(i64::MAX, 0, S);
    assert!(matches!(r, Err(AllocError::OutOfMemory { .. })), "{r:?}");
    assert_eq!(b.f.alloc.stats().counters.out_of_memory, 1);
    b.assert_intact();
}

/// `check_free`, for front ends that check a free before its side effects: a free
/// the pool would refuse is refused, counted and logged as `free` does it; a valid one is left
/// alone (no event, the block still LIVE and freed normally after).
#[test]
fn check_free_refuses_what_free_would_and_leaves_valid_frees_alone() {
    let b = Bystander::new();
    let f = &b.f;
    let events = || f.sink.snapshot().len();
    let (before, invalid) = (events(), f.alloc.stats().counters.invalid_frees);
    assert_eq!(f.alloc.check_free(b.addr, 0).ok(), Some(4096));
    assert_eq!(events(), before, "a valid free is not logged");
    assert_eq!(f.alloc.stats().counters.invalid_frees, invalid);
    b.assert_intact();

    let as_result = |r: Result<u64, FreeError>| Err(r.expect_err("refused"));
    b.expect_invalid(
        as_result(f.alloc.check_free(b.addr + 8, 0)),
        InvalidFreeReason::InteriorPointer,
    );
    b.expect_invalid(
        as_result(f.alloc.check_free(b.addr, 1)),
        InvalidFreeReason::WrongDevice,
    );
    b.expect_invalid(
        as_result(f.alloc.check_free(b.addr, 99)),
        InvalidFreeReason::InvalidDevice,
    );
    let a = f.malloc_zeroed(256, 0, 0);
    f.alloc.free(a, 256, 0, S).unwrap();
    b.expect_invalid(
        as_result(f.alloc.check_free(a, 0)),
        InvalidFreeReason::DoubleFree,
    );
    assert_eq!(f.alloc.stats().counters.invalid_frees, invalid + 4);
    // The block checked first is still LIVE: its free is accepted.
    f.alloc.free(b.addr, 4096, 0, S).unwrap();
}

/// A refused free's message says in words why (the forensic record carries the reason's
/// name): what `kvh_last_error_message` gives a C caller.
#[test]
fn a_refused_free_says_why_in_words() {
    let b = Bystander::new();
    let a = b.f.malloc_zeroed(256, 0, 0);
    b.f.alloc.free(a, 256, 0, S).unwrap();
    let double = b.f.alloc.free(a, 256, 0, S).unwrap_err().to_string();
    assert!(
        double.contains("double free (the block was already freed)"),
        "{double}"
    );
    let interior = b.f.alloc.free(b.addr + 8, 1, 0, S).unwrap_err().to_string();
    assert!(interior.contains("interior pointer"), "{interior}");
    assert!(!double.contains("DoubleFree") && !interior.contains("InteriorPointer"));
}
