"""Review of issue 10 (shared unpickled state): a connection must get
exactly the state ZODB's own ``Connection.setstate`` gives it. Each test is
a defect the review found, seen failing, then fixed: bound builtin methods
shared as leaves, a DAG of tuples walked as a tree, a class value kept
after its module was reloaded (globals are now looked up at every
activation), a connection class's own ``ObjectReader`` or ``setstate``
bypassed and ``ZODB.DB.DB.classFactory`` patched at run time (those now
take ZODB's own path, ``fallback_custom_connection`` and
``fallback_class_factory``)."""

import importlib
import pickle
import sys

import persistent
import pytest
import transaction
import ZODB
import ZODB.Connection
import ZODB.serialize
from ZODB.MappingStorage import MappingStorage

import tidecache
from tidecache import shared


class Obj(persistent.Persistent):
    pass


def tm():
    return transaction.TransactionManager()


def fresh(db):
    t = tm()
    c = db.open(t)
    c.cacheMinimize()
    return t, c


def commit_root(db, **items):
    t = tm()
    c = db.open(t)
    c.root().update(items)
    t.commit()
    c.close()


@pytest.fixture
def mdb():
    db = tidecache.DB(MappingStorage())
    yield db
    db.close()


def store_record(db, oid, serial, data):
    """Writes ``data`` as the record of ``oid`` at the storage level (a
    record written by another pickler than ZODB's)."""
    st = db.storage
    tx = transaction.Transaction()
    st.tpc_begin(tx)
    st.store(oid, serial, data, "", tx)
    st.tpc_vote(tx)
    st.tpc_finish(tx)


def record(klass, state, protocol):
    """A ZODB record (class pickle, state pickle) written by the stdlib's
    pickler with ``protocol``."""
    import io

    f = io.BytesIO()
    p = pickle.Pickler(f, protocol)
    p.dump((klass, None))
    p.dump(state)
    return f.getvalue()


# -- bound builtin methods were classified as immutable leaves ---------------
# Seen failing on 0cbff0a and e3848a1 (connection 2 saw the append); passes
# since 385c749 (a builtin bound to an object is not a leaf): a regression test.


def test_bound_builtin_method_keeps_aliasing_and_is_per_connection(mdb):
    o = Obj()
    commit_root(mdb, o=o)
    items = []
    # ZODB's protocol-3 pickler refuses a bound method; a record written
    # otherwise (protocol 2 here, or a __reduce__ returning getattr) has it.
    data = record(Obj, {"items": items, "add": items.append}, 2)
    store_record(mdb, o._p_oid, o._p_serial, data)
    (_, c1), (_, c2) = fresh(mdb), fresh(mdb)
    a, b = c1.root()["o"], c2.root()["o"]
    a.add("mine")
    # Plain ZODB: one list reached twice; connection 2 has its own.
    assert b.add.__self__ == [], "connection 2 sees connection 1's uncommitted append"
    assert a.items == ["mine"], "the bound method no longer appends to o.items"


# -- a DAG of shared immutable tuples was walked as a tree --------------------
# Seen failing on 0cbff0a and e3848a1 (bytes 164,627,723 for a 150-byte
# record); passes since 385c749 (tuples classified once per decode).


def test_dag_of_shared_tuples_is_decoded_in_linear_time():
    db = tidecache.DB(MappingStorage(), shared_state_mb=4096)
    o = Obj()
    x = ("leaf",)
    for _ in range(20):
        x = (x, x)  # the pickle memoises each tuple: 20 levels, ~150 bytes
    o.dag = x
    commit_root(db, o=o)
    _, c = fresh(db)
    assert c.root()["o"].dag[0][1][0] == x[0][1][0]
    # The template's estimated weight counts 2**20 tuple visits (~160 MB)
    # for a 150-byte record: the walk is exponential in the depth, and the
    # estimate evicts every other template of a 64 MiB cache.
    assert shared.stats(db)["bytes"] < 1 << 20
    db.close()


# -- a class held as a value, replaced at run time -----------------------------


def test_class_value_replaced_at_run_time(mdb, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    (tmp_path / "r10kind.py").write_text("class Kind:\n    gen = 1\n")
    importlib.invalidate_caches()
    import r10kind

    o = Obj()
    o.kind = r10kind.Kind
    commit_root(mdb, o=o)
    _, c = fresh(mdb)
    assert c.root()["o"].kind.gen == 1
    # Code reloaded (a deployment, importlib.reload, a plugin system).
    (tmp_path / "r10kind.py").write_text("class Kind:\n    gen = 22\n")
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "r10kind")
    import r10kind as reloaded

    _, c2 = fresh(mdb)
    kind = c2.root()["o"].kind
    # ZODB's unpickler looks the global up again: the class now in the module.
    assert kind is reloaded.Kind and kind.gen == 22


# -- a connection class of one's own --------------------------------------------


class _Audited(ZODB.Connection.Connection):
    """A connection class that overrides setstate (auditing, access checks)."""

    loads = 0

    def setstate(self, obj):
        _Audited.loads += 1  # not type(self): install() subclasses the klass
        return super().setstate(obj)


class _UpperReader(ZODB.serialize.ObjectReader):
    """An ObjectReader of one's own that transforms states (a migration on
    read, decryption...)."""

    def getState(self, pickle):
        state = super().getState(pickle)
        if isinstance(state, dict) and "v" in state:
            state = dict(state, v=state["v"].upper())
        return state


class _ReaderConnection(ZODB.Connection.Connection):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._reader = _UpperReader(self, self._cache, self._db.classFactory)


def _open_with_klass(klass, shared_state):
    db = ZODB.DB(MappingStorage())
    db.klass = klass
    if shared_state:
        shared.install(db)
    o = Obj()
    o.v = "low"
    commit_root(db, o=o)
    db.open(tm())  # the pooled root connection (class Connection) stays out
    _, c = fresh(db)
    assert isinstance(c, klass)
    return db, c


def test_custom_klass_setstate_is_called():
    _Audited.loads = 0
    db, c = _open_with_klass(_Audited, shared_state=False)
    assert c.root()["o"].v == "low"
    plain = _Audited.loads
    assert plain >= 1
    _Audited.loads = 0
    db, c = _open_with_klass(_Audited, shared_state=True)
    assert c.root()["o"].v == "low"
    assert _Audited.loads == plain, "the connection class's own setstate was bypassed"


def test_custom_klass_reader_is_used():
    _, c = _open_with_klass(_ReaderConnection, shared_state=False)
    assert c.root()["o"].v == "LOW"  # plain ZODB
    _, c = _open_with_klass(_ReaderConnection, shared_state=True)
    assert c.root()["o"].v == "LOW"


# -- DB.classFactory replaced on the class ----------------------------------------


class _OldKind:
    gen = "old"


class _NewKind:
    gen = "new"


def test_class_factory_patched_on_the_db_class(mdb, monkeypatch):
    db_class = sys.modules["ZODB.DB"].DB
    original = db_class.classFactory

    def factory(self, connection, modulename, globalname):
        if globalname == "_OldKind":
            return _NewKind  # a renamed class, mapped as an application does
        return original(self, connection, modulename, globalname)

    o = Obj()
    o.kind = _OldKind
    commit_root(mdb, o=o)
    monkeypatch.setattr(db_class, "classFactory", factory)
    mdb.open(tm())  # the pooled connection, set up before the patch, stays out
    _, c = fresh(mdb)
    # Plain ZODB's ObjectReader asks db.classFactory: _NewKind.
    assert c.root()["o"].kind is _NewKind
