"""Load with faults: a ZODB application over a real ZEO server (FileStorage
behind it), every worker process wrapping its storage in
``TideCacheStorage``, while a chaos loop kills the sidecar with SIGKILL (and
restarts it on the same socket and arena file), stops it with SIGSTOP (and
continues it), has workers fork children that use the inherited ``DB``
(as gunicorn ``--preload`` children do), and kills workers with SIGKILL and
starts replacements.

The application: ``GROUPS`` groups of ``MEMBERS`` persistent counters;
a writer adds 1 to every member of one group in one transaction. A request
(one transaction on its own connection) reads a few groups and checks:

- **torn snapshot**: the members of a group differ (each transaction sees
  all of a commit or none of it);
- **went back**: a thread saw a group's value go down between two of its
  requests (views only move forward);
- **wrong state**: a spot check of ``load`` at the connection's view
  against ``loadBefore`` of the base storage, and, after the run, every
  recorded observation ``(view, group, value)`` against the history
  read from the FileStorage (the value committed by the newest transaction
  at or before the view);
- **hang**: every process (worker, replacement, forked child) finishes
  within a bound; a hung one dumps its threads' tracebacks (faulthandler)
  and fails the run.

Two ways to schedule faults:

- ``--requests N``: faults at fixed points of the run, after given numbers
  of requests of all workers together (``--faults K`` of each kind; the
  short run of ``make test``, ``adapters/python/tests/test_faultload.py``);
- ``--seconds S``: faults at seeded random times for S seconds
  (``make soak``: ``SOAK_SECONDS``, 8 processes x 8 threads).

Before the run with faults, a reference run of the same load without
faults prints its throughput and p99 too (``--no-reference`` skips it).
Prints the seed, throughput (requests/s: transactions), p99 request
latency, faults injected, and the counts above; the last line of output is
one JSON document. Exits 1 if anything that must hold did not.

ZEO's ``ClientStorage`` cannot cross a fork (its IO thread stays in the
parent): a forked child keeps the inherited ``DB``, ``TideCacheStorage``
and sidecar client, and gives the storage a new ZEO connection
(``rebase_after_fork``) as a gunicorn ``post_fork`` hook would.

    faultload.py [--processes 8] [--threads 8] (--seconds S | --requests N)
                 [--faults K] [--seed SEED] [--no-reference] [--json PATH]
"""

import argparse
import array
import bisect
import faulthandler
import json
import mmap
import os
import pathlib
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "adapters" / "python" / "tests"

GROUPS = 64
MEMBERS = 4
READ_GROUPS = 4  # groups a read request reads
WRITE_SHARE = 0.2  # requests that commit
SPOT_CHECK_EVERY = 8  # requests per spot check against loadBefore
CONNECTION_CACHE = 64  # objects per connection: small, so loads happen
CHILD_REQUESTS = 200  # requests of a forked child, in CHILD_THREADS threads
CHILD_THREADS = 2
CHILD_BOUND = 60.0  # seconds a forked child may take
PAUSE_BOUND = 60.0  # seconds a worker's threads may take to reach a quiescent point
DATABASE = "faultload"

# The board: one shared file, mapped by the driver and every process.
# Word 0: stop flag. Then SLOTS slots of SLOT_WORDS words, one per process
# (worker, replacement or forked child), each written by its process only.
WORKER_SLOTS = 256  # workers and their replacements in one run
CHILD_SLOTS_PER_WORKER = 7  # worker w's children: WORKER_SLOTS + 7 w ...
SLOTS = WORKER_SLOTS * (1 + CHILD_SLOTS_PER_WORKER)
SLOT_WORDS = 8
# Slot words:
PID, KIND, STATE, REQUESTS, TORN, WRONG, WENT_BACK, SPOT_CHECKS = range(SLOT_WORDS)
KIND_WORKER, KIND_CHILD = 1, 2
STATE_RUNNING, STATE_DONE, STATE_FAILED = 1, 2, 3


class Board:
    """The shared counters: ``set(slot, word, value)``, ``get``, ``stop``."""

    def __init__(self, path, create=False):
        if create:
            with open(path, "wb") as f:
                f.write(b"\0" * 8 * (1 + SLOTS * SLOT_WORDS))
        self.f = open(path, "r+b")
        self.m = mmap.mmap(self.f.fileno(), 0)
        self.words = memoryview(self.m).cast("q")

    def _at(self, slot, word):
        return 8 * (1 + slot * SLOT_WORDS + word)

    def set(self, slot, word, value):
        struct.pack_into("<q", self.m, self._at(slot, word), value)

    def get(self, slot, word):
        return struct.unpack_from("<q", self.m, self._at(slot, word))[0]

    @property
    def stopped(self):
        return struct.unpack_from("<q", self.m, 0)[0] != 0

    def stop(self):
        struct.pack_into("<q", self.m, 0, 1)

    def total(self, word):
        return sum(self.words[1 + word::SLOT_WORDS])


# -- the worker: a ZODB application ------------------------------------------


class Checks:
    """One process's counters, mirrored into its board slot, and its
    observations ``(view, group, value)``, appended to a file in chunks (a
    process killed with SIGKILL loses at most the last chunk)."""

    def __init__(self, board, slot, observations_path):
        self.board, self.slot = board, slot
        self.lock = threading.Lock()
        self.counts = {REQUESTS: 0, TORN: 0, WRONG: 0, WENT_BACK: 0, SPOT_CHECKS: 0}
        self.observations = array.array("Q")
        self.path = observations_path
        self.latencies = array.array("d")

    def add(self, word, n=1):
        with self.lock:
            self.counts[word] += n
            self.board.set(self.slot, word, self.counts[word])

    def failure(self, word, message):
        sys.stderr.write("FAULTLOAD %s (pid %d): %s\n" % (
            {TORN: "TORN SNAPSHOT", WRONG: "WRONG STATE", WENT_BACK: "WENT BACK"}[word], os.getpid(), message))
        sys.stderr.flush()
        self.add(word)

    def observe(self, view, group, value):
        with self.lock:
            self.observations.extend((view, group, value))
            if len(self.observations) >= 3 * 1024:
                self._flush_locked()

    def _flush_locked(self):
        with open(self.path, "ab") as f:
            self.observations.tofile(f)
        self.observations = array.array("Q")

    def flush(self):
        with self.lock:
            self._flush_locked()


def open_database(zeo, sidecar, threads):
    import ZODB
    from ZEO.ClientStorage import ClientStorage

    from tidecache import TideCacheStorage

    storage = TideCacheStorage(ClientStorage(zeo, wait_timeout=60), socket=sidecar, database=DATABASE)
    return storage, ZODB.DB(storage, pool_size=threads, cache_size=CONNECTION_CACHE)


def rebase_after_fork(db, zeo):
    """In a forked child: ZEO's client cannot cross a fork, so the inherited
    ``TideCacheStorage`` (and its sidecar client, mapped arena and views)
    gets a new ZEO connection, as ``TideCacheStorage.__init__`` attaches
    one: invalidations go to the pending list until ``lastTransaction`` is
    read, then are reported from there (what the parent heard after the
    fork is not this process's to report). Locks another thread of the
    parent may have held at the fork are made anew; the pool's connections
    (over the parent's ZEO connection) are dropped."""
    from ZEO.ClientStorage import ClientStorage
    from ZODB.DB import ConnectionPool
    from ZODB.DB import KeyedConnectionPool
    from ZODB.utils import Lock
    from ZODB.utils import u64

    storage = db.storage
    # The parent's ZEO connection: its socket must not stay open here. Were
    # the parent killed in the middle of a commit, the server would wait
    # for it (holding its commit lock, every commit of every process
    # waiting) as long as this child held a copy of the socket (seen with
    # --seconds 90 --fault-interval 0.4). The descriptor becomes /dev/null,
    # so nothing this child does can close or use the shared socket, and
    # the old storage is kept from the garbage collector.
    _left_by_the_parent.append(storage._storage)
    blind_sockets_to(zeo)
    storage._lock = Lock()
    storage._tc_lock = threading.Lock()
    storage._instances = set()
    storage._tc_reported = None
    storage._tc_pending = []
    storage._tc_held = None
    base = ClientStorage(zeo, wait_timeout=60)
    storage._storage = base
    base.registerDB(storage)
    last = u64(base.lastTransaction())
    with storage._tc_lock:
        storage._tc_generation = storage._tc_connection_generation()
        storage._tc_reported = last
        pending, storage._tc_pending = storage._tc_pending, None
        for t, oids in pending:
            storage._tc_report_locked(t, oids)
    db.pool = ConnectionPool(db.pool.size, db.pool.timeout)
    db.historical_pool = KeyedConnectionPool(db.historical_pool.size, db.historical_pool.timeout)


_left_by_the_parent = []


def blind_sockets_to(address):
    """Points every descriptor of a socket connected to ``address`` at
    /dev/null (the socket itself, shared with the parent, is left alone)."""
    import socket

    null = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd == null:
                continue
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                peer = s.getpeername()
            except OSError:
                peer = None
            finally:
                s.detach()
            if peer == address:
                os.dup2(null, fd)
    finally:
        os.close(null)


class Application:
    """The requests of one process's threads."""

    def __init__(self, db, storage, checks, board, seed):
        self.db, self.storage, self.checks, self.board, self.seed = db, storage, checks, board, seed
        # Quiescence for a fork: threads wait here between requests.
        self.pause = threading.Condition()
        self.pausing = False
        self.paused = 0

    def request(self, rng, seen, write):
        import transaction
        from ZODB.POSException import ConflictError
        from ZODB.utils import u64

        started = time.perf_counter()
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        try:
            if rng.random() < 0.25:
                conn.cacheMinimize()
            root = conn.root()
            instance = conn._storage
            view = u64(instance._start) - 1
            groups = [rng.randrange(GROUPS)] if write else rng.sample(range(GROUPS), READ_GROUPS)
            for g in groups:
                members = root["g%d" % g]
                values = [m["v"] for m in members]
                if len(set(values)) != 1:
                    self.checks.failure(TORN, "view %x group %d members %s" % (view, g, values))
                value = values[0]
                if value < seen.get(g, 0):
                    self.checks.failure(WENT_BACK, "view %x group %d: %d after %d" % (view, g, value, seen[g]))
                seen[g] = value
                self.checks.observe(view, g, value)
            if rng.randrange(SPOT_CHECK_EVERY) == 0:
                member = root["g%d" % groups[0]][rng.randrange(MEMBERS)]
                self.spot_check(instance, member._p_oid, view)
            if write:
                for m in root["g%d" % groups[0]]:
                    m["v"] += 1
                try:
                    tm.commit()
                except ConflictError:
                    tm.abort()
                    return None
            else:
                tm.abort()
        finally:
            tm.abort()
            conn.close()
        return time.perf_counter() - started

    def spot_check(self, instance, oid, view):
        """``load`` at the connection's view (the sidecar's answer on a hit)
        against ``loadBefore`` of the base storage."""
        from ZODB.utils import u64

        got = instance.load(oid)
        want = self.storage._storage.loadBefore(oid, instance._start)
        self.checks.add(SPOT_CHECKS)
        if want is None or (got[0], got[1]) != (want[0], want[1]):
            self.checks.failure(WRONG, "oid %x at view %x: load gave serial %x, loadBefore %s" % (
                u64(oid), view, u64(got[1]), "nothing" if want is None else "serial %x" % u64(want[1])))

    def serve(self, n, until):
        """One thread: requests until ``until()``."""
        rng = random.Random(self.seed * 1000 + n)
        seen = {}
        while not until():
            with self.pause:
                if self.pausing:
                    self.paused += 1
                    self.pause.notify_all()
                    while self.pausing:
                        self.pause.wait()
                    self.paused -= 1
            latency = self.request(rng, seen, rng.random() < WRITE_SHARE)
            if latency is not None:
                self.checks.add(REQUESTS)
                with self.checks.lock:
                    self.checks.latencies.append(latency)

    def run_threads(self, count, until):
        threads = [threading.Thread(target=self.serve, args=(n, until), name="request-%d" % n, daemon=True)
                   for n in range(count)]
        for t in threads:
            t.start()
        return threads

    def quiesce(self, count):
        """Waits until all ``count`` request threads wait between requests."""
        with self.pause:
            self.pausing = True
            deadline = time.monotonic() + PAUSE_BOUND
            while self.paused < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("request threads did not reach a quiescent point in %ss" % PAUSE_BOUND)
                self.pause.wait(left)

    def resume(self):
        with self.pause:
            self.pausing = False
            self.pause.notify_all()


def fork_child(app, args, child_slot):
    """Forks at a quiescent point (request threads paused, no report in
    flight: the adapter's report lock held); the child serves
    ``CHILD_REQUESTS`` requests with the inherited ``DB`` and exits."""
    board = app.board
    board.set(child_slot, KIND, KIND_CHILD)
    board.set(child_slot, STATE, STATE_RUNNING)
    with app.storage._tc_lock:
        pid = os.fork()
    if pid:
        return pid
    # The child.
    code = 1
    try:
        faulthandler.dump_traceback_later(CHILD_BOUND, exit=True)
        board.set(child_slot, PID, os.getpid())
        rebase_after_fork(app.db, args.zeo)
        checks = Checks(board, child_slot, "%s.child-%d" % (args.observations, child_slot))
        child = Application(app.db, app.storage, checks, board, app.seed * 7919 + child_slot)
        done = iter(range(CHILD_REQUESTS))

        def until():
            return next(done, None) is None

        for t in child.run_threads(CHILD_THREADS, until):
            t.join()
        checks.flush()
        app.storage._tc_client.wait_for_stores(5000)
        board.set(child_slot, STATE, STATE_DONE)
        code = 0
    except BaseException:
        import traceback
        traceback.print_exc()
        board.set(child_slot, STATE, STATE_FAILED)
    finally:
        sys.stderr.flush()
        os._exit(code)


def worker(args):
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    fork_requested = threading.Event()
    signal.signal(signal.SIGUSR2, lambda *_: fork_requested.set())
    board = Board(args.board)
    slot = args.slot
    board.set(slot, PID, os.getpid())
    board.set(slot, KIND, KIND_WORKER)
    board.set(slot, STATE, STATE_RUNNING)  # from now on it may be asked to fork
    storage, db = open_database(args.zeo, args.sidecar, args.threads)
    checks = Checks(board, slot, "%s.worker-%d" % (args.observations, slot))
    app = Application(db, storage, checks, board, args.seed)
    threads = app.run_threads(args.threads, lambda: board.stopped)
    children = []
    next_child = WORKER_SLOTS + slot * CHILD_SLOTS_PER_WORKER
    while any(t.is_alive() for t in threads):
        if fork_requested.wait(0.05) and not board.stopped:
            fork_requested.clear()
            if next_child < WORKER_SLOTS + (slot + 1) * CHILD_SLOTS_PER_WORKER:
                app.quiesce(args.threads)
                try:
                    children.append(fork_child(app, args, next_child))
                    next_child += 1
                finally:
                    app.resume()
    for t in threads:
        t.join()
    for pid in children:
        os.waitpid(pid, 0)
    checks.flush()
    with open(args.observations + ".latency-%d" % slot, "wb") as f:
        checks.latencies.tofile(f)
    stats = storage.cache_stats()
    with open(args.observations + ".stats-%d" % slot, "w") as f:
        json.dump(stats, f)
    db.close()
    board.set(slot, STATE, STATE_DONE)


# -- the driver ----------------------------------------------------------------


class Run:
    """One run: ZEO, the sidecar, the workers, the faults, the checks."""

    def __init__(self, opts, directory, chaos, rng):
        sys.path.insert(0, str(TESTS))
        from conftest import Sidecar
        from conftest import ZEOServer

        self.opts, self.dir, self.chaos, self.rng = opts, directory, chaos, rng
        self.zeo = ZEOServer(directory)
        self.sidecar = Sidecar(directory, memory_mb=64)
        self.board_path = os.path.join(directory, "board")
        self.board = Board(self.board_path, create=True)
        self.observations = os.path.join(directory, "obs")
        self.workers = {}  # slot -> Popen
        self.logs = {}
        self.next_slot = 0
        self.forks_of = {}  # worker slot -> children forked
        self.faults = {"sidecar_kill": 0, "sidecar_stop": 0, "fork": 0, "worker_kill": 0}
        self.failures = []
        self.fault_log = []  # (seconds into the run, requests so far, fault, target)
        self.started = time.time()
        self.member_oids = self.populate()

    def populate(self):
        import ZODB
        from persistent.list import PersistentList
        from persistent.mapping import PersistentMapping
        from ZEO.ClientStorage import ClientStorage

        db = ZODB.DB(ClientStorage(self.zeo.address, wait_timeout=60))
        with db.transaction() as c:
            for g in range(GROUPS):
                c.root()["g%d" % g] = PersistentList(PersistentMapping(v=0) for _ in range(MEMBERS))
        with db.transaction() as c:
            oids = {c.root()["g%d" % g][0]._p_oid: g for g in range(GROUPS)}
        db.close()
        return oids

    def start_worker(self):
        slot = self.next_slot
        self.next_slot += 1
        if slot >= WORKER_SLOTS:
            raise RuntimeError("more than %d workers in one run" % WORKER_SLOTS)
        log = open(os.path.join(self.dir, "worker-%d.log" % slot), "wb")
        self.logs[slot] = log.name
        self.workers[slot] = subprocess.Popen(
            [sys.executable, __file__, "worker", "--slot", str(slot), "--board", self.board_path,
             "--zeo", self.zeo.address, "--sidecar", self.sidecar.socket, "--threads", str(self.opts.threads),
             "--observations", self.observations, "--seed", str(self.rng.randrange(1 << 30))],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def children(self):
        """Slots of the forked children so far."""
        return [s for s in range(WORKER_SLOTS, SLOTS) if self.board.get(s, KIND) == KIND_CHILD]

    def live_workers(self):
        """Workers running, with their signal handlers in place."""
        return [s for s, p in self.workers.items() if p.poll() is None and self.board.get(s, STATE) == STATE_RUNNING]

    # The faults.

    def fault(self, kind):
        target = None
        if kind == "sidecar_kill":
            self.sidecar.kill()
            self.sidecar.start()
        elif kind == "sidecar_stop":
            self.sidecar.proc.send_signal(signal.SIGSTOP)
            time.sleep(self.rng.uniform(0.2, 1.0))
            self.sidecar.proc.send_signal(signal.SIGCONT)
        elif kind == "fork":
            live = [s for s in self.live_workers() if self.forks_of.get(s, 0) < CHILD_SLOTS_PER_WORKER]
            if not live:
                return
            before = self.children()
            target = self.rng.choice(live)
            self.forks_of[target] = self.forks_of.get(target, 0) + 1
            os.kill(self.workers[target].pid, signal.SIGUSR2)
            # Until the worker has forked (its child's slot is taken), so a
            # fault that follows cannot kill it first.
            deadline = time.time() + PAUSE_BOUND + 10
            while self.children() == before:
                if time.time() > deadline:
                    self.failures.append("HANG: a worker asked to fork did not within %ss" % (PAUSE_BOUND + 10))
                    break
                time.sleep(0.01)
        elif kind == "worker_kill":
            live = self.live_workers()
            if not live or self.next_slot >= WORKER_SLOTS:
                return
            slot = target = self.rng.choice(live)
            self.workers[slot].kill()
            self.workers[slot].wait()
            self.board.set(slot, STATE, STATE_DONE)  # its counters stay on the board
            self.start_worker()
        self.faults[kind] += 1
        self.fault_log.append((round(time.time() - self.started, 2), self.board.total(REQUESTS), kind, target))

    def schedule_by_requests(self):
        """``--faults`` of each kind at fixed request counts spread over
        ``--requests``, in a seeded order."""
        kinds = [k for k in self.faults for _ in range(self.opts.faults)]
        self.rng.shuffle(kinds)
        n = self.opts.requests
        points = [n * (i + 1) // (len(kinds) + 2) for i in range(len(kinds))]
        return list(zip(points, kinds))

    def drive(self):
        """Starts the workers, injects the faults, stops the workers;
        returns the seconds the load ran."""
        for _ in range(self.opts.processes):
            self.start_worker()
        started = time.time()
        if self.opts.requests:
            schedule = self.schedule_by_requests() if self.chaos else []
            deadline = time.time() + self.opts.bound
            while True:
                done = self.board.total(REQUESTS)
                if schedule and done >= schedule[0][0]:
                    self.fault(schedule.pop(0)[1])
                    continue
                if not schedule and done >= self.opts.requests:
                    break
                if time.time() > deadline:
                    self.failures.append("the load did not reach %d requests within %ss (at %d)"
                                         % (self.opts.requests, self.opts.bound, done))
                    break
                if all(p.poll() is not None for p in self.workers.values()):
                    self.failures.append("every worker exited before the end (at %d requests)" % done)
                    break
                time.sleep(0.01)
        else:
            end = started + self.opts.seconds
            kinds = list(self.faults)
            while True:
                pause = self.rng.expovariate(1.0 / self.opts.fault_interval) if self.chaos else 1.0
                if time.time() + pause >= end:
                    time.sleep(max(0.0, end - time.time()))
                    break
                time.sleep(pause)
                if self.chaos:
                    self.fault(self.rng.choice(kinds))
        seconds = time.time() - started
        self.board.stop()
        return seconds

    def wait_for_everyone(self):
        """Every worker and forked child must finish within the bound; a
        hung one has its tracebacks dumped (SIGUSR1, faulthandler) and is
        killed."""
        deadline = time.time() + self.opts.exit_bound
        for slot, proc in self.workers.items():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
                proc.kill()
                proc.wait()
                self.failures.append("HANG: worker %d (pid %d) did not exit within %ss; its threads:\n%s"
                                     % (slot, proc.pid, self.opts.exit_bound, tail(self.logs[slot])))
                continue
            if proc.returncode not in (0, -signal.SIGKILL):
                self.failures.append("worker %d exited with %s:\n%s" % (slot, proc.returncode,
                                                                        tail(self.logs[slot])))
        # Forked children (whose parent may have been killed).
        for slot in range(WORKER_SLOTS, SLOTS):
            if self.board.get(slot, KIND) != KIND_CHILD:
                continue
            while self.board.get(slot, STATE) == STATE_RUNNING and time.time() < deadline + CHILD_BOUND:
                pid = self.board.get(slot, PID)
                if pid and not alive(pid):
                    break
                time.sleep(0.05)
            state = self.board.get(slot, STATE)
            if state != STATE_DONE:
                parent = (slot - WORKER_SLOTS) // CHILD_SLOTS_PER_WORKER
                self.failures.append("%s: forked child in slot %d (pid %d, of worker %d); the worker's log:\n%s" % (
                    "HANG" if state == STATE_RUNNING else "FAILED", slot, self.board.get(slot, PID), parent,
                    tail(self.logs.get(parent, "/dev/null"))))

    def check_history(self):
        """Every observation ``(view, group, value)`` against the history in
        the FileStorage: the value of the newest commit at or before view."""
        import ZODB.FileStorage
        from ZODB.utils import u64

        self.zeo.stop()
        fs = ZODB.FileStorage.FileStorage(self.zeo.path, read_only=True)
        tids = {g: [] for g in range(GROUPS)}
        for txn in fs.iterator():
            for record in txn:
                g = self.member_oids.get(record.oid)
                if g is not None:
                    tids[g].append(u64(txn.tid))
        fs.close()
        checked, wrong = 0, []
        for path in pathlib.Path(self.dir).glob("obs.*-*"):
            if ".latency-" in path.name or ".stats-" in path.name:
                continue
            data = array.array("Q")
            data.frombytes(path.read_bytes()[: path.stat().st_size // 24 * 24])
            for i in range(0, len(data), 3):
                view, g, value = data[i], data[i + 1], data[i + 2]
                expected = bisect.bisect_right(tids[g], view) - 1
                checked += 1
                if value != expected and len(wrong) < 20:
                    wrong.append("%s: view %x group %d saw %d, history says %d" % (
                        path.name, view, g, value, expected))
                elif value != expected:
                    wrong.append(None)
        return checked, wrong

    def latencies(self):
        out = array.array("d")
        for path in pathlib.Path(self.dir).glob("obs.latency-*"):
            out.frombytes(path.read_bytes())
        return sorted(out)

    def stats(self):
        hits = misses = 0
        for path in pathlib.Path(self.dir).glob("obs.stats-*"):
            s = json.loads(path.read_text())
            hits += s["hits"]
            misses += s["misses"]
        return hits, misses

    def close(self):
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.sidecar.stop()
        self.zeo.close()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def tail(path, lines=60):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_once(opts, chaos, rng):
    """One run; returns its summary."""
    with tempfile.TemporaryDirectory(prefix="faultload-") as d:
        run = Run(opts, d, chaos, rng)
        try:
            seconds = run.drive()
            run.wait_for_everyone()
            requests = run.board.total(REQUESTS)
            children = run.children()
            counts = {name: run.board.total(word) for name, word in
                      (("torn", TORN), ("wrong", WRONG), ("went_back", WENT_BACK), ("spot_checks", SPOT_CHECKS))}
            checked, wrong_history = run.check_history()
            lat = run.latencies()
            hits, misses = run.stats()
            for line in wrong_history:
                if line:
                    run.failures.append("WRONG STATE: " + line)
            summary = {
                "chaos": chaos,
                "processes": opts.processes,
                "threads": opts.threads,
                "seconds": round(seconds, 2),
                "requests": requests,
                "throughput": round(requests / seconds, 1) if seconds else 0.0,
                "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
                "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else None,
                "faults": dict(run.faults),
                "torn": counts["torn"],
                "went_back": counts["went_back"],
                "wrong": counts["wrong"] + len(wrong_history),
                "spot_checks": counts["spot_checks"],
                "children_forked": len(children),
                "children_finished": sum(1 for s in children if run.board.get(s, STATE) == STATE_DONE),
                "child_requests": sum(run.board.get(s, REQUESTS) for s in children),
                "observations_checked": checked,
                "hangs": sum(1 for f in run.failures if f.startswith("HANG")),
                "failures": run.failures,
                "hits": hits,
                "misses": misses,
            }
            if run.failures or counts["torn"] or counts["went_back"] or counts["wrong"]:
                summary["fault_log"] = run.fault_log
            if counts["torn"] or counts["went_back"] or counts["wrong"]:
                summary["failures"].append("see the workers' logs above: FAULTLOAD lines")
                for slot, path in run.logs.items():
                    for line in tail(path, 100000).splitlines():
                        if line.startswith("FAULTLOAD"):
                            summary["failures"].append(line)
            return summary
        finally:
            run.close()


def report(summary):
    print("%s: %d processes x %d threads, %.1f s: %d requests, %.1f requests/s, p50 %s ms, p99 %s ms" % (
        "with faults" if summary["chaos"] else "without faults (reference)", summary["processes"],
        summary["threads"], summary["seconds"], summary["requests"], summary["throughput"], summary["p50_ms"],
        summary["p99_ms"]))
    print("  faults injected: %s; forked children finished %d of %d (%d requests)" % (
        ", ".join("%s %d" % kv for kv in summary["faults"].items()), summary["children_finished"],
        summary["children_forked"], summary["child_requests"]))
    print("  torn snapshots %d, went back %d, wrong states %d (spot checks %d, observations checked %d), hangs %d;"
          " sidecar hits %d, misses %d" % (
              summary["torn"], summary["went_back"], summary["wrong"], summary["spot_checks"],
              summary["observations_checked"], summary["hangs"], summary["hits"], summary["misses"]))
    for f in summary["failures"]:
        print("  FAILURE: " + f)
    if "fault_log" in summary:
        print("  faults (seconds, requests, fault, worker slot): %s" % summary["fault_log"])
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_argument_group("run")
    sub.add_argument("--processes", type=int, default=8)
    sub.add_argument("--threads", type=int, default=8)
    sub.add_argument("--seconds", type=float, default=None, help="run this long, faults at random times")
    sub.add_argument("--requests", type=int, default=None, help="run this many requests, faults at fixed points")
    sub.add_argument("--faults", type=int, default=3, help="with --requests: faults of each kind")
    sub.add_argument("--fault-interval", type=float, default=2.0, help="with --seconds: mean seconds between faults")
    sub.add_argument("--seed", type=int, default=None)
    sub.add_argument("--no-reference", action="store_true", help="skip the run without faults")
    sub.add_argument("--bound", type=float, default=600.0, help="seconds the load may take to reach --requests")
    sub.add_argument("--exit-bound", type=float, default=120.0, help="seconds every process may take to exit")
    sub.add_argument("--json", default=None, help="write the summaries here")
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        w = argparse.ArgumentParser()
        for name in ("--board", "--zeo", "--sidecar", "--observations"):
            w.add_argument(name, required=True)
        for name in ("--slot", "--threads", "--seed"):
            w.add_argument(name, type=int, required=True)
        return worker(w.parse_args(sys.argv[2:]))
    opts = p.parse_args()
    if (opts.seconds is None) == (opts.requests is None):
        p.error("give one of --seconds and --requests")
    if opts.seed is None:
        opts.seed = random.SystemRandom().randrange(1 << 31)
    print("faultload: seed %d (rerun with --seed %d)" % (opts.seed, opts.seed))
    sys.stdout.flush()
    summaries = []
    if not opts.no_reference:
        summaries.append(run_once(opts, False, random.Random(opts.seed)))
        report(summaries[-1])
    summaries.append(run_once(opts, True, random.Random(opts.seed)))
    report(summaries[-1])
    result = {"seed": opts.seed, "runs": summaries}
    ok = all(s["torn"] == 0 and s["went_back"] == 0 and s["wrong"] == 0 and not s["failures"] for s in summaries)
    result["ok"] = ok
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
