"""``make bench``: a new worker's first 1,000 requests on a warm RelStorage
host (issue 9). Modelled on bench/latestart.py.

On one host (bench/zodbhost.py ``RelStorageHost``: RelStorage over
PostgreSQL from bench/dbservers.py, or over SQLite; and a ``tidecached``),
a database with a working set of ``--objects`` objects of about
``STATE_BYTES`` bytes. Three contenders, each with its own ZConfig
section over the same database:

- ``relstorage``: plain ``<relstorage>`` with its defaults (a process-local
  cache of 10 MB, nothing kept across processes);
- ``relstorage-persistent``: the same with ``cache-local-dir`` (RelStorage's
  persistent cache: each process writes its local cache to an SQLite file
  in that directory when it closes, and a new process reads it and
  validates it against the database when it opens);
- ``tidecache``: the plain section inside ``<tidecache>`` on the host's
  sidecar.

For each contender, per repeat (contenders interleaved, ``--repeats``):

1. **warm the host**: ``--warm-workers`` worker processes open the
   database with the contender's configuration, read every object of the
   working set once, and exit (closing their storages: the persistent
   cache is written then). For tidecache the sidecar is restarted on a new
   arena before, so that the warm workers fill it (not a previous
   repeat).
2. **the new worker**: a new process (Python and its modules imported
   before the clock starts) opens the database (``ZODB.config``, then
   ``ZODB.DB``) and reads ``--requests`` objects of the working set, each
   a storage load (distinct objects, a transaction per 100, the pickle
   cache emptied after each). Timed: the open, and the reads.

The figure is the new worker's time from the start of the open to its
last read answered, the median of the repeats; the ratio is each
RelStorage contender's over tidecache's. Goal (issue 9): at least 5x
faster than RelStorage (with and without its persistent cache).

Writes ``bench-results/rs_newworker.json``, prints a table.

    rs_newworker.py [--backends postgresql sqlite] [--objects 10000] [--requests 1000]
                    [--warm-workers 2] [--repeats 3] [--profile CONTENDER] [--output PATH]

``--profile CONTENDER`` runs the new worker of that contender under
cProfile once more after the figures and prints its top functions.
"""

import argparse
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from zodbhost import RelStorageHost  # noqa: E402

STATE_BYTES = 300
PER_TXN = 100  # loads per transaction of the readers
CONTENDERS = ("relstorage", "relstorage-persistent", "tidecache")


def contender_zconfig(host, contender, cache_dir):
    """ZConfig text of ``contender``'s storage over the host's database."""
    if contender == "relstorage":
        return host.storage_zconfig("newworker")
    if contender == "relstorage-persistent":
        return host.storage_zconfig("newworker", cache_local_dir=cache_dir)
    return host.storage_zconfig("newworker", tidecache=True)


def populate(host, objects):
    """Writes the working set through plain RelStorage; its oids (ints)."""
    import transaction
    import ZODB
    from BTrees.IOBTree import IOBTree
    from persistent.mapping import PersistentMapping
    from ZODB.utils import u64

    db = ZODB.DB(host.open_storage("newworker"))
    try:
        rnd = random.Random(9)
        with db.transaction() as conn:
            tree = conn.root()["newworker"] = IOBTree()
        for start in range(0, objects, 1000):
            with db.transaction() as conn:
                tree = conn.root()["newworker"]
                for i in range(start, min(objects, start + 1000)):
                    tree[i] = PersistentMapping(data=rnd.randbytes(STATE_BYTES), n=i)
        with db.transaction() as conn:
            oids = [u64(v._p_oid) for v in conn.root()["newworker"].values()]
        transaction.abort()
        return oids
    finally:
        db.close()


# -- the worker processes -----------------------------------------------------

WORKER = r"""
import json, sys, time
import transaction, ZODB, ZODB.config
from ZODB.utils import p64
# What opening imports and loads, before the clock starts: RelStorage, its
# adapters and their drivers, tidecache's adapter, ZConfig's storage schema.
import relstorage.storage, relstorage.adapters.sqlite.adapter, relstorage.adapters.postgresql.adapter
import relstorage.adapters.sqlite.drivers, relstorage.adapters.postgresql.drivers.psycopg2
import psycopg2, psycopg2.extensions, psycopg2.extras
try:
    import tidecache, tidecache.relstorage
except ImportError:
    pass
ZODB.config.getStorageSchema()
conf, oids_path, out_path, per_txn, profile = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
with open(conf) as f:
    text = f.read()
with open(oids_path) as f:
    oids = [p64(o) for o in json.load(f)]

def work():
    t0 = time.perf_counter()
    storage = ZODB.config.storageFromString(text)
    db = ZODB.DB(storage, cache_size=per_txn * 2)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    opened = time.perf_counter()
    for i in range(0, len(oids), per_txn):
        tm.begin()
        for oid in oids[i:i + per_txn]:
            conn.get(oid)._p_activate()
        tm.abort()
        conn.cacheMinimize()
    done = time.perf_counter()
    stats = storage.cache_stats() if hasattr(storage, "cache_stats") else None
    local = getattr(storage, "_cache", None)
    local = {k: v for k, v in local.stats().items() if k in ("hits", "misses")} if local is not None else None
    conn.close()
    db.close()
    return {"open_s": opened - t0, "read_s": done - opened, "total_s": done - t0, "loads": len(oids),
            "tidecache": {k: stats[k] for k in ("hits", "misses", "joined") if k in stats} if stats else None,
            "relstorage_cache": local}

if profile == "profile":
    import cProfile, io, pstats
    prof = cProfile.Profile()
    result = prof.runcall(work)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
    result["profile"] = s.getvalue()
else:
    result = work()
with open(out_path, "w") as f:
    json.dump(result, f)
"""


def run_worker(tmp, conf_path, oids, tag, profile=False):
    """One worker process reading ``oids``; its result."""
    oids_path = os.path.join(tmp, "oids-%s.json" % tag)
    out_path = os.path.join(tmp, "out-%s.json" % tag)
    with open(oids_path, "w") as f:
        json.dump(oids, f)
    subprocess.run([sys.executable, "-c", WORKER, conf_path, oids_path, out_path, str(PER_TXN),
                    "profile" if profile else "-"], check=True, timeout=600)
    with open(out_path) as f:
        return json.load(f)


def warm(tmp, conf_path, oids, workers, tag):
    """``workers`` processes read every object, side by side, and exit."""
    procs = []
    for n in range(workers):
        oids_path = os.path.join(tmp, "warm-oids-%s-%d.json" % (tag, n))
        with open(oids_path, "w") as f:
            json.dump(oids, f)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, conf_path, oids_path,
                                       os.path.join(tmp, "warm-out-%s-%d.json" % (tag, n)), str(PER_TXN), "-"]))
    for p in procs:
        if p.wait(timeout=600) != 0:
            raise SystemExit("a warm worker failed with exit code %d" % p.returncode)


def backend_run(backend, args):
    """Every contender's repeats on ``backend``; the results."""
    host = RelStorageHost(backend, databases=("newworker",), prefix="tidecache-newworker-")
    try:
        tmp = host.dir
        oids = populate(host, args.objects)
        confs = {}
        for c in CONTENDERS:
            cache_dir = os.path.join(tmp, "rs-cache-dir")
            os.makedirs(cache_dir, exist_ok=True)
            confs[c] = os.path.join(tmp, "%s.conf" % c)
            with open(confs[c], "w") as f:
                f.write(contender_zconfig(host, c, cache_dir))
        runs = {c: [] for c in CONTENDERS}
        rnd = random.Random(11)
        for rep in range(args.repeats):
            for c in CONTENDERS:
                if c == "tidecache":
                    host.restart_sidecar()
                warm(tmp, confs[c], oids, args.warm_workers, "%s-%d" % (c, rep))
                sample = rnd.sample(oids, args.requests)
                r = run_worker(tmp, confs[c], sample, "%s-%d" % (c, rep))
                runs[c].append(r)
                print("  %s, %s, repeat %d: open %.1f ms, %d reads %.1f ms"
                      % (backend, c, rep + 1, r["open_s"] * 1000, args.requests, r["read_s"] * 1000), flush=True)
        out = {"contenders": {}}
        for c in CONTENDERS:
            out["contenders"][c] = {
                "runs": runs[c],
                "total_s": statistics.median(r["total_s"] for r in runs[c]),
                "open_s": statistics.median(r["open_s"] for r in runs[c]),
                "read_s": statistics.median(r["read_s"] for r in runs[c]),
            }
        tc = out["contenders"]["tidecache"]
        for c in CONTENDERS:
            if c != "tidecache":
                r = out["contenders"][c]
                r["ratio_total"] = r["total_s"] / tc["total_s"]
                r["ratio_read"] = r["read_s"] / tc["read_s"]
        if args.profile:
            c = args.profile
            if c == "tidecache":
                host.restart_sidecar()
            warm(tmp, confs[c], oids, args.warm_workers, "profile")
            r = run_worker(tmp, confs[c], rnd.sample(oids, args.requests), "profile", profile=True)
            out["profile"] = {"contender": c, "text": r["profile"]}
            print("cProfile of the new worker (%s, %s):\n%s" % (c, backend, r["profile"]))
        out["zconfig"] = {c: open(confs[c]).read() for c in CONTENDERS}
        return out
    finally:
        host.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["postgresql", "sqlite"], choices=["postgresql", "sqlite"])
    ap.add_argument("--objects", type=int, default=10000, help="objects in the working set")
    ap.add_argument("--requests", type=int, default=1000, help="the new worker's reads")
    ap.add_argument("--warm-workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", choices=CONTENDERS)
    ap.add_argument("--output", default=str(ROOT / "bench-results" / "rs_newworker.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    results = {"objects": args.objects, "requests": args.requests, "state_bytes": STATE_BYTES,
               "warm_workers": args.warm_workers, "repeats": args.repeats, "per_transaction": PER_TXN,
               "backends": {}}
    for backend in args.backends:
        t = time.perf_counter()
        results["backends"][backend] = backend_run(backend, args)
        print("%s: %.0f s" % (backend, time.perf_counter() - t), flush=True)
    results["elapsed_s"] = time.perf_counter() - started
    print()
    print("a new worker's first %d requests on a warm host (%d objects, %d warm workers before it), "
          "median of %d" % (args.requests, args.objects, args.warm_workers, args.repeats))
    print("%-11s %-22s %9s %9s %9s %14s" % ("backend", "contender", "open ms", "reads ms", "total ms",
                                           "x tidecache's"))
    for backend, b in results["backends"].items():
        for c in CONTENDERS:
            r = b["contenders"][c]
            print("%-11s %-22s %9.1f %9.1f %9.1f %14s" % (
                backend, c, r["open_s"] * 1000, r["read_s"] * 1000, r["total_s"] * 1000,
                "%.2fx" % r["ratio_total"] if "ratio_total" in r else "-"))
    out = pathlib.Path(args.output)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("%.0f s in all; written to %s" % (results["elapsed_s"], out))


if __name__ == "__main__":
    main()
