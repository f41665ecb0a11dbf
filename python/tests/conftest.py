"""Test set-up: the host backend (no GPU), and the package from this checkout."""

import os
import sys
from pathlib import Path

# Before the library is loaded: the host backend exposes 8 virtual devices and needs no GPU.
os.environ.setdefault("KVH_BACKEND", "host")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
