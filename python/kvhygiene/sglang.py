"""Scrub on free for SGLang's token KV pools: every KV slot the engine frees is zeroed and
verified before its allocator can hand it to another request.

SGLang keeps one KV row per token slot (``MHATokenToKVPool.k_buffer`` and ``v_buffer``, one
``[size + page_size, heads, head_dim]`` tensor per layer; ``MLATokenToKVPool.kv_buffer``) and
hands slots out through a token allocator (``TokenToKVPoolAllocator``, or
``PagedTokenToKVPoolAllocator`` with pages of ``page_size`` slots). The paths that give slots
back (a request that finishes or is aborted or retracted, a prefix-cache eviction) end in the
allocator's ``free(free_index)``, with the token indices freed, or, in recent releases, its
``free_segment(free_index, start_pos=...)``, which gives pages back by their first slot
without ``free``, and ``free_page_ids(page_ids)``, which gives pages back by id (0.5.23's
paged ``free_segment`` and its sliding-window allocator's page frees); and ``flush_cache`` in its ``clear()``, which makes every slot free again
(the prefix cache's included) without ``free``. :func:`scrub_on_free` wraps those methods::

    import kvhygiene
    from kvhygiene.sglang import layouts_of, scrub_on_free

    kvhygiene.install()  # before the KV pool is allocated
    ...
    layouts = layouts_of(token_to_kv_pool)            # in the process that owns the pool
    scrub_on_free(token_to_kv_pool_allocator, layouts, stream=forward_stream)

Both run in each scheduler process, not in the launcher: SGLang starts its schedulers (one per
tensor-parallel rank) as spawned processes, fresh interpreters that own the model runner, the
KV pool and its allocator. The wrap needs the scheduler's own objects
(``scheduler.token_to_kv_pool_allocator``, ``scheduler.tp_worker.model_runner.token_to_kv_pool``
and, for ``stream``, ``scheduler.forward_stream`` in 0.5.23), once the ``Scheduler`` is built.
From SGLang 0.5.23 on, the package's general plugin (:func:`install_plugin`, entry point
``sglang.srt.plugins``, run first in each scheduler process) does both: ``install()`` before
the scheduler allocates, :func:`wrap_scheduler` once it is built. SGLang runs it after
importing its scheduler module, which starts CUDA on a GPU machine (its FP8 utilities read the
device's compute capability at import), too late for ``install()``; so, with any release,
``install()`` gets there through a ``sitecustomize`` module on ``PYTHONPATH`` that ends the
process when it fails (Python only prints an exception raised there; see the README), and
the plugin then finds it installed and does the wrap (with an earlier release, code of the
user's in that process does). The ``kv_scrub`` record of the padding
page's scrub, made when the allocator is wrapped, shows in each process's forensic log that
the wrap took. Run
SGLang with ``--disable-cuda-graph`` (in 0.5.23, deprecated for
``--cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled``) and without
``--enable-memory-saver``: both fail under any pluggable allocator (docs/cuda.md).

- ``free``, ``free_segment`` and ``free_page_ids``: a freed page (the slot itself when ``page_size`` is 1) is
  scrubbed whole, in every layer, K and V, before the allocator's own method runs: a paged allocator frees whole
  pages, so a page is reused only after it was scrubbed. Inside a free group
  (``free_group_begin`` .. ``free_group_end``) a page is scrubbed when it is freed, not again
  when the group gives it back.
- ``clear``: the whole pool is scrubbed first (SGLang clears only while no request runs).
- ``restore_state``, in releases that have it (0.5.23 has none), where speculative decoding
  gives back the pages a draft step took by putting back the free lists ``backup_state``
  saved, without ``free``: the pages it makes free are scrubbed before it returns.
- A page whose scrub fails verification is withheld: never given back to the allocator,
  listed in :attr:`ScrubOnFree.withheld`, and recorded in the forensic log by the library,
  until a ``clear`` verifies it clean; a ``clear`` during which a page fails raises, clears
  nothing, and takes the page out of the allocator's free lists (``free_pages``,
  ``release_pages``, or recent releases' ``staged_pages``) if it was free. A call the library refuses raises and frees nothing; the padding page is
  scrubbed once when the allocator is wrapped, so a pool outside kvhygiene memory is refused
  then.

Only attribute names are used (no SGLang import): the module is tested against stand-ins with
those names, not against SGLang itself. The scrub runs on ``stream`` (default: PyTorch's
current stream), after the work queued there: with SGLang's overlap scheduler (the default;
``--disable-overlap-schedule`` turns it off) or pipeline parallelism, which run the forward
pass on a stream of their own (``scheduler.forward_stream``), pass that stream, so that the
scrub does not overtake a kernel still reading the slots. Speculative decoding (EAGLE) gives the draft model a KV
pool of its own but the target's allocator: wrap that one allocator once, with the layouts of
both pools (``layouts_of(target_pool) + layouts_of(draft_pool)``), so that every page it
frees is scrubbed in both. A sliding-window
hybrid allocator (``SWATokenToKVPoolAllocator``), which keeps its free lists in two inner
allocators, is refused: wrap each inner one (``full_attn_allocator``,
``swa_attn_allocator``) with the layouts of its own pool, which covers its ``free_swa`` and
``free_swa_segment`` too (``PureSWATokenToKVPoolAllocator`` has one inner allocator under
both names: wrap it once). A hybrid linear-attention model's ``HybridLinearKVPool`` is laid
out by its ``full_kv_pool``. An FP4 pool's block-scale rows (``k_scale_buffer``,
``v_scale_buffer``, MLA's ``kv_scale_buffer``, of two or more dimensions), an NVFP4 pool's
per-page native scales (``native_k_scale_buffer``, ``native_v_scale_buffer``) are scrubbed
with the slots they belong to; a pool with a scale buffer of another name is refused. Not
covered: slots given back by other means than ``free``, ``free_segment``, ``free_page_ids``,
``clear`` and ``restore_state``, buffers that are not per-token rows (sparse-attention index
buffers, a host-side cache, a hybrid model's linear-attention states, an NVFP4 pool's
dequantisation workspace ``dq_k_buffer`` / ``dq_v_buffer``, whose prefill rows follow the
batch's order, not the slots, and which each prefill overwrites where it reads; all of them
are scrubbed when the pool is freed), and sharded pools whose slot indices are not the local
rows (``--enable-kv-cache-sharding``, decode context parallelism).
"""

from __future__ import annotations

import logging
import numbers
import operator
import os
import sys
from typing import List, Optional, Sequence, Set, Tuple

from . import KvLayout, ScrubVerificationError, _cuda_index, _layouts_by_geometry, _tensor_blocks, scrub_blocks

__all__ = ["layouts_of", "pages_of", "scrub_on_free", "ScrubOnFree", "wrap_scheduler", "install_plugin"]

_log = logging.getLogger(__name__)


def _attention_pool(kv_pool):
    """The pool that holds the token slots' KV: the pool itself, or, for a hybrid
    linear-attention model's ``HybridLinearKVPool`` (which has no buffers of its own), its
    ``full_kv_pool``. The linear-attention (Mamba) states it also keeps are per request, not
    per token slot, and not covered."""
    own = any(getattr(kv_pool, n, None) is not None for n in ("k_buffer", "v_buffer", "kv_buffer"))
    inner = getattr(kv_pool, "full_kv_pool", None)
    if not own and inner is not None and getattr(kv_pool, "swa_kv_pool", None) is None:
        return inner
    return kv_pool


def _buffers(kv_pool) -> list:
    """The pool's per-layer KV tensors: ``k_buffer`` + ``v_buffer`` (MHA) or ``kv_buffer``
    (MLA)."""
    k, v = getattr(kv_pool, "k_buffer", None), getattr(kv_pool, "v_buffer", None)
    if k is not None and v is not None:
        return list(k) + list(v)
    kv = getattr(kv_pool, "kv_buffer", None)
    if kv is not None:
        return list(kv)
    raise AttributeError(
        f"{type(kv_pool).__name__} has neither k_buffer and v_buffer nor kv_buffer: not an "
        "SGLang token KV pool kvhygiene.sglang can read"
    )


def _scale_buffers(kv_pool) -> Tuple[list, list]:
    """The pool's per-slot and per-page tensors besides its K and V: ``(rows, pages)``.

    Rows, one per token slot: an FP4 pool's block scales (MHA's ``k_scale_buffer`` and
    ``v_scale_buffer``, MLA's ``kv_scale_buffer``; computed from the request's keys and values,
    written at the same slots). Pages, one per page of slots: an NVFP4 pool's scales in the attention kernel's native layout
    (``native_k_scale_buffer``, ``native_v_scale_buffer``, ``[pages, heads, page_size,
    scales]``). None for other pools."""
    rows, pages = [], []
    for name in _SCALE_BUFFERS:
        held = getattr(kv_pool, name, None)
        if held is not None:
            rows.extend(held)
    for name in _NATIVE_SCALE_BUFFERS:
        held = getattr(kv_pool, name, None)
        if held is not None:
            pages.extend(held)
    # Scales of another name would be left out without a word: refused instead (data, not
    # the pool's methods that may bear such a name).
    unknown = [
        n
        for n in dir(kv_pool)
        if n.endswith("scale_buffer")
        and n not in _SCALE_BUFFERS + _NATIVE_SCALE_BUFFERS
        # Sparse attention's indexer keys (NSA's index_k_with_scale_buffer): per page, not
        # per slot, and not covered, as the module says.
        and not n.startswith("index_")
        and getattr(kv_pool, n, None) is not None
        and not callable(getattr(kv_pool, n))
    ]
    if unknown:
        raise ValueError(
            f"{type(kv_pool).__name__} has {', '.join(unknown)}, per-slot data kvhygiene.sglang "
            "does not know: its rows would not be scrubbed"
        )
    return rows, pages


#: The per-slot block-scale rows of FP4 pools: MHA's K and V scales, MLA's one.
_SCALE_BUFFERS = ("k_scale_buffer", "v_scale_buffer", "kv_scale_buffer")

#: An NVFP4 pool's per-page scales in the attention kernel's layout.
_NATIVE_SCALE_BUFFERS = ("native_k_scale_buffer", "native_v_scale_buffer")


def layouts_of(kv_pool, page_size: Optional[int] = None) -> List[KvLayout]:
    """The layouts of an SGLang token KV pool whose blocks are its pages: block ``p`` of each
    region is token slots ``p * page_size .. (p + 1) * page_size - 1`` of one layer's K, V or
    KV tensor, and of its other per-slot data when it has them (an FP4 pool's block scales; an
    NVFP4 pool's per-page scales, block ``p`` being their page ``p``). ``page_size`` defaults to the pool's. A hybrid linear-attention
    model's pool (``HybridLinearKVPool``) is laid out by its ``full_kv_pool``. Tensors of one
    geometry share a layout (K and V of different head sizes make two)."""
    kv_pool = _attention_pool(kv_pool)
    page = _page_size(kv_pool if page_size is None else page_size)
    parts: List[Tuple[Tuple[int, int, int, int], List[int]]] = []
    data = _buffers(kv_pool)
    scales, native = _scale_buffers(kv_pool)
    for n, t in enumerate(native):
        name = f"KV native scale tensor {n}"
        if len(t.shape) != 4 or t.shape[2] != page:
            raise ValueError(f"{name}: shape {tuple(t.shape)} is not [pages, heads, page_size {page}, scales]")
        (block_bytes, stride, blocks), bases = _tensor_blocks(t, 0, name)
        parts.append(((block_bytes, stride, blocks, _cuda_index(t, name)), bases))
    for n, t in enumerate(data + scales):
        scale = n >= len(data)
        name = f"KV scale tensor {n - len(data)}" if scale else f"KV tensor {n}"
        if scale and len(t.shape) < 2:
            raise ValueError(f"{name}: shape {tuple(t.shape)} is not [token slots, ...]")
        if not scale and len(t.shape) != 3:
            raise ValueError(f"{name}: shape {tuple(t.shape)} is not [token slots, heads, head_dim]")
        (row_bytes, row_stride, rows), bases = _tensor_blocks(t, 0, name)
        if page > 1 and row_stride != row_bytes:
            raise ValueError(
                f"{name}: token rows are {row_stride} bytes apart but {row_bytes} long: a page of "
                f"{page} slots is not one dense run of memory"
            )
        if rows < page:
            raise ValueError(f"{name}: {rows} token slots, fewer than one page of {page}")
        index = _cuda_index(t, name)
        geometry = (row_bytes * page, row_stride * page, rows // page, index)
        parts.append((geometry, bases))
    layouts = _layouts_by_geometry(parts)
    for layout in layouts:
        layout.page_size = page  # checked by scrub_on_free against the allocator's
    return layouts


def _page_size(source) -> int:
    """A page size given, or the ``page_size`` of the object given (1 without one). A number
    that is not an integer (``4.0``) or a string is refused, never read as an object without
    a ``page_size``: a page of one slot would name token indices as pages."""
    if isinstance(source, bool):
        raise TypeError("page_size is a bool, not a number of token slots")
    try:
        page = operator.index(source)
    except TypeError:
        if isinstance(source, (numbers.Number, str, bytes)):
            raise TypeError(f"page_size {source!r} is not an integer number of token slots") from None
        page = operator.index(getattr(source, "page_size", 1))
    if page < 1:
        raise ValueError(f"page_size {page} is not a positive number of token slots")
    return page


def _indices(free_index, what: str = "token index") -> List[int]:
    """Token indices (or page ids: ``what``) as ints: a tensor or array in one transfer, else a
    sequence. Bytes and strings are refused, as :func:`kvhygiene.scrub_blocks` refuses them:
    iterated, they give byte values or characters, which would be read as other indices."""
    if isinstance(free_index, (bytes, bytearray, memoryview, str)) or free_index is None:
        raise TypeError(
            f"{what} values given as {type(free_index).__name__}: pass a sequence of integers "
            "(a tensor, a list or a tuple)"
        )
    if hasattr(free_index, "tolist"):
        free_index = free_index.tolist()
        if isinstance(free_index, int):
            free_index = [free_index]
    if not hasattr(free_index, "__iter__"):
        raise TypeError(
            f"{what} values given as {type(free_index).__name__}: pass a sequence of integers "
            "(a tensor, a list or a tuple)"
        )
    out = []
    for i in free_index:
        if isinstance(i, bool):
            raise TypeError(f"{what} {i!r} is a bool")
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"{what} {i!r} is a {type(i).__name__}, not an integer") from None
        if i < 0:
            raise ValueError(f"{what} {i} is negative")
        out.append(i)
    return out


def pages_of(free_index, page_size: int) -> List[int]:
    """The distinct pages (``index // page_size``) of the token indices ``free_index``, in
    order."""
    page = _page_size(page_size)
    return sorted({i // page for i in _indices(free_index)})


#: Pages named in one scrub call when the whole pool is scrubbed (``clear``).
_CLEAR_CHUNK = 4096

#: The allocator's lists of free page ids (a tensor or a list each).
_FREE_LISTS = ("free_pages", "release_pages")

#: Recent SGLang's freed pages not yet merged into ``free_pages`` (``need_sort``): a list of
#: page-id batches, counted in ``num_staged_pages``.
_STAGED = "staged_pages"

#: What a refused scrub at ``restore_state`` puts back as it was before the call: every list
#: a page can be free in, and the count the allocator keeps of its staged pages.
_RESTORED = _FREE_LISTS + (_STAGED, "num_staged_pages")


def _snapshot(held):
    """``held`` as it is now: a shallow copy of a list, anything else as it is."""
    return list(held) if isinstance(held, list) else held


def _page_ids(held) -> List[int]:
    """Page ids of a free list or batch (a tensor or a sequence)."""
    return [int(p) for p in (held.tolist() if hasattr(held, "tolist") else held)]


def _without_pages(held, pages: Set[int]):
    """A free list or batch less ``pages``, of the same kind."""
    if hasattr(held, "tolist") and hasattr(held, "new_tensor"):
        return held.new_tensor([p for p in held.tolist() if p not in pages])
    return type(held)(p for p in held if p not in pages)


class ScrubOnFree:
    """The ``free`` that :func:`scrub_on_free` puts on an allocator: scrubs the pages of the
    indices freed, then calls the allocator's own ``free`` with the indices of the pages that
    verified. It also stands in for the allocator's ``free_group_end`` and ``clear`` when it
    has them (see :func:`scrub_on_free`)."""

    def __init__(self, allocator, layouts: Sequence[KvLayout], page_size: int, stream):
        self.allocator = allocator
        self.layouts = list(layouts)
        self.page_size = page_size
        self.stream = stream
        self.original = allocator.free
        self.original_group_end = getattr(allocator, "free_group_end", None)
        self.original_clear = getattr(allocator, "clear", None)
        self.original_restore = getattr(allocator, "restore_state", None)
        self.original_segment = getattr(allocator, "free_segment", None)
        self.original_page_ids = getattr(allocator, "free_page_ids", None)
        #: Pages whose scrub failed verification: never given back to the allocator (until a
        #: ``clear`` verifies them clean).
        self.withheld: Set[int] = set()
        #: Pages scrubbed and verified, in all.
        self.scrubbed_pages = 0
        # Pages scrubbed by frees inside the current free group (their indices wait in the
        # allocator's group), and whether the group's end is giving them back now.
        self._group_scrubbed: Set[int] = set()
        self._group_ending = False
        # Pages the running free_segment scrubbed: an allocator's free_segment that gives them
        # back through free (SGLang's base class does) is not made to scrub them again.
        self._segment_scrubbed: Set[int] = set()

    def __call__(self, free_index, *args, **kwargs):
        dropped = self._scrub_freed(pages_of(free_index, self.page_size))
        return self.original(self._without(free_index, dropped) if dropped else free_index, *args, **kwargs)

    def free_segment(self, free_index, *args, **kwargs):
        """The allocator's ``free_segment`` (recent SGLang's prefix-cache eviction and finished
        requests: it gives the pages back by their first slot, without ``free``): the pages are
        scrubbed as for ``free``. When one is withheld, the rest goes back through the
        allocator's own ``free``, which takes any set of slots."""
        pages = pages_of(free_index, self.page_size)
        dropped = self._scrub_freed(pages)
        if dropped:
            return self.original(self._without(free_index, dropped))
        return self._passing(pages, self.original_segment, free_index, *args, **kwargs)

    def free_page_ids(self, page_ids, *args, **kwargs):
        """The allocator's ``free_page_ids`` (SGLang 0.5.23's: pages by id, given back without
        ``free``; its paged ``free_segment`` and its sliding-window allocator's page frees go
        through it): the pages are scrubbed as for ``free``, and those withheld left out."""
        pages = sorted(set(_indices(page_ids, "page id")))
        dropped = self._scrub_freed(pages)
        kept = _without_pages(page_ids, dropped) if dropped else page_ids
        return self._passing(pages, self.original_page_ids, kept, *args, **kwargs)

    def _passing(self, pages: List[int], method, *args, **kwargs):
        """Calls the allocator's own ``method`` with ``pages`` just scrubbed: a ``free`` or
        ``free_page_ids`` it makes to give them back (SGLang's base classes do) does not scrub
        them again."""
        before = self._segment_scrubbed
        self._segment_scrubbed = before | (set(pages) - self.withheld)
        try:
            return method(*args, **kwargs)
        finally:
            self._segment_scrubbed = before

    def _scrub_freed(self, pages: List[int]) -> Set[int]:
        """Scrubs ``pages`` being freed; returns those to leave out of what goes back to the
        allocator (withheld: failed now, or before)."""
        # A withheld page freed again (a double free by the engine) stays withheld.
        refused = self.withheld.intersection(pages)
        # At a group's end, its pages come back in one call: those scrubbed when they were
        # freed in the group were not handed out since (the group held them).
        done = (self._group_scrubbed if self._group_ending else set()) | self._segment_scrubbed
        todo = [p for p in pages if p not in refused and p not in done]
        failed = self._scrub(todo)
        self.scrubbed_pages += len(todo) - len(failed)
        if self._in_group():
            self._group_scrubbed.update(p for p in todo if p not in failed)
        if failed:
            self.withheld |= failed
            _log.error(
                "kvhygiene: %d KV pages failed verification after their scrub and are withheld "
                "from the allocator: %s",
                len(failed),
                sorted(failed),
            )
        return failed | refused

    def _in_group(self) -> bool:
        """Whether the allocator is collecting frees: SGLang's ``is_not_in_free_group`` flag,
        or, in recent releases that lack it, ``free_group`` being a list (``None`` outside a
        group)."""
        flag = getattr(self.allocator, "is_not_in_free_group", None)
        if flag is not None:
            return flag is False
        return getattr(self.allocator, "free_group", None) is not None

    def _scrub(self, pages: List[int], clip: bool = False) -> Set[int]:
        """Scrubs ``pages`` in every layout; returns those that failed verification. With
        ``clip``, each layout is given only the pages it has (pools of different sizes, for
        ``clear``); without, a page a layout lacks is refused. When a later scrub raises
        (refused, or stopped by a backend error), the pages found failed before it, and those
        the error names, are withheld first: the error must not let a failed page be handed
        out."""
        failed: Set[int] = set()
        if not pages:
            return failed
        try:
            for layout in self.layouts:
                ids = [p for p in pages if p < layout.blocks_per_region] if clip else pages
                if not ids:
                    continue
                try:
                    scrub_blocks(layout, ids, stream=self.stream)
                except ScrubVerificationError as e:
                    failed.update(e.failed_blocks)
        except BaseException as e:
            failed.update(getattr(e, "failed_blocks", None) or ())
            self._withhold(failed)
            raise
        return failed

    def _withhold(self, failed: Set[int]) -> None:
        """Withholds ``failed`` (pages found failed before an error ended their scrub) and takes
        those the allocator holds free out of its free lists."""
        if not failed:
            return
        self.withheld |= failed
        _log.error(
            "kvhygiene: %d KV pages failed verification before a scrub error and are withheld "
            "from the allocator: %s",
            len(failed),
            sorted(failed),
        )
        if any(hasattr(self.allocator, name) for name in _FREE_LISTS):
            back = failed & self._free_set()
            if back:
                self._take_out(back)

    def free_group_end(self, *args, **kwargs):
        """The allocator's ``free_group_end``, which gives the group's indices back through
        ``free``: pages scrubbed when they were freed in the group are not scrubbed again.
        Pages a ``free_segment`` or ``free_page_ids`` left in the group (given back without
        ``free``: SGLang's ``free_page_reps_group`` of first slots, 0.5.23's
        ``free_page_ids_group`` of page ids) are scrubbed here when they were not yet: those
        of a group opened before the allocator was wrapped."""
        self._scrub_group_segments()
        self._group_ending = True
        try:
            return self.original_group_end(*args, **kwargs)
        finally:
            self._group_ending = False
            self._group_scrubbed.clear()

    def _scrub_group_segments(self) -> None:
        """Scrubs the pages the group holds outside ``free`` not scrubbed yet, and takes those
        that fail out of it: ``free_page_reps_group`` (first slots) and
        ``free_page_ids_group`` (page ids), a tensor or a list each."""
        held = {
            name: (batches, per)
            for name, per in (("free_page_reps_group", self.page_size), ("free_page_ids_group", 1))
            if (batches := getattr(self.allocator, name, None))
        }
        if not held:
            return
        pages = {i // per for batches, per in held.values() for batch in batches for i in _indices(batch)}
        todo = sorted(pages - self._group_scrubbed - self.withheld)
        failed = self._scrub(todo)
        self.scrubbed_pages += len(todo) - len(failed)
        self._group_scrubbed.update(p for p in todo if p not in failed)
        dropped = failed | (pages & self.withheld)
        if failed:
            self.withheld |= failed
            _log.error(
                "kvhygiene: %d KV pages a free group held failed verification after their scrub "
                "and are withheld from the allocator: %s",
                len(failed),
                sorted(failed),
            )
        if dropped:
            for name, (batches, per) in held.items():
                kept = [self._without(b, dropped) if per > 1 else _without_pages(b, dropped) for b in batches]
                setattr(self.allocator, name, kept)

    def clear(self, *args, **kwargs):
        """The allocator's ``clear`` (SGLang's ``flush_cache``, made while no request runs):
        every slot becomes free without ``free``, the prefix cache's included, so the whole
        pool is scrubbed first: every page of every layout, the larger pool's last pages too
        where a draft pool and the target's differ in size. When a page fails verification the
        allocator is not cleared (its page would be handed out): :class:`ScrubVerificationError`
        names the pages."""
        pages = list(range(max(layout.blocks_per_region for layout in self.layouts)))
        failed: Set[int] = set()
        try:
            for i in range(0, len(pages), _CLEAR_CHUNK):
                failed |= self._scrub(pages[i : i + _CLEAR_CHUNK], clip=True)
        except BaseException:
            # Pages of earlier chunks that failed stay out of the allocator, which keeps its
            # free lists: the clear is not made.
            self._withhold(failed)
            raise
        if failed:
            self.withheld |= failed
            self._take_out(failed)
            raise ScrubVerificationError(sorted(failed), len(pages))
        self.scrubbed_pages += len(pages)
        self.withheld.clear()
        self._group_scrubbed.clear()
        return self.original_clear(*args, **kwargs)

    def restore_state(self, *args, **kwargs):
        """The allocator's ``restore_state`` (speculative decoding puts back the free lists
        ``backup_state`` saved, freeing every page handed out since without ``free``): the
        pages it makes free are scrubbed before the call returns. A page that fails
        verification is withheld and taken out of the free lists, as is a withheld page the
        saved lists hold. A scrub the library refuses raises and leaves the free lists (the
        staged batches and their count included) as they were before the call."""
        # A list is copied (the allocator may change it in place); a tensor is replaced, not
        # changed, by the allocators this wraps, and is kept as is.
        before = {name: _snapshot(getattr(self.allocator, name)) for name in _RESTORED if hasattr(self.allocator, name)}
        was_free = self._free_set()
        result = self.original_restore(*args, **kwargs)
        freed = sorted(self._free_set() - was_free - self.withheld)
        try:
            failed = self._scrub(freed)
        except BaseException:
            for name, held in before.items():
                setattr(self.allocator, name, held)
            raise
        self.scrubbed_pages += len(freed) - len(failed)
        if failed:
            self.withheld |= failed
            _log.error(
                "kvhygiene: %d KV pages a restore_state freed failed verification after their "
                "scrub and are withheld from the allocator: %s",
                len(failed),
                sorted(failed),
            )
        # Each reading of the free lists copies them (a speculative step's cost): skipped
        # when nothing is withheld.
        back = self.withheld & self._free_set() if self.withheld else set()
        if back:
            self._take_out(back)
        return result

    def _free_set(self) -> Set[int]:
        """The pages in the allocator's free lists (``free_pages``, ``release_pages``, and the
        batches of ``staged_pages``)."""
        free: Set[int] = set()
        for name in _FREE_LISTS:
            held = getattr(self.allocator, name, None)
            if held is not None:
                free.update(_page_ids(held))
        for batch in getattr(self.allocator, _STAGED, None) or ():
            free.update(_page_ids(batch))
        return free

    def _take_out(self, pages: Set[int]) -> None:
        """Takes ``pages`` out of the allocator's free lists (SGLang's ``free_pages`` and
        ``release_pages``, page ids in a tensor or a list): a page that failed verification
        while it was free must not be handed out. An allocator with neither list is refused:
        the page could not be kept out."""
        found = False
        for name in _FREE_LISTS:
            held = getattr(self.allocator, name, None)
            if held is None:
                continue
            found = True
            setattr(self.allocator, name, _without_pages(held, pages))
        staged = getattr(self.allocator, _STAGED, None)
        if staged is not None:
            found = True
            kept = [_without_pages(batch, pages) for batch in staged]
            setattr(self.allocator, _STAGED, kept)
            if hasattr(self.allocator, "num_staged_pages"):
                self.allocator.num_staged_pages = sum(len(_page_ids(batch)) for batch in kept)
        if not found:
            raise AttributeError(
                f"{type(self.allocator).__name__} has no free_pages list: pages {sorted(pages)} failed "
                "verification and cannot be kept out of it; stop serving from this pool"
            )

    def _without(self, free_index, dropped: Set[int]):
        """``free_index`` less the indices of the pages in ``dropped``, of the same kind."""
        keep = [i for i in _indices(free_index) if i // self.page_size not in dropped]
        if hasattr(free_index, "new_tensor"):
            return free_index.new_tensor(keep)
        return type(free_index)(keep) if isinstance(free_index, (list, tuple)) else keep

    def uninstall(self) -> None:
        """Puts the allocator's own methods back."""
        self.allocator.free = self.original
        if self.original_group_end is not None:
            self.allocator.free_group_end = self.original_group_end
        if self.original_clear is not None:
            self.allocator.clear = self.original_clear
        if self.original_restore is not None:
            self.allocator.restore_state = self.original_restore
        if self.original_segment is not None:
            self.allocator.free_segment = self.original_segment
        if self.original_page_ids is not None:
            self.allocator.free_page_ids = self.original_page_ids


def scrub_on_free(allocator, layouts: Sequence[KvLayout], page_size: Optional[int] = None, stream=None) -> ScrubOnFree:
    """Wraps ``allocator.free`` (an SGLang token allocator, or anything with
    ``free(token_indices)``) in a :class:`ScrubOnFree` and returns it; also its
    ``free_segment``, ``free_page_ids``, ``free_group_end``, ``clear`` and ``restore_state`` when it has them (a page freed in a
    free group is scrubbed once; ``clear`` scrubs the whole pool first; ``restore_state``
    scrubs the pages it makes free). ``layouts`` are the KV pool's
    (:func:`layouts_of`, with the same page size); ``page_size`` defaults to the
    allocator's. Refused on an allocator already wrapped.

    The padding page (page 0, which SGLang never hands out) is scrubbed once here: a pool not
    in kvhygiene memory (``install()`` not called first, a custom memory pool) is refused now
    rather than at the first free."""
    if isinstance(getattr(allocator, "free", None), ScrubOnFree):
        raise ValueError("this allocator's free already scrubs (scrub_on_free was called on it before)")
    if not callable(getattr(allocator, "free", None)):
        raise AttributeError(f"{type(allocator).__name__} has no free method")
    layouts = list(layouts)
    if not layouts:
        raise ValueError("scrub_on_free needs the KV pool's layouts (layouts_of(pool))")
    inner = [n for n in ("full_attn_allocator", "swa_attn_allocator") if getattr(allocator, n, None) is not None]
    if len(inner) == 2 and allocator.full_attn_allocator is allocator.swa_attn_allocator:
        # SGLang's PureSWATokenToKVPoolAllocator: one inner allocator under both names.
        raise ValueError(
            f"{type(allocator).__name__} keeps its free lists in swa_attn_allocator (which is also "
            "its full_attn_allocator): wrap that one, once, with the layouts of its KV pool "
            "(scrub_on_free(allocator.swa_attn_allocator, layouts_of(swa_kv_pool)))"
        )
    if inner:
        # Its free lists are its inner allocators': the slots their frees and restores give
        # back (free_swa's too) are seen only there, each in its own pool.
        raise ValueError(
            f"{type(allocator).__name__} keeps its free lists in {' and '.join(inner)}: wrap each "
            "of those instead, with the layouts of its own KV pool (scrub_on_free(allocator."
            "full_attn_allocator, layouts_of(full_kv_pool)), and the same for the sliding-window "
            "one)"
        )
    shards = getattr(allocator, "shard_size", 1)
    if isinstance(shards, int) and shards > 1:
        # SGLang's PageInterleavePoolAllocator (--enable-kv-cache-sharding): logical page l is
        # rank l % shards's local page l // shards; its indices are not this pool's rows.
        raise ValueError(
            f"{type(allocator).__name__} shards its pages over {shards} ranks "
            "(--enable-kv-cache-sharding): its page indices are not the local pool's, and "
            "kvhygiene.sglang does not cover it"
        )
    lists = (*_FREE_LISTS, _STAGED)  # as _free_set reads them
    has_lists = any(getattr(allocator, n, None) is not None for n in lists)
    if callable(getattr(allocator, "restore_state", None)) and not has_lists:
        raise AttributeError(
            f"{type(allocator).__name__} has restore_state but no free_pages list: the pages a restore "
            "frees cannot be seen, so they could not be scrubbed"
        )
    page = _page_size(allocator if page_size is None else page_size)
    own = getattr(allocator, "page_size", None)
    if page_size is not None and own is not None and _page_size(own) != page:
        # Its free lists hold pages of its own size: read with another, a restore's pages
        # would be taken for other slots, and the ones freed handed out unscrubbed.
        raise ValueError(f"page_size {page} contradicts the allocator's own page_size {_page_size(own)}")
    for layout in layouts:
        made_for = getattr(layout, "page_size", page)
        if made_for != page:
            raise ValueError(
                f"the layouts are of pages of {made_for} token slots, the allocator's of {page}: "
                "pass the same page_size to layouts_of"
            )
        scrub_blocks(layout, [0], stream=stream)
    wrapper = ScrubOnFree(allocator, layouts, page, stream)
    allocator.free = wrapper
    if wrapper.original_group_end is not None:
        allocator.free_group_end = wrapper.free_group_end
    if wrapper.original_clear is not None:
        allocator.clear = wrapper.clear
    if wrapper.original_restore is not None:
        allocator.restore_state = wrapper.restore_state
    if wrapper.original_segment is not None:
        allocator.free_segment = wrapper.free_segment
    if wrapper.original_page_ids is not None:
        allocator.free_page_ids = wrapper.free_page_ids
    return wrapper


#: The module SGLang's scheduler process runs (``run_scheduler_process``) and its class.
_SCHEDULER_MODULE = "sglang.srt.managers.scheduler"


def wrap_scheduler(scheduler) -> List[ScrubOnFree]:
    """Wraps the allocator of a built SGLang ``Scheduler`` (:func:`scrub_on_free`, with
    :func:`layouts_of` its model runner's KV pool) and returns the wrappers: its
    ``token_to_kv_pool_allocator`` over ``tp_worker.model_runner.token_to_kv_pool``, or, for a
    sliding-window hybrid allocator, each inner allocator over its own pool
    (``full_kv_pool``, ``swa_kv_pool``; one for a pure sliding-window one). The scrubs run on
    the scheduler's ``forward_stream`` under the overlap scheduler or pipeline parallelism
    (where the forward pass runs), else on PyTorch's current stream. Refused (``ValueError``)
    under speculative decoding, whose draft pool shares the allocator: wrap that by hand, with
    both pools' layouts (see the module's documentation); and with the hierarchical cache,
    whose host copies are not covered and which binds the allocator's ``free`` (for its
    load-backs) before the scheduler is built, so that a wrap afterwards would not see those
    frees."""
    tree = getattr(scheduler, "tree_cache", None)
    if getattr(scheduler, "enable_hierarchical_cache", False) or getattr(tree, "cache_controller", None) is not None:
        raise ValueError(
            "kvhygiene.sglang: the hierarchical cache (--enable-hierarchical-cache) keeps KV in "
            "host memory, which is not covered, and binds the allocator's free while the "
            "scheduler is built, before it can be wrapped: run without it"
        )
    if getattr(scheduler, "draft_worker", None) is not None:
        raise ValueError(
            "kvhygiene.sglang: speculative decoding keeps a draft KV pool on the same allocator, "
            "which wrap_scheduler does not lay out: wrap it by hand with scrub_on_free(allocator, "
            "layouts_of(target_pool) + layouts_of(draft_pool)), or run without speculative decoding"
        )
    allocator = scheduler.token_to_kv_pool_allocator
    pool = scheduler.tp_worker.model_runner.token_to_kv_pool
    pipeline = getattr(getattr(scheduler, "pp_group", None), "world_size", 1) or 1
    overlap = bool(getattr(scheduler, "enable_overlap", False)) or pipeline > 1
    stream = scheduler.forward_stream if overlap else None
    full = getattr(allocator, "full_attn_allocator", None)
    swa = getattr(allocator, "swa_attn_allocator", None)
    if swa is None:
        wrapped = [scrub_on_free(allocator, layouts_of(pool), stream=stream)]
    else:
        wrapped = [scrub_on_free(swa, layouts_of(pool.swa_kv_pool), stream=stream)]
        if full is not None and full is not swa:
            wrapped.append(scrub_on_free(full, layouts_of(pool.full_kv_pool), stream=stream))
    for w in wrapped:
        # What an operator checks the wrap by (the padding page's kv_scrub record is in the
        # forensic log).
        _log.info(
            "kvhygiene: %s frees scrubbed: pages of %d slots, %d layouts, on %s",
            type(w.allocator).__name__,
            w.page_size,
            len(w.layouts),
            "the forward stream" if overlap else "the current stream",
        )
    return wrapped


#: Why a scheduler process whose CUDA started before the plugin ran is not built, and what
#: to do instead.
_STARTED_CUDA_FIRST = (
    "kvhygiene: this SGLang scheduler process started CUDA before kvhygiene's plugin ran "
    "(SGLang's scheduler module does as it is imported: its FP8 utilities read the device's "
    "compute capability), too late to make kvhygiene PyTorch's allocator. Install kvhygiene "
    "as each process starts, with a sitecustomize module on PYTHONPATH (README, \"Earlier "
    "SGLang releases\"); the plugin then finds it installed and wraps the KV pool's frees"
)


def install_plugin() -> None:
    """SGLang's general plugin (entry point ``kvhygiene`` of ``sglang.srt.plugins``, declared by
    this package): kvhygiene in every scheduler process, with no code of the user's.

    SGLang (0.5.23) loads its general plugins first thing in each process it starts, a
    scheduler process before it builds its ``Scheduler`` (but after importing the scheduler
    module, whose imports may start CUDA: then only a ``sitecustomize`` module installs
    kvhygiene in time, and the error raised names it). In a process that has loaded
    SGLang's scheduler module, the plugin makes ``Scheduler.__init__`` first call
    :func:`kvhygiene.install` (before the model and the KV pool are allocated; a no-op where
    a ``sitecustomize`` module installed it) and, once the scheduler is built,
    :func:`wrap_scheduler`. Either failing raises out of the scheduler's
    construction, which SGLang reports and which stops the server: it does not serve on
    PyTorch's allocator, or with KV slots freed unscrubbed. In other processes (the tokenizer,
    the detokenizer) it does nothing. Schedulers SGLang starts as Ray actors load no plugins,
    and get neither. SGLang logs an exception a plugin itself raises and goes
    on, so a scheduler module without the ``Scheduler`` it patches ends the process here.
    ``SGLANG_PLUGINS`` without ``kvhygiene`` turns it off; CUDA graphs must be off (see
    :data:`kvhygiene.GRAPH_CAPTURE_REFUSED`)."""
    module = sys.modules.get(_SCHEDULER_MODULE)
    if module is None:
        return
    cls = getattr(module, "Scheduler", None)
    init = getattr(cls, "__init__", None)
    if not isinstance(cls, type) or init is None:
        sys.stderr.write(
            f"kvhygiene: {_SCHEDULER_MODULE} has no Scheduler class to install kvhygiene in; "
            "ending the process rather than serving without it\n"
        )
        sys.stderr.flush()
        os._exit(1)
    if getattr(init, "_kvhygiene_scheduler", False):
        return

    def __init__(self, *args, **kwargs):
        from . import AllocatorAlreadyInUseError, install

        try:
            install()
        except AllocatorAlreadyInUseError as e:
            raise AllocatorAlreadyInUseError(f"{_STARTED_CUDA_FIRST} ({e})") from e
        init(self, *args, **kwargs)
        self.kvhygiene_scrubs = wrap_scheduler(self)

    __init__._kvhygiene_scheduler = True
    __init__.__wrapped__ = init
    cls.__init__ = __init__
