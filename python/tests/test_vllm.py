"""kvhygiene.vllm against stand-ins of vLLM v1's SchedulerOutput (the attribute names it reads),
over a paged cache in kvhygiene memory on the host backend: which blocks are new to a request,
and that claiming them zeroes blocks another request wrote while prefix-cache hits keep their
contents."""

import ctypes
import hashlib
from types import SimpleNamespace as NS

import pytest

import kvhygiene
from kvhygiene.vllm import claim_scheduled, context_id, new_blocks

BLOCK_TOKENS = 16
BLOCKS = 8
BLOCK_BYTES = 256


def step(new=(), cached=(), resumed=()):
    """A SchedulerOutput stand-in: `new` of (req_id, [ids], num_computed_tokens), `cached` of
    (req_id, [new ids] or None, num_computed_tokens)."""
    return NS(
        scheduled_new_reqs=[NS(req_id=r, block_ids=(ids,), num_computed_tokens=n) for r, ids, n in new],
        scheduled_cached_reqs=NS(
            req_ids=[r for r, _, _ in cached],
            resumed_req_ids=set(resumed),
            new_block_ids=[None if ids is None else (ids,) for _, ids, _ in cached],
            num_computed_tokens=[n for _, _, n in cached],
        ),
    )


def test_new_blocks_skip_prefix_hits_and_take_appended_blocks():
    s = step(
        new=[("a", [1, 2, 3], 0), ("b", [1, 5], 16)],
        cached=[("c", [7], 48), ("d", None, 32), ("e", [1, 6], 16)],
        resumed=["e"],
    )
    assert new_blocks(s, BLOCK_TOKENS) == {"a": [[1, 2, 3]], "b": [[5]], "c": [[7]], "e": [[6]]}
    # Two KV cache groups with their own block sizes.
    two = NS(
        scheduled_new_reqs=[NS(req_id="x", block_ids=([0, 1, 2], [4, 5, 6, 7, 8, 9]), num_computed_tokens=32)],
        scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
    )
    # 32 cached tokens: 2 blocks of 16 in the first group, 4 of 8 in the second.
    assert new_blocks(two, [16, 8]) == {"x": [[2], [8, 9]]}
    with pytest.raises(ValueError, match="2 KV cache groups"):
        new_blocks(two, [16])


def test_claiming_scheduled_blocks_clears_another_requests_bytes_and_keeps_shared_prefixes():
    lib = kvhygiene.load()
    size = 2 * BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)

    def fill(ids, byte):
        for i in ids:
            for base in layout.regions:
                ctypes.memset(base + i * BLOCK_BYTES, byte, BLOCK_BYTES)

    def zero(i):
        return all(ctypes.string_at(b + i * BLOCK_BYTES, BLOCK_BYTES) == bytes(BLOCK_BYTES) for b in layout.regions)

    # The counters are the process's: what this test adds to them is read.
    before = kvhygiene.stats()["counters"]
    # Request a prefills blocks 1-3 (block 1 becomes a cached prefix; block 0 is vLLM's null
    # block, never handed out).
    assert claim_scheduled(step(new=[("a", [1, 2, 3], 0)]), [layout], BLOCK_TOKENS) == {"a": [[1, 2, 3]]}
    fill([1, 2, 3], 0xA1)
    # Request b hits a's prefix (block 1) and gets block 5: block 1 keeps a's prefix.
    claim_scheduled(step(new=[("b", [1, 5], 16)]), [layout], BLOCK_TOKENS, tenant_of=lambda r: "acme")
    assert not zero(1), "a shared prefix block was scrubbed"
    # a finishes; the scheduler frees 2 and 3 without any scrub and gives them to c.
    assert claim_scheduled(step(new=[("c", [2, 3], 0)]), [layout], BLOCK_TOKENS) == {"c": [[2, 3]]}
    assert zero(2) and zero(3), "c got a's bytes"
    # A running request's appended block, and a step with nothing new.
    fill([2], 0xC1)
    assert claim_scheduled(step(cached=[("c", [4], 32)]), [layout], BLOCK_TOKENS) == {"c": [[4]]}
    assert claim_scheduled(step(cached=[("c", None, 48)]), [layout], BLOCK_TOKENS) == {}
    assert not zero(2), "c's own block was scrubbed"
    after = kvhygiene.stats()["counters"]
    added = {k: after[k] - before[k] for k in ("kv_gate_scrubbed_blocks", "kv_gate_owner_changed_blocks")}
    # 1-3 (unknown), 5 (unknown), 2-3 (a's); 4 (unknown) too.
    assert added["kv_gate_scrubbed_blocks"] == 7, added
    assert added["kv_gate_owner_changed_blocks"] == 2, added  # 2-3 (a's)
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()


def test_resumed_requests_flagged_by_resumed_from_preemption_keep_their_prefix_hits():
    # vLLM v1 before resumed_req_ids (CachedRequestData.resumed_from_preemption, one bool per
    # request) flags resumed requests another way. A resumed request's prefix hits (block 0
    # here, shared with the requests that hit the same prefix) must not be claimed, or the gate
    # would scrub a prefix other requests are reading (scrub) or refuse the step (enforce).
    s = NS(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=NS(
            req_ids=["c", "e"],
            resumed_from_preemption=[False, True],
            new_token_ids=[[], []],
            new_block_ids=[([7],), ([0, 6],)],
            num_computed_tokens=[48, 16],
        ),
    )
    assert new_blocks(s, BLOCK_TOKENS) == {"c": [[7]], "e": [[6]]}
    # Neither field: a SchedulerOutput this module cannot read is refused, not guessed at.
    del s.scheduled_cached_reqs.resumed_from_preemption
    with pytest.raises(AttributeError, match="resumed_from_preemption"):
        new_blocks(s, BLOCK_TOKENS)


def test_a_refused_request_does_not_leave_the_others_blocks_unclaimed():
    # The first request's gate scrub fails verification: its claim is refused. The second
    # request's blocks are still claimed (scrubbed before it runs), and the error names every
    # refused request, so a caller that drops those and runs the step leaks nothing.
    lib = kvhygiene.load()
    size = 2 * BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
    for base in layout.regions:
        ctypes.memset(base, 0x5C, BLOCKS * BLOCK_BYTES)
    lib.kvh_inject_fault(1)
    with pytest.raises(kvhygiene.ClaimRefusedError) as refused:
        claim_scheduled(step(new=[("a", [1], 0), ("b", [4], 0)]), [layout], BLOCK_TOKENS)
    assert refused.value.refused_blocks == [1]
    assert refused.value.refused_requests == {"a": [[1]]}
    assert all(
        ctypes.string_at(b + 4 * BLOCK_BYTES, BLOCK_BYTES) == bytes(BLOCK_BYTES) for b in layout.regions
    ), "b's block was not claimed after a's refusal"
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()


def test_a_request_id_the_library_refuses_does_not_leave_the_other_requests_blocks_unclaimed():
    # vLLM request ids come from the client (the request body's request_id, the X-Request-Id
    # header) and may be longer than the 128 bytes a kvhygiene context accepts. Such a request
    # must not stop the claims of the others scheduled in the same step: their blocks are
    # claimed (scrubbed before they run), and the error raised names the request that could
    # not be claimed, so that the caller can drop it and run the rest.
    lib = kvhygiene.load()
    size = 2 * BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
    for base in layout.regions:
        ctypes.memset(base, 0x5C, BLOCKS * BLOCK_BYTES)
    long_id = "chatcmpl-" + "x" * 200
    error = None
    try:
        claim_scheduled(step(new=[("a", [1], 0), (long_id, [2], 0), ("b", [4], 0)]), [layout], BLOCK_TOKENS)
    except Exception as e:  # noqa: BLE001 - inspected below
        error = e
    b_claimed = all(
        ctypes.string_at(base + 4 * BLOCK_BYTES, BLOCK_BYTES) == bytes(BLOCK_BYTES) for base in layout.regions
    )
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()
    assert b_claimed, f"b's block was not claimed after {error!r}"
    if error is not None:
        assert isinstance(error, kvhygiene.ClaimRefusedError), f"{error!r} does not name the request"
        assert set(error.refused_requests) == {long_id}


def test_context_ids_are_vllms_unless_the_library_would_refuse_them():
    from kvhygiene.vllm import context_id

    assert context_id("chatcmpl-1") == "chatcmpl-1"
    assert context_id("é" * 64) == "é" * 64  # 128 bytes: accepted as it is
    for refused in ("é" * 65, "x" * 129, "a\nb", "a\x7fb", "a\x85b"):
        digest = context_id(refused)
        assert digest.startswith("sha256:") and len(digest) == 71, digest
        assert digest == context_id(refused), "not the same id at every step"
        with kvhygiene.context(request_id=digest):  # accepted by the library
            pass
    assert context_id("a\nb") != context_id("a\rb")


def test_a_client_id_that_reads_as_an_address_is_hashed_and_claims_every_request():
    # kvhygiene.context refuses text naming an object's address ("<... at 0x...>"), to catch
    # an id built from an object's default text. A client chooses its request id, so such
    # text is an id like any other: context_id hashes it, and claim_scheduled claims every
    # request of the step instead of stopping on it half done.
    lib = kvhygiene.load()
    p = lib.kvh_malloc(2 * BLOCKS * BLOCK_BYTES, 0, None)
    layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
    client_id = "chatcmpl-<script at 0x1>"
    cid = context_id(client_id)
    assert cid.startswith("sha256:") and cid == context_id(client_id)
    before = kvhygiene.stats()["counters"]["kv_blocks_claimed"]
    claim_scheduled(step(new=[("ok-1", [1], 0), (client_id, [2], 0), ("ok-2", [3], 0)]), [layout], BLOCK_TOKENS)
    assert kvhygiene.stats()["counters"]["kv_blocks_claimed"] - before == 3
    claim_scheduled(step(new=[("ok-3", [4], 0)]), [layout], BLOCK_TOKENS, tenant_of=lambda r: "<t at 0xab>")
    lib.kvh_free(p, 2 * BLOCKS * BLOCK_BYTES, 0, None)


def test_an_object_whose_text_is_its_address_is_no_context_id():
    # An object given for an id (tenant_of returning the request object): its default text
    # names where it lives, which a later object takes; hashing it would not tell them apart.
    class Tenant:
        pass

    for bad in (Tenant(), lambda: "acme"):
        with pytest.raises(TypeError, match="address"):
            context_id(bad)
    assert context_id(7) == "7"


def test_a_tenant_given_as_a_str_subclass_is_its_text_as_in_context():
    # kvhygiene.context takes a str subclass (a `class Tenant(str, Enum)` member) as its text:
    # context_id, through which claim_scheduled passes tenant and request ids, gives the same
    # id, so that one tenant is one identity to the tenant-scoped gate and the forensic log.
    import enum

    class Tenant(str, enum.Enum):
        ACME = "acme"

    assert context_id(Tenant.ACME) == "acme"
    assert context_id(Tenant.ACME).encode() == kvhygiene._encode(Tenant.ACME, "tenant_id")


def test_a_request_id_with_an_invisible_formatting_character_gets_an_id_the_library_accepts():
    # The library refuses ids holding invisible formatting characters (a right-to-left
    # override, a zero-width space, a line separator) as it refuses control characters:
    # context_id maps a client's request id holding one to an id the library accepts, so that
    # claiming the request's blocks does not fail the step.
    for client_id in ("chatcmpl-\u202eevil", "chat\u200bcmpl-1", "a\u2028b", "\ufeffchatcmpl-2"):
        cid = context_id(client_id)
        try:
            with kvhygiene.context(request_id=cid):
                pass
        except kvhygiene.KvhError as e:
            pytest.fail(f"context_id({client_id!r}) = {cid!r}, which the library refuses: {e}")


def test_the_characters_context_id_hashes_are_those_the_library_refuses():
    # vllm.py keeps its own table of the characters the library refuses (src/context.rs):
    # the two agree at every edge of the table, on every control character and on a spread
    # of other code points, so that an id context_id keeps is one the library accepts.
    from kvhygiene.vllm import _INVISIBLE, _unprintable

    points = set(range(0, 0x100)) | set(range(0, 0x110000, 251))
    for lo, hi in _INVISIBLE:
        points |= {lo - 1, lo, hi, hi + 1}
    disagree = []
    for cp in sorted(points):
        if 0xD800 <= cp <= 0xDFFF or cp in (0, 0x110000):
            continue  # no UTF-8 of their own; NUL ends a C string
        try:
            with kvhygiene.context(tenant_id="t" + chr(cp)):
                pass
            accepted = True
        except kvhygiene.KvhError:
            accepted = False
        if accepted == _unprintable(chr(cp)):
            disagree.append(f"U+{cp:04X} (library accepts: {accepted})")
    assert not disagree, disagree


def test_context_ids_of_two_different_request_ids_differ():
    # context_id gives two requests two ids: a client's id that already reads "sha256:<hex>"
    # must not become the id another request's long id is mapped to.
    import hashlib

    from kvhygiene.vllm import context_id

    long_id = "chatcmpl-" + "y" * 200
    lookalike = "sha256:" + hashlib.sha256(long_id.encode()).hexdigest()
    assert lookalike != long_id
    assert context_id(lookalike) != context_id(long_id), (
        f"requests {long_id!r} and {lookalike!r} share the context id {context_id(long_id)!r}"
    )


def test_a_block_of_a_request_with_a_long_id_is_scrubbed_before_another_request_gets_it():
    # Request a (id over 128 bytes) writes its block 3 and finishes; the scheduler hands block 3
    # to request b, whose client-chosen id reads "sha256:" and a's digest. The eviction gate
    # must see a change of owner and scrub the block before b runs.
    import hashlib

    lib = kvhygiene.load()
    size = 2 * BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
    a = "chatcmpl-" + "z" * 200
    b = "sha256:" + hashlib.sha256(a.encode()).hexdigest()
    claim_scheduled(step(new=[(a, [3], 0)]), [layout], BLOCK_TOKENS)
    for base in layout.regions:
        ctypes.memset(base + 3 * BLOCK_BYTES, 0xA7, BLOCK_BYTES)
    claim_scheduled(step(new=[(b, [3], 0)]), [layout], BLOCK_TOKENS)
    scrubbed = all(
        ctypes.string_at(base + 3 * BLOCK_BYTES, BLOCK_BYTES) == bytes(BLOCK_BYTES) for base in layout.regions
    )
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()
    assert scrubbed, "request b was given request a's KV bytes: the gate took them for one request"


def test_a_block_only_partly_computed_is_not_new_to_the_request():
    # 20 computed tokens of blocks of 16 (a KV connector's load: local prefix hits are whole
    # blocks): the second block holds 4 loaded tokens, which a scrub would wipe, so it is
    # skipped with the first (ceil(num_computed_tokens / block_size) blocks are).
    s = step(new=[("a", [0, 1, 2], 20)], cached=[("r", [0, 4, 5], 20)], resumed=["r"])
    assert new_blocks(s, BLOCK_TOKENS) == {"a": [[2]], "r": [[5]]}


def test_a_request_with_new_blocks_in_one_kv_cache_group_only_is_claimed():
    # Hybrid models (full and sliding-window attention) have several KV cache groups; a step
    # may give a running request a block in one group and none in the other.
    s = NS(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=NS(
            req_ids=["x", "y"],
            resumed_req_ids=set(),
            new_block_ids=[([], [9]), ([3], [])],
            num_computed_tokens=[64, 64],
        ),
    )
    assert new_blocks(s, [16, 8]) == {"x": [[], [9]], "y": [[3], []]}


def test_the_error_for_several_refused_requests_is_the_first_refusal(monkeypatch):
    # claim_scheduled raises the first refusal, with refused_requests naming every request
    # refused.
    import kvhygiene.vllm as kv_vllm

    def refuse(layout, ids, stream=None):
        raise kvhygiene.ClaimRefusedError(kvhygiene.KVH_ERR_VERIFY_FAILED, f"ids {ids}", list(ids))

    monkeypatch.setattr(kv_vllm, "claim_blocks", refuse)
    layout = kvhygiene.KvLayout([0x10000, 0x20000], BLOCK_BYTES, BLOCKS)
    with pytest.raises(kvhygiene.ClaimRefusedError) as refused:
        claim_scheduled(step(new=[("a", [1], 0), ("b", [4], 0)]), [layout], BLOCK_TOKENS)
    assert refused.value.refused_blocks == [1] and refused.value.message == "ids [1]"
    assert refused.value.refused_requests == {"a": [[1]], "b": [[4]]}


def test_scheduled_blocks_are_claimed_under_the_tenant_tenant_of_gives():
    # The gate's owner is the request's tenant and id: a block claim_scheduled claimed for
    # request "a" of tenant "acme" is that request's own when "a" claims it again inside its
    # context (tenant "acme", request "a"): kept, not scrubbed.
    lib = kvhygiene.load()
    size = 2 * BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
    claim_scheduled(step(new=[("a", [6], 0)]), [layout], BLOCK_TOKENS, tenant_of=lambda r: "acme")
    for base in layout.regions:
        ctypes.memset(base + 6 * BLOCK_BYTES, 0xA3, BLOCK_BYTES)
    with kvhygiene.context(tenant_id="acme", request_id="a"):
        kvhygiene.claim_blocks(layout, [6])
    kept = all(ctypes.string_at(b + 6 * BLOCK_BYTES, BLOCK_BYTES) == b"\xa3" * BLOCK_BYTES for b in layout.regions)
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()
    assert kept, "the block was scrubbed: claim_scheduled claimed it under another owner than tenant acme's request a"


def test_more_block_sizes_or_layouts_than_kv_cache_groups_are_refused():
    s = step(new=[("a", [0, 1], 0)])
    with pytest.raises(ValueError, match="2 values for 1 KV cache groups"):
        new_blocks(s, [16, 8])
    layout = kvhygiene.KvLayout([0x10000], BLOCK_BYTES, BLOCKS)
    with pytest.raises(ValueError, match="layouts: 2 values for 1 KV cache groups"):
        claim_scheduled(s, [layout, layout], BLOCK_TOKENS)
    # One layout, not a list of them: named, not "not iterable".
    with pytest.raises(TypeError, match=r"layouts: one KvLayout; pass a list"):
        claim_scheduled(s, layout, BLOCK_TOKENS)


def test_a_block_size_that_is_not_a_positive_integer_is_refused_by_name():
    # A block size of 0 would divide by zero, and 16.5 would skip a wrong number of a resumed
    # request's prefix blocks: both are refused with a message naming block_sizes.
    s = step(new=[("a", [0, 1, 2], 16)])
    for bad in (0, -16, 16.5, True, "16"):
        with pytest.raises(ValueError, match="block_sizes"):
            new_blocks(s, bad)
    assert new_blocks(s, 16) == {"a": [[1, 2]]}


def test_a_tenant_id_the_library_would_refuse_does_not_stop_the_step():
    # tenant_of may read a header a client sets: an id with a control character is claimed
    # under its digest, as a client's request id is, and the other requests' claims go on.
    lib = kvhygiene.load()
    size = 2 * BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
    tenants = {"a": "evil\ntenant", "b": "acme"}
    claimed = claim_scheduled(
        step(new=[("a", [2], 0), ("b", [3], 0)]), [layout], BLOCK_TOKENS, tenant_of=tenants.get
    )
    assert claimed == {"a": [[2]], "b": [[3]]}
    # Block 2 is the digest tenant's request "a": its own claim keeps what it wrote.
    for base in layout.regions:
        ctypes.memset(base + 2 * BLOCK_BYTES, 0xA7, BLOCK_BYTES)
    with kvhygiene.context(tenant_id=context_id("evil\ntenant"), request_id="a"):
        kvhygiene.claim_blocks(layout, [2])
    kept = all(ctypes.string_at(b + 2 * BLOCK_BYTES, BLOCK_BYTES) == b"\xa7" * BLOCK_BYTES for b in layout.regions)
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()
    assert context_id("evil\ntenant").startswith("sha256:")
    assert kept, "the block was claimed under another owner than the tenant's digest"


def test_a_tenant_id_given_as_bytes_is_its_text_as_in_a_context():
    # tenant_of may read a raw header (ASGI headers are bytes). kvhygiene.context takes
    # b"acme" for the tenant "acme", not "b'acme'"; the claims claim_scheduled makes for the
    # tenant are under the same id, so the request's own claim inside
    # context(tenant_id=b"acme", request_id="a") keeps its block, and the records name "acme".
    assert context_id(b"acme") == "acme"
    lib = kvhygiene.load()
    size = 2 * BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
    claim_scheduled(step(new=[("a", [5], 0)]), [layout], BLOCK_TOKENS, tenant_of=lambda r: b"acme")
    for base in layout.regions:
        ctypes.memset(base + 5 * BLOCK_BYTES, 0xB4, BLOCK_BYTES)
    with kvhygiene.context(tenant_id=b"acme", request_id="a"):
        kvhygiene.claim_blocks(layout, [5])
    kept = all(ctypes.string_at(b + 5 * BLOCK_BYTES, BLOCK_BYTES) == b"\xb4" * BLOCK_BYTES for b in layout.regions)
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()
    assert kept, "the block was scrubbed: claim_scheduled claimed it under another tenant than b'acme' names"


def test_a_tenant_id_given_as_bytes_that_are_not_utf8_is_their_digest():
    # context() refuses such bytes; the claims of a step are not stopped by a client's id.
    raw = b"acme\xff"
    assert context_id(raw) == "sha256:" + hashlib.sha256(b"\xff" + raw).hexdigest()
    assert context_id(bytearray(b"acme")) == "acme"
    # Never the digest of a text: here one whose lone surrogate encodes to the same bytes.
    assert context_id(b"acme\xed\xb3\xbf") != context_id("acme\udcff")


def test_a_block_an_asynchronous_kv_connector_filled_keeps_the_tokens_it_loaded():
    # vLLM v1 (vllm/v1/core/sched/scheduler.py, _update_waiting_for_remote_kv, main branch
    # at commit 00024d314514900f361ad072af6931e403b7f589): once an asynchronous KV connector
    # (NIXL, P/D disaggregation) has received a request's prompt into the blocks allocated
    # for it, the scheduler sets num_computed_tokens to the block count times block_size,
    # capped at the prompt length, less one when that cap is the whole prompt. A 20-token
    # prompt in blocks of 16 thus comes back as a new request with block_ids ([0, 1],) and
    # num_computed_tokens 19: block 1 already holds the 3 loaded tokens 16-18. The module's
    # documentation says the blocks a connector fills are not claimed; claiming block 1
    # must not wipe the 3 tokens the connector wrote there.
    lib = kvhygiene.load()
    size = 2 * BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
    row = BLOCK_BYTES // BLOCK_TOKENS
    # Block 1 was request "old"'s.
    claim_scheduled(step(new=[("old", [1], 0)]), [layout], BLOCK_TOKENS)
    for base in layout.regions:
        ctypes.memset(base + 1 * BLOCK_BYTES, 0x0D, BLOCK_BYTES)
    # The connector loads tokens 0-18 of request "pd": block 0 whole, rows 0-2 of block 1.
    for base in layout.regions:
        ctypes.memset(base, 0xD0, BLOCK_BYTES)
        ctypes.memset(base + 1 * BLOCK_BYTES, 0xD0, 3 * row)
    claim_scheduled(step(new=[("pd", [0, 1], 19)]), [layout], BLOCK_TOKENS)
    loaded = all(ctypes.string_at(base + 1 * BLOCK_BYTES, 3 * row) == b"\xd0" * (3 * row) for base in layout.regions)
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()
    assert loaded, "the tokens the KV connector loaded into the request's last block were scrubbed"


@pytest.fixture
def cache():
    """A two-region KV cache of ``BLOCKS`` blocks in one kvhygiene allocation, freed after the
    test."""
    lib = kvhygiene.load()
    size = 2 * BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    yield kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
    lib.kvh_free(p, size, 0, None)
    kvhygiene.synchronize()


def _fill(layout, i, byte):
    for base in layout.regions:
        ctypes.memset(base + i * BLOCK_BYTES, byte, BLOCK_BYTES)


def _holds(layout, i, byte):
    """Whether block ``i`` holds ``byte`` throughout, in every region."""
    want = bytes([byte]) * BLOCK_BYTES
    return all(ctypes.string_at(b + i * BLOCK_BYTES, BLOCK_BYTES) == want for b in layout.regions)


def test_a_new_request_that_reuses_a_finished_requests_id_gets_its_blocks_scrubbed(cache):
    # Request ids come from the client (the request body's request_id, the X-Request-Id
    # header), so a later request may carry the id of one that finished. It is a new request
    # (in the step's scheduled_new_reqs again, with nothing computed), another owner than the
    # finished one: the blocks the finished request wrote are scrubbed before it gets them.
    claim_scheduled(step(new=[("req-1", [2], 0)]), [cache], BLOCK_TOKENS)
    _fill(cache, 2, 0xA1)
    # req-1 finishes; the scheduler frees block 2 without a scrub. Another client's request,
    # also named req-1, is scheduled and given block 2.
    claim_scheduled(step(new=[("req-1", [2], 0)]), [cache], BLOCK_TOKENS)
    assert _holds(cache, 2, 0), "the second request named req-1 was given the first one's KV bytes unscrubbed"


@pytest.mark.parametrize("first, second", [("", None), (None, ""), (b"", None)])
def test_a_reused_id_is_scrubbed_whether_no_tenant_is_said_as_none_or_as_empty(cache, first, second):
    # The library reads an empty tenant id as no tenant: ("", req-1) and (None, req-1) are one
    # owner to the gate, which hands its blocks over without a scrub. A tenant_of reading an
    # optional header gives "" once (present, empty) and None once (absent): the reuse of
    # req-1 must still be caught.
    claim_scheduled(step(new=[("req-1", [2], 0)]), [cache], BLOCK_TOKENS, tenant_of=lambda r: first)
    _fill(cache, 2, 0xA1)
    claim_scheduled(step(new=[("req-1", [2], 0)]), [cache], BLOCK_TOKENS, tenant_of=lambda r: second)
    assert _holds(cache, 2, 0), f"req-1 under tenant {second!r} got req-1's bytes from tenant {first!r}"


def test_one_block_given_to_two_requests_in_one_step_is_refused(cache):
    # Two requests scheduled in the same step, both given block 3 as a new block, run in the
    # same forward pass: each writes its keys and values into the block and reads the other's.
    # claim_scheduled sees both claims and must not report the step as claimed.
    with pytest.raises(kvhygiene.ClaimRefusedError) as refused:
        claim_scheduled(step(new=[("a", [3], 0), ("b", [3], 0)]), [cache], BLOCK_TOKENS)
    assert refused.value.refused_requests, refused.value


def test_a_block_shared_in_one_step_is_claimed_for_neither_request_and_the_rest_are_claimed(cache):
    # a and b are both given block 3 as new; a also gets 4 and c gets 5. Neither a nor b may
    # run on block 3, so it is claimed for neither (its bytes stay the earlier owner's, never
    # handed over); every other block of the step is claimed (scrubbed here: unknown owner).
    for i in (3, 4, 5):
        _fill(cache, i, 0xB7)
    with pytest.raises(kvhygiene.ClaimRefusedError) as refused:
        claim_scheduled(step(new=[("a", [3, 4], 0), ("b", [3], 0), ("c", [5], 0)]), [cache], BLOCK_TOKENS)
    assert refused.value.code == kvhygiene.KVH_ERR_KV_TAKEN
    assert refused.value.refused_requests == {"a": [[3]], "b": [[3]]}
    assert refused.value.refused_blocks == [3]
    assert _holds(cache, 3, 0xB7), "the block given to two requests was claimed (scrubbed) for one of them"
    assert _holds(cache, 4, 0) and _holds(cache, 5, 0), "the step's other blocks were not claimed"


def test_a_running_request_that_reused_a_finished_ones_id_gets_its_appended_blocks_scrubbed(cache):
    # The first req-2 wrote block 6 (an appended block) and finished. A new req-2 runs, and a
    # later step appends block 6 to it: the finished request's bytes are scrubbed first. The
    # new request's own blocks, claimed once, are not scrubbed again at later steps.
    claim_scheduled(step(new=[("req-2", [1], 0)]), [cache], BLOCK_TOKENS)
    claim_scheduled(step(cached=[("req-2", [6], 16)]), [cache], BLOCK_TOKENS)
    _fill(cache, 6, 0xA6)
    # The second req-2: block 7 is its own, written, then block 6 is appended.
    claim_scheduled(step(new=[("req-2", [7], 0)]), [cache], BLOCK_TOKENS)
    _fill(cache, 7, 0xA7)
    claim_scheduled(step(cached=[("req-2", [6], 16)]), [cache], BLOCK_TOKENS)
    assert _holds(cache, 6, 0), "the second req-2 was given the first one's block 6 unscrubbed"
    assert _holds(cache, 7, 0xA7), "the request's own block was scrubbed at a later step"


def _two_groups_step(a_ids, b_ids):
    """A step that gives request a ``a_ids`` in group 0 and request b ``b_ids`` in group 1."""
    return NS(
        scheduled_new_reqs=[
            NS(req_id="a", block_ids=(a_ids, []), num_computed_tokens=0),
            NS(req_id="b", block_ids=([], b_ids), num_computed_tokens=0),
        ],
        scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
    )


def test_a_block_given_to_two_requests_in_two_kv_cache_groups_of_one_cache_is_refused(cache):
    # Two KV cache groups whose layers share one set of cache tensors (vLLM's hybrid
    # allocator: one block pool, the groups' layers on the same tensors) have one layout: a
    # block id names the same memory in either group. Block 3 given as new to a (group 0) and
    # to b (group 1) in one step is one block given to two requests in one forward pass; like
    # the same block in one group, it is claimed for neither.
    with pytest.raises(kvhygiene.ClaimRefusedError) as refused:
        claim_scheduled(_two_groups_step([3], [3]), [cache, cache], BLOCK_TOKENS)
    assert refused.value.refused_requests == {"a": [[3], []], "b": [[], [3]]}


#: What the scripts below run first, in a process of their own (the policy is read from the
#: environment when the library starts): a two-region cache of 8 blocks and a step builder.
_SCRIPT_PRELUDE = r"""
import ctypes, sys
from types import SimpleNamespace as NS
sys.path.insert(0, sys.argv[1])
import kvhygiene
from kvhygiene.vllm import claim_scheduled

BLOCKS, BLOCK_BYTES = 8, 256
def step(req_id, ids):
    return NS(
        scheduled_new_reqs=[NS(req_id=req_id, block_ids=(ids,), num_computed_tokens=0)],
        scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
    )
lib = kvhygiene.load()
p = lib.kvh_malloc(2 * BLOCKS * BLOCK_BYTES, 0, None)
layout = kvhygiene.KvLayout([p, p + BLOCKS * BLOCK_BYTES], BLOCK_BYTES, BLOCKS)
def old_bytes(i):
    return any(ctypes.string_at(b + i * BLOCK_BYTES, BLOCK_BYTES) != bytes(BLOCK_BYTES) for b in layout.regions)
"""


def _run_script(tmp_path, body: str, **env_vars):
    """Runs :data:`_SCRIPT_PRELUDE` then ``body`` in a new interpreter on the host backend,
    with ``env_vars`` set (and ``KVH_LOG_DIR`` unset unless given); returns the run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "script.py"
    script.write_text(_SCRIPT_PRELUDE + body)
    pkg = str(Path(kvhygiene.__file__).resolve().parent.parent)
    env = dict(os.environ, KVH_BACKEND="host")
    env.pop("KVH_LOG_DIR", None)
    env.update(env_vars)
    run = subprocess.run([sys.executable, str(script), pkg], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run


def test_a_reused_id_gets_its_blocks_scrubbed_after_another_requests_claim_of_them_was_refused(tmp_path):
    # Under KVH_KV_GATE=enforce, request x given req-1's unscrubbed block 2 is refused (nothing
    # changes hands: the block stays req-1's in the library's ledger) and does not run. A new
    # request that reuses the id req-1 is then given block 2: it must not read the finished
    # req-1's bytes. Either claim_scheduled scrubs the block first (it was last claimed under
    # the same ids) or the claim is refused.
    body = """
kvhygiene.scrub_blocks(layout, list(range(BLOCKS)))  # enforce: the whole cache once at start
claim_scheduled(step("req-1", [2]), [layout], 16)
for base in layout.regions:
    ctypes.memset(base + 2 * BLOCK_BYTES, 0xA1, BLOCK_BYTES)
# req-1 finishes without a scrub; block 2 is given to x, whose claim enforce refuses.
try:
    claim_scheduled(step("x", [2]), [layout], 16)
    print("x CLAIMED")
except kvhygiene.ClaimRefusedError as e:
    print("x REFUSED", e.code, e.refused_requests)
# x does not run. A new request that reuses the id req-1 is given block 2.
try:
    claim_scheduled(step("req-1", [2]), [layout], 16)
except kvhygiene.ClaimRefusedError as e:
    print("REUSED REFUSED", e.code)
    sys.exit(0)
print("OLD BYTES" if old_bytes(2) else "SCRUBBED")
"""
    run = _run_script(tmp_path, body, KVH_KV_GATE="enforce")
    assert run.stdout.startswith("x REFUSED"), run.stdout
    assert "OLD BYTES" not in run.stdout, (
        f"the new request reusing req-1's id was given the finished req-1's bytes unscrubbed: {run.stdout!r}"
    )


def test_a_block_refused_for_two_requests_of_one_step_is_a_policy_violation_record(tmp_path):
    # The gate's refusals are policy_violation records (policy kv_gate) in the forensic log,
    # the evidence that a request was kept from memory it must not have. The refusal of a
    # block given as new to two requests in one step is such a refusal: it is in the log.
    import json

    body = """
s = NS(
    scheduled_new_reqs=[NS(req_id=r, block_ids=([3],), num_computed_tokens=0) for r in ("a", "b")],
    scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
)
try:
    claim_scheduled(s, [layout], 16)
    print("CLAIMED")
except kvhygiene.ClaimRefusedError as e:
    print("REFUSED", e.code)
"""
    log = tmp_path / "log"
    run = _run_script(tmp_path, body, KVH_LOG_DIR=str(log))
    assert run.stdout.startswith("REFUSED"), run.stdout
    records = [json.loads(line) for f in sorted(log.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert records, "no forensic record was written"
    kinds = sorted({r["kind"] for r in records})
    violations = [r for r in records if r["kind"] == "policy_violation" and r.get("policy") == "kv_gate"]
    assert violations, f"the refusal left no policy_violation record (kv_gate); kinds written: {kinds}"


def test_a_reused_ids_block_whose_scrub_fails_is_not_reported_claimed_with_the_gate_off(tmp_path):
    # claim_scheduled scrubs a block last claimed under the same ids before claiming it. When
    # that scrub fails verification the block must not be used (ScrubVerificationError: "they
    # must not be handed to another request"): with KVH_KV_GATE=off the library accepts every
    # claim, so claim_scheduled itself must report the failure rather than return the block as
    # claimed.
    body = """
claim_scheduled(step("req-1", [2]), [layout], 16)
for base in layout.regions:
    ctypes.memset(base + 2 * BLOCK_BYTES, 0xA1, BLOCK_BYTES)
lib.kvh_inject_fault(2)  # the next scrub of block 2 (two regions) fails verification
try:
    claim_scheduled(step("req-1", [2]), [layout], 16)
except kvhygiene.KvhError as e:
    print("RAISED", type(e).__name__, e.code)
    sys.exit(0)
print("CLAIMED", "OLD BYTES" if old_bytes(2) else "ZERO")
"""
    run = _run_script(tmp_path, body, KVH_KV_GATE="off")
    assert run.stdout.startswith("RAISED"), (
        f"a block whose scrub failed verification was returned as claimed: {run.stdout!r}"
    )


def test_vllms_null_block_padding_in_a_steps_block_ids_is_not_claimed(cache):
    # vLLM's BlockPool reserves block 0 as its null block: a placeholder no request owns or
    # writes. Mamba groups in prefix-caching "align" mode (MambaManager.allocate_new_blocks)
    # pad the blocks they skip with it, so the block ids of a step name block 0 several times
    # among a request's new blocks, and for every such request of the step. The placeholder is
    # no block handed to the request: the step's real new blocks (5 and 6) are claimed, and
    # the requests are neither refused nor stopped by an error.
    s = NS(
        scheduled_new_reqs=[
            NS(req_id="a", block_ids=([0, 0, 5],), num_computed_tokens=0),
            NS(req_id="b", block_ids=([0, 0, 6],), num_computed_tokens=0),
        ],
        scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
    )
    _fill(cache, 5, 0xE5)
    _fill(cache, 6, 0xE6)
    claim_scheduled(s, [cache], BLOCK_TOKENS)
    assert _holds(cache, 5, 0) and _holds(cache, 6, 0), "the step's new blocks were not claimed"


def test_vllms_null_block_padding_in_one_requests_block_ids_does_not_fail_the_claim(cache):
    # One request alone, its Mamba group padded with vLLM's null block (block 0) twice: the
    # claim of its one real new block (5) succeeds.
    s = NS(
        scheduled_new_reqs=[NS(req_id="a", block_ids=([0, 0, 5],), num_computed_tokens=0)],
        scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
    )
    _fill(cache, 5, 0xE5)
    claim_scheduled(s, [cache], BLOCK_TOKENS)
    assert _holds(cache, 5, 0), "the request's new block was not claimed"


def test_a_null_block_id_that_is_no_integer_is_refused():
    # "0" would match no block id, and vLLM's null block be claimed as a new block.
    s = NS(
        scheduled_new_reqs=[NS(req_id="a", block_ids=([0, 5],), num_computed_tokens=0)],
        scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
    )
    for bad in ("0", 0.0, True):
        with pytest.raises(TypeError):
            new_blocks(s, BLOCK_TOKENS, null_block_id=bad)
    assert new_blocks(s, BLOCK_TOKENS, null_block_id=0) == {"a": [[5]]}
    assert new_blocks(s, BLOCK_TOKENS, null_block_id=None) == {"a": [[0, 5]]}


def test_claims_keep_the_model_id_of_the_workers_own_context(tmp_path):
    # A worker that serves one model enters context(model_id=...) around its steps: the
    # records of the claims claim_scheduled makes for each request (here the gate's scrub of
    # a block with no known owner) carry that model id beside the request's ids.
    import json

    body = """
with kvhygiene.context(model_id="llama-70b"):
    claim_scheduled(step("a", [2]), [layout], 16)
"""
    log = tmp_path / "log"
    _run_script(tmp_path, body, KVH_LOG_DIR=str(log))
    records = [json.loads(line) for f in sorted(log.glob("*.jsonl")) for line in f.read_text().splitlines()]
    mine = [r for r in records if r.get("request_id") == "a"]
    assert mine, f"no record of request a; kinds written: {sorted({r['kind'] for r in records})}"
    assert all(r.get("model_id") == "llama-70b" for r in mine), mine


def test_a_block_given_to_two_requests_in_two_kv_cache_groups_whose_layouts_share_a_tensor_is_refused(cache):
    # vLLM's hybrid allocator lays one set of cache tensors under every KV cache group, each
    # tensor shared by one layer of each group; a group with fewer layers than the others
    # (a full-attention group beside sliding-window ones) has layers on only some of the
    # tensors, so its layout names a subset of the other group's regions. A block id names
    # the same memory in both groups wherever their regions meet: block 3 given as new to a
    # (group 0: region 0 only) and to b (group 1: regions 0 and 1) in one step is one block
    # written by two requests in one forward pass, and is claimed for neither.
    fewer_layers = kvhygiene.KvLayout([cache.regions[0]], BLOCK_BYTES, BLOCKS)
    with pytest.raises(kvhygiene.ClaimRefusedError) as refused:
        claim_scheduled(_two_groups_step([3], [3]), [fewer_layers, cache], BLOCK_TOKENS)
    assert refused.value.refused_requests == {"a": [[3], []], "b": [[], [3]]}


def test_blocks_of_two_groups_with_other_block_sizes_over_one_tensor_are_compared_by_their_bytes(cache):
    # Group 0 cuts region 0 in blocks of half the size: its block 6 is the first half of the
    # cache's block 3, and its block 1 lies inside the cache's block 0. a is given half-block
    # 6 and b block 3 (the same bytes): both refused; half-block 1 to a and block 5 to b meet
    # nowhere and are claimed.
    halves = kvhygiene.KvLayout([cache.regions[0]], BLOCK_BYTES // 2, 2 * BLOCKS)
    with pytest.raises(kvhygiene.ClaimRefusedError) as refused:
        claim_scheduled(_two_groups_step([6, 1], [3, 5]), [halves, cache], BLOCK_TOKENS)
    assert refused.value.refused_requests == {"a": [[6], []], "b": [[], [3]]}


def test_the_same_block_id_of_two_caches_in_separate_memory_goes_to_two_requests(cache):
    # Two groups over two caches that share no byte: block 3 of each is another block, and
    # both requests get theirs.
    lib = kvhygiene.load()
    size = BLOCKS * BLOCK_BYTES
    p = lib.kvh_malloc(size, 0, None)
    try:
        other = kvhygiene.KvLayout([p], BLOCK_BYTES, BLOCKS)
        claimed = claim_scheduled(_two_groups_step([3], [3]), [cache, other], BLOCK_TOKENS)
        assert claimed == {"a": [[3], []], "b": [[], [3]]}, claimed
    finally:
        lib.kvh_free(p, size, 0, None)
        kvhygiene.synchronize()


def test_the_same_block_id_of_two_groups_on_separate_tensors_goes_to_two_requests_when_a_third_group_spans_both(cache):
    # Three KV cache groups: group 0 on tensor 0 (region 0 of the cache), group 2 on tensor 1
    # (region 1), group 1 on both. Block 3 of group 0 and block 3 of group 2 are in separate
    # tensors and share no byte: a given the first and b the second each get theirs, as they
    # do when group 1 cuts the tensors with another block size, or is not there at all.
    first = kvhygiene.KvLayout([cache.regions[0]], BLOCK_BYTES, BLOCKS)
    second = kvhygiene.KvLayout([cache.regions[1]], BLOCK_BYTES, BLOCKS)
    s = NS(
        scheduled_new_reqs=[
            NS(req_id="a", block_ids=([3], [], []), num_computed_tokens=0),
            NS(req_id="b", block_ids=([], [], [3]), num_computed_tokens=0),
        ],
        scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]),
    )
    try:
        claimed = claim_scheduled(s, [first, cache, second], BLOCK_TOKENS)
    except kvhygiene.ClaimRefusedError as e:
        pytest.fail(f"blocks whose bytes do not meet were refused: {e.refused_requests}")
    assert claimed == {"a": [[3], [], []], "b": [[], [], [3]]}, claimed


def _layouts_over_tensors(tensors=64, blocks=40000, block_bytes=4096):
    """``tensors`` regions of ``blocks`` blocks each, at made-up addresses (no memory: the
    comparison of a step's blocks reads only the layouts)."""
    base = 1 << 40
    return [base + k * blocks * block_bytes for k in range(tensors)], blocks, block_bytes


def test_a_step_that_gives_thousands_of_blocks_to_two_requests_names_each_once_in_order():
    # The same 8000 new blocks given to two requests (one KV cache): every one is refused for
    # both, each named once, in the order the step gave them.
    from kvhygiene.vllm import _shared_in_step

    regions, blocks, block_bytes = _layouts_over_tensors()
    layout = kvhygiene.KvLayout(regions, block_bytes, blocks)
    ids = list(range(8000, 0, -1))
    same = {"a": [ids + ids[:3]], "b": [ids]}
    assert _shared_in_step(same, [layout]) == {"a": [ids], "b": [ids]}


def test_a_step_over_groups_with_two_block_geometries_is_compared_once_per_block_not_per_region(monkeypatch):
    # A hybrid model's groups over the same 64 cache tensors with two block geometries (an
    # attention group's blocks of a whole page, a Mamba group's state blocks of part of it, at
    # the same bases): the 4096 new blocks of a step (256 requests, 8 blocks in each group) are
    # compared once each through the one class of meeting regions, not once per region (the
    # comparison runs in the model runner before every forward pass). No two requests' blocks
    # meet; a state block given to another request than the page holding it does.
    from kvhygiene import vllm

    regions, blocks, block_bytes = _layouts_over_tensors()
    pages = kvhygiene.KvLayout(regions, block_bytes, blocks)
    states = kvhygiene.KvLayout(regions, block_bytes // 4, blocks, block_stride=block_bytes)
    step_, nxt = {}, 1
    for r in range(256):
        step_[f"r{r}"] = [list(range(nxt, nxt + 8)), list(range(nxt + 8, nxt + 16))]
        nxt += 16
    calls = []
    meeting = vllm._meeting_ids
    monkeypatch.setattr(vllm, "_meeting_ids", lambda *a: calls.append(a) or meeting(*a))
    assert vllm._shared_in_step(step_, [pages, states]) == {}
    assert 0 < len(calls) <= 4096, f"{len(calls)} lookups for 4096 blocks over 64 regions"
    # Request r0's page 1 holds the state block 1 that r1 is given.
    step_["r1"][1].append(1)
    shared = vllm._shared_in_step(step_, [pages, states])
    assert shared == {"r0": [[1], []], "r1": [[], [1]]}, shared


def _brute_force_shared(claimed, layouts):
    """The blocks of ``claimed`` whose bytes meet another request's, byte by byte."""
    spans = []
    for req_id, groups in claimed.items():
        for g, ids in enumerate(groups):
            layout = layouts[g]
            for i in ids:
                for base in layout.regions:
                    start = base + i * layout.block_stride
                    spans.append((layout.device, start, start + layout.block_bytes, req_id, g, i))
    marked = set()
    for x in spans:
        for y in spans:
            if x[0] == y[0] and x[3] != y[3] and x[1] < y[2] and y[1] < x[2]:
                marked.add((x[3], x[4], x[5]))
    return {
        req_id: [[i for i in dict.fromkeys(ids) if (req_id, g, i) in marked] for g, ids in enumerate(groups)]
        for req_id, groups in claimed.items()
        if any(m[0] == req_id for m in marked)
    }


def _overlaps_itself(layout):
    """Whether two blocks of ``layout`` share a byte."""
    spans = sorted(
        (base + i * layout.block_stride, base + i * layout.block_stride + layout.block_bytes)
        for base in layout.regions
        for i in range(layout.blocks_per_region)
    )
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_blocks_refused_in_a_step_are_those_whose_bytes_meet_another_requests_whatever_the_layouts():
    # Random groups over a few small tensors: whole tensors or some of them, in any order,
    # blocks of any size and stride, K/V halves beside whole pages, two devices at the same
    # addresses. The blocks refused are exactly those whose bytes meet a block given to
    # another request.
    import random

    from kvhygiene.vllm import _shared_in_step

    rng = random.Random(7)
    for case in range(300):
        tensors = [rng.choice([0, 64, 4096]) + k * 256 for k in range(3)]
        layouts = []
        for _ in range(rng.randint(1, 3)):
            block_bytes = rng.choice([8, 16, 32])
            stride = block_bytes * rng.choice([1, 1, 2])
            blocks = rng.randint(1, 256 // stride)
            chosen = rng.sample(tensors, rng.randint(1, 3))
            if rng.random() < 0.3:
                # K and V halves of one tensor, as a (2, blocks, ...) view cuts it.
                chosen = [chosen[0], chosen[0] + 128]
                blocks = min(blocks, 128 // stride)
            regions = [base + rng.choice([0, 0, 4]) for base in chosen]
            layout = kvhygiene.KvLayout(regions, block_bytes, blocks, block_stride=stride, device=rng.choice([0, 0, 1]))
            if _overlaps_itself(layout):
                continue  # the library refuses such a layout (its blocks overlap)
            layouts.append(layout)
        if not layouts:
            continue
        claimed = {
            f"r{r}": [rng.sample(range(layout.blocks_per_region), min(2, layout.blocks_per_region)) for layout in layouts]
            for r in range(rng.randint(1, 4))
        }
        want = _brute_force_shared(claimed, layouts)
        got = _shared_in_step(claimed, layouts)
        assert got == want, f"case {case}: layouts {layouts}, step {claimed}"


def test_a_cache_vllm_shapes_in_kernel_blocks_is_claimed_by_the_schedulers_blocks():
    # vLLM's GPU model runner shapes an attention layer's cache in kernel blocks when the
    # attention backend's block size is smaller than the KV cache manager's
    # (_reshape_kv_cache_tensors: kernel_num_blocks = num_blocks * (block_size //
    # kernel_block_size)), while SchedulerOutput's block ids and num_computed_tokens count the
    # manager's blocks. Following the module's recipe (a layout from the layer tensors with
    # block_dim=1 and blocks_per_block, the manager's block size), claiming manager block 2
    # for a new request must clear the bytes of manager block 2 and leave manager block 1,
    # another request's live block, as it is.
    from fakes import FakeTensor

    lib = kvhygiene.load()
    manager_blocks, per_manager, kernel_tokens, head = 8, 2, 8, 8
    kernel_blocks = manager_blocks * per_manager
    kernel_bytes = kernel_tokens * head * 2  # fp16
    region = kernel_blocks * kernel_bytes
    p = lib.kvh_malloc(2 * region, 0, None)
    try:
        tensor = FakeTensor(p, (2, kernel_blocks, kernel_tokens, 1, head), element_size=2, device_index=0)
        layout = kvhygiene.KvLayout.from_tensors([tensor], block_dim=1, blocks_per_block=per_manager)
        manager_bytes = per_manager * kernel_bytes

        def fill(m, byte):
            for base in (p, p + region):
                ctypes.memset(base + m * manager_bytes, byte, manager_bytes)

        def holds(m, byte):
            want = bytes([byte]) * manager_bytes
            return all(ctypes.string_at(base + m * manager_bytes, manager_bytes) == want for base in (p, p + region))

        manager_tokens = per_manager * kernel_tokens
        claim_scheduled(step(new=[("a", [1], 0), ("c", [2], 0)]), [layout], manager_tokens)
        fill(1, 0xA1)
        fill(2, 0xC1)
        # c finishes; its block 2 goes to b without a scrub; a keeps running on block 1.
        claim_scheduled(step(new=[("b", [2], 0)], cached=[("a", None, manager_tokens)]), [layout], manager_tokens)
        assert (holds(2, 0), holds(1, 0xA1)) == (True, True), (
            "after b's claim of manager block 2: (block 2 zero, a's live block 1 intact)"
        )
    finally:
        lib.kvh_free(p, 2 * region, 0, None)
        kvhygiene.synchronize()


def test_blocks_per_block_refuses_tensor_blocks_that_do_not_make_whole_blocks():
    # Grouping tensor blocks into the engine's blocks needs a whole number of them, back to
    # back: anything else would make a block of the layout span memory that is not one block.
    from fakes import FakeTensor

    dense = FakeTensor(0x10000, (2, 6, 8, 1, 8), element_size=2, device_index=0)
    layout = kvhygiene.KvLayout.from_tensors([dense], block_dim=1, blocks_per_block=3)
    assert (layout.blocks_per_region, layout.block_bytes, layout.block_stride) == (2, 3 * 128, 3 * 128)
    with pytest.raises(ValueError, match="not a multiple"):
        kvhygiene.KvLayout.from_tensors([dense], block_dim=1, blocks_per_block=4)
    # The K half of a [num_blocks, 2, ...] cache: each K block is followed by a V block.
    interleaved = FakeTensor(0x10000, (6, 8, 1, 8), stride=(128, 8, 8, 1), element_size=2, device_index=0)
    with pytest.raises(ValueError, match="do not make one run"):
        kvhygiene.KvLayout.from_tensors([interleaved], block_dim=0, blocks_per_block=2)
    with pytest.raises(ValueError, match="positive"):
        kvhygiene.KvLayout.from_tensors([dense], block_dim=1, blocks_per_block=0)


def test_the_package_declares_the_vllm_plugin_that_installs_kvhygiene():
    # vLLM runs the entry points of "vllm.general_plugins" in every process it starts; the
    # package declares install_plugin there, and it names a function that exists.
    from pathlib import Path

    text = (Path(kvhygiene.__file__).resolve().parent.parent / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."vllm.general_plugins"]', 1)
    assert len(section) == 2, "pyproject.toml declares no vllm.general_plugins entry point"
    entry = section[1].strip().splitlines()[0]
    assert entry == 'kvhygiene = "kvhygiene.vllm:install_plugin"', entry
    from kvhygiene.vllm import install_plugin

    assert callable(install_plugin)


def test_the_vllm_plugin_installs_and_lets_a_failure_stop_the_process(monkeypatch):
    # The plugin is install(): a worker whose install fails (CUDA already initialised, no
    # library) raises, which vLLM lets stop the process, rather than serving unprotected.
    from kvhygiene.vllm import install_plugin

    calls = []
    monkeypatch.setattr(kvhygiene, "install", lambda: calls.append("install"))
    install_plugin()
    assert calls == ["install"]

    def refuse():
        raise kvhygiene.AllocatorAlreadyInUseError("CUDA is already initialised")

    monkeypatch.setattr(kvhygiene, "install", refuse)
    with pytest.raises(kvhygiene.AllocatorAlreadyInUseError):
        install_plugin()


def test_the_claim_benchmark_runs_and_reports_each_step(tmp_path):
    # benches/vllm_claim.py (docs/benchmarks.md) times claim_scheduled: it runs against this
    # package and prints a median for each kind of step.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(kvhygiene.__file__).resolve().parents[2]
    env = dict(os.environ, KVH_BACKEND="host")
    env.pop("KVH_LOG_DIR", None)
    run = subprocess.run(
        [sys.executable, str(root / "benches" / "vllm_claim.py"), str(root / "python")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(" ms") for line in lines), run.stdout
