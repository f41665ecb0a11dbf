"""The metrics exports of the process-wide runtime, through the C ABI on the host backend:
KVH_METRICS_FILE written at start and at exit (by the process that started the runtime only,
never by a forked child), one file per process with {pid}, KVH_METRICS_ADDR served over
loopback (port 0: the bound address is said on stderr), and an address in use leaving the
allocator working. Each test runs in a fresh interpreter.
"""

import re
import socket
import subprocess
import sys

from test_c_abi import PRELUDE, kvh_binary, library, run_child


def sample(text: str, series: str) -> float:
    m = re.search(r"^" + re.escape(series) + r" (\S+)$", text, re.M)
    assert m, f"{series} not in:\n{text}"
    return float(m.group(1))


def test_metrics_file_is_written_at_exit_with_the_final_counters(tmp_path):
    prom = tmp_path / "kvh.prom"
    # An hour between periodic writes: after the write at start (awaited below, before the
    # allocations), the counts can only reach the file through the write at exit.
    out = run_child(
        f"""
        import os, time
        assert lib.kvh_init() == 0  # starts the runtime
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


def test_a_process_that_fails_closed_writes_the_snapshot_counting_its_failure_first(tmp_path):
    # Under KVH_FAILURE_MODE=abort the process aborts without its exit handler. Its last
    # snapshot is written before the abort, so the failure shows in the metrics (the alerts,
    # `kvh metrics --fail-on-security`, `kvh gate`), not only in the forensic log.
    prom = tmp_path / "kvh.prom"
    body = f"""
import os, time
assert lib.kvh_init() == 0
deadline = time.time() + 10
while not os.path.exists({str(prom)!r}):
    assert time.time() < deadline, "no metrics file written at start"
    time.sleep(0.01)
p = lib.kvh_malloc(4096, 0, STREAM)
ctypes.memset(p, 0x33, 4096)
lib.kvh_inject_fault(1)
lib.kvh_free_checked(p, 4096, 0, STREAM)
print("KVH-CHILD-SURVIVED", flush=True)
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("KVH_")}
    env.update(KVH_BACKEND="host", KVH_OOM="null", KVH_FAILURE_MODE="abort", KVH_METRICS_FILE=str(prom),
               KVH_METRICS_INTERVAL_MS="3600000")
    code = f"LIB = {library()!r}\n" + PRELUDE + body
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode != 0 and "KVH-CHILD-SURVIVED" not in child.stdout, child.stdout + child.stderr
    text = prom.read_text()
    assert sample(text, 'kvh_verifications_total{result="failed"}') == 1, text
    failed = subprocess.run([kvh_binary(), "metrics", "--file", str(prom), "--max-age", "600", "--fail-on-security"],
                            capture_output=True, text=True)
    assert failed.returncode == 1, failed.stdout + failed.stderr


def test_http_exporter_serves_the_live_counters(tmp_path):
    out = run_child(
        """
        import os, re, urllib.request, urllib.error
        # The runtime starts on the first call; its stderr (the bound address) goes to a pipe.
        r, w = os.pipe()
        saved = os.dup(2)
        os.dup2(w, 2)
        try:
            for _ in range(3):
                p = lib.kvh_malloc(1024, 0, STREAM)
                lib.kvh_free(p, 1024, 0, STREAM)
        finally:
            os.dup2(saved, 2)
            os.close(w)
        said = os.read(r, 65536).decode()
        m = re.search(r"metrics HTTP exporter listening on (127\\.0\\.0\\.1:\\d+)", said)
        assert m, said
        base = "http://" + m.group(1)
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
        KVH_METRICS_ADDR="127.0.0.1:0",
    )
    assert out["type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert sample(out["metrics"], "kvh_allocations_total") == 3
    assert sample(out["metrics"], "kvh_log_enabled") == 0
    # The anomaly detector is on by default: its series are there, at zero, before it fires.
    assert sample(out["metrics"], "kvh_anomaly_enabled") == 1
    assert sample(out["metrics"], 'kvh_anomalies_total{signal="invalid_free"}') == 0
    assert out["stats"]["anomaly"]["by_signal"]["residue"] == 0
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


def test_a_forked_child_does_not_overwrite_the_parent_s_file(tmp_path):
    prom = tmp_path / "kvh.prom"
    out = run_child(
        f"""
        import os, time
        assert lib.kvh_init() == 0  # starts the runtime, which writes the file
        deadline = time.time() + 60
        while not os.path.exists({str(prom)!r}):
            assert time.time() < deadline, "no metrics file written at start"
            time.sleep(0.01)
        for _ in range(2):
            p = lib.kvh_malloc(4096, 0, STREAM)
            lib.kvh_free(p, 4096, 0, STREAM)
        assert lib.kvh_synchronize() == 0
        pid = os.fork()
        if pid == 0:
            # The child exits normally: its exit handlers (the runtime's among them) run.
            sys.exit(0)
        deadline = time.time() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.time() < deadline, "the forked child did not exit"
            time.sleep(0.02)
        out["child_status"] = status
        out["after_child"] = open({str(prom)!r}).read() if os.path.exists({str(prom)!r}) else ""
        out["names"] = sorted(os.listdir({str(tmp_path)!r}))
        """,
        KVH_METRICS_FILE=str(prom),
        KVH_METRICS_INTERVAL_MS="3600000",
    )
    assert out["child_status"] == 0
    # The file still holds the snapshot written at start (0 allocations), not the child's (2).
    assert sample(out["after_child"], "kvh_allocations_total") == 0
    assert out["names"] == ["kvh.prom"]
    # The parent's exit wrote its own final counts.
    assert sample(prom.read_text(), "kvh_allocations_total") == 2


def test_pid_in_the_file_name_gives_a_file_per_process_with_a_pid_label(tmp_path):
    out = run_child(
        """
        import os
        p = lib.kvh_malloc(4096, 0, STREAM)
        lib.kvh_free(p, 4096, 0, STREAM)
        lib.kvh_synchronize()
        out["pid"] = os.getpid()
        """,
        KVH_METRICS_FILE=str(tmp_path / "kvh-{pid}.prom"),
        KVH_METRICS_INTERVAL_MS="3600000",
    )
    pid = out["pid"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"kvh-{pid}.prom"]
    text = (tmp_path / f"kvh-{pid}.prom").read_text()
    assert sample(text, f'kvh_allocations_total{{pid="{pid}"}}') == 1
    samples = [l for l in text.splitlines() if l and not l.startswith("#")]
    assert samples and all(l.split("{", 1)[1].startswith(f'pid="{pid}"') for l in samples), text


def test_build_info_carries_the_policy_digest_of_the_start_record_and_kvh_config(tmp_path):
    import json

    prom, log = tmp_path / "kvh.prom", tmp_path / "log"
    env = {"KVH_METRICS_FILE": str(prom), "KVH_LOG_DIR": str(log), "KVH_BATCH_SIZE": "16"}
    out = run_child(
        """
        assert lib.kvh_init() == 0  # starts the runtime
        out["stats"] = stats()
        lib.kvh_shutdown()
        """,
        **env,
    )
    m = re.search(r'^kvh_build_info\{[^}]*config_digest="([0-9a-f]{64})"[^}]*\} 1$', prom.read_text(), re.M)
    assert m, prom.read_text()
    digest = m.group(1)
    assert out["stats"]["config_digest"] == digest
    starts = [json.loads(l) for f in log.glob("kvh-*.jsonl") for l in f.read_text().splitlines()]
    assert [r["config_digest"] for r in starts if r["kind"] == "start"] == [digest]
    # `kvh config` in the same environment names the same digest (run_child's fixed variables
    # included: they are part of the policy).
    child_env = {"KVH_BACKEND": "host", "KVH_OOM": "null", "KVH_BATCH_MAX_DELAY_US": "100", **env}
    cfg = subprocess.run([kvh_binary(), "config", "--json"], env={"PATH": "/usr/bin:/bin", **child_env},
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stderr
    assert json.loads(cfg.stdout)["config_digest"] == digest


def test_after_kvh_shutdown_the_metrics_file_is_no_longer_rewritten(tmp_path):
    # kvh_shutdown ends scrubbing: the file gets its last snapshot, then ages, so that
    # `kvh gate` takes the process out of rotation instead of reading it as healthy.
    prom = tmp_path / "kvh.prom"
    out = run_child(
        f"""
        import os, time
        assert lib.kvh_init() == 0  # starts the runtime
        lib.kvh_shutdown()
        first = os.stat({str(prom)!r}).st_mtime_ns
        time.sleep(0.5)  # five periodic intervals
        out["rewritten"] = os.stat({str(prom)!r}).st_mtime_ns != first
        """,
        KVH_METRICS_FILE=str(prom),
        KVH_METRICS_INTERVAL_MS="100",
    )
    assert out["rewritten"] is False, "the snapshot kept being refreshed after kvh_shutdown"


def test_after_kvh_shutdown_the_metrics_file_is_not_rewritten_at_exit(tmp_path):
    # include/kvhygiene.h, kvh_shutdown: "The metrics file is written once more and then no
    # longer (it goes stale, which `kvh gate` evicts on)". The process exiting later, after
    # kvh_shutdown, must leave that last snapshot as it was: a fresh one written at exit
    # would read as a healthy, current process to `kvh gate` for another staleness window.
    prom = tmp_path / "kvh.prom"
    out = run_child(
        f"""
        import os, time
        assert lib.kvh_init() == 0  # starts the runtime
        lib.kvh_shutdown()
        out["mtime"] = os.stat({str(prom)!r}).st_mtime_ns
        out["text"] = open({str(prom)!r}).read()
        time.sleep(1.1)  # the snapshot's timestamp (seconds) would differ if written again
        """,
        KVH_METRICS_FILE=str(prom),
        KVH_METRICS_INTERVAL_MS="3600000",
    )
    assert prom.stat().st_mtime_ns == out["mtime"], "the metrics file was written again at exit, after kvh_shutdown"
    assert prom.read_text() == out["text"], "the snapshot changed at exit, after kvh_shutdown"
