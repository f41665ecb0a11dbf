"""The eviction gate in a vLLM (v1) GPU worker: claim, at every step, the KV blocks the
scheduler newly gave each request.

vLLM's scheduler runs apart from the GPU workers and frees blocks on many paths (finish,
abort, preemption, prefix-cache eviction) that the workers never see. What every worker does
see is the block ids each scheduled request holds, in the step's ``SchedulerOutput``; blocks
that are new to a request are where one request's memory becomes another's. Claiming them
there, inside the worker that owns the KV cache tensors, puts the gate on the one path every
reuse takes::

    from kvhygiene.vllm import claim_scheduled

    # kvhygiene.vllm_worker.Worker (vllm serve --worker-cls kvhygiene.vllm_worker.Worker) does
    # this: its layouts are layouts_of_runner(model_runner). By hand:
    layouts = [kvhygiene.KvLayout.from_tensors(group_caches, block_dim=1) for group_caches in ...]
    # in the model runner, before the step's forward pass:
    claim_scheduled(scheduler_output, layouts, block_sizes=[16])

The layouts must count the blocks the scheduler hands out. Where vLLM shapes a group's cache
tensors in the attention kernel's block size, smaller than the KV cache manager's (its model
runner then makes ``num_blocks * (block_size // kernel_block_size)`` blocks of them), say how
many make one: ``from_tensors(group_caches, block_dim=1, blocks_per_block=block_size //
kernel_block_size)``. A layout in kernel blocks would take scheduler block ``i`` for kernel
block ``i``, a part of another block, and scrub another request's live memory instead.

KV cache groups whose layers share cache tensors (vLLM's hybrid allocator lays one set of
tensors under every group, from one block pool) are best given one layout, over all the
tensors they share: a block id is then one block of one ledger in the library. Layouts that
name only some of the shared tensors each work, and a block given to two requests through
two of them is still refused, but the library keeps one ledger per layout and a claim through
one drops the other's, so every claim then scrubs its blocks again.

Which blocks are new, read from ``SchedulerOutput`` as vLLM v1 defines it (``scheduled_new_reqs``
of ``NewRequestData`` with ``req_id``, ``block_ids`` (one list per KV cache group) and
``num_computed_tokens``; ``scheduled_cached_reqs``, a ``CachedRequestData`` with ``req_ids``,
``resumed_req_ids`` (or, in earlier v1 releases, one ``resumed_from_preemption`` flag per
request), ``new_block_ids`` and ``num_computed_tokens``):

- a new (or resumed) request's blocks after its computed tokens: the first
  ``ceil(num_computed_tokens / block_size)`` blocks hold a cached prefix the request shares
  on purpose or tokens a KV connector loaded (whose
  count need not fill the last block: an asynchronous connector's load of a 20-token prompt
  in blocks of 16 leaves 19 computed), and must not be scrubbed; but a copy-on-write block
  among them is new (a prefix hit that ends inside a block is redirected to a fresh block
  from the pool, into which the step copies the hit, ``kv_cache_block_copies``: claimed
  first, its scrub runs before the copy);
- a running request's ``new_block_ids``, appended blocks, all new;
- never vLLM's null block (block 0), a placeholder ``BlockPool`` keeps for itself, which
  stands in a request's block ids for blocks it skips (a Mamba group in prefix caching's
  "align" mode pads a request's new blocks with it): it counts for its place among the
  computed tokens' blocks and is left out of the new ones.

Only attribute names are used (no vLLM import): the module is tested against stand-ins with
those names, not against vLLM itself. With a KV connector, ``num_computed_tokens`` also counts
the tokens loaded from outside, so the blocks the connector fills, its last one included, are
taken for prefix hits and not claimed: the gate does not cover them, and their ledger still
names their previous owner. Under ``KVH_KV_GATE_SCOPE=tenant`` that owner's tenant would
later take such a block back unscrubbed, with the bytes another tenant's request loaded into
it, so :func:`check_kv_connector` (which the worker calls) refuses a connector that loads
beside the tenant scope. A request that is given blocks that cannot be
verified clean must not run: the claim's error propagates.
"""

from __future__ import annotations

import collections
import hashlib
import operator
import os
import threading
import unicodedata
from typing import Callable, Optional, Sequence

from . import (
    KVH_ERR_KV_TAKEN,
    KVH_ERR_VERIFY_FAILED,
    ClaimRefusedError,
    KvhError,
    KvLayout,
    ScrubVerificationError,
    _block_id,
    _innermost,
    _integer,
    _layouts_by_geometry,
    _names_an_address,
    _text_is_an_address,
    claim_blocks,
    context,
    refuse_blocks,
    scrub_blocks,
    stats,
)

__all__ = [
    "new_blocks",
    "claim_scheduled",
    "check_kv_connector",
    "context_id",
    "layouts_of_runner",
    "VLLM_NULL_BLOCK_ID",
]

#: Longest id, in bytes of UTF-8, the library accepts in a context.
_MAX_ID_BYTES = 128

#: What :func:`context_id` puts before a digest; no id it keeps starts with it.
_DIGEST_PREFIX = "sha256:"


#: Unicode 15.1's format characters (Cf), line and paragraph separators (Zl, Zp) and other
#: default-ignorable code points (rendered as nothing), as inclusive ranges: with the control characters (Cc), what the library refuses in an id
#: (src/context.rs holds the same table). Written out, not read from :mod:`unicodedata`,
#: whose Unicode version follows the interpreter's and may lack some of them.
_INVISIBLE = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)


def install_plugin() -> None:
    """vLLM's general plugin (entry point ``kvhygiene`` of ``vllm.general_plugins``, declared
    by this package): :func:`kvhygiene.install` in every vLLM process.

    vLLM runs its general plugins in each process it starts, a GPU worker included, before the
    worker sets up its device, so every worker (spawned, forked, on Ray) makes kvhygiene its
    allocator before its first CUDA allocation, with no code of the user's in vLLM. A process
    that never allocates on CUDA (the API server) starts nothing. A failure raises, and vLLM
    lets it stop the process: a worker does not serve on PyTorch's allocator because kvhygiene
    could not be installed. The entry point exists once the package is pip-installed (a
    ``PYTHONPATH`` entry declares no plugin). vLLM loads every installed plugin unless ``VLLM_PLUGINS`` lists
    the ones to load: leave ``kvhygiene`` out of it to turn this off. The KV cache's gate
    (:func:`claim_scheduled`) takes kvhygiene's worker as well: ``--worker-cls
    kvhygiene.vllm_worker.Worker``.
    """
    from . import install

    install()


def _unprintable(c: str) -> bool:
    """Whether the library refuses ``c`` in an id: a control or invisible format character."""
    if unicodedata.category(c) == "Cc":
        return True
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _INVISIBLE)


def context_id(req_id) -> str:
    """The request id under which :func:`claim_scheduled` claims a request's blocks: vLLM's
    own, or, for one the library would refuse (over 128 bytes of UTF-8, holding a control
    or invisible format character, or text that reads as an object's address, ``<... at
    0x...>``, which :func:`kvhygiene.context` refuses: clients choose request ids) or one that
    starts with ``sha256:``, that prefix and the hex SHA-256 of its UTF-8.
    The same request gets the same id at every step, and two requests never share one, so
    the gate tells them apart as it does other ids; the forensic records then carry the
    digest, which an auditor recomputes from the engine's own request log. Bytes (a raw
    header) are their UTF-8 text, as in :func:`kvhygiene.context`; bytes that are not UTF-8
    are the digest of a 0xFF byte followed by them (no text's encoding holds 0xFF, so they
    never share a digest with a text, one with a lone surrogate included).

    Raises ``TypeError`` for an object that is not text and whose text is its address (an
    object with no ``__str__`` of its own, a coroutine, a method given for the id it
    returns): another object takes that address once it is gone, so the digest of that text
    would make two requests one owner."""
    if not isinstance(req_id, (str, bytes, bytearray)):
        if _text_is_an_address(req_id) or _names_an_address(str(req_id)):
            raise TypeError(
                f"id {str(req_id)[:80]!r}: a {type(req_id).__name__} whose text names its memory "
                "address is no id; give the id itself as a str"
            )
    if isinstance(req_id, (bytes, bytearray)):
        try:
            req_id = bytes(req_id).decode("utf-8")
        except UnicodeDecodeError:
            return _DIGEST_PREFIX + hashlib.sha256(b"\xff" + bytes(req_id)).hexdigest()
    # A str subclass (a str Enum) is its text, as in kvhygiene.context.
    text = str.__str__(req_id) if isinstance(req_id, str) else str(req_id)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 of its own
        raw = text.encode("utf-8", "surrogatepass")
    else:
        kept = (
            len(raw) <= _MAX_ID_BYTES
            # An id that reads like a digest is hashed too: kept, it could be another
            # request's digest, and the two requests would be one owner to the gate.
            and not text.startswith(_DIGEST_PREFIX)
            # Printable ASCII (vLLM's own ids) holds none of the characters refused, all
            # control characters or beyond ASCII: the scan of every character is skipped.
            and ((text.isascii() and text.isprintable()) or not any(_unprintable(c) for c in text))
            and not _names_an_address(text)
        )
        if kept:
            return text
    return _DIGEST_PREFIX + hashlib.sha256(raw).hexdigest()


class _Reordered:
    """A tensor's dimensions in another order, as :meth:`KvLayout.from_tensors` reads them
    (shape, strides, first element, element size, device), for a real tensor or a stand-in."""

    def __init__(self, tensor, order):
        shape, stride = tuple(tensor.shape), tuple(tensor.stride())
        self.shape = tuple(shape[d] for d in order)
        self._stride = tuple(stride[d] for d in order)
        self._tensor = tensor
        self.device = tensor.device

    def stride(self):
        return self._stride

    def element_size(self):
        return self._tensor.element_size()

    def data_ptr(self):
        return self._tensor.data_ptr()


def _manager_block_layout(name: str, kv, num_blocks: int) -> KvLayout:
    """The layout of one layer's cache ``kv``, viewed (as vLLM's per-layer caches are) with
    blocks at dimension 0, ``num_blocks`` of the KV cache manager's blocks or a whole number
    of kernel blocks for each. A dimension whose stride is larger than a block's (vLLM's H
    outside the blocks, or K and V in separate halves) is one region per index, as the
    dimensions before ``block_dim`` are to :meth:`KvLayout.from_tensors`; the others must
    cover each block densely."""
    shape, stride = tuple(kv.shape), tuple(kv.stride())
    if not shape or shape[0] == 0 or shape[0] % num_blocks:
        raise ValueError(
            f"layer {name}: its cache of shape {shape} does not count the {num_blocks} KV "
            "blocks (or a whole number of kernel blocks for each) in its first dimension"
        )
    # A cache with K and V first, ``[2, N, ...]`` (N the blocks, or kernel blocks, a multiple
    # of ``num_blocks``), fails the count above unless ``num_blocks`` divides 2. With one
    # block, that block is the whole tensor either way; with 2 blocks and an even second
    # dimension (or another dimension of 2), the shape cannot tell K-and-V-first from
    # blocks-first, and taking the wrong one would lay block 1 over both blocks' V: refused
    # rather than guessed.
    if num_blocks == 2 and shape[0] == 2 and (2 in shape[1:] or (len(shape) > 1 and shape[1] % 2 == 0)):
        raise ValueError(
            f"layer {name}: its cache of shape {shape} with 2 KV blocks is ambiguous: its "
            "first dimension may be the blocks or K and V; run with more KV cache blocks"
        )
    esize = kv.element_size()
    block = stride[0] * esize
    outer = [d for d in range(1, len(shape)) if shape[d] > 1 and stride[d] * esize > block]
    inner = [d for d in range(1, len(shape)) if d not in outer]
    view = _Reordered(kv, outer + [0] + inner)
    try:
        return KvLayout.from_tensors([view], block_dim=len(outer), blocks_per_block=shape[0] // num_blocks)
    except ValueError as e:
        raise ValueError(f"layer {name}: {e}") from None


def _attention_groups(model_runner) -> list:
    """The runner's attention groups, its draft model's included (vLLM's V1 runner keeps
    those in ``drafter.draft_attn_groups``, its V2 runner in ``speculator.attn_groups``),
    flattened from their lists per KV cache group."""
    held = [
        model_runner.attn_groups,
        getattr(getattr(model_runner, "drafter", None), "draft_attn_groups", None),
        getattr(getattr(model_runner, "speculator", None), "attn_groups", None),
    ]
    out = []

    def flatten(items):
        for item in items or ():
            if isinstance(item, (list, tuple)):
                flatten(item)
            elif item is not None:
                out.append(item)

    flatten(held)
    return out


def layouts_of_runner(model_runner) -> tuple:
    """``(layouts, block_sizes)`` for :func:`claim_scheduled`, read from a vLLM v1 GPU model
    runner whose KV cache is set up (after the worker's ``initialize_from_config``).

    vLLM's block ids index one pool: block ``i`` of every KV cache group is the same memory
    (its groups lay their layers over one backing tensor). So every group gets the same
    layout, over every layer's cache: claiming a block scrubs its bytes in all layers. Each
    layer's cache is its tensor in the compilation config's ``static_forward_context``, with
    blocks at dimension 0 (mapped back to the manager's blocks where the layer's attention
    group binds a packed cache, ``kernel_block_stride``); layers the runner keeps for itself
    (``runner_only_attn_layers``, encoder-only attention) are no group of the scheduler's.

    A KV cache group with no layer on this worker's pipeline stage gets the layout all the
    same (the scheduler hands out its blocks, the same memory); a worker with no KV cache at
    all (an attention-free or encoder-only model) gets ``([], [])``. The block sizes are the
    scheduler's: under context parallelism, a group's ``block_size`` times the decode and
    prefill context-parallel sizes.

    Refused (``ValueError``, naming the layer), rather than leaving blocks ungated: a layer
    whose cache is not one tensor (a Mamba layer's states), a cache whose blocks are not
    dense runs of memory, and layers of different block geometries (mixed-precision caches).
    Only attribute names are used (no vLLM import): tested against stand-ins with vLLM's
    names, not against vLLM itself."""
    config = model_runner.kv_cache_config
    num_blocks = _integer(config.num_blocks, "kv_cache_config.num_blocks")
    if num_blocks < 1:
        raise ValueError(f"kv_cache_config.num_blocks is {num_blocks}: no KV cache to gate")
    forward = model_runner.compilation_config.static_forward_context
    runner_only = set(getattr(model_runner, "runner_only_attn_layers", None) or ())
    attention_group = {name: group for group in _attention_groups(model_runner) for name in group.layer_names}
    # The runner appends its own groups (encoder-only layers) after the scheduler's. A group
    # with no layer on this pipeline stage keeps its place: the scheduler gives its blocks too.
    groups = [g for g in config.kv_cache_groups if not (g.layer_names and set(g.layer_names) <= runner_only)]
    parts = []
    for index, group in enumerate(groups):
        for name in group.layer_names:
            if name in runner_only:
                continue
            kv = getattr(forward.get(name), "kv_cache", None)
            if not hasattr(kv, "data_ptr"):
                raise ValueError(
                    f"layer {name} of KV cache group {index} keeps its cache as "
                    f"{type(kv).__name__}, not one tensor: kvhygiene lays out attention caches "
                    "only, and the gate would hand this layer's blocks over unscrubbed"
                )
            bound = attention_group.get(name)
            if bound is not None and getattr(bound, "kernel_block_stride", 0):
                kv = bound.map_kv_cache_to_manager_blocks(kv, num_blocks)
            parts.append(_manager_block_layout(name, kv, num_blocks))
    if not parts:
        # No KV cache in this worker (an attention-free or encoder-only model): nothing of its
        # memory goes from request to request through the scheduler's blocks.
        return [], []
    merged = _layouts_by_geometry(
        ((p.block_bytes, p.block_stride, p.blocks_per_region, p.device), p.regions) for p in parts
    )
    if len(merged) > 1:
        raise ValueError(
            f"the layers' caches have {len(merged)} block geometries ({merged}): one block id "
            "would span several layouts, which claim_scheduled does not take"
        )
    # Under context parallelism a scheduler block holds a block of tokens on each rank
    # (vLLM's KV cache manager: block_size * decode_context_parallel_size *
    # prefill_context_parallel_size), and computed tokens count the whole sequence's.
    # Attention specs are sharded unless they say not (vLLM 0.33's AttentionSpec.dcp_sharded
    # defaults to True; earlier releases lack the field and shard every group).
    parallel = getattr(model_runner, "parallel_config", None)
    if parallel is None:
        parallel = getattr(getattr(model_runner, "vllm_config", None), "parallel_config", None)
    dcp = _integer(getattr(parallel, "decode_context_parallel_size", 1) or 1, "decode_context_parallel_size")
    pcp = _integer(getattr(parallel, "prefill_context_parallel_size", 1) or 1, "prefill_context_parallel_size")
    block_sizes = [
        _block_size(g.kv_cache_spec.block_size) * (dcp * pcp if getattr(g.kv_cache_spec, "dcp_sharded", True) else 1)
        for g in groups
    ]
    return [merged[0]] * len(groups), block_sizes


def _block_size(value) -> int:
    """A block size in tokens: an integer of at least 1 (0 would divide by zero, a float
    would skip a wrong number of prefix blocks)."""
    try:
        size = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        size = None
    if size is None or size < 1:
        raise ValueError(f"block_sizes: {value!r} is not a block size in tokens (an integer >= 1)")
    return size


def _per_group(values, groups: int, name: str) -> list:
    if isinstance(values, int):
        return [values] * groups
    if isinstance(values, KvLayout):
        raise TypeError(f"{name}: one KvLayout; pass a list, one per KV cache group ([layout] for one)")
    values = list(values)
    if len(values) != groups:
        raise ValueError(f"{name}: {len(values)} values for {groups} KV cache groups")
    return values


def _resumed(cached) -> set:
    """The ids of the cached requests that resumed after a preemption: ``resumed_req_ids`` in
    current vLLM, one ``resumed_from_preemption`` flag per request in earlier v1 releases.
    Neither field: refused, since taking every request as running would claim a resumed
    request's prefix hits, which other requests share."""
    ids = getattr(cached, "resumed_req_ids", None)
    if ids is not None:
        return set(ids)
    flags = getattr(cached, "resumed_from_preemption", None)
    if flags is not None:
        return {req_id for req_id, resumed in zip(cached.req_ids, flags) if resumed}
    raise AttributeError(
        "scheduled_cached_reqs has neither resumed_req_ids nor resumed_from_preemption: "
        "this vLLM's SchedulerOutput is not one kvhygiene.vllm can read"
    )


#: The id of vLLM's null block: ``BlockPool`` takes block 0 off its free queue at start-up as a
#: placeholder no request owns, which fills the places of skipped blocks in a request's block
#: ids (a Mamba group in prefix caching's "align" mode pads a request's new blocks with it).
VLLM_NULL_BLOCK_ID = 0


def new_blocks(scheduler_output, block_sizes, null_block_id: Optional[int] = VLLM_NULL_BLOCK_ID) -> dict:
    """``{req_id: [ids per KV cache group]}`` of the blocks the step newly gives each request
    (see the module's documentation for the rule). Requests with no new block are left out.
    The placeholder ``null_block_id`` (vLLM's null block; ``None`` for an engine without one)
    is no block handed to a request: it is left out wherever it stands."""
    # An id of another type ("0") would match no block id, and the null block be claimed.
    if null_block_id is not None:
        null_block_id = _block_id(null_block_id)
    # Copy-on-write targets of partial prefix hits (vLLM's kv_cache_block_copies, of
    # (src_block_id, dst_block_id)): fresh blocks from the pool that stand among a request's
    # computed tokens' blocks, where the step copies the hit's bytes before its forward pass.
    cow = {_block_id(c[1]) for c in getattr(scheduler_output, "kv_cache_block_copies", None) or ()}
    out = {}

    def add(req_id, groups, skip_tokens):
        if groups is None:
            return
        # One size for every group: also a value that is not one (refused by name below).
        one = isinstance(block_sizes, (str, bytes)) or not hasattr(block_sizes, "__iter__")
        per_group = [block_sizes] * len(groups) if one else _per_group(block_sizes, len(groups), "block_sizes")
        sizes = [_block_size(b) for b in per_group]
        # Blocks holding computed tokens, the last one even when they do not fill it, are
        # prefix hits, but for copy-on-write targets.
        fresh = []
        for ids, size in zip(groups, sizes):
            ids, hits = list(ids), -(-skip_tokens // size)
            fresh.append([i for i in ids[:hits] if i in cow] + ids[hits:])
        # Counted in place above (the placeholder holds a block's place), left out here.
        fresh = [[i for i in ids if null_block_id is None or i != null_block_id] for ids in fresh]
        if any(fresh):
            out[req_id] = fresh

    for req in scheduler_output.scheduled_new_reqs:
        add(req.req_id, req.block_ids, req.num_computed_tokens)
    cached = scheduler_output.scheduled_cached_reqs
    resumed = _resumed(cached)
    for i, req_id in enumerate(cached.req_ids):
        # A resumed request's ids replace its old ones and start with its prefix hits again.
        skip = cached.num_computed_tokens[i] if req_id in resumed else 0
        add(req_id, cached.new_block_ids[i], skip)
    return out


#: Caches whose last claimant of each block :func:`claim_scheduled` remembers; the least
#: recently used one is forgotten beyond this (its blocks are then scrubbed as usual only when
#: the ledger sees another owner).
_MAX_REMEMBERED_CACHES = 64

_claimants_lock = threading.Lock()
#: ``{cache: {block id: {(tenant, request), ...}}}``: whom :func:`claim_scheduled` may last
#: have handed each block to (one owner, or several after a claim that ended in an error
#: part way, when which of them the library's ledger holds is not known). The ledger compares
#: ids, and clients choose request ids: a request that takes the id of one that finished is
#: the same owner to it, and would be handed the finished request's bytes unscrubbed. No
#: block a step gives a request as new holds anything that request wrote and needs (its cached
#: prefix is not claimed), so a block that may have gone to the same ids is scrubbed before
#: it is claimed again. Bounded by the caches' blocks.
_claimants: "collections.OrderedDict[tuple, dict]" = collections.OrderedDict()


def _cache_key(layout: KvLayout) -> tuple:
    return (layout.device, layout.regions, layout.block_bytes, layout.block_stride, layout.blocks_per_region)


def _claimants_of(layout: KvLayout) -> dict:
    """The remembered claimants of ``layout``'s cache (created empty)."""
    key = _cache_key(layout)
    with _claimants_lock:
        blocks = _claimants.get(key)
        if blocks is None:
            blocks = _claimants[key] = {}
            if len(_claimants) > _MAX_REMEMBERED_CACHES:
                _claimants.popitem(last=False)
        else:
            _claimants.move_to_end(key)
        return blocks


def _claimed_before(blocks: dict, ids: list, owner: tuple) -> list:
    """The ``ids`` that may last have been handed to ``owner`` (``blocks``: a cache's
    claimants)."""
    with _claimants_lock:
        return [i for i in ids if owner in blocks.get(i, ())]


def _handed_over(blocks: dict, ids, owner: tuple) -> None:
    """``ids`` were handed to ``owner``: the ledger names it alone."""
    one = frozenset((owner,))
    with _claimants_lock:
        for i in ids:
            blocks[i] = one


def _maybe_handed_over(blocks: dict, ids, owner: tuple) -> None:
    """A claim of ``ids`` for ``owner`` ended in an error: each may or may not have been
    handed over, so ``owner`` is added to whom it may belong."""
    with _claimants_lock:
        for i in ids:
            blocks[i] = blocks.get(i, frozenset()) | {owner}


def _extent(layout: KvLayout) -> int:
    """The bytes one region of ``layout`` spans, from its base to the end of its last block."""
    return (layout.blocks_per_region - 1) * layout.block_stride + layout.block_bytes


#: Pair classes (:func:`_pair_classes`) of the last sets of layouts a step was compared over:
#: a model runner passes the same layouts at every step.
_MAX_REMEMBERED_LAYOUT_SETS = 64
_pair_classes_lock = threading.Lock()


def _new_locks_in_child() -> None:
    # As kvhygiene's own lock: one another thread held at a fork would hang the child.
    global _claimants_lock, _pair_classes_lock
    _claimants_lock = threading.Lock()
    _pair_classes_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_in_child)
_pair_classes_seen: "collections.OrderedDict[tuple, list]" = collections.OrderedDict()


def _pair_classes(keys: tuple, layouts: list) -> list:
    """``[(a, b, offset), ...]``: the classes of region pairs, one region of layout ``a`` and
    one of layout ``b`` (indexes into ``layouts``, whose cache keys are ``keys``), that share
    a byte on one device, ``b``'s region starting ``offset`` bytes after ``a``'s. Every pair
    of a class maps block ids the same way (:func:`_meeting_ids`), so a step is compared once
    per class, not once per region: one class when groups share cache tensors, two when one
    group cuts a tensor into K and V halves that another cuts into whole pages. ``b`` is the
    layout of the larger stride, whose ids a block of ``a`` meets fewest of. Found with one
    sweep over the regions sorted by start, and remembered for the next step."""
    with _pair_classes_lock:
        found = _pair_classes_seen.get(keys)
        if found is not None:
            _pair_classes_seen.move_to_end(keys)
            return found
    regions = sorted(
        (layout.device, base, base + _extent(layout), k) for k, layout in enumerate(layouts) for base in layout.regions
    )
    classes: set = set()
    open_: list = []
    for device, start, end, k in regions:
        open_ = [o for o in open_ if o[0] == device and o[2] > start]
        for _, other_start, _, other in open_:
            if other == k:
                continue
            a, a_base, b, b_base = other, other_start, k, start
            if (layouts[a].block_stride, a) > (layouts[b].block_stride, b):
                a, a_base, b, b_base = b, b_base, a, a_base
            classes.add((a, b, b_base - a_base))
        open_.append((device, start, end, k))
    found = sorted(classes)
    with _pair_classes_lock:
        _pair_classes_seen[keys] = found
        if len(_pair_classes_seen) > _MAX_REMEMBERED_LAYOUT_SETS:
            _pair_classes_seen.popitem(last=False)
    return found


def _meeting_ids(i: int, a: KvLayout, b: KvLayout, offset: int) -> range:
    """The ids of ``b``'s blocks that share a byte with block ``i`` of ``a``, in a region of
    ``b`` starting ``offset`` bytes after a region of ``a``: block ``j`` spans ``[offset + j *
    stride_b, + bytes_b)`` and meets ``[i * stride_a, + bytes_a)`` when each starts before the
    other ends."""
    low = i * a.block_stride - offset - b.block_bytes  # j * stride_b must exceed it
    high = i * a.block_stride + a.block_bytes - offset  # j * stride_b must stay below it
    if b.block_stride == 0:
        # One block a region (a stride that places nothing more): block 0 alone.
        return range(0, 1) if low < 0 < high else range(0)
    first = low // b.block_stride + 1
    last = -(-high // b.block_stride) - 1
    return range(max(first, 0), min(last, b.blocks_per_region - 1) + 1)


def _shared_in_step(claimed: dict, layouts) -> dict:
    """``{req_id: [ids per group]}`` of the blocks the step gives, as new, to more than one
    request: requests that would run in the same forward pass on one block, each writing its
    keys and values into it and reading the other's. No scrub can separate them. A block is
    the memory it spans: groups that share a cache (one layout), or whose layouts share some of
    their cache tensors, or cut one tensor into blocks of other sizes, share the blocks whose
    bytes meet. Linear in the step's blocks times the classes of meeting regions
    (:func:`_pair_classes`), whatever the number of regions."""
    per_request = {req_id: _per_group(layouts, len(groups), "layouts") for req_id, groups in claimed.items()}
    # The layouts by object first (a runner passes the same ones for every request), then by
    # cache: equal layouts passed as two objects are one.
    index_of_key: dict = {}
    index_of_object: dict = {}
    distinct: list = []
    for layouts_ in per_request.values():
        for layout in layouts_:
            if id(layout) not in index_of_object:
                key = _cache_key(layout)
                if key not in index_of_key:
                    index_of_key[key] = len(distinct)
                    distinct.append(layout)
                index_of_object[id(layout)] = index_of_key[key]
    # Who was given each id of each layout: ``holders[k][id] = [(req_id, group), ...]``.
    holders: list = [{} for _ in distinct]
    for req_id, groups in claimed.items():
        for g, (layout, ids) in enumerate(zip(per_request[req_id], groups)):
            table = holders[index_of_object[id(layout)]]
            for i in ids:
                table.setdefault(i, []).append((req_id, g))
    marked: dict = {}

    def meet(a_holders, i, b_holders, j) -> None:
        for a_req, a_group in a_holders:
            for b_req, b_group in b_holders:
                if a_req != b_req:
                    marked.setdefault(a_req, set()).add((a_group, i))
                    marked.setdefault(b_req, set()).add((b_group, j))

    for table in holders:
        for i, given in table.items():
            if len(given) > 1:
                meet(given, i, given, i)
    for a, b, offset in _pair_classes(tuple(index_of_key), distinct):
        b_table = holders[b]
        if not b_table:
            continue
        for i, given in holders[a].items():
            for j in _meeting_ids(i, distinct[a], distinct[b], offset):
                other = b_table.get(j)
                if other:
                    meet(given, i, other, j)
    # Per group, in the order the step gave them, each once.
    return {
        req_id: [[i for i in dict.fromkeys(ids) if (g, i) in refused] for g, ids in enumerate(claimed[req_id])]
        for req_id, refused in marked.items()
    }


#: The reason :func:`claim_scheduled` gives the library for a block shared in one step.
_SHARED_REASON = "the step gives these blocks as new to more than one request (kvhygiene.vllm)"


def check_kv_connector(vllm_config) -> None:
    """Refuses (``RuntimeError``) a KV connector that may load blocks while the eviction gate
    keeps tenants, not requests, apart (``KVH_KV_GATE_SCOPE=tenant``).

    A connector writes the blocks it loads without a claim (they count among the request's
    computed tokens, taken for prefix hits), so the gate's ledger still names each block's
    previous owner. Under the request scope that owner is another request, and the block's
    next claim scrubs it. Under the tenant scope, when the previous owner's tenant is given
    the block again, the claim takes it as the tenant's own, unscrubbed, and that tenant reads
    what another tenant's request loaded. A connector of any role is refused unless the
    library reports the request scope (its statistics' ``kv_gate``): the role does not bind
    every connector (vLLM's NixlConnector loads the blocks a request's ``kv_transfer_params``
    name from a remote whatever its ``kv_role``, and clients give those params), so a
    ``kv_producer`` is no proof that nothing is loaded."""
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    if transfer is None:
        return
    role = getattr(transfer, "kv_role", None)
    scope = (stats().get("kv_gate") or {}).get("scope")
    if scope == "request":
        return
    connector = getattr(transfer, "kv_connector", None)
    raise RuntimeError(
        f"kvhygiene: the KV connector {connector!r} (kv_role {role!r}) loads KV blocks without a "
        f"claim, which the eviction gate's scope {scope or 'unknown'!r} cannot keep apart: a tenant "
        "given such a block again would read what another tenant's request loaded into it. Run "
        "with KVH_KV_GATE_SCOPE=request (the default), or without the connector"
    )


def claim_scheduled(
    scheduler_output,
    layouts: Sequence[KvLayout],
    block_sizes,
    tenant_of: Optional[Callable[[str], Optional[str]]] = None,
    stream=None,
    null_block_id: Optional[int] = VLLM_NULL_BLOCK_ID,
) -> dict:
    """Claims every request's new blocks (:func:`new_blocks`) through the eviction gate, in the
    request's context (``tenant_of(req_id)`` gives its tenant, for ``KVH_KV_GATE_SCOPE=tenant``
    or for the records; the model id is that of the caller's own :func:`kvhygiene.context`, if
    it entered one). Request and tenant ids both go through :func:`context_id`, so an id
    the library would refuse (a client's, or a tenant name taken from a request header) does
    not stop the step. ``layouts`` has one layout per KV cache group. Returns what was claimed,
    ``{req_id: [ids per group]}``.

    Every request's blocks are claimed, also after one was refused: a caller that drops the
    refused requests and runs the step must find the others' blocks claimed. Then
    :class:`kvhygiene.ClaimRefusedError` is raised for the first refusal, with
    ``refused_requests``, ``{req_id: [refused ids per group]}``, naming every request that
    must not run on its blocks. Another error (:class:`kvhygiene.KvhError`: the claim did not
    finish) is raised at once.

    A block the step gives as new to two requests (in one KV cache group, or in two groups
    whose layouts share its memory: one cache, or some of the same cache tensors) is claimed
    for neither: both are refused (code 7022, ``KVH_ERR_KV_TAKEN``),
    since in one forward pass each would read what the other writes (recorded through
    :func:`kvhygiene.refuse_blocks`, a ``policy_violation`` record). A block that may last
    have been handed over here under the same ids (a request that took the id of one that
    finished: clients choose request ids) is scrubbed before it is claimed; one whose scrub
    fails verification is refused (code 7009). vLLM's null block (``null_block_id``) is never
    claimed: it is no request's."""
    claimed = new_blocks(scheduler_output, block_sizes, null_block_id)
    shared = _shared_in_step(claimed, layouts)
    first: Optional[ClaimRefusedError] = None
    if shared:
        named = ", ".join(f"{r!r}: {ids}" for r, ids in shared.items())
        first = ClaimRefusedError(
            KVH_ERR_KV_TAKEN,
            f"the step gives the same new KV blocks to {len(shared)} requests ({named}); "
            "they were claimed for none of them",
            sorted({i for groups in shared.values() for ids in groups for i in ids}),
        )
    refused_requests: dict = {}
    claimants: dict = {}  # id(layout) -> its cache's claimants, looked up once per call
    # The model the worker's own context names (a worker serves one): kept in each request's.
    outer = _innermost()
    model = outer[2] if outer else None
    for req_id, groups in claimed.items():
        layouts_ = _per_group(layouts, len(groups), "layouts")
        tenant = tenant_of(req_id) if tenant_of else None
        if tenant is not None:
            # "" is no tenant, to the library as to None: one owner, one key here too (else
            # a request id reused once with "" and once with None would not be scrubbed).
            tenant = context_id(tenant) or None
        request = context_id(req_id)
        owner = (tenant, request)
        refused = [list(ids) for ids in shared.get(req_id, [[] for _ in groups])]
        # "" and not None: no tenant named is none, not the worker context's.
        with context(tenant_id=tenant if tenant is not None else "", request_id=request, model_id=model):
            for g, (layout, ids) in enumerate(zip(layouts_, groups)):
                if refused[g]:
                    # In the forensic log, as the gate's own refusals are.
                    refuse_blocks(layout, refused[g], _SHARED_REASON)
                not_shared = set(refused[g])
                ids = [i for i in ids if i not in not_shared]
                if not ids:
                    continue
                if id(layout) not in claimants:
                    claimants[id(layout)] = _claimants_of(layout)
                blocks = claimants[id(layout)]
                again = _claimed_before(blocks, ids, owner)
                if again:
                    try:
                        scrub_blocks(layout, again, stream=stream)
                    except ScrubVerificationError as e:
                        # Still the finished request's bytes: never claimed (with the gate
                        # off the library would hand them over).
                        failed = set(e.failed_blocks)
                        refused[g].extend(i for i in ids if i in failed)
                        ids = [i for i in ids if i not in failed]
                        first = first or ClaimRefusedError(KVH_ERR_VERIFY_FAILED, e.message, sorted(failed))
                        if not ids:
                            continue
                try:
                    claim_blocks(layout, ids, stream=stream)
                except ClaimRefusedError as e:
                    not_handed = set(e.refused_blocks)
                    _handed_over(blocks, (i for i in ids if i not in not_handed), owner)
                    refused[g].extend(e.refused_blocks)
                    first = first or e
                except KvhError:
                    _maybe_handed_over(blocks, ids, owner)
                    raise
                else:
                    _handed_over(blocks, ids, owner)
        if any(refused):
            refused_requests[req_id] = refused
    if first is not None:
        first.refused_requests = refused_requests
        raise first
    return claimed
