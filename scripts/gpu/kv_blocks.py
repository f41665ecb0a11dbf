"""Paged KV cache blocks (vLLM layout) scrubbed through kvhygiene.scrub_blocks on the GPU.

Layer caches of shape [2, num_blocks, block_size, heads, head_size] (fp16) are allocated under
kvhygiene and filled with a secret; a request's blocks are scrubbed on PyTorch's current
stream. The named blocks of every layer, K and V, must read zero and every other block must
still hold the secret. Also times one call (median of repeated calls) for a request's blocks.

Then the eviction gate: a request claims blocks (claim_blocks) and writes its own values into
them; when another request claims them, they must read zero. Claims by the owner itself (no
device work) are timed too.
"""

import random
import statistics
import time

from common import parse, setup, write

LAYERS = 4
SHAPE = (2, 512, 16, 8, 128)  # 512 blocks of 16 tokens x 8 heads x 128 fp16 (32 KiB) per K and V
SECRET = 77.0
REQUEST_BLOCKS = 32
TIMED_CALLS = 50


def main():
    args = parse(__doc__)
    if args.mode != "kvh":
        raise SystemExit("kv_blocks.py measures kvhygiene only (--mode kvh)")
    torch = setup(args.mode)
    import kvhygiene

    caches = [torch.full(SHAPE, SECRET, dtype=torch.float16, device="cuda") for _ in range(LAYERS)]
    layout = kvhygiene.KvLayout.from_tensors(caches, block_dim=1)
    rng = random.Random(7)
    ids = rng.sample(range(SHAPE[1]), REQUEST_BLOCKS)
    with kvhygiene.context(tenant_id="tenant-a", request_id="req-kv", model_id="kv-blocks"):
        kvhygiene.scrub_blocks(layout, ids)
    named = torch.zeros(SHAPE[1], dtype=torch.bool, device="cuda")
    named[ids] = True
    named_nonzero = 0
    others_changed = 0
    for c in caches:
        blocks = c.view(2, SHAPE[1], -1)
        named_nonzero += int((blocks[:, named] != 0).sum().item())
        others_changed += int((blocks[:, ~named] != SECRET).sum().item())
    # Timing: a fresh set of blocks per call, as a finished request hands in its own.
    times = []
    for n in range(TIMED_CALLS):
        batch = rng.sample(range(SHAPE[1]), REQUEST_BLOCKS)
        torch.cuda.synchronize()
        start = time.perf_counter()
        kvhygiene.scrub_blocks(layout, batch)
        times.append((time.perf_counter() - start) * 1e6)
    # The eviction gate: req-g1 owns GATE_BLOCKS and writes them; req-g2 is given them
    # without any scrub_blocks in between, so the claim must zero them.
    gate_ids = rng.sample(range(SHAPE[1]), REQUEST_BLOCKS)
    with kvhygiene.context(tenant_id="tenant-a", request_id="req-g1", model_id="kv-blocks"):
        kvhygiene.claim_blocks(layout, gate_ids)
        for c in caches:
            c[:, gate_ids] = SECRET
        claim_times = []
        for n in range(TIMED_CALLS):
            torch.cuda.synchronize()
            start = time.perf_counter()
            kvhygiene.claim_blocks(layout, gate_ids)
            claim_times.append((time.perf_counter() - start) * 1e6)
    with kvhygiene.context(tenant_id="tenant-b", request_id="req-g2", model_id="kv-blocks"):
        kvhygiene.claim_blocks(layout, gate_ids)
    gate_nonzero = sum(int((c[:, gate_ids] != 0).sum().item()) for c in caches)
    write(
        args.out,
        {
            "step": "kv_blocks",
            "mode": args.mode,
            "layers": LAYERS,
            "shape": list(SHAPE),
            "regions": len(layout.regions),
            "block_bytes": layout.block_bytes,
            "request_blocks": REQUEST_BLOCKS,
            "named_nonzero": named_nonzero,
            "others_changed": others_changed,
            "call_us_median": statistics.median(times),
            "call_us_max": max(times),
            "gate_nonzero": gate_nonzero,
            "claim_same_owner_us_median": statistics.median(claim_times),
        },
    )


if __name__ == "__main__":
    main()
