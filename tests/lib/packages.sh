# shellcheck shell=bash
# Sourced by every script that installs Debian packages (tests/setup, tests/vm/run,
# tests/vfio_user/libvfio-user, c-examples/demo, c-examples/test): one way to install them.
#
# ensure_packages WHO PACKAGE...: install the packages that are not installed yet. It never
# removes a package of the user's: apt-get runs with --no-remove, and when apt would have to
# remove something to install them, it stops and names what, and the command the user can run
# if that is fine with them. Not root: it names the command to run instead. Returns non-zero on
# any failure, with the reason on stderr prefixed by WHO.
ensure_packages() {
	local who=$1 pkg absent=() removes
	shift
	for pkg in "$@"; do
		[[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) == installed ]] ||
			[[ " ${absent[*]-} " == *" $pkg "* ]] || absent+=("$pkg")
	done
	[[ ${#absent[@]} -eq 0 ]] && return 0
	if [[ $(id -u) != 0 ]]; then
		echo "$who: missing packages; install them with: sudo apt-get install --no-install-recommends ${absent[*]}" >&2
		return 1
	fi
	echo "$who: installing ${absent[*]}" >&2
	# Concurrent suites install too: wait for dpkg's lock rather than fail. A first failure may
	# be stale package lists: refresh them once and try again.
	local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends --no-remove)
	DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${absent[@]}" >&2 && return 0
	apt-get -o DPkg::Lock::Timeout=600 update -q >&2 || { echo "$who: apt-get update failed" >&2; return 1; }
	DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${absent[@]}" >&2 && return 0
	removes=$(apt-get -s -q --no-install-recommends install "${absent[@]}" 2>/dev/null |
		sed -n 's/^Remv \([^ ]*\).*/\1/p' | xargs)
	if [[ -n $removes ]]; then
		echo "$who: installing ${absent[*]} would remove $removes, which vfiokit's scripts never do;" \
			"if that is fine, run: apt-get install --no-install-recommends ${absent[*]}" >&2
	else
		echo "$who: apt-get install ${absent[*]} failed" >&2
	fi
	return 1
}
