"""Real database servers for tests and benchmarks: PostgreSQL and MySQL
(MariaDB on Debian 12), each initialised in a new temporary directory, run
as an unprivileged system user, listening on a Unix socket only (no TCP
port), stopped and removed afterwards.

    with postgresql_server() as pg:
        pg.create_database("relstoragetest")
        dsn = pg.dsn_for("relstoragetest")      # libpq: host is the socket dir

    with mysql_server() as my:
        my.create_database("relstoragetest")
        params = my.params_for("relstoragetest")  # RelStorage's <mysql> keys

Both use Debian's packages: PostgreSQL from ``/usr/lib/postgresql/*/bin``
(package ``postgresql``), MySQL from ``default-mysql-server`` (MariaDB's
``mariadb-install-db`` and ``mariadbd``). A missing package is installed
with ``apt-get`` when this process runs as root; when it cannot be
(not root, no package source), :class:`DatabaseServerUnavailable` says so
and what to install. A server that is installed but fails to initialise
or start raises :class:`DatabaseServerError` with the tail of its log: that
is a failure, never a reason to skip.

The unprivileged user: the machine runs as root, and neither server runs as
root. The servers run as the system users the Debian packages create,
``postgres`` and ``mysql``; the processes are started with
``subprocess.Popen(user=..., group=..., extra_groups=[])`` (the same
``setreuid``/``setregid`` that ``setpriv`` does, without a wrapper process
in between, so the pid we hold is the server's and signals reach it).
When this process is not root, the servers run as the current user.

Clients connect as the servers' superusers without a password: PostgreSQL's
``postgres`` role with ``trust`` authentication, MariaDB's ``root`` with
an empty password. Only the socket's directory gives access, and it is
private to the run (a temporary directory).

Durability is traded for speed (``fsync off``, InnoDB flushing once a
second): these servers hold test data only.
"""

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket as socketlib
import subprocess
import sys
import tempfile
import time

#: Seconds to wait for a server to accept connections on its socket.
START_TIMEOUT = 60.0
#: Seconds to wait for a server to exit after asking it to shut down.
STOP_TIMEOUT = 30.0


class DatabaseServerUnavailable(RuntimeError):
    """The server's software is not installed and cannot be installed here
    (tests skip with this message)."""


class DatabaseServerError(RuntimeError):
    """The server is installed but could not be initialised, started or
    used (tests fail with this message)."""


def _is_root():
    return os.geteuid() == 0


def _apt_install(packages, what):
    """Installs Debian ``packages`` with apt-get (root only)."""
    if not _is_root():
        raise DatabaseServerUnavailable(
            "%s is not installed and this process is not root, so it cannot install it: "
            "run `apt-get install %s` as root" % (what, " ".join(packages)))
    if shutil.which("apt-get") is None:
        raise DatabaseServerUnavailable(
            "%s is not installed and there is no apt-get to install it (install %s)"
            % (what, " ".join(packages)))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends"] + list(packages)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        # Perhaps the package lists are missing: update them once, retry.
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise DatabaseServerUnavailable(
            "%s is not installed and `%s` failed (exit %d): %s"
            % (what, " ".join(cmd), out.returncode, out.stderr.strip()[-2000:]))


def _service_user(name):
    """(uid, gid, user name) to run a server as: the system user ``name``
    when we are root, else ourselves."""
    if not _is_root():
        pw = pwd.getpwuid(os.geteuid())
        return pw.pw_uid, pw.pw_gid, pw.pw_name
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise DatabaseServerError(
            "the system user %r does not exist (the Debian package creates it; "
            "reinstall the package or create the user with `adduser --system %s`)"
            % (name, name)) from None
    return pw.pw_uid, pw.pw_gid, name


def _popen_as(uid, gid, args, **kw):
    if _is_root():
        kw.update(user=uid, group=gid, extra_groups=[])
    return subprocess.Popen(args, **kw)


def _run_as(uid, gid, args, what, log_path=None, **kw):
    """Runs ``args`` as ``uid``; raises DatabaseServerError with its output
    when it fails."""
    if _is_root():
        kw.update(user=uid, group=gid, extra_groups=[])
    out = subprocess.run(args, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise DatabaseServerError(
            "%s failed (exit %d): %s\n%s%s"
            % (what, out.returncode, " ".join(args), out.stdout[-2000:], out.stderr[-2000:])
            + (_log_tail(log_path) if log_path else ""))
    return out


def _log_tail(path, chars=3000):
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return "\n--- %s (tail) ---\n%s" % (path, text[-chars:])


def _base_dir():
    """Where the servers' directories go: ``$TIDECACHE_DBSERVERS_TMPDIR``,
    else, when root (the servers then run as another user, who must be
    able to reach the directory), ``/tmp`` (world-searchable; ``$TMPDIR``
    may be a private directory of root's), else the temporary directory."""
    explicit = os.environ.get("TIDECACHE_DBSERVERS_TMPDIR")
    if explicit:
        return explicit
    if _is_root() and os.path.isdir("/tmp") and os.stat("/tmp").st_mode & 0o1777 == 0o1777:
        return "/tmp"
    return tempfile.gettempdir()


def _private_dir(prefix, uid, gid):
    """A new temporary directory owned by ``uid`` (mode 0700) under
    :func:`_base_dir`, whose parents must be searchable by that user."""
    d = tempfile.mkdtemp(prefix=prefix, dir=_base_dir())
    if _is_root():
        os.chown(d, uid, gid)
    return d


def _wait_for_socket(path, proc, what, log_path, timeout=START_TIMEOUT):
    """Polls until ``path`` accepts a connection, with a bound; raises
    DatabaseServerError (with the server's log) if the process exits or
    the bound passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DatabaseServerError(
                "%s exited with status %s while starting" % (what, proc.returncode)
                + _log_tail(log_path))
        if os.path.exists(path):
            s = socketlib.socket(socketlib.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise DatabaseServerError(
        "%s did not accept connections on %s within %.0f s" % (what, path, timeout)
        + _log_tail(log_path))


def _remove(directory):
    """Removes a server's directory; a few tries (a file the server wrote
    last may appear during the first), then a warning naming what is left."""
    for _ in range(3):
        shutil.rmtree(directory, ignore_errors=True)
        if not os.path.exists(directory):
            return
        time.sleep(0.2)
    print("dbservers: could not remove %s; remove it by hand" % directory, file=sys.stderr)


def _stop(proc, sig, timeout=STOP_TIMEOUT):
    """Sends ``sig``, waits; SIGKILL if the server has not exited in time."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------
# PostgreSQL


def _postgresql_bindir():
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb and
    postgres; installs Debian's ``postgresql`` when there is none."""

    def find():
        dirs = []
        for d in glob.glob("/usr/lib/postgresql/*/bin"):
            if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "postgres")):
                version = os.path.basename(os.path.dirname(d))
                try:
                    key = float(version)
                except ValueError:
                    key = 0.0
                dirs.append((key, d))
        return max(dirs)[1] if dirs else None

    bindir = find()
    if bindir is None:
        _apt_install(["postgresql"], "PostgreSQL")
        bindir = find()
    if bindir is None:
        raise DatabaseServerUnavailable(
            "PostgreSQL's package is installed but no /usr/lib/postgresql/*/bin/initdb exists")
    return bindir


class PostgreSQLServer:
    """A running PostgreSQL server in a temporary directory.

    ``socket_dir``: the directory of its Unix socket (libpq's ``host``);
    ``dsn``: a libpq DSN for the database ``database`` (created at start);
    ``dsn_for(name)``: the same for another database; ``user``: the
    superuser role clients use (``postgres``, trust authentication, no
    password)."""

    PORT = 5432  # Only names the socket file (.s.PGSQL.5432): no TCP.

    def __init__(self, database="tidecache"):
        self.bindir = _postgresql_bindir()
        self.uid, self.gid, self.os_user = _service_user("postgres")
        self.user = "postgres"
        self.directory = _private_dir("pgserver-", self.uid, self.gid)
        self.datadir = os.path.join(self.directory, "data")
        self.socket_dir = self.directory
        self.socket = os.path.join(self.socket_dir, ".s.PGSQL.%d" % self.PORT)
        self.log_path = os.path.join(self.directory, "postgres.log")
        self.proc = None
        self.database = database
        try:
            self._start()
            if database:
                self.create_database(database)
        except BaseException:
            self.stop()
            raise

    @property
    def dsn(self):
        """libpq DSN of the database given at start (``database``)."""
        return self.dsn_for(self.database or "postgres")

    def dsn_for(self, name, user=None):
        """libpq DSN of the database ``name`` over the Unix socket."""
        return "dbname=%s user=%s host=%s port=%d" % (name, user or self.user, self.socket_dir, self.PORT)

    def _start(self):
        _run_as(self.uid, self.gid,
                [os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", self.user,
                 "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                "PostgreSQL initdb (as user %s, in %s: its parent directories must be "
                "searchable by that user)" % (self.os_user, self.directory), cwd=self.directory,
                env=dict(os.environ, TMPDIR=self.directory))
        log = open(self.log_path, "ab")
        try:
            self.proc = _popen_as(
                self.uid, self.gid,
                [os.path.join(self.bindir, "postgres"), "-D", self.datadir,
                 "-k", self.socket_dir, "-p", str(self.PORT),
                 "-c", "listen_addresses=",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200", "-c", "max_prepared_transactions=100",
                 # Not /dev/shm, which containers often keep small.
                 "-c", "dynamic_shared_memory_type=mmap"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
                env=dict(os.environ, TMPDIR=self.directory))
        finally:
            log.close()
        _wait_for_socket(self.socket, self.proc, "PostgreSQL (%s)" % self.bindir, self.log_path)
        # The socket accepts connections before recovery is done: wait
        # until a query is answered.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            out = subprocess.run([os.path.join(self.bindir, "pg_isready"), "-h", self.socket_dir,
                                  "-p", str(self.PORT), "-U", self.user], capture_output=True, text=True)
            if out.returncode == 0:
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise DatabaseServerError("PostgreSQL is not ready: %s" % out.stdout.strip()
                                          + _log_tail(self.log_path))
            time.sleep(0.05)

    def execute(self, sql, database="postgres"):
        """Runs SQL with psql as the superuser; returns its output (tuples
        only, unaligned). Raises DatabaseServerError when it fails."""
        out = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.socket_dir, "-p", str(self.PORT), "-U", self.user, "-d", database, "-c", sql],
            capture_output=True, text=True)
        if out.returncode != 0:
            raise DatabaseServerError("psql failed on %r: %s" % (sql, out.stderr.strip()))
        return out.stdout

    def create_database(self, name, owner=None):
        """Creates the database ``name`` (owned by role ``owner``, default
        the superuser)."""
        self.execute('CREATE DATABASE "%s"%s' % (name, ' OWNER "%s"' % owner if owner else ""))

    def create_role(self, name, password=None, superuser=True):
        """Creates a login role (the password is stored but not asked for:
        authentication is ``trust`` on the private socket)."""
        self.execute('CREATE ROLE "%s" LOGIN%s%s' % (
            name, " SUPERUSER" if superuser else "",
            " PASSWORD '%s'" % password if password else ""))

    def stop(self):
        """Fast shutdown (SIGINT), then removes the directory."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGINT)
            self.proc = None
        _remove(self.directory)


@contextlib.contextmanager
def postgresql_server(database="tidecache"):
    """Starts a PostgreSQL server (see :class:`PostgreSQLServer`) and stops
    and removes it afterwards."""
    server = PostgreSQLServer(database)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------
# MySQL (MariaDB)


def _mariadb_binaries():
    """(install_db, server, client) paths; installs Debian's
    ``default-mysql-server`` when they are missing."""

    def find():
        install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        server = (shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin")
                  or shutil.which("mysqld", path="/usr/sbin"))
        client = shutil.which("mariadb") or shutil.which("mysql")
        return (install_db, server, client) if install_db and server and client else None

    found = find()
    if found is None:
        _apt_install(["default-mysql-server"], "MySQL (MariaDB)")
        found = find()
    if found is None:
        raise DatabaseServerUnavailable(
            "default-mysql-server is installed but mariadb-install-db, mariadbd or mariadb is missing")
    return found


class MySQLServer:
    """A running MySQL-compatible server (Debian's MariaDB) in a temporary
    directory, networking off.

    ``socket``: its Unix socket; ``params``: RelStorage's ``<mysql>``
    keys (``unix_socket``, ``db``, ``user``) for the database ``database``
    (created at start); ``params_for(name)``: the same for another one;
    ``user``: ``root``, empty password.

    RelStorage 4.3 supports MySQL, not MariaDB: the server reports the
    version :attr:`VERSION` and a process that installs a
    history-preserving RelStorage schema on it calls
    :func:`relstorage_mariadb_compat` first."""

    #: The version string the server reports (its ``version`` variable).
    VERSION = "5.7.99-MariaDB-compat"

    def __init__(self, database="tidecache"):
        self.install_db, self.server, self.client = _mariadb_binaries()
        self.uid, self.gid, self.os_user = _service_user("mysql")
        self.user = "root"
        self.directory = _private_dir("mysqlserver-", self.uid, self.gid)
        self.datadir = os.path.join(self.directory, "data")
        self.tmpdir = os.path.join(self.directory, "tmp")
        self.socket = os.path.join(self.directory, "mysqld.sock")
        self.log_path = os.path.join(self.directory, "mysqld.log")
        self.proc = None
        self.database = database
        try:
            self._start()
            if database:
                self.create_database(database)
        except BaseException:
            self.stop()
            raise

    @property
    def params(self):
        """RelStorage ``<mysql>`` parameters of the database given at start."""
        return self.params_for(self.database or "mysql")

    def params_for(self, name, user=None, passwd=None):
        """RelStorage ``<mysql>`` parameters (MySQLdb/PyMySQL connect
        keywords) of the database ``name`` over the Unix socket."""
        p = {"unix_socket": self.socket, "db": name, "user": user or self.user}
        if passwd:
            p["passwd"] = passwd
        return p

    def _env(self):
        # The caller's TMPDIR may be private to it: the server's own.
        return dict(os.environ, TMPDIR=self.tmpdir)

    def _start(self):
        os.mkdir(self.tmpdir)
        if _is_root():
            os.chown(self.tmpdir, self.uid, self.gid)
        _run_as(self.uid, self.gid,
                [self.install_db, "--no-defaults", "--datadir=%s" % self.datadir,
                 "--auth-root-authentication-method=normal", "--skip-test-db",
                 "--user=%s" % self.os_user],
                "MariaDB mariadb-install-db (as user %s, in %s: its parent directories must be "
                "searchable by that user)" % (self.os_user, self.directory), cwd=self.directory,
                env=self._env())
        log = open(self.log_path, "ab")
        try:
            self.proc = _popen_as(
                self.uid, self.gid,
                [self.server, "--no-defaults", "--datadir=%s" % self.datadir,
                 "--socket=%s" % self.socket, "--skip-networking",
                 "--pid-file=%s" % os.path.join(self.directory, "mysqld.pid"),
                 "--tmpdir=%s" % self.tmpdir, "--log-error=%s" % self.log_path,
                 "--innodb-flush-log-at-trx-commit=0", "--innodb-buffer-pool-size=128M",
                 "--innodb-log-file-size=64M", "--max-allowed-packet=64M",
                 "--max-connections=300", "--character-set-server=utf8mb4",
                 "--skip-log-bin",
                 # RelStorage takes 10.11 for a MySQL 8: see relstorage_mariadb_compat().
                 "--version=%s" % self.VERSION],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, env=self._env())
        finally:
            log.close()
        _wait_for_socket(self.socket, self.proc, "MariaDB (%s)" % self.server, self.log_path)

    def execute(self, sql, database=None):
        """Runs SQL with the command-line client as root; returns its output."""
        args = [self.client, "--no-defaults", "-S", self.socket, "-u", self.user, "-N", "-B", "-e", sql]
        if database:
            args.append(database)
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode != 0:
            raise DatabaseServerError("mariadb client failed on %r: %s" % (sql, out.stderr.strip()))
        return out.stdout

    def create_database(self, name):
        """Creates the database ``name``."""
        self.execute("CREATE DATABASE `%s`" % name)

    def create_user(self, name, password):
        """Creates ``name``@localhost with ``password`` and every privilege."""
        self.execute("CREATE USER '%s'@'localhost' IDENTIFIED BY '%s'; "
                     "GRANT ALL PRIVILEGES ON *.* TO '%s'@'localhost' WITH GRANT OPTION; "
                     "FLUSH PRIVILEGES" % (name, password, name))

    def stop(self):
        """Normal shutdown (SIGTERM), then removes the directory."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM)
            self.proc = None
        _remove(self.directory)


def relstorage_mariadb_compat():
    """Makes RelStorage 4.3's MySQL adapter install its history-preserving
    schema on MariaDB (call it once in the process that opens RelStorage;
    idempotent; history-free schemas need nothing).

    RelStorage's ``object_state`` declares ``tid ... REFERENCES
    "transaction"`` inline on signed ``BIGINT`` columns while
    ``transaction.tid`` is ``BIGINT UNSIGNED``. MySQL parses inline
    ``REFERENCES`` and ignores them, so the statement works there; MariaDB
    (since 10.5) creates them and refuses the signed/unsigned pair
    (errno 150, "Foreign key constraint is incorrectly formed"). This
    removes the two inline ``REFERENCES`` from the template, which gives on
    MariaDB exactly the table MySQL creates.

    The other difference, the version string, is handled by the server
    itself: :class:`MySQLServer` reports ``5.7.99-MariaDB-compat``, because
    RelStorage reads MariaDB's ``10.11.x`` as a MySQL 8 and then uses
    MySQL 8's ``INSERT ... AS new ON DUPLICATE KEY UPDATE``, which MariaDB
    does not have (MariaDB has every MySQL 5.7 statement RelStorage uses).
    """
    import re

    from relstorage.adapters.mysql.schema import MySQLSchemaInstaller

    hp, hf = MySQLSchemaInstaller.CREATE_OBJECT_STATE_TMPLS
    MySQLSchemaInstaller.CREATE_OBJECT_STATE_TMPLS = (
        re.sub(r'\s+REFERENCES "transaction"', "", hp), hf)


@contextlib.contextmanager
def mysql_server(database="tidecache"):
    """Starts a MariaDB server (see :class:`MySQLServer`) and stops and
    removes it afterwards."""
    server = MySQLServer(database)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    # A quick check by hand: start both, print how to reach them, stop.
    with postgresql_server() as pg:
        print("postgresql:", pg.dsn, pg.execute("select version()").strip())
    with mysql_server() as my:
        print("mysql:", my.params, my.execute("select version()").strip())
