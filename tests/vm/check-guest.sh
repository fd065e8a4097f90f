#!/bin/bash
# Checks, inside a guest started by tests/vm/run, that the guest provides what it promises:
# every test device bound to vfio-pci and reachable through VFIO, the exported variables right,
# the IOMMU active, the shares and TMPDIR writable.
#
#   tests/vm/run [--kernel legacy|iommufd|latest] -- tests/vm/check-guest.sh
set -u

pass=0 fail=0
ok() {
	pass=$((pass + 1))
	echo "ok   $*"
}
bad() {
	fail=$((fail + 1))
	echo "FAIL $*"
}
check() { # check DESCRIPTION COMMAND...
	local what=$1
	shift
	if "$@"; then ok "$what"; else bad "$what"; fi
}

kernel=${VFIOKIT_VM_KERNEL:-}
check "VFIOKIT_VM_KERNEL is legacy, iommufd or latest ('$kernel')" test "$kernel" = legacy -o "$kernel" = iommufd -o "$kernel" = latest
# The kernels built from source have iommufd and the device cdev; the Debian 6.1 one has not.
cdev_kernel=false
[[ $kernel == legacy ]] || cdev_kernel=true
check "the IOMMU is active (/sys/class/iommu non-empty)" test -n "$(ls -A /sys/class/iommu 2>/dev/null)"
ir_on() { grep -q ' IR-' /proc/interrupts || dmesg | grep -q 'Enabled IRQ remapping'; }
check "interrupt remapping is on" ir_on
check "/dev/vfio/vfio (the legacy container) exists" test -c /dev/vfio/vfio
if $cdev_kernel; then
	check "/dev/iommu exists" test -c /dev/iommu
fi
if [[ $kernel == latest ]]; then
	check "2 MiB hugepages are reserved" test "$(cat /proc/sys/vm/nr_hugepages)" -gt 0
	check "the Intel IOMMU's debugfs is mounted" test -d /sys/kernel/debug/iommu/intel
fi

# bar_size DEVICE INDEX: size of BAR INDEX in bytes, from the sysfs resource file.
bar_size() {
	local start end flags
	read -r start end flags < <(sed -n "$(($2 + 1))p" "/sys/bus/pci/devices/$1/resource")
	if [[ $((start)) == 0 && $((end)) == 0 ]]; then echo 0; else echo $((end - start + 1)); fi
}

# check_device ROLE VENDOR:DEVICE
check_device() {
	local role=$1 want=$2 var=VFIOKIT_TEST_$1 addr dev id group cdev
	addr=${!var:-}
	if [[ ! $addr =~ ^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$ ]]; then
		bad "$var is a full PCI address ('$addr')"
		return
	fi
	ok "$var=$addr"
	dev=/sys/bus/pci/devices/$addr
	if [[ ! -d $dev ]]; then
		bad "$role: $dev exists"
		return
	fi
	id=$(sed 's/^0x//' "$dev/vendor"):$(sed 's/^0x//' "$dev/device")
	check "$role: vendor:device is $want ($id)" test "$id" = "$want"
	check "$role: bound to vfio-pci" test "$(basename "$(readlink "$dev/driver")")" = vfio-pci
	group=$(basename "$(readlink "$dev/iommu_group")")
	check "$role: in IOMMU group ${group:-?} with /dev/vfio/${group:-?}" test -n "$group" -a -c "/dev/vfio/$group"
	if $cdev_kernel; then
		cdev=$(find "$dev/vfio-dev" -mindepth 1 -maxdepth 1 -printf "%f\n" 2>/dev/null | head -n1)
		check "$role: device cdev /dev/vfio/devices/${cdev:-?}" test -n "$cdev" -a -c "/dev/vfio/devices/$cdev"
	fi
}

check_device EDU 1234:11e8
check_device NVME 1b36:0010
check_device TESTDEV 1b36:0005
check_device IVSHMEM 1af4:1110
check_device IVSHMEM_BIG 1af4:1110
check_device UNPLUG 1234:11e8
check_device SRIOV_PF 1b36:0010
check "SRIOV_PF has 2 VFs to enable, none enabled" test "$(cat "/sys/bus/pci/devices/${VFIOKIT_TEST_SRIOV_PF:-none}/sriov_totalvfs" 2>/dev/null):$(cat "/sys/bus/pci/devices/${VFIOKIT_TEST_SRIOV_PF:-none}/sriov_numvfs" 2>/dev/null)" = 2:0
check "vfio-pci has enable_sriov on" test "$(cat /sys/module/vfio_pci/parameters/enable_sriov 2>/dev/null)" = Y
check "EDU and UNPLUG are two devices" test "${VFIOKIT_TEST_EDU:-}" != "${VFIOKIT_TEST_UNPLUG:-}"
check_device GROUP_A 1234:11e8
check_device GROUP_B 1b36:0005
check_device NONVIABLE 1234:11e8
check_device RESET_NVME 1b36:0010
check_device RESET_EDU 1234:11e8
group_of() { basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"; }
check "GROUP_A and GROUP_B share an IOMMU group" test "$(group_of "$VFIOKIT_TEST_GROUP_A")" = "$(group_of "$VFIOKIT_TEST_GROUP_B")"
nonviable_group=/sys/kernel/iommu_groups/$(group_of "$VFIOKIT_TEST_NONVIABLE")/devices
check "NONVIABLE's group holds a device driven by virtio-pci" \
	sh -c "readlink $nonviable_group/*/driver | grep -q /virtio-pci\$"
check "RESET_NVME and RESET_EDU are functions 0 and 1 of one slot" \
	test "${VFIOKIT_TEST_RESET_NVME%.0}" = "${VFIOKIT_TEST_RESET_EDU%.1}"
# The unplug victim sits in a PCIe hotplug slot that pciehp drives (slot address: its D:B:D).
in_hotplug_slot() {
	local s
	for s in /sys/bus/pci/slots/*/address; do
		[[ $(cat "$s" 2>/dev/null) == "${VFIOKIT_TEST_UNPLUG:0:10}" ]] && return 0
	done
	return 1
}
check "UNPLUG is in a hotplug slot (/sys/bus/pci/slots)" in_hotplug_slot
pciehp_on() { dmesg | grep -q 'pciehp: Slot'; }
check "pciehp drives the slot" pciehp_on
check "VFIOKIT_TEST_NVME_SERIAL is set (${VFIOKIT_TEST_NVME_SERIAL:-})" test -n "${VFIOKIT_TEST_NVME_SERIAL:-}"
check "the two ivshmem devices differ" test "${VFIOKIT_TEST_IVSHMEM:-}" != "${VFIOKIT_TEST_IVSHMEM_BIG:-}"
if [[ -n ${VFIOKIT_TEST_IVSHMEM:-} && -n ${VFIOKIT_TEST_IVSHMEM_BIG:-} ]]; then
	small=$(bar_size "$VFIOKIT_TEST_IVSHMEM" 2)
	big=$(bar_size "$VFIOKIT_TEST_IVSHMEM_BIG" 2)
	check "IVSHMEM BAR2 is 64 MiB ($small)" test "$small" = $((64 << 20))
	check "IVSHMEM_BIG BAR2 is larger than 4 GiB ($big)" test "$big" -gt $((4 << 30))
fi
if [[ -n ${VFIOKIT_TEST_TESTDEV:-} ]]; then
	flags=$(sed -n 2p "/sys/bus/pci/devices/$VFIOKIT_TEST_TESTDEV/resource" | awk '{print $3}')
	check "TESTDEV BAR1 is an I/O port BAR" test $((flags & 0x100)) != 0
fi

# Nothing else went to vfio-pci: the 9p transport devices stay with virtio-pci.
others=0
for d in /sys/bus/pci/devices/*; do
	[[ $(basename "$(readlink "$d/driver" 2>/dev/null)") == vfio-pci ]] || continue
	case " ${VFIOKIT_TEST_EDU:-} ${VFIOKIT_TEST_NVME:-} ${VFIOKIT_TEST_TESTDEV:-} ${VFIOKIT_TEST_IVSHMEM:-} ${VFIOKIT_TEST_IVSHMEM_BIG:-} ${VFIOKIT_TEST_UNPLUG:-} ${VFIOKIT_TEST_GROUP_A:-} ${VFIOKIT_TEST_GROUP_B:-} ${VFIOKIT_TEST_NONVIABLE:-} ${VFIOKIT_TEST_RESET_NVME:-} ${VFIOKIT_TEST_RESET_EDU:-} ${VFIOKIT_TEST_SRIOV_PF:-} " in
	*" ${d##*/} "*) ;;
	*) others=$((others + 1)) ;;
	esac
done
check "only the test devices are bound to vfio-pci ($others others)" test "$others" = 0

# The environment the guest promises.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
check "working directory is the project root ($PWD)" test "$PWD" = "$here"
# shellcheck disable=SC2016 # expanded by the inner shell
check "TMPDIR ($TMPDIR) is writable" sh -c 'f=$(mktemp) && echo x >"$f" && rm "$f"'
probe=$PWD/target/vm-check-guest-probe.$$
check "target/ is writable" sh -c "echo x >'$probe' && test \"\$(cat '$probe')\" = x && rm '$probe'"
check "the host root is read-only" sh -c '! touch /vfiokit-probe 2>/dev/null'
check "/dev/shm is writable" sh -c 'echo x >/dev/shm/probe && rm /dev/shm/probe'

# VFIO itself, through raw ioctls (stdlib Python, independent of vfiokit): the group/container
# path on both kernels, the iommufd cdev path where the kernel has it.
if command -v python3 >/dev/null; then
	while IFS= read -r line; do
		echo "$line"
		case $line in "ok   "*) pass=$((pass + 1)) ;; "FAIL "*) fail=$((fail + 1)) ;; esac
	done < <(python3 -B "$(dirname "${BASH_SOURCE[0]}")/vfio-smoke.py" 2>&1 || echo "FAIL vfio-smoke.py exited $?")
else
	bad "python3 is on PATH (for vfio-smoke.py)"
fi

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
