"""A verifier of the forensic log written from docs/forensic-log.md (and README.md, `kvh --help`)
alone, without the Rust sources. Standard library plus `cryptography` (Ed25519) when installed.

verify(log_dir, ...) returns a Result: exit status as `kvh verify-log` defines it (0 verified,
1 tampering or corruption, 2 nothing to verify) and, per chain, its first problem or None.
"""

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
except ImportError:  # pragma: no cover
    Ed25519PublicKey = None

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


class Bad(Exception):
    """A violation; str() is the reason."""


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


# ---------------------------------------------------------------- checkpoints


def parse_checkpoint(raw: bytes):
    """'One line: the canonical JSON ... with ,"sig":"<128 hex>" inserted before the final }'."""
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


def ed25519_ok(pub_hex: str, sig_hex: str, msg: bytes):
    if Ed25519PublicKey is None:
        return None  # skipped
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_hex)).verify(bytes.fromhex(sig_hex), msg)
        return True
    except InvalidSignature:
        return False


# ---------------------------------------------------------------- the walk


class Result:
    def __init__(self):
        self.chains = {}  # chain -> problem or None
        self.errors = []  # report errors not tied to a chain
        self.summary = {}  # chain -> dict(records, last_seq, last_hash, closed, torn)

    @property
    def status(self):
        if self.errors or any(p is not None for p in self.chains.values()):
            return 1
        if not any(s.get("records", 0) for s in self.summary.values()):
            return 2
        return 0

    def __repr__(self):
        return f"Result(status={self.status}, chains={self.chains}, errors={self.errors})"


def _list(d):
    try:
        return sorted(os.listdir(d))
    except FileNotFoundError:
        return []


def verify(log_dir, key_files=(), public_key_files=(), checkpoint=None, allow_pruned=False, archive_dirs=()):
    log_dir = Path(log_dir)
    keys = Keys([read_hmac_key(f) for f in key_files])
    pubs = [read_public_key(f) for f in public_key_files]
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
    if pubs:
        if checkpoint is None:
            ck_paths = [log_dir / n for n in _list(log_dir) if CKPT_FILE.match(n)]
        elif Path(checkpoint).is_dir():
            ck_paths = [Path(checkpoint) / n for n in _list(checkpoint) if CKPT_FILE.match(n)]
        else:
            ck_paths = [Path(checkpoint)]
        for p in ck_paths:
            try:
                ck, cb = parse_checkpoint(p.read_bytes())
            except Bad as e:
                res.errors.append(f"{p}: {e}")
                continue
            m = CKPT_FILE.match(p.name)
            if m and m.group(1) != ck["chain"]:
                res.errors.append(f"{p}: checkpoint of chain {ck['chain']} in another chain's file")
                continue
            checkpoints.setdefault(ck["chain"], []).append((p, ck, cb))

    for chain in sorted(set(files) | set(manifests) | set(checkpoints)):
        try:
            summ = _verify_chain(
                chain, files.get(chain, {}), manifests.get(chain), checkpoints.get(chain, []), keys, pubs,
                allow_pruned, bool(archive_dirs), log_dir,
            )
            res.summary[chain] = summ
            res.chains[chain] = None
        except Bad as e:
            res.chains[chain] = str(e)
            res.summary[chain] = {"records": 0}
    return res


def _read_manifest(path, keys, ck_key_index):
    try:
        m = parse_json(path.read_bytes())
    except Bad as e:
        raise Bad(f"{path.name}: {e}")
    if not isinstance(m, dict) or set(m) != {"v", "chain", "files", "complete", "archive", "updated_at", "mac"}:
        raise Bad(f"{path.name}: manifest members {sorted(m) if isinstance(m, dict) else m}")
    if m["v"] != 1:
        raise Bad(f"{path.name}: manifest v is not 1")
    if not keys.secrets:
        raise Bad(f"{path.name}: manifest MAC cannot be checked without a key")
    candidates = [ck_key_index] if ck_key_index is not None else range(len(keys.secrets))
    for i in candidates:
        if hmac.compare_digest(manifest_mac(keys.secrets[i], m), str(m["mac"])):
            key_index = i
            break
    else:
        raise Bad(f"{path.name}: manifest MAC mismatch")
    prev_last = -1
    entry = {"name", "sha256", "first_seq", "last_seq", "last_hash", "oldest_ts", "newest_ts"}
    for i, f in enumerate(m["files"]):
        if not isinstance(f, dict) or set(f) != entry:
            raise Bad(f"{path.name}: manifest entry {i} members")
        if CHAIN_FILE.match(f["name"]) is None or CHAIN_FILE.match(f["name"]).group(1) != m["chain"] or int(
            CHAIN_FILE.match(f["name"]).group(2)
        ) != i:
            raise Bad(f"{path.name}: manifest entry {i} is not file {i} of the chain")
        if f["first_seq"] != prev_last + 1:
            raise Bad(f"{path.name}: manifest entry {i} does not follow the one before")
        prev_last = f["last_seq"]
    return m, key_index


def _verify_chain(chain, idx_paths, manifest_path, cks, keys, pubs, allow_pruned, archive_mode, log_dir):
    if len(cks) > 1:
        raise Bad(f"two checkpoint files for chain {chain}")
    ck = cks[0][1] if cks else None
    ck_bytes = cks[0][2] if cks else None
    if ck is not None:
        if ck["public_key"] not in pubs:
            raise Bad("checkpoint signed by a key that is not pinned")
        ok = ed25519_ok(ck["public_key"], ck["sig"], ck_bytes)
        if ok is False:
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
        blobs = {p.read_bytes() for p in paths}
        if len(blobs) > 1:
            raise Bad(f"file {idx} differs between the log directory and the archive")
        data[idx] = (paths[0].name, blobs.pop())
    indexes = sorted(data)

    manifest = None
    if manifest_path is not None and (allow_pruned or archive_mode):
        manifest, mk = _read_manifest(manifest_path, keys, key_index)
        if key_index is None:
            key_index = mk
        for i, f in enumerate(manifest["files"]):
            if i in data and hashlib.sha256(data[i][1]).hexdigest() != f["sha256"]:
                raise Bad(f"{f['name']}: SHA-256 differs from the manifest's")
            if archive_mode and i not in data:
                raise Bad(f"{f['name']}: listed by the manifest but not found")

    # where the walk starts
    seq, prev, prev_file, prev_last_seq = 0, ZERO_HASH, None, None
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
            return {"records": 0, "moved": True}
        if ck is not None:
            raise Bad(f"checkpoint of chain {chain}, which has no files: all its files were deleted")
        raise Bad(f"chain {chain}: no files (manifest accounts for nothing here)")

    records = 0
    closed = False
    signer = None  # the last signer named up to the current record
    found_ck = None  # (file name, hash, signer at that point) of the record the checkpoint covers
    last_kind = None
    rec_before = []  # (seq, hash, kind, ts) of the last two records
    torn = 0
    for n, idx in enumerate(indexes):
        name, blob = data[idx]
        newest = n == len(indexes) - 1
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
                _check_recovery(where, rec, rec_before)
            if kind in ("start", "recovery", "rotate", "checkpoint") and "signer" in rec:
                signer = rec["signer"]
            if kind == "stop":
                closed = True
            if ck is not None and rec["seq"] == ck["seq"]:
                found_ck = (name, rec["hash"], signer)
            rec_before = (rec_before + [(rec["seq"], rec["hash"], kind, rec["ts"])])[-2:]
            prev, seq = rec["hash"], seq + 1
            prev_file, prev_last_seq = name, rec["seq"]
            records += 1
            last_kind = kind
        prev_file = name

    if manifest is not None and allow_pruned and not archive_mode:
        for i, f in enumerate(manifest["files"]):
            if i >= indexes[0] and f["name"] != data.get(i, ("",))[0]:
                raise Bad("manifest lists a file that is not the chain's")

    # rule 6
    if pubs:
        if ck is None:
            if records == 0 and indexes == [0] and torn <= 64 * 1024:
                return {"records": 0}
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
    return {"records": records, "last_seq": seq - 1, "last_hash": prev, "closed": closed, "torn": torn,
            "last_kind": last_kind}


def _check_recovery(where, rec, before):
    for f in ("torn_bytes", "last_good_seq", "last_good_hash"):
        if f not in rec:
            raise Bad(f"{where}: recovery without {f}")
    target = before[-1] if before else None
    if before and before[-1][2] == "rotate" and before[-1][3] == rec["ts"] and len(before) > 1:
        if (rec["last_good_seq"], rec["last_good_hash"]) == (before[-2][0], before[-2][1]):
            target = before[-2]
    if target is None or (rec["last_good_seq"], rec["last_good_hash"]) != (target[0], target[1]):
        raise Bad(f"{where}: recovery's last_good_seq/hash do not name the record before it")
    if "torn_sha256" in rec:
        t = rec["torn_sha256"]
        if not isinstance(t, str) or not HEX64.match(t):
            raise Bad(f"{where}: torn_sha256 is not 64 lower-case hex digits")
        if (t == EMPTY_SHA256) != (rec["torn_bytes"] == 0):
            raise Bad(f"{where}: torn_sha256 is the digest of nothing iff torn_bytes is 0: violated")
