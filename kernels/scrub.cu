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
// across the batch (the host writes each segment's first chunk number). Blocks grid-stride over
// that flat chunk space, so one 1 GiB segment and 4096 segments of 64 KiB both spread over all
// SMs. Samples are numbered the same way (first_sample) and threads grid-stride over them.
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
// the last segment whose first position is <= pos (empty segments are skipped that way).
#define KVH_FIND_SEGMENT(segs, count, pos, field)                                               \
    do {                                                                                        \
        kvh_u32 lo_ = 0, hi_ = (count) - 1;                                                     \
        while (lo_ < hi_) {                                                                     \
            kvh_u32 mid_ = lo_ + (hi_ - lo_ + 1) / 2;                                           \
            if ((segs)[mid_].field <= (pos)) lo_ = mid_; else hi_ = mid_ - 1;                   \
        }                                                                                       \
        found_ = lo_;                                                                           \
    } while (0)

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

// Zeroes `len` bytes from `generic_begin` with the threads of one block: byte stores up to the
// first 16-byte boundary, vector stores over the aligned body, byte stores over the tail.
__device__ __forceinline__ void kvh_zero_range(kvh_u64 generic_begin, kvh_u64 len) {
    kvh_u64 begin = kvh_to_global(generic_begin);
    kvh_u64 end = begin + len;
    kvh_u64 head_end = (begin + 15) & ~15ULL;
    if (head_end > end) head_end = end;
    kvh_u64 body_end = head_end + ((end - head_end) & ~15ULL);
    for (kvh_u64 a = begin + threadIdx.x; a < head_end; a += blockDim.x) kvh_store_zero1(a);
#pragma unroll 4
    for (kvh_u64 a = head_end + 16ULL * threadIdx.x; a < body_end; a += 16ULL * blockDim.x)
        kvh_store_zero16(a);
    for (kvh_u64 a = body_end + threadIdx.x; a < end; a += blockDim.x) kvh_store_zero1(a);
}

// Launch 1. Also clears the result slots (block 0), which launch 2 then fills: a slot the
// verification never reaches reads "0 checked" and fails. `skip_segment` exists for the
// fault-injection test only (KVH_NO_SKIP otherwise): that segment is left untouched so the
// verification must catch it.
extern "C" __global__ void __launch_bounds__(KVH_BLOCK_THREADS)
kvh_scrub_zero(const KvhSegment* segs, kvh_u32 count, kvh_u64 total_chunks, kvh_u32 flags,
               kvh_u32 skip_segment, KvhResult* results) {
    if (blockIdx.x == 0) {
        for (kvh_u32 i = threadIdx.x; i < count; i += blockDim.x) {
            results[i].checked = 0;
            results[i].nonzero = 0;
        }
    }
    int passes = (flags & KVH_FLAG_DOUBLE_PASS) ? 2 : 1;
    for (int p = 0; p < passes; ++p) {
        for (kvh_u64 c = blockIdx.x; c < total_chunks; c += gridDim.x) {
            kvh_u32 found_;
            KVH_FIND_SEGMENT(segs, count, c, first_chunk);
            if (found_ == skip_segment) continue;
            kvh_u64 addr = segs[found_].addr;
            kvh_u64 len = segs[found_].len;
            kvh_u64 off = (c - segs[found_].first_chunk) * KVH_CHUNK_BYTES;
            kvh_u64 end = off + KVH_CHUNK_BYTES < len ? off + KVH_CHUNK_BYTES : len;
            kvh_zero_range(addr + off, end - off);
        }
        // Each block's second pass rewrites the chunks of its first; the fence keeps the two
        // passes distinct writes in memory order.
        if (p + 1 < passes) __threadfence();
    }
}

// Whether word `w` of a segment holds a non-zero byte. The last word may be partial and an
// unaligned segment's words are not 8-byte aligned: those are read byte by byte.
__device__ __forceinline__ int kvh_word_nonzero(kvh_u64 addr, kvh_u64 len, kvh_u64 w) {
    kvh_u64 off = w * KVH_WORD_BYTES;
    kvh_u64 a = kvh_to_global(addr + off);
    kvh_u64 n = len - off < KVH_WORD_BYTES ? len - off : KVH_WORD_BYTES;
    if (n == KVH_WORD_BYTES && (a & 7ULL) == 0) return kvh_load8(a) != 0;
    unsigned short any = 0;
    for (kvh_u64 k = 0; k < n; ++k) any |= kvh_load1(a + k);
    return any != 0;
}

__device__ __forceinline__ void kvh_flush(KvhResult* results, kvh_u32 seg, kvh_u64 checked,
                                          kvh_u64 nonzero) {
    if (checked == 0) return;
    atomicAdd(&results[seg].checked, checked);
    if (nonzero != 0) atomicAdd(&results[seg].nonzero, nonzero);
}

// Launch 2. Result slots are zero when it starts (launch 1 cleared them, in stream order).
// Each thread counts locally while its samples stay in one segment and adds to the slot when it
// moves on, so a full verification of one large segment costs one atomic per thread.
extern "C" __global__ void __launch_bounds__(KVH_BLOCK_THREADS)
kvh_scrub_verify(const KvhSegment* segs, kvh_u32 count, kvh_u64 total_samples, kvh_u32 samples,
                 kvh_u32 flags, KvhResult* results) {
    kvh_u64 stride = (kvh_u64)gridDim.x * blockDim.x;
    kvh_u32 cur = KVH_NO_SKIP;
    kvh_u64 lo = 0, hi = 0, addr = 0, len = 0, seed = 0, words = 0;
    int full = 0;
    kvh_u64 checked = 0, nonzero = 0;
    for (kvh_u64 g = (kvh_u64)blockIdx.x * blockDim.x + threadIdx.x; g < total_samples;
         g += stride) {
        if (g < lo || g >= hi) {
            if (cur != KVH_NO_SKIP) kvh_flush(results, cur, checked, nonzero);
            kvh_u32 found_;
            KVH_FIND_SEGMENT(segs, count, g, first_sample);
            cur = found_;
            addr = segs[cur].addr;
            len = segs[cur].len;
            seed = segs[cur].seed;
            lo = segs[cur].first_sample;
            hi = lo + kvh_expected_samples(len, samples, flags);
            words = kvh_word_count(len);
            full = kvh_is_full(len, samples, flags);
            checked = 0;
            nonzero = 0;
        }
        kvh_u64 w = kvh_sample_word(seed, g - lo, words, full);
        checked += 1;
        nonzero += (kvh_u64)kvh_word_nonzero(addr, len, w);
    }
    if (cur != KVH_NO_SKIP) kvh_flush(results, cur, checked, nonzero);
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
#endif
