"""How kdscale is started: ``python -m kdscale`` and the CI switch for the real data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kdscale

REPO = Path(__file__).resolve().parent.parent


def test_python_dash_m_kdscale_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "kdscale", "--version"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert kdscale.__version__ in out.stdout + out.stderr
    bad = subprocess.run([sys.executable, "-m", "kdscale", "no-such-stage"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def _run_missing_data_test(tmp_path, require: bool) -> subprocess.CompletedProcess:
    """A throwaway test that asks for a real-data folder that is absent, run in its own pytest."""
    (tmp_path / "test_needs_data.py").write_text(
        "from conftest import missing_real_data\n"
        "def test_needs_data():\n"
        "    missing_real_data('real data folder /nonexistent is absent')\n")
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "KDSCALE_REQUIRE_DATA"}
    if require:
        env["KDSCALE_REQUIRE_DATA"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_missing_real_data_skips_locally_and_fails_in_ci(tmp_path):
    local = _run_missing_data_test(tmp_path, require=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout
    ci = _run_missing_data_test(tmp_path, require=True)
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "KDSCALE_REQUIRE_DATA=1" in ci.stdout, ci.stdout
