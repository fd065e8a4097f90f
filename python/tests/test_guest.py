"""Against the real kernel's VFIO drivers, in the test guest (tests/vm/run) on QEMU's edu,
nvme, ivshmem-plain and pci-testdev devices. Marked `guest`: the host run deselects them, and
they fail (not skip) where VFIOKIT_TEST_* are missing."""

import contextlib
import ctypes
import errno
import gc
import importlib.util
import mmap
import os
import resource
import selectors
import socket
import struct
import subprocess
import sys
import traceback
from io import StringIO

import pytest

import vfiokit

from conftest import PYTHON_DIR, cli, cli_main, edu_dma, until_in_poll

pytestmark = pytest.mark.guest

# edu registers (BAR0)
ID, LIVENESS, IRQ_STATUS, IRQ_RAISE, IRQ_ACK = 0x00, 0x04, 0x24, 0x60, 0x64
EDU_BUFFER = 0x40000
PCI_COMMAND, COMMAND_MEMORY, COMMAND_MASTER = 0x04, 0x2, 0x4
CAP_MSIX = 0x11


def registers(dev: vfiokit.Device):
    """edu's BAR0: mapped where it can be (the kernel's edu), else through messages (the
    vfio-user model, test_vfio_user.py, which runs these tests too)."""
    return dev.map(0) if dev.regions[0].mmappable else dev.region(0)


def bus_master(dev: vfiokit.Device) -> None:
    """DMA and MSI need bus mastering, which vfiokit leaves to the driver."""
    dev.config.write16(PCI_COMMAND, dev.config.read16(PCI_COMMAND) | COMMAND_MEMORY | COMMAND_MASTER)


def test_edu_id_and_liveness(edu):
    with vfiokit.open(edu) as dev:
        bar0 = dev.map(0)
        assert bar0.read32(ID) == 0x010000ED
        bar0.write32(LIVENESS, 0x12345678)
        assert bar0.read32(LIVENESS) == 0xEDCBA987
        assert bar0.mem[ID:ID + 4].tobytes() == struct.pack("<I", 0x010000ED)  # same register, plain load
        assert dev.config.read16(0) == 0x1234 and dev.config.read16(2) == 0x11E8


def test_edu_records(edu):
    with vfiokit.open(edu) as dev:
        r = dev.regions[vfiokit.PCI_BAR0]
        assert r.index == 0 and r.size == 1 << 20 and r.mmappable
        assert r.flags & vfiokit.REGION_PRESENT and r.flags & vfiokit.REGION_MMAP
        assert "BAR0: size 0x100000 (1 MiB)" in repr(r) and "MMAP" in repr(r)
        assert len(dev.regions) >= 9 and dev.regions[vfiokit.PCI_VGA].flags == 0
        assert repr(dev.regions[vfiokit.PCI_CONFIG]).startswith("<region 7 CONFIG:")
        assert dev.irqs[vfiokit.IRQ_MSI].count == 1 and "EVENTFD" in repr(dev.irqs[vfiokit.IRQ_MSI])
        assert any(a.region == 0 for a in dev.areas)


def test_info_fds_and_features(nvme):
    with vfiokit.open(nvme) as dev:
        sysfs = f"/sys/bus/pci/devices/{dev.name}/"
        ids = {f: int(open(sysfs + f).read(), 16) for f in ("vendor", "device", "class", "revision")}
        i = dev.info
        assert (i.vendor_id, i.device_id, i.class_code, i.revision) == (
            ids["vendor"], ids["device"], ids["class"], ids["revision"])
        assert i.flags & vfiokit.DEVICE_PCI and i.flags & vfiokit.DEVICE_RESET
        assert (i.num_regions, i.num_irqs) == (len(dev.regions), len(dev.irqs))
        assert os.readlink(f"/proc/self/fd/{dev.fileno()}").startswith("anon_inode:") or \
            os.readlink(f"/proc/self/fd/{dev.fileno()}").startswith("/dev/vfio/devices/")
        assert os.readlink(f"/proc/self/fd/{dev.iommu.fileno()}") in ("/dev/vfio/vfio", "/dev/iommu")
        low_power_entry, low_power_exit = 3, 5
        assert dev.feature(low_power_entry, vfiokit.FEATURE_PROBE | vfiokit.FEATURE_SET) == 0
        dev.feature(low_power_entry, vfiokit.FEATURE_SET)
        dev.feature(low_power_exit, vfiokit.FEATURE_SET)
        assert dev.map(0).read32(0) == dev.region(0).read32(0)
        with pytest.raises(OSError) as e:
            dev.feature(0x7777, vfiokit.FEATURE_PROBE | vfiokit.FEATURE_GET)
        assert e.value.errno == errno.ENOTTY and "VFIO_DEVICE_FEATURE" in str(e.value)


def test_caller_eventfds(edu):
    mine = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with vfiokit.open(edu) as dev:
            with dev.irq(vfiokit.IRQ_MSI, eventfds=[mine]) as irq:
                assert irq.fds == [mine]
                irq.trigger()
                assert os.eventfd_read(mine) == 1
                with pytest.raises(OSError) as e:
                    irq.wait(0)
                assert e.value.errno == errno.EINVAL and "caller's own eventfd" in str(e.value)
        os.fstat(mine)  # still open: the caller's to close
    finally:
        os.close(mine)


def test_edu_msi(edu):
    with vfiokit.open(edu) as dev:
        bus_master(dev)
        bar0 = registers(dev)
        with dev.irq(vfiokit.IRQ_MSI) as irq:
            bar0.write32(IRQ_RAISE, 0x1)
            assert irq.wait(timeout=5.0) >= 1
            assert bar0.read32(IRQ_STATUS) & 0x1
            bar0.write32(IRQ_ACK, 0x1)
            with pytest.raises(TimeoutError) as e:
                irq.wait(timeout=0.05)
            assert e.value.errno == errno.ETIMEDOUT
            # the eventfd works with selectors; wait(0) then consumes the count
            irq.trigger()
            with selectors.DefaultSelector() as sel:
                sel.register(irq.fileno(), selectors.EVENT_READ)
                assert sel.select(timeout=5.0)
            assert irq.wait(0) == 1
        assert irq.closed
        with pytest.raises(ValueError):
            irq.wait(0)


@pytest.mark.parametrize("closer", ["irq", "device"])
def test_close_from_another_thread_ends_a_wait(edu, closer):
    """Irq.close() or Device.close() in one thread ends another's Irq.wait() (no timeout) with
    ECANCELED (the wait has no timeout, so nothing else ends it); the device's fds go with it."""
    import threading
    fds_before = len(os.listdir("/proc/self/fd"))
    dev = vfiokit.open(edu)
    irq = dev.irq(vfiokit.IRQ_MSI)
    result = {}

    def wait():
        try:
            irq.wait()
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=wait)
    t.start()
    until_in_poll(t.native_id)
    (irq if closer == "irq" else dev).close()
    t.join(5)  # the wait has no timeout: only the close can end it
    assert not t.is_alive()
    assert result["error"].errno == errno.ECANCELED
    assert ("disabled" if closer == "irq" else "closed") in str(result["error"])
    dev.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_edu_dma_round_trip(edu):
    with vfiokit.open(edu) as dev:
        bus_master(dev)
        bar0 = registers(dev)
        with dev.iommu.alloc(4096) as buf:
            assert buf.iova + 4096 <= 1 << 28, "edu reaches only 28 bits of IOVA"
            pattern = bytes((i * 7 + 3) & 0xFF for i in range(2048))
            buf.mem[:2048] = pattern

            edu_dma(bar0, buf.iova, EDU_BUFFER, len(pattern), to_ram=False)
            edu_dma(bar0, EDU_BUFFER, buf.iova + 2048, len(pattern), to_ram=True)
            assert buf.mem[2048:4096] == pattern
        assert buf.address == 0 and "freed" in repr(buf)


def test_file_mapping(edu):
    """map_file: a memfd's pages from an offset, through the device and back into the file; on
    an iommufd without IOMMU_IOAS_MAP_FILE (6.12) an OSError naming the version it needs."""
    fd = os.memfd_create("vfiokit-test-file")
    try:
        os.ftruncate(fd, 3 * 4096)
        pattern = bytes((i * 13 + 1) & 0xFF for i in range(1024))
        os.pwrite(fd, pattern, 4096)
        with vfiokit.open(edu) as dev:
            bus_master(dev)
            bar0 = registers(dev)
            iommu = dev.iommu
            if iommu.kind == vfiokit.IOMMU_IOMMUFD and os.environ.get("VFIOKIT_VM_KERNEL") != "latest":
                with pytest.raises(OSError) as e:
                    iommu.map_file(fd, 0, 4096)
                assert e.value.errno == errno.EOPNOTSUPP and "Linux 6.13" in str(e.value)
                return
            with iommu.map_file(fd, 4096, 2 * 4096) as m:
                assert m.mem[:1024] == pattern
                edu_dma(bar0, m.iova, EDU_BUFFER, len(pattern), to_ram=False)
                edu_dma(bar0, EDU_BUFFER, m.iova + 4096, len(pattern), to_ram=True)
                assert os.pread(fd, 1024, 2 * 4096) == pattern
            with iommu.map_file(fd, 0, 4096, vfiokit.DMA_READONLY) as ro:
                assert ro.mem.readonly
            with pytest.raises(OSError) as e:
                iommu.map_file(fd, 1, 4096)
            assert e.value.errno == errno.EINVAL and "whole pages" in str(e.value)
    finally:
        os.close(fd)


def test_handoff_to_an_unprivileged_process(edu):
    """Root hands a context with edu to a child running as nobody, which cannot open edu itself
    and raises an MSI and allocates DMA memory through the adopted context."""
    root_end, driver_end = socket.socketpair()
    with vfiokit.Iommu() as iommu:
        iommu.export([edu], root_end)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 20, 64 << 20))
            os.setgid(65534)
            os.setuid(65534)
            try:
                vfiokit.open(edu)
            except PermissionError:
                pass
            else:
                raise AssertionError("nobody opened edu without the handoff")
            with vfiokit.Iommu.adopt(driver_end) as iommu, vfiokit.Device(edu, iommu) as dev:
                bus_master(dev)
                with dev.irq(vfiokit.IRQ_MSI) as irq, iommu.alloc(4096) as buf:
                    registers(dev).write32(IRQ_RAISE, 0x2)
                    assert irq.wait(timeout=5.0) >= 1 and buf.iova
                    registers(dev).write32(IRQ_ACK, 0x2)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    with pytest.raises(OSError) as e:
        vfiokit.Iommu.adopt(-1)
    assert e.value.errno == errno.EBADF


def test_live_handover(edu):
    """A context with edu and a DMA_SHAREABLE buffer goes to a forked child while edu runs: the
    child finds the buffer's data at its IOVA and has edu's DMA engine copy it. On type1, and
    on iommufd from Linux 6.13 (the 7.3 guest); on 6.12's iommufd the handover is refused,
    naming the kernel it needs, and type1 is handed over instead."""
    old_end, new_end = socket.socketpair()
    kind = vfiokit.IOMMU_TYPE1
    if os.environ.get("VFIOKIT_VM_KERNEL") == "latest":
        kind = vfiokit.IOMMU_IOMMUFD
    elif os.path.exists("/dev/iommu"):
        with vfiokit.Iommu(vfiokit.IOMMU_IOMMUFD) as iommu, vfiokit.Device(edu, iommu) as dev:
            with pytest.raises(OSError) as e:
                iommu.hand_over([dev], old_end)
            assert e.value.errno == errno.EOPNOTSUPP and "Linux 6.13" in str(e.value)
    pattern = bytes((i * 5 + 1) & 0xFF for i in range(1024))
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            iova = struct.unpack("Q", new_end.recv(8, socket.MSG_WAITALL))[0]
            iommu, (dev,) = vfiokit.Iommu.take_over(new_end)
            with iommu, dev:
                assert iommu.kind == kind, "the same kind of context"
                data = (ctypes.c_char * 2048).from_address(iommu.to_vaddr(iova, 2048))
                assert data.raw[:1024] == pattern, "the old process's data"
                edu_dma(registers(dev), iova, EDU_BUFFER, 1024, to_ram=False)
                edu_dma(registers(dev), EDU_BUFFER, iova + 1024, 1024, to_ram=True)
                assert data.raw[1024:] == pattern, "edu DMA after the handover"
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    with vfiokit.Iommu(kind) as iommu, vfiokit.Device(edu, iommu) as dev:
        bus_master(dev)
        buf = iommu.alloc(4096, vfiokit.DMA_SHAREABLE)
        buf.mem[:1024] = pattern
        old_end.sendall(struct.pack("Q", buf.iova))
        iommu.hand_over([dev], old_end)
        assert buf.closed and buf.address == 0, "given away, not freed"
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child that took over failed"


def test_doctor(edu, testdev):
    """`python -m vfiokit doctor`: exit 0 for a ready device; 2, with the fix, for an unbound one."""
    ready = cli_main("doctor", edu)
    assert ready.returncode == 0 and "blocker" not in ready.stdout
    vfiokit.unbind(testdev)
    try:
        unbound = cli_main("doctor", testdev)
        found = vfiokit.doctor(testdev)
    finally:
        vfiokit.bind(testdev)
    assert unbound.returncode == 2
    assert f"blocker  {testdev}: {testdev} is not bound to any driver" in unbound.stdout
    assert "python3 -m vfiokit bind" in unbound.stdout
    assert found[0].code == vfiokit.FINDING_NOT_BOUND and found[0].severity == vfiokit.SEVERITY_BLOCKER


def test_hot_reset_needs_every_dependent_open():
    """nvme (function 0) and edu (function 1) share a slot: edu's hot reset takes the nvme too."""
    nvme_addr, edu_addr = os.environ["VFIOKIT_TEST_RESET_NVME"], os.environ["VFIOKIT_TEST_RESET_EDU"]
    with vfiokit.Iommu() as iommu, vfiokit.Device(edu_addr, iommu) as edu:
        deps = {d.address: d.owned for d in edu.hot_reset_info()}
        assert deps == {nvme_addr: False, edu_addr: True}
        with pytest.raises(PermissionError) as refused:
            edu.hot_reset()
        assert nvme_addr in str(refused.value)
        with vfiokit.Device(nvme_addr, iommu):
            assert all(d.owned for d in edu.hot_reset_info())
            edu.hot_reset()
            assert registers(edu).read32(ID) == 0x010000ED


def test_translate_and_readonly(edu):
    """iommu.translate() of an address, a buffer and a memoryview slice; DMA_READONLY memory
    is read by edu's DMA engine and not written."""
    with vfiokit.open(edu) as dev:
        bus_master(dev)
        bar0 = registers(dev)
        iommu = dev.iommu
        with iommu.alloc(8192) as buf, iommu.alloc(4096, vfiokit.DMA_READONLY) as ro:
            assert iommu.translate(buf.address) == buf.iova
            assert iommu.translate(buf.mem[100:200]) == buf.iova + 100
            assert iommu.translate(buf.address + 8191) == buf.iova + 8191
            with pytest.raises(FileNotFoundError, match="not inside one DMA mapping"):
                iommu.translate(buf.address + 8000, 500)  # runs past the end
            with pytest.raises(FileNotFoundError):
                iommu.translate(bytearray(64))
            ro.mem[:] = b"\x5a" * 4096
            for src, dst, to_ram in ((ro.iova, EDU_BUFFER, False), (EDU_BUFFER, buf.iova, True),
                                     (buf.iova + 4096, EDU_BUFFER, False), (EDU_BUFFER, ro.iova, True)):
                edu_dma(bar0, src, dst, 1024, to_ram)
            assert buf.mem[:1024] == b"\x5a" * 1024, "read from the read-only buffer"
            assert ro.mem[:] == b"\x5a" * 4096, "the device's write was blocked"
        with pytest.raises(OSError) as e:
            iommu.alloc(4096, 0x80)
        assert e.value.errno == errno.EINVAL and "unknown DMA flags" in str(e.value)


def test_explicit_iommu_map_unmap(edu):
    expected = vfiokit.IOMMU_TYPE1 if os.environ.get("VFIOKIT_VM_KERNEL") == "legacy" else vfiokit.IOMMU_IOMMUFD
    if os.environ.get("VFIOKIT_IOMMU") == "type1":
        expected = vfiokit.IOMMU_TYPE1
    with vfiokit.Iommu() as iommu, vfiokit.open(edu, iommu) as dev:
        assert iommu.kind == expected and dev.iommu is iommu
        ranges = iommu.iova_ranges()
        assert ranges and all(r.start <= r.last for r in ranges)
        memory = mmap.mmap(-1, 2 * 4096)  # page-aligned anonymous memory
        assert iommu.map(memory, None, 0x100000) == 0x100000
        iova = iommu.map_any(memory, 4096)
        assert any(r.start <= iova <= r.last for r in ranges)
        with pytest.raises(OSError):  # overlapping an existing mapping
            iommu.map(memory, 4096, 0x100000)
        with pytest.raises(OSError) as e:  # cutting through the 2-page mapping
            iommu.unmap(0x100000, 4096)
        assert e.value.errno in (errno.EINVAL, errno.ENOENT) and "cuts through" in str(e.value)
        assert iommu.unmap(0x100000) == 2 * 4096
        assert iommu.unmap(iova) == 4096
        with pytest.raises(TypeError, match="writable buffer"):
            iommu.map(b"x" * 4096, None, 0x200000)
        buf = iommu.alloc(100)
        assert len(buf.mem) == 100
        iommu.map(memory, None, 0x100000)
        iommu.map_any(memory, 4096)
        assert iommu.unmap_all() == 3 * 4096  # the maps, not the buffer
        assert iommu.translate(buf.address) and iommu.unmap_all() == 0
    assert buf.address == 0, "closing the context freed its buffers"
    with pytest.raises(ValueError, match="closed"):
        iommu.iova_ranges()


def test_nvme_records_and_msix_table_through_the_accessors(nvme):
    with vfiokit.open(nvme) as dev:
        r = dev.regions[0]
        assert r.flags & vfiokit.REGION_MSIX_MAPPABLE and r.flags & vfiokit.REGION_MEM64
        assert r.size == 16 << 10 and "MSIX_MAPPABLE" in repr(r) and "16 KiB" in repr(r)
        assert dev.irqs[vfiokit.IRQ_MSIX].count == 65
        cap = dev.find_capability(CAP_MSIX)
        assert cap is not None and dev.config.read8(cap) == CAP_MSIX
        assert (dev.config.read16(cap + 2) & 0x7FF) + 1 == 65  # table size
        table = dev.config.read32(cap + 4)
        bir, offset = table & 7, table & ~7
        assert bir == 0
        bar = dev.map(bir)
        words = [bar.read32(offset + 4 * i) for i in range(4)]
        assert words[3] & 1, "vector control: masked after reset"
        # the table is mappable here, so a plain load sees the same words
        assert struct.unpack_from("<4I", bar.mem, offset) == tuple(words)
        assert dev.find_capability(0x0F) is None  # no such capability


def test_ivshmem_bulk_memoryview(ivshmem):
    with vfiokit.open(ivshmem) as dev:
        bar2 = dev.map(2)
        mem = bar2.mem
        assert len(mem) == bar2.size == 64 << 20 and not mem.readonly
        pattern = bytes(range(256)) * 16
        mem[0x1000:0x2000] = pattern
        mem[len(mem) - 4096:] = pattern
        assert bar2.read32(0x1000) == 0x03020100 and bar2.read64(len(mem) - 8) == 0xFFFEFDFCFBFAF9F8
        assert bar2.read(0x1000, 16) == pattern[:16]
    # a second mapping of the same memory, by a second open (ivshmem's BAR is shared RAM).
    # (sysfs's resource2 cannot serve: the kernel revokes such mappings once vfio-pci claims
    # the BAR, and reading through them dies with SIGBUS.)
    with vfiokit.open(ivshmem) as dev:
        again = dev.map(2)
        assert again.mem[0x1000:0x2000] == pattern and again.read32(0x1004) == 0x07060504
        assert again.mem[-4096:] == pattern


def test_ivshmem_8g_far_end(ivshmem_big):
    with vfiokit.open(ivshmem_big) as dev:
        assert dev.regions[2].size == 8 << 30 and "8 GiB" in repr(dev.regions[2])
        bar2 = dev.map(2)
        bar2.write64(bar2.size - 8, 0x0123456789ABCDEF)
        assert bar2.mem[-8:].tobytes() == struct.pack("<Q", 0x0123456789ABCDEF)


def test_children_keep_the_device_alive(ivshmem):
    mem = vfiokit.open(ivshmem).map(2).mem  # no name holds the Device
    gc.collect()
    mem[0:4] = b"live"
    assert mem[0:4] == b"live"
    del mem
    gc.collect()
    with vfiokit.open(ivshmem) as dev:  # the first one was closed once its view went
        assert dev.map(2).read32(0) == int.from_bytes(b"live", "little")


def test_close_is_idempotent_and_final(edu):
    dev = vfiokit.open(edu)
    bar0 = dev.map(0)
    mem = bar0.mem
    dev.close()
    dev.close()
    assert dev.closed and "closed" in repr(dev)
    with pytest.raises(ValueError, match="closed"):
        bar0.read32(0)
    with pytest.raises(ValueError):
        mem[0]  # released with the mapping
    with pytest.raises(ValueError, match="closed"):
        dev.map(0)


def test_testdev_io_port_bar(testdev):
    with vfiokit.open(testdev) as dev:
        io = dev.regions[1]
        assert io.flags & vfiokit.REGION_IO_PORT and not io.mmappable and io.size == 256
        with pytest.raises(OSError) as e:
            dev.map(1)
        assert e.value.errno == errno.ENOTSUP and "cannot be mmapped" in e.value.strerror
        port = dev.region(1)
        for read in (port.read8, port.read16, port.read32):
            assert isinstance(read(0), int)  # through the device fd
        with pytest.raises(ValueError, match="not mapped"):
            _ = port.mem
        with pytest.raises(ValueError, match="not mapped"):
            _ = dev.config.mem
        assert dev.config.read16(0) == 0x1B36 and dev.config.read16(2) == 0x0005


def test_argument_errors(edu):
    with vfiokit.open(edu) as dev:
        bar0 = dev.map(0)
        with pytest.raises(OSError) as e:
            bar0.read32(1 << 20)  # past the end
        assert e.value.errno == errno.EINVAL and e.value.strerror
        with pytest.raises(OSError) as e:
            bar0.read32(2)  # misaligned
        assert e.value.errno == errno.EINVAL
        with pytest.raises(ValueError, match="does not fit in 8 bits"):
            bar0.write8(0, 0x100)
        with pytest.raises(FileNotFoundError):
            dev.region(vfiokit.PCI_VGA)  # absent
        with pytest.raises(OSError) as e:
            dev.irq(vfiokit.IRQ_MSIX)  # edu has none
        assert e.value.strerror


def test_open_errors():
    with pytest.raises(OSError) as e:
        vfiokit.open("0000:00:1f.7")
    assert e.value.errno == errno.ENOENT and isinstance(e.value, FileNotFoundError) and "0000:00:1f.7" in e.value.strerror
    # a device not bound to vfio-pci: the 9p transport the guest reads the host through
    other = next(a for a in sorted(os.listdir("/sys/bus/pci/devices"))
                 if os.path.basename(os.path.realpath(f"/sys/bus/pci/devices/{a}/driver")) == "virtio-pci")
    with pytest.raises(OSError) as e:
        vfiokit.open(other)
    assert e.value.errno and "vfio-pci" in e.value.strerror


# The CLI, as a user runs it.

def test_cli_list(edu, nvme, ivshmem, testdev):
    r = cli_main("list")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "1234:11e8" in lines[edu] and "group" in lines[edu]
    assert "1b36:0010" in lines[nvme] and "1af4:1110" in lines[ivshmem] and "1b36:0005" in lines[testdev]
    assert "PF: 0/2 VFs" in lines[os.environ["VFIOKIT_TEST_SRIOV_PF"]]


def test_cli_info(nvme):
    r = cli_main("info", nvme)
    assert r.returncode == 0, r.stderr
    assert "BAR0" in r.stdout and "16 KiB" in r.stdout and "MSIX_MAPPABLE" in r.stdout
    assert "MSIX" in r.stdout and "65" in r.stdout and "CONFIG" in r.stdout


def test_cli_peek_poke(edu):
    r = cli("peek", edu, "bar0", "0")  # the one new process: python -m vfiokit runs here
    assert (r.returncode, r.stdout) == (0, "0x010000ed\n"), r.stderr
    assert cli_main("poke", edu, "0", "0x4", "0x11111111").returncode == 0
    assert cli_main("peek", edu, "bar0", "4").stdout == "0xeeeeeeee\n"
    assert cli_main("peek", edu, "config", "0", "16").stdout == "0x1234\n"
    assert cli_main("peek", edu, "7", "0x2", "16").stdout == "0x11e8\n"


def test_cli_errors_are_one_line(edu):
    for args in (["peek", "0000:00:1f.7", "bar0", "0"], ["peek", edu, "bar0", "0x100000"],
                 ["info", "nonsense"]):
        r = cli_main(*args)
        assert r.returncode == 1, r
        assert r.stderr.startswith("vfiokit: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_cli_unbind_bind(testdev):
    driver = f"/sys/bus/pci/devices/{testdev}/driver"
    assert cli_main("unbind", testdev).returncode == 0
    assert not os.path.exists(driver) or os.path.basename(os.path.realpath(driver)) != "vfio-pci"
    r = cli_main("bind", testdev)
    assert r.returncode == 0, r.stderr
    assert os.path.basename(os.path.realpath(driver)) == "vfio-pci"


NVME_READ = PYTHON_DIR / "examples" / "nvme-read.py"


def nvme_read_main(*args: str) -> subprocess.CompletedProcess:
    """python/examples/nvme-read.py's main() in this process (a new interpreter costs 20-30 s
    in the guest), its output captured."""
    spec = importlib.util.spec_from_file_location("nvme_read", NVME_READ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = StringIO(), StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main(list(args))
    return subprocess.CompletedProcess([str(NVME_READ), *args], rc, out.getvalue(), err.getvalue())


def test_nvme_read_script(nvme):
    """The example script on the test bed's namespace (a fresh 64 MiB image, 512-byte blocks):
    a block written with a pattern reads back as that pattern, also after the controller was
    reset and set up again by a second run, and a block never written reads as zeros."""
    pattern_dump = ("00000000  76 66 69 6f 6b 69 74 21  76 66 69 6f 6b 69 74 21  |vfiokit!vfiokit!|\n"
                    "*\n00000200\n")
    r = subprocess.run([sys.executable, str(NVME_READ), "--write", "vfiokit!", "--lba", "1000", nvme],
                       capture_output=True, text=True, timeout=300)  # the script as a user runs it
    assert r.returncode == 0, r.stderr
    assert f"nvme-read: {nvme}: namespace 1, 131072 blocks of 512 bytes\n" in r.stdout
    assert "nvme-read: wrote LBA 1000: 'vfiokit!' repeated\n" in r.stdout
    assert r.stdout.endswith("nvme-read: LBA 1000, read through I/O queue 1 (completed on MSI-X vector 1):\n"
                             + pattern_dump), r.stdout

    r = nvme_read_main("--lba", "1000", nvme)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "wrote" not in r.stdout and r.stdout.endswith(":\n" + pattern_dump), r.stdout
    r = nvme_read_main()  # the first NVMe with a namespace, its last block: never written
    assert r.returncode == 0, r.stderr
    zeros = "00000000  " + " ".join(["00"] * 8) + "  " + " ".join(["00"] * 8) + "  |................|\n"
    assert r.stdout.endswith("nvme-read: LBA 131071, read through I/O queue 1 (completed on MSI-X vector 1):\n"
                             + zeros + "*\n00000200\n"), r.stdout

    r = nvme_read_main(os.environ["VFIOKIT_TEST_RESET_NVME"])  # the test bed's nvme without a namespace
    assert r.returncode == 1 and "has no active namespace" in r.stderr, r
    r = nvme_read_main("--lba", "131072", nvme)
    assert r.returncode == 1 and "LBA 131072 is not in namespace 1 (0..131071)" in r.stderr, r


def test_sriov_vf_opens_with_its_token(edu):
    pf = os.environ["VFIOKIT_TEST_SRIOV_PF"]
    token, wrong = "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3", "00000000-0000-0000-0000-000000000001"
    iommu = vfiokit.Iommu()
    with vfiokit.open(pf, iommu) as pf_dev:
        pf_dev.set_vf_token(token)
        vfs = vfiokit.sriov_set_numvfs(pf, 2)
        try:
            assert len(vfs) == 2
            listed = {line.split()[0]: line for line in cli_main("list").stdout.splitlines()}
            assert f"PF: 2/2 VFs ({vfs[0]}, {vfs[1]})" in listed[pf]
            assert f"VF 0 of PF {pf}" in listed[vfs[0]] and f"VF 1 of PF {pf}" in listed[vfs[1]]
            assert [f for f in vfiokit.doctor(vfs[0]) if f.code == vfiokit.FINDING_VF_TOKEN and pf in f.message]
            assert all(os.path.realpath(f"/sys/bus/pci/devices/{vf}/physfn").endswith(pf) for vf in vfs)
            cdev_without_token = iommu.kind == vfiokit.IOMMU_IOMMUFD and os.environ["VFIOKIT_VM_KERNEL"] != "latest"
            if cdev_without_token:
                with pytest.raises(OSError) as e:
                    vfiokit.open(vfs[0], iommu, vf_token=token)
                assert e.value.errno == errno.EOPNOTSUPP and "6.17" in str(e.value)
            else:
                with pytest.raises(OSError) as e:
                    vfiokit.open(vfs[0], iommu)
                assert e.value.errno == errno.EACCES and pf in str(e.value) and "vf_token" in str(e.value)
                with pytest.raises(OSError) as e:
                    vfiokit.open(vfs[0], iommu, vf_token=wrong)
                assert e.value.errno == errno.EACCES and wrong in str(e.value)
                with vfiokit.open(vfs[0], iommu, vf_token=token) as vf:
                    assert vf.config.read16(0) == 0x1B36
        finally:
            assert vfiokit.sriov_set_numvfs(pf, 0) == []
    with pytest.raises(OSError) as e:
        vfiokit.open(vfs[0], iommu, vf_token="not-a-uuid")
    assert e.value.errno == errno.EINVAL and "not a VF token" in str(e.value)
    with vfiokit.open(edu, iommu) as d, pytest.raises(OSError) as e:
        d.set_vf_token(token)
    assert e.value.errno == errno.ENOTSUP
    iommu.close()


def test_a_zapped_bar_reads_all_ones_and_raises_enodev(edu):
    """Memory decode disabled through the device fd's config space makes vfio-pci zap the BAR
    (as a removal or reset does): a thread reading it survives and reads all-ones, then every
    call raises OSError(ENODEV), and closing the device leaks no fd."""
    import threading
    with vfiokit.open(edu) as warm:  # process-wide state first: the guard's memfd, threads
        warm.map(0).read32(ID)
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
    fds = len(os.listdir("/proc/self/fd"))
    dev = vfiokit.open(edu)
    bar0 = dev.map(0)
    seen, started = [], threading.Event()

    def spin():
        started.set()
        for _ in range(20_000_000):  # bounded: a thread that never sees all-ones fails the test
            v = bar0.read32(ID)
            if v == 0xFFFFFFFF:
                break
            assert v == 0x010000ED
        seen.append(v)

    reader = threading.Thread(target=spin)
    reader.start()
    started.wait()
    dev.config.write16(PCI_COMMAND, dev.config.read16(PCI_COMMAND) & ~COMMAND_MEMORY)
    reader.join()
    assert seen == [0xFFFFFFFF], "the reading thread survived and read all-ones"
    assert dev.gone
    for call in (lambda: dev.config.read16(0), lambda: dev.config.write16(PCI_COMMAND, 0), dev.reset):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENODEV and "is gone" in str(e.value)
    dev.close()
    assert len(os.listdir("/proc/self/fd")) == fds, "no fd leaked by the gone device"
