"""tidecache over RelStorage with its gevent SQLite driver (``driver gevent
sqlite3``), in a monkey-patched process: several greenlets, each with its
own ZODB connection, read every object and commit their own, while the
sidecar serves, is stopped (SIGSTOP: every call to it waits for its
timeout), continued, killed and restarted; every load is checked against
the greenlets' logs of committed values by tid (and, history-preserving,
against a plain RelStorage's ``loadBefore``), and the hub is never blocked
for long (a ticker greenlet measures how late it is woken, per phase; the
bound is generous, one second, which a hub blocked by a sidecar call, a
lock or a database wait would break).

The process runs ``relstorage_worker.py gevent`` (the monkey-patching must
come before anything imports ``threading``, ``socket`` or ``time``).
"""

import os
import signal
import tempfile

import pytest

pytest.importorskip("relstorage")
pytest.importorskip("gevent")

import relstorage_worker  # noqa: E402
from relstorage_worker import LoadBefore  # noqa: E402
from relstorage_worker import Stopped  # noqa: E402
from relstorage_worker import run_of  # noqa: E402
from relstorage_worker import wrong_observations  # noqa: E402

GREENLETS = 4
#: The hub may be late by this much at most (a blocked hub is later).
MAX_HUB_LATENESS = 1.0


@pytest.mark.parametrize("keep_history", [False, True], ids=["history-free", "history-preserving"])
def test_greenlets_read_their_views_and_the_hub_is_never_blocked(sidecar, keep_history):
    """Phases: 0 the cache serves; 1 the sidecar is stopped (SIGSTOP:
    every call to it times out); 2 continued; 3 killed (SIGKILL); 4
    restarted on its arena file. In every phase the greenlets go on, read
    right, and the hub stays responsive; hits in phases 0, 2 and 4."""
    with tempfile.TemporaryDirectory(prefix="rs-gevent-") as d:
        data_dir = os.path.join(d, "data")
        os.mkdir(data_dir)
        spec = {"kind": "sqlite", "data_dir": data_dir, "keep_history": keep_history,
                "sidecar": sidecar.socket}
        setup_tid = relstorage_worker.setup(spec, GREENLETS)
        gevent_spec = dict(spec, driver="gevent sqlite3")
        with run_of(gevent_spec) as run:
            try:
                drive(run, sidecar)
            except Stopped as e:
                stopped = str(e)
            else:
                stopped = None
            finally:
                if sidecar.proc.poll() is None:
                    sidecar.proc.send_signal(signal.SIGCONT)
            results, failures = run.finish()
        assert "gevent" in results, "\n".join([stopped or ""] + failures)
        result = results["gevent"]
        histories = {int(w): h for w, h in result["histories"].items()}
        truth = LoadBefore(spec) if keep_history else None
        try:
            wrong = wrong_observations(result["seen"], histories, setup_tid, truth)
        finally:
            if truth is not None:
                truth.close()
    seen = result["seen"]
    assert not wrong, "%d wrong observations of %d, e.g.:\n%s" % (len(wrong), len(seen), "\n".join(wrong[:10]))
    assert stopped is None and not failures and not result["errors"], "\n".join(
        [stopped or ""] + failures + result["errors"] + [str(result["stats"])])
    assert set(result["lateness"]) == {"0", "1", "2", "3", "4"}, result["lateness"]
    assert max(result["lateness"].values()) < MAX_HUB_LATENESS, result["lateness"]
    # Each greenlet committed, and the cache was used.
    assert all(len(h) >= 5 for h in histories.values()), {w: len(h) for w, h in histories.items()}
    assert all(result["counts"][p]["hits"] > 0 for p in ("0", "2", "4")), result["counts"]
    assert len({o[1] for o in seen}) > 10


def drive(run, sidecar):
    # A bound for the worker only: the test stops it with ``stop``.
    run.start("gevent", "gevent", GREENLETS, 300)

    def counts(phase, what):
        return run.count("gevent", phase, what)

    def commits():
        s = run.status("gevent")
        return min(s["commits"].values()) if s else 0

    run.wait("hits", lambda: counts(0, "hits") > 0 and commits() >= 5)
    run.set_phase(1)
    sidecar.proc.send_signal(signal.SIGSTOP)
    run.wait("transactions while the sidecar is stopped", lambda: counts(1, "txns") >= 20)
    sidecar.proc.send_signal(signal.SIGCONT)
    run.set_phase(2)
    run.wait("hits after SIGCONT", lambda: counts(2, "hits") > 0 and counts(2, "txns") >= 20)
    run.set_phase(3)
    sidecar.kill()
    run.wait("transactions while the sidecar is dead", lambda: counts(3, "txns") >= 20)
    sidecar.start()
    run.set_phase(4)
    run.wait("hits after the restart", lambda: counts(4, "hits") > 0 and counts(4, "txns") >= 20)
