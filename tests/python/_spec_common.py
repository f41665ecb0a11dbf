"""What the tests of the forensic log against docs/forensic-log.md share: finding the build,
an environment without the caller's kvhygiene settings, and key files.

`kvh` is found through KVH_BIN, else next to KVH_LIBRARY, else under CARGO_TARGET_DIR,
target/debug or target/release; the library through KVH_LIBRARY, else the same directories.
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build_dirs():
    dirs = []
    if os.environ.get("CARGO_TARGET_DIR"):
        t = Path(os.environ["CARGO_TARGET_DIR"])
        dirs += [t / "debug", t / "release"]
    return dirs + [ROOT / "target/debug", ROOT / "target/release"]


def kvh() -> str:
    cands = []
    if os.environ.get("KVH_BIN"):
        cands.append(Path(os.environ["KVH_BIN"]))
    if os.environ.get("KVH_LIBRARY"):
        cands.append(Path(os.environ["KVH_LIBRARY"]).parent / "kvh")
    cands += [d / "kvh" for d in _build_dirs()]
    for c in cands:
        if c.exists():
            return str(c.resolve())
    pytest.skip(f"kvh not built (looked in {', '.join(map(str, cands))}); run cargo build --bin kvh")


def library() -> str:
    env = os.environ.get("KVH_LIBRARY")
    cands = [Path(env)] if env else [d / "libkvhygiene.so" for d in _build_dirs()]
    for c in cands:
        if c.exists():
            return str(c.resolve())
    pytest.skip("libkvhygiene.so not built; run cargo build")


def clean_env(**extra):
    """The environment without KVH_* and FORENSIC_HMAC_SECRET, on the host backend, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVH_") and k != "FORENSIC_HMAC_SECRET"}
    env["KVH_BACKEND"] = "host"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def key_pair(d: Path, name: str):
    """A signing key pair from `kvh keygen`: (d/name.key, d/name.pub)."""
    subprocess.run([kvh(), "keygen", "--out", str(d / name)], check=True, capture_output=True)
    return d / f"{name}.key", d / f"{name}.pub"


def hmac_key(d: Path, name: str, secret: bytes) -> Path:
    """A key file d/name holding `secret`, mode 0600."""
    p = d / name
    p.write_bytes(secret)
    p.chmod(0o600)
    return p
