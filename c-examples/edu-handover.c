/* edu-handover: live handover of a running device to a new program, across exec, on QEMU's edu
 * device (1234:11e8).
 *
 * The old process opens edu in a type1 context (live handover needs type1's VFIO_UPDATE_VADDR),
 * enables MSI, allocates two DMA buffers with VFIOKIT_DMA_SHAREABLE and fills one; then it
 * forks, the child execs this program again with one end of a socketpair, and the old process
 * hands the context and the device over on the other end (vfiokit_iommu_hand_over) and exits.
 * The new program takes them over (vfiokit_iommu_take_over): the same device fd (never
 * reopened, so never reset), the MSI eventfd, the buffers at the same IOVAs, found at their new
 * addresses with vfiokit_dma_to_vaddr; it has edu's DMA engine copy one buffer into the other
 * through the device, each transfer completed by an MSI on the handed-over eventfd, and checks
 * the bytes. The IOVAs go beside the handover, as a driver passes its own state.
 * Failures print vfiokit_last_error() and exit 1; wrong data exits 2.
 *
 * Usage: edu-handover [PCI-ADDRESS]   (default: the first 1234:11e8 device bound to vfio-pci) */
#define _DEFAULT_SOURCE
#define EXAMPLE "edu-handover"
#include "example.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

enum { EDU_IRQ_STATUS = 0x24, EDU_IRQ_ACK = 0x64, EDU_DMA_SRC = 0x80, EDU_DMA_DST = 0x88,
       EDU_DMA_COUNT = 0x90, EDU_DMA_CMD = 0x98 };
#define EDU_BUFFER 0x40000
#define EDU_DMA_START 0x1
#define EDU_DMA_TO_RAM 0x2
#define EDU_DMA_IRQ 0x4 /* an interrupt when the transfer is done */
#define DMA_LEN 2048
#define TIMEOUT_MS 5000

/* One transfer by edu's DMA engine, completed by its MSI: 0 or a negative errno. */
static int dma(vfiokit_device *dev, uint64_t src, uint64_t dst, int to_ram)
{
	uint64_t count;
	uint32_t pending;
	int rc;
	if ((rc = vfiokit_write64(dev, VFIOKIT_PCI_BAR0, EDU_DMA_SRC, src)) < 0 ||
	    (rc = vfiokit_write64(dev, VFIOKIT_PCI_BAR0, EDU_DMA_DST, dst)) < 0 ||
	    (rc = vfiokit_write64(dev, VFIOKIT_PCI_BAR0, EDU_DMA_COUNT, DMA_LEN)) < 0 ||
	    (rc = vfiokit_write64(dev, VFIOKIT_PCI_BAR0, EDU_DMA_CMD,
					 EDU_DMA_START | EDU_DMA_IRQ | (to_ram ? EDU_DMA_TO_RAM : 0))) < 0 ||
	    (rc = vfiokit_irq_wait(dev, VFIOKIT_IRQ_MSI, 0, TIMEOUT_MS, &count)) < 0 ||
	    (rc = vfiokit_read32(dev, VFIOKIT_PCI_BAR0, EDU_IRQ_STATUS, &pending)) < 0)
		return rc;
	return vfiokit_write32(dev, VFIOKIT_PCI_BAR0, EDU_IRQ_ACK, pending);
}

/* The new program: takes the device over on `sock` and checks edu's DMA through it. */
static int take_over(int sock)
{
	vfiokit_iommu *iommu = NULL;
	vfiokit_device *dev = NULL;
	uint64_t iova[2];
	unsigned char *src, *dst;
	size_t n = 0;
	uint32_t id;
	char eof;
	int status = 1;

	EXPECT(recv(sock, iova, sizeof iova, MSG_WAITALL) == sizeof iova, "no IOVAs from the old process");
	TRY(vfiokit_iommu_take_over(sock, &iommu, &dev, 1, &n));
	TRY(vfiokit_read32(dev, VFIOKIT_PCI_BAR0, 0x00, &id));
	EXPECT(id == 0x010000ed, "id register reads %#x", id);
	TRY(vfiokit_dma_to_vaddr(iommu, iova[0], DMA_LEN, (void **)&src));
	TRY(vfiokit_dma_to_vaddr(iommu, iova[1], DMA_LEN, (void **)&dst));
	printf("edu-handover: new process %d took over %zu device; buffers at IOVAs %#llx and %#llx\n",
	       (int)getpid(), n, (unsigned long long)iova[0], (unsigned long long)iova[1]);
	for (int i = 0; i < DMA_LEN; i++)
		EXPECT(src[i] == (unsigned char)(i * 7 + 3), "byte %d of the old process's buffer is %#x", i, src[i]);
	/* The old process closes its end once it closed its handles: nothing of it is left. */
	EXPECT(recv(sock, &eof, 1, 0) == 0, "the old process did not close its end");
	printf("  the old process closed its handles: the device is ours alone\n");
	TRY(dma(dev, iova[0], EDU_BUFFER, 0));
	TRY(dma(dev, EDU_BUFFER, iova[1], 1));
	EXPECT(memcmp(src, dst, DMA_LEN) == 0, "the DMA copy differs");
	printf("  DMA: %d bytes through edu after the handover, identical, each transfer by MSI\n", DMA_LEN);
	printf("edu-handover: all results as expected\n");
	status = 0;
out:
	vfiokit_device_close(dev);
	vfiokit_iommu_close(iommu);
	return status;
}

int main(int argc, char **argv)
{
	vfiokit_iommu *iommu = NULL;
	vfiokit_device *dev = NULL;
	char found[256], fd_arg[16];
	unsigned char *src = NULL, *dst = NULL;
	uint64_t iova[2];
	uint16_t cmd;
	int sv[2] = {-1, -1}, efd, status = 1, child_status = 0;
	pid_t child = -1;

	if (argc == 3 && strcmp(argv[1], "--take-over") == 0)
		return take_over(atoi(argv[2]));
	const char *address = pick_device(argc > 1 ? argv[1] : NULL, 0x1234, 0x11e8, 0,
					  "edu device (1234:11e8)", found, sizeof found);
	if (!address)
		return 1;
	TRY(vfiokit_iommu_open(VFIOKIT_IOMMU_TYPE1, &iommu));
	TRY(vfiokit_device_open(address, iommu, &dev));
	TRY(vfiokit_read16(dev, VFIOKIT_PCI_CONFIG, 0x04, &cmd));
	TRY(vfiokit_write16(dev, VFIOKIT_PCI_CONFIG, 0x04, cmd | 0x6)); /* memory space, bus master */
	TRY(vfiokit_irq_enable(dev, VFIOKIT_IRQ_MSI, 0, 1, &efd));
	TRY(vfiokit_dma_alloc_flags(iommu, 4096, VFIOKIT_DMA_SHAREABLE, (void **)&src, &iova[0]));
	TRY(vfiokit_dma_alloc_flags(iommu, 4096, VFIOKIT_DMA_SHAREABLE, (void **)&dst, &iova[1]));
	for (int i = 0; i < DMA_LEN; i++)
		src[i] = (unsigned char)(i * 7 + 3);
	printf("edu-handover: old process %d opened %s, MSI enabled, two shareable DMA buffers\n",
	       (int)getpid(), address);
	EXPECT(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair: %s", strerror(errno));
	fflush(stdout);
	if ((child = fork()) == 0) {
		close(sv[0]);
		snprintf(fd_arg, sizeof fd_arg, "%d", sv[1]);
		/* argv[0], not /proc/self/exe: under valgrind that is valgrind's tool. */
		execvp(argv[0], (char *[]){argv[0], "--take-over", fd_arg, NULL});
		perror(EXAMPLE ": exec");
		_exit(1);
	}
	EXPECT(child > 0, "fork: %s", strerror(errno));
	close(sv[1]);
	sv[1] = -1;
	EXPECT(send(sv[0], iova, sizeof iova, 0) == sizeof iova, "sending the IOVAs: %s", strerror(errno));
	TRY(vfiokit_iommu_hand_over(iommu, &dev, 1, sv[0]));
	printf("edu-handover: handed over; the old process closes its handles\n");
	fflush(stdout);
	status = 0;
out:
	vfiokit_device_close(dev);
	vfiokit_iommu_close(iommu);
	if (sv[0] >= 0)
		close(sv[0]); /* after the handles: the new process waits for this */
	if (sv[1] >= 0)
		close(sv[1]);
	if (child > 0 && (waitpid(child, &child_status, 0) != child || !WIFEXITED(child_status) ||
			  WEXITSTATUS(child_status) != 0)) {
		fprintf(stderr, EXAMPLE ": the new process failed (status %#x)\n", child_status);
		status = status ? status : 1;
	}
	return status;
}
