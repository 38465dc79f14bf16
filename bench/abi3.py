"""One abi3 wheel, or one wheel per CPython version? Measures whether the
limited API (PyO3's ``abi3-py39``) slows the adapter's hot paths.

Builds the native module twice with cargo, from the same sources and the
release profile: ``regular`` (``pyo3/extension-module``, the full API of
this interpreter, what the wheels ship) and ``abi3`` (plus
``pyo3/abi3-py39``, one wheel for CPython 3.9+). Each goes into a package directory of its own under
``target/abi3-bench/`` beside a copy of the package's Python files. Then,
with one ``tidecached`` for all, it times in child processes (one per
build and round, the builds alternating, so that both see the same
machine):

- ``load``: an arena hit through ``TideCacheStorage``: ``load(oid)`` of an
  MVCC instance, over a FileStorage, of revisions the sidecar holds;
- ``activation``: a shared-state activation: ghosts of
  ``tidecache.DB(..., shared_state=True)`` activated from the process's
  templates (``cacheMinimize`` then an attribute read, no storage load).

Prints, per path, each build's best rate over the rounds (operations per
second of the child's CPU time; the median beside it) and abi3's cost in percent of the regular
build; writes ``bench-results/abi3.json``. docs/operations.md
("Installing") quotes the figures: abi3 was 7-9 % slower on the
activation, so per-version wheels ship (above about 5 %, they should).

Usage: ``.venv/bin/python bench/abi3.py [--rounds 5] [--seconds 1.0]``
(about 2 minutes for the two builds on 2 cores, then rounds x 4 children of
about 2 x seconds each).
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "target" / "abi3-bench"
OBJECTS = 200

BUILDS = {
    "regular": ["pyo3/extension-module"],
    "abi3": ["pyo3/extension-module", "pyo3/abi3-py39"],
}


def build(name, features):
    """cargo build of tidecache-python with ``features``; the package
    directory (``OUT/name``, holding ``tidecache/``) it made."""
    env = dict(os.environ, PYO3_PYTHON=sys.executable)
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "-p", "tidecache-python", "--features", ",".join(features)],
        cwd=ROOT, env=env, check=True,
    )
    pkg = OUT / name
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(ROOT / "adapters" / "python" / "python" / "tidecache", pkg / "tidecache",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    suffix = ".abi3.so" if name == "abi3" else sysconfig.get_config_var("EXT_SUFFIX")
    shutil.copy2(ROOT / "target" / "release" / "lib_native.so", pkg / "tidecache" / ("_native" + suffix))
    return pkg


# -- the child: one build, one path ------------------------------------------


def child(path, socket, seconds):
    """Times ``path`` with the tidecache on sys.path; prints one JSON line
    {"rate": best ops/s of 5 timings, "native": the module's file}. The
    time is the process's CPU time (both paths run in the process, the
    sidecar is not called), so that other load on the machine, which
    delays the process but does not make it do more, counts less."""
    import transaction
    import ZODB
    from persistent.mapping import PersistentMapping
    from ZODB.FileStorage import FileStorage

    import tidecache
    from tidecache import TideCacheStorage
    from tidecache import shared

    d = tempfile.mkdtemp(prefix="abi3-bench-")
    try:
        storage = TideCacheStorage(FileStorage(os.path.join(d, "Data.fs")), socket=socket)
        db = tidecache.DB(storage, shared_state=(path == "activation"))
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        for i in range(OBJECTS):
            root[i] = PersistentMapping(name="object %d" % i, n=i, tags=["a", "b"], size=1.5)
        tm.commit()
        oids = [root[i]._p_oid for i in range(OBJECTS)]

        if path == "load":
            inst = storage.new_instance()
            inst.poll_invalidations()
            for oid in oids:  # misses: stored to the sidecar
                inst.load(oid)
            storage._tc_client.wait_for_stores()
            before = storage.cache_stats()["hits"]

            def one_pass():
                for oid in oids:
                    inst.load(oid)

            def hits():
                return storage.cache_stats()["hits"] - before
        else:
            objs = [root[i] for i in range(OBJECTS)]
            conn.cacheMinimize()
            for o in objs:  # decoded once into templates
                o["n"]
            before = shared.stats(db)["hits"]

            def one_pass():
                conn.cacheMinimize()
                for o in objs:
                    o["n"]

            def hits():
                return shared.stats(db)["hits"] - before

        one_pass()
        passes = 0
        best = 0.0
        for _ in range(5):
            n = 0
            t0 = time.process_time()
            while True:
                one_pass()
                n += 1
                elapsed = time.process_time() - t0
                if elapsed >= seconds / 5:
                    break
            passes += n
            best = max(best, n * OBJECTS / elapsed)
        # Every timed operation was a hit, or the figure means nothing.
        got = hits()
        if got < (passes + 1) * OBJECTS:
            raise SystemExit("%s: %d hits for %d operations" % (path, got, (passes + 1) * OBJECTS))
        print(json.dumps({"rate": best, "native": tidecache._native.__file__}))
        conn.close()
        db.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- the parent ----------------------------------------------------------------


def start_sidecar(directory):
    binary = os.environ.get("TIDECACHED") or str(ROOT / "target" / "release" / "tidecached")
    sock = os.path.join(directory, "tidecached.sock")
    proc = subprocess.Popen(
        [binary, "serve", "--socket", sock, "--memory-mb", "64", "--cache-file", os.path.join(directory, "arena")],
        stderr=open(os.path.join(directory, "tidecached.log"), "ab"),
    )
    deadline = time.time() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("tidecached did not start: see %s/tidecached.log" % directory)
        time.sleep(0.02)
    return proc, sock


def run_child(pkg, path, sock, seconds):
    env = dict(os.environ, PYTHONPATH=str(pkg))
    out = subprocess.run(
        [sys.executable, __file__, "--child", path, "--socket", sock, "--seconds", str(seconds)],
        env=env, check=True, capture_output=True, text=True, cwd=str(OUT),
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["native"].startswith(str(pkg)):
        raise SystemExit("the child imported %s, not the %s build" % (result["native"], pkg))
    return result["rate"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="timed seconds per child")
    ap.add_argument("--child", choices=["load", "activation"], help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.socket, args.seconds)

    OUT.mkdir(parents=True, exist_ok=True)
    pkgs = {}
    for name, features in BUILDS.items():
        print("building %s (%s)" % (name, ", ".join(features)), flush=True)
        pkgs[name] = build(name, features)
    rates = {p: {b: [] for b in BUILDS} for p in ("load", "activation")}
    with tempfile.TemporaryDirectory(prefix="abi3-bench-") as d:
        proc, sock = start_sidecar(d)
        try:
            for r in range(args.rounds):
                order = list(BUILDS) if r % 2 == 0 else list(reversed(BUILDS))
                for path in rates:
                    for b in order:
                        rates[path][b].append(run_child(pkgs[b], path, sock, args.seconds))
        finally:
            proc.terminate()
            proc.wait()
    result = {"python": sys.version.split()[0], "rounds": args.rounds, "objects": OBJECTS, "paths": {}}
    print("\n%-11s %22s %22s %10s" % ("path", "regular ops/s", "abi3 ops/s", "abi3 cost"))
    for path, by in rates.items():
        best = {b: max(v) for b, v in by.items()}
        median = {b: statistics.median(v) for b, v in by.items()}
        cost = 100.0 * (best["regular"] - best["abi3"]) / best["regular"]
        cost_median = 100.0 * (median["regular"] - median["abi3"]) / median["regular"]
        result["paths"][path] = {"best": best, "median": median, "rates": by,
                                 "abi3_cost_percent": cost, "abi3_cost_percent_median": cost_median}
        print("%-11s %12.0f (%7.0f) %12.0f (%7.0f) %+9.1f%%" % (
            path, best["regular"], median["regular"], best["abi3"], median["abi3"], cost))
    print("(best of %d rounds, median in brackets; cost: how much slower abi3 is, of the best)" % args.rounds)
    out = ROOT / "bench-results" / "abi3.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out.relative_to(ROOT))


if __name__ == "__main__":
    main()
