"""Prefect in its own virtualenv, for the tests that run Prefect's client, CLI or server.

`.venv-prefect/` at the repository root is made on the first use (about a minute and a half)
and reused afterwards; a marker file says it was completed, and a lock file keeps two test
processes from building it at once. When the package registry cannot be reached the test
asking for it is skipped, saying so.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pytest

from tests.support.paths import REPO

VENV: Final = REPO / ".venv-prefect"
READY_MARKER: Final = VENV / ".trigd-ready"
PREFECT_REQUIREMENT: Final = "prefect>=3.8,<3.9.1"  # 3.9.1 wants a newer certifi than we get
TOKEN: Final = "prefect-compat-token"
VENV_TIMEOUT: Final = 540  # seconds to create the virtualenv and install Prefect


def _python() -> Path:
    return VENV / "bin" / "python"


@contextmanager
def _venv_lock() -> Iterator[None]:
    """Two test processes must not build the same virtualenv at once."""
    with open(REPO / ".venv-prefect.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=VENV_TIMEOUT, check=False
    )


def prefect_python() -> Path:
    """The Prefect virtualenv's python, made once; skips the test when it cannot be made."""
    with _venv_lock():
        if READY_MARKER.exists():
            return _python()
        shutil.rmtree(VENV, ignore_errors=True)
        made = _run(sys.executable, "-m", "venv", VENV)
        if made.returncode != 0:
            pytest.skip(f"cannot create {VENV}: {made.stderr.strip()[-500:]}")
        installed = _run(_python(), "-m", "pip", "install", "--quiet", PREFECT_REQUIREMENT)
        if installed.returncode != 0:
            errors = [line for line in installed.stderr.splitlines() if "ERROR" in line]
            shutil.rmtree(VENV, ignore_errors=True)
            pytest.skip(f"cannot install {PREFECT_REQUIREMENT}: {' '.join(errors)[-500:]}")
        READY_MARKER.write_text(PREFECT_REQUIREMENT + "\n")
        return _python()


def script_env(home: Path, api_url: str) -> dict[str, str]:
    """Only what the script needs: no TRIGD_* and nothing from the developer's profile."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_AUTH_STRING": TOKEN,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
