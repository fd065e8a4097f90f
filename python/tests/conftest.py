"""Shared fixtures. Guest tests get device addresses from the test guest's environment and
FAIL (never skip) when it is missing: a guest run without devices is a broken run."""

from __future__ import annotations

import contextlib
import io
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


def until_in_poll(tid: int) -> None:
    """Returns once thread `tid` sleeps in poll(2): a waiter is in the kernel's wait, with no
    guess at how long a busy emulated CPU takes to get it there (10 s at most)."""
    import time
    deadline = time.monotonic() + 10
    path = f"/proc/self/task/{tid}/syscall"
    while True:
        with open(path) as f:
            now = f.read().split()  # the syscall's number and arguments, or "running"
        if now and now[0] in (str(POLL), str(PPOLL)):
            return
        assert time.monotonic() < deadline, f"thread {tid} never reached poll: {now}"
        time.sleep(0.001)


# x86_64 system call numbers (the guest's architecture).
POLL, PPOLL = 7, 271


def edu_dma(bar0, src: int, dst: int, length: int, to_ram: bool) -> None:
    """One transfer by edu's DMA engine (registers in `bar0`), waited for (10 s at most)."""
    import time
    bar0.write64(0x80, src)
    bar0.write64(0x88, dst)
    bar0.write64(0x90, length)
    bar0.write64(0x98, 1 | (2 if to_ram else 0))
    deadline = time.monotonic() + 10
    while bar0.read64(0x98) & 1:
        assert time.monotonic() < deadline, "edu DMA did not complete"
        time.sleep(0.005)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m vfiokit ARGS` as a user would, with this interpreter."""
    return subprocess.run([sys.executable, "-m", "vfiokit", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def cli_main(*args: str) -> subprocess.CompletedProcess:
    """The CLI's main() in this process, output captured as `cli` captures it. In the guest a new
    interpreter costs 20-30 s under TCG (its imports over 9p), so the guest tests start one
    process to prove `python -m vfiokit` runs there and call main() for the rest."""
    from vfiokit.__main__ import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            rc = e.code
    return subprocess.CompletedProcess(["python", "-m", "vfiokit", *args], rc, out.getvalue(), err.getvalue())
