"""Load with faults, short (bench/faultload.py): 2 processes x 4 threads of
a ZODB application over a real ZEO server, each wrapping its storage in
TideCacheStorage, while the sidecar is killed with SIGKILL and restarted on
the same socket and arena file, stopped with SIGSTOP and continued, workers
fork children that use their inherited DB, and workers are killed and
replaced: 3 faults of each kind, at fixed points of the run (after given
numbers of requests), not at wall-clock times.

What must hold (invariants 1 and 8 under faults): no torn snapshot, no
value that goes back, no state other than loadBefore's at the view (spot
checks, and every observation against the FileStorage's history), every
process (workers, replacements, forked children) exits within its bound.
Nothing about throughput is asserted. ``make soak`` runs the 8 x 8 version
for ``SOAK_SECONDS``.

Forks happen at a quiescent point of the forking worker (its request
threads wait between requests, the adapter's report lock is held), as a
gunicorn --preload master forks: background threads (ZEO's, the store
queue's) still run.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
FAULTLOAD = ROOT / "bench" / "faultload.py"

SEED = 20261123
FAULTS_OF_EACH_KIND = 3


def test_faults_degrade_to_misses_under_load(tmp_path):
    out = tmp_path / "faultload.json"
    proc = subprocess.run(
        [sys.executable, str(FAULTLOAD), "--processes", "2", "--threads", "4", "--requests", "12000",
         "--faults", str(FAULTS_OF_EACH_KIND), "--seed", str(SEED), "--no-reference", "--json", str(out),
         "--exit-bound", "120", "--bound", "900"],
        capture_output=True, text=True, timeout=1500, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    print(proc.stdout[-20000:])
    print(proc.stderr[-20000:], file=sys.stderr)
    result = json.loads(out.read_text())
    run = result["runs"][-1]
    assert run["torn"] == 0, run["failures"]
    assert run["went_back"] == 0, run["failures"]
    assert run["wrong"] == 0, run["failures"]
    assert run["hangs"] == 0, run["failures"]
    assert run["failures"] == [], run["failures"]
    # Every fault was injected, and every forked child ran to its end.
    assert run["faults"] == {k: FAULTS_OF_EACH_KIND for k in ("sidecar_kill", "sidecar_stop", "fork", "worker_kill")}
    assert run["children_forked"] == run["children_finished"] == FAULTS_OF_EACH_KIND
    assert run["observations_checked"] > 0 and run["spot_checks"] > 0
    assert proc.returncode == 0
