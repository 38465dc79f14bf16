"""``make bench``: a sidecar hit from Python against its anchors, side by
side in one process run on one machine.

For a 1 KiB state, the median cost of one get:

- RelStorage 4's in-process ``LocalClient`` (anchor: the in-process cache);
- memcached through pymemcache, on a Unix socket (anchor: cross-process);
- Redis through redis-py, on a Unix socket (anchor: cross-process);
- tidecache: ``tidecache.Client.lookup`` of a revision held by a running
  ``tidecached`` (a sidecar hit).

Rounds interleave the contenders (A B C D A B C D ...), each round timing a
batch of gets, so machine noise falls on all of them alike. memcached and
redis-server are installed from Debian's packages when missing (as root).
Writes ``bench-results/python.json``, then rebuilds docs/benchmarks.md.
"""

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "adapters" / "python" / "tests"))

from conftest import Sidecar  # noqa: E402  (the tests' server fixtures)
from conftest import stop_process  # noqa: E402
from conftest import wait_for_socket  # noqa: E402

STATE = os.urandom(1024)
KEYS = 1000
BATCH = 2000
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "25"))


def ensure_binary(name, package):
    if shutil.which(name):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing %s from Debian's packages ..." % package)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return bool(shutil.which(name))


def start(cmd, sock, name):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, p, name)
    return p


def batch_timer(get):
    def run():
        t = time.perf_counter_ns()
        for i in range(BATCH):
            get(i % KEYS)
        return (time.perf_counter_ns() - t) / BATCH / 1000.0  # us per get
    return run


def string_store_timer(set_, get):
    """Seeds KEYS string keys (``k0``...) with STATE through ``set_`` and
    returns the batch timer of ``get`` over them (memcached, Redis)."""
    keys = ["k%d" % k for k in range(KEYS)]
    for key in keys:
        set_(key, STATE)
    assert get(keys[0]) == STATE
    return batch_timer(lambda k: get(keys[k]))


def main():
    results = {"state_bytes": len(STATE), "rounds": ROUNDS, "batch": BATCH, "python": sys.version.split()[0]}
    contenders = {}
    procs = []
    tmp = tempfile.mkdtemp(prefix="tidecache-bench-")
    try:
        from relstorage.cache.local_client import LocalClient
        from relstorage.options import Options
        local = LocalClient(Options(cache_local_mb=64))
        for k in range(KEYS):
            local[(k, 10)] = (STATE, 10)
        assert local.get((0, 10))[0] == STATE
        contenders["relstorage_localclient"] = batch_timer(lambda k: local.get((k, 10)))

        if ensure_binary("memcached", "memcached"):
            from pymemcache.client.base import Client as Memcache
            sock = os.path.join(tmp, "memcached.sock")
            procs.append(start(["memcached", "-s", sock, "-a", "0600", "-m", "64", "-u", "root"], sock, "memcached"))
            mc = Memcache(sock)
            contenders["memcached_pymemcache"] = string_store_timer(mc.set, mc.get)
        else:
            print("memcached not available: skipped")

        if ensure_binary("redis-server", "redis-server"):
            import redis
            sock = os.path.join(tmp, "redis.sock")
            procs.append(start(["redis-server", "--port", "0", "--unixsocket", sock, "--unixsocketperm", "600",
                                "--save", "", "--appendonly", "no"], sock, "redis-server"))
            r = redis.Redis(unix_socket_path=sock)
            contenders["redis_redispy"] = string_store_timer(r.set, r.get)
        else:
            print("redis-server not available: skipped")

        sidecar = Sidecar(tmp, memory_mb=256)
        from tidecache import Client
        tc = Client(sidecar.socket, database="bench", timeout_ms=1000)
        tc.attach(10)
        for k in range(KEYS):
            tc.store(k, 10, None, STATE, 10)
        assert tc.lookup(0, 10) == (10, STATE)
        contenders["tidecache_sidecar_hit"] = batch_timer(lambda k: tc.lookup(k, 10))
        arena = tc.stats()["arena"]
        # Buckets: one 8-byte pointer per 2 KiB of file (core/src/arena/layout.rs),
        # charged to the 1 KiB revisions a full arena holds.
        record = arena["record_bytes"] / arena["entries"]
        full_entries = arena["file_bytes"] / record
        results["arena"] = {
            "entries": arena["entries"],
            "state_bytes": arena["state_bytes"],
            "record_bytes": arena["record_bytes"],
            "record_overhead_per_entry": record - arena["state_bytes"] / arena["entries"],
            "bucket_bytes_per_entry_when_full": (arena["file_bytes"] / 2048 * 8) / full_entries,
        }

        samples = {name: [] for name in contenders}
        for name, run in contenders.items():
            run()  # warm up
        for rnd in range(ROUNDS):
            for name, run in contenders.items():
                samples[name].append(run())
        sidecar.stop()
    finally:
        for p in procs:
            stop_process(p)
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {name: statistics.median(v) for name, v in samples.items()}
    results["median_us"] = medians
    results["samples_us"] = samples
    tc_us = medians["tidecache_sidecar_hit"]
    print()
    print("1 KiB get from Python, median of %d interleaved rounds of %d gets" % (ROUNDS, BATCH))
    print("%-28s %12s %22s" % ("", "us per get", "ratio to tidecache hit"))
    for name, us in medians.items():
        print("%-28s %12.2f %21.2fx" % (name, us, us / tc_us))
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "python.json", "w") as f:
        json.dump(results, f, indent=1)
    print("written to bench-results/python.json")
    subprocess.run([sys.executable, str(ROOT / "bench" / "report.py")], check=True)


if __name__ == "__main__":
    main()
