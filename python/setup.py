"""The wheel carries libvfiokit, so installing it needs no `make install`.

The build runs cargo on the repository around this directory and puts the library into the
package as vfiokit/libvfiokit.so.0, where _capi.py looks when VFIOKIT_LIB is unset. Such a
wheel is tagged for the platform (py3-none-linux_x86_64, say): its Python runs on any Python
3, its library does not.

VFIOKIT_SYSTEM_LIBRARY=1 builds the pure package instead, which loads the system's
libvfiokit.so.0: Debian's python3-vfiokit (beside libvfiokit0), or a package beside
`make install`.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

REPO = Path(__file__).resolve().parent.parent
SONAME = "libvfiokit.so.0"


def build_library() -> str:
    """Builds libvfiokit as `make` does and returns the shared library's path (cargo's word
    for it, so CARGO_TARGET_DIR and cargo's configuration count)."""
    if not (REPO / "Cargo.toml").exists():
        raise SystemExit(f"vfiokit: the wheel is built from the vfiokit repository (python/ in it); "
                         f"{REPO} has no Cargo.toml. Or set VFIOKIT_SYSTEM_LIBRARY=1 for the pure package.")
    build = subprocess.run([os.environ.get("CARGO", "cargo"), "build", "--release", "--lib",
                            "--message-format=json-render-diagnostics"],
                           cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    for line in build.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and "cdylib" in message["target"]["kind"]:
            return next(f for f in message["filenames"] if f.endswith(".so"))
    raise SystemExit("vfiokit: cargo built no shared library")


class build_py_with_library(build_py):
    def run(self) -> None:
        super().run()
        shutil.copy(build_library(), Path(self.build_lib) / "vfiokit" / SONAME)


class BinaryDistribution(Distribution):
    def has_ext_modules(self) -> bool:  # a platform wheel: bdist_wheel's root_is_pure is False
        return True


def platform_wheel():  # imported only here: the pure build needs no bdist_wheel
    try:
        from setuptools.command.bdist_wheel import bdist_wheel
    except ImportError:  # setuptools < 70.1 (Debian 12's): the wheel package's
        from wheel.bdist_wheel import bdist_wheel

    class bdist_wheel_py3(bdist_wheel):
        def get_tag(self) -> tuple[str, str, str]:
            # ctypes, no extension module: any Python 3, one platform (the library's).
            return "py3", "none", super().get_tag()[2]

    return bdist_wheel_py3


if os.environ.get("VFIOKIT_SYSTEM_LIBRARY") == "1":
    setup()
else:
    setup(cmdclass={"build_py": build_py_with_library, "bdist_wheel": platform_wheel()},
          distclass=BinaryDistribution)
