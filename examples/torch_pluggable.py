"""kvhygiene in a PyTorch inference process: a complete example.

Run (GPU machine, library built with `cargo build --release`):

    KVH_LIBRARY=target/release/libkvhygiene.so python3 examples/torch_pluggable.py

What it shows:
1. install() before any CUDA allocation makes kvhygiene PyTorch's CUDA allocator;
2. each request runs inside kvhygiene.context(...), so its blocks and the forensic events about
   them carry the tenant, request and model ids;
3. memory a request frees comes back zeroed: the next request's torch.empty() cannot read the
   previous request's data (with PyTorch's default allocator it can);
4. a paged KV cache (one tensor per layer, blocks handed between requests by the engine, as
   vLLM does) gets a finished request's blocks zeroed and verified with scrub_blocks, and
   claim_blocks (the eviction gate) zeroes a block a request released without that scrub
   before the next request gets it; the vLLM worker's layout of a cache laid out as vLLM
   0.33 lays it (per-layer views of one backing tensor, blocks at dimension 0) makes the
   step's claims zero the block in every layer;
5. PyTorch's memory statistics (torch.cuda.max_memory_allocated, memory_reserved,
   memory_summary), which a pluggable allocator does not keep, answer from kvhygiene: engines
   size their KV cache from them;
6. CUDA graph capture is refused before it begins (PyTorch keeps no graph memory pool for a
   pluggable allocator): engines run without CUDA graphs;
7. kvhygiene.stats() reports what the allocator did.
"""

import sys
from pathlib import Path
from types import SimpleNamespace as NS

# Use the package from this checkout when it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

try:
    import torch  # noqa: E402
except ImportError:
    sys.exit("examples/torch_pluggable.py needs PyTorch with CUDA, on a GPU machine: install torch")

import kvhygiene  # noqa: E402


def serve_request(tenant: str, request: str, secret: float) -> None:
    """Stands for one inference request: it fills a 'KV cache' with its data, then frees it."""
    with kvhygiene.context(tenant_id=tenant, request_id=request, model_id="demo-model"):
        kv_cache = torch.full((4, 1024, 1024), secret, device="cuda")
        torch.cuda.synchronize()
        del kv_cache  # back to kvhygiene: scrubbed and verified before reuse


def main() -> int:
    if not torch.cuda.is_available():
        print("this example needs a CUDA GPU")
        return 1
    # 1. Before CUDA is initialised (the first tensor on CUDA, or any call that initialises
    #    it). install() raises AllocatorAlreadyInUseError after that, because PyTorch then has
    #    its allocator set up and cannot swap it.
    kvhygiene.install()

    # 2. Tenant A's request writes its secret and frees it.
    serve_request("tenant-a", "req-1", secret=42.0)

    # 3. Tenant B's request asks for uninitialised memory of the same size: with kvhygiene it
    #    reads zeros, never tenant A's 42.0.
    with kvhygiene.context(tenant_id="tenant-b", request_id="req-2", model_id="demo-model"):
        probe = torch.empty((4, 1024, 1024), device="cuda")
        leaked = int((probe == 42.0).sum().item())
        nonzero = int((probe != 0).sum().item())
        print(f"tenant B sees {leaked} of tenant A's values, {nonzero} non-zero elements")
        del probe

    # 4. A paged KV cache: per layer [2 (K, V), num_blocks, block_size, heads, head_size], as
    #    vLLM lays it out. The engine hands blocks from request to request itself, so it asks
    #    kvhygiene to scrub a finished request's blocks before they go back to its free list.
    caches = [torch.full((2, 256, 16, 8, 64), 5.0, dtype=torch.float16, device="cuda") for _ in range(2)]
    layout = kvhygiene.KvLayout.from_tensors(caches, block_dim=1)
    request_blocks = [3, 17, 42]
    others = [b for b in range(256) if b not in request_blocks]
    with kvhygiene.context(tenant_id="tenant-a", request_id="req-3", model_id="demo-model"):
        for c in caches:
            c[:, request_blocks] = 7.0  # the request's keys and values
        try:
            kvhygiene.scrub_blocks(layout, request_blocks)  # on the current stream; waits
        except kvhygiene.ScrubVerificationError as e:
            print("retire these blocks, never reuse them:", e.failed_blocks)
            return 2
    kv_left = sum(int((c[:, request_blocks] != 0).sum().item()) for c in caches)
    # Only the request's blocks were written: other requests' blocks (5.0) are untouched.
    kv_touched = sum(int((c[:, others] != 5.0).sum().item()) for c in caches)
    print(f"after scrub_blocks, {kv_left} non-zero values in the request's KV blocks, {kv_touched} changed elsewhere")

    # The eviction gate: the engine claims blocks when it gives them to a request. Block 99 is
    # used by req-5, which is preempted down a path that forgets scrub_blocks; when req-6 of
    # another tenant is given it, the claim zeroes and verifies it first.
    with kvhygiene.context(tenant_id="tenant-a", request_id="req-5", model_id="demo-model"):
        kvhygiene.claim_blocks(layout, [99])
        for c in caches:
            c[:, 99] = 9.0
    with kvhygiene.context(tenant_id="tenant-b", request_id="req-6", model_id="demo-model"):
        kvhygiene.claim_blocks(layout, [99])  # raises ClaimRefusedError if it cannot be cleared
        gate_left = sum(int((c[:, 99] != 0).sum().item()) for c in caches)
    print(f"after the eviction gate, {gate_left} non-zero values in the block req-6 was given")
    del caches

    # The vLLM worker (kvhygiene.vllm_worker.Worker) lays out the model runner's KV cache:
    # vLLM 0.33 views one backing tensor as [B, H, N, C] per layer (here its LBNHC layout:
    # layer-major, then block, token, head), and every KV cache group shares one block pool.
    from kvhygiene.vllm import claim_scheduled, layouts_of_runner

    layers, blocks, tokens, heads, dim = 3, 64, 16, 4, 32
    backing = torch.full((layers, blocks, tokens, heads, dim), 5.0, dtype=torch.float16, device="cuda")
    views = {f"layer.{i}": backing[i].permute(0, 2, 1, 3) for i in range(layers)}
    runner = NS(
        kv_cache_config=NS(num_blocks=blocks, kv_cache_groups=[NS(layer_names=list(views), kv_cache_spec=NS(block_size=tokens))]),
        compilation_config=NS(static_forward_context={n: NS(kv_cache=v) for n, v in views.items()}),
        attn_groups=[[NS(layer_names=list(views), kernel_block_stride=0)]],
    )
    vllm_layouts, block_sizes = layouts_of_runner(runner)

    def step(req_id, ids):
        return NS(
            scheduled_new_reqs=[NS(req_id=req_id, block_ids=(ids,), num_computed_tokens=0)],
            scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
        )

    claim_scheduled(step("vllm-a", [11]), vllm_layouts, block_sizes)
    backing[:, 11] = 9.0  # request vllm-a's keys and values, in every layer; it finishes
    claim_scheduled(step("vllm-b", [11]), vllm_layouts, block_sizes)
    vllm_left = int((backing[:, 11] != 0).sum().item())
    vllm_touched = int((backing[:, [b for b in range(blocks) if b != 11]] != 5.0).sum().item())
    print(f"vLLM worker layout: {vllm_left} non-zero values in block 11 after vllm-b's claim, {vllm_touched} changed elsewhere")
    del backing, views, runner

    # torch.cuda.empty_cache() reaches kvhygiene through the reset hook install() registered.
    torch.cuda.empty_cache()
    kvhygiene.synchronize()

    # 5. PyTorch's memory statistics, as vLLM's memory profiling reads them: peaks reset, a
    #    run, then the peak of allocated bytes and the bytes reserved.
    torch.cuda.reset_peak_memory_stats()
    run = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.memory_reserved()
    del run
    torch.cuda.memory_summary()  # reads every statistic PyTorch's own allocator keeps
    stats_ok = peak >= 64 << 20 and reserved >= peak
    print(f"torch.cuda.max_memory_allocated() {peak} bytes, memory_reserved() {reserved} bytes")

    # 6. CUDA graph capture: refused before it begins, with what to run instead (vLLM:
    #    --enforce-eager; SGLang: --disable-cuda-graph). torch.cuda.graph is refused on entry,
    #    before it makes its capture stream current: the caller stays on its own stream.
    before = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            torch.ones(1, device="cuda")
        capture_refused = False
    except RuntimeError as e:
        capture_refused = "enforce-eager" in str(e) and torch.cuda.current_stream() == before
    print(f"CUDA graph capture refused before it began, on the caller's stream: {capture_refused}")

    # 7. What the allocator did.
    stats = kvhygiene.stats()
    print("kvhygiene stats:", {k: stats[k] for k in list(stats)[:12]})
    clean = leaked == 0 and nonzero == 0 and kv_left == 0 and kv_touched == 0 and gate_left == 0
    clean = clean and vllm_left == 0 and vllm_touched == 0
    return 0 if clean and stats_ok and capture_refused else 2


if __name__ == "__main__":
    sys.exit(main())
