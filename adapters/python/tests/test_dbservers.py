"""bench/dbservers.py starts real PostgreSQL and MySQL (MariaDB) servers:
each test starts one, opens RelStorage on it through ZConfig (the way a
deployment names it: ``.dsn`` in ``<postgresql>``, ``.params`` in
``<mysql>``), commits, and reads the commit back from a second database
object. A server whose software cannot be installed here skips with the
reason; one that is installed but fails to start fails."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))

import dbservers  # noqa: E402


def _server(factory):
    try:
        return factory()
    except dbservers.DatabaseServerUnavailable as e:
        pytest.skip(str(e))


def _commit_and_read(adapter_section, keep_history):
    import transaction
    import ZODB.config

    config = """
    %%import relstorage
    <zodb>
      <relstorage>
        keep-history %s
        %s
      </relstorage>
    </zodb>
    """ % ("true" if keep_history else "false", adapter_section)
    db = ZODB.config.databaseFromString(config)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()["answer"] = 42
        tm.commit()
        conn.close()
    finally:
        db.close()
    db = ZODB.config.databaseFromString(config)
    try:
        conn = db.open()
        assert conn.root()["answer"] == 42
        assert db.storage.lastTransaction() != b"\0" * 8
        conn.close()
    finally:
        db.close()


@pytest.mark.parametrize("keep_history", [False, True], ids=["history-free", "history-preserving"])
def test_postgresql_server_runs_relstorage(keep_history):
    with _server(dbservers.postgresql_server) as pg:
        assert "password" not in pg.dsn
        assert pg.execute("show listen_addresses").strip() == ""
        # Runs as the unprivileged system user, not as root.
        assert pg.execute("select current_setting('data_directory')").strip() == pg.datadir
        _commit_and_read("<postgresql>\n driver psycopg2\n dsn %s\n</postgresql>" % pg.dsn, keep_history)
    assert not pathlib.Path(pg.directory).exists()


def test_postgresql_server_second_database_and_pg8000():
    with _server(dbservers.postgresql_server) as pg:
        pg.create_database("other")
        # pg8000 (pure Python) reaches the socket file itself.
        dsn = "dbname=other user=postgres unix_sock=%s" % pg.socket
        _commit_and_read("<postgresql>\n driver pg8000\n dsn %s\n</postgresql>" % dsn, False)


@pytest.mark.parametrize("keep_history", [False, True], ids=["history-free", "history-preserving"])
def test_mysql_server_runs_relstorage(keep_history):
    dbservers.relstorage_mariadb_compat()
    with _server(dbservers.mysql_server) as my:
        assert my.execute("select @@skip_networking").strip() == "1"
        section = "<mysql>\n driver PyMySQL\n%s\n</mysql>" % "\n".join(
            " %s %s" % kv for kv in sorted(my.params.items()))
        _commit_and_read(section, keep_history)
    assert not pathlib.Path(my.directory).exists()


def test_server_processes_are_not_root():
    import os
    if os.geteuid() != 0:
        pytest.skip("not root: the servers run as the current user")
    with _server(dbservers.postgresql_server) as pg:
        with open("/proc/%d/status" % pg.proc.pid) as f:
            uid_line = next(line for line in f if line.startswith("Uid:"))
        assert int(uid_line.split()[1]) != 0
    with _server(dbservers.mysql_server) as my:
        with open("/proc/%d/status" % my.proc.pid) as f:
            uid_line = next(line for line in f if line.startswith("Uid:"))
        assert int(uid_line.split()[1]) != 0


def test_servers_start_under_a_private_tmpdir(monkeypatch, tmp_path):
    """The caller's temporary directory may be private to root (mode 0700,
    as relstorage_suite.py's is): the servers, which run as another user,
    still start (their directories go where that user can reach them)."""
    import os
    import tempfile

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(private))
    monkeypatch.setattr(tempfile, "tempdir", None)
    with _server(dbservers.postgresql_server) as pg:
        assert pg.execute("select 1").strip() == "1"
    with _server(dbservers.mysql_server) as my:
        assert my.execute("select 1").strip() == "1"
    assert os.listdir(private) == []
