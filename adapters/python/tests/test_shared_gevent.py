"""Shared state (issue 10) with gevent: a monkey-patched process
(shared_worker.py ``gevent``, patched before anything imports threading
or socket) runs writer greenlets (read-modify-commit of shared counters'
nested containers, conflicts retried) and reader greenlets that check
every value against plain ZODB's at the same view; afterwards every
committed entry is in its counter exactly once.

Over RelStorage/SQLite with its gevent driver (``gevent sqlite3``), the
base tidecache supports under gevent: ZEO's client runs an asyncio loop
in a thread of its own, which gevent's patched threading cannot host
(``RuntimeError: Cannot run the event loop while another loop is
running``), with or without tidecache."""

import os

import pytest

pytest.importorskip("gevent")
pytest.importorskip("relstorage")

from test_shared_isolation import rs_base  # noqa: E402,F401 (a fixture)
from test_shared_isolation import servers  # noqa: E402,F401 (a fixture)
from test_shared_processes import run_workers  # noqa: E402


def test_greenlets_read_their_views_while_others_commit(rs_base):  # noqa: F811
    (result,) = run_workers(rs_base, "gevent", "relstorage", "gevent-", processes=1, writers=4, readers=2,
                            commits=10)
    assert result["patched"], "the worker was not monkey-patched"


def test_processes_over_relstorage(rs_base):  # noqa: F811
    """The same in three processes of threads over RelStorage/SQLite."""
    run_workers(rs_base, "threads", "relstorage", "rs-procs-", processes=3, writers=2, readers=1, commits=6)
