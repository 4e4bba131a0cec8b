/* nvmevfio C shim: iommufd (linux/iommufd.h) and VFIO device cdevs (linux/vfio.h,
 * VFIO_DEVICE_BIND_IOMMUFD / VFIO_DEVICE_ATTACH_IOMMUFD_PT, Linux 6.6+).
 *
 * Build hosts may carry older UAPI headers (Debian 12's linux-libc-dev is 6.1, with no
 * iommufd.h and no cdev ioctls), so the few structures used here are restated from the
 * kernel's UAPI, which is a stable ABI: the layouts and ioctl numbers below are those of
 * include/uapi/linux/iommufd.h and vfio.h in Linux 6.12. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/vfio.h>

#include "shim.h"

#define NEG_ERRNO() (errno ? -errno : -EIO)

#define NV_IOMMUFD_TYPE ';'
#define NV_IOMMU_DESTROY _IO(NV_IOMMUFD_TYPE, 0x80)
#define NV_IOMMU_IOAS_ALLOC _IO(NV_IOMMUFD_TYPE, 0x81)
#define NV_IOMMU_IOAS_IOVA_RANGES _IO(NV_IOMMUFD_TYPE, 0x84)
#define NV_IOMMU_IOAS_MAP _IO(NV_IOMMUFD_TYPE, 0x85)
#define NV_IOMMU_IOAS_UNMAP _IO(NV_IOMMUFD_TYPE, 0x86)
#define NV_IOMMU_IOAS_MAP_FIXED_IOVA (1u << 0)
#define NV_IOMMU_IOAS_MAP_WRITEABLE (1u << 1)
#define NV_IOMMU_IOAS_MAP_READABLE (1u << 2)
#define NV_VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#define NV_VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)

struct nv_uapi_iommu_destroy { uint32_t size; uint32_t id; };
struct nv_uapi_ioas_alloc { uint32_t size; uint32_t flags; uint32_t out_ioas_id; };
struct nv_uapi_iova_range { uint64_t start; uint64_t last; };
struct nv_uapi_ioas_iova_ranges {
    uint32_t size;
    uint32_t ioas_id;
    uint32_t num_iovas;
    uint32_t reserved;
    uint64_t allowed_iovas;       /* user pointer to struct nv_uapi_iova_range[num_iovas] */
    uint64_t out_iova_alignment;
};
struct nv_uapi_ioas_map {
    uint32_t size;
    uint32_t flags;
    uint32_t ioas_id;
    uint32_t reserved;
    uint64_t user_va;
    uint64_t length;
    uint64_t iova;
};
struct nv_uapi_ioas_unmap { uint32_t size; uint32_t ioas_id; uint64_t iova; uint64_t length; };
struct nv_uapi_bind_iommufd { uint32_t argsz; uint32_t flags; int32_t iommufd; uint32_t out_devid; };
struct nv_uapi_attach_pt { uint32_t argsz; uint32_t flags; uint32_t pt_id; };

int nv_open_rw(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    return fd < 0 ? NEG_ERRNO() : fd;
}

int nv_iommufd_destroy(int iommufd, uint32_t id)
{
    struct nv_uapi_iommu_destroy d = { .size = sizeof(d), .id = id };
    return ioctl(iommufd, NV_IOMMU_DESTROY, &d) < 0 ? NEG_ERRNO() : 0;
}

int nv_ioas_alloc(int iommufd, uint32_t *ioas_id)
{
    struct nv_uapi_ioas_alloc a = { .size = sizeof(a) };
    if (ioctl(iommufd, NV_IOMMU_IOAS_ALLOC, &a) < 0)
        return NEG_ERRNO();
    *ioas_id = a.out_ioas_id;
    return 0;
}

int nv_ioas_iova_ranges(int iommufd, uint32_t ioas_id, struct nv_iova_range *ranges, uint32_t max_ranges,
                        uint32_t *nr_ranges, uint64_t *alignment)
{
    /* The kernel fills at most num_iovas entries and answers EMSGSIZE, with num_iovas set to
     * the real count, when that is more: ask again with room for all of them. */
    uint32_t room = 8;
    for (;;) {
        struct nv_uapi_iova_range *buf = calloc(room, sizeof(*buf));
        if (!buf)
            return -ENOMEM;
        struct nv_uapi_ioas_iova_ranges q = {
            .size = sizeof(q), .ioas_id = ioas_id, .num_iovas = room, .allowed_iovas = (uintptr_t)buf,
        };
        if (ioctl(iommufd, NV_IOMMU_IOAS_IOVA_RANGES, &q) < 0) {
            int e = NEG_ERRNO();
            free(buf);
            if (e == -EMSGSIZE && q.num_iovas > room && q.num_iovas < (1u << 16)) {
                room = q.num_iovas;
                continue;
            }
            return e;
        }
        *nr_ranges = q.num_iovas;
        *alignment = q.out_iova_alignment;
        for (uint32_t i = 0; i < q.num_iovas && i < max_ranges; i++) {
            ranges[i].start = buf[i].start;
            ranges[i].end = buf[i].last;
        }
        free(buf);
        return 0;
    }
}

int nv_ioas_map(int iommufd, uint32_t ioas_id, uint64_t vaddr, uint64_t iova, uint64_t size,
                int device_writable)
{
    /* The broker chose the IOVA (FIXED_IOVA): the kernel never picks an address for us. */
    struct nv_uapi_ioas_map m = {
        .size = sizeof(m),
        .flags = NV_IOMMU_IOAS_MAP_FIXED_IOVA | NV_IOMMU_IOAS_MAP_READABLE
                 | (device_writable ? NV_IOMMU_IOAS_MAP_WRITEABLE : 0),
        .ioas_id = ioas_id,
        .user_va = vaddr,
        .length = size,
        .iova = iova,
    };
    if (ioctl(iommufd, NV_IOMMU_IOAS_MAP, &m) < 0)
        return NEG_ERRNO();
    return m.iova == iova ? 0 : -EFAULT;
}

int nv_ioas_unmap(int iommufd, uint32_t ioas_id, uint64_t iova, uint64_t size)
{
    struct nv_uapi_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas_id, .iova = iova, .length = size };
    if (ioctl(iommufd, NV_IOMMU_IOAS_UNMAP, &u) < 0)
        return NEG_ERRNO();
    return u.length == size ? 0 : -EFAULT;
}

int nv_device_bind_iommufd(int device_fd, int iommufd, uint32_t *dev_id)
{
    struct nv_uapi_bind_iommufd b = { .argsz = sizeof(b), .iommufd = iommufd };
    if (ioctl(device_fd, NV_VFIO_DEVICE_BIND_IOMMUFD, &b) < 0)
        return NEG_ERRNO();
    *dev_id = b.out_devid;
    return 0;
}

int nv_device_attach_pt(int device_fd, uint32_t pt_id)
{
    struct nv_uapi_attach_pt a = { .argsz = sizeof(a), .pt_id = pt_id };
    return ioctl(device_fd, NV_VFIO_DEVICE_ATTACH_IOMMUFD_PT, &a) < 0 ? NEG_ERRNO() : 0;
}
