"""Hit ratio of the arena's eviction policy against RelStorage's segmented
LRU (``LocalClient``), on the same key sequences and the same bytes.

Two traces over 100,000 oids whose states are 64 B to 8 KiB (log-normal,
median ~700 B, fixed per oid), 1,000,000 requests each:

- **zipf**: popularity Zipf(1.0) over the oids, in random oid order;
- **scan**: the same stream, with a scan of 30,000 oids read once each
  (a catalog rebuild, a crawler) after every 100,000 requests.

Each request looks the oid up; a miss stores it (at its full size). The
arena runs as the sidecar does (``core/examples/eviction.rs``): S3-FIFO, with
the eviction hints sampled 1 hit in 2 as the Python client sends them, and
with every hit reported; plain FIFO as the floor. ``LocalClient`` gets the same
byte budget (``cache_local_mb`` = arena bytes / 10^6, compression off).

Writes ``bench-results/eviction.json``; ``bench/report.py`` builds the table
in docs/benchmarks.md. Part of ``make bench``.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OIDS = 100_000
REQUESTS = 1_000_000
BUDGETS_MB = [8, 32]


def sizes(rng):
    s = rng.lognormal(mean=np.log(700), sigma=1.0, size=OIDS * 2)
    return np.clip(s, 64, 8192).astype(np.uint32)


def zipf_stream(rng, n):
    ranks = np.arange(1, OIDS + 1, dtype=np.float64)
    p = 1.0 / ranks
    cdf = np.cumsum(p / p.sum())
    draws = np.searchsorted(cdf, rng.random(n))
    order = rng.permutation(OIDS)  # popularity unrelated to oid order
    return order[np.minimum(draws, OIDS - 1)].astype(np.uint64)


def with_scans(rng, stream, every=100_000, length=30_000):
    parts, cold = [], OIDS  # scanned oids: a cold range, read once each
    for start in range(0, len(stream), every):
        parts.append(stream[start:start + every])
        parts.append(np.arange(cold, cold + length, dtype=np.uint64))
        cold += length
    return np.concatenate(parts)


def write_trace(path, keys, size_of):
    rec = np.zeros(len(keys), dtype=[("oid", "<u8"), ("len", "<u4")])
    rec["oid"] = keys
    rec["len"] = size_of[keys % len(size_of)]
    rec.tofile(path)


def run_arena(trace, budget, policy, touch_every):
    exe = ROOT / "target" / "release" / "examples" / "eviction"
    out = subprocess.run([str(exe), trace, str(budget), policy, str(touch_every)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def run_localclient(keys, size_of, budget):
    from relstorage.cache.local_client import LocalClient
    from relstorage.options import Options
    local = LocalClient(Options(cache_local_mb=budget / 1e6, cache_local_compression="none"))
    blob = os.urandom(8192)
    hits = 0
    for k in keys.tolist():
        key = (k, 1)
        if local.get(key) is not None:
            hits += 1
        else:
            local[key] = (blob[:size_of[k % len(size_of)]], 1)
    return {"requests": len(keys), "hits": hits, "hit_ratio": hits / len(keys)}


def main():
    rng = np.random.default_rng(20261122)
    size_of = sizes(rng)
    base = zipf_stream(rng, REQUESTS)
    traces = {"zipf": base, "scan": with_scans(rng, base)}
    results = {"oids": OIDS, "requests": REQUESTS, "budgets_mb": BUDGETS_MB, "runs": {}}
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tidecache-core", "--example", "eviction"],
                   check=True, cwd=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        for name, keys in traces.items():
            path = os.path.join(tmp, name + ".trace")
            write_trace(path, keys, size_of)
            for mb in BUDGETS_MB:
                budget = mb << 20
                row = {}
                t = time.perf_counter()
                row["tidecache_s3fifo"] = run_arena(path, budget, "s3fifo", 2)
                row["tidecache_s3fifo_every_hit"] = run_arena(path, budget, "s3fifo", 1)
                row["tidecache_fifo"] = run_arena(path, budget, "fifo", 1)
                row["relstorage_localclient"] = run_localclient(keys, size_of, budget)
                results["runs"]["%s/%d" % (name, mb)] = row
                print("%-6s %3d MiB  %s  (%.1fs)" % (name, mb, "  ".join(
                    "%s %.3f" % (k, v["hit_ratio"]) for k, v in row.items()), time.perf_counter() - t))
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "eviction.json").write_text(json.dumps(results, indent=1))
    print("written to bench-results/eviction.json")


if __name__ == "__main__":
    sys.exit(main())
