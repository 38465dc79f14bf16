"""The raw client raises one exception per kind of refusal (all
``RefusedError``, itself a ``TideCacheError``), and ``Unavailable``
where there is nothing to ask."""

import time

import pytest
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import u64

import tidecache


def now_tid(offset_seconds=0.0):
    t = time.gmtime(time.time() + offset_seconds)
    return u64(TimeStamp(*t[:5] + (t[5],)).raw())


def test_each_refusal_has_its_exception(sidecar):
    c = tidecache.Client(sidecar.socket, database="errors", timeout_ms=5000)
    start = now_tid()
    assert c.attach(start) == "started"
    # A report past the horizon: a gap, which the adapter answers by a resync.
    with pytest.raises(tidecache.GapError):
        c.report_now(start + 10, start + 20, [])
    # A change outside its report's interval breaks a rule.
    with pytest.raises(tidecache.BadRequestError):
        c.report_now(start, start + 5, [(1, start + 6)])
    # A tid days past this host's clock would raise the horizon for all.
    far = now_tid(3 * 86400)
    with pytest.raises(tidecache.FutureTidError):
        c.report_now(start, far, [])
    for kind in (tidecache.GapError, tidecache.BadRequestError, tidecache.FutureTidError,
                 tidecache.LimitError, tidecache.UnknownViewError, tidecache.ProtocolError,
                 tidecache.StaleError):
        assert issubclass(kind, tidecache.RefusedError)
        assert issubclass(kind, tidecache.TideCacheError)
    # The connection is still served after refusals.
    assert c.report_now(start, start + 1, [(1, start + 1)]) == start + 1
    c.close()


def test_too_many_databases_is_a_limit(tmp_path):
    from conftest import Sidecar

    sc = Sidecar(str(tmp_path), extra=["--max-databases", "1"])
    try:
        first = tidecache.Client(sc.socket, database="one", timeout_ms=5000)
        assert first.attach(now_tid()) == "started"
        second = tidecache.Client(sc.socket, database="two", timeout_ms=5000)
        with pytest.raises(tidecache.LimitError):
            second.attach(now_tid())
    finally:
        sc.stop()


def test_nothing_to_ask_is_unavailable(tmp_path):
    c = tidecache.Client(str(tmp_path / "nobody.sock"), database="x", timeout_ms=50)
    with pytest.raises(tidecache.Unavailable):
        c.attach(now_tid())
    with pytest.raises(tidecache.Unavailable):
        c.lookup(1, now_tid())


def test_report_collapsed_is_applied_and_refused_as_report(sidecar):
    c = tidecache.Client(sidecar.socket, database="collapsed", timeout_ms=5000)
    start = now_tid()
    assert c.attach(start) == "started"
    # Every oid changed in (start, start + 5], each with its newest change
    # or an upper bound of it (here the interval's end, as ZEO's reconnect).
    assert c.report_collapsed_now(start, start + 5, [(1, start + 5), (2, start + 5)]) == start + 5
    with pytest.raises(tidecache.GapError):
        c.report_collapsed_now(start + 10, start + 20, [])
    with pytest.raises(tidecache.BadRequestError):
        c.report_collapsed_now(start + 5, start + 6, [(1, start + 7)])
    with pytest.raises(tidecache.FutureTidError):
        c.report_collapsed_now(start + 5, now_tid(3 * 86400), [])
    assert c.report_now(start + 5, start + 6, [(1, start + 6)]) == start + 6
    # Queued, in order with plain reports; a gap becomes a resync.
    c.report_collapsed(start + 6, start + 8, [(1, start + 8)])
    c.report(start + 8, start + 9, [(2, start + 9)])
    assert c.wait_for_stores(5000) and c.horizon == start + 9 and c.outbox_counts == (0, 0)
    c.report_collapsed(start + 20, start + 30, [])
    assert c.wait_for_stores(5000) and c.horizon == start + 30 and c.outbox_counts == (1, 0)
    c.close()
