/* nvme-identify: a minimal NVMe driver in userspace, enough to ask a controller who it is.
 *
 * Shows, in order:
 *   - a function reset (vfiokit_device_reset: FLR on NVMe), then bus mastering;
 *   - 64- and 32-bit register accesses in BAR0 (CAP, VS, CC, CSTS, AQA, ASQ, ACQ), and the
 *     doorbells as registers checked once (vfiokit_register), then rung with one store each;
 *   - the controller disabled (CC.EN = 0, wait for CSTS.RDY = 0), its admin submission and
 *     completion queues built in DMA memory (vfiokit_dma_alloc), and enabled again;
 *   - one MSI-X vector enabled (vector 0: the admin completion queue's), with the MSI-X table
 *     inside BAR0 programmed by the kernel, not by us;
 *   - IDENTIFY CONTROLLER (opcode 0x06, CNS 1) with a 4 KiB DMA buffer as PRP1, its completion
 *     awaited on the MSI-X vector (vfiokit_irq_wait), the completion entry's phase, command id
 *     and status checked, and the model, serial number and firmware revision printed;
 *   - an orderly shutdown (CC.SHN, wait for CSTS.SHST), then everything closed.
 * A vfiokit failure prints vfiokit_last_error() and exits 1; a controller that misbehaves
 * (timeout, fatal status, error completion) exits 2.
 *
 * Usage: nvme-identify [PCI-ADDRESS]   (default: the first NVMe controller bound to vfio-pci) */
#define _DEFAULT_SOURCE
#define EXAMPLE "nvme-identify"
#include "example.h"

#include <dirent.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Controller registers (BAR0), NVMe base specification section 3.1. */
enum {
	NVME_CAP = 0x00,  /* 64-bit: MQES 15:0, TO 31:24 (500 ms units), DSTRD 35:32 */
	NVME_VS = 0x08,   /* version: major 31:16, minor 15:8 */
	NVME_CC = 0x14,   /* EN 0, CSS 6:4, MPS 10:7, AMS 13:11, SHN 15:14, IOSQES 19:16, IOCQES 23:20 */
	NVME_CSTS = 0x1c, /* RDY 0, CFS 1, SHST 3:2 */
	NVME_AQA = 0x24,  /* admin queue sizes (0-based): ACQS 27:16, ASQS 11:0 */
	NVME_ASQ = 0x28,  /* 64-bit: admin submission queue base */
	NVME_ACQ = 0x30,  /* 64-bit: admin completion queue base */
	NVME_DOORBELLS = 0x1000,
};
#define CC_EN 0x1
#define CC_SHN_NORMAL (1u << 14)
#define CC_IOSQES (6u << 16) /* 64-byte submission entries */
#define CC_IOCQES (4u << 20) /* 16-byte completion entries */
#define CSTS_RDY 0x1
#define CSTS_CFS 0x2
#define CSTS_SHST_MASK (3u << 2)
#define CSTS_SHST_DONE (2u << 2)

#define QUEUE_DEPTH 16 /* admin queue entries; one command is all we send */
#define ADMIN_IDENTIFY 0x06
#define IDENTIFY_CNS_CONTROLLER 1
#define COMMAND_ID 0x1234
#define IRQ_TIMEOUT_MS 10000

struct nvme_command { /* 64 bytes */
	uint32_t cdw0;    /* opcode 7:0, command id 31:16 */
	uint32_t nsid;
	uint64_t reserved;
	uint64_t mptr;
	uint64_t prp1, prp2;
	uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};
struct nvme_completion { /* 16 bytes */
	uint32_t result, reserved;
	uint16_t sq_head, sq_id;
	uint16_t command_id;
	uint16_t status; /* phase tag in bit 0, status field in 15:1 */
};
_Static_assert(sizeof(struct nvme_command) == 64, "NVMe submission entries are 64 bytes");
_Static_assert(sizeof(struct nvme_completion) == 16, "NVMe completion entries are 16 bytes");

static int fail_free(void)
{
	fprintf(stderr, "nvme-identify: vfiokit_dma_free failed: %s\n", vfiokit_last_error());
	return 1;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Polls CSTS until (CSTS & mask) == want: 0 when it is, 1 after timeout_s, <0 on failure. */
static int wait_csts(vfiokit_device *dev, uint32_t mask, uint32_t want, double timeout_s, uint32_t *csts)
{
	double deadline = now() + timeout_s;
	for (;;) {
		int rc = vfiokit_read32(dev, VFIOKIT_PCI_BAR0, NVME_CSTS, csts);
		if (rc < 0)
			return rc;
		if ((*csts & mask) == want)
			return 0;
		if (now() > deadline)
			return 1;
		nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
	}
}

/* Copies an identify string field without its space padding. */
static void field(char *out, const unsigned char *data, int from, int to)
{
	int len = to - from + 1;
	memcpy(out, data + from, len);
	while (len > 0 && (out[len - 1] == ' ' || out[len - 1] == '\0'))
		len--;
	out[len] = '\0';
}

int main(int argc, char **argv)
{
	char found[256], model[41], serial[21], firmware[9];
	const char *address = argc > 1 ? argv[1] : NULL;
	vfiokit_device *dev = NULL;
	vfiokit_iommu *iommu = NULL;
	void *sq_buf = NULL, *cq_buf = NULL, *id_buf = NULL;
	void *sq0_tail, *cq0_head; /* the admin queues' doorbells */
	struct nvme_command *sq;
	volatile struct nvme_completion *cq; /* written by the controller */
	unsigned char *identify;
	uint64_t cap, sq_iova, cq_iova, id_iova, count;
	uint32_t vs, cc, csts, stride;
	uint16_t cmd, st;
	int status = 1, efd, rc;
	double timeout_s;

	address = pick_device(address, 0, 0, 0x010802, "NVMe controller", found, sizeof found);
	if (!address)
		return 1;
	TRY(vfiokit_device_open(address, NULL, &dev));
	iommu = vfiokit_device_iommu(dev);

	/* A clean start: reset the function (NVMe controllers support FLR), then let it master
	 * the bus for its queue accesses, data transfers and MSI-X messages. */
	rc = vfiokit_device_reset(dev);
	if (rc < 0 && rc != -ENOTSUP) {
		fprintf(stderr, "nvme-identify: vfiokit_device_reset failed: %s\n", vfiokit_last_error());
		goto out;
	}
	TRY(vfiokit_read16(dev, VFIOKIT_PCI_CONFIG, 0x04, &cmd));
	TRY(vfiokit_write16(dev, VFIOKIT_PCI_CONFIG, 0x04, cmd | 0x6)); /* memory space, bus master */

	TRY(vfiokit_read64(dev, VFIOKIT_PCI_BAR0, NVME_CAP, &cap));
	TRY(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, NVME_VS, &vs));
	stride = 4u << ((cap >> 32) & 0xf);                     /* doorbell stride */
	TRY(vfiokit_register(dev, VFIOKIT_PCI_BAR0, NVME_DOORBELLS + 0 * stride, 4, &sq0_tail));
	TRY(vfiokit_register(dev, VFIOKIT_PCI_BAR0, NVME_DOORBELLS + 1 * stride, 4, &cq0_head));
	timeout_s = (((cap >> 24) & 0xff) ? (cap >> 24) & 0xff : 1) * 0.5; /* CAP.TO */
	EXPECT(((cap & 0xffff) + 1) >= QUEUE_DEPTH, "queues of at most %u entries", (unsigned)(cap & 0xffff) + 1);
	printf("nvme-identify: opened %s%s: NVMe %u.%u, queues up to %u entries, doorbell stride %u\n",
	       address, rc == -ENOTSUP ? "" : " and reset it", vs >> 16, (vs >> 8) & 0xff,
	       (unsigned)(cap & 0xffff) + 1, stride);

	/* Disable the controller before touching its admin queue registers. */
	TRY(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, NVME_CC, &cc));
	if (cc & CC_EN)
		TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, NVME_CC, cc & ~CC_EN));
	TRY(rc = wait_csts(dev, CSTS_RDY, 0, timeout_s, &csts));
	EXPECT(rc == 0, "CSTS.RDY still 1 %.1f s after disabling (CSTS %#x)", timeout_s, csts);

	/* The admin queues and the identify buffer, in memory the controller can reach. */
	TRY(vfiokit_dma_alloc(iommu, QUEUE_DEPTH * sizeof *sq, &sq_buf, &sq_iova));
	TRY(vfiokit_dma_alloc(iommu, QUEUE_DEPTH * sizeof *cq, &cq_buf, &cq_iova));
	TRY(vfiokit_dma_alloc(iommu, 4096, &id_buf, &id_iova));
	sq = sq_buf;
	cq = cq_buf;
	identify = id_buf;
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, NVME_AQA, (QUEUE_DEPTH - 1) << 16 | (QUEUE_DEPTH - 1)));
	TRY(vfiokit_write64(dev, VFIOKIT_PCI_BAR0, NVME_ASQ, sq_iova));
	TRY(vfiokit_write64(dev, VFIOKIT_PCI_BAR0, NVME_ACQ, cq_iova));

	/* MSI-X vector 0 signals the admin completion queue. vfiokit_irq_enable gives one eventfd
	 * per vector; the kernel writes the MSI-X table entry in BAR0 for us. */
	TRY(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSIX, 0, 1, &efd));

	/* Enable: NVM command set, 4 KiB pages, 64/16-byte queue entries. */
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, NVME_CC, CC_IOCQES | CC_IOSQES | CC_EN));
	TRY(rc = wait_csts(dev, CSTS_RDY | CSTS_CFS, CSTS_RDY, timeout_s, &csts));
	EXPECT(rc == 0, "controller not ready %.1f s after enabling (CSTS %#x)", timeout_s, csts);
	printf("  controller disabled, admin queues built (%d entries at IOVA %#llx and %#llx), enabled\n",
	       QUEUE_DEPTH, (unsigned long long)sq_iova, (unsigned long long)cq_iova);

	/* IDENTIFY CONTROLLER into the 4 KiB buffer, then ring the admin submission doorbell. */
	sq[0] = (struct nvme_command){
		.cdw0 = ADMIN_IDENTIFY | (uint32_t)COMMAND_ID << 16,
		.prp1 = id_iova,
		.cdw10 = IDENTIFY_CNS_CONTROLLER,
	};
	atomic_thread_fence(memory_order_seq_cst); /* the entry is in memory before the doorbell */
	vfiokit_mmio_write32(sq0_tail, 0, 1);

	TRY(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSIX, 0, IRQ_TIMEOUT_MS, &count));
	atomic_thread_fence(memory_order_seq_cst);
	st = cq[0].status;
	EXPECT(st & 1, "the completion entry's phase tag is 0: the controller posted nothing");
	EXPECT(cq[0].command_id == COMMAND_ID, "completion for command %#x, sent %#x", cq[0].command_id, COMMAND_ID);
	EXPECT((st >> 1) == 0, "IDENTIFY failed: status code type %u, status code %#x", (st >> 9) & 7, (st >> 1) & 0xff);
	EXPECT(cq[0].sq_head == 1, "submission queue head %u after one command", cq[0].sq_head);
	/* We consumed the entry: tell the controller (CQ 0 head doorbell). */
	vfiokit_mmio_write32(cq0_head, 0, 1);
	printf("  IDENTIFY CONTROLLER completed by MSI-X vector 0 (eventfd %d): phase 1, status 0\n", efd);

	field(serial, identify, 4, 23);
	field(model, identify, 24, 63);
	field(firmware, identify, 64, 71);
	printf("  identify data: 4 KiB written by the controller at IOVA %#llx (PCI vendor %04x)\n",
	       (unsigned long long)id_iova, identify[0] | identify[1] << 8);

	/* Orderly shutdown, then disable. */
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, NVME_CC, CC_IOCQES | CC_IOSQES | CC_EN | CC_SHN_NORMAL));
	TRY(rc = wait_csts(dev, CSTS_SHST_MASK, CSTS_SHST_DONE, timeout_s, &csts));
	EXPECT(rc == 0, "shutdown not complete after %.1f s (CSTS %#x)", timeout_s, csts);
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, NVME_CC, 0));
	TRY(rc = wait_csts(dev, CSTS_RDY, 0, timeout_s, &csts));
	EXPECT(rc == 0, "CSTS.RDY still 1 %.1f s after disabling (CSTS %#x)", timeout_s, csts);
	TRY(vfiokit_irq_disable(dev, VFIOKIT_IRQ_MSIX));
	printf("  controller shut down and disabled\n");
	printf("model: %s\nserial: %s\nfirmware: %s\n", model, serial, firmware);
	status = 0;
out:
	/* After a failure, stop the controller before its queues and buffers go away. */
	if (status != 0 && sq_buf && vfiokit_write32(dev, VFIOKIT_PCI_BAR0, NVME_CC, 0) < 0)
		fprintf(stderr, "nvme-identify: disabling the controller failed: %s\n", vfiokit_last_error());
	if (id_buf && vfiokit_dma_free(iommu, id_buf) < 0)
		status = fail_free();
	if (cq_buf && vfiokit_dma_free(iommu, cq_buf) < 0)
		status = fail_free();
	if (sq_buf && vfiokit_dma_free(iommu, sq_buf) < 0)
		status = fail_free();
	vfiokit_device_close(dev); /* disables MSI-X, unmaps BAR0, closes the fds */
	return status;
}
