#!/usr/bin/python3
"""The QEMU half of tests/vm/run, which builds the guest's images and then execs this.

    supervise.py --run-dir DIR --timeout SECS [--qmp SOCKET] [--interactive] -- QEMU-ARGV...

QEMU-ARGV is the machine; this adds what it watches: ttyS0, the guest's console, logged to
DIR/console.log; ttyS1, COMMAND's stdio, on this program's stdout (and stdin with
--interactive, /dev/null otherwise); with --qmp, QEMU's monitor on SOCKET. DIR is under the
repo's target/, which the guest mounts read-write: the guest's init (tests/vm/guest-init)
creates DIR/started when COMMAND starts and DIR/status, COMMAND's exit status, when it ends.

Exit status: COMMAND's; 124 when the run timed out (SECS over all boots; 0: no timeout); 125
when the guest could not be set up or died before COMMAND finished. A guest that died before
COMMAND started (a rare early-boot crash under emulation) is booted once more. DIR and SOCKET
are removed at the end. Standard library only.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# A guest that has written its status is powering off: one that hangs doing so is killed.
POWEROFF_GRACE = 10
# Seconds between QEMU's SIGTERM and its SIGKILL.
KILL_AFTER = 5
# guest-init says this on the console when its setup fails: that is deterministic, so no retry.
SETUP_FAILED = "vfiokit-init: SETUP FAILED"


def msg(text):
    print(f"vfiokit-vm: {text}", file=sys.stderr, flush=True)


def stop(qemu):
    if qemu.poll() is None:
        qemu.terminate()
        try:
            qemu.wait(KILL_AFTER)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()


def boot(argv, run, deadline, stdin):
    """One boot, to its end: QEMU's exit status, or None when the deadline ended it."""
    for name in ("console.log", "started", "status"):
        (run / name).unlink(missing_ok=True)
    if deadline is not None and time.monotonic() >= deadline:
        return None
    qemu = subprocess.Popen(argv, stdin=stdin)
    try:
        poweroff_by = None
        while True:
            try:
                return qemu.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                stop(qemu)
                return None
            if poweroff_by is None and (run / "status").exists():
                poweroff_by = now + POWEROFF_GRACE
            if poweroff_by is not None and now >= poweroff_by:
                stop(qemu)
                return qemu.returncode
    finally:
        stop(qemu)  # when a signal ends this program


def show_console_tail(console):
    lines = console.replace("\r", "").splitlines()[-40:]
    if lines:
        msg("last lines of the guest console:")
        sys.stderr.write("".join(f"  | {line}\n" for line in lines))


def supervise(argv, run, timeout, stdin):
    deadline = time.monotonic() + timeout if timeout else None
    for attempt in (1, 2):
        rc = boot(argv, run, deadline, stdin)
        # QEMU exits 0 even when the guest panics (panic=-1 -no-reboot): only these files tell.
        if (run / "status").exists():
            return int((run / "status").read_text())
        started = (run / "started").exists()
        try:
            console = (run / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            console = ""
        if rc is None:
            if not started:
                show_console_tail(console)
            msg(f"TIMEOUT: the guest was killed after {timeout}s (--timeout / VFIOKIT_VM_TIMEOUT)")
            return 124
        show_console_tail(console)
        if started:
            msg(f"the guest died while running the command (qemu exit status {rc}); not retried")
            return 125
        if SETUP_FAILED in console:
            msg("error: guest setup failed")
            return 125
        if attempt == 1:
            msg(f"the guest died before starting the command (qemu exit status {rc}); booting once more")
    msg("error: the guest died before starting the command, twice")
    return 125


def qmp_problem(path):
    """Why QEMU cannot listen on the unix socket PATH, or None."""
    # QEMU's option syntax would need commas doubled.
    if any(c.isspace() or c == "," for c in path):
        return "the socket path must not contain whitespace or commas"
    size = len(os.fsencode(path))
    if size > 107:  # sockaddr_un's sun_path
        return f"socket path too long for a unix socket ({size} > 107 bytes)"
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        return f"no directory {directory}"
    if os.path.exists(path) and not Path(path).is_socket():
        return f"{path} exists and is not a socket"
    return None


def run_guest(args):
    argv = args.qemu + [
        "-serial", f"file:{args.run_dir}/console.log",
        # signal=off: Ctrl-C at the interactive shell goes to the guest.
        "-chardev", "stdio,id=command,signal=off", "-serial", "chardev:command",
    ]
    if args.qmp:
        problem = qmp_problem(args.qmp)
        if problem:
            msg(f"error: --qmp: {problem}")
            return 125
        # A stale socket of an earlier run is replaced.
        Path(args.qmp).unlink(missing_ok=True)
        argv += ["-qmp", f"unix:{args.qmp},server=on,wait=off"]
    try:
        stdin = None if args.interactive else subprocess.DEVNULL
        return supervise(argv, args.run_dir, args.timeout, stdin)
    finally:
        if args.qmp:
            Path(args.qmp).unlink(missing_ok=True)


def interrupted(*_):
    # Leave through the finally clauses, which stop QEMU and remove the files, uninterrupted.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(130)


def main():
    parser = argparse.ArgumentParser(description="The QEMU half of tests/vm/run.")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--timeout", type=int, required=True)
    parser.add_argument("--qmp")
    parser.add_argument("--interactive", action="store_true")
    parser.add_argument("qemu", nargs="+")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        return run_guest(args)
    finally:
        shutil.rmtree(args.run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
