/* tests/pkg/run's program, built with pkg-config against the extracted libvfiokit-dev (shared
 * and static): the library's version, and the vendor and device ids of the device named. */
#include <vfiokit.h>

#include <stdio.h>

int main(int argc, char **argv)
{
	vfiokit_device *dev;
	uint16_t vendor, device;
	if (argc != 2) {
		fprintf(stderr, "usage: hello PCI-ADDRESS\n");
		return 2;
	}
	printf("libvfiokit %s, ABI %u\n", vfiokit_version(), vfiokit_abi_version());
	if (vfiokit_device_open(argv[1], NULL, &dev) || vfiokit_read16(dev, VFIOKIT_PCI_CONFIG, 0, &vendor) < 0 ||
	    vfiokit_read16(dev, VFIOKIT_PCI_CONFIG, 2, &device) < 0) {
		fprintf(stderr, "hello: %s\n", vfiokit_last_error());
		return 1;
	}
	printf("%s: %04x:%04x\n", argv[1], vendor, device);
	vfiokit_device_close(dev);
	return 0;
}
