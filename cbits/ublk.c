/* nvmevfio ublk: a namespace as /dev/ublkbN, served per request in C (nvmevfio/ublk.py starts it).
 *
 * Linux's userspace block driver (drivers/block/ublk_drv.c, include/uapi/linux/ublk_cmd.h):
 * control commands are io_uring URING_CMDs on /dev/ublk-control (ADD_DEV, SET_PARAMS,
 * START_DEV, STOP_DEV, DEL_DEV, GET_DEV_INFO, START/END_USER_RECOVERY); each queue's server
 * thread keeps one FETCH_REQ per tag outstanding on /dev/ublkcN, reads the request from the
 * queue's mmapped descriptor array, and answers with COMMIT_AND_FETCH_REQ, which also fetches
 * the tag's next request. The queue's io_uring is cooperative (IORING_SETUP_COOP_TASKRUN): a new
 * request reaches the thread as task work without an IPI, and the loop enters the kernel for it
 * when the ring's IORING_SQ_TASKRUN flag says so.
 *
 * A tag's I/O buffer (the kernel copies a request's data in and out of it) is a slot of a
 * registered DMA buffer whose PRP entries and PRP-list page the broker authored once
 * (nv_prp_slot): one block request is one NVMe command, whose PRPs are copied from the tag's
 * slot. No address is derived here; a deallocate's one range is written into the tag's own
 * slot, which the broker's PRP1 already points at.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "shim.h"
#include "nvme.h"  /* NVMe opcodes and command bits */
#include "qpair.h"  /* qp_slot_dptr, qp_health: as the queue pairs build a slot's data pointer and read CSTS */

/* ---- ublk UAPI (include/uapi/linux/ublk_cmd.h, Linux 6.12), declared here: Debian 12's
 * headers predate the ioctl-encoded opcodes (UBLK_U_*) and user recovery ---- */

#define UBLK_CONTROL "/dev/ublk-control"

struct ublksrv_ctrl_cmd {
    uint32_t dev_id;
    uint16_t queue_id;     /* -1: not for a queue */
    uint16_t len;
    uint64_t addr;
    uint64_t data[1];
    uint16_t dev_path_len;
    uint16_t pad;
    uint32_t reserved;
};

struct ublksrv_io_cmd {
    uint16_t q_id;
    uint16_t tag;
    int32_t result;        /* COMMIT: the request's outcome (bytes, or -errno) */
    uint64_t addr;         /* FETCH: the tag's buffer in this process */
};

struct ublksrv_io_desc {
    uint32_t op_flags;     /* op: bits 0-7, UBLK_IO_F_* above */
    uint32_t nr_sectors;
    uint64_t start_sector;
    uint64_t addr;
};

struct ublk_param_basic {
    uint32_t attrs;
    uint8_t logical_bs_shift;
    uint8_t physical_bs_shift;
    uint8_t io_opt_shift;
    uint8_t io_min_shift;
    uint32_t max_sectors;
    uint32_t chunk_sectors;
    uint64_t dev_sectors;
    uint64_t virt_boundary_mask;
};

struct ublk_param_discard {
    uint32_t discard_alignment;
    uint32_t discard_granularity;
    uint32_t max_discard_sectors;
    uint32_t max_write_zeroes_sectors;
    uint16_t max_discard_segments;
    uint16_t reserved0;
};

/* struct ublk_params up to the two parameter types used (len says how much is given) */
struct ublk_params {
    uint32_t len;
    uint32_t types;
    struct ublk_param_basic basic;
    struct ublk_param_discard discard;
};

_Static_assert(sizeof(struct ublksrv_ctrl_cmd) == 32, "ublksrv_ctrl_cmd is 32 bytes");
_Static_assert(sizeof(struct ublksrv_io_cmd) == 16, "ublksrv_io_cmd fits a 64-byte SQE's command area");
_Static_assert(sizeof(struct ublksrv_io_desc) == 24, "ublksrv_io_desc is 24 bytes");
_Static_assert(sizeof(struct nv_ublk_info) == 64, "nv_ublk_info is ublksrv_ctrl_dev_info");

#define UBLK_IOC(dir, nr, size) (((dir) << 30) | ((size) << 16) | ('u' << 8) | (nr))
#define UBLK_IOC_R 2u
#define UBLK_IOC_WR 3u
#define UBLK_CTRL_IOWR(nr) UBLK_IOC(UBLK_IOC_WR, nr, sizeof(struct ublksrv_ctrl_cmd))
#define UBLK_U_CMD_GET_DEV_INFO UBLK_IOC(UBLK_IOC_R, 0x02u, sizeof(struct ublksrv_ctrl_cmd))
#define UBLK_U_CMD_ADD_DEV UBLK_CTRL_IOWR(0x04u)
#define UBLK_U_CMD_DEL_DEV UBLK_CTRL_IOWR(0x05u)
#define UBLK_U_CMD_START_DEV UBLK_CTRL_IOWR(0x06u)
#define UBLK_U_CMD_STOP_DEV UBLK_CTRL_IOWR(0x07u)
#define UBLK_U_CMD_SET_PARAMS UBLK_CTRL_IOWR(0x08u)
#define UBLK_U_CMD_START_USER_RECOVERY UBLK_CTRL_IOWR(0x10u)
#define UBLK_U_CMD_END_USER_RECOVERY UBLK_CTRL_IOWR(0x11u)
#define UBLK_U_CMD_DEL_DEV_ASYNC UBLK_IOC(UBLK_IOC_R, 0x14u, sizeof(struct ublksrv_ctrl_cmd))
#define UBLK_U_IO_FETCH_REQ UBLK_IOC(UBLK_IOC_WR, 0x20u, sizeof(struct ublksrv_io_cmd))
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ UBLK_IOC(UBLK_IOC_WR, 0x21u, sizeof(struct ublksrv_io_cmd))

#define UBLK_IO_RES_OK 0
#define UBLK_IO_RES_ABORT (-ENODEV)
#define UBLKSRV_CMD_BUF_OFFSET 0
#define UBLK_MAX_QUEUE_DEPTH 4096

#define UBLK_IO_OP_READ 0
#define UBLK_IO_OP_WRITE 1
#define UBLK_IO_OP_FLUSH 2
#define UBLK_IO_OP_DISCARD 3
#define UBLK_IO_OP_WRITE_ZEROES 5
#define UBLK_IO_F_FUA (1u << 13)
#define UBLK_IO_F_NOUNMAP (1u << 15)

#define UBLK_PARAM_TYPE_BASIC (1u << 0)
#define UBLK_PARAM_TYPE_DISCARD (1u << 1)

#define TAG_FETCHING 0   /* the kernel holds the tag: a FETCH or COMMIT_AND_FETCH is outstanding */
#define TAG_AT_DEVICE 1  /* its NVMe command is in flight */
#define TAG_GONE 2       /* the kernel ended its command (UBLK_IO_RES_ABORT): the device is stopping */
#define USER_DATA_IRQ (1ull << 63)      /* the io_uring read of the queue's MSI-X eventfd */
#define LOOK_EVERY_NS 1000000LL         /* how often a busy loop looks at CSTS, the stop flags, late commands */
#define IDLE_WAIT_NS 100000000LL        /* how long one wait in io_uring lasts before the stop flag is read */
#define SPIN_NS 300000LL                /* how long an idle server spins before it sleeps (docs/disk.md) */
#if defined(__x86_64__) || defined(__i386__)
#define SPIN_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define SPIN_PAUSE() __asm__ __volatile__("yield")
#else
#define SPIN_PAUSE() do {} while (0)
#endif

/* ---- control commands: one URING_CMD on /dev/ublk-control each ---- */

static int ctrl_cmd(uint32_t op, uint32_t dev_id, void *buf, uint16_t len, uint64_t data0)
{
    int fd = open(UBLK_CONTROL, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct io_uring ring;
    int r = io_uring_queue_init(4, &ring, IORING_SETUP_SQE128);  /* control commands take 128-byte SQEs */
    if (r < 0) {
        close(fd);
        return r;
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (sqe == NULL) {  /* a fresh ring of 4 always has one; said rather than assumed */
        io_uring_queue_exit(&ring);
        close(fd);
        return -EBUSY;
    }
    memset(sqe, 0, 2 * sizeof(*sqe));  /* SQE128: a control command's payload is the second half */
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd;
    sqe->cmd_op = op;
    struct ublksrv_ctrl_cmd *c = (struct ublksrv_ctrl_cmd *)sqe->cmd;
    c->dev_id = dev_id;
    c->queue_id = (uint16_t)-1;
    c->addr = (uint64_t)(uintptr_t)buf;
    c->len = len;
    c->data[0] = data0;
    r = io_uring_submit(&ring);
    if (r >= 0) {
        struct io_uring_cqe *cqe;
        do
            r = io_uring_wait_cqe(&ring, &cqe);
        while (r == -EINTR);  /* the command itself runs on; its CQE still comes */
        if (r == 0) {
            r = cqe->res;
            io_uring_cqe_seen(&ring, cqe);
        }
    }
    io_uring_queue_exit(&ring);
    close(fd);
    return r;
}

int nv_ublk_add_dev(struct nv_ublk_info *info)
{
    return ctrl_cmd(UBLK_U_CMD_ADD_DEV, info->dev_id, info, sizeof(*info), 0);
}

int nv_ublk_set_params(uint32_t dev_id, const struct nv_ublk_params *p)
{
    struct ublk_params up;
    memset(&up, 0, sizeof(up));
    up.len = sizeof(up);
    up.types = UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD;
    up.basic.attrs = p->attrs;
    up.basic.logical_bs_shift = p->logical_bs_shift;
    up.basic.physical_bs_shift = p->physical_bs_shift;
    up.basic.io_opt_shift = p->io_opt_shift;
    up.basic.io_min_shift = p->io_min_shift;
    up.basic.max_sectors = p->max_sectors;
    up.basic.dev_sectors = p->dev_sectors;
    up.discard.discard_granularity = p->discard_granularity;
    up.discard.max_discard_sectors = p->max_discard_sectors;
    up.discard.max_write_zeroes_sectors = p->max_write_zeroes_sectors;
    up.discard.max_discard_segments = p->max_discard_sectors ? 1 : 0;  /* ublk takes one range per discard */
    return ctrl_cmd(UBLK_U_CMD_SET_PARAMS, dev_id, &up, sizeof(up), 0);
}

int nv_ublk_start_dev(uint32_t dev_id, int32_t pid)
{
    return ctrl_cmd(UBLK_U_CMD_START_DEV, dev_id, NULL, 0, (uint64_t)pid);
}

int nv_ublk_stop_dev(uint32_t dev_id)
{
    return ctrl_cmd(UBLK_U_CMD_STOP_DEV, dev_id, NULL, 0, 0);
}

int nv_ublk_del_dev(uint32_t dev_id, int wait)
{
    /* DEL_DEV waits until nobody holds the device (a mounted filesystem does); DEL_DEV_ASYNC
     * (Linux 6.9+) removes it now and lets the last user free it. */
    if (!wait) {
        int r = ctrl_cmd(UBLK_U_CMD_DEL_DEV_ASYNC, dev_id, NULL, 0, 0);
        if (r != -EOPNOTSUPP && r != -EINVAL)
            return r;
    }
    return ctrl_cmd(UBLK_U_CMD_DEL_DEV, dev_id, NULL, 0, 0);
}

int nv_ublk_get_dev_info(uint32_t dev_id, struct nv_ublk_info *out)
{
    return ctrl_cmd(UBLK_U_CMD_GET_DEV_INFO, dev_id, out, sizeof(*out), 0);
}

int nv_ublk_start_recovery(uint32_t dev_id)
{
    return ctrl_cmd(UBLK_U_CMD_START_USER_RECOVERY, dev_id, NULL, 0, 0);
}

int nv_ublk_end_recovery(uint32_t dev_id, int32_t pid)
{
    return ctrl_cmd(UBLK_U_CMD_END_USER_RECOVERY, dev_id, NULL, 0, (uint64_t)pid);
}

/* ---- NVMe status -> errno (the table nvmevfio/nbd.py gives NBD clients) ---- */

int nv_ublk_errno(uint16_t status)
{
    uint32_t sct = (status >> 8) & 0x7, sc = status & 0xFF;
    if (sct == 0 && (sc == 0x02 || sc == 0x80))  /* Invalid Field in Command, LBA Out of Range */
        return EINVAL;
    if (sct == 0 && sc == 0x81)                  /* Capacity Exceeded */
        return ENOSPC;
    if (sct == 1 && sc == 0x80)                  /* Conflicting Attributes */
        return EINVAL;
    if (sct == 2 && sc == 0x82)                  /* Attempted Write to Read Only Range */
        return EROFS;
    return EIO;                                  /* media errors and everything else */
}

/* ---- a queue ---- */

static inline struct io_uring *ring_of(struct nv_ublk_queue *q) { return (struct io_uring *)q->ring; }

static inline const struct ublksrv_io_desc *iod_of(const struct nv_ublk_queue *q, uint32_t tag)
{
    return &((const struct ublksrv_io_desc *)q->iods)[tag];
}

static uint64_t iods_size(uint32_t depth)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    return (depth * sizeof(struct ublksrv_io_desc) + page - 1) / page * page;
}

/* Queue one FETCH_REQ or COMMIT_AND_FETCH_REQ for tag (no syscall; the loop submits). */
static int queue_io_cmd(struct nv_ublk_queue *q, uint32_t op, uint16_t tag, int32_t result)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring_of(q));
    if (!sqe)
        return -EBUSY;  /* cannot happen: the ring has a slot per tag and one for the eventfd */
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = q->char_fd;
    sqe->cmd_op = op;
    sqe->user_data = tag;
    struct ublksrv_io_cmd *c = (struct ublksrv_io_cmd *)sqe->cmd;
    c->q_id = (uint16_t)q->q_id;
    c->tag = tag;
    c->result = result;
    c->addr = (uint64_t)(uintptr_t)(q->buffers + (uint64_t)tag * q->slot_size);
    q->tag_state[tag] = TAG_FETCHING;
    return 0;
}

/* Arm a read of the MSI-X eventfd: its completion wakes the io_uring wait (irq mode). */
static int arm_irq(struct nv_ublk_queue *q, int irq_fd)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring_of(q));
    if (!sqe)
        return -EBUSY;
    io_uring_prep_read(sqe, irq_fd, &q->irq_count, sizeof(q->irq_count), 0);
    sqe->user_data = USER_DATA_IRQ;
    q->irq_armed = 1;
    return 0;
}

int nv_ublk_queue_open(struct nv_ublk_queue *q, int fetch)
{
    if (q->depth == 0 || q->depth > UBLK_MAX_QUEUE_DEPTH)
        return -EINVAL;
    q->tag_state = calloc(q->depth, 1);
    struct io_uring *ring = calloc(1, sizeof(*ring));
    if (!q->tag_state || !ring) {
        free(q->tag_state);
        free(ring);
        q->tag_state = NULL;
        return -ENOMEM;
    }
    /* tools/bench.py's anchor (--only ublk): answer every request at once, no NVMe command */
    const char *env = getenv("NVMEVFIO_UBLK_NULL");
    q->null_device = env && *env && strcmp(env, "0") != 0;
    q->spin_ns = SPIN_NS;
    /* IORING_SETUP_COOP_TASKRUN (Linux 5.19): the kernel hands this thread each new request as
     * task work (ublk_queue_rq -> io_uring_cmd_complete_in_task); by default it kicks a running
     * thread with an IPI so that the work runs at once. Cooperative: no IPI, and with
     * IORING_SETUP_TASKRUN_FLAG the ring's IORING_SQ_TASKRUN flag says work waits, which the loop
     * reads each turn and in its spin (a sleeping thread is still woken). Under TCG an IPI is a
     * write to the emulated APIC, in QEMU's model under its big lock, on the submitting CPU, and
     * an interrupt on the server's. Four boots, each both ways (docs/disk.md, "Session 23"):
     * randread QD1 1.13 of the kernel driver against 1.04, ext4 0.99 against 0.90, QD32 0.94
     * against 0.95. NVMEVFIO_UBLK_TASKRUN=ipi keeps the kernel's default, for A/B runs. */
    const char *tr = getenv("NVMEVFIO_UBLK_TASKRUN");
    int r = -EINVAL;
    if (!(tr && !strcmp(tr, "ipi"))) {
        r = io_uring_queue_init(q->depth + 2, ring, IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG);
        q->coop_taskrun = r == 0;
    }
    if (r == -EINVAL)  /* a kernel before 5.19 (ublk needs 6.0), or asked for the default */
        r = io_uring_queue_init(q->depth + 2, ring, 0);
    if (r < 0) {
        free(ring);
        free(q->tag_state);
        q->tag_state = NULL;
        return r;
    }
    q->ring = ring;
    /* The queue's request descriptors: read-only, written by the kernel before each FETCH completes. */
    uint64_t per_queue = iods_size(UBLK_MAX_QUEUE_DEPTH);
    void *iods = mmap(NULL, iods_size(q->depth), PROT_READ, MAP_SHARED | MAP_POPULATE, q->char_fd,
                      UBLKSRV_CMD_BUF_OFFSET + (off_t)(q->q_id * per_queue));
    if (iods == MAP_FAILED) {
        r = -errno;
        nv_ublk_queue_close(q);
        return r;
    }
    q->iods = iods;
    if (!fetch)
        return 0;
    for (uint32_t tag = 0; tag < q->depth; tag++)
        queue_io_cmd(q, UBLK_U_IO_FETCH_REQ, (uint16_t)tag, 0);
    /* FETCH_REQ is taken in the submitting call: once it returns, the kernel counts the queue ready. */
    r = io_uring_submit(ring);
    if (r < 0) {
        nv_ublk_queue_close(q);
        return r;
    }
    q->ready = 1;
    return 0;
}

void nv_ublk_queue_close(struct nv_ublk_queue *q)
{
    if (q->ring) {
        io_uring_queue_exit(ring_of(q));  /* outstanding FETCHes are cancelled: the kernel takes the tags back */
        free(q->ring);
        q->ring = NULL;
    }
    if (q->iods) {
        munmap(q->iods, iods_size(q->depth));
        q->iods = NULL;
    }
    free(q->tag_state);
    q->tag_state = NULL;
}

static void log_error(struct nv_ublk_queue *q, uint16_t tag, uint8_t op, uint64_t slba, uint32_t nlb,
                      uint16_t status, int32_t err)
{
    struct nv_ublk_error *e = &q->error_log[q->errors % NV_UBLK_ERROR_LOG];
    e->slba = slba;
    e->nlb = nlb;
    e->status = status;
    e->op = op;
    e->tag = tag;
    e->err = err;
    q->errors++;
}

/* Answer tag with result (bytes moved, or -errno) and fetch its next request. */
static int answer(struct nv_ublk_queue *q, uint16_t tag, int32_t result)
{
    return queue_io_cmd(q, UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
}

/* One block request: its NVMe command posted (1), or answered at once with an error (0). */
static int start(struct nv_ublk_queue *q, struct nv_qp *qp, uint16_t tag, int64_t now)
{
    const struct ublksrv_io_desc *iod = iod_of(q, tag);
    uint32_t op_flags = iod->op_flags;
    uint8_t op = op_flags & 0xFF;
    uint32_t shift = q->block_shift - 9;  /* the kernel counts 512-byte sectors */
    uint64_t slba = iod->start_sector >> shift;
    uint32_t nlb = iod->nr_sectors >> shift;
    uint64_t bytes = (uint64_t)nlb << q->block_shift;
    int err = 0;
    struct nv_sqe e;
    memset(&e, 0, sizeof(e));
    e.nsid = q->nsid;
    e.cdw10 = (uint32_t)slba;
    e.cdw11 = (uint32_t)(slba >> 32);
    q->requests++;
    if (op != UBLK_IO_OP_FLUSH) {
        if (((iod->start_sector | iod->nr_sectors) & ((1u << shift) - 1)) || nlb == 0)
            err = EINVAL;  /* not whole logical blocks */
        else if (slba + nlb > q->nblocks)
            err = ENOSPC;  /* past the namespace's end */
    }
    if (!err && q->read_only && op != UBLK_IO_OP_READ && op != UBLK_IO_OP_FLUSH)
        err = EROFS;
    if (!err) {
        switch (op) {
        case UBLK_IO_OP_READ:
        case UBLK_IO_OP_WRITE: {
            if (bytes > q->slot_size) {
                err = EINVAL;
                break;
            }
            e.opc = op == UBLK_IO_OP_READ ? NVME_CMD_READ : NVME_CMD_WRITE;
            qp_slot_dptr(&e, &q->prps[tag], bytes, q->page_size);
            e.cdw12 = (nlb - 1) | ((op_flags & UBLK_IO_F_FUA) ? NVME_RW_FUA : 0);  /* NLB is 0's based */
            if (op == UBLK_IO_OP_READ)
                q->reads++;
            else
                q->writes++;
            if (op_flags & UBLK_IO_F_FUA)
                q->fua++;
            break;
        }
        case UBLK_IO_OP_FLUSH:
            e.opc = NVME_CMD_FLUSH;
            e.cdw10 = e.cdw11 = 0;
            q->flushes++;
            break;
        case UBLK_IO_OP_DISCARD: {
            if (!(q->oncs & NVME_CTRL_ONCS_DSM)) {
                err = EOPNOTSUPP;
                break;
            }
            /* One range (NVM Command Set 3.2.3.2.1: context attributes, length, starting LBA) in
             * the tag's own slot; the device reads it through the broker's PRP1 for that slot.
             * The doorbell's store barrier orders these stores before the device's read. */
            uint32_t *range = (uint32_t *)(q->buffers + (uint64_t)tag * q->slot_size);
            range[0] = 0;
            range[1] = nlb;
            memcpy(&range[2], &slba, sizeof(slba));
            e.opc = NVME_CMD_DSM;
            e.prp1 = q->prps[tag].prp1;
            e.cdw10 = 0;  /* NR: one range, 0's based */
            e.cdw11 = NVME_DSMGMT_AD;
            q->discards++;
            break;
        }
        case UBLK_IO_OP_WRITE_ZEROES:
            if (!(q->oncs & NVME_CTRL_ONCS_WRITE_ZEROES)) {
                err = EOPNOTSUPP;
                break;
            }
            if (nlb > NVME_WZ_MAX_NLB) {
                err = EINVAL;
                break;
            }
            e.opc = NVME_CMD_WRITE_ZEROES;
            e.cdw12 = (nlb - 1) | ((op_flags & UBLK_IO_F_NOUNMAP) ? 0 : NVME_WZ_DEAC) |
                      ((op_flags & UBLK_IO_F_FUA) ? NVME_RW_FUA : 0);
            if (op_flags & UBLK_IO_F_NOUNMAP)
                q->write_zeroes++;
            else
                q->write_zeroes_unmap++;
            break;
        default:
            err = EOPNOTSUPP;
        }
    }
    if (err) {
        log_error(q, tag, op, slba, nlb, 0, -err);
        return answer(q, tag, -err) < 0 ? -EBUSY : 0;
    }
    if (q->null_device)  /* the anchor: ublk's own cost, no device behind it */
        return answer(q, tag, op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE ? (int32_t)bytes : 0) < 0 ? -EBUSY : 0;
    uint16_t cid;
    if (nv_qp_take(qp, 1, &cid) < 0)
        return -EBUSY;  /* cannot happen: the queue has an id and an SQ slot for every tag */
    e.cid = cid;
    int64_t r = nv_qp_push(qp, &e, q->buf_slot, q->buf_gen, tag, now);
    if (r < 0) {
        nv_qp_untake(qp, 1, &cid);
        return (int)r;
    }
    q->tag_state[tag] = TAG_AT_DEVICE;
    return 1;
}

int nv_ublk_queue_complete(struct nv_ublk_queue *q, uint32_t tag, uint16_t status)
{
    if (tag >= q->depth || q->tag_state[tag] != TAG_AT_DEVICE)
        return -EINVAL;
    const struct ublksrv_io_desc *iod = iod_of(q, tag);
    uint8_t op = iod->op_flags & 0xFF;
    int32_t result = 0;
    if (status) {
        uint32_t shift = q->block_shift - 9;
        result = -nv_ublk_errno(status);
        log_error(q, (uint16_t)tag, op, iod->start_sector >> shift, iod->nr_sectors >> shift, status, result);
    } else if (op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE) {
        result = (int32_t)((uint64_t)iod->nr_sectors << 9);
        if (op == UBLK_IO_OP_READ)
            q->bytes_read += (uint64_t)result;
        else
            q->bytes_written += (uint64_t)result;
    }
    return answer(q, (uint16_t)tag, result);
}

/* Take every ready io_uring completion: new requests start, aborted tags are counted. Returns
 * the NVMe commands posted, or -errno. */
static int take_requests(struct nv_ublk_queue *q, struct nv_qp *qp)
{
    struct io_uring *ring = ring_of(q);
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    int posted = 0, err = 0;
    int64_t now = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
        seen++;
        if (cqe->user_data == USER_DATA_IRQ) {
            q->irq_armed = 0;
            q->interrupts++;
            continue;
        }
        uint16_t tag = (uint16_t)cqe->user_data;
        if (cqe->res == UBLK_IO_RES_OK) {
            if (!now)
                now = nv_now_ns();
            int r = start(q, qp, tag, now);
            if (r < 0 && !err)
                err = r;
            posted += r > 0;
        } else if (cqe->res == UBLK_IO_RES_ABORT) {
            if (q->tag_state[tag] != TAG_GONE) {
                q->tag_state[tag] = TAG_GONE;
                q->gone++;
            }
        } else if (!err) {
            err = cqe->res;  /* the kernel refused a FETCH or COMMIT: a bug here, or the device is broken */
            q->last_cqe_error = cqe->res;
        }
    }
    io_uring_cq_advance(ring, seen);
    return err ? err : posted;
}

/* IORING_SQ_TASKRUN: task work for this thread waits (COOP_TASKRUN, TASKRUN_FLAG). A relaxed
 * load (no barrier): nothing is read after it but the kernel's own CQEs, which io_uring_get_events
 * posts; a flag seen late costs one turn of the loop. */
static inline int task_work_waits(struct io_uring *ring)
{
    return (IO_URING_READ_ONCE(*ring->sq.kflags) & IORING_SQ_TASKRUN) != 0;
}

/* io_uring_submit, its time counted: the kernel's side of the answers (COMMIT_AND_FETCH, and for
 * a READ the copy from the tag's buffer into the request's pages). */
static int submit_timed(struct nv_ublk_queue *q, struct io_uring *ring)
{
    int64_t t0 = nv_now_ns();
    int n = io_uring_submit(ring);
    q->submit_ns += (uint64_t)(nv_now_ns() - t0);
    return n;
}

static int queue_run(struct nv_ublk_queue *q, const struct nv_perf *w, struct nv_qp *qp)
{
    q->prps = w->prps;
    q->buf_slot = w->buf_slot;
    q->buf_gen = w->buf_gen;
    q->nsid = w->nsid;
    q->page_size = w->page_size;
    q->timeout_ns = w->timeout_ns;
    struct io_uring *ring = ring_of(q);
    struct nv_completion done[64];
    int64_t next_look = nv_now_ns() + LOOK_EVERY_NS;
    uint32_t turns = 0;
    int woke_empty = 0;  /* the last sleep ended and this turn found nothing: sleep again, no spin */
    for (;;) {
        if (task_work_waits(ring)) {
            /* new requests' task work (no IPI was sent): enter the kernel to run it, which posts
             * their FETCH completions; the time counts as submission time */
            int64_t t0 = nv_now_ns();
            int r = io_uring_get_events(ring);
            q->submit_ns += (uint64_t)(nv_now_ns() - t0);
            q->taskrun_enters++;
            if (r < 0 && r != -EINTR && r != -EBUSY)
                return r;
        }
        int posted = take_requests(q, qp);
        if (posted < 0)
            return posted;
        if (posted) {
            q->nvme_batches++;
            nv_qp_ring_sq(qp);  /* one SQ tail doorbell for the batch */
        }
        uint32_t nunpin = 0;
        int n = 0;
        int reaped = 0;
        while (qp_pending(qp) && (n = nv_qp_reap(qp, done, 64, NULL, 0, &nunpin)) > 0) {
            for (int i = 0; i < n; i++)
                nv_ublk_queue_complete(q, done[i].cookie, done[i].status);
            reaped += n;
        }
        if (reaped && qp_cq_must_ring(qp, q->depth))  /* one command a tag: q->depth at most outstanding */
            nv_qp_ring_cq(qp);  /* one CQ head doorbell for the batch, when the CQ needs its room back */
        if (n < 0)
            return n;  /* -EPROTO: a completion for an id not in flight (the broker names it) */
        if (q->gone == q->depth && qp->in_flight == 0)
            return 0;  /* the device was stopped and everything answered */
        if (*(const volatile int32_t *)&q->stop)
            return -ECANCELED;  /* Python asked this loop to return (volatile: another thread sets it) */
        int64_t now = 0;
        if (qp->in_flight && (++turns & 15) == 0 && (now = nv_now_ns()) >= next_look) {
            /* the clock read every 16th turn: under an emulated CPU it costs as much as the turn */
            next_look = now + LOOK_EVERY_NS;
            int bad = qp_health(qp);
            if (bad && !nv_qp_pending(qp))
                return bad;
            if (now - nv_qp_oldest_submit(qp) >= q->timeout_ns)
                return -ETIMEDOUT;  /* late: the broker recovers (abort, reset, requeue) */
        }
        if (qp->in_flight && qp->irq_fd < 0) {
            /* Polling: spin on the CQ, with the new requests' io_uring completions, submitting
             * only when there are answers to send. */
            if (io_uring_sq_ready(ring) && (n = submit_timed(q, ring)) < 0 && n != -EINTR)
                return n;
            continue;
        }
        if (reaped || posted) {
            woke_empty = 0;
            continue;  /* more may be ready: look again before sleeping */
        }
        if (q->spin_ns > 0 && !woke_empty) {
            /* Spin a while before sleeping: the answers go now, and the next request (its
             * io_uring completion, posted by task work when the kernel's IPI interrupts this
             * spin) or the device's completion is taken without a sleep and a wake-up of this
             * CPU (a halted vCPU wakes slowly). The stop flags end the spin at once. */
            if (io_uring_sq_ready(ring) && (n = submit_timed(q, ring)) < 0 && n != -EINTR)
                return n;
            int64_t spun_from = nv_now_ns();
            int64_t until = spun_from + q->spin_ns;
            int got = 0;
            do {
                for (int i = 0; i < 64 && !got; i++) {
                    got = io_uring_cq_ready(ring) || (qp->in_flight && qp_pending(qp)) ||
                          task_work_waits(ring);
                    SPIN_PAUSE();
                }
            } while (!got && !*(const volatile int32_t *)&q->stop && !qp_stop_flag(qp) && nv_now_ns() < until);
            q->spun_ns += (uint64_t)(nv_now_ns() - spun_from);
            if (got) {
                q->spin_hits++;
                continue;
            }
        }
        /* Nothing at the device to spin for (or interrupts): submit the answers and sleep until a
         * request or the eventfd's read completes, at most IDLE_WAIT_NS. */
        if (qp->irq_fd >= 0 && !q->irq_armed) {
            /* Armed only now, for the sleep: a read armed while the server runs completes on every
             * interrupt (the eventfd's wake-up, task work, a CQE, a new read to submit), which at
             * depth cost more than the commands (docs/disk.md: QD32 0.91 -> 1.27 of the kernel,
             * 128 KiB 0.71 -> 1.10, one boot). The interrupts of a spin leave a count in the
             * eventfd: the read then completes at once and the next turn, finding nothing, sleeps
             * without spinning (woke_empty). */
            int a = arm_irq(q, qp->irq_fd);
            if (a < 0)
                return a;
        }
        struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = qp->in_flight ? LOOK_EVERY_NS : IDLE_WAIT_NS};
        struct io_uring_cqe *cqe;
        q->sleeps++;
        int64_t slept_from = nv_now_ns();
        int r = io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, NULL);
        q->slept_ns += (uint64_t)(nv_now_ns() - slept_from);
        if (r < 0 && r != -ETIME && r != -EINTR && r != -EBUSY)
            return r;
        woke_empty = 1;
        turns |= 15;  /* after a wait, the next turn reads the clock: CSTS and the stop flags each wait */
    }
}

int nv_ublk_queue_run(struct nv_ublk_queue *q, const struct nv_perf *w, struct nv_qp *qp)
{
    int r = queue_run(q, w, qp);
    nv_qp_ring_cq(qp);  /* the head consumed so far: the broker's recovery or shutdown finds a CQ with all its room */
    return r;
}
