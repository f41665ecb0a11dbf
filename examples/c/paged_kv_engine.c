/*
 * A C inference engine's use of kvhygiene's C API (include/kvhygiene.h) for a paged KV cache:
 * the cache is one allocation from kvh_malloc holding a K and a V region of fixed-size
 * blocks, scrubbed once whole at start (the gate knows nothing of a new cache); each request
 * is given blocks through the eviction gate (kvh_claim_blocks) and
 * hands them back through kvh_scrub_blocks when it ends, and a block whose scrub did not
 * verify is retired, never given to another request.
 *
 * Build and run (from the repository root, after `cargo build`):
 *
 *   cc -std=c11 -Wall -Wextra -Iinclude examples/c/paged_kv_engine.c \
 *      -Ltarget/debug -lkvhygiene -Wl,-rpath,"$PWD/target/debug" -o /tmp/paged_kv_engine
 *   /tmp/paged_kv_engine                 # every scrub verifies: exit 0
 *   /tmp/paged_kv_engine --inject-fault  # one sabotaged scrub, caught and retired: exit 0
 *
 * From a release distribution (scripts/build-release.sh OUTDIR), take the header from
 * OUTDIR/include and the library from OUTDIR/lib instead.
 *
 * On a machine without a GPU the library runs on its host backend, where device memory is
 * host memory: there this program also plays the engine's kernels (writes each request's
 * K/V bytes) and reads every block it is given back, which must be zero. On a GPU those
 * reads and writes would be the engine's own CUDA kernels and copies.
 *
 * Exit status: 0 when every block given to a request read zero and every scrub verified
 * (with --inject-fault: exactly the sabotaged block failed and was retired), 1 when not,
 * 2 when kvhygiene could not start.
 */
#define _POSIX_C_SOURCE 200809L /* setenv */

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvhygiene.h"

enum {
    BLOCKS = 64,              /* blocks per region */
    BLOCK_BYTES = 16 * 1024,  /* one block of one layer's K (or V) */
    BLOCKS_PER_REQUEST = 8,
    REQUESTS = 6,
};

/* The message of the calling thread's last kvhygiene error. */
static void print_error(const char *what, int rc) {
    char msg[512];
    size_t len = 0;
    if (kvh_last_error_message(msg, sizeof msg, &len) != KVH_OK) {
        /* The message did not fit: the code's description is enough here. */
        if (kvh_strerror((uint32_t)rc, msg, sizeof msg, &len) != KVH_OK) {
            snprintf(msg, sizeof msg, "error %d", rc);
        }
    }
    fprintf(stderr, "%s: %s\n", what, msg);
}

/* The free blocks of the cache, as a stack of block ids. */
struct free_list {
    uint32_t ids[BLOCKS];
    size_t count;
};

static bool take(struct free_list *f, uint32_t *out, size_t n) {
    if (f->count < n) return false;
    for (size_t i = 0; i < n; ++i) out[i] = f->ids[--f->count];
    return true;
}

static void give_back(struct free_list *f, const uint32_t *ids, size_t n) {
    for (size_t i = 0; i < n; ++i) f->ids[f->count++] = ids[i];
}

/* Whether `id` is among `ids[0..n]`. */
static bool listed(const uint32_t *ids, size_t n, uint32_t id) {
    for (size_t i = 0; i < n; ++i)
        if (ids[i] == id) return true;
    return false;
}

/* Whether the allocator runs on its host backend, where device addresses are host ones. */
static bool host_backend(void) {
    size_t len = 0;
    /* The length protocol: ask for the size, then allocate it (plus room for growth). */
    kvh_stats_json(NULL, 0, &len);
    char *json = malloc(len + 4096);
    if (json == NULL) return false;
    bool host = kvh_stats_json(json, len + 4096, &len) == KVH_OK &&
                strstr(json, "\"backend\":\"host\"") != NULL;
    free(json);
    return host;
}

/* Host backend only: the first byte of both regions of `ids` that is not zero, or -1. */
static long first_residue(const kvh_kv_layout *kv, const uint32_t *ids, size_t n) {
    for (size_t r = 0; r < kv->region_count; ++r) {
        for (size_t i = 0; i < n; ++i) {
            const unsigned char *b =
                (const unsigned char *)(uintptr_t)(kv->region_bases[r] + ids[i] * kv->block_stride);
            for (uint64_t j = 0; j < kv->block_bytes; ++j)
                if (b[j] != 0) return (long)ids[i];
        }
    }
    return -1;
}

/* Host backend only: the engine's kernels filling a request's K/V blocks with its data. */
static void write_kv(const kvh_kv_layout *kv, const uint32_t *ids, size_t n, unsigned char v) {
    for (size_t r = 0; r < kv->region_count; ++r)
        for (size_t i = 0; i < n; ++i)
            memset((void *)(uintptr_t)(kv->region_bases[r] + ids[i] * kv->block_stride), v,
                   kv->block_bytes);
}

int main(int argc, char **argv) {
    bool inject = argc > 1 && strcmp(argv[1], "--inject-fault") == 0;
    if (argc > 2 || (argc == 2 && !inject)) {
        fprintf(stderr, "usage: %s [--inject-fault]\n", argv[0]);
        return 2;
    }
    /* kvh_malloc throws std::bad_alloc on failure by default, for PyTorch; C cannot catch
     * it, so a C engine asks for NULL instead (before the allocator starts). */
    setenv("KVH_OOM", "null", 0);
    /* Start now, so that a bad configuration is reported here rather than at first use. */
    int rc = kvh_init();
    if (rc != KVH_OK) {
        print_error("kvh_init", rc);
        return 2;
    }
    printf("kvhygiene %s\n", kvh_version());

    /* The cache: [K blocks | V blocks], one allocation, on device 0's default stream. */
    const ssize_t cache_bytes = 2 * (ssize_t)BLOCKS * BLOCK_BYTES;
    void *cache = kvh_malloc(cache_bytes, 0, NULL);
    if (cache == NULL) {
        print_error("kvh_malloc", (int)kvh_last_error());
        return 2;
    }
    const uint64_t base = (uint64_t)(uintptr_t)cache;
    const uint64_t regions[2] = {base, base + (uint64_t)BLOCKS * BLOCK_BYTES};
    const kvh_kv_layout kv = {
        .region_bases = regions,
        .region_count = 2,
        .block_bytes = BLOCK_BYTES,
        .block_stride = BLOCK_BYTES,
        .blocks_per_region = BLOCKS,
    };
    const bool host = host_backend();

    struct free_list free_blocks = {.count = 0};
    for (uint32_t i = 0; i < BLOCKS; ++i) free_blocks.ids[free_blocks.count++] = BLOCKS - 1 - i;

    /* The gate knows nothing of a new cache: one scrub of every block makes them all CLEAN,
     * so that first claims hand them over at once (under KVH_KV_GATE=enforce, blocks of no
     * known owner would be refused). */
    uint32_t failed_at_start[BLOCKS];
    size_t failed_at_start_count = 0;
    rc = kvh_scrub_blocks(&kv, free_blocks.ids, BLOCKS, 0, NULL, failed_at_start, BLOCKS,
                          &failed_at_start_count);
    if (rc != KVH_OK) {
        print_error("kvh_scrub_blocks (the whole cache)", rc);
        return 1;
    }

    static const char *const tenants[] = {"acme", "globex"};
    bool ok = true;
    size_t retired = 0;
    for (int r = 0; r < REQUESTS && ok; ++r) {
        char request_id[32];
        snprintf(request_id, sizeof request_id, "req-%d", r);
        const char *tenant = tenants[r % 2];
        /* Every block this thread claims, and every event, carries these ids. */
        rc = kvh_set_context(tenant, request_id, "llama-3-8b");
        if (rc != KVH_OK) {
            print_error("kvh_set_context", rc);
            ok = false;
            break;
        }
        uint32_t ids[BLOCKS_PER_REQUEST];
        if (!take(&free_blocks, ids, BLOCKS_PER_REQUEST)) {
            fprintf(stderr, "%s: the cache has no %d free blocks left\n", request_id,
                    BLOCKS_PER_REQUEST);
            ok = false;
            break;
        }

        /* The request takes its blocks through the eviction gate: one that would change
         * owner without a verified scrub is scrubbed first (or refused). */
        uint32_t refused[BLOCKS_PER_REQUEST];
        size_t refused_count = 0;
        rc = kvh_claim_blocks(&kv, ids, BLOCKS_PER_REQUEST, 0, NULL, refused,
                              BLOCKS_PER_REQUEST, &refused_count);
        if (rc != KVH_OK) {
            print_error("kvh_claim_blocks", rc);
            ok = false;
            break;
        }
        if (host) {
            long dirty = first_residue(&kv, ids, BLOCKS_PER_REQUEST);
            if (dirty >= 0) {
                fprintf(stderr, "%s: block %ld holds another request's bytes\n", request_id, dirty);
                ok = false;
            }
            write_kv(&kv, ids, BLOCKS_PER_REQUEST, (unsigned char)(0xA0 + r));
        }

        /* The request ends: its blocks are scrubbed and verified before the free list gets
         * them back. */
        if (inject && r == REQUESTS / 2) kvh_inject_fault(1);
        uint32_t failed[BLOCKS_PER_REQUEST];
        size_t failed_count = 0;
        rc = kvh_scrub_blocks(&kv, ids, BLOCKS_PER_REQUEST, 0, NULL, failed, BLOCKS_PER_REQUEST,
                              &failed_count);
        if (rc == KVH_ERR_VERIFY_FAILED) {
            /* Retire what failed; the rest is clean and goes back. */
            uint32_t clean[BLOCKS_PER_REQUEST];
            size_t clean_count = 0;
            for (size_t i = 0; i < BLOCKS_PER_REQUEST; ++i) {
                if (!listed(failed, failed_count, ids[i])) clean[clean_count++] = ids[i];
            }
            give_back(&free_blocks, clean, clean_count);
            retired += failed_count;
            printf("%-6s %-7s %d blocks: scrub FAILED for %zu, retired\n", tenant, request_id,
                   BLOCKS_PER_REQUEST, failed_count);
        } else if (rc == KVH_OK) {
            give_back(&free_blocks, ids, BLOCKS_PER_REQUEST);
            printf("%-6s %-7s %d blocks: scrubbed and verified\n", tenant, request_id,
                   BLOCKS_PER_REQUEST);
        } else {
            /* Any other code: no block of the call may be taken as clean. */
            print_error("kvh_scrub_blocks", rc);
            ok = false;
        }
        kvh_clear_context();
    }

    if (kvh_synchronize() != KVH_OK) {
        print_error("kvh_synchronize", (int)kvh_last_error());
        ok = false;
    }
    kvh_free(cache, cache_bytes, 0, NULL);
    kvh_shutdown();

    const size_t expected_retired = inject ? 1 : 0;
    if (retired != expected_retired) {
        fprintf(stderr, "%zu blocks retired, %zu expected\n", retired, expected_retired);
        ok = false;
    }
    printf("%s: blocks retired: %zu%s\n", ok ? "PASS" : "FAIL", retired,
           host ? "" : " (block contents not read: not on the host backend)");
    return ok ? 0 : 1;
}
