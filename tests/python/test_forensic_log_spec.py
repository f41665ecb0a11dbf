"""An independent verifier of the forensic log, written from docs/forensic-log.md alone, run on
real logs (`kvh demo`, and the C ABI for the rarer record kinds) and held to `kvh verify-log`.

docs/forensic-log.md says it is normative: "precise enough to write an independent verifier".
Everything below follows its text (record schema, canonical form, hash and MAC, key ratchet,
chain rules, signed checkpoints, key ids, prune manifests) and uses only hashlib, hmac and json
(Ed25519 is the RFC 8032 reference arithmetic, in pure Python). Where following the document
literally gives another answer than the code, a test fails.

The library and `kvh` are found through KVH_LIBRARY / KVH_BIN, else under CARGO_TARGET_DIR,
target/debug or target/release.
"""

import hashlib
import hmac
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

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Finding the build.


def _candidates(name: str):
    dirs = []
    if os.environ.get("CARGO_TARGET_DIR"):
        t = Path(os.environ["CARGO_TARGET_DIR"])
        dirs += [t / "debug", t / "release"]
    dirs += [ROOT / "target/debug", ROOT / "target/release"]
    return [d / name for d in dirs]


def kvh() -> str:
    env = os.environ.get("KVH_BIN")
    for c in ([Path(env)] if env else _candidates("kvh")):
        if c.exists():
            return str(c)
    pytest.skip("kvh not built; run cargo build")


def library() -> str:
    env = os.environ.get("KVH_LIBRARY")
    for c in ([Path(env)] if env else _candidates("libkvhygiene.so")):
        if c.exists():
            return str(c)
    pytest.skip("libkvhygiene.so not built; run cargo build")


# --------------------------------------------------------------------------------------------
# Ed25519 (RFC 8032, section 6: the reference arithmetic), verification and key derivation.

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_I = pow(2, (_P - 1) // 4, _P)


def _inv(x):
    return pow(x, _P - 2, _P)


def _add(a, b):
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    A = (y1 - x1) * (y2 - x2) % _P
    B = (y1 + x1) * (y2 + x2) % _P
    C = t1 * 2 * _D * t2 % _P
    D = z1 * 2 * z2 % _P
    E, F, G, H = B - A, D - C, D + C, B + A
    return (E * F % _P, G * H % _P, F * G % _P, E * H % _P)


def _mul(s, p):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _equal(a, b):
    x1, y1, z1, _ = a
    x2, y2, z2, _ = b
    return (x1 * z2 - x2 * z1) % _P == 0 and (y1 * z2 - y2 * z1) % _P == 0


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * _inv(_D * y * y + 1)
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _I % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


_GY = 4 * _inv(5) % _P
_G = (_recover_x(_GY, 0), _GY, 1, _recover_x(_GY, 0) * _GY % _P)


def _compress(p):
    x, y, z, _ = p
    zi = _inv(z)
    x, y = x * zi % _P, y * zi % _P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def _decompress(s):
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


def ed25519_public(seed: bytes) -> bytes:
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return _compress(_mul(a, _G))


def ed25519_verify(public: bytes, msg: bytes, sig: bytes) -> bool:
    if len(public) != 32 or len(sig) != 64:
        return False
    A = _decompress(public)
    R = _decompress(sig[:32])
    if A is None or R is None:
        return False
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(sig[:32] + public + msg).digest(), "little") % _L
    return _equal(_mul(s, _G), _add(R, _mul(h, A)))


# --------------------------------------------------------------------------------------------
# Canonical form ("Canonical form").


class NotCanonical(Exception):
    pass


def _no_floats(text):
    raise NotCanonical(f"non-integer number {text}")


def _pairs(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise NotCanonical("duplicate key")
    return dict(pairs)


def strict_json(text: str):
    """JSON without floats, NaN or duplicate keys."""
    return json.loads(text, object_pairs_hook=_pairs, parse_float=_no_floats, parse_constant=_no_floats)


def _c_string(s: str) -> bytes:
    out = bytearray(b'"')
    names = {'"': b'\\"', "\\": b"\\\\", "\b": b"\\b", "\f": b"\\f", "\n": b"\\n", "\r": b"\\r", "\t": b"\\t"}
    for ch in s:
        if ch in names:
            out += names[ch]
        elif ord(ch) < 0x20:
            out += b"\\u00%02x" % ord(ch)
        else:
            out += ch.encode("utf-8")  # a lone surrogate raises: not UTF-8
    out += b'"'
    return bytes(out)


def canonical(v, depth: int = 0) -> bytes:
    if depth > 32:
        raise NotCanonical("nesting deeper than 32 levels")
    if v is None:
        return b"null"
    if v is True:
        return b"true"
    if v is False:
        return b"false"
    if isinstance(v, int):
        if not (-(2**63) <= v < 2**64):
            raise NotCanonical("integer out of range")
        return str(v).encode()
    if isinstance(v, str):
        return _c_string(v)
    if isinstance(v, list):
        return b"[" + b",".join(canonical(x, depth + 1) for x in v) + b"]"
    if isinstance(v, dict):
        items = sorted(v.items(), key=lambda kv: kv[0].encode("utf-8"))
        return b"{" + b",".join(_c_string(k) + b":" + canonical(x, depth + 1) for k, x in items) + b"}"
    raise NotCanonical(f"not a JSON value: {type(v)}")


HEX64 = re.compile(r"^[0-9a-f]{64}$")


def parse_record_line(line: bytes):
    """The record of one line (without its newline), held to the exact on-disk form: the
    canonical body without its final `}`, `,"hash":"..."`, `,"mac":"..."` when keyed, `}`.
    Returns (record, canonical body)."""
    try:
        rec = strict_json(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, NotCanonical) as e:
        raise NotCanonical(f"not canonical JSON: {e}")
    if not isinstance(rec, dict):
        raise NotCanonical("not an object")
    if not isinstance(rec.get("hash"), str) or not HEX64.match(rec["hash"]):
        raise NotCanonical("hash is not 64 lower-case hex")
    if "mac" in rec and (not isinstance(rec["mac"], str) or not HEX64.match(rec["mac"])):
        raise NotCanonical("mac is not 64 lower-case hex")
    body = {k: v for k, v in rec.items() if k not in ("hash", "mac")}
    cbody = canonical(body)
    expect = cbody[:-1] + b',"hash":"' + rec["hash"].encode() + b'"'
    if "mac" in rec:
        expect += b',"mac":"' + rec["mac"].encode() + b'"'
    expect += b"}"
    if expect != line:
        raise NotCanonical("line is not exactly the canonical body followed by hash and mac")
    return rec, cbody


# --------------------------------------------------------------------------------------------
# Keys ("Key ratchet", "Key rotation", "Key files").

GENESIS = "0" * 64


def epoch_key(secret: bytes, epoch: int) -> bytes:
    k = secret
    for _ in range(epoch):
        k = hmac.new(k, b"kvh-ratchet", hashlib.sha256).digest()
    return k


def key_id(secret: bytes) -> str:
    return hmac.new(secret, b"kvh-key-id", hashlib.sha256).digest()[:16].hex()


def record_hash(prev_hex: str, cbody: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hex) + cbody).hexdigest()


def record_mac(secret: bytes, epoch: int, hash_hex: str) -> str:
    return hmac.new(epoch_key(secret, epoch), bytes.fromhex(hash_hex), hashlib.sha256).hexdigest()


def read_hmac_key_file(p: Path) -> bytes:
    b = p.read_bytes()
    return b[:-1] if b.endswith(b"\n") else b


def read_public_key_file(p: Path) -> bytes:
    return bytes.fromhex(p.read_text().strip())


# --------------------------------------------------------------------------------------------
# Record schema ("Record schema"): the fields each kind carries, and their types.

HEADER = {"v", "seq", "ts", "kind", "chain", "epoch", "tenant_id", "request_id", "model_id", "prev", "hash", "mac"}
BLOCK = {"block_id", "device", "addr", "requested", "capacity", "scrub_seq"}
START = {"config_digest", "version", "pid", "host", "signer"}
OPTIONAL = {"mac", "signer"}  # "present iff the writer had an HMAC key" / "absent without a signing key"
SIX_DECIMALS = re.compile(r"^-?[0-9]+\.[0-9]{6}$")
HEX_0X = re.compile(r"^0x[0-9a-f]+$")

KINDS = {
    "start": START,
    "recovery": START | {"torn_bytes", "torn_sha256", "last_good_seq", "last_good_hash"},
    "rotate": {"prev_file", "prev_seq", "signer"},
    "verify_failed": BLOCK | {"samples_expected", "samples_checked", "samples_nonzero", "coverage", "threshold"},
    "quarantine": BLOCK | {"reason"},
    "release": BLOCK | {"reason"},
    "invalid_free": {"ptr", "call_device", "reason", "caller_tenant_id", "caller_request_id", "caller_model_id"},  # + block fields when the pointer belongs to a block
    "size_mismatch": BLOCK | {"claimed", "caller_tenant_id", "caller_request_id", "caller_model_id"},
    "ttl_exceeded": BLOCK | {"which", "age_ms", "limit_ms"},
    "policy_violation": {"policy", "detail"},
    "kv_scrub": {
        "device", "blocks", "verified_blocks", "failed_blocks", "segments", "unverified_segments", "bytes",
        "first_seed", "stream", "regions", "block_bytes", "block_stride", "blocks_per_region", "layout_sha256",
        "block_ids", "block_ids_sha256", "error", "trigger", "unknown_owner_blocks", "owner_changed_blocks",
        "withdrawn_blocks",
    },
    "kv_verify_failed": BLOCK | {
        "kv_block", "region", "segment_addr", "segment_len", "seed", "samples_expected", "samples_checked",
        "samples_nonzero", "coverage", "threshold",
    },
    "anomaly": {
        "signal", "rule", "key", "window_ms", "count", "threshold", "baseline_mean", "baseline_stddev", "z_score",
        "z_threshold",
    },
    "summary": {"counters"},
    "checkpoint": {"ckpt_seq", "ckpt_file", "signer"},
    "lost": {"records_lost", "bytes_lost", "lost_kinds", "since_ts", "error"},
    "stop": {"records_written", "records_lost"},
}

ENUMS = {
    ("quarantine", "reason"): {"verify_failed", "never_reuse_policy", "rescrub_failed", "residue", "rescrub_residue"},
    ("release", "reason"): {"quarantine_cleared", "max_reuse", "idle_ttl", "empty_cache", "out_of_memory"},
    ("invalid_free", "reason"): {"unknown_pointer", "double_free", "interior_pointer", "wrong_device", "invalid_device"},
    ("ttl_exceeded", "which"): {"live"},
    ("policy_violation", "policy"): {"kv_scrub", "kv_gate", "failure_mode"},
    ("kv_scrub", "trigger"): {"scrub_blocks", "claim_gate"},
    ("anomaly", "signal"): {
        "invalid_free", "size_mismatch", "verify_failed", "residue", "quarantine", "ttl_exceeded", "policy_violation",
    },
    ("anomaly", "rule"): {"burst", "surge"},
    ("anomaly", "key"): {"tenant", "*other*"},
}

# Fields documented as strings of a given form; every other kind field named above is an
# integer unless listed in STRINGS or free-form.
STRINGS = {"kind", "chain", "prev", "hash", "mac", "config_digest", "version", "host", "signer", "last_good_hash",
           "torn_sha256",
           "prev_file", "reason", "ptr", "addr", "which", "policy", "detail", "stream", "layout_sha256",
           "block_ids_sha256", "trigger", "segment_addr", "coverage", "threshold", "signal", "rule", "key",
           "ckpt_file", "error", "baseline_mean", "baseline_stddev", "z_score", "z_threshold", "start_failed"}
FREE = {"counters", "lost_kinds", "block_ids", "detail", "tenant_id", "request_id", "model_id",
        "caller_tenant_id", "caller_request_id", "caller_model_id"}


def schema_problems(r: dict) -> list:
    """How record `r` departs from the "Record schema" tables."""
    kind = r.get("kind")
    out = []
    if kind not in KINDS:
        return [f"kind {kind!r} is not in the schema table"]
    own = set(KINDS[kind])
    if kind == "invalid_free" and "block_id" in r:
        own |= BLOCK
    if kind == "anomaly" and "detail" in r:  # written through ForensicLog::record_anomaly
        own = {"detail"}
    allowed = HEADER | own
    required = allowed - OPTIONAL
    if kind == "stop":
        # "`start_failed` ... only when the process's start-up failed after the log opened"
        allowed |= {"start_failed"}
    if kind == "kv_scrub":
        required -= {"block_ids"}  # "present when there are at most 1024"
        if r.get("trigger") != "claim_gate":  # "only when `trigger` is `claim_gate`"
            allowed -= {"unknown_owner_blocks", "owner_changed_blocks", "withdrawn_blocks"}
            required -= {"unknown_owner_blocks", "owner_changed_blocks", "withdrawn_blocks"}
    for f in sorted(set(r) - allowed):
        out.append(f"{kind}: field {f!r} is written but not documented")
    for f in sorted(required - set(r)):
        out.append(f"{kind}: documented field {f!r} is missing")
    for f, v in r.items():
        if f not in allowed or f in FREE:
            continue
        if kind == "anomaly" and f == "threshold":
            ok = isinstance(v, int)  # "the count the rule needed"
        elif f in ("coverage", "threshold"):
            ok = isinstance(v, str) and SIX_DECIMALS.match(v)
        elif f in ("baseline_mean", "baseline_stddev", "z_score", "z_threshold"):
            ok = (v is None and r.get("rule") == "burst") or (isinstance(v, str) and SIX_DECIMALS.match(v))
        elif f == "error" and kind == "kv_scrub":
            ok = v is None or isinstance(v, str)
        elif f in ("prev", "hash", "mac", "signer", "last_good_hash", "torn_sha256", "config_digest",
                   "layout_sha256", "block_ids_sha256"):
            ok = isinstance(v, str) and HEX64.match(v)
        elif f in ("addr", "ptr", "segment_addr", "stream"):
            ok = isinstance(v, str) and HEX_0X.match(v)
        elif f in STRINGS:
            ok = isinstance(v, str)
        else:
            ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok:
            out.append(f"{kind}: field {f!r} has value {v!r}, not of the documented type")
        if (kind, f) in ENUMS and v not in ENUMS[(kind, f)]:
            out.append(f"{kind}: {f} = {v!r} is not one of the documented values {sorted(ENUMS[(kind, f)])}")
    for f in ("tenant_id", "request_id", "model_id", "caller_tenant_id", "caller_request_id", "caller_model_id"):
        if f in r and r[f] is not None and not isinstance(r[f], str):
            out.append(f"{kind}: {f} is not a string or null")
    if kind == "kv_scrub" and not out:
        ids = r.get("block_ids")
        if ids is not None:
            if len(ids) > 1024 or len(ids) != r["blocks"]:
                out.append("kv_scrub: block_ids is not the blocks named")
            digest = hashlib.sha256(b"".join(i.to_bytes(4, "little") for i in ids)).hexdigest()
            if digest != r["block_ids_sha256"]:
                out.append("kv_scrub: block_ids_sha256 is not the SHA-256 of the ids as little-endian u32s")
        if r["segments"] != r["blocks"] * r["regions"]:
            out.append("kv_scrub: segments is not blocks x regions")
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints ("Signed checkpoints") and prune manifests ("Retention").


def read_checkpoint(path: Path, public_keys: list):
    """The checkpoint of `path`, its signature checked against a pinned key. Returns the dict
    (without `sig`) or raises ValueError."""
    data = path.read_bytes()
    if data.endswith(b"\n"):
        data = data[:-1]
    if b"\n" in data:
        raise ValueError("checkpoint is more than one line")
    try:
        c = strict_json(data.decode("utf-8"))
    except (ValueError, NotCanonical) as e:
        raise ValueError(f"checkpoint is not JSON: {e}")
    sig = c.pop("sig", None)
    if not isinstance(sig, str) or not re.match(r"^[0-9a-f]{128}$", sig):
        raise ValueError("checkpoint has no 128-hex sig")
    expected_fields = {"chain", "file", "hash", "key_id", "public_key", "seq", "ts", "v"}
    if set(c) - expected_fields or (expected_fields - {"key_id"}) - set(c):
        raise ValueError(f"checkpoint fields {sorted(c)} are not those documented")
    if c["v"] != 1:
        raise ValueError("checkpoint v is not 1")
    body = canonical(c)
    if body[:-1] + b',"sig":"' + sig.encode() + b'"}' != data:
        raise ValueError("checkpoint is not in canonical form")
    pub = bytes.fromhex(c["public_key"])
    if pub not in public_keys:
        raise ValueError("checkpoint signed by a key that is not pinned")
    if not ed25519_verify(pub, body, bytes.fromhex(sig)):
        raise ValueError("bad checkpoint signature")
    return c


def manifest_mac(secret: bytes, manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "mac"}
    return hmac.new(secret, b"kvh-prune-manifest\n" + canonical(body), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------------------------
# The verifier ("Chain rules").

FILE_RE = re.compile(r"^kvh-(p[0-9]+-t[0-9]+)-([0-9]{6,})\.jsonl$")


class ChainFailed(Exception):
    pass


def list_chains(d: Path) -> dict:
    chains = {}
    for f in d.iterdir():
        m = FILE_RE.match(f.name)
        if m:
            chains.setdefault(m.group(1), []).append((int(m.group(2)), f))
    return {c: sorted(fs) for c, fs in chains.items()}


def file_name(chain: str, index: int) -> str:
    return f"kvh-{chain}-{index:06d}.jsonl"


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def recovery_problem(r: dict, state: dict):
    """Rule 4 on a `recovery` record: `last_good_seq` and `last_good_hash` name the record just
    before it or, after a `rotate` record with the recovery's own `ts`, the record before that
    `rotate`; `torn_sha256`, where present, is 64 lower-case hex digits and the digest of
    nothing exactly when `torn_bytes` is 0. Returns the problem, or None."""
    seq, named = r.get("last_good_seq"), r.get("last_good_hash")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return "no last_good_seq"
    if not isinstance(named, str) or not HEX64.match(named):
        return "no last_good_hash of 64 hex digits"
    if seq + 1 == state["seq"]:
        before = state["prev"]
    elif state["prev_rotate_ts"] is not None and state["prev_rotate_ts"] == r.get("ts") and seq + 2 == state["seq"]:
        before = state["before_prev"]  # unknown when the walk began at that rotate
    else:
        return f"last_good_seq {seq} is not the record before the recovery"
    if before is not None and named != before:
        return f"last_good_hash is not the hash of record {seq}"
    torn = r.get("torn_bytes")
    if not isinstance(torn, int) or isinstance(torn, bool):
        return "no torn_bytes"
    if "torn_sha256" in r:
        digest = r["torn_sha256"]
        if not isinstance(digest, str) or not HEX64.match(digest):
            return "torn_sha256 is not 64 lower-case hex digits"
        if (torn == 0) != (digest == EMPTY_SHA256):
            return f"torn_sha256 does not fit torn_bytes {torn}"
    return None


def verify_chain(chain, files, secrets, public_keys, ckpt_dir, allow_pruned=False, log_dir=None):
    """Verifies one chain per the document; returns a summary dict, raises ChainFailed."""
    ckpt = None
    if public_keys:
        p = ckpt_dir / f"kvh-{chain}.ckpt"
        if p.exists():
            try:
                ckpt = read_checkpoint(p, public_keys)
            except ValueError as e:
                raise ChainFailed(f"checkpoint: {e}")
            if ckpt["chain"] != chain:
                raise ChainFailed("checkpoint of another chain")
    # The chain's secret: the one the checkpoint's key_id names, else the one that verifies
    # the first MAC read (its first record, or the prune manifest's).
    secret = None
    candidates = list(dict.fromkeys(secrets))  # the same secret given twice counts once
    if ckpt is not None and "key_id" in ckpt and candidates:
        named = [s for s in candidates if key_id(s) == ckpt["key_id"]]
        if not named:
            raise ChainFailed("the checkpoint names a key id none of the keys given has")
        secret = named[0]
    state = {"seq": 0, "prev": GENESIS, "prev_file": None, "index": -1, "closed": False, "signer": None,
             "signer_at_ckpt": "unset", "records": [], "torn": 0, "ckpt_matched": False,
             "before_prev": None, "prev_rotate_ts": None}
    first_index = files[0][0]
    if first_index > 0:
        if not allow_pruned:
            raise ChainFailed(f"files 0..{first_index} are missing")
        mpath = log_dir / f"kvh-{chain}.pruned.json"
        if not mpath.exists():
            raise ChainFailed("no manifest for the missing files")
        m = json.loads(mpath.read_text())
        sealers = [s for s in candidates if hmac.compare_digest(manifest_mac(s, m), m.get("mac") or "")]
        if not sealers:
            raise ChainFailed("manifest MAC does not verify with any key given")
        if secret is not None and sealers[0] != secret:
            raise ChainFailed("manifest MACed with another key than the chain's")
        secret = sealers[0]
        names = [f["name"] for f in m["files"]]
        if names[:first_index] != [file_name(chain, i) for i in range(first_index)]:
            raise ChainFailed("manifest does not list files 0..k-1")
        nxt = 0
        for f in m["files"]:
            if f["first_seq"] != nxt:
                raise ChainFailed("manifest entries are not contiguous")
            nxt = f["last_seq"] + 1
        tail = m["files"][first_index - 1]
        state.update(seq=tail["last_seq"] + 1, prev=tail["last_hash"], prev_file=tail["name"], index=first_index - 1)
    for pos, (index, path) in enumerate(files):
        name = path.name
        newest = pos == len(files) - 1
        if state["closed"]:
            raise ChainFailed(f"{name}: file after stop")
        expect_index = 0 if state["prev_file"] is None else state["index"] + 1
        if index != expect_index:
            raise ChainFailed(f"{name}: index {index}, expected {expect_index}")
        data = path.read_bytes()
        parts = data.split(b"\n")
        torn = parts.pop()
        if torn:
            if not newest:
                raise ChainFailed(f"{name}: rotated file does not end with a newline")
            state["torn"] = len(torn)
        if not parts and not newest:
            raise ChainFailed(f"{name}: empty rotated file")
        for ln, line in enumerate(parts, 1):
            where = f"{name}:{ln}"
            try:
                r, cbody = parse_record_line(line)
            except NotCanonical as e:
                raise ChainFailed(f"{where}: {e}")
            if state["closed"]:
                raise ChainFailed(f"{where}: record after stop")
            if r.get("v") != 1 or r.get("chain") != chain or r.get("epoch") != index:
                raise ChainFailed(f"{where}: v/chain/epoch")
            if r.get("seq") != state["seq"]:
                raise ChainFailed(f"{where}: seq {r.get('seq')}, expected {state['seq']}")
            if r.get("prev") != state["prev"]:
                raise ChainFailed(f"{where}: prev")
            h = record_hash(state["prev"], cbody)
            if h != r["hash"]:
                raise ChainFailed(f"{where}: hash mismatch")
            if candidates:
                if "mac" not in r:
                    raise ChainFailed(f"{where}: no mac")
                if secret is None:
                    ok = [s for s in candidates if record_mac(s, index, h) == r["mac"]]
                    if not ok:
                        raise ChainFailed(f"{where}: no key given seals this chain")
                    secret = ok[0]
                elif record_mac(secret, index, h) != r["mac"]:
                    raise ChainFailed(f"{where}: MAC mismatch at epoch {index}")
            kind = r.get("kind")
            if ln == 1 and state["prev_file"] is None:
                if kind != "start":
                    raise ChainFailed(f"{where}: chain starts with {kind}")
            elif ln == 1:
                if kind != "rotate" or r.get("prev_file") != state["prev_file"] or r.get("prev_seq") != state["seq"] - 1:
                    raise ChainFailed(f"{where}: bad rotate link")
            elif kind in ("start", "rotate"):
                raise ChainFailed(f"{where}: {kind} in the middle of a file")
            if kind == "recovery":
                problem = recovery_problem(r, state)
                if problem:
                    raise ChainFailed(f"{where}: {problem}")
            if kind in ("start", "recovery", "rotate", "checkpoint") and "signer" in r:
                state["signer"] = r["signer"]
            if ckpt is not None and ckpt["seq"] == r["seq"]:
                if ckpt["hash"] != h:
                    raise ChainFailed(f"{where}: differs from the signed checkpoint")
                if ckpt["file"] != name:
                    raise ChainFailed(f"{where}: the checkpoint names file {ckpt['file']}, not the one holding its seq")
                state["ckpt_matched"] = True
                state["signer_at_ckpt"] = state["signer"]
            if kind == "stop":
                state["closed"] = True
            state["records"].append((name, ln, r))
            state["seq"] += 1
            state["before_prev"] = state["prev"]
            state["prev"] = h
            state["prev_rotate_ts"] = r.get("ts") if kind == "rotate" else None
        state["prev_file"] = name
        state["index"] = index
    # File 0 alone, empty or holding at most 64 KiB of torn bytes, no record.
    never_started = (not state["records"] and state["torn"] <= 64 * 1024
                     and [i for i, _ in files] == [0])
    if public_keys and ckpt is None and not never_started:
        raise ChainFailed("no checkpoint for the chain")
    if ckpt is not None:
        if not state["ckpt_matched"]:
            raise ChainFailed("chain ends before its signed checkpoint")
        named = state["signer_at_ckpt"]
        if named is not None and named != ckpt["public_key"]:
            raise ChainFailed("checkpoint re-signed with another key")
        if named is None and "key_id" in ckpt:
            raise ChainFailed("checkpoint signed at a point its writer never signed")
    return {
        "records": state["records"],
        "closed": state["closed"],
        "torn": state["torn"],
        "secret": secret,
        "checkpoint": ckpt,
        "last_seq": state["seq"] - 1,
    }


def verify_dir(d: Path, secrets=(), public_keys=(), ckpt_dir=None, allow_pruned=False):
    """Every chain of `d`: chain id -> summary dict, or the ChainFailed reason (a string)."""
    out = {}
    for chain, files in sorted(list_chains(d).items()):
        try:
            out[chain] = verify_chain(chain, files, list(secrets), list(public_keys), ckpt_dir or d,
                                      allow_pruned=allow_pruned, log_dir=d)
        except ChainFailed as e:
            out[chain] = str(e)
    return out


def verify_log(d: Path, *args: str):
    """`kvh verify-log --json`: (exit status, {chain: ok})."""
    p = subprocess.run([kvh(), "verify-log", str(d), "--json", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    rep = json.loads(p.stdout)
    return p.returncode, {c["chain"]: c for c in rep["chains"]}, rep


def ours_ok(res) -> bool:
    return isinstance(res, dict)


# --------------------------------------------------------------------------------------------
# Producing real logs.


def key_pair(tmp: Path, name: str):
    subprocess.run([kvh(), "keygen", "--out", str(tmp / name)], check=True, capture_output=True)
    return tmp / f"{name}.key", tmp / f"{name}.pub"


def hmac_key(tmp: Path, name: str, text: bytes) -> Path:
    p = tmp / name
    p.write_bytes(text)
    p.chmod(0o600)
    return p


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVH_") and k != "FORENSIC_HMAC_SECRET"}
    env.update(extra)
    return env


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
    crashed, and the `recovery` of its chain by the next process."""
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
    assert canonical(strict_json(body.decode())) == body
    h = record_hash(GENESIS, body)
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
    secrets = [read_hmac_key_file(logs["hk1"])]
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
    secrets = [read_hmac_key_file(logs["hk1"])]
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
    secrets = [read_hmac_key_file(logs["hk2"]), read_hmac_key_file(logs["hk1"])]
    pubs = [read_public_key_file(logs["pk2"]), read_public_key_file(logs["pk1"])]
    ours = verify_dir(d, secrets, pubs)
    assert len(ours) == 2
    for chain, res in ours.items():
        assert ours_ok(res), f"{chain}: {res}"
        # "key_id: the first 16 bytes of HMAC-SHA256(K(0), "kvh-key-id")" names the chain's secret.
        assert res["checkpoint"]["key_id"] == key_id(res["secret"])
        assert theirs[chain]["keys_bound"] is True


def test_every_record_of_a_demo_log_has_the_documented_fields(logs):
    ours = verify_dir(logs["rotated"], [read_hmac_key_file(logs["hk1"])], [read_public_key_file(logs["pk1"])])
    problems = [f"{n}:{ln}: {p}" for res in ours.values() for n, ln, r in res["records"] for p in schema_problems(r)]
    assert problems == []


def test_every_signed_checkpoint_is_noted_by_a_checkpoint_record(logs):
    """"Each one is also noted in the chain by a `checkpoint` record, but the one written at
    `stop`, which signs the `stop` record itself" (Signed checkpoints)."""
    d = logs["rotated"]
    ours = verify_dir(d, [read_hmac_key_file(logs["hk1"])], [read_public_key_file(logs["pk1"])])
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
    for kind in ["invalid_free", "size_mismatch", "ttl_exceeded", "policy_violation", "lost", "recovery"]:
        assert kind in kinds, sorted(kinds)
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
        prev = GENESIS
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
    secret = read_hmac_key_file(logs["hk1"])
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
    secret = read_hmac_key_file(logs["hk1"])
    assert m["mac"] != manifest_mac(secret, m), "the document's MAC covers the added member"
    code, theirs, rep = verify_log(d, "--key-file", str(logs["hk1"]), "--allow-pruned", "--archive-dir", str(archive))
    assert code == 1, (
        "a manifest whose document-defined MAC no longer verifies was accepted: "
        + json.dumps([(c, v.get("problem")) for c, v in theirs.items()])
    )


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
