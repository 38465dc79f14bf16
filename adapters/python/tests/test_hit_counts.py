"""Host-wide hit counters: each TideCacheStorage counts its lookups in the
native client, which sends them to the sidecar with its hit hints; after
close, the sidecar's per-database hits and misses are the adapter's own
``cache_stats()`` counts."""

import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

from tidecache import TideCacheStorage


def test_the_sidecar_counts_what_the_adapter_counted_after_close(tmp_path, sidecar):
    base = ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"))
    storage = TideCacheStorage(base, socket=sidecar.socket, database="counted")
    db = ZODB.DB(storage, cache_size=0)
    with db.transaction() as c:
        for i in range(20):
            c.root()["doc%d" % i] = PersistentMapping(x=i)
    for _ in range(5):
        conn = db.open()
        try:
            conn.cacheMinimize()
            assert [conn.root()["doc%d" % i]["x"] for i in range(20)] == list(range(20))
        finally:
            conn.close()
            storage._tc_client.wait_for_stores()
    own = storage.cache_stats(wait=True)
    assert own["hits"] > 20 and own["misses"] > 0, own
    # The native client counted the same lookups.
    assert storage._tc_client.lookups == (own["hits"], own["misses"])
    db.close()  # sends what was not sent yet
    counted = sidecar.stats()["databases"]["counted"]
    assert (counted["hits"], counted["misses"]) == (own["hits"], own["misses"]), (counted, own)
    assert counted["hit_ratio"] == own["hits"] / (own["hits"] + own["misses"])
    # Read from the arena: the sidecar answered no lookup itself.
    assert counted["socket_hits"] == 0
