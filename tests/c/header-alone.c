/* The public header compiles alone (C99, pedantic), and beside <linux/vfio.h>: vfiokit's
 * names never collide with the kernel's. Compiled, not run. */
#include <vfiokit.h>
#include <linux/vfio.h>

int vfiokit_header_alone(void);
int vfiokit_header_alone(void)
{
	return VFIOKIT_PCI_CONFIG == VFIO_PCI_CONFIG_REGION_INDEX;
}
