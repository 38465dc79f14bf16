"""A client created before a fork (gunicorn --preload, uwsgi): parent and
child must each get their own connection and the right answers."""

import os
import signal
import socket as socketlib
import sys
import threading
import time

import persistent.mapping
import pytest
import transaction
import ZODB
import ZODB.FileStorage
import ZODB.MappingStorage
from ZODB.utils import p64
from ZODB.utils import u64

from tidecache import Client
from tidecache import TideCacheStorage
from tidecache import Unavailable

OIDS = 200


def state(oid):
    return b"state of %d " % oid * 20


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_parent_and_child_never_read_each_others_answers(sidecar):
    c = Client(sidecar.socket, database="fork", timeout_ms=1000)
    c.attach(10)
    for oid in range(OIDS):
        assert c.store(oid, 10, None, state(oid), 10)
    assert c.lookup(1, 10) == (10, state(1))  # the parent's connection is open
    view = c.register_view(10)  # a view of the parent's
    pid = os.fork()
    if pid == 0:  # the child: many lookups, interleaved with the parent's
        code = 0
        try:
            # The child's client has no connection yet: a lookup misses
            # (never waiting on the socket) and asks the client's thread to
            # connect; wait (bounded) until it is connected.
            try:
                c.lookup(0, 10)
            except Unavailable:
                pass
            deadline = time.monotonic() + 5
            while not c.attached and time.monotonic() < deadline:
                time.sleep(0.005)
            for i in range(3000):
                oid = (i * 7) % OIDS
                if c.lookup(oid, 10) != (10, state(oid)):
                    code = 1
                    break
            c.store_later(OIDS + 1, 10, None, b"from the child", 10)
            if not c.wait_for_stores(5000) or c.lookup(OIDS + 1, 10) != (10, b"from the child"):
                code = 2
        except Exception:
            code = 3
        os._exit(code)
    wrong = 0
    for i in range(3000):
        oid = (i * 13) % OIDS
        if c.lookup(oid, 10) != (10, state(oid)):
            wrong += 1
    _, status = os.waitpid(pid, 0)
    assert wrong == 0, "the parent read %d wrong answers" % wrong
    assert os.WEXITSTATUS(status) == 0, "the child failed with code %d" % os.WEXITSTATUS(status)
    stats = c.stats()["databases"]["fork"]
    assert stats["views"] == 1, "only the parent's view is registered: %s" % stats
    c.release_view(view)


class _HoldingProxy:
    """A Unix-socket proxy in front of the sidecar. After ``hold(word)``,
    the next request it reads (that contains ``word``) is swallowed, never
    answered, and ``held`` is set: the caller that sent it is provably
    inside the call, holding its locks. Every other connection is forwarded
    both ways."""

    def __init__(self, path, upstream):
        self.path, self.upstream = path, upstream
        self.held = threading.Event()
        self._hold = None
        self._mutex = threading.Lock()
        self._sockets = []
        self.listener = socketlib.socket(socketlib.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, word=b""):
        with self._mutex:
            self._hold = word

    def _accept(self):
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socketlib.socket(socketlib.AF_UNIX)
            up.connect(self.upstream)
            with self._mutex:
                self._sockets += [down, up]
            threading.Thread(target=self._pump, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, False), daemon=True).start()

    def _pump(self, src, dst, requests):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if requests:
                with self._mutex:
                    swallow = self._hold is not None and self._hold in data
                    if swallow:
                        self._hold = None
                if swallow:
                    self.held.set()
                    return  # this connection never answers again
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self):
        self.listener.close()
        with self._mutex:
            for s in self._sockets:
                try:
                    s.shutdown(socketlib.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def _wait_bounded(pid, bound):
    """The child's exit code, or None if it overran ``bound`` seconds and was
    killed."""
    deadline = time.monotonic() + bound
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


class _ForkHookErrors:
    """Records, in a forked child, the exceptions of the at-fork hooks
    (Python prints them through ``sys.unraisablehook`` and goes on). Enter
    just before ``os.fork()``; the parent leaves right after it."""

    def __init__(self):
        self.errors = []

    def __enter__(self):
        self._saved = sys.unraisablehook
        sys.unraisablehook = lambda u: self.errors.append("%r in %r" % (u.exc_value, u.object))
        return self

    def __exit__(self, *exc):
        sys.unraisablehook = self._saved


def _fork_a_child_while_a_parent_thread_is_mid_report(tmp_path, sidecar):
    """A ZEO thread of the parent is inside a report (the sidecar has not
    answered) when it forks; the child opens a connection, loads, commits
    and exits. Returns the child's exit code (3: an at-fork hook failed in
    the child), or None if it hung."""
    proxy = _HoldingProxy(str(tmp_path / "proxy.sock"), sidecar.socket)
    base = ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"))
    storage = TideCacheStorage(base, socket=proxy.path, timeout_ms=600000)
    db = ZODB.DB(storage)
    with db.transaction() as conn:
        for i in range(20):
            conn.root()[i] = persistent.mapping.PersistentMapping(n=i)
    # Another process's commit, as ZEO delivers it, blocked mid-report.
    last = u64(storage.lastTransaction())
    proxy.hold()
    blocked = threading.Thread(target=storage.invalidate, args=(p64(last + 1), [p64(0)]))
    blocked.start()
    assert proxy.held.wait(30), "the report never reached the sidecar"
    with _ForkHookErrors() as hooks:
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if hooks.errors:
                code = 3
                print("at-fork hooks failed in the child:", hooks.errors, file=sys.stderr)
                return
            conn = db.open()
            root = conn.root()
            assert [root[i]["n"] for i in range(20)] == list(range(20))
            root["child"] = os.getpid()
            transaction.commit()
            conn.close()
            code = 0
        finally:
            os._exit(code)
    code = _wait_bounded(pid, 30)
    proxy.close()  # the parent's report fails: its thread returns
    blocked.join(30)
    assert not blocked.is_alive()
    db.close()
    return code


def _verdict(code):
    return "the child %s" % {None: "hung on a lock of its parent's",
                             3: "saw an at-fork hook fail"}.get(code, "failed")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_a_parent_thread_is_mid_report_runs(tmp_path, sidecar):
    """gunicorn --preload: a ZEO thread of the master is inside a report
    (the sidecar has not answered) when the master forks. The child must not
    wait on the locks that thread holds (the adapter's and the client's):
    it opens a connection, loads, commits and exits."""
    code = _fork_a_child_while_a_parent_thread_is_mid_report(tmp_path, sidecar)
    assert code == 0, _verdict(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_storage_closed_before_the_fork_leaves_the_others_renewed(tmp_path, sidecar):
    """A closed storage can stay alive (a reference cycle the garbage
    collector has not reached yet, a test case that keeps it). The fork hook
    used to fail on it (MVCCAdapter.close deletes its instances), which
    ended the hook: the storages after it, in the set's order, kept their
    parent's held locks, and the child hung on its first commit."""
    closed = TideCacheStorage(ZODB.MappingStorage.MappingStorage(), socket=sidecar.socket)
    closed.close()
    code = _fork_a_child_while_a_parent_thread_is_mid_report(tmp_path, sidecar)
    assert code == 0, _verdict(code)
    del closed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_storage_failing_in_the_fork_hook_does_not_stop_the_others(sidecar):
    """Whatever one storage's renewal raises, every other live storage is
    renewed in the child: the hook goes on (and logs the failure)."""
    storages = [TideCacheStorage(ZODB.MappingStorage.MappingStorage(), socket=sidecar.socket)
                for _ in range(3)]
    renewed = []

    def failing(storage):
        def renew():
            renewed.append(storages.index(storage))
            raise RuntimeError("a storage that cannot be renewed")
        return renew

    for storage in storages:
        storage._tc_after_fork = failing(storage)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if sorted(renewed) == [0, 1, 2] else 1)
        code = _wait_bounded(pid, 30)
    finally:
        for storage in storages:
            del storage._tc_after_fork
            storage.close()
    assert code == 0, "the hook stopped at the first failing storage: not all were renewed"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_catch_up_reports_its_commits(tmp_path, sidecar):
    """The master catches the sidecar up from its storage's iterator (the
    sidecar's horizon is behind), and its catch-up thread is inside a report
    when it forks. That thread does not exist in the child: the child's own
    commits must still reach the sidecar (as a resync), not wait behind the
    catch-up forever."""
    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(TideCacheStorage(ZODB.FileStorage.FileStorage(path), socket=sidecar.socket, timeout_ms=10000))
    with db.transaction() as conn:
        conn.root()["n"] = 0
    db.close()
    # Commits the sidecar does not hear of: its horizon stays behind.
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    for n in range(1, 4):
        with db.transaction() as conn:
            conn.root()["n"] = n
    db.close()
    proxy = _HoldingProxy(str(tmp_path / "proxy.sock"), sidecar.socket)
    proxy.hold(b"Report")
    storage = TideCacheStorage(ZODB.FileStorage.FileStorage(path), socket=proxy.path, timeout_ms=600000)
    assert proxy.held.wait(30), "no catch-up report reached the sidecar"
    # The catch-up only queued its reports: the client's background thread
    # is inside the first one (held), and the parent's connection is busy
    # with it (calls are serialised). The child has its own.
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            db = ZODB.DB(storage)
            with db.transaction() as conn:
                assert conn.root()["n"] == 3
                conn.root()["n"] = 4
            last = u64(storage.lastTransaction())
            storage._tc_client.wait_for_stores(20000)
            code = 0 if storage._tc_client.horizon >= last else 2
        finally:
            os._exit(code)
    code = _wait_bounded(pid, 30)
    proxy.close()  # the parent's catch-up fails: its thread resyncs and ends
    storage.close()
    assert code != 2, "the child's commit never reached the sidecar"
    assert code == 0, "the child %s" % ("hung on a lock of its parent's" if code is None else "failed")
