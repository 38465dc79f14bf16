"""ZODB's own storage test mixins against ``TideCacheStorage`` with a
running sidecar, over FileStorage and over MappingStorage.

The mixins name their tests ``check*``; each is exposed to pytest as
``test_*``. Many of them (the race tests of BasicStorage, MTStorage,
PackableStorage, Synchronization) go through ``ZODB.DB`` and connections,
and so through the sidecar's lookups and stores.
"""

import os

import pytest
import ZODB.FileStorage
from ZEO.ClientStorage import ClientStorage
import ZODB.MappingStorage
from ZODB.tests import BasicStorage
from ZODB.tests import ConflictResolution
from ZODB.tests import HistoryStorage
from ZODB.tests import IteratorStorage
from ZODB.tests import MTStorage
from ZODB.tests import PackableStorage
from ZODB.tests import PersistentStorage
from ZODB.tests import ReadOnlyStorage
from ZODB.tests import RevisionStorage
from ZODB.tests import StorageTestBase
from ZODB.tests import Synchronization
from ZODB.tests import TransactionalUndoStorage

from tidecache import TideCacheStorage

from conftest import ZEOServer


def expose_checks(cls):
    """pytest collects ``test*``; ZODB's mixins define ``check*``."""
    for name in dir(cls):
        if name.startswith("check") and callable(getattr(cls, name)):
            setattr(cls, "test_" + name[len("check"):], getattr(cls, name))
    return cls


@pytest.fixture(autouse=True, scope="class")
def _socket(request, shared_sidecar):
    request.cls.sidecar_socket = shared_sidecar.socket


@expose_checks
class TestOverFileStorage(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    RevisionStorage.RevisionStorage,
    PackableStorage.PackableStorageWithOptionalGC,
    PackableStorage.PackableUndoStorage,
    Synchronization.SynchronizedStorage,
    ConflictResolution.ConflictResolvingStorage,
    ConflictResolution.ConflictResolvingTransUndoStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
    IteratorStorage.ExtendedIteratorStorage,
    PersistentStorage.PersistentStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
):
    # As ZODB's testFileStorage.FileStorageTests: FileStorage keeps the
    # extension's bytes.
    use_extension_bytes = True

    def open(self, **kwargs):
        base = ZODB.FileStorage.FileStorage("FileStorageTests.fs", **kwargs)
        self._storage = TideCacheStorage(base, socket=self.sidecar_socket)

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.open(create=1)


@expose_checks
class TestOverMappingStorage(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.ExtendedIteratorStorage,
    IteratorStorage.IteratorStorage,
    MTStorage.MTStorage,
    PackableStorage.PackableStorageWithOptionalGC,
    RevisionStorage.RevisionStorage,
    Synchronization.SynchronizedStorage,
):
    # As ZODB's testMappingStorage.MappingStorageTests: MappingStorage has no
    # undo, so the undo checks of RevisionStorage do not apply.
    def testLoadBeforeUndo(self):
        pass

    testUndoZombie = testLoadBeforeUndo

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._storage = TideCacheStorage(ZODB.MappingStorage.MappingStorage(), socket=self.sidecar_socket)


@expose_checks
class TestOverZEO(StorageTestBase.StorageTestBase, BasicStorage.BasicStorage):
    """BasicStorage over a real ZEO server, every client a TideCacheStorage
    sharing the one sidecar database. With ``_new_storage_client`` ZODB's
    race tests run too: several clients, each in its own thread, load while
    others commit (and, in the long one, reconnect), and check a two-object
    invariant in every transaction (ZODB/tests/racetest.py)."""

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._zeo = ZEOServer(os.getcwd())
        self._storage = self._new_storage_client()

    def _new_storage_client(self):
        return TideCacheStorage(ClientStorage(self._zeo.address, wait_timeout=30), socket=self.sidecar_socket)

    def tearDown(self):
        StorageTestBase.StorageTestBase.tearDown(self)
        self._zeo.close()
