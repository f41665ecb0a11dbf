//! Host-side benchmarks (issue targets in docs/benchmarks.md):
//!
//! - `scrub_64MiB/{kvh_scrub_verify,memset}`: one 64 MiB segment scrubbed and verified by the
//!   host backend (submission, worker thread, zeroing, sampled verification, completion)
//!   against a plain `memset` of a 64 MiB buffer in the same run. Target ratio >= 0.9.
//! - `alloc_pair_mixed/{kvh_pool_hit,glibc_malloc_free_memset}`: a pool-hit `malloc` + `free`
//!   pair of mixed sizes, timed on the calling thread only (the scrub is asynchronous and runs
//!   outside the timed region), against glibc `malloc` + `memset` + `free` of the same sizes.
//!   Target: no slower than the baseline.
//!
//! - `cuda_batch_prep/4096x64KiB`: the host's share of launching a CUDA scrub batch of 4096
//!   segments (the GPU batched benchmark's shape): the launch plan and its work items, written
//!   into the slot's page-locked area (a preallocated buffer stands in for it). No GPU needed.
//! - `kv_scrub/{scrub_blocks,memset}`: `Allocator::scrub_kv_blocks` of 32 blocks of 4 KiB in
//!   each of 160 regions (an 80-layer model's K and V), waited for, against a `memset` of the
//!   same 5120 blocks: the cost of the checks, the submission and the verification on top of
//!   the zeroing.
//! - `kv_claim/{same_owner,new_owner}`: `Allocator::claim_kv_blocks` of the same 32 blocks
//!   (160 regions) by the request that owns them (the eviction gate's ledger only: what every
//!   claim without a change of owner costs), and alternately by two requests (each claim
//!   scrubs and verifies the blocks, like `kv_scrub/scrub_blocks`, plus the ledger).
//!
//! `scripts/bench-report.sh` prints the medians and ratios from criterion's estimates.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvhygiene::alloc::Allocator;
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, ScrubBatch, ScrubOptions, ScrubSegment, StreamHandle};
use kvhygiene::config::Config;

const SCRUB_BYTES: u64 = 64 << 20;

fn scrub_throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("scrub_64MiB");
    g.throughput(Throughput::Bytes(SCRUB_BYTES));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(4));

    let backend = HostBackend::new();
    let addr = backend.allocate(0, SCRUB_BYTES).expect("64 MiB");
    let options = Config::default();
    let mut seed = 1;
    g.bench_function("kvh_scrub_verify", |b| {
        b.iter(|| {
            seed += 1;
            let batch = ScrubBatch {
                device: 0,
                stream: StreamHandle(0),
                wait_streams: vec![],
                segments: vec![ScrubSegment {
                    addr,
                    len: SCRUB_BYTES,
                    seed,
                }],
                options: ScrubOptions {
                    samples: options.verify_samples,
                    full_verify: options.full_verify,
                    double_pass: options.double_pass,
                },
            };
            // SAFETY: 1. the segment is the 64 MiB allocated above, released after the loop;
            // 2. nothing else uses it.
            let results = unsafe { backend.submit_scrub(batch) }
                .expect("submit")
                .wait()
                .expect("wait");
            black_box(results);
        })
    });

    let mut buf = vec![1u8; SCRUB_BYTES as usize];
    g.bench_function("memset", |b| {
        b.iter(|| {
            // SAFETY: `buf` is a live, exclusively borrowed allocation of exactly this length.
            unsafe { std::ptr::write_bytes(buf.as_mut_ptr(), 0, buf.len()) };
            black_box(&mut buf);
        })
    });
    g.finish();
    backend.release(0, addr, SCRUB_BYTES).expect("release");
}

/// Mixed sizes of KV blocks and activations, cycled.
const SIZES: [usize; 8] = [
    4 << 10,
    16 << 10,
    64 << 10,
    8 << 10,
    256 << 10,
    32 << 10,
    128 << 10,
    1 << 20,
];
/// Pairs timed between two (untimed) synchronisations; the pool is warmed with this many
/// clean blocks of every size so every malloc in a chunk is a pool hit.
const CHUNK: u64 = 256;

fn alloc_pair(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_pair_mixed");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(4));

    let alloc = Allocator::new(HostBackend::new(), Config::default(), None);
    warm(&alloc);
    g.bench_function(BenchmarkId::new("kvh_pool_hit", "mixed"), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut i = 0usize;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                alloc.synchronize().expect("synchronize");
                let start = Instant::now();
                for _ in 0..n {
                    let size = SIZES[i % SIZES.len()];
                    i += 1;
                    let p = alloc
                        .malloc(size as i64, 0, StreamHandle(0))
                        .expect("malloc");
                    alloc
                        .free(black_box(p), size as i64, 0, StreamHandle(0))
                        .expect("free");
                }
                timed += start.elapsed();
                left -= n;
            }
            timed
        })
    });
    assert_eq!(
        alloc.stats().counters.pool_misses,
        SIZES.len() as u64 * CHUNK,
        "misses only while warming"
    );

    g.bench_function(BenchmarkId::new("glibc_malloc_free_memset", "mixed"), |b| {
        let mut i = 0usize;
        b.iter(|| {
            let size = SIZES[i % SIZES.len()];
            i += 1;
            // SAFETY: malloc/free pair on the C heap; the pointer is checked before use and
            // freed exactly once.
            unsafe {
                let p = libc::malloc(size);
                assert!(!p.is_null());
                std::ptr::write_bytes(p.cast::<u8>(), 0, size);
                libc::free(black_box(p));
            }
        })
    });
    g.finish();
}

/// Puts CHUNK clean blocks of every size into the pool.
fn warm(alloc: &Allocator) {
    let mut held = Vec::new();
    for &size in &SIZES {
        for _ in 0..CHUNK {
            held.push((
                alloc.malloc(size as i64, 0, StreamHandle(0)).expect("warm"),
                size,
            ));
        }
    }
    for (p, size) in held {
        alloc
            .free(p, size as i64, 0, StreamHandle(0))
            .expect("free");
    }
    alloc.synchronize().expect("synchronize");
}

fn cuda_batch_prep(c: &mut Criterion) {
    use kvhygiene::backend::cuda::kernel::{self, DeviceChunk};
    let segments: Vec<ScrubSegment> = (0..4096u64)
        .map(|i| ScrubSegment {
            addr: 0x7f00_0000_0000 + i * 65_536,
            len: 65_536,
            seed: i,
        })
        .collect();
    let options = ScrubOptions {
        samples: 64,
        full_verify: false,
        double_pass: false,
    };
    let mut area = vec![DeviceChunk::default(); 4096];
    let mut g = c.benchmark_group("cuda_batch_prep");
    g.bench_function("4096x64KiB", |b| {
        b.iter(|| {
            let plan = kernel::plan(black_box(&segments), options).expect("plan");
            assert_eq!(plan.write_items(&segments, &mut area), 4096);
            black_box(&area);
            plan.total_chunks
        })
    });
    g.finish();
}

/// The paged cache of the `kv_*` benchmarks: 160 regions (an 80-layer model's K and V) of 256
/// blocks of 4 KiB in one allocation, and the 32 blocks a request hands in.
struct PagedCache {
    alloc: Allocator,
    cache: u64,
    layout: kvhygiene::alloc::KvLayout,
    ids: Vec<u32>,
}

const KV_REGIONS: u64 = 160;
const KV_BLOCKS: u64 = 256;
const KV_BLOCK: u64 = 4096;
const KV_REGION_BYTES: u64 = KV_BLOCKS * KV_BLOCK;

impl PagedCache {
    fn new() -> PagedCache {
        let alloc = Allocator::new(HostBackend::new(), Config::default(), None);
        let cache = alloc
            .malloc((KV_REGIONS * KV_REGION_BYTES) as i64, 0, StreamHandle(0))
            .expect("cache");
        let layout = kvhygiene::alloc::KvLayout {
            regions: (0..KV_REGIONS)
                .map(|r| cache + r * KV_REGION_BYTES)
                .collect(),
            block_bytes: KV_BLOCK,
            block_stride: KV_BLOCK,
            blocks_per_region: KV_BLOCKS,
        };
        let ids = (0..32).map(|i| i * 7 + 3).collect();
        PagedCache {
            alloc,
            cache,
            layout,
            ids,
        }
    }

    fn free(self) {
        self.alloc
            .free(
                self.cache,
                (KV_REGIONS * KV_REGION_BYTES) as i64,
                0,
                StreamHandle(0),
            )
            .expect("free");
        self.alloc.synchronize().expect("synchronize");
    }
}

fn kv_scrub(c: &mut Criterion) {
    const REGIONS: u64 = KV_REGIONS;
    const BLOCK: u64 = KV_BLOCK;
    let region = KV_REGION_BYTES;
    let p = PagedCache::new();
    let (alloc, layout, ids) = (&p.alloc, &p.layout, &p.ids);
    let mut g = c.benchmark_group("kv_scrub");
    g.throughput(Throughput::Bytes(REGIONS * ids.len() as u64 * BLOCK));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("scrub_blocks", |b| {
        b.iter(|| {
            let report = alloc
                .scrub_kv_blocks(layout, black_box(ids), 0, StreamHandle(0))
                .expect("scrub");
            assert!(report.failed.is_empty());
        })
    });

    let mut buf = vec![1u8; (REGIONS * region) as usize];
    g.bench_function("memset", |b| {
        b.iter(|| {
            for r in 0..REGIONS {
                for &id in ids {
                    let off = (r * region + u64::from(id) * BLOCK) as usize;
                    buf[off..off + BLOCK as usize].fill(0);
                }
            }
            black_box(&mut buf);
        })
    });
    g.finish();
    p.free();
}

fn kv_claim(c: &mut Criterion) {
    use kvhygiene::context::Context;
    let p = PagedCache::new();
    let (alloc, layout, ids) = (&p.alloc, &p.layout, &p.ids);
    let mut g = c.benchmark_group("kv_claim");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(4));
    let request = |r: &str| Context::new(Some("tenant"), Some(r), None).expect("ids");
    let claim = |ctx: &Context| {
        Context::set_current(ctx.clone());
        let report = alloc
            .claim_kv_blocks(layout, black_box(ids), 0, StreamHandle(0))
            .expect("claim");
        assert_eq!(report.claimed, ids.len() as u64);
        report.gate_scrubbed.len()
    };
    let (a, b) = (request("a"), request("b"));
    claim(&a);
    g.bench_function("same_owner", |x| {
        x.iter(|| assert_eq!(claim(&a), 0));
    });
    let mut turn = false;
    g.bench_function("new_owner", |x| {
        x.iter(|| {
            turn = !turn;
            assert_eq!(claim(if turn { &b } else { &a }), ids.len());
        })
    });
    g.finish();
    Context::set_current(Context::none());
    p.free();
}

criterion_group!(
    benches,
    scrub_throughput,
    alloc_pair,
    cuda_batch_prep,
    kv_scrub,
    kv_claim
);
criterion_main!(benches);
