"""``make bench``: shared unpickled state (issue 10), side by side with
plain ZODB in one run.

One FileStorage in a temporary directory holds a working set of
``--memory-objects`` objects (10,000) of each kind:

- ``persistent``: a ``Persistent`` with 11 attributes (6 strings, 3 ints, a
  list of 3 strings, a tuple);
- ``bucket``: an ``OOBucket`` of 30 string keys and values;
- ``btree``: an ``OOBTree`` of 20 references (values: ``Persistent``
  objects of a pool of 2,000, keys strings);
- ``mapping``: a ``PersistentMapping`` of 50 strings;
- ``iibtree``: an ``IIBTree`` of 30 integers, ``iobucket``: an ``IOBucket``
  of 30 integer keys and string values (integer BTrees keep their keys and
  values in malloc'd C arrays: per connection whatever is shared);
- ``demo`` (memory only): the demo's application (demo/corpus.py) over
  ``--demo-modules`` modules of the standard library: documents, sections,
  their ``IOBTree``, the word index (an ``OOBTree`` of ``IITreeSet``).

A ``tidecached`` is started for the run. Three contenders, each a ``DB``
over its own read-only ``FileStorage`` of that one file:

- ``zodb`` (the anchor): plain ``ZODB.DB(FileStorage)``;
- ``tidecache`` (the second anchor): ``ZODB.DB(TideCacheStorage(FileStorage))``;
- ``shared``: ``tidecache.DB(TideCacheStorage(FileStorage), shared_state=True)``.

**Activation**: one connection per contender gets ``--objects`` objects of
a kind (as ghosts), activates them once (the sidecar's arena and the
template cache are primed; plain ZODB's file is in the page cache), then
``--rounds`` times: ghostify them all (``_p_deactivate``, not timed), then
activate them all (``_p_activate``: ZODB's C code calls
``Connection.setstate``, the storage load and the unpickling or the
materialisation, ``__setstate__``), timed. The contenders interleave round
by round; the figure is the best round, microseconds per object, and the
ratio plain ZODB / contender (goal: shared >= 3x for each kind).

**Memory of 16 connections**: for each kind and contender, a fresh
subprocess opens the ``DB`` and 16 connections, takes its RSS (``VmRSS``
and its anonymous part ``RssAnon`` of ``/proc/self/status``; not
tracemalloc, which does not see BTrees' malloc'd arrays), activates every
object of the working set in each of the 16 connections and takes its RSS
again. The figure is the difference, and the contender's as a share of
plain ZODB's (goal: <= 40% for buckets and mappings, <= 50% for the
demo's working set). For the integer BTrees, the bytes of C arrays every
connection keeps (keys and values, as ``_bucket_setstate`` allocates them,
with glibc's chunk overhead) and their share of the contender's total. In
the shared contender's process, the template cache's bytes per entry
(``tidecache.shared.stats(db)``) against the size of one decoded state
(``sys.getsizeof`` over the state ZODB unpickles, containers and leaves,
persistent references counted as pointers), mean over the kind's objects.

Until the shared-state mechanism exists (``tidecache.DB``), the shared
contender is left out. Writes ``bench-results/shared_state.json`` and
rebuilds docs/benchmarks.md (``--no-report``: not).

    shared_state.py [--objects 2000] [--rounds 7] [--memory-objects 10000]
                    [--connections 16] [--kinds ...] [--memory-kinds ...]
                    [--demo-modules 150] [--shared-mb 256] [--skip-activation]
                    [--skip-memory] [--profile KIND] [--output PATH] [--no-report]
"""

import argparse
import gc
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "demo"))
sys.path.insert(0, str(ROOT / "adapters" / "python" / "tests"))

import persistent  # noqa: E402
import transaction  # noqa: E402
import ZODB  # noqa: E402
import ZODB.FileStorage  # noqa: E402
from BTrees.IIBTree import IIBTree  # noqa: E402
from BTrees.IOBTree import IOBucket  # noqa: E402
from BTrees.OOBTree import OOBTree  # noqa: E402
from BTrees.OOBTree import OOBucket  # noqa: E402
from persistent.mapping import PersistentMapping  # noqa: E402
from ZODB.utils import p64  # noqa: E402

import tidecache  # noqa: E402
from tidecache import TideCacheStorage  # noqa: E402

#: Kinds timed for activation, and kinds whose memory is measured.
KINDS = ("persistent", "bucket", "btree", "mapping")
MEMORY_KINDS = KINDS + ("iibtree", "iobucket", "demo")
CONTENDERS = ("zodb", "tidecache", "shared")
TITLES = {"zodb": "plain ZODB", "tidecache": "tidecache", "shared": "tidecache + shared state"}
#: Objects of the pool the ``btree`` kind's values refer to.
LEAVES = 2000
REFS_PER_TREE = 20
INT_ITEMS = 30


def shared_available():
    """Whether this tree has the shared-state mechanism (issue 10)."""
    try:
        import tidecache.shared  # noqa: F401
    except ImportError:
        return False
    return hasattr(tidecache, "DB")


# -- the working set ---------------------------------------------------------
# The classes live in this module, imported as ``shared_state`` (never
# ``__main__``): the pickles name ``shared_state.Item``, found by every
# process.


class Item(persistent.Persistent):
    """A plain persistent object: 11 attributes."""

    def __init__(self, n):
        self.name = "item-%d" % n
        self.title = "Item number %d of the working set" % n
        self.description = "A description of item %d, long enough to be a real one." % n
        self.owner = "user%d" % (n % 97)
        self.status = ("draft", "published", "archived")[n % 3]
        self.path = "/site/folder-%d/item-%d" % (n // 100, n)
        self.number = n
        self.size = n * 37 % 100000
        self.created = 1_700_000_000 + n
        self.tags = ["tag%d" % (n % 7), "tag%d" % (n % 11), "common"]
        self.position = (n % 13, n % 17, "x")


class Leaf(persistent.Persistent):
    """What the ``btree`` kind's values refer to."""

    def __init__(self, n):
        self.n = n


def make(kind, n, leaves):
    if kind == "persistent":
        return Item(n)
    if kind == "bucket":
        return OOBucket({"key-%02d" % i: "value %d of bucket %d" % (i, n) for i in range(30)})
    if kind == "btree":
        rng = random.Random(n)
        return OOBTree({"ref-%02d" % i: rng.choice(leaves) for i in range(REFS_PER_TREE)})
    if kind == "mapping":
        return PersistentMapping({"field-%02d" % i: "value %d of mapping %d" % (i, n) for i in range(50)})
    if kind == "iibtree":
        return IIBTree({n * 100 + i: i * n for i in range(INT_ITEMS)})
    if kind == "iobucket":
        return IOBucket({n * 100 + i: "value %d of %d" % (i, n) for i in range(INT_ITEMS)})
    raise ValueError(kind)


def populate(path, count, demo_modules):
    """Writes the working set into a new FileStorage at ``path``; returns
    ``{kind: [oid as int, ...]}`` (``demo``: the number of objects)."""
    import ZODB.utils

    db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    oids = {}
    with db.transaction() as conn:
        leaves = [Leaf(i) for i in range(LEAVES)]
        for leaf in leaves:
            conn.add(leaf)
    kinds = [k for k in MEMORY_KINDS if k != "demo"]
    for kind in kinds:
        made = []
        for start in range(0, count, 1000):
            with db.transaction() as conn:
                leaves_here = [conn.get(leaf._p_oid) for leaf in leaves] if kind == "btree" else None
                batch = [make(kind, n, leaves_here) for n in range(start, min(count, start + 1000))]
                for obj in batch:
                    conn.add(obj)
            made += batch
        oids[kind] = [ZODB.utils.u64(o._p_oid) for o in made]
    if demo_modules:
        import corpus
        corpus.load(db, corpus.stdlib_modules(demo_modules), progress=lambda *a: None)
    db.close()
    return oids


# -- contenders ----------------------------------------------------------------


def open_db(contender, path, socket, shared_mb, **kw):
    """A ``DB`` of ``contender`` over a read-only FileStorage of ``path``."""
    fs = ZODB.FileStorage.FileStorage(path, read_only=True)
    if contender == "zodb":
        return ZODB.DB(fs, **kw)
    storage = TideCacheStorage(fs, socket=socket, database="shared-state-bench")
    if contender == "tidecache":
        return ZODB.DB(storage, **kw)
    return tidecache.DB(storage, shared_state=True, shared_state_mb=shared_mb, **kw)


def shared_stats(db):
    if not hasattr(db, "_tc_shared") and not shared_available():
        return None
    try:
        import tidecache.shared
        return dict(tidecache.shared.stats(db))
    except Exception:  # noqa: BLE001 - a DB without shared state
        return None


# -- activation ----------------------------------------------------------------


def activation(path, socket, oids, contenders, args):
    """``{kind: {contender: us per object, ...}}``: best of ``args.rounds``."""
    out = {}
    dbs = {c: open_db(c, path, socket, args.shared_mb, cache_size=args.objects * 4) for c in contenders}
    before = {}
    try:
        for kind in args.kinds:
            chosen = oids[kind][: args.objects]
            conns, objs = {}, {}
            for c in contenders:
                conns[c] = dbs[c].open(transaction.TransactionManager())
                objs[c] = [conns[c].get(p64(oid)) for oid in chosen]
                for o in objs[c]:  # primes the arena, the template cache, the page cache
                    o._p_activate()
                for o in objs[c]:
                    o._p_deactivate()
                for o in objs[c]:
                    o._p_activate()
            best = {c: float("inf") for c in contenders}
            for _ in range(args.rounds):
                for c in contenders:
                    objects = objs[c]
                    for o in objects:
                        o._p_deactivate()
                    t = time.perf_counter()
                    for o in objects:
                        o._p_activate()
                    best[c] = min(best[c], time.perf_counter() - t)
            r = out[kind] = {c: best[c] / len(chosen) * 1e6 for c in contenders}
            for c in contenders:
                if c != "zodb":
                    r["ratio_" + c] = r["zodb"] / r[c]
            if "shared" in contenders:
                # This kind's part of the DB's counters (they add up over the kinds).
                after = shared_stats(dbs["shared"]) or {}
                r["shared_stats"] = {k: v - before.get(k, 0) if k not in ("entries", "bytes", "capacity") else v
                                     for k, v in after.items() if isinstance(v, (int, float))}
                before = after
            if "tidecache" in contenders:
                st = dbs["tidecache"].storage.cache_stats()
                r["tidecache_loads"] = {"hits": st["hits"], "misses": st["misses"]}
            print("  %-10s %s" % (kind, "  ".join(
                "%s %.2f us%s" % (c, r[c], "" if c == "zodb" else " (%.2fx)" % r["ratio_" + c])
                for c in contenders)), flush=True)
            for c in contenders:
                conns[c].close()
            del objs, conns
            gc.collect()
    finally:
        for db in dbs.values():
            db.close()
    return out


def profile_activation(path, socket, oids, kind, contenders, args):
    """cProfile of one round of ``kind``'s activation per contender; the
    text of the top functions."""
    import cProfile
    import io
    import pstats

    texts = {}
    for c in contenders:
        db = open_db(c, path, socket, args.shared_mb, cache_size=args.objects * 4)
        try:
            conn = db.open(transaction.TransactionManager())
            objs = [conn.get(p64(oid)) for oid in oids[kind][: args.objects]]
            for o in objs:
                o._p_activate()
            for o in objs:
                o._p_deactivate()

            def round_(objs=objs):
                for o in objs:
                    o._p_activate()
            prof = cProfile.Profile()
            prof.runcall(round_)
            s = io.StringIO()
            st = pstats.Stats(prof, stream=s)
            st.sort_stats("tottime").print_stats(15)
            texts[c] = s.getvalue()
            print("cProfile, %s, %s:\n%s" % (kind, c, texts[c]), flush=True)
            conn.close()
        finally:
            db.close()
    return texts


# -- memory ----------------------------------------------------------------------


def status_kib():
    """``(VmRSS, RssAnon)`` of this process, KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(line.split()[1])
    return out["VmRSS"], out["RssAnon"]


def activate_everything(conn, kind, oids):
    """Activates the ``kind``'s working set in ``conn``; the number of
    objects activated."""
    if kind != "demo":
        n = 0
        for oid in oids:
            o = conn.get(p64(oid))
            o._p_activate()
            n += 1
        return n
    root = conn.root()
    n = 0
    for doc in root["modules"].values():
        doc._p_activate()
        doc.section_ids._p_activate()
        n += 2
    for sec in root["sections"].values():
        sec._p_activate()
        n += 1
    for postings in root["index"].values():
        for _ in postings:  # activates the set and its buckets
            pass
        n += 1
    return n


def deep_size(obj, seen):
    """``sys.getsizeof`` of ``obj`` and what it holds (containers and
    leaves; a persistent object counts as the pointer to it)."""
    if id(obj) in seen or isinstance(obj, persistent.Persistent):
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(deep_size(x, seen) for x in obj)
    return size


def decoded_state_size(conn, kind, oids, sample=300):
    """Mean ``deep_size`` of the state ZODB decodes for ``kind``'s objects."""
    storage = conn._storage
    total = n = 0
    for oid in oids[:sample]:
        p, _ = storage.load(p64(oid))
        state = conn._reader.getState(p)
        total += deep_size(state, set())
        n += 1
    return total / n if n else None


#: Bytes per C item of the integer BTrees (BTrees' ``I``: a C int; ``O``:
#: a pointer).
C_ITEM = {"iibtree": (4, 4), "iobucket": (4, 8)}


def malloc_chunk(n):
    """glibc's chunk for a request of ``n`` bytes (8 bytes of header,
    16-byte alignment, 32 at least)."""
    return max(32, (n + 8 + 15) // 16 * 16)


def c_array_bytes(kind):
    """Bytes of C arrays one activated object of ``kind`` holds."""
    if kind not in C_ITEM:
        return 0
    key, value = C_ITEM[kind]
    return malloc_chunk(key * INT_ITEMS) + malloc_chunk(value * INT_ITEMS)


def demo_c_arrays(conn):
    """Bytes of C arrays (keys and values) the demo's BTrees hold in one
    connection, at least (their items; no chunk overhead, no inner nodes):
    the modules' ``OOBTree`` and the index's (two pointers an item), the
    sections' ``IOBTree`` (a C int and a pointer), each ``IITreeSet`` (a C
    int)."""
    root = conn.root()
    total = len(root["modules"]) * 16 + len(root["sections"]) * 12 + len(root["index"]) * 16
    return total + sum(len(postings) * 4 for postings in root["index"].values())


def memory_child(args):
    """In a fresh process: the RSS of ``args.connections`` connections of
    ``args.contender`` over ``args.kind``'s working set; prints JSON."""
    with open(args.oids) as f:
        oids = json.load(f).get(args.kind, [])
    n_objects = len(oids) if args.kind != "demo" else 10 ** 6
    db = open_db(args.contender, args.path, args.socket, args.shared_mb,
                 pool_size=args.connections + 1, cache_size=max(2 * n_objects, 10_000))
    conns = [db.open(transaction.TransactionManager()) for _ in range(args.connections)]
    for c in conns:
        c.root()
    gc.collect()
    rss0, anon0 = status_kib()
    activated = [activate_everything(c, args.kind, oids) for c in conns]
    gc.collect()
    rss1, anon1 = status_kib()
    out = {"rss_kib": rss1 - rss0, "anon_kib": anon1 - anon0, "activated": activated[0],
           "rss_before_kib": rss0,
           "c_arrays_per_connection": demo_c_arrays(conns[0]) if args.kind == "demo"
           else c_array_bytes(args.kind) * len(oids)}
    if args.contender == "shared":
        st = shared_stats(db)
        out["shared_stats"] = st
        if st and st.get("entries"):
            out["template_bytes_per_entry"] = st["bytes"] / st["entries"]
        if args.kind != "demo":
            out["decoded_state_bytes"] = decoded_state_size(conns[0], args.kind, oids)
    if args.contender == "tidecache":
        st = db.storage.cache_stats()
        out["tidecache_loads"] = {"hits": st["hits"], "misses": st["misses"]}
    for c in conns:
        c.close()
    db.close()
    print("RESULT " + json.dumps(out), flush=True)


def memory(path, socket, oids_path, contenders, args):
    """``{kind: {contender: child result, "share_<c>": ...}}``."""
    out = {}
    for kind in args.memory_kinds:
        r = out[kind] = {}
        for c in contenders:
            cmd = [sys.executable, str(HERE / "shared_state.py"), "--child-memory",
                   "--contender", c, "--kind", kind, "--path", path, "--socket", socket,
                   "--oids", oids_path, "--connections", str(args.connections),
                   "--shared-mb", str(args.shared_mb)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                raise SystemExit("the memory process of %s, %s failed (exit code %d):\n%s%s"
                                 % (kind, c, p.returncode, p.stdout[-3000:], p.stderr[-3000:]))
            r[c] = json.loads(line[0][len("RESULT "):])
        for c in contenders:
            if c != "zodb":
                r["share_" + c] = r[c]["rss_kib"] / r["zodb"]["rss_kib"]
        if kind in C_ITEM or kind == "demo":
            total = r["zodb"]["c_arrays_per_connection"] * args.connections
            r["c_arrays_bytes"] = total
            for c in contenders:
                r["c_arrays_share_" + c] = total / (r[c]["rss_kib"] * 1024)
        print("  %-10s %s" % (kind, "  ".join(
            "%s %.1f MB%s" % (c, r[c]["rss_kib"] / 1024, "" if c == "zodb" else " (%.0f%%)" % (100 * r["share_" + c]))
            for c in contenders)), flush=True)
    return out


# -- output ------------------------------------------------------------------------


def print_tables(results):
    contenders = results["contenders"]
    if results.get("activation"):
        print()
        print("activation (Connection.setstate via _p_activate), us per object, best of %d rounds of %d objects; "
              "ratio: plain ZODB / contender" % (results["rounds"], results["objects"]))
        print("%-10s" % "kind" + "".join("%26s" % TITLES[c] for c in contenders))
        for kind, r in results["activation"].items():
            cells = ["%.2f" % r[c] + ("" if c == "zodb" else " (%.2fx)" % r["ratio_" + c]) for c in contenders]
            print("%-10s" % kind + "".join("%26s" % x for x in cells))
    if results.get("memory"):
        print()
        print("memory of %d connections x %d objects per kind: RSS added, MB (share of plain ZODB's)"
              % (results["connections"], results["memory_objects"]))
        print("%-10s" % "kind" + "".join("%26s" % TITLES[c] for c in contenders))
        for kind, r in results["memory"].items():
            cells = ["%.1f" % (r[c]["rss_kib"] / 1024) + ("" if c == "zodb" else " (%.0f%%)" % (100 * r["share_" + c]))
                     for c in contenders]
            print("%-10s" % kind + "".join("%26s" % x for x in cells))
            if "c_arrays_bytes" in r:
                print("%-10s C arrays kept per connection: %.1f MB (%s)" % (
                    "", r["c_arrays_bytes"] / 2 ** 20,
                    ", ".join("%.0f%% of %s's" % (100 * r["c_arrays_share_" + c], c) for c in contenders)))
            s = r.get("shared", {})
            if s.get("template_bytes_per_entry") and s.get("decoded_state_bytes"):
                print("%-10s template %.0f B per entry against a decoded state of %.0f B (%.2fx)" % (
                    "", s["template_bytes_per_entry"], s["decoded_state_bytes"],
                    s["template_bytes_per_entry"] / s["decoded_state_bytes"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=2000, help="objects per kind timed for activation")
    ap.add_argument("--rounds", type=int, default=7, help="activation rounds (the best is kept)")
    ap.add_argument("--memory-objects", type=int, default=10_000, help="working set per kind")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--memory-kinds", nargs="+", choices=MEMORY_KINDS, default=list(MEMORY_KINDS))
    ap.add_argument("--demo-modules", type=int, default=150)
    ap.add_argument("--shared-mb", type=int, default=256, help="the template cache's capacity, MiB")
    ap.add_argument("--skip-activation", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--without-shared", action="store_true",
                    help="leave the shared contender out (as when the mechanism is absent)")
    ap.add_argument("--profile", nargs="+", default=[], choices=KINDS, metavar="KIND",
                    help="after the runs, cProfile of one activation round of KIND per contender")
    ap.add_argument("--output", default=str(ROOT / "bench-results" / "shared_state.json"))
    ap.add_argument("--no-report", action="store_true")
    # A memory process (run by the parent).
    ap.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    for name in ("--contender", "--kind", "--path", "--socket", "--oids"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        return memory_child(args)
    args.objects = min(args.objects, args.memory_objects)  # timed among the working set

    from conftest import Sidecar

    started = time.perf_counter()
    have_shared = shared_available() and not args.without_shared
    contenders = [c for c in CONTENDERS if c != "shared" or have_shared]
    if not have_shared:
        print("the shared-state mechanism (tidecache.DB) is %s: running plain ZODB and tidecache only"
              % ("left out" if args.without_shared else "not in this tree"), flush=True)
    results = {"contenders": contenders, "objects": args.objects, "rounds": args.rounds,
               "memory_objects": args.memory_objects, "connections": args.connections,
               "demo_modules": args.demo_modules, "shared_mb": args.shared_mb,
               "command": "python bench/shared_state.py " + " ".join(sys.argv[1:]),
               "activation": {}, "memory": {}}
    with tempfile.TemporaryDirectory(prefix="tidecache-shared-") as tmp:
        path = os.path.join(tmp, "Data.fs")
        t = time.perf_counter()
        oids = populate(path, args.memory_objects, args.demo_modules if "demo" in args.memory_kinds else 0)
        oids_path = os.path.join(tmp, "oids.json")
        with open(oids_path, "w") as f:
            json.dump(oids, f)
        print("working set written: %d objects per kind (%.0f s, %.1f MB)"
              % (args.memory_objects, time.perf_counter() - t, os.path.getsize(path) / 1e6), flush=True)
        sidecar = Sidecar(tmp, memory_mb=512)
        try:
            if not args.skip_activation:
                print("activation, %d objects per kind, best of %d rounds:" % (args.objects, args.rounds), flush=True)
                results["activation"] = activation(path, sidecar.socket, oids, contenders, args)
            if not args.skip_memory:
                print("memory of %d connections, %d objects per kind (a process each):"
                      % (args.connections, args.memory_objects), flush=True)
                results["memory"] = memory(path, sidecar.socket, oids_path, contenders, args)
            if args.profile:
                results["profiles"] = {k: profile_activation(path, sidecar.socket, oids, k, contenders, args)
                                       for k in args.profile}
        finally:
            sidecar.stop()
    results["seconds"] = time.perf_counter() - started
    print_tables(results)
    print("%.0f s in all" % results["seconds"])
    out = pathlib.Path(args.output)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("written to %s" % out)
    if not args.no_report:
        subprocess.run([sys.executable, str(ROOT / "bench" / "report.py")], check=True)


if __name__ == "__main__":
    # The working set's classes are this module's: the pickles must name it
    # ``shared_state``, in this process and in the memory processes.
    import shared_state
    sys.exit(shared_state.main())
