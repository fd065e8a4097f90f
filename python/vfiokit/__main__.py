"""python -m vfiokit: lspci/setpci for VFIO devices.

    list                                    devices bound to vfio-pci (from sysfs), SR-IOV PFs and VFs
    info ADDR                               the region, area and IRQ records
    peek ADDR REGION OFFSET [WIDTH]         one read (WIDTH in bits: 8, 16, 32, 64; default 32)
    poke ADDR REGION OFFSET VALUE [WIDTH]   one write
    bind ADDR / unbind ADDR                 to/from vfio-pci (root)
    doctor [ADDR]                           set-up problems and their fixes (exit 0: none blocks)

REGION is a number or a name (bar0..bar5, rom, config, vga); numbers are hex (0x...) or decimal.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

SYSFS = "/sys/bus/pci/devices"


def number(text: str) -> int:
    """Hex with 0x, else decimal (what the CLI's users type)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def region_index(text: str) -> int:
    from vfiokit import REGION_NAMES
    names = [n.lower() for n in REGION_NAMES]
    return names.index(text.lower()) if text.lower() in names else number(text)


def width(text: str) -> int:
    bits = number(text)
    if bits not in (8, 16, 32, 64):
        raise argparse.ArgumentTypeError(f"width is 8, 16, 32 or 64 bits, not {text}")
    return bits


def _sysfs(address: str, attr: str) -> Optional[str]:
    try:
        return open(os.path.join(SYSFS, address, attr)).read().strip()
    except OSError:
        return None


def _link(address: str, attr: str) -> Optional[str]:
    path = os.path.join(SYSFS, address, attr)
    return os.path.basename(os.readlink(path)) if os.path.islink(path) else None


def _vfs(pf: str) -> list[str]:
    """The addresses of a PF's enabled VFs, in VF order (its virtfnN links)."""
    links = [n for n in os.listdir(os.path.join(SYSFS, pf)) if n.startswith("virtfn")]
    return [_link(pf, n) or "?" for n in sorted(links, key=lambda n: int(n[len("virtfn"):]))]


def _sriov_relation(address: str) -> str:
    """"  VF 1 of PF ADDR" for a VF, "  PF: 2/7 VFs (ADDR, ADDR)" for a PF, else ""."""
    pf = _link(address, "physfn")
    if pf:
        return f"  VF {_vfs(pf).index(address)} of PF {pf}"
    total = _sysfs(address, "sriov_totalvfs")
    if not total:
        return ""
    vfs = _vfs(address)
    return f"  PF: {len(vfs)}/{total} VFs" + (f" ({', '.join(vfs)})" if vfs else "")


def cmd_list(args: argparse.Namespace) -> int:
    found = sorted(a for a in os.listdir(SYSFS) if _link(a, "driver") == "vfio-pci")
    for a in found:
        ids = f"{(_sysfs(a, 'vendor') or '?')[2:]}:{(_sysfs(a, 'device') or '?')[2:]}"
        group = _link(a, "iommu_group") or "-"
        cdevs = os.listdir(os.path.join(SYSFS, a, "vfio-dev")) if os.path.isdir(os.path.join(SYSFS, a, "vfio-dev")) else []
        cdev = f"  /dev/vfio/devices/{cdevs[0]}" if cdevs else ""
        print(f"{a}  {ids}  class {(_sysfs(a, 'class') or '?')[2:]}  group {group:>3}  /dev/vfio/{group}{cdev}"
              f"{_sriov_relation(a)}")
    if not found:
        print("no devices bound to vfio-pci", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import vfiokit
    with vfiokit.open(args.address) as dev:
        print(f"{dev.name}: {vfiokit.IOMMU_NAMES[dev.iommu.kind]} DMA context, "
              f"libvfiokit {vfiokit.LIBRARY_VERSION}")
        print(f"{'region':<12} {'size':>12} {'':>8}  {'fd offset':>12}  flags")
        for r in dev.regions:
            if r.flags:
                print(f"{r.index:>2} {r.name:<9} {r.size:>#12x} {vfiokit.human_size(r.size):>8}  "
                      f"{r.offset:>#12x}  {r.flag_names}"
                      + (f"  type {r.type}:{r.subtype}" if r.type or r.subtype else ""))
        for a in dev.areas:
            print(f"area: region {a.region} offset {a.offset:#x} size {a.size:#x} ({vfiokit.human_size(a.size)})")
        print(f"{'irq':<12} {'vectors':>8}  flags")
        for i in dev.irqs:
            if i.count:
                print(f"{i.index:>2} {i.name:<9} {i.count:>8}  {i.flag_names}")
    return 0


def cmd_peek(args: argparse.Namespace) -> int:
    import vfiokit
    with vfiokit.open(args.address) as dev:
        value = getattr(dev.region(args.region), f"read{args.width}")(args.offset)
    print(f"{value:#0{args.width // 4 + 2}x}")
    return 0


def cmd_poke(args: argparse.Namespace) -> int:
    import vfiokit
    with vfiokit.open(args.address) as dev:
        getattr(dev.region(args.region), f"write{args.width}")(args.offset, args.value)
    return 0


def cmd_bind(args: argparse.Namespace) -> int:
    import vfiokit
    (vfiokit.bind if args.command == "bind" else vfiokit.unbind)(args.address)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import vfiokit
    findings = vfiokit.doctor(args.address)
    for f in findings:
        print(f"{vfiokit.SEVERITY_NAMES[f.severity]:8} {f.subject}: {f.message}")
    if not findings:
        print("no problem found")
    return 2 if any(f.severity == vfiokit.SEVERITY_BLOCKER for f in findings) else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vfiokit", description="VFIO devices through libvfiokit.",
                                epilog="REGION: a number or bar0..bar5, rom, config, vga. "
                                       "Numbers: hex (0x...) or decimal. WIDTH: bits (default 32).")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="devices bound to vfio-pci").set_defaults(run=cmd_list)
    sub.add_parser("info", help="records of a device").set_defaults(run=cmd_info)
    sub.add_parser("peek", help="read a register").set_defaults(run=cmd_peek)
    sub.add_parser("poke", help="write a register").set_defaults(run=cmd_poke)
    sub.add_parser("bind", help="bind to vfio-pci (root)").set_defaults(run=cmd_bind)
    sub.add_parser("unbind", help="unbind from vfio-pci (root)").set_defaults(run=cmd_bind)
    doctor = sub.add_parser("doctor", help="set-up problems and how to fix them (exit 2 if one blocks)")
    doctor.set_defaults(run=cmd_doctor)
    doctor.add_argument("address", nargs="?", help="a device to check too")
    for name, s in sub.choices.items():
        if name not in ("list", "doctor"):
            s.add_argument("address", help="PCI address, sysfs path or VFIO cdev path")
        if name in ("peek", "poke"):
            s.add_argument("region", type=region_index)
            s.add_argument("offset", type=number)
        if name == "poke":
            s.add_argument("value", type=number)
        if name in ("peek", "poke"):
            s.add_argument("width", type=width, nargs="?", default=32)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError, ImportError) as e:
        # One line, no traceback: the library's message says what and why.
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError) and e.filename:
            msg = f"{e.filename}: {msg}"
        print(f"vfiokit: {msg.removeprefix('vfiokit: ')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
