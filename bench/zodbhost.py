"""One application host for the ZODB benchmarks (bench/zodbshootout.py,
bench/latestart.py): a ZEO server (``runzeo``) over FileStorages and a
``tidecached``, each on a Unix socket in one temporary directory, and the
ZConfig text that names them. :class:`RelStorageHost` is the same for
RelStorage (bench/zodbshootout.py ``--base``, bench/rs_newworker.py,
bench/rs_memory.py, demo/run_demo.py): a ``tidecached`` and RelStorage
databases on SQLite (a data directory each) or PostgreSQL (a server from
bench/dbservers.py, a database each).

The ZEO server serves two FileStorages, ``plain`` and ``tidecache``. By
default both contenders use the one storage ``plain``, as a ZODB user
trying tidecache by hand would (and as issue 8 measured): the plain
contender's commits (its add, update and warm phases) are then commits the
sidecar never hears of, and every tidecache phase after them starts on a
sidecar whose horizon lags. ``own_storages=True`` gives the tidecache
contender the storage ``tidecache``: each of its phases then measures a
host whose sidecar heard of every commit of its database
(bench/latestart.py measures lagging on its own).

The server sets ``invalidation-age``: a client that reconnects, or asks
``getInvalidations(tid)`` for a ``tid`` older than the last 100
transactions (the server's invalidation queue), is answered by iterating
the FileStorage from ``tid`` on the server, instead of being told to
verify or drop its whole cache. tidecache's recovery of a sidecar whose
horizon lags (commits it did not hear of, bench/latestart.py) asks ZEO for
exactly that; plain ZEO clients that reconnect benefit the same way, so
both contenders run against the same server settings. It also keeps
its last 20,000 transactions' invalidations in memory
(``invalidation-queue-size``, 100 by default): a backlog within them is
answered from memory, one beyond them by the iteration. Measured with
bench/latestart.py, N = 10,000: first hit 70-250 ms after the attach
with the default queue (the server iterates 10,000 transactions), 17-18
ms with this one.
"""

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "adapters" / "python" / "tests"))

from conftest import stop_process  # noqa: E402  (the tests' server helpers)
from conftest import tidecached_binary  # noqa: E402
from conftest import wait_for_socket  # noqa: E402
# bench/ is on the path of whoever imports this module (its own folder):
# imported now, as bench/zodbshootout.py takes bench/ off the path after it.
from dbservers import postgresql_server  # noqa: E402

#: Seconds: how old a client's last transaction may be for the server to
#: answer its ``getInvalidations`` by iterating the storage (one day:
#: longer than any benchmark, so every backlog is answered).
INVALIDATION_AGE = 86400

#: The sidecar's arena, MiB: room for every revision the benchmarks make.
SIDECAR_MEMORY_MB = 256


class Host:
    """A ZEO server and a ``tidecached`` in a new temporary directory.

    ``restart_sidecar()`` stops the sidecar and starts a new one on a new,
    empty arena file (a truly cold host); ``stop()`` stops both and
    removes the directory."""

    def __init__(self, own_storages=False, prefix="tidecache-zodb-"):
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.zeo_socket = os.path.join(self.dir, "zeo.sock")
        self.sidecar_socket = os.path.join(self.dir, "tidecached.sock")
        self.own_storages = own_storages
        self._arena_serial = 0
        self.zeo = self.sidecar = None
        self._sidecar_log = open(os.path.join(self.dir, "tidecached.log"), "ab")
        self._zeo_log = open(os.path.join(self.dir, "zeo.log"), "ab")
        try:
            self._start_zeo()
            self._start_sidecar()
        except BaseException:
            self.stop()
            raise

    def _start_zeo(self):
        conf = os.path.join(self.dir, "zeo.conf")
        with open(conf, "w") as f:
            f.write("<zeo>\n  address %s\n"
                    "  # Backlogs of any length are answered, from memory within the\n"
                    "  # queue, else by iterating the storage (bench/zodbhost.py says why).\n"
                    "  invalidation-age %d\n  invalidation-queue-size 20000\n</zeo>\n" % (self.zeo_socket, INVALIDATION_AGE))
            for name in ("plain", "tidecache"):
                f.write("<filestorage %s>\n  path %s\n</filestorage>\n"
                        % (name, os.path.join(self.dir, name + ".fs")))
        self.zeo = subprocess.Popen([sys.executable, "-m", "ZEO.runzeo", "-C", conf],
                                    stdout=self._zeo_log, stderr=subprocess.STDOUT)
        wait_for_socket(self.zeo_socket, self.zeo, "ZEO server")

    def _start_sidecar(self):
        self._arena_serial += 1
        cache_file = os.path.join(self.dir, "cache-%d.arena" % self._arena_serial)
        self.sidecar = subprocess.Popen(
            [tidecached_binary(), "serve", "--socket", self.sidecar_socket, "--cache-file", cache_file,
             "--memory-mb", str(SIDECAR_MEMORY_MB)], stderr=self._sidecar_log)
        wait_for_socket(self.sidecar_socket, self.sidecar, "tidecached")

    def restart_sidecar(self):
        """Stops the sidecar and starts a new one on a new arena file (the
        old file is removed): nothing of what it held survives."""
        stop_process(self.sidecar)
        for name in os.listdir(self.dir):
            if name.startswith("cache-") and name.endswith(".arena"):
                os.unlink(os.path.join(self.dir, name))
        self._start_sidecar()

    def storage_name(self, contender):
        """The ZEO storage name of ``contender`` (``plain``, ``tidecache``)."""
        return contender if self.own_storages else "plain"

    def zeoclient_section(self, contender, indent="  "):
        """A ``<zeoclient>`` section for ``contender``'s storage."""
        return ("{i}<zeoclient>\n{i}  server {s}\n{i}  storage {n}\n{i}</zeoclient>\n"
                .format(i=indent, s=self.zeo_socket, n=self.storage_name(contender)))

    def zconfig(self):
        """ZConfig text with two databases: ``plain`` (a ``<zeoclient>``) and
        ``tidecache`` (the same ZEO client wrapped in ``<tidecache>``)."""
        return ("%import tidecache\n"
                "<zodb plain>\n" + self.zeoclient_section("plain") + "</zodb>\n"
                "<zodb tidecache>\n"
                "  <tidecache>\n"
                "    socket %s\n" % self.sidecar_socket
                + self.zeoclient_section("tidecache", indent="    ")
                + "  </tidecache>\n</zodb>\n")

    def write_zconfig(self):
        """Writes :meth:`zconfig` to ``zodb.conf`` in the directory; its path."""
        path = os.path.join(self.dir, "zodb.conf")
        with open(path, "w") as f:
            f.write(self.zconfig())
        return path

    def stop(self):
        for proc in (self.sidecar, self.zeo):
            if proc is not None:
                stop_process(proc)
        self._sidecar_log.close()
        self._zeo_log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


#: RelStorage backends :class:`RelStorageHost` can set up.
RELSTORAGE_BACKENDS = ("sqlite", "postgresql")


class RelStorageHost:
    """A ``tidecached`` and RelStorage databases, in a new temporary directory.

    ``backend`` is ``sqlite`` (a data directory per database, in the
    temporary directory) or ``postgresql`` (one server started by
    bench/dbservers.py for the host's lifetime, a database per name).
    ``databases`` are the names of the databases to create (the
    zodbshootout run gives each contender its own). ``keep_history``:
    RelStorage's ``keep-history`` (history-preserving when true).

    ``relstorage_section(name, **options)`` is a ``<relstorage>`` section
    for database ``name`` (extra options are RelStorage keys with ``_`` for
    ``-``: ``cache_local_mb=0``); ``tidecache_section`` wraps it in
    ``<tidecache>``; ``open_storage`` opens either from that ZConfig text.
    ``restart_sidecar()`` and ``stop()`` as for :class:`Host`."""

    def __init__(self, backend="sqlite", databases=("plain", "tidecache"), keep_history=True,
                 prefix="tidecache-rs-"):
        if backend not in RELSTORAGE_BACKENDS:
            raise ValueError("backend must be one of %s, not %r" % (", ".join(RELSTORAGE_BACKENDS), backend))
        self.backend = backend
        self.keep_history = keep_history
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.sidecar_socket = os.path.join(self.dir, "tidecached.sock")
        self._arena_serial = 0
        self.sidecar = None
        self._sidecar_log = open(os.path.join(self.dir, "tidecached.log"), "ab")
        self._servers = contextlib.ExitStack()
        self._adapters = {}
        try:
            if backend == "postgresql":
                self.server = self._servers.enter_context(postgresql_server(database=None))
            for name in databases:
                self.add_database(name)
            self._start_sidecar()
        except BaseException:
            self.stop()
            raise

    def add_database(self, name):
        """Creates database ``name`` (empty; RelStorage creates its schema
        on first open)."""
        if self.backend == "sqlite":
            data_dir = os.path.join(self.dir, "sqlite-" + name)
            os.makedirs(data_dir, exist_ok=True)
            self._adapters[name] = "<sqlite3>\n  data-dir %s\n</sqlite3>\n" % data_dir
        else:
            self.server.create_database(name)
            dsn = self.server.dsn_for(name)
            self._adapters[name] = "<postgresql>\n  dsn %s\n</postgresql>\n" % dsn

    _start_sidecar = Host._start_sidecar
    restart_sidecar = Host.restart_sidecar

    def sidecar_stats(self):
        """``tidecached stats`` of the host's sidecar (JSON, as a dict)."""
        import json
        out = subprocess.run([tidecached_binary(), "stats", "--socket", self.sidecar_socket],
                             check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    def relstorage_section(self, name, indent="  ", **options):
        """A ``<relstorage>`` section for database ``name``; ``options``
        are further RelStorage keys (``cache_local_mb=0``)."""
        lines = ["<relstorage>", "  keep-history %s" % ("true" if self.keep_history else "false")]
        lines += ["  %s %s" % (k.replace("_", "-"), v) for k, v in options.items()]
        lines += ["  " + line for line in self._adapters[name].splitlines()]
        lines.append("</relstorage>")
        return "".join(indent + line + "\n" for line in lines)

    def tidecache_section(self, name, indent="  ", **options):
        """:meth:`relstorage_section` inside ``<tidecache>`` on the host's
        sidecar."""
        return ("{i}<tidecache>\n{i}  socket {s}\n".format(i=indent, s=self.sidecar_socket)
                + self.relstorage_section(name, indent=indent + "  ", **options)
                + "%s</tidecache>\n" % indent)

    def storage_zconfig(self, name, tidecache=False, **options):
        """ZConfig text of one storage (for ``ZODB.config.storageFromString``)."""
        imports = "%import relstorage\n" + ("%import tidecache\n" if tidecache else "")
        section = self.tidecache_section if tidecache else self.relstorage_section
        return imports + section(name, indent="", **options)

    def open_storage(self, name, tidecache=False, **options):
        """Opens database ``name``: plain RelStorage, or wrapped in
        ``<tidecache>``."""
        import ZODB.config
        return ZODB.config.storageFromString(self.storage_zconfig(name, tidecache, **options))

    def zconfig(self, plain="plain", cached="tidecache", **options):
        """ZConfig text with two databases: ``plain`` (a ``<relstorage>``
        on database ``plain``) and ``tidecache`` (the same section on
        database ``cached`` inside ``<tidecache>``)."""
        return ("%import relstorage\n%import tidecache\n"
                "<zodb plain>\n" + self.relstorage_section(plain, **options) + "</zodb>\n"
                "<zodb tidecache>\n" + self.tidecache_section(cached, **options) + "</zodb>\n")

    def write_zconfig(self, **kwargs):
        """Writes :meth:`zconfig` to ``zodb.conf`` in the directory; its path."""
        path = os.path.join(self.dir, "zodb.conf")
        with open(path, "w") as f:
            f.write(self.zconfig(**kwargs))
        return path

    def stop(self):
        if self.sidecar is not None:
            stop_process(self.sidecar)
        self._sidecar_log.close()
        self._servers.close()
        shutil.rmtree(self.dir, ignore_errors=True)
