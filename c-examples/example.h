/* What the C examples share: TRY and EXPECT, which report a failed vfiokit call (with
 * vfiokit_last_error()) or an unexpected result from the device and jump to `out` (EXPECT also
 * sets `status` to 2), and find_device/find_device_after/pick_device, which pick a device bound to
 * vfio-pci by its ids (inline where an example may not use them: no unused-function warnings).
 * An example defines EXAMPLE, its name, before including this. */
#ifndef VFIOKIT_EXAMPLE_H
#define VFIOKIT_EXAMPLE_H

#include <vfiokit.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRY(call)                                                                                  \
	do {                                                                                       \
		int rc_ = (call);                                                                  \
		if (rc_ < 0) {                                                                     \
			fprintf(stderr, EXAMPLE ": %s failed (%s): %s\n", #call, strerror(-rc_),   \
				vfiokit_last_error());                                             \
			goto out;                                                                  \
		}                                                                                  \
	} while (0)

#define EXPECT(cond, ...)                                                                          \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, EXAMPLE ": unexpected: " __VA_ARGS__);                     \
			fputc('\n', stderr);                                                       \
			status = 2;                                                                \
			goto out;                                                                  \
		}                                                                                  \
	} while (0)

/* A device's sysfs attribute (vendor, device, class) as a number; 0 if unreadable. */
static unsigned sysfs_hex(const char *dir, const char *address, const char *attribute)
{
	char path[512];
	unsigned value = 0;
	FILE *f;
	snprintf(path, sizeof path, "%s/%s/%s", dir, address, attribute);
	if ((f = fopen(path, "r"))) {
		if (fscanf(f, "%x", &value) != 1)
			value = 0;
		fclose(f);
	}
	return value;
}

/* The first device bound to vfio-pci, in address order, with this vendor, device and class
 * (0: any) and an address after `after` (NULL: any), into buf; 0 if found, -1 if not. */
static int find_device_after(unsigned vendor, unsigned device, unsigned class, const char *after,
			     char *buf, size_t len)
{
	const char *dir = "/sys/bus/pci/drivers/vfio-pci";
	struct dirent **entries;
	int n = scandir(dir, &entries, NULL, alphasort), found = -1;
	for (int i = 0; i < n; i++) {
		const char *a = entries[i]->d_name;
		if (found < 0 && strchr(a, ':') && (!after || strcmp(a, after) > 0) &&
		    (!vendor || sysfs_hex(dir, a, "vendor") == vendor) &&
		    (!device || sysfs_hex(dir, a, "device") == device) &&
		    (!class || sysfs_hex(dir, a, "class") == class)) {
			snprintf(buf, len, "%s", a);
			found = 0;
		}
		free(entries[i]);
	}
	if (n >= 0)
		free(entries);
	return found;
}

/* The first device bound to vfio-pci, in address order, with these ids; as above. */
static inline int find_device(unsigned vendor, unsigned device, unsigned class, char *buf, size_t len)
{
	return find_device_after(vendor, device, class, NULL, buf, len);
}

/* The device to drive: `address` when given, else the first find_device picks (into buf);
 * NULL, after a message naming `what` and the usage, when there is none. */
static inline const char *pick_device(const char *address, unsigned vendor, unsigned device,
				      unsigned class, const char *what, char *buf, size_t len)
{
	if (address)
		return address;
	if (find_device(vendor, device, class, buf, len) == 0)
		return buf;
	fprintf(stderr, EXAMPLE ": no %s bound to vfio-pci; usage: " EXAMPLE " [PCI-ADDRESS]\n", what);
	return NULL;
}

#endif
