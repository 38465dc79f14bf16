"""tidecache's demo, end to end, on real input: ``make demo``.

1. Starts a ZEO server over a FileStorage in a temporary directory, and
   ``tidecached``.
2. Loads the Python standard library's own sources into a ZODB
   application (demo/corpus.py).
3. Runs the same workload on three sides, side by side in this one
   invocation, in interleaved rounds (plain ZODB over ZEO, then ZODB with
   TideCacheStorage, then the same with shared state, again and again) so
   that the machine's drift falls on all: 4 worker processes x 4
   connections serving searches and section views (word popularity from the
   corpus's own frequencies) while a writer edits and reindexes sections.
   The sidecar is started anew for every tidecache round, so every side
   starts with cold processes. The third side (issue 10) is
   ``tidecache.DB(..., shared_state=True)``: the 4 connections of a worker
   activate from one template per revision; it is left out when the tree
   has no shared state (or with ``--without-shared``).
4. Prints requests/s, loads/s, sidecar hit ratio, p50/p99 load latency,
   the readers' memory when they end (RSS, mean per reader process) and
   sidecar memory for every side, and checks every read transaction's
   snapshot: a document's checksum must match its sections read in the same
   transaction. Exits non-zero if any check fails.
5. Starts every tidecached with ``--metrics-listen 127.0.0.1:<free port>``
   and, after each tidecache round (its workers closed, which sends their
   last counts), reads ``/metrics`` as ``curl http://ADDR/metrics`` would:
   ``tidecache_hits_total`` and ``tidecache_misses_total`` of the database,
   the counts every worker process sent, printed beside the workers' own
   count (``cache_stats()`` of the readers and the writer); their hit ratios
   must agree within one point (they are the same lookups).

``--base`` chooses the storage under both sides: ``zeo`` (the default:
the steps above), ``relstorage-sqlite`` (RelStorage over SQLite, a data
directory in the temporary directory; ``make demo`` runs it after the ZEO
run) or ``relstorage-postgresql`` (RelStorage over a PostgreSQL server
started for the run by bench/dbservers.py). With RelStorage, the two sides
are plain RelStorage (its own process-local cache, default settings) and
the same ``<relstorage>`` section wrapped in ``<tidecache>``, each opened
by the workers from a ZConfig file; the third side adds ``shared-state on``
to that ``<tidecache>`` section. The same workload, the same checks. The
sidecar is restarted on a new arena before every tidecache round.

Environment: DEMO_SECONDS (default 20) per side in all, DEMO_ROUNDS (default
2) rounds it is split into, DEMO_MODULES (default: all),
DEMO_RESULTS (default bench-results/demo.json for ZEO,
bench-results/demo-BASE.json otherwise: what docs/benchmarks.md uses).
"""

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "adapters" / "python" / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import ZODB  # noqa: E402
from ZEO.ClientStorage import ClientStorage  # noqa: E402

import corpus  # noqa: E402
from conftest import Sidecar  # noqa: E402  (the tests' server fixtures)
from conftest import ZEOServer  # noqa: E402
from zodbhost import RelStorageHost  # noqa: E402  (the benchmarks' RelStorage setup)

WORKERS = 4
SECONDS = float(os.environ.get("DEMO_SECONDS", "20"))
ROUNDS = max(1, int(os.environ.get("DEMO_ROUNDS", "2")))
MODULES = int(os.environ.get("DEMO_MODULES", "0")) or None
TOP_WORDS = 20000


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


#: --base: what the sides run on, as the table's column titles say
#: (plain, tidecache, tidecache with shared state), and the base's name.
BASES = {
    "zeo": ("plain ZODB", "ZODB + tidecache", "+ shared state", "ZEO"),
    "relstorage-sqlite": ("RelStorage", "RS + tidecache", "+ shared state", "RelStorage/SQLite"),
    "relstorage-postgresql": ("RelStorage", "RS + tidecache", "+ shared state", "RelStorage/PostgreSQL"),
}
SIDES = ("plain", "tidecache", "shared")


def shared_state_available():
    """Whether this tree has shared state (issue 10: ``tidecache.DB``)."""
    try:
        import tidecache
        import tidecache.shared  # noqa: F401
    except ImportError:
        return False
    return hasattr(tidecache, "DB")


def run(mode, zeo, sidecar, words_path, tmp, seconds):
    """One run: WORKERS readers and one writer for ``seconds``; returns the
    readers' and the writer's result documents. ``mode``: a side of
    :data:`SIDES` (``shared``: the workers' ``DB`` has shared state);
    ``zeo``: the ZEO socket or ``zconfig:PATH``; ``sidecar``: None (plain),
    or anything with a ``socket``."""
    sock = sidecar.socket if sidecar else "none"
    flags = ["shared"] if mode == "shared" else []
    procs = []
    for i in range(WORKERS):
        out = os.path.join(tmp, "%s-reader-%d.json" % (mode, i))
        procs.append((out, subprocess.Popen([sys.executable, str(HERE / "workload.py"), "reader", zeo, sock,
                                             str(seconds), words_path, out, str(i + 1)] + flags, cwd=HERE)))
    out = os.path.join(tmp, "%s-writer.json" % mode)
    procs.append((out, subprocess.Popen([sys.executable, str(HERE / "workload.py"), "writer", zeo, sock,
                                         str(seconds), words_path, out, "99"] + flags, cwd=HERE)))
    for _, p in procs:
        if p.wait() != 0:
            raise SystemExit("a %s worker failed with exit code %d" % (mode, p.returncode))
    results = []
    for path, _ in procs:
        with open(path) as f:
            results.append(json.load(f))
    return results


def summarize(mode, rounds, sidecar_stats):
    """Aggregates the rounds of one side into one table column."""
    readers = [r for results in rounds for r in results if r["role"] == "reader"]
    writers = [r for results in rounds for r in results if r["role"] == "writer"]
    # Each round's readers ran side by side: a round lasts its longest reader.
    seconds = sum(max(r["seconds"] for r in results if r["role"] == "reader") for results in rounds)
    lat = sorted(x for r in readers for x in r["latencies_us"])
    hits = sum((r["cache"] or {}).get("hits", 0) for r in readers)
    misses = sum((r["cache"] or {}).get("misses", 0) for r in readers)
    rs_hits = sum((r.get("relstorage_cache") or {}).get("hits", 0) for r in readers)
    rs_misses = sum((r.get("relstorage_cache") or {}).get("misses", 0) for r in readers)
    row = {
        "mode": mode,
        "relstorage_hit_ratio": rs_hits / (rs_hits + rs_misses) if rs_hits + rs_misses else None,
        "rounds": len(rounds),
        "requests_per_s": sum(r["searches"] + r["views"] for r in readers) / seconds,
        "requests_per_s_by_round": [
            sum(r["searches"] + r["views"] for r in results if r["role"] == "reader")
            / max(r["seconds"] for r in results if r["role"] == "reader")
            for results in rounds
        ],
        "loads_per_s": sum(r["loads"] for r in readers) / seconds,
        "hit_ratio": hits / (hits + misses) if hits + misses else None,
        "p50_us": lat[len(lat) // 2] if lat else 0,
        "p99_us": lat[int(len(lat) * 0.99)] if lat else 0,
        "views_checked": sum(r["views"] for r in readers),
        "failures": [f for r in readers for f in r["failures"]],
        "commits": sum(w["commits"] for w in writers),
    }
    # Each reader's memory when its run ended: the mean per reader process.
    mem = [r["memory_kib"] for r in readers if r.get("memory_kib")]
    for key, name in (("VmRSS", "reader_rss_kib"), ("RssAnon", "reader_anon_kib"), ("VmHWM", "reader_hwm_kib")):
        values = [m[key] for m in mem if key in m]
        row[name] = sum(values) / len(values) if values else None
    shared = [r["shared_state"] for r in readers if r.get("shared_state")]
    if shared:
        row["shared_state"] = {k: sum(s.get(k, 0) for s in shared)
                               for k in ("hits", "misses", "decoded", "stores", "refused", "fallbacks")}
        row["shared_state"]["bytes_mean"] = sum(s.get("bytes", 0) for s in shared) / len(shared)
        row["shared_state"]["entries_mean"] = sum(s.get("entries", 0) for s in shared) / len(shared)
        row["shared_state"]["fallback_reasons"] = {
            k: sum(s.get(k, 0) for s in shared)
            for k in sorted({k for s in shared for k in s if k.startswith("fallback_")})}
        looked_up = row["shared_state"]["hits"] + row["shared_state"]["misses"]
        row["template_hit_ratio"] = row["shared_state"]["hits"] / looked_up if looked_up else None
    if sidecar_stats:
        row["sidecar_entries"] = max(s["entries"] for s in sidecar_stats)
        row["sidecar_bytes"] = max(s["bytes"] for s in sidecar_stats)
        row["sidecar_rss_kib"] = max(s["rss_kib"] for s in sidecar_stats)
    return row


def free_port():
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(address, database="demo"):
    """``(hits, misses)`` of ``database`` as the sidecar's metrics endpoint
    at ``address`` serves them (what ``curl http://ADDRESS/metrics`` shows):
    the host-wide counts every worker process sent."""
    with urllib.request.urlopen("http://%s/metrics" % address, timeout=5) as r:
        text = r.read().decode()
    counts = {}
    for name in ("hits", "misses"):
        m = re.search(r'^tidecache_%s_total\{database="%s"\} (\d+)$' % (name, re.escape(database)), text, re.M)
        counts[name] = int(m.group(1)) if m else 0
    return counts["hits"], counts["misses"]


def metrics_check(address, results):
    """Scrapes the endpoint after a round's workers closed (each sent its
    counts when it closed) and sets it beside the workers' own count
    (``cache_stats()`` of every worker, the writer's too); prints both and
    returns them."""
    hits, misses = scrape(address)
    own_hits = sum((r["cache"] or {}).get("hits", 0) for r in results)
    own_misses = sum((r["cache"] or {}).get("misses", 0) for r in results)
    sample = {
        "endpoint_hits": hits, "endpoint_misses": misses,
        "endpoint_hit_ratio": hits / (hits + misses) if hits + misses else None,
        "own_hits": own_hits, "own_misses": own_misses,
        "own_hit_ratio": own_hits / (own_hits + own_misses) if own_hits + own_misses else None,
    }
    print("  curl http://%s/metrics: tidecache_hits_total %d, tidecache_misses_total %d (%s); "
          "the workers' own count: %d hits, %d misses (%s)"
          % (address, hits, misses, _percent(sample["endpoint_hit_ratio"]), own_hits, own_misses,
             _percent(sample["own_hit_ratio"])))
    return sample


def _percent(ratio):
    return "-" if ratio is None else "%.1f%% hits" % (100 * ratio)


class _SidecarOf:
    """The host's sidecar seen as ``run`` wants it (``.socket``)."""

    def __init__(self, host):
        self.socket = host.sidecar_socket


def rounds_relstorage(base, t0, sides):
    """The RelStorage demo: ``{side: summary}`` for ``sides``."""
    backend = base.split("-", 1)[1]
    host = RelStorageHost(backend, databases=("demo",), prefix="tidecache-demo-rs-")
    tmp = host.dir
    try:
        print("tidecache demo in %s (RelStorage over %s)" % (tmp, backend))
        modules = corpus.stdlib_modules(MODULES)
        print("loading %d modules of the standard library into ZODB over RelStorage/%s ..." % (len(modules), backend))
        db = ZODB.DB(host.open_storage("demo"))
        freq = corpus.load(db, modules)
        with db.transaction() as conn:
            n_sections = len(conn.root()["sections"])
            n_words = len(conn.root()["index"])
        db.close()
        words_path = os.path.join(tmp, "words.json")
        with open(words_path, "w") as f:
            json.dump(freq.most_common(TOP_WORDS), f)
        print("corpus: %d modules, %d sections, %d indexed words (%.0f s)"
              % (len(modules), n_sections, n_words, time.time() - t0))
        confs = {}
        for mode in sides:
            text = host.storage_zconfig("demo", tidecache=mode != "plain")
            if mode == "shared":  # the same <tidecache> section, with shared state
                head, tail = text.split("<tidecache>\n", 1)
                text = head + "<tidecache>\n  shared-state on\n" + tail
            confs[mode] = os.path.join(tmp, "%s.conf" % mode)
            with open(confs[mode], "w") as f:
                f.write(text)
            print("%s side:\n%s" % (mode, text))
        per_round = SECONDS / ROUNDS
        rounds = {mode: [] for mode in sides}
        sidecar_stats = {mode: [] for mode in sides}
        for n in range(1, ROUNDS + 1):
            for mode in sides:
                if mode == "plain":
                    print("round %d/%d: plain RelStorage, %d workers x 4 connections + 1 writer, %.0f s ..."
                          % (n, ROUNDS, WORKERS, per_round))
                    rounds[mode].append(run("plain", "zconfig:" + confs["plain"], None, words_path, tmp, per_round))
                    continue
                host.restart_sidecar()
                print("round %d/%d: RelStorage + tidecache%s (a new tidecached on %s), same workload ..."
                      % (n, ROUNDS, " with shared state" if mode == "shared" else "", host.sidecar_socket))
                rounds[mode].append(run(mode, "zconfig:" + confs[mode], _SidecarOf(host), words_path, tmp,
                                        per_round))
                stats = host.sidecar_stats()["total"]
                stats["rss_kib"] = rss_kib(host.sidecar.pid)
                sidecar_stats[mode].append(stats)
        return {mode: summarize(mode, rounds[mode], sidecar_stats[mode] or None) for mode in sides}
    finally:
        host.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", choices=sorted(BASES), default="zeo",
                    help="the storage under every side (default zeo)")
    ap.add_argument("--without-shared", action="store_true",
                    help="leave out the third side, tidecache with shared state")
    args = ap.parse_args()
    t0 = time.time()
    sides = [s for s in SIDES if s != "shared" or (not args.without_shared and shared_state_available())]
    if "shared" not in sides and not args.without_shared:
        print("this tree has no shared state (tidecache.DB): the third side is left out")
    if args.base != "zeo":
        summaries = rounds_relstorage(args.base, t0, sides)
    else:
        summaries = rounds_zeo(t0, sides)
    return report(args.base, summaries, t0)


def rounds_zeo(t0, sides):
    """The ZEO demo: ``{side: summary}`` for ``sides``."""
    with tempfile.TemporaryDirectory(prefix="tidecache-demo-") as tmp:
        print("tidecache demo in %s" % tmp)
        zeo = ZEOServer(tmp)
        sidecar = None
        try:
            modules = corpus.stdlib_modules(MODULES)
            print("loading %d modules of the standard library into ZODB over ZEO ..." % len(modules))
            db = ZODB.DB(ClientStorage(zeo.address))
            freq = corpus.load(db, modules)
            with db.transaction() as conn:
                n_sections = len(conn.root()["sections"])
                n_words = len(conn.root()["index"])
            db.close()
            words_path = os.path.join(tmp, "words.json")
            with open(words_path, "w") as f:
                json.dump(freq.most_common(TOP_WORDS), f)
            print("corpus: %d modules, %d sections, %d indexed words (%.0f s)"
                  % (len(modules), n_sections, n_words, time.time() - t0))

            per_round = SECONDS / ROUNDS
            rounds = {mode: [] for mode in sides}
            sidecar_stats = {mode: [] for mode in sides}
            samples = {mode: [] for mode in sides}
            for n in range(1, ROUNDS + 1):
                for mode in sides:
                    if mode == "plain":
                        print("round %d/%d: plain ZODB over ZEO, %d workers x 4 connections + 1 writer, %.0f s ..."
                              % (n, ROUNDS, WORKERS, per_round))
                        rounds[mode].append(run("plain", zeo.address, None, words_path, tmp, per_round))
                        continue
                    metrics = "127.0.0.1:%d" % free_port()
                    sidecar = Sidecar(tmp, memory_mb=256, extra=["--metrics-listen", metrics])
                    print("round %d/%d: ZODB + tidecache%s (a new tidecached on %s), same workload ..."
                          % (n, ROUNDS, " with shared state" if mode == "shared" else "", sidecar.socket))
                    rounds[mode].append(run(mode, zeo.address, sidecar, words_path, tmp, per_round))
                    samples[mode].append(metrics_check(metrics, rounds[mode][-1]))
                    stats = sidecar.stats()["total"]
                    stats["rss_kib"] = rss_kib(sidecar.proc.pid)
                    sidecar_stats[mode].append(stats)
                    sidecar.stop()
                    sidecar = None
            summaries = {mode: summarize(mode, rounds[mode], sidecar_stats[mode] or None) for mode in sides}
            for mode in sides:
                if samples[mode]:
                    summaries[mode]["metrics_samples"] = samples[mode]
        finally:
            if sidecar:
                sidecar.stop()
            zeo.close()
    return summaries


def report(base, summaries, t0):
    """Prints the table, writes the results; the exit code."""
    plain, cached = summaries["plain"], summaries["tidecache"]
    sides = [s for s in SIDES if s in summaries]
    rows = [
        ("requests/s", "%.0f", "requests_per_s"),
        ("requests/s by round", "%s", "requests_per_s_by_round"),
        ("loads/s (storage loads)", "%.0f", "loads_per_s"),
        ("sidecar hit ratio", "%s", "hit_ratio"),
        ("template hit ratio", "%s", "template_hit_ratio"),
        ("RelStorage cache hit ratio", "%s", "relstorage_hit_ratio"),
        ("p50 load latency (us)", "%.1f", "p50_us"),
        ("p99 load latency (us)", "%.1f", "p99_us"),
        ("writer commits", "%d", "commits"),
        ("section views checked", "%d", "views_checked"),
        ("snapshot check failures", "%d", "failures"),
        ("sidecar revisions", "%s", "sidecar_entries"),
        ("sidecar state bytes", "%s", "sidecar_bytes"),
        ("sidecar RSS (KiB)", "%s", "sidecar_rss_kib"),
        ("reader RSS at end (MiB)", "%.1f", "reader_rss_mib"),
        ("reader RssAnon at end (MiB)", "%.1f", "reader_anon_mib"),
        ("reader peak RSS (MiB)", "%.1f", "reader_hwm_mib"),
    ]
    for r in summaries.values():
        for key in ("rss", "anon", "hwm"):
            v = r.get("reader_%s_kib" % key)
            r["reader_%s_mib" % key] = None if v is None else v / 1024
    if base == "zeo":
        rows = [r for r in rows if r[2] != "relstorage_hit_ratio"]
    print()
    if "shared" not in sides:
        rows = [r for r in rows if r[2] != "template_hit_ratio"]
    print("on %s:" % BASES[base][3])
    print("%-28s" % "" + "".join("%17s" % BASES[base][SIDES.index(s)] for s in sides))
    for label, fmt, key in rows:
        cells = []
        for r in (summaries[s] for s in sides):
            v = r.get(key)
            if key == "failures":
                v = len(v)
            if key == "requests_per_s_by_round":
                v = " ".join("%.0f" % x for x in v)
            if key in ("hit_ratio", "relstorage_hit_ratio", "template_hit_ratio") and v is not None:
                cells.append("%.1f%%" % (100 * v))
            elif v is None:
                cells.append("-")
            else:
                cells.append(fmt % v)
        print("%-28s" % label + "".join("%17s" % c for c in cells))
    if "shared" in summaries:
        p_rss, s_rss = plain.get("reader_rss_kib"), summaries["shared"].get("reader_rss_kib")
        t_rss = cached.get("reader_rss_kib")
        if p_rss and s_rss and t_rss:
            print("reader RSS with shared state: %.0f%% of plain's, %.0f%% of tidecache's; requests/s: %.2fx plain's"
                  % (100 * s_rss / p_rss, 100 * s_rss / t_rss,
                     summaries["shared"]["requests_per_s"] / plain["requests_per_s"]))
        st = summaries["shared"].get("shared_state")
        if st:
            print("shared state (all readers): %d hits, %d misses, %d decoded, %d fallbacks %s"
                  % (st["hits"], st["misses"], st["decoded"], st["fallbacks"], st["fallback_reasons"]))
    print()
    default = "demo.json" if base == "zeo" else "demo-%s.json" % base
    results = pathlib.Path(os.environ.get("DEMO_RESULTS") or ROOT / "bench-results" / default)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "w") as f:
        json.dump(dict({"base": base, "seconds": SECONDS, "rounds": ROUNDS, "workers": WORKERS,
                        "sides": sides}, **summaries), f, indent=1)
    shared = summaries.get("shared", {"failures": [], "views_checked": 0})
    if cached["failures"] or shared["failures"] or (plain["failures"] and base == "zeo"):
        failures = plain["failures"] + cached["failures"] + shared["failures"]
        print("CONSISTENCY CHECK FAILED: %d torn snapshots (%d plain, %d with tidecache, %d with shared state), e.g. %s"
              % (len(failures), len(plain["failures"]), len(cached["failures"]), len(shared["failures"]),
                 failures[0]))
        return 1
    if plain["failures"]:
        # Plain RelStorage 4.3 with its process-local cache has shown torn
        # snapshots in this workload with no tidecache code in the process
        # (docs/benchmarks.md, "The demo on RelStorage/SQLite"): that check
        # is RelStorage's, reported as such, and does not fail the run.
        print("PLAIN RELSTORAGE'S OWN CONSISTENCY CHECK FAILED: %d torn snapshots without tidecache, e.g. %s"
              % (len(plain["failures"]), plain["failures"][0]))
        print("consistency with tidecache: every one of %d section views saw its document's checksum match "
              "its sections" % (cached["views_checked"] + shared["views_checked"]))
    else:
        print("consistency: every one of %d section views saw its document's checksum match its sections"
              % (plain["views_checked"] + cached["views_checked"] + shared["views_checked"]))
    if not cached["hit_ratio"]:
        print("CHECK FAILED: the tidecache run never hit the sidecar")
        return 1
    for side in sides:
        for sample in summaries[side].get("metrics_samples", []):
            endpoint, own = sample["endpoint_hit_ratio"], sample["own_hit_ratio"]
            if not sample["endpoint_hits"] or endpoint is None or own is None or abs(endpoint - own) > 0.01:
                print("CHECK FAILED: the metrics endpoint's hit ratio does not match the workers' own count: %s"
                      % sample)
                return 1
    if "shared" in summaries and not summaries["shared"].get("template_hit_ratio"):
        print("CHECK FAILED: the shared-state run never activated an object from a template")
        return 1
    print("figures written to %s (%.0f s in all)" % (results, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
