/* edu-threads: one device handle shared by two threads, on QEMU's edu device (1234:11e8).
 *
 * A waiter thread sits in vfiokit_irq_wait on edu's MSI vector and handles every interrupt
 * (reads the pending bits, acknowledges them in the device). The main thread drives the device
 * through the same handle: register accesses, interrupts raised by hand, factorials that
 * interrupt when done.
 *
 * Shows:
 *   - handles may be shared between threads: both threads call vfiokit on one vfiokit_device;
 *   - waiting blocks no other call: while the waiter is blocked in vfiokit_irq_wait (with a
 *     long timeout), the main thread's calls go through at once. If the wait held a lock, they
 *     would stall until the wait timed out, and the waiter would report that timeout;
 *   - vfiokit_irq_trigger, used here to wake the waiter for shutdown;
 *   - counts checked at the end: every interrupt raised was seen exactly once.
 * Failures print vfiokit_last_error() and exit 1; a wrong count or result exits 2.
 *
 * Usage: edu-threads [PCI-ADDRESS | vfio-user:SOCKET]   (default: the first 1234:11e8 device
 * bound to vfio-pci) */
#define _DEFAULT_SOURCE
#define EXAMPLE "edu-threads"
#include "example.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum {
	EDU_LIVENESS = 0x04, EDU_FACTORIAL = 0x08, EDU_STATUS = 0x20,
	EDU_IRQ_STATUS = 0x24, EDU_IRQ_RAISE = 0x60, EDU_IRQ_ACK = 0x64,
};
#define EDU_STATUS_IRQ_FACT 0x80
#define EDU_FACT_IRQ 0x1
#define ROUNDS 8                /* short: this also runs under valgrind on an emulated CPU */
#define WAIT_MS 20000           /* the waiter's timeout: far longer than any round takes */
#define ROUND_TIMEOUT_S 10.0

static vfiokit_device *dev;     /* shared by both threads */
static atomic_uint seen_bits;   /* interrupt bits the waiter acknowledged */
static atomic_uint interrupts;  /* interrupts the waiter counted */
static atomic_int waiting;      /* the waiter is about to wait (or is waiting) */
static atomic_int stop;         /* the main thread is done */

struct waiter_result {          /* written by the waiter, read by the main thread */
	atomic_int failed;          /* a vfiokit call failed (message printed) */
	atomic_int timeouts;        /* waits that timed out: a call that blocked another */
	atomic_int wakeups;         /* returns from vfiokit_irq_wait */
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *waiter(void *arg)
{
	struct waiter_result *res = arg;
	while (!atomic_load(&stop)) {
		uint64_t count = 0;
		uint32_t pending = 0;
		atomic_store(&waiting, 1);
		int rc = vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, WAIT_MS, &count);
		if (rc == -ETIMEDOUT) {
			res->timeouts++;
			fprintf(stderr, "edu-threads: waiter: no interrupt in %d ms\n", WAIT_MS);
			break;
		}
		if (rc < 0 || vfiokit_read32(dev, VFIOKIT_PCI_BAR0, EDU_IRQ_STATUS, &pending) < 0 ||
		    (pending && vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_IRQ_ACK, pending) < 0)) {
			/* vfiokit_last_error() is per thread: this is the waiter's own failure. */
			fprintf(stderr, "edu-threads: waiter: %s\n", vfiokit_last_error());
			res->failed = 1;
			break;
		}
		res->wakeups++;
		if (pending) { /* not the shutdown trigger, which leaves no bit in the device */
			atomic_fetch_add(&interrupts, (unsigned)count);
			atomic_fetch_or(&seen_bits, pending);
		}
	}
	return NULL;
}

/* Waits until the waiter has acknowledged `bit`; -1 after ROUND_TIMEOUT_S. */
static int wait_seen(uint32_t bit)
{
	double deadline = now() + ROUND_TIMEOUT_S;
	while (!(atomic_load(&seen_bits) & bit)) {
		if (now() > deadline)
			return -1;
		nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
	}
	return 0;
}

int main(int argc, char **argv)
{
	char found[256];
	const char *address = argc > 1 ? argv[1] : NULL;
	struct waiter_result res = {0};
	pthread_t thread;
	int started = 0, status = 1, efd, accesses = 0, rc;
	uint32_t val, expected_bits = 0, fact = 0, n = 0;
	unsigned raised = 0, factorials = 0;
	uint16_t cmd;
	double t0, busy_s;

	address = pick_device(address, 0x1234, 0x11e8, 0, "edu device (1234:11e8)", found, sizeof found);
	if (!address)
		return 1;
	TRY(vfiokit_device_open(address, NULL, &dev));
	TRY(vfiokit_read16(dev, VFIOKIT_PCI_CONFIG, 0x04, &cmd));
	TRY(vfiokit_write16(dev, VFIOKIT_PCI_CONFIG, 0x04, cmd | 0x6)); /* memory, bus master: MSI */
	TRY(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 1, &efd));
	if ((rc = pthread_create(&thread, NULL, waiter, &res)) != 0) {
		fprintf(stderr, "edu-threads: pthread_create: %s\n", strerror(rc));
		goto out;
	}
	started = 1;
	printf("edu-threads: opened %s; waiter thread blocked in vfiokit_irq_wait (MSI, %d s timeout)\n",
	       address, WAIT_MS / 1000);

	/* Phase 1: nothing raised yet, so the waiter stays blocked in its wait. Meanwhile this
	 * thread uses the same handle. */
	while (!atomic_load(&waiting))
		nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
	nanosleep(&(struct timespec){.tv_nsec = 50000000}, NULL); /* well inside the wait now */
	t0 = now();
	for (uint32_t i = 0; i < 20; i++, accesses += 2) {
		TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_LIVENESS, i * 0x01010101));
		TRY(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, EDU_LIVENESS, &val));
		EXPECT(val == ~(i * 0x01010101), "liveness %#x for %#x", val, i * 0x01010101);
	}
	busy_s = now() - t0;
	EXPECT(atomic_load(&interrupts) == 0 && res.wakeups == 0 && res.timeouts == 0,
	       "the waiter returned before any interrupt was raised");
	printf("  meanwhile, on the same handle: %d register accesses in %.0f ms, all answered\n",
	       accesses, busy_s * 1000);

	/* Phase 2: interrupts the waiter must see, one round at a time. Even rounds raise one
	 * distinct bit by hand; odd rounds compute a factorial that interrupts when done. */
	for (int round = 0; round < ROUNDS; round++) {
		uint32_t bit;
		if (round % 2 == 0) {
			bit = 0x10u << raised++;
			TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_IRQ_RAISE, bit));
		} else {
			uint32_t want = 1;
			n = 5 + factorials++;
			for (uint32_t k = 2; k <= n; k++)
				want *= k;
			bit = EDU_FACT_IRQ;
			atomic_fetch_and(&seen_bits, ~bit); /* this bit repeats: wait for it afresh */
			TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_STATUS, EDU_STATUS_IRQ_FACT));
			TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_FACTORIAL, n));
			EXPECT(wait_seen(bit) == 0, "factorial %u: no interrupt seen by the waiter", n);
			TRY(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, EDU_FACTORIAL, &fact));
			EXPECT(fact == want, "%u! computed as %u, not %u", n, fact, want);
		}
		expected_bits |= bit;
		EXPECT(wait_seen(bit) == 0, "round %d: interrupt %#x not seen by the waiter", round, bit);
		EXPECT(!res.failed && res.timeouts == 0, "the waiter stopped");
	}
	TRY(vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_STATUS, 0));
	printf("  %u interrupts raised by hand and %u factorials (last: %u! = %u) each completed by an "
	       "interrupt the waiter acknowledged\n", raised, factorials, n, fact);

	status = 0;
out:
	if (started) {
		/* Wake the waiter with a loopback interrupt: it sees `stop` and returns. */
		atomic_store(&stop, 1);
		if (vfiokit_irq_trigger(dev, VFIOKIT_IRQ_MSI, 0) < 0) {
			fprintf(stderr, "edu-threads: vfiokit_irq_trigger failed: %s\n", vfiokit_last_error());
			status = 1; /* the waiter returns by its timeout */
		}
		if ((rc = pthread_join(thread, NULL)) != 0) {
			fprintf(stderr, "edu-threads: pthread_join: %s\n", strerror(rc));
			return 1; /* the waiter may still use the handle: do not close it */
		}
		if (status == 0) {
			unsigned got = atomic_load(&interrupts), bits = atomic_load(&seen_bits);
			printf("  waiter: %u interrupts, %d wakeups (the last by vfiokit_irq_trigger), no timeout\n",
			       got, res.wakeups);
			if (res.failed || res.timeouts) {
				status = res.failed ? 1 : 2;
			} else if (got != ROUNDS || bits != expected_bits || res.wakeups != ROUNDS + 1) {
				fprintf(stderr, "edu-threads: unexpected: the waiter counted %u interrupts "
						"(bits %#x, %d wakeups); %d raised (bits %#x)\n",
					got, bits, res.wakeups, ROUNDS, expected_bits);
				status = 2;
			}
		}
	}
	vfiokit_device_close(dev); /* after the join: no thread uses the handle any more */
	if (status == 0)
		printf("edu-threads: all counts as expected\n");
	return status;
}
