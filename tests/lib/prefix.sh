# shellcheck shell=bash
# Sourced by the suites that use vfiokit as an installed library (tests/c/run, tests/fault/run,
# c-examples/test): one way to install it and build against it, as a user would.
#
# install_prefix PREFIX [LOG]: `make install` into PREFIX (its output into LOG when given), check
# that the install holds every file it should, and point pkg-config at it. Afterwards
# PKG_CONFIG_PATH is exported, and VFIOKIT_CFLAGS and VFIOKIT_LIBS (arrays) hold
# `pkg-config --cflags vfiokit` and `pkg-config --libs vfiokit` plus an rpath to PREFIX/lib, so
# programs run from the build tree without the system's library path.
# shellcheck disable=SC2034 # VFIOKIT_CFLAGS and VFIOKIT_LIBS are for the scripts that source this
install_prefix() {
	local prefix=$1 log=${2:-} f
	if [[ -n $log ]]; then
		make -s install PREFIX="$prefix" >"$log" 2>&1 || { tail -n 20 "$log" >&2; return 1; }
	else
		make -s install PREFIX="$prefix" || return 1
	fi
	for f in lib/libvfiokit.so lib/libvfiokit.so.0 lib/libvfiokit.a lib/pkgconfig/vfiokit.pc include/vfiokit.h; do
		[[ -e $prefix/$f ]] || { echo "the install in $prefix is missing $f" >&2; return 1; }
	done
	export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
	read -ra VFIOKIT_CFLAGS <<<"$(pkg-config --cflags vfiokit)"
	read -ra VFIOKIT_LIBS <<<"$(pkg-config --libs vfiokit) -Wl,-rpath,$prefix/lib"
}
