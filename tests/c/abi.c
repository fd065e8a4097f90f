/* The record layouts are ABI: sizes and offsets checked by the compiler against the header,
 * and the library's version against the header's; bad names fail cleanly. Runs anywhere (no
 * device, no VFIO needed). */
#include <vfiokit.h>

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define LAYOUT(type, field, off) _Static_assert(offsetof(type, field) == (off), #type "." #field)

_Static_assert(sizeof(vfiokit_region) == 64, "vfiokit_region is 64 bytes");
LAYOUT(vfiokit_region, index, 0);
LAYOUT(vfiokit_region, flags, 4);
LAYOUT(vfiokit_region, size, 8);
LAYOUT(vfiokit_region, offset, 16);
LAYOUT(vfiokit_region, type, 24);
LAYOUT(vfiokit_region, subtype, 28);
LAYOUT(vfiokit_region, first_area, 32);
LAYOUT(vfiokit_region, num_areas, 36);
LAYOUT(vfiokit_region, reserved, 40);

_Static_assert(sizeof(vfiokit_area) == 32, "vfiokit_area is 32 bytes");
LAYOUT(vfiokit_area, region, 0);
LAYOUT(vfiokit_area, reserved0, 4);
LAYOUT(vfiokit_area, offset, 8);
LAYOUT(vfiokit_area, size, 16);
LAYOUT(vfiokit_area, reserved1, 24);

_Static_assert(sizeof(vfiokit_irq) == 32, "vfiokit_irq is 32 bytes");
LAYOUT(vfiokit_irq, index, 0);
LAYOUT(vfiokit_irq, flags, 4);
LAYOUT(vfiokit_irq, count, 8);
LAYOUT(vfiokit_irq, reserved0, 12);
LAYOUT(vfiokit_irq, reserved, 16);

_Static_assert(sizeof(vfiokit_device_info) == 64, "vfiokit_device_info is 64 bytes");
LAYOUT(vfiokit_device_info, flags, 0);
LAYOUT(vfiokit_device_info, num_regions, 4);
LAYOUT(vfiokit_device_info, num_irqs, 8);
LAYOUT(vfiokit_device_info, class_code, 12);
LAYOUT(vfiokit_device_info, vendor_id, 16);
LAYOUT(vfiokit_device_info, device_id, 18);
LAYOUT(vfiokit_device_info, subsystem_vendor_id, 20);
LAYOUT(vfiokit_device_info, subsystem_id, 22);
LAYOUT(vfiokit_device_info, revision, 24);
LAYOUT(vfiokit_device_info, reserved0, 25);
LAYOUT(vfiokit_device_info, reserved, 32);
_Static_assert(VFIOKIT_FEATURE_GET == (1 << 16) && VFIOKIT_FEATURE_SET == (1 << 17) && VFIOKIT_FEATURE_PROBE == (1 << 18),
	       "the kernel's VFIO_DEVICE_FEATURE_* bits");

_Static_assert(sizeof(vfiokit_map_info) == 48, "vfiokit_map_info is 48 bytes");
LAYOUT(vfiokit_map_info, addr, 0);
LAYOUT(vfiokit_map_info, len, 8);
LAYOUT(vfiokit_map_info, direct, 16);
LAYOUT(vfiokit_map_info, access, 24);
LAYOUT(vfiokit_map_info, reserved, 32);
_Static_assert(sizeof(vfiokit_hot_reset_dep) == 48, "vfiokit_hot_reset_dep is 48 bytes");
LAYOUT(vfiokit_hot_reset_dep, address, 0);
LAYOUT(vfiokit_hot_reset_dep, group, 16);
LAYOUT(vfiokit_hot_reset_dep, devid, 20);
LAYOUT(vfiokit_hot_reset_dep, owned, 24);
LAYOUT(vfiokit_hot_reset_dep, reserved, 32);
_Static_assert(sizeof(vfiokit_vf) == 32, "vfiokit_vf is 32 bytes");
LAYOUT(vfiokit_vf, address, 0);
LAYOUT(vfiokit_vf, index, 16);
LAYOUT(vfiokit_vf, reserved, 24);
_Static_assert(sizeof(vfiokit_finding) == 512, "vfiokit_finding is 512 bytes");
LAYOUT(vfiokit_finding, code, 0);
LAYOUT(vfiokit_finding, severity, 4);
LAYOUT(vfiokit_finding, subject, 8);
LAYOUT(vfiokit_finding, message, 72);
LAYOUT(vfiokit_finding, reserved, 496);

_Static_assert(sizeof(vfiokit_iova_range) == 16, "vfiokit_iova_range is 16 bytes");
LAYOUT(vfiokit_iova_range, last, 8);
_Static_assert(sizeof(vfiokit_dma_heap_info) == 48, "vfiokit_dma_heap_info is 48 bytes");
LAYOUT(vfiokit_dma_heap_info, arenas, 8);
LAYOUT(vfiokit_dma_heap_info, huge_arenas, 12);
LAYOUT(vfiokit_dma_heap_info, used, 16);
LAYOUT(vfiokit_dma_heap_info, reserved, 24);

_Static_assert(VFIOKIT_PCI_BAR0 == 0 && VFIOKIT_PCI_ROM == 6 && VFIOKIT_PCI_CONFIG == 7 && VFIOKIT_PCI_VGA == 8,
	       "fixed region indices");
_Static_assert(VFIOKIT_IRQ_INTX == 0 && VFIOKIT_IRQ_MSIX == 2 && VFIOKIT_IRQ_REQ == 4, "fixed irq indices");

int main(void)
{
	int failed = 0;
	if (vfiokit_abi_version() != VFIOKIT_ABI_VERSION) {
		fprintf(stderr, "library ABI %u, header ABI %u\n", vfiokit_abi_version(), VFIOKIT_ABI_VERSION);
		failed++;
	}
	if (strlen(vfiokit_version()) < 5) {
		fprintf(stderr, "version '%s'\n", vfiokit_version());
		failed++;
	}
	if (strcmp(vfiokit_last_error(), "") != 0) {
		fprintf(stderr, "last error before any failure: '%s'\n", vfiokit_last_error());
		failed++;
	}
	/* No device needed to report a bad name, even on a host without VFIO. */
	vfiokit_device *dev = NULL;
	if (vfiokit_device_open("0000:00:1e.7", NULL, &dev) != -ENOENT || dev != NULL ||
	    !strstr(vfiokit_last_error(), "no PCI device 0000:00:1e.7")) {
		fprintf(stderr, "missing device: '%s'\n", vfiokit_last_error());
		failed++;
	}
	if (vfiokit_device_open("00:02", NULL, &dev) != -EINVAL || !strstr(vfiokit_last_error(), "not a PCI address")) {
		fprintf(stderr, "bad address: '%s'\n", vfiokit_last_error());
		failed++;
	}
	printf("abi: library %s, ABI %u\n", vfiokit_version(), vfiokit_abi_version());
	printf("%d passed, %d failed\n", 5 - failed, failed);
	return failed != 0;
}
