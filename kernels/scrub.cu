// kvhygiene scrub kernels: zero a batch of device segments and read back the words that the
// verification rule of src/backend/verify.rs samples.
//
// One scrub batch is one launch on the freeing stream (two when a segment spans chunks), then
// a completion event:
//
//   1. kvh_scrub          zeroes every byte of every segment (16-byte vector stores on the
//                         aligned body, byte stores on an unaligned head and tail), optionally
//                         twice, then reads back the sampled words, chunk by chunk (below);
//                         or kvh_scrub_strided, the same work in another launch shape, for a
//                         batch with work items when the host asks for it;
//   2. kvh_scrub_publish  only when some segment spans more than one chunk: copies those
//                         segments' sums {checked, nonzero} into the host's result area and
//                         clears them for the slot's next batch.
//
// Work: every segment is cut into chunks of 2^chunk_shift bytes, numbered consecutively
// across the batch (chunk_count of them). kvh_scrub has one block per chunk, block c handling
// chunk c, with a grid as large as the work: the shape of the driver's own memset, whose
// blocks start in order, so the stores in flight cover a compact window of memory
// (docs/cuda.md, "Kernels", has the measurements behind this choice and the chunk sizes).
// kvh_scrub_strided has a grid of G blocks, at most as many as the GPU holds at once, block b
// handling chunks b, b + G, b + 2G, ...: the window stays as compact, no block waits to be
// scheduled, and a block reads the work items of up to KVH_ITEM_GROUP of its chunks in one
// round trip to host memory.
//
// Descriptors: a batch of up to KVH_INLINE_SEGMENTS segments travels inside the kernel
// parameter (no copy before the launch); a block finds its segment by a binary search in
// parameter space. A larger batch comes as one KvhChunk work item per chunk in page-locked host
// memory mapped into the device, and no upload precedes the launch: under kvh_scrub each
// block's first access is one 32-byte read of its item.
//
// Read-back: after zeroing its chunk, the block waits at a block barrier (every store of the
// block is then visible to every thread of the block) and reads back the sampled words that
// lie in its chunk, while those lines are still in L2. Each sampled word lies in exactly one
// chunk, so each is read exactly once, by the block that zeroed it, after that block's stores:
// no grid-wide barrier is needed, and the publish launch, ordered after launch 1 by the stream,
// sees every block's sums. The sampling rule is stratified so that a block finds its samples
// without generating the segment's others: each sample lies in a stratum of its own.
//
// Results: a segment of one chunk has its {checked, nonzero} written by its block straight
// into the host's result area (page-locked, device-mapped); the host reads it after the
// completion event. The host clears that area before the launch, so a segment nothing
// verified reads "0 checked" and fails.
//
// The rule functions (kvh_splitmix64 .. kvh_sample_candidates) are __host__ __device__: the
// Rust test suite compiles this file as plain C++ (KVH_HOST_RULE) and checks them against
// verify.rs, and the fake driver of the tests runs a host port of the kernels on them. Keep the
// constants below in step with src/backend/verify.rs and src/backend/cuda/kernel.rs; a test
// parses them.

#define KVH_WORD_BYTES 8ULL
// Threads per block of every launch (kernel.rs's BLOCK_THREADS; the host launches no other
// shape). The scrub kernels loop with this constant rather than blockDim.x, so that a
// block's tile arithmetic is shifts and masks rather than a 64-bit remainder.
#define KVH_BLOCK_THREADS 256
// Resident blocks per SM the scrub kernel is compiled for: at most 32 registers per thread, so
// that a 2048-thread SM (sm_80, sm_90) holds 8 blocks and keeps enough stores in flight. On
// 1536-thread SMs (sm_86, sm_89) 8 blocks cannot be resident; ptxas says so with a warning
// (kernels/scrub.resources.txt) and ignores the hint there.
#define KVH_MIN_BLOCKS_PER_SM 8
// The same for kvh_scrub_strided, whose chunk loop holds more state: at most 48 registers
// (5 blocks of 256 threads fill 1,280 of an SM's threads on every supported architecture),
// the fewest that compile without spills.
#define KVH_STRIDED_BLOCKS_PER_SM 5
#define KVH_INLINE_SEGMENTS 120
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

// One segment of an inline batch (DeviceSegment in kernel.rs, 32 bytes).
struct KvhSegment {
    kvh_u64 addr;        // device address of the first byte
    kvh_u64 len;         // bytes, >= 1
    kvh_u64 seed;        // seed of the sample positions
    kvh_u64 first_chunk; // number of this segment's first chunk in the batch
};

// One chunk of an uploaded batch (DeviceChunk in kernel.rs, 32 bytes): everything its block
// needs in one load, so a block's first access is one 32-byte read rather than a search.
struct KvhChunk {
    kvh_u64 addr;    // the segment's first byte
    kvh_u64 len;     // the segment's length
    kvh_u64 seed;    // the segment's seed
    kvh_u32 segment; // the segment's index in the batch
    kvh_u32 index;   // this chunk's index within the segment
};

// Work items a block reads from host memory together (one round trip for up to this many of
// its chunks; KVH_ITEM_GROUP * 32 bytes of shared memory).
#define KVH_ITEM_GROUP 8

// Per-segment sums (SegmentResult in Rust).
struct KvhResult {
    kvh_u64 checked;
    kvh_u64 nonzero;
};

// Every kernel's one parameter (BatchParams in kernel.rs), passed by value: a batch of up to
// KVH_INLINE_SEGMENTS segments travels inside it and needs no upload.
struct KvhBatch {
    const KvhChunk* chunks; // work items (mapped host memory), one per chunk; null: inline_segs
    KvhResult* sums;        // device, `count` slots, zero between batches
    KvhResult* results;     // page-locked host memory (device-mapped), `count` slots
    kvh_u32 count;
    kvh_u32 flags;
    kvh_u32 samples;
    kvh_u32 skip_segment; // fault injection for tests: this segment is not zeroed
    kvh_u32 chunk_shift;
    kvh_u32 chunk_count; // chunks in the batch (< 2^31)
    KvhSegment inline_segs[KVH_INLINE_SEGMENTS];
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

// Samples of a segment: every word under full verification or when `samples` covers them all;
// two at least otherwise (the first and the last word are always read).
KVH_HD kvh_u64 kvh_sample_count(kvh_u64 len, kvh_u32 samples, kvh_u32 flags) {
    kvh_u64 words = kvh_word_count(len);
    if (flags & KVH_FLAG_FULL_VERIFY) return words;
    kvh_u64 m = samples < 2 ? 2 : (kvh_u64)samples;
    return words < m ? words : m;
}

// The sampling rule of one segment: `m` samples over `words` words. Unless every word is a
// sample (m >= words), sample 0 is the first word, sample m - 1 the last, and the n = words - 2
// words between them are split into k = m - 2 interior strata, consecutive runs of q or q + 1
// words (the first r = n % k of them one longer): sample i (1 <= i <= m - 2) lies in interior
// stratum i - 1. With m == 2 (no interior stratum) q and r are those of k = 1, which no sample
// uses and which keep kvh_stratum_of free of a branch.
struct KvhRule {
    kvh_u64 words, m, q, r;
};

KVH_HD KvhRule kvh_rule(kvh_u64 len, kvh_u32 samples, kvh_u32 flags) {
    KvhRule rule;
    rule.words = kvh_word_count(len);
    rule.m = kvh_sample_count(len, samples, flags);
    bool sampled = rule.m < rule.words;
    kvh_u64 k = rule.m > 3 ? rule.m - 2 : 1;
    rule.q = sampled ? (rule.words - 2) / k : 0;
    rule.r = sampled ? (rule.words - 2) % k : 0;
    return rule;
}

// First word of interior stratum j (j < m - 2; no overflow: the result is < words).
KVH_HD kvh_u64 kvh_stratum_start(const KvhRule* rule, kvh_u64 j) {
    return 1 + j * rule->q + (j < rule->r ? j : rule->r);
}

// The sample whose stratum holds word w (< words), for m < words (so q >= 1): the last word,
// one past the interior strata, and with m == 2 every interior word, are given sample m - 1
// (whose word lies at or after them, so kvh_sample_candidates still covers every sample of a
// range).
KVH_HD kvh_u64 kvh_stratum_of(const KvhRule* rule, kvh_u64 w) {
    if (w == 0) return 0;
    kvh_u64 v = w - 1;
    kvh_u64 long_words = rule->r * (rule->q + 1);
    kvh_u64 j = 1 + (v < long_words ? v / (rule->q + 1) : rule->r + (v - long_words) / rule->q);
    return j < rule->m - 1 ? j : rule->m - 1;
}

// floor(x * n / 2^64): maps a uniform 64-bit x onto [0, n) without a division.
KVH_HD kvh_u64 kvh_scale(kvh_u64 x, kvh_u64 n) {
#ifdef __CUDA_ARCH__
    return __umul64hi(x, n);
#else
    return (kvh_u64)(((unsigned __int128)x * n) >> 64);
#endif
}

// Word of sample i (< m): every word when m >= words; otherwise the first word (i = 0), the
// last word (i = m - 1), and for each i in between one pseudo-random word of interior stratum
// i - 1.
KVH_HD kvh_u64 kvh_sample_word(const KvhRule* rule, kvh_u64 seed, kvh_u64 i) {
    if (rule->m >= rule->words) return i;
    if (i == 0) return 0;
    if (i + 1 == rule->m) return rule->words - 1;
    kvh_u64 lo = kvh_stratum_start(rule, i - 1);
    kvh_u64 n = rule->q + (i - 1 < rule->r);
    return lo + kvh_scale(kvh_splitmix64(seed + i * KVH_SPLITMIX_GAMMA), n);
}

// The samples that can lie in words [w0, w1) (w0 < w1 <= words): [*first, *end) of the
// sample numbers, each still to be checked against the range.
KVH_HD void kvh_sample_candidates(const KvhRule* rule, kvh_u64 w0, kvh_u64 w1, kvh_u64* first,
                                  kvh_u64* end) {
    if (rule->m == 0) {
        *first = *end = 0;
    } else if (rule->m >= rule->words) {
        *first = w0;
        *end = w1;
    } else {
        *first = kvh_stratum_of(rule, w0);
        *end = kvh_stratum_of(rule, w1 - 1) + 1;
    }
}

// The last segment whose first chunk is <= c (segments are in chunk order; a segment of
// length 0 owns no chunk and is skipped that way). count >= 1: a batch without chunks is
// never launched.
KVH_HD kvh_u32 kvh_find_chunk(const KvhSegment* segs, kvh_u32 count, kvh_u64 c) {
    kvh_u32 lo = 0, hi = count - 1;
    while (lo < hi) {
        kvh_u32 mid = lo + (hi - lo + 1) / 2;
        if (segs[mid].first_chunk <= c) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

#ifdef __CUDACC__

// Segment addresses are generic pointers (cuMemAlloc); the state-space-qualified instructions
// below take global addresses, hence cvta.to.global first (what nvcc emits for plain C++).
__device__ __forceinline__ kvh_u64 kvh_to_global(kvh_u64 a) {
    kvh_u64 g;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(g) : "l"(a));
    return g;
}

// Stores through inline PTX so that neither the zeroing (whose result the kernel only reads
// back through volatile loads) nor the second pass (identical to the first) can be elided.
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
// coalesced row of 16 * KVH_BLOCK_THREADS bytes.
#define KVH_ZERO_UNROLL 4

// Zeroes `len` bytes from global address `begin` with the threads of one block: byte stores
// up to the first 16-byte boundary, vector stores over the aligned body (whole tiles of
// KVH_ZERO_UNROLL rows with independent stores per thread, then single rows), byte stores
// over the tail.
__device__ __forceinline__ void kvh_zero_range(kvh_u64 begin, kvh_u64 len) {
    kvh_u64 end = begin + len;
    kvh_u64 head_end = (begin + 15) & ~15ULL;
    if (head_end > end) head_end = end;
    kvh_u64 body_end = head_end + ((end - head_end) & ~15ULL);
    // Compile-time sizes: a tile is a power of two, so this is a mask, not a division.
    const kvh_u64 row = 16ULL * KVH_BLOCK_THREADS;
    const kvh_u64 tile = row * KVH_ZERO_UNROLL;
    kvh_u64 tiles_end = head_end + (body_end - head_end) / tile * tile;
    for (kvh_u64 a = begin + threadIdx.x; a < head_end; a += KVH_BLOCK_THREADS) kvh_store_zero1(a);
    // a < tiles_end implies a + (KVH_ZERO_UNROLL - 1) * row < tiles_end: a sits at
    // 16 * threadIdx.x < row past a tile start.
    kvh_u64 a = head_end + 16ULL * threadIdx.x;
    for (; a < tiles_end; a += tile) {
#pragma unroll
        for (int k = 0; k < KVH_ZERO_UNROLL; ++k) kvh_store_zero16(a + k * row);
    }
    for (; a < body_end; a += row) kvh_store_zero16(a);
    for (kvh_u64 b = body_end + threadIdx.x; b < end; b += KVH_BLOCK_THREADS) kvh_store_zero1(b);
}

// Whether word `w` of the segment at global address `g` of `len` bytes holds a non-zero
// byte. A whole, 8-byte-aligned word is one load; the last word may be partial and an
// unaligned segment's words are unaligned: those are read byte by byte.
__device__ __forceinline__ kvh_u64 kvh_word_nonzero(kvh_u64 g, kvh_u64 len, kvh_u64 w) {
    kvh_u64 off = w * KVH_WORD_BYTES;
    if ((g & 7ULL) == 0 && len - off >= KVH_WORD_BYTES) return kvh_load8(g + off) != 0;
    kvh_u64 n = len - off < KVH_WORD_BYTES ? len - off : KVH_WORD_BYTES;
    unsigned short any = 0;
    for (kvh_u64 k = 0; k < n; ++k) any |= kvh_load1(g + off + k);
    return any != 0;
}

// Reads back the sampled words of bytes [off, off + n) of the segment at global address `g`
// with the threads of the block, after the block barrier that follows the zeroing. A segment
// of one chunk has its result written straight to the host's result area; a longer one has
// this chunk's part added to the device sums, which kvh_scrub_publish then copies.
__device__ __forceinline__ void kvh_read_back_inline(kvh_u64 g, kvh_u64 len, kvh_u64 seed,
                                                    kvh_u64 off, kvh_u64 n, kvh_u32 samples,
                                                    kvh_u32 flags, int whole, KvhResult* out) {
    __shared__ kvh_u64 warp_sums[KVH_BLOCK_THREADS / 32][2];
    const KvhRule rule = kvh_rule(len, samples, flags);
    // Chunks start at multiples of 2^chunk_shift (a multiple of 8): no word straddles two.
    const kvh_u64 w0 = off / KVH_WORD_BYTES, w1 = kvh_word_count(off + n);
    kvh_u64 first, end;
    kvh_sample_candidates(&rule, w0, w1, &first, &end);
    kvh_u64 checked = 0, nonzero = 0;
    for (kvh_u64 i = first + threadIdx.x; i < end; i += KVH_BLOCK_THREADS) {
        kvh_u64 w = kvh_sample_word(&rule, seed, i);
        if (w >= w0 && w < w1) {
            ++checked;
            nonzero += kvh_word_nonzero(g, len, w);
        }
    }
    for (int d = 16; d > 0; d /= 2) {
        checked += __shfl_down_sync(0xFFFFFFFFu, checked, d);
        nonzero += __shfl_down_sync(0xFFFFFFFFu, nonzero, d);
    }
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    if (!whole) {
        if (lane == 0 && checked != 0) {
            atomicAdd(&out->checked, checked);
            if (nonzero != 0) atomicAdd(&out->nonzero, nonzero);
        }
        return;
    }
    if (lane == 0) {
        warp_sums[warp][0] = checked;
        warp_sums[warp][1] = nonzero;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        kvh_u64 c = 0, z = 0;
        for (unsigned k = 0; k < KVH_BLOCK_THREADS / 32; ++k) {
            c += warp_sums[k][0];
            z += warp_sums[k][1];
        }
        out->checked = c;
        out->nonzero = z;
    }
}

// kvh_read_back_inline out of line, for kvh_scrub: the zeroing keeps its few registers, and the
// read-back (once per block, after the stores) pays for its own. kvh_scrub_strided, which
// loops over chunks, inlines it: a call inside the loop would make it spill.
__device__ __noinline__ void kvh_read_back(kvh_u64 g, kvh_u64 len, kvh_u64 seed, kvh_u64 off,
                                           kvh_u64 n, kvh_u32 samples, kvh_u32 flags, int whole,
                                           KvhResult* out) {
    kvh_read_back_inline(g, len, seed, off, n, samples, flags, whole, out);
}

// Zeroes the `n` bytes at global address `at` with the threads of the block, twice under
// KVH_FLAG_DOUBLE_PASS; nothing for the fault-injection segment.
__device__ __forceinline__ void kvh_zero_chunk(const KvhBatch& b, kvh_u32 s, kvh_u64 at,
                                               kvh_u64 n) {
    if (s != b.skip_segment) {
        kvh_zero_range(at, n);
        if (b.flags & KVH_FLAG_DOUBLE_PASS) {
            // The second pass rewrites the same bytes; the fence keeps the two passes
            // distinct writes in memory order.
            __threadfence();
            kvh_zero_range(at, n);
        }
    }
}

// Launch 1: one block of KVH_BLOCK_THREADS threads per chunk (the host keeps chunk_count
// below 2^31 by its choice of chunk size).
extern "C" __global__ void __launch_bounds__(KVH_BLOCK_THREADS, KVH_MIN_BLOCKS_PER_SM)
kvh_scrub(const __grid_constant__ KvhBatch b) {
    const kvh_u64 c = blockIdx.x;
    kvh_u32 s;
    kvh_u64 addr, len, seed, index;
    if (b.chunks) {
        const KvhChunk* w = &b.chunks[c];
        s = w->segment;
        addr = w->addr;
        len = w->len;
        seed = w->seed;
        index = w->index;
    } else {
        s = kvh_find_chunk(b.inline_segs, b.count, c);
        addr = b.inline_segs[s].addr;
        len = b.inline_segs[s].len;
        seed = b.inline_segs[s].seed;
        index = c - b.inline_segs[s].first_chunk;
    }
    const kvh_u64 chunk = 1ULL << b.chunk_shift;
    const kvh_u64 off = index << b.chunk_shift;
    const kvh_u64 n = len - off < chunk ? len - off : chunk;
    const kvh_u64 g = kvh_to_global(addr);
    kvh_zero_chunk(b, s, g + off, n);
    // Every store of this block is now visible to every thread of this block.
    __syncthreads();
    const int whole = len <= chunk;
    kvh_read_back(g, len, seed, off, n, b.samples, b.flags, whole,
                  whole ? &b.results[s] : &b.sums[s]);
}

// Launch 1, alternative shape for a batch with work items: a grid of at most the blocks the
// GPU holds at once (the host launches at most 2^28 blocks, so no chunk number below leaves
// 32 bits), block b handling chunks b, b + gridDim.x, ... It reads the items of its next
// KVH_ITEM_GROUP chunks together into shared memory (thread t copies word t % 4 of item t / 4):
// one round trip to host memory for up to that many chunks, where kvh_scrub pays one per
// chunk. Loop bounds depend only on the block and the batch, so every thread of a block
// reaches every barrier. A chunk's fields are read from shared memory where they are used,
// not held in registers across the zeroing.
extern "C" __global__ void __launch_bounds__(KVH_BLOCK_THREADS, KVH_STRIDED_BLOCKS_PER_SM)
kvh_scrub_strided(const __grid_constant__ KvhBatch b) {
    // The group's items as the four 8-byte words of a KvhChunk: addr, len, seed, and segment
    // (low half) with index (high half), as the host, little-endian like the GPU, lays them out.
    __shared__ kvh_u64 group[KVH_ITEM_GROUP][4];
    const kvh_u32 stride = gridDim.x;
    const kvh_u64 chunk = 1ULL << b.chunk_shift;
    for (kvh_u32 c0 = blockIdx.x; c0 < b.chunk_count; c0 += stride * KVH_ITEM_GROUP) {
        // No thread still reads the previous group.
        __syncthreads();
        if (threadIdx.x < KVH_ITEM_GROUP * 4) {
            const kvh_u32 c = c0 + (threadIdx.x / 4) * stride;
            if (c < b.chunk_count) {
                const kvh_u64* item = reinterpret_cast<const kvh_u64*>(&b.chunks[c]);
                group[threadIdx.x / 4][threadIdx.x % 4] = item[threadIdx.x % 4];
            }
        }
        __syncthreads();
        // Not unrolled: one chunk's registers at a time.
#pragma unroll 1
        for (kvh_u32 j = 0; j < KVH_ITEM_GROUP && c0 + j * stride < b.chunk_count; ++j) {
            {
                const kvh_u64 len = group[j][1];
                const kvh_u64 off = (group[j][3] >> 32) << b.chunk_shift;
                kvh_zero_chunk(b, (kvh_u32)group[j][3], kvh_to_global(group[j][0]) + off,
                               len - off < chunk ? len - off : chunk);
            }
            // Every store of this block is now visible to every thread of this block. The
            // chunk's fields are read again from shared memory below rather than held in
            // registers across the zeroing.
            __syncthreads();
            const kvh_u64 len = group[j][1];
            const kvh_u32 s = (kvh_u32)group[j][3];
            const kvh_u64 off = (group[j][3] >> 32) << b.chunk_shift;
            const kvh_u64 n = len - off < chunk ? len - off : chunk;
            const int whole = len <= chunk;
            kvh_read_back_inline(kvh_to_global(group[j][0]), len, group[j][2], off, n,
                                 b.samples, b.flags, whole, whole ? &b.results[s] : &b.sums[s]);
        }
    }
}

// Launch 2, only for batches with a segment of more than one chunk: copies those segments'
// sums to the host's result area and clears them for the next batch of the same slot. Stream
// order puts it after every block of launch 1. Sums of one-chunk segments stay zero (their
// blocks wrote the result area directly), and so do those of segments with no sample: both
// are skipped, leaving what launch 1 or the host wrote.
extern "C" __global__ void __launch_bounds__(KVH_BLOCK_THREADS)
kvh_scrub_publish(const __grid_constant__ KvhBatch b) {
    for (kvh_u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < b.count;
         i += gridDim.x * blockDim.x) {
        KvhResult r = b.sums[i];
        if (r.checked == 0 && r.nonzero == 0) continue;
        b.results[i] = r;
        b.sums[i].checked = 0;
        b.sums[i].nonzero = 0;
    }
}

#endif // __CUDACC__

#ifdef KVH_HOST_RULE
// Host builds of the rule for the agreement tests in src/backend/cuda/kernel.rs.
extern "C" kvh_u64 kvh_host_rule_sample_word(kvh_u64 seed, kvh_u64 i, kvh_u64 len,
                                             kvh_u32 samples, kvh_u32 flags) {
    KvhRule rule = kvh_rule(len, samples, flags);
    return kvh_sample_word(&rule, seed, i);
}

extern "C" kvh_u64 kvh_host_rule_expected_samples(kvh_u64 len, kvh_u32 samples, kvh_u32 flags) {
    return kvh_sample_count(len, samples, flags);
}

extern "C" void kvh_host_rule_candidates(kvh_u64 len, kvh_u32 samples, kvh_u32 flags, kvh_u64 w0,
                                         kvh_u64 w1, kvh_u64* first, kvh_u64* end) {
    KvhRule rule = kvh_rule(len, samples, flags);
    kvh_sample_candidates(&rule, w0, w1, first, end);
}

// sizeof / offsetof values of the structs, for the layout test.
extern "C" void kvh_host_rule_layout(kvh_u64* out) {
    out[0] = sizeof(KvhSegment);
    out[1] = sizeof(KvhChunk);
    out[2] = sizeof(KvhBatch);
    out[3] = __builtin_offsetof(KvhBatch, count);
    out[4] = __builtin_offsetof(KvhBatch, chunk_shift);
    out[5] = __builtin_offsetof(KvhBatch, inline_segs);
    out[6] = sizeof(KvhResult);
    out[7] = alignof(KvhBatch);
    out[8] = __builtin_offsetof(KvhBatch, chunk_count);
    out[9] = __builtin_offsetof(KvhChunk, segment);
    out[10] = __builtin_offsetof(KvhChunk, index);
}

extern "C" kvh_u32 kvh_host_rule_find_chunk(const KvhSegment* segs, kvh_u32 count, kvh_u64 c) {
    return kvh_find_chunk(segs, count, c);
}
#endif
