"""kvhygiene's blocks as vLLM 0.33 sizes its KV cache (vllm/v1/worker/utils.py:
allocate_kv_cache), on the host backend."""

import kvhygiene

MiB = 1 << 20


def _stats(device):
    return kvhygiene.memory_stats(device)


def test_one_large_buffer_takes_its_size_rounded_to_2_mib_as_under_pytorch():
    # vllm/v1/worker/utils.py:allocate_kv_cache allocates the whole KV cache as one
    # torch.zeros(buf_size, dtype=int8) of the bytes gpu_worker.determine_available_memory left
    # for it ("Other platforms keep the exact-size allocation"); PyTorch's caching allocator
    # rounds a large allocation to 2 MiB. A block of its size class is up to 12.5% larger:
    # on an 80 GiB budget, up to 10 GiB past --gpu-memory-utilization. From 256 MiB up a fresh
    # block is sized to its request.
    lib = kvhygiene.load()
    device = 7  # a host device no other test allocates on
    _stats(device)
    kvhygiene.empty_cache()
    size = 288 * MiB + 1  # stands in for the KV budget (256 GiB + 32 GiB + 1 scales alike)
    before = _stats(device)["reserved_bytes"]["all"]["current"]
    p = lib.kvh_malloc(size, device, None)
    assert p
    try:
        taken = _stats(device)["reserved_bytes"]["all"]["current"] - before
    finally:
        lib.kvh_free(p, size, device, None)
        kvhygiene.synchronize()
        kvhygiene.empty_cache()
    exact = (size + 2 * MiB - 1) // (2 * MiB) * (2 * MiB)
    assert taken <= exact, f"a buffer of {size} bytes took {taken} bytes of device memory ({exact} under PyTorch)"
