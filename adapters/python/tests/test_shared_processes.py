"""Shared state (issue 10) in several processes over one real ZEO server and
one sidecar: each process (shared_worker.py) runs writer threads
(read-modify-commit of shared counters' nested containers, conflicts
retried) and a reader thread that checks every value against plain ZODB's
at the same view; afterwards every committed entry is in its counter
exactly once."""

import json
import os
import subprocess
import sys

from shared_worker import Item  # noqa: F401 (the counters' class, pickled by module name)
from shared_worker import check_totals
from shared_worker import mechanism
from shared_worker import setup_counters
from test_shared_isolation import rs_base  # noqa: F401 (a fixture)
from test_shared_isolation import servers  # noqa: F401 (a fixture)
from test_shared_isolation import zeo_base  # noqa: F401 (a fixture)

WORKER = os.path.join(os.path.dirname(__file__), "shared_worker.py")
PROCESSES = 3
WRITERS = 2
READERS = 1
COMMITS = 10


def run_workers(base, kind, where, prefix, processes, writers, readers, commits):
    """``processes`` worker processes (``kind`` threads or gevent) over
    ``base`` (``where``: ``zeo`` or ``relstorage``); checks their reads and
    the counters' totals; returns their results."""
    mode = "shared" if mechanism() else "plain"
    db = base.open("plain")
    try:
        setup_counters(db, prefix)
    finally:
        db.close()
    env = dict(os.environ, SHARED_PREFIX=prefix, SHARED_DATABASE=base.database)
    location = base.address if where == "zeo" else base.spec["data_dir"]
    procs = [subprocess.Popen([sys.executable, WORKER, kind, where, location, base.sidecar, mode,
                               str(writers), str(readers), str(commits), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for seed in range(1, processes + 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, "worker failed (%s):\n%s" % (p.returncode, err[-4000:])
        results.append(json.loads(out))
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures[:10])
    written = {"%d-%s" % (i, w): e for i, r in enumerate(results) for w, e in r["written"].items()}
    db = base.open("plain")
    try:
        wrong = check_totals(db, prefix, written)
    finally:
        db.close()
    assert not wrong, wrong
    assert sum(r["commits"] for r in results) == processes * writers * commits
    assert all(r["reads"] > 0 for r in results), [r["reads"] for r in results]
    if mode == "shared":
        assert all(r["hits"] > 0 for r in results), [r["stats"] for r in results]
    return results


def test_processes_read_their_views_while_others_commit(zeo_base):  # noqa: F811
    run_workers(zeo_base, "threads", "zeo", "procs-", PROCESSES, WRITERS, READERS, COMMITS)


def test_processes_over_relstorage(rs_base):  # noqa: F811
    """The same over RelStorage/SQLite."""
    run_workers(rs_base, "threads", "relstorage", "rs-procs-", processes=3, writers=2, readers=1, commits=6)
