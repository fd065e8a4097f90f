"""VFIO smoke test of the guest, independent of vfiokit (stdlib only), run by check-guest.sh.

For every test device: the legacy path (group -> container -> type1v2 IOMMU -> device fd ->
DMA map/unmap) and, where the kernel has them, the iommufd path (/dev/iommu + IOAS, device
cdev -> bind -> attach -> map). Proves the guest's VFIO really works before vfiokit's own tests
blame vfiokit. Prints one 'ok   ...' or 'FAIL ...' line per check; exits 1 on any failure.
"""

import ctypes
import fcntl
import mmap
import os
import struct
import sys

VFIO_TYPE, VFIO_BASE = ord(";"), 100


def _io(nr):  # _IO(';', nr): no size or direction bits
    return (VFIO_TYPE << 8) | nr


VFIO_GET_API_VERSION = _io(VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _io(VFIO_BASE + 1)
VFIO_SET_IOMMU = _io(VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _io(VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _io(VFIO_BASE + 4)
VFIO_GROUP_GET_DEVICE_FD = _io(VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _io(VFIO_BASE + 7)
VFIO_IOMMU_MAP_DMA = _io(VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _io(VFIO_BASE + 14)
VFIO_DEVICE_BIND_IOMMUFD = _io(VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _io(VFIO_BASE + 19)
IOMMU_IOAS_ALLOC = _io(0x81)
IOMMU_IOAS_MAP = _io(0x85)
IOMMU_IOAS_UNMAP = _io(0x86)
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_DEVICE_FLAGS_PCI = 2

DEVICES = ["EDU", "NVME", "TESTDEV", "IVSHMEM", "IVSHMEM_BIG"]
IOVA = 0x100000  # below edu's 2^28 DMA limit, valid everywhere
failures = 0


def report(ok, what):
    global failures
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    failures += not ok


def ioctl(fd, req, buf):
    """ioctl with an in/out buffer; returns the buffer as the kernel left it."""
    b = bytearray(buf)
    fcntl.ioctl(fd, req, b, True)
    return bytes(b)


_libc = ctypes.CDLL(None, use_errno=True)


def ioctl_ptr(fd, req, data):
    """ioctl taking a pointer and returning an int (the device fd for GET_DEVICE_FD)."""
    r = _libc.ioctl(fd, ctypes.c_ulong(req), ctypes.c_char_p(data))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def dma_buffer():
    m = mmap.mmap(-1, mmap.PAGESIZE)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def device_info(devfd):
    argsz, flags, regions, irqs = struct.unpack("4I", ioctl(devfd, VFIO_DEVICE_GET_INFO, struct.pack("4I", 16, 0, 0, 0)))
    return flags, regions, irqs


def legacy(role, addr):
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group"))
    container = os.open("/dev/vfio/vfio", os.O_RDWR)
    gfd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    try:
        _, flags = struct.unpack("2I", ioctl(gfd, VFIO_GROUP_GET_STATUS, struct.pack("2I", 8, 0)))
        assert flags & VFIO_GROUP_FLAGS_VIABLE, f"group {group} is not viable"
        assert fcntl.ioctl(container, VFIO_GET_API_VERSION) == 0
        assert fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1, "no type1v2"
        ioctl(gfd, VFIO_GROUP_SET_CONTAINER, struct.pack("i", container))
        # Fails with EPERM when interrupt remapping is missing.
        fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        devfd = ioctl_ptr(gfd, VFIO_GROUP_GET_DEVICE_FD, addr.encode())
        try:
            flags, regions, irqs = device_info(devfd)
            assert flags & VFIO_DEVICE_FLAGS_PCI and regions >= 9, f"device info {flags:#x}/{regions}"
        finally:
            os.close(devfd)
        m, va = dma_buffer()
        ioctl(container, VFIO_IOMMU_MAP_DMA, struct.pack("2I3Q", 32, 3, va, IOVA, len(m)))
        ioctl(container, VFIO_IOMMU_UNMAP_DMA, struct.pack("2I2Q", 24, 0, IOVA, len(m)))
        return f"group {group}, {regions} regions, {irqs} irq indexes, DMA map/unmap"
    finally:
        os.close(gfd)
        os.close(container)


def cdev(role, addr):
    name = os.listdir(f"/sys/bus/pci/devices/{addr}/vfio-dev")[0]
    iommufd = os.open("/dev/iommu", os.O_RDWR)
    devfd = os.open(f"/dev/vfio/devices/{name}", os.O_RDWR)
    try:
        ioctl(devfd, VFIO_DEVICE_BIND_IOMMUFD, struct.pack("2IiI", 16, 0, iommufd, 0))
        _, _, ioas = struct.unpack("3I", ioctl(iommufd, IOMMU_IOAS_ALLOC, struct.pack("3I", 12, 0, 0)))
        ioctl(devfd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, struct.pack("3I", 12, 0, ioas))
        flags, regions, irqs = device_info(devfd)
        assert flags & VFIO_DEVICE_FLAGS_PCI and regions >= 9, f"device info {flags:#x}/{regions}"
        m, va = dma_buffer()
        # FIXED_IOVA | WRITEABLE | READABLE
        ioctl(iommufd, IOMMU_IOAS_MAP, struct.pack("4I3Q", 40, 1 | 2 | 4, ioas, 0, va, len(m), IOVA))
        ioctl(iommufd, IOMMU_IOAS_UNMAP, struct.pack("2I2Q", 24, ioas, IOVA, len(m)))
        return f"{name}, IOAS {ioas}, {regions} regions, DMA map/unmap"
    finally:
        os.close(devfd)
        os.close(iommufd)


def main():
    paths = [("legacy group/container", legacy)]
    if os.path.exists("/dev/iommu"):
        paths.append(("iommufd cdev", cdev))
    for role in DEVICES:
        addr = os.environ.get(f"VFIOKIT_TEST_{role}")
        for label, fn in paths:
            try:
                report(True, f"{role}: {label}: {fn(role, addr)}")
            except Exception as e:  # report and go on with the next device
                report(False, f"{role}: {label}: {type(e).__name__}: {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
