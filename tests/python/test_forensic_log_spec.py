"""The forensic log's verifier (spec_verifier.py, which follows docs/forensic-log.md) run on
real logs (`kvh demo`, and the C ABI for the rarer record kinds: invalid frees, size
mismatches, TTLs, policy violations, lost records, crash recovery, prune manifests) and held to
`kvh verify-log`; each record of those logs is also checked against the "Record schema" tables.

docs/forensic-log.md says it is normative: "precise enough to write an independent verifier".
Where following the document literally gives another answer than the code, a test fails.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spec_verifier as sv  # noqa: E402
from _spec_common import clean_env, hmac_key, key_pair, kvh, library  # noqa: E402
from spec_verifier import (  # noqa: E402
    BLOCK, EMPTY_SHA256, ZERO_HASH, canonical, ed25519_public, file_name, key_id, manifest_mac, parse_record_line,
    record_hash, schema_problems,
)


def record_mac(secret: bytes, epoch: int, hash_hex: str) -> str:
    """The `mac` of a record of file `epoch` sealed with `secret` (K(0))."""
    return sv.record_mac(sv.ratchet(secret, epoch), hash_hex)


def read_public_key_file(p: Path) -> bytes:
    return bytes.fromhex(sv.read_public_key(p))


def list_chains(d: Path) -> dict:
    """chain -> [(file index, path)] of the chain files in `d`, by index."""
    chains = {}
    for f in d.iterdir():
        m = sv.CHAIN_FILE.match(f.name)
        if m:
            chains.setdefault(m.group(1), []).append((int(m.group(2)), f))
    return {c: sorted(fs) for c, fs in chains.items()}


def verify_dir(d: Path, secrets=(), public_keys=(), ckpt_dir=None, allow_pruned=False):
    """Every chain of `d` by the document's rules: chain id -> its summary (records as
    (file name, line, record), secret, checkpoint, last_seq...), or its problem (a string)."""
    res = sv.verify(d, secrets=secrets, public_keys=public_keys, checkpoint=ckpt_dir, allow_pruned=allow_pruned)
    assert not res.errors, res.errors
    return res.per_chain()


def verify_log(d: Path, *args: str):
    """`kvh verify-log --json`: (exit status, {chain: report}, report)."""
    p = subprocess.run([kvh(), "verify-log", str(d), "--json", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    rep = json.loads(p.stdout)
    return p.returncode, {c["chain"]: c for c in rep["chains"]}, rep


def ours_ok(res) -> bool:
    return isinstance(res, dict)


# --------------------------------------------------------------------------------------------
# Producing real logs.


def demo(log: Path, hk: Path, sk: Path, max_bytes: int = 8192):
    p = subprocess.run(
        [kvh(), "demo", "--inject-fault", "--log-dir", str(log), "--tenants", "2", "--requests", "6"],
        env=clean_env(KVH_BACKEND="host", KVH_HMAC_KEY_FILE=str(hk), KVH_SIGNING_KEY_FILE=str(sk),
                      KVH_LOG_MAX_BYTES=str(max_bytes)),
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr


PRELUDE = textwrap.dedent(
    """
    import ctypes, json, os, sys, time, resource, signal
    lib = ctypes.CDLL(LIB)
    lib.kvh_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.kvh_malloc.restype = ctypes.c_void_p
    lib.kvh_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.kvh_free.restype = None
    lib.kvh_free_checked.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.kvh_free_checked.restype = ctypes.c_int
    lib.kvh_set_context.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.kvh_mark_ipc_exported.argtypes = [ctypes.c_void_p]
    lib.kvh_mark_ipc_exported.restype = ctypes.c_int
    class Layout(ctypes.Structure):
        _fields_ = [("region_bases", ctypes.POINTER(ctypes.c_uint64)), ("region_count", ctypes.c_size_t),
                    ("block_bytes", ctypes.c_uint64), ("block_stride", ctypes.c_uint64),
                    ("blocks_per_region", ctypes.c_uint64)]
    lib.kvh_scrub_blocks.argtypes = [ctypes.POINTER(Layout), ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t,
                                     ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                     ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    def wait_for(log_dir, kind, n=1):
        for _ in range(400):
            text = "".join(open(os.path.join(log_dir, f)).read() for f in os.listdir(log_dir) if f.endswith(".jsonl"))
            if text.count('"kind":"%s"' % kind) >= n:
                return
            time.sleep(0.025)
        raise SystemExit("no %s record written" % kind)
    """
)


def run_child(body: str, **env: str) -> subprocess.CompletedProcess:
    code = f"LIB = {library()!r}\n" + PRELUDE + textwrap.dedent(body)
    full = clean_env(KVH_BACKEND="host", KVH_OOM="null", KVH_BATCH_MAX_DELAY_US="100")
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


SECRET = b"0123456789abcdef-spec-secret"


def rare_kinds_log(tmp: Path):
    """A log with invalid_free, size_mismatch, ttl_exceeded, policy_violation (kv_scrub),
    a `lost` record (writes refused by RLIMIT_FSIZE, then allowed again), a process that
    crashed, and the `recovery` of its chain by the next process, which exports a block
    (`ipc_export`, then its `release` for `ipc_exported`)."""
    log = tmp / "rare"
    sk, pk = key_pair(tmp, "rare-signer")
    hk = hmac_key(tmp, "rare-hmac", SECRET)
    env = dict(KVH_LOG_DIR=str(log), KVH_HMAC_KEY_FILE=str(hk), KVH_SIGNING_KEY_FILE=str(sk),
               KVH_LIVE_TTL_MS="1", KVH_LOG_FSYNC="never")
    first = run_child(
        """
        LOG = os.environ["KVH_LOG_DIR"]
        lib.kvh_set_context(b"tenant-a", b"req-1", b"model-x")
        p = lib.kvh_malloc(8192, 0, None)
        time.sleep(1.5)                   # live longer than KVH_LIVE_TTL_MS
        lib.kvh_free(p, 4096, 0, None)    # the size given differs: size_mismatch
        lib.kvh_free(0xdead0000, 8, 0, None)
        q = lib.kvh_malloc(1 << 16, 0, None)
        bases = (ctypes.c_uint64 * 1)(q)
        layout = Layout(bases, 1, 4096, 4096, 1 << 10)   # beyond the allocation: refused
        ids = (ctypes.c_uint32 * 1)(0)
        n = ctypes.c_size_t(0)
        lib.kvh_scrub_blocks(ctypes.byref(layout), ids, 1, 0, None, None, 0, ctypes.byref(n))
        wait_for(LOG, "policy_violation")
        wait_for(LOG, "invalid_free")
        # Writes fail past the current size (a full disk), then succeed again: `lost`.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = max(os.path.getsize(os.path.join(LOG, f)) for f in os.listdir(LOG) if f.endswith(".jsonl"))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
        for i in range(8):
            lib.kvh_free(0xbeef0000 + 16 * i, 8, 0, None)
        time.sleep(0.5)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        lib.kvh_free(0xcafe0000, 8, 0, None)
        wait_for(LOG, "lost")
        os._exit(0)                       # a crash: no stop record
        """,
        **env,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    # The crash left a torn line.
    (newest,) = [f for f in sorted(log.glob("*.jsonl"))][-1:]
    with open(newest, "ab") as f:
        f.write(b'{"chain":"torn')
    second = run_child(
        """
        lib.kvh_set_context(b"tenant-b", b"req-2", b"model-x")
        lib.kvh_free(0xfeed0000, 8, 0, None)
        shared = lib.kvh_malloc(4096, 0, None)
        assert lib.kvh_mark_ipc_exported(shared + 8) == 0
        lib.kvh_free(shared, 4096, 0, None)
        lib.kvh_synchronize()
        lib.kvh_shutdown()
        """,
        **env,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    return log, hk, sk, pk


def failure_mode_abort_log(tmp: Path):
    """A process under KVH_FAILURE_MODE=abort whose scrub verification fails."""
    log = tmp / "abort"
    p = run_child(
        """
        lib.kvh_set_context(b"tenant-a", b"req-1", b"model-x")
        ptr = lib.kvh_malloc(4096, 0, None)
        ctypes.memset(ptr, 0x33, 4096)
        lib.kvh_inject_fault(1)
        lib.kvh_free_checked(ptr, 4096, 0, None)
        """,
        KVH_LOG_DIR=str(log), FORENSIC_HMAC_SECRET=SECRET.decode(), KVH_FAILURE_MODE="abort",
    )
    assert p.returncode != 0, "the process was to abort"
    return log


# --------------------------------------------------------------------------------------------
# Tests.


def test_the_documented_test_vectors():
    body = (b'{"chain":"p1-t2","epoch":0,"kind":"start","model_id":null,"pid":1,"prev":"' + b"0" * 64 +
            b'","request_id":null,"seq":0,"tenant_id":null,"ts":1700000000000000000,"v":1}')
    assert canonical(sv.parse_json(body)) == body
    h = record_hash(ZERO_HASH, body)
    assert h == "bf1f7834f3783672df5afe4e576d5b322beac65b6479a1fa729062761472c8fe"
    secret = b"0123456789abcdef-secret"
    assert record_mac(secret, 0, h) == "181958f446e125d9452fad319e0fbd9137d2d5900f60496de925d1ea44bea117"
    assert record_mac(secret, 1, h) == "a6d8b2c3038111f67189625763273db5692c6dd76b76f80f1d97de7f3837c598"


def test_the_pure_python_ed25519_matches_kvh_keygen(tmp_path):
    sk, pk = key_pair(tmp_path, "k")
    assert ed25519_public(bytes.fromhex(sk.read_text().strip())) == read_public_key_file(pk)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forensic-spec")
    sk1, pk1 = key_pair(tmp, "sig1")
    sk2, pk2 = key_pair(tmp, "sig2")
    hk1 = hmac_key(tmp, "hk1", b"first-hmac-secret-0123456789")
    hk2 = hmac_key(tmp, "hk2", b"second-hmac-secret-0123456789\n")
    rotated = tmp / "rotated"
    demo(rotated, hk1, sk1)
    keys = tmp / "keys"
    demo(keys, hk1, sk1)
    demo(keys, hk2, sk2)  # the same directory after a rotation of both keys
    return dict(tmp=tmp, rotated=rotated, keys=keys, hk1=hk1, hk2=hk2, pk1=pk1, pk2=pk2, sk1=sk1, sk2=sk2)


def test_a_rotated_demo_log_verifies_as_documented(logs):
    d = logs["rotated"]
    secrets = [sv.read_hmac_key(logs["hk1"])]
    pubs = [read_public_key_file(logs["pk1"])]
    ours = verify_dir(d, secrets, pubs)
    code, theirs, _ = verify_log(d, "--key-file", str(logs["hk1"]), "--public-key", str(logs["pk1"]))
    assert code == 0 and ours.keys() == theirs.keys()
    for chain, res in ours.items():
        assert ours_ok(res), f"{chain}: {res}"
        files = {n for n, _, _ in res["records"]}
        assert len(files) >= 2, "the log was to rotate"


@pytest.mark.parametrize("torn, verifies", [(b"", True), (b'{"chain":"p1', True), (b"x" * (64 * 1024 + 1), False)])
def test_a_chain_that_died_before_its_start_record_needs_no_checkpoint_if_small(logs, tmp_path, torn, verifies):
    # Its file 0 alone, empty or with at most 64 KiB of torn bytes and no record, is not
    # held to a checkpoint under a pinned signer; a larger one is.
    d = tmp_path / "log"
    shutil.copytree(logs["rotated"], d)
    dead = "p999999-t1000000000000000000"
    (d / file_name(dead, 0)).write_bytes(torn)
    secrets = [sv.read_hmac_key(logs["hk1"])]
    pubs = [read_public_key_file(logs["pk1"])]
    ours = verify_dir(d, secrets, pubs)
    code, theirs, _ = verify_log(d, "--key-file", str(logs["hk1"]), "--public-key", str(logs["pk1"]))
    assert ours.keys() == theirs.keys() and dead in ours
    assert ours_ok(ours[dead]) == verifies, ours[dead]
    assert (theirs[dead].get("problem") is None) == verifies, theirs[dead]
    assert code == (0 if verifies else 1)


def test_a_log_after_a_key_rotation_verifies_as_documented(logs):
    d = logs["keys"]
    args = ["--key-file", str(logs["hk2"]), "--key-file", str(logs["hk1"]),
            "--public-key", str(logs["pk2"]), "--public-key", str(logs["pk1"])]
    code, theirs, rep = verify_log(d, *args)
    assert code == 0, rep
    secrets = [sv.read_hmac_key(logs["hk2"]), sv.read_hmac_key(logs["hk1"])]
    pubs = [read_public_key_file(logs["pk2"]), read_public_key_file(logs["pk1"])]
    ours = verify_dir(d, secrets, pubs)
    assert len(ours) == 2
    for chain, res in ours.items():
        assert ours_ok(res), f"{chain}: {res}"
        # "key_id: the first 16 bytes of HMAC-SHA256(K(0), "kvh-key-id")" names the chain's secret.
        assert res["checkpoint"]["key_id"] == key_id(res["secret"])
        assert theirs[chain]["keys_bound"] is True


def test_every_record_of_a_demo_log_has_the_documented_fields(logs):
    ours = verify_dir(logs["rotated"], [sv.read_hmac_key(logs["hk1"])], [read_public_key_file(logs["pk1"])])
    problems = [f"{n}:{ln}: {p}" for res in ours.values() for n, ln, r in res["records"] for p in schema_problems(r)]
    assert problems == []


def test_the_pure_python_ed25519_signs_a_checkpoint_as_kvh_does(logs):
    """Ed25519 signatures are deterministic: the checkpoint's body signed again with the
    writer's private key gives the file's bytes back, and that signature verifies."""
    (ck_path,) = logs["rotated"].glob("kvh-*.ckpt")
    ck, body = sv.parse_checkpoint(ck_path.read_bytes())
    assert sv.sign_checkpoint(ck, logs["sk1"].read_text().strip()) == ck_path.read_bytes()
    assert sv.ed25519_verify(read_public_key_file(logs["pk1"]), body, bytes.fromhex(ck["sig"]))
    assert not sv.ed25519_verify(read_public_key_file(logs["pk2"]), body, bytes.fromhex(ck["sig"]))


def test_every_signed_checkpoint_is_noted_by_a_checkpoint_record(logs):
    """"Each one is also noted in the chain by a `checkpoint` record, but the one written at
    `stop`, which signs the `stop` record itself" (Signed checkpoints)."""
    d = logs["rotated"]
    ours = verify_dir(d, [sv.read_hmac_key(logs["hk1"])], [read_public_key_file(logs["pk1"])])
    for chain, res in ours.items():
        noted = {r["ckpt_seq"] for _, _, r in res["records"] if r["kind"] == "checkpoint"}
        stops = {r["seq"] for _, _, r in res["records"] if r["kind"] == "stop"}
        signed = res["checkpoint"]["seq"]
        assert signed in noted | stops, (
            f"chain {chain}: the checkpoint file signs seq {signed}, which no checkpoint record "
            f"notes (noted: {sorted(noted)})"
        )


@pytest.fixture(scope="module")
def rare(tmp_path_factory):
    return rare_kinds_log(tmp_path_factory.mktemp("forensic-spec-rare"))


def test_the_rarer_record_kinds_have_the_documented_fields(rare):
    log, hk, sk, pk = rare
    code, theirs, rep = verify_log(log, "--key-file", str(hk), "--public-key", str(pk))
    assert code == 0, rep
    ours = verify_dir(log, [SECRET], [read_public_key_file(pk)])
    assert all(ours_ok(r) for r in ours.values()), ours
    records = [r for res in ours.values() for _, _, r in res["records"]]
    kinds = {r["kind"] for r in records}
    for kind in ["invalid_free", "size_mismatch", "ttl_exceeded", "policy_violation", "lost", "recovery",
                 "ipc_export"]:
        assert kind in kinds, sorted(kinds)
    (export,) = [r for r in records if r["kind"] == "ipc_export"]
    assert (export["tenant_id"], export["caller_tenant_id"]) == ("tenant-b", "tenant-b")
    (retired,) = [r for r in records if r["kind"] == "release" and r["reason"] == "ipc_exported"]
    assert retired["block_id"] == export["block_id"]
    problems = [p for r in records for p in schema_problems(r)]
    assert problems == []


def test_a_recovered_chain_states_its_torn_bytes_and_last_good_record(rare):
    log, hk, sk, pk = rare
    ours = verify_dir(log, [SECRET], [read_public_key_file(pk)])
    (res,) = ours.values()
    records = [r for _, _, r in res["records"]]
    rec = next(i for i, r in enumerate(records) if r["kind"] == "recovery")
    r = records[rec]
    assert r["torn_bytes"] == len(b'{"chain":"torn')
    assert r["last_good_seq"] == records[rec - 1]["seq"] and r["last_good_hash"] == records[rec - 1]["hash"]
    lost = next(r for r in records if r["kind"] == "lost")
    assert lost["records_lost"] >= 1 and sum(lost["lost_kinds"].values()) == lost["records_lost"]


def reseal(log: Path, secret: bytes, change):
    """Rewrites every chain of `log` with `change(record)` applied to each record, then seals
    again from the first changed record on (hash, prev, mac): a forgery by whoever holds the
    HMAC secret, which only the chain rules' consistency checks can catch."""
    for chain, files in list_chains(log).items():
        prev = ZERO_HASH
        for index, path in files:
            parts = path.read_bytes().split(b"\n")
            torn = parts.pop()
            out = []
            for line in parts:
                r, _ = parse_record_line(line)
                change(r)
                r["prev"] = prev
                body = {k: v for k, v in r.items() if k not in ("hash", "mac")}
                cbody = canonical(body)
                h = record_hash(prev, cbody)
                line = cbody[:-1] + b',"hash":"' + h.encode() + b'"'
                if "mac" in r:
                    line += b',"mac":"' + record_mac(secret, index, h).encode() + b'"'
                out.append(line + b"}")
                prev = h
            path.write_bytes(b"".join(x + b"\n" for x in out) + torn)


def recovery_forgery(rare, tmp: Path, change):
    """The rare-kinds log with its `recovery` record changed by `change` and the chain sealed
    again: (kvh verify-log's exit status and report, the document's verdict)."""
    log, hk, _, _ = rare
    forged = tmp / "forged"
    shutil.copytree(log, forged)

    def on_recovery(r):
        if r["kind"] == "recovery":
            change(r)

    reseal(forged, SECRET, on_recovery)
    code, theirs, rep = verify_log(forged, "--key-file", str(hk))
    ours = verify_dir(forged, [SECRET])
    return code, rep, ours


def test_resealing_an_unchanged_log_keeps_it_valid(rare, tmp_path):
    """The forgeries below differ from the real log by their change alone."""
    code, rep, ours = recovery_forgery(rare, tmp_path, lambda r: None)
    assert code == 0, rep
    assert all(ours_ok(v) for v in ours.values()), ours


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda r: r.update(last_good_seq=r["last_good_seq"] - 1), "is not the record before"),
        (lambda r: r.update(last_good_hash="ab" * 32), "last_good_hash is not the hash"),
        (lambda r: r.pop("last_good_seq"), "no last_good_seq"),
        (lambda r: r.pop("torn_bytes"), "no torn_bytes"),
        (lambda r: r.update(torn_sha256=r["torn_sha256"].upper()), "not 64 lower-case hex"),
        (lambda r: r.update(torn_sha256=7), "not 64 lower-case hex"),
        (lambda r: r.update(torn_sha256=EMPTY_SHA256), "does not fit torn_bytes"),
        (lambda r: r.update(torn_bytes=0), "does not fit torn_bytes 0"),
    ],
    ids=["seq-before", "hash-of-another", "no-seq", "no-torn-bytes", "upper-case-digest", "digest-not-a-string",
         "digest-of-nothing", "no-torn-bytes-but-a-digest"],
)
def test_a_resealed_recovery_record_with_false_claims_fails_both_verifiers(rare, tmp_path, change, problem):
    """Chain rule 4: what a `recovery` record says of the crashed chain must fit the chain."""
    code, rep, ours = recovery_forgery(rare, tmp_path, change)
    (res,) = ours.values()
    assert isinstance(res, str) and problem in res, res
    assert code == 1, rep
    (chain,) = rep["chains"]
    assert chain["problem"] and chain["problem"]["reason"].startswith("recovery record"), chain


def test_every_policy_violation_names_a_documented_policy(tmp_path):
    log = failure_mode_abort_log(tmp_path)
    hk = hmac_key(tmp_path, "abort-hmac", SECRET)
    code, _, rep = verify_log(log, "--key-file", str(hk))
    assert code == 0, rep
    ours = verify_dir(log, [SECRET])
    records = [r for res in ours.values() for _, _, r in res["records"]]
    violations = [r for r in records if r["kind"] == "policy_violation"]
    assert violations, [r["kind"] for r in records]
    problems = [p for r in violations for p in schema_problems(r)]
    assert problems == []


def test_a_pruned_log_and_its_manifest_verify_as_documented(logs, tmp_path):
    src = logs["rotated"]
    d = tmp_path / "pruned"
    shutil.copytree(src, d)
    d.chmod(0o700)
    archive = tmp_path / "archive"
    archive.mkdir(mode=0o700)
    # The chain ended with `stop` and its final checkpoint is at its last record: it moves whole.
    p = subprocess.run([kvh(), "prune-log", str(d), "--archive-dir", str(archive), "--older-than", "0",
                        "--key-file", str(logs["hk1"]), "--public-key", str(logs["pk1"]), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    manifests = list(d.glob("kvh-*.pruned.json"))
    assert manifests, "prune-log moved nothing"
    secret = sv.read_hmac_key(logs["hk1"])
    for mp in manifests:
        m = json.loads(mp.read_text())
        expected = {"v", "chain", "files", "complete", "archive", "updated_at", "mac"}
        assert set(m) == expected, sorted(m)
        for f in m["files"]:
            assert set(f) == {"name", "sha256", "first_seq", "last_seq", "last_hash", "oldest_ts", "newest_ts"}
            assert hashlib.sha256((archive / f["name"]).read_bytes()).hexdigest() == f["sha256"]
        assert m["mac"] == manifest_mac(secret, m)
    # The archive verifies whole with the document's rules.
    ours = verify_dir(archive, [secret], [read_public_key_file(logs["pk1"])], ckpt_dir=d)
    assert all(ours_ok(r) for r in ours.values()), ours


def test_a_manifest_field_outside_its_mac_is_refused(logs, tmp_path):
    """The manifest `mac` covers "`body` the manifest without `mac` in the canonical form":
    a member added to a manifest changes its body, so its MAC no longer verifies."""
    d = tmp_path / "pruned"
    shutil.copytree(logs["rotated"], d)
    archive = tmp_path / "archive"
    archive.mkdir(mode=0o700)
    p = subprocess.run([kvh(), "prune-log", str(d), "--archive-dir", str(archive), "--older-than", "0",
                        "--key-file", str(logs["hk1"])], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    (mp,) = d.glob("kvh-*.pruned.json")
    m = json.loads(mp.read_text())
    m["note"] = "added after the MAC"
    mp.write_text(json.dumps(m, indent=2) + "\n")
    secret = sv.read_hmac_key(logs["hk1"])
    assert m["mac"] != manifest_mac(secret, m), "the document's MAC covers the added member"
    code, theirs, rep = verify_log(d, "--key-file", str(logs["hk1"]), "--allow-pruned", "--archive-dir", str(archive))
    assert code == 1, (
        "a manifest whose document-defined MAC no longer verifies was accepted: "
        + json.dumps([(c, v.get("problem")) for c, v in theirs.items()])
    )
    ours = sv.verify(d, secrets=[secret], allow_pruned=True, archive_dirs=[archive])
    (problem,) = ours.chains.values()
    assert ours.status == 1 and mp.name in problem, ours


def pruned_whole(logs, tmp: Path):
    """A copy of the rotated demo log whose chain `prune-log` moved whole: (log, archive, manifest path)."""
    d = tmp / "pruned"
    shutil.copytree(logs["rotated"], d)
    archive = tmp / "archive"
    archive.mkdir(mode=0o700)
    p = subprocess.run([kvh(), "prune-log", str(d), "--archive-dir", str(archive), "--older-than", "0",
                        "--key-file", str(logs["hk1"])], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    (mp,) = d.glob("kvh-*.pruned.json")
    return d, archive, mp


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(updated_at=m["updated_at"] + 1),
        lambda m: m["files"][0].update(newest_ts=m["files"][0]["newest_ts"] + 1),
        lambda m: m.update(archive=m["archive"] + "-elsewhere"),
    ],
    ids=["updated_at", "entry-newest_ts", "archive"],
)
def test_a_manifest_changed_under_its_mac_fails_both_verifiers(logs, tmp_path, change):
    """The manifest `mac` is HMAC-SHA256(K(0), body) over the manifest without `mac`: a value
    changed that no other rule reads (same members, same chain links) fails on the MAC alone."""
    d, archive, mp = pruned_whole(logs, tmp_path)
    m = json.loads(mp.read_text())
    change(m)
    mp.write_text(json.dumps(m))
    secret = sv.read_hmac_key(logs["hk1"])
    assert m["mac"] != manifest_mac(secret, m)
    ours = sv.verify(d, secrets=[secret], allow_pruned=True, archive_dirs=[archive])
    (problem,) = ours.chains.values()
    assert ours.status == 1 and "manifest MAC mismatch" in problem, ours
    args = ("--key-file", str(logs["hk1"]), "--allow-pruned", "--archive-dir", str(archive))
    code, theirs, rep = verify_log(d, *args)
    assert code == 1, rep
    # the same manifest with its MAC made again verifies under both
    m["mac"] = manifest_mac(secret, m)
    mp.write_text(json.dumps(m))
    ours = sv.verify(d, secrets=[secret], allow_pruned=True, archive_dirs=[archive])
    assert ours.status == 0, ours
    code, theirs, rep = verify_log(d, *args)
    assert code == 0, rep


def test_a_record_whose_mac_is_not_hex_is_refused_without_a_key(logs, tmp_path):
    """`mac`: "64 hex"; "A verifier must reject any line that is not exactly this"."""
    d = tmp_path / "log"
    shutil.copytree(logs["rotated"], d)
    first = sorted(d.glob("*.jsonl"))[0]
    lines = first.read_bytes().split(b"\n")
    lines[0] = re.sub(rb'"mac":"[0-9a-f]{64}"', b'"mac":"not-a-mac"', lines[0])
    first.write_bytes(b"\n".join(lines))
    assert isinstance(verify_dir(d)[next(iter(list_chains(d)))], str)
    code, theirs, _ = verify_log(d)
    assert code == 1, "a line whose mac is not 64 hex digits verified"


def crashed_rotating_log(tmp: Path, name: str, secret: bytes, sk: Path, frees: int = 120, **extra):
    """A process that wrote enough to rotate several times (4096-byte files), then crashed."""
    log = tmp / name
    p = run_child(
        """
        LOG = os.environ["KVH_LOG_DIR"]
        lib.kvh_set_context(b"tenant-a", b"req-1", b"model-x")
        FREES = int(os.environ["FREES"])
        for i in range(FREES):
            lib.kvh_free(0xdead0000 + 16 * i, 8, 0, None)
        wait_for(LOG, "invalid_free", FREES)
        os._exit(0)
        """, FREES=str(frees),
        KVH_LOG_DIR=str(log), FORENSIC_HMAC_SECRET=secret.decode(), KVH_SIGNING_KEY_FILE=str(sk),
        KVH_LOG_MAX_BYTES="4096", KVH_CHECKPOINT_EVERY="4", KVH_ANOMALY="off", **extra,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return log


def test_a_chain_continued_after_a_crash_at_rotation_verifies_as_documented(tmp_path):
    """"preceded by a `rotate` record when the crash came between creating a new file and
    writing its first line, i.e. the newest file holds no newline at all"."""
    sk, pk = key_pair(tmp_path, "s")
    log = crashed_rotating_log(tmp_path, "log", SECRET, sk, frees=30)
    (chain, files), = list_chains(log).items()
    newest = files[-1][0]
    nxt = log / file_name(chain, newest + 1)
    fd = os.open(nxt, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b'{"block_id":')
    os.close(fd)
    time.sleep(0.6)
    p = run_child("lib.kvh_free(0xfeed0000, 8, 0, None)\nlib.kvh_shutdown()\n",
                  KVH_LOG_DIR=str(log), FORENSIC_HMAC_SECRET=SECRET.decode(), KVH_SIGNING_KEY_FILE=str(sk),
                  KVH_LOG_MAX_BYTES="4096")
    assert p.returncode == 0, p.stdout + p.stderr
    hk = hmac_key(tmp_path, "hk", SECRET)
    code, theirs, rep = verify_log(log, "--key-file", str(hk), "--public-key", str(pk))
    assert code == 0, rep
    ours = verify_dir(log, [SECRET], [read_public_key_file(pk)])
    assert ours_ok(ours[chain]), ours[chain]
    recs = ours[chain]["records"]
    first_of_new = [r for n, ln, r in recs if n == nxt.name]
    assert [r["kind"] for r in first_of_new[:2]] == ["rotate", "recovery"]
    assert first_of_new[1]["torn_bytes"] == len(b'{"block_id":')
    assert [p for _, _, r in recs for p in schema_problems(r)] == []


def test_a_partly_pruned_open_chain_verifies_from_its_manifest_as_documented(tmp_path):
    sk, pk = key_pair(tmp_path, "s")
    log = crashed_rotating_log(tmp_path, "log", SECRET, sk)
    log.chmod(0o700)
    hk = hmac_key(tmp_path, "hk", SECRET)
    archive = tmp_path / "archive"
    archive.mkdir(mode=0o700)
    (chain, before), = list_chains(log).items()
    assert len(before) >= 4, "the log was to rotate several times"
    p = subprocess.run([kvh(), "prune-log", str(log), "--archive-dir", str(archive), "--older-than", "0",
                        "--key-file", str(hk), "--public-key", str(pk)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    (chain, left), = list_chains(log).items()
    assert left[0][0] > 0, "prune-log moved nothing"
    m = json.loads((log / f"kvh-{chain}.pruned.json").read_text())
    assert m["mac"] == manifest_mac(SECRET, m) and m["complete"] is False
    code, theirs, rep = verify_log(log, "--key-file", str(hk), "--public-key", str(pk), "--allow-pruned")
    assert code == 0, rep
    ours = verify_dir(log, [SECRET], [read_public_key_file(pk)], allow_pruned=True)
    assert ours_ok(ours[chain]), ours[chain]
    assert ours[chain]["last_seq"] == theirs[chain]["last_seq"]
    # Read whole with the archive, by the document's rules.
    whole = tmp_path / "whole"
    whole.mkdir()
    for f in list(archive.glob("*.jsonl")) + list(log.glob("*.jsonl")) + list(log.glob("*.ckpt")):
        shutil.copy2(f, whole / f.name)
    ours = verify_dir(whole, [SECRET], [read_public_key_file(pk)])
    assert ours_ok(ours[chain]), ours[chain]


def test_invalid_free_and_anomaly_records_have_the_documented_fields(tmp_path):
    """invalid_free: "block fields when the pointer belongs to a block"; anomaly: a surge's
    statistics as six-decimal strings, and for the `*other*` key "the ids are `null`"."""
    log = tmp_path / "log"
    p = run_child(
        """
        lib.kvh_set_context(b"t", b"r", b"m")
        for w in range(14):                      # a baseline of one refused free a window
            lib.kvh_free(0xdead0000 + 16 * w, 8, 0, None)
            time.sleep(0.11)
        for i in range(10):                      # then a surge
            lib.kvh_free(0xbeef0000 + 16 * i, 8, 0, None)
        a = lib.kvh_malloc(4096, 0, None)
        lib.kvh_free(a, 4096, 0, None)
        lib.kvh_free(a, 4096, 0, None)           # double_free
        b = lib.kvh_malloc(8192, 0, None)
        lib.kvh_free(b + 16, 8192, 0, None)      # interior_pointer
        lib.kvh_free(b, 8192, 1, None)           # wrong_device: b is a block of device 0
        lib.kvh_free(b, 8192, 99, None)          # invalid_device
        for i in range(1024 + 32):               # tenants beyond the detector's cap
            lib.kvh_set_context(b"tenant-%d" % i, b"r", b"m")
            lib.kvh_free(0xfeed0000, 8, 0, None)
        lib.kvh_shutdown()
        """,
        KVH_LOG_DIR=str(log), KVH_ANOMALY_WINDOW_MS="100",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    ours = verify_dir(log)
    assert all(ours_ok(r) for r in ours.values()), ours
    records = [r for res in ours.values() for _, _, r in res["records"]]
    reasons = {r["reason"] for r in records if r["kind"] == "invalid_free"}
    assert {"double_free", "interior_pointer", "wrong_device", "invalid_device"} <= reasons, reasons
    rules = {(r["rule"], r["key"]) for r in records if r["kind"] == "anomaly"}
    assert ("surge", "tenant") in rules and ("burst", "*other*") in rules, rules
    problems = [p for r in records for p in schema_problems(r)]
    for r in records:
        if r["kind"] == "invalid_free" and r["reason"] in ("double_free", "interior_pointer", "wrong_device"):
            # The pointer is (the start of, or inside) a block kvhygiene handed out.
            missing = sorted(BLOCK - set(r))
            if missing:
                problems.append(f"invalid_free ({r['reason']}, ptr {r['ptr']}): no block fields {missing}")
        if r["kind"] == "anomaly" and r["key"] == "*other*":
            if (r["tenant_id"], r["request_id"], r["model_id"]) != (None, None, None):
                problems.append("anomaly for *other*: ids are not null")
    assert problems == []


def test_a_stop_record_after_a_failed_start_up_has_the_documented_fields(tmp_path):
    """stop: "`start_failed` (the error, at most 1024 characters) only when the process's
    start-up failed after the log opened (no usable backend)"."""
    log = tmp_path / "log"
    p = run_child(
        """
        p = lib.kvh_malloc(4096, 0, None)
        assert not p, "the allocation was to be refused: no usable backend"
        """,
        KVH_LOG_DIR=str(log), KVH_BACKEND="cuda", CUDA_VISIBLE_DEVICES="",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    ours = verify_dir(log)
    records = [r for res in ours.values() for _, _, r in res["records"]]
    stops = [r for r in records if r["kind"] == "stop"]
    assert stops and isinstance(stops[-1].get("start_failed"), str), records
    assert len(stops[-1]["start_failed"]) <= 1024
    problems = [p for r in records for p in schema_problems(r)]
    assert problems == []


def test_a_first_file_left_empty_by_a_writer_that_died_is_treated_as_a_torn_one(logs, tmp_path):
    """A writer creates its chain's file 0, fsyncs the directory, then writes its `start`
    record: one that dies (or loses power) in between leaves file 0 empty, one that dies
    during the write leaves it torn. Neither holds anything a checkpoint could cover ("file 0
    alone, torn bytes, no record"), and the next start removes either once idle; a
    verification with a pinned key treats them alike."""
    args = ["--key-file", str(logs["hk1"]), "--public-key", str(logs["pk1"])]
    torn = tmp_path / "torn"
    shutil.copytree(logs["rotated"], torn)
    (torn / "kvh-p1-t2-000000.jsonl").write_bytes(b'{"chain":"p1')
    code, theirs, _ = verify_log(torn, *args)
    assert code == 0 and theirs["p1-t2"]["problem"] is None
    empty = tmp_path / "empty"
    shutil.copytree(logs["rotated"], empty)
    (empty / "kvh-p1-t2-000000.jsonl").write_bytes(b"")
    code, theirs, _ = verify_log(empty, *args)
    assert code == 0, f"an empty file 0 fails the log: {theirs['p1-t2']['problem']}"
