"""The metrics exports of the process-wide runtime, through the C ABI on the host backend:
KVH_METRICS_FILE written at start and at exit, KVH_METRICS_ADDR served over loopback, and an
address in use leaving the allocator working. Each test runs in a fresh interpreter.
"""

import re
import socket
import subprocess
import sys

from test_c_abi import kvh_binary, library, run_child


def sample(text: str, series: str) -> float:
    m = re.search(r"^" + re.escape(series) + r" (\S+)$", text, re.M)
    assert m, f"{series} not in:\n{text}"
    return float(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_file_is_written_at_exit_with_the_final_counters(tmp_path):
    prom = tmp_path / "kvh.prom"
    # An hour between periodic writes: after the write at start (awaited below, before the
    # allocations), the counts can only reach the file through the write at exit.
    out = run_child(
        f"""
        import os, time
        assert lib.kvh_synchronize() == 0  # starts the runtime
        deadline = time.time() + 10
        while not os.path.exists({str(prom)!r}):
            assert time.time() < deadline, "no metrics file written at start"
            time.sleep(0.01)
        out["at_start"] = open({str(prom)!r}).read()
        for _ in range(7):
            p = lib.kvh_malloc(4096, 0, STREAM)
            lib.kvh_free(p, 4096, 0, STREAM)
        lib.kvh_synchronize()
        """,
        KVH_METRICS_FILE=str(prom),
        KVH_METRICS_INTERVAL_MS="3600000",
    )
    assert sample(out["at_start"], "kvh_allocations_total") == 0
    text = prom.read_text()
    assert sample(text, "kvh_allocations_total") == 7
    assert sample(text, "kvh_frees_total") == 7
    assert sample(text, 'kvh_verifications_total{result="passed"}') == 7
    assert sample(text, 'kvh_pool_blocks{state="live"}') == 0
    ok = subprocess.run([kvh_binary(), "metrics", "--file", str(prom), "--max-age", "600", "--fail-on-security"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_http_exporter_serves_the_live_counters(tmp_path):
    port = free_port()
    out = run_child(
        f"""
        import urllib.request, urllib.error
        for _ in range(3):
            p = lib.kvh_malloc(1024, 0, STREAM)
            lib.kvh_free(p, 1024, 0, STREAM)
        base = "http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            out["metrics"] = r.read().decode()
            out["type"] = r.headers["Content-Type"]
        with urllib.request.urlopen(base + "/stats", timeout=10) as r:
            out["stats"] = json.loads(r.read())
        try:
            urllib.request.urlopen(base + "/other", timeout=10)
        except urllib.error.HTTPError as e:
            out["other"] = e.code
        """,
        KVH_METRICS_ADDR=f"127.0.0.1:{port}",
    )
    assert out["type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert sample(out["metrics"], "kvh_allocations_total") == 3
    assert sample(out["metrics"], "kvh_log_enabled") == 0
    assert out["stats"]["counters"]["allocations"] == 3
    assert out["other"] == 404


def test_an_address_in_use_is_named_and_the_allocator_keeps_working():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = (
            f"import ctypes\nlib = ctypes.CDLL({library()!r})\n"
            "lib.kvh_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]\n"
            "lib.kvh_malloc.restype = ctypes.c_void_p\n"
            "assert lib.kvh_malloc(256, 0, None)\nprint('allocated')\n"
        )
        env = {"KVH_BACKEND": "host", "KVH_METRICS_ADDR": f"127.0.0.1:{port}", "PATH": "/usr/bin:/bin"}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "allocated" in proc.stdout
    assert f"127.0.0.1:{port}" in proc.stderr and "KVH_METRICS_ADDR" in proc.stderr, proc.stderr
