"""The Python API driving a device served over vfio-user by the device model
(tests/vfio_user/model.rs, built as `cargo build --example vfio-user-model`): on the host,
no root, no IOMMU. VFIOKIT_VFIO_USER_MODEL names the program; without it these tests FAIL."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


import pytest

import vfiokit

import test_guest
from conftest import cli

# The model is edu to a driver (DMA through its buffer at 0x40000), plus an MSI-X raise register.
ID, REG_IRQ_ACK, REG_RAISE_MSIX, REG_DMA_ERROR = 0x010000ED, 0x64, 0x108, 0x120
REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD, BUFFER = 0x80, 0x88, 0x90, 0x98, 0x40000
DMA_START, DMA_TO_RAM, DMA_IRQ, IRQ_DMA = 0x1, 0x2, 0x4, 0x100


@contextmanager
def serving(socket: Path) -> Iterator[str]:
    """The model serving one connection at `socket`; yields the device's name."""
    program = os.environ.get("VFIOKIT_VFIO_USER_MODEL")
    if not program:
        pytest.fail("VFIOKIT_VFIO_USER_MODEL is not set: python/run-tests builds and names the model server")
    server = subprocess.Popen([program, str(socket)])
    deadline = time.monotonic() + 10
    while not socket.exists():  # the model renames it into place once listening
        assert server.poll() is None, "the model server exited"
        assert time.monotonic() < deadline, "the model server did not start"
        time.sleep(0.01)
    yield f"vfio-user:{socket}"
    assert server.wait(timeout=10) == 0


@pytest.fixture
def model(tmp_path: Path) -> Iterator[str]:
    with serving(tmp_path / "model.sock") as name:
        yield name


def test_records_and_registers(model: str) -> None:
    with vfiokit.Device(model) as dev:
        assert dev.iommu.kind == vfiokit.IOMMU_VFIO_USER
        assert repr(dev.iommu) == "<vfiokit.Iommu vfio-user>"
        assert (dev.info.vendor_id, dev.info.device_id) == (0x1234, 0x11E8)
        bar0 = dev.region(0)
        assert bar0.read32(0) == ID
        bar0.write32(4, 0x1234)
        assert bar0.read32(4) == 0xFFFFEDCB
        with pytest.raises(OSError) as refused:
            bar0.read32(0xFF0)
        assert refused.value.errno == 5  # EIO: the server refused
        with pytest.raises(OSError):
            dev.fileno()


# BAR4 of the model: read-only and mmappable whole; the u32 at offset o is ROM_BASE + o / 4.
ROM_BASE, ROM_LEN = 0xB4B40000, 16 << 10


def test_the_library_decides_what_goes_through_the_mapping(model: str) -> None:
    with vfiokit.Device(model) as dev:
        rom = dev.map(4)
        assert rom.read32(8) == ROM_BASE + 2 and rom.read16(ROM_LEN - 4) == (ROM_BASE + ROM_LEN // 4 - 1) & 0xFFFF
        assert bytes(rom.mem[4:8]) == (ROM_BASE + 1).to_bytes(4, "little")
        # A store into a read-only mapping would kill the interpreter: the library refuses it.
        with pytest.raises(PermissionError) as refused:
            rom.write32(8, 1)
        assert "cannot be written" in str(refused.value)
        with pytest.raises(TypeError):
            rom.mem[0] = 1
        assert rom.read32(8) == ROM_BASE + 2
        # The decision as taken: the read-only BAR's reads go straight through the mapping
        # (closures on the instance), its writes through the library; an offset the mapping
        # does not take (misaligned, negative, past the end) is the library's to refuse.
        assert "read32" in vars(rom) and "write32" not in vars(rom)
        for offset in (2, -4, ROM_LEN):
            with pytest.raises(OSError) as bad:
                rom.read32(offset)
            assert bad.value.errno == errno.EINVAL, offset
        # BAR2 has a hole reached by messages: its accessors work across all of it.
        ram = dev.map(2)
        for offset in (0, 20 << 10, 40 << 10):
            ram.write32(offset, 0x600D0000 + offset)
            assert ram.read32(offset) == 0x600D0000 + offset
        ram.mem[0:4] = b"\x01\x02\x03\x04"
        assert ram.read32(0) == 0x04030201


def dma_copy(bar0: vfiokit.Region, irq: vfiokit.Irq, src: int, dst: int, length: int) -> None:
    """Copies `length` bytes from IOVA `src` to `dst` through the model's buffer: two
    transfers, each ending in MSI-X vector 0."""
    for frm, to, cmd in ((src, BUFFER, 0), (BUFFER, dst, DMA_TO_RAM)):
        for reg, value in ((REG_DMA_SRC, frm), (REG_DMA_DST, to), (REG_DMA_COUNT, length),
                           (REG_DMA_CMD, cmd | DMA_START | DMA_IRQ)):
            bar0.write64(reg, value)
        assert irq.wait(timeout=2, vector=0) == 1
        bar0.write32(REG_IRQ_ACK, IRQ_DMA)
        assert bar0.read64(REG_DMA_ERROR) == 0


def test_msix_and_dma(model: str) -> None:
    with vfiokit.Device(model) as dev, dev.irq(vfiokit.IRQ_MSIX, 0, 4) as irq:
        bar0 = dev.region(0)
        bar0.write32(REG_RAISE_MSIX, 3)
        assert irq.wait(timeout=2, vector=3) == 1
        src, dst = dev.iommu.alloc(4096), dev.iommu.alloc(4096)
        src.mem[:4] = b"vfio"
        dma_copy(bar0, irq, src.iova, dst.iova, 4096)
        assert bytes(dst.mem[:4]) == b"vfio"
        assert dev.iommu.translate(dst.mem[4:8]) == dst.iova + 4


def test_heap_objects(model: str) -> None:
    """Heap objects as memoryviews: the model's DMA engine copies one object into another."""
    with vfiokit.Device(model) as dev, dev.irq(vfiokit.IRQ_MSIX, 0, 1) as irq:
        bar0, iommu = dev.region(0), dev.iommu
        src, dst = iommu.heap_alloc(64, 64), iommu.heap_alloc(64, 64)
        assert bytes(src.mem) == bytes(64) and src.address % 64 == 0
        src.mem[:8] = b"heap-obj"
        dma_copy(bar0, irq, src.iova, dst.iova, 8)
        assert bytes(dst.mem[:8]) == b"heap-obj"
        assert iommu.translate(dst.mem[8:16]) == dst.iova + 8
        assert iommu.to_vaddr(dst.iova + 8) == dst.address + 8
        info = iommu.heap_info()
        assert (info.arena_size, info.arenas, info.used) == (2 << 20, 1, 64 << 10)
        address = dst.address
        dst.close()
        dst.close()  # idempotent
        with pytest.raises(OSError) as e:
            vfiokit._capi.lib.vfiokit_dma_heap_free(iommu._handle(), address)  # freed already
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            iommu.heap_alloc(64, 3)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(FileNotFoundError):
            iommu.to_vaddr(0x7000000)


def test_cli(tmp_path: Path) -> None:
    """`python -m vfiokit info|peek|poke vfio-user:SOCKET`, one model per command."""
    def run(*args: str) -> subprocess.CompletedProcess:
        with serving(tmp_path / "cli.sock") as name:
            return cli(*(name if a == "DEV" else a for a in args))
    r = run("info", "DEV")
    assert r.returncode == 0, r.stderr
    assert "vfio-user DMA context" in r.stdout and "area: region 2 offset 0x8000 size 0x8000" in r.stdout
    assert "MSIX             4" in r.stdout, r.stdout
    r = run("peek", "DEV", "bar0", "0")
    assert (r.returncode, r.stdout) == (0, "0x010000ed\n"), r.stderr
    assert run("peek", "DEV", "config", "2", "16").stdout == "0x11e8\n"
    assert run("poke", "DEV", "bar2", "0x8000", "0x11111111").returncode == 0
    r = run("peek", "DEV", "bar0", "0xff0")
    assert r.returncode == 1 and r.stderr.startswith("vfiokit: ") and r.stderr.count("\n") == 1, r.stderr


# The guest suite's edu tests that need nothing of the kernel, run unchanged on the model.
EDU_TESTS: list[Callable[[str], None]] = [
    test_guest.test_caller_eventfds,
    test_guest.test_edu_msi,
    lambda edu: test_guest.test_close_from_another_thread_ends_a_wait(edu, "irq"),
    lambda edu: test_guest.test_close_from_another_thread_ends_a_wait(edu, "device"),
    test_guest.test_edu_dma_round_trip,
    test_guest.test_file_mapping,
    test_guest.test_translate_and_readonly,
]


@pytest.mark.parametrize("test", EDU_TESTS, ids=["caller_eventfds", "edu_msi", "close_irq_ends_a_wait",
                                                 "close_device_ends_a_wait", "edu_dma_round_trip",
                                                 "file_mapping", "translate_and_readonly"])
def test_guest_edu_tests_on_the_model(model: str, test: Callable[[str], None]) -> None:
    test(model)
