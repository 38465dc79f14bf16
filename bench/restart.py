"""First hit after ``kill -9`` and a restart on a 1 GiB arena file.

A sidecar with ``--memory-mb 1024`` is filled to 90% with 4 KiB states,
killed with SIGKILL, and started again on the same ``--cache-file``. The
figure is the time from starting the new process to the first hit a fresh
client gets (connect, Hello, map the file, attach, look up), beside the
anchor: the same steps against a sidecar started on a new, empty file (a
miss, since it holds nothing). Also the time the background verification
of the re-attached file took (its log line).

Writes ``bench-results/restart.json``. Part of ``make bench``.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "adapters" / "python" / "tests"))
from conftest import tidecached_binary  # noqa: E402

MEMORY_MB = 1024
STATE = 4096


def start(socket, cache_file, log):
    return subprocess.Popen([tidecached_binary(), "serve", "--socket", socket, "--cache-file", cache_file,
                             "--memory-mb", str(MEMORY_MB)], stderr=log)


def first_answer(socket, proc, oid, view):
    """Seconds from now until a new client gets an answer for ``oid``."""
    from tidecache import Client
    t0 = time.perf_counter()
    while not os.path.exists(socket):
        if proc.poll() is not None:
            raise RuntimeError("tidecached exited")
        time.sleep(0.001)
    while True:
        c = Client(socket, database="restart", timeout_ms=2000)
        try:
            if c.attach(view) == "prove":  # the benchmark's own history: nothing to check
                c.attach(view, c.proof[0])
            hit = c.lookup(oid, view)
            return time.perf_counter() - t0, hit is not None
        except Exception:
            time.sleep(0.001)
        finally:
            c.close()


def main():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    results = {"memory_mb": MEMORY_MB, "state_bytes_each": STATE}
    with tempfile.TemporaryDirectory(prefix="tidecache-restart-", dir=base) as tmp:
        socket, cache_file = os.path.join(tmp, "s.sock"), os.path.join(tmp, "cache.arena")
        log = open(os.path.join(tmp, "log"), "ab")
        # Anchor: a cold start on a new file.
        t0 = time.perf_counter()
        proc = start(socket, cache_file, log)
        cold, cold_hit = first_answer(socket, proc, 1, 1)
        assert not cold_hit
        results["cold_start_first_answer_s"] = cold + (time.perf_counter() - t0 - cold)
        # Fill it.
        from tidecache import Client
        c = Client(socket, database="restart", timeout_ms=5000)
        if c.attach(1) == "prove":  # the anchor attached first: the same history
            c.attach(1, c.proof[0])
        assert c.attached
        state = os.urandom(STATE)
        n, t = 0, time.perf_counter()
        target = MEMORY_MB * (1 << 20) * 9 // 10
        while True:
            for oid in range(n, n + 4096):
                c.store_later(oid, 1, None, state, 1)
            n += 4096
            c.wait_for_stores()
            if c.stats()["arena"]["state_bytes"] >= target:
                break
        arena = c.stats()["arena"]
        results["filled"] = {"entries": arena["entries"], "state_bytes": arena["state_bytes"],
                             "seconds": time.perf_counter() - t}
        c.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Restart on the same file.
        t0 = time.perf_counter()
        proc = start(socket, cache_file, log)
        warm, warm_hit = first_answer(socket, proc, n - 1, 1)
        results["warm_restart_first_hit_s"] = warm
        assert warm_hit, "no hit after the restart"
        deadline = time.time() + 120
        text = ""
        while "reopened arena verified" not in text and time.time() < deadline:
            time.sleep(0.1)
            text = open(os.path.join(tmp, "log"), errors="replace").read()
        m = re.search(r"re-attached the arena file.*?ms=(\d+)", text)
        if m:
            results["reattach_s"] = int(m.group(1)) / 1000
        m = re.search(r"reopened arena verified.*?records=(\d+).*?ms=(\d+)", text)
        if m:
            results["verification"] = {"records": int(m.group(1)), "seconds": int(m.group(2)) / 1000}
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        log.close()
    print("1 GiB arena, %d revisions of %d bytes:" % (results["filled"]["entries"], STATE))
    print("  cold start, first answer (a miss):   %.3f s" % results["cold_start_first_answer_s"])
    print("  after kill -9, first hit:            %.3f s (re-attaching the file: %.3f s)"
          % (results["warm_restart_first_hit_s"], results.get("reattach_s", float("nan"))))
    if "verification" in results:
        print("  background verification of %d records: %.2f s"
              % (results["verification"]["records"], results["verification"]["seconds"]))
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "restart.json").write_text(json.dumps(results, indent=1))
    print("written to bench-results/restart.json")


if __name__ == "__main__":
    main()
