"""ZODB 6.4's own test suite (and BTrees' tests that open a database) with
every connection of every test activating through tidecache's shared-state
path (``ZODB.DB.DB.klass = tidecache.shared.SharedStateConnection``,
zodb_suite.py), in a subprocess. Tests that fail without tidecache too, in
this environment, are listed with their reasons in zodb_suite.py's
BASELINE and docs/zodb-suite.md.

The other tests run a few of the suite's tests with a deliberate bug
(containers shared between connections, states corrupted, the class not
swapped in): the harness must report a failure each time, so a green
``test_zodb_suite_with_shared_state`` means the suite really ran through
the shared path and would have seen such bugs."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
SUITE = HERE / "zodb_suite.py"

def _run(*args, timeout=900):
    proc = subprocess.run([sys.executable, str(SUITE)] + list(args), cwd=str(HERE),
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))
    out = proc.stdout + proc.stderr
    m = re.search(r"^ZODB-SUITE ran (\d+) failures (\d+) errors (\d+) \(baseline-listed (\d+)\)(.*)$",
                  out, re.M)
    assert m, "zodb_suite.py printed no summary (exit %d):\n%s" % (proc.returncode, out[-6000:])
    summary = {"ran": int(m.group(1)), "failures": int(m.group(2)), "errors": int(m.group(3)),
               "baseline": int(m.group(4))}
    summary.update({k: int(v) for k, v in re.findall(r"(\S+?)=(\d+)\b", m.group(5))})
    return proc.returncode, summary, m.group(0), out


def _problems(out):
    """The failing tests' headers and the harness's own notes."""
    return "\n".join(re.findall(r"^(?:(?:Failure|Error) in test .*|zodb_suite: .*)$", out, re.M))


def test_zodb_suite_with_shared_state():
    code, s, line, out = _run()
    print(line)
    print(_problems(out))
    assert code == 0 and s["failures"] == 0 and s["errors"] == 0, (
        "ZODB's suite failed with the shared-state connection class: %s\n%s\n\n%s"
        % (line, _problems(out), out[-30000:]))
    # The whole suite ran (ZODB 6.4: 1,606 tests; BTrees: 713)...
    assert s["ran"] >= 2200, line
    # ...every database it built used the shared-state class...
    assert s["dbs"] >= 1000 and s["shared-class-dbs"] == s["dbs"], line
    # ...and activations went through the shared path.
    assert s["decoded"] > 0 and s["hits"] > 0, line


#: A few of the suite's tests that activate objects in several connections
#: of one database: run with each injected bug.
#: With ``share-containers``, the whole suite fails in testZODB's
#: testTxnBeginImpliesAbort, testConnection's
#: doctest_transaction_retry_convenience, MVCCMappingStorage's
#: testCrossConnectionInvalidation and historical_connections.rst.
INJECTION_TESTS = [
    "-t", r"ZODB\.tests\.testZODB\.",
    "-t", r"ZODB\.tests\.testConnection\b",
    "-t", r"MVCCMappingStorageTests\.testCrossConnectionInvalidation\b",
    "-t", r"historical_connections\.rst",
    "-t", r"BTrees\.tests\.testConflict\.",
]


@pytest.mark.parametrize("inject", ["share-containers", "corrupt-states"])
def test_an_activation_bug_is_seen(inject):
    code, s, line, out = _run("--inject", inject, *INJECTION_TESTS)
    print(line)
    print(_problems(out))
    assert code != 0, "ZODB's tests passed with a deliberate activation bug (%s):\n%s" % (
        inject, out[-6000:])
    assert s["failures"] + s["errors"] > 0, line
    assert s["ran"] > 0 and s["decoded"] > 0, line


def test_a_swap_that_did_not_take_effect_is_seen():
    code, s, line, out = _run("--inject", "no-swap", *INJECTION_TESTS)
    print(line)
    assert code != 0, "a run that never used the shared path passed:\n" + out[-6000:]
    assert s["failures"] == 0 and s["errors"] == 0 and s["ran"] > 0, line
    assert s["shared-class-dbs"] == 0 and s["decoded"] == 0, line
    assert "the shared path activated nothing" in out


def test_baseline_harness_runs_a_few_tests():
    """``--without`` (ZODB's own Connection): the injection tests' subset
    and ZODB's blob_transaction.txt doctest (root here: see zodb_suite.py's
    owner-permission emulation) pass, and the summary counts them."""
    code, s, line, out = _run("--without", *INJECTION_TESTS, "-t", r"blob_transaction\.txt")
    print(line)
    assert code == 0 and s["failures"] == 0 and s["errors"] == 0, (
        "%s\n%s\n%s" % (line, _problems(out), out[-6000:]))
    assert s["ran"] >= 50 and s["dbs"] > 0 and s["shared-class-dbs"] == 0, line
    if os.geteuid() == 0:
        assert s["emulated-owner-open"] == 4, line


def test_persistent_class_activates_through_shared_state():
    """ZODB's testpersistentclass.class_with_circular_ref_to_self and
    persistentclass.rst, made direct: a persistent class (an instance of
    ``ZODB.persistentclass.PersistentMetaClass``) loaded in a second
    connection, then its uncommitted change aborted. The native
    ``setstate`` calls the class's ``__setstate__`` looked up on the type
    unbound; for a persistent class that is PersistentMetaClass's
    ``_p_MethodDescr``, whose ``__get__(None, cls)`` returns the metaclass
    itself, so the call became ``PersistentMetaClass(C, state)``
    (TypeError: missing 'cdict'), and the abort's reload failed, leaving
    the uncommitted method in place."""
    import transaction
    from ZODB.DB import DB
    from ZODB.MappingStorage import MappingStorage
    from ZODB.persistentclass import PersistentMetaClass

    from tidecache import shared

    db = DB(MappingStorage())
    shared.install(db)
    try:
        C = PersistentMetaClass("C", (object,), {"__module__": "__zodb__"})
        C.me = C
        tm1 = transaction.TransactionManager()
        conn1 = db.open(transaction_manager=tm1)
        conn1.root()["C"] = C
        tm1.commit()

        tm2 = transaction.TransactionManager()
        conn2 = db.open(transaction_manager=tm2)
        C2 = conn2.root()["C"]
        assert C2.me is C2 and C2.__name__ == "C" and C2() is not None

        C2.baz = lambda self: "uncommitted"
        tm2.abort()
        assert not hasattr(C2, "baz")
        assert C2.me is C2
        from tidecache import shared

        assert shared.stats(db)["fallback_persistent_class"] >= 1  # ZODB's path, counted
    finally:
        db.close()
