"""Cost of one register read from Python: Region.read32 (ctypes -> libvfiokit) against a
hand-written mmap + struct read of the same BAR (the device fd mmapped directly, at the
region's offset). Run in the test guest (legacy kernel: the hand-written side uses the group):

    tests/vm/run -- target/py-venv/bin/python -P python/bench-read32.py

(target/py-venv: python/run-tests installs the package's wheel there, library included; -P
imports it from there rather than from python/, beside this script.)

(sysfs's resource2 cannot serve: once vfio-pci claims the BAR the kernel revokes such mappings,
and a read through them dies with SIGBUS.)
"""

import fcntl
import importlib.util
import mmap
import os
import struct
import time

import vfiokit

N, OFFSET = 20000, 0x40
address = os.environ["VFIOKIT_TEST_IVSHMEM"]
unpack = struct.Struct("<I").unpack_from
spec = importlib.util.spec_from_file_location("smoke", "tests/vm/vfio-smoke.py")
smoke = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smoke)  # raw VFIO ioctls, stdlib only


def per_call(f) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(N):
            f()
        best = min(best, (time.perf_counter() - t0) / N)
    return best


results = {}
with vfiokit.open(address) as dev:
    bar2 = dev.map(2)
    fd_offset = dev.regions[2].offset
    bar2.write32(OFFSET, 0xC0FFEE)
    results["Region.read32 (ctypes -> libvfiokit)"] = per_call(lambda: bar2.read32(OFFSET))
    mem = bar2.mem
    results["Region.mem + struct.unpack_from"] = per_call(lambda: unpack(mem, OFFSET))

# By hand: container, group, type1v2, device fd, mmap of the region, struct.
group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{address}/iommu_group"))
container = os.open("/dev/vfio/vfio", os.O_RDWR)
gfd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
smoke.ioctl(gfd, smoke.VFIO_GROUP_SET_CONTAINER, struct.pack("i", container))
fcntl.ioctl(container, smoke.VFIO_SET_IOMMU, smoke.VFIO_TYPE1v2_IOMMU)
devfd = smoke.ioctl_ptr(gfd, smoke.VFIO_GROUP_GET_DEVICE_FD, address.encode())
raw = mmap.mmap(devfd, mmap.PAGESIZE, offset=fd_offset)
assert unpack(raw, OFFSET)[0] == 0xC0FFEE
results["hand-written mmap of the device fd + struct"] = per_call(lambda: unpack(raw, OFFSET))
raw.close()
for fd in (devfd, gfd, container):
    os.close(fd)

base = results["hand-written mmap of the device fd + struct"]
print(f"kernel {os.environ.get('VFIOKIT_VM_KERNEL')}, best of 5 x {N} reads")
for name, t in results.items():
    print(f"{name:44} {t * 1e6:7.2f} us/read  x{t / base:.1f}")
