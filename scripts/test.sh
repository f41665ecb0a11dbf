#!/usr/bin/env bash
# The test suite: Rust unit and integration tests of the workspace (the library, and preload/,
# whose tests run libkvhygiene_preload.so under a fake CUDA runtime), then the Python tests
# that load the built library through ctypes. No GPU is needed; GPU checks live in
# scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# Checked first, so that a missing pytest is said before minutes of Rust tests, not after.
if ! python3 -c 'import pytest' 2>/dev/null; then
    echo "pytest is not installed: python3 -m pip install pytest pyyaml" >&2
    exit 2
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
    echo "PyYAML is not installed (tests/python/test_deploy.py reads deploy/k8s): python3 -m pip install pyyaml" >&2
    exit 2
fi
cargo build --workspace
cargo test --workspace --all-targets
# The library cargo just built, in the target directory cargo itself chose (CARGO_TARGET_DIR,
# CARGO_BUILD_TARGET_DIR or build.target-dir in a .cargo/config.toml), never an older one
# left in ./target.
target="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
KVH_LIBRARY="$target/debug/libkvhygiene.so" python3 -m pytest -q tests/python python/tests
