"""A real headless Chromium for tests that check rendered HTML (tests/test_report.py).

``chromium_or_skip()`` returns the path of a ``chromium`` binary. When none is on PATH and the
tests run as root with apt-get, it installs Debian's ``chromium`` package
(``apt-get install -y --no-install-recommends chromium``; ``apt-get update`` only when the
install fails, as slurm/local-cluster/start.sh does). When it cannot provide one the test is
skipped with the reason, unless ``KDSCALE_REQUIRE_BROWSER=1`` (CI), in which case it fails.

``dump_dom(chromium, html_path)`` loads a page with JavaScript on and returns the DOM after the
load event (``--dump-dom``), so a script in the page can record what it saw in attributes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BINARIES = ("chromium", "chromium-browser")
APT_PACKAGE = "chromium"
_INSTALL_TIMEOUT_S = 900


def _find() -> str | None:
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True,
                          timeout=_INSTALL_TIMEOUT_S, check=False)


def _install() -> str:
    """Install chromium with apt-get; returns "" on success, else the reason."""
    if os.name != "posix" or os.geteuid() != 0:
        return "chromium is not on PATH and installing it needs root (apt-get)"
    if shutil.which("apt-get") is None:
        return "chromium is not on PATH and apt-get is unavailable"
    install = ("install", "-y", "--no-install-recommends", APT_PACKAGE)
    try:
        result = _apt(*install)
        if result.returncode != 0:          # stale package lists: refresh once, retry
            update = _apt("update")
            result = _apt(*install) if update.returncode == 0 else update
    except subprocess.TimeoutExpired:
        return f"apt-get did not finish within {_INSTALL_TIMEOUT_S} s"
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        return f"apt-get could not install {APT_PACKAGE}: {tail}"
    return "" if _find() else f"{APT_PACKAGE} installed but no {BINARIES} on PATH"


def chromium_or_skip() -> str:
    """Path of a chromium binary, installing it when possible; skip (or fail when
    KDSCALE_REQUIRE_BROWSER=1) with the reason otherwise."""
    found = _find()
    if found:
        return found
    reason = _install()
    found = _find()
    if found:
        return found
    if os.environ.get("KDSCALE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (KDSCALE_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason)


def dump_dom(chromium: str, html_path: Path, timeout_s: float = 60) -> str:
    """The DOM of ``html_path`` after load, serialised by headless Chromium."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--no-default-browser-check", "--allow-file-access-from-files",
           # virtual time lets the page finish its load event and scripts before the dump
           "--virtual-time-budget=5000", "--dump-dom", Path(html_path).resolve().as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0 or "<html" not in result.stdout:
        raise RuntimeError(f"chromium failed (exit {result.returncode}): "
                           f"{result.stderr.strip()[-2000:]}")
    return result.stdout
