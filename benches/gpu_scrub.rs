//! GPU scrub benchmarks (need a CUDA GPU; skip with a message otherwise).
//!
//! Side by side in one run on one card:
//! - `scrub_vs_memset/{scrub_verify,memset}/{256MiB,1GiB}`: one segment scrubbed and verified
//!   (64 samples) against `cuMemsetD8Async` of the same buffer. Each iteration queues DEPTH
//!   of them back to back and then waits for completion, on both sides (bandwidth, with the
//!   same overlap of launch overheads). Target ratio (memset time / scrub time) >= 0.9.
//! - `batched/{scrub_4096x64KiB_per_chunk,scrub_4096x64KiB_resident,memset_256MiB}`: 4096
//!   segments of 64 KiB in one batch (work items) against one memset of the same 256 MiB,
//!   DEPTH of each per iteration, the batch under both launch shapes of [`ItemGrid`]. Target
//!   >= 0.8 for the default shape.
//!
//! Short measurement times keep the whole run well under a minute; scripts/gpu-check.sh reads
//! the estimates criterion writes under `$CRITERION_HOME`.
//!
//! After the criterion groups, `timeline` prints, for each shape, where one iteration of the
//! batched scrub spends its wall time (medians over 20 iterations): until the first batch is
//! submitted (the device is idle until then), until all are submitted, until the first
//! completes, and until the last one's results are read. Not a target: it locates the host's
//! share.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use kvhygiene::backend::cuda::{probe, CudaBackend, ItemGrid, Probe};
use kvhygiene::backend::{
    Backend, DevicePtr, ScrubBatch, ScrubOptions, ScrubSegment, ScrubTicket, StreamHandle,
};

const MIB: u64 = 1 << 20;
const OPTIONS: ScrubOptions = ScrubOptions {
    samples: 64,
    full_verify: false,
    double_pass: false,
};

/// Batches (or memsets) queued back to back before waiting, as the allocator queues them:
/// both sides are measured as bandwidth, with launch and copy overheads overlapping GPU work
/// in the same way, and both end by waiting for the device.
const DEPTH: u64 = 8;

/// Queues one batch of `segments` on the default stream.
fn submit(b: &CudaBackend, segments: &[ScrubSegment]) -> Box<dyn ScrubTicket> {
    let batch = ScrubBatch {
        device: 0,
        stream: StreamHandle(0),
        wait_streams: Vec::new(),
        segments: segments.to_vec(),
        options: OPTIONS,
    };
    // SAFETY: 1. the segments lie in the 1 GiB buffer `main` allocated, released after every
    // benchmark waited for its batches; 2. nothing else uses it.
    unsafe { b.submit_scrub(batch) }.unwrap_or_else(|e| panic!("scrub failed: {e}"))
}

/// Waits for a batch and reads its results, one per segment.
fn finish(mut ticket: Box<dyn ScrubTicket>, segments: usize) {
    let results = ticket
        .wait()
        .unwrap_or_else(|e| panic!("scrub failed: {e}"));
    assert_eq!(results.len(), segments);
}

fn scrub(b: &CudaBackend, segments: &[ScrubSegment]) {
    let tickets: Vec<_> = (0..DEPTH).map(|_| submit(b, segments)).collect();
    for t in tickets {
        finish(t, segments.len());
    }
}

fn memset(b: &CudaBackend, addr: DevicePtr, len: u64) {
    for _ in 0..DEPTH {
        b.zero_fresh(0, addr, len, StreamHandle(0))
            .unwrap_or_else(|e| panic!("memset failed: {e}"));
    }
    b.synchronize(0)
        .unwrap_or_else(|e| panic!("synchronize failed: {e}"));
}

fn single_segment(c: &mut Criterion, b: &CudaBackend, buf: DevicePtr) {
    let mut g = c.benchmark_group("scrub_vs_memset");
    for (label, len) in [("256MiB", 256 * MIB), ("1GiB", 1024 * MIB)] {
        g.throughput(Throughput::Bytes(DEPTH * len));
        let seg = [ScrubSegment {
            addr: buf,
            len,
            seed: 1,
        }];
        g.bench_function(BenchmarkId::new("scrub_verify", label), |x| {
            x.iter(|| scrub(b, &seg))
        });
        g.bench_function(BenchmarkId::new("memset", label), |x| {
            x.iter(|| memset(b, buf, len))
        });
    }
    g.finish();
}

/// Bytes in each segment of the batched case.
const BATCH_SEG_LEN: u64 = 64 * 1024;

/// The batched case: 4096 consecutive segments of 64 KiB from `buf`.
fn batch_segments(buf: DevicePtr) -> Vec<ScrubSegment> {
    (0..4096u64)
        .map(|i| ScrubSegment {
            addr: buf + i * BATCH_SEG_LEN,
            len: BATCH_SEG_LEN,
            seed: i,
        })
        .collect()
}

/// The launch shapes of a batch with work items, with their benchmark names.
const SHAPES: [(ItemGrid, &str); 2] = [
    (ItemGrid::PerChunk, "per_chunk"),
    (ItemGrid::Resident, "resident"),
];

fn batched(c: &mut Criterion, b: &CudaBackend, buf: DevicePtr) {
    let seg_len = BATCH_SEG_LEN;
    let segments = batch_segments(buf);
    let mut g = c.benchmark_group("batched");
    g.throughput(Throughput::Bytes(DEPTH * 4096 * seg_len));
    for (shape, name) in SHAPES {
        b.set_item_grid(shape);
        g.bench_function(format!("scrub_4096x64KiB_{name}"), |x| {
            x.iter(|| scrub(b, &segments))
        });
    }
    b.set_item_grid(ItemGrid::default());
    g.bench_function("memset_256MiB", |x| {
        x.iter(|| memset(b, buf, 4096 * seg_len))
    });
    g.finish();
}

/// Prints the median phase times of one batched-scrub iteration (see the module docs).
fn timeline(b: &CudaBackend, buf: DevicePtr, name: &str) {
    let segments = batch_segments(buf);
    let mut phases: [Vec<f64>; 4] = Default::default();
    for _ in 0..20 {
        let start = Instant::now();
        let mut tickets = Vec::with_capacity(DEPTH as usize);
        let mut first_submitted = 0.0;
        for i in 0..DEPTH {
            tickets.push(submit(b, &segments));
            if i == 0 {
                first_submitted = micros(start);
            }
        }
        let all_submitted = micros(start);
        let mut first_done = 0.0;
        for (i, t) in tickets.into_iter().enumerate() {
            finish(t, segments.len());
            if i == 0 {
                first_done = micros(start);
            }
        }
        let last_read = micros(start);
        for (v, x) in phases
            .iter_mut()
            .zip([first_submitted, all_submitted, first_done, last_read])
        {
            v.push(x);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [a, b2, c, d] = &mut phases;
    println!(
        "gpu_scrub: timeline of {DEPTH} batches of 4096 x 64 KiB, {name} (median us from the \
         start): first submitted {:.1}, all submitted {:.1}, first done {:.1}, last results \
         read {:.1}",
        median(a),
        median(b2),
        median(c),
        median(d)
    );
}

fn micros(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}

fn main() {
    let backend = match probe() {
        Probe::Available(b) => b,
        Probe::NoDriver(why) => {
            println!("gpu_scrub: skipped: no CUDA driver ({why})");
            return;
        }
        Probe::Broken(e) => {
            println!("gpu_scrub: skipped: the CUDA backend cannot start: {e}");
            return;
        }
    };
    let buf = match backend.allocate(0, 1024 * MIB) {
        Ok(p) => p,
        Err(e) => {
            println!("gpu_scrub: skipped: cannot allocate 1 GiB: {e}");
            return;
        }
    };
    if let Ok(image) = backend.image_in_use(0) {
        println!("gpu_scrub: kernel image {image}");
    }
    // scripts/gpu/report.py applies the batched target to the shape named here.
    if let Some((_, name)) = SHAPES.iter().find(|(s, _)| *s == ItemGrid::default()) {
        println!("gpu_scrub: default item grid: {name}");
    }
    match backend.strided_blocks(0) {
        Ok(0) => println!("gpu_scrub: the resident shape falls back to kvh_scrub (no occupancy)"),
        Ok(n) => println!("gpu_scrub: resident shape: kvh_scrub_strided on up to {n} blocks"),
        Err(e) => println!("gpu_scrub: no occupancy figure: {e}"),
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .configure_from_args();
    single_segment(&mut c, &backend, buf);
    batched(&mut c, &backend, buf);
    c.final_summary();
    for (shape, name) in SHAPES {
        backend.set_item_grid(shape);
        timeline(&backend, buf, name);
    }
    let _ = backend.release(0, buf, 1024 * MIB);
}
