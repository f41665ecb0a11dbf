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
