"""One NVMe read from Python: a controller brought up, one I/O queue pair made, one logical
block read and printed (optionally written first), every queue, the identify data and the data
buffer being DMA heap objects used through their memoryviews (`Iommu.heap_alloc`). The C
driver c-examples/nvme-io does the same at scale.

    nvme-read.py [--lba N] [--write TEXT] [PCI-ADDRESS]

--write TEXT fills the block with TEXT repeated and writes it before the read. Without an
address: the first NVMe controller bound to vfio-pci with a namespace. In the test guest:

    tests/vm/run -- target/py-venv/bin/python python/examples/nvme-read.py --write hello --lba 8

(target/py-venv: python/run-tests installs the package's wheel there, library included.)
Completions come by MSI-X: vector 0 for the admin queue, vector 1 for the I/O queue. Every
completion's phase, command id and status are checked; a failure raises, and the controller is
disabled and everything released on the way out. Exit status 0, or 1 with a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import struct
import sys
import time

import vfiokit

CAP, VS, CC, CSTS, AQA, ASQ, ACQ, DOORBELLS = 0x00, 0x08, 0x14, 0x1C, 0x24, 0x28, 0x30, 0x1000
CC_ENABLE = 6 << 16 | 4 << 20 | 1  # 64-byte SQ entries, 16-byte CQ entries, EN; MPS 0: 4 KiB pages
CC_SHUTDOWN = CC_ENABLE | 1 << 14
ENTRIES, PAGE = 16, 4096
DELETE_SQ, CREATE_SQ, DELETE_CQ, CREATE_CQ, IDENTIFY = 0x00, 0x01, 0x04, 0x05, 0x06
NVM_WRITE, NVM_READ = 0x01, 0x02
SQE = struct.Struct("<IIQQQQ6I")  # cdw0 (opcode, command id), nsid, rsvd, mptr, prp1, prp2, cdw10-15
CQE = struct.Struct("<IIHHHH")    # result, rsvd, sq head, sq id, command id, status (phase in bit 0)
TIMEOUT = 30.0


class Queue:
    """A submission/completion queue pair of ENTRIES entries in two page-aligned heap objects."""

    def __init__(self, iommu: vfiokit.Iommu, bar0: vfiokit.Region, stride: int, qid: int,
                 irq: vfiokit.Irq, vector: int):
        self.sq = iommu.heap_alloc(ENTRIES * SQE.size, PAGE)
        self.cq = iommu.heap_alloc(ENTRIES * CQE.size, PAGE)
        self.bar0, self.qid, self.irq, self.vector = bar0, qid, irq, vector
        self.sq_db, self.cq_db = DOORBELLS + 2 * qid * stride, DOORBELLS + (2 * qid + 1) * stride
        self.tail = self.head = 0
        self.phase, self.cid = 1, 0

    def close(self) -> None:
        self.sq.close()
        self.cq.close()

    def run(self, opcode: int, what: str, nsid: int = 0, prp1: int = 0, prp2: int = 0, *cdw: int) -> int:
        """One command: its entry written into the SQ's memoryview, the doorbell rung, the MSI-X
        vector awaited, the completion entry read from the CQ's and checked. Returns dword 0."""
        self.cid = (self.cid + 1) & 0xFFFF
        cdws = (list(cdw) + [0] * 6)[:6]
        SQE.pack_into(self.sq.mem, self.tail * SQE.size, opcode | self.cid << 16, nsid, 0, 0, prp1, prp2, *cdws)
        self.tail = (self.tail + 1) % ENTRIES
        self.bar0.write32(self.sq_db, self.tail)
        deadline = time.monotonic() + TIMEOUT
        while True:
            result, _, sq_head, sq_id, cid, status = CQE.unpack_from(self.cq.mem, self.head * CQE.size)
            if status & 1 == self.phase:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: no completion in {TIMEOUT:.0f} s")
            self.irq.wait(timeout=TIMEOUT, vector=self.vector)
        self.head = (self.head + 1) % ENTRIES
        if self.head == 0:
            self.phase ^= 1
        self.bar0.write32(self.cq_db, self.head)
        if cid != self.cid or sq_id != self.qid or sq_head != self.tail:
            raise RuntimeError(f"{what}: completion for command {cid:#x} of queue {sq_id} (head {sq_head}), "
                               f"sent {self.cid:#x} to queue {self.qid} (tail {self.tail})")
        if status >> 1:
            raise RuntimeError(f"{what} failed: status code type {status >> 9 & 7}, status code {status >> 1 & 0xFF:#x}")
        return result


def wait_csts(bar0: vfiokit.Region, mask: int, want: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while bar0.read32(CSTS) & mask != want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: CSTS {bar0.read32(CSTS):#x} after {timeout} s")
        time.sleep(0.001)


def nvme_controllers() -> list[str]:
    """NVMe controllers (class 010802) bound to vfio-pci, in address order."""
    base = "/sys/bus/pci/drivers/vfio-pci"
    found = []
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{name}/class") as f:
                if int(f.read(), 16) == 0x010802:
                    found.append(name)
        except (OSError, ValueError):
            pass
    return found


def hexdump(data: bytes) -> str:
    """Lines of 16 bytes, hex and ASCII; a run of identical lines is one '*', as hexdump -C."""
    lines, last = [], None
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        if chunk == last:
            if lines[-1] != "*":
                lines.append("*")
            continue
        last = chunk
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}  {hexes[:23]}  {hexes[24:]}  |{text}|")
    lines.append(f"{len(data):08x}")
    return "\n".join(lines)


def read_block(address: str, lba: int | None, write: str | None) -> bool:
    """Drives one controller; False (nothing done) if it has no namespace."""
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(vfiokit.open(address))
        iommu = dev.iommu
        try:
            dev.reset()
        except OSError as e:
            if e.errno != errno.ENOTSUP:  # no reset for it: go on without
                raise
        dev.config.write16(0x04, dev.config.read16(0x04) | 0x6)  # memory space, bus master
        bar0 = dev.map(0)
        cap = bar0.read64(CAP)
        stride, timeout = 4 << (cap >> 32 & 0xF), max(cap >> 24 & 0xFF, 1) * 0.5
        bar0.write32(CC, bar0.read32(CC) & ~1)
        wait_csts(bar0, 1, 0, timeout, "disabling")

        irq = stack.enter_context(dev.irq(vfiokit.IRQ_MSIX, 0, 2))  # admin, I/O queue 1
        admin = Queue(iommu, bar0, stride, 0, irq, 0)
        stack.callback(admin.close)
        io = Queue(iommu, bar0, stride, 1, irq, 1)
        stack.callback(io.close)
        buf = stack.enter_context(iommu.heap_alloc(PAGE, PAGE))  # identify data, then the block
        # Registered last, so run first on the way out: the controller is disabled (CC.EN = 0)
        # before the memory it may use goes.
        stack.callback(lambda: bar0.write32(CC, 0))
        bar0.write32(AQA, (ENTRIES - 1) << 16 | (ENTRIES - 1))
        bar0.write64(ASQ, admin.sq.iova)
        bar0.write64(ACQ, admin.cq.iova)
        bar0.write32(CC, CC_ENABLE)
        wait_csts(bar0, 3, 1, timeout, "enabling")

        admin.run(IDENTIFY, "IDENTIFY active namespace list", 0, buf.iova, 0, 2)
        (nsid,) = struct.unpack_from("<I", buf.mem, 0)
        if nsid == 0:
            print(f"nvme-read: {address} has no active namespace", file=sys.stderr)
            return False
        admin.run(IDENTIFY, "IDENTIFY NAMESPACE", nsid, buf.iova, 0, 0)
        blocks, flbas = struct.unpack_from("<Q", buf.mem, 0)[0], buf.mem[26] & 0xF
        lbaf = struct.unpack_from("<I", buf.mem, 128 + 4 * flbas)[0]
        block_size = 1 << (lbaf >> 16 & 0xFF)
        if lbaf & 0xFFFF or block_size > PAGE:
            raise RuntimeError(f"namespace {nsid}: {lbaf & 0xFFFF} bytes of metadata, blocks of {block_size}")
        lba = blocks - 1 if lba is None else lba
        if not 0 <= lba < blocks:
            raise ValueError(f"LBA {lba} is not in namespace {nsid} (0..{blocks - 1})")
        print(f"nvme-read: {address}: namespace {nsid}, {blocks} blocks of {block_size} bytes")

        admin.run(CREATE_CQ, "CREATE I/O COMPLETION QUEUE", 0, io.cq.iova, 0, (ENTRIES - 1) << 16 | 1, 1 << 16 | 3)
        admin.run(CREATE_SQ, "CREATE I/O SUBMISSION QUEUE", 0, io.sq.iova, 0, (ENTRIES - 1) << 16 | 1, 1 << 16 | 1)
        if write is not None:
            text = write.encode() or b"\0"
            buf.mem[:block_size] = (text * (block_size // len(text) + 1))[:block_size]
            io.run(NVM_WRITE, f"write of LBA {lba}", nsid, buf.iova, 0, lba & 0xFFFFFFFF, lba >> 32, 0)
            print(f"nvme-read: wrote LBA {lba}: {write!r} repeated")
        buf.mem[:block_size] = b"\xa5" * block_size  # poison: what the read replaces
        io.run(NVM_READ, f"read of LBA {lba}", nsid, buf.iova, 0, lba & 0xFFFFFFFF, lba >> 32, 0)
        print(f"nvme-read: LBA {lba}, read through I/O queue 1 (completed on MSI-X vector 1):")
        print(hexdump(buf.mem[:block_size].tobytes()))

        admin.run(DELETE_SQ, "DELETE I/O SUBMISSION QUEUE", 0, 0, 0, 1)
        admin.run(DELETE_CQ, "DELETE I/O COMPLETION QUEUE", 0, 0, 0, 1)
        bar0.write32(CC, CC_SHUTDOWN)
        wait_csts(bar0, 0xC, 0x8, timeout, "shutdown")
        return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nvme-read.py", description="Read (and write) one NVMe block.")
    parser.add_argument("--lba", type=int, help="the block (default: the namespace's last)")
    parser.add_argument("--write", metavar="TEXT", help="write TEXT repeated into the block first")
    parser.add_argument("address", nargs="?", help="PCI address (default: the first NVMe with a namespace)")
    args = parser.parse_args(argv)
    try:
        for address in [args.address] if args.address else nvme_controllers():
            if read_block(address, args.lba, args.write):
                return 0
        if not args.address:
            print("nvme-read: no NVMe controller with a namespace bound to vfio-pci", file=sys.stderr)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"nvme-read: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
