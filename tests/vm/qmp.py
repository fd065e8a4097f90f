#!/usr/bin/env python3
"""A tiny QMP client (Python 3 stdlib only) for the socket of `tests/vm/run --qmp SOCKET`.

As a module:
    from qmp import QMP
    with QMP(sock) as q:                        # connects (waits for the socket), negotiates
        q.cmd("device_del", id="unplug-edu")     # the command's "return", or raises QMPError
        ev = q.wait_event("DEVICE_DELETED", timeout=60, device="unplug-edu")

Every event is kept in `q.events` with the host's time.monotonic() of its arrival as "_t".

From a shell:
    tests/vm/qmp.py SOCKET COMMAND ['{"json": "arguments"}']   # prints the return value as JSON
    tests/vm/qmp.py SOCKET --wait-event NAME [--timeout SECS]  # prints the event as JSON
"""
import json
import socket
import sys
import time


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, path, connect_timeout=30.0):
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:  # not created yet (QEMU starting) or a stale one
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.buf = b""
        self.events = []
        greeting = self._read(deadline)
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    def _read(self, deadline):
        """The next message; raises TimeoutError past the deadline, EOFError when QEMU is gone."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no QMP message in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no QMP message in time") from None
            if not data:
                raise EOFError("QMP connection closed (QEMU exited)")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if "event" in msg:
            msg["_t"] = time.monotonic()
            self.events.append(msg)
        return msg

    def cmd(self, name, timeout=30.0, **arguments):
        req = {"execute": name}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(deadline)
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise QMPError(f"{name}: {msg['error'].get('class')}: {msg['error'].get('desc')}")

    def find_event(self, name, **data):
        for ev in self.events:
            if ev["event"] == name and all(ev.get("data", {}).get(k) == v for k, v in data.items()):
                return ev
        return None

    def wait_event(self, name, timeout, **data):
        """The first event NAME whose data has the given items (already received or to come)."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.find_event(name, **data)
            if ev:
                return ev
            self._read(deadline)


def main(argv):
    if len(argv) < 2:
        print(__doc__.split("From a shell:")[1], file=sys.stderr)
        return 2
    path, what = argv[0], argv[1]
    with QMP(path) as q:
        if what == "--wait-event":
            timeout = float(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else 60.0
            ev = q.wait_event(argv[2], timeout)
            ev.pop("_t", None)
            print(json.dumps(ev))
        else:
            args = json.loads(argv[2]) if len(argv) > 2 else {}
            print(json.dumps(q.cmd(what, **args)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, EOFError, TimeoutError, QMPError) as e:
        print(f"qmp.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
