/* edu: a small userspace driver for QEMU's "edu" teaching device (1234:11e8).
 *
 * Shows, in order:
 *   - opening a device and mapping a BAR (vfiokit_region_map): the id and liveness registers
 *     read and written through the pointer (through vfiokit_read32/write32 where the BAR has
 *     no mmap, as a vfio-user server may keep its registers behind messages);
 *   - bus mastering (PCI command register, config region), needed for DMA and MSI;
 *   - MSI: a factorial computed by the device, its completion signalled by an interrupt
 *     (vfiokit_irq_enable, vfiokit_irq_wait);
 *   - DMA: a buffer from vfiokit_dma_alloc on the device's DMA context (vfiokit_device_iommu),
 *     copied into the device and back into a second buffer, each transfer completed by an
 *     interrupt, and the data compared;
 *   - INTx: automasked by the kernel when it fires; acknowledged in the device and unmasked
 *     with vfiokit_irq_unmask to get the next one.
 * Every call is checked; a failure prints vfiokit_last_error() and exits 1, a result that is
 * not what the device should give exits 2.
 *
 * Usage: edu [PCI-ADDRESS | vfio-user:SOCKET]   (default: the first 1234:11e8 device bound
 * to vfio-pci) */
#define _DEFAULT_SOURCE
#define EXAMPLE "edu"
#include "example.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* edu's registers, in BAR0. */
enum {
	EDU_ID = 0x00,         /* 0x010000ed: major 1, minor 0, 0xed */
	EDU_LIVENESS = 0x04,   /* reads back the bitwise inverse of what was written */
	EDU_FACTORIAL = 0x08,  /* write n; reads n! once STATUS bit 0 has cleared */
	EDU_STATUS = 0x20,     /* bit 0: computing; bit 7: interrupt when the factorial is done */
	EDU_IRQ_STATUS = 0x24, /* pending interrupt bits */
	EDU_IRQ_RAISE = 0x60,  /* bits written here are ORed into IRQ_STATUS: raises an interrupt */
	EDU_IRQ_ACK = 0x64,    /* bits written here are cleared from IRQ_STATUS */
	EDU_DMA_SRC = 0x80, EDU_DMA_DST = 0x88, EDU_DMA_COUNT = 0x90, EDU_DMA_CMD = 0x98,
};
#define EDU_STATUS_COMPUTING 0x01
#define EDU_STATUS_IRQ_FACT 0x80
#define EDU_FACT_IRQ 0x001     /* the interrupt bit of a finished factorial */
#define EDU_DMA_IRQ 0x100      /* the interrupt bit of a finished DMA */
#define EDU_DMA_START 0x1
#define EDU_DMA_TO_RAM 0x2     /* direction: device buffer -> RAM (else RAM -> device) */
#define EDU_DMA_IRQ_WHEN_DONE 0x4
#define EDU_BUFFER 0x40000     /* the device's 4 KiB DMA buffer, as a device address */
#define DMA_LEN 2048           /* edu transfers must stay below 4096 bytes */
#define TIMEOUT_MS 10000       /* generous: emulated machines (and valgrind) are slow */

#define PCI_COMMAND 0x04
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4

/* A BAR0 register through the mapping, or through the accessors where BAR0 has none. */
static int reg_read(vfiokit_device *dev, volatile uint32_t *bar0, uint64_t off, uint32_t *val)
{
	if (!bar0)
		return vfiokit_read32(dev, VFIOKIT_PCI_BAR0, off, val);
	*val = bar0[off / 4];
	return 0;
}

static int reg_write(vfiokit_device *dev, volatile uint32_t *bar0, uint64_t off, uint32_t val)
{
	if (!bar0)
		return vfiokit_write32(dev, VFIOKIT_PCI_BAR0, off, val);
	bar0[off / 4] = val;
	return 0;
}

static const char *kind_name(uint32_t kind)
{
	switch (kind) {
	case VFIOKIT_IOMMU_IOMMUFD: return "iommufd";
	case VFIOKIT_IOMMU_VFIO_USER: return "vfio-user";
	case VFIOKIT_IOMMU_NOIOMMU: return "no-IOMMU";
	default: return "type1 container";
	}
}

/* Reads the pending interrupt bits and acknowledges them. */
static int ack(vfiokit_device *dev, uint32_t *pending)
{
	int rc = vfiokit_read32(dev, VFIOKIT_PCI_BAR0, EDU_IRQ_STATUS, pending);
	return rc < 0 ? rc : vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_IRQ_ACK, *pending);
}

/* One DMA transfer of DMA_LEN bytes, with an interrupt when done. */
static int dma(vfiokit_device *dev, uint64_t src, uint64_t dst, uint64_t cmd)
{
	int rc;
	if ((rc = vfiokit_write64(dev, VFIOKIT_PCI_BAR0, EDU_DMA_SRC, src)) < 0 ||
	    (rc = vfiokit_write64(dev, VFIOKIT_PCI_BAR0, EDU_DMA_DST, dst)) < 0 ||
	    (rc = vfiokit_write64(dev, VFIOKIT_PCI_BAR0, EDU_DMA_COUNT, DMA_LEN)) < 0)
		return rc;
	return vfiokit_write64(dev, VFIOKIT_PCI_BAR0, EDU_DMA_CMD, cmd | EDU_DMA_START | EDU_DMA_IRQ_WHEN_DONE);
}

int main(int argc, char **argv)
{
	char found[256];
	const char *address = argc > 1 ? argv[1] : NULL;
	vfiokit_device *dev = NULL;
	vfiokit_iommu *iommu;
	void *map, *src_buf = NULL, *dst_buf = NULL;
	volatile uint32_t *bar0; /* device memory: every access must really happen */
	unsigned char *src, *dst;
	uint64_t src_iova, dst_iova, count;
	uint32_t val, pending, live;
	uint16_t cmd;
	int status = 1, efd, rc;

	address = pick_device(address, 0x1234, 0x11e8, 0, "edu device (1234:11e8)", found, sizeof found);
	if (!address)
		return 1;
	TRY(vfiokit_device_open(address, NULL, &dev));
	iommu = vfiokit_device_iommu(dev);
	printf("edu: opened %s (DMA context: %s)\n", address, kind_name(vfiokit_iommu_kind(iommu)));

	/* Registers through the mapping of BAR0, where it can be mapped. */
	rc = vfiokit_region_map(dev, VFIOKIT_PCI_BAR0, &map);
	if (rc != -ENOTSUP)
		TRY(rc);
	bar0 = rc == 0 ? map : NULL;
	TRY(reg_read(dev, bar0, EDU_ID, &val));
	EXPECT(val == 0x010000ed, "id register reads %#x, not 0x010000ed", val);
	TRY(reg_write(dev, bar0, EDU_LIVENESS, 0x12345678));
	TRY(reg_read(dev, bar0, EDU_LIVENESS, &live));
	EXPECT(live == ~0x12345678u, "liveness returned %#x for 0x12345678", live);
	printf("  id %#010x (version %u.%u), liveness check: wrote 0x12345678, read back %#x (%s)\n",
	       val, val >> 24, (val >> 16) & 0xff, live,
	       bar0 ? "through the mapping" : "BAR0 has no mmap: through the accessors");

	/* DMA and MSI are memory writes by the device: let it master the bus. */
	TRY(vfiokit_read16(dev, VFIOKIT_PCI_CONFIG, PCI_COMMAND, &cmd));
	TRY(vfiokit_write16(dev, VFIOKIT_PCI_CONFIG, PCI_COMMAND, cmd | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY));

	/* A factorial, its completion signalled by MSI. */
	TRY(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 1, &efd));
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_STATUS, EDU_STATUS_IRQ_FACT));
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_FACTORIAL, 10));
	TRY(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, TIMEOUT_MS, &count));
	TRY(ack(dev, &pending));
	EXPECT(pending == EDU_FACT_IRQ, "interrupt status %#x after a factorial, not %#x", pending, EDU_FACT_IRQ);
	TRY(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, EDU_STATUS, &val));
	EXPECT(!(val & EDU_STATUS_COMPUTING), "still computing after the completion interrupt");
	TRY(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, EDU_FACTORIAL, &val));
	EXPECT(val == 3628800, "10! computed as %u", val);
	printf("  factorial: 10! = %u, completion by MSI (eventfd %d)\n", val, efd);
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_STATUS, 0));

	/* DMA: RAM -> device buffer -> another RAM buffer, each transfer ending in an MSI. */
	TRY(vfiokit_dma_alloc(iommu, 4096, &src_buf, &src_iova));
	TRY(vfiokit_dma_alloc(iommu, 4096, &dst_buf, &dst_iova));
	src = src_buf;
	dst = dst_buf;
	/* vfiokit's allocator starts low; without an IOMMU the IOVAs are physical addresses,
	 * which need edu's dma_mask widened (the test bed does). */
	EXPECT(vfiokit_iommu_kind(iommu) == VFIOKIT_IOMMU_NOIOMMU ||
	               (src_iova + 4096 <= 1u << 28 && dst_iova + 4096 <= 1u << 28),
	       "IOVAs %#llx, %#llx beyond edu's 28-bit reach", (unsigned long long)src_iova,
	       (unsigned long long)dst_iova);
	for (int i = 0; i < DMA_LEN; i++)
		src[i] = (unsigned char)(i * 7 + 3);
	TRY(dma(dev, src_iova, EDU_BUFFER, 0));
	TRY(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, TIMEOUT_MS, &count));
	TRY(ack(dev, &pending));
	EXPECT(pending == EDU_DMA_IRQ, "interrupt status %#x after a DMA, not %#x", pending, EDU_DMA_IRQ);
	TRY(dma(dev, EDU_BUFFER, dst_iova, EDU_DMA_TO_RAM));
	TRY(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, TIMEOUT_MS, &count));
	TRY(ack(dev, &pending));
	EXPECT(pending == EDU_DMA_IRQ, "interrupt status %#x after a DMA, not %#x", pending, EDU_DMA_IRQ);
	for (int i = 0; i < DMA_LEN; i++)
		EXPECT(dst[i] == src[i], "DMA data differs at byte %d: %#x, sent %#x", i, dst[i], src[i]);
	printf("  DMA: %d bytes from IOVA %#llx into the device and back to IOVA %#llx, identical; "
	       "each transfer completed by MSI\n",
	       DMA_LEN, (unsigned long long)src_iova, (unsigned long long)dst_iova);
	TRY(vfiokit_irq_disable(dev, VFIOKIT_IRQ_MSI));

	/* INTx: with MSI off, edu asserts its INTx pin. The kernel masks INTx when it fires. */
	TRY(vfiokit_irq_enable(dev, VFIOKIT_IRQ_INTX, 0, 1, &efd));
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_IRQ_RAISE, 0x1));
	TRY(vfiokit_irq_wait(dev, VFIOKIT_IRQ_INTX, 0, TIMEOUT_MS, &count));
	TRY(ack(dev, &pending));
	EXPECT(pending == 0x1, "INTx status %#x, raised 0x1", pending);
	/* Still masked: the next interrupt is held back... */
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_IRQ_RAISE, 0x2));
	rc = vfiokit_irq_wait(dev, VFIOKIT_IRQ_INTX, 0, 200, &count);
	EXPECT(rc == -ETIMEDOUT, "an INTx arrived while masked (wait returned %d)", rc);
	/* ...until unmasked, when the kernel delivers it. */
	TRY(vfiokit_irq_unmask(dev, VFIOKIT_IRQ_INTX, 0));
	TRY(vfiokit_irq_wait(dev, VFIOKIT_IRQ_INTX, 0, TIMEOUT_MS, &count));
	TRY(ack(dev, &pending));
	EXPECT(pending == 0x2, "INTx status %#x, raised 0x2", pending);
	TRY(vfiokit_irq_unmask(dev, VFIOKIT_IRQ_INTX, 0));
	printf("  INTx: interrupt 0x1 seen and acknowledged; 0x2 held back while automasked, "
	       "delivered by vfiokit_irq_unmask\n");
	TRY(vfiokit_irq_disable(dev, VFIOKIT_IRQ_INTX));

	printf("edu: all results as expected\n");
	status = 0;
out:
	if (dst_buf && vfiokit_dma_free(vfiokit_device_iommu(dev), dst_buf) < 0) {
		fprintf(stderr, "edu: vfiokit_dma_free: %s\n", vfiokit_last_error());
		status = 1;
	}
	if (src_buf && vfiokit_dma_free(vfiokit_device_iommu(dev), src_buf) < 0) {
		fprintf(stderr, "edu: vfiokit_dma_free: %s\n", vfiokit_last_error());
		status = 1;
	}
	vfiokit_device_close(dev); /* disables the IRQs, unmaps BAR0, closes the fds */
	return status;
}
