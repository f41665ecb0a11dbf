"""A verifier of the forensic log that follows docs/forensic-log.md (with README.md and
`kvh --help`), not the Rust sources, and uses the standard library only: Ed25519 is the
RFC 8032 reference arithmetic in pure Python, signing included (for tests that sign again).

verify(log_dir, ...) returns a Result: the exit status as `kvh verify-log` defines it (0
verified, 1 tampering or corruption, 2 nothing to verify) and, per chain, its first problem
(`file:line: reason`) or None, with a summary of each chain that verified (its records, the
secret that seals it, its checkpoint). The chain rules it checks are the document's "Chain
rules"; schema_problems() holds a record to the "Record schema" tables, which the chain rules
do not check (an unknown kind or an extra member verifies), so it is a separate check.
"""

import hashlib
import hmac
import json
import os
import re
import stat
from pathlib import Path

ZERO_HASH = "0" * 64
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX128 = re.compile(r"^[0-9a-f]{128}$")
# "Files and chains": kvh-<chain>-<index>.jsonl, index zero-padded to six digits, then 1000000...
# Chain ids p<1..20 digits>-t<1..20 digits>; file indexes of at most 20 digits, a u64.
CHAIN_ID = r"(p[0-9]{1,20}-t[0-9]{1,20})"
CHAIN_FILE = re.compile(r"^kvh-" + CHAIN_ID + r"-([0-9]{6}|[1-9][0-9]{6,19})\.jsonl$")
CKPT_FILE = re.compile(r"^kvh-" + CHAIN_ID + r"\.ckpt$")
MANIFEST_FILE = re.compile(r"^kvh-" + CHAIN_ID + r"\.pruned\.json$")
CKPT_MEMBERS = {"chain", "file", "hash", "public_key", "seq", "ts", "v", "sig"}
MAX_DEPTH = 32
U64 = 2**64 - 1
I64_MIN = -(2**63)
CHAIN_FILE_MAX = 4 * 1024**3  # a chain file: at most 4 x the largest KVH_LOG_MAX_BYTES
TORN_FILE0_MAX = 64 * 1024  # a chain whose writer died before `start`: file 0, at most this many torn bytes


class Bad(Exception):
    """A violation; str() is the reason."""


def file_name(chain: str, index: int) -> str:
    return f"kvh-{chain}-{index:06d}.jsonl"


# ---------------------------------------------------------------- Ed25519 (RFC 8032, section 6)

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


def _expand(seed: bytes):
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def _hash_mod_l(*parts: bytes) -> int:
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little") % _L


def ed25519_public(seed: bytes) -> bytes:
    """The public key of a 32-byte private key (seed)."""
    return _compress(_mul(_expand(seed)[0], _G))


def ed25519_sign(seed: bytes, msg: bytes) -> bytes:
    a, prefix = _expand(seed)
    public = _compress(_mul(a, _G))
    r = _hash_mod_l(prefix, msg)
    R = _compress(_mul(r, _G))
    s = (r + _hash_mod_l(R, public, msg) * a) % _L
    return R + int.to_bytes(s, 32, "little")


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
    h = _hash_mod_l(sig[:32], public, msg)
    return _equal(_mul(s, _G), _add(R, _mul(h, A)))


# ---------------------------------------------------------------- canonical form


def _enc_str(s: str) -> bytes:
    out = []
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20:
            out.append("\\u%04x" % o)
        else:
            out.append(ch)
    # a lone surrogate (from a \ud800 escape) has no UTF-8 form: not canonical
    return b'"' + "".join(out).encode("utf-8") + b'"'


def canonical(v, depth=1) -> bytes:
    if depth > MAX_DEPTH + 1:
        raise Bad("nesting deeper than 32 levels")
    if v is None:
        return b"null"
    if v is True:
        return b"true"
    if v is False:
        return b"false"
    if isinstance(v, int):
        if v > U64 or v < I64_MIN:
            raise Bad("integer out of the 64-bit range")
        return str(v).encode()
    if isinstance(v, str):
        return _enc_str(v)
    if isinstance(v, list):
        if depth > MAX_DEPTH:
            raise Bad("nesting deeper than 32 levels")
        return b"[" + b",".join(canonical(x, depth + 1) for x in v) + b"]"
    if isinstance(v, dict):
        if depth > MAX_DEPTH:
            raise Bad("nesting deeper than 32 levels")
        items = sorted(v.items(), key=lambda kv: kv[0].encode("utf-8"))
        return b"{" + b",".join(_enc_str(k) + b":" + canonical(x, depth + 1) for k, x in items) + b"}"
    raise Bad(f"non-integer number or unknown value {v!r}")


def _no_dups(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise Bad(f"duplicate key {k!r}")
        d[k] = v
    return d


def _no_float(s):
    raise Bad(f"non-integer number {s}")


def parse_json(text: bytes):
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Bad(f"not UTF-8: {e}")
    try:
        return json.loads(s, object_pairs_hook=_no_dups, parse_float=_no_float, parse_constant=_no_float)
    except Bad:
        raise
    except (ValueError, RecursionError) as e:
        raise Bad(f"not JSON: {e}")


def parse_record_line(line: bytes):
    """line without its '\\n'. Returns (record dict, body bytes) or raises Bad."""
    rec = parse_json(line)
    if not isinstance(rec, dict):
        raise Bad("record is not an object")
    if "hash" not in rec:
        raise Bad("record has no hash")
    body = {k: v for k, v in rec.items() if k not in ("hash", "mac")}
    try:
        cb = canonical(body)
    except UnicodeEncodeError:
        raise Bad("string with a lone surrogate")
    if not isinstance(rec["hash"], str) or ("mac" in rec and not isinstance(rec["mac"], str)):
        raise Bad("hash/mac not strings")
    expect = cb[:-1] + b',"hash":' + _enc_str(rec["hash"])
    if "mac" in rec:
        expect += b',"mac":' + _enc_str(rec["mac"])
    expect += b"}"
    if line != expect:
        raise Bad("line is not in canonical form")
    return rec, cb


# ---------------------------------------------------------------- keys


def read_hmac_key(path) -> bytes:
    b = Path(path).read_bytes()
    if b.endswith(b"\n"):
        b = b[:-1]
    if not 16 <= len(b) <= 65535:
        raise ValueError("HMAC secret must be 16 to 65535 bytes")
    return b


def read_public_key(path) -> str:
    t = Path(path).read_text()
    if t.endswith("\n"):
        t = t[:-1]
    if not HEX64.match(t):
        raise ValueError("public key must be 64 lower-case hex digits")
    return t


def ratchet(k0: bytes, epoch: int) -> bytes:
    k = k0
    for _ in range(epoch):
        k = hmac.new(k, b"kvh-ratchet", hashlib.sha256).digest()
    return k


def key_id(k0: bytes) -> str:
    return hmac.new(k0, b"kvh-key-id", hashlib.sha256).digest()[:16].hex()


def record_hash(prev_hex: str, body: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hex) + body).hexdigest()


def record_mac(k_epoch: bytes, hash_hex: str) -> str:
    return hmac.new(k_epoch, bytes.fromhex(hash_hex), hashlib.sha256).hexdigest()


def manifest_mac(k0: bytes, manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "mac"}
    return hmac.new(k0, b"kvh-prune-manifest\n" + canonical(body), hashlib.sha256).hexdigest()


class Keys:
    """The secrets given, with their ratchets cached per epoch."""

    def __init__(self, secrets):
        self.secrets = []
        for s in secrets:
            if s not in self.secrets:  # the same secret given twice counts once
                self.secrets.append(s)
        self._cache = {}

    def k(self, i, epoch):
        c = self._cache.setdefault(i, {0: self.secrets[i]})
        if epoch not in c:
            start = max(e for e in c if e <= epoch)
            key = c[start]
            for e in range(start + 1, epoch + 1):
                key = hmac.new(key, b"kvh-ratchet", hashlib.sha256).digest()
                c[e] = key
        return c[epoch]


# ---------------------------------------------------------------- record schema

# The fields each kind carries ("Record schema"), and their types. The chain rules do not hold a
# record to these tables (`kvh verify-log` accepts an unknown kind or an extra member):
# schema_problems() is a check of its own.

HEADER = {"v", "seq", "ts", "kind", "chain", "epoch", "tenant_id", "request_id", "model_id", "prev", "hash", "mac"}
BLOCK = {"block_id", "device", "addr", "requested", "capacity", "scrub_seq"}
START = {"config_digest", "version", "pid", "host", "sample_rule", "signer"}
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
    "ipc_export": BLOCK | {"caller_tenant_id", "caller_request_id", "caller_model_id"},
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
    ("release", "reason"): {"quarantine_cleared", "max_reuse", "idle_ttl", "empty_cache", "out_of_memory",
                            "ipc_exported"},
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
    if kind == "release":
        # "`leaked: true` only when the backend refused the release"
        allowed |= {"leaked"}
        if "leaked" in r and r["leaked"] is not True:
            out.append(f"release: leaked is {r['leaked']!r}, written only as true")
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



# ---------------------------------------------------------------- checkpoints


def parse_checkpoint(raw: bytes):
    """'One line: the canonical JSON ... with ,"sig":"<128 hex>" inserted before the final }'.
    Returns (checkpoint with its sig, canonical bytes without sig); the signature is not checked."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if b"\n" in raw:
        raise Bad("checkpoint is not one line")
    ck = parse_json(raw)
    if not isinstance(ck, dict):
        raise Bad("checkpoint is not an object")
    members = set(ck) - {"key_id"}
    if members != CKPT_MEMBERS:
        raise Bad(f"checkpoint members {sorted(ck)}")
    if not isinstance(ck["sig"], str) or not HEX128.match(ck["sig"]):
        raise Bad("checkpoint sig is not 128 hex digits")
    body = {k: v for k, v in ck.items() if k != "sig"}
    cb = canonical(body)
    if raw != cb[:-1] + b',"sig":"' + ck["sig"].encode() + b'"}':
        raise Bad("checkpoint is not in canonical form")
    if ck["v"] != 1:
        raise Bad("checkpoint v is not 1")
    for f in ("hash", "public_key"):
        if not isinstance(ck[f], str) or not HEX64.match(ck[f]):
            raise Bad(f"checkpoint {f} is not 64 hex digits")
    return ck, cb


def ed25519_ok(pub_hex: str, sig_hex: str, msg: bytes) -> bool:
    return ed25519_verify(bytes.fromhex(pub_hex), msg, bytes.fromhex(sig_hex))


def sign_checkpoint(ck: dict, seed_hex: str) -> bytes:
    """The checkpoint file's bytes for `ck` (its `sig`, if any, replaced), signed with the private
    key `seed_hex` (the 64 hex digits of a `kvh keygen` .key file)."""
    cb = canonical({k: v for k, v in ck.items() if k != "sig"})
    sig = ed25519_sign(bytes.fromhex(seed_hex), cb).hex()
    return cb[:-1] + b',"sig":"' + sig.encode() + b'"}\n'


# ---------------------------------------------------------------- recovery records


def recovery_problem(r: dict, prev: str, before_prev, prev_rotate_ts):
    """Rule 4 on a `recovery` record `r`, whose seq and prev already follow the chain (`prev`:
    the hash of the record before it; `before_prev`: the hash of the one before that, when
    known; `prev_rotate_ts`: the `ts` of the record before it if that is a `rotate`, else
    None). `last_good_seq` and `last_good_hash` name the record just before it or, after a
    `rotate` with the recovery's own `ts`, the record before that `rotate`; `torn_sha256`,
    where present, is 64 lower-case hex digits and the digest of nothing exactly when
    `torn_bytes` is 0. Returns the problem, or None."""
    seq, named = r.get("last_good_seq"), r.get("last_good_hash")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return "no last_good_seq"
    if not isinstance(named, str) or not HEX64.match(named):
        return "no last_good_hash of 64 hex digits"
    if seq + 1 == r["seq"]:
        before = prev
    elif prev_rotate_ts is not None and prev_rotate_ts == r["ts"] and seq + 2 == r["seq"]:
        before = before_prev
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


# ---------------------------------------------------------------- the walk


class Result:
    def __init__(self):
        self.chains = {}  # chain -> problem or None
        self.errors = []  # report errors not tied to a chain
        # chain -> dict(records: [(file name, line, record)], last_seq, last_hash, closed, torn,
        # last_kind, secret, checkpoint, moved); only for chains that verified
        self.summary = {}

    @property
    def status(self):
        if self.errors or any(p is not None for p in self.chains.values()):
            return 1
        if not any(s.get("records") for s in self.summary.values()):
            return 2
        return 0

    def per_chain(self):
        """chain -> its summary if it verified, else its problem (a string)."""
        return {c: (self.summary[c] if p is None else p) for c, p in self.chains.items()}

    def __repr__(self):
        return f"Result(status={self.status}, chains={self.chains}, errors={self.errors})"


def _list(d):
    try:
        return sorted(os.listdir(d))
    except FileNotFoundError:
        return []


def verify(log_dir, key_files=(), public_key_files=(), checkpoint=None, allow_pruned=False, archive_dirs=(),
           secrets=(), public_keys=()):
    """`kvh verify-log log_dir` with --key-file for each of key_files, --public-key for each of
    public_key_files, --checkpoint, --allow-pruned and --archive-dir. HMAC secrets (bytes) and
    public keys (32 bytes, or 64 hex digits) may also be given as such: secrets, public_keys."""
    log_dir = Path(log_dir)
    keys = Keys([read_hmac_key(f) for f in key_files] + list(secrets))
    pubs = [read_public_key(f) for f in public_key_files]
    pubs += [p.hex() if isinstance(p, bytes) else p for p in public_keys]
    res = Result()

    # files: chain -> index -> list of paths (DIR first, then archives)
    files = {}
    for d in [log_dir, *map(Path, archive_dirs)]:
        for name in _list(d):
            m = CHAIN_FILE.match(name)
            if m and int(m.group(2)) <= U64:
                files.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(d / name)

    manifests = {}
    for name in _list(log_dir):
        m = MANIFEST_FILE.match(name)
        if m:
            manifests[m.group(1)] = log_dir / name

    checkpoints = {}  # chain -> list of (path, ck, canonical bytes)
    ck_problems = {}  # chain -> the problem of a checkpoint file named after it
    if pubs:
        if checkpoint is None:
            ck_paths = [log_dir / n for n in _list(log_dir) if CKPT_FILE.match(n)]
        elif Path(checkpoint).is_dir():
            ck_paths = [Path(checkpoint) / n for n in _list(checkpoint) if CKPT_FILE.match(n)]
        else:
            ck_paths = [Path(checkpoint)]
        for p in ck_paths:
            m = CKPT_FILE.match(p.name)
            try:
                ck, cb = parse_checkpoint(p.read_bytes())
                if m and m.group(1) != ck["chain"]:
                    raise Bad(f"checkpoint of chain {ck['chain']} in another chain's file")
            except Bad as e:
                if m:
                    ck_problems.setdefault(m.group(1), f"{p.name}: {e}")
                else:
                    res.errors.append(f"{p}: {e}")
                continue
            checkpoints.setdefault(ck["chain"], []).append((p, ck, cb))

    for chain in sorted(set(files) | set(manifests) | set(checkpoints) | set(ck_problems)):
        try:
            if chain in ck_problems:
                raise Bad(ck_problems[chain])
            summ = _verify_chain(
                chain, files.get(chain, {}), manifests.get(chain), checkpoints.get(chain, []), keys, pubs,
                allow_pruned, bool(archive_dirs),
            )
            res.summary[chain] = summ
            res.chains[chain] = None
        except Bad as e:
            res.chains[chain] = str(e)
    return res


def _read_manifest(path, chain, keys, ck_key_index):
    try:
        m = parse_json(path.read_bytes())
    except Bad as e:
        raise Bad(f"{path.name}: {e}")
    if not isinstance(m, dict) or set(m) != {"v", "chain", "files", "complete", "archive", "updated_at", "mac"}:
        raise Bad(f"{path.name}: manifest members {sorted(m) if isinstance(m, dict) else m}")
    if m["v"] != 1:
        raise Bad(f"{path.name}: manifest v is not 1")
    if m["chain"] != chain:
        raise Bad(f"{path.name}: manifest of chain {m['chain']!r}")
    if not keys.secrets:
        raise Bad(f"{path.name}: manifest MAC cannot be checked without a key")
    candidates = [ck_key_index] if ck_key_index is not None else range(len(keys.secrets))
    for i in candidates:
        if hmac.compare_digest(manifest_mac(keys.secrets[i], m), str(m["mac"])):
            key_index = i
            break
    else:
        if ck_key_index is not None:
            raise Bad(f"{path.name}: manifest MAC mismatch with the key the checkpoint names")
        raise Bad(f"{path.name}: manifest MAC mismatch")
    prev_last = -1
    entry = {"name", "sha256", "first_seq", "last_seq", "last_hash", "oldest_ts", "newest_ts"}
    for i, f in enumerate(m["files"]):
        if not isinstance(f, dict) or set(f) != entry:
            raise Bad(f"{path.name}: manifest entry {i} members")
        if f["name"] != file_name(chain, i):
            raise Bad(f"{path.name}: manifest entry {i} is not file {i} of the chain")
        if f["first_seq"] != prev_last + 1:
            raise Bad(f"{path.name}: manifest entry {i} does not follow the one before")
        prev_last = f["last_seq"]
    return m, key_index


def _chain_file_bytes(p):
    """A chain file's bytes: a regular file (not followed through a symlink) of at most
    CHAIN_FILE_MAX bytes, checked before it is read; any other fails the chain."""
    st = os.lstat(p)
    if not stat.S_ISREG(st.st_mode) or st.st_size > CHAIN_FILE_MAX:
        raise Bad(f"{p.name}:1: cannot read chain file (not a regular file of at most 4 GiB)")
    return p.read_bytes()

def _verify_chain(chain, idx_paths, manifest_path, cks, keys, pubs, allow_pruned, archive_mode):
    if len(cks) > 1:
        raise Bad(f"two checkpoint files for chain {chain}")
    ck = cks[0][1] if cks else None
    ck_bytes = cks[0][2] if cks else None
    if ck is not None:
        if ck["public_key"] not in pubs:
            raise Bad("checkpoint signed by a key that is not pinned")
        if not ed25519_ok(ck["public_key"], ck["sig"], ck_bytes):
            raise Bad("bad checkpoint signature")

    # which secret seals the chain: the checkpoint's key_id, else the first MAC read
    key_index = None
    if ck is not None and "key_id" in ck and keys.secrets:
        ids = [key_id(s) for s in keys.secrets]
        if ck["key_id"] not in ids:
            raise Bad(f"MAC mismatch: the chain's signed checkpoint names HMAC key id {ck['key_id']}")
        key_index = ids.index(ck["key_id"])

    # read each index's bytes; the same file in DIR and an archive counts once
    data = {}
    for idx, paths in idx_paths.items():
        blobs = {_chain_file_bytes(p) for p in paths}
        if len(blobs) > 1:
            raise Bad(f"file {idx} differs between the log directory and the archive")
        data[idx] = (paths[0].name, blobs.pop())
    indexes = sorted(data)

    manifest = None
    if manifest_path is not None and (allow_pruned or archive_mode):
        manifest, mk = _read_manifest(manifest_path, chain, keys, key_index)
        if key_index is None:
            key_index = mk
        for i, f in enumerate(manifest["files"]):
            if i in data and hashlib.sha256(data[i][1]).hexdigest() != f["sha256"]:
                raise Bad(f"{f['name']}: SHA-256 differs from the manifest's")
            if archive_mode and i not in data:
                raise Bad(f"{f['name']}: listed by the manifest but not found")

    def summary(**kw):
        base = {"records": [], "last_seq": None, "last_hash": None, "closed": False, "torn": 0, "last_kind": None,
                "moved": False, "checkpoint": ck, "secret": keys.secrets[key_index] if key_index is not None else None}
        base.update(kw)
        return base

    # where the walk starts: file 0, or (pruned) the file after the manifest's last moved one
    seq, prev, before_prev, prev_file, prev_last_seq = 0, ZERO_HASH, None, None, None
    first = 0
    if indexes and indexes[0] > 0:
        if not (allow_pruned and manifest is not None):
            raise Bad(f"file {0} of chain {chain} is missing")
        k = indexes[0]
        if len(manifest["files"]) < k:
            raise Bad("manifest does not list every file before the first one left")
        last = manifest["files"][k - 1]
        seq, prev, prev_file, prev_last_seq = last["last_seq"] + 1, last["last_hash"], last["name"], last["last_seq"]
        first = k
        if len(manifest["files"]) > indexes[-1] + 1:
            raise Bad("manifest lists a file beyond the last file left")
    if indexes and indexes != list(range(first, indexes[-1] + 1)):
        missing = sorted(set(range(first, indexes[-1] + 1)) - set(indexes))
        raise Bad(f"file {missing[0]} of chain {chain} is missing")

    if not indexes:
        if manifest is not None and allow_pruned:
            if not manifest["complete"]:
                raise Bad("manifest of an open chain with no file left: files were deleted")
            last = manifest["files"][-1]
            if pubs and ck is None:
                raise Bad(f"no checkpoint for chain {chain}")
            if ck is not None and (ck["seq"] != last["last_seq"] or ck["hash"] != last["last_hash"]):
                raise Bad("checkpoint is not the moved chain's last record")
            return summary(moved=True, last_seq=last["last_seq"], last_hash=last["last_hash"], closed=True)
        if ck is not None:
            raise Bad(f"checkpoint of chain {chain}, which has no files: all its files were deleted")
        raise Bad(f"chain {chain}: no files (manifest accounts for nothing here)")

    records = []  # (file name, line, record)
    closed = False
    signer = None  # the last signer named up to the current record
    found_ck = None  # (file name, hash, signer at that point) of the record the checkpoint covers
    prev_rotate_ts = None  # the ts of the record before, when it is a rotate
    sealed = None  # whether the records read so far carry a mac
    torn = 0
    for n, idx in enumerate(indexes):
        name, blob = data[idx]
        newest = n == len(indexes) - 1
        if closed:
            raise Bad(f"{name}: file after stop")
        if not newest and (not blob or not blob.endswith(b"\n")):
            raise Bad(f"{name}: rotated file is empty or does not end with a newline")
        lines = blob.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with '\n'
        torn = len(tail)
        for ln, line in enumerate(lines, 1):
            where = f"{name}:{ln}"
            try:
                rec, body = parse_record_line(line)
            except Bad as e:
                raise Bad(f"{where}: {e}")
            if closed:
                raise Bad(f"{where}: record after stop")
            for f, t in (("v", int), ("seq", int), ("ts", int), ("epoch", int), ("kind", str), ("chain", str), ("prev", str)):
                if not isinstance(rec.get(f), t) or isinstance(rec.get(f), bool):
                    raise Bad(f"{where}: header field {f} missing or of the wrong type")
            if not 0 <= rec["ts"] <= U64:
                raise Bad(f"{where}: ts is not a u64")
            for f in ("tenant_id", "request_id", "model_id"):
                if f not in rec or not (rec[f] is None or isinstance(rec[f], str)):
                    raise Bad(f"{where}: header field {f} missing or of the wrong type")
            if rec["v"] != 1:
                raise Bad(f"{where}: v is not 1")
            if rec["chain"] != chain:
                raise Bad(f"{where}: chain {rec['chain']} spliced from another chain")
            if rec["epoch"] != idx:
                raise Bad(f"{where}: epoch {rec['epoch']} is not the file index {idx}")
            if rec["seq"] != seq:
                raise Bad(f"{where}: seq {rec['seq']}, expected {seq}")
            if rec["prev"] != prev:
                raise Bad(f"{where}: prev does not link to the previous record")
            if not HEX64.match(rec["hash"]) or record_hash(prev, body) != rec["hash"]:
                raise Bad(f"{where}: hash mismatch")
            if keys.secrets:
                if "mac" not in rec:
                    raise Bad(f"{where}: record has no mac but a key was given")
                if key_index is None:
                    for i in range(len(keys.secrets)):
                        if hmac.compare_digest(record_mac(keys.k(i, idx), rec["hash"]), rec["mac"]):
                            key_index = i
                            break
                    else:
                        raise Bad(f"{where}: none of the {len(keys.secrets)} keys given seals this chain")
                elif not hmac.compare_digest(record_mac(keys.k(key_index, idx), rec["hash"]), rec["mac"]):
                    raise Bad(f"{where}: MAC mismatch at epoch {idx}")
            elif "mac" in rec and not HEX64.match(rec["mac"]):
                raise Bad(f"{where}: mac is not 64 lower-case hex digits")
            # rule 3: a mac on every record or on none, and on every one under a key_id
            if ck is not None and "key_id" in ck and "mac" not in rec:
                raise Bad(f"{where}: record has no mac, but the signed checkpoint names a key_id")
            if sealed is not None and sealed != ("mac" in rec):
                raise Bad(f"{where}: a mac on some records of the chain only")
            sealed = "mac" in rec
            kind = rec["kind"]
            # rule 4
            if ln == 1 and idx == 0 and kind != "start":
                raise Bad(f"{where}: first record of the chain is not start")
            if ln == 1 and idx > 0:
                if kind != "rotate":
                    raise Bad(f"{where}: first record of a later file is not rotate")
                if rec.get("prev_file") != prev_file or rec.get("prev_seq") != prev_last_seq:
                    raise Bad(f"{where}: rotate does not name the previous file and its last seq")
            if ln != 1 and kind in ("start", "rotate"):
                raise Bad(f"{where}: {kind} record that does not open a file")
            if kind == "recovery":
                problem = recovery_problem(rec, prev, before_prev, prev_rotate_ts)
                if problem:
                    raise Bad(f"{where}: {problem}")
            if kind in ("start", "recovery", "rotate", "checkpoint") and "signer" in rec:
                signer = rec["signer"]
            if kind == "stop":
                closed = True
            if ck is not None and rec["seq"] == ck["seq"]:
                found_ck = (name, rec["hash"], signer)
            before_prev, prev, seq = prev, rec["hash"], seq + 1
            prev_rotate_ts = rec["ts"] if kind == "rotate" else None
            prev_file, prev_last_seq = name, rec["seq"]
            records.append((name, ln, rec))
        if closed and torn:
            raise Bad(f"{name}: bytes after stop")
        prev_file = name

    if manifest is not None and allow_pruned and not archive_mode:
        for i, f in enumerate(manifest["files"]):
            if i >= indexes[0] and f["name"] != data.get(i, ("",))[0]:
                raise Bad("manifest lists a file that is not the chain's")

    # rule 6
    if pubs:
        if ck is None:
            if not records and indexes == [0] and torn <= TORN_FILE0_MAX:
                return summary(torn=torn)
            raise Bad(f"no checkpoint for chain {chain}")
        if found_ck is None:
            raise Bad(f"checkpoint at seq {ck['seq']} but the chain ends earlier: truncated")
        if found_ck[1] != ck["hash"]:
            raise Bad("checkpoint hash differs: the chain was rewritten")
        if found_ck[0] != ck["file"]:
            raise Bad("checkpoint names another file than the one holding its record")
        if found_ck[2] is not None and found_ck[2] != ck["public_key"]:
            raise Bad("checkpoint re-signed with another key")
        if "key_id" in ck and found_ck[2] is None:
            raise Bad("checkpoint signed at a point its writer never signed")
    return summary(records=records, last_seq=seq - 1 if records else None, last_hash=prev if records else None,
                   closed=closed, torn=torn, last_kind=records[-1][2]["kind"] if records else None)
