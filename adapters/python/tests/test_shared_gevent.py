"""Shared state (issue 10) with gevent: a monkey-patched process
(shared_worker.py ``gevent``, patched before anything imports threading
or socket) runs writer greenlets (read-modify-commit of shared counters'
nested containers, conflicts retried) and reader greenlets that check
every value against plain ZODB's at the same view; afterwards every
committed entry is in its counter exactly once.

Over ZEO (the reference read through the wrapped storage's own client:
ZEO cannot run a second client in a monkey-patched process, "Cannot run
the event loop while another loop is running", with or without
tidecache) and over RelStorage/SQLite with its gevent driver (``gevent
sqlite3``)."""

import os

import pytest

pytest.importorskip("gevent")
pytest.importorskip("relstorage")

from test_shared_isolation import rs_base  # noqa: E402,F401 (a fixture)
from test_shared_isolation import servers  # noqa: E402,F401 (a fixture)
from test_shared_isolation import zeo_base  # noqa: E402,F401 (a fixture)
from test_shared_processes import run_workers  # noqa: E402


def test_greenlets_over_zeo(zeo_base):  # noqa: F811
    (result,) = run_workers(zeo_base, "gevent", "zeo", "gevent-zeo-", processes=1, writers=4, readers=2,
                            commits=10)
    assert result["patched"], "the worker was not monkey-patched"


def test_greenlets_over_relstorage(rs_base):  # noqa: F811
    (result,) = run_workers(rs_base, "gevent", "relstorage", "gevent-", processes=1, writers=3, readers=2,
                            commits=6)
    assert result["patched"], "the worker was not monkey-patched"

