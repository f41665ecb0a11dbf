"""Shared set-up of the GPU check's Python steps (each runs in its own process, because an
allocator must be chosen before the first CUDA allocation of a process)."""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))


def parse(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--mode", choices=["default", "kvh"], required=True)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--threads", action="store_true", help="two threads, two tenants")
    return p.parse_args()


def setup(mode: str):
    """Imports torch with the chosen allocator installed. Returns the torch module."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch")
    if mode == "kvh":
        import kvhygiene

        # Passed by path: the run's environment carries only the KVH_* settings under test.
        kvhygiene.install(os.environ.get("GPU_CHECK_LIBRARY"))
    return torch


def write(path: str, record: dict) -> None:
    kvh = sys.modules.get("kvhygiene")
    if kvh is not None and kvh.installed():
        # The pool's own counters, to explain the timings (hits, fresh allocations, batches).
        kvh.synchronize()
        record["kvh_stats"] = kvh.stats()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
