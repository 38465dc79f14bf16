"""Host memory for one working set read by 8 worker processes: tidecache's
arena (one copy, mapped by every worker) against one RelStorage
``LocalClient`` per worker (8 copies).

Memory is the sum of the proportional set sizes (``Pss`` in
``/proc/PID/smaps_rollup``: a page shared by n processes counts 1/n in
each) of every process involved, after the working set was read, minus the
same sum before: the sidecar before the states were stored, each worker
after its imports and attach, before reading. Divided by the bytes of
state in the working set.

Writes ``bench-results/memory.json``. Part of ``make bench``.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "adapters" / "python" / "tests"))
from conftest import Sidecar, stop_process  # noqa: E402  (the tests' server fixtures)

WORKERS = 8
OIDS = 20_000
STATE = 2048

WORKER = r"""
import os, random, sys
kind, socket = sys.argv[1], sys.argv[2]
oids, size = int(sys.argv[3]), int(sys.argv[4])
if kind == "tidecache":
    from tidecache import Client
    c = Client(socket, database="memory", timeout_ms=2000)
    if c.attach(1) == "prove":  # the benchmark's own history: nothing to check
        c.attach(1, c.proof[0])
    read = lambda oid: c.lookup(oid, 1)
else:
    from relstorage.cache.local_client import LocalClient
    from relstorage.options import Options
    local = LocalClient(Options(cache_local_mb=oids * size * 2 / 1e6, cache_local_compression="none"))
    rng = random.Random(7)
    states = None
print("ready", flush=True)
sys.stdin.readline()
if kind == "tidecache":
    n = sum(1 for oid in range(oids) if read(oid) is not None)
else:
    rng = random.Random(7)
    for oid in range(oids):
        local[(oid, 1)] = (rng.randbytes(size), 1)
    n = sum(1 for oid in range(oids) if local.get((oid, 1)) is not None)
print("read %d" % n, flush=True)
sys.stdin.readline()
"""


def pss_kib(pid):
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss for %d" % pid)


def run(kind, socket, extra_pids=()):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, kind, socket, str(OIDS), str(STATE)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(WORKERS)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        before = sum(pss_kib(p.pid) for p in procs)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            line = p.stdout.readline().strip()
            assert line == "read %d" % OIDS, line
        after = sum(pss_kib(p.pid) for p in procs) + sum(pss_kib(pid) for pid in extra_pids)
        return before, after
    finally:
        for p in procs:
            try:
                p.stdin.write("done\n")
                p.stdin.flush()
            except BrokenPipeError:
                pass
            p.wait(timeout=30)


def main():
    state_bytes = OIDS * STATE
    results = {"workers": WORKERS, "oids": OIDS, "state_bytes_each": STATE, "state_bytes": state_bytes}
    with tempfile.TemporaryDirectory(prefix="tidecache-memory-") as tmp:
        sidecar = Sidecar(tmp, memory_mb=128)
        try:
            from tidecache import Client
            sidecar_before = pss_kib(sidecar.proc.pid)
            c = Client(sidecar.socket, database="memory", timeout_ms=2000)
            c.attach(1)
            rng = random.Random(7)
            for oid in range(OIDS):
                c.store(oid, 1, None, rng.randbytes(STATE), 1)
            before, after = run("tidecache", sidecar.socket, [sidecar.proc.pid])
            total = (after - before - sidecar_before) * 1024
            results["tidecache"] = {"bytes": total, "ratio": total / state_bytes}
            c.close()
        finally:
            sidecar.stop()
        before, after = run("localclient", "-")
        total = (after - before) * 1024
        results["relstorage_localclient"] = {"bytes": total, "ratio": total / state_bytes}
    print("%d workers reading %d states of %d bytes (%.1f MB):" % (WORKERS, OIDS, STATE, state_bytes / 1e6))
    for k in ("tidecache", "relstorage_localclient"):
        print("  %-24s %8.1f MB  %5.2fx the state bytes" % (k, results[k]["bytes"] / 1e6, results[k]["ratio"]))
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "memory.json").write_text(json.dumps(results, indent=1))
    print("written to bench-results/memory.json")


if __name__ == "__main__":
    main()
