/*
 * A libvfio-user server with ioeventfds, for tests/vfio_user (built by tests/vfio_user/libvfio-user
 * against Debian's copy of libvfio-user, like its own samples).
 *
 * BAR0: 4 KiB of registers, reached only by messages:
 *   0x100  doorbell: a 4-byte write of any value is an ioeventfd (vfu_create_ioeventfd)
 *   0x108  doorbell: an 8-byte write of 0x5a is an ioeventfd (datamatch); other values are
 *          REGION_WRITEs
 *   0x200  times the 0x100 doorbell rang (read: the eventfd's counter, taken and summed)
 *   0x208  times the 0x108 doorbell rang
 *   0x210  REGION_WRITEs seen
 *   0x218  the last value a REGION_WRITE wrote, at any offset
 * Other offsets read back the last value written there by message.
 *
 * Usage: doorbell <socket path>    serves one connection, then exits.
 */

#include <err.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "libvfio-user.h"

#define BAR0_SIZE 0x1000
#define DOORBELL_ANY 0x100
#define DOORBELL_MATCH 0x108
#define DATAMATCH 0x5a
#define RANG_ANY 0x200
#define RANG_MATCH 0x208
#define WRITES 0x210
#define LAST 0x218
#define KVM_IOEVENTFD_FLAG_DATAMATCH (1 << 0)

static int bell_any, bell_match;
static uint64_t rang_any, rang_match, writes, last;
static uint64_t regs[BAR0_SIZE / 8];

/* What an eventfd has counted since it was last read. */
static uint64_t take(int fd)
{
    uint64_t n = 0;
    if (read(fd, &n, sizeof(n)) != sizeof(n)) {
        return 0;
    }
    return n;
}

static ssize_t bar0_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t off, bool is_write)
{
    (void)ctx;
    if (count > 8 || off < 0 || (size_t)off + count > BAR0_SIZE) {
        errno = EINVAL;
        return -1;
    }
    if (is_write) {
        uint64_t v = 0;
        memcpy(&v, buf, count);
        writes++;
        last = v;
        regs[off / 8] = v;
        return count;
    }
    /* The doorbells are read when asked: ordering against them is the client's to keep. */
    rang_any += take(bell_any);
    rang_match += take(bell_match);
    uint64_t v;
    switch (off) {
    case RANG_ANY: v = rang_any; break;
    case RANG_MATCH: v = rang_match; break;
    case WRITES: v = writes; break;
    case LAST: v = last; break;
    default: v = regs[off / 8]; break;
    }
    memcpy(buf, &v, count);
    return count;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        errx(EXIT_FAILURE, "missing vfio-user socket path");
    }
    vfu_ctx_t *ctx = vfu_create_ctx(VFU_TRANS_SOCK, argv[1], 0, NULL, VFU_DEV_TYPE_PCI);
    if (ctx == NULL) {
        err(EXIT_FAILURE, "vfu_create_ctx");
    }
    if (vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0) < 0) {
        err(EXIT_FAILURE, "vfu_pci_init");
    }
    vfu_pci_set_id(ctx, 0x1234, 0xd00b, 0, 0);
    if (vfu_setup_region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, BAR0_SIZE, bar0_access,
                         VFU_REGION_FLAG_RW, NULL, 0, -1, 0) < 0) {
        err(EXIT_FAILURE, "vfu_setup_region");
    }
    bell_any = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    bell_match = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (bell_any < 0 || bell_match < 0) {
        err(EXIT_FAILURE, "eventfd");
    }
    if (vfu_create_ioeventfd(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, bell_any, DOORBELL_ANY, 4, 0, 0) < 0
        || vfu_create_ioeventfd(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, bell_match, DOORBELL_MATCH, 8,
                                KVM_IOEVENTFD_FLAG_DATAMATCH, DATAMATCH) < 0) {
        err(EXIT_FAILURE, "vfu_create_ioeventfd");
    }
    if (vfu_realize_ctx(ctx) < 0) {
        err(EXIT_FAILURE, "vfu_realize_ctx");
    }
    if (vfu_attach_ctx(ctx) < 0) {
        err(EXIT_FAILURE, "vfu_attach_ctx");
    }
    /* Until the client goes: vfu_run_ctx then fails with ENOTCONN. */
    while (vfu_run_ctx(ctx) >= 0 || errno == EINTR) {
    }
    vfu_destroy_ctx(ctx);
    return 0;
}
