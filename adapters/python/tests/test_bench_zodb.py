"""The ZODB benchmarks of ``make bench`` run end to end at a tiny size, so
that a change of the adapter or of the servers' setup that breaks them is
found by ``make test``, not at the next benchmark run: bench/zodbshootout.py
(zodbshootout 0.8 over ZEO, plain and with tidecache, and the truly cold
run) and bench/latestart.py. The figures are not checked (too few, too
noisy); what the harness promises is: every phase asked for has values on
both sides, and the truly cold run's tidecache reads were reads on an empty
sidecar (misses, but for the few objects the processes share)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH = ROOT / "bench"


def test_zodbshootout_smoke(tmp_path):
    out = tmp_path / "zodbshootout.json"
    subprocess.run([sys.executable, str(BENCH / "zodbshootout.py"), "--concurrency", "2", "--values", "1",
                    "--fast-processes", "1", "--phases", "hot", "--cold-iterations", "2", "--no-report",
                    "--output", str(out)], check=True, timeout=600, cwd=tmp_path)
    r = json.loads(out.read_text())
    hot = r["shootout"]["2"]["hot"]
    for side in ("plain", "tidecache"):
        assert len(hot[side]["values"]) == 1 and hot[side]["mean"] > 0
    cold = r["truly_cold"]["2"]
    assert len(cold["plain"]["values"]) == len(cold["tidecache"]["values"]) == 2
    loads = cold["tidecache_loads"]
    # 2 iterations x 2 processes x 1,000 objects, each read on a new sidecar.
    assert loads["misses"] >= 4000, loads
    # Shared by the processes: the root (loaded twice in each: by DB() and
    # by the connection; the second load may find the first one's store),
    # speedtest, object_count_1000. At most 4 per process and iteration may
    # be hits, never the 1,000 objects.
    assert loads["hits"] <= 2 * 2 * 4, loads


def test_latestart_smoke(tmp_path):
    out = tmp_path / "latestart.json"
    subprocess.run([sys.executable, str(BENCH / "latestart.py"), "--commits", "10", "--objects", "300",
                    "--seconds", "0.5", "--output", str(out)], check=True, timeout=300, cwd=tmp_path)
    r = json.loads(out.read_text())
    run = r["runs"]["10"]
    assert run["warm"]["ratio"] > 0.5, run["warm"]
    late = run["late"]
    assert len(late["ratio_by_bucket"]) == 5
    assert sum(late["hits_by_bucket"]) + sum(late["misses_by_bucket"]) > 0
    assert all(p["stats"]["joined"] for p in late["processes"]), late["processes"]


needs_relstorage_adapter = pytest.mark.skipif(
    importlib.util.find_spec("tidecache.relstorage") is None,
    reason="the RelStorage adapter (tidecache/relstorage.py) is not in this tree")


@needs_relstorage_adapter
def test_zodbshootout_relstorage_smoke(tmp_path):
    out = tmp_path / "zodbshootout.json"
    subprocess.run([sys.executable, str(BENCH / "zodbshootout.py"), "--base", "relstorage-sqlite",
                    "--concurrency", "2", "--values", "1", "--fast-processes", "1", "--phases", "hot",
                    "--no-report", "--output", str(out)], check=True, timeout=600, cwd=tmp_path)
    r = json.loads(out.read_text())
    assert r["base"] == "relstorage-sqlite" and r["truly_cold"] == {}
    hot = r["shootout"]["2"]["hot"]
    for side in ("plain", "tidecache"):
        assert len(hot[side]["values"]) == 1 and hot[side]["mean"] > 0


@needs_relstorage_adapter
def test_rs_newworker_smoke(tmp_path):
    out = tmp_path / "rs_newworker.json"
    subprocess.run([sys.executable, str(BENCH / "rs_newworker.py"), "--backends", "sqlite", "--objects", "300",
                    "--requests", "100", "--warm-workers", "1", "--repeats", "1", "--output", str(out)],
                   check=True, timeout=300, cwd=tmp_path)
    r = json.loads(out.read_text())
    contenders = r["backends"]["sqlite"]["contenders"]
    for c in ("relstorage", "relstorage-persistent", "tidecache"):
        assert contenders[c]["total_s"] > 0
    (run,) = contenders["tidecache"]["runs"]
    # The new worker joined the warm sidecar and its 100 reads were hits.
    assert run["tidecache"]["joined"] and run["tidecache"]["hits"] >= 100, run
    assert contenders["relstorage"]["runs"][0]["tidecache"] is None


@needs_relstorage_adapter
def test_rs_memory_smoke(tmp_path):
    out = tmp_path / "rs_memory.json"
    subprocess.run([sys.executable, str(BENCH / "rs_memory.py"), "--backend", "sqlite", "--objects", "300",
                    "--workers", "1", "2", "--output", str(out)], check=True, timeout=300, cwd=tmp_path)
    r = json.loads(out.read_text())
    for c in ("nocache", "relstorage", "tidecache"):
        assert set(r["contenders"][c]) >= {"1", "2"}
    tc = r["contenders"]["tidecache"]
    assert tc["2"]["sidecar_entries"] >= 300, tc["2"]
    assert "ratio_2_to_1" in tc and "ratio_2_to_1" in r["contenders"]["relstorage"]
