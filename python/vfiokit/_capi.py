"""The C bindings: one table of signatures, applied when libvfiokit is loaded.

Everything here is a direct image of include/vfiokit.h. Functions returning a negative errno
raise an OSError subclass (``OSError(errno, message)`` picks FileNotFoundError,
PermissionError, TimeoutError, ...) carrying the library's own message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p
from typing import Any, Callable, Optional

#: The ABI this package was written against (VFIOKIT_ABI_VERSION of the header).
ABI_VERSION = 1
SONAME = "libvfiokit.so.0"

# Constants, as in the header.
IOMMU_AUTO, IOMMU_TYPE1, IOMMU_IOMMUFD, IOMMU_VFIO_USER = 0, 1, 2, 3
IOMMU_TYPE1V1, IOMMU_IOMMUFD_COMPAT, IOMMU_IOMMUFD_COMPAT_V1, IOMMU_NOIOMMU = 4, 5, 6, 7
DMA_READONLY, DMA_HUGE_2M, DMA_HUGE_1G, DMA_SHAREABLE = 1, 2, 4, 8
IRQ_INTX, IRQ_MSI, IRQ_MSIX, IRQ_ERR, IRQ_REQ = 0, 1, 2, 3, 4
IRQ_EVENTFD, IRQ_MASKABLE, IRQ_AUTOMASKED, IRQ_NORESIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
PCI_BAR0, PCI_BAR1, PCI_BAR2, PCI_BAR3, PCI_BAR4, PCI_BAR5 = 0, 1, 2, 3, 4, 5
PCI_ROM, PCI_CONFIG, PCI_VGA = 6, 7, 8
PCI_CAP_EXTENDED = 0x10000
REGION_PRESENT, REGION_READ, REGION_WRITE, REGION_MMAP = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REGION_SPARSE, REGION_MSIX_MAPPABLE, REGION_IO_PORT = 1 << 4, 1 << 5, 1 << 6
REGION_MEM64, REGION_PREFETCH = 1 << 7, 1 << 8
DEVICE_RESET, DEVICE_PCI = 1 << 0, 1 << 1
FEATURE_GET, FEATURE_SET, FEATURE_PROBE = 1 << 16, 1 << 17, 1 << 18
SEVERITY_INFO, SEVERITY_WARNING, SEVERITY_BLOCKER = 0, 1, 2
FINDING_IOMMU_OFF, FINDING_VFIO_PCI_MISSING, FINDING_NO_DEVICE, FINDING_NOT_BOUND = 1, 2, 3, 4
FINDING_GROUP_NOT_VIABLE, FINDING_NODE_PERMISSION, FINDING_MEMLOCK_LOW = 5, 6, 7
FINDING_NO_IOMMUFD, FINDING_NO_HUGEPAGES, FINDING_NO_RESET, FINDING_NOIOMMU_MODE = 8, 9, 10, 11
FINDING_SRIOV_OFF, FINDING_VF_TOKEN = 12, 13


class vfiokit_region(ctypes.Structure):
    _fields_ = [
        ("index", c_uint32), ("flags", c_uint32), ("size", c_uint64), ("offset", c_uint64),
        ("type", c_uint32), ("subtype", c_uint32), ("first_area", c_uint32),
        ("num_areas", c_uint32), ("reserved", c_uint64 * 3),
    ]


class vfiokit_area(ctypes.Structure):
    _fields_ = [
        ("region", c_uint32), ("reserved0", c_uint32), ("offset", c_uint64), ("size", c_uint64),
        ("reserved1", c_uint64),
    ]


class vfiokit_irq(ctypes.Structure):
    _fields_ = [
        ("index", c_uint32), ("flags", c_uint32), ("count", c_uint32), ("reserved0", c_uint32),
        ("reserved", c_uint64 * 2),
    ]


class vfiokit_device_info(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32), ("num_regions", c_uint32), ("num_irqs", c_uint32),
        ("class_code", c_uint32), ("vendor_id", c_uint16), ("device_id", c_uint16),
        ("subsystem_vendor_id", c_uint16), ("subsystem_id", c_uint16), ("revision", c_uint8),
        ("reserved0", c_uint8 * 7), ("reserved", c_uint64 * 4),
    ]


class vfiokit_map_info(ctypes.Structure):
    _fields_ = [
        ("addr", c_void_p), ("len", c_uint64), ("direct", c_uint64), ("access", c_uint32),
        ("reserved0", c_uint32), ("reserved", c_uint64 * 2),
    ]


class vfiokit_finding(ctypes.Structure):
    _fields_ = [
        ("code", c_uint32), ("severity", c_uint32), ("subject", ctypes.c_char * 64),
        ("message", ctypes.c_char * 424), ("reserved", c_uint64 * 2),
    ]


class vfiokit_vf(ctypes.Structure):
    _fields_ = [
        ("address", ctypes.c_char * 16), ("index", c_uint32), ("reserved0", c_uint32),
        ("reserved", c_uint64 * 1),
    ]


class vfiokit_hot_reset_dep(ctypes.Structure):
    _fields_ = [
        ("address", ctypes.c_char * 16), ("group", c_uint32), ("devid", c_uint32),
        ("owned", c_uint32), ("reserved0", c_uint32), ("reserved", c_uint64 * 2),
    ]


class vfiokit_iova_range(ctypes.Structure):
    _fields_ = [("start", c_uint64), ("last", c_uint64)]


class vfiokit_dma_heap_info(ctypes.Structure):
    _fields_ = [
        ("arena_size", c_uint64), ("arenas", c_uint32), ("huge_arenas", c_uint32),
        ("used", c_uint64), ("reserved", c_uint64 * 3),
    ]


#: Record sizes are part of the ABI (the header's comments and its C test say so).
RECORD_SIZES = {vfiokit_region: 64, vfiokit_area: 32, vfiokit_irq: 32, vfiokit_iova_range: 16,
                vfiokit_device_info: 64, vfiokit_map_info: 48,
                vfiokit_finding: 512, vfiokit_hot_reset_dep: 48, vfiokit_vf: 32, vfiokit_dma_heap_info: 48}

_dev, _iommu = c_void_p, c_void_p  # opaque handles


def _last_error() -> str:
    return (lib.vfiokit_last_error() or b"").decode(errors="replace")


def _check_int(result: int, func: Any, args: tuple) -> int:
    if result < 0:
        raise OSError(-result, _last_error() or f"{func.__name__} failed")
    return result


def _check_ptr(result: Optional[int], func: Any, args: tuple) -> int:
    # Record arrays and borrowed handles come back NULL only on error; no errno is returned
    # for them, so EINVAL stands in (a closed handle, in practice).
    if not result:
        raise OSError(22, _last_error() or f"{func.__name__} returned NULL")
    return result


# name: (restype, argtypes, errcheck). The one place where the C signatures live.
SIGNATURES: Mapping[str, tuple[Any, list[Any], Optional[Callable[..., Any]]]] = {
    "vfiokit_abi_version": (c_uint32, [], None),
    "vfiokit_version": (c_char_p, [], None),
    "vfiokit_last_error": (c_char_p, [], None),
    "vfiokit_pci_bind": (c_int, [c_char_p], _check_int),
    "vfiokit_doctor": (c_int, [c_char_p, POINTER(vfiokit_finding), c_size_t, POINTER(c_size_t)], _check_int),
    "vfiokit_pci_unbind": (c_int, [c_char_p], _check_int),
    "vfiokit_device_open": (c_int, [c_char_p, _iommu, POINTER(_dev)], _check_int),
    "vfiokit_device_open_vf": (c_int, [c_char_p, c_char_p, _iommu, POINTER(_dev)], _check_int),
    "vfiokit_device_set_vf_token": (c_int, [_dev, c_char_p], _check_int),
    "vfiokit_pci_sriov_set_numvfs": (c_int, [c_char_p, c_uint32, POINTER(vfiokit_vf), c_size_t, POINTER(c_size_t)],
                                     _check_int),
    "vfiokit_device_close": (None, [_dev], None),
    "vfiokit_device_iommu": (_iommu, [_dev], _check_ptr),
    "vfiokit_device_reset": (c_int, [_dev], _check_int),
    "vfiokit_device_gone": (c_int, [_dev], _check_int),
    "vfiokit_device_retire": (c_int, [_dev], _check_int),
    "vfiokit_device_hot_reset_info": (c_int, [_dev, POINTER(vfiokit_hot_reset_dep), c_size_t, POINTER(c_size_t)], _check_int),
    "vfiokit_device_hot_reset": (c_int, [_dev], _check_int),
    "vfiokit_device_get_info": (c_int, [_dev, POINTER(vfiokit_device_info)], _check_int),
    "vfiokit_device_fd": (c_int, [_dev], _check_int),
    "vfiokit_device_feature": (c_int, [_dev, c_uint32, c_uint32, c_void_p, c_size_t], _check_int),
    "vfiokit_device_regions": (c_void_p, [_dev, POINTER(c_size_t)], _check_ptr),
    "vfiokit_device_areas": (c_void_p, [_dev, POINTER(c_size_t)], _check_ptr),
    "vfiokit_device_irqs": (c_void_p, [_dev, POINTER(c_size_t)], _check_ptr),
    "vfiokit_region_map": (c_int, [_dev, c_uint32, POINTER(c_void_p)], _check_int),
    "vfiokit_region_map_info": (c_int, [_dev, c_uint32, POINTER(vfiokit_map_info)], _check_int),
    "vfiokit_register": (c_int, [_dev, c_uint32, c_uint64, c_uint32, POINTER(c_void_p)], _check_int),
    "vfiokit_region_read": (c_int, [_dev, c_uint32, c_uint64, c_void_p, c_size_t], _check_int),
    "vfiokit_region_write": (c_int, [_dev, c_uint32, c_uint64, c_void_p, c_size_t], _check_int),
    **{
        f"vfiokit_{op}{bits}": (c_int, [_dev, c_uint32, c_uint64, POINTER(t) if op == "read" else t], _check_int)
        for bits, t in ((8, c_uint8), (16, c_uint16), (32, c_uint32), (64, c_uint64))
        for op in ("read", "write")
    },
    "vfiokit_pci_find_capability": (c_int, [_dev, c_uint32, POINTER(c_uint32)], _check_int),
    "vfiokit_irq_enable": (c_int, [_dev, c_uint32, c_uint32, c_uint32, POINTER(c_int)], _check_int),
    "vfiokit_irq_enable_fds": (c_int, [_dev, c_uint32, c_uint32, c_uint32, POINTER(c_int)], _check_int),
    "vfiokit_irq_disable": (c_int, [_dev, c_uint32], _check_int),
    "vfiokit_irq_mask": (c_int, [_dev, c_uint32, c_uint32], _check_int),
    "vfiokit_irq_unmask": (c_int, [_dev, c_uint32, c_uint32], _check_int),
    "vfiokit_irq_trigger": (c_int, [_dev, c_uint32, c_uint32], _check_int),
    "vfiokit_irq_wait": (c_int, [_dev, c_uint32, c_uint32, c_int, POINTER(c_uint64)], _check_int),
    "vfiokit_iommu_open": (c_int, [c_uint32, POINTER(_iommu)], _check_int),
    "vfiokit_iommu_close": (None, [_iommu], None),
    "vfiokit_iommu_kind": (c_uint32, [_iommu], None),
    "vfiokit_iommu_fd": (c_int, [_iommu], _check_int),
    "vfiokit_iommu_export": (c_int, [_iommu, POINTER(c_char_p), c_size_t, c_int], _check_int),
    "vfiokit_iommu_adopt": (c_int, [c_int, POINTER(_iommu)], _check_int),
    "vfiokit_iommu_hand_over": (c_int, [_iommu, POINTER(_dev), c_size_t, c_int], _check_int),
    "vfiokit_iommu_take_over": (c_int, [c_int, POINTER(_iommu), POINTER(_dev), c_size_t, POINTER(c_size_t)],
                                _check_int),
    "vfiokit_iommu_iova_ranges": (c_int, [_iommu, POINTER(vfiokit_iova_range), c_size_t, POINTER(c_size_t)], _check_int),
    "vfiokit_dma_map": (c_int, [_iommu, c_void_p, c_size_t, c_uint64], _check_int),
    "vfiokit_dma_map_any": (c_int, [_iommu, c_void_p, c_size_t, POINTER(c_uint64)], _check_int),
    "vfiokit_dma_unmap": (c_int, [_iommu, c_uint64, c_size_t], _check_int),
    "vfiokit_dma_unmap_range": (c_int, [_iommu, c_uint64, c_size_t, POINTER(c_uint64)], _check_int),
    "vfiokit_dma_unmap_all": (c_int, [_iommu, POINTER(c_uint64)], _check_int),
    "vfiokit_dma_alloc": (c_int, [_iommu, c_size_t, POINTER(c_void_p), POINTER(c_uint64)], _check_int),
    "vfiokit_dma_free": (c_int, [_iommu, c_void_p], _check_int),
    "vfiokit_dma_map_flags": (c_int, [_iommu, c_void_p, c_size_t, c_uint64, c_uint32], _check_int),
    "vfiokit_dma_map_any_flags": (c_int, [_iommu, c_void_p, c_size_t, c_uint32, POINTER(c_uint64)], _check_int),
    "vfiokit_dma_alloc_flags": (c_int, [_iommu, c_size_t, c_uint32, POINTER(c_void_p), POINTER(c_uint64)], _check_int),
    "vfiokit_dma_map_file": (c_int, [_iommu, c_int, c_uint64, c_size_t, c_uint32, POINTER(c_void_p), POINTER(c_uint64)], _check_int),
    "vfiokit_dma_translate": (c_int, [_iommu, c_void_p, c_size_t, POINTER(c_uint64)], _check_int),
    "vfiokit_dma_to_vaddr": (c_int, [_iommu, c_uint64, c_size_t, POINTER(c_void_p)], _check_int),
    "vfiokit_dma_heap_alloc": (c_int, [_iommu, c_size_t, c_size_t, POINTER(c_void_p), POINTER(c_uint64)], _check_int),
    "vfiokit_dma_heap_free": (c_int, [_iommu, c_void_p], _check_int),
    "vfiokit_dma_heap_get_info": (c_int, [_iommu, POINTER(vfiokit_dma_heap_info)], _check_int),
    "vfiokit_iommu_set_dma_guard": (c_int, [_iommu, c_int], _check_int),
}


def _candidates() -> list[str]:
    """Where to look, in order: $VFIOKIT_LIB, next to the package, the soname, find_library."""
    env = os.environ.get("VFIOKIT_LIB")
    if env:
        return [env]  # an explicit choice is not second-guessed by falling back
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.join(here, SONAME)] if os.path.exists(os.path.join(here, SONAME)) else []
    paths.append(SONAME)
    found = ctypes.util.find_library("vfiokit")
    if found and found != SONAME:
        paths.append(found)
    return paths


def check(library: ctypes.CDLL, path: str, abi: int = ABI_VERSION,
          sizes: Optional[Mapping[type, int]] = None) -> None:
    """Raises ImportError unless the library's ABI and the record layouts are what we expect."""
    got = library.vfiokit_abi_version()
    if got != abi:
        raise ImportError(
            f"vfiokit: {path} has C ABI version {got}, but this Python package expects "
            f"version {abi}; install matching versions (or point VFIOKIT_LIB at one)")
    for struct, size in (sizes or RECORD_SIZES).items():
        if ctypes.sizeof(struct) != size:
            raise ImportError(
                f"vfiokit: record {struct.__name__} is {ctypes.sizeof(struct)} bytes here but "
                f"{size} bytes in ABI version {abi}")


def load(path: Optional[str] = None, abi: int = ABI_VERSION,
         sizes: Optional[Mapping[type, int]] = None) -> ctypes.CDLL:
    """Loads libvfiokit (from `path`, or the usual places), declares every signature, checks it."""
    errors = []
    for candidate in [path] if path else _candidates():
        try:
            library = ctypes.CDLL(candidate)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        raise ImportError("vfiokit: cannot load libvfiokit (set VFIOKIT_LIB to its path, or "
                          "install it): " + "; ".join(errors))
    for name, (restype, argtypes, errcheck) in SIGNATURES.items():
        try:
            func = getattr(library, name)
        except AttributeError:
            raise ImportError(f"vfiokit: {candidate} lacks {name}: not a matching libvfiokit") from None
        func.restype, func.argtypes = restype, argtypes
        if errcheck:
            func.errcheck = errcheck
    check(library, candidate, abi, sizes)
    return library


lib = load()
