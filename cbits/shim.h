/* nvmevfio C shim: declarations only. This file is both the C header and the
 * cffi cdef, so it holds no #include, no macro and no inline code.
 * Every function returning int returns >= 0 on success and -errno on failure;
 * policy (what to open, what to map where) lives in Python. */

struct nv_device_info {
    uint32_t flags;        /* VFIO_DEVICE_FLAGS_* */
    uint32_t num_regions;
    uint32_t num_irqs;
};

struct nv_region_info {
    uint32_t index;
    uint32_t flags;        /* VFIO_REGION_INFO_FLAG_* */
    uint64_t size;
    uint64_t offset;       /* offset of the region in the device fd */
    uint32_t nr_sparse;    /* areas from VFIO_REGION_INFO_CAP_SPARSE_MMAP (0: none) */
};

struct nv_sparse_area {
    uint64_t offset;
    uint64_t size;
};

struct nv_irq_info {
    uint32_t index;
    uint32_t flags;        /* VFIO_IRQ_INFO_* */
    uint32_t count;
};

struct nv_iommu_info {
    uint32_t flags;        /* VFIO_IOMMU_INFO_* */
    uint64_t iova_pgsizes;
    uint32_t nr_ranges;    /* ranges from VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE (0: none reported) */
    uint32_t dma_avail;    /* VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, or 0xffffffff when not reported */
};

struct nv_iova_range {
    uint64_t start;
    uint64_t end;          /* inclusive */
};

/* The package version the shim was built for (stamped at build time). */
const char *nv_version(void);

/* VFIO constants, so Python does not restate the UAPI header. */
int nv_const(const char *name, uint64_t *value);

/* Container, group, device (linux/vfio.h). */
int nv_container_open(const char *path);
int nv_container_check_extension(int container_fd, uint32_t extension);
int nv_container_set_iommu(int container_fd, uint32_t iommu_type);
int nv_group_open(const char *path);
int nv_group_status(int group_fd, uint32_t *flags);
int nv_group_set_container(int group_fd, int container_fd);
int nv_group_unset_container(int group_fd);
int nv_group_get_device(int group_fd, const char *address);
int nv_close(int fd);

int nv_device_info(int device_fd, struct nv_device_info *out);
int nv_region_info(int device_fd, uint32_t index, struct nv_region_info *out,
                   struct nv_sparse_area *areas, uint32_t max_areas);
int nv_irq_info(int device_fd, uint32_t index, struct nv_irq_info *out);
int nv_device_reset(int device_fd);
int nv_irq_set_eventfds(int device_fd, uint32_t index, uint32_t start,
                        uint32_t count, const int32_t *fds);
int nv_irq_disable(int device_fd, uint32_t index);

/* Region access through the device fd (config space, non-mmap regions). */
int nv_region_pread(int device_fd, uint64_t offset, void *buf, uint32_t len);
int nv_region_pwrite(int device_fd, uint64_t offset, const void *buf, uint32_t len);
int nv_region_mmap(int device_fd, uint64_t offset, uint64_t size, int writable, void **out);
int nv_munmap(void *addr, uint64_t size);

/* Type1 IOMMU. */
int nv_iommu_info(int container_fd, struct nv_iommu_info *out,
                  struct nv_iova_range *ranges, uint32_t max_ranges);
int nv_dma_map(int container_fd, uint64_t vaddr, uint64_t iova, uint64_t size, int device_writable);
int nv_dma_unmap(int container_fd, uint64_t iova, uint64_t size);

/* Page-aligned anonymous memory, populated and locked; 2 MiB hugetlb pages on request
 * (size must then be a multiple of 2 MiB). */
int nv_mem_alloc(uint64_t size, int hugetlb, void **out);
int nv_mem_free(void *addr, uint64_t size);

/* Eventfds for MSI-X. */
int nv_eventfd_open(void);
int nv_eventfd_read(int fd, uint64_t *count);
/* 1: readable, 0: timed out. Waits on every fd at once. */
int nv_eventfd_wait(const int32_t *fds, uint32_t nfds, int timeout_ms, uint32_t *ready_mask);

/* MMIO: each is one volatile access of exactly that width. */
uint32_t nv_mmio_read32(const void *base, uint64_t offset);
void nv_mmio_write32(void *base, uint64_t offset, uint32_t value);
uint64_t nv_mmio_read64(const void *base, uint64_t offset);
void nv_mmio_write64(void *base, uint64_t offset, uint64_t value);

/* Barriers. */
void nv_wmb(void);   /* stores before it are visible to the device before stores after it */
void nv_rmb(void);   /* loads after it are not satisfied before loads before it */
void nv_mb(void);    /* full fence */

/* Doorbell: a store barrier, then one 32-bit MMIO write (so the device sees every
 * queue entry written before it). */
void nv_doorbell(void *base, uint64_t offset, uint32_t value);
