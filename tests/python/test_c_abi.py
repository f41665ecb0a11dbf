"""Drives libkvhygiene.so through ctypes exactly as PyTorch's CUDAPluggableAllocator calls it
(no torch needed): kvh_malloc(ssize_t size, int device, void* stream) -> void* and
kvh_free(void* ptr, ssize_t size, int device, void* stream), on the host backend.

Each test runs in a fresh interpreter: the allocator reads its configuration once per process.
The library is found through KVH_LIBRARY, else target/debug, else target/release.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = str(ROOT / "python")


def library() -> str:
    env = os.environ.get("KVH_LIBRARY")
    candidates = [Path(env)] if env else [ROOT / "target/debug/libkvhygiene.so", ROOT / "target/release/libkvhygiene.so"]
    for c in candidates:
        if c.exists():
            # Absolute: children run in other working directories, where a relative
            # KVH_LIBRARY (and the kvh beside it) would not be found.
            return str(c.resolve())
    pytest.skip(f"libkvhygiene.so not built (looked in {', '.join(map(str, candidates))}); run cargo build")


PRELUDE = textwrap.dedent(
    """
    import ctypes, json, sys
    lib = ctypes.CDLL(LIB)
    lib.kvh_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.kvh_malloc.restype = ctypes.c_void_p
    lib.kvh_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.kvh_free.restype = None
    lib.kvh_free_checked.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.kvh_free_checked.restype = ctypes.c_int
    lib.kvh_record_stream.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.kvh_record_stream.restype = None
    lib.kvh_set_context.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.kvh_last_error.restype = ctypes.c_uint32
    lib.kvh_stats_json.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.kvh_strerror.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.kvh_last_error_message.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.kvh_version.restype = ctypes.c_char_p
    STREAM = None  # the default stream, as PyTorch passes it

    def text(fn, *args):
        n = ctypes.c_size_t(0)
        fn(*args, None, 0, ctypes.byref(n))
        # Slack: the stats may grow between the two calls while scrubs complete.
        buf = ctypes.create_string_buffer(n.value + 4096)
        rc = fn(*args, buf, len(buf), ctypes.byref(n))
        assert rc == 0, rc
        return buf.value.decode()

    def stats():
        return json.loads(text(lib.kvh_stats_json))

    def zero(ptr, size):
        return ctypes.string_at(ptr, size) == bytes(size)

    out = {}
    """
)


def run_child(body: str, **env: str) -> dict:
    """Runs `body` after the prelude in a fresh interpreter; returns its `out` dict."""
    code = f"LIB = {library()!r}\n" + PRELUDE + textwrap.dedent(body) + "\nprint('KVH-OUT ' + json.dumps(out))\n"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVH_")}
    full_env.update({"KVH_BACKEND": "host", "KVH_OOM": "null", "KVH_BATCH_MAX_DELAY_US": "100"})
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("KVH-OUT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("KVH-OUT "):])


def test_allocations_read_zero_after_secrets_are_freed():
    out = run_child(
        """
        sizes = [1, 511, 4096, 65536 + 7, 1 << 20]
        ok = True
        for rnd in range(5):
            ptrs = [lib.kvh_malloc(s, 0, STREAM) for s in sizes]
            ok &= all(p is not None for p in ptrs)
            ok &= all(zero(p, s) for p, s in zip(ptrs, sizes))
            for p, s in zip(ptrs, sizes):
                ctypes.memset(p, 0xAB, s)           # the request's secret
                lib.kvh_free(p, s, 0, STREAM)
                assert lib.kvh_last_error() == 0
            assert lib.kvh_synchronize() == 0
        out["all_zero"] = ok
        out["stats"] = stats()
        """
    )
    assert out["all_zero"]
    c = out["stats"]["counters"]
    assert c["allocations"] == 25 and c["frees"] == 25
    assert c["pool_hits"] > 0 and c["verifications_failed"] == 0
    assert out["stats"]["accounting"]["live"]["blocks"] == 0


def test_invalid_frees_return_codes_and_leave_blocks_intact():
    out = run_child(
        """
        keep = lib.kvh_malloc(4096, 0, STREAM)
        ctypes.memset(keep, 0x42, 4096)
        codes = {}
        lib.kvh_free(0xdead0000, 64, 0, STREAM); codes["unknown"] = lib.kvh_last_error()
        p = lib.kvh_malloc(256, 0, STREAM)
        lib.kvh_free(p, 256, 0, STREAM); codes["first"] = lib.kvh_last_error()
        lib.kvh_free(p, 256, 0, STREAM); codes["double"] = lib.kvh_last_error()
        lib.kvh_free(keep + 16, 4096, 0, STREAM); codes["interior"] = lib.kvh_last_error()
        lib.kvh_free(keep, 4096, 1, STREAM); codes["wrong_device"] = lib.kvh_last_error()
        lib.kvh_free(keep, 4096, 42, STREAM); codes["invalid_device"] = lib.kvh_last_error()
        q = lib.kvh_malloc(100, 0, STREAM)
        lib.kvh_free(q, 99, 0, STREAM); codes["size_mismatch"] = lib.kvh_last_error()
        r = lib.kvh_malloc(100, 0, STREAM)
        lib.kvh_free(r, -5, 0, STREAM); codes["negative_size_free"] = lib.kvh_last_error()
        codes["negative_malloc_is_null"] = lib.kvh_malloc(-1, 0, STREAM) is None
        codes["negative_malloc"] = lib.kvh_last_error()
        codes["zero_malloc_is_null"] = lib.kvh_malloc(0, 0, STREAM) is None
        codes["zero_malloc"] = lib.kvh_last_error()
        lib.kvh_free(None, 0, 0, STREAM); codes["null_free"] = lib.kvh_last_error()
        out["codes"] = codes
        out["keep_intact"] = ctypes.string_at(keep, 4096) == b"\\x42" * 4096
        lib.kvh_free(keep, 4096, 0, STREAM); out["keep_free"] = lib.kvh_last_error()
        lib.kvh_synchronize()
        out["stats"] = stats()
        out["message"] = text(lib.kvh_strerror, 7005)
        """
    )
    c = out["codes"]
    assert c["unknown"] == 7004
    assert c["first"] == 0
    assert c["double"] == 7005
    assert c["interior"] == 7006
    assert c["wrong_device"] == 7008
    assert c["invalid_device"] == 7014
    assert c["size_mismatch"] == 7007
    assert c["negative_size_free"] == 7007
    assert c["negative_malloc_is_null"] and c["negative_malloc"] == 7002
    assert c["zero_malloc_is_null"] and c["zero_malloc"] == 0
    assert c["null_free"] == 0
    assert out["keep_intact"] and out["keep_free"] == 0
    counters = out["stats"]["counters"]
    assert counters["invalid_frees"] == 5
    assert counters["size_mismatches"] == 2
    assert out["stats"]["accounting"]["live"]["blocks"] == 0
    assert "already free" in out["message"]


def test_an_exported_allocation_is_never_handed_out_again_and_pooled_memory_is_not_exported():
    out = run_child(
        """
        lib.kvh_mark_ipc_exported.argtypes = [ctypes.c_void_p]
        codes = {}
        codes["before_start"] = lib.kvh_mark_ipc_exported(0x7000)
        shared = lib.kvh_malloc(4096, 0, STREAM)
        ctypes.memset(shared, 0x5A, 4096)
        codes["null"] = lib.kvh_mark_ipc_exported(None)
        codes["interior"] = lib.kvh_mark_ipc_exported(shared + 100)
        codes["unknown"] = lib.kvh_mark_ipc_exported(0xdead0000)
        out["unknown_message"] = text(lib.kvh_last_error_message)
        lib.kvh_free(shared, 4096, 0, STREAM)
        lib.kvh_synchronize()
        plain = lib.kvh_malloc(4096, 0, STREAM)
        out["fresh_zero"] = zero(plain, 4096)
        lib.kvh_free(plain, 4096, 0, STREAM)
        lib.kvh_synchronize()
        codes["pooled"] = lib.kvh_mark_ipc_exported(plain)
        out["pooled_message"] = text(lib.kvh_last_error_message)
        # The unexported block is pooled and comes back; the exported one never does.
        again = lib.kvh_malloc(4096, 0, STREAM)
        out["pooled_back"] = again == plain
        out["codes"] = codes
        out["stats"] = stats()
        """
    )
    c = out["codes"]
    assert c == {"before_start": 7004, "null": 7001, "interior": 0, "unknown": 7004, "pooled": 7020}, c
    assert "not inside memory kvhygiene holds" in out["unknown_message"]
    assert "not allocated (it is clean)" in out["pooled_message"]
    assert out["fresh_zero"] and out["pooled_back"]
    counters = out["stats"]["counters"]
    assert counters["ipc_exported_blocks"] == 1
    assert counters["released"] == 1
    assert counters["pool_hits"] == 1


def test_free_checked_reports_a_sabotaged_scrub_and_quarantines():
    out = run_child(
        """
        p = lib.kvh_malloc(8192, 0, STREAM)
        ctypes.memset(p, 0x5A, 8192)
        assert lib.kvh_inject_fault(1) == 0
        out["rc"] = lib.kvh_free_checked(p, 8192, 0, STREAM)
        out["msg"] = text(lib.kvh_last_error_message)
        lib.kvh_synchronize()
        again = [lib.kvh_malloc(8192, 0, STREAM) for _ in range(8)]
        out["zero"] = all(zero(a, 8192) for a in again)
        out["stats"] = stats()
        """
    )
    assert out["rc"] == 7009
    assert "quarantined" in out["msg"]
    assert out["zero"]
    c = out["stats"]["counters"]
    assert c["verifications_failed"] == 1 and c["quarantined"] == 1


def test_context_ids_are_validated():
    out = run_child(
        """
        out["ok"] = lib.kvh_set_context(b"tenant-a", b"req-1", None)
        out["too_long"] = lib.kvh_set_context(b"x" * 129, None, None)
        out["control"] = lib.kvh_set_context(b"t", b"req\\n{forged}", None)
        out["not_utf8"] = lib.kvh_set_context(None, None, b"\\xff\\xfe")
        out["msg"] = text(lib.kvh_last_error_message)
        lib.kvh_clear_context()
        """
    )
    assert out["ok"] == 0
    assert out["too_long"] == 7010 and out["control"] == 7010 and out["not_utf8"] == 7010
    assert "model_id" in out["msg"]


def test_buffer_protocol_strerror_and_version():
    out = run_child(
        """
        # Before anything started the allocator, the counters are not read, nor is it started.
        out["unstarted"] = stats()
        out["unstarted_sync"] = lib.kvh_synchronize()
        lib.kvh_empty_cache()
        out["unstarted_empty"] = lib.kvh_last_error()
        out["still_unstarted"] = stats()
        out["init"] = lib.kvh_init()
        n = ctypes.c_size_t(0)
        out["null_buf"] = lib.kvh_stats_json(None, 0, ctypes.byref(n))
        out["needed"] = n.value
        small = ctypes.create_string_buffer(4)
        out["small"] = lib.kvh_stats_json(small, 4, ctypes.byref(n))
        out["null_out_len"] = lib.kvh_stats_json(small, 4, None)
        out["unknown_code"] = lib.kvh_strerror(12345, small, 4, ctypes.byref(n))
        out["version"] = lib.kvh_version().decode()
        started = stats()
        out["stats_backend"] = started["backend"]
        out["started_flags"] = (started.get("started"), started.get("shut_down"))
        lib.kvh_shutdown()
        stopped = stats()
        out["stopped_flags"] = (stopped.get("started"), stopped.get("shut_down"))
        out["drill_after_shutdown"] = lib.kvh_inject_fault(1)
        """
    )
    assert out["unstarted"] == {"started": False, "version": out["version"]}, out
    assert (out["unstarted_sync"], out["unstarted_empty"]) == (0, 0)
    assert out["still_unstarted"] == out["unstarted"] and out["init"] == 0
    assert out["null_buf"] == 7013 and out["needed"] > 10
    assert out["small"] == 7013
    assert out["null_out_len"] == 7001
    assert out["unknown_code"] == 7017
    assert out["version"].count(".") == 2
    assert out["stats_backend"] == "host"
    # A started allocator's counters say so, and say when shutdown has begun.
    assert out["started_flags"] == [True, False], out
    assert out["stopped_flags"] == [True, True], out
    # No scrub runs after shutdown: a fire drill then is refused, not silently armed.
    assert out["drill_after_shutdown"] == 7016, out


def test_started_stats_keep_the_latency_buckets_in_ascending_order_of_their_bound():
    # The scrub latency buckets are cumulative counts keyed by their bound ("0.0005" .. "30",
    # src/stats.rs): a reader that walks them as the JSON lists them (a Python dict keeps
    # that order) must meet the bounds in ascending order, as the exported histogram has them.
    out = run_child(
        """
        ptr = lib.kvh_malloc(4096, 0, STREAM)
        lib.kvh_free(ptr, 4096, 0, STREAM)
        assert lib.kvh_synchronize() == 0
        s = stats()
        out["started"] = s.get("started")
        out["bounds"] = list(s["scrub_latency"]["buckets"])
        """
    )
    assert out["started"] is True, out
    bounds = out["bounds"]
    assert bounds[0] == "0.0005" and bounds[-1] == "30", bounds
    assert bounds == sorted(bounds, key=float), f"buckets out of order in kvh_stats_json: {bounds}"


def test_invalid_configuration_is_reported_with_the_key():
    out = run_child(
        """
        out["init"] = lib.kvh_init()
        out["msg"] = text(lib.kvh_last_error_message)
        lib.kvh_free(0x1000, 8, 0, STREAM)
        out["free"] = lib.kvh_last_error()
        """,
        KVH_COVERAGE_THRESHOLD="1.5",
    )
    assert out["init"] == 7011 and out["free"] == 7011
    assert "KVH_COVERAGE_THRESHOLD" in out["msg"] and "(0, 1]" in out["msg"]


def test_oom_throws_bad_alloc_in_throw_mode():
    # PyTorch does not check kvh_malloc for NULL, so the default is to throw. Through ctypes
    # (C, no handler) the exception ends the process: that is the observable proof.
    code = f"LIB = {library()!r}\n" + PRELUDE + "lib.kvh_malloc((1 << 62), 0, None)\nprint('survived')\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVH_")}
    env.update({"KVH_BACKEND": "host", "KVH_OOM": "throw"})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "survived" not in proc.stdout
    assert "bad_alloc" in proc.stderr
    # The reason is said on stderr before the throw, and is the exception's what(), which
    # PyTorch makes the RuntimeError's text: an out-of-memory in the words of PyTorch's own.
    assert "kvh_malloc throws std::bad_alloc: out of memory: 4611686018427387904 bytes" in proc.stderr, proc.stderr
    what = "what():  CUDA out of memory. Tried to allocate 4611686018427387904 bytes on device 0 (kvhygiene: out of memory: "
    assert what in proc.stderr, proc.stderr


def test_a_throw_with_no_allocator_to_start_says_why():
    # A kvh_malloc after kvh_shutdown (no start-up came first), and one in a child forked
    # after start-up, throw: each says why first, as an allocation's own failure does.
    after_shutdown = "lib.kvh_shutdown()\nlib.kvh_malloc(4096, 0, None)\nprint('survived')\n"
    in_child = (
        "lib.kvh_free(lib.kvh_malloc(4096, 0, None), 4096, 0, None)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    lib.kvh_malloc(4096, 0, None)\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child', status)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVH_")}
    env.update({"KVH_BACKEND": "host", "KVH_OOM": "throw"})
    for body, reason in [(after_shutdown, "kvh_shutdown"), (in_child, "fork")]:
        code = f"LIB = {library()!r}\nimport os\n" + PRELUDE + body
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert "survived" not in proc.stdout
        said = [l for l in proc.stderr.splitlines() if "kvh_malloc throws std::bad_alloc: " in l]
        assert len(said) == 1 and reason in said[0], proc.stderr
        # Not an out-of-memory: no handler retrying with less memory takes it for one.
        what = [l for l in proc.stderr.splitlines() if "what():" in l]
        assert len(what) == 1 and "kvhygiene cannot allocate 4096 bytes on device 0: " in what[0], proc.stderr
        assert reason in what[0] and "out of memory" not in what[0], proc.stderr


def test_start_up_says_once_when_no_forensic_log_is_kept(tmp_path):
    code = (
        f"LIB = {library()!r}\n" + PRELUDE
        + "for _ in range(3):\n    lib.kvh_free(lib.kvh_malloc(4096, 0, STREAM), 4096, 0, STREAM)\n"
        + "assert lib.kvh_synchronize() == 0\n"
        + "print('KVH-LOG ' + json.dumps(stats()['log']))\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVH_")}
    base.update({"KVH_BACKEND": "host"})
    notice = "forensic log off (KVH_LOG_DIR is not set)"
    off = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=60)
    assert off.returncode == 0, off.stderr
    assert off.stderr.count(notice) == 1, off.stderr
    assert '"enabled": false' in off.stdout
    on = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "KVH_LOG_DIR": str(tmp_path / "log")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert on.returncode == 0, on.stderr
    assert notice not in on.stderr
    assert '"enabled": true' in on.stdout


def kvh_binary() -> str:
    lib = Path(library())
    exe = lib.parent / "kvh"
    if not exe.exists():
        pytest.skip(f"{exe} not built; run cargo build")
    return str(exe)


def test_security_events_reach_a_verifiable_forensic_log(tmp_path):
    log_dir = tmp_path / "log"
    out = run_child(
        """
        lib.kvh_set_context(b"tenant-a", b"req-7", b"llama")
        p = lib.kvh_malloc(4096, 0, STREAM)
        ctypes.memset(p, 0x33, 4096)
        lib.kvh_inject_fault(1)
        out["rc"] = lib.kvh_free_checked(p, 4096, 0, STREAM)
        lib.kvh_free(0xdead0000, 8, 0, STREAM)
        lib.kvh_shutdown()
        out["log"] = stats()["log"]
        """,
        KVH_LOG_DIR=str(log_dir),
        FORENSIC_HMAC_SECRET="0123456789abcdef0123456789abcdef",
    )
    assert out["rc"] == 7009
    assert out["log"]["enabled"] and out["log"]["records_lost"] == 0
    records = [json.loads(l) for f in sorted(log_dir.glob("*.jsonl")) for l in f.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    for kind in ["start", "verify_failed", "quarantine", "invalid_free", "stop"]:
        assert kind in kinds, kinds
    failed = next(r for r in records if r["kind"] == "verify_failed")
    assert failed["tenant_id"] == "tenant-a" and failed["request_id"] == "req-7"
    assert all("mac" in r for r in records)
    # The secret was removed from the child's environment; verify with a key file.
    key = tmp_path / "hmac.key"
    key.write_text("0123456789abcdef0123456789abcdef")
    key.chmod(0o600)
    ok = subprocess.run([kvh_binary(), "verify-log", str(log_dir), "--key-file", str(key)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # One flipped byte in the middle of the chain is caught, naming the line.
    f = sorted(log_dir.glob("*.jsonl"))[0]
    lines = f.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace("tenant-a", "tenant-b")
    f.write_text("".join(lines))
    bad = subprocess.run([kvh_binary(), "verify-log", str(log_dir), "--key-file", str(key)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"{f.name}:2" in bad.stdout + bad.stderr


def test_the_runtime_puts_the_anomaly_detector_before_the_log(tmp_path):
    log_dir = tmp_path / "log"
    out = run_child(
        """
        lib.kvh_set_context(b"tenant-a", b"req-1", b"llama")
        for i in range(40):
            lib.kvh_free(0xdead0000 + 16 * i, 8, 0, STREAM)
        lib.kvh_set_context(b"tenant-b", b"req-2", b"llama")
        for i in range(5):
            lib.kvh_free(0xbeef0000 + 16 * i, 8, 0, STREAM)
        out["anomaly"] = stats()["anomaly"]
        lib.kvh_shutdown()
        """,
        KVH_LOG_DIR=str(log_dir),
    )
    a = out["anomaly"]
    assert a["enabled"] is True and a["anomalies"] == 1, a
    assert a["by_signal"]["invalid_free"] == 1 and a["by_signal"]["residue"] == 0, a
    records = [json.loads(l) for f in sorted(log_dir.glob("*.jsonl")) for l in f.read_text().splitlines()]
    assert sum(r["kind"] == "invalid_free" for r in records) == 45
    anomalies = [r for r in records if r["kind"] == "anomaly"]
    assert len(anomalies) == 1, anomalies
    (x,) = anomalies
    assert (x["signal"], x["rule"], x["key"], x["tenant_id"]) == ("invalid_free", "burst", "tenant", "tenant-a"), x
    assert (x["count"], x["threshold"], x["window_ms"]) == (16, 16, 10000), x
    ok = subprocess.run([kvh_binary(), "verify-log", str(log_dir)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_anomaly_detector_off_is_said_in_the_stats():
    out = run_child(
        """
        lib.kvh_set_context(b"tenant-a", None, None)
        for i in range(40):
            lib.kvh_free(0xdead0000 + 16 * i, 8, 0, STREAM)
        out["anomaly"] = stats()["anomaly"]
        """,
        KVH_ANOMALY="off",
    )
    assert out["anomaly"] == {"enabled": False}


def test_unusable_log_directory_stops_start_up(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    out = run_child(
        """
        out["init"] = lib.kvh_init()
        out["msg"] = text(lib.kvh_last_error_message)
        """,
        KVH_LOG_DIR=str(not_a_dir / "sub"),
    )
    assert out["init"] == 7018, out
    assert "sub" in out["msg"]


def test_queries_leave_the_last_error_alone():
    out = run_child(
        """
        lib.kvh_free(0xdead0000, 8, 0, STREAM)
        code = lib.kvh_last_error()
        out["described"] = text(lib.kvh_strerror, code)
        out["after_strerror"] = lib.kvh_last_error()
        stats()
        out["after_stats"] = lib.kvh_last_error()
        out["message"] = text(lib.kvh_last_error_message)
        """
    )
    assert out["after_strerror"] == 7004 and out["after_stats"] == 7004
    assert "not allocated" in out["described"] and out["message"]


def test_null_mode_never_throws_even_when_start_up_fails():
    out = run_child(
        """
        out["null"] = lib.kvh_malloc(4096, 0, STREAM) is None
        out["code"] = lib.kvh_last_error()
        """,
        KVH_OOM="null",
        KVH_BATCH_SIZE="0",
    )
    assert out["null"] and out["code"] == 7011


KV_PRELUDE = """
class Layout(ctypes.Structure):
    _fields_ = [("region_bases", ctypes.POINTER(ctypes.c_uint64)), ("region_count", ctypes.c_size_t),
                ("block_bytes", ctypes.c_uint64), ("block_stride", ctypes.c_uint64),
                ("blocks_per_region", ctypes.c_uint64)]
lib.kvh_scrub_blocks.argtypes = [ctypes.POINTER(Layout), ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t,
                                 ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                 ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
lib.kvh_scrub_blocks.restype = ctypes.c_int
lib.kvh_claim_blocks.argtypes = lib.kvh_scrub_blocks.argtypes
lib.kvh_claim_blocks.restype = ctypes.c_int

def layout(bases, block, stride, n):
    arr = (ctypes.c_uint64 * len(bases))(*bases)
    l = Layout(arr, len(bases), block, stride, n)
    l._keep = arr
    return l

# (code, the ids the call named back that fit, how many it named) of kvh_scrub_blocks or
# kvh_claim_blocks.
def kv_call(fn, l, ids, cap):
    idarr = (ctypes.c_uint32 * len(ids))(*ids)
    named = (ctypes.c_uint32 * cap)()
    count = ctypes.c_size_t(99)
    rc = fn(ctypes.byref(l), idarr, len(ids), 0, STREAM, named, cap, ctypes.byref(count))
    return rc, list(named)[: min(cap, count.value)], count.value

def scrub(l, ids, cap=8):
    return kv_call(lib.kvh_scrub_blocks, l, ids, cap)

def claim(l, ids, cap=8):
    return kv_call(lib.kvh_claim_blocks, l, ids, cap)
"""


def test_kv_blocks_are_scrubbed_through_the_c_abi_and_logged(tmp_path):
    log_dir = tmp_path / "log"
    out = run_child(
        KV_PRELUDE
        + """
lib.kvh_set_context(b"tenant-a", b"req-9", b"llama")
B, N = 512, 16
cache = lib.kvh_malloc(2 * N * B, 0, STREAM)
ctypes.memset(cache, 0x5C, 2 * N * B)
kv = layout([cache, cache + N * B], B, B, N)
out["cache"] = cache
out["ok"] = scrub(kv, [3, 11])
mem = ctypes.string_at(cache, 2 * N * B)
blocks = [mem[i * B:(i + 1) * B] for i in range(2 * N)]
out["zero_blocks"] = [i for i, b in enumerate(blocks) if b == bytes(B)]
out["kept"] = all(b == b"\\x5c" * B for i, b in enumerate(blocks) if i not in (3, 11, 19, 27))
# A sabotaged scrub: the first segment (block 7, K) is left half dirty.
lib.kvh_inject_fault(1)
out["failed"] = scrub(kv, [7, 8], cap=1)
# Refusals: overlapping regions, a stray address, NULL arguments.
out["overlap"] = scrub(layout([cache, cache + B // 2], B, B, N), [0])
out["stray"] = scrub(layout([0x1000], B, B, N), [0])
out["msg"] = text(lib.kvh_last_error_message)
count = ctypes.c_size_t(0)
out["null_layout"] = lib.kvh_scrub_blocks(None, None, 0, 0, STREAM, None, 0, ctypes.byref(count))
out["null_count"] = lib.kvh_scrub_blocks(ctypes.byref(kv), None, 0, 0, STREAM, None, 0, None)
out["null_ids"] = lib.kvh_scrub_blocks(ctypes.byref(kv), None, 2, 0, STREAM, None, 0, ctypes.byref(count))
one = (ctypes.c_uint32 * 1)(5)
out["null_failed_ids"] = lib.kvh_scrub_blocks(ctypes.byref(kv), one, 1, 0, STREAM, None, 4, ctypes.byref(count))
out["empty"] = lib.kvh_scrub_blocks(ctypes.byref(kv), None, 0, 0, STREAM, None, 0, ctypes.byref(count))
# Lengths over the limits are refused before any array is read.
wide = Layout(kv.region_bases, 65537, B, B, N)
out["too_many_regions"] = lib.kvh_scrub_blocks(ctypes.byref(wide), None, 0, 0, STREAM, None, 0, ctypes.byref(count))
one_id = (ctypes.c_uint32 * 1)(0)
out["too_many_ids"] = lib.kvh_scrub_blocks(ctypes.byref(kv), one_id, (1 << 20) + 1, 0, STREAM, None, 0, ctypes.byref(count))
out["counters"] = stats()["counters"]
lib.kvh_free(cache, 2 * N * B, 0, STREAM)
lib.kvh_shutdown()
""",
        KVH_LOG_DIR=str(log_dir),
    )
    assert out["ok"] == [0, [], 0]
    assert out["zero_blocks"] == [3, 11, 19, 27] and out["kept"]
    # Only one failed id fits the buffer, but the count says how many failed.
    assert out["failed"] == [7009, [7], 1]
    assert out["overlap"][0] == 7019 and out["stray"][0] == 7020
    assert "0x1000" in out["msg"] and "live" in out["msg"]
    assert out["null_layout"] == out["null_count"] == out["null_ids"] == out["null_failed_ids"] == 7001
    assert out["empty"] == 0
    assert out["too_many_regions"] == out["too_many_ids"] == 7019
    c = out["counters"]
    assert (c["kv_scrub_calls"], c["kv_blocks_scrubbed"], c["kv_blocks_failed"], c["kv_scrubs_refused"]) == (2, 4, 1, 2)
    records = [json.loads(l) for f in sorted(log_dir.glob("*.jsonl")) for l in f.read_text().splitlines()]
    scrubs = [r for r in records if r["kind"] == "kv_scrub"]
    assert [(r["blocks"], r["failed_blocks"], r["segments"]) for r in scrubs] == [(2, 0, 4), (2, 1, 4)]
    assert scrubs[0]["block_ids"] == [3, 11] and scrubs[0]["error"] is None
    assert (scrubs[0]["regions"], scrubs[0]["block_bytes"], scrubs[0]["blocks_per_region"]) == (2, 512, 16)
    import hashlib, struct
    assert scrubs[0]["block_ids_sha256"] == hashlib.sha256(struct.pack("<2I", 3, 11)).hexdigest()
    cache = out["cache"]
    layout = struct.pack("<6Q", 2, cache, cache + 16 * 512, 512, 512, 16)
    assert scrubs[0]["layout_sha256"] == hashlib.sha256(layout).hexdigest()
    assert scrubs[0]["request_id"] == "req-9" and scrubs[0]["bytes"] == 4 * 512
    failed = [r for r in records if r["kind"] == "kv_verify_failed"]
    assert [(r["kv_block"], r["region"]) for r in failed] == [(7, 0)]
    assert failed[0]["seed"] == scrubs[1]["first_seed"]
    refused = [r for r in records if r["kind"] == "policy_violation" and r["policy"] == "kv_scrub"]
    assert len(refused) == 2
    ok = subprocess.run([kvh_binary(), "verify-log", str(log_dir)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_the_eviction_gate_scrubs_or_refuses_a_change_of_owner_through_the_c_abi(tmp_path):
    body = (
        KV_PRELUDE
        + """
B, N = 256, 8
cache = lib.kvh_malloc(2 * N * B, 0, STREAM)
kv = layout([cache, cache + N * B], B, B, N)
def block_zero(i):
    return zero(cache + i * B, B) and zero(cache + (N + i) * B, B)
def fill(i):
    ctypes.memset(cache + i * B, 0x3C, B)
    ctypes.memset(cache + (N + i) * B, 0x3C, B)
lib.kvh_set_context(b"tenant-a", b"req-1", None)
out["first"] = claim(kv, [1, 2])      # unknown owners: scrubbed (scrub) or refused (enforce)
out["engine"] = scrub(kv, [1, 2])     # the engine's own scrub at start
out["own"] = claim(kv, [1, 2])
fill(1)
lib.kvh_set_context(b"tenant-a", b"req-2", None)
out["other"] = claim(kv, [2, 1], cap=1)
out["block1_zero"] = block_zero(1)
out["msg"] = text(lib.kvh_last_error_message)
count = ctypes.c_size_t(0)
out["null_count"] = lib.kvh_claim_blocks(ctypes.byref(kv), None, 0, 0, STREAM, None, 0, None)
one = (ctypes.c_uint32 * 1)(5)
out["null_refused"] = lib.kvh_claim_blocks(ctypes.byref(kv), one, 1, 0, STREAM, None, 4, ctypes.byref(count))
out["bad_id"] = claim(kv, [N])
out["counters"] = stats()["counters"]
lib.kvh_free(cache, 2 * N * B, 0, STREAM)
lib.kvh_shutdown()
"""
    )
    scrub_dir, enforce_dir = tmp_path / "scrub", tmp_path / "enforce"
    scrubbed = run_child(body, KVH_LOG_DIR=str(scrub_dir))
    assert scrubbed["first"] == scrubbed["own"] == scrubbed["other"] == [0, [], 0]
    assert scrubbed["block1_zero"], "request 2 got request 1's block unscrubbed"
    c = scrubbed["counters"]
    assert (c["kv_claim_calls"], c["kv_blocks_claimed"], c["kv_gate_scrubbed_blocks"]) == (3, 6, 4)
    assert c["kv_gate_owner_changed_blocks"] == 2, "only request 2's claim took blocks from another owner"
    records = [json.loads(l) for f in sorted(scrub_dir.glob("*.jsonl")) for l in f.read_text().splitlines()]
    gate = [r for r in records if r["kind"] == "kv_scrub" and r["trigger"] == "claim_gate"]
    assert [(r["block_ids"], r["request_id"], r["unknown_owner_blocks"]) for r in gate] == [
        ([1, 2], "req-1", 2),
        ([2, 1], "req-2", 0),
    ]
    assert [r["trigger"] for r in records if r["kind"] == "kv_scrub"].count("scrub_blocks") == 1

    enforced = run_child(body, KVH_LOG_DIR=str(enforce_dir), KVH_KV_GATE="enforce")
    assert enforced["first"] == [7021, [1, 2], 2]
    assert enforced["own"] == [0, [], 0]
    # Both blocks are request 1's; one id fits the buffer, the count says two.
    assert enforced["other"] == [7021, [2], 2]
    assert not enforced["block1_zero"], "a refused claim wrote memory"
    assert "kv_gate = enforce" in enforced["msg"]
    assert enforced["null_count"] == enforced["null_refused"] == 7001
    assert enforced["bad_id"][0] == 7019
    c = enforced["counters"]
    assert (c["kv_claims_refused"], c["kv_gate_scrubbed_blocks"]) == (3, 0)
    records = [json.loads(l) for f in sorted(enforce_dir.glob("*.jsonl")) for l in f.read_text().splitlines()]
    violations = [r for r in records if r["kind"] == "policy_violation" and r["policy"] == "kv_gate"]
    assert len(violations) == 3 and "would change owner" in violations[1]["detail"]
    for d in (scrub_dir, enforce_dir):
        ok = subprocess.run([kvh_binary(), "verify-log", str(d)], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr



def test_a_claim_whose_block_another_claim_took_meanwhile_returns_kv_taken():
    # Two requests claim the same unknown block at about the same time: both sort it as dirty
    # and the gate scrubs it for each; the first verdict hands it over, and the second claim
    # must say the block was taken (KVH_ERR_KV_TAKEN, the id named back), never KVH_OK. A
    # large block, fully verified, keeps the first scrub running while the second claim sorts.
    out = run_child(
        KV_PRELUDE
        + """
import threading, time
B = 64 << 20
cache = lib.kvh_malloc(B, 0, STREAM)
kv = layout([cache], B, B, 1)
attempts = []
# The second claim starts after a delay; varied, so that one of them lands inside the first
# claim's scrub on a slow machine and on a fast one.
for k, delay in enumerate([0.02, 0.005, 0.04, 0.01, 0.08, 0.002, 0.03, 0.015]):
    results = {}
    def claimer(req, delay):
        lib.kvh_set_context(b"tenant-a", req.encode(), None)
        time.sleep(delay)
        results[req] = claim(kv, [0])
    first = threading.Thread(target=claimer, args=(f"a{k}", 0.0))
    second = threading.Thread(target=claimer, args=(f"b{k}", delay))
    first.start(); second.start(); first.join(); second.join()
    attempts.append(sorted(results.values()))
    if any(r[0] != 0 for r in results.values()):
        break
out["attempts"] = attempts
out["counters"] = stats()["counters"]
lib.kvh_free(cache, B, 0, STREAM)
lib.kvh_shutdown()
""",
        KVH_FULL_VERIFY="yes",
    )
    attempts = out["attempts"]
    # Each attempt hands the block to both (the claims ran one after the other) or to one,
    # the other told it was taken, with the id.
    for a in attempts:
        assert a in ([[0, [], 0], [0, [], 0]], [[0, [], 0], [7022, [0], 1]]), attempts
    assert attempts[-1] == [[0, [], 0], [7022, [0], 1]], f"no claim was ever told its block was taken: {attempts}"


def test_kvh_malloc_start_up_failure_with_a_broken_stderr_does_not_unwind_into_c():
    # Start-up runs inside kvh_malloc's panic boundary, and says why it failed on stderr
    # without panicking when stderr is a pipe nobody reads (EPIPE: Python ignores SIGPIPE, as
    # servers do): the caller gets NULL and KVH_ERR_CONFIG, and the process goes on.
    out = run_child(
        """
        import os
        r, w = os.pipe(); os.close(r); os.dup2(w, 2)
        out["null"] = lib.kvh_malloc(4096, 0, STREAM) is None
        out["code"] = lib.kvh_last_error()
        """,
        KVH_BATCH_SIZE="0",
    )
    assert out["null"] and out["code"] == 7011, out


def test_kvh_init_reports_the_configuration_error_when_stderr_is_broken():
    # With stderr broken, kvh_init still returns the configuration error and the message
    # naming the bad key (not KVH_ERR_PANIC).
    out = run_child(
        """
        import os
        r, w = os.pipe(); os.close(r); os.dup2(w, 2)
        out["init"] = lib.kvh_init()
        out["msg"] = text(lib.kvh_last_error_message)
        """,
        KVH_BATCH_SIZE="0",
    )
    assert out["init"] == 7011, out
    assert "KVH_BATCH_SIZE" in out["msg"], out




def test_a_forked_child_does_not_use_or_hang_on_the_inherited_allocator():
    # A child forked after kvhygiene started must not use the allocator it inherited (its
    # worker and flusher threads do not exist there, a pool lock may have been held at the
    # fork): it is never handed the parent's pooled block, and kvh_synchronize does not wait
    # for a scrub worker that does not exist. Every call says KVH_ERR_FORKED_CHILD.
    out = run_child(
        """
        import os, signal
        p = lib.kvh_malloc(4096, 0, STREAM)
        lib.kvh_free(p, 4096, 0, STREAM)
        assert lib.kvh_synchronize() == 0
        out["parent_block"] = p
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            signal.alarm(10)  # a hang ends the child with SIGALRM
            q = lib.kvh_malloc(4096, 0, STREAM)
            malloc_code = lib.kvh_last_error()
            if q:
                lib.kvh_free(q, 4096, 0, STREAM)
            rc = lib.kvh_synchronize()
            os.write(w, json.dumps({"q": q, "malloc": malloc_code, "sync": rc}).encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        out["child_status"] = status
        out["child"] = json.loads(os.read(r, 4096) or b"null")
        """
    )
    assert out["child_status"] == 0, f"forked child hung or died (wait status {out['child_status']})"
    assert out["child"]["q"] != out["parent_block"], "the child was handed the parent's pooled block"
    assert out["child"] == {"q": None, "malloc": 7023, "sync": 7023}, out




def test_start_up_errors_keep_their_code_in_every_export(tmp_path):
    # A log that does not open is KVH_ERR_LOG (7018) from every export, not KVH_ERR_CONFIG
    # from some, which would send an operator to the configuration instead of the log.
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    out = run_child(
        """
        out["init"] = lib.kvh_init()
        out["free_checked"] = lib.kvh_free_checked(0x1000, 8, 0, STREAM)
        lib.kvh_free(0x1000, 8, 0, STREAM)
        out["free"] = lib.kvh_last_error()
        out["synchronize"] = lib.kvh_synchronize()
        n = ctypes.c_size_t(0)
        out["stats_json"] = lib.kvh_stats_json(None, 0, ctypes.byref(n))
        """,
        KVH_LOG_DIR=str(not_a_dir / "sub"),
    )
    assert out["init"] == 7018, out
    assert {k: v for k, v in out.items() if k != "init"} == {
        "free_checked": 7018,
        "free": 7018,
        "synchronize": 7018,
        "stats_json": 7018,
    }, out




def test_after_kvh_shutdown_only_clean_pooled_blocks_are_served():
    # After kvh_shutdown no device call is made: a clean pooled block (verified zero) is still
    # served, so teardown code that allocates does not fail; an allocation that needs the
    # device fails with KVH_ERR_SHUTTING_DOWN.
    out = run_child(
        """
        p = lib.kvh_malloc(4096, 0, STREAM)
        ctypes.memset(p, 0xAB, 4096)
        lib.kvh_free(p, 4096, 0, STREAM)
        assert lib.kvh_synchronize() == 0
        lib.kvh_shutdown()
        q = lib.kvh_malloc(4096, 0, STREAM)
        out["pooled"] = q == p and zero(q, 4096)
        out["fresh"] = lib.kvh_malloc(64 << 20, 0, STREAM)
        out["code"] = lib.kvh_last_error()
        """
    )
    assert out == {"pooled": True, "fresh": None, "code": 7016}, out




def test_context_refuses_an_id_with_an_embedded_nul():
    # Ids reach the library as C strings, which end at the first NUL: "acme\\0evil" would be
    # tenant "acme", and two tenants would share one identity (isolation, the KV gate's
    # tenant scope, the log). The package refuses such an id.
    out = run_child(
        f"""
        import sys
        sys.path.insert(0, {PACKAGE!r})
        import kvhygiene
        try:
            with kvhygiene.context(tenant_id="acme\\0evil", request_id="r-1"):
                out["accepted"] = True
        except (kvhygiene.KvhError, ValueError) as e:
            out["accepted"] = False
            out["error"] = str(e)
        """,
        KVH_LIBRARY=library(),
    )
    assert out["accepted"] is False, out


def test_context_errors_name_the_bad_id():
    # The error carries the library's message naming the field ("tenant_id is 129 bytes
    # long ..."), not only the code's generic text.
    out = run_child(
        f"""
        import sys
        sys.path.insert(0, {PACKAGE!r})
        import kvhygiene
        try:
            with kvhygiene.context(tenant_id="x" * 129, request_id="r-1"):
                pass
        except kvhygiene.KvhError as e:
            out["error"] = str(e)
        """,
        KVH_LIBRARY=library(),
    )
    assert "tenant_id" in out["error"], out




def test_a_kv_layout_device_outside_the_c_int_range_is_refused():
    # `device` goes to a C int: ctypes would wrap 2**32 to device 0 and scrub its memory.
    out = run_child(
        f"""
        import sys
        sys.path.insert(0, {PACKAGE!r})
        import kvhygiene
        p = lib.kvh_malloc(4096, 0, STREAM)
        ctypes.memset(p, 0xAB, 4096)
        try:
            layout = kvhygiene.KvLayout([p], 4096, 1, device=2**32)
            kvhygiene.scrub_blocks(layout, [0])
            out["refused"] = False
        except (kvhygiene.KvhError, ValueError) as e:
            out["refused"] = True
        out["untouched"] = ctypes.string_at(p, 4096) == b"\\xab" * 4096
        """,
        KVH_LIBRARY=library(),
    )
    assert out["refused"] and out["untouched"], out


def test_a_child_forked_while_another_thread_starts_kvhygiene_is_marked():
    # glibc runs a fork's prepare handlers with its atfork lock released and does not run, in
    # that fork's child, a child handler registered meanwhile. A thread that starts kvhygiene
    # while the forking thread is in its prepare handlers (here one that takes a while)
    # finishes start-up before the fork copies memory: the child must still be marked (the
    # handler is registered when the library is loaded) and refuse the inherited allocator,
    # neither using it nor hanging on its start-up.
    out = run_child(
        """
        import os, signal, threading, time
        libc = ctypes.CDLL("libc.so.6")
        in_prepare = threading.Event()
        first = [True]
        @ctypes.CFUNCTYPE(None)
        def prepare():
            if first[0]:
                first[0] = False
                in_prepare.set()
                time.sleep(1.0)  # releases the GIL: the other thread starts kvhygiene now
        # pthread_atfork is in libc_nonshared.a; this is what it calls (no DSO: never unloaded).
        assert libc.__register_atfork(prepare, None, None, None) == 0
        def starter():
            in_prepare.wait()
            out["parent_init"] = lib.kvh_init()
        t = threading.Thread(target=starter)
        t.start()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            signal.alarm(10)  # a hang ends the child with SIGALRM
            q = lib.kvh_malloc(4096, 0, STREAM)
            os.write(w, json.dumps({"q": q, "malloc": lib.kvh_last_error()}).encode())
            os._exit(0)
        os.close(w)
        t.join()
        _, status = os.waitpid(pid, 0)
        out["child_status"] = status
        out["child"] = json.loads(os.read(r, 4096) or b"null")
        """
    )
    assert out["parent_init"] == 0, out
    assert out["child_status"] == 0, f"forked child hung or died (wait status {out['child_status']})"
    assert out["child"] == {"q": None, "malloc": 7023}, out


def test_install_reports_a_bad_configuration_before_pytorch_allocates():
    # install() is where a program can handle errors: it starts the allocator (kvh_init), so a
    # bad configuration is reported there, naming the key, not at PyTorch's first CUDA
    # allocation as std::bad_alloc. A stand-in for torch stands in for CUDAPluggableAllocator
    # and change_current_allocator.
    out = run_child(
        f"""
        import sys, types
        sys.path.insert(0, {PACKAGE!r})
        raw = types.SimpleNamespace(set_record_stream_fn=lambda a: None, set_reset_fn=lambda a: None)
        class Pluggable:
            def __init__(self, path, malloc_name, free_name):
                pass
            def allocator(self):
                return raw
        torch = types.ModuleType("torch")
        torch.cuda = types.SimpleNamespace(
            is_initialized=lambda: False,
            device_count=lambda: 1,
            memory_reserved=lambda d: 0,
            memory=types.SimpleNamespace(CUDAPluggableAllocator=Pluggable, change_current_allocator=lambda a: None),
        )
        sys.modules["torch"] = torch
        import kvhygiene
        try:
            kvhygiene.install()
            out["installed"] = True
        except kvhygiene.KvhError as e:
            out["installed"] = False
            out["code"] = e.code
            out["error"] = str(e)
        """,
        KVH_LIBRARY=library(),
        KVH_BATCH_SIZE="0",
    )
    assert out["installed"] is False, out
    assert out["code"] == 7011 and "KVH_BATCH_SIZE" in out["error"], out


def fake_driver_dir(tmp_path) -> str:
    """tests/fake_cuda/fake_libcuda.cpp built as libcuda.so.1 in a directory of its own, for
    LD_LIBRARY_PATH (KVH_BACKEND=cuda without a GPU)."""
    import shutil

    cxx = os.environ.get("CXX", "c++")
    if not shutil.which(cxx):
        pytest.skip(f"no C++ compiler ({cxx}) for the fake CUDA driver")
    d = tmp_path / "driver"
    d.mkdir()
    subprocess.run(
        [cxx, "-shared", "-fPIC", "-std=c++17", "-O1", "-o", str(d / "libcuda.so.1"),
         str(ROOT / "tests/fake_cuda/fake_libcuda.cpp")],
        check=True,
    )
    return str(d)


def test_synchronize_after_kvh_shutdown_reports_a_sticky_backend_error_as_a_backend_error(tmp_path):
    # include/kvhygiene.h, kvh_synchronize: KVH_ERR_BACKEND "when an asynchronous backend
    # error has occurred (sticky)"; after kvh_shutdown, KVH_ERR_SHUTTING_DOWN "when blocks
    # freed since (or left pending then) were not scrubbed". Here no block is left unscrubbed
    # (the failed batch's block was re-scrubbed and released before the shutdown): the only
    # error is the driver's, and it stays KVH_ERR_BACKEND.
    out = run_child(
        """
        drv = ctypes.CDLL("libcuda.so.1")  # the driver instance the library loaded
        p = lib.kvh_malloc(4096, 0, STREAM)
        lib.kvh_free(p, 4096, 0, STREAM)
        drv.fake_cuda_fail_launch(1)  # the free's scrub launch fails (a driver error)
        out["before"] = lib.kvh_synchronize()
        out["pending"] = stats()["accounting"]["pending"]["blocks"]
        lib.kvh_shutdown()
        out["after"] = lib.kvh_synchronize()
        """,
        KVH_BACKEND="cuda",
        LD_LIBRARY_PATH=fake_driver_dir(tmp_path),
    )
    assert out["before"] == 7012 and out["pending"] == 0, out
    assert out["after"] == 7012, f"a sticky driver error after kvh_shutdown is not reported as KVH_ERR_BACKEND: {out}"


def test_package_stats_as_the_first_call_names_the_bad_configuration_key():
    # kvhygiene.stats() may be a program's first call into the library (a health endpoint,
    # a dashboard). When the allocator cannot start, the KvhError it raises says why: the
    # configuration error names the invalid key, as kvh_init's and kvh_malloc's do.
    out = run_child(
        f"""
        import sys
        sys.path.insert(0, {PACKAGE!r})
        import kvhygiene
        try:
            kvhygiene.stats()
            out["raised"] = False
        except kvhygiene.KvhError as e:
            out["raised"] = True
            out["code"] = e.code
            out["error"] = str(e)
        """,
        KVH_LIBRARY=library(),
        KVH_BATCH_SIZE="0",
    )
    assert out["raised"] and out["code"] == 7011, out
    assert "KVH_BATCH_SIZE" in out["error"], out


def test_package_stats_does_not_blame_an_earlier_unrelated_error():
    # A later failed call on the thread (an over-long tenant id) must not become the
    # reason given for the start-up failure: the KvhError of stats() carries the
    # configuration error's code and says the configuration's problem, not the tenant id's.
    out = run_child(
        f"""
        import sys
        sys.path.insert(0, {PACKAGE!r})
        import kvhygiene
        lib = kvhygiene.load()
        out["init"] = lib.kvh_init()  # the start-up, which fails
        out["set"] = lib.kvh_set_context(b"x" * 200, None, None)
        try:
            kvhygiene.stats()
            out["raised"] = False
        except kvhygiene.KvhError as e:
            out["raised"] = True
            out["code"] = e.code
            out["error"] = str(e)
        """,
        KVH_LIBRARY=library(),
        KVH_BATCH_SIZE="0",
    )
    assert out["init"] == 7011 and out["set"] == 7010 and out["raised"] and out["code"] == 7011, out
    assert "KVH_BATCH_SIZE" in out["error"], out


def test_stats_after_a_shutdown_before_start_up_begin_as_the_header_shows():
    # include/kvhygiene.h, kvh_stats_json: after a kvh_shutdown that came before start-up the
    # answer is `{"started":false,"shut_down":true,...}`; src/ffi/runtime.rs puts "started"
    # first in the started answer so that readers can tell the answers apart by their start.
    out = run_child(
        """
        lib.kvh_shutdown()
        out["json"] = text(lib.kvh_stats_json)
        """
    )
    assert out["json"].startswith('{"started":false,"shut_down":true'), out


def test_kvh_oom_throws_says_the_policys_mode_before_and_after_start_up(tmp_path):
    body = """
        throws = ctypes.c_int(7)
        out["rc"] = lib.kvh_oom_throws(ctypes.byref(throws))
        out["throws"] = throws.value
        out["msg"] = text(lib.kvh_last_error_message) if out["rc"] else ""
        out["null_rc"] = lib.kvh_oom_throws(None)
        lib.kvh_free(lib.kvh_malloc(4096, 0, STREAM), 4096, 0, STREAM)  # started
        started = ctypes.c_int(7)
        out["started_rc"] = lib.kvh_oom_throws(ctypes.byref(started))
        out["started"] = started.value
        """
    assert run_child(body, KVH_OOM="throw")["throws"] == 1
    out = run_child(body, KVH_OOM="null")
    assert (out["rc"], out["throws"], out["started_rc"], out["started"]) == (0, 0, 0, 0), out
    assert out["null_rc"] == 7001, out
    policy = tmp_path / "policy.toml"
    policy.write_text('oom = "null"\n')
    # The file's mode, with no KVH_OOM in the environment.
    out = run_child('import os\nos.environ.pop("KVH_OOM")\n' + textwrap.dedent(body), KVH_CONFIG=str(policy))
    assert out["throws"] == 0, out
    # The environment's, over the file's.
    assert run_child(body, KVH_OOM="throw", KVH_CONFIG=str(policy))["throws"] == 1
    # An invalid policy: the key named, the answer left as it was.
    invalid = """
        throws = ctypes.c_int(7)
        out["rc"] = lib.kvh_oom_throws(ctypes.byref(throws))
        out["throws"] = throws.value
        out["msg"] = text(lib.kvh_last_error_message)
        """
    out = run_child(invalid, KVH_OOM="sometimes")
    assert (out["rc"], out["throws"]) == (7011, 7), out
    assert "KVH_OOM" in out["msg"], out
