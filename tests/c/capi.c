/* The C API against the real kernel, in the test guest (tests/c/run): every export with bad
 * arguments (NULL pointers, bad names, out-of-range regions, offsets and lengths, misaligned
 * widths, double close, calls after a dependent object was closed), then a short real session
 * with edu, then open/close cycles that must leak no fd and no mapping. */
#define _GNU_SOURCE /* memfd_create */
#include <vfiokit.h>

#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <linux/vfio.h>

static int passed, failed;

#define CHECK(cond)                                                                                \
	do {                                                                                       \
		if (cond) {                                                                        \
			passed++;                                                                  \
		} else {                                                                           \
			failed++;                                                                  \
			fprintf(stderr, "%s:%d: CHECK(%s) failed; last error: %s\n", __FILE__,     \
				__LINE__, #cond, vfiokit_last_error());                            \
		}                                                                                  \
	} while (0)

/* Leaves a known message behind, so the next check can see that a call set a new one. */
static void mark_error(void)
{
	vfiokit_device *d = NULL;
	vfiokit_device_open("marker", NULL, &d);
}

static int fresh_message(void)
{
	return strstr(vfiokit_last_error(), "marker") == NULL && vfiokit_last_error()[0] != '\0';
}

/* `call` fails with -err and leaves a message of its own. */
#define FAILS(call, err)                                                                           \
	do {                                                                                       \
		mark_error();                                                                      \
		int rc_ = (call);                                                                  \
		CHECK(rc_ == -(err));                                                              \
		CHECK(fresh_message());                                                            \
	} while (0)

/* Same for calls that return a pointer (NULL) or a value. */
#define FAILS_AS(call, failure)                                                                    \
	do {                                                                                       \
		mark_error();                                                                      \
		CHECK((call) == (failure));                                                        \
		CHECK(fresh_message());                                                            \
	} while (0)

static const char *env(const char *name)
{
	const char *v = getenv(name);
	if (!v) {
		fprintf(stderr, "%s is not set: run in tests/vm/run\n", name);
		exit(2);
	}
	return v;
}

static long count_lines(const char *path)
{
	FILE *f = fopen(path, "r");
	long n = 0;
	int c;
	if (!f)
		return -1;
	while ((c = fgetc(f)) != EOF)
		n += c == '\n';
	fclose(f);
	return n;
}

static long count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	long n = 0;
	if (!d)
		return -1;
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

static void null_arguments(void)
{
	vfiokit_iommu *io = (vfiokit_iommu *)0x1;
	vfiokit_device *dev = (vfiokit_device *)0x1;
	vfiokit_map_info map;
	uint64_t u64 = 0;
	uint32_t u32 = 0;
	size_t n = 7;
	void *p = NULL;
	char buf[8];

	FAILS(vfiokit_iommu_open(VFIOKIT_IOMMU_AUTO, NULL), EINVAL);
	FAILS(vfiokit_iommu_open(99, &io), EINVAL);
	CHECK(io == (vfiokit_iommu *)0x1); /* untouched on failure */
	/* SR-IOV: NULL pointers, strings that are not UUIDs, not a PF. */
	FAILS(vfiokit_device_set_vf_token(NULL, "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3"), EINVAL);
	FAILS(vfiokit_device_open_vf("0000:00:02.0", NULL, NULL, &dev), EINVAL);
	FAILS(vfiokit_device_open_vf("0000:00:02.0", "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3", NULL, NULL), EINVAL);
	FAILS(vfiokit_device_open_vf("0000:00:02.0", "not-a-uuid", NULL, &dev), EINVAL);
	CHECK(strstr(vfiokit_last_error(), "not a VF token") != NULL);
	FAILS(vfiokit_device_open_vf("0000:00:02.0", "bd8d9d2b5a5f4f5aa211f591514ba1f3", NULL, &dev), EINVAL);
	CHECK(dev == (vfiokit_device *)0x1);
	FAILS(vfiokit_pci_sriov_set_numvfs(NULL, 0, NULL, 0, &n), EINVAL);
	FAILS(vfiokit_pci_sriov_set_numvfs("0000:00:02.0", 0, NULL, 1, &n), EINVAL);
	FAILS(vfiokit_pci_sriov_set_numvfs("0000:00:02.0", 0, NULL, 0, NULL), EINVAL);
	FAILS(vfiokit_pci_sriov_set_numvfs("not an address", 0, NULL, 0, &n), EINVAL);
	CHECK(n == 7);
	vfiokit_iommu_close(NULL);
	vfiokit_device_close(NULL);
	FAILS_AS(vfiokit_iommu_kind(NULL), VFIOKIT_IOMMU_AUTO);
	FAILS(vfiokit_iommu_iova_ranges(NULL, NULL, 0, &n), EINVAL);
	CHECK(n == 7);
	FAILS(vfiokit_dma_map(NULL, buf, 4096, 0x10000), EINVAL);
	FAILS(vfiokit_dma_map_any(NULL, buf, 4096, &u64), EINVAL);
	FAILS(vfiokit_dma_unmap(NULL, 0x10000, 4096), EINVAL);
	FAILS(vfiokit_dma_unmap_all(NULL, &u64), EINVAL);
	FAILS(vfiokit_dma_unmap_range(NULL, 0x10000, 4096, &u64), EINVAL);
	FAILS(vfiokit_dma_alloc(NULL, 4096, &p, &u64), EINVAL);
	FAILS(vfiokit_dma_free(NULL, buf), EINVAL);
	FAILS(vfiokit_dma_heap_alloc(NULL, 64, 1, &p, &u64), EINVAL);
	FAILS(vfiokit_dma_heap_free(NULL, buf), EINVAL);
	FAILS(vfiokit_dma_to_vaddr(NULL, 0x10000, 1, &p), EINVAL);
	FAILS(vfiokit_dma_map_file(NULL, 0, 0, 4096, 0, &p, &u64), EINVAL);

	FAILS(vfiokit_device_open(NULL, NULL, &dev), EINVAL);
	CHECK(dev == (vfiokit_device *)0x1);
	FAILS(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), NULL, NULL), EINVAL);
	FAILS_AS(vfiokit_device_iommu(NULL), NULL);
	FAILS(vfiokit_device_reset(NULL), EINVAL);
	FAILS(vfiokit_device_get_info(NULL, NULL), EINVAL);
	FAILS(vfiokit_device_fd(NULL), EINVAL);
	FAILS(vfiokit_iommu_fd(NULL), EINVAL);
	FAILS(vfiokit_device_hot_reset_info(NULL, NULL, 0, &n), EINVAL);
	FAILS(vfiokit_device_hot_reset(NULL), EINVAL);
	FAILS(vfiokit_doctor(NULL, NULL, 0, NULL), EINVAL);
	FAILS(vfiokit_doctor(NULL, NULL, 1, &n), EINVAL);
	FAILS(vfiokit_iommu_export(NULL, NULL, 0, 0), EINVAL);
	FAILS(vfiokit_iommu_adopt(0, NULL), EINVAL);
	FAILS(vfiokit_iommu_adopt(-1, &io), EBADF);
	FAILS(vfiokit_iommu_hand_over(NULL, NULL, 0, 0), EINVAL);
	FAILS(vfiokit_iommu_take_over(0, NULL, NULL, 0, &n), EINVAL);
	FAILS(vfiokit_iommu_take_over(0, &io, NULL, 0, NULL), EINVAL);
	FAILS(vfiokit_iommu_take_over(0, &io, NULL, 1, &n), EINVAL);
	FAILS(vfiokit_iommu_take_over(-1, &io, NULL, 0, &n), EBADF);
	FAILS(vfiokit_device_feature(NULL, 3, VFIOKIT_FEATURE_PROBE, NULL, 0), EINVAL);
	FAILS_AS(vfiokit_device_regions(NULL, &n), NULL);
	FAILS_AS(vfiokit_device_areas(NULL, &n), NULL);
	FAILS_AS(vfiokit_device_irqs(NULL, &n), NULL);
	FAILS(vfiokit_region_map(NULL, 0, &p), EINVAL);
	FAILS(vfiokit_region_map_info(NULL, 0, &map), EINVAL);
	FAILS(vfiokit_register(NULL, 0, 0, 4, &p), EINVAL);
	FAILS(vfiokit_region_read(NULL, 0, 0, buf, 4), EINVAL);
	FAILS(vfiokit_region_write(NULL, 0, 0, buf, 4), EINVAL);
	FAILS(vfiokit_read8(NULL, 0, 0, (uint8_t *)buf), EINVAL);
	FAILS(vfiokit_read16(NULL, 0, 0, (uint16_t *)buf), EINVAL);
	FAILS(vfiokit_read32(NULL, 0, 0, &u32), EINVAL);
	FAILS(vfiokit_read64(NULL, 0, 0, &u64), EINVAL);
	FAILS(vfiokit_write8(NULL, 0, 0, 1), EINVAL);
	FAILS(vfiokit_write16(NULL, 0, 0, 1), EINVAL);
	FAILS(vfiokit_write32(NULL, 0, 0, 1), EINVAL);
	FAILS(vfiokit_write64(NULL, 0, 0, 1), EINVAL);
	FAILS(vfiokit_pci_find_capability(NULL, 5, &u32), EINVAL);
	FAILS(vfiokit_irq_enable(NULL, VFIOKIT_IRQ_MSI, 0, 1, (int *)buf), EINVAL);
	FAILS(vfiokit_irq_disable(NULL, VFIOKIT_IRQ_MSI), EINVAL);
	FAILS(vfiokit_irq_enable_fds(NULL, VFIOKIT_IRQ_MSI, 0, 1, (int *)buf), EINVAL);
	FAILS(vfiokit_irq_mask(NULL, VFIOKIT_IRQ_INTX, 0), EINVAL);
	FAILS(vfiokit_irq_unmask(NULL, VFIOKIT_IRQ_INTX, 0), EINVAL);
	FAILS(vfiokit_irq_trigger(NULL, VFIOKIT_IRQ_MSI, 0), EINVAL);
	FAILS(vfiokit_irq_wait(NULL, VFIOKIT_IRQ_MSI, 0, 0, &u64), EINVAL);
	FAILS(vfiokit_pci_bind(NULL), EINVAL);
	FAILS(vfiokit_pci_unbind(NULL), EINVAL);
}

static void bad_names(void)
{
	vfiokit_device *dev = (vfiokit_device *)0x1;
	FAILS(vfiokit_device_open("zz:zz.z", NULL, &dev), EINVAL);
	CHECK(strstr(vfiokit_last_error(), "not a PCI address") != NULL);
	FAILS(vfiokit_device_open("0000:00:1e.7", NULL, &dev), ENOENT);
	FAILS(vfiokit_device_open("0000:00:00.0", NULL, &dev), ENODEV);
	CHECK(strstr(vfiokit_last_error(), "driver_override") != NULL);
	FAILS(vfiokit_pci_bind("0000:00:1e.7"), ENOENT);
	CHECK(dev == (vfiokit_device *)0x1);
}

/* No-IOMMU mode in a guest with an IOMMU: not in 6.1, off in 6.12; either way the fix named. */
static void noiommu_refused(void)
{
	vfiokit_iommu *io = (vfiokit_iommu *)0x1;
	int legacy = strcmp(env("VFIOKIT_VM_KERNEL"), "legacy") == 0;
	FAILS(vfiokit_iommu_open(VFIOKIT_IOMMU_NOIOMMU, &io), legacy ? ENOTSUP : ENODEV);
	CHECK(strstr(vfiokit_last_error(), legacy ? "CONFIG_VFIO_NOIOMMU" : "enable_unsafe_noiommu_mode=1"));
	CHECK(io == (vfiokit_iommu *)0x1);
}

static void with_edu(void)
{
	vfiokit_iommu *io = NULL;
	vfiokit_device *dev = NULL;
	const vfiokit_region *regions;
	const vfiokit_irq *irqs;
	size_t n = 0, nranges = 0;
	uint32_t u32 = 0xdeadbeef, cap = 0;
	uint64_t u64 = 0, iova = 0;
	void *bar0 = NULL, *p = NULL, *buf = NULL;
	vfiokit_map_info map;
	int fd = -1, fds[2], rc;
	char small[16];

	CHECK(vfiokit_iommu_open(VFIOKIT_IOMMU_AUTO, &io) == 0);
	CHECK(vfiokit_iommu_kind(io) == VFIOKIT_IOMMU_TYPE1 || vfiokit_iommu_kind(io) == VFIOKIT_IOMMU_IOMMUFD);
	CHECK(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), io, &dev) == 0);
	CHECK(vfiokit_device_iommu(dev) == io);

	regions = vfiokit_device_regions(dev, &n);
	CHECK(regions != NULL && n == 9);
	CHECK(regions[0].size == 1 << 20 && (regions[0].flags & VFIOKIT_REGION_MMAP));
	CHECK(regions[VFIOKIT_PCI_VGA].flags == 0);
	irqs = vfiokit_device_irqs(dev, &n);
	CHECK(irqs != NULL && n == 5 && irqs[VFIOKIT_IRQ_MSI].count == 1);
	CHECK(vfiokit_device_areas(dev, &n) != NULL && n == 1);
	FAILS_AS(vfiokit_device_regions(dev, NULL), NULL);

	/* Registers: through the mapping, and the pointer agrees. */
	CHECK(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, 0, &u32) == 0 && u32 == 0x010000ed);
	CHECK(vfiokit_region_map(dev, VFIOKIT_PCI_BAR0, &bar0) == 0 && bar0 != NULL);
	CHECK(*(volatile uint32_t *)bar0 == 0x010000ed);
	CHECK(vfiokit_mmio_read32(bar0, 0) == 0x010000ed);
	vfiokit_mmio_write32(bar0, 4, 0x00ff00ff);
	CHECK(vfiokit_mmio_read32(bar0, 4) == 0xff00ff00);
	vfiokit_mmio_write64(bar0, 0x80, 0x123456789abcdef0ull); /* edu's DMA source: 64-bit */
	CHECK(vfiokit_mmio_read64(bar0, 0x80) == 0x123456789abcdef0ull);
	CHECK(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, 4, 0x0f0f0f0f) == 0);
	CHECK(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, 4, &u32) == 0 && u32 == 0xf0f0f0f0);
	CHECK(vfiokit_region_read(dev, VFIOKIT_PCI_BAR0, 0, &u32, 4) == 0 && u32 == 0x010000ed);
	CHECK(vfiokit_region_read(dev, VFIOKIT_PCI_BAR0, 0, NULL, 0) == 0);

	/* Out of range, overflowing, misaligned, absent. */
	u32 = 0x12345678;
	FAILS(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, 1 << 20, &u32), EINVAL);
	CHECK(u32 == 0x12345678);
	FAILS(vfiokit_read64(dev, VFIOKIT_PCI_BAR0, UINT64_MAX - 7, &u64), EINVAL);
	FAILS(vfiokit_region_read(dev, VFIOKIT_PCI_BAR0, UINT64_MAX, small, sizeof small), EINVAL);
	FAILS(vfiokit_region_write(dev, VFIOKIT_PCI_CONFIG, 250, small, sizeof small), EINVAL);
	FAILS(vfiokit_region_read(dev, VFIOKIT_PCI_BAR0, 0, NULL, 4), EINVAL);
	FAILS(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, 2, &u32), EINVAL);
	FAILS(vfiokit_write16(dev, VFIOKIT_PCI_BAR0, 1, 0), EINVAL);
	FAILS(vfiokit_read8(dev, VFIOKIT_PCI_VGA, 0, (uint8_t *)small), EINVAL);
	FAILS(vfiokit_read8(dev, 1000, 0, (uint8_t *)small), EINVAL);
	FAILS(vfiokit_region_map(dev, VFIOKIT_PCI_CONFIG, &p), ENOTSUP);
	FAILS(vfiokit_region_map(dev, 1000, &p), EINVAL);
	FAILS(vfiokit_region_map(dev, VFIOKIT_PCI_BAR0, NULL), EINVAL);
	/* edu's BAR0 is one area, read-write: every register access goes through the mapping. */
	CHECK(vfiokit_region_map_info(dev, VFIOKIT_PCI_BAR0, &map) == 0 && map.addr == bar0);
	CHECK(map.len == 1 << 20 && map.direct == 1 << 20);
	CHECK(map.access == (VFIOKIT_REGION_READ | VFIOKIT_REGION_WRITE));
	FAILS(vfiokit_region_map_info(dev, VFIOKIT_PCI_CONFIG, &map), ENOTSUP);
	FAILS(vfiokit_region_map_info(dev, VFIOKIT_PCI_BAR0, NULL), EINVAL);
	/* A register checked once, then plain accesses through its address. */
	CHECK(vfiokit_register(dev, VFIOKIT_PCI_BAR0, 4, 4, &p) == 0 && p == (char *)bar0 + 4);
	vfiokit_mmio_write32(p, 0, 0x12345678);
	CHECK(vfiokit_mmio_read32(p, 0) == 0xedcba987);
	CHECK(vfiokit_register(dev, VFIOKIT_PCI_BAR0, 0x80, 8, &p) == 0 && p == (char *)bar0 + 0x80);
	FAILS(vfiokit_register(dev, VFIOKIT_PCI_BAR0, 2, 4, &p), EINVAL);
	FAILS(vfiokit_register(dev, VFIOKIT_PCI_BAR0, 1 << 20, 1, &p), EINVAL);
	FAILS(vfiokit_register(dev, VFIOKIT_PCI_BAR0, 0, 3, &p), EINVAL);
	FAILS(vfiokit_register(dev, VFIOKIT_PCI_CONFIG, 0, 4, &p), ENOTSUP);
	FAILS(vfiokit_register(dev, 1000, 0, 4, &p), EINVAL);
	FAILS(vfiokit_register(dev, VFIOKIT_PCI_BAR0, 0, 4, NULL), EINVAL);

	/* Config space. */
	CHECK(vfiokit_pci_find_capability(dev, 0x05, &cap) == 0 && cap == 0x40);
	FAILS(vfiokit_pci_find_capability(dev, 0x11, &cap), ENOENT);
	FAILS(vfiokit_pci_find_capability(dev, 0x05, NULL), EINVAL);
	CHECK(vfiokit_read16(dev, VFIOKIT_PCI_CONFIG, 0, (uint16_t *)small) == 0 && *(uint16_t *)small == 0x1234);

	/* IRQs. */
	FAILS(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 2, fds), EINVAL);
	FAILS(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSIX, 0, 1, fds), EINVAL);
	FAILS(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 1, NULL), EINVAL);
	FAILS(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, 0, &u64), EINVAL); /* not enabled */
	CHECK(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 1, &fd) == 0 && fd >= 0);
	CHECK(vfiokit_irq_trigger(dev, VFIOKIT_IRQ_MSI, 0) == 0);
	u64 = 0;
	CHECK(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, 1000, &u64) == 0 && u64 == 1);
	FAILS(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, 10, &u64), ETIMEDOUT);
	FAILS(vfiokit_irq_trigger(dev, VFIOKIT_IRQ_MSI, 1), EINVAL);
	CHECK(vfiokit_irq_disable(dev, VFIOKIT_IRQ_MSI) == 0);
	FAILS(vfiokit_irq_disable(dev, VFIOKIT_IRQ_MSI), EINVAL);

	/* The caller's own eventfd: signalled, read by the caller, left open by disable. */
	int mine = eventfd(0, EFD_CLOEXEC), bad = -1;
	FAILS(vfiokit_irq_enable_fds(dev, VFIOKIT_IRQ_MSI, 0, 1, NULL), EINVAL);
	FAILS(vfiokit_irq_enable_fds(dev, VFIOKIT_IRQ_MSI, 0, 1, &bad), EINVAL);
	int two[2] = {mine, mine}; /* MSI has one vector here */
	FAILS(vfiokit_irq_enable_fds(dev, VFIOKIT_IRQ_MSI, 0, 2, two), EINVAL);
	CHECK(vfiokit_irq_enable_fds(dev, VFIOKIT_IRQ_MSI, 0, 1, &mine) == 0);
	CHECK(vfiokit_irq_trigger(dev, VFIOKIT_IRQ_MSI, 0) == 0);
	u64 = 0;
	CHECK(read(mine, &u64, 8) == 8 && u64 == 1);
	FAILS(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, 0, &u64), EINVAL);
	CHECK(vfiokit_irq_disable(dev, VFIOKIT_IRQ_MSI) == 0);
	CHECK(close(mine) == 0); /* still ours, still open */

	/* DMA. */
	CHECK(vfiokit_iommu_iova_ranges(io, NULL, 0, &nranges) == 0 && nranges > 0);
	FAILS(vfiokit_iommu_iova_ranges(io, NULL, 1, &nranges), EINVAL);
	{
		vfiokit_iova_range ranges[16];
		size_t got = 0;
		CHECK(vfiokit_iommu_iova_ranges(io, ranges, 16, &got) == 0 && got == nranges);
		CHECK(ranges[0].start <= ranges[0].last);
	}
	CHECK(vfiokit_dma_alloc(io, 4096, &buf, &iova) == 0 && buf != NULL && iova != 0);
	FAILS(vfiokit_dma_map(io, buf, 4096, iova), EEXIST); /* overlaps, as the kernel says */
	FAILS(vfiokit_dma_map(io, (char *)buf + 1, 4096, 0x200000), EINVAL);
	FAILS(vfiokit_dma_map_any(io, buf, 4096, NULL), EINVAL);
	FAILS(vfiokit_dma_alloc(io, 0, &p, &u64), EINVAL);
	FAILS(vfiokit_dma_alloc(io, 4096, NULL, &u64), EINVAL);
	FAILS(vfiokit_dma_unmap(io, 0x7000000, 4096), ENOENT);
	CHECK(vfiokit_dma_map(io, buf, 4096, 0x7000000) == 0 && vfiokit_dma_map_any(io, buf, 4096, &u64) == 0);
	u64 = 0;
	CHECK(vfiokit_dma_unmap_all(io, &u64) == 0 && u64 == 8192); /* the two maps, not the buffer */
	CHECK(vfiokit_dma_unmap_all(io, NULL) == 0);
	FAILS(vfiokit_dma_unmap(io, 0x7000000, 4096), ENOENT);
	/* A range unmap takes the mappings wholly inside it and says how much; one ending inside a
	 * mapping is refused with the kernel's errno (type1 wants whole pages: -EINVAL; iommufd
	 * refuses to cut a mapping: -ENOENT), and nothing is unmapped. */
	CHECK(vfiokit_dma_map(io, buf, 4096, 0x7000000) == 0 && vfiokit_dma_map(io, buf, 4096, 0x7002000) == 0);
	u64 = 7;
	CHECK(vfiokit_dma_unmap_range(io, 0x7001000, 4096, &u64) == -ENOENT && u64 == 7); /* the gap */
	rc = vfiokit_dma_unmap_range(io, 0x7000000, 0x2800, &u64);
	CHECK(rc == (vfiokit_iommu_kind(io) == VFIOKIT_IOMMU_IOMMUFD ? -ENOENT : -EINVAL) && u64 == 7);
	CHECK(vfiokit_dma_unmap_range(io, 0x6fff000, 0x5000, &u64) == 0 && u64 == 8192);
	FAILS(vfiokit_dma_unmap_range(io, iova, 4096, NULL), EBUSY); /* the buffer's */
	CHECK(vfiokit_dma_free(io, buf) == 0);
	FAILS(vfiokit_dma_free(io, buf), EINVAL);

	/* The DMA heap: objects zeroed, aligned, disjoint, translated both ways; bad frees refused. */
	{
		void *objs[64] = {0}, *back = NULL;
		uint64_t iovas[64], at = 0;
		vfiokit_dma_heap_info hinfo;
		memset(&hinfo, 0xff, sizeof(hinfo));
		int made = 0;
		for (int i = 0; i < 64; i++, made++) {
			if (vfiokit_dma_heap_alloc(io, 64, 64, &objs[i], &iovas[i]) != 0)
				break;
			CHECK(((uintptr_t)objs[i] & 63) == 0 && ((const uint8_t *)objs[i])[63] == 0);
			CHECK(vfiokit_dma_translate(io, objs[i], 64, &at) == 0 && at == iovas[i]);
			CHECK(vfiokit_dma_to_vaddr(io, iovas[i] + 8, 8, &back) == 0 && back == (char *)objs[i] + 8);
			memset(objs[i], i, 64);
		}
		CHECK(made == 64);
		for (int i = 1; i < made; i++)
			CHECK(((const uint8_t *)objs[i - 1])[63] == (uint8_t)(i - 1)); /* no overlap */
		CHECK(vfiokit_dma_heap_get_info(io, &hinfo) == 0 && hinfo.arena_size == 2 << 20 && hinfo.arenas == 1);
		CHECK(hinfo.used == 64 << 10 && hinfo.reserved[0] == 0);
		FAILS(vfiokit_dma_heap_alloc(io, 0, 1, &p, &u64), EINVAL);
		FAILS(vfiokit_dma_heap_alloc(io, 64, 3, &p, &u64), EINVAL);
		FAILS(vfiokit_dma_heap_alloc(io, 64, 1, NULL, &u64), EINVAL);
		FAILS(vfiokit_dma_heap_get_info(io, NULL), EINVAL);
		FAILS(vfiokit_dma_heap_free(io, (char *)objs[0] + 16), EINVAL); /* inside an object */
		FAILS(vfiokit_dma_to_vaddr(io, 0x7000000, 1, &back), ENOENT);
		FAILS(vfiokit_dma_to_vaddr(io, iovas[0], 1, NULL), EINVAL);
		for (int i = 0; i < made; i++)
			CHECK(vfiokit_dma_heap_free(io, objs[i]) == 0);
		if (made > 0)
			FAILS(vfiokit_dma_heap_free(io, objs[0]), EINVAL); /* freed already */
	}

	/* A file's pages from an offset (iommufd maps the file itself: 7.3 here; 6.12 refuses). */
	{
		int fd = memfd_create("capi-file", MFD_CLOEXEC);
		void *fm = NULL;
		uint64_t fiova = 0, at = 0;
		CHECK(fd >= 0 && ftruncate(fd, 8192) == 0 && pwrite(fd, "file", 4, 4096) == 4);
		int refused = vfiokit_iommu_kind(io) == VFIOKIT_IOMMU_IOMMUFD && strcmp(env("VFIOKIT_VM_KERNEL"), "latest") != 0;
		rc = vfiokit_dma_map_file(io, fd, 4096, 4096, 0, &fm, &fiova);
		if (refused) {
			CHECK(rc == -EOPNOTSUPP && strstr(vfiokit_last_error(), "Linux 6.13"));
		} else {
			CHECK(rc == 0 && memcmp(fm, "file", 4) == 0);
			CHECK(vfiokit_dma_translate(io, fm, 4096, &at) == 0 && at == fiova);
			FAILS(vfiokit_dma_unmap(io, fiova, 4096), EBUSY);
			CHECK(vfiokit_dma_free(io, fm) == 0);
			FAILS(vfiokit_dma_free(io, fm), EINVAL);
		}
		FAILS(vfiokit_dma_map_file(io, -1, 0, 4096, 0, &fm, &fiova), EBADF);
		FAILS(vfiokit_dma_map_file(io, fd, 1, 4096, 0, &fm, &fiova), EINVAL);
		FAILS(vfiokit_dma_map_file(io, fd, 0, 0, 0, &fm, &fiova), EINVAL);
		FAILS(vfiokit_dma_map_file(io, fd, 0, 4096, VFIOKIT_DMA_HUGE_2M, &fm, &fiova), EINVAL);
		FAILS(vfiokit_dma_map_file(io, fd, 0, 4096, 0, NULL, &fiova), EINVAL);
		FAILS(vfiokit_dma_map_file(io, fd, 0, 4096, 0, &fm, NULL), EINVAL);
		close(fd);
	}

	FAILS(vfiokit_device_reset(dev), ENOTSUP);

	/* The info record, and the raw fds: the kernel's own reply agrees with the record. */
	vfiokit_device_info info;
	memset(&info, 0xff, sizeof(info));
	FAILS(vfiokit_device_get_info(dev, NULL), EINVAL);
	CHECK(vfiokit_device_get_info(dev, &info) == 0);
	CHECK(info.vendor_id == 0x1234 && info.device_id == 0x11e8 && info.class_code == 0x00ff00);
	CHECK(info.num_regions == 9 && info.num_irqs == 5);
	CHECK((info.flags & VFIOKIT_DEVICE_PCI) && !(info.flags & VFIOKIT_DEVICE_RESET));
	CHECK(info.reserved[0] == 0 && info.reserved[3] == 0 && info.reserved0[6] == 0);
	struct vfio_device_info kinfo = {.argsz = sizeof(kinfo)};
	CHECK(vfiokit_device_fd(dev) >= 0 && ioctl(vfiokit_device_fd(dev), VFIO_DEVICE_GET_INFO, &kinfo) == 0);
	CHECK(kinfo.flags == info.flags && kinfo.num_regions == info.num_regions);
	CHECK(vfiokit_iommu_fd(vfiokit_device_iommu(dev)) >= 0);
	/* Features: no mode flag, or a payload length with no payload, are refused before the kernel. */
	FAILS(vfiokit_device_feature(dev, 3, 0, NULL, 0), EINVAL);
	FAILS(vfiokit_device_feature(dev, 3, VFIOKIT_FEATURE_SET, NULL, 4), EINVAL);

	/* The context closed while its device is open: the device keeps it alive. */
	vfiokit_iommu_close(io);
	mark_error();
	vfiokit_iommu_close(io);
	CHECK(strstr(vfiokit_last_error(), "closed already") != NULL);
	CHECK(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, 0, &u32) == 0 && u32 == 0x010000ed);
	CHECK(vfiokit_dma_alloc(vfiokit_device_iommu(dev), 8192, &buf, &iova) == 0);
	CHECK(vfiokit_dma_free(vfiokit_device_iommu(dev), buf) == 0);

	vfiokit_device_close(dev);
	mark_error();
	vfiokit_device_close(dev);
	CHECK(strstr(vfiokit_last_error(), "closed already") != NULL);
}

/* Handles opened and closed many times leave no fd and no mapping behind. */
static void no_leaks(void)
{
	long fds = -1, maps = -1;
	for (int i = 0; i < 60; i++) {
		vfiokit_iommu *io = NULL;
		vfiokit_device *dev = NULL, *nvme = NULL;
		void *p, *buf;
		uint64_t iova;
		int ev[4];
		if (i == 10) { /* after the first cycles have set up process-wide state */
			fds = count_fds();
			maps = count_lines("/proc/self/maps");
		}
		CHECK(vfiokit_iommu_open(VFIOKIT_IOMMU_AUTO, &io) == 0);
		CHECK(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), io, &dev) == 0);
		CHECK(vfiokit_device_open(env("VFIOKIT_TEST_NVME"), io, &nvme) == 0);
		CHECK(vfiokit_region_map(dev, 0, &p) == 0);
		CHECK(vfiokit_region_map(nvme, 0, &p) == 0);
		CHECK(vfiokit_irq_enable(nvme, VFIOKIT_IRQ_MSIX, 0, 4, ev) == 0);
		CHECK(vfiokit_irq_enable(dev, VFIOKIT_IRQ_INTX, 0, 1, ev) == 0);
		CHECK(vfiokit_dma_alloc(io, 1 << 16, &buf, &iova) == 0);
		vfiokit_iommu_close(io);
		vfiokit_device_close(dev);
		vfiokit_device_close(nvme);
	}
	CHECK(count_fds() == fds);
	/* Under valgrind its own mappings come and go in our map (and its leak check is the test). */
	const char *preload = getenv("LD_PRELOAD");
	if (preload && strstr(preload, "vgpreload")) {
		printf("no_leaks: %ld fds after 50 cycles, as before (mappings: valgrind's)\n", fds);
		return;
	}
	CHECK(count_lines("/proc/self/maps") == maps);
	printf("no_leaks: %ld fds and %ld mappings after 50 cycles, as before\n", count_fds(),
	       count_lines("/proc/self/maps"));
}

/* The slot of nvme (function 0) and edu (function 1): a hot reset of edu needs both open. */
static void hot_reset(void)
{
	vfiokit_iommu *io = NULL;
	vfiokit_device *edu = NULL, *nvme = NULL, *lone = NULL;
	vfiokit_hot_reset_dep deps[4];
	size_t n = 0;

	CHECK(vfiokit_iommu_open(VFIOKIT_IOMMU_AUTO, &io) == 0);
	CHECK(vfiokit_device_open(env("VFIOKIT_TEST_RESET_EDU"), io, &edu) == 0);
	FAILS(vfiokit_device_hot_reset_info(edu, NULL, 1, &n), EINVAL);
	FAILS(vfiokit_device_hot_reset_info(edu, deps, 4, NULL), EINVAL);
	CHECK(vfiokit_device_hot_reset_info(edu, NULL, 0, &n) == 0 && n == 2);
	CHECK(vfiokit_device_hot_reset_info(edu, deps, 4, &n) == 0 && n == 2);
	CHECK(strcmp(deps[0].address, env("VFIOKIT_TEST_RESET_NVME")) == 0 && deps[0].owned == 0);
	CHECK(strcmp(deps[1].address, env("VFIOKIT_TEST_RESET_EDU")) == 0 && deps[1].owned == 1);
	CHECK(deps[0].group == deps[1].group);
	FAILS(vfiokit_device_hot_reset(edu), EPERM);
	CHECK(strstr(vfiokit_last_error(), env("VFIOKIT_TEST_RESET_NVME")) != NULL);
	CHECK(vfiokit_device_open(env("VFIOKIT_TEST_RESET_NVME"), io, &nvme) == 0);
	CHECK(vfiokit_device_hot_reset(edu) == 0);
	CHECK(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), io, &lone) == 0);
	FAILS(vfiokit_device_hot_reset(lone), ENOTSUP);
	vfiokit_device_close(lone);
	vfiokit_device_close(nvme);
	vfiokit_device_close(edu);
	vfiokit_iommu_close(io);
}

/* The SR-IOV PF gets a VF token, enables its 2 VFs, and a VF opens with the token only (on the
 * cdev from Linux 6.17: the 7.3 guest; before, refused naming 6.17). */
static void sriov(void)
{
	const char *pf_addr = env("VFIOKIT_TEST_SRIOV_PF");
	const char *token = "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3";
	vfiokit_iommu *io = NULL;
	vfiokit_device *pf = NULL, *vf = NULL;
	vfiokit_vf vfs[4];
	size_t n = 0;
	uint16_t vendor = 0;

	CHECK(vfiokit_iommu_open(VFIOKIT_IOMMU_AUTO, &io) == 0);
	CHECK(vfiokit_device_open(pf_addr, io, &pf) == 0);
	CHECK(vfiokit_device_set_vf_token(pf, token) == 0);
	CHECK(vfiokit_pci_sriov_set_numvfs(pf_addr, 2, vfs, 4, &n) == 0 && n == 2);
	CHECK(vfs[0].index == 0 && vfs[1].index == 1 && strcmp(vfs[0].address, vfs[1].address) != 0);
	if (vfiokit_iommu_kind(io) == VFIOKIT_IOMMU_IOMMUFD && strcmp(env("VFIOKIT_VM_KERNEL"), "latest") != 0) {
		FAILS(vfiokit_device_open_vf(vfs[0].address, token, io, &vf), EOPNOTSUPP);
		CHECK(strstr(vfiokit_last_error(), "6.17") != NULL);
	} else {
		FAILS(vfiokit_device_open(vfs[0].address, io, &vf), EACCES);
		CHECK(strstr(vfiokit_last_error(), pf_addr) != NULL);
		FAILS(vfiokit_device_open_vf(vfs[0].address, "00000000-0000-0000-0000-000000000001", io, &vf), EACCES);
		CHECK(vfiokit_device_open_vf(vfs[0].address, token, io, &vf) == 0);
		CHECK(vfiokit_read16(vf, VFIOKIT_PCI_CONFIG, 0, &vendor) == 0 && vendor == 0x1b36);
		vfiokit_device_close(vf);
	}
	CHECK(vfiokit_pci_sriov_set_numvfs(pf_addr, 0, NULL, 0, &n) == 0 && n == 0);
	vfiokit_device_close(pf);
	vfiokit_iommu_close(io);
}

/* doctor on a ready device and on a missing one: records filled, the most severe first. */
static void doctor(void)
{
	vfiokit_finding found[16];
	size_t n = 0, i;
	int blockers = 0;

	CHECK(vfiokit_doctor(env("VFIOKIT_TEST_EDU"), found, 16, &n) == 0 && n <= 16);
	for (i = 0; i < n; i++)
		blockers += found[i].severity == VFIOKIT_SEVERITY_BLOCKER;
	CHECK(blockers == 0);
	CHECK(vfiokit_doctor("0000:00:1e.7", NULL, 0, &n) == 0 && n >= 1);
	CHECK(vfiokit_doctor("0000:00:1e.7", found, 1, &n) == 0);
	CHECK(found[0].code == VFIOKIT_FINDING_NO_DEVICE && found[0].severity == VFIOKIT_SEVERITY_BLOCKER);
	CHECK(strcmp(found[0].subject, "0000:00:1e.7") == 0 && strstr(found[0].message, "no PCI device") != NULL);
}

/* A root process hands a context with edu to a child running as nobody, which cannot open edu
 * itself and drives it through the adopted context; a second handoff of garbage is refused. */
static void handoff(void)
{
	const char *edu = env("VFIOKIT_TEST_EDU");
	const char *names[] = {edu};
	vfiokit_iommu *io = NULL;
	int sv[2], status = 0;
	pid_t pid;

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	CHECK(vfiokit_iommu_open(VFIOKIT_IOMMU_AUTO, &io) == 0);
	FAILS(vfiokit_iommu_export(io, NULL, 1, sv[0]), EINVAL);
	FAILS(vfiokit_iommu_export(io, names, 1, -1), EBADF);
	CHECK(vfiokit_iommu_export(io, names, 1, sv[0]) == 0);
	vfiokit_iommu_close(io);
	CHECK(write(sv[0], "not a handoff, but 24 bytes", 24) == 24);
	pid = fork();
	if (pid == 0) {
		struct rlimit rl = {64 << 20, 64 << 20};
		vfiokit_iommu *adopted = NULL, *garbage = NULL;
		vfiokit_device *dev = NULL;
		void *buf = NULL;
		uint64_t iova = 0, count = 0;
		int efd = -1;
		int ok = setrlimit(RLIMIT_MEMLOCK, &rl) == 0 && setgid(65534) == 0 && setuid(65534) == 0;
		ok = ok && vfiokit_device_open(edu, NULL, &dev) == -EACCES;
		ok = ok && vfiokit_iommu_adopt(sv[1], &adopted) == 0;
		ok = ok && vfiokit_device_open(edu, adopted, &dev) == 0;
		ok = ok && vfiokit_dma_alloc(adopted, 4096, &buf, &iova) == 0;
		ok = ok && vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 1, &efd) == 0;
		ok = ok && vfiokit_irq_trigger(dev, VFIOKIT_IRQ_MSI, 0) == 0;
		ok = ok && vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, 1000, &count) == 0 && count == 1;
		ok = ok && vfiokit_iommu_adopt(sv[1], &garbage) == -EPROTO && garbage == NULL;
		if (!ok)
			fprintf(stderr, "handoff child: %s\n", vfiokit_last_error());
		vfiokit_device_close(dev);
		vfiokit_iommu_close(adopted);
		_exit(ok ? 0 : 1);
	}
	CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	close(sv[0]);
	close(sv[1]);
}

/* Live handover of edu with a DMA buffer to a forked child: bad arguments and a receiver
 * without room (-ENOSPC) leave it ours; then the child takes it and finds the buffer at its
 * IOVA. On an iommufd before Linux 6.13 (all but the latest guest): -EOPNOTSUPP. */
static void live_handover(void)
{
	vfiokit_iommu *io = NULL;
	vfiokit_device *dev = NULL;
	void *buf = NULL;
	uint64_t iova = 0;
	int sv[2], status = 0;
	pid_t pid;

	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	CHECK(vfiokit_iommu_open(VFIOKIT_IOMMU_AUTO, &io) == 0);
	CHECK(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), io, &dev) == 0);
	CHECK(vfiokit_dma_alloc_flags(io, 4096, VFIOKIT_DMA_SHAREABLE, &buf, &iova) == 0);
	memset(buf, 0x5a, 4096);
	if (vfiokit_iommu_kind(io) == VFIOKIT_IOMMU_IOMMUFD && strcmp(env("VFIOKIT_VM_KERNEL"), "latest") != 0) {
		FAILS(vfiokit_iommu_hand_over(io, &dev, 1, sv[0]), EOPNOTSUPP);
		CHECK(strstr(vfiokit_last_error(), "Linux 6.13") != NULL);
		goto out;
	}
	FAILS(vfiokit_iommu_hand_over(io, NULL, 1, sv[0]), EINVAL);
	FAILS(vfiokit_iommu_hand_over(io, &dev, 1, -1), EBADF);
	FAILS(vfiokit_iommu_hand_over(io, NULL, 0, sv[0]), EBUSY); /* edu left out */
	pid = fork();
	if (pid == 0) {
		vfiokit_iommu *taken = NULL;
		vfiokit_device *devs[1] = {NULL};
		void *at = NULL;
		size_t n = 0;
		uint32_t id = 0;
		int ok = vfiokit_iommu_take_over(sv[1], &taken, devs, 0, &n) == -ENOSPC && taken == NULL;
		ok = ok && vfiokit_iommu_take_over(sv[1], &taken, devs, 1, &n) == 0 && n == 1;
		ok = ok && vfiokit_read32(devs[0], VFIOKIT_PCI_BAR0, 0, &id) == 0 && id == 0x010000ed;
		ok = ok && vfiokit_dma_to_vaddr(taken, iova, 4096, &at) == 0;
		ok = ok && ((unsigned char *)at)[4095] == 0x5a;
		if (!ok)
			fprintf(stderr, "live handover child: %s\n", vfiokit_last_error());
		vfiokit_device_close(devs[0]);
		vfiokit_iommu_close(taken);
		_exit(ok ? 0 : 1);
	}
	CHECK(pid > 0);
	FAILS(vfiokit_iommu_hand_over(io, &dev, 1, sv[0]), ENOSPC);
	CHECK(strstr(vfiokit_last_error(), "still owns") != NULL);
	CHECK(vfiokit_iommu_hand_over(io, &dev, 1, sv[0]) == 0);
	FAILS(vfiokit_dma_alloc(io, 4096, &buf, &iova), EBADF);
	CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
	buf = NULL;
out:
	if (buf)
		CHECK(vfiokit_dma_free(io, buf) == 0);
	vfiokit_device_close(dev);
	vfiokit_iommu_close(io);
	close(sv[0]);
	close(sv[1]);
}

int main(void)
{
	CHECK(vfiokit_last_error()[0] == '\0');
	null_arguments();
	bad_names();
	noiommu_refused();
	with_edu();
	handoff();
	live_handover();
	doctor();
	sriov();
	hot_reset();
	no_leaks();
	printf("capi: %d passed, %d failed\n", passed, failed);
	return failed != 0;
}
