"""`make demo` keeps working: a short run of demo/run_demo.py (a few
modules, 2 s per side and round) must finish, print its table and pass its checks."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_SECONDS="4", DEMO_MODULES="30", DEMO_RESULTS=str(tmp_path / "demo.json"))
    r = subprocess.run([sys.executable, str(ROOT / "demo" / "run_demo.py")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for row in ("requests/s", "sidecar hit ratio", "p99 load latency (us)", "snapshot check failures"):
        assert row in r.stdout
    assert "consistency: every one of" in r.stdout
    assert (tmp_path / "demo.json").exists()
