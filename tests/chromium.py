"""Headless Chromium for the dashboard's browser tests (scripts/bootstrap.sh installs it where absent)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def chromium(*args: str, profile: Path, timeout: float = 90, console: bool = False) -> str | tuple[str, list[str]]:
    """Run headless Chromium with ``args`` (e.g. ``--dump-dom URL``) in its own profile; returns its stdout.

    With ``console=True`` the page's console (messages and uncaught errors, which
    Chromium logs as ``CONSOLE(...)`` lines) is returned too, after the stdout, as
    ``(stdout, console_lines)``.
    """
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: scripts/bootstrap.sh installs it (make test)"
    logging = ["--enable-logging=stderr", "--v=0"] if console else []
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *logging, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    if console:
        return r.stdout, [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return r.stdout
