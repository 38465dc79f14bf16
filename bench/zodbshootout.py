"""``make bench``: the standard ZODB benchmark, zodbshootout 0.8, on plain
ZEO and on the same ZEO wrapped in ``<tidecache>``, side by side.

One host (bench/zodbhost.py): a ZEO server (``runzeo``, FileStorage, Unix
socket, ``invalidation-age`` set: see there why) and a ``tidecached`` with
its own socket and arena file, in a temporary directory. One ZConfig file
with two databases, ``plain`` (a ``<zeoclient>``) and ``tidecache`` (the
same ``<zeoclient>`` inside ``<tidecache>``), as a ZODB user would write
it, both on the one ZEO storage (as issue 8 measured: the plain
contender's commits are then commits the sidecar never hears of, and each
tidecache phase after them starts on a lagging horizon). ``--own-storages``
gives the tidecache contender a storage of its own in the same ZEO server
(each of its phases then measures a sidecar that heard of every commit;
written to ``bench-results/zodbshootout-own-storages.json``, not part of
``make bench``).

zodbshootout runs once per concurrency (``-c`` takes one value), 2 and 4
processes, 1,000 objects of about 300 bytes per process, phases add,
update, cold, warm, hot and steamin; docs/benchmarks.md says what each
phase times. A value is one phase's seconds per 1,000 objects (per
iteration of its inner loop). pyperf's repeats differ by the cost of a
value: the phases that load or commit 1,000 objects per iteration (add,
update, cold, warm: 1 to 10 s a value) get 1 pyperf worker process of
``--values`` values, with ``--loops 1`` (no calibration run: zodbshootout's
10 inner iterations per value already take 1 s or more); hot and steamin
(a process's cost is mostly the first read that primes the caches) get
``--fast-processes`` processes of ``--values`` values, in a second
zodbshootout run, with the loops calibrated by pyperf (a value of at least
100 ms: steamin's 10 iterations take about 1 ms, too short to time). The differences the goals ask about are 2x and 10x on
the slow phases, and "no slower" on the fast ones, whose noise the extra
processes bring down. With the defaults (3 values; 3 processes for hot
and steamin; 8 truly cold iterations) the script took 11 minutes on 2
cores that other jobs shared (load average 12 to 23); pass fewer
``--values`` or ``--fast-processes`` for a quicker, noisier run.

Then a run zodbshootout cannot make: **truly cold**. zodbshootout's cold
phase clears each process's ZEO cache and pickle cache, not the sidecar,
so its tidecache figure is a cold process on a warm host. Here, the same
cold read (zodbshootout's own ``bench_cold_read``, one iteration per call)
runs in 2 (and 4) forked processes, each iteration opening a new database
as zodbshootout does; before every tidecache iteration the sidecar is
stopped and started on a new, empty arena file (outside the timed part),
so every tidecache read is a read on a new host; plain ZEO iterations
interleave with them. The figure per iteration is the slowest process's
time, as zodbshootout's (``max``).

**Shared state** (issue 10): on ZEO, when the tree's ``<tidecache>`` has
the ``shared-state`` key, the ZConfig file gets a third database,
``shared``: the ``tidecache`` database's ``<zeoclient>`` inside
``<tidecache>`` with ``shared-state on`` (its connections activate objects
from one template per revision in the process). zodbshootout runs the
three databases in that order in every phase; the truly cold run restarts
the sidecar before each of its iterations too. ``--without-shared`` leaves
it out. The goal: hot at least 2x faster than plain ZEO. A quick run of
that phase alone: ``zodbshootout.py --phases hot --skip-truly-cold``.

Writes ``bench-results/zodbshootout.json`` (per phase and concurrency: the
values, mean and stdev of each contender, and the ratio tidecache / plain
of the means, with shared state ``ratio_shared``; the truly cold run the
same way), prints a table, and rebuilds docs/benchmarks.md.

**RelStorage** (``--base relstorage-postgresql`` or ``relstorage-sqlite``;
issue 9): the same zodbshootout run over RelStorage 4
(bench/zodbhost.py ``RelStorageHost``: a PostgreSQL server started for
the run by bench/dbservers.py, or SQLite data directories), one ZConfig
file with two databases: ``plain``, a ``<relstorage>`` section with
RelStorage's defaults (its process-local cache of 10 MB, history-preserving),
and ``tidecache``, the same section inside ``<tidecache>``. Each contender
has a database of its own on the same server (SQLite: a data directory
each), so the sidecar hears of every commit of its database. The defaults
for these bases: 4 processes, phases add, cold, warm and hot, no truly
cold run; written to ``bench-results/zodbshootout-BASE.json``.

    zodbshootout.py [--base zeo|relstorage-postgresql|relstorage-sqlite]
                    [--concurrency 2 4] [--values 3] [--fast-processes 3] [--warmups 1]
                    [--phases add update cold warm hot steamin] [--cold-iterations 8]
                    [--own-storages] [--skip-shootout] [--skip-truly-cold] [--output PATH]
                    [--no-report] [--profile PHASE ...] [--without-shared]
"""

import argparse
import json
import multiprocessing
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from zodbhost import Host  # noqa: E402
from zodbhost import RelStorageHost  # noqa: E402

# This file's name is the package's: ``import zodbshootout`` must find the
# package, not this script (run as __main__ from bench/).
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.modules.pop("zodbshootout", None)

OBJECTS = 1000
PHASES = ("add", "update", "cold", "warm", "hot", "steamin")
#: Phases whose value is cheap: more pyperf worker processes.
FAST_PHASES = ("hot", "steamin")
#: The databases of the ZConfig file, in zodbshootout's order. ``shared``
#: (issue 10: ``<tidecache>`` with ``shared-state on``) is added by
#: :func:`main` on ZEO when the tree has the mechanism.
CONTENDERS = ["plain", "tidecache"]
#: The contenders that go through ``<tidecache>`` (the truly cold run
#: restarts the sidecar before each of their iterations).
TIDECACHE_CONTENDERS = ("tidecache", "shared")
#: --base: what the contenders run on, and the column titles of the table.
BASES = {
    "zeo": ("plain ZEO", "ZEO + tidecache"),
    "relstorage-postgresql": ("RelStorage/PostgreSQL", "RS/PG + tidecache"),
    "relstorage-sqlite": ("RelStorage/SQLite", "RS/SQLite + tidecache"),
}
#: Phases and concurrency a RelStorage base runs by default (issue 9).
RELSTORAGE_PHASES = ("add", "cold", "warm", "hot")
RELSTORAGE_CONCURRENCY = (4,)
#: What zodbshootout names each phase in its reports (``BENCHMARKS`` of
#: zodbshootout/_runner.py).
PHASE_TITLES = {
    "add": "add %d objects" % OBJECTS,
    "update": "update %d objects" % OBJECTS,
    "cold": "read %d cold objects" % OBJECTS,
    "warm": "write/read %d objects" % OBJECTS,
    "hot": "read %d hot objects" % OBJECTS,
    "steamin": "read %d steamin objects" % OBJECTS,
}


def summary(values):
    """Mean and sample stdev (seconds) of ``values``."""
    return {"values": values, "mean": statistics.fmean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def side_by_side(plain, tidecache, shared=None):
    """The contenders' summaries and the ratios of their means to plain's:
    ``ratio`` (tidecache / plain) and, with ``shared``, ``ratio_shared``."""
    p, t = summary(plain), summary(tidecache)
    r = {"plain": p, "tidecache": t, "ratio": t["mean"] / p["mean"]}
    if shared is not None:
        r["shared"] = summary(shared)
        r["ratio_shared"] = r["shared"]["mean"] / p["mean"]
    return r


def shared_state_available():
    """Whether this tree's ``<tidecache>`` has the ``shared-state`` key
    (issue 10)."""
    import importlib.util
    spec = importlib.util.find_spec("tidecache")
    if spec is None or importlib.util.find_spec("tidecache.shared") is None:
        return False
    component = pathlib.Path(spec.origin).parent / "component.xml"
    return component.exists() and "shared-state" in component.read_text()


def shared_section(host):
    """A third ZConfig database for the ZEO host: ``shared``, the
    ``tidecache`` contender's ``<zeoclient>`` inside ``<tidecache>`` with
    ``shared-state on``."""
    return ("<zodb shared>\n"
            "  <tidecache>\n"
            "    socket %s\n"
            "    shared-state on\n" % host.sidecar_socket
            + host.zeoclient_section("tidecache", indent="    ")
            + "  </tidecache>\n</zodb>\n")


def run_shootout(host, conf, concurrency, phases, processes, loops, args):
    """Runs zodbshootout's ``phases`` at ``concurrency`` with ``processes``
    pyperf worker processes and ``loops`` loops per value (0: calibrated by
    pyperf); ``{phase: side_by_side}``."""
    out = os.path.join(host.dir, "shootout-c%d-%s.json" % (concurrency, "-".join(phases)))
    cmd = [sys.executable, "-m", "zodbshootout", "--include-mapping", "false", "--fail-fast",
           "-c", str(concurrency), "--object-counts", str(OBJECTS),
           "-p", str(processes), "-n", str(args.values), "-w", str(args.warmups), "-l", str(loops),
           "-o", out, conf] + list(phases)
    print("$ zodbshootout " + " ".join(cmd[3:]), flush=True)
    started = time.perf_counter()
    # The working directory is the host's, not bench/: ``-m`` puts it first
    # on the path, where this file would shadow the package.
    subprocess.run(cmd, check=True, cwd=host.dir)
    print("  %.0f s" % (time.perf_counter() - started), flush=True)
    import pyperf
    per_db = {}
    for db in CONTENDERS:
        suite = pyperf.BenchmarkSuite.load(os.path.join(os.path.splitext(out)[0] + ".d",
                                                        "%s_%d.json" % (db, OBJECTS)))
        per_db[db] = {b.get_name(): list(b.get_values()) for b in suite.get_benchmarks()}
    return {phase: side_by_side(per_db["plain"][phase], per_db["tidecache"][phase],
                                per_db["shared"][phase] if "shared" in per_db else None)
            for phase in phases if phase in per_db["plain"]}


# -- truly cold --------------------------------------------------------------


def _cold_worker(number, concurrency, conf, iterations, barrier, results):
    """One forked process of the truly cold run: ``iterations`` rounds of
    zodbshootout's cold read, one per contender, each behind the barrier
    (the parent restarts the sidecar between its two waits)."""
    from zodbshootout._dbsupport import BenchmarkDBFactory
    from zodbshootout._dbsupport import get_databases_from_conf_file
    from zodbshootout.speedtest import ForkedSpeedTestWorker
    from zodbshootout.speedtest import SpeedTestData

    factories = {f.name: BenchmarkDBFactory(f, OBJECTS, concurrency)
                 for f in get_databases_from_conf_file(open(conf))}
    worker = ForkedSpeedTestWorker(number, SpeedTestData(concurrency, OBJECTS, 300))
    worker.inner_loops = 1  # one cold read per call: the barrier comes before each
    times = {db: [] for db in CONTENDERS}
    loads = {}
    for _ in range(iterations):
        for db in CONTENDERS:
            opened = []

            def gated_open(factory=factories[db]):
                barrier.wait()  # every process is done with the previous read
                barrier.wait()  # the parent has restarted the sidecar
                database = factory.open()
                opened.append(database.storage)  # DB.close() deletes DB.storage
                return database
            times[db].append(worker.bench_cold_read(1, gated_open))
            stats = getattr(opened[0], "_tc_stats", None)
            if stats is not None:  # a tidecache contender: were its loads misses?
                counted = loads.setdefault(db, {"hits": 0, "misses": 0})
                counted["hits"] += stats.hits
                counted["misses"] += stats.misses
    results.put((number, times, loads))


def truly_cold(host, conf, concurrency, iterations):
    """zodbshootout's cold read on a new sidecar (tidecache) beside plain
    ZEO's, ``iterations`` times each, interleaved; ``side_by_side`` of the
    slowest process's time per iteration."""
    from zodbshootout._dbsupport import BenchmarkDBFactory
    from zodbshootout._dbsupport import get_databases_from_conf_file
    from zodbshootout.speedtest import SpeedTestData

    data = SpeedTestData(concurrency, OBJECTS, 300)
    for f in get_databases_from_conf_file(open(conf)):
        # As zodbshootout does when it does not run "add": data in place.
        data.populate(BenchmarkDBFactory(f, OBJECTS, concurrency), include_data=True)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(concurrency + 1, timeout=300)
    results = ctx.Queue()
    procs = [ctx.Process(target=_cold_worker, args=(n, concurrency, conf, iterations, barrier, results))
             for n in range(concurrency)]
    for p in procs:
        p.start()
    try:
        for _ in range(iterations):
            for db in CONTENDERS:
                barrier.wait()
                if db in TIDECACHE_CONTENDERS:
                    host.restart_sidecar()
                barrier.wait()
        per_worker = [results.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    slowest = {db: [max(times[db][i] for _, times, _ in per_worker) for i in range(iterations)]
               for db in CONTENDERS}
    r = side_by_side(slowest["plain"], slowest["tidecache"], slowest.get("shared"))
    # Loads of the tidecache reads that were sidecar hits: the objects the
    # processes share (root, the mappings above each process's own), which
    # one process stores and another may find, and the root's second load in
    # a process (DB() loads it, then the connection); never the 1,000 objects.
    for db in CONTENDERS:
        if db in TIDECACHE_CONTENDERS:
            key = "tidecache_loads" if db == "tidecache" else "%s_loads" % db
            r[key] = {k: sum(loads[db][k] for _, _, loads in per_worker) for k in ("hits", "misses")}
    return r


# -- profile -------------------------------------------------------------------

#: zodbshootout's method per phase (``BENCHMARKS`` of zodbshootout/_runner.py).
PHASE_METHODS = {"add": "bench_add", "update": "bench_update", "cold": "bench_cold_read",
                 "warm": "bench_read_after_write", "hot": "bench_hot_read", "steamin": "bench_steamin_read"}


def _profile_worker(conf, concurrency, phase, db, results):
    """One forked process: zodbshootout's ``phase`` (one iteration) for
    database ``db`` of ``conf`` under cProfile; puts its top functions."""
    import cProfile
    import io
    import pstats

    from zodbshootout._dbsupport import BenchmarkDBFactory
    from zodbshootout._dbsupport import get_databases_from_conf_file
    from zodbshootout.speedtest import ForkedSpeedTestWorker
    from zodbshootout.speedtest import SpeedTestData

    factory = {f.name: BenchmarkDBFactory(f, OBJECTS, concurrency)
               for f in get_databases_from_conf_file(open(conf))}[db]
    worker = ForkedSpeedTestWorker(0, SpeedTestData(concurrency, OBJECTS, 300))
    worker.inner_loops = 1
    opened = []

    def open_db():
        database = factory.open()
        opened.append(database.storage)  # DB.close() deletes DB.storage
        databases.append(database)
        return database
    databases = []
    prof = cProfile.Profile()
    seconds = prof.runcall(getattr(worker, PHASE_METHODS[phase]), 1, open_db)
    out = io.StringIO()
    for storage in opened:
        if hasattr(storage, "cache_stats"):
            stats = storage.cache_stats()
            out.write("tidecache: %d hits, %d misses, %d stores\n" % (stats["hits"], stats["misses"],
                                                                     stats["stores"]))
    if db == "shared":
        import tidecache.shared
        for database in databases:
            out.write("shared state: %s\n" % tidecache.shared.stats(database))
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(15)
    stats.sort_stats("cumulative").print_stats(25)
    results.put((db, seconds, out.getvalue()))


def profile_phase(conf, concurrency, phase, populate):
    """``{contender: {"seconds", "text"}}``: one process of ``phase`` per
    contender under cProfile (with ``populate``, the data put in place
    first, as zodbshootout does when it does not run "add"; else the
    shootout's are read)."""
    import queue

    from zodbshootout._dbsupport import BenchmarkDBFactory
    from zodbshootout._dbsupport import get_databases_from_conf_file
    from zodbshootout.speedtest import SpeedTestData

    if populate:
        data = SpeedTestData(concurrency, OBJECTS, 300)
        for f in get_databases_from_conf_file(open(conf)):
            data.populate(BenchmarkDBFactory(f, OBJECTS, concurrency), include_data=True)
    ctx = multiprocessing.get_context("fork")
    out = {}
    for db in CONTENDERS:
        results = ctx.Queue()
        p = ctx.Process(target=_profile_worker, args=(conf, concurrency, phase, db, results))
        p.start()
        try:
            while True:
                try:
                    name, seconds, text = results.get(timeout=1)
                    break
                except queue.Empty:
                    if not p.is_alive():
                        raise SystemExit("the profiled %s process of %s failed (exit code %s)"
                                         % (phase, db, p.exitcode))
        finally:
            p.join(60)
        out[name] = {"seconds": seconds, "text": text}
        print("cProfile of one %s process, %s (%.1f ms):\n%s" % (phase, name, seconds * 1000, text), flush=True)
    return out


# -- output -------------------------------------------------------------------


def ms(s):
    return "%.1f" % (s * 1000) if s < 10 else "%.0f" % (s * 1000)


def print_table(results):
    print()
    shared = "shared" in results.get("contenders", ())
    print("zodbshootout 0.8, %d objects, ms per phase (mean +- stdev of pyperf's values), "
          "ratio tidecache / plain%s" % (OBJECTS, " and shared state / plain" if shared else ""))
    titles = BASES[results.get("base", "zeo")]
    if shared:
        print("%-10s %4s %22s %22s %9s %22s %9s" % (("phase", "c") + titles + ("ratio", "+ shared state", "ratio")))
    else:
        print("%-10s %4s %22s %22s %9s" % (("phase", "c") + titles + ("ratio",)))
    rows = [(phase, c, r) for c, phases in results["shootout"].items() for phase, r in phases.items()]
    rows += [("truly cold", c, r) for c, r in results.get("truly_cold", {}).items()]
    order = {p: i for i, p in enumerate(PHASES + ("truly cold",))}
    for phase, c, r in sorted(rows, key=lambda x: (order[x[0]], int(x[1]))):
        p, t = r["plain"], r["tidecache"]
        line = "%-10s %4s %22s %22s %8.2fx" % (phase, c, "%s +- %s" % (ms(p["mean"]), ms(p["stdev"])),
                                               "%s +- %s" % (ms(t["mean"]), ms(t["stdev"])), r["ratio"])
        if "shared" in r:
            line += " %22s %8.2fx" % ("%s +- %s" % (ms(r["shared"]["mean"]), ms(r["shared"]["stdev"])),
                                      r["ratio_shared"])
        print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", choices=sorted(BASES), default="zeo",
                    help="the storage under both contenders (default zeo; the RelStorage ones run "
                         "4 processes, phases add cold warm hot and no truly cold run by default)")
    ap.add_argument("--history-free", action="store_true",
                    help="RelStorage bases: keep-history false (default: RelStorage's default, true)")
    ap.add_argument("--concurrency", type=int, nargs="+")
    ap.add_argument("--values", type=int, default=3, help="pyperf values per worker process")
    ap.add_argument("--fast-processes", type=int, default=3,
                    help="pyperf worker processes for hot and steamin (the others: 1)")
    ap.add_argument("--warmups", type=int, default=1,
                    help="pyperf warmup values per worker process (default 1: the first value of a "
                         "phase follows the other contender's rewrite of every object in the shared "
                         "storage, a full miss for any cache; docs/benchmarks.md gives its figure)")
    ap.add_argument("--phases", nargs="+", choices=PHASES)
    ap.add_argument("--cold-iterations", type=int, default=8,
                    help="iterations per contender of the truly cold run")
    ap.add_argument("--own-storages", action="store_true",
                    help="the tidecache contender on a ZEO storage of its own (default: both on one)")
    ap.add_argument("--skip-shootout", action="store_true")
    ap.add_argument("--skip-truly-cold", action="store_true")
    ap.add_argument("--profile", nargs="+", default=[], choices=PHASES, metavar="PHASE",
                    help="after the runs, one process of each PHASE per contender under cProfile "
                         "(concurrency: the last of --concurrency); the top functions are printed and kept "
                         "in the results")
    ap.add_argument("--no-report", action="store_true", help="do not rebuild docs/benchmarks.md")
    ap.add_argument("--without-shared", action="store_true",
                    help="ZEO: leave out the third database, <tidecache> with shared-state on (issue 10; "
                         "left out anyway when the tree has no shared state)")
    ap.add_argument("--output", help="default bench-results/zodbshootout.json "
                    "(zodbshootout-own-storages.json with --own-storages)")
    args = ap.parse_args()
    relstorage = args.base != "zeo"
    if args.concurrency is None:
        args.concurrency = list(RELSTORAGE_CONCURRENCY if relstorage else (2, 4))
    if args.phases is None:
        args.phases = list(RELSTORAGE_PHASES if relstorage else PHASES)
    if relstorage and args.own_storages:
        ap.error("--own-storages is for ZEO: with RelStorage each contender has its own database")
    if args.output is None:
        name = ("zodbshootout-%s.json" % args.base if relstorage
                else "zodbshootout-own-storages.json" if args.own_storages else "zodbshootout.json")
        args.output = str(ROOT / "bench-results" / name)

    if not relstorage and not args.without_shared and shared_state_available():
        CONTENDERS.append("shared")
    elif not relstorage and not args.without_shared:
        print("this tree's <tidecache> has no shared-state key: the shared contender is left out", flush=True)

    started = time.perf_counter()
    results = {"base": args.base, "contenders": list(CONTENDERS),
               "command": "python bench/zodbshootout.py " + " ".join(sys.argv[1:]), "objects": OBJECTS, "processes": {p: args.fast_processes if p in FAST_PHASES else 1
                                                 for p in args.phases}, "values": args.values,
               "warmups": args.warmups,
               "loops": {p: "calibrated" if p in FAST_PHASES else 1 for p in args.phases}, "own_storages": args.own_storages,
               "cold_iterations": args.cold_iterations, "shootout": {}, "truly_cold": {}}
    if relstorage:
        results["keep_history"] = not args.history_free
        host = RelStorageHost(args.base.split("-", 1)[1], keep_history=not args.history_free)
        args.skip_truly_cold = True  # zodbshootout's own phases are what issue 9 asks for
    else:
        host = Host(own_storages=args.own_storages)
    try:
        conf = host.write_zconfig()
        if "shared" in CONTENDERS:
            with open(conf, "a") as f:
                f.write(shared_section(host))
        print("ZConfig (%s):\n%s" % (conf, open(conf).read()), flush=True)
        if not args.skip_shootout:
            for c in args.concurrency:
                slow = [p for p in args.phases if p not in FAST_PHASES]
                fast = [p for p in args.phases if p in FAST_PHASES]
                r = results["shootout"][str(c)] = {}
                if slow:
                    r.update(run_shootout(host, conf, c, slow, 1, 1, args))
                if fast:
                    r.update(run_shootout(host, conf, c, fast, args.fast_processes, 0, args))
        if args.profile:
            results["profiles"] = {phase: profile_phase(conf, args.concurrency[-1], phase, args.skip_shootout)
                                   for phase in args.profile}
        if not args.skip_truly_cold:
            for c in args.concurrency:
                t = time.perf_counter()
                results["truly_cold"][str(c)] = truly_cold(host, conf, c, args.cold_iterations)
                print("truly cold, c=%d: %.0f s" % (c, time.perf_counter() - t), flush=True)
    finally:
        host.stop()
    results["seconds"] = time.perf_counter() - started
    print_table(results)
    print("%.0f s in all" % results["seconds"])
    out = pathlib.Path(args.output)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("written to %s" % out)
    if not args.no_report:
        subprocess.run([sys.executable, str(ROOT / "bench" / "report.py")], check=True)


if __name__ == "__main__":
    main()
