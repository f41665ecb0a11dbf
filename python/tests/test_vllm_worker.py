"""kvhygiene.vllm_worker and kvhygiene.vllm.layouts_of_runner against stand-ins of vLLM v1's GPU
worker and model runner (the attribute names they read: vLLM 0.33's per-layer caches with
blocks at dimension 0, over one backing allocation), with the cache in kvhygiene memory on the
host backend."""

import ctypes
import importlib
import sys
import types
from types import SimpleNamespace as NS

import pytest
from fakes import FakeTensor

import kvhygiene
from kvhygiene.vllm import layouts_of_runner

BLOCKS = 8
TOKENS = 4  # per block
HEADS = 2
HEAD_BYTES = 16  # head_size 8, fp16
PAGE = TOKENS * HEADS * HEAD_BYTES  # one layer's bytes of one block


def _layer(ptr, block_stride=PAGE, blocks=BLOCKS, heads_outside=False, region_stride=None):
    """A layer's cache as vLLM views it, ``[B, H, N, C]`` (C of 8 fp16 elements) at ``ptr``:
    blocks ``block_stride`` bytes apart; with ``heads_outside``, each head's blocks in a run of
    their own ``region_stride`` bytes long (vLLM's LHBNC)."""
    shape = (blocks, HEADS, TOKENS, 8)
    if heads_outside:
        stride = (block_stride // 2, region_stride // 2, 8, 1)
    else:
        stride = (block_stride // 2, TOKENS * 8, 8, 1)
    return FakeTensor(ptr, shape, stride=stride, element_size=2, device_index=0)


def _runner(layers, groups=None, block_size=16, runner_only=(), attn_groups=None, num_blocks=BLOCKS):
    """A GPU model runner stand-in: ``layers`` maps layer names to their caches; ``groups`` is
    the KV cache groups' layer names (one group of every layer by default)."""
    if groups is None:
        groups = [list(layers)]
    return NS(
        kv_cache_config=NS(
            num_blocks=num_blocks,
            kv_cache_groups=[NS(layer_names=names, kv_cache_spec=NS(block_size=block_size)) for names in groups],
        ),
        compilation_config=NS(static_forward_context={n: NS(kv_cache=kv) for n, kv in layers.items()}),
        runner_only_attn_layers=set(runner_only),
        attn_groups=attn_groups if attn_groups is not None else [[NS(layer_names=names, kernel_block_stride=0)] for names in groups],
    )


@pytest.fixture
def memory():
    """``kvh_malloc``'s allocator of test memory: every allocation freed after the test."""
    lib = kvhygiene.load()
    held = []

    def alloc(size):
        p = lib.kvh_malloc(size, 0, None)
        assert p, "kvh_malloc failed"
        held.append((p, size))
        return p

    yield alloc
    for p, size in held:
        lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()


def test_layer_compact_caches_of_two_layers_are_one_layout_of_a_region_each():
    a, b = 0x100000, 0x200000
    layouts, sizes = layouts_of_runner(_runner({"l0": _layer(a), "l1": _layer(b)}))
    (layout,) = layouts
    assert (layout.regions, layout.block_bytes, layout.block_stride, layout.blocks_per_region) == ((a, b), PAGE, PAGE, BLOCKS)
    assert sizes == [16]


def test_heads_laid_outside_the_blocks_are_a_region_each():
    # vLLM's LHBNC layout: each head's blocks lie together, so a block is one page per head.
    base, run = 0x100000, BLOCKS * PAGE // HEADS
    kv = _layer(base, block_stride=PAGE // HEADS, heads_outside=True, region_stride=run)
    (layout,), _ = layouts_of_runner(_runner({"l0": kv}))
    assert (layout.regions, layout.block_bytes, layout.block_stride) == ((base, base + run), PAGE // HEADS, PAGE // HEADS)


def test_block_outermost_caches_give_each_layer_a_region_one_block_stride_of_all_layers():
    # vLLM's BLHNC layout: block b holds every layer's page; a layer's view starts at its page.
    base, layers = 0x100000, 3
    caches = {f"l{i}": _layer(base + i * PAGE, block_stride=layers * PAGE) for i in range(layers)}
    (layout,), _ = layouts_of_runner(_runner(caches))
    assert layout.regions == tuple(base + i * PAGE for i in range(layers))
    assert (layout.block_bytes, layout.block_stride) == (PAGE, layers * PAGE)


def test_kv_cache_groups_laid_over_one_backing_tensor_share_one_layout_and_their_block_sizes():
    # Two groups (full and sliding-window attention) whose layers alias one backing tensor, as
    # vLLM's hybrid allocator lays them: block i of both groups is the same memory.
    base = 0x100000
    caches = {"full.0": _layer(base), "swa.0": _layer(base)}
    runner = _runner(caches, groups=[["full.0"], ["swa.0"]])
    runner.kv_cache_config.kv_cache_groups[1].kv_cache_spec.block_size = 32
    layouts, sizes = layouts_of_runner(runner)
    assert len(layouts) == 2 and layouts[0] is layouts[1]
    assert layouts[0].regions == (base,)
    assert sizes == [16, 32]


def test_a_cache_counted_in_kernel_blocks_is_laid_out_in_the_managers_blocks():
    kv = _layer(0x100000, blocks=2 * BLOCKS)
    (layout,), _ = layouts_of_runner(_runner({"l0": kv}))
    assert (layout.blocks_per_region, layout.block_bytes, layout.block_stride) == (BLOCKS, 2 * PAGE, 2 * PAGE)


def test_a_packed_cache_is_mapped_back_to_the_managers_blocks_by_its_attention_group():
    manager = _layer(0x100000)
    seen = []

    def to_manager_blocks(kv, num_blocks):
        seen.append(num_blocks)
        return manager

    group = NS(layer_names=["l0"], kernel_block_stride=3, map_kv_cache_to_manager_blocks=to_manager_blocks)
    (layout,), _ = layouts_of_runner(_runner({"l0": _layer(0x900000, blocks=3 * BLOCKS)}, attn_groups=[[group]]))
    assert seen == [BLOCKS] and layout.regions == (0x100000,)


def test_the_runners_own_encoder_only_group_is_no_group_of_the_schedulers():
    runner = _runner({"dec": _layer(0x100000), "enc": _layer(0x200000)}, groups=[["dec"], ["enc"]], runner_only={"enc"})
    layouts, sizes = layouts_of_runner(runner)
    assert len(layouts) == 1 and layouts[0].regions == (0x100000,) and sizes == [16]


@pytest.mark.parametrize(
    "cache, match",
    [
        ([object(), object()], "layer l0 of KV cache group 0 keeps its cache as list"),
        (None, "layer l0 of KV cache group 0 keeps its cache as NoneType"),
        # H outside the tokens but inside the block, with another layer's page between
        # (vLLM's BHLNC): a block of this layer is no dense run.
        (FakeTensor(0x100000, (BLOCKS, HEADS, TOKENS, 8), stride=(2 * PAGE, 2 * TOKENS * 8, 8, 1), device_index=0), "layer l0: .*dense"),
        (FakeTensor(0x100000, (BLOCKS + 1, HEADS, TOKENS, 8), device_index=0), "layer l0: its cache of shape"),
    ],
)
def test_a_cache_the_gate_cannot_lay_out_is_refused_naming_the_layer(cache, match):
    with pytest.raises(ValueError, match=match):
        layouts_of_runner(_runner({"l0": cache}))


def test_a_two_block_cache_whose_first_dimension_may_be_k_and_v_is_refused():
    """``[2, N, ...]`` with N = 2 reads as blocks-first as well: taken so, "block 1" would be
    the V halves of both blocks, and a claim of it would zero another request's V."""
    kv_first = FakeTensor(0x100000, (2, 2, TOKENS, HEADS, 8), element_size=2, device_index=0)
    with pytest.raises(ValueError, match="layer l0: .*ambiguous"):
        layouts_of_runner(_runner({"l0": kv_first}, num_blocks=2))
    # One block: the whole tensor is its bytes, whichever dimension is which.
    (layout,), _ = layouts_of_runner(_runner({"l0": kv_first}, num_blocks=1))
    assert [(r, layout.block_bytes) for r in layout.regions] == [(0x100000, 2 * 2 * PAGE)]


def test_a_two_block_cache_of_kernel_blocks_whose_first_dimension_may_be_k_and_v_is_refused():
    """``[2, 2r, ...]``: K and V first, each block split into r kernel blocks, with no other
    dimension of 2. Taken as blocks-first, "block 1" would be the whole V half."""
    kv_first = FakeTensor(0x100000, (2, 8, 16, 8, 128), element_size=2, device_index=0)
    with pytest.raises(ValueError, match="layer l0: .*ambiguous"):
        layouts_of_runner(_runner({"l0": kv_first}, num_blocks=2))
    # An odd second dimension cannot be K and V first with 2 blocks: blocks-first, read so.
    blocks_first = FakeTensor(0x100000, (2, 3, 16, 8, 128), element_size=2, device_index=0)
    (layout,), _ = layouts_of_runner(_runner({"l0": blocks_first}, num_blocks=2))
    assert layout.block_bytes == 3 * 16 * 8 * 128 * 2


def test_a_runner_without_kv_blocks_is_refused_naming_the_count():
    runner = _runner({"l0": _layer(0x100000)}, num_blocks=0)
    with pytest.raises(ValueError, match="num_blocks is 0"):
        layouts_of_runner(runner)


def test_layers_of_two_block_geometries_are_refused():
    small = FakeTensor(0x300000, (BLOCKS, 1, TOKENS, 8), device_index=0)
    with pytest.raises(ValueError, match="2 block geometries"):
        layouts_of_runner(_runner({"l0": _layer(0x100000), "l1": small}))


@pytest.fixture
def vllm_worker(monkeypatch):
    """kvhygiene.vllm_worker imported over a stand-in of vLLM's GPU worker, whose
    initialize_from_config sets up the runner the test gives and whose execute_model records
    what each step found in the cache."""

    class StandInWorker:
        runner = None

        def __init__(self):
            self.model_config = NS(model="org/model")
            self.steps = []
            self.look = lambda: None

        def initialize_from_config(self, kv_cache_config):
            self.model_runner = self.runner

        def execute_model(self, scheduler_output):
            self.steps.append((scheduler_output, self.look()))
            return "output"

    names = ["vllm", "vllm.v1", "vllm.v1.worker", "vllm.v1.worker.gpu_worker"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["vllm.v1.worker.gpu_worker"].Worker = StandInWorker
    monkeypatch.delitem(sys.modules, "kvhygiene.vllm_worker", raising=False)
    module = importlib.import_module("kvhygiene.vllm_worker")
    yield module
    sys.modules.pop("kvhygiene.vllm_worker", None)


def _step(new=(), cached=()):
    return NS(
        scheduled_new_reqs=[NS(req_id=r, block_ids=(ids,), num_computed_tokens=0) for r, ids in new],
        scheduled_cached_reqs=NS(
            req_ids=[r for r, _ in cached], resumed_req_ids=set(), new_block_ids=[(ids,) for _, ids in cached], num_computed_tokens=[16 for _ in cached]
        ),
    )


def _worker(module, memory, layers=2):
    base = memory(layers * BLOCKS * PAGE)
    caches = {f"l{i}": _layer(base + i * BLOCKS * PAGE) for i in range(layers)}
    worker = module.Worker()
    worker.runner = _runner(caches)
    return worker, base, layers


def _block(base, layers, i):
    return b"".join(ctypes.string_at(base + l * BLOCKS * PAGE + i * PAGE, PAGE) for l in range(layers))


def _write(base, layers, i, byte):
    for l in range(layers):
        ctypes.memset(base + l * BLOCKS * PAGE + i * PAGE, byte, PAGE)


def test_the_worker_scrubs_the_whole_cache_once_the_kv_cache_is_set_up(vllm_worker, memory, caplog):
    worker, base, layers = _worker(vllm_worker, memory)
    for i in range(BLOCKS):
        _write(base, layers, i, 0x5A)
    with caplog.at_level("INFO", logger="kvhygiene.vllm_worker"):
        worker.initialize_from_config(NS())
    assert f"KV cache gated: {BLOCKS} blocks of {PAGE} bytes in {layers} regions" in caplog.text
    assert all(_block(base, layers, i) == bytes(layers * PAGE) for i in range(BLOCKS)), "a block kept bytes from before the start"


def test_the_worker_scrubs_a_block_another_request_wrote_before_the_step_runs(vllm_worker, memory):
    worker, base, layers = _worker(vllm_worker, memory)
    worker.initialize_from_config(NS())
    worker.look = lambda: _block(base, layers, 3)
    assert worker.execute_model(_step(new=[("a", [3])])) == "output"
    _write(base, layers, 3, 0xA1)  # a's keys and values, in every layer
    # a finishes; vLLM's scheduler gives block 3 to b without a scrub.
    worker.execute_model(_step(new=[("b", [3])]))
    assert worker.steps[-1][1] == bytes(layers * PAGE), "b's forward pass ran on a's KV bytes"


def test_a_running_requests_own_blocks_are_left_as_they_are(vllm_worker, memory):
    worker, base, layers = _worker(vllm_worker, memory)
    worker.initialize_from_config(NS())
    worker.execute_model(_step(new=[("a", [2])]))
    _write(base, layers, 2, 0xA1)
    worker.look = lambda: _block(base, layers, 2)
    worker.execute_model(_step(cached=[("a", [5])]))
    assert worker.steps[-1][1] == bytes([0xA1]) * (layers * PAGE), "a's own live block was scrubbed"


def test_a_step_that_gives_one_block_to_two_requests_does_not_run(vllm_worker, memory):
    worker, _, _ = _worker(vllm_worker, memory)
    worker.initialize_from_config(NS())
    with pytest.raises(kvhygiene.ClaimRefusedError) as refused:
        worker.execute_model(_step(new=[("a", [4]), ("b", [4])]))
    assert set(refused.value.refused_requests) == {"a", "b"}
    assert worker.steps == [], "the forward pass ran after the claim was refused"


def test_a_step_before_the_kv_cache_is_set_up_is_refused(vllm_worker, memory):
    worker, _, _ = _worker(vllm_worker, memory)
    with pytest.raises(RuntimeError, match="before the KV cache was set up"):
        worker.execute_model(_step(new=[("a", [1])]))
    assert worker.steps == []


def test_a_cache_the_worker_cannot_lay_out_stops_it_at_set_up(vllm_worker, memory):
    worker, _, _ = _worker(vllm_worker, memory)
    worker.runner.compilation_config.static_forward_context["l1"].kv_cache = [object()]
    with pytest.raises(ValueError, match="layer l1"):
        worker.initialize_from_config(NS())
    with pytest.raises(RuntimeError):
        worker.execute_model(_step(new=[("a", [1])]))


def test_a_cache_outside_kvhygiene_memory_stops_the_worker_at_set_up(vllm_worker):
    # Without kvhygiene as PyTorch's allocator the cache is not kvhygiene's: the first scrub
    # is refused at set-up, not at the first request.
    worker = vllm_worker.Worker()
    worker.runner = _runner({"l0": _layer(0x1000)})
    with pytest.raises(kvhygiene.KvhError):
        worker.initialize_from_config(NS())


def test_claims_name_the_workers_tenant_hook_and_model(vllm_worker, memory, monkeypatch):
    seen = []
    import kvhygiene.vllm as adapter

    def spy(scheduler_output, layouts, block_sizes, tenant_of=None, **kw):
        seen.append((tenant_of("req-9"), adapter._innermost()[2]))

    monkeypatch.setattr(vllm_worker, "claim_scheduled", spy)

    class Tenanted(vllm_worker.Worker):
        def tenant_of_request(self, req_id):
            return "acme:" + req_id

    worker = Tenanted()
    worker.runner = _worker(vllm_worker, memory)[0].runner
    worker.initialize_from_config(NS())
    worker.execute_model(_step(new=[("req-9", [1])]))
    assert seen == [("acme:req-9", b"org/model")]


#: What each script run by _run_script starts with: the package and the tests importable, vLLM's
#: worker module a stand-in whose class StandIn the script completes and installs.
_SCRIPT_PRELUDE = r"""
import ctypes, sys, types
from types import SimpleNamespace as NS
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
for name in ["vllm", "vllm.v1", "vllm.v1.worker", "vllm.v1.worker.gpu_worker"]:
    sys.modules[name] = types.ModuleType(name)

class StandIn:
    def initialize_from_config(self, kv_cache_config):
        self.model_runner = self.runner
"""

_ENFORCE_SCRIPT = _SCRIPT_PRELUDE + r"""
    def execute_model(self, scheduler_output):
        return "ran"

sys.modules["vllm.v1.worker.gpu_worker"].Worker = StandIn
import kvhygiene
from kvhygiene.vllm_worker import Worker
from test_vllm_worker import BLOCKS, PAGE, _layer, _runner, _step

lib = kvhygiene.load()
p = lib.kvh_malloc(BLOCKS * PAGE, 0, None)
worker = Worker()
worker.model_config = NS(model="m")
worker.runner = _runner({"l0": _layer(p)})
worker.initialize_from_config(NS())
print(worker.execute_model(_step(new=[("a", [1, 2])])))
"""


def _run_script(tmp_path, text: str, **env_vars):
    """Runs ``text`` in a new interpreter on the host backend (the library reads its policy at
    start-up), with this package and this directory importable and ``env_vars`` set."""
    import os
    import subprocess
    from pathlib import Path

    script = tmp_path / "script.py"
    script.write_text(text)
    pkg = str(Path(kvhygiene.__file__).resolve().parent.parent)
    env = dict(os.environ, KVH_BACKEND="host", **env_vars)
    env.pop("KVH_LOG_DIR", None)
    here = str(Path(__file__).resolve().parent)
    return subprocess.run([sys.executable, str(script), pkg, here], env=env, capture_output=True, text=True)


def test_under_the_enforcing_gate_the_first_requests_get_the_blocks_scrubbed_at_set_up(tmp_path):
    # KVH_KV_GATE=enforce refuses blocks of unknown state: the scrub at set-up makes every
    # block known clean, so the first step's claims go through.
    run = _run_script(tmp_path, _ENFORCE_SCRIPT, KVH_KV_GATE="enforce")
    assert (run.returncode, run.stdout.strip()) == (0, "ran"), run.stderr


# --- Review of the worker against vLLM 0.33's scheduler and model runners ---------------------


@pytest.mark.parametrize("dcp, pcp", [(2, 1), (1, 2)])
def test_under_context_parallelism_a_fresh_block_after_a_prefix_hit_is_scrubbed(vllm_worker, memory, dcp, pcp):
    # vLLM 0.33, v1/core/single_type_kv_cache_manager.py, SingleTypeKVCacheManager.__init__:
    # the spec's block size times dcp_world_size * pcp_world_size for a sharded spec
    # (AttentionSpec.dcp_sharded defaults to True): one scheduler block holds
    # block_size * decode_context_parallel_size * prefill_context_parallel_size tokens,
    # interleaved over the ranks, while the worker's kv_cache_config keeps the per-rank
    # spec.block_size. NewRequestData's num_computed_tokens counts tokens of the whole
    # sequence. With either size 2 and spec block size 16, 32 computed tokens fill one
    # scheduler block: block_ids [1, 3] are hit 1 and fresh 3.
    worker, base, layers = _worker(vllm_worker, memory)
    worker.runner.dcp_world_size = dcp  # V1 GPUModelRunner.__init__
    worker.runner.dcp_size = dcp  # V2 GPUModelRunner.__init__
    worker.runner.parallel_config = NS(decode_context_parallel_size=dcp, prefill_context_parallel_size=pcp)
    worker.runner.vllm_config = NS(parallel_config=worker.runner.parallel_config)
    worker.parallel_config = worker.runner.parallel_config
    worker.runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.dcp_sharded = True
    worker.initialize_from_config(NS())
    assert worker._kvh_block_sizes == [32]
    worker.execute_model(_step(new=[("a", [3])]))
    _write(base, layers, 3, 0xA1)  # a's keys and values; a finishes
    step = _step()
    step.scheduled_new_reqs = [NS(req_id="b", block_ids=([1, 3],), num_computed_tokens=32)]
    worker.look = lambda: _block(base, layers, 3)
    worker.execute_model(step)
    assert worker.steps[-1][1] == bytes(layers * PAGE), "b's fresh block 3 kept a's KV bytes (taken for a prefix hit)"


def test_a_kv_cache_group_with_no_layer_on_this_pipeline_stage_keeps_its_place(vllm_worker, memory):
    # vLLM 0.33, v1/core/kv_cache_planning.py, _project_kv_cache_groups_to_worker: under
    # pipeline parallelism each worker's kv_cache_config keeps every global KV cache group, in
    # the global order, with only the layers on its stage; a group whose layers all sit on other
    # stages stays, with layer_names [] (e.g. a sliding-window group of a hybrid model under
    # PP). The scheduler's block_ids still carry one list per group.
    worker, base, layers = _worker(vllm_worker, memory)
    worker.runner.kv_cache_config.kv_cache_groups.append(NS(layer_names=[], kv_cache_spec=NS(block_size=16)))
    worker.runner.attn_groups.append([])
    worker.initialize_from_config(NS())
    assert len(worker._kvh_layouts) == 2 and len(worker._kvh_block_sizes) == 2
    step = _step()
    step.scheduled_new_reqs = [NS(req_id="a", block_ids=([3], [5]), num_computed_tokens=0)]
    assert worker.execute_model(step) == "output"


@pytest.mark.parametrize(
    "groups, runner_only",
    [
        # V1 GPUModelRunner.may_add_encoder_only_layers_to_kv_cache_config: an encoder-only
        # model (an embedding model) gets one group of runner-only layers, with no cache.
        ([NS(layer_names=["enc.0"], kv_cache_spec=NS(block_size=16))], {"enc.0"}),
        # v1/core/kv_cache_planning.py: an attention-free (or, in the V2 runner, encoder-only)
        # model has no group; KVCacheConfig(num_blocks=1, kv_cache_tensors=[], ...).
        ([], set()),
    ],
)
def test_a_model_with_no_kv_cache_serves(vllm_worker, groups, runner_only):
    worker = vllm_worker.Worker()
    worker.runner = NS(
        kv_cache_config=NS(num_blocks=1, kv_cache_groups=groups),
        compilation_config=NS(static_forward_context={n: NS(kv_cache=FakeTensor(0x1000, (0,), device_index=0)) for n in runner_only}),
        runner_only_attn_layers=runner_only,
        attn_groups=[[NS(layer_names=g.layer_names, kernel_block_stride=0)] for g in groups],
    )
    worker.initialize_from_config(NS())
    step = _step()
    # The scheduler's block_ids for a model without KV cache groups: an empty tuple.
    step.scheduled_new_reqs = [NS(req_id="a", block_ids=(), num_computed_tokens=0)]
    assert worker.execute_model(step) == "output"


_COW_SCRIPT = _SCRIPT_PRELUDE + r"""
    def execute_model(self, scheduler_output):
        # GPUModelRunner._update_states (V1) / execute_model (V2): the step's
        # kv_cache_block_copies run before the forward pass (copy_kv_cache_blocks_inplace).
        for src, dst in scheduler_output.kv_cache_block_copies or ():
            ctypes.memmove(p + dst * PAGE, p + src * PAGE, PAGE)
        return "ran"

sys.modules["vllm.v1.worker.gpu_worker"].Worker = StandIn
import kvhygiene
from kvhygiene.vllm_worker import Worker
from test_vllm_worker import BLOCKS, PAGE, _layer, _runner

def step(req_id, ids, computed=0, copies=None):
    return NS(
        scheduled_new_reqs=[NS(req_id=req_id, block_ids=(ids,), num_computed_tokens=computed)],
        scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
        kv_cache_block_copies=copies,
    )

class Tenanted(Worker):
    def tenant_of_request(self, req_id):
        return req_id.split(":")[0]

lib = kvhygiene.load()
p = lib.kvh_malloc(BLOCKS * PAGE, 0, None)
worker = Tenanted()
worker.model_config = NS(model="m")
worker.runner = _runner({"l0": _layer(p)}, block_size=16)
worker.initialize_from_config(NS())
worker.execute_model(step("t1:a", [3]))  # block 3 is tenant t1's; a finishes
ctypes.memset(p + 2 * PAGE, 0x22, PAGE)  # block 2: a cached prefix block
# A partial prefix hit: 20 tokens computed, the tail (block 1 of the request) redirected to a
# fresh copy-on-write block 3, copied from block 2 before the forward pass.
worker.execute_model(step("t2:r", [1, 3], computed=20, copies=[(2, 3)]))
ctypes.memset(p + 3 * PAGE, 0xB2, PAGE)  # r's own keys and values after the hit; r finishes
worker.execute_model(step("t1:q", [3]))
print("T2 BYTES" if ctypes.string_at(p + 3 * PAGE, PAGE) != bytes(PAGE) else "SCRUBBED")
"""


def test_a_copy_on_write_block_of_a_partial_prefix_hit_changes_owner_through_the_gate(tmp_path):
    # vLLM 0.33 hits the prefix cache below a block (hash_block_size, cache_hit_alignment_tokens):
    # v1/core/single_type_kv_cache_manager.py, allocate_new_blocks / _apply_cow replaces the
    # partially hit block in place with a fresh block from the pool (block_pool.get_new_blocks)
    # and the scheduler sends SchedulerOutput.kv_cache_block_copies (src, dst) that the model
    # runner applies before the forward pass; the request then writes its own tokens into it.
    # The block is among the first ceil(num_computed_tokens / block_size), yet it is not shared:
    # it changes owner here. Under KVH_KV_GATE_SCOPE=tenant, tenant t1's next request must not be
    # handed it with tenant t2's bytes.
    run = _run_script(tmp_path, _COW_SCRIPT, KVH_KV_GATE_SCOPE="tenant")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "SCRUBBED", "tenant t1's request was handed block 3 holding tenant t2's KV bytes"


@pytest.mark.parametrize("owner, attribute, nested", [("drafter", "draft_attn_groups", False), ("speculator", "attn_groups", True)])
def test_a_draft_models_packed_cache_is_mapped_back_by_its_own_attention_group(owner, attribute, nested):
    # A draft model's layers are in the scheduler's KV cache groups, but their attention groups
    # are the drafter's (vLLM 0.33's V1 runner: drafter.draft_attn_groups, a list) or the
    # speculator's (its V2 runner: speculator.attn_groups, a list per KV cache group).
    manager = _layer(0x100000)
    draft = NS(layer_names=["draft.0"], kernel_block_stride=3, map_kv_cache_to_manager_blocks=lambda kv, n: manager)
    runner = _runner({"draft.0": _layer(0x900000, blocks=3 * BLOCKS)})
    runner.attn_groups = [[]]
    setattr(runner, owner, NS(**{attribute: [[draft]] if nested else [draft]}))
    (layout,), _ = layouts_of_runner(runner)
    assert layout.regions == (0x100000,)


def test_under_decode_context_parallel_a_spec_without_dcp_sharded_counts_the_schedulers_block():
    # vLLM 0.33, v1/kv_cache_interface.py: AttentionSpec.dcp_sharded defaults to True (only the
    # base KVCacheSpec's is False), and v1/worker/gpu/block_table.py BlockTables.__init__ takes
    # a missing dcp_sharded as ``[True] * num_kv_cache_groups``. Releases before the field
    # existed scaled every group (single_type_kv_cache_manager.py SingleTypeKVCacheManager.
    # __init__: ``if dcp_world_size > 1: self.block_size *= dcp_world_size``). An attention
    # group's spec that does not carry the field is sharded: the scheduler's block is
    # block_size * decode_context_parallel_size tokens. Counted at 16 instead of 32, 32
    # computed tokens take both of [1, 3] for prefix hits and the fresh block 3 goes unclaimed.
    runner = _runner({"l0": _layer(0x100000)}, block_size=16)
    runner.parallel_config = NS(decode_context_parallel_size=2)
    assert not hasattr(runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec, "dcp_sharded")
    _, sizes = layouts_of_runner(runner)
    assert sizes == [32], f"scheduler block sizes {sizes}: a DCP-sharded attention group counted per rank"


def test_the_library_reports_the_gates_scope_the_connector_check_reads(memory):
    memory(64)  # started
    assert kvhygiene.stats()["kv_gate"]["scope"] in ("request", "tenant")


@pytest.mark.parametrize(
    "transfer, scope, refused",
    [
        (None, "tenant", False),  # no connector
        (NS(kv_connector="LMCacheConnectorV1", kv_role="kv_both"), "tenant", True),
        (NS(kv_connector="NixlConnector", kv_role="kv_consumer"), "tenant", True),
        (NS(kv_connector="Custom"), "tenant", True),  # no role: may load
        # A producer may still load: NixlConnector loads what a request's kv_transfer_params
        # name whatever its role.
        (NS(kv_connector="NixlConnector", kv_role="kv_producer"), "tenant", True),
        (NS(kv_connector="NixlConnector", kv_role="kv_producer"), "request", False),
        (NS(kv_connector="LMCacheConnectorV1", kv_role="kv_both"), "request", False),
        (NS(kv_connector="LMCacheConnectorV1", kv_role="kv_both"), None, True),  # scope unknown
    ],
)
def test_a_kv_connector_that_loads_is_refused_beside_the_tenant_scope(vllm_worker, memory, monkeypatch, transfer, scope, refused):
    # A connector writes the blocks it loads without a claim, so the ledger keeps naming their
    # previous owner: under the tenant scope that tenant would get such a block back
    # unscrubbed, holding what another tenant's request loaded. The worker stops at set-up.
    import kvhygiene.vllm as vllm

    real = kvhygiene.stats

    def stats_with_scope():
        s = dict(real())
        s["kv_gate"] = None if scope is None else {"mode": "scrub", "scope": scope}
        return s

    monkeypatch.setattr(vllm, "stats", stats_with_scope)
    worker, _, _ = _worker(vllm_worker, memory)
    worker.vllm_config = NS(kv_transfer_config=transfer)
    if refused:
        with pytest.raises(RuntimeError, match="KVH_KV_GATE_SCOPE=request"):
            worker.initialize_from_config(NS())
    else:
        worker.initialize_from_config(NS())
