"""``make bench``: host memory for the cached states of RelStorage worker
processes, 1 worker against 8 (issue 9). Modelled on bench/memory.py,
with real ZODB worker processes over RelStorage instead of bare caches.

On one host (bench/zodbhost.py ``RelStorageHost``: RelStorage over SQLite
by default, or PostgreSQL; and a ``tidecached``), a database with a
working set of ``--objects`` objects of about ``--state-bytes`` bytes
(less than RelStorage's default local cache of 10 MB, so that a plain
worker holds all of it). Three runs:

- ``nocache`` (the anchor): plain ``<relstorage>`` with ``cache-local-mb
  0``: what reading costs a worker without any cache of states (ZODB's
  object cache, ghosts, RelStorage's index of which tid each oid has,
  Python's allocator); subtracted from the two contenders;
- ``relstorage``: plain ``<relstorage>`` with its default local cache
  (``cache-local-mb`` 10): each worker keeps its own copy;
- ``tidecache``: the same section with ``cache-local-mb 0`` (no
  process-local copy) inside ``<tidecache>``: the states live once, in the
  sidecar's arena, which every worker maps.

For N = 1 and N = 8 workers, per contender (the sidecar restarted on a new
arena before each tidecache run): N worker processes open the database
(imports, storage, ``DB``, a connection: then they report ready); the sum
of the proportional set sizes (``Pss`` of ``/proc/PID/smaps_rollup``, a
page shared by n processes counts 1/n in each) of the workers and of the
sidecar is taken; the workers read every object of the working set
(transactions of 100 loads, a ZODB object cache of 100 objects emptied
after each, then ``gc.collect()``); for tidecache, once every worker is
done, until the sidecar holds a revision of every object (its stores are
asynchronous); the same sum is taken again. Host memory is the
difference; the memory for cached states is a contender's host memory
minus the anchor's with the same number of workers. The figure: memory
for cached states with 8 workers over that with 1 (goal: at most 1.1x for
tidecache; RelStorage: about 8x), and each over the working set's state
bytes. The raw host memory is reported beside it.

Writes ``bench-results/rs_memory.json``, prints a table.

    rs_memory.py [--backend sqlite|postgresql] [--objects 4000] [--state-bytes 2048]
                 [--workers 1 8] [--output PATH]
"""

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from zodbhost import RelStorageHost  # noqa: E402

PER_TXN = 100
CONTENDERS = ("nocache", "relstorage", "tidecache")

WORKER = r"""
import gc, json, sys
import transaction, ZODB, ZODB.config
from ZODB.utils import p64
conf, oids_path, per_txn = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(oids_path) as f:
    oids = [p64(o) for o in json.load(f)]
with open(conf) as f:
    storage = ZODB.config.storageFromString(f.read())
db = ZODB.DB(storage, cache_size=per_txn)
tm = transaction.TransactionManager()
conn = db.open(tm)
tm.begin()
conn.root()
tm.abort()
gc.collect()
print("ready", flush=True)
sys.stdin.readline()
for i in range(0, len(oids), per_txn):
    tm.begin()
    for oid in oids[i:i + per_txn]:
        conn.get(oid)._p_activate()
    tm.abort()
    conn.cacheMinimize()
gc.collect()
local = getattr(storage, "_cache", None)
stats = {"relstorage_cache": {k: v for k, v in local.stats().items() if k in ("hits", "misses", "sets", "bytes", "len")}
         if local is not None else None,
         "tidecache": {k: v for k, v in storage.cache_stats().items() if k in ("hits", "misses", "stores")}
         if hasattr(storage, "cache_stats") else None}
print("read " + json.dumps(stats), flush=True)
sys.stdin.readline()
conn.close()
db.close()
"""


def pss_kib(pid):
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss for %d" % pid)


def populate(host, objects, state_bytes):
    """The working set, written through plain RelStorage; its oids (ints)."""
    import transaction
    import ZODB
    from BTrees.IOBTree import IOBTree
    from persistent.mapping import PersistentMapping
    from ZODB.utils import u64

    db = ZODB.DB(host.open_storage("memory"))
    try:
        rnd = random.Random(5)
        with db.transaction() as conn:
            conn.root()["memory"] = IOBTree()
        for start in range(0, objects, 1000):
            with db.transaction() as conn:
                tree = conn.root()["memory"]
                for i in range(start, min(objects, start + 1000)):
                    tree[i] = PersistentMapping(data=rnd.randbytes(state_bytes))
        with db.transaction() as conn:
            oids = [u64(v._p_oid) for v in conn.root()["memory"].values()]
        transaction.abort()
        return oids
    finally:
        db.close()


def sidecar_entries(host):
    return host.sidecar_stats()["total"]["entries"]


def run(host, conf, oids_path, n, objects, cached):
    """``n`` workers read the working set; ``(memory bytes, worker stats)``."""
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, conf, oids_path, str(PER_TXN)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        for p in procs:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise SystemExit("a worker did not start (said %r)" % line)
        extra = [host.sidecar.pid] if cached else []
        before = sum(pss_kib(p.pid) for p in procs) + sum(pss_kib(pid) for pid in extra)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        stats = []
        for p in procs:
            line = p.stdout.readline().strip()
            if not line.startswith("read "):
                raise SystemExit("a worker failed (said %r)" % line)
            stats.append(json.loads(line[5:]))
        if cached:
            # The workers' stores reach the sidecar asynchronously: wait (with
            # a bound) until it holds a revision of every object.
            deadline = time.monotonic() + 30
            while sidecar_entries(host) < objects and time.monotonic() < deadline:
                time.sleep(0.05)
        after = sum(pss_kib(p.pid) for p in procs) + sum(pss_kib(pid) for pid in extra)
        return (after - before) * 1024, stats
    finally:
        for p in procs:
            try:
                p.stdin.write("done\n")
                p.stdin.flush()
            except BrokenPipeError:
                pass
        for p in procs:
            p.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="postgresql", choices=["postgresql", "sqlite"])
    ap.add_argument("--objects", type=int, default=4000)
    ap.add_argument("--state-bytes", type=int, default=2048)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--output", default=str(ROOT / "bench-results" / "rs_memory.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    state_bytes = args.objects * args.state_bytes
    results = {"backend": args.backend, "objects": args.objects, "state_bytes_each": args.state_bytes,
               "state_bytes": state_bytes, "workers": args.workers, "contenders": {}}
    host = RelStorageHost(args.backend, databases=("memory",), prefix="tidecache-rsmemory-")
    try:
        oids = populate(host, args.objects, args.state_bytes)
        oids_path = os.path.join(host.dir, "oids.json")
        with open(oids_path, "w") as f:
            json.dump(oids, f)
        confs = {"nocache": host.storage_zconfig("memory", cache_local_mb=0),
                 "relstorage": host.storage_zconfig("memory"),
                 "tidecache": host.storage_zconfig("memory", tidecache=True, cache_local_mb=0)}
        results["zconfig"] = confs
        for c in CONTENDERS:
            path = os.path.join(host.dir, "%s.conf" % c)
            with open(path, "w") as f:
                f.write(confs[c])
            per_n = results["contenders"][c] = {}
            for n in args.workers:
                if c == "tidecache":
                    host.restart_sidecar()
                mem, stats = run(host, path, oids_path, n, args.objects, c == "tidecache")
                per_n[str(n)] = {"bytes": mem, "ratio_to_state_bytes": mem / state_bytes, "workers": stats}
                if c == "tidecache":
                    per_n[str(n)]["sidecar_entries"] = sidecar_entries(host)
                print("  %s, %d workers: %.1f MB" % (c, n, mem / 1e6), flush=True)
    finally:
        host.stop()
    lo, hi = str(min(args.workers)), str(max(args.workers))
    anchor = results["contenders"]["nocache"]
    for c in CONTENDERS[1:]:
        r = results["contenders"][c]
        for n in args.workers:
            net = r[str(n)]["bytes"] - anchor[str(n)]["bytes"]
            r[str(n)]["cached_state_bytes"] = net
            r[str(n)]["cached_ratio_to_state_bytes"] = net / state_bytes
        r["ratio_%s_to_%s" % (hi, lo)] = r[hi]["cached_state_bytes"] / r[lo]["cached_state_bytes"]
    results["elapsed_s"] = time.perf_counter() - started
    print()
    print("memory for cached states (host memory: sum of Pss of the workers and the sidecar, minus the "
          "anchor's), %d states of %d bytes (%.1f MB), RelStorage/%s"
          % (args.objects, args.state_bytes, state_bytes / 1e6, args.backend))
    print("%-12s %s %10s" % ("contender", " ".join("%26s" % ("%s workers (raw)" % n) for n in args.workers),
                             "%s / %s" % (hi, lo)))
    for c in CONTENDERS:
        r = results["contenders"][c]
        cells = []
        for n in args.workers:
            x = r[str(n)]
            if c == "nocache":
                cells.append("%26s" % ("- (%.1f MB)" % (x["bytes"] / 1e6)))
            else:
                cells.append("%26s" % ("%.1f MB %.2fx (%.1f MB)" % (x["cached_state_bytes"] / 1e6,
                                                                      x["cached_ratio_to_state_bytes"],
                                                                      x["bytes"] / 1e6)))
        ratio = r.get("ratio_%s_to_%s" % (hi, lo))
        print("%-12s %s %10s" % (c, " ".join(cells), "-" if ratio is None else "%.2fx" % ratio))
    out = pathlib.Path(args.output)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("%.0f s in all; written to %s" % (results["elapsed_s"], out))


if __name__ == "__main__":
    main()
