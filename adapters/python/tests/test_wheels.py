"""Installing without a compiler (issue 11), and the one version.

``test_one_version_everywhere`` checks the development build: the root
Cargo.toml's workspace version is what ``tidecached --version``, its
``stats`` and ``tidecache.__version__`` (and the installed distribution's
metadata) show.

The other tests take the wheels ``make dist`` left in ``dist/`` (they skip,
saying so, when there are none; ``make test`` builds them first and
fails instead): their tags
(tidecache: one wheel per CPython version, this interpreter's taken;
tidecached: ``py3-none``; both manylinux 2.17), the LICENSE inside both, the glibc symbol versions their
binaries need, and then an operator's install: a fresh venv, both wheels
installed with pip (``tidecache[sidecar]``) from a PATH with no cargo or
rustc on it, the daemon run from the venv's PATH, and a ZODB application
over ZEO with the sidecar, which must hit.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest

from conftest import ROOT
from conftest import stop_process
from conftest import tidecached_binary
from conftest import wait_for_socket

import tidecache

DIST = ROOT / "dist"
LICENSE_TITLE = "Zope Public License (ZPL) Version 2.1"
# manylinux2014 is glibc 2.17: nothing newer may be needed.
GLIBC_MAX = (2, 17)


def workspace_version():
    text = (ROOT / "Cargo.toml").read_text()
    section = text.split("[workspace.package]", 1)[1].split("\n[", 1)[0]
    m = re.search(r'^version\s*=\s*"([^"]+)"', section, re.M)
    assert m, "no version in [workspace.package] of Cargo.toml"
    return m.group(1)


def test_one_version_everywhere(sidecar):
    from importlib.metadata import version as dist_version

    v = workspace_version()
    out = subprocess.run([tidecached_binary(), "--version"], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "tidecached %s" % v
    stats = sidecar.stats()
    assert stats["version"] == v
    assert stats["server"] == "tidecached %s" % v
    assert tidecache.__version__ == v
    assert dist_version("tidecache") == v, "pyproject's version is dynamic, from Cargo.toml"


# -- the wheels of `make dist` ---------------------------------------------------


@pytest.fixture(scope="module")
def wheels():
    """(adapter wheel, daemon wheel) of the workspace version in dist/."""
    v = workspace_version()
    cp = "cp%d%d" % sys.version_info[:2]
    adapter = sorted(DIST.glob("tidecache-%s-%s-%s-*.whl" % (v, cp, cp)))
    daemon = sorted(DIST.glob("tidecached-%s-*.whl" % v))
    if not adapter or not daemon:
        if os.environ.get("TIDECACHE_WHEELS_REQUIRED") == "1":  # make test
            pytest.fail("make test built no tidecache (for %s) and tidecached %s wheels in dist/: "
                        "see `make dist`'s output" % (cp, v))
        pytest.skip("no tidecache (for %s) and tidecached %s wheels in dist/: run `make dist` first "
                    "(`make test` does)" % (cp, v))
    assert len(adapter) == 1 and len(daemon) == 1, "one wheel of each, not %s %s" % (adapter, daemon)
    return adapter[0], daemon[0]


def test_tags_and_license(wheels):
    adapter, daemon = wheels
    # One wheel per CPython version (docs/operations.md: abi3 was slower).
    cp = "cp%d%d" % sys.version_info[:2]
    tags = adapter.name[:-len(".whl")].split("-")[2:]
    assert tags[:2] == [cp, cp], adapter.name
    assert "manylinux_2_17_x86_64" in tags[2].split("."), adapter.name
    tags = daemon.name[:-len(".whl")].split("-")[2:]
    assert tags[:2] == ["py3", "none"], daemon.name
    assert "manylinux_2_17_x86_64" in tags[2].split("."), daemon.name
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            licenses = [n for n in z.namelist() if ".dist-info/" in n and n.rsplit("/", 1)[-1] == "LICENSE"]
            assert licenses, "no LICENSE in %s" % wheel.name
            assert LICENSE_TITLE in z.read(licenses[0]).decode()
            metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            assert "License: ZPL-2.1" in z.read(metadata).decode() or "ZPL-2.1" in z.read(metadata).decode()


def test_binaries_need_no_glibc_newer_than_2_17(wheels, tmp_path):
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    binaries = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for n in z.namelist():
                if n.endswith(".so") or n.endswith("/scripts/tidecached") or n.endswith("/tidecached"):
                    binaries.append(pathlib.Path(z.extract(n, tmp_path)))
    names = sorted(b.name for b in binaries)
    assert any(n.startswith("_native") for n in names) and "tidecached" in names, names
    for b in binaries:
        out = subprocess.run([objdump, "-T", str(b)], check=True, capture_output=True, text=True).stdout
        needed = {tuple(map(int, m.split("."))) for m in re.findall(r"GLIBC_(\d+(?:\.\d+)+)", out)}
        assert needed, "%s: no GLIBC symbol versions (not dynamically linked?)" % b.name
        assert max(needed) <= GLIBC_MAX, "%s needs GLIBC_%s" % (b.name, ".".join(map(str, max(needed))))


APP = r'''
import json, sys
import transaction, ZODB
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
import tidecache
from tidecache import TideCacheStorage

zeo, sock = sys.argv[1:3]
storage = TideCacheStorage(ClientStorage(zeo, wait_timeout=30), socket=sock)
# No shared state, no object cache: every read goes to the storage, and
# the arena must answer it.
db = tidecache.DB(storage, shared_state=False, cache_size=0)
with db.transaction() as c:
    c.root()["docs"] = [PersistentMapping(n=i) for i in range(20)]
seen = []
for _ in range(3):
    c = db.open()
    c.cacheMinimize()
    seen.append(sum(d["n"] for d in c.root()["docs"]))
    c.close()
    storage._tc_client.wait_for_stores()
s = storage.cache_stats()
print(json.dumps({"seen": seen, "hits": s["hits"], "misses": s["misses"], "joined": s["joined"],
                  "version": tidecache.__version__, "module": tidecache._native.__file__}))
db.close()
'''


def test_fresh_venv_without_cargo_runs_the_daemon_and_a_zodb_app(wheels):
    adapter, daemon = wheels
    v = workspace_version()
    with tempfile.TemporaryDirectory(prefix="tidecache-wheels-") as d:
        d = pathlib.Path(d)
        venv = d / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # An operator's PATH: the venv's bin, and no directory with a Rust
        # toolchain in it (~/.cargo/bin and the like).
        path = [str(venv / "bin")] + [
            p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not any(os.path.exists(os.path.join(p, tool)) for tool in ("cargo", "rustc"))
        ]
        env = {k: val for k, val in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CARGO_HOME", "RUSTUP_HOME", "TIDECACHED")}
        env["PATH"] = os.pathsep.join(path)
        assert shutil.which("cargo", path=env["PATH"]) is None
        assert shutil.which("rustc", path=env["PATH"]) is None
        py = str(venv / "bin" / "python")
        # --only-binary: pip must not build anything, tidecache least of all.
        subprocess.run(
            [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary", ":all:",
             "--find-links", str(DIST), "%s[sidecar]" % adapter, "ZEO"],
            check=True, env=env, cwd=str(d),
        )

        # The daemon, from the venv's PATH.
        exe = shutil.which("tidecached", path=env["PATH"])
        assert exe == str(venv / "bin" / "tidecached"), exe
        out = subprocess.run([exe, "--version"], check=True, capture_output=True, text=True, env=env)
        assert out.stdout.strip() == "tidecached %s" % v
        sock = str(d / "tidecached.sock")
        log = open(d / "tidecached.log", "ab")
        sidecar = subprocess.Popen(
            ["tidecached", "serve", "--socket", sock, "--memory-mb", "16", "--cache-file", str(d / "arena")],
            stderr=log, env=env, cwd=str(d),
        )
        zeo_sock = str(d / "zeo.sock")
        zeo = subprocess.Popen([py, "-m", "ZEO.runzeo", "-a", zeo_sock, "-f", str(d / "Data.fs")],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(d))
        try:
            wait_for_socket(sock, sidecar, "tidecached (from the wheel)")
            wait_for_socket(zeo_sock, zeo, "ZEO server (in the fresh venv)")
            app = d / "app.py"
            app.write_text(APP)
            out = subprocess.run([py, str(app), zeo_sock, sock], check=True, capture_output=True, text=True,
                                 env=env, cwd=str(d))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["module"].startswith(str(venv)), "imported %s, not the installed wheel" % r["module"]
            assert r["version"] == v
            assert r["seen"] == [190, 190, 190]
            assert r["joined"], r
            assert r["hits"] >= 40, "the second and third reads hit the sidecar's arena: %r" % r
            stats = json.loads(subprocess.run(["tidecached", "stats", "--socket", sock], check=True,
                                              capture_output=True, text=True, env=env).stdout)
            assert stats["version"] == v
            assert stats["total"]["entries"] >= 20, stats["total"]
        finally:
            stop_process(zeo)
            stop_process(sidecar)
            log.close()
