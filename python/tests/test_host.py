"""What needs no device: loading, the ABI and layout checks, the signature table against the
header, errors, formatting. Runs on the host (and anywhere libvfiokit loads)."""

import ctypes
import errno
import functools
import os
import re
import shutil
import subprocess
import sys

import pytest

import vfiokit
from vfiokit import _capi

from conftest import PYTHON_DIR, REPO, cli

HEADER = (REPO / "include" / "vfiokit.h").read_text()
# Comments mention calls too; the header's static inline helpers are not library symbols.
DECLARATIONS = re.sub(r"/\*.*?\*/|//[^\n]*|static inline [^{]*\{[^}]*\}", "", HEADER, flags=re.S)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "VFIOKIT_LIB"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=60)


def test_loaded_library_matches():
    assert vfiokit.ABI_VERSION == _capi.ABI_VERSION == int(re.search(r"#define VFIOKIT_ABI_VERSION (\d+)", HEADER)[1])
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", vfiokit.LIBRARY_VERSION)
    if os.environ.get("VFIOKIT_LIB"):
        assert vfiokit.LIBRARY_PATH == os.environ["VFIOKIT_LIB"]


def test_signature_table_covers_the_header():
    declared = set(re.findall(r"\b(vfiokit_\w+)\(", DECLARATIONS))
    assert declared == set(_capi.SIGNATURES)
    for name, (restype, argtypes, _) in _capi.SIGNATURES.items():
        func = getattr(_capi.lib, name)
        assert func.restype == restype and func.argtypes == argtypes, name
        # as many parameters as the C prototype (void: none)
        params = re.search(rf"\b{name}\(([^)]*)\)", DECLARATIONS)[1].strip()
        assert len(argtypes) == (0 if params == "void" else params.count(",") + 1), name


def test_constants_mirror_the_header():
    defines = dict(re.findall(r"#define VFIOKIT_(\w+) (.+)", HEADER))
    defines.pop("ABI_VERSION")
    assert defines, "no constants found in the header"
    for name, value in defines.items():
        assert getattr(vfiokit, name) == eval(value), name  # values are literals and shifts


def test_record_sizes():
    for struct, size in _capi.RECORD_SIZES.items():
        assert ctypes.sizeof(struct) == size, struct.__name__
    assert ctypes.sizeof(vfiokit.RegionInfo) == 64 and ctypes.sizeof(vfiokit.IrqInfo) == 32


def test_abi_mismatch_raises_import_error_naming_both_versions():
    with pytest.raises(ImportError, match=r"C ABI version 1, but this Python package expects version 99"):
        _capi.load(vfiokit.LIBRARY_PATH, abi=99)


def test_record_size_mismatch_raises_import_error():
    with pytest.raises(ImportError, match=r"vfiokit_region is 64 bytes here but 72 bytes"):
        _capi.load(vfiokit.LIBRARY_PATH, sizes={_capi.vfiokit_region: 72})


def test_abi_mismatch_at_import():
    # The check really runs at import: a package expecting another version refuses to load.
    r = run_python("import vfiokit._capi", VFIOKIT_LIB=vfiokit.LIBRARY_PATH, PYTHONPATH=str(_fake_package(99)))
    assert r.returncode != 0
    assert "ImportError: vfiokit:" in r.stderr and "version 1" in r.stderr and "version 99" in r.stderr


@functools.cache
def _fake_package(abi: int):
    import tempfile
    root = tempfile.mkdtemp()
    shutil.copytree(PYTHON_DIR / "vfiokit", os.path.join(root, "vfiokit"))
    path = os.path.join(root, "vfiokit", "_capi.py")
    text = open(path).read().replace("ABI_VERSION = 1\n", f"ABI_VERSION = {abi}\n")
    open(path, "w").write(text)
    return root


def test_vfiokit_lib_override(tmp_path):
    copy = tmp_path / "libvfiokit-copy.so"
    shutil.copy(_library_file(), copy)
    r = run_python("import vfiokit; print(vfiokit.LIBRARY_PATH)", VFIOKIT_LIB=str(copy),
                   PYTHONPATH=os.path.dirname(os.path.dirname(vfiokit.__file__)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(copy)


def test_vfiokit_lib_override_is_not_second_guessed():
    r = run_python("import vfiokit", VFIOKIT_LIB="/nonexistent/libvfiokit.so.0",
                   PYTHONPATH=os.path.dirname(os.path.dirname(vfiokit.__file__)))
    assert r.returncode != 0
    assert "cannot load libvfiokit" in r.stderr and "/nonexistent/libvfiokit.so.0" in r.stderr


def test_not_a_vfiokit_library():
    r = run_python("import vfiokit", VFIOKIT_LIB="libc.so.6",
                   PYTHONPATH=os.path.dirname(os.path.dirname(vfiokit.__file__)))
    assert r.returncode != 0 and "lacks vfiokit_abi_version" in r.stderr


def _library_file() -> str:
    """The loaded library's file: LIBRARY_PATH is only its soname when the loader found it."""
    with open("/proc/self/maps") as maps:
        return next(line.split()[-1] for line in maps if os.path.basename(line.split()[-1]).startswith("libvfiokit"))


def test_soname_through_the_loader_path():
    lib = _library_file()
    r = run_python("import vfiokit; print(vfiokit.LIBRARY_PATH)", LD_LIBRARY_PATH=os.path.dirname(lib),
                   PYTHONPATH=os.path.dirname(os.path.dirname(vfiokit.__file__)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("libvfiokit.so.0", os.path.join(os.path.dirname(vfiokit.__file__), "libvfiokit.so.0"))


def test_library_next_to_the_package(tmp_path):
    lib = _library_file()
    shutil.copytree(os.path.dirname(vfiokit.__file__), tmp_path / "vfiokit")
    shutil.copy(lib, tmp_path / "vfiokit" / "libvfiokit.so.0")
    r = run_python("import vfiokit; print(vfiokit.LIBRARY_PATH)", PYTHONPATH=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "vfiokit" / "libvfiokit.so.0")


def test_errors_are_oserror_subclasses_with_the_library_message():
    with pytest.raises(OSError) as e:
        vfiokit.bind("zzz")
    assert e.value.errno == errno.EINVAL and "'zzz' is not a PCI address" in e.value.strerror
    with pytest.raises(OSError) as e:
        vfiokit.Iommu(99)
    assert e.value.errno == errno.EINVAL and "unknown IOMMU kind 99" in e.value.strerror
    with pytest.raises(OSError) as e:
        vfiokit.open("/nonexistent/device")
    assert e.value.errno and e.value.strerror
    # errno picks the subclass, as for the os module's own errors
    for code, cls in [(errno.ENOENT, FileNotFoundError), (errno.EACCES, PermissionError),
                      (errno.ETIMEDOUT, TimeoutError), (errno.EINVAL, OSError)]:
        with pytest.raises(cls) as e:
            _capi._check_int(-code, _capi.lib.vfiokit_abi_version, ())
        assert e.value.errno == code


def test_formatting():
    assert [vfiokit.human_size(n) for n in (256, 1536, 16384, 1 << 20, 64 << 20, 8 << 30)] == \
        ["256 B", "1.5 KiB", "16 KiB", "1 MiB", "64 MiB", "8 GiB"]
    r = vfiokit.RegionInfo(index=0, flags=vfiokit.REGION_PRESENT | vfiokit.REGION_MMAP | vfiokit.REGION_MEM64,
                           size=1 << 20, num_areas=1)
    assert repr(r) == "<region 0 BAR0: size 0x100000 (1 MiB), fd offset 0x0, PRESENT|MMAP|MEM64, areas 0+1>"
    assert repr(vfiokit.RegionInfo(index=8)) == "<region 8 VGA: absent>"
    assert repr(vfiokit.IrqInfo(index=2, flags=vfiokit.IRQ_EVENTFD | 0x100, count=65)) == \
        "<irq 2 MSIX: 65 vector(s), EVENTFD|0x100>"
    assert repr(vfiokit.IovaRange(0, 0xfedfffff)) == "IovaRange(0x0, 0xfedfffff)"
    assert vfiokit._timeout_ms(None) == -1 and vfiokit._timeout_ms(0) == 0
    assert vfiokit._timeout_ms(0.0001) == 1 and vfiokit._timeout_ms(1e12) == 2**31 - 1


def test_cli_errors_are_one_line():
    for args, env in [(["peek", "zzz", "bar0", "0"], {}),
                      (["info", "00:03.0"], {"VFIOKIT_LIB": "/nonexistent/libvfiokit.so"})]:
        r = cli(*args, env=env)
        assert r.returncode == 1, r
        assert r.stdout == "" and r.stderr.startswith("vfiokit: ") and r.stderr.count("\n") == 1, r.stderr
    r = cli("peek", "00:03.0", "bar9", "0")
    assert r.returncode == 2 and "not a number: 'bar9'" in r.stderr and "Traceback" not in r.stderr
