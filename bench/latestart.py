"""``make bench``: a late start. Worker processes with tidecache start on a
warm host after commits the sidecar did not hear of.

On one host (bench/zodbhost.py: ZEO over FileStorage with
``invalidation-age`` set, and a ``tidecached``), for N = 100 and N = 10,000:

1. **warm**: a new sidecar (new arena file); ``WORKERS`` worker processes
   open the database with ``TideCacheStorage`` over a ZEO
   ``ClientStorage``, read every object of the working set once
   (``OBJECTS`` objects of about ``STATE_BYTES`` bytes: the sidecar now
   holds them all), then read random objects for ``SECONDS`` s:
   transactions of ``READS`` loads, the pickle cache emptied after each,
   so every read is a storage load. Their hit ratio over those seconds is
   the **warm ratio**. They exit (their views are released).
2. N transactions are committed by a plain ZEO client (no tidecache):
   together they change a tenth of the working set (the same objects for
   both N: ``max(1, T // N)`` of them per transaction, in turn).
3. **late start**: the same number of new worker processes open the
   database with tidecache and read random objects, as in 1, without the
   first pass. Each load is timed and counted as a hit or a miss (a
   wrapper around the instance's ``load`` that reads the storage's hit
   counter); time 0 is the start of ``TideCacheStorage(...)``, i.e. of the
   attach (the ZEO client is connected before). Reported: how long the
   attach took, the time to each process's first hit, and the hit ratio
   of all processes per 100 ms for ``SECONDS`` s, against the warm ratio.

The goals (issue 8): first hit within 100 ms of the attach; from 1 s on,
the hit ratio at least 90% of the warm ratio.

Writes ``bench-results/latestart.json``, prints a table.

    latestart.py [--commits 100 10000] [--workers 2] [--objects 10000] [--seconds 3]
"""

import argparse
import json
import multiprocessing
import pathlib
import random
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from zodbhost import Host  # noqa: E402

STATE_BYTES = 300
READS = 100  # loads per transaction
BUCKET = 0.1  # seconds


def open_zeo(host):
    from ZEO.ClientStorage import ClientStorage
    return ClientStorage(host.zeo_socket, storage=host.storage_name("plain"), wait=True)


def populate(host, objects):
    """Writes the working set through a plain ZEO client; its oids."""
    import transaction
    import ZODB
    from BTrees.IOBTree import IOBTree
    from persistent.mapping import PersistentMapping

    db = ZODB.DB(open_zeo(host))
    try:
        with db.transaction() as conn:
            tree = conn.root()["latestart"] = IOBTree()
            rnd = random.Random(8)
            for i in range(objects):
                tree[i] = PersistentMapping(data=rnd.randbytes(STATE_BYTES), n=0)
        with db.transaction() as conn:
            oids = [v._p_oid for v in conn.root()["latestart"].values()]
        transaction.abort()
        return oids
    finally:
        db.close()


def commit_unheard(host, oids, n):
    """``n`` transactions of a plain ZEO client, changing a tenth of
    ``oids`` together; seconds taken."""
    import ZODB

    touched = oids[:max(1, len(oids) // 10)]
    per_txn = max(1, len(touched) // n)
    db = ZODB.DB(open_zeo(host))
    t0 = time.perf_counter()
    try:
        k = 0
        for _ in range(n):
            with db.transaction() as conn:
                for _ in range(per_txn):
                    obj = conn.get(touched[k % len(touched)])
                    obj["n"] += 1
                    k += 1
    finally:
        db.close()
    return time.perf_counter() - t0


def reader(number, host, oids, preload, seconds, results):
    """A worker process: opens the database with tidecache, optionally
    reads every object once, then reads random objects for ``seconds``;
    puts its per-bucket hits and misses (from the attach, or from the end
    of the first pass) and its first hit on ``results``."""
    import transaction
    import ZODB
    from tidecache import TideCacheStorage
    from tidecache.storage import TideCacheInstance

    events = []
    base = open_zeo(host)
    t0 = time.monotonic()
    storage = TideCacheStorage(base, socket=host.sidecar_socket, timeout_ms=50)
    attached = time.monotonic() - t0
    stats = storage._tc_stats
    original = TideCacheInstance.load

    def counted_load(self, oid):
        before = stats.hits
        r = original(self, oid)
        events.append((time.monotonic(), stats.hits > before))
        return r

    TideCacheInstance.load = counted_load
    db = ZODB.DB(storage, cache_size=READS * 2)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    rnd = random.Random(number)
    try:
        if preload:
            tm.begin()
            for i, oid in enumerate(oids):
                conn.get(oid)._p_activate()
                if i % READS == READS - 1:
                    conn.cacheMinimize()
            tm.abort()
            storage._tc_client.wait_for_stores(5000)
            events.clear()
            t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            tm.begin()
            for oid in rnd.sample(oids, READS):
                conn.get(oid)._p_activate()
            tm.abort()
            conn.cacheMinimize()
    finally:
        conn.close()
        final = storage.cache_stats()
        db.close()
    buckets = [[0, 0] for _ in range(int(round(seconds / BUCKET)))]
    first_hit = None
    for t, hit in events:
        b = int((t - t0) / BUCKET)
        if hit and first_hit is None:
            first_hit = t - t0
        if 0 <= b < len(buckets):
            buckets[b][0 if hit else 1] += 1
    results.put({"number": number, "attach_s": attached, "first_hit_s": first_hit, "buckets": buckets,
                 "loads": len(events), "stats": {k: final[k] for k in ("hits", "misses", "stores",
                                                                      "resyncs", "flushes", "joined")}})


def run_workers(host, oids, workers, preload, seconds):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=reader, args=(n, host, oids, preload, seconds, results)) for n in range(workers)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=120 + seconds) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return sorted(out, key=lambda r: r["number"])


def merge(runs):
    """Hits and misses of all processes per bucket; ratios."""
    n = min(len(r["buckets"]) for r in runs)
    hits = [sum(r["buckets"][i][0] for r in runs) for i in range(n)]
    misses = [sum(r["buckets"][i][1] for r in runs) for i in range(n)]
    ratio = [h / (h + m) if h + m else None for h, m in zip(hits, misses)]
    total = sum(hits) + sum(misses)
    return {"hits": hits, "misses": misses, "ratio": ratio,
            "overall": sum(hits) / total if total else None}


def scenario(host, oids, n, workers, seconds):
    host.restart_sidecar()
    warm_runs = run_workers(host, oids, workers, True, seconds)
    warm = merge(warm_runs)
    commit_s = commit_unheard(host, oids, n)
    late_runs = run_workers(host, oids, workers, False, seconds)
    late = merge(late_runs)
    target = 0.9 * warm["overall"]
    # From which bucket on every bucket is at 90% of the warm ratio or above.
    recovered = None
    for i in range(len(late["ratio"])):
        if all(r is not None and r >= target for r in late["ratio"][i:]):
            recovered = i * BUCKET
            break
    first_hits = [r["first_hit_s"] for r in late_runs]
    first_second = late["hits"][:int(1 / BUCKET)], late["misses"][:int(1 / BUCKET)]
    loads_first_second = sum(first_second[0]) + sum(first_second[1])
    return {
        "commits": n, "commit_seconds": commit_s,
        "changed_objects": max(1, len(oids) // 10),
        "warm": {"ratio": warm["overall"], "ratio_by_bucket": warm["ratio"],
                 "processes": warm_runs},
        "late": {"ratio_by_bucket": late["ratio"], "hits_by_bucket": late["hits"],
                 "misses_by_bucket": late["misses"], "ratio": late["overall"],
                 "ratio_first_second": sum(first_second[0]) / loads_first_second if loads_first_second else None,
                 "attach_s": max(r["attach_s"] for r in late_runs),
                 "first_hit_s": None if None in first_hits else max(first_hits),
                 "recovered_s": recovered, "processes": late_runs},
    }


def fmt(x, f="%.3f"):
    return "-" if x is None else f % x


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, nargs="+", default=[100, 10000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--objects", type=int, default=10000, help="objects in the working set")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--output", default=str(ROOT / "bench-results" / "latestart.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    results = {"workers": args.workers, "objects": args.objects, "state_bytes": STATE_BYTES,
               "reads_per_transaction": READS, "bucket_s": BUCKET, "seconds": args.seconds, "runs": {}}
    host = Host()
    try:
        oids = populate(host, args.objects)
        for n in args.commits:
            t = time.perf_counter()
            results["runs"][str(n)] = r = scenario(host, oids, n, args.workers, args.seconds)
            print("N=%d: %.0f s (commits %.1f s)" % (n, time.perf_counter() - t, r["commit_seconds"]), flush=True)
    finally:
        host.stop()
    results["elapsed_s"] = time.perf_counter() - started
    print()
    print("late start: %d processes, %d objects, hit ratio per %d ms after the attach"
          % (args.workers, args.objects, BUCKET * 1000))
    print("%8s %8s %9s %11s %9s %12s %12s" % ("N", "warm", "attach s", "1st hit s", "ratio 1s",
                                             "recovered s", "ratio all"))
    for n, r in results["runs"].items():
        late = r["late"]
        print("%8s %8s %9s %11s %9s %12s %12s" % (
            n, fmt(r["warm"]["ratio"]), fmt(late["attach_s"]), fmt(late["first_hit_s"]),
            fmt(late["ratio_first_second"]), fmt(late["recovered_s"], "%.1f"), fmt(late["ratio"])))
        print("   by 100 ms: " + " ".join(fmt(x, "%.2f") for x in late["ratio_by_bucket"]))
    out = pathlib.Path(args.output)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("%.0f s in all; written to %s" % (results["elapsed_s"], out))


if __name__ == "__main__":
    main()
