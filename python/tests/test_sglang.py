"""kvhygiene.sglang against stand-ins of SGLang's token KV pool and token allocator (the
attribute names it reads), over KV tensors in kvhygiene memory on the host backend: freed slots
are zero before the allocator hands them out again, live slots keep their contents, a page
that fails verification is never handed out again."""

import ctypes
from types import SimpleNamespace as NS

import pytest

import kvhygiene
from fakes import FakeTensor
import kvhygiene.sglang as sglang_adapter
from kvhygiene.sglang import ScrubOnFree, layouts_of, pages_of, scrub_on_free

HEADS = 2
SLOTS = 16  # the pool's size; SGLang adds one page of padding slots


class TokenAllocator:
    """SGLang's token allocator as the module sees it: ``page_size``, and ``free`` of token
    indices giving their pages back. Page 0 holds the padding slots and is never handed out."""

    def __init__(self, page_size):
        self.page_size = page_size
        self.free_pages = list(range(1, SLOTS // page_size + 1))
        self.freed = []

    def alloc(self, tokens):
        pages = self.free_pages[: -(-tokens // self.page_size)]
        self.free_pages = self.free_pages[len(pages) :]
        return [p * self.page_size + k for p in pages for k in range(self.page_size)][:tokens]

    def free(self, free_index):
        self.freed.append(list(free_index))
        self.free_pages.extend(sorted({i // self.page_size for i in free_index}))


class Pool:
    """An MHA token KV pool of ``layers`` layers in kvhygiene memory: ``k_buffer`` and
    ``v_buffer``, one ``[SLOTS + page_size, HEADS, dim]`` fp16 tensor per layer."""

    def __init__(self, lib, page_size, layers=2, k_dim=8, v_dim=8, slots=SLOTS):
        self.page_size = page_size
        self.rows = slots + page_size
        self.row_bytes = {"k": HEADS * k_dim * 2, "v": HEADS * v_dim * 2}
        self.size = layers * self.rows * (self.row_bytes["k"] + self.row_bytes["v"])
        self.lib = lib
        self.base = lib.kvh_malloc(self.size, 0, None)
        at = self.base
        self.k_buffer, self.v_buffer = [], []
        for _ in range(layers):
            for name, dim, out in (("k", k_dim, self.k_buffer), ("v", v_dim, self.v_buffer)):
                out.append(FakeTensor(at, (self.rows, HEADS, dim)))
                at += self.rows * self.row_bytes[name]

    def rows_of(self):
        for t in self.k_buffer + self.v_buffer:
            yield t, t.shape[1] * t.shape[2] * 2

    def fill(self, slots, byte):
        for t, row in self.rows_of():
            for s in slots:
                ctypes.memset(t.data_ptr() + s * row, byte, row)

    def holds(self, slot, byte):
        """Whether every layer's K and V row of ``slot`` is all ``byte``."""
        return all(
            ctypes.string_at(t.data_ptr() + slot * row, row) == bytes([byte]) * row for t, row in self.rows_of()
        )

    def release(self):
        self.lib.kvh_free(self.base, self.size, 0, None)
        kvhygiene.synchronize()


def test_freed_slots_are_zero_when_handed_out_again_and_live_ones_keep_their_bytes():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=1)
    alloc = TokenAllocator(page_size=1)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    a, b = alloc.alloc(4), alloc.alloc(3)
    pool.fill(a, 0xA1)
    pool.fill(b, 0xB2)
    alloc.free(a)  # request a finishes: its slots go back through the scrub
    assert alloc.freed == [a], "the allocator's own free ran with the indices freed"
    assert all(pool.holds(s, 0) for s in a), "a freed slot kept request a's bytes"
    assert all(pool.holds(s, 0xB2) for s in b), "a live request's slots were written"
    c = alloc.alloc(SLOTS - 3)
    assert set(a) <= set(c) and all(pool.holds(s, 0) for s in a)
    assert wrapper.scrubbed_pages == 4 and not wrapper.withheld
    alloc.free([])  # nothing to scrub: the allocator's free still runs
    assert alloc.freed[-1] == []
    pool.release()


def test_a_paged_pool_is_scrubbed_page_by_page_in_every_layer():
    lib = kvhygiene.load()
    # V rows of another head size than K: two layouts.
    pool = Pool(lib, page_size=4, k_dim=8, v_dim=16)
    layouts = layouts_of(pool)
    assert len(layouts) == 2
    assert [(lay.block_bytes, lay.blocks_per_region, len(lay.regions)) for lay in layouts] == [
        (4 * HEADS * 8 * 2, 5, 2),
        (4 * HEADS * 16 * 2, 5, 2),
    ]
    alloc = TokenAllocator(page_size=4)
    scrub_on_free(alloc, layouts)
    tokens = alloc.alloc(6)  # pages 1 and 2: slots 4-9, 10 and 11 not used
    assert tokens == [4, 5, 6, 7, 8, 9]
    pool.fill(range(4, 12), 0xC3)
    pool.fill(range(12, 16), 0xD4)
    alloc.free(tokens)
    assert all(pool.holds(s, 0) for s in range(4, 12)), "a freed page kept bytes"
    assert all(pool.holds(s, 0xD4) for s in range(12, 16)), "another page was written"
    assert pool.holds(0, 0), "the padding page was written"
    pool.release()


def test_a_page_that_fails_verification_is_withheld_and_the_others_are_freed():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = TokenAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    tokens = alloc.alloc(6)  # pages 1, 2, 3
    pool.fill(tokens, 0xE5)
    lib.kvh_inject_fault(1)
    alloc.free(tokens)
    assert wrapper.withheld == {1}
    assert alloc.freed == [[4, 5, 6, 7]], "the failed page's slots were given back"
    assert 1 not in alloc.free_pages and {2, 3} <= set(alloc.free_pages)
    assert all(pool.holds(s, 0) for s in range(4, 8))
    pool.release()


def test_a_pool_outside_kvhygiene_memory_is_refused_when_the_allocator_is_wrapped():
    stray = NS(page_size=1, k_buffer=[FakeTensor(0x1000, (SLOTS + 1, HEADS, 8))], v_buffer=[])
    alloc = TokenAllocator(page_size=1)
    own = alloc.free
    with pytest.raises(kvhygiene.KvhError, match="not inside"):
        scrub_on_free(alloc, layouts_of(stray))
    assert alloc.free == own, "the allocator was wrapped"


def test_a_refused_scrub_at_a_free_raises_and_frees_nothing():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=1)
    alloc = TokenAllocator(page_size=1)
    scrub_on_free(alloc, layouts_of(pool))
    tokens = alloc.alloc(2)
    pool.release()  # the cache tensor freed under the engine: its regions are no longer live
    with pytest.raises(kvhygiene.KvhError, match="not inside|not live"):
        alloc.free(tokens)
    assert alloc.freed == []


def test_pages_and_layouts_refuse_what_they_cannot_read():
    assert pages_of([9, 8, 3, 0], 4) == [0, 2]
    assert pages_of(NS(tolist=lambda: 5), 1) == [5]
    four = type("Int", (), {"__index__": lambda self: 4})()  # numpy's integers, say
    assert pages_of([9], four) == [2]
    with pytest.raises(ValueError, match="negative"):
        pages_of([-1], 1)
    with pytest.raises(TypeError, match="bool"):
        pages_of([True], 1)
    # Iterated, bytes give byte values and a string characters: never read as indices.
    for wrong in (b"\x05\x09", bytearray(b"\x05"), "12", None, 5):
        with pytest.raises(TypeError, match="token index values given as"):
            pages_of(wrong, 4)
    with pytest.raises(TypeError, match="token index '1' is a str, not an integer"):
        pages_of(["1"], 4)
    with pytest.raises(ValueError, match="page_size 0"):
        pages_of([1], 0)
    with pytest.raises(AttributeError, match="neither k_buffer"):
        layouts_of(NS(page_size=1))
    with pytest.raises(ValueError, match="not \\[token slots, heads, head_dim\\]"):
        layouts_of(NS(page_size=4, kv_buffer=[FakeTensor(0x1000, (5, 4, 1, 8))]))
    gappy = FakeTensor(0x1000, (20, 2, 8), stride=(32, 8, 1))
    with pytest.raises(ValueError, match="not one dense run"):
        layouts_of(NS(page_size=4, kv_buffer=[gappy]))
    with pytest.raises(ValueError, match="fewer than one page"):
        layouts_of(NS(page_size=4, kv_buffer=[FakeTensor(0x1000, (3, 2, 8))]))
    # MLA: one kv_buffer per layer; the page size given wins over the pool's.
    mla = NS(page_size=1, kv_buffer=[FakeTensor(0x1000, (17, 1, 64)), FakeTensor(0x9000, (17, 1, 64))])
    (only,) = layouts_of(mla, page_size=2)
    assert (only.block_bytes, only.blocks_per_region, only.regions) == (256, 8, (0x1000, 0x9000))


def test_an_allocator_is_wrapped_once_and_can_be_unwrapped():
    pool = Pool(kvhygiene.load(), page_size=2)
    alloc = GroupingAllocator(page_size=2)
    own = (alloc.free, alloc.free_group_end, alloc.clear)
    layouts = layouts_of(pool)
    wrapper = scrub_on_free(alloc, layouts)
    assert isinstance(alloc.free, ScrubOnFree)
    with pytest.raises(ValueError, match="already scrubs"):
        scrub_on_free(alloc, layouts)
    with pytest.raises(ValueError, match="needs the KV pool's layouts"):
        scrub_on_free(TokenAllocator(page_size=1), [])
    with pytest.raises(ValueError, match="pages of 2 token slots, the allocator's of 1"):
        scrub_on_free(TokenAllocator(page_size=1), layouts)
    wrapper.uninstall()
    assert (alloc.free, alloc.free_group_end, alloc.clear) == own
    pool.release()


class GroupingAllocator(TokenAllocator):
    """The rest of SGLang's token allocator interface that gives slots back: ``free_group_begin``
    and ``free_group_end`` (frees made in between are collected and given back at the end, by
    one call of ``self.free``), and ``clear`` (the scheduler's ``flush_cache``: every page but
    the padding page is free again, whatever the prefix cache held)."""

    def __init__(self, page_size):
        super().__init__(page_size)
        self.is_not_in_free_group = True
        self.free_group = []

    def free(self, free_index):
        if not self.is_not_in_free_group:
            self.free_group.append(list(free_index))
            return
        super().free(free_index)

    def free_group_begin(self):
        self.is_not_in_free_group, self.free_group = False, []

    def free_group_end(self):
        self.is_not_in_free_group = True
        if self.free_group:
            self.free([i for g in self.free_group for i in g])

    def clear(self):
        self.free_pages = list(range(1, SLOTS // self.page_size + 1))
        self.is_not_in_free_group, self.free_group = True, []


def test_a_page_withheld_after_a_failed_scrub_is_not_handed_out_after_the_allocator_is_cleared():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = GroupingAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    tokens = alloc.alloc(6)  # pages 1, 2, 3
    pool.fill(tokens, 0xE5)
    lib.kvh_inject_fault(1)
    alloc.free(tokens)
    assert wrapper.withheld == {1}
    alloc.clear()  # SGLang's flush_cache, once the server is idle
    handed = alloc.alloc(SLOTS)
    assert not {s // 2 for s in handed} & wrapper.withheld, "a withheld page was handed out again"
    pool.release()


def test_slots_given_back_by_clearing_the_allocator_are_zero_when_handed_out_again():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=1)
    alloc = GroupingAllocator(page_size=1)
    scrub_on_free(alloc, layouts_of(pool))
    cached = alloc.alloc(4)  # a finished request's prefix, kept by the prefix cache
    pool.fill(cached, 0xA7)
    alloc.clear()  # flush_cache: the prefix cache is reset, its slots are free again
    handed = alloc.alloc(SLOTS)
    assert set(cached) <= set(handed)
    assert all(pool.holds(s, 0) for s in cached), "a slot was handed out with the bytes of the request before"
    pool.release()


# Recent SGLang (RecentPagedAllocator, below) marks a free group by free_group being a list
# (None outside one), with no is_not_in_free_group attribute; a page freed in a group is
# scrubbed once with either.
@pytest.mark.parametrize("allocator", ["GroupingAllocator", "RecentPagedAllocator"])
def test_a_page_freed_inside_a_free_group_is_scrubbed_once(allocator):
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = globals()[allocator](page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    a, b = alloc.alloc(2), alloc.alloc(4)  # pages 1; 2 and 3
    pool.fill(a + b, 0xC9)
    alloc.free_group_begin()
    alloc.free(a)
    alloc.free(b)
    alloc.free_group_end()
    assert all(pool.holds(s, 0) for s in a + b)
    assert {1, 2, 3} <= set(alloc.free_pages)
    assert wrapper.scrubbed_pages == 3, f"3 pages freed, {wrapper.scrubbed_pages} page scrubs"
    pool.release()


def test_a_clear_whose_scrub_fails_is_refused_and_the_page_stays_withheld():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = GroupingAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    held = alloc.alloc(4)  # pages 1 and 2, kept by the prefix cache
    pool.fill(range(0, SLOTS + 2), 0x5A)
    lib.kvh_inject_fault(1)
    with pytest.raises(kvhygiene.ScrubVerificationError) as refused:
        alloc.clear()
    assert refused.value.failed_blocks == [0]
    assert wrapper.withheld == {0}
    assert not {1, 2} & set(alloc.free_pages), "the allocator was cleared"
    # A later clear that verifies every page clears the allocator, and the page with it.
    alloc.clear()
    assert wrapper.withheld == set() and {1, 2} <= set(alloc.free_pages)
    assert all(pool.holds(s, 0) for s in held)
    pool.release()


def test_a_withheld_page_freed_again_stays_withheld():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=1)
    alloc = TokenAllocator(page_size=1)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    tokens = alloc.alloc(2)
    pool.fill(tokens, 0x3E)
    lib.kvh_inject_fault(1)
    alloc.free(tokens)
    assert wrapper.withheld == {tokens[0]}
    alloc.free([tokens[0]])  # the engine frees it again
    assert tokens[0] not in alloc.free_pages
    pool.release()


def test_a_free_page_that_fails_verification_in_a_refused_clear_is_not_handed_out():
    # A clear scrubs every page, the ones already free in the allocator included. A page that
    # fails verification there is withheld (listed in ``withheld``): the allocator does not
    # hand it out afterwards, whether the page was held or already free.
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = GroupingAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    assert set(alloc.free_pages) == set(range(1, SLOTS // 2 + 1))
    # Bytes written into free pages after their scrub (a late write of a kernel, say): what
    # the scrub of the clear must catch.
    pool.fill(range(0, SLOTS + 2), 0x5A)
    lib.kvh_inject_fault(8)
    with pytest.raises(kvhygiene.ScrubVerificationError):
        alloc.clear()
    failed_free = wrapper.withheld - {0}
    assert failed_free, "a page the allocator holds free failed its scrub"
    handed = alloc.alloc(SLOTS)
    assert not {s // 2 for s in handed} & wrapper.withheld, (
        f"pages {sorted({s // 2 for s in handed} & wrapper.withheld)} failed verification and "
        "were handed out"
    )
    pool.release()


class SpeculativeAllocator(GroupingAllocator):
    """SGLang's ``backup_state`` / ``restore_state``: speculative decoding saves the free lists
    before a draft step and puts them back after it, which frees every page the step took
    without ``free``."""

    def __init__(self, page_size):
        super().__init__(page_size)
        self.release_pages = []

    def backup_state(self):
        return (list(self.free_pages), list(self.release_pages))

    def restore_state(self, state):
        self.free_pages, self.release_pages = state


def test_pages_a_restore_state_frees_are_zero_when_handed_out_again():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = SpeculativeAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    live = alloc.alloc(2)  # page 1: a request's, kept
    pool.fill(live, 0x11)
    saved = alloc.backup_state()
    draft = alloc.alloc(4)  # pages 2 and 3: a draft step's
    pool.fill(draft, 0xD7)
    alloc.restore_state(saved)
    assert {2, 3} <= set(alloc.free_pages)
    assert all(pool.holds(s, 0) for s in draft), "a page a restore freed kept the draft's bytes"
    assert all(pool.holds(s, 0x11) for s in live), "a live page was written"
    assert wrapper.scrubbed_pages == 2
    wrapper.uninstall()
    assert alloc.restore_state == SpeculativeAllocator.restore_state.__get__(alloc)
    pool.release()


def test_a_page_a_restore_frees_that_fails_verification_is_not_handed_out():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = SpeculativeAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    saved = alloc.backup_state()
    draft = alloc.alloc(4)  # pages 1 and 2
    pool.fill(draft, 0xD7)
    lib.kvh_inject_fault(1)
    alloc.restore_state(saved)
    assert wrapper.withheld == {1}
    assert 1 not in alloc.free_pages and 2 in alloc.free_pages
    handed = alloc.alloc(SLOTS)
    assert not {s // 2 for s in handed} & wrapper.withheld, "a withheld page was handed out"
    pool.release()


def test_a_withheld_page_in_the_saved_free_lists_stays_withheld_after_a_restore():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = SpeculativeAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    saved = alloc.backup_state()  # every page free, page 1 among them
    tokens = alloc.alloc(2)  # page 1
    pool.fill(tokens, 0xD7)
    lib.kvh_inject_fault(1)
    alloc.free(tokens)
    assert wrapper.withheld == {1}
    alloc.restore_state(saved)
    assert 1 not in alloc.free_pages, "the restore gave the withheld page back"
    pool.release()


def test_a_refused_scrub_at_a_restore_raises_and_leaves_the_free_lists_as_they_were():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = SpeculativeAllocator(page_size=2)
    scrub_on_free(alloc, layouts_of(pool))
    saved = alloc.backup_state()
    alloc.alloc(4)  # pages 1 and 2
    before = list(alloc.free_pages)
    pool.release()  # the pool's memory is freed: the scrub is refused
    with pytest.raises(kvhygiene.KvhError):
        alloc.restore_state(saved)
    assert alloc.free_pages == before, "pages that were not scrubbed were made free"


class StagingSpeculativeAllocator(SpeculativeAllocator):
    """A speculative allocator whose ``free`` stages pages in ``staged_pages`` (batches,
    counted in ``num_staged_pages``) and whose ``backup_state`` / ``restore_state`` save and
    put back the staged batches with the free lists."""

    def __init__(self, page_size):
        super().__init__(page_size)
        self.staged_pages = []
        self.num_staged_pages = 0

    def free(self, free_index):
        pages = sorted({i // self.page_size for i in free_index})
        self.staged_pages.append(pages)
        self.num_staged_pages += len(pages)

    def backup_state(self):
        return super().backup_state() + ([list(b) for b in self.staged_pages], self.num_staged_pages)

    def restore_state(self, state):
        self.free_pages, self.release_pages, staged, self.num_staged_pages = state
        self.staged_pages.clear()  # in place, as a list's owner may
        self.staged_pages.extend(staged)


def test_a_refused_scrub_at_a_restore_leaves_the_staged_pages_as_they_were():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = StagingSpeculativeAllocator(page_size=2)
    scrub_on_free(alloc, layouts_of(pool))
    first = alloc.alloc(2)  # page 1
    saved = alloc.backup_state()  # page 1 taken, nothing staged
    alloc.alloc(4)  # pages 2 and 3: a draft step's
    alloc.free(first)  # page 1 scrubbed, then staged
    staged, counted = [list(b) for b in alloc.staged_pages], alloc.num_staged_pages
    assert staged == [[1]] and counted == 1
    pool.release()  # the pool's memory is freed: the scrub is refused
    with pytest.raises(kvhygiene.KvhError):
        alloc.restore_state(saved)
    assert alloc.staged_pages == staged, "the refused restore dropped a page that was staged as free"
    assert alloc.num_staged_pages == counted


def test_an_allocator_whose_restore_frees_cannot_be_seen_is_refused():
    class Opaque(TokenAllocator):
        def restore_state(self, state):
            pass

    alloc = Opaque(page_size=1)
    del alloc.free_pages
    pool = Pool(kvhygiene.load(), page_size=1)
    with pytest.raises(AttributeError, match="has restore_state but no free_pages list"):
        scrub_on_free(alloc, layouts_of(pool))
    pool.release()


def test_one_allocator_shared_by_a_target_and_a_draft_pool_is_scrubbed_in_both():
    # EAGLE: the draft model has its own KV pool and uses the target's allocator. One
    # scrub_on_free with both pools' layouts scrubs a page freed by either (here by a
    # restore_state after a draft step) in both pools.
    lib = kvhygiene.load()
    target, draft = Pool(lib, page_size=2), Pool(lib, page_size=2, layers=1)
    alloc = SpeculativeAllocator(page_size=2)
    scrub_on_free(alloc, layouts_of(target) + layouts_of(draft))
    saved = alloc.backup_state()
    pages = alloc.alloc(4)  # pages 1 and 2
    draft.fill(pages, 0xD1)
    target.fill(pages, 0x7A)
    alloc.restore_state(saved)
    assert all(draft.holds(s, 0) for s in pages), "the draft pool kept the draft step's bytes"
    assert all(target.holds(s, 0) for s in pages)
    target.release()
    draft.release()


def test_a_clear_scrubs_every_page_of_pools_of_different_sizes():
    # A draft pool larger than the target's: the clear scrubs each pool over all its pages,
    # the larger one's last pages too, which the smaller pool does not have.
    lib = kvhygiene.load()
    target, draft = Pool(lib, page_size=2), Pool(lib, page_size=2, layers=1, slots=2 * SLOTS)
    alloc = SpeculativeAllocator(page_size=2)
    scrub_on_free(alloc, layouts_of(target) + layouts_of(draft))
    tail = list(range(target.rows, draft.rows))
    draft.fill(tail, 0xD2)
    target.fill(range(target.rows), 0x7B)
    alloc.clear()
    assert all(draft.holds(s, 0) for s in tail), "the larger pool's last pages kept their bytes"
    assert all(target.holds(s, 0) for s in range(target.rows))
    target.release()
    draft.release()


def test_a_free_page_that_failed_verification_stays_out_of_the_allocator_when_a_later_scrub_of_the_clear_is_refused():
    # A clear scrubs every page in every layout. When a page the allocator holds free fails
    # verification and a later scrub of the same clear is refused or does not finish (another
    # pool's memory, a backend error, a graph capture), the clear raises: the failed page is
    # still withheld and taken out of the free lists, as for a clear that only found failures.
    lib = kvhygiene.load()
    target, draft = Pool(lib, page_size=2), Pool(lib, page_size=2, layers=1)
    alloc = GroupingAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(target) + layouts_of(draft))
    target.fill(range(0, SLOTS + 2), 0x5A)
    draft.release()  # the draft pool's scrub is now refused (its memory is not live)
    lib.kvh_inject_fault(8)  # the target's pages 0 and 1 (4 regions each) fail verification
    with pytest.raises(kvhygiene.KvhError):
        alloc.clear()
    assert not target.holds(2, 0) or not target.holds(3, 0), "page 1 verified clean"
    handed = {s // 2 for s in alloc.alloc(SLOTS)}
    assert 1 not in handed, (
        f"page 1 failed verification in the clear and was handed out (withheld: {sorted(wrapper.withheld)})"
    )
    target.release()


def test_a_page_size_that_is_not_an_integer_is_refused_not_taken_for_one_slot():
    # pages_of's page_size is a number of token slots. A value that is not an integer (4.0
    # read from a JSON config, "4" from an environment variable) is refused, or read as the
    # 4 it says; it is never taken for a page of one slot, which would name token indices as
    # pages (here page 9, another request's, instead of page 2).
    for page_size in (4.0, "4"):
        try:
            pages = pages_of([8, 9, 10, 11], page_size)
        except (TypeError, ValueError):
            continue
        assert pages == [2], f"page_size {page_size!r}: pages {pages}"


def test_pages_a_scrub_error_names_failed_are_withheld(monkeypatch):
    # A scrub of many pages is split over several library calls; when a later call stops on
    # an error, the KvhError names in failed_blocks the pages an earlier call found failed.
    # The free raises, and those pages are withheld: freed again, they are not given back.
    import kvhygiene.sglang as kv_sglang

    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = TokenAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    tokens = alloc.alloc(4)  # pages 1 and 2

    def stopped(layout, pages, stream=None):
        error = kvhygiene.KvhError("kvh_scrub_blocks", 7012, "backend error")
        error.failed_blocks = [2]
        raise error

    monkeypatch.setattr(kv_sglang, "scrub_blocks", stopped)
    with pytest.raises(kvhygiene.KvhError):
        alloc.free(tokens)
    monkeypatch.undo()
    assert alloc.freed == [] and 2 in wrapper.withheld
    alloc.free(tokens)  # the engine frees them again
    assert 2 not in alloc.free_pages, "a page named failed was given back to the allocator"
    assert 1 in alloc.free_pages
    pool.release()


def test_layouts_are_on_the_device_of_the_pool_tensors():
    # A pool on device 1 is scrubbed on device 1; tensors on two devices make two layouts.
    one = NS(page_size=1, k_buffer=[FakeTensor(0x1000, (17, 2, 8), device_index=1)],
             v_buffer=[FakeTensor(0x9000, (17, 2, 8), device_index=1)])
    (layout,) = layouts_of(one)
    assert layout.device == 1 and layout.regions == (0x1000, 0x9000)
    split = NS(page_size=1, k_buffer=[FakeTensor(0x1000, (17, 2, 8), device_index=1)],
               v_buffer=[FakeTensor(0x9000, (17, 2, 8), device_index=0)])
    assert sorted((lay.device, lay.regions) for lay in layouts_of(split)) == [(0, (0x9000,)), (1, (0x1000,))]


class IdTensor:
    """The parts of a torch tensor of page ids the module uses (SGLang's free lists are
    tensors): ``tolist``, ``new_tensor``, iteration, slicing."""

    def __init__(self, ids):
        self.ids = list(ids)

    def tolist(self):
        return list(self.ids)

    def new_tensor(self, ids):
        return IdTensor(ids)

    def __iter__(self):
        return iter(self.ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        return IdTensor(self.ids[key])


def test_a_page_that_fails_verification_is_taken_out_of_free_lists_held_as_tensors():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = GroupingAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    alloc.free_pages = IdTensor(alloc.free_pages)
    pool.fill(range(0, SLOTS + 2), 0x5A)
    lib.kvh_inject_fault(8)
    with pytest.raises(kvhygiene.ScrubVerificationError):
        alloc.clear()
    failed_free = wrapper.withheld - {0}
    assert failed_free, "a page the allocator holds free failed its scrub"
    assert isinstance(alloc.free_pages, IdTensor)
    assert not failed_free & set(alloc.free_pages.tolist()), (
        f"pages {sorted(failed_free & set(alloc.free_pages.tolist()))} failed verification and are still free"
    )
    pool.release()


def test_pages_a_restore_state_puts_back_in_release_pages_are_zero():
    # SGLang's paged allocator keeps pages freed lately in release_pages until it merges them
    # into free_pages. A draft step that took such pages gives them back there by a restore.
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = SpeculativeAllocator(page_size=2)
    alloc.free_pages = [p for p in alloc.free_pages if p not in (5, 6)]
    alloc.release_pages = [5, 6]
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    saved = alloc.backup_state()
    alloc.release_pages = []  # the draft step merges them and takes pages 5 and 6
    pool.fill(range(10, 14), 0xD9)
    alloc.restore_state(saved)
    assert alloc.release_pages == [5, 6]
    assert all(pool.holds(s, 0) for s in range(10, 14)), "a page the restore made free kept the draft step's bytes"
    assert wrapper.scrubbed_pages == 2
    pool.release()


def test_a_page_found_failed_in_an_earlier_part_of_a_clear_stays_out_when_a_later_part_is_refused(monkeypatch):
    # A clear scrubs the pool in parts (_CLEAR_CHUNK pages each). A free page that fails
    # verification in one part is withheld and taken out of the free lists when a later
    # part raises.
    import kvhygiene.sglang as kv_sglang

    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = GroupingAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    monkeypatch.setattr(kv_sglang, "_CLEAR_CHUNK", 4)
    real = kv_sglang.scrub_blocks

    def refuse_from_page_4(layout, pages, stream=None):
        if 4 in pages:
            raise kvhygiene.KvhError("kvh_scrub_blocks", 7020, "not inside a live allocation")
        return real(layout, pages, stream=stream)

    monkeypatch.setattr(kv_sglang, "scrub_blocks", refuse_from_page_4)
    pool.fill(range(0, SLOTS + 2), 0x5A)
    lib.kvh_inject_fault(8)  # pages 0 and 1 of the first part fail
    with pytest.raises(kvhygiene.KvhError):
        alloc.clear()
    assert not pool.holds(2, 0) or not pool.holds(3, 0), "page 1 verified clean"
    assert 1 in wrapper.withheld
    handed = {s // 2 for s in alloc.alloc(SLOTS)}
    assert 1 not in handed, "page 1 failed verification in the clear and was handed out"
    pool.release()


def test_pages_a_free_group_collected_before_the_allocator_was_wrapped_are_scrubbed_at_its_end():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = GroupingAllocator(page_size=2)
    tokens = alloc.alloc(4)  # pages 1 and 2
    pool.fill(tokens, 0xC4)
    alloc.free_group_begin()
    alloc.free(tokens)  # collected by the group, not scrubbed: the allocator is not wrapped yet
    scrub_on_free(alloc, layouts_of(pool))
    alloc.free_group_end()
    assert {1, 2} <= set(alloc.free_pages)
    assert all(pool.holds(s, 0) for s in tokens), "a page came back through the wrapped free unscrubbed"
    pool.release()


def test_a_page_size_given_as_a_bool_is_refused():
    # True is 1 to operator.index: a page of one slot would name token indices as pages.
    with pytest.raises(TypeError, match="bool"):
        pages_of([8, 9], True)
    with pytest.raises(TypeError, match="bool"):
        layouts_of(NS(page_size=1, kv_buffer=[FakeTensor(0x1000, (18, 2, 8))]), page_size=True)


def test_pages_of_two_slots_over_rows_that_are_not_dense_are_refused():
    # Rows of 32 bytes every 64: a page of two slots is not one run of memory, and a scrub of
    # 64 bytes from its first row would miss the second row.
    gappy = FakeTensor(0x1000, (18, 2, 8), stride=(32, 8, 1))
    with pytest.raises(ValueError, match="not one dense run"):
        layouts_of(NS(page_size=2, kv_buffer=[gappy]))


def _one_bad_page(pool, layouts, tenant):
    """Frees page 1 through scrub_on_free with every one of its segments sabotaged; returns the
    verify_failed anomalies it added."""
    lib = kvhygiene.load()
    alloc = TokenAllocator(page_size=2)
    wrapper = scrub_on_free(alloc, layouts)

    def verify_failed_anomalies():
        return kvhygiene.stats()["anomaly"]["by_signal"]["verify_failed"]

    before = verify_failed_anomalies()
    with kvhygiene.context(tenant_id=tenant, request_id="req-1"):
        tokens = alloc.alloc(2)  # page 1
        pool.fill(tokens, 0xA7)
        # Every segment of page 1: its K and V rows in both layers, in every layout.
        lib.kvh_inject_fault(sum(len(layout.regions) for layout in layouts))
        alloc.free(tokens)
    assert wrapper.withheld == {1}
    return verify_failed_anomalies() - before


def test_a_page_that_fails_in_every_layer_of_a_layout_is_one_failed_verification():
    # README ("Anomalies"): a KV block that fails a call counts once toward the detector,
    # however many of its regions (layers' K and V) failed: a single bad page of a pool of one
    # geometry (one layout, one call) is no `verify_failed` burst (threshold 2).
    pool = Pool(kvhygiene.load(), page_size=2)
    assert _one_bad_page(pool, layouts_of(pool), "tenant-one-bad-page") == 0
    pool.release()


def test_a_page_that_fails_in_two_layouts_counts_once_in_each():
    # K and V rows of different head sizes are two layouts, scrubbed in two calls (a pool's
    # scrub must not depend on another's): the page counts once per call, and its two failed
    # verifications are a burst, as the README says.
    pool = Pool(kvhygiene.load(), page_size=2, k_dim=8, v_dim=16)
    layouts = layouts_of(pool)
    assert len(layouts) == 2
    assert _one_bad_page(pool, layouts, "tenant-two-geometries") == 1
    pool.release()


class RecentPagedAllocator:
    """SGLang's paged token allocator as python/sglang/srt/mem_cache/allocator/base.py and
    allocator/paged.py have it at commit 0122d6f6317ad9dad94da758354db698d65b9b84 (the
    allocator package that replaced mem_cache/allocator.py), with lists for tensors:

    - a free group is ``free_group`` being a list (``None`` outside one); there is no
      ``is_not_in_free_group``;
    - ``free(free_index)`` gives back the pages of the indices (to ``staged_pages``, a list of
      page-id batches, when ``need_sort``; there is no ``release_pages`` list);
    - ``free_segment(free_index, start_pos=...)`` (what the radix cache's eviction and
      ``cache_finished_req`` call) takes every ``page_size``-th index as its page's
      representative and gives those pages back itself, without calling ``free``; inside a
      free group they wait in ``free_page_reps_group`` and ``free_group_end`` gives them back
      the same way;
    - ``backup_state`` / ``restore_state`` are gone from the allocator."""

    def __init__(self, page_size, need_sort=False):
        self.page_size = page_size
        self.need_sort = need_sort
        self.release_pages = None
        self.clear()

    def clear(self):
        self.free_pages = list(range(1, SLOTS // self.page_size + 1))
        self.free_group = None
        self.free_page_reps_group = []
        self.staged_pages = []
        self.num_staged_pages = 0

    def merge_and_sort_free(self):
        if self.staged_pages:
            self.free_pages = sorted(self.free_pages + [p for batch in self.staged_pages for p in batch])
            self.staged_pages, self.num_staged_pages = [], 0

    def alloc(self, tokens):
        need = -(-tokens // self.page_size)
        if need > len(self.free_pages):
            self.merge_and_sort_free()
        pages, self.free_pages = self.free_pages[:need], self.free_pages[need:]
        return [p * self.page_size + k for p in pages for k in range(self.page_size)][:tokens]

    def _release_page_ids(self, pages):
        if self.need_sort:
            self.staged_pages.append(list(pages))
            self.num_staged_pages += len(pages)
        else:
            self.free_pages = list(pages) + self.free_pages

    def free(self, free_index):
        free_index = list(free_index)
        if not free_index:
            return
        if self.free_group is None:
            self._release_page_ids(sorted({i // self.page_size for i in free_index}))
        else:
            self.free_group.append(free_index)

    def free_segment(self, free_index, *, start_pos):
        assert start_pos % self.page_size == 0
        reps = list(free_index)[:: self.page_size]
        if not reps:
            return
        if self.free_group is None:
            self._release_page_ids([i // self.page_size for i in reps])
        else:
            self.free_page_reps_group.append(reps)

    def free_group_begin(self):
        assert self.free_group is None
        self.free_group = []
        self.free_page_reps_group = []

    def free_group_end(self):
        pending, self.free_group = self.free_group, None
        if pending:
            self.free([i for batch in pending for i in batch])
        if self.free_page_reps_group:
            self._release_page_ids([i // self.page_size for batch in self.free_page_reps_group for i in batch])
            self.free_page_reps_group = []


def test_pages_a_prefix_cache_eviction_gives_back_by_free_segment_are_zero():
    # Recent SGLang's radix cache evicts a node with
    # token_to_kv_pool_allocator.free_segment(node.value, start_pos=0), and a finished
    # request's pages go back the same way; the paged allocator's free_segment gives the
    # pages back without going through free. Those pages must be scrubbed before they are
    # handed out again, as pages given back by free are.
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = RecentPagedAllocator(page_size=2)
    scrub_on_free(alloc, layouts_of(pool))
    cached = alloc.alloc(4)  # pages 1 and 2: a prefix-cache node's
    pool.fill(cached, 0xE1)
    alloc.free_segment(cached, start_pos=0)  # the node is evicted
    handed = alloc.alloc(4)
    assert set(handed) == set(cached)
    stale = [s for s in handed if not pool.holds(s, 0)]
    pool.release()
    assert not stale, f"slots {stale} were handed out with the evicted prefix's bytes"


def test_a_staged_free_page_that_fails_verification_in_a_refused_clear_is_not_handed_out():
    # Recent SGLang's paged allocator with need_sort (P/D disaggregation) keeps freed pages in
    # staged_pages, a list of page-id batches, until an allocation runs short and merges them
    # into free_pages; it has no release_pages list. A page in staged_pages that fails
    # verification in a clear is withheld and must not be handed out afterwards.
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = RecentPagedAllocator(page_size=2, need_sort=True)
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    tokens = alloc.alloc(4)  # pages 1 and 2
    alloc.free(tokens)  # scrubbed, then staged
    assert alloc.num_staged_pages == 2
    pool.fill(range(0, SLOTS + 2), 0x5A)  # written after their scrub (a late kernel write)
    lib.kvh_inject_fault(8)  # pages 0 and 1 (4 regions each) fail verification
    with pytest.raises(kvhygiene.ScrubVerificationError):
        alloc.clear()
    assert 1 in wrapper.withheld
    handed = {s // 2 for s in alloc.alloc(SLOTS)}
    pool.release()
    assert 1 not in handed, "page 1 failed verification in the clear and was handed out from staged_pages"


class RecentTokenAllocator:
    """SGLang's non-paged token allocator (``TokenToKVPoolAllocator``, ``page_size`` 1, the
    default) of the allocator package, with lists for tensors: its ``free`` reads a free group
    from ``free_group`` (``None`` outside one), and it has no ``free_segment`` of its own, so
    the base class's runs (python/sglang/srt/mem_cache/allocator/base.py at commit
    0122d6f6317ad9dad94da758354db698d65b9b84, ``BaseTokenToKVPoolAllocator.free_segment``):
    it checks that ``start_pos`` is page-aligned and calls ``self.free(free_index)``."""

    page_size = 1

    def __init__(self):
        self.release_pages = []
        self.clear()

    def clear(self):
        self.free_pages = list(range(1, SLOTS + 1))
        self.free_group = None

    def alloc(self, tokens):
        out, self.free_pages = self.free_pages[:tokens], self.free_pages[tokens:]
        return out

    def free(self, free_index):
        free_index = list(free_index)
        if not free_index:
            return
        if self.free_group is None:
            self.free_pages = self.free_pages + free_index
        else:
            self.free_group.append(free_index)

    def free_segment(self, free_index, *, start_pos):
        assert start_pos % self.page_size == 0
        self.free(free_index)

    def free_group_begin(self):
        assert self.free_group is None
        self.free_group = []

    def free_group_end(self):
        pending, self.free_group = self.free_group, None
        if pending:
            self.free([i for batch in pending for i in batch])


def test_a_slot_a_prefix_cache_eviction_frees_by_free_segment_is_scrubbed_once_with_one_slot_pages(monkeypatch):
    # SGLang's radix cache evicts with token_to_kv_pool_allocator.free_segment(node.value,
    # start_pos=0) whatever the page size; with pages of one slot the allocator's free_segment
    # is the base class's, which calls free. The module's documentation: a freed page is
    # scrubbed (once) before the allocator's own method runs.
    import kvhygiene.sglang as sg

    scrubbed = []
    real = sg.scrub_blocks

    def counting(layout, pages, **kw):
        scrubbed.extend(pages)
        return real(layout, pages, **kw)

    lib = kvhygiene.load()
    pool = Pool(lib, page_size=1)
    alloc = RecentTokenAllocator()
    wrapper = scrub_on_free(alloc, layouts_of(pool))
    monkeypatch.setattr(sg, "scrub_blocks", counting)
    cached = alloc.alloc(3)
    pool.fill(cached, 0xB2)
    alloc.free_segment(cached, start_pos=0)  # the node is evicted
    counted = wrapper.scrubbed_pages
    pool.release()
    assert all(scrubbed.count(s) == 1 for s in cached) and counted == 3, (
        f"3 slots freed by free_segment: scrub calls named {sorted(scrubbed)}, scrubbed_pages "
        f"counts {counted}"
    )


@pytest.mark.parametrize("allocator", ["RecentPagedAllocator", "PagedAllocator0523"])
def test_pages_a_free_segment_left_in_a_free_group_before_the_allocator_was_wrapped_are_scrubbed_at_its_end(allocator):
    # As for pages free collected in a group before the allocator was wrapped: the recent paged
    # allocator's free_group_end gives back the pages free_segment collected in the group
    # (free_page_reps_group, first slots) itself, without free, and SGLang 0.5.23's
    # (allocator/paged.py: free_segment -> free_page_ids) those it keeps in
    # free_page_ids_group (page ids) through _release_page_ids; they must be zero before they
    # are handed out again.
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = globals()[allocator](page_size=2)
    tokens = alloc.alloc(4)  # pages 1 and 2
    pool.fill(tokens, 0xC4)
    alloc.free_group_begin()
    alloc.free_segment(tokens, start_pos=0)  # collected by the group: not wrapped yet
    scrub_on_free(alloc, layouts_of(pool))
    alloc.free_group_end()
    handed = alloc.alloc(4)
    stale = [s for s in handed if not pool.holds(s, 0)]
    pool.release()
    assert set(handed) == set(tokens)
    assert not stale, f"slots {stale} came back from the free group's end with their bytes"


def test_readme_lists_every_attribute_name_the_module_reads():
    # README ("SGLang"): "It reads attribute names only (...)" and is tested against stand-ins
    # of them: the list is what an operator checks a new SGLang release against, so every
    # name the module reads of the pool or the allocator is in it.
    import re
    from pathlib import Path

    import kvhygiene.sglang as module

    root = Path(__file__).resolve().parents[2]
    readme = " ".join((root / "README.md").read_text().split())
    listed = re.search(r"It reads attribute names only \((.*?)\) and is tested", readme)
    assert listed, "README.md's SGLang paragraph lists the attribute names read"
    names_listed = set(re.findall(r"`([a-z_]+)`", listed.group(1)))
    source = Path(module.__file__).read_text()
    read = set(re.findall(r'(?:getattr|hasattr)\((?:self\.)?(?:allocator|kv_pool|source), "([a-z_]+)"', source))
    read |= set(re.findall(r"\ballocator\.([a-z_]+)\b", source))
    read |= set(module._FREE_LISTS) | {module._STAGED}
    assert read - names_listed == set(), f"read by kvhygiene/sglang.py, not in README's list: {sorted(read - names_listed)}"


def test_a_page_size_that_contradicts_the_allocators_own_is_refused_or_still_scrubs_what_a_restore_frees():
    # scrub_on_free's page_size defaults to the allocator's. One given that contradicts the
    # allocator's own page_size (1 for an allocator of pages of 2, whose free lists hold page
    # ids) would read its page ids as token slots. Either the wrap is refused, as layouts of
    # another page size are, or the pages a restore_state frees are still zero when handed out.
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=2)
    alloc = SpeculativeAllocator(page_size=2)
    try:
        scrub_on_free(alloc, layouts_of(pool, page_size=1), page_size=1)
    except ValueError:
        pool.release()
        return
    saved = alloc.backup_state()
    draft = alloc.alloc(4)  # pages 1 and 2: slots 2..5
    pool.fill(draft, 0xD7)
    alloc.restore_state(saved)
    stale = [s for s in draft if not pool.holds(s, 0)]
    pool.release()
    assert not stale, f"slots {stale} a restore freed were handed back with the draft step's bytes"


class FP4Pool:
    """SGLang's FP4 MHA token KV pool (``MHATokenToKVPoolFP4`` in
    python/sglang/srt/mem_cache/memory_pool.py), in kvhygiene memory: per layer, ``k_buffer`` and
    ``v_buffer`` of ``[size + page_size, heads, head_dim // 2]`` uint8 (two FP4 values a byte)
    and ``k_scale_buffer`` and ``v_scale_buffer`` of ``[size + page_size, heads * head_dim //
    16]`` uint8 (one block scale per 16 values). ``set_kv_buffer`` writes the packed values and
    their scales at the same token slots (``k_scale_buffer[layer][loc] = ...``): a scale row
    belongs to the token slot of its index, as the K and V rows do."""

    HEAD_DIM = 32

    def __init__(self, lib, page_size, layers=2, slots=SLOTS):
        self.page_size = page_size
        self.rows = slots + page_size
        self.data_row = HEADS * self.HEAD_DIM // 2
        self.scale_row = HEADS * self.HEAD_DIM // 16
        self.size = layers * self.rows * 2 * (self.data_row + self.scale_row)
        self.lib = lib
        self.base = lib.kvh_malloc(self.size, 0, None)
        at = self.base
        self.k_buffer, self.v_buffer, self.k_scale_buffer, self.v_scale_buffer = [], [], [], []
        for _ in range(layers):
            for out in (self.k_buffer, self.v_buffer):
                out.append(FakeTensor(at, (self.rows, HEADS, self.HEAD_DIM // 2), element_size=1))
                at += self.rows * self.data_row
            for out in (self.k_scale_buffer, self.v_scale_buffer):
                out.append(FakeTensor(at, (self.rows, self.scale_row), element_size=1))
                at += self.rows * self.scale_row

    def data_buffers(self):
        return self.k_buffer + self.v_buffer

    def scale_buffers(self):
        return self.k_scale_buffer + self.v_scale_buffer

    def fill(self, slots, byte):
        rows = [(t, self.data_row) for t in self.data_buffers()]
        rows += [(t, self.scale_row) for t in self.scale_buffers()]
        for t, row in rows:
            for s in slots:
                ctypes.memset(t.data_ptr() + s * row, byte, row)

    def scale_bytes_of(self, slot):
        return [ctypes.string_at(t.data_ptr() + slot * self.scale_row, self.scale_row) for t in self.scale_buffers()]

    def release(self):
        self.lib.kvh_free(self.base, self.size, 0, None)
        kvhygiene.synchronize()


def _slots_handed_out_with_freed_scales(pool) -> list:
    """A request's slots written (values and block scales), freed through the wrapped allocator
    and handed out again: those whose scale rows are not zero."""
    alloc = TokenAllocator(page_size=1)
    scrub_on_free(alloc, layouts_of(pool))
    a = alloc.alloc(4)
    pool.fill(a, 0xA1)  # request a writes its values and their block scales
    alloc.free(a)
    handed = alloc.alloc(SLOTS)
    stale = [s for s in a if s in handed and any(row != bytes(pool.scale_row) for row in pool.scale_bytes_of(s))]
    pool.release()
    return stale


def test_the_fp4_block_scales_of_freed_slots_are_zero_when_the_slots_are_handed_out_again():
    # With an FP4 KV cache (--kv-cache-dtype fp4_e2m1) SGLang keeps, next to the packed K and V
    # rows, one row of block scales per token slot and layer (k_scale_buffer, v_scale_buffer),
    # written at the same slot indices as the K and V rows. The scales are computed from the
    # request's keys and values. layouts_of takes the pool's k_buffer and v_buffer and the
    # module's documentation promises that every page freed is zeroed before it is handed out
    # again; the scale rows of a freed slot are part of what that slot holds.
    stale = _slots_handed_out_with_freed_scales(FP4Pool(kvhygiene.load(), page_size=1))
    assert not stale, f"slots {stale} were handed out with the freed request's FP4 block scales"


class SWAAllocator:
    """SGLang's allocator for sliding-window hybrid models (``SWATokenToKVPoolAllocator`` in
    python/sglang/srt/mem_cache/allocator/swa.py at sgl-project/sglang commit
    0019020ab3cd450a4f8fba13dff2dfb6dd7801af), with lists for tensors: it sets ``free_pages``
    and ``release_pages`` to ``None`` and keeps its free lists in two inner allocators
    (``full_attn_allocator``, ``swa_attn_allocator``, each a token allocator of the base class in
    allocator/base.py, whose ``backup_state`` / ``restore_state`` save and put back
    ``(free_pages, release_pages)``); its own ``backup_state`` returns the two inner states and
    its ``restore_state`` hands each back to its inner allocator, freeing every slot taken since
    without ``free``. Slot indices it hands out are the full pool's (``page_size`` 1 here)."""

    page_size = 1

    def __init__(self):
        self.full_attn_allocator = SpeculativeAllocator(page_size=1)
        self.swa_attn_allocator = SpeculativeAllocator(page_size=1)
        self.free_pages = None
        self.release_pages = None
        self.is_not_in_free_group = True
        self.free_group = []
        self.full_to_swa = {}

    def alloc(self, tokens):
        full = self.full_attn_allocator.alloc(tokens)
        swa = self.swa_attn_allocator.alloc(tokens)
        self.full_to_swa.update(zip(full, swa))
        return full

    def free(self, free_index):
        free_index = list(free_index)
        if not free_index:
            return
        if not self.is_not_in_free_group:
            self.free_group.append(free_index)
            return
        self.full_attn_allocator.free(free_index)
        self.swa_attn_allocator.free([self.full_to_swa.pop(i) for i in free_index if i in self.full_to_swa])

    def backup_state(self):
        return [self.full_attn_allocator.backup_state(), self.swa_attn_allocator.backup_state()]

    def restore_state(self, state):
        self.full_attn_allocator.restore_state(state[0])
        self.swa_attn_allocator.restore_state(state[1])


def test_slots_a_sliding_window_allocators_restore_state_frees_are_zero_or_the_allocator_is_refused():
    # Speculative decoding on a sliding-window hybrid model (gpt-oss, Gemma 3) saves and puts back
    # the free lists of SGLang's SWA allocator around a draft step. Its own free_pages and
    # release_pages are None; the lists a restore changes are its inner allocators'. The module
    # refuses an allocator with restore_state whose freed pages it cannot see ("has
    # restore_state but no free_pages list"); here it either refuses this one too or scrubs the
    # slots its restore_state frees.
    lib = kvhygiene.load()
    full_pool = Pool(lib, page_size=1)
    alloc = SWAAllocator()
    try:
        scrub_on_free(alloc, layouts_of(full_pool))
    except (AttributeError, ValueError) as e:
        full_pool.release()
        assert "full_attn_allocator" in str(e), e
        return
    saved = alloc.backup_state()
    draft = alloc.alloc(4)  # a draft step's slots
    full_pool.fill(draft, 0xD7)
    alloc.restore_state(saved)
    handed = alloc.alloc(SLOTS)
    stale = [s for s in draft if s in handed and not full_pool.holds(s, 0)]
    full_pool.release()
    assert not stale, (
        f"slots {stale} freed by the SWA allocator's restore_state were handed out with the draft step's bytes"
    )


def test_a_sliding_window_allocators_inner_allocators_wrapped_each_scrub_what_a_restore_frees():
    # The refusal above says to wrap each inner allocator with its own pool's layouts: then
    # the slots the outer restore_state gives back, in both pools, are zero when handed out.
    lib = kvhygiene.load()
    full_pool, swa_pool = Pool(lib, page_size=1), Pool(lib, page_size=1)
    alloc = SWAAllocator()
    scrub_on_free(alloc.full_attn_allocator, layouts_of(full_pool))
    scrub_on_free(alloc.swa_attn_allocator, layouts_of(swa_pool))
    saved = alloc.backup_state()
    draft = alloc.alloc(4)
    draft_swa = [alloc.full_to_swa[s] for s in draft]
    full_pool.fill(draft, 0xD7)
    swa_pool.fill(draft_swa, 0xD7)
    alloc.restore_state(saved)
    try:
        assert all(full_pool.holds(s, 0) for s in draft)
        assert all(swa_pool.holds(s, 0) for s in draft_swa)
    finally:
        full_pool.release()
        swa_pool.release()


class MLAFP4Pool(FP4Pool):
    """SGLang's FP4 MLA token KV pool (``MLATokenToKVPoolFP4`` in
    python/sglang/srt/mem_cache/memory_pool.py), in kvhygiene memory: per layer, ``kv_buffer`` of
    ``[size + page_size, 1, kv_cache_dim // 2]`` uint8 and ``kv_scale_buffer`` of ``[size +
    page_size, kv_cache_dim // 16]`` uint8, the block scales written at the same token slots as
    the packed latent rows."""

    KV_DIM = 64

    def __init__(self, lib, page_size, layers=2, slots=SLOTS):
        self.page_size = page_size
        self.rows = slots + page_size
        self.data_row = self.KV_DIM // 2
        self.scale_row = self.KV_DIM // 16
        self.size = layers * self.rows * (self.data_row + self.scale_row)
        self.lib = lib
        self.base = lib.kvh_malloc(self.size, 0, None)
        at = self.base
        self.kv_buffer, self.kv_scale_buffer = [], []
        for _ in range(layers):
            self.kv_buffer.append(FakeTensor(at, (self.rows, 1, self.data_row), element_size=1))
            at += self.rows * self.data_row
            self.kv_scale_buffer.append(FakeTensor(at, (self.rows, self.scale_row), element_size=1))
            at += self.rows * self.scale_row

    def data_buffers(self):
        return self.kv_buffer

    def scale_buffers(self):
        return self.kv_scale_buffer


def test_the_fp4_block_scales_of_an_mla_pools_freed_slots_are_zero_when_handed_out_again():
    # An FP4 KV cache on an MLA model (DeepSeek) is SGLang's MLATokenToKVPoolFP4: next to
    # kv_buffer it keeps one row of block scales per token slot and layer in kv_scale_buffer,
    # written at the same slots. The module documents that an FP4 pool's block-scale rows are
    # scrubbed with the slots they belong to.
    stale = _slots_handed_out_with_freed_scales(MLAFP4Pool(kvhygiene.load(), page_size=1))
    assert not stale, f"slots {stale} were handed out with the freed request's FP4 block scales (kv_scale_buffer)"


def test_a_pool_with_a_scale_buffer_of_another_name_is_refused_and_its_methods_are_not():
    # Per-slot data the module does not know would be left unscrubbed: refused by name. A
    # method whose name ends the same way is no buffer.
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=1)
    try:
        pool.q_scale_buffer = [FakeTensor(pool.base, (pool.rows, 4), element_size=1)]
        with pytest.raises(ValueError, match="q_scale_buffer"):
            layouts_of(pool)
        del pool.q_scale_buffer
        pool.get_scale_buffer = lambda layer: None
        assert layouts_of(pool)
    finally:
        pool.release()


def test_an_nsa_pools_indexer_buffer_is_not_refused_as_an_unknown_scale_buffer():
    # SGLang's NSATokenToKVPool (DeepSeek V3.2 sparse attention) is an MLA pool which also
    # keeps, per layer, index_k_with_scale_buffer: the indexer's keys and their scales packed
    # per page ([pages, page_size * 132] uint8, read by get_index_k_with_scale_buffer). The
    # module documents sparse-attention index buffers as not covered, not as a reason to
    # refuse the pool; its kv_buffer rows are per-slot and scrubbed as an MLA pool's.
    lib = kvhygiene.load()
    pool = MLAFP4Pool(lib, page_size=1)
    try:
        pool.kv_scale_buffer = None
        pool.index_k_with_scale_buffer = [
            FakeTensor(t.data_ptr(), (pool.rows, 132), element_size=1) for t in pool.kv_buffer
        ]
        assert layouts_of(pool)
    finally:
        pool.release()


class PagedAllocator0523(RecentPagedAllocator):
    """SGLang 0.5.23's ``PagedTokenToKVPoolAllocator`` (sglang/srt/mem_cache/allocator/paged.py,
    with base.py's ``BaseTokenToKVPoolAllocator``), with lists for tensors:

    - ``free(free_index)`` gives back ``unique(free_index // page_size)`` through
      ``_release_page_ids`` (inside a free group: appended to ``free_group``);
    - ``free_segment(free_index, start_pos=...)`` takes ``free_index[::page_size]`` and calls
      ``self.free_page_ids(reps // page_size)``;
    - ``free_page_ids(page_ids)`` ("free exactly these pages") gives page ids back through
      ``_release_page_ids`` without ``free``; inside a free group they wait in
      ``free_page_ids_group`` (page ids, not first slots), which ``free_group_end`` gives back
      through ``_release_page_ids``;
    - ``release_pages`` stays ``None`` (set by the base ``__init__``); ``need_sort`` stages pages
      in ``staged_pages``."""

    def clear(self):
        super().clear()
        self.free_page_ids_group = []

    def free_segment(self, free_index, *, start_pos):
        free_index = list(free_index)
        if not free_index:
            return
        assert start_pos % self.page_size == 0
        reps = free_index[:: self.page_size]
        self.free_page_ids([r // self.page_size for r in reps])

    def free_page_ids(self, page_ids):
        page_ids = list(page_ids)
        if not page_ids:
            return
        if self.free_group is None:
            self._release_page_ids(page_ids)
        else:
            self.free_page_ids_group.append(page_ids)

    def free_group_begin(self):
        super().free_group_begin()
        self.free_page_ids_group = []

    def free_group_end(self):
        super().free_group_end()
        if self.free_page_ids_group:
            self._release_page_ids([p for batch in self.free_page_ids_group for p in batch])
            self.free_page_ids_group = []


class SWAAllocator0523:
    """SGLang 0.5.23's ``SWATokenToKVPoolAllocator`` (sglang/srt/mem_cache/allocator/swa.py) at
    ``page_size`` > 1, with lists for tensors and a dict for ``full_to_swa_index_mapping``: two
    inner ``PagedTokenToKVPoolAllocator`` (``full_attn_allocator``, ``swa_attn_allocator``), its
    own ``free_pages`` / ``release_pages`` ``None``.

    - ``free_segment(free_index, start_pos=...)`` (radix_cache.py ``cache_finished_req`` /
      eviction, common.py ``free_kv_row_segments``) calls ``free_swa_segment`` and then
      ``full_attn_allocator.free_segment``;
    - ``free_swa_segment`` -> ``_free_swa_pages``: the SWA peers of ``free_index[::page_size]``
      become page ids (``swa_tokens // page_size``), and outside a free group go back through
      ``self.swa_attn_allocator.free_page_ids(swa_pages)``, inside one wait in
      ``swa_page_ids_group`` until ``free_group_end`` calls ``free_page_ids`` on them."""

    def __init__(self, page_size):
        self.page_size = page_size
        self.full_attn_allocator = PagedAllocator0523(page_size)
        self.swa_attn_allocator = PagedAllocator0523(page_size)
        self.free_pages = None
        self.release_pages = None
        self.free_group = None
        self.swa_free_group = []
        self.swa_page_ids_group = []
        self.full_to_swa = {}

    def alloc(self, tokens):
        full = self.full_attn_allocator.alloc(tokens)
        swa = self.swa_attn_allocator.alloc(tokens)
        self.full_to_swa.update(zip(full, swa))
        return full

    def free_swa_segment(self, free_index, *, start_pos):
        free_index = list(free_index)
        if not free_index:
            return
        ps = self.page_size
        assert start_pos % ps == 0
        reps = free_index[::ps]
        swa_pages = [self.full_to_swa[r] // ps for r in reps]
        for r in reps:  # clear_full_to_swa_mapping of the whole pages
            for k in range(ps):
                self.full_to_swa.pop(r // ps * ps + k, None)
        if self.free_group is not None:
            self.swa_page_ids_group.append(swa_pages)
            return
        self.swa_attn_allocator.free_page_ids(swa_pages)

    def free_segment(self, free_index, *, start_pos):
        if not list(free_index):
            return
        self.free_swa_segment(free_index, start_pos=start_pos)
        self.full_attn_allocator.free_segment(free_index, start_pos=start_pos)

    def free_group_begin(self):
        assert self.free_group is None
        self.free_group = []
        self.swa_free_group = []
        self.swa_page_ids_group = []
        self.full_attn_allocator.free_group_begin()

    def free_group_end(self):
        self.free_group = None
        if self.swa_page_ids_group:
            group, self.swa_page_ids_group = self.swa_page_ids_group, []
            self.swa_attn_allocator.free_page_ids([p for batch in group for p in batch])
        self.full_attn_allocator.free_group_end()

    def clear(self):
        self.swa_attn_allocator.clear()
        self.full_attn_allocator.clear()
        self.full_to_swa = {}


def test_sliding_window_pages_a_paged_swa_allocator_frees_by_free_segment_are_zero_when_handed_out_again():
    # SGLang 0.5.23, sglang/srt/mem_cache/allocator/swa.py: SWATokenToKVPoolAllocator.free_segment
    # (what a finished request and a radix-cache eviction call) and free_swa_segment (the
    # sliding-window eviction of common.py) give the SWA side back through
    # _free_swa_pages -> self.swa_attn_allocator.free_page_ids(swa_pages); at page_size > 1 the
    # inner allocator is a PagedTokenToKVPoolAllocator whose free_page_ids releases the page ids
    # itself (paged.py: _release_page_ids), without free or free_segment. The README's recipe
    # for a sliding-window hybrid model wraps full_attn_allocator and swa_attn_allocator, each
    # with its own pool's layouts; every page freed is then to be zeroed before it is handed out.
    lib = kvhygiene.load()
    full_pool, swa_pool = Pool(lib, page_size=2), Pool(lib, page_size=2)
    alloc = SWAAllocator0523(page_size=2)
    scrub_on_free(alloc.full_attn_allocator, layouts_of(full_pool))
    scrub_on_free(alloc.swa_attn_allocator, layouts_of(swa_pool))
    tokens = alloc.alloc(4)
    swa_slots = [alloc.full_to_swa[s] for s in tokens]
    full_pool.fill(tokens, 0xE7)
    swa_pool.fill(swa_slots, 0xE7)
    alloc.free_segment(tokens, start_pos=0)  # the request finishes
    handed = alloc.swa_attn_allocator.alloc(4)
    stale_swa = [s for s in handed if not swa_pool.holds(s, 0)]
    stale_full = [s for s in tokens if not full_pool.holds(s, 0)]
    full_pool.release()
    swa_pool.release()
    assert set(handed) == set(swa_slots)
    assert not stale_full, f"full-attention slots {stale_full} kept the request's bytes"
    assert not stale_swa, f"sliding-window slots {stale_swa} were handed out with the finished request's bytes"


class NVFP4Pool(FP4Pool):
    """SGLang 0.5.23's MHA pool with ``--kv-cache-dtype nvfp4``: ``MHATokenToKVPool`` whose
    ``_create_quantized_buffers`` takes its buffers from ``NVFP4KVCacheMethod.create_buffers``
    (sglang/srt/layers/quantization/fp4_kv_cache_quant_method.py): ``k_buffer`` / ``v_buffer``
    of ``[size + page_size, heads, head_dim // 2]`` uint8 and, when the linear scale layout is
    needed (FlashInfer prefill, SM120), ``k_scale_buffer`` / ``v_scale_buffer`` of
    ``[size + page_size, heads, head_dim // 16]``: one row of block scales per token slot, in
    three dimensions (not flattened as fp4_mx_block16's are)."""

    def __init__(self, lib, page_size, layers=2, slots=SLOTS):
        super().__init__(lib, page_size, layers, slots)
        for name in ("k_scale_buffer", "v_scale_buffer"):
            setattr(
                self,
                name,
                [FakeTensor(t.data_ptr(), (self.rows, HEADS, self.HEAD_DIM // 16), element_size=1) for t in getattr(self, name)],
            )
        self.native_k_scale_buffer = None
        self.native_v_scale_buffer = None
        self.dq_k_buffer = None
        self.dq_v_buffer = None


def test_the_block_scales_of_an_nvfp4_pools_freed_slots_are_zero_when_handed_out_again():
    # --kv-cache-dtype nvfp4 (SGLang 0.5.23, fp4_kv_cache_quant_method.py
    # NVFP4KVCacheMethod.create_buffers): per-slot scale rows shaped [rows, heads, head_dim // 16].
    # The README: an FP4 pool's k_scale_buffer / v_scale_buffer rows are scrubbed with the slots
    # they belong to.
    stale = _slots_handed_out_with_freed_scales(NVFP4Pool(kvhygiene.load(), page_size=1))
    assert not stale, f"slots {stale} were handed out with the freed request's NVFP4 block scales"


class HybridLinearPool:
    """SGLang 0.5.23's ``HybridLinearKVPool`` (sglang/srt/mem_cache/memory_pool.py), the
    ``token_to_kv_pool`` of a hybrid linear-attention model (Qwen3-Next, Qwen3.5: ``mambaish_config``
    in kv_cache_configurator.py): the attention layers' KV lives in ``full_kv_pool`` (an
    ``MHATokenToKVPool``); the pool itself has no ``k_buffer`` / ``v_buffer`` / ``kv_buffer``
    attributes, only methods that forward to ``full_kv_pool``. Its allocator is the plain
    ``TokenToKVPoolAllocator`` / ``PagedTokenToKVPoolAllocator`` over those token slots."""

    def __init__(self, full_kv_pool):
        self.full_kv_pool = full_kv_pool
        self.page_size = full_kv_pool.page_size
        self.size = SLOTS

    def get_key_buffer(self, layer_id):
        return self.full_kv_pool.k_buffer[layer_id]


def test_the_readme_recipe_lays_out_the_kv_pool_of_a_hybrid_linear_attention_model():
    # README: scrub_on_free(token_to_kv_pool_allocator, layouts_of(token_to_kv_pool)), with
    # token_to_kv_pool the model runner's. For a hybrid linear-attention model SGLang 0.5.23
    # builds a HybridLinearKVPool (kv_cache_configurator.py _build_hybrid_linear_kv_pool), whose
    # token slots are those of its full_kv_pool.
    lib = kvhygiene.load()
    inner = Pool(lib, page_size=1)
    try:
        alloc = TokenAllocator(page_size=1)
        scrub_on_free(alloc, layouts_of(HybridLinearPool(inner)))
        a = alloc.alloc(3)
        inner.fill(a, 0xA5)
        alloc.free(a)
        assert all(inner.holds(s, 0) for s in a)
    finally:
        inner.release()


class PureSWAAllocator0523:
    """SGLang 0.5.23's ``PureSWATokenToKVPoolAllocator`` (allocator/swa.py; chosen in
    kv_cache_configurator.py when a hybrid-SWA model has no full-attention tokens): page_size
    1, one ``TokenToKVPoolAllocator`` that is both ``swa_attn_allocator`` and
    ``full_attn_allocator`` (the same object); ``free`` gives slots back through
    ``swa_attn_allocator.free``."""

    page_size = 1

    def __init__(self):
        self.swa_attn_allocator = RecentTokenAllocator()
        self.full_attn_allocator = self.swa_attn_allocator
        self.free_pages = None
        self.release_pages = None
        self.free_group = None

    def alloc(self, tokens):
        return self.swa_attn_allocator.alloc(tokens)

    def free(self, free_index):
        self.swa_attn_allocator.free([i for i in free_index if i > 0])


def test_a_pure_sliding_window_allocator_is_refused_naming_its_one_inner_allocator_to_wrap():
    # SGLang 0.5.23's PureSWATokenToKVPoolAllocator keeps its free lists in one inner
    # allocator, which is both its swa_attn_allocator and its full_attn_allocator: the refusal
    # of the outer one says to wrap that one, once, and doing so covers its frees.
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=1)
    alloc = PureSWAAllocator0523()
    try:
        with pytest.raises(ValueError, match="wrap that one, once"):
            scrub_on_free(alloc, layouts_of(pool))
        scrub_on_free(alloc.swa_attn_allocator, layouts_of(pool))
        a = alloc.alloc(3)
        pool.fill(a, 0xA6)
        alloc.free(a)
        assert all(pool.holds(s, 0) for s in a)
    finally:
        pool.release()


def test_an_nvfp4_pools_native_page_scales_of_a_freed_page_are_scrubbed():
    # SGLang 0.5.23's NVFP4 pool (fp4_kv_cache_quant_method.py, NVFP4KVCacheMethod.create_buffers)
    # may also keep per-page scales in the attention kernel's layout (native_k_scale_buffer /
    # native_v_scale_buffer, [rows // page_size, heads, page_size, head_dim // 16], block p
    # being page p). A freed page's native scales are zeroed; the live page next to it keeps
    # its bytes. Its dequantisation workspace (dq_k_buffer / dq_v_buffer), whose prefill rows
    # follow the batch's order, not the slots, is not laid out: the module says so.
    lib = kvhygiene.load()
    page = 4
    pool = Pool(lib, page_size=page)
    pages = pool.rows // page
    native_bytes = HEADS * page * 2  # head_dim 32: 2 scales a row
    extra = 2 * pages * native_bytes
    base = lib.kvh_malloc(extra, 0, None)
    natives = [FakeTensor(base + i * pages * native_bytes, (pages, HEADS, page, 2), element_size=1) for i in range(2)]
    pool.native_k_scale_buffer, pool.native_v_scale_buffer = [natives[0]], [natives[1]]
    pool.dq_k_buffer = pool.dq_v_buffer = FakeTensor(base, (pool.rows, HEADS, 32), element_size=1)
    try:
        alloc = PagedAllocator0523(page_size=page)
        scrub_on_free(alloc, layouts_of(pool))
        a, b = alloc.alloc(page), alloc.alloc(page)
        pa, pb = a[0] // page, b[0] // page
        ctypes.memset(base, 0x5C, extra)
        alloc.free(a)

        def native(p):
            return b"".join(ctypes.string_at(t.data_ptr() + p * native_bytes, native_bytes) for t in natives)

        assert native(pa) == bytes(2 * native_bytes), "the freed page's native scales kept their bytes"
        assert native(pb) == b"\x5c" * (2 * native_bytes), "the live page's native scales were scrubbed"
    finally:
        lib.kvh_free(base, extra, 0, None)
        pool.release()


def test_a_native_scale_buffer_of_another_page_size_is_refused():
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=4)
    try:
        pool.native_k_scale_buffer = [FakeTensor(pool.base, (pool.rows // 2, HEADS, 2, 2), element_size=1)]
        with pytest.raises(ValueError, match="page_size 4"):
            layouts_of(pool)
    finally:
        pool.release()


# --- The SGLang plugin ------------------------------------------------------------------------


def _scheduler_module(monkeypatch, build):
    """A stand-in of SGLang's ``sglang.srt.managers.scheduler`` (loaded, as in a scheduler
    process), whose ``Scheduler.__init__`` records its run and calls ``build(self)``."""
    import sys
    import types

    module = types.ModuleType("sglang.srt.managers.scheduler")
    events = []

    class Scheduler:
        def __init__(self, *args, **kwargs):
            events.append("init")
            build(self)

    module.Scheduler = Scheduler
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.scheduler", module)
    return module, events


def _plain_scheduler(pool, alloc, **extra):
    def build(s):
        s.token_to_kv_pool_allocator = alloc
        s.tp_worker = NS(model_runner=NS(token_to_kv_pool=pool))
        s.forward_stream = None
        s.enable_overlap = False
        s.draft_worker = None
        for k, v in extra.items():
            setattr(s, k, v)

    return build


def test_the_sglang_plugin_installs_kvhygiene_before_the_scheduler_is_built_and_wraps_its_allocator(monkeypatch, caplog):
    # SGLang 0.5.23 (sglang/srt/managers/scheduler.py, run_scheduler_process): load_plugins()
    # runs first in each scheduler process, then Scheduler(server_args, port_args) builds the
    # model runner, its token_to_kv_pool and the token_to_kv_pool_allocator.
    lib = kvhygiene.load()
    pool, alloc = Pool(lib, page_size=1), TokenAllocator(page_size=1)
    module, events = _scheduler_module(monkeypatch, _plain_scheduler(pool, alloc))
    monkeypatch.setattr(kvhygiene, "install", lambda: events.append("install"))
    try:
        sglang_adapter.install_plugin()
        sglang_adapter.install_plugin()  # loaded twice: wraps once
        with caplog.at_level("INFO", logger="kvhygiene.sglang"):
            scheduler = module.Scheduler("server_args", "port_args")
        assert "TokenAllocator frees scrubbed: pages of 1 slots" in caplog.text
        assert events == ["install", "init"]
        assert isinstance(alloc.free, ScrubOnFree) and scheduler.kvhygiene_scrubs == [alloc.free]
        a = alloc.alloc(3)
        pool.fill(a, 0xA7)
        alloc.free(a)
        assert all(pool.holds(s, 0) for s in a), "a slot freed in the scheduler kept its bytes"
    finally:
        pool.release()


def test_the_sglang_plugin_does_nothing_where_no_scheduler_runs(monkeypatch):
    # The tokenizer and detokenizer processes load plugins too, without the scheduler module.
    import sys

    monkeypatch.delitem(sys.modules, "sglang.srt.managers.scheduler", raising=False)
    monkeypatch.setattr(kvhygiene, "install", lambda: pytest.fail("install() in a process without a scheduler"))
    sglang_adapter.install_plugin()


def test_a_scheduler_whose_install_fails_is_not_built(monkeypatch):
    # SGLang logs a plugin's own exception and goes on; an exception out of Scheduler() stops
    # the server (run_scheduler_process reports it and signals its parent).
    module, events = _scheduler_module(monkeypatch, lambda s: None)

    def refuse():
        raise kvhygiene.AllocatorAlreadyInUseError("CUDA is already initialised")

    monkeypatch.setattr(kvhygiene, "install", refuse)
    sglang_adapter.install_plugin()
    # SGLang's scheduler module starts CUDA as it is imported (its FP8 utilities read the
    # device's compute capability at import), before plugins run: the error says what
    # installs kvhygiene in time instead.
    with pytest.raises(kvhygiene.AllocatorAlreadyInUseError, match="sitecustomize") as raised:
        module.Scheduler()
    assert "CUDA is already initialised" in str(raised.value)
    assert events == [], "the scheduler was built on PyTorch's allocator"


def test_a_sliding_window_scheduler_gets_each_inner_allocator_wrapped_over_its_own_pool(monkeypatch):
    # SGLang 0.5.23's SWATokenToKVPoolAllocator over an SWAKVPool (swa_memory_pool.py:
    # full_kv_pool, swa_kv_pool).
    lib = kvhygiene.load()
    full_pool, swa_pool = Pool(lib, page_size=2), Pool(lib, page_size=2)
    alloc = SWAAllocator0523(page_size=2)
    hybrid = NS(full_kv_pool=full_pool, swa_kv_pool=swa_pool, page_size=2)
    module, _ = _scheduler_module(monkeypatch, _plain_scheduler(hybrid, alloc, enable_overlap=True, forward_stream=0))
    monkeypatch.setattr(kvhygiene, "install", lambda: None)
    try:
        sglang_adapter.install_plugin()
        scheduler = module.Scheduler()
        assert [w.allocator for w in scheduler.kvhygiene_scrubs] == [alloc.swa_attn_allocator, alloc.full_attn_allocator]
        assert all(w.stream == 0 for w in scheduler.kvhygiene_scrubs), "the overlap scheduler's forward stream"
        tokens = alloc.alloc(4)
        swa_slots = [alloc.full_to_swa[t] for t in tokens]
        full_pool.fill(tokens, 0xE8)
        swa_pool.fill(swa_slots, 0xE8)
        alloc.free_segment(tokens, start_pos=0)
        assert all(full_pool.holds(t, 0) for t in tokens) and all(swa_pool.holds(t, 0) for t in swa_slots)
    finally:
        full_pool.release()
        swa_pool.release()


def test_a_scheduler_module_without_its_class_ends_the_process(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "sglang.srt.managers.scheduler", types.ModuleType("sglang.srt.managers.scheduler"))

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(sglang_adapter.os, "_exit", exit_)
    with pytest.raises(SystemExit) as ended:
        sglang_adapter.install_plugin()
    assert ended.value.code == 1


def test_the_package_declares_the_sglang_plugin():
    from pathlib import Path

    text = (Path(kvhygiene.__file__).resolve().parent.parent / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."sglang.srt.plugins"]', 1)
    assert len(section) == 2, "pyproject.toml declares no sglang.srt.plugins entry point"
    assert section[1].strip().splitlines()[0] == 'kvhygiene = "kvhygiene.sglang:install_plugin"'


# --- Review: wrap_scheduler over SGLang 0.5.23 configurations ---------------------------------


class PageInterleaveAllocator0523:
    """SGLang 0.5.23's ``PageInterleavePoolAllocator`` (sglang/srt/mem_cache/allocator/
    page_interleave.py; built by kv_cache_configurator.py ``_build_token_to_kv_pool_allocator``
    when ``kv_shard_size > 1``, ``--enable-kv-cache-sharding``): ``page_size`` is the physical
    page, the index space is ``shard_size`` times one rank's slots; logical page ``l`` belongs to
    rank ``l % shard_size``, at that rank's local page ``l // shard_size`` (``clear``: class
    ``r``'s free list is ``arange(1, pages_per_rank + 1) * shard_size + r``). ``free_pages`` and
    ``release_pages`` are ``None``; ``free`` splits the pages by owner class."""

    def __init__(self, page_size, shard_size, slots_per_rank):
        self.page_size = page_size
        self.shard_size = shard_size
        per_rank = slots_per_rank // page_size
        self.class_free_pages = [[p * shard_size + r for p in range(1, per_rank + 1)] for r in range(shard_size)]
        self.free_pages = None
        self.release_pages = None
        self.free_group = None

    def free(self, free_index):
        for p in sorted({i // self.page_size for i in free_index}):
            self.class_free_pages[p % self.shard_size].append(p)


def _speculative(pools):
    """A scheduler with a draft worker: speculative decoding's draft pool shares the allocator."""
    pool = Pool(kvhygiene.load(), page_size=1)
    pools.append(pool)
    return _plain_scheduler(pool, TokenAllocator(page_size=1), draft_worker=object())


def _sharded(pools):
    """SGLang 0.5.23's PageInterleavePoolAllocator (--enable-kv-cache-sharding): the pool's
    page_size, but a freed logical page l is rank l % shard_size's local page l // shard_size:
    scrubbed as local page l, it would zero a live page and leave the freed one."""
    pool = Pool(kvhygiene.load(), page_size=2)  # rank 0's pool: SLOTS local slots
    pools.append(pool)
    return _plain_scheduler(pool, PageInterleaveAllocator0523(page_size=2, shard_size=2, slots_per_rank=SLOTS))


def _hierarchical(pools):
    """SGLang 0.5.23 builds the tree cache inside Scheduler.__init__ (kv_cache_builder.
    build_kv_cache), before the plugin's wrap_scheduler runs at its end. With the hierarchical
    cache on a sliding-window model, hybrid_pool_assembler.py (_swa_allocation_callbacks, and
    the SWA entry of _build_pool_entries) keeps device_free_fn=swa_attn_allocator.free, a bound
    method taken then; buffer_mode/pipeline.py _free_completed_load_back_buffers frees the
    redundant device slots of a load-back through it, as does hybrid_cache_controller.py's
    rollback: those frees would bypass a wrap made afterwards, and the host copies are not
    covered."""
    lib = kvhygiene.load()
    full_pool, swa_pool = Pool(lib, page_size=2), Pool(lib, page_size=2)
    pools.extend([full_pool, swa_pool])
    alloc = SWAAllocator0523(page_size=2)
    plain = _plain_scheduler(NS(full_kv_pool=full_pool, swa_kv_pool=swa_pool, page_size=2), alloc)

    def build(s):
        plain(s)
        entry = NS(device_free_fn=alloc.swa_attn_allocator.free, device_pool=swa_pool)
        s.tree_cache = NS(cache_controller=NS(mem_pool_host=NS(entry_map={"swa": entry})))

    return build


@pytest.mark.parametrize(
    "scheduler, match",
    [(_speculative, "draft"), (_sharded, "kv-cache-sharding"), (_hierarchical, "hierarchical cache")],
)
def test_a_scheduler_the_plugin_does_not_cover_is_not_built(monkeypatch, scheduler, match):
    # What wrap_scheduler cannot cover raises out of Scheduler.__init__, which stops the server,
    # and leaves the allocator unwrapped.
    pools = []
    try:
        build = scheduler(pools)
        module, _ = _scheduler_module(monkeypatch, build)
        monkeypatch.setattr(kvhygiene, "install", lambda: None)
        sglang_adapter.install_plugin()
        with pytest.raises(ValueError, match=match):
            module.Scheduler()
    finally:
        for pool in pools:
            pool.release()


def test_a_pure_sliding_window_scheduler_gets_its_one_inner_allocator_wrapped_once(monkeypatch):
    # SGLang 0.5.23's PureSWATokenToKVPoolAllocator: one inner allocator under both names, over
    # the pool's swa_kv_pool.
    lib = kvhygiene.load()
    pool = Pool(lib, page_size=1)
    alloc = PureSWAAllocator0523()
    module, _ = _scheduler_module(monkeypatch, _plain_scheduler(NS(swa_kv_pool=pool, page_size=1), alloc))
    monkeypatch.setattr(kvhygiene, "install", lambda: None)
    try:
        sglang_adapter.install_plugin()
        scheduler = module.Scheduler()
        assert [w.allocator for w in scheduler.kvhygiene_scrubs] == [alloc.swa_attn_allocator]
        a = alloc.alloc(3)
        pool.fill(a, 0xA9)
        alloc.free(a)
        assert all(pool.holds(s, 0) for s in a)
    finally:
        pool.release()
