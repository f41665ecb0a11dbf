//! `kvh demo`: several tenants run inference requests whose KV caches grow during decode and
//! are freed at request end, on a real [`Allocator`]. Every new allocation is read back and
//! must be all zero, while every request fills its blocks with its own secret bytes: a single
//! leak between requests would show up as a non-zero byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::alloc::{Allocator, FreeError};
use crate::backend::{Backend, BackendKind, StreamHandle};
use crate::config::Config;
use crate::context::Context;
use crate::events::EventSink;
use crate::stats::Stats;

/// Every simulated request runs on the default stream: stream handles are real `CUstream`
/// values on the CUDA backend, and the demo owns no streams of its own.
const DEFAULT_STREAM: StreamHandle = StreamHandle(0);

/// Shape of the simulated workload.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub tenants: u32,
    pub requests_per_tenant: u32,
    /// Tokens generated per request (a new KV block every `tokens_per_block`).
    pub decode_tokens: u32,
    pub tokens_per_block: u32,
    /// Bytes of one KV block (both K and V, all layers, for `tokens_per_block` tokens).
    pub kv_block_bytes: u64,
    pub inject_fault: bool,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            tenants: 4,
            requests_per_tenant: 24,
            decode_tokens: 256,
            tokens_per_block: 16,
            // 16 tokens x (K + V) x 8 layers x 8 heads x 64 dims x 2 bytes (fp16).
            kv_block_bytes: 16 * 2 * 8 * 8 * 64 * 2,
            inject_fault: false,
            seed: 0x6b76_6879,
        }
    }
}

/// What the fault drill showed.
#[derive(Clone, Debug, Serialize)]
pub struct FaultDrill {
    /// `kvh_free_checked` reported the verification failure.
    pub caught: bool,
    /// The block went to quarantine and was never handed out again.
    pub quarantined: bool,
    pub detail: String,
    /// The drill's own allocations, each read back like the workload's (included in the
    /// report's totals).
    pub checked: u64,
    /// Of those, allocations with any non-zero byte. Must be 0.
    pub with_residue: u64,
}

/// The demo's findings.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub backend: String,
    pub tenants: u32,
    pub requests: u64,
    pub elapsed_ms: u64,
    /// New allocations read back in full.
    pub allocations_checked: u64,
    /// Of those, allocations with any non-zero byte: leaks. Must be 0.
    pub allocations_with_residue: u64,
    pub fault_drill: Option<FaultDrill>,
    pub stats: Stats,
}

impl DemoReport {
    /// Whether the run showed what it must: no residue, and a caught fault when one was set.
    pub fn passed(&self) -> bool {
        self.allocations_with_residue == 0
            && self
                .fault_drill
                .as_ref()
                .is_none_or(|d| d.caught && d.quarantined)
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("allocation failed: {0}")]
    Alloc(#[from] crate::alloc::AllocError),
    #[error("backend error: {0}")]
    Backend(#[from] crate::backend::BackendError),
    #[error("--inject-fault needs the host backend (it sabotages a scrub on purpose); this run uses {0}")]
    FaultNeedsHost(BackendKind),
    #[error("free failed: {0}")]
    Free(#[from] FreeError),
}

/// Runs the simulation on `backend` with `config`. `progress` is called after each request.
pub fn run(
    backend: Arc<dyn Backend>,
    config: Config,
    sink: Option<Arc<dyn EventSink>>,
    opts: &DemoOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<DemoReport, DemoError> {
    if opts.inject_fault && backend.kind() != BackendKind::Host {
        return Err(DemoError::FaultNeedsHost(backend.kind()));
    }
    let alloc = Allocator::new(backend, config, sink);
    let checked = AtomicU64::new(0);
    let residue = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let total = u64::from(opts.tenants) * u64::from(opts.requests_per_tenant);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<(), DemoError> {
        let workers: Vec<_> = (0..opts.tenants)
            .map(|tenant| {
                let (alloc, checked, residue, done) = (&alloc, &checked, &residue, &done);
                scope.spawn(move || -> Result<(), DemoError> {
                    let mut rng = Rng(
                        opts.seed ^ (u64::from(tenant) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    );
                    for request in 0..opts.requests_per_tenant {
                        let ctx = Context::new(
                            Some(&format!("tenant-{tenant}")),
                            Some(&format!("req-{tenant}-{request}")),
                            Some("llama-demo"),
                        )
                        .unwrap_or_default();
                        Context::set_current(ctx);
                        let found = run_request(alloc, opts, tenant, &mut rng)?;
                        checked.fetch_add(found.0, Ordering::Relaxed);
                        residue.fetch_add(found.1, Ordering::Relaxed);
                        progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                    }
                    Context::set_current(Context::none());
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        }
        Ok(())
    })?;
    let fault_drill = if opts.inject_fault {
        let drill = fault_drill(&alloc, opts)?;
        checked.fetch_add(drill.checked, Ordering::Relaxed);
        residue.fetch_add(drill.with_residue, Ordering::Relaxed);
        Some(drill)
    } else {
        None
    };
    // Shutdown drains every scrub so the figures are final.
    alloc.shutdown();
    let stats = alloc.stats();
    Ok(DemoReport {
        backend: stats.backend.clone(),
        tenants: opts.tenants,
        requests: total,
        elapsed_ms: started.elapsed().as_millis() as u64,
        allocations_checked: checked.into_inner(),
        allocations_with_residue: residue.into_inner(),
        fault_drill,
        stats,
    })
}

/// One request: prefill allocates the prompt's KV blocks, decode grows the cache block by
/// block (plus a short-lived activation buffer per step batch), and the end frees it all.
/// Returns `(allocations checked, allocations with residue)`.
fn run_request(
    alloc: &Allocator,
    opts: &DemoOptions,
    tenant: u32,
    rng: &mut Rng,
) -> Result<(u64, u64), DemoError> {
    let stream = DEFAULT_STREAM;
    let secret = tenant as u8 ^ 0xA5 | 1;
    let prompt_blocks = 1 + rng.below(4);
    let decode_blocks = u64::from(opts.decode_tokens / opts.tokens_per_block.max(1)).max(1);
    let mut kv = Vec::new();
    let (mut checked, mut dirty) = (0, 0);
    let mut take = |size: u64, kv: &mut Vec<(u64, u64)>| -> Result<(), DemoError> {
        let addr = alloc.malloc(size as i64, 0, stream)?;
        checked += 1;
        dirty += u64::from(!reads_zero(alloc.backend().as_ref(), addr, size)?);
        // The request's own data: this is what must never reach another request.
        alloc
            .backend()
            .write(0, addr, &vec![secret; size as usize])?;
        kv.push((addr, size));
        Ok(())
    };
    for _ in 0..prompt_blocks + decode_blocks {
        take(opts.kv_block_bytes, &mut kv)?;
        // An activation buffer of varying size, freed right away.
        let act = 4096 + 512 * rng.below(64);
        let mut scratch = Vec::new();
        take(act, &mut scratch)?;
        for (a, s) in scratch {
            alloc.free(a, s as i64, 0, stream)?;
        }
    }
    for (addr, size) in kv {
        alloc.free(addr, size as i64, 0, stream)?;
    }
    Ok((checked, dirty))
}

/// Reads a whole allocation back and checks it is zero.
fn reads_zero(backend: &dyn Backend, addr: u64, size: u64) -> Result<bool, DemoError> {
    let mut buf = vec![0xFFu8; size as usize];
    backend.read(0, addr, &mut buf)?;
    Ok(buf.iter().all(|&b| b == 0))
}

/// Sabotages one scrub and shows verification catching it.
fn fault_drill(alloc: &Allocator, opts: &DemoOptions) -> Result<FaultDrill, DemoError> {
    let victim = Context::new(
        Some("tenant-victim"),
        Some("req-victim"),
        Some("llama-demo"),
    )
    .unwrap_or_default();
    Context::set_current(victim);
    let size = opts.kv_block_bytes;
    let (mut checked, mut with_residue) = (0, 0);
    let mut read_back = |addr: u64| -> Result<(), DemoError> {
        checked += 1;
        with_residue += u64::from(!reads_zero(alloc.backend().as_ref(), addr, size)?);
        Ok(())
    };
    let addr = alloc.malloc(size as i64, 0, DEFAULT_STREAM)?;
    read_back(addr)?;
    alloc.backend().write(0, addr, &vec![0x5E; size as usize])?;
    let id = alloc.block_info(addr).map(|b| b.id);
    alloc.backend().inject_fault(1)?;
    let result = alloc.free_checked(addr, size as i64, 0, DEFAULT_STREAM);
    let caught = matches!(result, Err(FreeError::VerifyFailed { .. }));
    // Try hard to get the block back: it must never come.
    let mut handed_out_again = false;
    for _ in 0..64 {
        let again = alloc.malloc(size as i64, 0, DEFAULT_STREAM)?;
        read_back(again)?;
        handed_out_again |= alloc.block_info(again).map(|b| b.id) == id;
        alloc.free(again, size as i64, 0, DEFAULT_STREAM)?;
        let _ = alloc.synchronize();
    }
    Context::set_current(Context::none());
    let quarantined = alloc.stats().counters.quarantined >= 1 && !handed_out_again;
    let detail = match result {
        Err(e) => e.to_string(),
        Ok(_) => "the sabotaged scrub was NOT caught".to_string(),
    };
    Ok(FaultDrill {
        caught,
        quarantined,
        detail,
        checked,
        with_residue,
    })
}

/// xorshift64*: a small deterministic generator for the workload shape.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Human-readable summary.
pub fn render(report: &DemoReport) -> String {
    let s = &report.stats;
    let c = &s.counters;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<28}{v}\n"));
    line("backend", report.backend.clone());
    line(
        "tenants x requests",
        format!(
            "{} x {} = {} requests in {} ms",
            report.tenants,
            report.requests / u64::from(report.tenants.max(1)),
            report.requests,
            report.elapsed_ms
        ),
    );
    line(
        "allocations",
        format!(
            "{} (pool hits {}, hit rate {:.1}%)",
            c.allocations,
            c.pool_hits,
            s.pool_hit_rate * 100.0
        ),
    );
    line("frees", c.frees.to_string());
    line(
        "bytes scrubbed",
        format!(
            "{:.1} MiB in {} scrubs, {} batches",
            mib(c.bytes_scrubbed),
            c.scrubs,
            c.scrub_batches
        ),
    );
    line(
        "verifications",
        format!(
            "passed {}, failed {}",
            c.verifications_passed, c.verifications_failed
        ),
    );
    line(
        "quarantined",
        format!(
            "{} (blocks returned to the backend: {})",
            c.quarantined, c.released
        ),
    );
    line("invalid frees", c.invalid_frees.to_string());
    line(
        "scrub latency (free→clean)",
        format!(
            "p50 {} µs, p95 {} µs, max {} µs",
            s.scrub_latency.p50_us, s.scrub_latency.p95_us, s.scrub_latency.max_us
        ),
    );
    line(
        "new allocations read back",
        format!(
            "{}, with residue: {}",
            report.allocations_checked, report.allocations_with_residue
        ),
    );
    if let Some(d) = &report.fault_drill {
        line(
            "fault drill",
            format!(
                "caught: {}, quarantined and never reused: {}",
                yes(d.caught),
                yes(d.quarantined)
            ),
        );
        line("", d.detail.clone());
    }
    let verdict = if report.passed() {
        "PASS: every allocation read zero; no request saw another's bytes"
    } else {
        "FAIL: see the figures above"
    };
    out.push_str(&format!("{verdict}\n"));
    out
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// A progress callback that prints a bar on stderr when it is a terminal, and nothing
/// otherwise (logs stay clean).
pub fn stderr_progress() -> impl Fn(u64, u64) + Sync {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let last = std::sync::Mutex::new(Instant::now() - Duration::from_secs(1));
    move |done, total| {
        if !tty {
            return;
        }
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if done == total || last.elapsed() > Duration::from_millis(100) {
            *last = Instant::now();
            eprint!("\r  requests {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::host::HostBackend;

    fn small(inject_fault: bool) -> DemoReport {
        let opts = DemoOptions {
            tenants: 2,
            requests_per_tenant: 3,
            decode_tokens: 64,
            inject_fault,
            ..DemoOptions::default()
        };
        let backend: Arc<dyn Backend> = HostBackend::new();
        run(backend, Config::default(), None, &opts, &|_, _| {}).expect("demo runs")
    }

    /// Every allocation the demo makes is read back, the fault drill's included, so the
    /// "read back" line accounts for all of them.
    #[test]
    fn every_allocation_is_read_back_and_the_drill_is_caught() {
        for inject_fault in [false, true] {
            let r = small(inject_fault);
            assert!(r.passed(), "{}", render(&r));
            assert_eq!(r.allocations_checked, r.stats.counters.allocations);
            assert_eq!(r.allocations_with_residue, 0);
            if let Some(d) = &r.fault_drill {
                assert!(d.caught && d.quarantined, "{d:?}");
                assert_eq!((d.checked, d.with_residue), (65, 0));
            }
        }
    }
}
