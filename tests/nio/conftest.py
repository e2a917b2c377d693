"""Fixtures for the matrix-nio suite: one homeserver per test session.

The server is started through tests/harness/hs.py, so HS_KIND picks tessera
(default) or synapse exactly as for the other suites.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests" / "harness"))

import hs  # noqa: E402


@pytest.fixture(scope="session")
def server():
    workdir = Path(tempfile.mkdtemp(prefix="tessera-nio-"))
    srv = hs.Server(workdir)
    srv.start()
    yield srv
    try:
        srv.stop()
    finally:
        srv.kill()
        if os.environ.get("KEEP_SERVER_DIR"):
            print(f"\nserver workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def store_dir(tmp_path):
    """A directory for nio's end-to-end encryption stores."""
    return tmp_path
