#!/usr/bin/env python3
"""Counts how often kvhygiene's background threads wake while the process is idle.

Loads libkvhygiene.so on the host backend, allocates and frees one block (which starts the
allocator and its flusher thread), waits for the scrub, then counts each kvhygiene thread's
voluntary context switches (one per wake from a sleep) over an idle interval. An idle
inference server should cost no CPU: this is the figure docs/benchmarks.md quotes.

Usage: scripts/idle-wakeups.py [LIBRARY] [SECONDS]
LIBRARY defaults to target/release/libkvhygiene.so, SECONDS to 5. Extra KVH_* settings
(KVH_BATCH_MAX_DELAY_US, say) are taken from the environment.
"""

import ctypes
import os
import sys
import time
from pathlib import Path


def kvh_threads() -> dict:
    """Voluntary context switches of each thread whose name starts with "kvh", by name."""
    counts = {}
    for task in Path("/proc/self/task").iterdir():
        name = (task / "comm").read_text().strip()
        if not name.startswith("kvh"):
            continue
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                counts[f"{name}/{task.name}"] = int(line.split()[1])
    return counts


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    lib_path = sys.argv[1] if len(sys.argv) > 1 else str(root / "target/release/libkvhygiene.so")
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    os.environ.setdefault("KVH_BACKEND", "host")
    lib = ctypes.CDLL(lib_path)
    lib.kvh_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.kvh_malloc.restype = ctypes.c_void_p
    lib.kvh_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    p = lib.kvh_malloc(4096, 0, None)
    if not p:
        print("kvh_malloc failed: is the library built, and KVH_* valid?", file=sys.stderr)
        return 1
    lib.kvh_free(p, 4096, 0, None)
    lib.kvh_synchronize()
    time.sleep(0.5)  # past any housekeeping the first free scheduled
    before = kvh_threads()
    time.sleep(seconds)
    after = kvh_threads()
    total = 0
    for name in sorted(after):
        woke = after[name] - before.get(name, 0)
        total += woke
        print(f"{name}: {woke} wakes in {seconds:g} s ({woke / seconds:.1f}/s)")
    print(f"all kvhygiene threads: {total / seconds:.1f} wakes/s while idle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
