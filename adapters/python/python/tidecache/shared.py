"""Shared unpickled state: the connections of a process activate their
objects from one immutable template per ``(oid, serial)``, copy-on-write.

ZODB's ``persistent`` issue #93 asks for it: every connection of a process
(threads, gevent greenlets) unpickles and holds its own copy of the same
hot objects. With shared state, a record is decoded once per process into
a *template* whose persistent references stay symbolic; each activation
builds the connection's state from it in Rust: immutable values (strings,
bytes, numbers, tuples of them, datetimes, classes) are the template's own
objects, shared by every connection; every mutable container (list, dict,
set, bytearray, a tuple holding one or a reference) is a fresh copy,
aliasing kept; references resolve through the connection's own pickle
cache as ZODB's ``ObjectReader`` does. A connection therefore never sees
another's uncommitted change, and no change reaches a template
(docs/shared-state.md; invariant 6 in docs/invariants.md).

Use::

    import tidecache
    db = tidecache.DB(TideCacheStorage(base, socket=...), shared_state=True)

or ``shared-state on`` in the ZConfig ``<tidecache>`` section, or
:func:`install` on an existing ``ZODB.DB``.

Over a :class:`tidecache.TideCacheStorage` (FileStorage, ZEO, RelStorage)
the templates follow the MVCC rules of the sidecar (a per-process
``SnapshotCache`` fed the same invalidation reports): a connection gets
the template of the revision visible at its view without loading anything.
Over any other storage the storage's ``load`` names the serial and the
template of exactly ``(oid, serial)`` is used. ZODB's own path activates
what cannot be shared (counted in :func:`stats`): savepoint data, Broken
classes, persistent classes, states holding instances of other types,
undecodable records, and every object of a database with a class factory
of its own.
"""

import logging

from ZODB.DB import DB as _ZODB_DB
from ZODB.Connection import Connection
from ZODB.POSException import ConflictError
from ZODB.utils import oid_repr

from tidecache._native import SharedStates
from tidecache._native import setstate as _setstate

__all__ = ["DB", "SharedStateConnection", "SharedStateMixin", "install", "stats"]

logger = logging.getLogger("tidecache.shared")

#: Default bound of a database's templates in a process, MiB.
DEFAULT_CAPACITY_MB = 64


#: ZODB's own ``DB.classFactory``, as this module found it.
_ZODB_CLASS_FACTORY = vars(_ZODB_DB)["classFactory"]


def _default_factory(db):
    """Whether ``db`` uses ZODB's own class factory (templates resolve
    classes with it, without a connection): neither the instance, nor its
    class, nor ``ZODB.DB`` itself (patched at run time) has another."""
    if "classFactory" in vars(db):
        return False
    factory = getattr(type(db), "classFactory", None)
    return (factory is _ZODB_CLASS_FACTORY
            and getattr(factory, "__module__", None) == "ZODB.DB"
            and getattr(factory, "__qualname__", None) == "DB.classFactory")


def _plain_reason(conn, db):
    """Why every object of ``conn`` must take ZODB's own path, or
    ``None``: a class factory of the database's own (``class_factory``),
    or a connection class whose ``setstate`` or ``ObjectReader`` is not
    ZODB's (``custom_connection``: they may change what a state is)."""
    if not _default_factory(db):
        return "class_factory"
    from ZODB.serialize import ObjectReader

    if type(conn._reader) is not ObjectReader:
        return "custom_connection"
    mro = type(conn).__mro__
    after = mro[mro.index(SharedStateMixin) + 1:]
    for klass in after:
        if "setstate" in vars(klass):
            if klass is not Connection:
                return "custom_connection"
            break
    return None


def install(db, capacity_mb=DEFAULT_CAPACITY_MB, decode_first=True):
    """Installs shared state on ``db`` (a ``ZODB.DB``) and returns its
    ``SharedStates``: connections opened from now on use a class mixing
    :class:`SharedStateMixin` into ``db.klass``; the template cache is
    bounded to ``capacity_mb`` MiB (estimated bytes of decoded templates)
    and, when ``db.storage`` is a tidecache storage, fed the invalidation
    reports it sends the sidecar. With ``decode_first=False`` a
    revision's first activation in the process is ZODB's own and only a
    second one decodes it into a template (a decode costs more than
    unpickling: for processes that mostly read a revision once).
    Connections already in the pool (ZODB's
    DB opens one to create the root) are switched to the new class; they
    hold no template yet. Idempotent: a second call returns the first's
    states. Raises ``ValueError`` for a non-positive ``capacity_mb``."""
    states = vars(db).get("_tc_shared")
    if states is not None:
        return states
    if capacity_mb <= 0:
        raise ValueError("shared-state-mb must be positive, got %r" % (capacity_mb,))
    states = SharedStates(int(capacity_mb * 1024 * 1024), decode_first)
    share = getattr(db.storage, "_tc_share", None)
    if share is not None:
        share(states)
    db._tc_shared = states
    klass = db.klass
    if not issubclass(klass, SharedStateMixin):
        db.klass = type("Shared" + klass.__name__, (SharedStateMixin, klass),
                        {"__module__": __name__, "_tc_always": True})
    # Pooled connections (the one DB.__init__ used for the root) get the
    # class too: same layout, only methods added.
    for pool in (db.pool, db.historical_pool):
        for conn in _pooled(pool):
            if not isinstance(conn, SharedStateMixin) and type(conn) is klass:
                conn.__class__ = db.klass
                conn._tc_setup(db)
    logger.info("tidecache: shared state on for %s (%s mode, %d MiB of templates)",
                db.database_name, "MVCC" if share is not None else "exact", capacity_mb)
    return states


def _pooled(pool):
    """The connections a ZODB connection pool holds (open or not)."""
    if hasattr(pool, "all"):  # ConnectionPool
        return list(pool.all)
    conns = []  # KeyedConnectionPool: {before: ConnectionPool}
    for sub in getattr(pool, "pools", {}).values():
        conns.extend(sub.all)
    return conns


def stats(db):
    """Counters of ``db``'s templates in this process as a dict (see
    ``SharedStates.stats``: ``activations``, ``hits``, ``misses``,
    ``decoded``, ``entries``, ``bytes``, ``fallbacks`` and
    ``fallback_<reason>``...); an empty dict without shared state."""
    states = vars(db).get("_tc_shared")
    return dict(states.stats()) if states is not None else {}


class SharedStateMixin:
    """Mixed into a ``ZODB.Connection.Connection`` class: ``setstate``
    activates from the database's shared templates (one native call),
    falling back to the class's own ``setstate``.

    ``_tc_always``: a class that installs shared state on every database
    it is used with (``SharedStateConnection``, and the classes
    :func:`install` makes); otherwise only on a database whose storage was
    configured with ``shared-state on``."""

    _tc_always = True
    _tc_states = None
    _tc_plain = None
    #: 0: exact mode; 1: MVCC with the view from the instance's ``_start``
    #: (ZODB's ``MVCCAdapterInstance``); 2: MVCC with the view from the
    #: instance's ``_tc_shared_view()``.
    _tc_mvcc = 0

    def __init__(self, db, *args, **kw):
        super().__init__(db, *args, **kw)
        self._tc_setup(db)

    def _tc_setup(self, db):
        states = vars(db).get("_tc_shared")
        if states is None:
            configured = getattr(db.storage, "_tc_shared_state_mb", None)
            if configured is None and not self._tc_always:
                return
            states = install(db, configured or DEFAULT_CAPACITY_MB,
                             getattr(db.storage, "_tc_shared_decode_first", True))
        self._tc_states = states
        self._tc_plain = _plain_reason(self, db)
        kind = type(self._normal_storage)
        if not hasattr(kind, "_tc_shared_view"):
            self._tc_mvcc = 0
        elif getattr(kind, "_tc_view_is_start", False):
            self._tc_mvcc = 1
        else:
            self._tc_mvcc = 2

    def setstate(self, obj):
        """Loads the state of the ghost ``obj``: from its template at this
        connection's view (see the module documentation), else as ZODB
        does. Raises what ``Connection.setstate`` raises
        (``ConnectionStateError``, ``ReadConflictError``, ``POSKeyError``,
        errors of ``__setstate__``)."""
        if self._tc_states is not None:
            try:
                if _setstate(self, obj):
                    return
            except ConflictError:
                raise
            except BaseException:
                self._log.exception("Couldn't load state for %s %s (shared state)",
                                    type(obj).__name__, oid_repr(obj._p_oid))
                raise
        return super().setstate(obj)


class SharedStateConnection(SharedStateMixin, Connection):
    """``ZODB.Connection.Connection`` with shared state. Assigning
    ``ZODB.DB.DB.klass = SharedStateConnection`` before databases are
    built gives every database shared state (the ZODB test-suite harness
    does this)."""


class _ConfiguredConnection(SharedStateMixin, Connection):
    """The connection class ``shared-state on`` in ZConfig installs as
    ``ZODB.DB.DB.klass``: shared state only for the databases whose
    storage asked for it; ZODB's own ``Connection`` behaviour for the
    others."""

    _tc_always = False


def _configure_globally():
    """``shared-state on`` in a ``<tidecache>`` section: ZODB's ``<zodb>``
    section builds ``ZODB.DB(storage)`` itself, with no way to pass a
    connection class, so ``ZODB.DB.DB.klass`` becomes
    :class:`_ConfiguredConnection`, which turns shared state on only for
    databases over a storage configured so. A ``klass`` of one's own
    already there is kept (and the section's ``shared-state`` ignored,
    with a warning)."""
    current = _ZODB_DB.klass
    if current is Connection:
        _ZODB_DB.klass = _ConfiguredConnection
    elif not issubclass(current, SharedStateMixin):
        logger.warning("tidecache: shared-state on, but ZODB.DB.DB.klass is %r, not ZODB's "
                       "Connection: not replaced; use tidecache.shared.install(db) instead",
                       current)


class DB(_ZODB_DB):
    """``ZODB.DB`` with shared state (``shared_state=True``, the default),
    its templates bounded to ``shared_state_mb`` MiB per process. With
    ``shared_state=False`` it is exactly ``ZODB.DB``;
    ``shared_state_decode_first`` as :func:`install`'s ``decode_first``.
    Other arguments are ``ZODB.DB``'s."""

    def __init__(self, storage, *args, shared_state=True, shared_state_mb=DEFAULT_CAPACITY_MB,
                 shared_state_decode_first=True, **kw):
        if shared_state and shared_state_mb <= 0:
            raise ValueError("shared_state_mb must be positive, got %r" % (shared_state_mb,))
        super().__init__(storage, *args, **kw)
        if shared_state:
            install(self, shared_state_mb, shared_state_decode_first)
