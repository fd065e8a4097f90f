"""Cost of one register read from Python: Region.read32 against a hand-written mmap + struct
read of the same BAR (the device fd, from dev.fileno(), mmapped at the region's offset), and
Region.mem + struct. Run in the test guest:

    tests/vm/run -- target/py-venv/bin/python -P python/bench-read32.py

(target/py-venv: python/run-tests installs the package's wheel there, library included; -P
imports it from there rather than from python/, beside this script.)

The variants take turns round by round, and each figure is the median of the per-round ratios
to the hand-written read: guests sharing the host's cores make absolute times drift by 2x.
(sysfs's resource2 cannot serve as the hand-written side: once vfio-pci claims the BAR the
kernel revokes such mappings, and a read through them dies with SIGBUS.)
"""

import mmap
import os
import statistics
import struct
import time

import vfiokit

N, ROUNDS, OFFSET = 20000, 11, 0x40
address = os.environ["VFIOKIT_TEST_IVSHMEM"]
unpack = struct.Struct("<I").unpack_from


def per_call(f) -> float:
    t0 = time.perf_counter()
    for _ in range(N):
        f()
    return (time.perf_counter() - t0) / N


with vfiokit.open(address) as dev:
    bar2 = dev.map(2)
    bar2.write32(OFFSET, 0xC0FFEE)
    mem = bar2.mem
    raw = mmap.mmap(dev.fileno(), mmap.PAGESIZE, offset=dev.regions[2].offset)
    assert unpack(raw, OFFSET)[0] == 0xC0FFEE
    variants = {
        "hand-written mmap of the device fd + struct": lambda: unpack(raw, OFFSET),
        "Region.read32": lambda: bar2.read32(OFFSET),
        "Region.mem + struct.unpack_from": lambda: unpack(mem, OFFSET),
    }
    times = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, f in variants.items():
            times[name].append(per_call(f))
    raw.close()

base = times["hand-written mmap of the device fd + struct"]
print(f"kernel {os.environ.get('VFIOKIT_VM_KERNEL')}, {ROUNDS} rounds x {N} reads, medians")
for name, t in times.items():
    ratio = statistics.median(a / b for a, b in zip(t, base))
    print(f"{name:44} {statistics.median(t) * 1e6:7.2f} us/read  x{ratio:.2f}")
