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

import faulthandler
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
FAULTLOAD = ROOT / "bench" / "faultload.py"

SEED = 20261123
FAULTS_OF_EACH_KIND = 3
CHILD_BOUND = 8  # seconds: a forked child's calls take at most the client's timeout each


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


def _blocked_reading(native_id):
    """Whether thread ``native_id`` of this process waits in read,
    recvfrom or recvmsg (x86-64 syscalls 0, 45 and 47; a connection's
    Hello answer is read with recvmsg, for the arena's descriptor): inside
    a client call, holding its lock."""
    try:
        with open("/proc/self/task/%d/syscall" % native_id) as f:
            return f.read().split()[0] in ("0", "45", "47")
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not (hasattr(os, "fork") and sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="reads x86-64 Linux syscall numbers from /proc")
def test_a_child_forked_while_a_call_is_in_flight_does_not_hang(sidecar):
    """The sidecar is stopped (SIGSTOP); a thread's call waits for its
    answer, holding the client's lock; the process forks right then (seen
    in /proc, not timed). The child's calls must degrade to misses within
    the client's timeout, never wait for a lock no thread of the child will
    release (the client keeps per-process state: adapters/client fork.rs).
    Without that the child hung here (seen: faulthandler's exit after
    CHILD_BOUND)."""
    from tidecache import Client
    from tidecache import TideCacheError

    c = Client(sidecar.socket, database="fork-busy", timeout_ms=1000)
    c.attach(10)
    sidecar.proc.send_signal(signal.SIGSTOP)
    try:
        ready = threading.Event()
        native = []

        def call():
            native.append(threading.get_native_id())
            ready.set()
            try:
                c.stats()
            except TideCacheError:
                pass

        t = threading.Thread(target=call)
        t.start()
        ready.wait()
        deadline = time.monotonic() + 30
        while not _blocked_reading(native[0]):
            assert time.monotonic() < deadline, "the call never blocked on the stopped sidecar"
            time.sleep(0.001)
        pid = os.fork()
        if pid == 0:
            faulthandler.dump_traceback_later(CHILD_BOUND, exit=True)
            try:
                view = c.register_view(10)
                c.release_view(view)
                try:
                    c.lookup(1, 10)
                except TideCacheError:
                    pass
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        t.join()
    finally:
        sidecar.proc.send_signal(signal.SIGCONT)
    assert status == 0, "the forked child hung in its first call (faulthandler exited it after %ss)" % CHILD_BOUND
