"""claim_blocks over a set larger than one library call: the error it raises describes the
whole claim as ClaimRefusedError documents it."""

import pytest

import kvhygiene


def test_a_split_claim_whose_later_call_is_refused_by_the_gate_does_not_say_the_rest_was_handed_over(
    monkeypatch,
):
    # Three library calls' worth of blocks. The first call hands over blocks 0 and 2 and
    # names block 1 (taken by another claim: code 7022, "the other blocks were handed
    # over"); the second is refused under KVH_KV_GATE=enforce (code 7021: nothing of it was
    # handed over, block 4 named); the third is never made. Blocks 3, 4, 5 and 6 were not
    # handed over. ClaimRefusedError says that either by its code (7021: nothing was handed
    # over) or by naming them in refused_blocks: with code 7022 and refused_blocks [1, 4], a
    # caller that uses every block not named would use blocks 3, 5 and 6, never claimed.
    calls = [
        (kvhygiene.KVH_ERR_KV_TAKEN, [1], [0, 1, 2], "taken by another claim"),
        (kvhygiene.KVH_ERR_KV_GATE, [4], [3, 4], "would change owner unscrubbed"),
        (kvhygiene.KVH_OK, [], [5, 6], ""),
    ]
    made = []

    def kv_calls(*_a, **_k):
        for c in calls:
            made.append(c[2])
            yield c

    monkeypatch.setattr(kvhygiene, "_kv_calls", kv_calls)
    with pytest.raises(kvhygiene.ClaimRefusedError) as e:
        kvhygiene.claim_blocks(None, list(range(7)))
    handed_over = {0, 2}
    not_handed_over = set(range(7)) - handed_over
    says_nothing_handed_over = e.value.code == kvhygiene.KVH_ERR_KV_GATE
    names_every_block_not_handed_over = not_handed_over <= set(e.value.refused_blocks)
    assert says_nothing_handed_over or names_every_block_not_handed_over, (
        f"code {e.value.code} says the blocks not in refused_blocks {e.value.refused_blocks} "
        f"were handed over, but blocks {sorted(not_handed_over - set(e.value.refused_blocks))} "
        "were not"
    )


def test_a_split_claim_refused_by_the_gate_names_the_blocks_of_the_calls_it_stops(monkeypatch):
    # A claim split over three library calls: the first hands over blocks 0 and 1, the second
    # is refused whole under KVH_KV_GATE=enforce (code 7021), the third (blocks 4 and 5) is
    # never made. ClaimRefusedError documents that the calls before the refusing one were
    # handed over and that refused blocks must not be used: every block not handed over
    # (2, 3, 4, 5) is in refused_blocks.
    calls = [
        (kvhygiene.KVH_OK, [], [0, 1], ""),
        (kvhygiene.KVH_ERR_KV_GATE, [3], [2, 3], "would change owner unscrubbed"),
        (kvhygiene.KVH_OK, [], [4, 5], ""),
    ]

    def kv_calls(*_a, **_k):
        yield from calls

    monkeypatch.setattr(kvhygiene, "_kv_calls", kv_calls)
    with pytest.raises(kvhygiene.ClaimRefusedError) as e:
        kvhygiene.claim_blocks(None, list(range(6)))
    missing = {2, 3, 4, 5} - set(e.value.refused_blocks)
    assert not missing, (
        f"blocks {sorted(missing)} were not handed over and are not in refused_blocks "
        f"{e.value.refused_blocks}"
    )


def test_blocks_the_gate_refuses_are_named_in_the_order_given(monkeypatch):
    # Under KVH_KV_GATE=enforce nothing of the refused call is handed over: its blocks are
    # refused_blocks in the order the claim gave them, whichever of them the library named
    # (block 2 would change owner; block 3, scrubbed, is refused with it).
    calls = [(kvhygiene.KVH_ERR_KV_GATE, [2], [2, 3], "1 of the KV blocks would change owner")]
    monkeypatch.setattr(kvhygiene, "_kv_calls", lambda *a, **k: iter(calls))
    with pytest.raises(kvhygiene.ClaimRefusedError) as e:
        kvhygiene.claim_blocks(None, [2, 3, 4])
    assert e.value.refused_blocks == [2, 3, 4]
    assert e.value.unscrubbed_blocks == [2], "the block the library named is the one to scrub"


def test_a_split_claim_with_a_failed_verification_after_a_taken_block_reports_the_failed_verification(monkeypatch):
    # One library call reports a failed verification (7009) before blocks another claim took
    # (7022); a claim split over several calls does too, whichever call found which: the
    # error's code says a block failed verification (to retire), and both blocks are named.
    calls = [
        (kvhygiene.KVH_ERR_KV_TAKEN, [1], [0, 1], "taken by another claim"),
        (kvhygiene.KVH_ERR_VERIFY_FAILED, [3], [2, 3], "failed verification"),
    ]
    monkeypatch.setattr(kvhygiene, "_kv_calls", lambda *a, **k: iter(calls))
    with pytest.raises(kvhygiene.ClaimRefusedError) as e:
        kvhygiene.claim_blocks(None, [0, 1, 2, 3])
    assert e.value.code == kvhygiene.KVH_ERR_VERIFY_FAILED, e.value
    assert sorted(e.value.refused_blocks) == [1, 3]


def test_a_split_claim_that_stops_on_an_error_still_names_the_blocks_that_failed_verification(monkeypatch):
    # A claim split over several library calls: the first hands over blocks 1 and 2 and names
    # block 3, whose scrub failed verification (code 7009); the second stops on a backend
    # error. As for scrub_blocks, the error says so and still names block 3, to retire.
    calls = [
        (kvhygiene.KVH_ERR_VERIFY_FAILED, [3], [1, 2, 3], "1 block failed verification"),
        (7012, [], [4, 5], "backend error"),
    ]
    monkeypatch.setattr(kvhygiene, "_kv_calls", lambda *a, **k: iter(calls))
    with pytest.raises(kvhygiene.KvhError) as e:
        kvhygiene.claim_blocks(None, [1, 2, 3, 4, 5])
    named = set(getattr(e.value, "refused_blocks", None) or ()) | set(getattr(e.value, "failed_blocks", None) or ())
    assert 3 in named, f"block 3 failed verification and the error ({e.value!r}) does not name it"


def test_a_claim_whose_gate_scrub_stopped_names_the_blocks_it_found_not_zero(monkeypatch):
    # The first library call refuses block 1 (taken); the second fails with KVH_ERR_BACKEND
    # (its gate scrub stopped) and names block 3, which a batch that completed found not
    # zero. The KvhError says nothing was handed over by that call, and its refused_blocks
    # names both: block 3 must be retired, as scrub_blocks's failed_blocks are.
    calls = [
        (kvhygiene.KVH_ERR_KV_TAKEN, [1], [0, 1], "taken by another claim"),
        (kvhygiene.KVH_ERR_BACKEND, [3], [2, 3, 4], "backend error: injected"),
    ]
    monkeypatch.setattr(kvhygiene, "_kv_calls", lambda *a, **k: iter(calls))
    with pytest.raises(kvhygiene.KvhError) as e:
        kvhygiene.claim_blocks(None, [0, 1, 2, 3, 4])
    assert not isinstance(e.value, kvhygiene.ClaimRefusedError)
    assert e.value.code == kvhygiene.KVH_ERR_BACKEND
    assert e.value.refused_blocks == [1, 3]
