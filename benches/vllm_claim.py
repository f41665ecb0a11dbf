"""How long kvhygiene.vllm.claim_scheduled takes for one scheduler step on the host: the
Python side of the vLLM worker's claims (request ids, contexts, the library calls), with
blocks verified clean beforehand, so that no claim scrubs and no device work is timed.

    KVH_BACKEND=host KVH_LIBRARY=target/release/libkvhygiene.so python3 benches/vllm_claim.py [PACKAGE_DIR]

PACKAGE_DIR is the directory holding the ``kvhygiene`` package (default: ``python/``), so that
another version of the module can be measured the same way. Prints the median of 9 steps of
each kind, in milliseconds.
"""

import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent / "python"))

import kvhygiene  # noqa: E402
from kvhygiene.vllm import claim_scheduled  # noqa: E402

BLOCKS, PAGE, LAYERS, REQUESTS = 4096, 4096, 4, 256


def step(new, cached=()):
    """A SchedulerOutput of ``new`` requests (id, new block) and ``cached`` running ones."""
    return NS(
        scheduled_new_reqs=[NS(req_id=r, block_ids=([b],), num_computed_tokens=0) for r, b in new],
        scheduled_cached_reqs=NS(
            req_ids=[r for r, _ in cached],
            resumed_req_ids=set(),
            new_block_ids=[([b],) for _, b in cached],
            num_computed_tokens=[16 for _ in cached],
        ),
    )


def median_ms(layout, make_step) -> float:
    times = []
    for round_ in range(9):
        kvhygiene.scrub_blocks(layout, range(BLOCKS))  # every block clean: no claim scrubs
        s = make_step(round_)
        start = time.perf_counter()
        claim_scheduled(s, [layout], 16)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    lib = kvhygiene.load()
    base = lib.kvh_malloc(LAYERS * BLOCKS * PAGE, 0, None)
    layout = kvhygiene.KvLayout([base + k * BLOCKS * PAGE for k in range(LAYERS)], PAGE, BLOCKS)
    ids = lambda r, n: [(f"cmpl-{r:04d}-{i:08x}-0", 1 + (r * n + i) % (BLOCKS - 1)) for i in range(n)]  # noqa: E731
    cases = [
        (f"{REQUESTS} new requests, one block each", lambda r: step(ids(r, REQUESTS))),
        (f"{REQUESTS // 16} running requests given one block", lambda r: step((), ids(r, REQUESTS // 16))),
    ]
    for label, make in cases:
        print(f"{label:<45} {median_ms(layout, make):8.2f} ms")
    lib.kvh_free(base, LAYERS * BLOCKS * PAGE, 0, None)


if __name__ == "__main__":
    main()
