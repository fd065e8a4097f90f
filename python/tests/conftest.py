"""Shared fixtures. Guest tests get device addresses from the test guest's environment and
FAIL (never skip) when it is missing: a guest run without devices is a broken run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON_DIR = REPO / "python"


def device(kind: str) -> str:
    address = os.environ.get(f"VFIOKIT_TEST_{kind}")
    if not address:
        pytest.fail(f"VFIOKIT_TEST_{kind} is not set: guest tests run inside tests/vm/run (python/run-tests)")
    return address


@pytest.fixture
def edu() -> str:
    return device("EDU")


@pytest.fixture
def nvme() -> str:
    return device("NVME")


@pytest.fixture
def ivshmem() -> str:
    return device("IVSHMEM")


@pytest.fixture
def ivshmem_big() -> str:
    return device("IVSHMEM_BIG")


@pytest.fixture
def testdev() -> str:
    return device("TESTDEV")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m vfiokit ARGS` as a user would, with this interpreter."""
    return subprocess.run([sys.executable, "-m", "vfiokit", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)
