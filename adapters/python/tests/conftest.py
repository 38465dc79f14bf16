"""Fixtures that start real servers: ``tidecached`` and a ZEO server, each
on a Unix socket in a temporary directory, stopped afterwards.

The sidecar binary is ``$TIDECACHED`` or ``target/release/tidecached``
(``make test`` builds it).
"""

import os
import pathlib
import signal
import socket as socketlib
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def tidecached_binary():
    path = os.environ.get("TIDECACHED") or str(ROOT / "target" / "release" / "tidecached")
    if not os.path.exists(path):
        pytest.fail("tidecached is not built at %s (run `make test`, or set TIDECACHED)" % path)
    return path


def wait_for_socket(path, proc, what, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s" % (what, proc.returncode))
        if os.path.exists(path):
            s = socketlib.socket(socketlib.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise RuntimeError("%s did not come up on %s" % (what, path))


def stop_process(proc, timeout=10):
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Sidecar:
    """A running ``tidecached``; ``kill()`` and ``start()`` for fault tests."""

    def __init__(self, directory, memory_mb=64, extra=()):
        self.socket = os.path.join(directory, "tidecached.sock")
        # Beside the socket (removed with the directory), not in /dev/shm.
        self.cache_file = os.path.join(directory, "cache.arena")
        self.memory_mb = memory_mb
        self.extra = list(extra)
        self.log = open(os.path.join(directory, "tidecached.log"), "ab")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [tidecached_binary(), "serve", "--socket", self.socket, "--memory-mb", str(self.memory_mb),
             "--cache-file", self.cache_file]
            + self.extra,
            stderr=self.log,
        )
        wait_for_socket(self.socket, self.proc, "tidecached")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        stop_process(self.proc)
        self.log.close()

    def stats(self):
        out = subprocess.run([tidecached_binary(), "stats", "--socket", self.socket],
                             check=True, capture_output=True, text=True)
        import json
        return json.loads(out.stdout)


@pytest.fixture
def sidecar():
    with tempfile.TemporaryDirectory(prefix="tidecached-") as d:
        s = Sidecar(d)
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="session")
def shared_sidecar():
    """One sidecar for a whole session (the conformance suites)."""
    with tempfile.TemporaryDirectory(prefix="tidecached-") as d:
        s = Sidecar(d, memory_mb=128)
        try:
            yield s
        finally:
            s.stop()


class ZEOServer:
    """A real ZEO server (``runzeo``) over a FileStorage, on a Unix socket.
    ``options``: more keys of the configuration's ``<zeo>`` section, e.g.
    ``{"invalidation-queue-size": 2, "invalidation-age": 3600}``."""

    def __init__(self, directory, options=None):
        self.address = os.path.join(directory, "zeo.sock")
        self.path = os.path.join(directory, "Data.fs")
        self.log = open(os.path.join(directory, "zeo.log"), "ab")
        self.config = None
        if options:
            self.config = os.path.join(directory, "zeo.conf")
            with open(self.config, "w") as f:
                f.write("<zeo>\n  address %s\n" % self.address)
                for k, v in options.items():
                    f.write("  %s %s\n" % (k, v))
                f.write("</zeo>\n<filestorage>\n  path %s\n</filestorage>\n" % self.path)
        self.start()

    def start(self):
        args = ["-C", self.config] if self.config else ["-a", self.address, "-f", self.path]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ZEO.runzeo"] + args,
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for_socket(self.address, self.proc, "ZEO server")

    def stop(self):
        stop_process(self.proc)

    def close(self):
        self.stop()
        self.log.close()


@pytest.fixture
def zeo_server():
    with tempfile.TemporaryDirectory(prefix="zeo-") as d:
        z = ZEOServer(d)
        try:
            yield z
        finally:
            z.close()


@pytest.fixture
def zeo_servers():
    """Starts ZEO servers with options: ``zeo_servers({...})``; each is
    stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="zeo-") as d:
        servers = []

        def start(options=None):
            sub = os.path.join(d, str(len(servers)))
            os.mkdir(sub)
            servers.append(ZEOServer(sub, options))
            return servers[-1]

        try:
            yield start
        finally:
            for z in servers:
                z.close()
