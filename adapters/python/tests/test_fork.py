"""A client created before a fork (gunicorn --preload, uwsgi): parent and
child must each get their own connection and the right answers."""

import os

import pytest

from tidecache import Client

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
