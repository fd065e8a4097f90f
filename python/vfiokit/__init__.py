"""vfiokit: userspace drivers for VFIO devices, from Python.

A thin layer over libvfiokit's C ABI (ctypes, see ``_capi``); the objects here only add
lifetimes (context managers, parents kept alive) and Python types::

    import vfiokit
    with vfiokit.open("0000:00:03.0") as dev:
        bar0 = dev.map(0)
        print(hex(bar0.read32(0)))
        with dev.irq(vfiokit.IRQ_MSI) as irq:
            bar0.write32(0x60, 1)
            irq.wait(timeout=1.0)

Errors are OSError subclasses (FileNotFoundError, PermissionError, TimeoutError, ...) with
the library's errno and message; using a closed object raises ValueError.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import weakref
from ctypes import byref, c_char, c_char_p, c_int, c_size_t, c_ubyte, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p
from typing import Any, Callable, NamedTuple, Optional, TypeVar, Union

try:
    from . import _capi
except ImportError as e:
    # `python -m vfiokit` imports this package before its __main__ can catch anything: say
    # the one line the CLI would (runpy sets argv[0] to "-m" only while locating the module).
    if sys.argv[:1] == ["-m"]:
        sys.exit(str(e))
    raise
from ._capi import (  # noqa: F401  (re-exported: the header's constants)
    DEVICE_PCI, DEVICE_RESET, FEATURE_GET, FEATURE_PROBE, FEATURE_SET, DMA_HUGE_1G, DMA_HUGE_2M, DMA_READONLY, DMA_SHAREABLE, IOMMU_AUTO, IOMMU_IOMMUFD, IOMMU_IOMMUFD_COMPAT, IOMMU_IOMMUFD_COMPAT_V1, IOMMU_NOIOMMU, IOMMU_TYPE1, IOMMU_TYPE1V1, IOMMU_VFIO_USER, IRQ_AUTOMASKED, IRQ_ERR, IRQ_EVENTFD, IRQ_INTX,
    IRQ_MASKABLE, IRQ_MSI, IRQ_MSIX, IRQ_NORESIZE, IRQ_REQ, PCI_BAR0, PCI_BAR1, PCI_BAR2, PCI_BAR3,
    PCI_BAR4, PCI_BAR5, PCI_CAP_EXTENDED, PCI_CONFIG, PCI_ROM, PCI_VGA, REGION_IO_PORT,
    REGION_MEM64, REGION_MMAP, REGION_MSIX_MAPPABLE, REGION_PREFETCH, REGION_PRESENT,
    REGION_READ, REGION_SPARSE, REGION_WRITE, SEVERITY_BLOCKER, SEVERITY_INFO, SEVERITY_WARNING,
    FINDING_GROUP_NOT_VIABLE, FINDING_IOMMU_OFF, FINDING_MEMLOCK_LOW, FINDING_NO_DEVICE,
    FINDING_NO_HUGEPAGES, FINDING_NO_IOMMUFD, FINDING_NO_RESET, FINDING_NODE_PERMISSION,
    FINDING_NOIOMMU_MODE, FINDING_NOT_BOUND, FINDING_SRIOV_OFF, FINDING_VF_TOKEN, FINDING_VFIO_PCI_MISSING,
)

__version__ = "0.1.0"
_lib = _capi.lib

#: The loaded library's version string and C ABI version.
LIBRARY_VERSION: str = _lib.vfiokit_version().decode()
ABI_VERSION: int = _lib.vfiokit_abi_version()
#: The path or name libvfiokit was loaded from.
LIBRARY_PATH: str = _lib._name

REGION_NAMES = ["BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "CONFIG", "VGA"]
IRQ_NAMES = ["INTX", "MSI", "MSIX", "ERR", "REQ"]
IOMMU_NAMES = {IOMMU_AUTO: "auto", IOMMU_TYPE1: "type1", IOMMU_IOMMUFD: "iommufd", IOMMU_VFIO_USER: "vfio-user",
               IOMMU_TYPE1V1: "type1 v1", IOMMU_IOMMUFD_COMPAT: "iommufd compat", IOMMU_IOMMUFD_COMPAT_V1: "iommufd compat v1",
               IOMMU_NOIOMMU: "no-IOMMU"}
_REGION_FLAGS = [(REGION_PRESENT, "PRESENT"), (REGION_READ, "READ"), (REGION_WRITE, "WRITE"),
                 (REGION_MMAP, "MMAP"), (REGION_SPARSE, "SPARSE"),
                 (REGION_MSIX_MAPPABLE, "MSIX_MAPPABLE"), (REGION_IO_PORT, "IO_PORT"),
                 (REGION_MEM64, "MEM64"), (REGION_PREFETCH, "PREFETCH")]
_IRQ_FLAGS = [(IRQ_EVENTFD, "EVENTFD"), (IRQ_MASKABLE, "MASKABLE"),
              (IRQ_AUTOMASKED, "AUTOMASKED"), (IRQ_NORESIZE, "NORESIZE")]


def human_size(n: int) -> str:
    """1048576 -> '1 MiB'; sizes that are not whole units keep one decimal."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v.is_integer() else f"{v:.1f} {unit}"
    return f"{n} B"


def flag_names(flags: int, table: list[tuple[int, str]]) -> str:
    names = [name for bit, name in table if flags & bit]
    rest = flags & ~sum(bit for bit, _ in table)
    return "|".join(names + ([hex(rest)] if rest else [])) or "0"


def region_name(index: int) -> str:
    return REGION_NAMES[index] if index < len(REGION_NAMES) else f"region{index}"


# The records: the C structs themselves (copied out of the device), with readable reprs.
class RegionInfo(_capi.vfiokit_region):
    """Record of region `index` (flags 0: the device has no such region)."""

    @property
    def name(self) -> str:
        return region_name(self.index)

    @property
    def flag_names(self) -> str:
        return flag_names(self.flags, _REGION_FLAGS)

    @property
    def mmappable(self) -> bool:
        return self.num_areas > 0

    def __repr__(self) -> str:
        if not self.flags:
            return f"<region {self.index} {self.name}: absent>"
        return (f"<region {self.index} {self.name}: size {self.size:#x} ({human_size(self.size)}), "
                f"fd offset {self.offset:#x}, {self.flag_names}, areas {self.first_area}+{self.num_areas}"
                + (f", type {self.type}:{self.subtype}" if self.type or self.subtype else "") + ">")


class AreaInfo(_capi.vfiokit_area):
    """An mmappable window of a region (offset and size relative to the region)."""

    def __repr__(self) -> str:
        return (f"<area of region {self.region} {region_name(self.region)}: offset {self.offset:#x}, "
                f"size {self.size:#x} ({human_size(self.size)})>")


class IrqInfo(_capi.vfiokit_irq):
    """Record of IRQ index `index` (count 0: the device has none of this kind)."""

    @property
    def name(self) -> str:
        return IRQ_NAMES[self.index] if self.index < len(IRQ_NAMES) else f"irq{self.index}"

    @property
    def flag_names(self) -> str:
        return flag_names(self.flags, _IRQ_FLAGS)

    def __repr__(self) -> str:
        return f"<irq {self.index} {self.name}: {self.count} vector(s), {self.flag_names}>"


class IovaRange(NamedTuple):
    """A valid IOVA range, inclusive: [start, last]."""
    start: int
    last: int

    def __repr__(self) -> str:
        return f"IovaRange({self.start:#x}, {self.last:#x})"


def _records(getter: Callable[..., int], handle: int, cls: Any) -> list:
    n = c_size_t()
    base = getter(handle, byref(n))
    size = ctypes.sizeof(cls)
    # Copies: the records stay readable after the device is closed.
    return [cls.from_buffer_copy(ctypes.string_at(base + i * size, size)) for i in range(n.value)]


def _view(address: int, size: int, owner: object) -> memoryview:
    """A writable memoryview over raw memory that keeps `owner` (and so the memory) alive."""
    array = (c_ubyte * size).from_address(address)
    array._owner = owner  # type: ignore[attr-defined]
    return memoryview(array).cast("B")


def _timeout_ms(timeout: Optional[float]) -> int:
    if timeout is None:
        return -1
    return min(max(0, math.ceil(timeout * 1000)), 2**31 - 1)


# Typed memoryview formats of each access width: an item load or store is one access of
# exactly that width (a fixed-size memcpy in CPython, one instruction on x86-64).
_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _reader(bits: int, ctype: Any) -> Callable[[Region, int], int]:
    func = getattr(_lib, f"vfiokit_read{bits}")

    def read(self: Region, offset: int) -> int:
        value = ctype()
        func(self._device._handle(), self.index, offset, byref(value))
        return value.value

    read.__name__ = read.__qualname__ = f"read{bits}"
    read.__doc__ = f"One {bits}-bit read at `offset` (aligned): through the mapping or the device fd."
    return read


def _writer(bits: int) -> Callable[[Region, int, int], None]:
    func = getattr(_lib, f"vfiokit_write{bits}")

    def write(self: Region, offset: int, value: int) -> None:
        if not 0 <= value < 1 << bits:  # ctypes would silently truncate
            raise ValueError(f"{value:#x} does not fit in {bits} bits")
        func(self._device._handle(), self.index, offset, value)

    write.__name__ = write.__qualname__ = f"write{bits}"
    write.__doc__ = f"One {bits}-bit write at `offset` (aligned), through the mapping or the device fd."
    return write


# Once a region is mapped, each accessor the library would take straight through the mapping
# (vfiokit_region_map_info) becomes a closure over a typed view of it, set on the instance:
# the access is then one Python call, one test and a memoryview item, without the cost of a
# ctypes call (most of the time of a Python register access). The rest goes to the class's
# accessors, through the library.

def _fast_mask(view: memoryview, width: int) -> int:
    """The bits an offset must not have for the direct path: misaligned ones, and any at or above
    the largest power of two within the view (BARs are powers of two; the tail of a region that
    is not goes through the library). Negative offsets have them all."""
    return ~((1 << (len(view) * width).bit_length() - 1) - 1) | (width - 1)


def _direct_reader(view: memoryview, width: int, slow: Callable[[int], int]) -> Callable[[int], int]:
    bad, shift = _fast_mask(view, width), width.bit_length() - 1

    def read(offset: int) -> int:
        if offset & bad:
            return slow(offset)
        return view[offset >> shift]

    return read


def _direct_writer(view: memoryview, width: int,
                   slow: Callable[[int, int], None]) -> Callable[[int, int], None]:
    bad, shift, limit = _fast_mask(view, width), width.bit_length() - 1, 1 << 8 * width

    def write(offset: int, value: int) -> None:
        if offset & bad or not 0 <= value < limit:
            return slow(offset, value)
        view[offset >> shift] = value

    return write


_C = TypeVar("_C", bound="_Closing")


class _Closing:
    """The one closing mechanism of every object here: close() (idempotent: it calls
    `_close` once), leaving a `with` block, or (best effort) garbage collection. `closed` says
    whether it happened; `_check_open` raises ValueError naming the object, as every use of a
    closed object does. Closed until the constructor succeeds, so a failed one leaves nothing
    to close."""

    _closed = True
    _closed_state = "closed"  # how the ValueError says it: "closed", "freed", "disabled"

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._name()} is {self._closed_state}")

    def _name(self) -> str:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Region:
    """Region `index` of a device: width-exact accessors, and `mem` once mapped.

    The accessors go through the mapping where the offset is mmappable and through the device
    fd where it is not (config space, I/O-port BARs, the MSI-X table), as the C library decides.
    """

    def __init__(self, device: Device, index: int):
        if not 0 <= index < len(device.regions) or not device.regions[index].flags:
            raise FileNotFoundError(2, f"{device.name} has no region {index} ({region_name(index)})")
        self._device = device
        self.index = index
        self.info: RegionInfo = device.regions[index]
        self.size: int = self.info.size
        self.address: Optional[int] = None  # of the mapping, once mapped
        self._mem: Optional[memoryview] = None
        self._views: list[memoryview] = []  # typed views of the mapping, for the accessors
        self._writable = False

    read8, read16, read32, read64 = (_reader(8, c_uint8), _reader(16, c_uint16),
                                     _reader(32, c_uint32), _reader(64, c_uint64))
    write8, write16, write32, write64 = _writer(8), _writer(16), _writer(32), _writer(64)

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`, through the device fd or mapping (no width guarantee)."""
        buf = ctypes.create_string_buffer(length)
        _lib.vfiokit_region_read(self._device._handle(), self.index, offset, buf, length)
        return buf.raw

    def write(self, offset: int, data: bytes) -> None:
        """Writes `data` at `offset` (no width guarantee: use writeN for registers)."""
        _lib.vfiokit_region_write(self._device._handle(), self.index, offset, bytes(data), len(data))

    @property
    def mem(self) -> memoryview:
        """A memoryview over the whole mapping (mmappable regions, after map()), read-only
        where the region is (a store would fault).

        Valid while the device is open: close() releases it (slices of it must not outlive
        the device). Plain loads and stores, so register widths are up to the caller.
        """
        if self.address is None:
            raise ValueError(f"region {self.index} ({region_name(self.index)}) is not mapped: "
                             f"use dev.map({self.index}), or the read/write accessors")
        self._device._handle()
        if self._mem is None:
            view = _view(self.address, self.size, self)
            self._mem = view if self._writable else view.toreadonly()
        return self._mem

    def _mapped(self, info: _capi.vfiokit_map_info) -> None:
        self.address = info.addr
        self._writable = bool(info.access & REGION_WRITE)
        size = info.direct
        if not size or not info.access & (REGION_READ | REGION_WRITE):
            return
        cls = type(self)
        for width, fmt in _FORMATS.items():
            view = self.mem[:size - size % width].cast(fmt)
            self._views.append(view)
            bits = 8 * width
            if info.access & REGION_READ:
                slow_read = getattr(cls, f"read{bits}").__get__(self)
                setattr(self, f"read{bits}", _direct_reader(view, width, slow_read))
            if info.access & REGION_WRITE:
                slow_write = getattr(cls, f"write{bits}").__get__(self)
                setattr(self, f"write{bits}", _direct_writer(view, width, slow_write))

    def _release(self) -> None:
        for width in _FORMATS:
            self.__dict__.pop(f"read{8 * width}", None)
            self.__dict__.pop(f"write{8 * width}", None)
        for view in self._views:
            view.release()
        self._views.clear()
        if self._mem is not None:
            self._mem.release()
            self._mem = None
        self.address = None

    def __repr__(self) -> str:
        state = f"mapped at {self.address:#x}" if self.address is not None else "not mapped"
        return f"<vfiokit.Region {self.index} {region_name(self.index)} of {self._device.name}, {state}>"


class Irq(_Closing):
    """Vectors first..first+count-1 of one IRQ index, enabled until close().

    Each vector signals its own eventfd: fileno(vector) for selectors/asyncio (then wait(0)
    to consume the count), or wait() to block (the GIL is released while waiting).
    """

    def __init__(self, device: Device, kind: int, first: int = 0, count: int = 1,
                 eventfds: Optional[list[int]] = None):
        self._device = device
        if eventfds is not None:
            count = len(eventfds)
        self.kind, self.first, self.count = kind, first, count
        fds = (c_int * count)(*(eventfds or []))
        if eventfds is None:
            _lib.vfiokit_irq_enable(device._handle(), kind, first, count, fds)
        else:  # the caller's eventfds: the caller reads them (wait() is refused) and closes them
            _lib.vfiokit_irq_enable_fds(device._handle(), kind, first, count, fds)
        self.fds: list[int] = list(fds)
        self._closed = False

    _closed_state = "disabled"

    def _name(self) -> str:
        return f"IRQ {IRQ_NAMES[self.kind] if self.kind < len(IRQ_NAMES) else self.kind} of {self._device.name}"

    def _vector(self, vector: Optional[int]) -> int:
        self._check_open()
        if vector is None:
            return self.first
        if not self.first <= vector < self.first + self.count:
            raise ValueError(f"vector {vector} is not enabled here ({self.first}..{self.first + self.count - 1})")
        return vector

    def fileno(self, vector: Optional[int] = None) -> int:
        """The eventfd of `vector` (default: the first), owned by the device."""
        return self.fds[self._vector(vector) - self.first]

    def wait(self, timeout: Optional[float] = None, vector: Optional[int] = None) -> int:
        """Waits for `vector` to fire; returns how often it did. TimeoutError on timeout
        (seconds; None waits forever, 0 polls)."""
        v = self._vector(vector)
        count = c_uint64()
        _lib.vfiokit_irq_wait(self._device._handle(), self.kind, v, _timeout_ms(timeout), byref(count))
        return count.value

    def mask(self, vector: Optional[int] = None) -> None:
        _lib.vfiokit_irq_mask(self._device._handle(), self.kind, self._vector(vector))

    def unmask(self, vector: Optional[int] = None) -> None:
        """Unmasks `vector` (INTx is automasked when it fires: unmask to get the next one)."""
        _lib.vfiokit_irq_unmask(self._device._handle(), self.kind, self._vector(vector))

    def trigger(self, vector: Optional[int] = None) -> None:
        """Makes the kernel signal the vector's eventfd (a loopback test of the IRQ path)."""
        _lib.vfiokit_irq_trigger(self._device._handle(), self.kind, self._vector(vector))

    def _close(self) -> None:
        """Disables the IRQ index (its eventfds are closed)."""
        if not self._device.closed:  # a closed device has disabled it already
            _lib.vfiokit_irq_disable(self._device._h, self.kind)

    def __repr__(self) -> str:
        name = IRQ_NAMES[self.kind] if self.kind < len(IRQ_NAMES) else str(self.kind)
        return (f"<vfiokit.Irq {name} vectors {self.first}..{self.first + self.count - 1} of "
                f"{self._device.name}{' (disabled)' if self.closed else ''}>")


Buffer = Any  # an object exporting a writable buffer (bytearray, mmap, ctypes array, ...)


class DmaBuffer(_Closing):
    """Zeroed, page-rounded memory mapped for DMA at `iova`; freed by close(). `flags`:
    DMA_READONLY, DMA_HUGE_2M or DMA_HUGE_1G (hugetlb pages, size rounded up to them)."""

    def __init__(self, iommu: Iommu, size: int, flags: int = 0):
        address, iova = c_void_p(), c_uint64()
        self._allocate(iommu, size, flags, address, iova)
        self._iommu = iommu
        self.address: int = address.value or 0
        self.iova: int = iova.value
        self.size = size
        self._mem: Optional[memoryview] = None
        self._closed = False
        iommu._buffers.add(self)

    @staticmethod
    def _allocate(iommu: Iommu, size: int, flags: int, address: c_void_p, iova: c_uint64) -> None:
        _lib.vfiokit_dma_alloc_flags(iommu._handle(), size, flags, byref(address), byref(iova))

    @staticmethod
    def _free(iommu: Any, address: int) -> None:
        _lib.vfiokit_dma_free(iommu, address)

    _closed_state = "freed"

    def _name(self) -> str:
        return f"DMA buffer at IOVA {self.iova:#x}"

    @property
    def mem(self) -> memoryview:
        """A writable memoryview of the buffer (released by close())."""
        self._check_open()
        if self._mem is None:
            self._mem = _view(self.address, self.size, self)
        return self._mem

    def _close(self) -> None:
        """Unmaps and frees the buffer."""
        address = self._forget()
        if not self._iommu.closed:
            self._free(self._iommu._h, address)

    def _forget(self) -> int:
        """Lets go of the buffer without freeing it (a live handover gave it away): its address."""
        self._closed = True
        if self._mem is not None:
            self._mem.release()
            self._mem = None
        address, self.address = self.address, 0
        self._iommu._buffers.discard(self)
        return address

    def __repr__(self) -> str:
        state = "freed" if self._closed else f"iova {self.iova:#x}"
        return f"<vfiokit.{type(self).__name__} {self.size:#x} ({human_size(self.size)}), {state}>"


class FileMapping(DmaBuffer):
    """`size` bytes of the file `fd` from `offset` (whole pages), mapped shared into this
    process and for DMA (docs/dma.md, "Files"): `.iova`, `.mem`, `.address`; unmapped by close().
    The file stays the caller's. On iommufd the kernel maps the file's pages (Linux 6.13+;
    older kernels raise EOPNOTSUPP). `flags`: DMA_READONLY (then `.mem` is read-only)."""

    def __init__(self, iommu: Iommu, fd: int, offset: int, size: int, flags: int = 0):
        self._file = (fd, offset)
        self._readonly = bool(flags & DMA_READONLY)
        super().__init__(iommu, size, flags)

    def _allocate(self, iommu: Iommu, size: int, flags: int, address: c_void_p, iova: c_uint64) -> None:  # type: ignore[override]
        fd, offset = self._file
        _lib.vfiokit_dma_map_file(iommu._handle(), fd, offset, size, flags, byref(address), byref(iova))

    def _name(self) -> str:
        return f"file mapping at IOVA {self.iova:#x}"

    @property
    def mem(self) -> memoryview:
        """A memoryview of the mapping (read-only with DMA_READONLY; released by close())."""
        view = super().mem
        return view.toreadonly() if self._readonly else view


class HeapObject(DmaBuffer):
    """A zeroed object of `size` bytes (1 byte to 2 MiB) aligned to `align`, from the context's
    DMA heap (docs/dma.md, "The DMA heap"): `.iova`, `.mem` (a memoryview), `.address`; freed
    by close(). For the small DMA objects a driver needs many of."""

    def __init__(self, iommu: Iommu, size: int, align: int = 1):
        super().__init__(iommu, size, align)

    @staticmethod
    def _allocate(iommu: Iommu, size: int, align: int, address: c_void_p, iova: c_uint64) -> None:
        _lib.vfiokit_dma_heap_alloc(iommu._handle(), size, align, byref(address), byref(iova))

    @staticmethod
    def _free(iommu: Any, address: int) -> None:
        _lib.vfiokit_dma_heap_free(iommu, address)

    def _name(self) -> str:
        return f"DMA heap object at IOVA {self.iova:#x}"


def _copied_records(func: Any, subject: Any, record: Any) -> list:
    """The records of a call that returns a variable number of them (`func(subject, out, cap,
    &n)`): asked for their number, then for them."""
    n = c_size_t()
    func(subject, None, 0, byref(n))
    out = (record * n.value)()
    func(subject, out, n.value, byref(n))
    return out[: n.value]


def _fileno(sock: Union[int, Any]) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


class Iommu(_Closing):
    """A DMA context: `IOMMU_AUTO` (iommufd where the kernel has it, else type1, unless
    VFIOKIT_IOMMU says), `_TYPE1`, `_IOMMUFD`, the other `IOMMU_*` kinds, or `_NOIOMMU` (no
    IOMMU: IOVAs are physical addresses, docs/backends.md "No-IOMMU mode"). Devices opened in it keep it
    alive in the library; close() drops ours."""

    def __init__(self, kind: int = IOMMU_AUTO):
        handle = c_void_p()
        _lib.vfiokit_iommu_open(kind, byref(handle))
        self._h: int = handle.value
        self._closed = False
        self._owner: Optional[Device] = None  # set for a device's borrowed context
        self._buffers: weakref.WeakSet[DmaBuffer] = weakref.WeakSet()
        self._maps: dict[int, tuple[int, object]] = {}  # iova -> (length, what keeps the memory)

    @classmethod
    def _wrap(cls, handle: int, owner: Optional[Device]) -> Iommu:
        """A context from a handle: `owner`'s borrowed one, or (None) one of ours to close."""
        self = cls.__new__(cls)
        self._h, self._owner, self._closed = handle, owner, False
        self._buffers, self._maps = weakref.WeakSet(), {}
        return self

    def _name(self) -> str:
        return "DMA context"

    def _handle(self) -> int:
        self._check_open()
        return self._h

    @property
    def kind(self) -> int:
        """IOMMU_TYPE1 or IOMMU_IOMMUFD (never AUTO)."""
        return _lib.vfiokit_iommu_kind(self._handle())

    def fileno(self) -> int:
        """The context's fd (type1 container or /dev/iommu; borrowed: do not close it)."""
        return _lib.vfiokit_iommu_fd(self._handle())

    def export(self, devices: list[str], sock: Union[int, Any]) -> None:
        """Hands this context, and access to `devices` (bound to vfio-pci), to the process at
        the other end of the UNIX socket `sock` (an fd or a socket object), which rebuilds it
        with Iommu.adopt: a privileged helper opens, an unprivileged driver runs. Only before
        any DMA mapping; then close this handle."""
        names = (c_char_p * len(devices))(*(os.fsencode(d) for d in devices))
        _lib.vfiokit_iommu_export(self._handle(), names, len(devices), _fileno(sock))

    @classmethod
    def adopt(cls, sock: Union[int, Any]) -> Iommu:
        """The context another process handed over with export() on the UNIX socket `sock`;
        open its devices with Device(name, iommu)."""
        handle = c_void_p()
        _lib.vfiokit_iommu_adopt(_fileno(sock), byref(handle))
        return cls._wrap(handle.value, None)

    def hand_over(self, devices: list[Device], sock: Union[int, Any]) -> None:
        """Hands this context and `devices` (every device open in it) to the process at the
        other end of the UNIX socket `sock`, which takes them with Iommu.take_over, while the
        devices keep running: their open fds, IRQ eventfds and the DMA buffers allocated with
        DMA_SHAREABLE, at the same IOVAs (docs/handoff.md, "Live handover"). Waits for the
        receiver's answer; on failure (OSError) everything is still ours. Afterwards this
        object's buffers are closed without being freed (the memory is the receiver's): close
        the devices and the context, which leaves the devices running."""
        handles = (c_void_p * len(devices))(*(d._handle() for d in devices))
        _lib.vfiokit_iommu_hand_over(self._handle(), handles, len(devices), _fileno(sock))
        for buffer in list(self._buffers):
            buffer._forget()

    @classmethod
    def take_over(cls, sock: Union[int, Any], max_devices: int = 64) -> tuple[Iommu, list[Device]]:
        """The context and devices another process handed over with hand_over() on the UNIX
        socket `sock`: the devices in the order it listed them, their buffers at the same IOVAs
        (to_vaddr gives their new addresses). OSError on failure, when the sender keeps all."""
        handle, n = c_void_p(), c_size_t()
        devices = (c_void_p * max_devices)()
        _lib.vfiokit_iommu_take_over(_fileno(sock), byref(handle), devices, max_devices, byref(n))
        iommu = cls._wrap(handle.value, None)
        return iommu, [Device._wrap(devices[i], f"handed-over device {i}", iommu) for i in range(n.value)]

    def iova_ranges(self) -> list[IovaRange]:
        """The valid IOVA ranges (a type1 context has them once a device is in it)."""
        out = _copied_records(_lib.vfiokit_iommu_iova_ranges, self._handle(), _capi.vfiokit_iova_range)
        return [IovaRange(r.start, r.last) for r in out]

    @staticmethod
    def _memory(buffer: Union[int, Buffer], length: Optional[int]) -> tuple[int, int, object]:
        if isinstance(buffer, int):
            if length is None:
                raise TypeError("mapping an address needs a length")
            return buffer, length, None
        length = memoryview(buffer).nbytes if length is None else length
        try:  # also pins the buffer: a bytearray cannot be resized while mapped
            array = (c_char * length).from_buffer(buffer)
        except TypeError as e:
            raise TypeError(f"DMA needs a writable buffer: {e}") from None
        return ctypes.addressof(array), length, array

    def map(self, buffer: Union[int, Buffer], length: Optional[int], iova: int, flags: int = 0) -> int:
        """Maps a buffer (kept alive while mapped) or a raw address for DMA at `iova`.
        Memory, length and iova must be page-aligned (mmap.mmap(-1, n) gives such memory).
        `flags`: DMA_READONLY for memory the device may only read."""
        address, length, keep = self._memory(buffer, length)
        _lib.vfiokit_dma_map_flags(self._handle(), address, length, iova, flags)
        self._maps[iova] = (length, keep)
        return iova

    def map_any(self, buffer: Union[int, Buffer], length: Optional[int] = None, flags: int = 0) -> int:
        """Maps at an IOVA the library picks inside the valid ranges; returns it."""
        address, length, keep = self._memory(buffer, length)
        iova = c_uint64()
        _lib.vfiokit_dma_map_any_flags(self._handle(), address, length, flags, byref(iova))
        self._maps[iova.value] = (length, keep)
        return iova.value

    def unmap(self, iova: int, length: Optional[int] = None) -> int:
        """Removes every mapping lying wholly in [iova, iova+length) (length: that of the
        mapping made at `iova` here, unless given); returns the bytes unmapped."""
        if length is None:
            if iova not in self._maps:
                raise ValueError(f"nothing mapped at {iova:#x} through this object: give the length")
            length = self._maps[iova][0]
        unmapped = c_uint64()
        _lib.vfiokit_dma_unmap_range(self._handle(), iova, length, byref(unmapped))
        for at in [at for at in self._maps if iova <= at < iova + length]:
            del self._maps[at]
        return unmapped.value

    def unmap_all(self) -> int:
        """Removes every mapping made by map/map_any (DMA buffers stay); returns the bytes."""
        unmapped = c_uint64()
        _lib.vfiokit_dma_unmap_all(self._handle(), byref(unmapped))
        self._maps.clear()
        return unmapped.value

    def alloc(self, size: int, flags: int = 0) -> DmaBuffer:
        """Allocates zeroed memory mapped for DMA: `.iova`, `.mem`; free it with close().
        `flags`: DMA_READONLY, DMA_HUGE_2M or DMA_HUGE_1G."""
        return DmaBuffer(self, size, flags)

    def map_file(self, fd: int, offset: int, size: int, flags: int = 0) -> FileMapping:
        """Maps `size` bytes of the file `fd` from `offset` for DMA: `.iova`, `.mem`; unmap it
        with close(). `flags`: DMA_READONLY."""
        return FileMapping(self, fd, offset, size, flags)

    def heap_alloc(self, size: int, align: int = 1) -> HeapObject:
        """A zeroed object from the context's DMA heap: `.iova`, `.mem`; free it with close()."""
        return HeapObject(self, size, align)

    def heap_info(self) -> Any:
        """What the DMA heap holds: a vfiokit_dma_heap_info record (arena_size, arenas,
        huge_arenas, used)."""
        info = _capi.vfiokit_dma_heap_info()
        _lib.vfiokit_dma_heap_get_info(self._handle(), byref(info))
        return info

    def to_vaddr(self, iova: int, length: int = 1) -> int:
        """The address behind `[iova, iova+length)`, which must lie wholly inside one DMA mapping
        of this context (as a completion entry gives an IOVA back). FileNotFoundError (ENOENT)
        otherwise."""
        address = c_void_p()
        _lib.vfiokit_dma_to_vaddr(self._handle(), iova, length, byref(address))
        return address.value or 0

    def translate(self, obj: Union[int, Buffer], length: int = 1) -> int:
        """The IOVA of an address, or of a buffer (a memoryview slice of a DmaBuffer's .mem, a
        mapped bytearray...), which must lie wholly inside one DMA mapping of this context.
        FileNotFoundError (ENOENT) otherwise."""
        if not isinstance(obj, int):
            view = memoryview(obj).cast("B")
            length = view.nbytes
            try:
                obj = ctypes.addressof((c_char * length).from_buffer(view))
            except (TypeError, ValueError) as e:
                raise TypeError(f"translate needs an address or a writable, non-empty buffer: {e}") from None
        iova = c_uint64()
        _lib.vfiokit_dma_translate(self._handle(), obj, length, byref(iova))
        return iova.value

    def set_dma_guard(self, on: bool = True) -> None:
        """Guard mode for later allocations: an unmapped IOVA page after each allocated range
        (a device overrunning a buffer is stopped by the IOMMU) and freed buffers poisoned.
        VFIOKIT_DMA_GUARD=1 in the environment turns it on for every context."""
        _lib.vfiokit_iommu_set_dma_guard(self._handle(), int(on))

    def close(self) -> None:
        """Frees this object's DMA buffers and drops the context (the library keeps it while
        devices use it). A device's borrowed context is closed with the device. Idempotent."""
        if not self._closed:
            for buffer in list(self._buffers):  # while the context is open, to free them
                buffer.close()
        super().close()

    def _close(self) -> None:
        if self._owner is None:
            _lib.vfiokit_iommu_close(self._h)
        self._maps.clear()

    def __repr__(self) -> str:
        if self._closed:
            return "<vfiokit.Iommu (closed)>"
        return f"<vfiokit.Iommu {IOMMU_NAMES.get(self.kind, self.kind)}>"


class Device(_Closing):
    """An open VFIO device; see open()."""

    def __init__(self, name: str, iommu: Optional[Iommu] = None, vf_token: Optional[str] = None):
        handle = c_void_p()
        context = iommu._handle() if iommu else None
        if vf_token is None:
            _lib.vfiokit_device_open(os.fsencode(name), context, byref(handle))
        else:
            _lib.vfiokit_device_open_vf(os.fsencode(name), str(vf_token).encode(), context, byref(handle))
        self._setup(handle.value, name, iommu)

    @classmethod
    def _wrap(cls, handle: int, name: str, iommu: Iommu) -> Device:
        """A device from a handle of ours (a take-over's), in `iommu`."""
        self = cls.__new__(cls)
        self._setup(handle, name, iommu)
        return self

    def _setup(self, handle: int, name: str, iommu: Optional[Iommu]) -> None:
        self._h: int = handle
        self._closed = False
        self.name = name
        self._iommu = iommu  # the caller's context object, kept alive with us
        self._regions: dict[int, Region] = {}
        self._irqs: list[weakref.ref[Irq]] = []
        #: The records, copied at open: region i, the mmap areas, irq i.
        self.regions: list[RegionInfo] = _records(_lib.vfiokit_device_regions, self._h, RegionInfo)
        self.areas: list[AreaInfo] = _records(_lib.vfiokit_device_areas, self._h, AreaInfo)
        self.irqs: list[IrqInfo] = _records(_lib.vfiokit_device_irqs, self._h, IrqInfo)
        #: VFIO's device flags (DEVICE_RESET, DEVICE_PCI) and counts, and the PCI identity.
        self.info = _capi.vfiokit_device_info()
        _lib.vfiokit_device_get_info(self._h, byref(self.info))

    def _name(self) -> str:
        return f"device {self.name}"

    def _handle(self) -> int:
        self._check_open()
        return self._h

    def region(self, index: int) -> Region:
        """Region `index` for the accessors (no mapping made)."""
        self._handle()
        if index not in self._regions:
            self._regions[index] = Region(self, index)
        return self._regions[index]

    def map(self, index: int) -> Region:
        """Maps region `index` (one contiguous mapping) and returns it, with `.mem`.
        OSError (ENOTSUP) for regions that cannot be mmapped: use region(index) then."""
        region = self.region(index)
        if region.address is None:
            info = _capi.vfiokit_map_info()
            _lib.vfiokit_region_map_info(self._handle(), index, byref(info))
            region._mapped(info)
        return region

    @property
    def config(self) -> Region:
        """PCI config space (region 7): accessors only."""
        return self.region(PCI_CONFIG)

    def find_capability(self, cap_id: int) -> Optional[int]:
        """Config-space offset of a capability (id < 0x100, or id + PCI_CAP_EXTENDED), or None."""
        offset = c_uint32()
        try:
            _lib.vfiokit_pci_find_capability(self._handle(), cap_id, byref(offset))
        except FileNotFoundError:
            return None
        return offset.value

    def irq(self, kind: int, first: int = 0, count: int = 1, eventfds: Optional[list[int]] = None) -> Irq:
        """Enables vectors first..first+count-1 of IRQ index `kind` (IRQ_INTX, IRQ_MSI, ...);
        with `eventfds`, one per vector, they signal the caller's own eventfds."""
        irq = Irq(self, kind, first, count, eventfds)
        self._irqs.append(weakref.ref(irq))
        return irq

    @property
    def gone(self) -> bool:
        """True once the device is gone: a mapped BAR faulted with SIGBUS (vfio-pci zapped it:
        removal, reset, memory decode disabled) and vfiokit's SIGBUS guard replaced its mappings
        with memory that reads all-ones, or after retire(). Its calls then raise OSError(ENODEV)."""
        return _lib.vfiokit_device_gone(self._handle()) == 1

    def retire(self) -> None:
        """Gives the device up after REQ while other threads may still read its mappings: they
        become all-ones memory, IRQ waits end (ECANCELED), later calls raise OSError(ENODEV).
        Close it once those threads have stopped."""
        _lib.vfiokit_device_retire(self._handle())

    def reset(self) -> None:
        """Resets the device (OSError ENOTSUP if the kernel has no reset for it)."""
        _lib.vfiokit_device_reset(self._handle())

    def set_vf_token(self, vf_token: str) -> None:
        """Sets this SR-IOV PF's VF token (a UUID string, or a uuid.UUID): its VFs then open
        only with it (open(vf, vf_token=...)). ENOTSUP for a device that is not a PF."""
        _lib.vfiokit_device_set_vf_token(self._handle(), str(vf_token).encode())

    def hot_reset_info(self) -> list[HotResetDep]:
        """The devices a hot (bus or slot) reset of this one resets too, itself included
        (OSError ENOTSUP where the kernel has no bus or slot reset for it)."""
        out = _copied_records(_lib.vfiokit_device_hot_reset_info, self._handle(), _capi.vfiokit_hot_reset_dep)
        return [HotResetDep(d.address.decode(), d.group, d.devid, bool(d.owned)) for d in out]

    def hot_reset(self) -> None:
        """Resets this device and every one hot_reset_info() lists, which must all be open in
        its context (PermissionError naming those that are not)."""
        _lib.vfiokit_device_hot_reset(self._handle())

    def fileno(self) -> int:
        """The VFIO device fd, for ioctls vfiokit does not wrap (borrowed: do not close it)."""
        return _lib.vfiokit_device_fd(self._handle())

    def feature(self, feature: int, flags: int, data: Optional[bytearray] = None) -> int:
        """VFIO_DEVICE_FEATURE: the kernel's feature index with FEATURE_GET, FEATURE_SET
        and/or FEATURE_PROBE; `data` (a bytearray) is the payload, filled in by GET."""
        if data is None:
            return _lib.vfiokit_device_feature(self._handle(), feature, flags, None, 0)
        buf = (c_char * len(data)).from_buffer(data)
        return _lib.vfiokit_device_feature(self._handle(), feature, flags, buf, len(data))

    @property
    def iommu(self) -> Iommu:
        """The device's DMA context: the one given to open(), or the process-wide shared one
        (borrowed: its DMA buffers are freed when the device closes)."""
        if self._iommu is None:
            self._iommu = Iommu._wrap(_lib.vfiokit_device_iommu(self._handle()), self)
        return self._iommu

    def close(self) -> None:
        """Closes the device: its mappings, IRQs and eventfds go away. Idempotent."""
        if not self._closed and self._iommu is not None and self._iommu._owner is self:
            self._iommu.close()  # while the device is open, to free its buffers
        super().close()

    def _close(self) -> None:
        for ref in self._irqs:
            irq = ref()
            if irq is not None:
                irq._closed = True  # the library disables them with the device
        for region in self._regions.values():
            region._release()
        _lib.vfiokit_device_close(self._h)

    def __repr__(self) -> str:
        return f"<vfiokit.Device {self.name}{' (closed)' if self._closed else ''}>"


def open(name: str, iommu: Optional[Iommu] = None, vf_token: Optional[str] = None) -> Device:  # noqa: A001
    """Opens a device by PCI address ("0000:00:03.0", "00:03.0"), sysfs path or VFIO cdev path,
    in `iommu` (None: the process-wide shared context). A context manager. `vf_token`: an
    SR-IOV VF's token (a UUID string), which its PF's user set with Device.set_vf_token."""
    return Device(name, iommu, vf_token)


def sriov_set_numvfs(pf: str, num_vfs: int) -> list[str]:
    """Enables `num_vfs` VFs of the SR-IOV PF `pf` (0 disables them; root; vfio-pci needs
    enable_sriov=1) and returns their addresses in VF order."""
    n = c_size_t()
    _lib.vfiokit_pci_sriov_set_numvfs(pf.encode(), num_vfs, None, 0, byref(n))
    out = (_capi.vfiokit_vf * n.value)()
    _lib.vfiokit_pci_sriov_set_numvfs(pf.encode(), num_vfs, out, n.value, byref(n))
    return [vf.address.decode() for vf in out[: n.value]]


class HotResetDep(NamedTuple):
    """A device a hot reset resets: its address, IOMMU group, iommufd device id (0 if none)
    and whether it is open in the resetting device's context."""
    address: str
    group: int
    devid: int
    owned: bool


class Finding(NamedTuple):
    """One set-up problem doctor() found: FINDING_* code, SEVERITY_* severity, its subject (an
    address, a path, "RLIMIT_MEMLOCK") and a message that says how to fix it."""
    code: int
    severity: int
    subject: str
    message: str


SEVERITY_NAMES = {SEVERITY_INFO: "info", SEVERITY_WARNING: "warning", SEVERITY_BLOCKER: "blocker"}


def doctor(name: Optional[str] = None) -> list[Finding]:
    """The set-up problems found for this machine and, if given, device `name`, most severe
    first; none of SEVERITY_BLOCKER means nothing found stops an open. Changes nothing."""
    key = os.fsencode(name) if name is not None else None
    out = _copied_records(_lib.vfiokit_doctor, key, _capi.vfiokit_finding)
    return [Finding(f.code, f.severity, f.subject.decode(), f.message.decode()) for f in out]


def bind(address: str) -> None:
    """Binds a PCI device to vfio-pci through driver_override (root)."""
    _lib.vfiokit_pci_bind(address.encode())


def unbind(address: str) -> None:
    """Unbinds a PCI device from vfio-pci and lets its native driver probe it (root)."""
    _lib.vfiokit_pci_unbind(address.encode())


__all__ = [
    "open", "bind", "unbind", "doctor", "sriov_set_numvfs", "Finding", "HotResetDep", "Device", "Region", "Irq", "Iommu", "DmaBuffer", "FileMapping", "HeapObject", "RegionInfo",
    "AreaInfo", "IrqInfo", "IovaRange", "human_size", "LIBRARY_VERSION", "ABI_VERSION",
] + [n for n in dir(_capi) if n.isupper() and n.split("_")[0] in ("IOMMU", "IRQ", "PCI", "REGION", "SEVERITY", "FINDING")]
