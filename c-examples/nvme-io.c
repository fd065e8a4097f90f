/* nvme-io: an NVMe I/O driver in userspace: I/O queue pairs driven by threads, completions by
 * MSI-X or by polling, PRP lists, and a workload of writes, reads back and a byte-for-byte
 * verify, with IOPS and latency percentiles.
 *
 * Shows, in order:
 *   - the controller brought up as nvme-identify does it (function reset, bus mastering,
 *     CC.EN = 0, admin queues, CC.EN = 1), with every DMA object carved from the context's DMA
 *     heap (vfiokit_dma_heap_alloc): queues page-aligned, PRP lists, data buffers;
 *   - IDENTIFY CONTROLLER (model, serial, MDTS), the active namespace list and IDENTIFY
 *     NAMESPACE (LBA size and count), SET FEATURES Number of Queues. Without an address, the
 *     first NVMe controller bound to vfio-pci that has a namespace;
 *   - N I/O queue pairs (CREATE I/O COMPLETION QUEUE, CREATE I/O SUBMISSION QUEUE): by default
 *     each completion queue signals an MSI-X vector of its own (1..N; the admin queue has vector
 *     0); with --polled their interrupts are off (IEN = 0) and the threads poll the queues;
 *   - one thread per queue pair, all sharing one device handle, each on its own LBA range:
 *     writes of a pattern distinct per queue, pass and run, each followed by a read of the same
 *     blocks into a poisoned buffer, compared byte for byte. Transfers of 4 KiB (PRP1 alone),
 *     8 KiB (PRP1 and PRP2) and 16 and 64 KiB (PRP2 points at a PRP list), the PRP entries
 *     being the IOVAs of the data pages from vfiokit_dma_translate; a completed read checked
 *     through the controller's eyes: each PRP entry mapped back to an address with
 *     vfiokit_dma_to_vaddr, the page there compared with the pattern;
 *   - every completion's phase, command id, submission queue id and head, and status checked;
 *   - IOPS, throughput and latency percentiles (submission to completion seen). Under QEMU's
 *     TCG these measure the emulation, not a disk, and it says so;
 *   - the I/O queues deleted, an orderly shutdown, everything freed and closed.
 * A vfiokit failure prints vfiokit_last_error() and exits 1; a controller that misbehaves
 * (timeout, error status, a wrong completion) or data that differs exits 2.
 *
 * Without an IOMMU (VFIOKIT_IOMMU=noiommu) the heap gives objects over 4 KiB only from a free
 * 2 MiB hugepage (/proc/sys/vm/nr_hugepages); with none, transfers are kept to 4 KiB, and it
 * says so.
 *
 * Usage: nvme-io [--polled] [--queues N] [--commands N] [--depth N] [PCI-ADDRESS]
 *   --queues N    I/O queue pairs and threads (default 2, at most 16)
 *   --commands N  commands in all, half writes and half reads (default 16000)
 *   --depth N     commands in flight per queue (default 16, at most 63) */
#define _DEFAULT_SOURCE
#define EXAMPLE "nvme-io"
#include "example.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

/* Controller registers (BAR0), NVMe base specification section 3.1. */
enum {
	NVME_CAP = 0x00,  /* 64-bit: MQES 15:0, TO 31:24, DSTRD 35:32, CSS 44:37, MPSMIN 51:48 */
	NVME_VS = 0x08,
	NVME_CC = 0x14,
	NVME_CSTS = 0x1c,
	NVME_AQA = 0x24,
	NVME_ASQ = 0x28,
	NVME_ACQ = 0x30,
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

enum { /* admin commands */
	ADMIN_DELETE_SQ = 0x00,
	ADMIN_CREATE_SQ = 0x01,
	ADMIN_DELETE_CQ = 0x04,
	ADMIN_CREATE_CQ = 0x05,
	ADMIN_IDENTIFY = 0x06,
	ADMIN_SET_FEATURES = 0x09,
};
enum { NVM_WRITE = 0x01, NVM_READ = 0x02 };
enum { CNS_NAMESPACE = 0, CNS_CONTROLLER = 1, CNS_ACTIVE_NAMESPACES = 2 };
#define FEATURE_NUMBER_OF_QUEUES 0x07
#define QUEUE_PHYS_CONTIG 0x1 /* CREATE I/O CQ/SQ CDW11.PC */
#define QUEUE_IRQ_ENABLED 0x2 /* CREATE I/O CQ CDW11.IEN */

#define PAGE 4096u           /* the controller's memory page size (CC.MPS = 0) */
#define ADMIN_ENTRIES 16
#define IO_ENTRIES 64        /* an I/O submission queue is one page: 64 entries of 64 bytes */
#define MAX_QUEUES 16
#define MAX_DEPTH (IO_ENTRIES - 1)
#define SLOT_BITS 6          /* a command id: generation << SLOT_BITS | slot */
#define DEFAULT_QUEUES 2
#define DEFAULT_COMMANDS 16000
#define DEFAULT_DEPTH 16
#define TIMEOUT_S 30.0       /* a queue that completes nothing for this long has failed */
#define POISON 0xa5          /* a read's buffer before the read: data the pattern never is */

/* Transfer sizes, in turn: PRP1 alone, PRP1 + PRP2, and a PRP list of 3 and of 15 entries. */
static const uint32_t transfer_sizes[] = {4096, 8192, 16384, 65536};
#define NSIZES (sizeof transfer_sizes / sizeof transfer_sizes[0])

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
_Static_assert(MAX_DEPTH < (1 << SLOT_BITS), "a slot number fits its command id bits");

/* One command in flight: its data buffer and PRP list (heap objects) and what it does. */
struct slot {
	unsigned char *data;      /* max_transfer bytes, page-aligned */
	uint64_t *prp_list;       /* entries for pages 1.. of a transfer of more than 2 pages */
	uint64_t prp_list_iova;
	bool busy;
	uint16_t cid, generation;
	uint8_t opcode;
	uint64_t lba, tag;        /* where, and the pattern's tag */
	uint32_t bytes;
	uint64_t prp1, prp2;      /* as submitted */
	uint64_t t0_ns;           /* when the doorbell was rung */
};

struct ctrl;

struct queue {
	struct ctrl *c;
	uint16_t qid, entries;
	int vector;                          /* MSI-X vector waited on; -1: polled */
	struct nvme_command *sq;             /* heap objects, page-aligned */
	volatile struct nvme_completion *cq; /* written by the controller */
	uint64_t sq_iova, cq_iova;
	void *sq_db, *cq_db;                 /* the tail and head doorbells */
	uint16_t sq_tail, sq_head, cq_head, phase, next_cid;
	bool cq_created, sq_created;
	/* An I/O queue pair's thread: its work and what it found. */
	pthread_t thread;
	bool started;
	struct slot *slots;
	unsigned depth, inflight;
	uint64_t first_lba, lbas;            /* its own LBA range */
	unsigned extents;                    /* writes to do, each read back */
	unsigned writes, reads, passes, bad_reads;
	uint64_t bytes_moved, bytes_verified, mismatched_bytes, interrupts;
	uint64_t *write_ns, *read_ns;        /* latencies, one per command done */
	int status;                          /* 0, 1 (vfiokit failed) or 2 (device or data) */
};

struct ctrl {
	vfiokit_device *dev;
	vfiokit_iommu *iommu;
	const char *address;
	uint64_t cap;
	uint32_t vs, stride;
	double timeout_s;                    /* CAP.TO */
	bool polled, touched;                /* touched: CC written, queues may be live */
	unsigned vectors;                    /* MSI-X vectors enabled */
	int efds[MAX_QUEUES + 1];
	uint16_t io_entries;
	struct queue admin;
	unsigned char *id;                   /* identify data, a 4 KiB heap object */
	uint64_t id_iova;
	char model[41], serial[21], firmware[9];
	uint32_t max_transfer, nsid, lba_size;
	uint64_t lba_count;
	uint32_t sizes[NSIZES];
	unsigned nsizes, nqueues;
	struct queue io[MAX_QUEUES];
};

static atomic_int abort_all; /* a thread failed: the others stop */
static uint64_t run_nonce;   /* part of every pattern: an earlier run's data never verifies */

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
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

static uint32_t le32(const unsigned char *p)
{
	return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p)
{
	return le32(p) | (uint64_t)le32(p + 4) << 32;
}

/* The pattern of `len` bytes at byte `offset` of the extent at `lba`: one 64-bit word per 8
 * bytes, distinct for every byte address of the namespace and every tag (queue, pass, run). */
static void pattern(unsigned char *out, uint64_t tag, uint32_t lba_size, uint64_t lba, uint32_t offset,
		    uint32_t len)
{
	uint64_t addr = lba * lba_size + offset;
	for (uint32_t o = 0; o < len; o += 8) {
		uint64_t v = tag ^ ((addr + o) * 0x9e3779b97f4a7c15ull);
		memcpy(out + o, &v, 8);
	}
}

/* ---------------------------------------------------------------------------------------------
 * Queues: the entries, the doorbells, the completions. */

/* A queue pair's memory (heap objects, page-aligned, as CDW11.PC and ASQ/ACQ require) and its
 * doorbells (registers checked once, then one store each). */
static int queue_setup(struct ctrl *c, struct queue *q, uint16_t qid, uint16_t entries, int vector)
{
	int status = 1;
	void *sq, *cq;
	q->c = c;
	q->qid = qid;
	q->entries = entries;
	q->vector = vector;
	q->phase = 1;
	TRY(vfiokit_dma_heap_alloc(c->iommu, entries * sizeof(struct nvme_command), PAGE, &sq, &q->sq_iova));
	q->sq = sq;
	TRY(vfiokit_dma_heap_alloc(c->iommu, entries * sizeof(struct nvme_completion), PAGE, &cq, &q->cq_iova));
	q->cq = cq;
	TRY(vfiokit_register(c->dev, VFIOKIT_PCI_BAR0, NVME_DOORBELLS + (2u * qid) * c->stride, 4, &q->sq_db));
	TRY(vfiokit_register(c->dev, VFIOKIT_PCI_BAR0, NVME_DOORBELLS + (2u * qid + 1) * c->stride, 4, &q->cq_db));
	status = 0;
out:
	return status;
}

static void submit(struct queue *q, const struct nvme_command *cmd)
{
	q->sq[q->sq_tail] = *cmd;
	q->sq_tail = (q->sq_tail + 1) % q->entries;
}

static void ring_sq(struct queue *q)
{
	atomic_thread_fence(memory_order_seq_cst); /* the entries are in memory before the doorbell */
	vfiokit_mmio_write32(q->sq_db, 0, q->sq_tail);
}

/* The next completion entry, if the controller has posted one (its phase tag is the queue's
 * current phase): 1 with it in *e, else 0. */
static int next_completion(struct queue *q, struct nvme_completion *e)
{
	volatile struct nvme_completion *p = &q->cq[q->cq_head];
	uint16_t st = p->status;
	if ((st & 1) != q->phase)
		return 0;
	atomic_thread_fence(memory_order_acquire); /* the rest of the entry after its phase */
	e->result = p->result;
	e->sq_head = p->sq_head;
	e->sq_id = p->sq_id;
	e->command_id = p->command_id;
	e->status = st;
	if (++q->cq_head == q->entries) {
		q->cq_head = 0;
		q->phase ^= 1;
	}
	return 1;
}

/* Tells the controller which entries were consumed (the CQ head doorbell). */
static void ring_cq(struct queue *q)
{
	vfiokit_mmio_write32(q->cq_db, 0, q->cq_head);
}

/* Until the queue may have a new completion: its MSI-X vector fires (an interrupt-driven queue;
 * none until `deadline` fails the queue), or the CPU is yielded once (a polled queue). */
static int await_completion(struct queue *q, double deadline, const char *what)
{
	int status = 1, rc;
	uint64_t count;
	if (q->vector < 0) {
		EXPECT(now() < deadline, "%s: no completion in %.0f s (polled)", what, TIMEOUT_S);
		sched_yield();
		return 0;
	}
	rc = vfiokit_irq_wait(q->c->dev, VFIOKIT_IRQ_MSIX, q->vector, (int)((deadline - now()) * 1000) + 1, &count);
	EXPECT(rc != -ETIMEDOUT, "%s: no interrupt on MSI-X vector %d in %.0f s", what, q->vector, TIMEOUT_S);
	TRY(rc);
	q->interrupts += count;
	status = 0;
out:
	return status;
}

/* One admin command, awaited: the completion's command id, queue and status checked; its
 * result (dword 0) into *result when given. */
static int admin(struct ctrl *c, struct nvme_command cmd, const char *what, uint32_t *result)
{
	struct queue *q = &c->admin;
	struct nvme_completion e;
	double deadline = now() + TIMEOUT_S;
	uint16_t cid = q->next_cid++;
	int status = 1;

	cmd.cdw0 |= (uint32_t)cid << 16;
	submit(q, &cmd);
	ring_sq(q);
	while (!next_completion(q, &e))
		if ((status = await_completion(q, deadline, what)) != 0)
			goto out;
	status = 1;
	ring_cq(q);
	EXPECT(e.command_id == cid && e.sq_id == 0, "%s: completion for command %#x of queue %u, sent %#x to queue 0",
	       what, e.command_id, e.sq_id, cid);
	EXPECT((e.status >> 1) == 0, "%s failed: status code type %u, status code %#x", what, (e.status >> 9) & 7,
	       (e.status >> 1) & 0xff);
	EXPECT(e.sq_head == q->sq_tail, "%s: admin queue head %u, tail %u", what, e.sq_head, q->sq_tail);
	q->sq_head = e.sq_head;
	if (result)
		*result = e.result;
	status = 0;
out:
	return status;
}

static int identify(struct ctrl *c, uint32_t cns, uint32_t nsid, const char *what)
{
	memset(c->id, 0, PAGE);
	return admin(c, (struct nvme_command){.cdw0 = ADMIN_IDENTIFY, .nsid = nsid, .prp1 = c->id_iova, .cdw10 = cns},
		     what, NULL);
}

/* ---------------------------------------------------------------------------------------------
 * The controller: up, identified, its namespace; down. */

static int bring_up(struct ctrl *c, const char *address, unsigned want_queues)
{
	int status = 1, rc;
	uint16_t cmd;
	uint32_t cc, csts, mqes, mpsmin, mdts, flbas, lbaf;
	uint64_t id_iova;
	void *id;
	const vfiokit_irq *irqs;
	size_t nirqs;
	const unsigned char *d;

	c->address = address;
	TRY(vfiokit_device_open(address, NULL, &c->dev));
	c->iommu = vfiokit_device_iommu(c->dev);
	rc = vfiokit_device_reset(c->dev);
	if (rc < 0 && rc != -ENOTSUP) {
		fprintf(stderr, "nvme-io: vfiokit_device_reset failed: %s\n", vfiokit_last_error());
		goto out;
	}
	TRY(vfiokit_read16(c->dev, VFIOKIT_PCI_CONFIG, 0x04, &cmd));
	TRY(vfiokit_write16(c->dev, VFIOKIT_PCI_CONFIG, 0x04, cmd | 0x6)); /* memory space, bus master */

	TRY(vfiokit_read64(c->dev, VFIOKIT_PCI_BAR0, NVME_CAP, &c->cap));
	TRY(vfiokit_read32(c->dev, VFIOKIT_PCI_BAR0, NVME_VS, &c->vs));
	mqes = (c->cap & 0xffff) + 1;
	mpsmin = (c->cap >> 48) & 0xf;
	c->stride = 4u << ((c->cap >> 32) & 0xf);
	c->timeout_s = (((c->cap >> 24) & 0xff) ? (c->cap >> 24) & 0xff : 1) * 0.5;
	EXPECT(mqes >= ADMIN_ENTRIES, "queues of at most %u entries", mqes);
	EXPECT(mpsmin == 0, "the smallest memory page is %u KiB, not 4", 4u << mpsmin);
	EXPECT((c->cap >> 37) & 1, "the controller lacks the NVM command set (CAP.CSS %#x)",
	       (unsigned)((c->cap >> 37) & 0xff));
	c->io_entries = mqes < IO_ENTRIES ? mqes : IO_ENTRIES;
	printf("nvme-io: opened %s%s: NVMe %u.%u, queues up to %u entries, doorbell stride %u\n", address,
	       rc == -ENOTSUP ? "" : " and reset it", c->vs >> 16, (c->vs >> 8) & 0xff, mqes, c->stride);

	TRY(vfiokit_read32(c->dev, VFIOKIT_PCI_BAR0, NVME_CC, &cc));
	c->touched = true;
	if (cc & CC_EN)
		TRY(vfiokit_write32(c->dev, VFIOKIT_PCI_BAR0, NVME_CC, cc & ~CC_EN));
	TRY(rc = wait_csts(c->dev, CSTS_RDY, 0, c->timeout_s, &csts));
	EXPECT(rc == 0, "CSTS.RDY still 1 %.1f s after disabling (CSTS %#x)", c->timeout_s, csts);

	/* Admin queues and the identify buffer, all heap objects; admin completions on MSI-X vector 0
	 * (polled with --polled). MSI-X is enabled in both modes, all vectors at once (kernels before
	 * 6.5 cannot add vectors to enabled MSI-X): the admin queue's interrupts always fire (the
	 * specification has no IEN for it), and without MSI-X they would be INTx, which nobody
	 * handles. */
	if ((status = queue_setup(c, &c->admin, 0, ADMIN_ENTRIES, c->polled ? -1 : 0)) != 0)
		goto out;
	status = 1;
	TRY(vfiokit_dma_heap_alloc(c->iommu, PAGE, PAGE, &id, &id_iova));
	c->id = id;
	c->id_iova = id_iova;
	TRY(vfiokit_write32(c->dev, VFIOKIT_PCI_BAR0, NVME_AQA, (ADMIN_ENTRIES - 1) << 16 | (ADMIN_ENTRIES - 1)));
	TRY(vfiokit_write64(c->dev, VFIOKIT_PCI_BAR0, NVME_ASQ, c->admin.sq_iova));
	TRY(vfiokit_write64(c->dev, VFIOKIT_PCI_BAR0, NVME_ACQ, c->admin.cq_iova));
	irqs = vfiokit_device_irqs(c->dev, &nirqs);
	EXPECT(irqs && nirqs > VFIOKIT_IRQ_MSIX && irqs[VFIOKIT_IRQ_MSIX].count >= 1, "no MSI-X vectors");
	c->vectors = c->polled ? 1 : 1 + want_queues;
	if (c->vectors > irqs[VFIOKIT_IRQ_MSIX].count)
		c->vectors = irqs[VFIOKIT_IRQ_MSIX].count;
	TRY(vfiokit_irq_enable(c->dev, VFIOKIT_IRQ_MSIX, 0, c->vectors, c->efds));

	TRY(vfiokit_write32(c->dev, VFIOKIT_PCI_BAR0, NVME_CC, CC_IOCQES | CC_IOSQES | CC_EN));
	TRY(rc = wait_csts(c->dev, CSTS_RDY | CSTS_CFS, CSTS_RDY, c->timeout_s, &csts));
	EXPECT(rc == 0, "controller not ready %.1f s after enabling (CSTS %#x)", c->timeout_s, csts);

	if ((status = identify(c, CNS_CONTROLLER, 0, "IDENTIFY CONTROLLER")) != 0)
		goto out;
	status = 1;
	field(c->serial, c->id, 4, 23);
	field(c->model, c->id, 24, 63);
	field(c->firmware, c->id, 64, 71);
	mdts = c->id[77]; /* 2^MDTS minimum pages; 0: no limit */
	c->max_transfer = transfer_sizes[NSIZES - 1];
	if (mdts && mdts < 20 && (PAGE << mdts) < c->max_transfer)
		c->max_transfer = PAGE << mdts;
	printf("  controller: %s, serial %s, firmware %s, largest transfer %u KiB (MDTS %u)\n", c->model, c->serial,
	       c->firmware, c->max_transfer / 1024, mdts);

	/* The first active namespace, if any. */
	if ((status = identify(c, CNS_ACTIVE_NAMESPACES, 0, "IDENTIFY active namespace list")) != 0)
		goto out;
	status = 1;
	c->nsid = le32(c->id);
	if (c->nsid) {
		if ((status = identify(c, CNS_NAMESPACE, c->nsid, "IDENTIFY NAMESPACE")) != 0)
			goto out;
		status = 1;
		d = c->id;
		c->lba_count = le64(d);
		flbas = d[26] & 0xf;
		lbaf = le32(d + 128 + 4 * flbas);
		EXPECT((lbaf & 0xffff) == 0, "namespace %u has %u bytes of metadata per block", c->nsid, lbaf & 0xffff);
		EXPECT(((lbaf >> 16) & 0xff) >= 9 && ((lbaf >> 16) & 0xff) <= 12,
		       "namespace %u has blocks of 2^%u bytes", c->nsid, (lbaf >> 16) & 0xff);
		c->lba_size = 1u << ((lbaf >> 16) & 0xff);
		printf("  namespace %u: %llu blocks of %u bytes (%llu MiB)\n", c->nsid, (unsigned long long)c->lba_count,
		       c->lba_size, (unsigned long long)(c->lba_count * c->lba_size >> 20));
	}
	status = 0;
out:
	return status;
}

/* The I/O queue pairs, deleted (submission queues first), then an orderly shutdown. */
static int shut_down(struct ctrl *c)
{
	int status = 1, rc;
	uint32_t csts;
	char what[64];
	for (unsigned i = 0; i < c->nqueues; i++) {
		struct queue *q = &c->io[i];
		if (q->sq_created) {
			snprintf(what, sizeof what, "DELETE I/O SUBMISSION QUEUE %u", q->qid);
			if ((status = admin(c, (struct nvme_command){.cdw0 = ADMIN_DELETE_SQ, .cdw10 = q->qid}, what, NULL)))
				goto out;
			q->sq_created = false;
		}
		if (q->cq_created) {
			snprintf(what, sizeof what, "DELETE I/O COMPLETION QUEUE %u", q->qid);
			if ((status = admin(c, (struct nvme_command){.cdw0 = ADMIN_DELETE_CQ, .cdw10 = q->qid}, what, NULL)))
				goto out;
			q->cq_created = false;
		}
	}
	status = 1;
	TRY(vfiokit_write32(c->dev, VFIOKIT_PCI_BAR0, NVME_CC, CC_IOCQES | CC_IOSQES | CC_EN | CC_SHN_NORMAL));
	TRY(rc = wait_csts(c->dev, CSTS_SHST_MASK, CSTS_SHST_DONE, c->timeout_s, &csts));
	EXPECT(rc == 0, "shutdown not complete after %.1f s (CSTS %#x)", c->timeout_s, csts);
	TRY(vfiokit_write32(c->dev, VFIOKIT_PCI_BAR0, NVME_CC, 0));
	TRY(rc = wait_csts(c->dev, CSTS_RDY, 0, c->timeout_s, &csts));
	EXPECT(rc == 0, "CSTS.RDY still 1 %.1f s after disabling (CSTS %#x)", c->timeout_s, csts);
	c->touched = false;
	TRY(vfiokit_irq_disable(c->dev, VFIOKIT_IRQ_MSIX));
	status = 0;
out:
	return status;
}

static int heap_free(struct ctrl *c, void *p, int status)
{
	if (p && vfiokit_dma_heap_free(c->iommu, p) < 0) {
		fprintf(stderr, "nvme-io: vfiokit_dma_heap_free failed: %s\n", vfiokit_last_error());
		return 1;
	}
	return status;
}

static int free_buffers(struct ctrl *c, struct queue *q, int status)
{
	for (unsigned s = 0; q->slots && s < q->depth; s++) {
		status = heap_free(c, q->slots[s].data, status);
		status = heap_free(c, q->slots[s].prp_list, status);
		q->slots[s].data = NULL;
		q->slots[s].prp_list = NULL;
	}
	return status;
}

/* Everything released, the device closed; after a failure the controller is disabled first
 * (CC.EN = 0 aborts whatever it still has), before its queues and buffers go. */
static int release(struct ctrl *c, int status)
{
	if (c->touched && vfiokit_write32(c->dev, VFIOKIT_PCI_BAR0, NVME_CC, 0) < 0)
		fprintf(stderr, "nvme-io: disabling the controller failed: %s\n", vfiokit_last_error());
	for (unsigned i = 0; i < MAX_QUEUES; i++) {
		struct queue *q = &c->io[i];
		status = free_buffers(c, q, status);
		status = heap_free(c, q->sq, status);
		status = heap_free(c, (void *)q->cq, status);
		free(q->slots);
		free(q->write_ns);
		free(q->read_ns);
	}
	status = heap_free(c, c->admin.sq, status);
	status = heap_free(c, (void *)c->admin.cq, status);
	status = heap_free(c, c->id, status);
	vfiokit_device_close(c->dev); /* disables MSI-X, unmaps BAR0, closes the fds */
	memset(c, 0, sizeof *c);
	return status;
}

/* ---------------------------------------------------------------------------------------------
 * I/O: queue pairs and the threads that drive them. */

static int create_queues(struct ctrl *c, unsigned want)
{
	int status = 1;
	uint32_t granted;
	char what[64];

	/* Number of Queues (0-based counts, submission in 15:0, completion in 31:16). */
	if ((status = admin(c, (struct nvme_command){.cdw0 = ADMIN_SET_FEATURES, .cdw10 = FEATURE_NUMBER_OF_QUEUES,
						 .cdw11 = (want - 1) << 16 | (want - 1)},
			    "SET FEATURES Number of Queues", &granted)))
		goto out;
	status = 1;
	c->nqueues = want;
	if ((granted & 0xffff) + 1 < c->nqueues)
		c->nqueues = (granted & 0xffff) + 1;
	if ((granted >> 16) + 1 < c->nqueues)
		c->nqueues = (granted >> 16) + 1;
	if (!c->polled && c->vectors - 1 < c->nqueues)
		c->nqueues = c->vectors - 1;
	EXPECT(c->nqueues >= 1, "no I/O queue to create (granted %#x, %u MSI-X vectors)", granted, c->vectors);
	for (unsigned i = 0; i < c->nqueues; i++) {
		struct queue *q = &c->io[i];
		uint16_t qid = i + 1;
		if ((status = queue_setup(c, q, qid, c->io_entries, c->polled ? -1 : qid)) != 0)
			goto out;
		snprintf(what, sizeof what, "CREATE I/O COMPLETION QUEUE %u", qid);
		if ((status = admin(c, (struct nvme_command){
					       .cdw0 = ADMIN_CREATE_CQ,
					       .prp1 = q->cq_iova,
					       .cdw10 = (uint32_t)(q->entries - 1) << 16 | qid,
					       .cdw11 = (c->polled ? 0 : (uint32_t)qid << 16 | QUEUE_IRQ_ENABLED) |
							QUEUE_PHYS_CONTIG,
				       },
				    what, NULL)))
			goto out;
		q->cq_created = true;
		snprintf(what, sizeof what, "CREATE I/O SUBMISSION QUEUE %u", qid);
		if ((status = admin(c, (struct nvme_command){
					       .cdw0 = ADMIN_CREATE_SQ,
					       .prp1 = q->sq_iova,
					       .cdw10 = (uint32_t)(q->entries - 1) << 16 | qid,
					       .cdw11 = (uint32_t)qid << 16 | QUEUE_PHYS_CONTIG, /* its CQ, priority 0 */
				       },
				    what, NULL)))
			goto out;
		q->sq_created = true;
		status = 1;
	}
	status = 0;
out:
	return status;
}

/* Each slot's data buffer (`bytes`, page-aligned) and PRP list (one entry per page after the
 * first, in an object aligned to its power-of-two size so that it never crosses a page: the
 * controller would take the last entry of a page for a pointer to the next list). */
static int alloc_buffers(struct ctrl *c, struct queue *q, uint32_t bytes)
{
	size_t list = 8;
	void *p;
	uint64_t iova;
	while (list < 8 * (bytes / PAGE - 1))
		list *= 2;
	for (unsigned s = 0; s < q->depth; s++) {
		int rc = vfiokit_dma_heap_alloc(c->iommu, bytes, PAGE, &p, &iova);
		if (rc < 0)
			return rc;
		q->slots[s].data = p;
		if ((rc = vfiokit_dma_heap_alloc(c->iommu, list, list, &p, &q->slots[s].prp_list_iova)) < 0)
			return rc;
		q->slots[s].prp_list = p;
	}
	return 0;
}

/* The PRP entries of a transfer from the slot's buffer, from each data page's IOVA: PRP1 the
 * first page, PRP2 the second or (more than two pages) the PRP list holding the rest. */
static int build_prps(struct ctrl *c, struct slot *s)
{
	int status = 1;
	unsigned pages = s->bytes / PAGE;
	uint64_t iova;
	TRY(vfiokit_dma_translate(c->iommu, s->data, PAGE, &s->prp1));
	s->prp2 = 0;
	for (unsigned p = 1; p < pages; p++) {
		TRY(vfiokit_dma_translate(c->iommu, s->data + p * PAGE, PAGE, &iova));
		if (pages == 2)
			s->prp2 = iova;
		else
			s->prp_list[p - 1] = iova;
	}
	if (pages > 2)
		s->prp2 = s->prp_list_iova;
	status = 0;
out:
	return status;
}

/* Puts a read or write of the slot's extent on the queue (the doorbell is the caller's). */
static int start(struct queue *q, struct slot *s, unsigned index, uint8_t opcode)
{
	struct ctrl *c = q->c;
	int status;
	uint32_t nlb = s->bytes / c->lba_size;
	s->opcode = opcode;
	if ((status = build_prps(c, s)) != 0)
		return status;
	s->generation = (s->generation + 1) & ((1u << (16 - SLOT_BITS)) - 1);
	s->cid = (uint16_t)(s->generation << SLOT_BITS | index);
	s->busy = true;
	submit(q, &(struct nvme_command){
			  .cdw0 = opcode | (uint32_t)s->cid << 16,
			  .nsid = c->nsid,
			  .prp1 = s->prp1,
			  .prp2 = s->prp2,
			  .cdw10 = (uint32_t)s->lba,
			  .cdw11 = (uint32_t)(s->lba >> 32),
			  .cdw12 = nlb - 1,
		  });
	return 0;
}

/* A completed read, compared byte for byte with the pattern, page by page as the controller
 * wrote it: each PRP entry (PRP1, then PRP2 or the list's entries) mapped back to an address. */
static int verify(struct queue *q, struct slot *s)
{
	struct ctrl *c = q->c;
	int status = 1;
	unsigned pages = s->bytes / PAGE;
	unsigned char expect[PAGE];
	uint64_t bad = 0;
	void *page;
	for (unsigned p = 0; p < pages; p++) {
		uint64_t iova = p == 0 ? s->prp1 : pages == 2 ? s->prp2 : s->prp_list[p - 1];
		TRY(vfiokit_dma_to_vaddr(c->iommu, iova, PAGE, &page));
		EXPECT(page == s->data + p * PAGE, "queue %u: IOVA %#llx maps back to %p, not to page %u of its buffer %p",
		       q->qid, (unsigned long long)iova, page, p, (void *)s->data);
		pattern(expect, s->tag, c->lba_size, s->lba, p * PAGE, PAGE);
		if (memcmp(page, expect, PAGE) != 0) {
			const unsigned char *got = page;
			unsigned first = PAGE;
			for (unsigned i = 0; i < PAGE; i++)
				if (got[i] != expect[i]) {
					bad++;
					if (first == PAGE)
						first = i;
				}
			if (q->bad_reads < 3)
				fprintf(stderr,
					"nvme-io: queue %u: read of LBA %llu (%u bytes) differs in page %u from byte %u: "
					"%02x, written %02x\n",
					q->qid, (unsigned long long)s->lba, s->bytes, p, first, got[first], expect[first]);
		}
	}
	q->bytes_verified += s->bytes;
	q->mismatched_bytes += bad;
	q->bad_reads += bad != 0;
	status = 0;
out:
	return status;
}

/* The queue pair's work: passes over its LBA range, each a run of extents of the sizes in turn;
 * every extent written with the pass's pattern, then, once the write completed, read back from
 * the same slot into its poisoned buffer and verified. A new pass starts when the last one is
 * all read back. */
static int run_queue(struct queue *q)
{
	struct ctrl *c = q->c;
	struct nvme_completion e;
	int status = 1;
	unsigned size_i = 0, left = q->extents;
	uint64_t pass_lba = 0, tag = 0;
	double deadline = now() + TIMEOUT_S;
	char what[48];

	snprintf(what, sizeof what, "queue %u", q->qid);
	for (;;) {
		bool rung = false;
		unsigned reaped = 0;
		/* Idle slots take the next extents' writes. */
		for (unsigned i = 0; i < q->depth && left > 0 && !atomic_load(&abort_all); i++) {
			struct slot *s = &q->slots[i];
			uint32_t bytes = c->sizes[size_i];
			if (s->busy)
				continue;
			if (pass_lba + bytes / c->lba_size > q->lbas || q->passes == 0) {
				if (q->inflight > 0)
					break; /* the range is full: a new pass once the old one is read back */
				q->passes++;
				pass_lba = 0;
				tag = run_nonce ^ (uint64_t)q->qid << 56 ^ (uint64_t)q->passes << 40;
			}
			s->lba = q->first_lba + pass_lba;
			s->bytes = bytes;
			s->tag = tag;
			pattern(s->data, tag, c->lba_size, s->lba, 0, bytes);
			if ((status = start(q, s, i, NVM_WRITE)) != 0)
				goto out;
			status = 1;
			pass_lba += bytes / c->lba_size;
			size_i = (size_i + 1) % c->nsizes;
			left--;
			q->inflight++;
			rung = true;
		}
		if (rung) {
			uint64_t t = now_ns();
			for (unsigned i = 0; i < q->depth; i++)
				if (q->slots[i].busy && q->slots[i].t0_ns == 0)
					q->slots[i].t0_ns = t;
			ring_sq(q);
		}
		if (q->inflight == 0 && (left == 0 || atomic_load(&abort_all)))
			break;

		/* What completed: checked, recorded; a write's slot goes on to the read. */
		rung = false;
		while (next_completion(q, &e)) {
			uint64_t t = now_ns();
			unsigned i = e.command_id & ((1u << SLOT_BITS) - 1);
			struct slot *s = &q->slots[i];
			reaped++;
			EXPECT(e.sq_id == q->qid, "%s: a completion for submission queue %u", what, e.sq_id);
			EXPECT(e.sq_head < q->entries, "%s: submission queue head %u of %u entries", what, e.sq_head, q->entries);
			EXPECT(i < q->depth && s->busy && s->cid == e.command_id,
			       "%s: a completion for command %#x, which is not in flight", what, e.command_id);
			EXPECT((e.status >> 1) == 0, "%s: %s of LBA %llu (%u bytes) failed: status code type %u, status code %#x",
			       what, s->opcode == NVM_WRITE ? "write" : "read", (unsigned long long)s->lba, s->bytes,
			       (e.status >> 9) & 7, (e.status >> 1) & 0xff);
			q->sq_head = e.sq_head;
			q->bytes_moved += s->bytes;
			if (s->opcode == NVM_WRITE) {
				q->write_ns[q->writes++] = t - s->t0_ns;
				memset(s->data, POISON, s->bytes);
				s->t0_ns = 0;
				if ((status = start(q, s, i, NVM_READ)) != 0)
					goto out;
				status = 1;
				rung = true;
			} else {
				q->read_ns[q->reads++] = t - s->t0_ns;
				s->t0_ns = 0;
				s->busy = false;
				q->inflight--;
				if ((status = verify(q, s)) != 0)
					goto out;
				status = 1;
			}
		}
		if (reaped) {
			ring_cq(q);
			if (rung) {
				uint64_t t = now_ns();
				for (unsigned i = 0; i < q->depth; i++)
					if (q->slots[i].busy && q->slots[i].t0_ns == 0)
						q->slots[i].t0_ns = t;
				ring_sq(q);
			}
			deadline = now() + TIMEOUT_S;
			continue;
		}
		if (atomic_load(&abort_all))
			break;
		if ((status = await_completion(q, deadline, what)) != 0)
			goto out;
		status = 1;
	}
	status = 0;
out:
	return status;
}

/* The work: `extents` writes, each read back, shared out between the queues, and the
 * namespace split between them, each range a whole number of the largest transfers; each
 * queue's slots, their buffers and latency records. */
static int prepare_work(struct ctrl *c, unsigned depth, unsigned extents)
{
	int status = 1, rc = 0;
	uint32_t unit = c->max_transfer / c->lba_size;
	for (unsigned i = 0; i < c->nqueues; i++) {
		struct queue *q = &c->io[i];
		q->depth = depth;
		q->lbas = c->lba_count / c->nqueues / unit * unit;
		q->first_lba = i * q->lbas;
		q->extents = extents / c->nqueues + (i < extents % c->nqueues);
		EXPECT(q->lbas >= unit, "namespace %u is too small for %u queues", c->nsid, c->nqueues);
		q->slots = calloc(depth, sizeof *q->slots);
		q->write_ns = calloc(q->extents + 1, sizeof *q->write_ns);
		q->read_ns = calloc(q->extents + 1, sizeof *q->read_ns);
		EXPECT(q->slots && q->write_ns && q->read_ns, "out of memory");
	}
	for (unsigned i = 0; i < c->nqueues && rc == 0; i++)
		rc = alloc_buffers(c, &c->io[i], c->max_transfer);
	if (rc == -ENOMEM && c->max_transfer > PAGE && vfiokit_iommu_kind(c->iommu) == VFIOKIT_IOMMU_NOIOMMU) {
		/* No IOMMU and no free hugepage: heap objects of a page at most. Again with those. */
		printf("  no IOMMU, and too few free 2 MiB hugepages for heap objects over 4 KiB "
		       "(/proc/sys/vm/nr_hugepages): transfers of 4 KiB only\n");
		c->max_transfer = PAGE;
		for (unsigned i = 0; i < c->nqueues; i++)
			if ((status = free_buffers(c, &c->io[i], 0)) != 0)
				goto out;
		status = 1;
		rc = 0;
		for (unsigned i = 0; i < c->nqueues && rc == 0; i++)
			rc = alloc_buffers(c, &c->io[i], c->max_transfer);
	}
	if (rc < 0) {
		fprintf(stderr, "nvme-io: vfiokit_dma_heap_alloc of DMA buffers failed (%s): %s\n", strerror(-rc),
			vfiokit_last_error());
		goto out;
	}
	for (unsigned i = 0; i < NSIZES; i++)
		if (transfer_sizes[i] <= c->max_transfer && transfer_sizes[i] % c->lba_size == 0)
			c->sizes[c->nsizes++] = transfer_sizes[i];
	EXPECT(c->nsizes > 0, "no transfer size fits blocks of %u bytes", c->lba_size);
	status = 0;
out:
	return status;
}

static void *worker(void *arg)
{
	struct queue *q = arg;
	q->status = run_queue(q);
	if (q->status != 0) {
		/* The others stop: a waiting one is woken through its vector. */
		atomic_store(&abort_all, 1);
		for (unsigned i = 0; i < q->c->nqueues; i++)
			if (q->c->io[i].vector > 0 && &q->c->io[i] != q &&
			    vfiokit_irq_trigger(q->c->dev, VFIOKIT_IRQ_MSIX, q->c->io[i].vector) < 0)
				fprintf(stderr, "nvme-io: waking queue %u failed: %s\n", q->c->io[i].qid,
					vfiokit_last_error());
	}
	return NULL;
}

static int compare_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void print_ns(const char *label, uint64_t ns)
{
	if (ns >= 10000000)
		printf("%s %.1f ms", label, ns / 1e6);
	else
		printf("%s %.0f us", label, ns / 1e3);
}

/* Latency percentiles of `n` values (sorted here). */
static void percentiles(const char *what, uint64_t *ns, size_t n)
{
	if (n == 0)
		return;
	qsort(ns, n, sizeof *ns, compare_u64);
	printf("  %s latency:", what);
	print_ns(" p50", ns[n / 2]);
	print_ns(", p99", ns[n * 99 / 100]);
	print_ns(", max", ns[n - 1]);
	printf(" (%zu commands)\n", n);
}

/* What the figures measure: on QEMU's TCG the emulation's speed (CPUID's hypervisor leaf says
 * "TCGTCGTCGTCG"), on another emulated controller still not a disk's. */
static const char *speed_note(const struct ctrl *c)
{
#if defined(__x86_64__) || defined(__i386__)
	unsigned a, b, cx, d;
	char vendor[13] = "";
	__cpuid(1, a, b, cx, d);
	if (cx & (1u << 31)) { /* a hypervisor is present */
		__cpuid(0x40000000, a, b, cx, d);
		memcpy(vendor, &b, 4);
		memcpy(vendor + 4, &cx, 4);
		memcpy(vendor + 8, &d, 4);
		if (strcmp(vendor, "TCGTCGTCGTCG") == 0)
			return "emulation speed: QEMU's TCG emulates this CPU and controller; no real disk's figures";
	}
#endif
	if (strncmp(c->model, "QEMU", 4) == 0)
		return "an emulated controller's speed, not a disk's";
	return NULL;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: nvme-io [--polled] [--queues N] [--commands N] [--depth N] [PCI-ADDRESS]\n");
}

static int number(const char *s, unsigned min, unsigned max, unsigned *out)
{
	char *end;
	unsigned long v = strtoul(s ? s : "", &end, 10);
	if (!s || !*s || *end || v < min || v > max) {
		fprintf(stderr, "nvme-io: %s is not a number from %u to %u\n", s ? s : "(nothing)", min, max);
		return -1;
	}
	*out = v;
	return 0;
}

int main(int argc, char **argv)
{
	static struct ctrl ctrl; /* large; zeroed */
	struct ctrl *c = &ctrl;
	const char *address = NULL;
	char found[256] = "", prev[256] = "";
	unsigned queues = DEFAULT_QUEUES, commands = DEFAULT_COMMANDS, depth = DEFAULT_DEPTH, candidates = 0;
	unsigned writes = 0, reads = 0, bad_reads = 0, extents;
	uint64_t moved = 0, verified = 0, mismatched = 0, interrupts = 0, *all_ns = NULL;
	size_t nall = 0;
	vfiokit_dma_heap_info heap;
	double t0, elapsed;
	bool polled = false;
	const char *note;
	int status = 1, rc;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--polled") == 0)
			polled = true;
		else if (strcmp(argv[i], "--queues") == 0) {
			if (number(++i < argc ? argv[i] : NULL, 1, MAX_QUEUES, &queues))
				return 1;
		} else if (strcmp(argv[i], "--commands") == 0) {
			if (number(++i < argc ? argv[i] : NULL, 2, 100000000, &commands))
				return 1;
		} else if (strcmp(argv[i], "--depth") == 0) {
			if (number(++i < argc ? argv[i] : NULL, 1, MAX_DEPTH, &depth))
				return 1;
		} else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
			usage(stdout);
			return 0;
		} else if (argv[i][0] == '-' || address) {
			usage(stderr);
			return 1;
		} else
			address = argv[i];
	}
	run_nonce = now_ns() * 0x2545f4914f6cdd1dull;
	extents = commands / 2;

	/* The controller given, or the first one bound to vfio-pci that has a namespace. */
	for (;;) {
		const char *candidate = address;
		if (!candidate) {
			if (find_device_after(0, 0, 0x010802, prev[0] ? prev : NULL, found, sizeof found) < 0) {
				fprintf(stderr, "nvme-io: no NVMe controller%s bound to vfio-pci; ", candidates ? " with a namespace" : "");
				usage(stderr);
				goto out;
			}
			candidate = found;
			snprintf(prev, sizeof prev, "%s", found);
		}
		candidates++;
		c->polled = polled;
		if ((status = bring_up(c, candidate, queues)) != 0)
			goto out;
		status = 1;
		if (c->nsid)
			break;
		EXPECT(!address, "%s has no active namespace to do I/O on", address);
		printf("  no active namespace: trying the next controller\n");
		if ((status = shut_down(c)) != 0)
			goto out;
		if ((status = release(c, 0)) != 0)
			goto out;
		status = 1;
	}

	if ((status = create_queues(c, queues)) != 0)
		goto out;
	status = 1;

	if ((status = prepare_work(c, depth, extents)) != 0)
		goto out;
	status = 1;
	TRY(vfiokit_dma_heap_get_info(c->iommu, &heap));
	if (c->polled)
		printf("  %u I/O queue pairs of %u entries, queue depth %u, polled (completion queues without "
		       "interrupts)\n",
		       c->nqueues, c->io_entries, depth);
	else
		printf("  %u I/O queue pairs of %u entries, queue depth %u, completions by MSI-X vectors 1-%u\n",
		       c->nqueues, c->io_entries, depth, c->nqueues);
	printf("  transfers of");
	for (unsigned i = 0; i < c->nsizes; i++)
		printf("%s %u KiB (%s)", i ? "," : "", c->sizes[i] / 1024,
		       c->sizes[i] == PAGE ? "PRP1" : c->sizes[i] == 2 * PAGE ? "PRP1+PRP2" : "PRP list");
	printf("; DMA heap: %u arenas (%u hugepages), %llu KiB in objects\n", heap.arenas, heap.huge_arenas,
	       (unsigned long long)(heap.used / 1024));

	/* One thread per queue pair, all on the one device handle. */
	t0 = now();
	for (unsigned i = 0; i < c->nqueues; i++) {
		rc = pthread_create(&c->io[i].thread, NULL, worker, &c->io[i]);
		if (rc != 0) {
			fprintf(stderr, "nvme-io: pthread_create failed: %s\n", strerror(rc));
			atomic_store(&abort_all, 1);
			break;
		}
		c->io[i].started = true;
	}
	for (unsigned i = 0; i < c->nqueues; i++)
		if (c->io[i].started)
			pthread_join(c->io[i].thread, NULL);
	elapsed = now() - t0;
	if (atomic_load(&abort_all)) { /* the first failed queue's status */
		status = 0;
		for (unsigned i = 0; i < c->nqueues && !status; i++)
			status = c->io[i].status;
		status = status ? status : 1;
		goto out;
	}

	for (unsigned i = 0; i < c->nqueues; i++) {
		struct queue *q = &c->io[i];
		writes += q->writes;
		reads += q->reads;
		moved += q->bytes_moved;
		verified += q->bytes_verified;
		mismatched += q->mismatched_bytes;
		bad_reads += q->bad_reads;
		interrupts += q->interrupts;
		printf("  queue %u: %u commands (%u writes, %u reads) on LBAs %llu-%llu in %u pass%s", q->qid,
		       q->writes + q->reads, q->writes, q->reads, (unsigned long long)q->first_lba,
		       (unsigned long long)(q->first_lba + q->lbas - 1), q->passes, q->passes == 1 ? "" : "es");
		if (!c->polled)
			printf(", %llu interrupts", (unsigned long long)q->interrupts);
		printf(": verify %s, %llu mismatched bytes\n", q->mismatched_bytes ? "FAILED" : "OK",
		       (unsigned long long)q->mismatched_bytes);
	}
	all_ns = malloc((writes + reads + 1) * sizeof *all_ns);
	EXPECT(all_ns, "out of memory");
	printf("nvme-io: %u commands in %.2f s: %.0f IOPS, %.1f MiB/s (%s, %u queues)\n", writes + reads, elapsed,
	       (writes + reads) / elapsed, moved / elapsed / (1 << 20), c->polled ? "polled" : "interrupts",
	       c->nqueues);
	for (unsigned i = 0; i < c->nqueues; i++) {
		memcpy(all_ns + nall, c->io[i].write_ns, c->io[i].writes * sizeof *all_ns);
		nall += c->io[i].writes;
	}
	percentiles("write", all_ns, nall);
	nall = 0;
	for (unsigned i = 0; i < c->nqueues; i++) {
		memcpy(all_ns + nall, c->io[i].read_ns, c->io[i].reads * sizeof *all_ns);
		nall += c->io[i].reads;
	}
	percentiles("read", all_ns, nall);
	for (unsigned i = 0; i < c->nqueues; i++) {
		memcpy(all_ns + nall, c->io[i].write_ns, c->io[i].writes * sizeof *all_ns);
		nall += c->io[i].writes;
	}
	percentiles("all", all_ns, nall);
	if ((note = speed_note(c)))
		printf("  (%s)\n", note);
	EXPECT(writes == extents && reads == extents, "%u writes and %u reads done, %u each asked for", writes, reads,
	       extents);
	EXPECT(c->polled || interrupts > 0, "no interrupts counted in interrupt mode");

	if ((status = shut_down(c)) != 0)
		goto out;
	status = 1;
	printf("  I/O queues deleted, controller shut down and disabled\n");
	if (mismatched) {
		printf("nvme-io: verify FAILED: %u of %u reads differ, %llu mismatched bytes\n", bad_reads, reads,
		       (unsigned long long)mismatched);
		status = 2;
		goto out;
	}
	printf("nvme-io: verify OK: %u reads, %.1f MiB compared byte for byte, 0 mismatches\n", reads,
	       verified / (double)(1 << 20));
	status = 0;
out:
	free(all_ns);
	if (c->dev)
		status = release(c, status);
	return status;
}
