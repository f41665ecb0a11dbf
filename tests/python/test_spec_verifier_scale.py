"""The spec verifier (spec_verifier.py) held to docs/forensic-log.md at the documented size
limits, where `kvh verify-log` enforces them.

docs/forensic-log.md, `kvh verify-log`: "Chain and checkpoint files ... must be regular files
(fstat) of at most 4 GiB (4 x the largest KVH_LOG_MAX_BYTES, 1 GiB) for a chain file and 64 KiB
for a checkpoint. A symlink, FIFO, directory, device, oversized or unreadable file at a chain
file name fails that chain (`file:1: cannot read chain file: ...`, exit 1)".
"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spec_verifier as sv  # noqa: E402
from _spec_common import clean_env, kvh  # noqa: E402

FOUR_GIB = 4 * 1024**3


def _record(chain: str, seq: int, kind: str, prev: str) -> tuple:
    body = {
        "chain": chain, "epoch": 0, "kind": kind, "model_id": None, "prev": prev, "request_id": None,
        "seq": seq, "tenant_id": None, "ts": 1_700_000_000_000_000_000 + seq, "v": 1,
    }
    cb = sv.canonical(body)
    h = sv.record_hash(prev, cb)
    return cb[:-1] + b',"hash":"' + h.encode() + b'"}\n', h


def _stopped_chain(d: Path, chain: str) -> None:
    start, h = _record(chain, 0, "start", sv.ZERO_HASH)
    stop, _ = _record(chain, 1, "stop", h)
    p = d / sv.file_name(chain, 0)
    p.write_bytes(start + stop)
    p.chmod(0o600)


def test_a_chain_file_over_the_4_gib_limit_fails_its_chain_in_both_verifiers(tmp_path):
    d = tmp_path / "log"
    d.mkdir(mode=0o700)
    _stopped_chain(d, "p1-t2")
    # A sparse file (no disk used) one byte over the limit, with no newline: bytes a verifier
    # that read it would call a torn tail.
    planted = d / sv.file_name("p9-t9", 0)
    with open(planted, "wb") as f:
        f.truncate(FOUR_GIB + 1)
    planted.chmod(0o600)

    run = subprocess.run([kvh(), "verify-log", str(d)], capture_output=True, text=True, env=clean_env())
    assert run.returncode == 1, run.stdout + run.stderr
    assert "kvh-p9-t9-000000.jsonl:1: cannot read chain file" in run.stdout, run.stdout

    res = sv.verify(d)
    assert res.status == 1 and res.chains.get("p9-t9") is not None, (
        "spec_verifier.py passes a chain file over the documented 4 GiB limit (read whole, as a "
        f"torn tail) that the document and kvh verify-log fail: {res}"
    )
