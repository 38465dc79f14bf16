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

try:
    import tidecache.shared  # noqa: F401

    HAVE_SHARED = True
except ImportError:
    HAVE_SHARED = False

needs_shared = pytest.mark.skipif(
    not HAVE_SHARED, reason="tidecache.shared (issue 10's mechanism) is not in this build yet")


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


@needs_shared
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


@needs_shared
@pytest.mark.parametrize("inject", ["share-containers", "corrupt-states"])
def test_an_activation_bug_is_seen(inject):
    code, s, line, out = _run("--inject", inject, *INJECTION_TESTS)
    print(line)
    print(_problems(out))
    assert code != 0, "ZODB's tests passed with a deliberate activation bug (%s):\n%s" % (
        inject, out[-6000:])
    assert s["failures"] + s["errors"] > 0, line
    assert s["ran"] > 0 and s["decoded"] > 0, line


@needs_shared
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
