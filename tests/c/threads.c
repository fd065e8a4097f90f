/* The concurrency contract of the C API, against the real kernel in the test guest
 * (tests/c/run; docs/c-api.md, "Conventions and errors"):
 *   - vfiokit_irq_disable, and vfiokit_irq_enable re-routing a vector, end the waits on the
 *     affected vectors with -ECANCELED (others wait on);
 *   - vfiokit_device_close while another thread is inside a call on the device: a waiter
 *     returns -ECANCELED, calls in flight finish or fail cleanly, and the device's fds and
 *     mappings are released once the last of them has returned;
 *   - vfiokit_iommu_close while DMA calls are in flight on the context;
 *   - a call that starts after close returns gets -EBADF.
 * The matrix runs every kind of call in a loop in one thread while the main thread closes the
 * handle, ROUNDS times each; tests/c/run also runs this under valgrind.
 *
 * Usage: threads [ROUNDS]   (needs VFIOKIT_TEST_EDU and VFIOKIT_TEST_NVME) */
#define _DEFAULT_SOURCE
#include <vfiokit.h>

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

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

#define MUST(call)                                                                                 \
	do {                                                                                       \
		int rc_ = (call);                                                                  \
		if (rc_ != 0) {                                                                    \
			fprintf(stderr, "%s:%d: %s = %d: %s\n", __FILE__, __LINE__, #call, rc_,    \
				vfiokit_last_error());                                             \
			exit(1);                                                                   \
		}                                                                                  \
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

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sleep_us(long us)
{
	struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
	nanosleep(&ts, NULL);
}

static long count_entries(const char *dir)
{
	DIR *d = opendir(dir);
	long n = 0;
	if (!d)
		return -1;
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

/* The process's mappings; under valgrind (VFIOKIT_VALGRIND=1, from tests/c/run), whose own
 * handling of thread stacks moves the total from round to round, those of VFIO devices only. */
static long count_maps(void)
{
	FILE *f = fopen("/proc/self/maps", "r");
	const char *only = getenv("VFIOKIT_VALGRIND") ? "vfio" : "";
	char line[512];
	long n = 0;
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		n += strchr(line, '\n') && strstr(line, only);
	fclose(f);
	return n;
}

/* ---- the two reported reproductions, and re-routing ---------------------------------------- */

struct waiter {
	vfiokit_device *dev;
	uint32_t irq, vector;
	int timeout_ms;
	atomic_int tid; /* set as the thread starts */
	int rc;
	double returned_ms;
	char message[256];
};

static void *wait_once(void *arg)
{
	struct waiter *w = arg;
	uint64_t count = 0;
	atomic_store(&w->tid, (int)syscall(SYS_gettid));
	w->rc = vfiokit_irq_wait(w->dev, w->irq, w->vector, w->timeout_ms, &count);
	w->returned_ms = now_ms();
	snprintf(w->message, sizeof w->message, "%s", vfiokit_last_error());
	return NULL;
}

/* Returns once thread tid sleeps in poll(2): the waiter is in the kernel's wait, with no guess
 * at how long a busy emulated CPU takes to get it there (10 s at most, then a failed check). */
static void until_in_poll(int tid)
{
	char path[64];
	snprintf(path, sizeof path, "/proc/self/task/%d/syscall", tid);
	for (int tries = 0; tries < 10000; tries++) {
		long nr = -1;
		FILE *f = fopen(path, "r");
		if (f) {
			if (fscanf(f, "%ld", &nr) != 1) /* "running" */
				nr = -1;
			fclose(f);
		}
		if (nr == SYS_poll || nr == SYS_ppoll)
			return;
		sleep_us(1000);
	}
	CHECK(!"the waiter reached poll within 10 s");
}

static void start_waiter(pthread_t *t, struct waiter *w)
{
	MUST(pthread_create(t, NULL, wait_once, w));
	while (!atomic_load(&w->tid))
		sleep_us(1000);
	until_in_poll(atomic_load(&w->tid));
}

static void close_during_wait(void)
{
	long fds = count_entries("/proc/self/fd"), maps = count_maps();
	vfiokit_device *dev;
	void *bar0;
	int efd;
	MUST(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), NULL, &dev));
	MUST(vfiokit_region_map(dev, VFIOKIT_PCI_BAR0, &bar0));
	MUST(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 1, &efd));
	struct waiter w = {.dev = dev, .irq = VFIOKIT_IRQ_MSI, .timeout_ms = 3000};
	pthread_t t;
	start_waiter(&t, &w);
	vfiokit_device_close(dev);
	double closed = now_ms();
	MUST(pthread_join(t, NULL));
	CHECK(w.rc == -ECANCELED);
	CHECK(strstr(w.message, "closed") != NULL);
	CHECK(w.returned_ms - closed < 100);
	printf("close during a 3 s wait: the waiter returned %d %.1f ms after close (%s)\n", w.rc,
	       w.returned_ms - closed, w.message);
	CHECK(count_entries("/proc/self/fd") == fds);
	CHECK(count_maps() == maps);
	uint32_t id;
	CHECK(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, 0, &id) == -EBADF); /* a call after close */
}

static void disable_during_endless_wait(void)
{
	vfiokit_device *dev;
	int efd;
	MUST(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), NULL, &dev));
	MUST(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 1, &efd));
	struct waiter w = {.dev = dev, .irq = VFIOKIT_IRQ_MSI, .timeout_ms = -1};
	pthread_t t;
	start_waiter(&t, &w);
	CHECK(vfiokit_irq_disable(dev, VFIOKIT_IRQ_MSI) == 0);
	double disabled = now_ms();
	MUST(pthread_join(t, NULL));
	CHECK(w.rc == -ECANCELED);
	CHECK(strstr(w.message, "disabled") != NULL);
	CHECK(w.returned_ms - disabled < 100);
	printf("disable during an endless wait: the waiter returned %d %.1f ms after disable\n",
	       w.rc, w.returned_ms - disabled);
	/* Enabled again, the IRQ works as before. */
	MUST(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 1, &efd));
	MUST(vfiokit_irq_trigger(dev, VFIOKIT_IRQ_MSI, 0));
	CHECK(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, 1000, NULL) == 0);
	vfiokit_device_close(dev);
}

/* Re-enabling vector 1 of the nvme's MSI-X cancels the wait on vector 1 only. */
static void reroute_cancels_only_its_vectors(void)
{
	vfiokit_device *dev;
	int efds[2];
	MUST(vfiokit_device_open(env("VFIOKIT_TEST_NVME"), NULL, &dev));
	MUST(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSIX, 1, 2, efds));
	struct waiter w1 = {.dev = dev, .irq = VFIOKIT_IRQ_MSIX, .vector = 1, .timeout_ms = 10000};
	struct waiter w2 = {.dev = dev, .irq = VFIOKIT_IRQ_MSIX, .vector = 2, .timeout_ms = 10000};
	pthread_t t1, t2;
	start_waiter(&t1, &w1);
	start_waiter(&t2, &w2);
	MUST(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSIX, 1, 1, efds));
	MUST(pthread_join(t1, NULL));
	CHECK(w1.rc == -ECANCELED);
	MUST(vfiokit_irq_trigger(dev, VFIOKIT_IRQ_MSIX, 2));
	MUST(pthread_join(t2, NULL));
	CHECK(w2.rc == 0); /* woken by its own interrupt, not cancelled */
	/* The re-routed vector 1 signals its new eventfd. */
	MUST(vfiokit_irq_trigger(dev, VFIOKIT_IRQ_MSIX, 1));
	CHECK(vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSIX, 1, 1000, NULL) == 0);
	vfiokit_device_close(dev);
}

/* ---- the matrix: each kind of call in a loop while the handle is closed -------------------- */

struct looper {
	vfiokit_device *dev;
	vfiokit_iommu *iommu;
	int kind;
	atomic_int started;
	long calls;
	int last_rc;
};

enum { LOOP_READ32, LOOP_WRITE32, LOOP_REGION_READ, LOOP_MAP, LOOP_RECORDS, LOOP_CONFIG_CAP,
       LOOP_IRQ_TRIGGER, LOOP_IRQ_WAIT, LOOP_IRQ_MASK, LOOP_DEVICE_IOMMU, LOOP_KINDS };
static const char *loop_names[] = {"read32", "write32", "region_read", "region_map", "records",
				   "find_capability", "irq_trigger", "irq_wait", "irq_mask",
				   "device_iommu"};

/* One call of the looper's kind; 0 or a negative errno. */
static int one_call(struct looper *l)
{
	uint32_t u32;
	char buf[16];
	void *p;
	size_t n;
	switch (l->kind) {
	case LOOP_READ32:
		return vfiokit_read32(l->dev, VFIOKIT_PCI_BAR0, 0x00, &u32);
	case LOOP_WRITE32:
		return vfiokit_write32(l->dev, VFIOKIT_PCI_BAR0, 0x04, 0x12345678);
	case LOOP_REGION_READ:
		return vfiokit_region_read(l->dev, VFIOKIT_PCI_CONFIG, 0, buf, sizeof buf);
	case LOOP_MAP:
		return vfiokit_region_map(l->dev, VFIOKIT_PCI_BAR0, &p);
	case LOOP_RECORDS:
		return vfiokit_device_regions(l->dev, &n) ? 0 : -EBADF;
	case LOOP_CONFIG_CAP:
		return vfiokit_pci_find_capability(l->dev, 0x05, &u32);
	case LOOP_IRQ_TRIGGER:
		return vfiokit_irq_trigger(l->dev, VFIOKIT_IRQ_MSI, 0);
	case LOOP_IRQ_WAIT: {
		int rc = vfiokit_irq_wait(l->dev, VFIOKIT_IRQ_MSI, 0, 50, NULL);
		return rc == -ETIMEDOUT ? 0 : rc;
	}
	case LOOP_IRQ_MASK: { /* MSI cannot be masked: the same clean failure until the close */
		int rc = vfiokit_irq_mask(l->dev, VFIOKIT_IRQ_MSI, 0);
		return rc == -ENOTTY ? 0 : rc;
	}
	case LOOP_DEVICE_IOMMU:
		return vfiokit_device_iommu(l->dev) ? 0 : -EBADF;
	}
	return -EIO;
}

static void *loop_until_closed(void *arg)
{
	struct looper *l = arg;
	int rc;
	do {
		rc = one_call(l);
		l->calls++;
		atomic_store(&l->started, 1);
	} while (rc == 0);
	l->last_rc = rc;
	return NULL;
}

static void device_close_matrix(int rounds)
{
	long fds = count_entries("/proc/self/fd"), maps = count_maps();
	unsigned seed = 1;
	for (int kind = 0; kind < LOOP_KINDS; kind++) {
		int clean = 0;
		long calls = 0;
		for (int round = 0; round < rounds; round++) {
			struct looper l = {.kind = kind};
			int efd;
			MUST(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), NULL, &l.dev));
			MUST(vfiokit_irq_enable(l.dev, VFIOKIT_IRQ_MSI, 0, 1, &efd));
			pthread_t t;
			MUST(pthread_create(&t, NULL, loop_until_closed, &l));
			while (!atomic_load(&l.started))
				sched_yield();
			sleep_us(rand_r(&seed) % 500);
			vfiokit_device_close(l.dev);
			MUST(pthread_join(t, NULL));
			/* The loop ends with the call in flight cancelled, or the next one refused. */
			clean += l.last_rc == -EBADF || l.last_rc == -ECANCELED;
			calls += l.calls;
		}
		CHECK(clean == rounds);
		printf("close while %s loops: %d rounds, %ld calls, all ended cleanly: %s\n",
		       loop_names[kind], rounds, calls, clean == rounds ? "yes" : "NO");
	}
	CHECK(count_entries("/proc/self/fd") == fds);
	CHECK(count_maps() == maps);
}

static void *dma_loop(void *arg)
{
	struct looper *l = arg;
	for (l->calls = 0; l->calls < 200; l->calls++) {
		void *buf;
		uint64_t iova;
		int rc = vfiokit_dma_alloc(l->iommu, 4096, &buf, &iova);
		if (rc == 0)
			rc = vfiokit_dma_free(l->iommu, buf);
		atomic_store(&l->started, 1);
		if (rc != 0) {
			l->last_rc = rc;
			break;
		}
	}
	return NULL;
}

/* The context's handle closed while DMA calls run on it: the open device keeps the context
 * alive, so the calls go on succeeding, and everything goes with the device. */
static void iommu_close_during_dma(int rounds)
{
	long fds = count_entries("/proc/self/fd"), maps = count_maps();
	int ok = 0;
	for (int round = 0; round < rounds; round++) {
		struct looper l = {0};
		MUST(vfiokit_iommu_open(VFIOKIT_IOMMU_AUTO, &l.iommu));
		MUST(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), l.iommu, &l.dev));
		pthread_t t;
		MUST(pthread_create(&t, NULL, dma_loop, &l));
		while (!atomic_load(&l.started))
			sched_yield();
		vfiokit_iommu_close(l.iommu);
		MUST(pthread_join(t, NULL));
		ok += l.last_rc == 0 && l.calls == 200;
		vfiokit_device_close(l.dev);
	}
	CHECK(ok == rounds);
	printf("iommu close during DMA calls: %d of %d rounds completed every call\n", ok, rounds);
	CHECK(count_entries("/proc/self/fd") == fds);
	CHECK(count_maps() == maps);
}

/* A first thread that calls into the library, so what glibc keeps for later threads (the
 * joined thread's stack, a malloc arena) and the SIGBUS guard's memfd (made at the first BAR
 * mapping, kept for the process's life) are in every baseline below. */
static void *warm_up(void *arg)
{
	vfiokit_device *dev;
	void *bar0;
	free(malloc(64));
	vfiokit_device_open("warm-up", NULL, &dev); /* fails: a bad name */
	MUST(vfiokit_device_open(env("VFIOKIT_TEST_EDU"), NULL, &dev));
	MUST(vfiokit_region_map(dev, VFIOKIT_PCI_BAR0, &bar0));
	vfiokit_device_close(dev);
	return arg;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 50;
	setvbuf(stdout, NULL, _IOLBF, 0);
	pthread_t warm;
	MUST(pthread_create(&warm, NULL, warm_up, NULL));
	MUST(pthread_join(warm, NULL));
	close_during_wait();
	disable_during_endless_wait();
	reroute_cancels_only_its_vectors();
	device_close_matrix(rounds);
	iommu_close_during_dma(rounds / 10 + 1);
	printf("threads: %d passed, %d failed\n", passed, failed);
	return failed != 0;
}
