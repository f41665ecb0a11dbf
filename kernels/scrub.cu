// kvhygiene scrub kernels: zero a batch of device segments, then verify them by the sampled
// read-back rule of src/backend/verify.rs.
//
// One scrub batch is two launches on the caller's stream:
//
//   1. kvh_scrub_zero   zeroes every byte of every segment (16-byte vector stores on the aligned
//                       body, byte stores on the unaligned head and tail), optionally twice;
//   2. kvh_scrub_verify reads the verification samples back and accumulates, per segment,
//                       {checked, nonzero} into the result slots.
//
// Why two launches rather than a last-block-done counter inside one: stream order already
// guarantees that every store of launch 1 is complete and visible before launch 2 reads, with
// no device-side counter to reset (a counter left half-incremented by an aborted launch would
// silently skip a later verification), and the read-back then runs on the whole grid instead of
// on the single last block. With one block, 4096 segments x 64 samples are 262,144 dependent
// random reads (about a millisecond); spread over the grid they cost a few microseconds, less
// than the ~3 us of the extra launch. Cooperative grid sync would also work but caps the grid at
// the co-resident block count and needs cuLaunchCooperativeKernel.
//
// Result slots: launch 1 clears them, launch 2 accumulates into them, the host downloads them
// after launch 2 in stream order.
//
// Work distribution: every segment is cut into KVH_CHUNK_BYTES chunks, numbered consecutively
// across the batch (the host writes each segment's first chunk number). Each block of the zero
// launch owns one contiguous, equal share of that flat chunk space (kvh_zero_walk): it searches
// the segment table once for its first chunk and then walks forward, zeroing each segment's part
// of its share as one range, so one 1 GiB segment and 4096 segments of 64 KiB both spread over
// all SMs without a search per chunk. Samples are numbered the same way (first_sample) and each
// verify thread owns one contiguous share of the sample space (kvh_verify_walk), with one search
// per thread and at most one atomic pair per thread and segment.
//
// The rule functions (kvh_splitmix64 .. kvh_sample_word) are __host__ __device__: the Rust test
// suite compiles this file as plain C++ (KVH_HOST_RULE) and checks them against verify.rs.
// Keep the constants below in step with src/backend/verify.rs and src/backend/cuda/kernel.rs;
// a test parses them.

#define KVH_WORD_BYTES 8ULL
#define KVH_CHUNK_BYTES 65536ULL
#define KVH_BLOCK_THREADS 256
#define KVH_SPLITMIX_GAMMA 0x9E3779B97F4A7C15ULL
#define KVH_SPLITMIX_MUL1 0xBF58476D1CE4E5B9ULL
#define KVH_SPLITMIX_MUL2 0x94D049BB133111EBULL
#define KVH_FLAG_DOUBLE_PASS 1u
#define KVH_FLAG_FULL_VERIFY 2u
#define KVH_NO_SKIP 0xFFFFFFFFu

#ifdef __CUDACC__
#define KVH_HD __host__ __device__ __forceinline__
#else
#define KVH_HD static inline
#endif

typedef unsigned long long kvh_u64;
typedef unsigned int kvh_u32;

// One segment of a batch, as the host lays it out (src/backend/cuda/kernel.rs, 40 bytes).
struct KvhSegment {
    kvh_u64 addr;         // device address of the first byte
    kvh_u64 len;          // bytes, >= 1
    kvh_u64 seed;         // seed of the sample positions
    kvh_u64 first_chunk;  // number of this segment's first chunk in the batch
    kvh_u64 first_sample; // number of this segment's first sample in the batch
};

// One result slot (SegmentResult in Rust).
struct KvhResult {
    kvh_u64 checked;
    kvh_u64 nonzero;
};

KVH_HD kvh_u64 kvh_splitmix64(kvh_u64 x) {
    kvh_u64 z = x + KVH_SPLITMIX_GAMMA;
    z = (z ^ (z >> 30)) * KVH_SPLITMIX_MUL1;
    z = (z ^ (z >> 27)) * KVH_SPLITMIX_MUL2;
    return z ^ (z >> 31);
}

// ceil(len / 8) without the overflow of (len + 7) / 8 near 2^64.
KVH_HD kvh_u64 kvh_word_count(kvh_u64 len) {
    return len / KVH_WORD_BYTES + (len % KVH_WORD_BYTES != 0);
}

KVH_HD kvh_u64 kvh_chunk_count(kvh_u64 len) {
    return len / KVH_CHUNK_BYTES + (len % KVH_CHUNK_BYTES != 0);
}

KVH_HD int kvh_is_full(kvh_u64 len, kvh_u32 samples, kvh_u32 flags) {
    return (flags & KVH_FLAG_FULL_VERIFY) != 0 || (kvh_u64)samples >= kvh_word_count(len);
}

KVH_HD kvh_u64 kvh_expected_samples(kvh_u64 len, kvh_u32 samples, kvh_u32 flags) {
    kvh_u64 words = kvh_word_count(len);
    if (flags & KVH_FLAG_FULL_VERIFY) return words;
    return words < (kvh_u64)samples ? words : (kvh_u64)samples;
}

KVH_HD kvh_u64 kvh_sample_word(kvh_u64 seed, kvh_u64 i, kvh_u64 words, int full) {
    if (full) return i;
    if (i == 0) return 0;
    if (i == 1) return words - 1;
    return kvh_splitmix64(seed + i * KVH_SPLITMIX_GAMMA) % words;
}

// The index of the segment holding flat position `pos`, where `first(s)` is non-decreasing:
// the last segment in [from, count) whose first position is <= pos (empty segments are skipped
// that way). `from` must be a segment whose first position is <= pos.
#define KVH_FIND_SEGMENT_FROM(segs, from, count, pos, field)                                    \
    do {                                                                                        \
        kvh_u32 lo_ = (from), hi_ = (count) - 1;                                                \
        while (lo_ < hi_) {                                                                     \
            kvh_u32 mid_ = lo_ + (hi_ - lo_ + 1) / 2;                                           \
            if ((segs)[mid_].field <= (pos)) lo_ = mid_; else hi_ = mid_ - 1;                   \
        }                                                                                       \
        found_ = lo_;                                                                           \
    } while (0)
#define KVH_FIND_SEGMENT(segs, count, pos, field) KVH_FIND_SEGMENT_FROM(segs, 0, count, pos, field)

// ---- Work distribution (shared by the kernels and the host-side tests) ----------------------
//
// Zeroing: block b of a grid of G owns the contiguous chunk range
// [b * per, min((b + 1) * per, total_chunks)) with per = ceil(total_chunks / G). It finds the
// segment of its first chunk once (binary search) and then walks the segment table forward,
// handing each segment's part of the range to `f(seg, byte_offset, byte_count)` as one piece.
template <class F>
KVH_HD void kvh_zero_walk(const KvhSegment* segs, kvh_u32 count, kvh_u64 total_chunks,
                          kvh_u64 grid, kvh_u64 block, F& f) {
    if (count == 0 || total_chunks == 0 || grid == 0) return;
    kvh_u64 per = total_chunks / grid + (total_chunks % grid != 0);
    kvh_u64 c = block * per;
    if (c >= total_chunks) return;
    kvh_u64 c_end = total_chunks - c < per ? total_chunks : c + per;
    kvh_u32 found_;
    KVH_FIND_SEGMENT(segs, count, c, first_chunk);
    for (kvh_u32 s = found_; s < count && c < c_end; ++s) {
        kvh_u64 first = segs[s].first_chunk;
        kvh_u64 len = segs[s].len;
        kvh_u64 seg_end = first + kvh_chunk_count(len);
        if (seg_end <= c) continue; // empty segment
        kvh_u64 stop = seg_end < c_end ? seg_end : c_end;
        kvh_u64 off = (c - first) * KVH_CHUNK_BYTES;
        kvh_u64 end = (stop - first) * KVH_CHUNK_BYTES;
        if (end > len) end = len;
        f(s, off, end - off);
        c = stop;
    }
}

// Verification: the flat sample space is cut into one contiguous range of
// per = ceil(total_samples / threads) samples per thread. Sampled mode: thread t takes samples
// [t * per, (t + 1) * per) (positions are pseudo-random, there is nothing to coalesce). Full
// mode: the 32 lanes of a warp share the warp's range of 32 * per samples, lane l taking
// base + l, base + l + 32, ... so that a warp reads 32 consecutive words per load (when the
// thread count is a multiple of 32, as every launch's is; otherwise as sampled). Either way a
// thread's samples increase, so it searches the segment table once and then advances; runs of
// its samples inside one segment go to `f(seg, index_in_segment, step, n)` (samples i,
// i + step, ..., i + (n - 1) * step of segment `seg`).
#define KVH_WARP 32ULL
template <class F>
KVH_HD void kvh_verify_walk(const KvhSegment* segs, kvh_u32 count, kvh_u64 total_samples,
                            kvh_u32 samples, kvh_u32 flags, kvh_u64 threads, kvh_u64 t, F& f) {
    if (count == 0 || total_samples == 0 || threads == 0) return;
    kvh_u64 per = total_samples / threads + (total_samples % threads != 0);
    kvh_u64 g, step, n;
    if ((flags & KVH_FLAG_FULL_VERIFY) && threads % KVH_WARP == 0) {
        g = (t / KVH_WARP) * KVH_WARP * per + t % KVH_WARP;
        step = KVH_WARP;
        if (g >= total_samples) return;
        n = (total_samples - g + KVH_WARP - 1) / KVH_WARP;
    } else {
        g = t * per;
        step = 1;
        if (g >= total_samples) return;
        n = total_samples - g;
    }
    if (n > per) n = per;
    kvh_u32 found_;
    KVH_FIND_SEGMENT(segs, count, g, first_sample);
    kvh_u32 cur = found_;
    for (;;) {
        kvh_u64 lo = segs[cur].first_sample;
        kvh_u64 hi = lo + kvh_expected_samples(segs[cur].len, samples, flags);
        if (g < hi) {
            kvh_u64 in_seg = (hi - g + step - 1) / step;
            kvh_u64 m = in_seg < n ? in_seg : n;
            f(cur, g - lo, step, m);
            n -= m;
            if (n == 0) return;
            g += m * step;
        }
        // The next sample lies beyond segment `cur`: usually in the next one. `cur` strictly
        // increases, so even a table inconsistent with total_samples ends the walk.
        if (cur + 1 >= count) return;
        if (segs[cur + 1].first_sample <= g &&
            (cur + 2 >= count || segs[cur + 2].first_sample > g)) {
            cur += 1;
        } else {
            KVH_FIND_SEGMENT_FROM(segs, cur + 1, count, g, first_sample);
            cur = found_;
        }
    }
}

#ifdef __CUDACC__

// Segment addresses are generic pointers (cuMemAlloc); the state-space-qualified instructions
// below take global addresses, hence cvta.to.global first (what nvcc emits for plain C++).
__device__ __forceinline__ kvh_u64 kvh_to_global(kvh_u64 a) {
    kvh_u64 g;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(g) : "l"(a));
    return g;
}

// Stores through inline PTX so that neither the zeroing (whose result the kernel never reads)
// nor the second pass (identical to the first) can be elided or merged by the compiler.
__device__ __forceinline__ void kvh_store_zero16(kvh_u64 g) {
    asm volatile("st.global.v4.u32 [%0], {%1, %1, %1, %1};" ::"l"(g), "r"(0u) : "memory");
}

__device__ __forceinline__ void kvh_store_zero1(kvh_u64 g) {
    asm volatile("st.global.u8 [%0], %1;" ::"l"(g), "h"((unsigned short)0) : "memory");
}

// Volatile loads: the read-back must observe memory, not a cached or assumed value.
__device__ __forceinline__ kvh_u64 kvh_load8(kvh_u64 g) {
    kvh_u64 v;
    asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(g) : "memory");
    return v;
}

__device__ __forceinline__ unsigned short kvh_load1(kvh_u64 g) {
    unsigned short v;
    asm volatile("ld.volatile.global.u8 %0, [%1];" : "=h"(v) : "l"(g) : "memory");
    return v;
}

// Independent 16-byte stores per thread per iteration of the body loop, each a block-wide
// coalesced row of 16 * blockDim.x bytes.
#define KVH_ZERO_UNROLL 4

// Zeroes `len` bytes from `generic_begin` with the threads of one block: byte stores up to the
// first 16-byte boundary, vector stores over the aligned body (whole tiles of KVH_ZERO_UNROLL
// rows with independent stores per thread, then single rows), byte stores over the tail.
__device__ __forceinline__ void kvh_zero_range(kvh_u64 generic_begin, kvh_u64 len) {
    kvh_u64 begin = kvh_to_global(generic_begin);
    kvh_u64 end = begin + len;
    kvh_u64 head_end = (begin + 15) & ~15ULL;
    if (head_end > end) head_end = end;
    kvh_u64 body_end = head_end + ((end - head_end) & ~15ULL);
    const kvh_u64 row = 16ULL * blockDim.x;
    const kvh_u64 tile = row * KVH_ZERO_UNROLL;
    kvh_u64 tiles_end = head_end + (body_end - head_end) / tile * tile;
    for (kvh_u64 a = begin + threadIdx.x; a < head_end; a += blockDim.x) kvh_store_zero1(a);
    // a < tiles_end implies a + (KVH_ZERO_UNROLL - 1) * row < tiles_end: a sits at
    // 16 * threadIdx.x < row past a tile start.
    kvh_u64 a = head_end + 16ULL * threadIdx.x;
    for (; a < tiles_end; a += tile) {
#pragma unroll
        for (int k = 0; k < KVH_ZERO_UNROLL; ++k) kvh_store_zero16(a + k * row);
    }
    for (; a < body_end; a += row) kvh_store_zero16(a);
    for (kvh_u64 b = body_end + threadIdx.x; b < end; b += blockDim.x) kvh_store_zero1(b);
}

struct KvhZeroPiece {
    const KvhSegment* segs;
    kvh_u32 skip;
    __device__ __forceinline__ void operator()(kvh_u32 s, kvh_u64 off, kvh_u64 len) const {
        if (s != skip) kvh_zero_range(segs[s].addr + off, len);
    }
};

// Blocks of the zero kernel that must fit on one SM (at most 32 registers per thread on a
// 64K-register SM): each block owns one contiguous range, so the whole grid (the host launches
// at most BLOCKS_PER_SM blocks per SM) should be resident at once, with no second wave.
#define KVH_ZERO_MIN_BLOCKS 8

// Launch 1. Also clears the result slots (block 0), which launch 2 then fills: a slot the
// verification never reaches reads "0 checked" and fails. `skip_segment` exists for the
// fault-injection test only (KVH_NO_SKIP otherwise): that segment is left untouched so the
// verification must catch it.
extern "C" __global__ void __launch_bounds__(KVH_BLOCK_THREADS, KVH_ZERO_MIN_BLOCKS)
kvh_scrub_zero(const KvhSegment* segs, kvh_u32 count, kvh_u64 total_chunks, kvh_u32 flags,
               kvh_u32 skip_segment, KvhResult* results) {
    if (blockIdx.x == 0) {
        for (kvh_u32 i = threadIdx.x; i < count; i += blockDim.x) {
            results[i].checked = 0;
            results[i].nonzero = 0;
        }
    }
    KvhZeroPiece f = {segs, skip_segment};
    int passes = (flags & KVH_FLAG_DOUBLE_PASS) ? 2 : 1;
    for (int p = 0; p < passes; ++p) {
        kvh_zero_walk(segs, count, total_chunks, gridDim.x, blockIdx.x, f);
        // The second pass rewrites exactly the bytes of this block's first pass; the fence
        // keeps the two passes distinct writes in memory order.
        if (p + 1 < passes) __threadfence();
    }
}

// Whether the bytes of word `w` of a segment that do not form an aligned full word hold a
// non-zero byte: the last word may be partial and an unaligned segment's words are not 8-byte
// aligned; those are read byte by byte.
__device__ __forceinline__ kvh_u64 kvh_word_bytes_or(kvh_u64 g, kvh_u64 n) {
    unsigned short any = 0;
    for (kvh_u64 k = 0; k < n; ++k) any |= kvh_load1(g + k);
    return any;
}

// Samples read per group: their loads are all issued before any result is used, so one
// thread keeps KVH_VERIFY_UNROLL reads in flight.
#define KVH_VERIFY_UNROLL 8

// Accumulates a thread's runs; adds to the result slot when the thread moves to another
// segment (and once at the end), so a thread issues at most one atomic pair per segment.
struct KvhVerifyAcc {
    const KvhSegment* segs;
    KvhResult* results;
    kvh_u32 samples, flags;
    kvh_u32 cur;
    kvh_u64 checked, nonzero;

    __device__ __forceinline__ void flush() {
        if (checked == 0) return;
        atomicAdd(&results[cur].checked, checked);
        if (nonzero != 0) atomicAdd(&results[cur].nonzero, nonzero);
        checked = 0;
        nonzero = 0;
    }

    __device__ __forceinline__ void operator()(kvh_u32 s, kvh_u64 i, kvh_u64 step, kvh_u64 n) {
        if (s != cur) {
            flush();
            cur = s;
        }
        kvh_u64 addr = kvh_to_global(segs[s].addr);
        kvh_u64 len = segs[s].len;
        kvh_u64 seed = segs[s].seed;
        kvh_u64 words = kvh_word_count(len);
        int full = kvh_is_full(len, samples, flags);
        // Words that are whole and 8-byte aligned are read with one 8-byte load.
        kvh_u64 whole = (addr & 7ULL) == 0 ? len / KVH_WORD_BYTES : 0;
        checked += n;
        while (n > 0) {
            kvh_u64 v[KVH_VERIFY_UNROLL];
#pragma unroll
            for (int k = 0; k < KVH_VERIFY_UNROLL; ++k) {
                v[k] = 0;
                if ((kvh_u64)k < n) {
                    kvh_u64 w = kvh_sample_word(seed, i + (kvh_u64)k * step, words, full);
                    kvh_u64 off = w * KVH_WORD_BYTES;
                    if (w < whole) {
                        v[k] = kvh_load8(addr + off);
                    } else {
                        kvh_u64 left = len - off;
                        v[k] = kvh_word_bytes_or(addr + off,
                                                 left < KVH_WORD_BYTES ? left : KVH_WORD_BYTES);
                    }
                }
            }
#pragma unroll
            for (int k = 0; k < KVH_VERIFY_UNROLL; ++k) nonzero += (kvh_u64)(v[k] != 0);
            kvh_u64 done = n < KVH_VERIFY_UNROLL ? n : KVH_VERIFY_UNROLL;
            n -= done;
            i += done * step;
        }
    }
};

// Launch 2. Result slots are zero when it starts (launch 1 cleared them, in stream order).
extern "C" __global__ void __launch_bounds__(KVH_BLOCK_THREADS)
kvh_scrub_verify(const KvhSegment* segs, kvh_u32 count, kvh_u64 total_samples, kvh_u32 samples,
                 kvh_u32 flags, KvhResult* results) {
    KvhVerifyAcc acc = {segs, results, samples, flags, 0, 0, 0};
    kvh_u64 threads = (kvh_u64)gridDim.x * blockDim.x;
    kvh_u64 t = (kvh_u64)blockIdx.x * blockDim.x + threadIdx.x;
    kvh_verify_walk(segs, count, total_samples, samples, flags, threads, t, acc);
    acc.flush();
}

#endif // __CUDACC__

#ifdef KVH_HOST_RULE
// Host build of the rule for the agreement test in src/backend/cuda/kernel.rs.
extern "C" kvh_u64 kvh_host_rule_sample_word(kvh_u64 seed, kvh_u64 i, kvh_u64 len,
                                             kvh_u32 samples, kvh_u32 flags) {
    return kvh_sample_word(seed, i, kvh_word_count(len), kvh_is_full(len, samples, flags));
}

extern "C" kvh_u64 kvh_host_rule_expected_samples(kvh_u64 len, kvh_u32 samples, kvh_u32 flags) {
    return kvh_expected_samples(len, samples, flags);
}

extern "C" kvh_u32 kvh_host_rule_find_chunk(const KvhSegment* segs, kvh_u32 count, kvh_u64 pos) {
    kvh_u32 found_;
    KVH_FIND_SEGMENT(segs, count, pos, first_chunk);
    return found_;
}

// Records up to `cap` pieces as {segment, offset, length} triples; returns the piece count.
struct KvhHostRecorder {
    kvh_u64* out;
    kvh_u64 cap, n;
    void operator()(kvh_u32 s, kvh_u64 a, kvh_u64 b) {
        if (n < cap) {
            out[3 * n] = s;
            out[3 * n + 1] = a;
            out[3 * n + 2] = b;
        }
        ++n;
    }
    void operator()(kvh_u32 s, kvh_u64 i, kvh_u64 step, kvh_u64 m) {
        if (n < cap) {
            out[4 * n] = s;
            out[4 * n + 1] = i;
            out[4 * n + 2] = step;
            out[4 * n + 3] = m;
        }
        ++n;
    }
};

// The pieces block `block` of a `grid`-block zero launch writes (one pass).
extern "C" kvh_u64 kvh_host_rule_zero_walk(const KvhSegment* segs, kvh_u32 count,
                                           kvh_u64 total_chunks, kvh_u64 grid, kvh_u64 block,
                                           kvh_u64* out, kvh_u64 cap) {
    KvhHostRecorder r = {out, cap, 0};
    kvh_zero_walk(segs, count, total_chunks, grid, block, r);
    return r.n;
}

// The sample runs thread `t` of `threads` verifies, as {segment, index, step, count}.
extern "C" kvh_u64 kvh_host_rule_verify_walk(const KvhSegment* segs, kvh_u32 count,
                                             kvh_u64 total_samples, kvh_u32 samples,
                                             kvh_u32 flags, kvh_u64 threads, kvh_u64 t,
                                             kvh_u64* out, kvh_u64 cap) {
    KvhHostRecorder r = {out, cap, 0};
    kvh_verify_walk(segs, count, total_samples, samples, flags, threads, t, r);
    return r.n;
}
#endif
