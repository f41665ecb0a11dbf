"""docs/forensic-log.md says it specifies the log "precisely enough for an auditor to write an
independent verifier". tests/python/spec_verifier.py is such a verifier, written from that
document, README.md and `kvh --help`. Here it is run on real logs (`kvh demo`, crash
recovery, `kvh prune-log`), intact and tampered, and must reach the verdict `kvh verify-log`
reaches: 0 verified, 1 tampering or corruption, 2 nothing to verify.

Logs are edited and then sealed again with the keys the test holds (hashes, MACs, signed
checkpoint), so that a case probes one rule of the format, not the seal around it.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spec_verifier as sv  # noqa: E402
from _spec_common import clean_env, kvh as kvh_binary  # noqa: E402
from spec_verifier import sign_checkpoint  # noqa: E402


# ---------------------------------------------------------------- fixtures


class Keys:
    pass


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    os.chmod(d, 0o700)
    k = Keys()
    k.dir = d
    for name in ("hmac", "hmac2"):
        p = d / f"{name}.key"
        p.write_bytes(hashlib.sha256(name.encode()).hexdigest()[:40].encode() + b"\n")
        os.chmod(p, 0o600)
        setattr(k, name, p)
    for name in ("sig", "sig2"):
        subprocess.run([kvh_binary(), "keygen", "--out", str(d / name)], check=True, capture_output=True)
        setattr(k, name, d / f"{name}.key")
        setattr(k, name + "_pub", d / f"{name}.pub")
    return k


def demo(log_dir, hmac_key=None, sig_key=None, fault=False, requests=4, max_bytes=4096, every=6):
    env = clean_env(KVH_LOG_MAX_BYTES=max_bytes, KVH_CHECKPOINT_EVERY=every, KVH_LOG_FSYNC="never")
    if hmac_key:
        env["KVH_HMAC_KEY_FILE"] = str(hmac_key)
    if sig_key:
        env["KVH_SIGNING_KEY_FILE"] = str(sig_key)
    args = [kvh_binary(), "demo", "--tenants", "2", "--requests", str(requests), "--decode-tokens", "64",
            "--log-dir", str(log_dir)]
    if fault:
        args.append("--inject-fault")
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.fixture(scope="session")
def signed_log(tmp_path_factory, keys):
    """One chain, sealed and signed, several files, an injected fault."""
    d = tmp_path_factory.mktemp("signed") / "log"
    demo(d, keys.hmac, keys.sig, fault=True)
    return d


@pytest.fixture(scope="session")
def two_chains(tmp_path_factory, keys):
    d = tmp_path_factory.mktemp("two") / "log"
    demo(d, keys.hmac, keys.sig, requests=3)
    demo(d, keys.hmac, keys.sig, requests=3)
    assert len(chains_of(d)) == 2
    return d


@pytest.fixture(scope="session")
def rotated_keys_log(tmp_path_factory, keys):
    """Two chains: the first sealed with hmac/sig, the second (after a key rotation) with hmac2/sig2."""
    d = tmp_path_factory.mktemp("rot") / "log"
    demo(d, keys.hmac, keys.sig, requests=2)
    demo(d, keys.hmac2, keys.sig2, requests=2)
    return d


@pytest.fixture(scope="session")
def recovered_log(tmp_path_factory, keys):
    """Sealed, unsigned. The first run's stop record is replaced by torn bytes (a crash), and
    the second run continues the chain with a recovery record."""
    d = tmp_path_factory.mktemp("rec") / "log"
    demo(d, keys.hmac)
    (chain,) = chains_of(d)
    newest = chain_files(d, chain)[-1]
    lines = newest.read_bytes().split(b"\n")[:-1]
    assert b'"kind":"stop"' in lines[-1]
    newest.write_bytes(b"\n".join(lines[:-1]) + b'\n{"chain":"torn')
    demo(d, keys.hmac)
    kinds = [r["kind"] for r in records(d, chain)]
    assert "recovery" in kinds, kinds
    return d


def chains_of(d):
    return sorted({sv.CHAIN_FILE.match(n).group(1) for n in os.listdir(d) if sv.CHAIN_FILE.match(n)})


def chain_files(d, chain):
    return sorted(p for p in Path(d).iterdir() if sv.CHAIN_FILE.match(p.name) and p.name.startswith(f"kvh-{chain}-"))


def records(d, chain):
    out = []
    for p in chain_files(d, chain):
        for line in p.read_bytes().split(b"\n"):
            if line.startswith(b"{") and line.endswith(b"}"):
                out.append(json.loads(line))
    return out


# ---------------------------------------------------------------- verdicts


def kvh_verify(d, *opts):
    r = subprocess.run([kvh_binary(), "verify-log", str(d), *map(str, opts)], env=clean_env(),
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def spec_verify(d, key_files=(), pubs=(), **kw):
    return sv.verify(d, key_files=key_files, public_key_files=pubs, **kw)


def both(d, keys, with_key=True, with_pub=True, extra=(), **kw):
    """(kvh status, spec status, kvh output, spec result)."""
    opts, kf, pf = [], [], []
    if with_key:
        opts += ["--key-file", keys.hmac]
        kf = [keys.hmac]
    if with_pub:
        opts += ["--public-key", keys.sig_pub]
        pf = [keys.sig_pub]
    if kw.get("allow_pruned"):
        opts.append("--allow-pruned")
    for a in kw.get("archive_dirs", ()):
        opts += ["--archive-dir", a]
    opts += list(extra)
    rc, out = kvh_verify(d, *opts)
    res = spec_verify(d, kf, pf, **kw)
    return rc, res.status, out, res


def agree(d, keys, expect, **kw):
    rc, st, out, res = both(d, keys, **kw)
    assert (rc, st) == (expect, expect), f"kvh verify-log: {rc}\n{out}\nspec verifier: {res}"


def copy(src, tmp_path, name="log"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    os.chmod(dst, 0o700)
    return dst


# ---------------------------------------------------------------- resealing


def reseal(d, chain, keys, mutate, serialize=sv.canonical, hmac_key=None, sig_key=None, ckpt=True):
    """Rewrite chain `chain` in d: mutate(list of (file index, record body)) edits the records,
    then every hash, prev, MAC and the signed checkpoint (kept at its seq) are made again."""
    hmac_key = keys.hmac if hmac_key is None else hmac_key
    sig_key = keys.sig if sig_key is None else sig_key
    secret = sv.read_hmac_key(hmac_key)
    files = chain_files(d, chain)
    recs = []
    for p in files:
        idx = int(sv.CHAIN_FILE.match(p.name).group(2))
        for line in p.read_bytes().split(b"\n"):
            if line:
                r = json.loads(line)
                r.pop("hash")
                r.pop("mac", None)
                recs.append([idx, r])
    recs = mutate(recs) or recs
    prev = sv.ZERO_HASH
    out = {p: [] for p in files}
    by_idx = {int(sv.CHAIN_FILE.match(p.name).group(2)): p for p in files}
    hashes = {}
    for idx, r in recs:
        r["prev"] = prev
        body = serialize(r)
        h = sv.record_hash(prev, body)
        line = body[:-1] + b',"hash":"' + h.encode() + b'"'
        if "mac" not in r.get("_drop", ()):
            line += b',"mac":"' + sv.record_mac(sv.ratchet(secret, idx), h).encode() + b'"'
        line += b"}"
        out[by_idx[idx]].append(line)
        hashes[r["seq"]] = (h, by_idx[idx].name)
        prev = h
    for p, lines in out.items():
        p.write_bytes(b"".join(line + b"\n" for line in lines))
    ck_path = Path(d) / f"kvh-{chain}.ckpt"
    if ckpt and ck_path.exists():
        ck = json.loads(ck_path.read_bytes())
        seq = min(ck["seq"], max(hashes))
        ck["seq"], (ck["hash"], ck["file"]) = seq, hashes[seq]
        ck_path.write_bytes(sign_checkpoint(ck, Path(sig_key).read_text().strip()))
    return recs


# ================================================================ intact logs


def test_test_vectors_of_the_spec():
    body = (b'{"chain":"p1-t2","epoch":0,"kind":"start","model_id":null,"pid":1,"prev":"' + b"0" * 64
            + b'","request_id":null,"seq":0,"tenant_id":null,"ts":1700000000000000000,"v":1}')
    h = sv.record_hash(sv.ZERO_HASH, body)
    assert h == "bf1f7834f3783672df5afe4e576d5b322beac65b6479a1fa729062761472c8fe"
    k = b"0123456789abcdef-secret"
    assert sv.record_mac(k, h) == "181958f446e125d9452fad319e0fbd9137d2d5900f60496de925d1ea44bea117"
    assert sv.record_mac(sv.ratchet(k, 1), h) == "a6d8b2c3038111f67189625763273db5692c6dd76b76f80f1d97de7f3837c598"


def test_intact_signed_log_verifies(signed_log, keys):
    assert len(chain_files(signed_log, chains_of(signed_log)[0])) >= 3  # rotations happened
    agree(signed_log, keys, 0)
    agree(signed_log, keys, 0, with_pub=False)
    agree(signed_log, keys, 0, with_key=False, with_pub=False)


def test_intact_two_chains_verify(two_chains, keys):
    agree(two_chains, keys, 0)


def test_checkpoint_names_the_chain_key_id(signed_log, keys):
    (chain,) = chains_of(signed_log)
    ck = json.loads((signed_log / f"kvh-{chain}.ckpt").read_bytes())
    assert ck["key_id"] == sv.key_id(sv.read_hmac_key(keys.hmac))


def test_crash_recovery_log_verifies(recovered_log, keys):
    (chain,) = chains_of(recovered_log)
    rec = next(r for r in records(recovered_log, chain) if r["kind"] == "recovery")
    assert rec["torn_bytes"] == len(b'{"chain":"torn')
    assert rec["torn_sha256"] == hashlib.sha256(b'{"chain":"torn').hexdigest()
    agree(recovered_log, keys, 0, with_pub=False)


def test_key_rotation_both_keys_given(rotated_keys_log, keys):
    opts = ["--key-file", keys.hmac2, "--key-file", keys.hmac, "--public-key", keys.sig2_pub, "--public-key", keys.sig_pub]
    rc, out = kvh_verify(rotated_keys_log, *opts)
    res = spec_verify(rotated_keys_log, [keys.hmac2, keys.hmac], [keys.sig2_pub, keys.sig_pub])
    assert (rc, res.status) == (0, 0), (out, res)


def test_key_rotation_old_key_only_rejects_new_chain(rotated_keys_log, keys):
    # replaying only the retired key: the new chain's MACs do not verify with it
    agree(rotated_keys_log, keys, 1, with_pub=False)


# ================================================================ tampering


def test_flipped_byte_rejected(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    f = chain_files(d, chains_of(d)[0])[1]
    b = bytearray(f.read_bytes())
    i = b.index(b'"ts":') + 6
    b[i] = ord("1") if b[i] != ord("1") else ord("2")
    f.write_bytes(bytes(b))
    agree(d, keys, 1)
    agree(d, keys, 1, with_key=False, with_pub=False)


def test_deleted_line_rejected(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    f = chain_files(d, chains_of(d)[0])[0]
    lines = f.read_bytes().split(b"\n")
    del lines[2]
    f.write_bytes(b"\n".join(lines))
    agree(d, keys, 1)


def test_reordered_lines_rejected(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    f = chain_files(d, chains_of(d)[0])[0]
    lines = f.read_bytes().split(b"\n")
    lines[1], lines[2] = lines[2], lines[1]
    f.write_bytes(b"\n".join(lines))
    agree(d, keys, 1, with_key=False, with_pub=False)


def test_truncated_tail_line_boundary(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    f = chain_files(d, chains_of(d)[0])[-1]
    lines = f.read_bytes().split(b"\n")[:-1]
    f.write_bytes(b"".join(x + b"\n" for x in lines[:-1]))
    agree(d, keys, 1)  # the checkpoint covers the stop record
    agree(d, keys, 0, with_pub=False)  # without checkpoints a cut at a line boundary is invisible


def test_truncated_tail_mid_line(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    f = chain_files(d, chains_of(d)[0])[-1]
    f.write_bytes(f.read_bytes()[:-20])
    agree(d, keys, 1)
    agree(d, keys, 0, with_pub=False)  # a torn tail of the newest file is not an error


def test_deleted_middle_file_rejected(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    chain_files(d, chains_of(d)[0])[1].unlink()
    agree(d, keys, 1)
    agree(d, keys, 1, with_key=False, with_pub=False)


def test_deleted_newest_files_caught_by_checkpoint(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    chain_files(d, chains_of(d)[0])[-1].unlink()
    agree(d, keys, 1)
    agree(d, keys, 0, with_pub=False)


def test_truncated_rotated_file_rejected(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    f = chain_files(d, chains_of(d)[0])[0]
    f.write_bytes(f.read_bytes()[:-5])
    agree(d, keys, 1, with_key=False, with_pub=False)


def test_empty_rotated_file_rejected(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    files = chain_files(d, chains_of(d)[0])
    files[-1].rename(files[-1].with_name(files[-1].name.replace(files[-1].name[-12:-6], "%06d" % len(files))))
    files[-1].write_bytes(b"")
    agree(d, keys, 1, with_key=False, with_pub=False)


def test_file_swapped_between_chains_rejected(two_chains, keys, tmp_path):
    d = copy(two_chains, tmp_path)
    a, b = chains_of(d)
    fa, fb = chain_files(d, a)[1], chain_files(d, b)[1]
    da, db = fa.read_bytes(), fb.read_bytes()
    fa.write_bytes(db)
    fb.write_bytes(da)
    agree(d, keys, 1)
    agree(d, keys, 1, with_key=False, with_pub=False)


def test_checkpoint_altered_rejected(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    p = d / f"kvh-{chain}.ckpt"
    ck = json.loads(p.read_bytes())
    ck["seq"] -= 1
    cb = sv.canonical({k: v for k, v in ck.items() if k != "sig"})
    p.write_bytes(cb[:-1] + b',"sig":"' + ck["sig"].encode() + b'"}\n')
    agree(d, keys, 1)


def test_checkpoint_deleted_rejected_with_pinned_key(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    (d / f"kvh-{chain}.ckpt").unlink()
    agree(d, keys, 1)


def test_wrong_hmac_key_rejected(signed_log, keys, tmp_path):
    rc, out = kvh_verify(signed_log, "--key-file", keys.hmac2)
    res = spec_verify(signed_log, [keys.hmac2])
    assert (rc, res.status) == (1, 1), (out, res)


def test_other_public_key_rejected(signed_log, keys):
    rc, out = kvh_verify(signed_log, "--key-file", keys.hmac, "--public-key", keys.sig2_pub)
    res = spec_verify(signed_log, [keys.hmac], [keys.sig2_pub])
    assert (rc, res.status) == (1, 1), (out, res)


def test_chain_sealed_with_old_key_spliced_in_rejected(rotated_keys_log, keys, tmp_path):
    # a chain re-sealed with the retired secret but its checkpoint names the new one
    d = copy(rotated_keys_log, tmp_path)
    new = [c for c in chains_of(d) if records(d, c)[0].get("signer") == sv.read_public_key(keys.sig2_pub)][0]
    reseal(d, new, keys, lambda r: None, hmac_key=keys.hmac, sig_key=keys.sig2)
    p = d / f"kvh-{new}.ckpt"
    ck = json.loads(p.read_bytes())
    ck["key_id"] = sv.key_id(sv.read_hmac_key(keys.hmac2))
    p.write_bytes(sign_checkpoint(ck, keys.sig2.read_text().strip()))
    opts = ["--key-file", keys.hmac2, "--key-file", keys.hmac, "--public-key", keys.sig2_pub, "--public-key", keys.sig_pub]
    rc, out = kvh_verify(d, *opts)
    res = spec_verify(d, [keys.hmac2, keys.hmac], [keys.sig2_pub, keys.sig_pub])
    assert (rc, res.status) == (1, 1), (out, res)


def test_resealed_edit_passes_without_checkpoints_fails_with(signed_log, keys, tmp_path):
    # whoever holds the HMAC secret can rewrite a chain; only the signed checkpoint catches it
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)

    def edit(recs):
        recs[2][1]["ts"] += 1

    reseal(d, chain, keys, edit, ckpt=False)
    agree(d, keys, 0, with_pub=False)
    agree(d, keys, 1)


# ================================================================ canonical form (resealed probes)


def _summary_edit(value):
    def edit(recs):
        r = next(r for _, r in recs if r["kind"] == "summary")
        r["counters"]["probe"] = value
    return edit


CANONICAL_CASES = {
    # name: (mutate, serializer or None, expected verdict by the spec)
    "non_ascii_raw": (_summary_edit("caf\u00e9 \u2028 \x7f /"), None, 0),
    "astral_and_private_use_keys_utf8_order": (_summary_edit({"\ue000": 1, "\U0001f600": 2, "z": 3}), None, 0),
    "control_chars_lowercase_escape": (_summary_edit("a\x1fb\x00c\b\f\n\r\t"), None, 0),
    "u64_max": (_summary_edit(2**64 - 1), None, 0),
    "i64_min": (_summary_edit(-(2**63)), None, 0),
    "depth_32": (_summary_edit(json.loads("[" * 30 + "]" * 30)), None, 0),  # record 1, counters 2, probe 3..32
    "depth_33": (_summary_edit(json.loads("[" * 31 + "]" * 31)), lambda r: json.dumps(r, sort_keys=True, separators=(",", ":")).encode(), 1),
}


def _ser_escaped_slash(r):
    return sv.canonical(r).replace(b"a/b", b"a\\/b")


def _ser_upper_u(r):
    return sv.canonical(r).replace(b"\\u001f", b"\\u001F")


def _ser_space(r):
    return sv.canonical(r).replace(b'"v":1', b'"v": 1')


def _ser_unsorted(r):
    items = list(r.items())
    return b"{" + b",".join(sv._enc_str(k) + b":" + sv.canonical(v) for k, v in reversed(items)) + b"}"


def _ser_ascii(r):
    return json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _ser_bigger(r):
    return sv.canonical(r).replace(b'"probe":1', b'"probe":18446744073709551616')


def _ser_float(r):
    return sv.canonical(r).replace(b'"probe":1', b'"probe":1.0')


def _ser_minus_zero(r):
    return sv.canonical(r).replace(b'"probe":0', b'"probe":-0')


def _ser_dup(r):
    return sv.canonical(r).replace(b'"probe":1', b'"probe":1,"probe":1')


CANONICAL_CASES.update({
    "escaped_slash": (_summary_edit("a/b"), _ser_escaped_slash, 1),
    "uppercase_u_escape": (_summary_edit("a\x1fb"), _ser_upper_u, 1),
    "whitespace": (_summary_edit(1), _ser_space, 1),
    "unsorted_keys": (_summary_edit(1), _ser_unsorted, 1),
    "non_ascii_escaped": (_summary_edit("caf\u00e9"), _ser_ascii, 1),
    "u64_overflow": (_summary_edit(1), _ser_bigger, 1),
    "float": (_summary_edit(1), _ser_float, 1),
    "duplicate_key": (_summary_edit(1), _ser_dup, 1),
    "minus_zero": (_summary_edit(0), _ser_minus_zero, 1),
})


@pytest.mark.parametrize("case", sorted(CANONICAL_CASES))
def test_canonical_form(case, signed_log, keys, tmp_path):
    mutate, ser, expect = CANONICAL_CASES[case]
    d = copy(signed_log, tmp_path)
    reseal(d, chains_of(d)[0], keys, mutate, serialize=ser or sv.canonical)
    agree(d, keys, expect)


# ================================================================ schema and chain rules (resealed)


def _first(kind):
    return lambda recs: next(r for _, r in recs if r["kind"] == kind)


def _del_field(kind, field):
    def edit(recs):
        del _first(kind)(recs)[field]
    return edit


def _set_field(kind, field, value):
    def edit(recs):
        _first(kind)(recs)[field] = value
    return edit


def _drop_mac_of(kind):
    def edit(recs):
        _first(kind)(recs)["_drop"] = ["mac"]
    return edit


def _ser_without_private(r):
    return sv.canonical({k: v for k, v in r.items() if k != "_drop"})


SCHEMA_CASES = {
    # the spec's rules 2-4 and the record schema's header table
    "v_2": (_set_field("summary", "v", 2), 1),
    "epoch_wrong": (_set_field("summary", "epoch", 0), 1),
    "chain_wrong": (_set_field("summary", "chain", "p1-t1"), 1),
    "rotate_prev_seq_wrong": (lambda recs: _set_field("rotate", "prev_seq", 0)(recs), 1),
    "rotate_prev_file_wrong": (_set_field("rotate", "prev_file", "kvh-p1-t1-000000.jsonl"), 1),
    "record_after_stop": (lambda recs: recs.append([recs[-1][0], dict(recs[-1][1], seq=recs[-1][1]["seq"] + 1, kind="summary", counters={})]), 1),
    "mac_missing_with_key": (_drop_mac_of("summary"), 1),
    "header_ts_string": (_set_field("summary", "ts", "1"), 1),
    "header_ts_missing": (_del_field("summary", "ts"), 1),
    # fields a kind's table names
    "rotate_without_prev_file": (_del_field("rotate", "prev_file"), 1),
    "seq_restarts": (_set_field("summary", "seq", 0), 1),
    "start_in_the_middle": (_set_field("summary", "kind", "start"), 1),
    # the chain rules list no check of a kind's own fields nor of the kind's name: accepted
    "stop_without_records_written": (_del_field("stop", "records_written"), 0),
    "unknown_kind": (_set_field("summary", "kind", "no_such_kind"), 0),
    "extra_member": (_set_field("summary", "x_extra", 1), 0),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_and_chain_rules(case, signed_log, keys, tmp_path):
    mutate, expect = SCHEMA_CASES[case]
    d = copy(signed_log, tmp_path)
    reseal(d, chains_of(d)[0], keys, mutate, serialize=_ser_without_private)
    agree(d, keys, expect)


@pytest.mark.parametrize("case", ["tenant_id_missing", "tenant_id_number", "model_id_missing_on_start"])
def test_header_ids_present_and_string_or_null(case, signed_log, keys, tmp_path):
    # "Header fields, present in every record": tenant_id, request_id, model_id are
    # "string or null". A record without one, or with a number there, is not a record of the
    # schema, and a verifier of the schema refuses it.
    mutate = {
        "tenant_id_missing": _del_field("summary", "tenant_id"),
        "tenant_id_number": _set_field("summary", "tenant_id", 5),
        "model_id_missing_on_start": _del_field("start", "model_id"),
    }[case]
    d = copy(signed_log, tmp_path)
    reseal(d, chains_of(d)[0], keys, mutate, serialize=_ser_without_private)
    agree(d, keys, 1)


# ================================================================ checkpoints (re-signed probes)


def _resign(d, keys, change):
    (chain,) = chains_of(d)
    p = d / f"kvh-{chain}.ckpt"
    ck = json.loads(p.read_bytes())
    change(ck, d, chain)
    p.write_bytes(sign_checkpoint(ck, keys.sig.read_text().strip()))


def _ck_earlier(ck, d, chain):
    recs = records(d, chain)
    r = recs[len(recs) // 2]
    ck["seq"], ck["hash"] = r["seq"], r["hash"]
    ck["file"] = next(p.name for p in chain_files(d, chain) if f'"seq":{r["seq"]},'.encode() in p.read_bytes())


CKPT_CASES = {
    "earlier_seq_valid": (_ck_earlier, 0),  # a checkpoint below the head: the rest is the tail
    "without_key_id": (lambda ck, d, c: ck.pop("key_id"), 0),  # "key_id aside"
    "extra_member": (lambda ck, d, c: ck.update(extra=1), 1),
    "missing_ts": (lambda ck, d, c: ck.pop("ts"), 1),
    "wrong_file": (lambda ck, d, c: ck.update(file=chain_files(d, c)[0].name), 1),
    "wrong_hash": (lambda ck, d, c: ck.update(hash="0" * 64), 1),
    "beyond_head": (lambda ck, d, c: ck.update(seq=ck["seq"] + 1), 1),
    "other_key_id": (lambda ck, d, c: ck.update(key_id="0" * 32), 1),
}


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_checkpoint_rules(case, signed_log, keys, tmp_path):
    change, expect = CKPT_CASES[case]
    d = copy(signed_log, tmp_path)
    _resign(d, keys, change)
    agree(d, keys, expect)


def test_checkpoint_bad_signature(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    p = d / f"kvh-{chain}.ckpt"
    b = p.read_bytes()
    i = b.index(b'"sig":"') + 8
    p.write_bytes(b[:i] + (b"0" if b[i:i + 1] != b"0" else b"1") + b[i + 1:])
    agree(d, keys, 1)


def test_checkpoint_signature_with_a_non_canonical_s_rejected(signed_log, keys, tmp_path):
    # RFC 8032 section 5.1.7: a signature whose S (its last 32 bytes, little-endian) is not
    # below the group order L is rejected. S + L verifies the same equation as S, so only
    # this range check tells the two apart.
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    p = d / f"kvh-{chain}.ckpt"
    ck, body = sv.parse_checkpoint(p.read_bytes())
    sig = bytes.fromhex(ck["sig"])
    s = int.from_bytes(sig[32:], "little")
    assert s < sv._L
    forged = sig[:32] + int.to_bytes(s + sv._L, 32, "little")
    pub = bytes.fromhex(ck["public_key"])
    assert sv.ed25519_verify(pub, body, sig)
    assert not sv.ed25519_verify(pub, body, forged)
    p.write_bytes(p.read_bytes().replace(sig.hex().encode(), forged.hex().encode()))
    rc, st, out, res = both(d, keys)
    assert (rc, st) == (1, 1), f"kvh verify-log: {rc}\n{out}\nspec verifier: {res}"
    assert res.chains[chain] == "bad checkpoint signature", res
    assert "checkpoint" in out, out  # kvh: no checkpoint signed by the pinned public key


@pytest.mark.parametrize("setting", ["no_public_key", "checkpoint_without_key_id"])
def test_first_record_mac_checked_when_no_checkpoint_names_the_key(setting, signed_log, keys, tmp_path):
    # With no signed checkpoint naming a key_id, the chain's secret is the one the first
    # record's MAC verifies with; a first record whose MAC no given key verifies (here its MAC
    # under another secret, the rest of the chain untouched) is refused at that line.
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    with_pub = setting != "no_public_key"
    if with_pub:
        _resign(d, keys, lambda ck, d, c: ck.pop("key_id"))
    first = chain_files(d, chain)[0]
    h = records(d, chain)[0]["hash"]
    other = sv.record_mac(sv.ratchet(sv.read_hmac_key(keys.hmac2), 0), h).encode()
    _edit_line(d, keys, lambda line: line[:line.index(b'"mac":"') + 7] + other + b'"}', file_no=0, line_no=0)
    rc, st, out, res = both(d, keys, with_pub=with_pub)
    assert (rc, st) == (1, 1), f"kvh verify-log: {rc}\n{out}\nspec verifier: {res}"
    assert res.chains[chain].startswith(f"{first.name}:1: "), res
    assert f"{first.name}:1: " in out, out


def test_two_checkpoint_files_for_one_chain(signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    ckdir = tmp_path / "ck"
    ckdir.mkdir(mode=0o700)
    shutil.copy(d / f"kvh-{chain}.ckpt", ckdir / f"kvh-{chain}.ckpt")
    shutil.copy(d / f"kvh-{chain}.ckpt", ckdir / "copy.ckpt")
    rc, out = kvh_verify(d, "--key-file", keys.hmac, "--public-key", keys.sig_pub, "--checkpoint", ckdir)
    res = spec_verify(d, [keys.hmac], [keys.sig_pub], checkpoint=ckdir)
    # copy.ckpt is not kvh-*.ckpt: a directory given as --checkpoint is read for kvh-*.ckpt only
    assert (rc, res.status) == (0, 0), (out, res)


# ================================================================ recovery records


@pytest.mark.parametrize("field,value,expect", [
    ("last_good_seq", 0, 1),
    ("last_good_hash", "0" * 64, 1),
    ("torn_sha256", sv.EMPTY_SHA256, 1),  # digest of nothing with torn_bytes > 0
    ("torn_sha256", "A" * 64, 1),
])
def test_recovery_record_rules(field, value, expect, recovered_log, keys, tmp_path):
    d = copy(recovered_log, tmp_path)
    reseal(d, chains_of(d)[0], keys, _set_field("recovery", field, value))
    agree(d, keys, expect, with_pub=False)


# ================================================================ nothing follows stop


def test_file_after_stop_rejected(signed_log, keys, tmp_path):
    # rule 4: "nothing follows `stop`", an empty file of the next index included
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    nxt = d / sv.file_name(chain, len(chain_files(d, chain)))
    nxt.write_bytes(b"")
    os.chmod(nxt, 0o600)
    agree(d, keys, 1)
    agree(d, keys, 1, with_key=False, with_pub=False)


def test_bytes_after_stop_rejected(signed_log, keys, tmp_path):
    # rule 4: a torn tail after the `stop` record is not a writer that crashed mid-line
    d = copy(signed_log, tmp_path)
    f = chain_files(d, chains_of(d)[0])[-1]
    f.write_bytes(f.read_bytes() + b'{"chain":"p1')
    agree(d, keys, 1)
    agree(d, keys, 1, with_key=False, with_pub=False)


# ================================================================ file names


def test_seven_digit_index_is_not_the_chains(signed_log, keys, tmp_path):
    # "a file named otherwise (0000001) is not one of the chain's"
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    shutil.copy(chain_files(d, chain)[1], d / f"kvh-{chain}-0000001.jsonl")
    agree(d, keys, 0)


def test_empty_directory_is_status_2(tmp_path, keys):
    d = tmp_path / "empty"
    d.mkdir(mode=0o700)
    agree(d, keys, 2, with_pub=False)


# ================================================================ prune-log


@pytest.fixture(scope="session")
def pruned(tmp_path_factory, keys):
    """An open (crashed, unsigned) chain with 4+ files: prune-log moves all but the two newest."""
    base = tmp_path_factory.mktemp("pruned")
    d = base / "log"
    demo(d, keys.hmac, requests=10)
    (chain,) = chains_of(d)
    newest = chain_files(d, chain)[-1]
    lines = newest.read_bytes().split(b"\n")[:-1]
    newest.write_bytes(b"".join(x + b"\n" for x in lines[:-1]))  # no stop: the chain is open
    assert len(chain_files(d, chain)) >= 4
    arch = base / "archive"
    arch.mkdir(mode=0o700)
    r = subprocess.run([kvh_binary(), "prune-log", str(d), "--archive-dir", str(arch), "--older-than", "0",
                        "--key-file", str(keys.hmac)], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert chain_files(d, chain)[0].name.endswith("000000.jsonl") is False
    return d, arch


def test_pruned_log_verifies(pruned, keys):
    d, arch = pruned
    agree(d, keys, 0, with_pub=False, allow_pruned=True)
    agree(d, keys, 0, with_pub=False, archive_dirs=[arch])
    agree(d, keys, 1, with_pub=False)  # manifests account for nothing without either option


def test_pruned_manifest_tampered(pruned, keys, tmp_path):
    d, arch = pruned
    d = copy(d, tmp_path)
    (m,) = d.glob("*.pruned.json")
    j = json.loads(m.read_bytes())
    j["files"][-1]["last_hash"] = "0" * 64
    m.write_text(json.dumps(j))
    agree(d, keys, 1, with_pub=False, allow_pruned=True)
    # sealed again with the secret, the manifest no longer links to the first file left
    j["mac"] = sv.manifest_mac(sv.read_hmac_key(keys.hmac), j)
    m.write_text(json.dumps(j))
    agree(d, keys, 1, with_pub=False, allow_pruned=True)


def test_pruned_manifest_pretty_printed_on_disk_is_accepted(pruned, keys, tmp_path):
    # the MAC covers the canonical form of the manifest without `mac`, not its bytes on disk
    d, arch = pruned
    d = copy(d, tmp_path)
    (m,) = d.glob("*.pruned.json")
    m.write_text(json.dumps(json.loads(m.read_bytes()), separators=(",", ":")))
    agree(d, keys, 0, with_pub=False, allow_pruned=True)


def test_archived_file_changed(pruned, keys, tmp_path):
    d, arch = pruned
    d = copy(d, tmp_path)
    arch = copy(arch, tmp_path, "archive")
    f = sorted(arch.glob("kvh-*.jsonl"))[0]
    f.write_bytes(f.read_bytes().replace(b'"v":1', b'"v":2', 1))
    agree(d, keys, 1, with_pub=False, archive_dirs=[arch])


def test_archived_file_deleted(pruned, keys, tmp_path):
    d, arch = pruned
    d = copy(d, tmp_path)
    arch = copy(arch, tmp_path, "archive")
    sorted(arch.glob("kvh-*.jsonl"))[1].unlink()
    agree(d, keys, 1, with_pub=False, archive_dirs=[arch])


# ================================================================ more line-level probes (no reseal needed)


def _edit_line(d, keys, fn, file_no=0, line_no=1):
    f = chain_files(d, chains_of(d)[0])[file_no]
    lines = f.read_bytes().split(b"\n")
    lines[line_no] = fn(lines[line_no])
    f.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("case", ["mac_uppercase", "crlf", "bom"])
def test_line_probes_without_key(case, signed_log, keys, tmp_path):
    d = copy(signed_log, tmp_path)
    if case == "mac_uppercase":
        # "checked to be 64 lower-case hex digits also by a verifier without the key"
        _edit_line(d, keys, lambda b: b[:-66] + b[-66:].upper())
    elif case == "crlf":
        _edit_line(d, keys, lambda b: b + b"\r")
    else:
        _edit_line(d, keys, lambda b: b"\xef\xbb\xbf" + b, line_no=0)
    agree(d, keys, 1, with_key=False, with_pub=False)


def test_checkpoint_without_trailing_newline(signed_log, keys, tmp_path):
    # "One line": read here as a line with or without its newline
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    p = d / f"kvh-{chain}.ckpt"
    p.write_bytes(p.read_bytes().rstrip(b"\n"))
    agree(d, keys, 0)


def test_checkpoint_signed_by_another_pinned_key(signed_log, keys, tmp_path):
    # the chain's records name sig as signer; a checkpoint signed by sig2 (also pinned) fails
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)
    p = d / f"kvh-{chain}.ckpt"
    ck = json.loads(p.read_bytes())
    ck["public_key"] = sv.read_public_key(keys.sig2_pub)
    p.write_bytes(sign_checkpoint(ck, keys.sig2.read_text().strip()))
    opts = ["--key-file", keys.hmac, "--public-key", keys.sig_pub, "--public-key", keys.sig2_pub]
    rc, out = kvh_verify(d, *opts)
    res = spec_verify(d, [keys.hmac], [keys.sig_pub, keys.sig2_pub])
    assert (rc, res.status) == (1, 1), (out, res)


def test_checkpoint_in_another_chains_file_name(two_chains, keys, tmp_path):
    d = copy(two_chains, tmp_path)
    a, b = chains_of(d)
    (d / f"kvh-{a}.ckpt").write_bytes((d / f"kvh-{b}.ckpt").read_bytes())
    agree(d, keys, 1)


def test_file_name_with_other_chain_id_form(signed_log, keys, tmp_path):
    # "id p<pid>-t<start time in Unix ns>": a file kvh-x-000000.jsonl is read here as no chain's
    d = copy(signed_log, tmp_path)
    shutil.copy(chain_files(d, chains_of(d)[0])[0], d / "kvh-x-000000.jsonl")
    agree(d, keys, 0, with_pub=False)


def test_chain_of_a_writer_that_died_before_start(signed_log, keys, tmp_path):
    # file 0 alone, a few torn bytes, no record: needs no checkpoint
    d = copy(signed_log, tmp_path)
    (d / "kvh-p1-t1-000000.jsonl").write_bytes(b'{"chain":"p1')
    os.chmod(d / "kvh-p1-t1-000000.jsonl", 0o600)
    agree(d, keys, 0)


def test_only_a_chain_without_records_is_status_2(tmp_path, keys):
    d = tmp_path / "log"
    d.mkdir(mode=0o700)
    (d / "kvh-p1-t1-000000.jsonl").write_bytes(b'{"chain":"p1')
    agree(d, keys, 2, with_pub=False)


@pytest.mark.parametrize("where", ["manifest", "file_entry"])
def test_pruned_manifest_with_an_extra_member(where, pruned, keys, tmp_path):
    # the manifest's members are listed ("The manifest is JSON: v, chain, files (...), complete,
    # archive, updated_at and mac"); one more, MACed with the secret, is read here as not a manifest
    d, arch = pruned
    d = copy(d, tmp_path)
    (m,) = d.glob("*.pruned.json")
    j = json.loads(m.read_bytes())
    (j if where == "manifest" else j["files"][0])["extra"] = 1
    j["mac"] = sv.manifest_mac(sv.read_hmac_key(keys.hmac), j)
    m.write_text(json.dumps(j))
    agree(d, keys, 1, with_pub=False, allow_pruned=True)


def test_pruned_manifest_of_another_chain(pruned, keys, tmp_path):
    # the manifest's `chain` is the chain its file name and entries name; MACed again with
    # the secret, a manifest naming another chain accounts for nothing of this one
    d, arch = pruned
    d = copy(d, tmp_path)
    (m,) = d.glob("*.pruned.json")
    j = json.loads(m.read_bytes())
    j["chain"] = "p1-t1"
    j["mac"] = sv.manifest_mac(sv.read_hmac_key(keys.hmac), j)
    m.write_text(json.dumps(j))
    agree(d, keys, 1, with_pub=False, allow_pruned=True)


def test_hmac_key_file_strips_exactly_one_newline(tmp_path, keys):
    # "File whose bytes (one trailing \n stripped ...) are the HMAC secret"
    kf = tmp_path / "two-newlines.key"
    kf.write_bytes(b"0123456789abcdef-two-newlines\n\n")
    os.chmod(kf, 0o600)
    d = tmp_path / "log"
    demo(d, kf, requests=1)
    (chain,) = chains_of(d)
    first = records(d, chain)[0]
    assert first["mac"] == sv.record_mac(b"0123456789abcdef-two-newlines\n", first["hash"])
    rc, out = kvh_verify(d, "--key-file", kf)
    assert (rc, spec_verify(d, [kf]).status) == (0, 0), out


def test_env_secret_verifies_with_key_file_without_newline(tmp_path, keys):
    # FORENSIC_HMAC_SECRET: "one trailing newline is not part of it, as in a key file"
    d = tmp_path / "log"
    env = clean_env(FORENSIC_HMAC_SECRET="0123456789abcdef-env\n", KVH_LOG_FSYNC="never")
    r = subprocess.run([kvh_binary(), "demo", "--tenants", "1", "--requests", "1", "--log-dir", str(d)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    kf = tmp_path / "env.key"
    kf.write_bytes(b"0123456789abcdef-env")
    os.chmod(kf, 0o600)
    rc, out = kvh_verify(d, "--key-file", kf)
    assert (rc, spec_verify(d, [kf]).status) == (0, 0), out


def test_file_name_with_a_21_digit_pid_is_judged_alike(signed_log, keys, tmp_path):
    # docs/forensic-log.md: a chain id is p<digits>-t<digits> with 1 to 20 digits each; a file
    # named otherwise is not one of a chain's, and a verifier passes over it. 21 digits are one
    # too many: the copy of another chain's file 0 placed under that name is passed over by
    # both (were it taken for a chain, it would be a splice and fail), the log verifies.
    d = copy(signed_log, tmp_path)
    shutil.copy(chain_files(d, chains_of(d)[0])[0], d / f"kvh-p{'1' * 21}-t1-000000.jsonl")
    rc, st, out, res = both(d, keys, with_pub=False)
    assert (rc, st) == (0, 0), f"kvh verify-log: {rc}\n{out}\nspec verifier: {res}"
    # No chain of that id was read; kvh verify-log names the file it passed over (stderr).
    assert f"chain p{'1' * 21}" not in out, out
    assert f"were not read: kvh-p{'1' * 21}-t1-000000.jsonl" in out, out


def test_a_negative_ts_is_judged_alike(signed_log, keys, tmp_path):
    # The header table: `ts` is an integer (Unix nanoseconds), so not negative. A resealed
    # record whose ts is -1 fails both verifiers, at that record.
    d = copy(signed_log, tmp_path)
    reseal(d, chains_of(d)[0], keys, _set_field("summary", "ts", -1), serialize=_ser_without_private)
    rc, st, out, res = both(d, keys)
    assert (rc, st) == (1, 1), f"kvh verify-log: {rc}\n{out}\nspec verifier: {res}"
    assert "record has no ts (Unix nanoseconds: an integer, 0 or more)" in out, out


@pytest.mark.parametrize("which", ["one", "all"])
def test_macs_stripped_from_a_sealed_chain_are_caught_without_the_hmac_key(which, signed_log, keys, tmp_path):
    # Rule 3: a chain carries a mac on every record or on none, and on every one when its
    # signed checkpoint names a key_id. MACs stripped (hashes and checkpoint made again, as
    # anyone can without the secret) are caught by a verifier holding only the public key,
    # and, from one record, by one holding no key at all.
    d = copy(signed_log, tmp_path)
    (chain,) = chains_of(d)

    def strip(recs):
        for n, (_, r) in enumerate(recs):
            if which == "all" or n == 3:
                r["_drop"] = ["mac"]

    reseal(d, chain, keys, strip, serialize=_ser_without_private)
    agree(d, keys, 1, with_key=False)
    # Without any key, a chain stripped whole reads as one written without a key.
    agree(d, keys, 1 if which == "one" else 0, with_key=False, with_pub=False)
