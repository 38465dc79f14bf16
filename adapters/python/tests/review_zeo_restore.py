"""Review repro (not a pytest test): a ZEO server restored from a backup under a live
tidecache ZEO client A; B (fresh) commits on the restored server, A reconnects
(quick verification keeps its stale ZEO cache) and stores its old-history state;
B is then served it. Run: .venv/bin/python adapters/python/tests/review_zeo_restore.py /tmp/somedir
Printed "B reads (must be 'base') old history" (a wrong hit) before a flush cut off
the processes still joined on the old history (protocol 5: Stale); now B reads 'base'.
A itself still reads its stale ZEO cache: ZEO's own quick verification, not tidecache."""
import os, sys, time, shutil, logging
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ZODB, ZEO, ZEO.ClientStorage, transaction
from persistent.mapping import PersistentMapping
from tidecache import TideCacheStorage
from conftest import Sidecar, ZEOServer
import tidecache.storage
tidecache.storage.RESTORE_GRACE_SECONDS = 0.2
logging.basicConfig(level=logging.ERROR)
d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/rv4"; sc = Sidecar(d + "/sc") if os.makedirs(d + "/sc", exist_ok=True) is None else None
os.makedirs(d + "/z", exist_ok=True)
z = ZEOServer(d + "/z")
def open_db():
    st = TideCacheStorage(ZEO.ClientStorage.ClientStorage(z.address, wait_timeout=10), socket=sc.socket)
    return st, ZODB.DB(st, cache_size=0)
def read(db, st):
    c = db.open(); c.cacheMinimize(); v = c.root()["doc"]["x"]; c.close(); st._tc_client.wait_for_stores(); return v
a, dba = open_db()
with dba.transaction() as c: c.root()["doc"] = PersistentMapping(x="base")
z.stop(); shutil.copy(z.path, d + "/backup.fs"); z.start()
t0 = time.time()
while not a._storage.is_connected():
    assert time.time() < t0 + 20; time.sleep(0.05)
with dba.transaction() as c: c.root()["doc"]["x"] = "old history"
print("A reads", read(dba, a))
# restore the backup under the live client A
z.stop()
for s in ("", ".index", ".tmp", ".lock"):
    if os.path.exists(z.path + s): os.remove(z.path + s)
shutil.copy(d + "/backup.fs", z.path)
z.start()
b, dbb = open_db()
with dbb.transaction() as c: c.root()["other"] = PersistentMapping(x=1)   # new history commit
print("B flushes", b.cache_stats()["flushes"])
deadline = time.time() + 20
while not a._storage.is_connected():
    assert time.time() < deadline, "A never reconnected"
    time.sleep(0.1)
time.sleep(1)
print("A (stale ZEO cache) reads", read(dba, a))
print("A reads", read(dba, a))
dbb2 = ZODB.DB(b, cache_size=0) if False else dbb
print("B reads (must be 'base')", read(dbb, b), read(dbb, b))
c = dbb.open(); oid = c.root()["doc"]._p_oid; c.close()
from ZODB.utils import p64, u64
last = b._storage.lastTransaction()
r = b._storage.loadBefore(oid, p64(u64(last) + 1))
import pickle, io
print("B's ZEO server says doc serial", u64(r[1]), "contains 'base':", b"base" in r[0], "'old history':", b"old history" in r[0])
print(b.cache_stats())
dba.close(); dbb.close(); z.close(); sc.stop()
