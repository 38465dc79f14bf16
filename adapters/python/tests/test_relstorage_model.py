"""tidecache over RelStorage against a reference model: seeded random runs
of commits by several "processes" (storages, each with its own client,
coordinator and poll), readers that keep old views open and read again,
pools emptied, RelStorage coordinators started anew, new workers, and the
sidecar killed and started again. Every value read must be the writer's
history at the reader's view (the model: the values of every committed
tid), and the cache must have served hits (the run must use it)."""

import os
import random

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

pytest.importorskip("relstorage")

from test_relstorage import data_dir  # noqa: E402,F401 (fixtures)
from test_relstorage import keep_history  # noqa: E402,F401
from test_relstorage import open_relstorage  # noqa: E402

from tidecache import TideCacheStorage  # noqa: E402

KEYS = ["k%d" % i for i in range(8)]


class Model:
    """The writer's history: ``[(tid, {key: value})]``, each entry the
    whole state after the commit ``tid``."""

    def __init__(self):
        self.history = []

    def committed(self, tid, values):
        state = dict(self.history[-1][1]) if self.history else {}
        state.update(values)
        self.history.append((tid, state))

    def at(self, view):
        state = None
        for tid, s in self.history:
            if tid <= view:
                state = s
        return state


def view_of(conn):
    return conn._storage._storage._cache.highest_visible_tid


def run(seed, sidecar, data_dir, keep_history, steps):
    rng = random.Random(seed)
    model = Model()
    dbs = [ZODB.DB(TideCacheStorage(open_relstorage(data_dir, keep_history), socket=sidecar.socket))
           for _ in range(3)]
    readers = []
    counter = 0
    checked = 0

    def check(conn, tm, expected_view=None):
        nonlocal checked
        values = {k: conn.root()[k]["v"] for k in KEYS}
        view = view_of(conn)
        if expected_view is not None:
            assert view == expected_view
        assert values == model.at(view), (seed, view, values, model.at(view))
        checked += 1
        return view

    try:
        tm = transaction.TransactionManager()
        conn = dbs[0].open(transaction_manager=tm)
        for k in KEYS:
            conn.root()[k] = PersistentMapping(v=0)
        tm.commit()
        model.committed(conn._storage._storage.lastTransactionInt(), {k: 0 for k in KEYS})
        conn.close()
        for _ in range(steps):
            op = rng.random()
            p = rng.randrange(len(dbs))
            if op < 0.35:
                counter += 1
                keys = rng.sample(KEYS, rng.randint(1, 3))
                tm = transaction.TransactionManager()
                conn = dbs[p].open(transaction_manager=tm)
                for k in keys:
                    conn.root()[k]["v"] = counter
                tm.commit()
                tid = conn._storage._storage.lastTransactionInt()
                model.committed(tid, {k: counter for k in keys})
                conn.close()
            elif op < 0.6:
                tm = transaction.TransactionManager()
                conn = dbs[p].open(transaction_manager=tm)
                view = check(conn, tm)
                readers.append((conn, tm, view))
            elif op < 0.75 and readers:
                conn, tm, view = rng.choice(readers)
                conn.cacheMinimize()
                check(conn, tm, view)
            elif op < 0.82 and readers:
                conn, tm, view = readers.pop(rng.randrange(len(readers)))
                tm.abort()
                conn.close()
            elif op < 0.88:
                dbs[p].pool.clear()
            elif op < 0.92:
                dbs[p].storage._storage._cache.polling_state.flush_all()
            elif op < 0.96:
                # A new worker in place of p (its readers closed first).
                for conn, tm, view in [r for r in readers if r[0].db() is dbs[p]]:
                    tm.abort()
                    conn.close()
                readers = [r for r in readers if r[0].db() is not dbs[p]]
                dbs[p].close()
                dbs[p] = ZODB.DB(TideCacheStorage(open_relstorage(data_dir, keep_history),
                                                  socket=sidecar.socket))
            else:
                sidecar.kill()
                sidecar.start()
        for conn, tm, view in readers:
            conn.cacheMinimize()
            check(conn, tm, view)
        hits = sum(db.storage.cache_stats()["hits"] for db in dbs)
        return checked, hits
    finally:
        for conn, tm, view in readers:
            tm.abort()
            conn.close()
        for db in dbs:
            db.close()


@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("TIDECACHE_RS_SEEDS", "1 2 3").split()])
def test_every_read_is_the_history_at_its_view(sidecar, data_dir, keep_history, seed):
    checked, hits = run(seed, sidecar, data_dir, keep_history, steps=150)
    assert checked > 30
    assert hits > 0
