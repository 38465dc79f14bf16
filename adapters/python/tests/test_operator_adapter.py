"""What an operator sees of the adapter (issue 11, "See whether it
works"): readable database keys."""

import pytest
import ZODB
import ZODB.FileStorage

from tidecache import database_key
from tidecache.storage import zeo_database_key

# -- database keys ----------------------------------------------------------------


def test_zeo_keys_are_readable():
    assert zeo_database_key("/run/zeo.sock", "1") == "zeo:/run/zeo.sock:1"
    assert zeo_database_key(["/run/zeo.sock"], "main") == "zeo:/run/zeo.sock:main"
    assert zeo_database_key(("db.example", 8100), "1") == "zeo:db.example:8100:1"
    assert zeo_database_key([("db.example", 8100)], "1") == "zeo:db.example:8100:1"
    assert zeo_database_key(8100, "1") == "zeo:127.0.0.1:8100:1"
    assert zeo_database_key([("db1", 8100), ("db2", 8101)], "1") == "zeo:db1:8100,db2:8101:1"
    assert zeo_database_key([("::1", 8100)], "1") == "zeo:[::1]:8100:1"
    assert zeo_database_key(["/run/a.sock", ("db2", 8100)], "1") == "zeo:/run/a.sock,db2:8100:1"


def test_a_relative_zeo_socket_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert zeo_database_key("zeo.sock", "1") == "zeo:%s:1" % (tmp_path / "zeo.sock")


def test_zeo_keys_of_different_databases_differ():
    """The separators ``:`` and ``,`` are escaped inside a part: the
    storage name is what follows the last ``:``, so a path with a ``:``
    and a storage name with one never give the same key."""
    assert zeo_database_key("/run/a:b", "1") == "zeo:/run/a%3Ab:1"
    assert zeo_database_key("/run/a", "b:1") == "zeo:/run/a:b%3A1"
    assert zeo_database_key("/run/a,b", "1") != zeo_database_key(["/run/a", "/run/b"], "1")
    assert zeo_database_key("/run/a%3Ab", "1") != zeo_database_key("/run/a:b", "1")


def test_the_key_of_a_zeo_client_storage(zeo_server):
    import ZEO.ClientStorage

    cs = ZEO.ClientStorage.ClientStorage(zeo_server.address, wait_timeout=30)
    try:
        key = database_key(cs)
    finally:
        cs.close()
    assert key == "zeo:%s:1" % zeo_server.address
    assert not set("[]()'\"") & set(key), key


def test_the_key_of_a_file_storage_is_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs = ZODB.FileStorage.FileStorage("Data.fs")
    try:
        assert database_key(fs) == "file:%s" % (tmp_path / "Data.fs")
    finally:
        fs.close()


def test_the_key_of_a_relstorage_is_readable(tmp_path):
    pytest.importorskip("relstorage")
    from relstorage.adapters.sqlite.adapter import Sqlite3Adapter
    from relstorage.options import Options
    from relstorage.storage import RelStorage

    from tidecache.relstorage import relstorage_database_key

    options = Options(keep_history=False, driver="sqlite3", cache_local_mb=0)
    data_dir = str(tmp_path / "rs")
    base = RelStorage(Sqlite3Adapter(data_dir=data_dir, pragmas={}, options=options), options=options)
    try:
        key = relstorage_database_key(base)
    finally:
        base.close()
    assert key == "relstorage:sqlite:%s" % data_dir
