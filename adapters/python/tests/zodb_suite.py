"""ZODB 6.4's own test suite with tidecache's shared-state connection class.

    python zodb_suite.py [--without] [-t PATTERN]... [--inject KIND]
        [-- zope.testrunner arguments]

Runs, with zope.testrunner, the tests of the installed ``ZODB`` package
(every module zope.testrunner finds in it: unit tests, doctests, the
storage conformance tests over FileStorage, MappingStorage, DemoStorage,
blobs...) and the tests of the installed ``BTrees`` package that open a
database (:data:`BTREES_DB_TESTS`), after assigning

    ZODB.DB.DB.klass = tidecache.shared.SharedStateConnection

before any test module is imported, so every connection of every test
activates its objects through the shared-state path (exact mode: these
tests use plain storages, not ``TideCacheStorage``). ``--without`` runs
the same tests with ZODB's own ``Connection`` (the baseline).

Verdict. Every failure or error (import problems of a test module
included) is matched against :data:`BASELINE` (tests that fail without
tidecache too, in this environment, each with its reason;
docs/zodb-suite.md lists them). The last line printed is::

    ZODB-SUITE ran N failures F errors E (baseline-listed B) <details>

where F and E count the failures and errors NOT in the baseline list and
B those that are; the details say which connection class ran, how many
databases were built, and the shared path's counters summed over them
(``tidecache.shared.stats``). The exit status is 0 only when F and E are
0 and, with the swap, the shared path really served activations
(``activations`` above ``fallbacks``, and ``decoded`` above 0): a run in
which the class did not take effect fails.

``-t PATTERN`` (repeatable) and everything after ``--`` go to
zope.testrunner (``-t`` is its test-name regex; ``-vv`` lists the tests).

``--inject`` makes the run fail on purpose, for the harness's own tests
(adapters/python/tests/test_zodb_suite.py):

- ``share-containers``: ``tidecache._native._unsafe_share_containers(True)``,
  the naive sharing of mutable containers between connections;
- ``corrupt-states``: a SharedStateConnection subclass that drops one
  attribute of every object it activates;
- ``no-swap``: the class is not assigned but the run is judged as if it
  were (the shared path activates nothing: the run must fail).

What is left out, and why (docs/zodb-suite.md): ``persistent``'s own tests
(none of them opens a ZODB database: they use fake jars), and the BTrees
tests that open no database (13,000 tests of the data structures in
memory, 110 s, no activation through a connection).

Environment emulation: run as root, ``open(path, 'w')`` of a read-only
file succeeds, which ZODB's blob_transaction.txt doctest checks does not
(a committed blob file is read-only); the doctest then truncates the
committed blob and fails further on. When this process runs as root, that
doctest's globals get an ``open`` that refuses writing to a file whose
owner has no write permission (what the kernel does for the file's owner
when not root), so the doctest runs (and must pass) rather than being
listed in the baseline.

Connection class name: a dozen doctests (multidb.txt,
cross-database-references.rst, testcrossdatabasereferences...) print a
connection, ``<ZODB.Connection.Connection object at ...>``. With the swap
every doctest's output checker reads the swapped class's name (and its
bases' up to ZODB's ``Connection``) as ``ZODB.Connection.Connection``
(:class:`RenamingChecker`), so those doctests check what they are about
rather than the class's name. ``renamed-doctests`` in the summary counts
the doctests that got the checker.
"""

import argparse
import contextlib
import errno
import os
import re
import stat
import sys
import tempfile
import time
import unittest
import weakref

#: Tests that fail without tidecache too, in this environment: (regex
#: searched in the test's id, in its description and, for a module that
#: cannot be imported, in the module's name; the reason). Listed with
#: their reasons in docs/zodb-suite.md. A listed test that fails is
#: counted as baseline-listed; one that passes is reported (remove it).
BASELINE = [
    (r"^ZODB\.tests\.testdocumentation$",
     "reads ZODB's documentation (docs/guide/*.rst, docs/reference/*.rst) from a source "
     "checkout and asserts the package lies under src/ (AssertionError: site-packages); the "
     "installed wheel has no docs/, so the module cannot be imported"),
]

#: The BTrees tests that open a ZODB database (ZODB.DB over MappingStorage,
#: FileStorage or MVCCMappingStorage) and so activate objects through a
#: connection: method names, measured by counting ``DB.__init__`` per test
#: over all 13,721 BTrees 6.5 tests (625 tests of 222 classes, about 14 s;
#: the other tests never build a DB). docs/zodb-suite.md.
BTREES_DB_TESTS = frozenset([
    "testAccessRaisesPOSKeyErrorOnNested",
    "testAccessRaisesPOSKeyErrorOnSelf",
    "testBucketSplitConflict",
    "testCantResolveBTreeConflict",
    "testConflictOfInsertAndDeleteOfFirstBucketItem",
    "testConflictWithOneEmptyBucket",
    "testEmptyBucketConflict",
    "testEmptyBucketNoConflict",
    "testGhostUnghost",
    "testLoadAndStore",
    "testResolutionBlowsUp",
    "testSimpleConflict",
    "test_UpdatesDoReadChecksOnInternalNodes",
    "test_empty_bucket_persistency",
    "test_internal_keys_after_deletion",
])

PACKAGES = ("ZODB", "BTrees")

#: The summary's counters (tidecache.shared.stats keys).
COUNTERS = ("activations", "hits", "misses", "decoded", "stores", "refused", "fallbacks")


# -- the swap and the activation counters ----------------------------------------

class Activations:
    """Every ``ZODB.DB.DB`` built in this process (weakly), and the shared
    path's counters of each, summed when the DB closes (and at the end for
    the ones still open)."""

    def __init__(self):
        self.dbs = 0
        self.shared_class = 0
        self.totals = {}
        self._open = weakref.WeakSet()
        self._stats = None

    def install(self, db_class, connection_class, stats):
        """Wraps ``db_class.__init__`` and ``close``; ``connection_class``
        is the class that should be every DB's ``klass``; ``stats`` is
        ``tidecache.shared.stats`` (None for the baseline)."""
        self._stats = stats
        activations = self
        init = db_class.__init__

        def __init__(db, *args, **kw):
            init(db, *args, **kw)
            activations.dbs += 1
            if connection_class is not None and issubclass(db.klass, connection_class):
                activations.shared_class += 1
            activations._open.add(db)

        def close(db):
            activations.collect(db)
            return close_(db)

        close_ = db_class.close
        db_class.__init__ = __init__
        db_class.close = close

    def collect(self, db):
        """Adds ``db``'s counters to the totals, once."""
        if db not in self._open:
            return
        self._open.discard(db)
        if self._stats is None or getattr(db, "_tc_shared", None) is None:
            return
        for key, value in self._stats(db).items():
            if isinstance(value, int) and key not in ("entries", "bytes", "capacity"):
                self.totals[key] = self.totals.get(key, 0) + value

    def finish(self):
        for db in list(self._open):
            self.collect(db)


def corrupting_connection(base):
    """A connection class over ``base`` that drops one attribute (the last
    in its ``__dict__``) of every object it activates: a broken
    materialisation, for ``--inject corrupt-states``."""

    class CorruptingConnection(base):
        def setstate(self, obj):
            base.setstate(self, obj)
            state = getattr(obj, "__dict__", None)
            if state:
                del state[list(state)[-1]]

    return CorruptingConnection


def swap(mode, inject, activations):
    """Assigns the connection class (before any test module is imported);
    returns a description of what ran for the summary."""
    import ZODB.DB  # noqa: F401

    db_module = sys.modules["ZODB.DB"]
    DB = db_module.DB
    if mode == "without":
        activations.install(DB, None, None)
        return "ZODB.Connection.Connection"
    try:
        from tidecache import shared
    except ImportError as exc:
        raise SystemExit(
            "zodb_suite: tidecache.shared cannot be imported (%s): the shared-state mechanism "
            "(issue 10) is not in this build; run with --without for the baseline, or rebuild "
            "the adapter (make build)" % exc)
    klass = shared.SharedStateConnection
    if inject == "corrupt-states":
        klass = corrupting_connection(klass)
    elif inject == "share-containers":
        from tidecache import _native

        _native._unsafe_share_containers(True)
    if inject != "no-swap":
        DB.klass = klass
    activations.install(DB, shared.SharedStateConnection, shared.stats)
    return "%s.%s" % (DB.klass.__module__, DB.klass.__qualname__)


# -- finding the tests -----------------------------------------------------------

def _iter_tests(suite):
    if isinstance(suite, unittest.TestSuite):
        for t in suite:
            yield from _iter_tests(t)
    else:
        yield suite


def _keep_btrees_db_tests(suite):
    """``suite`` (a BTrees module's) less the tests that open no database."""
    if isinstance(suite, unittest.TestSuite):
        kept = type(suite)() if type(suite) is unittest.TestSuite else unittest.TestSuite()
        for attr in ("layer", "level"):
            if hasattr(suite, attr):
                setattr(kept, attr, getattr(suite, attr))
        for t in suite:
            t = _keep_btrees_db_tests(t)
            if t is not None:
                kept.addTest(t)
        return kept if kept.countTestCases() else None
    if getattr(suite, "_testMethodName", None) in BTREES_DB_TESTS:
        return suite
    if type(suite).__name__ == "StartUpFailure":
        return suite
    return None


def find_suites(site_packages):
    """The suites zope.testrunner finds in :data:`PACKAGES` (the BTrees
    ones filtered to :data:`BTREES_DB_TESTS`)."""
    from zope.testrunner.find import find_suites as zfind
    from zope.testrunner.options import get_options

    suites = []
    for package in PACKAGES:
        options = get_options(["zodb_suite", "--test-path", site_packages, "--package", package])
        for suite in zfind(options):
            if package == "BTrees":
                suite = _keep_btrees_db_tests(suite)
            if suite is not None:
                suites.append(suite)
    return suites


def _open_as_owner(file, mode="r", *args, **kw):
    """``open`` that refuses to write to an existing file whose owner has no
    write permission, as the kernel does for the owner when not root."""
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wa+"):
        try:
            st = os.stat(file)
        except OSError:
            st = None
        if st is not None and not st.st_mode & stat.S_IWUSR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), file)
    return open(file, mode, *args, **kw)


def emulate_owner_permissions(suites):
    """As root: blob_transaction.txt's globals get :func:`_open_as_owner`
    (see the module's docstring). Returns how many doctests got it."""
    if os.geteuid() != 0:
        return 0
    n = 0
    for suite in suites:
        for test in _iter_tests(suite):
            dt = getattr(test, "_dt_test", None)
            if dt is None or not str(getattr(dt, "filename", "")).endswith("blob_transaction.txt"):
                continue
            set_up = test._dt_setUp

            def _set_up(t, set_up=set_up):
                if set_up is not None:
                    set_up(t)
                t.globs["open"] = _open_as_owner

            test._dt_setUp = _set_up
            n += 1
    return n


class RenamingChecker:
    """A doctest output checker that reads the connection class's name in
    the output as ``ZODB.Connection.Connection`` (the name the doctests
    print, ``<ZODB.Connection.Connection object at ...>``), then checks
    with the doctest's own checker."""

    def __init__(self, checker, names):
        self.checker = checker
        self.pattern = re.compile(r"<(?:%s) object at " % "|".join(re.escape(n) for n in names))

    def rename(self, got):
        return self.pattern.sub("<ZODB.Connection.Connection object at ", got)

    def check_output(self, want, got, optionflags):
        return self.checker.check_output(want, self.rename(got), optionflags)

    def output_difference(self, example, got, optionflags):
        return self.checker.output_difference(example, self.rename(got), optionflags)


def rename_connection_class(suites, klass):
    """With the swap, every doctest reads ``klass``'s name (and those of
    its bases up to ZODB's Connection) as ZODB's ``Connection`` in its
    output; returns how many doctests got the renaming checker."""
    import doctest

    from ZODB.Connection import Connection

    names = ["%s.%s" % (c.__module__, c.__qualname__) for c in klass.__mro__
             if issubclass(c, Connection) and c is not Connection]
    if not names:
        return 0
    n = 0
    for suite in suites:
        for test in _iter_tests(suite):
            if isinstance(test, doctest.DocTestCase):
                test._dt_checker = RenamingChecker(test._dt_checker or doctest.OutputChecker(), names)
                n += 1
    return n


# -- the verdict -----------------------------------------------------------------

def _names(test):
    """What a baseline pattern is searched in: the test's id and
    description, or the module of an import problem."""
    names = []
    module = getattr(test, "module", None)
    if module:
        names.append(module)
    for f in ("id", "__str__"):
        try:
            names.append(getattr(test, f)())
        except Exception:
            pass
    return names


def baseline_reason(test):
    for pattern, reason in BASELINE:
        if any(re.search(pattern, n) for n in _names(test)):
            return pattern, reason
    return None


def verdict(runner):
    """(failures, errors, baseline-listed, unlisted problems as text lines)."""
    failures = errors = listed = 0
    problems = []
    seen_patterns = set()
    kinds = [("failure", t) for t, _ in runner.failures]
    kinds += [("error", t) for t, _ in runner.errors]
    kinds += [("import error", t) for t in runner.import_errors]
    for kind, test in kinds:
        hit = baseline_reason(test)
        if hit is not None:
            listed += 1
            seen_patterns.add(hit[0])
            continue
        if kind == "failure":
            failures += 1
        else:
            errors += 1
        problems.append("%s: %s" % (kind, _names(test)[-1] if _names(test) else test))
    return failures, errors, listed, problems, seen_patterns


# -- main ------------------------------------------------------------------------

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    resumed = bool(argv) and argv[0] == "--resume-layer"
    if resumed:
        # zope.testrunner re-runs this program for a layer it could not tear
        # down: everything is zope.testrunner's, the mode is inherited.
        extra, argv = argv, []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--without", action="store_true",
                   help="the baseline: ZODB's own Connection, no swap")
    p.add_argument("-t", dest="tests", action="append", default=[], metavar="PATTERN",
                   help="zope.testrunner's test-name regex (repeatable)")
    p.add_argument("--inject", choices=["share-containers", "corrupt-states", "no-swap"],
                   help="a deliberate bug (the run must fail)")
    args = p.parse_args(argv)
    mode = os.environ.get("ZODB_SUITE_MODE") if resumed else ("without" if args.without else "shared")
    inject = (os.environ.get("ZODB_SUITE_INJECT") or None) if resumed else args.inject
    if mode == "without" and inject:
        p.error("--inject needs the swap (not --without)")
    os.environ["ZODB_SUITE_MODE"] = mode
    os.environ["ZODB_SUITE_INJECT"] = inject or ""

    started = time.monotonic()
    activations = Activations()
    with contextlib.ExitStack() as stack:
        if not resumed:
            # A private temporary directory for what the tests leave behind.
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="zodb-suite-"))
            os.environ["TMPDIR"] = tmp
            tempfile.tempdir = None
            os.chdir(tmp)
        ran_class = swap(mode, inject, activations)
        if inject == "share-containers":
            from tidecache import _native

            stack.callback(_native._unsafe_share_containers, False)

        import ZODB

        site_packages = os.path.dirname(os.path.dirname(ZODB.__file__))
        suites = find_suites(site_packages)
        emulated = emulate_owner_permissions(suites)
        renamed = rename_connection_class(suites, sys.modules["ZODB.DB"].DB.klass)

        from zope.testrunner.runner import Runner

        zargs = [sys.argv[0]]
        for pattern in args.tests:
            zargs += ["-t", pattern]
        runner = Runner(defaults=["--auto-color"], args=zargs + extra, found_suites=suites)
        runner.run()
        if resumed:
            return 1 if runner.failed else 0
        activations.finish()
        failures, errors, listed, problems, seen = verdict(runner)
        totals = activations.totals
        ok = failures == 0 and errors == 0
        notes = []
        if mode == "shared":
            served = totals.get("activations", 0) - totals.get("fallbacks", 0)
            if not (served > 0 and totals.get("decoded", 0) > 0):
                ok = False
                notes.append("the shared path activated nothing (activations=%d fallbacks=%d "
                              "decoded=%d over %d databases, %d with the shared class): the "
                              "swap did not take effect" % (
                                  totals.get("activations", 0), totals.get("fallbacks", 0),
                                  totals.get("decoded", 0), activations.dbs,
                                  activations.shared_class))
        if runner.ran == 0:
            ok = False
            notes.append("no test ran")
        for problem in problems:
            print("zodb_suite: not in the baseline: %s" % problem)
        for pattern, reason in BASELINE:
            if pattern not in seen and not args.tests and not extra:
                print("zodb_suite: baseline-listed %s did not fail this time: %s"
                      % (pattern, reason))
        for note in notes:
            print("zodb_suite: FAILED: %s" % note)
        details = (" class=%s dbs=%d shared-class-dbs=%d emulated-owner-open=%d "
                   "renamed-doctests=%d" % (ran_class, activations.dbs, activations.shared_class,
                                            emulated, renamed))
        if mode == "shared":
            details += " " + " ".join(
                "%s=%d" % (k, totals.get(k, 0)) for k in COUNTERS)
            reasons = sorted(k for k in totals if k.startswith("fallback_") and totals[k])
            details += "".join(" %s=%d" % (k, totals[k]) for k in reasons)
        print("ZODB-SUITE ran %d failures %d errors %d (baseline-listed %d)%s seconds=%.0f"
              % (runner.ran, failures, errors, listed, details, time.monotonic() - started),
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
