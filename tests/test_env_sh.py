"""launch/env.sh's KDSCALE_VENV=system mode: the interpreter on PATH, nothing installed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _source_env(python: str) -> subprocess.CompletedProcess:
    script = '. launch/env.sh && "$PYTHON" -c "import kdscale, sys; print(kdscale.__file__)"'
    env = {**os.environ, "KDSCALE_VENV": "system", "PYTHON": python, "PYTHONPATH": ""}
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_system_mode_runs_kdscale_from_the_checkout_with_the_given_interpreter():
    proc = _source_env(sys.executable)                  # this venv's python has every import
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == (REPO / "kdscale" / "__init__.py").resolve()


def test_system_mode_names_the_imports_an_interpreter_lacks(tmp_path):
    bare = tmp_path / "bare"                               # a venv without packages
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    proc = _source_env(str(bare / "bin" / "python"))
    assert proc.returncode != 0
    assert "KDSCALE_VENV=system" in proc.stderr and "torch" in proc.stderr and "accelerate" in proc.stderr
