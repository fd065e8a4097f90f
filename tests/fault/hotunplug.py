#!/usr/bin/env python3
"""Host side of the hot-unplug fault test (called by tests/fault/run after it built the guest
program): boots the test guest with a QMP socket, runs the guest program, and when it is READY
sends QEMU `device_del` of the unplug victim; then checks what the guest and QEMU report.

    hotunplug.py --bin GUEST_PROGRAM [--kernel legacy|iommufd]... [--case release|ignore|retire]...

Cases (each on each kernel):
  release  the program waits for VFIOKIT_IRQ_REQ and closes the device: the unplug completes
           (DEVICE_DELETED), the program exits 0.
  retire   on REQ the program retires the device while a thread is busy reading a register
           through its mapping: the thread survives and reads 0xffffffff, calls return ENODEV,
           no fd leaks, the unplug completes.
  ignore   a holder process ignores REQ; vfio-pci repeats it every ~10 s and the unplug waits;
           after two requests the program kills the holder: the unplug completes.
Every run is bounded (BOUND seconds from device_del to the guest's exit). Prints one ok/FAIL
line per check and, last, "fault: N passed, N failed" (one count per case and kernel).
"""
import argparse
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "vm"))
from qmp import QMP  # noqa: E402

VICTIM = "unplug-edu"  # the device id tests/vm/run gives it
READY_BOUND = 180  # boot + library load + open, under a busy host
BOUND = 180  # device_del to the guest program's exit: the ignore case waits for two REQs, 10 s apart
#              in guest time, which a TCG guest beside another stretched to 51 s (91.8 s in all)


class Guest:
    """tests/vm/run in the background; its output lines timestamped as they arrive."""

    def __init__(self, kernel, sock, argv):
        cmd = [os.path.join(REPO, "tests", "vm", "run"), "--kernel", kernel,
               "--timeout", str(READY_BOUND + BOUND + 30), "--qmp", sock, "--"] + argv
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.lines = []  # (host monotonic time, text)
        self.new = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for raw in self.proc.stdout:
            text = raw.decode(errors="replace").rstrip("\n")
            self.lines.append((time.monotonic(), text))
            print(f"     | {text}", flush=True)
            self.new.put(text)
        self.new.put(None)

    def wait_line(self, needle, timeout):
        """Host time of the first line containing needle, waiting up to timeout; None if not."""
        deadline = time.monotonic() + timeout
        while True:
            t = self.when(needle)
            if t is not None:
                return t
            try:
                if self.new.get(timeout=max(0.01, deadline - time.monotonic())) is None:
                    return self.when(needle)
            except queue.Empty:
                return None

    def when(self, needle):
        return next((t for t, text in self.lines if needle in text), None)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # run's trap stops its QEMU
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Checks:
    def __init__(self, label):
        self.label, self.failed = label, 0

    def __call__(self, cond, what):
        print(f"{'ok  ' if cond else 'FAIL'} {self.label}: {what}", flush=True)
        self.failed += 0 if cond else 1
        return cond


def run_case(kernel, case, program):
    check = Checks(f"{kernel}/{case}")
    sockdir = tempfile.mkdtemp(prefix="vfiokit-fault.", dir=os.environ.get("TMPDIR", "/tmp"))
    sock = os.path.join(sockdir, "qmp")
    t_start = time.monotonic()
    guest = Guest(kernel, sock, [program, case])
    q = None
    try:
        t_ready = guest.wait_line("READY", READY_BOUND)
        if not check(t_ready is not None, f"the guest program is READY ({READY_BOUND} s bound)"):
            return False
        print(f"     ready {t_ready - t_start:.1f} s after the start", flush=True)
        q = QMP(sock, connect_timeout=10)
        t_del = time.monotonic()
        q.cmd("device_del", id=VICTIM)
        check(True, f"device_del {VICTIM} accepted")
        deadline = t_del + BOUND
        try:
            ev = q.wait_event("DEVICE_DELETED", timeout=BOUND, device=VICTIM)
        except (EOFError, TimeoutError) as e:
            ev = None
            print(f"     no DEVICE_DELETED: {e}", flush=True)
        rc = guest.wait(deadline - time.monotonic())
        t_end = time.monotonic()
        check(rc == 0, f"the guest run exited 0 (got {'nothing: killed at the bound' if rc is None else rc})")
        check(ev is not None, f"QEMU emitted DEVICE_DELETED for {VICTIM}")
        check(t_end - t_del <= BOUND, f"done {t_end - t_del:.1f} s after device_del (bound {BOUND} s)")
        if case == "retire":
            t_req = guest.when("REQ received")
            check(t_req is not None, "the library surfaced the REQ interrupt")
            check(guest.when("busy thread survived and read all-ones") is not None,
                  "the thread busy in register reads survived the retire and read 0xffffffff")
            check(guest.when("calls return -ENODEV") is not None, "calls on the device return ENODEV")
            check(guest.when("waits return -ENODEV") is not None, "waits on the device return ENODEV")
            check(guest.when("released;") is not None and guest.when("FAIL fds leaked") is None,
                  "the device was closed and no fd leaked")
            if t_req is not None and ev is not None:
                check(ev["_t"] >= t_req, "DEVICE_DELETED came after the REQ, not before")
            timing = [("device_del -> REQ", t_req), ("device_del -> DEVICE_DELETED", ev and ev["_t"])]
        elif case == "release":
            t_req = guest.when("REQ received")
            check(t_req is not None, "the library surfaced the REQ interrupt")
            check(guest.when("released") is not None, "the program released the device")
            if t_req is not None and ev is not None:
                check(ev["_t"] >= t_req, "DEVICE_DELETED came after the REQ, not before")
            timing = [("device_del -> REQ", t_req), ("device_del -> DEVICE_DELETED", ev and ev["_t"])]
        else:
            t_req1 = guest.when("REQ #1 received")
            t_req2 = guest.when("REQ #2 received")
            t_held = guest.when("device still present")
            t_killed = guest.when("holder killed")
            check(t_req1 is not None and t_req2 is not None, "REQ came again while ignored")
            check(t_held is not None and (ev is None or ev["_t"] > t_held),
                  "the unplug waited while the device was open (no DEVICE_DELETED before)")
            check(t_killed is not None, "the holder was killed")
            timing = [("device_del -> REQ #1", t_req1), ("device_del -> REQ #2", t_req2),
                      ("device_del -> holder killed", t_killed),
                      ("device_del -> DEVICE_DELETED", ev and ev["_t"])]
        check(guest.when("removed from the guest") is not None, "the guest kernel removed the device")
        print("     timings: " + ", ".join(
            f"{name} {t - t_del:.1f} s" for name, t in timing if t is not None), flush=True)
        return check.failed == 0
    except Exception as e:  # a broken QMP conversation, etc.: this case fails, the next runs
        check(False, f"{type(e).__name__}: {e}")
        return False
    finally:
        if q:
            q.close()
        guest.kill()
        for f in os.listdir(sockdir):
            os.unlink(os.path.join(sockdir, f))
        os.rmdir(sockdir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="the guest program (built from hotunplug.c)")
    ap.add_argument("--kernel", action="append", choices=["legacy", "iommufd"])
    ap.add_argument("--case", action="append", choices=["release", "ignore", "retire"])
    a = ap.parse_args()
    passed = failed = 0
    for kernel in a.kernel or ["legacy", "iommufd"]:
        for case in a.case or ["release", "ignore", "retire"]:
            print(f"=== {kernel}/{case}", flush=True)
            t0 = time.monotonic()
            ok = run_case(kernel, case, os.path.abspath(a.bin))
            print(f"=== {kernel}/{case}: {'ok' if ok else 'FAILED'} ({time.monotonic() - t0:.0f} s)",
                  flush=True)
            passed, failed = passed + ok, failed + (not ok)
    print(f"fault: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
