/* Guest side of the hot-unplug fault test (tests/fault/run drives it from the host, where QEMU's
 * `device_del` of the device makes the guest's pciehp remove it, and vfio-pci raise the REQ
 * interrupt until the device is released).
 *
 *   hotunplug release [TIMEOUT_S]   open $VFIOKIT_TEST_UNPLUG, enable VFIOKIT_IRQ_REQ, print
 *                                   READY, wait for REQ, close the device: the unplug completes.
 *   hotunplug ignore [N] [TIMEOUT_S] a child opens the device the same way and ignores REQ;
 *                                   after N requests (default 2) the parent checks the device is
 *                                   still there, kills the child: the unplug completes.
 *
 *   hotunplug retire [TIMEOUT_S]    open the device, enable REQ, start a thread busy reading the
 *                                   id register through a vfiokit_register pointer, print READY;
 *                                   on REQ call vfiokit_device_retire while that thread runs: it
 *                                   survives and reads 0xffffffff; calls return -ENODEV; close;
 *                                   no fd leaked; the unplug completes.
 *
 * Each line starts with the seconds since the start. Exit 0 when all went as expected; 1 on a
 * timeout or an error (with vfiokit_last_error()); 2 on bad usage. */
#define _GNU_SOURCE
#include <vfiokit.h>

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EDU_ID 0x010000edu

static struct timespec t0;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9;
}

static void say(const char *fmt, ...)
{
	va_list ap;
	printf("[%7.3f] ", now());
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static int fail(const char *what, int rc)
{
	say("FAIL %s: %s (%d): %s", what, strerror(rc < 0 ? -rc : rc), rc, vfiokit_last_error());
	return 1;
}

static const char *addr;
static char slot_power[512]; /* /sys/bus/pci/slots/N/power of the device's slot, "" if none */

static int present(void)
{
	char path[256];
	struct stat st;
	snprintf(path, sizeof path, "/sys/bus/pci/devices/%s", addr);
	return stat(path, &st) == 0;
}

static const char *driver(void)
{
	static char buf[256];
	char path[256];
	ssize_t n;
	snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver", addr);
	n = readlink(path, buf, sizeof buf - 1);
	if (n < 0)
		return "(none)";
	buf[n] = 0;
	return strrchr(buf, '/') ? strrchr(buf, '/') + 1 : buf;
}

/* The hotplug slot holding the device: the one whose address is its domain:bus:device. */
static void find_slot(void)
{
	char want[32], path[512], got[64];
	DIR *d = opendir("/sys/bus/pci/slots");
	struct dirent *e;
	snprintf(want, sizeof want, "%.10s", addr); /* "0000:01:00" */
	while (d && (e = readdir(d))) {
		FILE *f;
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/bus/pci/slots/%s/address", e->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(got, sizeof got, f) && strncmp(got, want, strlen(want)) == 0)
			snprintf(slot_power, sizeof slot_power, "/sys/bus/pci/slots/%s/power", e->d_name);
		fclose(f);
	}
	if (d)
		closedir(d);
}

static int slot_powered(void)
{
	char buf[8] = "";
	FILE *f = fopen(slot_power, "r");
	if (!f)
		return -1; /* the slot itself is gone */
	if (!fgets(buf, sizeof buf, f))
		buf[0] = 0;
	fclose(f);
	return buf[0] == '1';
}

/* After the release: the kernel removes the device, then powers the slot off (which is what
 * makes QEMU finish the unplug and emit DEVICE_DELETED). */
static int wait_removed(double timeout)
{
	double start = now();
	while (present()) {
		if (now() - start > timeout) {
			say("FAIL the device is still in the guest %.0f s after its release", timeout);
			return 1;
		}
		usleep(20000);
	}
	say("removed from the guest %.3f s after the release", now() - start);
	if (slot_power[0]) {
		while (slot_powered() == 1) {
			if (now() - start > timeout) {
				say("FAIL the slot is still powered %.0f s after the release", timeout);
				return 1;
			}
			usleep(20000);
		}
		say("slot powered off %.3f s after the release", now() - start);
	}
	return 0;
}

/* Opens the device, enables REQ, checks the id register; prints READY. */
static int open_device(vfiokit_device **dev)
{
	int rc, efd = -1;
	uint32_t id = 0;
	if ((rc = vfiokit_device_open(addr, NULL, dev)) != 0)
		return fail("vfiokit_device_open", rc);
	if ((rc = vfiokit_irq_enable(*dev, VFIOKIT_IRQ_REQ, 0, 1, &efd)) != 0)
		return fail("vfiokit_irq_enable(REQ)", rc);
	if ((rc = vfiokit_read32(*dev, VFIOKIT_PCI_BAR0, 0, &id)) != 0)
		return fail("vfiokit_read32(BAR0, 0)", rc);
	if (id != EDU_ID) {
		say("FAIL id register 0x%08x, want 0x%08x", id, EDU_ID);
		return 1;
	}
	say("READY %s id 0x%08x, REQ enabled (eventfd %d), iommu kind %u, slot %s", addr, id, efd,
	    vfiokit_iommu_kind(vfiokit_device_iommu(*dev)), slot_power[0] ? slot_power : "(none)");
	return 0;
}

static int release_case(int timeout_s)
{
	vfiokit_device *dev = NULL;
	uint64_t count = 0;
	double t;
	int rc;
	if (open_device(&dev))
		return 1;
	rc = vfiokit_irq_wait(dev, VFIOKIT_IRQ_REQ, 0, timeout_s * 1000, &count);
	if (rc == -ETIMEDOUT) {
		say("FAIL no REQ within %d s", timeout_s);
		return 1;
	}
	if (rc != 0)
		return fail("vfiokit_irq_wait(REQ)", rc);
	say("REQ received (count %llu); device still present: %s, driver %s",
	    (unsigned long long)count, present() ? "yes" : "no", driver());
	t = now();
	vfiokit_device_close(dev);
	say("released (close took %.3f s)", now() - t);
	return wait_removed(30);
}

static int ignore_case(int nreq, int timeout_s)
{
	int p[2], rc = 0;
	pid_t pid;
	double last = 0;
	if (pipe(p) != 0)
		return fail("pipe", -errno);
	fflush(stdout);
	pid = fork();
	if (pid < 0)
		return fail("fork", -errno);
	if (pid == 0) { /* the holder: opens the device, ignores every request, never closes */
		vfiokit_device *dev = NULL;
		close(p[0]);
		if (open_device(&dev))
			_exit(1);
		for (int n = 1;; n++) {
			uint64_t count = 0;
			rc = vfiokit_irq_wait(dev, VFIOKIT_IRQ_REQ, 0, timeout_s * 1000, &count);
			if (rc != 0)
				_exit(fail("vfiokit_irq_wait(REQ) in the holder", rc));
			say("REQ #%d received (count %llu): ignored, the device stays open", n,
			    (unsigned long long)count);
			if (write(p[1], "r", 1) != 1)
				_exit(1);
		}
	}
	close(p[1]);
	for (int n = 1; n <= nreq; n++) {
		struct pollfd pfd = {.fd = p[0], .events = POLLIN};
		char c;
		if (poll(&pfd, 1, (timeout_s + 1) * 1000) != 1 || read(p[0], &c, 1) != 1) {
			say("FAIL REQ #%d did not come within %d s (or the holder died)", n, timeout_s);
			rc = 1;
			break;
		}
		if (n > 1)
			say("REQ #%d came %.3f s after #%d", n, now() - last, n - 1);
		last = now();
		/* The sysfs driver link goes before vfio-pci's remove starts (and waits for us). */
		if (!present()) {
			say("FAIL the device went away while open");
			rc = 1;
			break;
		}
		say("device still present while open (driver link: %s)", driver());
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	say("holder killed (SIGKILL): its fds are closed by the kernel");
	if (rc)
		return rc;
	return wait_removed(30);
}

static int count_fds(void)
{
	int n = 0;
	DIR *d = opendir("/proc/self/fd");
	while (d && readdir(d))
		n++;
	if (d)
		closedir(d);
	return n;
}

static atomic_int busy_started;
static uint64_t busy_reads;

/* The thread busy in register accesses at the moment of removal: until it reads all-ones. */
static void *busy(void *reg)
{
	uint32_t v = 0;
	atomic_store(&busy_started, 1);
	for (busy_reads = 0;; busy_reads++) {
		v = vfiokit_mmio_read32(reg, 0);
		if (v != EDU_ID)
			break;
	}
	return (void *)(uintptr_t)v;
}

static int retire_case(int timeout_s)
{
	vfiokit_device *dev = NULL;
	uint64_t count = 0;
	uint32_t v;
	void *reg, *seen;
	pthread_t t;
	int rc, fds = count_fds();
	if (open_device(&dev))
		return 1;
	if ((rc = vfiokit_register(dev, VFIOKIT_PCI_BAR0, 0, 4, &reg)) != 0)
		return fail("vfiokit_register(BAR0, 0)", rc);
	if (pthread_create(&t, NULL, busy, reg) != 0)
		return fail("pthread_create", -errno);
	while (!atomic_load(&busy_started))
		usleep(1000);
	rc = vfiokit_irq_wait(dev, VFIOKIT_IRQ_REQ, 0, timeout_s * 1000, &count);
	if (rc != 0)
		return fail("vfiokit_irq_wait(REQ)", rc);
	say("REQ received (count %llu), the busy thread is reading; retiring the device",
	    (unsigned long long)count);
	if ((rc = vfiokit_device_retire(dev)) != 0)
		return fail("vfiokit_device_retire", rc);
	pthread_join(t, &seen);
	if ((uint32_t)(uintptr_t)seen != 0xffffffffu) {
		say("FAIL the busy thread read 0x%08x, want 0xffffffff", (uint32_t)(uintptr_t)seen);
		return 1;
	}
	say("busy thread survived and read all-ones after %llu reads", (unsigned long long)busy_reads);
	if (vfiokit_device_gone(dev) != 1) {
		say("FAIL vfiokit_device_gone is %d, want 1", vfiokit_device_gone(dev));
		return 1;
	}
	rc = vfiokit_read32(dev, VFIOKIT_PCI_CONFIG, 0, &v);
	if (rc != -ENODEV) {
		say("FAIL vfiokit_read32(config) returned %d, want -ENODEV", rc);
		return 1;
	}
	say("calls return -ENODEV: %s", vfiokit_last_error());
	rc = vfiokit_irq_wait(dev, VFIOKIT_IRQ_REQ, 0, 0, &count);
	if (rc != -ENODEV) {
		say("FAIL vfiokit_irq_wait after retire returned %d, want -ENODEV", rc);
		return 1;
	}
	say("waits return -ENODEV");
	vfiokit_device_close(dev);
	/* One fd stays for the process's life: the SIGBUS guard's all-ones memfd, made at the
	 * first BAR mapping; the device's, its REQ eventfd's and its context's fds are closed. */
	say("released; fds before open %d, after close %d", fds, count_fds());
	if (count_fds() != fds + 1) {
		say("FAIL fds leaked (want %d: one for the guard's memfd)", fds + 1);
		return 1;
	}
	return wait_removed(30);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	clock_gettime(CLOCK_MONOTONIC, &t0);
	setvbuf(stdout, NULL, _IOLBF, 0);
	addr = getenv("VFIOKIT_TEST_UNPLUG");
	if (!addr) {
		fprintf(stderr, "VFIOKIT_TEST_UNPLUG is not set: run in tests/vm/run\n");
		return 2;
	}
	find_slot();
	if (strcmp(mode, "release") == 0)
		return release_case(argc > 2 ? atoi(argv[2]) : 60);
	if (strcmp(mode, "retire") == 0)
		return retire_case(argc > 2 ? atoi(argv[2]) : 60);
	if (strcmp(mode, "ignore") == 0)
		return ignore_case(argc > 2 ? atoi(argv[2]) : 2, argc > 3 ? atoi(argv[3]) : 60);
	fprintf(stderr, "usage: hotunplug release [TIMEOUT_S] | ignore [N] [TIMEOUT_S]\n");
	return 2;
}
