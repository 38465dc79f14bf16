"""One worker process of the demo: 4 threads, each with its own ZODB
connection per request, serving searches and section views; or the writer,
which edits sections and reindexes them. Writes a JSON result file.

    workload.py reader|writer BASE SIDECAR_SOCKET|none SECONDS WORDS.json OUT.json [SEED [shared]]

BASE is the ZEO server's socket, or ``zconfig:PATH``: a ZConfig file with
one storage section (RelStorage, plain or inside ``<tidecache>``, with or
without ``shared-state on``; then SIDECAR_SOCKET only says which it is, for
the figures). ``shared`` (ZEO): the database is
``tidecache.DB(..., shared_state=True)`` (issue 10), the connections of the
process activating from one template per revision.

The result holds the process's memory when the run ends (``VmRSS``,
``RssAnon`` and the peak ``VmHWM`` of ``/proc/self/status``, KiB) and,
with shared state, ``tidecache.shared.stats``.
"""

import bisect
import functools
import itertools
import json
import random
import sys
import threading
import time

import transaction
import ZODB
import ZODB.config
from BTrees.IIBTree import IITreeSet
from ZEO.ClientStorage import ClientStorage
from ZODB.mvccadapter import MVCCAdapterInstance

from corpus import checksum
from corpus import words

THREADS = 4
CONNECTION_CACHE = 400  # objects per connection: small, so loads happen

latencies = []
loads = itertools.count()


def timed(cls, name="load"):
    """Times ``cls.<name>`` (the storage load of a connection), microseconds.
    tidecache's instances: ``_tc_load_revision``, what ``load`` calls and
    what shared state calls on a template miss (it never calls ``load``)."""
    inner = cls.__dict__[name]

    def load(self, oid):
        t = time.perf_counter()
        try:
            return inner(self, oid)
        finally:
            latencies.append((time.perf_counter() - t) * 1e6)
            next(loads)

    setattr(cls, name, load)


def timed_instances(storage):
    """Times the ``load`` of every instance ``storage`` (an IMVCCStorage
    root: RelStorage, or tidecache's wrapper of it) makes for ZODB's
    connections. RelStorage copies its methods onto each instance, so the
    class cannot be patched: the root's ``new_instance`` wraps each one.
    tidecache's instances: ``_tc_load_revision`` (what ``load`` calls, and
    shared state on a template miss)."""
    new_instance = storage.new_instance

    def timed_new_instance(*args, **kwargs):
        instance = new_instance(*args, **kwargs)
        name = "_tc_load_revision" if hasattr(instance, "_tc_load_revision") else "load"
        inner = getattr(instance, name)

        @functools.wraps(inner)
        def load(oid, *rest):
            t = time.perf_counter()
            try:
                return inner(oid, *rest)
            finally:
                latencies.append((time.perf_counter() - t) * 1e6)
                next(loads)

        setattr(instance, name, load)
        return instance

    storage.new_instance = timed_new_instance


def memory_kib():
    """``VmRSS``, ``RssAnon`` and ``VmHWM`` of this process, KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def open_db(zeo, sidecar, shared=False):
    if zeo.startswith("zconfig:"):
        with open(zeo[len("zconfig:"):]) as f:
            storage = ZODB.config.storageFromString(f.read())
        timed_instances(storage)
        return storage, ZODB.DB(storage, pool_size=THREADS, cache_size=CONNECTION_CACHE)
    base = ClientStorage(zeo, wait_timeout=30)
    if sidecar == "none":
        timed(MVCCAdapterInstance)
        storage = base
    else:
        from tidecache import TideCacheStorage
        from tidecache.storage import TideCacheInstance
        timed(TideCacheInstance, "_tc_load_revision")
        storage = TideCacheStorage(base, socket=sidecar, database="demo")
        if shared:
            import tidecache
            return storage, tidecache.DB(storage, shared_state=True, pool_size=THREADS,
                                         cache_size=CONNECTION_CACHE)
    return storage, ZODB.DB(storage, pool_size=THREADS, cache_size=CONNECTION_CACHE)


class Popularity:
    """Words drawn with probability proportional to their corpus frequency."""

    def __init__(self, path, rng):
        with open(path) as f:
            pairs = json.load(f)
        self.words = [w for w, _ in pairs]
        self.cum = list(itertools.accumulate(n for _, n in pairs))
        self.rng = rng

    def word(self):
        return self.words[bisect.bisect_right(self.cum, self.rng.random() * self.cum[-1])]


def reader(db, deadline, pop_path, seed, out):
    requests = [0, 0]
    failures = []
    lock = threading.Lock()

    def serve(n):
        rng = random.Random(seed * 100 + n)
        pop = Popularity(pop_path, rng)
        while time.time() < deadline:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            try:
                root = conn.root()
                postings = root["index"].get(pop.word())
                ids = list(itertools.islice(postings, 10)) if postings else []
                if rng.random() < 0.6 or not ids:
                    [root["sections"][i].name for i in ids]
                    kind = 0
                else:
                    sec = root["sections"][rng.choice(ids)]
                    doc = root["modules"][sec.module]
                    texts = [root["sections"][i].text for i in doc.section_ids]
                    if checksum(texts) != doc.checksum:
                        with lock:
                            failures.append("%s: sections do not match the checksum of the same snapshot (edit %d)"
                                            % (doc.module, doc.edits))
                    kind = 1
            finally:
                tm.abort()
                conn.close()
            with lock:
                requests[kind] += 1

    threads = [threading.Thread(target=serve, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.update(searches=requests[0], views=requests[1], failures=failures)


def writer(db, deadline, pop_path, seed, out):
    rng = random.Random(seed)
    pop = Popularity(pop_path, rng)
    with db.transaction() as conn:
        names = list(conn.root()["modules"].keys())
    commits = 0
    while time.time() < deadline:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        doc = root["modules"][rng.choice(names)]
        if doc.section_ids:
            sid = rng.choice(doc.section_ids)
            sec = root["sections"][sid]
            added = "\n# edit %d: %s" % (doc.edits + 1, pop.word())
            for w in words(added) - words(sec.text):
                postings = root["index"].get(w)
                if postings is None:
                    postings = root["index"][w] = IITreeSet()
                postings.insert(sid)
            sec.text += added
            doc.edits += 1
            doc.checksum = checksum(root["sections"][i].text for i in doc.section_ids)
            tm.commit()
            commits += 1
        else:
            tm.abort()
        conn.close()
        time.sleep(0.02)
    out.update(commits=commits)


def main():
    role, zeo, sidecar, seconds, pop_path, out_path = sys.argv[1:7]
    seed = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    shared = len(sys.argv) > 8 and sys.argv[8] == "shared"
    storage, db = open_db(zeo, sidecar, shared)
    out = {"role": role}
    deadline = time.time() + float(seconds)
    started = time.time()
    (reader if role == "reader" else writer)(db, deadline, pop_path, seed, out)
    out["seconds"] = time.time() - started
    out["loads"] = next(loads)
    lat = sorted(latencies)
    out["latencies_us"] = lat[:: max(1, len(lat) // 20000)]
    out["cache"] = storage.cache_stats() if hasattr(storage, "cache_stats") else None
    local = getattr(storage, "_cache", None)  # RelStorage's own (process-local) cache
    if zeo.startswith("zconfig:") and local is not None:
        out["relstorage_cache"] = {k: v for k, v in local.stats().items() if k in ("hits", "misses", "sets")}
    out["memory_kib"] = memory_kib()
    out["shared_state"] = None
    if getattr(db, "_tc_shared", None) is not None:
        import tidecache.shared
        out["shared_state"] = dict(tidecache.shared.stats(db))
    db.close()
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
