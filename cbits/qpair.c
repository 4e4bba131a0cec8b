/* nvmevfio queue pairs: the per-command hot path, and the perf closed loop.
 *
 * NVMe Base Specification 2.0: 3.3.1 (queues, one SQ slot kept empty), 3.3.3.2.2
 * (phase tag), 4.1 (PRPs), 5.8 (Doorbell Buffer Config: shadow doorbells and EventIdx).
 * Every address written into an SQE here was authored by the broker in Python. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "shim.h"

#define NV_CID_TAKE 0xFFFF
/* busy[cid]: a command id is free, taken (its PRP-list pages being authored), in flight, or
 * standing (an Asynchronous Event Request: outstanding until the controller has an event) */
#define CID_FREE 0
#define CID_TAKEN 1
#define CID_IN_FLIGHT 2
#define CID_STANDING 3
#define NV_EVENTS_MAX 16
#define CID_DIVERTED (-2)  /* consume(): a standing command's completion, kept in events */

_Static_assert(sizeof(struct nv_sqe) == 64, "an SQE is 64 bytes");
_Static_assert(sizeof(struct nv_cqe) == 16, "a CQE is 16 bytes");

int64_t nv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---- set up ---- */

struct nv_qp *nv_qp_new(uint32_t qid, uint32_t depth, void *sq, void *cq, void *bar,
                        uint64_t sq_db, uint64_t cq_db)
{
    if (depth < 2 || depth > 65536)
        return NULL;
    struct nv_qp *qp = calloc(1, sizeof(*qp));
    if (!qp)
        return NULL;
    uint32_t n = depth - 1;
    qp->qid = qid;
    qp->depth = depth;
    qp->ncids = n;
    qp->sq = sq;
    qp->cq = cq;
    qp->bar = bar;
    qp->sq_db = sq_db;
    qp->cq_db = cq_db;
    qp->irq_fd = -1;
    qp->cq_phase = 1;
    qp->next_tag = 1;
    qp->free_stack = calloc(n, sizeof(uint16_t));
    qp->busy = calloc(n, 1);
    qp->opcode = calloc(n, 1);
    qp->tag = calloc(n, sizeof(int64_t));
    qp->submit_ns = calloc(n, sizeof(int64_t));
    qp->buf_slot = calloc(n, sizeof(int64_t));
    qp->buf_gen = calloc(n, sizeof(int64_t));
    qp->cookie = calloc(n, sizeof(uint32_t));
    qp->saved = calloc(n, sizeof(struct nv_sqe));
    qp->retries = calloc(n, 1);
    if (!qp->free_stack || !qp->busy || !qp->opcode || !qp->tag || !qp->submit_ns || !qp->buf_slot ||
        !qp->buf_gen || !qp->cookie || !qp->saved || !qp->retries) {
        nv_qp_free(qp);
        return NULL;
    }
    /* Free ids on a stack, id 0 on top: the first command gets id 0. */
    for (uint32_t i = 0; i < n; i++)
        qp->free_stack[i] = (uint16_t)(n - 1 - i);
    qp->free_top = n;
    return qp;
}

void nv_qp_free(struct nv_qp *qp)
{
    if (!qp)
        return;
    free(qp->free_stack);
    free(qp->busy);
    free(qp->opcode);
    free(qp->tag);
    free(qp->submit_ns);
    free(qp->buf_slot);
    free(qp->buf_gen);
    free(qp->cookie);
    free(qp->saved);
    free(qp->retries);
    free(qp);
}

void nv_qp_set_hook(struct nv_qp *qp, nv_doorbell_fn fn, void *ctx)
{
    qp->hook = fn;
    qp->hook_ctx = ctx;
}

void nv_qp_set_shadow(struct nv_qp *qp, void *shadow_sq, void *shadow_cq, void *eventidx_sq, void *eventidx_cq)
{
    qp->shadow_sq = shadow_sq;
    qp->shadow_cq = shadow_cq;
    qp->eventidx_sq = eventidx_sq;
    qp->eventidx_cq = eventidx_cq;
}

/* ---- ring arithmetic ---- */

static inline uint32_t sq_free(const struct nv_qp *qp)
{
    uint32_t used = (qp->sq_tail + qp->depth - qp->sq_head) % qp->depth;
    return qp->depth - 1 - used;
}

uint32_t nv_qp_capacity(const struct nv_qp *qp)
{
    uint32_t f = sq_free(qp);
    return f < qp->free_top ? f : qp->free_top;
}

int nv_qp_take(struct nv_qp *qp, uint32_t n, uint16_t *cids)
{
    if (n > nv_qp_capacity(qp))
        return -EBUSY;
    for (uint32_t i = 0; i < n; i++) {
        cids[i] = qp->free_stack[--qp->free_top];
        qp->busy[cids[i]] = CID_TAKEN;
    }
    return (int)n;
}

int nv_qp_untake(struct nv_qp *qp, uint32_t n, const uint16_t *cids)
{
    for (uint32_t i = 0; i < n; i++)
        if (cids[i] >= qp->ncids || qp->busy[cids[i]] != CID_TAKEN)
            return -EINVAL;
    for (uint32_t i = n; i-- > 0;) {
        qp->busy[cids[i]] = CID_FREE;
        qp->free_stack[qp->free_top++] = cids[i];
    }
    return 0;
}

static inline void record(struct nv_qp *qp, const struct nv_sqe *e, int64_t now, int64_t buf_slot,
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

static inline void advance_tail(struct nv_qp *qp)
{
    qp->sq_tail = qp->sq_tail + 1 == qp->depth ? 0 : qp->sq_tail + 1;
}

int64_t nv_qp_post(struct nv_qp *qp, const struct nv_sqe *entries, uint32_t n, int64_t buf_slot, int64_t buf_gen)
{
    if (n > sq_free(qp))
        return -EBUSY;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t cid = entries[i].cid;
        if (cid >= qp->ncids || qp->busy[cid] != CID_TAKEN)
            return -EINVAL;  /* not an id from nv_qp_take: nothing of the batch was written */
    }
    int64_t first = qp->next_tag;
    int64_t now = nv_now_ns();
    for (uint32_t i = 0; i < n; i++) {
        memcpy(&qp->sq[qp->sq_tail], &entries[i], sizeof(struct nv_sqe));
        advance_tail(qp);
        record(qp, &entries[i], now, buf_slot, buf_gen, 0);
    }
    qp->in_flight += n;
    qp->posted += n;
    return first;
}

int64_t nv_qp_push(struct nv_qp *qp, const struct nv_sqe *e, int64_t buf_slot, int64_t buf_gen, uint32_t cookie,
                   int64_t now)
{
    if (sq_free(qp) == 0)
        return -EBUSY;
    if (e->cid >= qp->ncids || qp->busy[e->cid] != CID_TAKEN)
        return -EINVAL;
    int64_t tag = qp->next_tag;
    memcpy(&qp->sq[qp->sq_tail], e, sizeof(struct nv_sqe));
    advance_tail(qp);
    record(qp, e, now, buf_slot, buf_gen, cookie);
    qp->in_flight++;
    qp->posted++;
    return tag;
}

static inline void post_slot(struct nv_qp *qp, uint8_t opc, uint32_t nsid, uint64_t slba, uint32_t nlb,
                             uint32_t slot, const struct nv_prp_slot *prps, uint32_t block_size,
                             uint32_t page_size, int64_t now, int64_t buf_slot, int64_t buf_gen)
{
    uint16_t cid = qp->free_stack[--qp->free_top];
    const struct nv_prp_slot *p = &prps[slot];
    uint64_t len = (uint64_t)nlb * block_size;
    /* Memory pages the transfer touches, from PRP1's page (4.1.1): it picks which of the
     * broker's PRP2 values applies. No address is computed here. */
    uint64_t pages = (p->prp1 % page_size + len + page_size - 1) / page_size;
    struct nv_sqe *e = &qp->sq[qp->sq_tail];
    memset(e, 0, sizeof(*e));
    e->opc = opc;
    e->cid = cid;
    e->nsid = nsid;
    e->prp1 = p->prp1;
    e->prp2 = pages <= 1 ? 0 : pages == 2 ? p->prp2_page : p->prp2_list;
    e->cdw10 = (uint32_t)slba;
    e->cdw11 = (uint32_t)(slba >> 32);
    e->cdw12 = nlb - 1;  /* NLB is 0's based */
    advance_tail(qp);
    record(qp, e, now, buf_slot, buf_gen, slot);
}

int64_t nv_qp_post_slots(struct nv_qp *qp, uint8_t opc, uint32_t nsid, uint32_t n, const uint64_t *slba,
                         const uint32_t *nlb, const uint32_t *slot, const struct nv_prp_slot *prps,
                         uint32_t block_size, uint32_t page_size, int64_t buf_slot, int64_t buf_gen)
{
    if (n > nv_qp_capacity(qp))
        return -EBUSY;
    int64_t first = qp->next_tag;
    int64_t now = nv_now_ns();
    for (uint32_t i = 0; i < n; i++)
        post_slot(qp, opc, nsid, slba[i], nlb[i], slot[i], prps, block_size, page_size, now, buf_slot, buf_gen);
    qp->in_flight += n;
    qp->posted += n;
    return first;
}

/* ---- doorbells ---- */

static inline void mmio_doorbell(struct nv_qp *qp, uint64_t offset, uint32_t value)
{
    if (qp->hook) {
        qp->hook(qp->hook_ctx, offset, value);
        return;
    }
    /* The SQ entries (or the consumed CQ entries) were written with ordinary stores to
     * host memory; the device must observe them before the doorbell: store barrier. */
    nv_wmb();
    *(volatile uint32_t *)(qp->bar + offset) = value;
}

/* 5.8 / Linux nvme_dbbuf_need_event: does moving the doorbell from old to new pass the
 * controller's EventIdx? (16-bit wrapping arithmetic, as in virtio's vring_need_event.) */
static inline int need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

/* Write the shadow doorbell; 1 when the MMIO doorbell must be written too. */
static inline int shadow_update(volatile uint32_t *shadow, volatile uint32_t *eventidx, uint32_t value)
{
    /* The queue entries must be visible in memory before the shadow doorbell that
     * publishes them (the controller may read the shadow at any time). */
    nv_wmb();
    uint32_t old = *shadow;
    *shadow = value;
    /* The shadow doorbell store must be visible before the EventIdx load: the controller
     * updates EventIdx and then reads the shadow, so with both fences one side always sees
     * the other's write. A store-load order needs the full fence. */
    nv_mb();
    uint32_t ev = *eventidx;
    return need_event((uint16_t)ev, (uint16_t)value, (uint16_t)old);
}

/* Publish a new doorbell value (SQ tail or CQ head) once: through the shadow doorbell when
 * configured, and by MMIO only when the EventIdx rule asks for it. 1: MMIO written. */
static inline int publish(struct nv_qp *qp, uint32_t value, uint32_t *rung, uint32_t *shadow,
                          uint32_t *eventidx, uint64_t db, uint64_t *mmio_count, uint64_t *shadow_count)
{
    if (value == *rung)
        return 0;
    *rung = value;
    if (shadow && !shadow_update(shadow, eventidx, value)) {
        (*shadow_count)++;
        return 0;
    }
    mmio_doorbell(qp, db, value);
    (*mmio_count)++;
    return 1;
}

int nv_qp_ring_sq(struct nv_qp *qp)
{
    return publish(qp, qp->sq_tail, &qp->sq_rung, qp->shadow_sq, qp->eventidx_sq, qp->sq_db, &qp->sq_mmio,
                   &qp->sq_shadow_only);
}

int nv_qp_ring_cq(struct nv_qp *qp)
{
    return publish(qp, qp->cq_head, &qp->cq_rung, qp->shadow_cq, qp->eventidx_cq, qp->cq_db, &qp->cq_mmio,
                   &qp->cq_shadow_only);
}

/* ---- completions ---- */

static inline uint16_t cqe_status(const struct nv_qp *qp, uint32_t slot)
{
    return *(const volatile uint16_t *)&qp->cq[slot].status;
}

int nv_qp_pending(const struct nv_qp *qp)
{
    return (cqe_status(qp, qp->cq_head) & 1) == qp->cq_phase;
}

static void keep_event(struct nv_qp *qp, uint16_t cid, const struct nv_cqe *cqe);

/* Consume the entry at the head (the caller saw its phase tag). Returns its cid, -1 when the
 * id is not in flight, or CID_DIVERTED for a standing command's (kept in events). */
static inline int consume(struct nv_qp *qp, struct nv_cqe *cqe)
{
    /* The phase tag was read first; the rest of the entry must not be read from before
     * it (the device writes the whole entry, the tag last in effect): read barrier. */
    nv_rmb();
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
        keep_event(qp, cqe->cid, cqe);
        return CID_DIVERTED;
    }
    return cqe->cid;
}

static inline void retire(struct nv_qp *qp, uint16_t cid)
{
    qp->busy[cid] = CID_FREE;
    qp->free_stack[qp->free_top++] = cid;
    qp->in_flight--;
    qp->completed++;
}

static inline void count_unpin(struct nv_qp *qp, uint16_t cid, struct nv_unpin *unpin, uint32_t max_unpin,
                               uint32_t *nunpin)
{
    int64_t s = qp->buf_slot[cid], g = qp->buf_gen[cid];
    if (s < 0 || !unpin)
        return;
    for (uint32_t i = *nunpin; i-- > 0;) {
        if (unpin[i].slot == s && unpin[i].generation == g) {
            unpin[i].commands++;
            return;
        }
    }
    if (*nunpin < max_unpin) {
        unpin[*nunpin].slot = s;
        unpin[*nunpin].generation = g;
        unpin[*nunpin].commands = 1;
        (*nunpin)++;
    }
}

int nv_qp_reap(struct nv_qp *qp, struct nv_completion *out, uint32_t max, struct nv_unpin *unpin,
               uint32_t max_unpin, uint32_t *nunpin)
{
    uint32_t n = 0;
    int64_t now = 0;
    while (n < max && nv_qp_pending(qp)) {
        struct nv_cqe cqe;
        int cid = consume(qp, &cqe);
        if (cid == CID_DIVERTED)
            continue;
        if (cid < 0)
            return -EPROTO;
        if (n == 0)
            now = nv_now_ns();
        struct nv_completion *c = &out[n++];
        c->tag = qp->tag[cid];
        c->latency_s = (double)(now - qp->submit_ns[cid]) * 1e-9;
        c->result = cqe.dw0;
        c->cookie = qp->cookie[cid];
        c->cid = (uint16_t)cid;
        c->status = cqe.status >> 1;
        c->opcode = qp->opcode[cid];
        memset(c->pad, 0, sizeof(c->pad));
        count_unpin(qp, (uint16_t)cid, unpin, max_unpin, nunpin);
        retire(qp, (uint16_t)cid);
    }
    return (int)n;
}

/* CSTS while waiting: all ones means the device is gone (surprise removal), CFS that the
 * controller hit a fatal error; either way no completion will come. The broker's stop flag:
 * 1, the kernel asked for the device back; 2, another thread is resetting the controller. */
static inline int csts_bad(const struct nv_qp *qp)
{
    /* The broker's stop flag, written by the thread that answers VFIO's device request: the
     * device is about to be released, so no completion will be waited for. volatile: another
     * thread writes it while this loop runs. */
    if (qp->stop) {
        int32_t stop = *(const volatile int32_t *)qp->stop;
        if (stop == 1)
            return -ENODEV;
        if (stop == 2)
            return -EAGAIN;  /* another thread is resetting the controller: let go of the queue */
    }
    if (!qp->csts)
        return 0;
    uint32_t v = *(const volatile uint32_t *)qp->csts;
    if (v == 0xFFFFFFFFu)
        return -ENODEV;
    return (v & 2u) ? -EIO : 0;  /* CSTS.CFS is bit 1 */
}

#define CSTS_EVERY_NS 1000000LL

int nv_qp_wait(struct nv_qp *qp, int64_t timeout_ns)
{
    if (nv_qp_pending(qp))
        return 1;
    int64_t now = nv_now_ns();
    int64_t deadline = now + timeout_ns;
    int64_t next_csts = now + CSTS_EVERY_NS;
    if (qp->irq_fd >= 0) {
        for (;;) {
            now = nv_now_ns();
            int64_t left = deadline - now;
            if (left <= 0)
                return nv_qp_pending(qp);
            int bad = csts_bad(qp);
            if (bad)
                return nv_qp_pending(qp) ? 1 : bad;
            if ((qp->csts || qp->stop) && left > 100 * CSTS_EVERY_NS)
                left = 100 * CSTS_EVERY_NS;  /* look at CSTS and the stop flag every 100 ms asleep */
            struct pollfd p = {.fd = qp->irq_fd, .events = POLLIN};
            int r = poll(&p, 1, (int)((left + 999999) / 1000000));
            if (r < 0 && errno != EINTR)
                return -errno;
            if (r > 0) {
                uint64_t count;
                /* The eventfd counts interrupts since the last read; clearing it here
                 * loses nothing, since the CQ is checked right after. */
                if (read(qp->irq_fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
                    return -errno;
            }
            if (nv_qp_pending(qp))
                return 1;
        }
    }
    for (uint32_t spins = 0;; spins++) {
        if (nv_qp_pending(qp))
            return 1;
        if ((spins & 0x3F) == 0x3F) {
            now = nv_now_ns();
            if (now >= deadline)
                return nv_qp_pending(qp);
            if (now >= next_csts) {
                next_csts = now + CSTS_EVERY_NS;
                int bad = csts_bad(qp);
                if (bad)
                    return nv_qp_pending(qp) ? 1 : bad;
            }
        }
    }
}

int nv_qp_reap_wait(struct nv_qp *qp, struct nv_completion *out, uint32_t max, uint32_t min, int64_t timeout_ns,
                    struct nv_unpin *unpin, uint32_t max_unpin, uint32_t *nunpin)
{
    uint32_t got = 0;
    int64_t deadline = nv_now_ns() + timeout_ns;
    *nunpin = 0;
    for (;;) {
        int r = nv_qp_reap(qp, out + got, max - got, unpin, max_unpin, nunpin);
        if (r < 0) {
            nv_qp_ring_cq(qp);
            return r;
        }
        got += (uint32_t)r;
        nv_qp_ring_cq(qp);  /* one CQ head doorbell per batch (none when the head did not move) */
        if (got >= min || got >= max || qp->in_flight == 0)
            return (int)got;
        int64_t left = deadline - nv_now_ns();
        if (left <= 0)
            return (int)got;
        int w = nv_qp_wait(qp, left);
        if (w < 0)
            return got ? (int)got : w;  /* what was reaped is reported; the error comes next call */
        if (w == 0)
            return (int)got;
    }
}

int nv_qp_exec(struct nv_qp *qp, struct nv_sqe *entry, int64_t buf_slot, int64_t buf_gen, int64_t timeout_ns,
               struct nv_completion *out)
{
    uint16_t cid = entry->cid;
    if (qp->in_flight) {
        if (cid != NV_CID_TAKE)
            nv_qp_untake(qp, 1, &cid);
        return -EBUSY;
    }
    if (cid == NV_CID_TAKE) {
        if (nv_qp_take(qp, 1, &cid) < 0)
            return -EBUSY;
        entry->cid = cid;
    }
    int64_t r = nv_qp_post(qp, entry, 1, buf_slot, buf_gen);
    if (r < 0) {
        nv_qp_untake(qp, 1, &cid);
        return (int)r;
    }
    nv_qp_ring_sq(qp);
    uint32_t nunpin = 0;
    int got = nv_qp_reap_wait(qp, out, 1, 1, timeout_ns, NULL, 0, &nunpin);
    if (got < 0)
        return got;
    return got == 1 ? 0 : -ETIMEDOUT;
}

int nv_qp_exec_rw(struct nv_qp *qp, uint8_t opc, uint32_t nsid, uint64_t slba, uint32_t nlb, uint64_t prp1,
                  uint64_t prp2, int64_t buf_slot, int64_t buf_gen, int64_t timeout_ns, struct nv_completion *out)
{
    struct nv_sqe e;
    memset(&e, 0, sizeof(e));
    e.opc = opc;
    e.cid = NV_CID_TAKE;
    e.nsid = nsid;
    e.prp1 = prp1;
    e.prp2 = prp2;
    e.cdw10 = (uint32_t)slba;
    e.cdw11 = (uint32_t)(slba >> 32);
    e.cdw12 = nlb - 1;  /* NLB is 0's based */
    return nv_qp_exec(qp, &e, buf_slot, buf_gen, timeout_ns, out);
}

/* ==== standing commands: Asynchronous Event Requests (5.2) ==== */

static void keep_event(struct nv_qp *qp, uint16_t cid, const struct nv_cqe *cqe)
{
    struct nv_completion *c = &qp->events[qp->nevents < NV_EVENTS_MAX ? qp->nevents++ : NV_EVENTS_MAX - 1];
    memset(c, 0, sizeof(*c));
    c->tag = qp->tag[cid];
    c->latency_s = (double)(nv_now_ns() - qp->submit_ns[cid]) * 1e-9;
    c->result = cqe->dw0;
    c->cookie = qp->cookie[cid];
    c->cid = cid;
    c->status = cqe->status >> 1;
    c->opcode = qp->opcode[cid];
    qp->busy[cid] = CID_FREE;
    qp->free_stack[qp->free_top++] = cid;
    qp->standing--;
    qp->completed++;
}

int nv_qp_make_standing(struct nv_qp *qp, uint16_t cid)
{
    if (cid >= qp->ncids || qp->busy[cid] != CID_IN_FLIGHT)
        return -EINVAL;
    /* every standing command's completion must fit in events until taken */
    if (qp->standing + qp->nevents >= NV_EVENTS_MAX)
        return -ENOSPC;
    qp->busy[cid] = CID_STANDING;
    qp->in_flight--;
    qp->standing++;
    return 0;
}

int nv_qp_take_events(struct nv_qp *qp, struct nv_completion *out, uint32_t max)
{
    uint32_t n = qp->nevents < max ? qp->nevents : max;
    memcpy(out, qp->events, n * sizeof(*out));
    memmove(qp->events, qp->events + n, (qp->nevents - n) * sizeof(*out));
    qp->nevents -= n;
    return (int)n;
}

int nv_qp_drop_standing(struct nv_qp *qp)
{
    int n = 0;
    for (uint32_t cid = 0; cid < qp->ncids; cid++) {
        if (qp->busy[cid] != CID_STANDING)
            continue;
        qp->busy[cid] = CID_FREE;
        qp->free_stack[qp->free_top++] = (uint16_t)cid;
        n++;
    }
    qp->standing = 0;
    return n;
}

/* ==== recovery: after a controller reset ==== */

void nv_qp_reset_rings(struct nv_qp *qp)
{
    qp->sq_tail = qp->sq_head = qp->sq_rung = 0;
    qp->cq_head = qp->cq_rung = 0;
    qp->cq_phase = 1;
}

int nv_qp_repost(struct nv_qp *qp, uint32_t max_retries, uint16_t *over, uint32_t *nover)
{
    int64_t now = nv_now_ns();
    uint32_t n = 0;
    *nover = 0;
    for (uint32_t cid = 0; cid < qp->ncids; cid++) {
        if (qp->busy[cid] != CID_IN_FLIGHT)
            continue;
        if (qp->retries[cid] >= max_retries) {
            over[(*nover)++] = (uint16_t)cid;
            continue;
        }
        qp->retries[cid]++;
        qp->sq[qp->sq_tail] = qp->saved[cid];  /* the broker's entry, exactly as first posted */
        advance_tail(qp);
        qp->submit_ns[cid] = now;
        n++;
    }
    qp->posted += n;
    return (int)n;
}

int nv_qp_cancel(struct nv_qp *qp, uint16_t cid, uint16_t status, struct nv_completion *out)
{
    if (cid >= qp->ncids || qp->busy[cid] != CID_IN_FLIGHT)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    out->tag = qp->tag[cid];
    out->latency_s = (double)(nv_now_ns() - qp->submit_ns[cid]) * 1e-9;
    out->cookie = qp->cookie[cid];
    out->cid = cid;
    out->status = status;
    out->opcode = qp->opcode[cid];
    retire(qp, cid);
    return 0;
}

/* ==== latency histogram: fio's log-linear layout (stat.h, FIO_IO_U_PLAT_*) ==== */

#define HIST_BITS 6
#define HIST_VAL (1u << HIST_BITS)
#define HIST_GROUPS 29
#define HIST_NR (HIST_GROUPS * HIST_VAL)

uint32_t nv_hist_buckets(void) { return HIST_NR; }

uint32_t nv_hist_bucket(uint64_t ns)
{
    if (ns < 2 * HIST_VAL)  /* the first two groups are exact */
        return (uint32_t)ns;
    uint32_t msb = 63 - (uint32_t)__builtin_clzll(ns);
    uint32_t error_bits = msb - HIST_BITS;
    uint32_t base = (error_bits + 1) << HIST_BITS;
    uint32_t idx = base + (uint32_t)((ns >> error_bits) & (HIST_VAL - 1));
    return idx < HIST_NR ? idx : HIST_NR - 1;
}

/* ==== perf ==== */

static inline uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void nv_perf_done(struct nv_perf *p, uint64_t latency_ns, uint8_t opcode, uint16_t status, uint32_t slot)
{
    p->hist[nv_hist_bucket(latency_ns)]++;
    p->lat_sum_ns += latency_ns;
    if (latency_ns < p->lat_min_ns)
        p->lat_min_ns = latency_ns;
    if (latency_ns > p->lat_max_ns)
        p->lat_max_ns = latency_ns;
    if (opcode == 0x02)
        p->reads++;
    else
        p->writes++;
    if (status) {
        if (!p->errors) {
            p->first_error_status = status;
            p->first_error_opcode = opcode;
        }
        p->errors++;
    }
    p->ios++;
    p->free_slots[p->nfree++] = slot;
}

static void perf_fill(struct nv_qp *qp, struct nv_perf *p)
{
    uint32_t room = nv_qp_capacity(qp);
    uint32_t k = p->nfree < room ? p->nfree : room;
    uint32_t inflight_cap = p->depth > qp->in_flight ? p->depth - qp->in_flight : 0;
    if (k > inflight_cap)
        k = inflight_cap;
    if (p->max_ios && p->max_ios - p->issued < k)
        k = (uint32_t)(p->max_ios - p->issued);
    if (k == 0)
        return;
    int64_t now = nv_now_ns();
    for (uint32_t i = 0; i < k; i++) {
        uint64_t lba;
        /* positions are I/O-sized and aligned, for random and sequential alike */
        uint64_t pos = p->random ? splitmix64(&p->rng) % p->positions : p->seq++ % p->positions;
        lba = p->lba_lo + pos * p->nlb;
        int is_read = p->read_pct >= 100 ? 1 : p->read_pct == 0 ? 0 : (splitmix64(&p->rng) % 100) < p->read_pct;
        uint32_t slot = p->free_slots[--p->nfree];
        post_slot(qp, is_read ? 0x02 : 0x01, p->nsid, lba, p->nlb, slot, p->prps, p->block_size, p->page_size,
                  now, p->buf_slot, p->buf_gen);
    }
    qp->in_flight += k;
    qp->posted += k;
    p->issued += k;
    p->fills++;
    nv_qp_ring_sq(qp);  /* one SQ tail doorbell per batch */
}

static int perf_reap(struct nv_qp *qp, struct nv_perf *p)
{
    uint32_t n = 0;
    int64_t now = 0;
    while (nv_qp_pending(qp)) {
        struct nv_cqe cqe;
        int cid = consume(qp, &cqe);
        if (cid == CID_DIVERTED)
            continue;
        if (cid < 0) {
            nv_qp_ring_cq(qp);
            return -EPROTO;
        }
        if (n++ == 0)
            now = nv_now_ns();
        nv_perf_done(p, (uint64_t)(now - qp->submit_ns[cid]), qp->opcode[cid], cqe.status >> 1, qp->cookie[cid]);
        retire(qp, (uint16_t)cid);
    }
    if (n) {
        p->reaps++;
        nv_qp_ring_cq(qp);  /* one CQ head doorbell per batch */
    }
    return (int)n;
}

int64_t nv_qp_oldest_submit(const struct nv_qp *qp)
{
    int64_t oldest = INT64_MAX;
    for (uint32_t cid = 0; cid < qp->ncids; cid++)
        if (qp->busy[cid] == CID_IN_FLIGHT && qp->submit_ns[cid] < oldest)
            oldest = qp->submit_ns[cid];
    return oldest;
}

#define AGE_CHECK_NS 1000000LL  /* how often a waiting loop looks for a late command */
#define HYBRID_MIN_NS 2000LL    /* hybrid polling: shorter naps than this spin instead */

int nv_perf_run(struct nv_qp *qp, struct nv_perf *p, int64_t slice_ns, int drain)
{
    int64_t start = nv_now_ns();
    int64_t end = start + slice_ns;
    for (;;) {
        int finished = drain || (p->max_ios && p->issued >= p->max_ios);
        if (!finished)
            perf_fill(qp, p);
        int r = perf_reap(qp, p);
        if (r < 0)
            return r;
        if (qp->in_flight == 0 && finished)
            return 1;
        int64_t now = nv_now_ns();
        if (!drain && now >= end)
            return 0;
        if (r == 0) {
            /* A command older than the timeout is late, however busy the queue is otherwise:
             * it stays in flight and the broker recovers it (abort, reset, requeue). */
            if (now - nv_qp_oldest_submit(qp) >= p->timeout_ns)
                return -ETIMEDOUT;
            int64_t left = AGE_CHECK_NS;
            if (!drain && end - now < left)
                left = end - now;
            if (p->hybrid && qp->irq_fd < 0 && p->ios) {
                /* Hybrid polling: completions come about every mean latency / depth (Little's
                 * law); sleep half of that, then spin. An idle vCPU gives its host core back to
                 * the device model, which a spinning one competes with. */
                int64_t nap = (int64_t)(p->lat_sum_ns / p->ios / (p->depth ? p->depth : 1)) / 2;
                if (nap > left)
                    nap = left;
                if (nap >= HYBRID_MIN_NS && !nv_qp_pending(qp)) {
                    if (!p->sleeps)
                        prctl(PR_SET_TIMERSLACK, 1000UL);  /* naps of tens of us: 1 us slack, not 50 */
                    struct timespec ts = {.tv_sec = 0, .tv_nsec = nap};
                    nanosleep(&ts, NULL);
                    p->sleeps++;
                    p->wait_ns += (uint64_t)(nv_now_ns() - now);
                    continue;
                }
            }
            int w = nv_qp_wait(qp, left);
            p->wait_ns += (uint64_t)(nv_now_ns() - now);
            if (w < 0)
                return w;
        }
    }
}
