"""VFIO's no-IOMMU mode, in the test guest without an IOMMU (python/run-tests iommufd:noiommu,
which boots it with VFIOKIT_IOMMU=noiommu). Marked `noiommu`: only that run selects them."""

import ctypes
import errno
import mmap
import os
import struct

import pytest

import vfiokit

from conftest import edu_dma

pytestmark = pytest.mark.noiommu

IRQ_STATUS, IRQ_RAISE, IRQ_ACK = 0x24, 0x60, 0x64
EDU_BUFFER = 0x40000
PCI_COMMAND, COMMAND_MEMORY, COMMAND_MASTER = 0x04, 0x2, 0x4


def physical(address: int) -> int:
    """The physical address behind `address`, read by the test itself from the pagemap."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // 4096 * 8)
        (entry,) = struct.unpack("=Q", f.read(8))
    assert entry >> 63, "present"
    return (entry & ((1 << 55) - 1)) * 4096 + address % 4096


def test_edu_dma_and_msi_without_an_iommu():
    edu = os.environ["VFIOKIT_TEST_EDU"]
    assert os.environ.get("VFIOKIT_IOMMU") == "noiommu"
    with vfiokit.open(edu) as dev:
        assert dev.iommu.kind == vfiokit.IOMMU_NOIOMMU, "chosen by VFIOKIT_IOMMU=noiommu"
        dev.config.write16(PCI_COMMAND, dev.config.read16(PCI_COMMAND) | COMMAND_MEMORY | COMMAND_MASTER)
        bar0 = dev.map(0)
        with dev.iommu.alloc(4096) as buf:
            assert buf.iova == physical(buf.address), "the IOVA is the physical address"
            pattern = bytes((i * 5 + 1) & 0xFF for i in range(2048))
            buf.mem[:2048] = pattern
            edu_dma(bar0, buf.iova, EDU_BUFFER, len(pattern), to_ram=False)
            edu_dma(bar0, EDU_BUFFER, buf.iova + 2048, len(pattern), to_ram=True)
            assert buf.mem[2048:4096] == pattern
        memory = mmap.mmap(-1, 4096)
        with pytest.raises(OSError) as e:
            dev.iommu.map(memory, None, 0x100000)
        assert e.value.errno == errno.ENOTSUP and "cannot place memory" in e.value.strerror
        iova = dev.iommu.map_any(memory)
        assert iova == physical(ctypes.addressof((ctypes.c_char * 4096).from_buffer(memory)))
        assert dev.iommu.unmap(iova) == 4096
        with dev.irq(vfiokit.IRQ_MSI) as irq:
            bar0.write32(IRQ_RAISE, 0x2)
            assert irq.wait(timeout=5.0) >= 1
            assert bar0.read32(IRQ_STATUS) & 0x2
            bar0.write32(IRQ_ACK, 0x2)


def test_doctor_reports_the_mode():
    findings = {f.code: f for f in vfiokit.doctor()}
    assert vfiokit.FINDING_NOIOMMU_MODE in findings
    off = findings[vfiokit.FINDING_IOMMU_OFF]
    assert off.severity == vfiokit.SEVERITY_WARNING and "VFIOKIT_IOMMU=noiommu" in off.message
