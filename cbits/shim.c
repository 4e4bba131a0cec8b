/* nvmevfio C shim: thin wrappers over VFIO ioctls, mmap and MMIO.
 * Every int function returns >= 0 on success, -errno on failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/vfio.h>

#include "barrier.h"
#include "shim.h"

#ifndef NVMEVFIO_VERSION
#error "NVMEVFIO_VERSION must be defined by the build (cbits/build_cbits.py)"
#endif

#define NEG_ERRNO() (errno ? -errno : -EIO)

const char *nv_version(void) { return NVMEVFIO_VERSION; }

struct nv_named { const char *name; uint64_t value; };
static const struct nv_named nv_consts[] = {
    {"VFIO_API_VERSION", VFIO_API_VERSION},
    {"VFIO_TYPE1_IOMMU", VFIO_TYPE1_IOMMU},
    {"VFIO_TYPE1v2_IOMMU", VFIO_TYPE1v2_IOMMU},
    {"VFIO_NOIOMMU_IOMMU", VFIO_NOIOMMU_IOMMU},
    {"VFIO_GROUP_FLAGS_VIABLE", VFIO_GROUP_FLAGS_VIABLE},
    {"VFIO_GROUP_FLAGS_CONTAINER_SET", VFIO_GROUP_FLAGS_CONTAINER_SET},
    {"VFIO_DEVICE_FLAGS_RESET", VFIO_DEVICE_FLAGS_RESET},
    {"VFIO_DEVICE_FLAGS_PCI", VFIO_DEVICE_FLAGS_PCI},
    {"VFIO_REGION_INFO_FLAG_READ", VFIO_REGION_INFO_FLAG_READ},
    {"VFIO_REGION_INFO_FLAG_WRITE", VFIO_REGION_INFO_FLAG_WRITE},
    {"VFIO_REGION_INFO_FLAG_MMAP", VFIO_REGION_INFO_FLAG_MMAP},
    {"VFIO_REGION_INFO_FLAG_CAPS", VFIO_REGION_INFO_FLAG_CAPS},
    {"VFIO_PCI_BAR0_REGION_INDEX", VFIO_PCI_BAR0_REGION_INDEX},
    {"VFIO_PCI_CONFIG_REGION_INDEX", VFIO_PCI_CONFIG_REGION_INDEX},
    {"VFIO_PCI_INTX_IRQ_INDEX", VFIO_PCI_INTX_IRQ_INDEX},
    {"VFIO_PCI_MSI_IRQ_INDEX", VFIO_PCI_MSI_IRQ_INDEX},
    {"VFIO_PCI_MSIX_IRQ_INDEX", VFIO_PCI_MSIX_IRQ_INDEX},
    {"VFIO_PCI_REQ_IRQ_INDEX", VFIO_PCI_REQ_IRQ_INDEX},
    {"VFIO_IRQ_INFO_EVENTFD", VFIO_IRQ_INFO_EVENTFD},
    {"VFIO_IOMMU_INFO_PGSIZES", VFIO_IOMMU_INFO_PGSIZES},
    {"VFIO_IOMMU_INFO_CAPS", VFIO_IOMMU_INFO_CAPS},
};

int nv_const(const char *name, uint64_t *value)
{
    for (size_t i = 0; i < sizeof(nv_consts) / sizeof(nv_consts[0]); i++) {
        if (strcmp(nv_consts[i].name, name) == 0) {
            *value = nv_consts[i].value;
            return 0;
        }
    }
    return -ENOENT;
}

/* ---- container / group / device ---- */

int nv_container_open(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return NEG_ERRNO();
    int api = ioctl(fd, VFIO_GET_API_VERSION);
    if (api != VFIO_API_VERSION) {
        close(fd);
        return -EPROTO;
    }
    return fd;
}

int nv_container_check_extension(int container_fd, uint32_t extension)
{
    int r = ioctl(container_fd, VFIO_CHECK_EXTENSION, (unsigned long)extension);
    return r < 0 ? NEG_ERRNO() : r;
}

int nv_container_set_iommu(int container_fd, uint32_t iommu_type)
{
    return ioctl(container_fd, VFIO_SET_IOMMU, (unsigned long)iommu_type) < 0 ? NEG_ERRNO() : 0;
}

int nv_group_status(int group_fd, uint32_t *flags)
{
    struct vfio_group_status st = { .argsz = sizeof(st) };
    if (ioctl(group_fd, VFIO_GROUP_GET_STATUS, &st) < 0)
        return NEG_ERRNO();
    *flags = st.flags;
    return 0;
}

int nv_group_set_container(int group_fd, int container_fd)
{
    return ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, &container_fd) < 0 ? NEG_ERRNO() : 0;
}

int nv_group_unset_container(int group_fd)
{
    return ioctl(group_fd, VFIO_GROUP_UNSET_CONTAINER) < 0 ? NEG_ERRNO() : 0;
}

int nv_group_get_device(int group_fd, const char *address)
{
    int fd = ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, address);
    return fd < 0 ? NEG_ERRNO() : fd;
}

int nv_close(int fd)
{
    return close(fd) < 0 ? NEG_ERRNO() : 0;
}

int nv_device_info(int device_fd, struct nv_device_info *out)
{
    struct vfio_device_info info = { .argsz = sizeof(info) };
    if (ioctl(device_fd, VFIO_DEVICE_GET_INFO, &info) < 0)
        return NEG_ERRNO();
    out->flags = info.flags;
    out->num_regions = info.num_regions;
    out->num_irqs = info.num_irqs;
    return 0;
}

/* Walks an info capability chain (offsets are from the start of the info buffer). */
static struct vfio_info_cap_header *vfio_find_cap(void *buf, size_t len, uint32_t first, uint16_t id)
{
    uint32_t off = first;
    unsigned hops = 0;
    while (off != 0 && off + sizeof(struct vfio_info_cap_header) <= len && hops++ < 64) {
        struct vfio_info_cap_header *h = (struct vfio_info_cap_header *)((char *)buf + off);
        if (h->id == id)
            return h;
        off = h->next;
    }
    return NULL;
}

int nv_region_info(int device_fd, uint32_t index, struct nv_region_info *out,
                   struct nv_sparse_area *areas, uint32_t max_areas)
{
    struct vfio_region_info probe = { .argsz = sizeof(probe), .index = index };
    if (ioctl(device_fd, VFIO_DEVICE_GET_REGION_INFO, &probe) < 0)
        return NEG_ERRNO();
    size_t len = probe.argsz > sizeof(probe) ? probe.argsz : sizeof(probe);
    struct vfio_region_info *info = calloc(1, len);
    if (!info)
        return -ENOMEM;
    info->argsz = len;
    info->index = index;
    if (ioctl(device_fd, VFIO_DEVICE_GET_REGION_INFO, info) < 0) {
        int e = NEG_ERRNO();
        free(info);
        return e;
    }
    out->index = info->index;
    out->flags = info->flags;
    out->size = info->size;
    out->offset = info->offset;
    out->nr_sparse = 0;
    if ((info->flags & VFIO_REGION_INFO_FLAG_CAPS) && info->cap_offset) {
        struct vfio_info_cap_header *h =
            vfio_find_cap(info, len, info->cap_offset, VFIO_REGION_INFO_CAP_SPARSE_MMAP);
        if (h) {
            struct vfio_region_info_cap_sparse_mmap *sp = (void *)h;
            uint32_t n = sp->nr_areas;
            out->nr_sparse = n;
            for (uint32_t i = 0; i < n && i < max_areas; i++) {
                areas[i].offset = sp->areas[i].offset;
                areas[i].size = sp->areas[i].size;
            }
        }
    }
    free(info);
    return 0;
}

int nv_irq_info(int device_fd, uint32_t index, struct nv_irq_info *out)
{
    struct vfio_irq_info info = { .argsz = sizeof(info), .index = index };
    if (ioctl(device_fd, VFIO_DEVICE_GET_IRQ_INFO, &info) < 0)
        return NEG_ERRNO();
    out->index = info.index;
    out->flags = info.flags;
    out->count = info.count;
    return 0;
}

int nv_device_reset(int device_fd)
{
    return ioctl(device_fd, VFIO_DEVICE_RESET) < 0 ? NEG_ERRNO() : 0;
}

int nv_device_hot_reset_count(int device_fd)
{
    /* VFIO_DEVICE_GET_PCI_HOT_RESET_INFO with room for no device: ENOSPC says how many the bus
     * reset affects (count filled in); any other error says the function cannot be hot reset. */
    struct vfio_pci_hot_reset_info info = { .argsz = sizeof(info) };
    if (ioctl(device_fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, &info) == 0 || errno == ENOSPC)
        return (int)info.count;
    return NEG_ERRNO();
}

int nv_device_hot_reset(int device_fd, const int32_t *group_fds, uint32_t count)
{
    /* VFIO_DEVICE_PCI_HOT_RESET: a secondary bus reset of the bus the function sits on, proving
     * ownership of every affected device by its group fd (type1), or by none (count 0: a device
     * opened through its cdev, the iommufd owning them all; Linux 6.6+). */
    size_t size = sizeof(struct vfio_pci_hot_reset) + count * sizeof(int32_t);
    struct vfio_pci_hot_reset *r = calloc(1, size);
    if (!r)
        return -ENOMEM;
    r->argsz = (uint32_t)size;
    r->count = count;
    for (uint32_t i = 0; i < count; i++)
        r->group_fds[i] = group_fds[i];
    int ret = ioctl(device_fd, VFIO_DEVICE_PCI_HOT_RESET, r) < 0 ? NEG_ERRNO() : 0;
    free(r);
    return ret;
}

int nv_irq_set_eventfds(int device_fd, uint32_t index, uint32_t start,
                        uint32_t count, const int32_t *fds)
{
    size_t len = sizeof(struct vfio_irq_set) + sizeof(int32_t) * count;
    struct vfio_irq_set *set = calloc(1, len);
    if (!set)
        return -ENOMEM;
    set->argsz = len;
    set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->index = index;
    set->start = start;
    set->count = count;
    memcpy(set->data, fds, sizeof(int32_t) * count);
    int r = ioctl(device_fd, VFIO_DEVICE_SET_IRQS, set) < 0 ? NEG_ERRNO() : 0;
    free(set);
    return r;
}

int nv_irq_disable(int device_fd, uint32_t index)
{
    struct vfio_irq_set set = {
        .argsz = sizeof(set),
        .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        .index = index,
        .start = 0,
        .count = 0,
    };
    return ioctl(device_fd, VFIO_DEVICE_SET_IRQS, &set) < 0 ? NEG_ERRNO() : 0;
}

int nv_region_pread(int device_fd, uint64_t offset, void *buf, uint32_t len)
{
    ssize_t n = pread(device_fd, buf, len, (off_t)offset);
    if (n < 0)
        return NEG_ERRNO();
    return n == (ssize_t)len ? (int)n : -EIO;
}

int nv_region_pwrite(int device_fd, uint64_t offset, const void *buf, uint32_t len)
{
    ssize_t n = pwrite(device_fd, buf, len, (off_t)offset);
    if (n < 0)
        return NEG_ERRNO();
    return n == (ssize_t)len ? (int)n : -EIO;
}

int nv_region_mmap(int device_fd, uint64_t offset, uint64_t size, int writable, void **out)
{
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *p = mmap(NULL, size, prot, MAP_SHARED, device_fd, (off_t)offset);
    if (p == MAP_FAILED)
        return NEG_ERRNO();
    *out = p;
    return 0;
}

int nv_munmap(void *addr, uint64_t size)
{
    return munmap(addr, size) < 0 ? NEG_ERRNO() : 0;
}

int nv_map_ones(void *addr, uint64_t size)
{
    /* MAP_FIXED replaces the device mapping in one step: the VFIO device file loses the
     * reference this mapping held (so the kernel can take the device back), and the range
     * now reads all ones, what a removed PCIe device returns, instead of faulting. */
    void *p = mmap(addr, size, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NEG_ERRNO();
    memset(p, 0xFF, size);
    return 0;
}

/* ---- type1 IOMMU ---- */

int nv_iommu_info(int container_fd, struct nv_iommu_info *out,
                  struct nv_iova_range *ranges, uint32_t max_ranges)
{
    struct vfio_iommu_type1_info probe = { .argsz = sizeof(probe) };
    if (ioctl(container_fd, VFIO_IOMMU_GET_INFO, &probe) < 0)
        return NEG_ERRNO();
    size_t len = probe.argsz > sizeof(probe) ? probe.argsz : sizeof(probe);
    struct vfio_iommu_type1_info *info = calloc(1, len);
    if (!info)
        return -ENOMEM;
    info->argsz = len;
    if (ioctl(container_fd, VFIO_IOMMU_GET_INFO, info) < 0) {
        int e = NEG_ERRNO();
        free(info);
        return e;
    }
    out->flags = info->flags;
    out->iova_pgsizes = (info->flags & VFIO_IOMMU_INFO_PGSIZES) ? info->iova_pgsizes : 0;
    out->nr_ranges = 0;
    out->dma_avail = 0xffffffffu;
    if ((info->flags & VFIO_IOMMU_INFO_CAPS) && info->cap_offset) {
        struct vfio_info_cap_header *h =
            vfio_find_cap(info, len, info->cap_offset, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE);
        if (h) {
            struct vfio_iommu_type1_info_cap_iova_range *r = (void *)h;
            out->nr_ranges = r->nr_iovas;
            for (uint32_t i = 0; i < r->nr_iovas && i < max_ranges; i++) {
                ranges[i].start = r->iova_ranges[i].start;
                ranges[i].end = r->iova_ranges[i].end;
            }
        }
        h = vfio_find_cap(info, len, info->cap_offset, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL);
        if (h)
            out->dma_avail = ((struct vfio_iommu_type1_info_dma_avail *)h)->avail;
    }
    free(info);
    return 0;
}

int nv_dma_map(int container_fd, uint64_t vaddr, uint64_t iova, uint64_t size, int device_writable)
{
    struct vfio_iommu_type1_dma_map map = {
        .argsz = sizeof(map),
        .flags = VFIO_DMA_MAP_FLAG_READ | (device_writable ? VFIO_DMA_MAP_FLAG_WRITE : 0),
        .vaddr = vaddr,
        .iova = iova,
        .size = size,
    };
    return ioctl(container_fd, VFIO_IOMMU_MAP_DMA, &map) < 0 ? NEG_ERRNO() : 0;
}

int nv_dma_unmap(int container_fd, uint64_t iova, uint64_t size)
{
    struct vfio_iommu_type1_dma_unmap unmap = {
        .argsz = sizeof(unmap),
        .iova = iova,
        .size = size,
    };
    if (ioctl(container_fd, VFIO_IOMMU_UNMAP_DMA, &unmap) < 0)
        return NEG_ERRNO();
    return unmap.size == size ? 0 : -EFAULT;
}

/* ---- memory ---- */

int nv_mem_alloc(uint64_t size, int hugetlb, void **out)
{
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE;
    if (hugetlb)
        flags |= MAP_HUGETLB;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED)
        return NEG_ERRNO();
    /* VFIO_IOMMU_MAP_DMA pins the pages anyway; locking also keeps them out of swap
     * between allocation and mapping. A lock failure (RLIMIT_MEMLOCK) is not fatal. */
    (void)mlock(p, size);
    *out = p;
    return 0;
}

int nv_mem_free(void *addr, uint64_t size)
{
    (void)munlock(addr, size);
    return munmap(addr, size) < 0 ? NEG_ERRNO() : 0;
}

/* The no-IOMMU lane's pool: a hugetlbfs memfd of ``size`` bytes (whole huge pages), populated,
 * mapped shared and locked, so that the caller can learn each huge page's physical address
 * and the pages stay where they are. */
int nv_hugepool_create(uint64_t size, int *memfd, void **out)
{
    int fd = memfd_create("nvmevfio-pool", MFD_HUGETLB | MFD_CLOEXEC);
    if (fd < 0)
        return NEG_ERRNO();
    if (ftruncate(fd, (off_t)size) < 0) {
        int e = NEG_ERRNO();
        close(fd);
        return e;
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) {
        int e = NEG_ERRNO();
        close(fd);
        return e;
    }
    /* A shared hugetlb mapping reserves its huge pages at mmap time: a shortage fails the
     * mmap above (ENOMEM), never a later access. Huge pages are never swapped or migrated
     * while mapped; the lock is belt and braces. */
    (void)mlock(p, size);
    *memfd = fd;
    *out = p;
    return 0;
}

/* ---- eventfds ---- */

int nv_eventfd_open(void)
{
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return fd < 0 ? NEG_ERRNO() : fd;
}

/* ---- MMIO and barriers ---- */

uint32_t nv_mmio_read32(const void *base, uint64_t offset)
{
    return *(const volatile uint32_t *)((const char *)base + offset);
}

void nv_mmio_write32(void *base, uint64_t offset, uint32_t value)
{
    *(volatile uint32_t *)((char *)base + offset) = value;
}

uint64_t nv_mmio_read64(const void *base, uint64_t offset)
{
    return *(const volatile uint64_t *)((const char *)base + offset);
}

void nv_mmio_write64(void *base, uint64_t offset, uint64_t value)
{
    *(volatile uint64_t *)((char *)base + offset) = value;
}

/* The barriers, for Python (mmio.py, service/ring.py): thin wrappers over barrier.h's, which the
 * C files call inline. The doorbell write is the queue pairs' (nv_doorbell, cbits/qpair.c). */
void nv_wmb(void) { barrier_wmb(); }
void nv_rmb(void) { barrier_rmb(); }
void nv_mb(void) { barrier_mb(); }
uint32_t nv_load_acquire32(const void *addr) { return barrier_load_acquire32(addr); }
void nv_store_release32(void *addr, uint32_t value) { barrier_store_release32(addr, value); }
