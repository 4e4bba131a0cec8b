/* nvmevfio queue pairs: the per-command steps that both cbits/qpair.c (post, reap) and
 * cbits/perf.c (the closed loop) run, inline, so that neither pays a call per command.
 * Private to the C files: cffi never sees this header. Include it after shim.h (which, being
 * the cffi declarations too, can have no include guard). */
#ifndef NVMEVFIO_QPAIR_H
#define NVMEVFIO_QPAIR_H

#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "barrier.h"
#include "nvme.h"

/* busy[cid]: a command id is free, taken (its PRP-list pages being authored), in flight, or
 * standing (an Asynchronous Event Request: outstanding until the controller has an event) */
#define CID_FREE 0
#define CID_TAKEN 1
#define CID_IN_FLIGHT 2
#define CID_STANDING 3
#define CID_DIVERTED (-2)  /* qp_consume(): a standing command's completion, kept in events */

/* Free SQ slots: one always stays empty, so that full and empty differ (3.3.1.5). */
static inline uint32_t qp_sq_free(const struct nv_qp *qp)
{
    uint32_t used = (qp->sq_tail + qp->depth - qp->sq_head) % qp->depth;
    return qp->depth - 1 - used;
}

/* Commands that can be posted now: free command ids and free SQ slots (nv_qp_capacity). */
static inline uint32_t qp_capacity(const struct nv_qp *qp)
{
    uint32_t f = qp_sq_free(qp);
    return f < qp->free_top ? f : qp->free_top;
}

/* Record the entry e (just copied into the SQ) in flight. */
static inline void qp_record(struct nv_qp *qp, const struct nv_sqe *e, int64_t now, int64_t buf_slot,
                             int64_t buf_gen, uint32_t cookie)
{
    uint16_t cid = e->cid;
    uint8_t opc = e->opc;
    qp->saved[cid] = *e;
    qp->retries[cid] = 0;
    qp->busy[cid] = CID_IN_FLIGHT;
    qp->opcode[cid] = opc;
    qp->tag[cid] = qp->next_tag++;
    qp->submit_ns[cid] = now;
    qp->buf_slot[cid] = buf_slot;
    qp->buf_gen[cid] = buf_gen;
    qp->cookie[cid] = cookie;
}

static inline void qp_advance_tail(struct nv_qp *qp)
{
    qp->sq_tail = qp->sq_tail + 1 == qp->depth ? 0 : qp->sq_tail + 1;
}

/* The data pointer of a READ/WRITE of len bytes in a registered buffer's slot, from what the
 * broker authored for it (no address is computed here): an SGL Data Block descriptor (4.1.2:
 * PSDT 01b, the slot's address, the length; its identifier byte is 00h), or PRPs (4.1.1), where
 * the memory pages the transfer touches pick which of the broker's PRP2 values applies. */
static inline void qp_slot_dptr(struct nv_sqe *e, const struct nv_prp_slot *p, uint64_t len, uint32_t page_size)
{
    e->prp1 = p->prp1;
    if (p->sgl) {
        e->flags |= NVME_PSDT_SGL;
        e->prp2 = len;
        return;
    }
    uint64_t pages = (p->prp1 % page_size + len + page_size - 1) / page_size;
    e->prp2 = pages <= 1 ? 0 : pages == 2 ? p->prp2_page : p->prp2_list;
}

/* Write one READ/WRITE into the SQ at the tail for a registered buffer's slot (a free id taken
 * here, its PRPs the broker's), and record it in flight. The caller checked the room, and
 * counts in_flight and posted for the batch. */
static inline void qp_post_slot(struct nv_qp *qp, uint8_t opc, uint32_t nsid, uint64_t slba, uint32_t nlb,
                                uint32_t slot, const struct nv_prp_slot *prps, uint32_t block_size,
                                uint32_t page_size, int64_t now, int64_t buf_slot, int64_t buf_gen)
{
    uint16_t cid = qp->free_stack[--qp->free_top];
    struct nv_sqe *e = &qp->sq[qp->sq_tail];
    memset(e, 0, sizeof(*e));
    e->opc = opc;
    e->cid = cid;
    e->nsid = nsid;
    qp_slot_dptr(e, &prps[slot], (uint64_t)nlb * block_size, page_size);
    e->cdw10 = (uint32_t)slba;
    e->cdw11 = (uint32_t)(slba >> 32);
    e->cdw12 = nlb - 1;  /* NLB is 0's based */
    qp_advance_tail(qp);
    qp_record(qp, e, now, buf_slot, buf_gen, slot);
}

static inline uint16_t qp_cqe_status(const struct nv_qp *qp, uint32_t slot)
{
    return *(const volatile uint16_t *)&qp->cq[slot].status;
}

/* Is the entry at the CQ head new (its phase tag the current phase)? (nv_qp_pending) */
static inline int qp_pending(const struct nv_qp *qp)
{
    return (qp_cqe_status(qp, qp->cq_head) & 1) == qp->cq_phase;
}

/* The broker's stop flag (a word in host memory, cheap to read): 1, the kernel asked for the
 * device back (VFIO's device request), so no completion will be waited for; 2, another thread
 * is resetting the controller: let go of the queue. The closed loops (perf, the workload) read
 * it once per turn, since a loop that always finds completions never waits. volatile: another
 * thread writes it while the loop runs. */
static inline int qp_stop_flag(const struct nv_qp *qp)
{
    if (!qp->stop)
        return 0;
    int32_t stop = *(const volatile int32_t *)qp->stop;
    return stop == 1 ? -ENODEV : stop == 2 ? -EAGAIN : 0;
}

/* The stop flag, then CSTS (an MMIO read, so at most once a millisecond of waiting): all ones
 * means the device is gone (surprise removal), CFS that the controller hit a fatal error; either
 * way no completion will come. Every wait for completions reads both (qpair.c's waits, perf's
 * and the workload's naps, the ublk server). */
static inline int qp_health(const struct nv_qp *qp)
{
    int stop = qp_stop_flag(qp);
    if (stop)
        return stop;
    if (!qp->csts)
        return 0;
    /* CSTS (3.1.4.6); volatile: the device changes it */
    uint32_t v = *(const volatile uint32_t *)qp->csts;
    if (v == 0xFFFFFFFFu)
        return -ENODEV;
    return (v & NVME_CSTS_CFS) ? -EIO : 0;
}

/* A standing command's completion, kept in qp->events (cbits/qpair.c). */
__attribute__((visibility("hidden"))) void qp_keep_event(struct nv_qp *qp, uint16_t cid, const struct nv_cqe *cqe);

/* Consume the entry at the head (the caller saw its phase tag). Returns its cid, -1 when the
 * id is not in flight, or CID_DIVERTED for a standing command's (kept in events). */
static inline int qp_consume(struct nv_qp *qp, struct nv_cqe *cqe)
{
    /* The phase tag was read first; the rest of the entry must not be read from before
     * it (the device writes the whole entry, the tag last in effect): read barrier. */
    barrier_rmb();
    *cqe = qp->cq[qp->cq_head];
    if (cqe->cid >= qp->ncids || (qp->busy[cqe->cid] != CID_IN_FLIGHT && qp->busy[cqe->cid] != CID_STANDING)) {
        qp->bad_cid = cqe->cid;
        return -1;
    }
    if (++qp->cq_head == qp->depth) {
        qp->cq_head = 0;
        qp->cq_phase ^= 1;  /* the head wrapped: new entries carry the other phase */
    }
    qp->sq_head = cqe->sqhd % qp->depth;
    if (qp->busy[cqe->cid] == CID_STANDING) {
        qp_keep_event(qp, cqe->cid, cqe);
        return CID_DIVERTED;
    }
    return cqe->cid;
}

/* Must the CQ head doorbell be written now, or can it wait for a later batch? A CQ is full with
 * one entry fewer than its size in use (3.3.1.5), and the entries it holds for the controller
 * are those after the head last written: the ones consumed since (unrung) and up to one for
 * each command outstanding, of which the caller has at most ``most``. While those cannot fill
 * it before the caller's next batch, the doorbell (an MMIO write; on an emulated controller an
 * exit to its model under its lock) waits: a queue of twice ``most`` entries and one is written
 * about once every ``most`` completions instead of once a batch; a queue of ``most`` + 1 (no
 * room to spare) every batch. */
static inline int qp_cq_must_ring(const struct nv_qp *qp, uint32_t most)
{
    uint32_t unrung = (qp->cq_head + qp->depth - qp->cq_rung) % qp->depth;
    return unrung + most >= qp->depth;
}

/* A consumed command's id is free again. */
static inline void qp_retire(struct nv_qp *qp, uint16_t cid)
{
    qp->busy[cid] = CID_FREE;
    qp->free_stack[qp->free_top++] = cid;
    qp->in_flight--;
    qp->completed++;
}

#endif
