"""The Python API driving a device served over vfio-user by the device model
(tests/vfio_user/model.rs, built as `cargo build --example vfio-user-model`): on the host,
no root, no IOMMU. VFIOKIT_VFIO_USER_MODEL names the program; without it these tests FAIL."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


import pytest

import vfiokit

ID, REG_RAISE, REG_DMA_SRC, REG_DMA_DST, REG_DMA_LEN, REG_DMA_START, REG_DMA_ERROR = (
    0x010000ED, 0x10, 0x80, 0x88, 0x90, 0x98, 0xA0)


@pytest.fixture
def model(tmp_path: Path) -> Iterator[str]:
    program = os.environ.get("VFIOKIT_VFIO_USER_MODEL")
    if not program:
        pytest.fail("VFIOKIT_VFIO_USER_MODEL is not set: python/run-tests builds and names the model server")
    socket = tmp_path / "model.sock"
    server = subprocess.Popen([program, str(socket)])
    deadline = time.monotonic() + 10
    while not socket.exists():
        assert server.poll() is None, "the model server exited"
        assert time.monotonic() < deadline, "the model server did not start"
        time.sleep(0.01)
    yield f"vfio-user:{socket}"
    assert server.wait(timeout=10) == 0


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


def test_msix_and_dma(model: str) -> None:
    with vfiokit.Device(model) as dev, dev.irq(vfiokit.IRQ_MSIX, 0, 4) as irq:
        bar0 = dev.region(0)
        bar0.write32(REG_RAISE, 3)
        assert irq.wait(timeout=2, vector=3) == 1
        src, dst = dev.iommu.alloc(4096), dev.iommu.alloc(4096)
        src.mem[:4] = b"vfio"
        for reg, value in ((REG_DMA_SRC, src.iova), (REG_DMA_DST, dst.iova), (REG_DMA_LEN, 4096), (REG_DMA_START, 1)):
            bar0.write64(reg, value)
        assert irq.wait(timeout=2, vector=0) == 1
        assert bar0.read64(REG_DMA_ERROR) == 0
        assert bytes(dst.mem[:4]) == b"vfio"
        assert dev.iommu.translate(dst.mem[4:8]) == dst.iova + 4
