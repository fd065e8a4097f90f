/* lsvfio: list the devices usable through VFIO and print each one's fixed records: regions
 * (flags, sizes, mmappable areas) and IRQs (counts), like lspci for VFIO.
 *
 * Shows: vfiokit_device_open by PCI address, the three record arrays, config-space reads,
 * and error handling with vfiokit_last_error(). Usage: lsvfio [PCI-ADDRESS...]
 * Listing every device bound to vfio-pci, one that cannot be opened (a group that is not
 * viable, a device open elsewhere) gets a line saying why, and the listing goes on; a device
 * named on the command line that cannot be opened makes the exit status 1. */
#define _DEFAULT_SOURCE /* scandir, alphasort */
#include <vfiokit.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *region_names[] = {"BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "config", "VGA"};
static const char *irq_names[] = {"INTx", "MSI", "MSI-X", "ERR", "REQ"};

static void print_flags(uint32_t flags)
{
	static const struct { uint32_t bit; const char *name; } names[] = {
		{VFIOKIT_REGION_READ, "read"},		{VFIOKIT_REGION_WRITE, "write"},
		{VFIOKIT_REGION_MMAP, "mmap"},		{VFIOKIT_REGION_SPARSE, "sparse"},
		{VFIOKIT_REGION_MSIX_MAPPABLE, "msix-mappable"}, {VFIOKIT_REGION_IO_PORT, "io-port"},
		{VFIOKIT_REGION_MEM64, "64-bit"},	{VFIOKIT_REGION_PREFETCH, "prefetch"},
	};
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		if (flags & names[i].bit)
			printf(" %s", names[i].name);
}

static void print_size(uint64_t size)
{
	static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
	int u = 0;
	while (size >= 1024 && size % 1024 == 0 && u < 4) {
		size /= 1024;
		u++;
	}
	printf("%llu %s", (unsigned long long)size, units[u]);
}

static int list(const char *address)
{
	vfiokit_device *dev;
	size_t nregions, nareas, nirqs;
	uint16_t vendor = 0, device = 0;
	int rc = vfiokit_device_open(address, NULL, &dev);
	if (rc) {
		fprintf(stderr, "lsvfio: %s\n", vfiokit_last_error());
		return 1;
	}
	const vfiokit_region *regions = vfiokit_device_regions(dev, &nregions);
	const vfiokit_area *areas = vfiokit_device_areas(dev, &nareas);
	const vfiokit_irq *irqs = vfiokit_device_irqs(dev, &nirqs);
	if (vfiokit_read16(dev, VFIOKIT_PCI_CONFIG, 0, &vendor) < 0 ||
	    vfiokit_read16(dev, VFIOKIT_PCI_CONFIG, 2, &device) < 0 || !regions || !areas || !irqs) {
		fprintf(stderr, "lsvfio: %s: %s\n", address, vfiokit_last_error());
		vfiokit_device_close(dev);
		return 1;
	}
	printf("%s [%04x:%04x]\n", address, vendor, device);

	for (size_t i = 0; i < nregions; i++) {
		const vfiokit_region *r = &regions[i];
		if (!(r->flags & VFIOKIT_REGION_PRESENT))
			continue;
		printf("  region %zu %-6s ", i, i < 9 ? region_names[i] : "dev");
		print_size(r->size);
		print_flags(r->flags);
		if (r->type || r->subtype)
			printf(" type %u/%u", r->type, r->subtype);
		printf("\n");
		for (uint32_t a = r->first_area; a < r->first_area + r->num_areas; a++)
			printf("    mmap area +%#llx, %#llx bytes\n", (unsigned long long)areas[a].offset,
			       (unsigned long long)areas[a].size);
	}
	for (size_t i = 0; i < nirqs; i++)
		if (irqs[i].count)
			printf("  irq %zu %-5s %u vector%s%s%s\n", i, i < 5 ? irq_names[i] : "dev", irqs[i].count,
			       irqs[i].count == 1 ? "" : "s", irqs[i].flags & VFIOKIT_IRQ_MASKABLE ? " maskable" : "",
			       irqs[i].flags & VFIOKIT_IRQ_AUTOMASKED ? " automasked" : "");
	vfiokit_device_close(dev);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc > 1) {
		int failures = 0;
		for (int i = 1; i < argc; i++)
			failures += list(argv[i]);
		return failures != 0;
	}
	/* Every device bound to vfio-pci, in address order. */
	struct dirent **entries;
	int n = scandir("/sys/bus/pci/drivers/vfio-pci", &entries, NULL, alphasort);
	if (n < 0) {
		fprintf(stderr, "lsvfio: no vfio-pci driver (is the module loaded?)\n");
		return 1;
	}
	for (int i = 0; i < n; i++) {
		if (strchr(entries[i]->d_name, ':') && strchr(entries[i]->d_name, '.'))
			list(entries[i]->d_name); /* says why a device is unusable, and goes on */
		free(entries[i]);
	}
	free(entries);
	return 0;
}
