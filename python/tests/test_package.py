"""The kvhygiene package against the host backend (no GPU, no torch needed).

The tests of this directory need the built library and skip unless KVH_LIBRARY names it
(conftest.py), e.g.

    cargo build --release
    KVH_LIBRARY=$PWD/target/release/libkvhygiene.so python3 -m pytest python/tests
"""

import contextlib
import ctypes
import os
import re
import threading
import types
from pathlib import Path

import pytest

import kvhygiene
from fakes import FakeTensor

LIB = os.environ.get("KVH_LIBRARY")
needs_lib = pytest.mark.skipif(
    not LIB or not Path(LIB).is_file(),
    reason="set KVH_LIBRARY to a built libkvhygiene.so (cargo build --release)",
)

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


# ---- library discovery (no library needed) ----


def test_explicit_path_wins(tmp_path, monkeypatch):
    a, b = tmp_path / "a.so", tmp_path / "b.so"
    a.write_bytes(b"")
    b.write_bytes(b"")
    monkeypatch.setenv("KVH_LIBRARY", str(b))
    assert kvhygiene.find_library(str(a)) == str(a)
    assert kvhygiene.find_library() == str(b)


def test_missing_library_names_every_place_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("KVH_LIBRARY", str(tmp_path / "nope.so"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        kvhygiene.find_library(str(tmp_path / "absent.so"))
    assert "absent.so" in str(e.value)
    assert "KVH_LIBRARY" in str(e.value)


def test_a_library_that_is_not_kvhygiene_is_refused_by_name(tmp_path):
    # A loadable library without kvhygiene's exports (KVH_LIBRARY pointing at another .so):
    # an OSError naming the file, not an AttributeError from deep in the declarations.
    import _ctypes

    other = getattr(_ctypes, "__file__", None)  # an extension module: a loadable library
    if other is None:
        pytest.skip("this Python has _ctypes built in: no other shared library file to load")
    said = _load_error_in_a_fresh_process(other)
    assert said.startswith("OSError") and "is not libkvhygiene.so" in said, said


def _load_error_in_a_fresh_process(library: str) -> str:
    """What ``kvhygiene.load(library)`` raises in a fresh interpreter (one library per
    process): ``OSError <message>``, or whatever it printed otherwise."""
    import subprocess
    import sys

    pkg = str(Path(kvhygiene.__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {pkg!r}); import kvhygiene\n"
        f"try:\n    kvhygiene.load({library!r})\nexcept OSError as e:\n    print('OSError', e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_a_kvhygiene_of_another_build_is_refused_with_its_version(tmp_path):
    # A library with kvhygiene's own exports but not every one this package declares (an
    # older build left in target/ or named by KVH_LIBRARY): the error says it is another
    # build, with its version, rather than that it is not kvhygiene.
    import shutil
    import subprocess

    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build a stand-in library with")
    source = tmp_path / "old.c"
    source.write_text(
        "void *kvh_malloc(long n, int d, void *s) { return 0; }\n"
        "void kvh_free(void *p, long n, int d, void *s) {}\n"
        'const char *kvh_version(void) { return "0.0.9"; }\n'
        "int kvh_init(void) { return 0; }\n"
        "int kvh_stats_json(char *b, unsigned long n, unsigned long *o) { return 0; }\n"
    )
    old = tmp_path / "libkvhygiene.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(old), str(source)], check=True)
    said = _load_error_in_a_fresh_process(str(old))
    assert said.startswith("OSError"), said
    assert "of another build (version 0.0.9)" in said, said
    assert "rebuild it" in said, said


@pytest.mark.skipif(HAVE_TORCH, reason="checks the error without torch")
def test_install_without_torch_is_an_import_error():
    with pytest.raises(ImportError, match=r"install torch"):
        kvhygiene.install()


# ---- against the library, host backend ----


@needs_lib
def test_version_and_stats():
    assert kvhygiene.version()
    s = kvhygiene.stats()
    assert isinstance(s, dict) and s


@needs_lib
def test_context_nests_and_rejects_bad_ids():
    with kvhygiene.context(tenant_id="acme", request_id="r-1", model_id="m"):
        with kvhygiene.context(tenant_id="acme", request_id="r-2"):
            pass
    with pytest.raises(kvhygiene.KvhError) as e:
        with kvhygiene.context(tenant_id="evil\ninjected"):
            pass
    assert e.value.code != 0
    with pytest.raises(kvhygiene.KvhError):
        with kvhygiene.context(request_id="x" * 129):
            pass
    # A container's or a bool's text ("['a']", "True") is a mis-passed argument, not an id.
    for bad in (["a"], ("a",), {"a": 1}, {"a"}, True):
        with pytest.raises(TypeError, match="not an id"):
            with kvhygiene.context(request_id=bad):
                pass


_NESTED_CONTEXTS = """
import sys
sys.path.insert(0, sys.argv[1])
import kvhygiene
lib = kvhygiene.load(sys.argv[2])
# Frees of pointers kvhygiene never gave out: each is an invalid_free record carrying the
# ids set on the calling thread (caller_*), in this order.
with kvhygiene.context(tenant_id="acme", request_id="r-1", model_id="m"):
    with kvhygiene.context(request_id="r-2"):
        lib.kvh_free(0xdead0000, 8, 0, None)
        with kvhygiene.context(request_id="r-3", model_id=""):
            lib.kvh_free(0xdead0008, 8, 0, None)
    lib.kvh_free(0xdead0010, 8, 0, None)
lib.kvh_free(0xdead0020, 8, 0, None)
lib.kvh_shutdown()
"""


@needs_lib
def test_an_inner_context_keeps_the_outer_ids_it_does_not_name_and_leaving_restores_them(tmp_path):
    # A request's block inside its tenant's keeps the tenant and model (an empty id clears one
    # for the block); leaving it restores the outer ids, and leaving the outer clears them.
    import json
    import subprocess
    import sys

    script = tmp_path / "nested.py"
    script.write_text(_NESTED_CONTEXTS)
    log = tmp_path / "log"
    env = dict(os.environ, KVH_BACKEND="host", KVH_LOG_DIR=str(log), KVH_LOG_FSYNC="never")
    pkg = str(Path(kvhygiene.__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, str(script), pkg, LIB], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for f in sorted(log.glob("*.jsonl")) for line in f.read_text().splitlines()]
    callers = [
        (r["caller_tenant_id"], r["caller_request_id"], r["caller_model_id"])
        for r in sorted(records, key=lambda r: r["seq"])
        if r["kind"] == "invalid_free"
    ]
    assert callers == [
        ("acme", "r-2", "m"),
        ("acme", "r-3", None),
        ("acme", "r-1", "m"),
        (None, None, None),
    ], callers


def test_an_id_given_as_bytes_is_its_text_not_its_repr():
    assert kvhygiene._encode(b"acme", "tenant_id") == b"acme"
    assert kvhygiene._encode(bytearray(b"r-1"), "request_id") == b"r-1"
    assert kvhygiene._encode(7, "request_id") == b"7"
    with pytest.raises(ValueError, match="not UTF-8"):
        kvhygiene._encode(b"\xff", "tenant_id")


@needs_lib
def test_pytorch_calling_convention_leaves_no_residue():
    """kvh_malloc / kvh_free exactly as PyTorch calls them (size, device, stream)."""
    lib = kvhygiene.load()
    size = 1 << 16
    p = lib.kvh_malloc(size, 0, None)
    assert p
    ctypes.memset(p, 0x5A, size)  # host backend: a process address we may write
    with kvhygiene.context(tenant_id="a", request_id="1"):
        lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()
    q = lib.kvh_malloc(size, 0, None)
    assert q
    assert ctypes.string_at(q, size) == bytes(size), "freed bytes reached the next caller"
    lib.kvh_free(q, size, 0, None)
    kvhygiene.synchronize()


@needs_lib
def test_contexts_are_per_thread():
    lib = kvhygiene.load()
    errors = []

    def worker(tenant):
        try:
            with kvhygiene.context(tenant_id=tenant, request_id="r"):
                for _ in range(50):
                    p = lib.kvh_malloc(4096, 0, None)
                    assert p
                    lib.kvh_free(p, 4096, 0, None)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    kvhygiene.synchronize()


@needs_lib
def test_invalid_free_does_not_crash():
    lib = kvhygiene.load()
    buf = ctypes.create_string_buffer(64)
    code = lib.kvh_free_checked(ctypes.addressof(buf), 64, 0, None)
    assert code != 0
    assert lib.kvh_last_error() != 0


# ---- install() against a stand-in for torch (the real one needs a GPU) ----


class _FakeRaw:
    def __init__(self, with_reset=True):
        self.calls = {}
        if with_reset:
            self.set_reset_fn = lambda addr: self.calls.__setitem__("reset", addr)

    def set_record_stream_fn(self, addr):
        self.calls["record_stream"] = addr


def _fake_torch(initialized=False, reserved=0, with_reset=True, with_stats_calls=False):
    import types

    torch = types.ModuleType("torch")
    if with_stats_calls:
        # The three torch._C functions torch.cuda's statistics call, as a pluggable
        # allocator leaves them: each raises.
        def unsupported(device):
            raise RuntimeError("CUDAPluggableAllocator does not yet support getDeviceStats")

        torch._C = types.SimpleNamespace(
            _cuda_memoryStats=unsupported,
            _cuda_resetPeakMemoryStats=unsupported,
            _cuda_resetAccumulatedMemoryStats=unsupported,
        )
    cuda = types.SimpleNamespace()
    memory = types.SimpleNamespace()
    state = {"changed": None, "raw": _FakeRaw(with_reset)}

    class CUDAPluggableAllocator:
        def __init__(self, path, malloc_name, free_name):
            self.args = (path, malloc_name, free_name)

        def allocator(self):
            return state["raw"]

    memory.CUDAPluggableAllocator = CUDAPluggableAllocator
    memory.change_current_allocator = lambda a: state.__setitem__("changed", a)
    cuda.memory = memory
    cuda.is_initialized = lambda: initialized
    cuda.device_count = lambda: 1
    cuda.memory_reserved = lambda d: reserved
    cuda.empty_cache = lambda: state.__setitem__("torch_empty_cache", True)

    class CUDAGraph:
        def capture_begin(self, *args, **kwargs):
            state["captured"] = True

    class graph:
        """torch.cuda.graph: makes its side stream current, then begins the capture."""

        def __init__(self, cuda_graph):
            self.cuda_graph = cuda_graph

        def __enter__(self):
            state["stream"] = "side"
            self.cuda_graph.capture_begin()

        def __exit__(self, *exc):
            state["stream"] = "default"

    class AcceleratorGraph:
        """torch.accelerator.Graph: captures through its own binding, not CUDAGraph's; as a
        context manager, empties the cache and begins the capture."""

        def capture_begin(self, *args, **kwargs):
            state["accelerator captured"] = True

        def __enter__(self):
            state["accelerator cache emptied"] = True
            self.capture_begin()
            return self

        def __exit__(self, *exc):
            pass

    cuda.CUDAGraph = CUDAGraph
    cuda.graph = graph
    torch.cuda = cuda
    torch.accelerator = types.SimpleNamespace(Graph=AcceleratorGraph)
    return torch, state


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(kvhygiene, "_allocator", None)
    monkeypatch.setattr(kvhygiene, "_reset_hook_installed", False)
    return monkeypatch


def test_install_refuses_after_cuda_initialisation(fresh):
    torch, _ = _fake_torch(initialized=True, reserved=1 << 20)
    fresh.setitem(__import__("sys").modules, "torch", torch)
    with pytest.raises(kvhygiene.AllocatorAlreadyInUseError) as e:
        kvhygiene.install()
    assert "1048576 bytes" in str(e.value)
    assert not kvhygiene.installed()


@needs_lib
def test_install_on_a_cpu_only_torch_says_so(fresh):
    # A CPU-only build of torch has no torch._C._cuda_customAllocator, which
    # CUDAPluggableAllocator calls: install() says what is wrong, not an AttributeError.
    torch, state = _fake_torch()

    def cpu_only(*args):
        raise AttributeError("module 'torch._C' has no attribute '_cuda_customAllocator'")

    torch.cuda.memory.CUDAPluggableAllocator = cpu_only
    torch.version = types.SimpleNamespace(cuda=None)
    fresh.setitem(__import__("sys").modules, "torch", torch)
    with pytest.raises(RuntimeError, match="CPU-only build") as e:
        kvhygiene.install(LIB)
    assert "_cuda_customAllocator" in str(e.value)
    assert state["changed"] is None
    assert not kvhygiene.installed()
    # A CUDA build that lacks it is an old one: not told to install a CUDA build.
    torch.version = types.SimpleNamespace(cuda="12.4")
    with pytest.raises(RuntimeError, match="PyTorch 2.3 or later") as e:
        kvhygiene.install(LIB)
    assert "CPU-only" not in str(e.value)


@needs_lib
def test_install_registers_record_stream_and_reset_hooks(fresh):
    torch, state = _fake_torch()
    fresh.setitem(__import__("sys").modules, "torch", torch)
    alloc = kvhygiene.install(LIB)
    assert alloc.args[1:] == ("kvh_malloc", "kvh_free")
    assert state["changed"] is alloc
    lib = kvhygiene.load()
    addr = lambda name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value  # noqa: E731
    assert state["raw"].calls == {
        "record_stream": addr("kvh_record_stream"),
        "reset": addr("kvh_empty_cache"),
    }
    assert kvhygiene.install(LIB) is alloc, "a second install is a no-op"


@needs_lib
def test_install_refuses_a_policy_whose_failed_allocation_returns_null(fresh):
    # PyTorch does not check kvh_malloc's result: under oom = "null" it would hand out a tensor
    # at address 0. The policy's mode is asked of the library (kvh_oom_throws), which reads
    # KVH_OOM and the KVH_CONFIG file as the start-up does.
    torch, state = _fake_torch()
    fresh.setitem(__import__("sys").modules, "torch", torch)
    lib = kvhygiene.load(LIB)

    def null_mode(throws):
        throws._obj.value = 0
        return kvhygiene.KVH_OK

    fresh.setattr(lib, "kvh_oom_throws", null_mode)
    with pytest.raises(kvhygiene.KvhError, match='oom = "null"') as e:
        kvhygiene.install(LIB)
    assert e.value.code == kvhygiene.KVH_ERR_CONFIG
    assert state.get("changed") is None and not kvhygiene.installed()


@needs_lib
def test_install_makes_torch_memory_statistics_kvhygiene_s(fresh):
    # Under a pluggable allocator torch.cuda.memory_stats, memory_allocated,
    # max_memory_allocated, memory_reserved and reset_peak_memory_stats raise; engines call
    # them (vLLM sizes its KV cache from them). After install(), the torch._C functions they
    # call answer from kvhygiene's pool.
    torch, _ = _fake_torch(with_stats_calls=True)
    fresh.setitem(__import__("sys").modules, "torch", torch)
    kvhygiene.install(LIB)
    lib = kvhygiene.load()
    device = 3  # a host device no other test allocates on
    before = torch._C._cuda_memoryStats(device)
    assert before == kvhygiene.memory_stats(device)
    ptr = lib.kvh_malloc(3 << 20, device, None)
    assert ptr
    try:
        held = torch._C._cuda_memoryStats(device)
        grown = held["allocated_bytes"]["all"]["current"] - before["allocated_bytes"]["all"]["current"]
        assert grown >= 3 << 20
        assert held["allocated_bytes"]["large_pool"]["current"] >= 3 << 20
        assert held["reserved_bytes"]["all"]["current"] >= held["allocated_bytes"]["all"]["current"]
    finally:
        lib.kvh_free(ptr, 3 << 20, device, None)
        kvhygiene.synchronize()
    after = torch._C._cuda_memoryStats(device)
    assert after["allocated_bytes"]["all"]["current"] == before["allocated_bytes"]["all"]["current"]
    assert after["allocated_bytes"]["all"]["peak"] >= 3 << 20

    torch._C._cuda_resetPeakMemoryStats(device)
    reset = kvhygiene.memory_stats(device)
    assert reset["allocated_bytes"]["all"]["peak"] == reset["allocated_bytes"]["all"]["current"]
    torch._C._cuda_resetAccumulatedMemoryStats(device)
    zeroed = kvhygiene.memory_stats(device)
    assert zeroed["allocated_bytes"]["all"]["allocated"] == 0
    assert zeroed["num_device_alloc"] == 0


@needs_lib
def test_install_makes_torch_accelerator_empty_cache_and_statistics_answer_when_torch_s_own_allocator_is_uninitialised(fresh):
    # torch/accelerator/memory.py: empty_cache and memory_stats first ask
    # torch._C._accelerator_isAllocatorInitialized(), which asks the accelerator's registered
    # device allocator; PyTorch's allocator swap may leave that its own caching allocator,
    # never initialised: empty_cache would do nothing and memory_stats read {}. After
    # install(), the allocator counts as initialised and empty_cache is kvhygiene's.
    torch, _ = _fake_torch(with_stats_calls=True)
    called = []
    torch._C._accelerator_getDeviceStats = lambda d: {}
    torch._C._accelerator_resetPeakStats = lambda d: None
    torch._C._accelerator_resetAccumulatedStats = lambda d: None
    torch._C._accelerator_isAllocatorInitialized = lambda: False
    torch._C._accelerator_allocatorInitialized = lambda: False  # the name some builds ask
    torch._C._accelerator_emptyCache = lambda: called.append("torch's own")
    fresh.setitem(__import__("sys").modules, "torch", torch)
    kvhygiene.install(LIB)
    lib = kvhygiene.load()
    device = 6  # a host device no other test allocates on
    ptr = lib.kvh_malloc(2 << 20, device, None)
    assert ptr
    lib.kvh_free(ptr, 2 << 20, device, None)
    kvhygiene.synchronize()
    assert kvhygiene.memory_stats(device)["reserved_bytes"]["all"]["current"] >= 2 << 20, "precondition: cached"
    assert torch._C._accelerator_isAllocatorInitialized() is True
    assert torch._C._accelerator_allocatorInitialized() is True
    torch._C._accelerator_emptyCache()
    assert called == [], "torch.accelerator.empty_cache went to PyTorch's own allocator"
    assert kvhygiene.memory_stats(device)["reserved_bytes"]["all"]["current"] == 0, "the cached block was not returned"


@needs_lib
def test_install_makes_torch_accelerator_memory_statistics_kvhygiene_s(fresh):
    # torch.accelerator.memory_stats, memory_reserved, max_memory_allocated and
    # reset_peak_memory_stats (which vLLM's memory snapshot and profiling call) go through
    # torch._C._accelerator_getDeviceStats, _accelerator_resetPeakStats and
    # _accelerator_resetAccumulatedStats, not the torch._C._cuda_* functions. Under a
    # pluggable allocator those raise as well. After install(), they answer from kvhygiene's
    # pool, as torch.cuda's statistics do.
    import types

    torch, _ = _fake_torch(with_stats_calls=True)

    def unsupported(device):
        raise RuntimeError("CUDAPluggableAllocator does not yet support getDeviceStats")

    torch._C._accelerator_getDeviceStats = unsupported
    torch._C._accelerator_resetPeakStats = unsupported
    torch._C._accelerator_resetAccumulatedStats = unsupported
    torch._C._accelerator_isAllocatorInitialized = lambda: True

    # torch/accelerator/memory.py: each function looks the torch._C function up at every call.
    def flat(device):
        out = {}

        def walk(prefix, value):
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", torch._C._accelerator_getDeviceStats(device))
        return out

    torch.accelerator = types.SimpleNamespace(
        memory_stats=flat,
        memory_reserved=lambda d: flat(d).get("reserved_bytes.all.current", 0),
        reset_peak_memory_stats=lambda d: torch._C._accelerator_resetPeakStats(d),
    )
    fresh.setitem(__import__("sys").modules, "torch", torch)
    kvhygiene.install(LIB)
    lib = kvhygiene.load()
    device = 4  # a host device no other test allocates on
    ptr = lib.kvh_malloc(3 << 20, device, None)
    assert ptr
    try:
        stats = torch.accelerator.memory_stats(device)
        assert stats["allocated_bytes.all.current"] >= 3 << 20
        assert torch.accelerator.memory_reserved(device) >= 3 << 20
    finally:
        lib.kvh_free(ptr, 3 << 20, device, None)
        kvhygiene.synchronize()
    torch.accelerator.reset_peak_memory_stats(device)
    reset = torch.accelerator.memory_stats(device)
    assert reset["allocated_bytes.all.peak"] == reset["allocated_bytes.all.current"]


@needs_lib
def test_install_refuses_cuda_graph_capture_before_it_begins(fresh):
    # Under a pluggable allocator PyTorch keeps no graph pool: memory a graph writes at replay
    # could be scrubbed and handed to another request. The capture is refused before it
    # begins, with what to run instead.
    torch, state = _fake_torch()
    fresh.setitem(__import__("sys").modules, "torch", torch)
    kvhygiene.install(LIB)
    with pytest.raises(RuntimeError, match="enforce-eager"):
        torch.cuda.CUDAGraph().capture_begin(None, capture_error_mode="global")
    assert "captured" not in state, "the capture began"
    kvhygiene.install(LIB)  # a second install wraps nothing twice
    with pytest.raises(RuntimeError, match="disable-cuda-graph"):
        torch.cuda.CUDAGraph().capture_begin()
    # torch.cuda.graph enters its side stream before it begins the capture, and a `with`
    # whose entry raises never exits: refused on entry, the caller that catches the error goes
    # on on the stream it was on.
    with pytest.raises(RuntimeError, match="enforce-eager"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass
    assert "stream" not in state, "the graph's side stream was made current"
    assert "captured" not in state
    # torch.accelerator.Graph, which does not go through CUDAGraph.
    with pytest.raises(RuntimeError, match="enforce-eager"):
        torch.accelerator.Graph().capture_begin()
    with pytest.raises(RuntimeError, match="enforce-eager"):
        with torch.accelerator.Graph():
            pass
    assert "accelerator captured" not in state and "accelerator cache emptied" not in state


@needs_lib
def test_memory_stats_refuses_a_device_by_name():
    with pytest.raises(kvhygiene.KvhError) as e:
        kvhygiene.memory_stats(-1)
    assert "invalid device -1" in str(e.value)
    with pytest.raises(ValueError, match="device 1099511627776"):
        kvhygiene.memory_stats(1 << 40)
    with pytest.raises(TypeError, match="device"):
        kvhygiene.memory_stats(0.5)


@needs_lib
def test_without_a_reset_setter_empty_cache_is_wrapped(fresh):
    torch, state = _fake_torch(with_reset=False)
    fresh.setitem(__import__("sys").modules, "torch", torch)
    kvhygiene.install(LIB)
    torch.cuda.empty_cache()
    assert state.get("torch_empty_cache"), "the original empty_cache still runs"


@needs_lib
def test_after_a_refused_switch_the_wrapped_empty_cache_leaves_kvhygiene_alone(fresh):
    torch, state = _fake_torch(with_reset=False)

    def refuse(allocator):
        raise RuntimeError("Can't swap an already initialized allocator")

    torch.cuda.memory.change_current_allocator = refuse
    fresh.setitem(__import__("sys").modules, "torch", torch)
    with pytest.raises(kvhygiene.AllocatorAlreadyInUseError):
        kvhygiene.install(LIB)
    calls = []
    fresh.setattr(kvhygiene.load(), "kvh_empty_cache", lambda: calls.append(1))
    torch.cuda.empty_cache()
    assert state.get("torch_empty_cache"), "the original empty_cache still runs"
    assert calls == [], "kvh_empty_cache ran (and would start kvhygiene) without kvhygiene installed"


def _growing_fill(sizes):
    """A stand-in for a `(buf, len, out_len) -> code` export whose result grows between calls."""
    calls = []

    def fill(buf, size, needed):
        want = sizes[min(len(calls), len(sizes) - 1)]
        calls.append(size)
        needed._obj.value = want
        if size <= want:
            return kvhygiene.KVH_ERR_BUFFER_TOO_SMALL
        ctypes.memmove(buf, b"x" * want, want)
        return kvhygiene.KVH_OK

    return fill, calls


def test_results_that_grow_between_calls_are_still_read():
    # 5,000 bytes reported, then 5,010 by the time of the second call (a counter gained
    # digits): the slack in the grown buffer absorbs it.
    fill, calls = _growing_fill([5000, 5010])
    assert kvhygiene._read_string(fill, "kvh_stats_json") == "x" * 5010
    assert len(calls) == 2 and calls[1] > 5010


def test_a_result_that_keeps_outgrowing_the_buffer_is_an_error():
    fill, calls = _growing_fill([5000, 10_000, 20_000, 40_000, 80_000])
    with pytest.raises(kvhygiene.KvhError, match="kept growing"):
        kvhygiene._read_string(fill, "kvh_stats_json")
    assert len(calls) == 4


# ---- paged KV caches: KvLayout and scrub_blocks ----


def test_layout_of_a_vllm_layer_cache():
    # [2, num_blocks, block_size, heads, head_size] in fp16: K and V are two regions.
    t = FakeTensor(0x10000, (2, 32, 16, 4, 8))
    layout = kvhygiene.KvLayout.from_tensors([t], block_dim=1)
    block = 16 * 4 * 8 * 2
    assert layout.regions == (0x10000, 0x10000 + 32 * block)
    assert (layout.block_bytes, layout.block_stride, layout.blocks_per_region) == (block, block, 32)
    # [num_blocks, 2, ...]: one region, K and V of a block together.
    t2 = FakeTensor(0x20000, (32, 2, 16, 4, 8))
    l2 = kvhygiene.KvLayout.from_tensors([t2], block_dim=0)
    assert l2.regions == (0x20000,) and l2.block_bytes == l2.block_stride == 2 * block


def test_permuted_dense_blocks_and_single_blocks_are_accepted():
    # vLLM's HND layout: [2, blocks, block_size, heads, head_size] viewed with heads before
    # block_size in memory. Each block is still one dense run of 16 x 8 x 128 elements.
    hnd = FakeTensor(0x40000, (2, 4, 16, 8, 128), stride=(65536, 16384, 128, 2048, 1))
    layout = kvhygiene.KvLayout.from_tensors([hnd], block_dim=1)
    assert (layout.block_bytes, layout.block_stride) == (16384 * 2, 16384 * 2)
    # One block: its dimension's stride is arbitrary and ignored.
    one = FakeTensor(0x50000, (2, 1, 4), stride=(4, 1, 1))
    l1 = kvhygiene.KvLayout.from_tensors([one], block_dim=1)
    assert l1.block_stride == l1.block_bytes == 8 and l1.regions == (0x50000, 0x50008)


def test_layout_errors_name_the_tensor_and_the_problem():
    a = FakeTensor(0x10000, (2, 8, 16))
    with pytest.raises(ValueError, match="block_dim 3"):
        kvhygiene.KvLayout.from_tensors([a], block_dim=3)
    gappy = FakeTensor(0x10000, (2, 8, 16, 4), stride=(1024, 128, 2, 32))
    with pytest.raises(ValueError, match="tensor 0: the dimensions after block_dim 1 do not cover one dense run"):
        kvhygiene.KvLayout.from_tensors([gappy], block_dim=1)
    with pytest.raises(ValueError, match="block_bytes -1"):
        kvhygiene.KvLayout([0x1000], -1, 4)
    other = FakeTensor(0x90000, (2, 9, 16))
    with pytest.raises(ValueError, match="tensor 1 has block geometry"):
        kvhygiene.KvLayout.from_tensors([a, other], block_dim=1)
    elsewhere = FakeTensor(0x90000, (2, 8, 16), device_index=1)
    with pytest.raises(ValueError, match="tensor 1 is on device 1"):
        kvhygiene.KvLayout.from_tensors([a, elsewhere], block_dim=1)
    with pytest.raises(ValueError, match="at least one tensor"):
        kvhygiene.KvLayout.from_tensors([], block_dim=0)


@needs_lib
def test_scrub_blocks_zeroes_named_blocks_of_two_layers():
    lib = kvhygiene.load()
    shape = (2, 8, 16, 4)  # 8 blocks of 16 x 4 fp16 values = 128 bytes, K and V
    size = 2 * 8 * 128
    layers = [lib.kvh_malloc(size, 0, None) for _ in range(2)]
    for p in layers:
        ctypes.memset(p, 0x7E, size)
    layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, shape) for p in layers], block_dim=1)
    assert len(layout.regions) == 4
    kvhygiene.scrub_blocks(layout, [6, 2])
    for p in layers:
        mem = ctypes.string_at(p, size)
        zero = [i for i in range(16) if mem[i * 128 : (i + 1) * 128] == bytes(128)]
        assert zero == [2, 6, 10, 14]
        assert mem.count(0x7E) == size - 4 * 128
    # Scrubbing nothing is fine; a failed block is named; bad requests say what is wrong.
    kvhygiene.scrub_blocks(layout, [])
    lib.kvh_inject_fault(1)
    with pytest.raises(kvhygiene.ScrubVerificationError) as failed:
        kvhygiene.scrub_blocks(layout, [4, 5])
    assert failed.value.failed_blocks == [4] and failed.value.code == 7009
    with pytest.raises(kvhygiene.KvhError, match="block id 8 is out of range") as bad:
        kvhygiene.scrub_blocks(layout, [8])
    assert bad.value.code == 7019
    stray = kvhygiene.KvLayout([0x1000], 128, 8)
    with pytest.raises(ValueError, match="stream is on device 3"):
        stream = type("Stream", (), {"cuda_stream": 0, "device": type("D", (), {"index": 3})()})()
        kvhygiene.scrub_blocks(layout, [0], stream=stream)
    with pytest.raises(kvhygiene.KvhError, match="not inside") as stray_err:
        kvhygiene.scrub_blocks(stray, [0])
    assert stray_err.value.code == 7020
    with pytest.raises(ValueError):
        kvhygiene.scrub_blocks(layout, [-1])
    for p in layers:
        lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()


def test_claim_blocks_scrubs_blocks_that_change_request():
    lib = kvhygiene.load()
    shape = (2, 8, 16, 4)  # K and V, 8 blocks of 128 bytes
    size = 2 * 8 * 128
    p = lib.kvh_malloc(size, 0, None)
    ctypes.memset(p, 0x7E, size)  # what earlier requests left in the cache
    layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, shape)], block_dim=1)

    def block(i):
        return ctypes.string_at(p + i * 128, 128) + ctypes.string_at(p + (8 + i) * 128, 128)

    with kvhygiene.context(tenant_id="acme", request_id="r-1"):
        kvhygiene.claim_blocks(layout, [3])
        ctypes.memset(p + 3 * 128, 0x42, 128)  # the request's keys
        kvhygiene.claim_blocks(layout, [3])  # its own block: kept
        assert block(3) != bytes(256)
    with kvhygiene.context(tenant_id="acme", request_id="r-2"):
        kvhygiene.claim_blocks(layout, [3])  # another request: scrubbed first
        assert block(3) == bytes(256)
        kvhygiene.synchronize()  # no free's scrub may take the injected fault
        lib.kvh_inject_fault(1)
        with pytest.raises(kvhygiene.ClaimRefusedError) as refused:
            kvhygiene.claim_blocks(layout, [5, 6])
    assert refused.value.refused_blocks == [5] and refused.value.code == 7009
    with pytest.raises(kvhygiene.KvhError, match="named more than once") as bad:
        kvhygiene.claim_blocks(layout, [1, 1])
    assert bad.value.code == 7019
    counters = kvhygiene.stats()["counters"]
    assert counters["kv_gate_scrubbed_blocks"] >= 2 and counters["kv_claims_refused"] >= 1
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()


def test_a_kvh_library_that_does_not_exist_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    # KVH_LIBRARY names the build the operator chose. When it is wrong (a typo, a missing
    # mount), another build further down the list (a stale target/release, a wheel's copy)
    # must not be loaded silently in its place.
    (tmp_path / "target" / "release").mkdir(parents=True)
    (tmp_path / "target" / "release" / "libkvhygiene.so").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVH_LIBRARY", str(tmp_path / "typo" / "libkvhygiene.so"))
    with pytest.raises(FileNotFoundError, match="typo"):
        kvhygiene.find_library()


def test_a_relative_library_path_is_made_absolute(tmp_path, monkeypatch):
    # The path found is loaded again later by PyTorch (CUDAPluggableAllocator dlopens it in
    # install()); relative, it resolves against the working directory of that moment, which
    # may name another file than the one ctypes loaded (or none).
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libkvhygiene.so").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVH_LIBRARY", "lib/libkvhygiene.so")
    assert os.path.isabs(kvhygiene.find_library())


@needs_lib
def test_install_with_another_path_than_the_loaded_library_is_refused(fresh, tmp_path):
    # The library was loaded earlier (stats(), context(), ...); install(path) with a path
    # that names another file, here none at all, does not silently use the loaded one.
    kvhygiene.load()
    torch, state = _fake_torch()
    fresh.setitem(__import__("sys").modules, "torch", torch)
    with pytest.raises((FileNotFoundError, ValueError)):
        kvhygiene.install(str(tmp_path / "absent" / "libkvhygiene.so"))
    assert state["changed"] is None and not kvhygiene.installed()


_CACHE_BYTES = 2 * 8 * 128


@contextlib.contextmanager
def _cache(fill: int = 0x7E):
    """A KV cache of 2 regions of 8 blocks of 128 bytes, allocated through kvhygiene and
    filled with ``fill``; freed, and its scrub waited for, on the way out."""
    lib = kvhygiene.load()
    p = lib.kvh_malloc(_CACHE_BYTES, 0, None)
    ctypes.memset(p, fill, _CACHE_BYTES)
    try:
        yield p
    finally:
        lib.kvh_free(p, _CACHE_BYTES, 0, None)
        kvhygiene.synchronize()


@needs_lib
def test_block_ids_that_are_not_integers_are_refused():
    # A float (2.9 is not block 2), a string or a bool (a mask passed by mistake would name
    # blocks 1 and 0) is refused before anything is scrubbed or claimed.
    with _cache() as p:
        layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, (2, 8, 16, 4))], block_dim=1)
        # Bytes or a string iterate as byte values or characters, not the ids meant.
        for bad in ([2.9], ["4"], [True], b"\x03", bytearray(b"\x03"), "3"):
            with pytest.raises((TypeError, ValueError)):
                kvhygiene.scrub_blocks(layout, bad)
            with pytest.raises((TypeError, ValueError)):
                kvhygiene.claim_blocks(layout, bad)
        assert ctypes.string_at(p, _CACHE_BYTES) == b"\x7e" * _CACHE_BYTES, "a block was scrubbed for a non-integer id"


@needs_lib
def test_layers_sharing_one_cache_tensor_give_a_usable_layout():
    # vLLM binds one cache tensor to several layers (cross-layer KV sharing: the runner's
    # kv_caches list holds the same tensor twice). Its regions count once, or the library
    # would refuse every call (regions overlap).
    with _cache() as p:
        t = FakeTensor(p, (2, 8, 16, 4))
        layout = kvhygiene.KvLayout.from_tensors([t, t], block_dim=1)
        kvhygiene.scrub_blocks(layout, [3])
        assert ctypes.string_at(p + 3 * 128, 128) == bytes(128)
        assert ctypes.string_at(p + 11 * 128, 128) == bytes(128)


@needs_lib
def test_a_context_left_out_of_order_keeps_the_one_still_open():
    # Two contexts open in one thread (interleaved generators, a context held by an object):
    # when the outer one is left first, the inner one is still open and its ids stay.
    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)
        a = kvhygiene.context(tenant_id="t", request_id="r-a")
        b = kvhygiene.context(tenant_id="t", request_id="r-b")
        try:
            a.__enter__()
            b.__enter__()
            kvhygiene.claim_blocks(layout, [1])  # r-b's block
            ctypes.memset(p + 128, 0x42, 128)  # r-b's keys
            a.__exit__(None, None, None)
            kvhygiene.claim_blocks(layout, [1])  # still inside b: its own block, kept
            assert ctypes.string_at(p + 128, 128) == b"\x42" * 128, "the thread's ids became r-a's inside r-b"
            b.__exit__(None, None, None)
        finally:
            kvhygiene._entered.set(())
            kvhygiene._set(None)



_FORK_AFTER_INSTALL = r"""
import os, sys, types
sys.path.insert(0, sys.argv[1])
import kvhygiene

torch = types.ModuleType("torch")
class _Raw:
    def set_record_stream_fn(self, addr): pass
    def set_reset_fn(self, addr): pass
class _Alloc:
    def __init__(self, *args): pass
    def allocator(self): return _Raw()
torch.cuda = types.SimpleNamespace(
    is_initialized=lambda: False,
    device_count=lambda: 1,
    memory_reserved=lambda d: 0,
    empty_cache=lambda: None,
    memory=types.SimpleNamespace(
        CUDAPluggableAllocator=_Alloc, change_current_allocator=lambda a: None
    ),
)
sys.modules["torch"] = torch
if sys.argv[3] == "install":
    kvhygiene.install(sys.argv[2])
elif sys.argv[3] == "install-then-stats":
    kvhygiene.install(sys.argv[2])
    kvhygiene.stats()
else:
    kvhygiene.load(sys.argv[2])
pid = os.fork()
if pid == 0:
    # A worker forked by a launcher (vLLM's fork workers, a pre-fork server): its first
    # allocation starts kvhygiene in the worker.
    os.write(1, str(kvhygiene.load().kvh_init()).encode())
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@needs_lib
def test_a_worker_forked_after_install_starts_its_own_allocator(tmp_path):
    # docs/cuda.md, "Fork": a child forked before kvhygiene started in its parent (a launcher
    # that loaded the library but never allocated, whose workers run the engine) is served as
    # any process is. install() is how a launcher sets PyTorch's allocator before it forks its
    # workers (vLLM forks them when torch has not initialised CUDA, which install() does not
    # do): it checks the configuration without starting kvhygiene, so each worker starts its
    # own.
    import subprocess
    import sys

    script = tmp_path / "fork_after_install.py"
    script.write_text(_FORK_AFTER_INSTALL)
    pkg = str(Path(kvhygiene.__file__).resolve().parent.parent)
    env = dict(os.environ, KVH_BACKEND="host")
    run = lambda how: subprocess.run(  # noqa: E731
        [sys.executable, str(script), pkg, LIB, how], env=env, capture_output=True, text=True
    )
    control = run("load")
    assert control.returncode == 0 and control.stdout == str(kvhygiene.KVH_OK), control
    after_install = run("install")
    assert after_install.returncode == 0, after_install.stderr
    assert after_install.stdout == str(kvhygiene.KVH_OK), (
        f"kvh_init in a worker forked after install() returned {after_install.stdout} "
        "(7023 is KVH_ERR_FORKED_CHILD)"
    )
    # Reading the counters is no allocation: a launcher that logs kvhygiene.stats() after
    # install() must not start kvhygiene there, or every worker it forks is refused its first
    # allocation (KVH_ERR_FORKED_CHILD, std::bad_alloc through PyTorch).
    after_stats = run("install-then-stats")
    assert after_stats.returncode == 0, after_stats.stderr
    assert after_stats.stdout == str(kvhygiene.KVH_OK), (
        f"kvh_init in a worker forked after install() and stats() returned {after_stats.stdout}: "
        "reading the counters started kvhygiene in the launcher"
    )


@needs_lib
def test_a_context_left_from_another_thread_does_not_change_that_threads_ids():
    # A context entered in one thread can be left in another (a sync generator that a server
    # advances from a thread pool, one next() per worker thread). Leaving it there must not
    # give the leaving thread the entering thread's outer ids: the leaving thread stays inside
    # its own context, and a block the outer request owns is scrubbed before it claims it.
    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)
        outer = kvhygiene.context(tenant_id="t", request_id="r-x")
        inner = kvhygiene.context(tenant_id="t", request_id="r-a")
        seen = {}

        def enter_in_a():
            outer.__enter__()
            kvhygiene.claim_blocks(layout, [5])  # r-x's block
            ctypes.memset(p + 5 * 128, 0x42, 128)  # r-x's keys
            inner.__enter__()

        def leave_in_b():
            try:
                with kvhygiene.context(tenant_id="t", request_id="r-b"):
                    inner.__exit__(None, None, None)
                    kvhygiene.claim_blocks(layout, [5])  # r-b takes r-x's block
                    seen["block"] = ctypes.string_at(p + 5 * 128, 128)
            except Exception as e:  # pragma: no cover - reported below
                seen["error"] = e

        for target in (enter_in_a, leave_in_b):
            t = threading.Thread(target=target)
            t.start()
            t.join()
        assert "error" not in seen, seen
        assert seen["block"] == bytes(128), "r-b was handed r-x's bytes: its thread took r-x's ids"


def test_errors_keep_their_type_and_fields_across_a_process_boundary():
    # Engines run kvhygiene in worker processes (vLLM on Ray, multiprocessing pools) whose
    # exceptions reach the driver pickled: a refused claim must arrive as a ClaimRefusedError
    # naming its blocks, not fail to unpickle.
    import pickle

    errors = [
        kvhygiene.KvhError("kvh_synchronize", 7012, "backend error"),
        kvhygiene.ScrubVerificationError([4, 6], 8),
        kvhygiene.ClaimRefusedError(7021, "would change owner", [1, 2]),
    ]
    for e in errors:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.code == e.code
    assert pickle.loads(pickle.dumps(errors[1])).failed_blocks == [4, 6]
    assert pickle.loads(pickle.dumps(errors[2])).refused_blocks == [1, 2]
    named = kvhygiene.ClaimRefusedError(7021, "would change owner", [1, 2], [2])
    assert pickle.loads(pickle.dumps(named)).unscrubbed_blocks == [2]


@needs_lib
def test_install_again_with_a_path_that_names_no_library_is_refused(fresh, tmp_path):
    # install()'s docstring and docs/cuda.md: a path that names another file than the library
    # already loaded is an error (FileNotFoundError when it names none), also once installed.
    torch, _ = _fake_torch()
    fresh.setitem(__import__("sys").modules, "torch", torch)
    kvhygiene.install(LIB)
    with pytest.raises((FileNotFoundError, ValueError)):
        kvhygiene.install(str(tmp_path / "absent" / "libkvhygiene.so"))


@needs_lib
def test_scrub_blocks_takes_a_long_requests_blocks_in_one_call():
    # An 80-layer model with K and V regions (160 regions) finishing a request of 6,554 blocks
    # (104,864 tokens of 16): scrub_blocks is called once for the freed set, as documented, and
    # every block is zeroed, however many segments (blocks x regions) that makes.
    lib = kvhygiene.load()
    regions, blocks, block_bytes = 160, 6554, 16
    size = regions * blocks * block_bytes
    p = lib.kvh_malloc(size, 0, None)
    ctypes.memset(p, 0x5A, size)
    try:
        layout = kvhygiene.KvLayout([p + r * blocks * block_bytes for r in range(regions)], block_bytes, blocks)
        kvhygiene.scrub_blocks(layout, range(blocks))
        assert ctypes.string_at(p, size) == bytes(size)
    finally:
        lib.kvh_free(p, size, 0, None)
        kvhygiene.synchronize()


@needs_lib
def test_a_thread_whose_context_was_left_elsewhere_claims_under_its_own_ids_again():
    # Thread A enters r-x's context and takes a block; the context is left from thread B.
    # A's next claim is made under A's own contexts (none now), not under the r-x ids the
    # library still held for A: the block changes owner, so it is scrubbed first.
    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)
        ctx = kvhygiene.context(tenant_id="t", request_id="r-x")
        entered, left, seen = threading.Event(), threading.Event(), {}

        def in_a():
            ctx.__enter__()
            kvhygiene.claim_blocks(layout, [5])
            ctypes.memset(p + 5 * 128, 0x42, 128)
            entered.set()
            left.wait()
            kvhygiene.claim_blocks(layout, [5])
            seen["block"] = ctypes.string_at(p + 5 * 128, 128)

        a = threading.Thread(target=in_a)
        a.start()
        entered.wait()
        b = threading.Thread(target=lambda: ctx.__exit__(None, None, None))
        b.start()
        b.join()
        left.set()
        a.join()
        assert seen["block"] == bytes(128), "the claim was made under the left context's ids"



def _streaming_request(layout, p):
    """A generator that serves request r-a inside its context: it takes block 3 and writes
    r-a's keys there, then yields (a streamed response)."""
    with kvhygiene.context(tenant_id="t-a", request_id="r-a"):
        kvhygiene.claim_blocks(layout, [3])
        ctypes.memset(p + 3 * 128, 0x42, 128)  # r-a's keys
        yield


@needs_lib
def test_a_copy_of_a_context_made_after_a_block_was_left_on_another_thread_has_none_of_its_ids():
    # A streamed response: the generator enters r-a's context on worker A and is finished on
    # worker B, so r-a's block is left. A later request served on worker A, outside any
    # context, hands a job to worker B with a copy of its context. That copy was made after
    # r-a was left: its claims must not be made as r-a, which would hand r-a's block over as
    # it is; a claim by another owner scrubs the block first.
    import concurrent.futures
    import contextvars

    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)

        def claim():
            kvhygiene.claim_blocks(layout, [3])
            return ctypes.string_at(p + 3 * 128, 128)

        with concurrent.futures.ThreadPoolExecutor(1) as a, concurrent.futures.ThreadPoolExecutor(1) as b:

            def start_r_a():
                g = _streaming_request(layout, p)
                next(g)
                return g

            g = a.submit(start_r_a).result()
            b.submit(next, g, None).result()  # r-a's block is left on worker B

            def serve_r_b():
                return b.submit(contextvars.copy_context().run, claim).result()

            block = a.submit(serve_r_b).result()
        assert block == bytes(128), "a claim made after r-a's context was left was made as r-a: r-a's keys were handed over"



@needs_lib
def test_a_block_left_in_a_copy_of_a_context_on_the_thread_that_entered_it_does_not_hold_there_afterwards():
    # A streamed response on an executor's one worker: its first chunk is run plainly
    # (loop.run_in_executor), so r-a's context is entered in the worker's own context; its
    # last chunk is run in a copy of the submitter's context (asyncio.to_thread), on the same
    # worker, so the block is left there. r-a's block is left: the next job the worker runs
    # plainly (another request's, outside any context) must not claim as r-a, which would hand
    # r-a's block over as it is; a claim by another owner scrubs the block first.
    import concurrent.futures
    import contextvars

    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)

        def claim():
            kvhygiene.claim_blocks(layout, [3])
            return ctypes.string_at(p + 3 * 128, 128)

        with concurrent.futures.ThreadPoolExecutor(1) as worker:
            g = _streaming_request(layout, p)
            worker.submit(next, g).result()  # entered in the worker's own context
            worker.submit(contextvars.copy_context().run, next, g, None).result()  # left in a copy
            block = worker.submit(claim).result()
        assert block == bytes(128), "a claim made after r-a's context was left was made as r-a: r-a's keys were handed over"


@needs_lib
def test_a_task_created_after_its_creator_left_a_block_on_another_thread_has_none_of_its_ids():
    # As above within asyncio: a task advances a generator that enters r-a's context, and
    # finishes it on a worker thread (asyncio.to_thread), leaving the block. A task the
    # handler creates afterwards (the next request's) is created outside r-a's context: its
    # claim must not be made as r-a.
    import asyncio

    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)
        seen = {}

        async def next_request():
            kvhygiene.claim_blocks(layout, [3])
            seen["block"] = ctypes.string_at(p + 3 * 128, 128)

        async def serve():
            g = _streaming_request(layout, p)
            next(g)
            await asyncio.to_thread(next, g, None)  # r-a's block is left on a worker thread
            await asyncio.create_task(next_request())

        asyncio.run(serve())
        assert seen["block"] == bytes(128), "a task created after r-a's context was left claimed as r-a: r-a's keys were handed over"


@needs_lib
def test_a_claim_too_long_for_one_call_is_made_in_several_and_its_ids_are_checked_first():
    lib = kvhygiene.load()
    regions, blocks, block_bytes = 160, 6554, 16
    size = regions * blocks * block_bytes
    p = lib.kvh_malloc(size, 0, None)
    ctypes.memset(p, 0x5A, size)
    try:
        layout = kvhygiene.KvLayout([p + r * blocks * block_bytes for r in range(regions)], block_bytes, blocks)
        # A block named twice, in two different calls' share: refused before any block is
        # scrubbed, and counted and logged by the library as a single call's would be.
        refused = kvhygiene.stats()["counters"]["kv_claims_refused"]
        with pytest.raises(kvhygiene.KvhError, match="block id 3 is named more than once"):
            kvhygiene.claim_blocks(layout, list(range(blocks)) + [3])
        assert ctypes.string_at(p, block_bytes) == b"\x5a" * block_bytes, "a block was scrubbed"
        assert kvhygiene.stats()["counters"]["kv_claims_refused"] == refused + 1
        with kvhygiene.context(tenant_id="t", request_id="long"):
            kvhygiene.claim_blocks(layout, range(blocks))
        assert ctypes.string_at(p, size) == bytes(size), "a block was handed over unscrubbed"
    finally:
        lib.kvh_free(p, size, 0, None)
        kvhygiene.synchronize()


def test_a_large_scrub_that_stops_on_an_error_still_names_the_blocks_found_failed(monkeypatch):
    # A set split over several library calls: the first finds block 3 failed, the second
    # stops on a backend error. The error says so, and still names block 3 (to retire).
    calls = [
        (kvhygiene.KVH_ERR_VERIFY_FAILED, [3], [1, 2, 3], "1 block failed"),
        (7012, [], [4, 5], "backend error"),
    ]
    monkeypatch.setattr(kvhygiene, "_kv_calls", lambda *a, **k: iter(calls))
    with pytest.raises(kvhygiene.KvhError) as e:
        kvhygiene.scrub_blocks(None, [1, 2, 3, 4, 5])
    assert not isinstance(e.value, kvhygiene.ScrubVerificationError)
    assert e.value.code == 7012 and e.value.failed_blocks == [3]


@needs_lib
def test_a_block_id_past_32_bits_is_refused_not_taken_for_another_block():
    # The library takes 32-bit ids; 2**32 + 3 stored into one would be block 3. It is refused
    # before any call, and no block is scrubbed or claimed for it.
    with _cache() as p:
        layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, (2, 8, 16, 4))], block_dim=1)
        for call in (kvhygiene.scrub_blocks, kvhygiene.claim_blocks):
            with pytest.raises(ValueError, match="0..2\\*\\*32-1"):
                call(layout, [2**32 + 3])
        assert ctypes.string_at(p, _CACHE_BYTES) == b"\x7e" * _CACHE_BYTES, "block 3 was scrubbed for id 2**32 + 3"


@needs_lib
def test_a_set_split_over_several_calls_with_an_id_at_blocks_per_region_is_refused_before_any_call(monkeypatch):
    # Two regions and at most 4 segments a call: 2 blocks per call. Id 8 is past the last
    # block (0..7); the whole set is refused before the first call, so no block of it is
    # scrubbed or claimed.
    monkeypatch.setattr(kvhygiene, "_MAX_KV_SEGMENTS", 4)
    with _cache() as p:
        layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, (2, 8, 16, 4))], block_dim=1)
        for call in (kvhygiene.scrub_blocks, kvhygiene.claim_blocks):
            with pytest.raises(kvhygiene.KvhError, match="block id 8 is out of range"):
                call(layout, [0, 1, 2, 8])
        assert ctypes.string_at(p, _CACHE_BYTES) == b"\x7e" * _CACHE_BYTES, "part of a refused set was scrubbed"


@needs_lib
def test_block_ids_of_a_zero_dimensional_tensor_name_one_block():
    # A 0-d tensor (``ids[i]`` of a tensor of ids) is one id: its tolist() is an int.
    one = type("Scalar", (), {"tolist": lambda self: 3})()
    with _cache() as p:
        layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, (2, 8, 16, 4))], block_dim=1)
        kvhygiene.scrub_blocks(layout, one)
        assert ctypes.string_at(p + 3 * 128, 128) == bytes(128)
        assert ctypes.string_at(p + 11 * 128, 128) == bytes(128)
        assert ctypes.string_at(p + 2 * 128, 128) == b"\x7e" * 128


def test_attributes_set_on_errors_survive_a_process_boundary():
    # claim_scheduled sets refused_requests on the ClaimRefusedError it raises, and a split
    # scrub sets failed_blocks on its KvhError: both name blocks that must not be used, so
    # both reach the driver when a worker's exception is pickled.
    import pickle

    refused = kvhygiene.ClaimRefusedError(7009, "failed verification", [1])
    refused.refused_requests = {"a": [[1]], "b": [[4, 5]]}
    back = pickle.loads(pickle.dumps(refused))
    assert back.refused_requests == {"a": [[1]], "b": [[4, 5]]}
    stopped = kvhygiene.KvhError("kvh_scrub_blocks", 7012, "backend error")
    stopped.failed_blocks = [3]
    assert pickle.loads(pickle.dumps(stopped)).failed_blocks == [3]


@needs_lib
def test_install_refuses_once_cuda_is_initialised_even_with_no_memory_held(fresh):
    # PyTorch initialises its allocator with CUDA, whether or not it allocated: the switch is
    # refused by install() itself, before PyTorch is asked.
    torch, state = _fake_torch(initialized=True, reserved=0)
    fresh.setitem(__import__("sys").modules, "torch", torch)
    with pytest.raises(kvhygiene.AllocatorAlreadyInUseError, match="already initialised"):
        kvhygiene.install(LIB)
    assert state["changed"] is None and not kvhygiene.installed()


@needs_lib
def test_install_is_refused_by_a_pytorch_without_a_record_stream_hook(fresh):
    # Without set_record_stream_fn, memory used on a second stream could be scrubbed while
    # that stream still uses it: install() refuses rather than switch allocators.
    import types

    torch, state = _fake_torch()
    state["raw"] = types.SimpleNamespace(set_reset_fn=lambda addr: None)
    fresh.setitem(__import__("sys").modules, "torch", torch)
    with pytest.raises(RuntimeError, match="set_record_stream_fn"):
        kvhygiene.install(LIB)
    assert state["changed"] is None and not kvhygiene.installed()


@needs_lib
def test_loading_another_library_file_than_the_loaded_one_is_refused(tmp_path):
    # One process runs one kvhygiene: a path naming another file (here an existing one) is a
    # ValueError, not the loaded library returned in its place.
    kvhygiene.load()
    other = tmp_path / "libkvhygiene.so"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="already loaded"):
        kvhygiene.load(str(other))
    assert kvhygiene.load(LIB) is kvhygiene.load()


def test_a_dimension_of_size_one_after_the_block_dimension_may_have_any_stride():
    # unsqueeze() and permute() give a size-1 dimension an arbitrary stride; it steps over
    # nothing, so the blocks are still dense.
    t = FakeTensor(0x10000, (2, 8, 1, 16), stride=(128, 16, 999, 1))
    layout = kvhygiene.KvLayout.from_tensors([t], block_dim=1)
    assert (layout.block_bytes, layout.block_stride, layout.regions) == (32, 32, (0x10000, 0x10100))


@needs_lib
def test_a_layout_with_a_block_stride_larger_than_its_blocks_scrubs_each_block_where_it_is():
    # Blocks of 128 bytes every 256 bytes (padded rows): block 3 is bytes 768..895; the
    # padding and the other blocks keep their bytes.
    with _cache() as p:
        layout = kvhygiene.KvLayout([p], 128, 8, block_stride=256)
        assert layout.block_stride == 256
        kvhygiene.scrub_blocks(layout, [3])
        mem = ctypes.string_at(p, _CACHE_BYTES)
        assert mem[768:896] == bytes(128), "block 3 was not scrubbed"
        assert mem[:768] + mem[896:] == b"\x7e" * (_CACHE_BYTES - 128), "bytes outside block 3 were scrubbed"


def test_a_layout_device_that_a_c_int_cannot_hold_is_refused():
    # 2**31 stored into a C int is a negative device.
    with pytest.raises(ValueError, match="not a device index"):
        kvhygiene.KvLayout([0x1000], 128, 8, device=2**31)
    assert kvhygiene.KvLayout([0x1000], 128, 8, device=2**31 - 1).device == 2**31 - 1


def test_a_layout_field_changed_after_construction_is_checked_as_at_construction():
    # ctypes would wrap layout.device = 2**32 to device 0, and block_bytes = 2**64 + 1024 to
    # 1024: the call would scrub another device or size than the one named.
    layout = kvhygiene.KvLayout([0x1000], 128, 8)
    with pytest.raises(ValueError, match="not a device index"):
        layout.device = 2**32
    with pytest.raises(ValueError, match="block_bytes"):
        layout.block_bytes = 2**64 + 1024
    with pytest.raises(TypeError, match="region base addresses"):
        layout.regions = 0x1000
    assert (layout.device, layout.block_bytes, layout.regions) == (0, 128, (0x1000,))
    layout.blocks_per_region = 4
    assert layout.blocks_per_region == 4
    with pytest.raises(TypeError, match="block ids given as NoneType"):
        kvhygiene.scrub_blocks(layout, None)


def test_the_result_codes_are_the_headers():
    # Every kvh_result of include/kvhygiene.h is a constant of the package, with its value.
    header = (Path(__file__).resolve().parents[2] / "include" / "kvhygiene.h").read_text()
    codes = dict(re.findall(r"^\s*(KVH_(?:OK|ERR_[A-Z_]+)) = (\d+),", header, re.M))
    assert len(codes) == 25, codes
    assert {name: getattr(kvhygiene, name, None) for name in codes} == {n: int(v) for n, v in codes.items()}


def _block_5_as_the_second_of_two_tasks_finds_it(ids_a: dict, ids_b: dict) -> bytes:
    """Two requests served by asyncio tasks on one thread, each inside its own context (ids
    ``ids_a``, ``ids_b``): the first claims block 5 and writes its keys there while the second
    waits inside its context; then the second claims block 5. Returns what it finds there."""
    import asyncio

    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)
        seen = {}

        async def serve():
            a_in, b_in, a_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

            async def request_a():
                with kvhygiene.context(**ids_a):
                    a_in.set()
                    await b_in.wait()
                    kvhygiene.claim_blocks(layout, [5])
                    ctypes.memset(p + 5 * 128, 0x42, 128)  # the first request's keys
                    a_done.set()

            async def request_b():
                await a_in.wait()
                with kvhygiene.context(**ids_b):
                    b_in.set()
                    await a_done.wait()
                    kvhygiene.claim_blocks(layout, [5])
                    seen["block"] = ctypes.string_at(p + 5 * 128, 128)

            await asyncio.gather(request_a(), request_b())

        asyncio.run(serve())
        return seen["block"]


@needs_lib
def test_contexts_of_interleaved_asyncio_tasks_keep_their_own_ids():
    # A claim is made under the ids of the context of the task that makes it, not under those
    # of the context another task entered last: request r-b is given block 5 after request r-a
    # wrote its keys there, so the block changes owner and r-b's claim scrubs it first.
    block = _block_5_as_the_second_of_two_tasks_finds_it(
        {"tenant_id": "t-a", "request_id": "r-a"}, {"tenant_id": "t-b", "request_id": "r-b"}
    )
    assert block == bytes(128), "r-b was handed r-a's bytes: r-a's claim was made under r-b's ids"


@needs_lib
def test_a_claim_is_made_under_the_python_context_after_native_code_set_other_ids_on_the_thread():
    # Request r-a wrote its keys to block 5. Inside r-b's context, native code on the same
    # thread (or another green thread under gevent, which shares the OS thread) sets r-a's
    # ids; r-b's claim must still be made as r-b, so the block changes owner and is scrubbed.
    lib = kvhygiene.load()
    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)
        with kvhygiene.context(tenant_id="t-a", request_id="r-a"):
            kvhygiene.claim_blocks(layout, [5])
            ctypes.memset(p + 5 * 128, 0x42, 128)  # r-a's keys
        with kvhygiene.context(tenant_id="t-b", request_id="r-b"):
            assert lib.kvh_set_context(b"t-a", b"r-a", None) == 0
            kvhygiene.claim_blocks(layout, [5])
            block = ctypes.string_at(p + 5 * 128, 128)
    assert block == bytes(128), "r-b was handed r-a's bytes: its claim was made under the native ids"


@needs_lib
def test_a_task_created_inside_a_context_claims_under_its_ids_after_its_creator_left_it():
    # context(): "Each asyncio task keeps its own contexts (they are held in a contextvars
    # variable)". A task created inside a context runs in a copy of its creator's context
    # variables, so the ids are its own: a request handler that starts the request's
    # generation as a task and leaves its `with` block must not make the task's later claims
    # anonymous. Here request r-a holds block 3 with its keys; the task serving r-a claims
    # it again, which hands a block the claimant owns over as it is.
    import asyncio

    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)
        seen = {}

        async def generate(go):
            await go.wait()
            kvhygiene.claim_blocks(layout, [3])
            seen["block"] = ctypes.string_at(p + 3 * 128, 128)

        async def handle():
            go = asyncio.Event()
            with kvhygiene.context(tenant_id="t-a", request_id="r-a"):
                kvhygiene.claim_blocks(layout, [3])
                ctypes.memset(p + 3 * 128, 0x42, 128)  # r-a's keys
                task = asyncio.create_task(generate(go))
            go.set()
            await task

        asyncio.run(handle())
        assert seen["block"] == bytes([0x42]) * 128, (
            "the task's claim was not made under the ids of the context it was created in: "
            "r-a's own block was scrubbed as if another owner claimed it"
        )


@needs_lib
def test_a_pool_job_given_a_copy_of_a_context_claims_under_its_ids_on_whichever_worker_runs_it():
    # context(): "A task created inside a context (or a thread given a copy of it, as
    # asyncio.to_thread does) keeps its ids after its creator leaves the block." A request
    # handled on a thread-pool worker hands follow-up work to the same pool with a copy of its
    # context (contextvars.copy_context().run); which worker runs it is the pool's choice, and
    # the copy's ids must not depend on it. With one worker, the job runs on the thread that
    # entered the context, after it left the block. Request r-a holds block 3 with its keys;
    # the job serving r-a claims it again, which hands a block the claimant owns over as it is.
    import concurrent.futures
    import contextvars

    with _cache(0) as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)

        def follow_up():
            kvhygiene.claim_blocks(layout, [3])
            return ctypes.string_at(p + 3 * 128, 128)

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:

            def handle():
                with kvhygiene.context(tenant_id="t-a", request_id="r-a"):
                    kvhygiene.claim_blocks(layout, [3])
                    ctypes.memset(p + 3 * 128, 0x42, 128)  # r-a's keys
                    return pool.submit(contextvars.copy_context().run, follow_up)

            block = pool.submit(handle).result().result()
        assert block == bytes([0x42]) * 128, (
            "the job given a copy of r-a's context claimed without its ids because it ran on "
            "the worker that entered the context: r-a's own block was scrubbed as if another "
            "owner claimed it"
        )


class _IterableTensor(FakeTensor):
    """A FakeTensor that iterates like a torch tensor: over its first dimension, as views."""

    def __len__(self):
        return self.shape[0]

    def __iter__(self):
        step = self._stride[0] * self._esize
        for i in range(self.shape[0]):
            yield _IterableTensor(self._ptr + i * step, self.shape[1:], self._stride[1:], self._esize)


def test_from_tensors_given_one_tensor_takes_it_whole_or_refuses_it():
    # A single [2, num_blocks, block_size, heads, head_size] cache tensor passed where the list
    # of tensors goes: block_dim still means the cache's block dimension (a layout of K and V,
    # 8 blocks of 128 bytes each), or the call is refused; it is never read as the list of
    # its K and V halves, whose dimension 1 indexes token rows.
    t = _IterableTensor(0x10000, (2, 8, 16, 4))
    try:
        layout = kvhygiene.KvLayout.from_tensors(t, block_dim=1)
    except (TypeError, ValueError):
        return
    assert (len(layout.regions), layout.blocks_per_region, layout.block_bytes) == (2, 8, 128), layout


def test_from_tensors_given_a_mapping_of_layer_names_to_tensors_does_not_read_its_keys_as_tensors():
    # vLLM's model runner builds its KV caches as a dict of layer name -> tensor
    # (initialize_kv_cache_tensors). Passed to from_tensors, it must either be read as its
    # tensors or be refused by name (TypeError), as a single tensor is; iterating it gives the
    # layer names, and a name is no tensor.
    t = FakeTensor(0x10000, (2, 8, 16, 2, 8))
    try:
        layout = kvhygiene.KvLayout.from_tensors({"model.layers.0.self_attn.attn": t}, block_dim=1)
    except TypeError as e:
        assert "dict" in str(e) or "mapping" in str(e) or "values" in str(e), str(e)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"from_tensors(dict) failed with {type(e).__name__}: {e}")
    else:
        assert layout.regions == kvhygiene.KvLayout.from_tensors([t], block_dim=1).regions


def test_a_layout_geometry_that_is_not_an_integer_is_refused():
    # As block ids are: a non-integral block_bytes (127.9) is not truncated to 127, which would
    # leave the last byte of every block unscrubbed; nor is a string read as a number.
    for kwargs in (
        dict(block_bytes=127.9, blocks_per_region=8),
        dict(block_bytes=128, blocks_per_region=8.5),
        dict(block_bytes=128, blocks_per_region=8, block_stride=255.5),
        dict(block_bytes="128", blocks_per_region=8),
    ):
        with pytest.raises((TypeError, ValueError)):
            kvhygiene.KvLayout([0x10000], **kwargs)


def test_a_context_id_that_is_not_encodable_names_the_field():
    # A str with a lone surrogate has no UTF-8: the error says which id is at fault, as it
    # does for bytes that are not UTF-8.
    with pytest.raises(ValueError, match="request_id"):
        kvhygiene._encode("r-\ud800", "request_id")


@needs_lib
def test_a_negative_block_id_is_named_in_the_error():
    # Like the other id checks ("block id 8 is out of range", "block id 3 is named more than once"),
    # the error for an id outside 0..2**32-1 names the id, so that it can be found in a long
    # list.
    with _cache() as p:
        layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, (2, 8, 16, 4))], block_dim=1)
        with pytest.raises(ValueError, match="-7"):
            kvhygiene.scrub_blocks(layout, [0, 1, -7, 3])


def _run_script(tmp_path, source: str, **env_changes):
    """Runs `source` in a child Python with this package on its path (argv[1]) and the
    library (argv[2]), under the environment with `env_changes`."""
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(source)
    pkg = str(Path(kvhygiene.__file__).resolve().parent.parent)
    env = dict(os.environ, **env_changes)
    return subprocess.run([sys.executable, str(script), pkg, LIB], env=env, capture_output=True, text=True)


_EMPTY_CACHE_WITHOUT_A_RUNTIME = """
import sys
sys.path.insert(0, sys.argv[1])
import kvhygiene
lib = kvhygiene.load(sys.argv[2])
# Before a start-up, neither has anything to do, nor starts the allocator.
for name in ("synchronize", "empty_cache"):
    getattr(kvhygiene, name)()
lib.kvh_init()  # the start-up, which fails
for name in ("synchronize", "empty_cache"):
    try:
        getattr(kvhygiene, name)()
        print(name, "returned")
    except kvhygiene.KvhError as e:
        print(name, "raised", e.code)
"""


@needs_lib
def test_empty_cache_raises_when_the_allocator_could_not_start(tmp_path):
    # kvh_empty_cache returns nothing and leaves its error in kvh_last_error. When the
    # allocator could not start (here an invalid KVH_OOM: KVH_ERR_CONFIG), empty_cache() raises
    # KvhError with that code, as synchronize() and stats() do, instead of returning as if
    # the cache had been flushed and returned to the driver.
    run = _run_script(tmp_path, _EMPTY_CACHE_WITHOUT_A_RUNTIME, KVH_BACKEND="host", KVH_OOM="bogus")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "synchronize raised 7011", run.stdout
    assert lines[1] == "empty_cache raised 7011", (
        f"empty_cache() with an allocator that could not start: {lines[1]!r} "
        "(kvh_last_error holds KVH_ERR_CONFIG, 7011)"
    )



_READ_RACING_AN_EARLY_SHUTDOWN = """
import ctypes, json, sys, threading
lib = ctypes.CDLL(sys.argv[1])
lib.kvh_stats_json.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
go = threading.Event()
answers = []


def read():
    buf, n = ctypes.create_string_buffer(1 << 16), ctypes.c_size_t()
    go.wait()
    for _ in range(2000):
        if lib.kvh_stats_json(buf, len(buf), ctypes.byref(n)) == 0:
            answers.append(json.loads(buf.value))
        lib.kvh_synchronize()


t = threading.Thread(target=read)
t.start()
go.set()
lib.kvh_shutdown()  # before any allocation: the allocator must never start
t.join()
print("STARTED" if any("counters" in a for a in answers) else "NOT STARTED")
"""


@needs_lib
def test_reads_racing_a_kvh_shutdown_that_comes_before_start_up_never_start_the_allocator(tmp_path):
    # kvh_stats_json and kvh_synchronize do not start the allocator, and a kvh_shutdown before
    # start-up keeps it from ever starting. A launcher whose health thread reads the counters
    # while the main thread shuts down (its exit hook) must not get an allocator started (a
    # forensic chain opened, a backend taken) by the read. The race is run several times.
    import subprocess
    import sys

    script = tmp_path / "read_racing_an_early_shutdown.py"
    script.write_text(_READ_RACING_AN_EARLY_SHUTDOWN)
    for attempt in range(60):
        log = tmp_path / f"log{attempt}"
        env = dict(os.environ, KVH_BACKEND="host", KVH_LOG_DIR=str(log))
        run = subprocess.run([sys.executable, str(script), LIB], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        chains = sorted(p.name for p in log.glob("*.jsonl")) if log.is_dir() else []
        assert run.stdout.strip() == "NOT STARTED" and not chains, (
            f"attempt {attempt}: a read racing kvh_shutdown started the allocator "
            f"({run.stdout.strip()}; chains {chains})"
        )


@needs_lib
def test_a_stream_that_is_no_cuda_stream_handle_is_refused_not_wrapped():
    # A raw stream is a cudaStream_t, a pointer. ctypes keeps only the low 64 bits of an int
    # passed as one (2**64 becomes NULL, the legacy default stream; -1 a handle no stream has)
    # and int() truncates a float: the scrub would be ordered on another stream than the one
    # named, after none of the work queued there. Such values are refused before any call, as
    # a device index a C int cannot hold is, and nothing is scrubbed or claimed.
    with _cache() as p:
        layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, (2, 8, 16, 4))], block_dim=1)
        for call in (kvhygiene.scrub_blocks, kvhygiene.claim_blocks):
            for bad in (2**64, 2**64 + 7, -1, 7.5):
                try:
                    call(layout, [3], stream=bad)
                except (TypeError, ValueError):
                    continue
                pytest.fail(f"{call.__name__}(stream={bad!r}) was accepted")
        assert ctypes.string_at(p, _CACHE_BYTES) == b"\x7e" * _CACHE_BYTES, "a block was scrubbed for a bad stream"


def test_block_dim_must_be_an_integer():
    t = FakeTensor(0x10000, (2, 8, 16, 4))
    for bad in (True, 1.0, "1"):
        with pytest.raises(TypeError, match="block_dim"):
            kvhygiene.KvLayout.from_tensors([t], block_dim=bad)
    assert kvhygiene.KvLayout.from_tensors([t], block_dim=1).blocks_per_region == 8


def test_stream_handles_in_the_forms_cuda_libraries_give_them():
    # torch.cuda.Stream (cuda_stream), an int, ctypes.c_void_p, and handle objects that
    # convert with int() (cuda-python's CUstream, numba's streams) name the same stream.
    class IntLike:
        def __init__(self, v):
            self.v = v

        def __int__(self):
            return self.v

    class TorchLike:
        cuda_stream = 0

    forms = [0, ctypes.c_void_p(None), ctypes.c_void_p(0), IntLike(0), TorchLike()]
    assert {kvhygiene._stream_handle(f) for f in forms} == {0}
    assert kvhygiene._stream_handle(ctypes.c_void_p(0x1234)) == 0x1234
    for bad in (IntLike(-1), IntLike(2**64), "0", 0.0, True, object()):
        with pytest.raises((TypeError, ValueError)):
            kvhygiene._stream_handle(bad)


@needs_lib
def test_a_split_set_failing_both_id_checks_is_refused_with_the_error_one_call_gives(monkeypatch):
    # The ids [0, 1, 1, 9] of a layout of 8 blocks per region fail both id checks: 9 is past
    # the last block and 1 is named twice. Made in one library call, the library names the
    # id out of range; split over several calls (at most 2 blocks a call here), the set is
    # refused with that same error.
    with _cache() as p:
        layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, (2, 8, 16, 4))], block_dim=1)
        with pytest.raises(kvhygiene.KvhError) as one:
            kvhygiene.scrub_blocks(layout, [0, 1, 1, 9])
        assert "block id 9 is out of range" in one.value.message
        monkeypatch.setattr(kvhygiene, "_MAX_KV_SEGMENTS", 4)
        with pytest.raises(kvhygiene.KvhError) as split:
            kvhygiene.scrub_blocks(layout, [0, 1, 1, 9])
        assert split.value.message == one.value.message


def test_a_stream_that_is_a_number_with_a_fraction_is_not_truncated_onto_another_stream():
    # A float is no stream handle; neither is another non-integral number that converts
    # with int() (numpy's float32, a Fraction, a Decimal): int() would truncate 2.5 to 2,
    # cudaStreamPerThread, and the call would run on a stream the caller never named.
    import decimal
    import fractions

    for bad in (fractions.Fraction(5, 2), decimal.Decimal("1.5")):
        with pytest.raises((TypeError, ValueError)):
            kvhygiene._stream_handle(bad)


def _run_with_preload(preload, env_library, code):
    """Runs ``code`` in a Python started with ``preload`` as LD_PRELOAD and KVH_LIBRARY set to
    ``env_library`` (unset when None)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("KVH_LIBRARY", "LD_PRELOAD")}
    env["LD_PRELOAD"] = str(preload)
    env["KVH_BACKEND"] = "host"
    if env_library is not None:
        env["KVH_LIBRARY"] = str(env_library)
    pkg = str(Path(kvhygiene.__file__).resolve().parent.parent)
    prelude = f"import sys; sys.path.insert(0, {pkg!r}); import kvhygiene\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env
    )


def test_a_process_started_with_the_preload_library_loads_it_and_no_second_kvhygiene():
    # The LD_PRELOAD library exports the same C API and holds the process's allocator: load()
    # uses it, and refuses to start a second kvhygiene from another file.
    library, preload = _built_preload()
    code = (
        "try:\n"
        "    kvhygiene.load()\n"
        "    print('LOADED', kvhygiene._lib_path, kvhygiene.stats().get('started'))\n"
        "except ValueError as e:\n"
        "    print('VALUE-ERROR', e)\n"
    )
    alone = _run_with_preload(preload, None, code)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.split() == ["LOADED", str(preload.resolve()), "False"], alone.stdout
    named = _run_with_preload(preload, preload, code)
    assert named.stdout.startswith("LOADED"), named.stdout + named.stderr
    other = _run_with_preload(preload, library, code)
    # KVH_LIBRARY (an image sets it for every process) is not used beside a preloaded library.
    assert other.returncode == 0, other.stderr
    assert other.stdout.split()[:2] == ["LOADED", str(preload.resolve())], other.stdout
    # A path naming another file is refused.
    explicit = _run_with_preload(preload, None, code.replace("load()", f"load({str(library)!r})"))
    assert explicit.stdout.startswith("VALUE-ERROR"), explicit.stdout
    assert "LD_PRELOAD" in explicit.stdout, explicit.stdout


@pytest.mark.parametrize("how", ["deleted", "replaced", "versioned_symlink"])
def test_a_preloaded_library_is_recognised_however_its_file_is_named_or_kept(tmp_path, how):
    # README: "in a process started with it, the Python package's load() and install() use
    # the preloaded library, and refuse (ValueError) a path or KVH_LIBRARY naming another
    # file". The preloaded library holds the process's allocator also when its file was
    # deleted or replaced since the process started (an upgrade of the image or package), or
    # when LD_PRELOAD names it through a symlink to a versioned file name: load() must not
    # start a second kvhygiene from KVH_LIBRARY's file.
    import shutil

    library, built = _built_preload()
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    preload = lib_dir / kvhygiene.PRELOAD_LIBRARY_NAME
    if how == "versioned_symlink":
        versioned = lib_dir / (kvhygiene.PRELOAD_LIBRARY_NAME + ".0.1.0")
        shutil.copyfile(built, versioned)
        preload.symlink_to(versioned.name)
        change = ""
    else:
        shutil.copyfile(built, preload)
        change = {
            "deleted": f"os.unlink({str(preload)!r})\n",
            "replaced": (
                f"shutil.copyfile({str(built)!r}, {str(preload) + '.new'!r})\n"
                f"os.replace({str(preload) + '.new'!r}, {str(preload)!r})\n"
            ),
        }[how]
    code = (
        "import os, shutil\n"
        + change
        + "try:\n"
        "    kvhygiene.load()\n"
        "    print('LOADED', kvhygiene._lib_path)\n"
        "except ValueError as e:\n"
        "    print('VALUE-ERROR', e)\n"
        f"second = any(line.rstrip().endswith('/' + {kvhygiene.LIBRARY_NAME!r})\n"
        "             for line in open('/proc/self/maps'))\n"
        "print('SECOND-KVHYGIENE', second)\n"
    )
    run = _run_with_preload(preload, library, code)
    assert run.returncode == 0, run.stderr
    assert "SECOND-KVHYGIENE False" in run.stdout, (
        f"with the LD_PRELOAD library's file {how}, load() loaded {library} as a second "
        f"kvhygiene beside the preloaded one:\n{run.stdout}{run.stderr}"
    )


def _built_preload():
    """The library and the LD_PRELOAD library built beside it (skips where the workspace
    did not build it)."""
    library = Path(kvhygiene.find_library())
    built = library.with_name(kvhygiene.PRELOAD_LIBRARY_NAME)
    if not built.is_file():
        pytest.skip(f"no {built} beside the library (cargo build --workspace builds it)")
    return library, built


def _preload_copy(tmp_path):
    """The library, the built LD_PRELOAD library beside it, and a copy of that in
    ``tmp_path/lib`` (skips where the workspace did not build it)."""
    import shutil

    library, built = _built_preload()
    preload = tmp_path / "lib" / kvhygiene.PRELOAD_LIBRARY_NAME
    preload.parent.mkdir()
    shutil.copyfile(built, preload)
    return library, built, preload


def _run_in(cwd, env_changes, code):
    """Runs ``code`` in a Python started in ``cwd`` with ``env_changes`` applied (a value of
    None removes the variable) and the host backend."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("KVH_LIBRARY", "LD_PRELOAD")}
    env["KVH_BACKEND"] = "host"
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    pkg = str(Path(kvhygiene.__file__).resolve().parent.parent)
    prelude = f"import sys; sys.path.insert(0, {pkg!r}); import kvhygiene\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(cwd),
    )


@pytest.mark.parametrize("named_by", ["path", "KVH_LIBRARY"])
def test_a_preloaded_library_named_relatively_is_still_the_same_file_after_a_chdir(
    tmp_path, named_by
):
    # README and load(): in a process started with the LD_PRELOAD library, a path or
    # KVH_LIBRARY that names the preloaded file uses it. LD_PRELOAD may name the library
    # relative to the directory the process started in (LD_PRELOAD=./libkvhygiene_preload.so);
    # an engine that changes its working directory afterwards and names the same file by its
    # absolute path must get the preloaded library, not a ValueError saying it is another file.
    library, built, preload = _preload_copy(tmp_path)
    lib_dir = preload.parent
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    if named_by == "path":
        env = {"LD_PRELOAD": "./" + kvhygiene.PRELOAD_LIBRARY_NAME}
        call = (
            "kvhygiene.load()\n"
            f"os.chdir({str(elsewhere)!r})\n"
            f"kvhygiene.load({str(preload)!r})\n"
        )
    else:
        env = {"LD_PRELOAD": "./" + kvhygiene.PRELOAD_LIBRARY_NAME, "KVH_LIBRARY": preload}
        call = f"os.chdir({str(elsewhere)!r})\nkvhygiene.load()\n"
    code = (
        "import os\n"
        "try:\n"
        + "".join("    " + line + "\n" for line in call.splitlines())
        + "    print('LOADED', kvhygiene.stats().get('started'))\n"
        "except ValueError as e:\n"
        "    print('VALUE-ERROR', e)\n"
    )
    run = _run_in(lib_dir, env, code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("LOADED"), (
        f"the preloaded {preload}, named by its absolute path ({named_by}) after a chdir, was "
        f"taken for another file:\n{run.stdout}"
    )


def test_a_library_that_is_not_kvhygiene_exporting_kvh_malloc_is_not_taken_for_a_preloaded_one(
    tmp_path,
):
    # load(): "In a process started with the LD_PRELOAD library it is that library"; otherwise
    # the library is find_library's. A process whose global scope holds some other library
    # that happens to export a function named kvh_malloc (and nothing else of kvhygiene's C
    # API) has no kvhygiene loaded: load() of KVH_LIBRARY must load kvhygiene's library, not
    # refuse it as "a second kvhygiene".
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    source = tmp_path / "other.c"
    source.write_text("void *kvh_malloc(long n, int d, void *s) { return 0; }\n")
    other = tmp_path / "libother.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(other), str(source)], check=True)
    library = kvhygiene.find_library()
    code = (
        "try:\n"
        "    kvhygiene.load()\n"
        "    print('LOADED', kvhygiene._lib_path)\n"
        "except (ValueError, OSError) as e:\n"
        "    print('REFUSED', type(e).__name__, e)\n"
    )
    run = _run_in(tmp_path, {"LD_PRELOAD": other, "KVH_LIBRARY": library}, code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[:2] == ["LOADED", library], (
        f"with {other} (not kvhygiene, exports kvh_malloc) preloaded, load() of KVH_LIBRARY "
        f"did not load kvhygiene's library:\n{run.stdout}"
    )


def _load_beside_a_global_copy(tmp_path, directory, load_first, setup=""):
    """In a fresh Python started without LD_PRELOAD: copies the library into
    ``tmp_path/directory``, loads the copy with ``RTLD_GLOBAL`` (a component that did so),
    runs ``setup`` (``{first}`` in it is the copy's path, quoted), then ``kvhygiene.load()`` of the copy (``load_first``) or of the
    library itself; prints ``LOADED`` or ``VALUE-ERROR <message>``. Returns (copy, run)."""
    import shutil

    library = Path(kvhygiene.find_library())
    first = tmp_path / directory / kvhygiene.LIBRARY_NAME
    first.parent.mkdir()
    shutil.copyfile(library, first)
    target = first if load_first else library
    code = (
        "import ctypes, os\n"
        f"ctypes.CDLL({str(first)!r}, mode=ctypes.RTLD_GLOBAL)\n"
        + setup.format(first=repr(str(first)))
        + "try:\n"
        f"    kvhygiene.load({str(target)!r})\n"
        "    print('LOADED')\n"
        "except ValueError as e:\n"
        "    print('VALUE-ERROR', e)\n"
    )
    run = _run_in(tmp_path, {"LD_PRELOAD": None}, code)
    assert run.returncode == 0, run.stderr
    return first, run


def test_the_refusal_of_a_second_kvhygiene_does_not_blame_ld_preload_when_none_is_set(tmp_path):
    # load() finds a kvhygiene already in the process's global symbol scope, whoever loaded it
    # there (here: a component that loaded libkvhygiene.so with RTLD_GLOBAL; LD_PRELOAD is
    # not set). Its ValueError for another file must tell the user what holds the allocator,
    # not send them to "remove LD_PRELOAD", which they do not use.
    first, run = _load_beside_a_global_copy(tmp_path, "first", load_first=False)
    assert run.stdout.startswith("VALUE-ERROR"), run.stdout
    assert "LD_PRELOAD" not in run.stdout, (
        f"with LD_PRELOAD unset, the refusal names LD_PRELOAD as what loaded {first}:\n"
        f"{run.stdout}"
    )


def test_the_refusal_of_a_second_kvhygiene_names_ld_preload_when_it_names_the_library_bare(
    tmp_path,
):
    # load(): "In a process started with the LD_PRELOAD library it is that library ... a path
    # or $KVH_LIBRARY naming another file is then a ValueError", whose message tells the user
    # to "remove LD_PRELOAD (the PyTorch route)". LD_PRELOAD may name the library by its bare
    # file name, found by the loader in LD_LIBRARY_PATH (LD_PRELOAD=libkvhygiene_preload.so).
    # The library was then loaded by LD_PRELOAD: the refusal must say so, not that a
    # component loaded it with RTLD_GLOBAL.
    import shutil

    library, built = _built_preload()
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    shutil.copyfile(built, lib_dir / kvhygiene.PRELOAD_LIBRARY_NAME)
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "try:\n"
        f"    kvhygiene.load({str(library)!r})\n"
        "    print('LOADED')\n"
        "except ValueError as e:\n"
        "    print('VALUE-ERROR', e)\n"
    )
    env = {"LD_PRELOAD": kvhygiene.PRELOAD_LIBRARY_NAME, "LD_LIBRARY_PATH": lib_dir}
    run = _run_in(work, env, code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("VALUE-ERROR"), run.stdout
    assert "by LD_PRELOAD" in run.stdout and "RTLD_GLOBAL" not in run.stdout, (
        f"LD_PRELOAD={kvhygiene.PRELOAD_LIBRARY_NAME} loaded the library, but the refusal "
        f"does not say so:\n{run.stdout}"
    )


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_preloaded_library_named_relatively_is_used_when_its_file_was_deleted_or_replaced(
    tmp_path, how
):
    # README and load(): in a process started with the LD_PRELOAD library, load() uses the
    # preloaded library (one process runs one kvhygiene), also when its file was deleted or
    # replaced since the process started (an upgrade of the image or package). LD_PRELOAD may
    # name it relative to the directory the process started in
    # (LD_PRELOAD=./libkvhygiene_preload.so); with the working directory unchanged, load()
    # must return the library already loaded: not fail to open the deleted file (OSError),
    # nor load the replacing file as a second kvhygiene.
    library, built, preload = _preload_copy(tmp_path)
    lib_dir = preload.parent
    change = {
        "deleted": f"os.unlink({str(preload)!r})\n",
        "replaced": (
            f"shutil.copyfile({str(built)!r}, {str(preload) + '.new'!r})\n"
            f"os.replace({str(preload) + '.new'!r}, {str(preload)!r})\n"
        ),
    }[how]
    code = (
        "import ctypes, os, shutil\n"
        + change
        + "try:\n"
        "    lib = kvhygiene.load()\n"
        "    ours = ctypes.cast(lib.kvh_version, ctypes.c_void_p).value\n"
        "    preloaded = ctypes.cast(ctypes.CDLL(None).kvh_version, ctypes.c_void_p).value\n"
        "    print('LOADED', 'the-preloaded-one' if ours == preloaded else 'a-second-one')\n"
        "except (OSError, ValueError) as e:\n"
        "    print('REFUSED', type(e).__name__, e)\n"
    )
    run = _run_in(lib_dir, {"LD_PRELOAD": "./" + kvhygiene.PRELOAD_LIBRARY_NAME}, code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "LOADED the-preloaded-one", (
        f"with LD_PRELOAD=./{kvhygiene.PRELOAD_LIBRARY_NAME} and its file {how}, load() did "
        f"not use the preloaded library:\n{run.stdout}"
    )


def test_a_loaded_kvhygiene_in_a_directory_with_a_newline_is_taken_for_its_own_file(tmp_path):
    # load(): a kvhygiene already in the process's global symbol scope is used, and a path
    # naming its file is that library, not "another file". The kernel writes a newline in a
    # path of /proc/self/maps as the four characters "\012"; a library whose directory name
    # holds one (any byte but '/' and NUL is allowed) is still the file its path names, and
    # load() of that very path must load it, not refuse it as a second kvhygiene.
    first, run = _load_beside_a_global_copy(tmp_path, "a\nb", load_first=True)
    assert run.stdout.startswith("LOADED"), (
        f"load({str(first)!r}) of the library already loaded from that file was refused:\n"
        f"{run.stdout}"
    )


def test_the_refusal_of_another_file_after_a_load_names_the_loaded_file_after_a_chdir(tmp_path):
    # load(): "A path given once it is loaded must name the same file: ... ValueError when it
    # names another", and the message says where kvhygiene is already loaded from. With
    # LD_PRELOAD naming the library relative to the starting directory
    # (LD_PRELOAD=./libkvhygiene_preload.so) and the working directory changed since, the
    # message must name the loaded file itself (its absolute path, as the refusal before any
    # load does), not "./libkvhygiene_preload.so", which from the current directory names
    # no file or another one.
    library, built, preload = _preload_copy(tmp_path)
    lib_dir = preload.parent
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    code = (
        "import os\n"
        f"os.chdir({str(elsewhere)!r})\n"
        "kvhygiene.load()\n"
        "try:\n"
        f"    kvhygiene.load({str(library)!r})\n"
        "    print('LOADED')\n"
        "except ValueError as e:\n"
        "    print('VALUE-ERROR', e)\n"
    )
    run = _run_in(lib_dir, {"LD_PRELOAD": "./" + kvhygiene.PRELOAD_LIBRARY_NAME}, code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("VALUE-ERROR"), run.stdout
    assert str(preload) in run.stdout, (
        f"the refusal does not name the loaded file {preload}:\n{run.stdout}"
    )


def test_the_refusal_of_a_second_kvhygiene_names_ld_preload_after_the_program_removed_it(
    tmp_path,
):
    # load(): "In a process started with the LD_PRELOAD library it is that library ... a path
    # or $KVH_LIBRARY naming another file is then a ValueError", whose message tells the user
    # to "remove LD_PRELOAD (the PyTorch route)". docs/cuda.md: LD_PRELOAD is inherited by
    # child processes "unless the variable is removed from their environment", which a
    # program does by removing it from its own environment once started. The library was
    # still loaded by LD_PRELOAD: the refusal must say so, not that a component loaded it
    # with RTLD_GLOBAL.
    library, preload = _built_preload()
    code = (
        "import os\n"
        "del os.environ['LD_PRELOAD']\n"
        "try:\n"
        f"    kvhygiene.load({str(library)!r})\n"
        "    print('LOADED')\n"
        "except ValueError as e:\n"
        "    print('VALUE-ERROR', e)\n"
    )
    run = _run_in(tmp_path, {"LD_PRELOAD": preload}, code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("VALUE-ERROR"), run.stdout
    assert "by LD_PRELOAD" in run.stdout and "RTLD_GLOBAL" not in run.stdout, (
        f"LD_PRELOAD loaded {preload}, but the refusal does not say so:\n{run.stdout}"
    )


def test_the_refusal_of_a_second_kvhygiene_does_not_blame_an_ld_preload_set_after_the_start(
    tmp_path,
):
    # The refusal judges LD_PRELOAD "as the process was started with it" (the loader reads it
    # at exec; a program that sets it later only passes it to its children). Here the process
    # started without LD_PRELOAD, a component loaded libkvhygiene.so with RTLD_GLOBAL, and the
    # program then set LD_PRELOAD to that file for the workers it will start. The library was
    # not loaded by LD_PRELOAD: the refusal of another file must not say "by LD_PRELOAD" nor
    # tell the user to remove it.
    first, run = _load_beside_a_global_copy(
        tmp_path,
        "first",
        load_first=False,
        setup="os.environ['LD_PRELOAD'] = {first}\n",
    )
    assert run.stdout.startswith("VALUE-ERROR"), run.stdout
    assert "LD_PRELOAD" not in run.stdout, (
        f"the process was started without LD_PRELOAD, yet the refusal names LD_PRELOAD as what "
        f"loaded {first}:\n{run.stdout}"
    )


def test_load_of_a_library_that_links_kvhygiene_is_not_taken_for_the_loaded_file(tmp_path):
    # load(): "A path given once it is loaded must name the same file: ... ValueError when it
    # names another". A library that merely links libkvhygiene.so (an engine's extension
    # calling the C API), loaded in the process too, is another file: load() of its path must
    # be refused, not answered with the kvhygiene handle as if it named the loaded library.
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    library = Path(kvhygiene.find_library())
    source = tmp_path / "ext.c"
    source.write_text("int ext_marker(void) { return 1; }\n")
    ext = tmp_path / "libext.so"
    subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-o",
            str(ext),
            str(source),
            f"-L{library.parent}",
            "-Wl,--no-as-needed",
            "-lkvhygiene",
            f"-Wl,-rpath,{library.parent}",
        ],
        check=True,
    )
    code = (
        "import ctypes\n"
        "lib = kvhygiene.load()\n"
        f"ctypes.CDLL({str(ext)!r})\n"
        "try:\n"
        f"    other = kvhygiene.load({str(ext)!r})\n"
        "    print('LOADED', other is lib)\n"
        "except ValueError as e:\n"
        "    print('VALUE-ERROR', e)\n"
    )
    run = _run_in(tmp_path, {"LD_PRELOAD": None, "KVH_LIBRARY": library}, code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("VALUE-ERROR"), (
        f"load({str(ext)!r}), a library that links {library} but is another file, was "
        f"accepted as the loaded kvhygiene:\n{run.stdout}"
    )


@needs_lib
def test_a_task_whose_ids_equal_another_tasks_in_python_but_not_as_text_claims_under_its_own():
    # Ids reach the library as their text (str()): request 1 and request 1.0 are two requests
    # ("1" and "1.0"), though 1 == 1.0 in Python. Request 1 claims block 5 and writes its keys;
    # request 1.0 is then given block 5, which changes owner, so its claim scrubs it first.
    block = _block_5_as_the_second_of_two_tasks_finds_it(
        {"tenant_id": "t", "request_id": 1}, {"tenant_id": "t", "request_id": 1.0}
    )
    assert block == bytes(128), (
        "request '1.0' was handed request '1''s bytes: request 1's claim was made under "
        "the ids the other task set on the thread"
    )


@needs_lib
def test_refuse_blocks_over_several_calls_checks_every_id_before_recording_any(monkeypatch):
    # refuse_blocks checks the layout and ids as claim_blocks checks them: a set split over
    # several library calls (2 regions, at most 4 segments a call: 2 blocks a call) with an id
    # past the last block (0..7), or an id named twice in two calls' shares, is refused whole,
    # and no refusal of part of it is recorded.
    monkeypatch.setattr(kvhygiene, "_MAX_KV_SEGMENTS", 4)
    with _cache() as p:
        layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, (2, 8, 16, 4))], block_dim=1)
        for ids in ([0, 1, 2, 8], [0, 1, 1, 2]):
            refused = kvhygiene.stats()["counters"]["kv_claims_refused"]
            with pytest.raises(kvhygiene.KvhError):
                kvhygiene.refuse_blocks(layout, ids, "given to two requests")
            recorded = kvhygiene.stats()["counters"]["kv_claims_refused"] - refused
            assert recorded == 0, f"ids {ids}: {recorded} refusals recorded for a refused set"


def test_an_id_given_as_a_str_subclass_is_its_text():
    # An id is its text: a str subclass (a `class Tenant(str, Enum)` member, a type that
    # overrides __str__) is the tenant its text names, as bytes are, not what its __str__
    # prints ("Tenant.ACME"): the forensic log and the tenant-scoped gate see the id the
    # engine uses everywhere else.
    import enum

    class Tenant(str, enum.Enum):
        ACME = "acme"

    assert kvhygiene._encode(Tenant.ACME, "tenant_id") == b"acme"


@needs_lib
def test_install_once_cuda_runs_under_another_pluggable_allocator_is_refused_as_already_in_use(fresh):
    # PyTorch's CUDAPluggableAllocator keeps no device statistics: once one is PyTorch's
    # allocator (the README's raw form, or another library's) and CUDA is initialised,
    # torch.cuda.memory_reserved raises "CUDAPluggableAllocator does not yet support
    # getDeviceStats". install() still reports what its documentation says for an initialised
    # CUDA: AllocatorAlreadyInUseError, and switches nothing.
    torch, state = _fake_torch(initialized=True)

    def no_stats(device):
        raise RuntimeError(
            "CUDAPluggableAllocator does not yet support getDeviceStats. If you need it, please "
            "file an issue describing your use case."
        )

    torch.cuda.memory_reserved = no_stats
    fresh.setitem(__import__("sys").modules, "torch", torch)
    with pytest.raises(kvhygiene.AllocatorAlreadyInUseError):
        kvhygiene.install(LIB)
    assert state["changed"] is None and not kvhygiene.installed()


def test_an_id_given_as_a_memoryview_is_its_bytes_text_not_its_address():
    # context(): "Ids are their text (...; bytes as UTF-8)". A memoryview over b"acme" is
    # bytes-like: it names tenant "acme" (or is refused), never "<memory at 0x...>", whose
    # address another view over other bytes can have later, making two tenants one.
    try:
        got = kvhygiene._encode(memoryview(b"acme"), "tenant_id")
    except (TypeError, ValueError):
        return
    assert got == b"acme", f"a memoryview over b'acme' became the id {got!r}"


def test_an_id_object_whose_text_is_its_address_is_refused():
    # An id is its text. An object with no text of its own (its str() is the default repr,
    # "<... object at 0x...>") names a memory address, which another request's object can
    # have once the first is freed: the two would be one owner to the eviction gate, and one
    # request's KV blocks would be handed to the other unscrubbed. Such an id is refused.
    class Request:
        pass

    with pytest.raises((TypeError, ValueError)):
        kvhygiene._encode(Request(), "request_id")


def test_find_library_finds_the_packaged_library_when_the_working_directory_is_gone(tmp_path, monkeypatch):
    # find_library(): the package directory comes first. A process whose working directory was
    # removed (a server started in a temporary directory cleaned since) still finds the
    # library its package carries.
    package = tmp_path / "site" / "kvhygiene"
    package.mkdir(parents=True)
    (package / kvhygiene.LIBRARY_NAME).write_bytes(b"")
    monkeypatch.setattr(kvhygiene, "__file__", str(package / "__init__.py"))
    monkeypatch.delenv("KVH_LIBRARY", raising=False)
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert kvhygiene.find_library() == str((package / kvhygiene.LIBRARY_NAME).resolve())


def test_find_library_never_loads_a_library_from_the_working_directory(tmp_path, monkeypatch):
    # A process started in a directory another user can write to (a shared /tmp, a job's
    # scratch space) must not load their target/release/libkvhygiene.so: loading runs its code.
    # Nor does an installed package look for a source checkout that is not there.
    package = tmp_path / "site" / "kvhygiene"
    package.mkdir(parents=True)
    monkeypatch.setattr(kvhygiene, "__file__", str(package / "__init__.py"))
    monkeypatch.delenv("KVH_LIBRARY", raising=False)
    planted = tmp_path / "work" / "target" / "release"
    planted.mkdir(parents=True)
    (planted / kvhygiene.LIBRARY_NAME).write_bytes(b"")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(FileNotFoundError) as e:
        kvhygiene.find_library()
    assert str(planted) not in str(e.value), e.value
    # Beside the package, a checkout's build is found: the package lies in that checkout.
    built = tmp_path / "target" / "release"
    built.mkdir(parents=True)
    (built / kvhygiene.LIBRARY_NAME).write_bytes(b"")
    monkeypatch.setattr(kvhygiene, "__file__", str(tmp_path / "python" / "kvhygiene" / "__init__.py"))
    (tmp_path / "python" / "kvhygiene").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        kvhygiene.find_library()  # no Cargo.toml: not a checkout
    (tmp_path / "Cargo.toml").write_text("[package]\n")
    assert kvhygiene.find_library() == str((built / kvhygiene.LIBRARY_NAME).resolve())


def test_an_id_given_as_a_bound_method_whose_text_is_its_object_s_address_is_refused():
    # As above: context()'s docstring refuses "an object with no text of its own (whose str()
    # is its address, which a later object may take)". A method given without its call
    # (`request_id=req.request_id` where request_id is a method) reads "<bound method
    # Request.request_id of <...Request object at 0x...>>": the request's address, which the
    # next request's object can have once the first is freed, making two requests one owner.
    class Request:
        def request_id(self):
            return "r-1"

    with pytest.raises((TypeError, ValueError)):
        kvhygiene._encode(Request().request_id, "request_id")


def test_an_id_object_that_prints_its_own_address_is_refused():
    # An id getter called without await (a coroutine), a generator, a future or a weak
    # reference has a text of its own, and that text names its address
    # ("<coroutine object request_id at 0x7f...>"): the next such object can be at the same
    # address once the first is gone, and two requests would be one owner to the eviction
    # gate, which would then hand one's KV blocks to the other unscrubbed.
    import concurrent.futures
    import weakref

    async def request_id():
        return "r-1"

    def ids():
        yield "r-1"

    class Request:
        pass

    request = Request()
    coroutine = request_id()
    try:
        for value in (coroutine, ids(), concurrent.futures.Future(), weakref.ref(request), threading.Lock()):
            with pytest.raises(TypeError, match="address"):
                kvhygiene._encode(value, "request_id")
    finally:
        coroutine.close()
    # Text built from such an object is the same address.
    with pytest.raises(ValueError, match="address"):
        kvhygiene._encode(f"req-{weakref.ref(request)}", "request_id")
    # Text that only looks alike is an id.
    assert kvhygiene._encode("meet at 0x10 <noon>", "request_id") == b"meet at 0x10 <noon>"


_MARK_IPC_EXPORTED = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import kvhygiene
lib = kvhygiene.load(sys.argv[2])
print("before start", kvhygiene.mark_ipc_exported(0x7000), kvhygiene.stats()["started"])
class Tensor:  # what the call reads of a torch tensor
    def __init__(self, ptr):
        self.ptr = ptr
    def data_ptr(self):
        return self.ptr
shared = lib.kvh_malloc(4096, 0, None)
print("tensor", kvhygiene.mark_ipc_exported(Tensor(shared + 64)))
print("foreign", kvhygiene.mark_ipc_exported(ctypes.c_void_p(0xdead0000)))
lib.kvh_free(shared, 4096, 0, None)
plain = lib.kvh_malloc(4096, 0, None)
lib.kvh_free(plain, 4096, 0, None)
kvhygiene.synchronize()
try:
    kvhygiene.mark_ipc_exported(plain)
except kvhygiene.KvhError as e:
    print("pooled raised", e.code)
print("empty tensor", kvhygiene.mark_ipc_exported(Tensor(0)))
class DevicePtr:  # cuda-python's CUdeviceptr converts with int()
    def __int__(self):
        return 0xbeef0000
print("device pointer", kvhygiene.mark_ipc_exported(DevicePtr()))
for bad in (-1, 1.5, "0x1000"):
    try:
        kvhygiene.mark_ipc_exported(bad)
    except (TypeError, ValueError) as e:
        print("refused", type(e).__name__)
c = kvhygiene.stats()["counters"]
print("exported", c["ipc_exported_blocks"], "released", c["released"])
"""


@needs_lib
def test_mark_ipc_exported_retires_the_allocation_and_refuses_pooled_memory(tmp_path):
    # An allocation the application exports itself is marked (True) and goes back to the
    # driver at its free; memory kvhygiene does not hold is not its to mark (False, also
    # before a start-up, which it does not cause, and an empty tensor's NULL); pooled memory
    # is refused (7020, the next owner's bytes); a negative, fractional or text address is no
    # address.
    run = _run_script(tmp_path, _MARK_IPC_EXPORTED, KVH_BACKEND="host")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "before start False False",
        "tensor True",
        "foreign False",
        "pooled raised 7020",
        "empty tensor False",
        "device pointer False",
        "refused ValueError",
        "refused TypeError",
        "refused TypeError",
        "exported 1 released 1",
    ], run.stdout


_FORGET_STREAM = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import kvhygiene
lib = kvhygiene.load(sys.argv[2])
kvhygiene.forget_stream(7)  # before a start-up: nothing to do, nothing started
print("before start", kvhygiene.stats()["started"])
p = lib.kvh_malloc(4096, 0, ctypes.c_void_p(7))
ctypes.memset(p, 0x5A, 4096)
lib.kvh_free(p, 4096, 0, ctypes.c_void_p(7))
kvhygiene.forget_stream(7)
kvhygiene.synchronize()
c = kvhygiene.stats()["counters"]
print("verified", c["verifications_passed"], "failed", c["verifications_failed"])
try:
    kvhygiene.forget_stream(None)
except TypeError:
    print("None refused")
"""


@needs_lib
def test_forget_stream_runs_the_scrubs_waiting_on_the_stream_and_refuses_none(tmp_path):
    # forget_stream(stream) is for a stream the application is about to destroy: before a
    # start-up it does nothing (and starts nothing); after a free on the stream, the block's
    # scrub still runs and verifies; None (the legacy stream, never forgotten) is refused.
    run = _run_script(tmp_path, _FORGET_STREAM, KVH_BACKEND="host")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["before start False", "verified 1 failed 0", "None refused"], run.stdout


@needs_lib
def test_forget_stream_raises_when_the_allocator_could_not_start(tmp_path):
    run = _run_script(
        tmp_path,
        "import sys\nsys.path.insert(0, sys.argv[1])\nimport kvhygiene\nlib = kvhygiene.load(sys.argv[2])\n"
        "lib.kvh_init()\ntry:\n    kvhygiene.forget_stream(7)\n    print('returned')\n"
        "except kvhygiene.KvhError as e:\n    print('raised', e.code)\n",
        KVH_BACKEND="host", KVH_OOM="bogus",
    )
    assert run.stdout.strip() == "raised 7011", run.stdout + run.stderr


@needs_lib
def test_load_declares_kvh_forget_stream_like_the_other_stream_taking_exports():
    # include/kvhygiene.h: `void kvh_forget_stream(void *stream)`, called before the engine
    # destroys a stream it named to kvh_malloc / kvh_free. The library load() returns has the
    # C ABI's types declared (kvh_record_stream takes the same void* stream). Left undeclared,
    # ctypes passes a Python int as a C int, masked to 32 bits: the library would forget
    # another stream than the 64-bit handle named, and later scrub on the destroyed one.
    lib = kvhygiene.load()
    stream = 0x7F12_3456_7000
    p = lib.kvh_malloc(4096, 0, stream)
    assert p
    lib.kvh_free(p, 4096, 0, stream)
    try:
        assert lib.kvh_forget_stream.argtypes == [ctypes.c_void_p], (
            "kvh_forget_stream has no declared argument types: a stream handle is passed as a 32-bit int"
        )
        assert lib.kvh_forget_stream.restype is None
    finally:
        kvhygiene.synchronize()


_FORGET_AFTER_SHUTDOWN = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import kvhygiene
lib = kvhygiene.load(sys.argv[2])
p = lib.kvh_malloc(4096, 0, ctypes.c_void_p(7))
lib.kvh_free(p, 4096, 0, ctypes.c_void_p(7))
lib.kvh_shutdown()
try:
    kvhygiene.forget_stream(7)
    print("returned")
except kvhygiene.KvhError as e:
    print("raised", e.code)
"""


@needs_lib
def test_forget_stream_raises_after_the_allocator_was_shut_down(tmp_path):
    # forget_stream's docstring: "Raises KvhError when the allocator could not start or was
    # shut down". After kvh_shutdown (the exit hook) the scrubs waiting on the stream are never
    # submitted, so a caller about to destroy the stream is told, as empty_cache tells it.
    run = _run_script(tmp_path, _FORGET_AFTER_SHUTDOWN, KVH_BACKEND="host")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("raised"), (
        f"forget_stream after kvh_shutdown: {run.stdout.strip()} {run.stderr}"
    )


def test_a_child_forked_while_another_thread_holds_the_package_locks_can_take_them():
    # A worker forked while another thread was inside install() or a vLLM claim (holding a
    # lock of the package) must not hang at its own first load() or claim: the fork copied
    # the lock held, and no thread of the child will ever release it.
    import time

    from kvhygiene import vllm

    held, release = threading.Event(), threading.Event()

    def hold():
        with kvhygiene._lock, vllm._claimants_lock, vllm._pair_classes_lock:
            held.set()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                got = all(
                    lock.acquire(timeout=5)
                    for lock in (kvhygiene._lock, vllm._claimants_lock, vllm._pair_classes_lock)
                )
                code = 0 if got else 3
            finally:
                os._exit(code)
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the child hung on a lock held at the fork")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status) == 0, "a lock held at the fork stayed held"
    finally:
        release.set()
        t.join()


_SECRET_AFTER_START = """
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
import kvhygiene
lib = kvhygiene.load(sys.argv[2])
lib.kvh_malloc(1024, 0, None)  # the allocator starts: the secret is read
assert kvhygiene.stats()["started"]
child = subprocess.run(
    ["sh", "-c", "echo child: ${FORENSIC_HMAC_SECRET:-none}"], capture_output=True, text=True
)
print(child.stdout.strip())
with open("/proc/self/environ", "rb") as f:
    print("environ:", f.read().replace(b"\\0", b" ").decode("utf-8", "replace"))
"""


@needs_lib
def test_the_hmac_secret_is_gone_from_the_process_environment_once_the_allocator_started(tmp_path):
    # docs/forensic-log.md: FORENSIC_HMAC_SECRET is read once, its bytes overwritten and the
    # variable removed from the process's environment, which the programs it starts inherit.
    # (os.environ, Python's copy, keeps it: the docs say so and point to KVH_HMAC_KEY_FILE.)
    secret = "0123456789abcdef0123456789abcdef"
    run = _run_script(tmp_path, _SECRET_AFTER_START, KVH_BACKEND="host", FORENSIC_HMAC_SECRET=secret)
    assert run.returncode == 0, run.stderr
    assert "child: none" in run.stdout, run.stdout
    assert secret not in run.stdout, f"the HMAC secret outlived the start-up:\n{run.stdout}"


@needs_lib
def test_a_layout_argument_that_is_no_kvlayout_is_refused_by_name():
    # Passing the engine's cache tensors, or the list layouts_of() returns, where one KvLayout
    # is expected is refused with a TypeError that names KvLayout (as claim_scheduled does for
    # one layout where a list is expected), not an AttributeError about a missing `regions`.
    with _cache() as p:
        layout = kvhygiene.KvLayout.from_tensors([FakeTensor(p, (2, 8, 16, 4))], block_dim=1)
        for wrong in ([layout], {"layer.0": FakeTensor(p, (2, 8, 16, 4))}):
            for call in (kvhygiene.scrub_blocks, kvhygiene.claim_blocks):
                with pytest.raises(TypeError, match="KvLayout"):
                    call(wrong, [1])
            with pytest.raises(TypeError, match="KvLayout"):
                kvhygiene.refuse_blocks(wrong, [1], "reason")


@needs_lib
def test_a_host_tensor_is_refused_as_a_kv_cache():
    # A CPU tensor's device index is None: read as 0, it would pass as a cuda:0 cache.
    with _cache() as p:
        cpu = FakeTensor(p, (2, 8, 16, 4))
        cpu.device = type("Device", (), {"index": None, "type": "cpu"})()
        with pytest.raises(ValueError, match="device type 'cpu'"):
            kvhygiene.KvLayout.from_tensors([cpu], block_dim=1)


def test_the_engine_adapters_are_reached_from_a_bare_import(tmp_path):
    # The docs write kvhygiene.vllm.claim_scheduled after `import kvhygiene`.
    source = (
        "import sys\nsys.path.insert(0, sys.argv[1])\nimport kvhygiene\n"
        "print(kvhygiene.vllm.claim_scheduled.__name__, kvhygiene.sglang.layouts_of.__name__)\n"
    )
    run = _run_script(tmp_path, source)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["claim_scheduled", "layouts_of"]


@pytest.mark.parametrize(
    "method,parent_loads",
    [("fork", True), ("fork", False), ("forkserver", False), ("spawn", False)],
)
def test_a_multiprocessing_worker_ends_its_log_chain_with_a_stop_record(tmp_path, method, parent_loads):
    # The worker's kvhygiene starts in the worker (its first allocation). A forked worker
    # ends with os._exit, which skips atexit: without the package's finalizer its chain would
    # end as a crashed writer's, without `stop`, whether the package was loaded before the
    # fork or in the worker. A spawned worker exits normally (atexit).
    import json
    import subprocess
    import sys

    pkg = str(Path(kvhygiene.__file__).resolve().parent.parent)
    log = tmp_path / "log"
    (tmp_path / "worker_main.py").write_text(
        f"""
import sys; sys.path.insert(0, {pkg!r})
import multiprocessing, os
import kvhygiene

def work():
    lib = kvhygiene.load()
    p = lib.kvh_malloc(4096, 0, None)
    lib.kvh_free(p, 4096, 0, None)
    print("worker", os.getpid(), flush=True)

if __name__ == "__main__":
    if {parent_loads!r}:
        kvhygiene.load()
    w = multiprocessing.get_context({method!r}).Process(target=work)
    w.start(); w.join()
    sys.exit(w.exitcode)
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVH_") or k == "KVH_LIBRARY"}
    env.update({"KVH_BACKEND": "host", "KVH_LOG_DIR": str(log)})
    run = subprocess.run(
        [sys.executable, str(tmp_path / "worker_main.py")], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    worker = next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("worker "))
    chains = sorted(log.glob(f"kvh-p{worker}-*.jsonl"))
    assert chains, f"no chain of worker {worker} in {sorted(p.name for p in log.iterdir())}"
    last = json.loads(chains[-1].read_text().splitlines()[-1])
    assert last["kind"] == "stop", last


# ---- a context a paused generator entered ----

_TENANT_SCOPED_STREAM = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import kvhygiene as k
lib = k.load(sys.argv[2])
p = lib.kvh_malloc(2 * 8 * 256, 0, None)
layout = k.KvLayout([p, p + 8 * 256], 256, 8)
k.scrub_blocks(layout, range(8))

def stream_a():
    # Tenant A's streamed response: its block 0 holds A's keys while it is paused.
    with k.context(tenant_id="tenant-a", request_id="r-a"):
        k.claim_blocks(layout, [0])
        ctypes.memset(p, 0x41, 256)
        yield 1
        yield 2

def handle_b():
    # An anonymous request served between two of A's chunks: it names no tenant.
    with k.context(request_id="r-b"):
        ids = k._innermost()
        k.claim_blocks(layout, [0])
        return ids, ctypes.string_at(p, 8)

a = stream_a()
next(a)
ids, seen = handle_b()
print(ids)
print(seen.hex())
print(k._innermost())
list(a)
"""


@needs_lib
def test_a_request_served_while_another_tenants_generator_is_paused_inside_its_context_gets_none_of_its_ids(tmp_path):
    # A generator paused at a yield inside its context shares its caller's execution
    # context. Under the tenant scope, request r-b (no tenant) served meanwhile must not
    # inherit tenant-a: it would be tenant-a's to the gate, which would hand it block 0 with
    # tenant-a's keys in it, unscrubbed.
    run = _run_script(tmp_path, _TENANT_SCOPED_STREAM, KVH_KV_GATE_SCOPE="tenant")
    assert run.returncode == 0, run.stderr
    ids, seen, outside = run.stdout.splitlines()
    assert ids == "(None, b'r-b', None)", f"r-b's ids {ids}: inherited from the paused generator"
    assert seen == "00" * 8, "r-b was handed tenant-a's block unscrubbed"
    assert outside == "None", f"code outside any context runs under {outside}"


@needs_lib
def test_a_generator_holds_its_context_while_it_runs_and_after_it_resumes():
    seen = []

    def stream():
        with kvhygiene.context(tenant_id="t", request_id="r-g"):
            seen.append(kvhygiene._innermost())
            yield
            seen.append(kvhygiene._innermost())

    g = stream()
    next(g)
    seen.append(kvhygiene._innermost())
    next(g, None)
    assert seen == [(b"t", b"r-g", None), None, (b"t", b"r-g", None)]


@needs_lib
def test_a_context_entered_through_a_context_manager_generator_holds_in_the_with_body():
    # @contextmanager (and ExitStack, and @asynccontextmanager) run the caller's body while
    # their generator is paused inside the block: that body is the request's.
    import asyncio

    @contextlib.contextmanager
    def request_scope(rid):
        with kvhygiene.context(tenant_id="t", request_id=rid):
            yield

    @contextlib.contextmanager
    def nested_scope(rid):
        with request_scope(rid):
            yield

    @contextlib.asynccontextmanager
    async def async_scope(rid):
        with kvhygiene.context(request_id=rid):
            yield

    with request_scope("r-1"):
        assert kvhygiene._innermost() == (b"t", b"r-1", None)
    with nested_scope("r-2"):
        assert kvhygiene._innermost() == (b"t", b"r-2", None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(kvhygiene.context(request_id="r-3"))
        assert kvhygiene._innermost() == (None, b"r-3", None)

    async def main():
        async with async_scope("r-4"):
            assert kvhygiene._innermost() == (None, b"r-4", None)

            async def task():
                return kvhygiene._innermost()

            assert await asyncio.create_task(task()) == (None, b"r-4", None)

    asyncio.run(main())
    assert kvhygiene._innermost() is None


@needs_lib
def test_the_reader_of_a_paused_async_generator_does_not_claim_under_its_ids():
    import asyncio

    seen = []

    async def tokens():
        with kvhygiene.context(tenant_id="t-a", request_id="r-a"):
            yield 1

    async def main():
        async for _ in tokens():
            seen.append(kvhygiene._innermost())
            with kvhygiene.context(request_id="r-b"):
                seen.append(kvhygiene._innermost())

    asyncio.run(main())
    assert seen == [None, (None, b"r-b", None)]


# ---- ids that name an address ----


def test_the_address_check_finds_what_a_backtracking_pattern_finds():
    # _names_an_address replaces the pattern r"<.*\bat 0x[0-9a-fA-F]+" (which backtracks
    # from every "<"): the same verdict on texts built from its pieces.
    import itertools

    old = re.compile(r"<.*\bat 0x[0-9a-fA-F]+")
    pieces = ["<", ">", "at 0x1f", "xat 0x1", " ", "\n", "a", "0x", "at 0x", "<locals>"]
    for n in range(1, 5):
        for parts in itertools.product(pieces, repeat=n):
            text = "".join(parts)
            assert kvhygiene._names_an_address(text) == bool(old.search(text)), repr(text)


@needs_lib
def test_an_id_of_many_brackets_is_refused_for_its_length():
    # The old pattern took seconds on this, holding the GIL, before the length was checked.
    with pytest.raises(kvhygiene.KvhError, match="128"):
        with kvhygiene.context(tenant_id="acme", request_id="<" * 50_000):
            pass


# ---- refusal reasons, unscrubbed blocks ----


@needs_lib
def test_a_refusal_reason_is_free_text_recorded_whatever_it_says():
    # refuse_blocks' reason is not an id: text naming an object, bytes that are not UTF-8, a
    # NUL, an exception object. Each refusal is recorded (counted), none raises.
    class Request:
        pass

    with _cache() as p:
        layout = kvhygiene.KvLayout([p, p + 8 * 128], 128, 8)
        reasons = [f"block 3 already given to {Request()!r}", b"dup \xff", "a\0b", ValueError("dup"), None, "\ud800"]
        with kvhygiene.context(request_id="r-1"):
            for reason in reasons:
                before = kvhygiene.stats()["counters"]["kv_claims_refused"]
                kvhygiene.refuse_blocks(layout, [3], reason)
                assert kvhygiene.stats()["counters"]["kv_claims_refused"] == before + 1, repr(reason)
    assert kvhygiene._reason_bytes("a\0b") == "a\ufffdb".encode()
    assert kvhygiene._reason_bytes(ValueError("dup")) == b"dup"


_ENFORCED_CLAIM = """
import sys
sys.path.insert(0, sys.argv[1])
import kvhygiene as k
lib = k.load(sys.argv[2])
p = lib.kvh_malloc(8 * 256, 0, None)
layout = k.KvLayout([p], 256, 8)
k.scrub_blocks(layout, [0, 1, 2, 3])
with k.context(request_id="r-1"):
    try:
        k.claim_blocks(layout, [0, 1, 2, 3, 4, 5])
    except k.ClaimRefusedError as e:
        print(e.code, e.refused_blocks, e.unscrubbed_blocks)
"""


@needs_lib
def test_an_enforced_refusal_names_the_blocks_that_need_a_scrub(tmp_path):
    # Nothing of the refused call was handed over (refused_blocks: all six); blocks 4 and 5
    # were never scrubbed, so they would change owner unscrubbed: those are the ones to scrub.
    run = _run_script(tmp_path, _ENFORCED_CLAIM, KVH_KV_GATE="enforce")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "7021 [0, 1, 2, 3, 4, 5] [4, 5]", run.stdout


_INTERLEAVED_TASKS_ALLOCATING = """
import asyncio
import sys
sys.path.insert(0, sys.argv[1])
import kvhygiene
lib = kvhygiene.load(sys.argv[2])
per_step = sys.argv[3] == "per-step"


def probe(n):
    # A free of a pointer kvhygiene never gave out: an invalid_free record carrying the ids
    # the library holds for this thread (caller_*), as an allocation made here would.
    lib.kvh_free(0xdead0000 + 16 * n, 8, 0, None)


async def request_a(a_in, b_in, b_out):
    with kvhygiene.context(tenant_id="t-a", request_id="r-a"):
        a_in.set()
        await b_in.wait()
        probe(1)  # after an await during which r-b entered its context
        await b_out.wait()
        probe(2)  # after one during which r-b left it


async def request_b(a_in, b_in, b_out):
    await a_in.wait()
    with kvhygiene.context(tenant_id="t-b", request_id="r-b"):
        b_in.set()
        await asyncio.sleep(0)
        probe(3)
    b_out.set()
    await asyncio.sleep(0)
    probe(4)  # outside any context, after r-a ran


async def serve():
    if per_step:
        kvhygiene.install_asyncio()
    events = [asyncio.Event() for _ in range(3)]
    await asyncio.gather(request_a(*events), request_b(*events))


asyncio.run(serve())
lib.kvh_shutdown()
"""


def _probed_ids(tmp_path, mode: str) -> list:
    import json
    import subprocess
    import sys

    script = tmp_path / "tasks.py"
    script.write_text(_INTERLEAVED_TASKS_ALLOCATING)
    log = tmp_path / mode
    env = dict(os.environ, KVH_BACKEND="host", KVH_LOG_DIR=str(log), KVH_LOG_FSYNC="never")
    pkg = str(Path(kvhygiene.__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, str(script), pkg, LIB, mode], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for f in sorted(log.glob("*.jsonl")) for line in f.read_text().splitlines()]
    # In the order of the probes (their pointers), whatever the order of the records.
    frees = sorted((r for r in records if r["kind"] == "invalid_free"), key=lambda r: int(r["ptr"], 16))
    assert len(frees) == 4, frees
    return [(r["caller_tenant_id"], r["caller_request_id"]) for r in frees]


@needs_lib
def test_under_install_asyncio_what_a_task_allocates_after_an_await_carries_its_own_ids(tmp_path):
    # Two requests take turns on the loop's thread. Without install_asyncio the library's ids
    # are those of whichever task entered or left a context last: r-a's memory would be
    # stamped as t-b's (pooled for t-b under strict isolation, named as t-b's in the log).
    assert _probed_ids(tmp_path, "per-step") == [
        ("t-a", "r-a"),
        ("t-a", "r-a"),
        ("t-b", "r-b"),
        (None, None),
    ]
    # The threat the function exists for, shown on the same script.
    assert _probed_ids(tmp_path, "per-thread")[:2] == [("t-b", "r-b"), (None, None)]


@needs_lib
def test_install_asyncio_keeps_the_loops_task_factory_and_is_idempotent():
    import asyncio

    made = []

    def previous(loop, coro, **kwargs):
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def job():
        with kvhygiene.context(tenant_id="t", request_id="r-job"):
            await asyncio.sleep(0)
            return kvhygiene._innermost()

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(previous)
        kvhygiene.install_asyncio()
        factory = loop.get_task_factory()
        kvhygiene.install_asyncio(loop)
        assert loop.get_task_factory() is factory, "a second call wrapped the factory again"
        task = asyncio.create_task(job())
        assert "job" in repr(task), repr(task)
        assert task.get_stack() is not None
        return await task

    assert asyncio.run(main()) == (b"t", b"r-job", None)
    # The job, then asyncio.run's own clean-up tasks: each made by the previous factory, of
    # the coroutine wrapped once.
    assert made and all(type(c) is kvhygiene._IdsPerStep for c in made), made
    assert all(not isinstance(c._coro, kvhygiene._IdsPerStep) for c in made), made


def test_context_decorates_plain_functions_and_refuses_those_whose_body_runs_later():
    @kvhygiene.context(tenant_id="t", request_id="r-sync")
    def plain():
        return "ran"

    assert plain.__name__ == "plain"

    async def handler():
        pass

    def stream():
        yield

    async def astream():
        yield

    for func, kind in ((handler, "async function"), (stream, "generator"), (astream, "async function")):
        with pytest.raises(TypeError, match=kind):
            kvhygiene.context(tenant_id="t")(func)


_EAGER_CHILD_TASK = """
import asyncio
import contextvars
import sys
sys.path.insert(0, sys.argv[1])
import kvhygiene
lib = kvhygiene.load(sys.argv[2])


def eager(loop, coro, **kwargs):
    # As asyncio.eager_task_factory (Python 3.12+) does for the child: its first step runs as
    # it is created, inside the creator's call (it stops at an await, never finishing there).
    # As there, in the task's own copy of the creator's context.
    context = kwargs.pop("context", None) or contextvars.copy_context()
    if coro.__qualname__ == "child":
        context.run(coro.send, None)
    return asyncio.Task(coro, loop=loop, context=context, **kwargs)


async def child():
    with kvhygiene.context(tenant_id="t-child", request_id="r-child"):
        await asyncio.sleep(0)


async def parent():
    with kvhygiene.context(tenant_id="t-parent", request_id="r-parent"):
        task = asyncio.get_running_loop().create_task(child())
        # An invalid free: its record carries the ids the library holds for this thread.
        lib.kvh_free(0xdead0000, 8, 0, None)
        await task


async def main():
    asyncio.get_running_loop().set_task_factory(eager)
    kvhygiene.install_asyncio()
    await parent()


asyncio.run(main())
lib.kvh_shutdown()
"""


@needs_lib
def test_under_install_asyncio_a_task_that_starts_eagerly_gives_its_creator_back_its_ids(tmp_path):
    import json

    log = tmp_path / "log"
    run = _run_script(tmp_path, _EAGER_CHILD_TASK, KVH_BACKEND="host", KVH_LOG_DIR=str(log), KVH_LOG_FSYNC="never")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for f in sorted(log.glob("*.jsonl")) for line in f.read_text().splitlines()]
    frees = [(r["caller_tenant_id"], r["caller_request_id"]) for r in records if r["kind"] == "invalid_free"]
    assert frees == [("t-parent", "r-parent")], frees


@needs_lib
def test_under_install_asyncio_tasks_answer_as_coroutines_and_refuse_what_is_not_one():
    import asyncio
    import inspect

    async def job():
        await asyncio.sleep(0)

    async def main():
        kvhygiene.install_asyncio()
        task = asyncio.create_task(job())
        await asyncio.sleep(0)
        # inspect (and anyio, on a task group's cancellation) asks the task's coroutine its
        # state.
        state = inspect.getcoroutinestate(task.get_coro())
        await task
        with pytest.raises(TypeError):
            asyncio.get_running_loop().create_task(asyncio.sleep)  # the function, not called
        return state

    assert asyncio.run(main()) in ("CORO_SUSPENDED", "CORO_CLOSED")
