"""The arena reaches the adapter as a file descriptor handed over with the
sidecar's Hello answer (issue 11, "Containers mount the arena at different
paths"): a worker that cannot resolve the arena's path (another container,
a directory mounted elsewhere) still reads it, without asking the sidecar
for each load."""

import os
import tempfile

import pytest
import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

from tidecache import TideCacheStorage

from conftest import Sidecar


class SidecarWithArenaApart(Sidecar):
    """A sidecar whose arena lives in ``<directory>/arena/``, apart from
    its socket."""

    def __init__(self, directory):
        self.arena_dir = os.path.join(directory, "arena")
        os.mkdir(self.arena_dir)
        self.socket = os.path.join(directory, "tidecached.sock")
        self.cache_file = os.path.join(self.arena_dir, "cache.arena")
        self.memory_mb = 16
        self.extra = []
        self.log = open(os.path.join(directory, "tidecached.log"), "ab")
        self.proc = None
        self.start()


@pytest.fixture
def apart():
    with tempfile.TemporaryDirectory(prefix="tidecached-") as d:
        s = SidecarWithArenaApart(d)
        try:
            yield s
        finally:
            s.stop()


def test_a_worker_that_cannot_resolve_the_arena_path_reads_the_arena(tmp_path, apart):
    # The arena's directory moves away once the sidecar serves: the path
    # the Hello answer names resolves to nothing for any new worker.
    os.rename(apart.arena_dir, apart.arena_dir + ".moved")
    assert not os.path.exists(apart.cache_file)

    base = ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"))
    storage = TideCacheStorage(base, socket=apart.socket)
    db = ZODB.DB(storage, cache_size=0)
    try:
        with db.transaction() as c:
            c.root()["doc"] = PersistentMapping(x=1)
        for _ in range(5):
            conn = db.open()
            try:
                conn.cacheMinimize()
                assert conn.root()["doc"]["x"] == 1
            finally:
                conn.close()
            storage._tc_client.wait_for_stores()
        mine = storage.cache_stats(wait=True)
        assert mine["hits"] > 0, mine
        # Every hit came from the mapped arena: the sidecar answered none
        # over its socket (where a client without the arena would ask).
        sidecar = apart.stats()["databases"][mine["database"]]
        assert sidecar["socket_hits"] == 0, (mine, sidecar)
    finally:
        db.close()
