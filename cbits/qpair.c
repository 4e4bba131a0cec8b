/* nvmevfio queue pairs: the per-command hot path (the perf closed loop over them: cbits/perf.c).
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
#include <time.h>
#include <unistd.h>

#include "shim.h"
#include "barrier.h"
#include "nvme.h"
#include "qpair.h"

#define NV_CID_TAKE 0xFFFF
#define NV_EVENTS_MAX 16

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

uint32_t nv_qp_capacity(const struct nv_qp *qp)
{
    return qp_capacity(qp);
}

int nv_qp_take(struct nv_qp *qp, uint32_t n, uint16_t *cids)
{
    if (n > qp_capacity(qp))
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

int64_t nv_qp_post(struct nv_qp *qp, const struct nv_sqe *entries, uint32_t n, int64_t buf_slot, int64_t buf_gen)
{
    if (n > qp_sq_free(qp))
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
        qp_advance_tail(qp);
        qp_record(qp, &entries[i], now, buf_slot, buf_gen, 0);
    }
    qp->in_flight += n;
    qp->posted += n;
    return first;
}

int64_t nv_qp_push(struct nv_qp *qp, const struct nv_sqe *e, int64_t buf_slot, int64_t buf_gen, uint32_t cookie,
                   int64_t now)
{
    if (qp_sq_free(qp) == 0)
        return -EBUSY;
    if (e->cid >= qp->ncids || qp->busy[e->cid] != CID_TAKEN)
        return -EINVAL;
    int64_t tag = qp->next_tag;
    memcpy(&qp->sq[qp->sq_tail], e, sizeof(struct nv_sqe));
    qp_advance_tail(qp);
    qp_record(qp, e, now, buf_slot, buf_gen, cookie);
    qp->in_flight++;
    qp->posted++;
    return tag;
}

int64_t nv_qp_post_slots(struct nv_qp *qp, uint8_t opc, uint32_t nsid, uint32_t n, const uint64_t *slba,
                         const uint32_t *nlb, const uint32_t *slot, const struct nv_prp_slot *prps,
                         uint32_t block_size, uint32_t page_size, int64_t buf_slot, int64_t buf_gen)
{
    if (n > qp_capacity(qp))
        return -EBUSY;
    int64_t first = qp->next_tag;
    int64_t now = nv_now_ns();
    for (uint32_t i = 0; i < n; i++)
        qp_post_slot(qp, opc, nsid, slba[i], nlb[i], slot[i], prps, block_size, page_size, now, buf_slot, buf_gen);
    qp->in_flight += n;
    qp->posted += n;
    return first;
}

/* ---- doorbells ---- */

/* The doorbell write: the one MMIO store that tells the controller of new SQ entries or of
 * consumed CQ entries. */
static inline void qp_mmio_doorbell(void *bar, uint64_t offset, uint32_t value)
{
    /* The SQ entries (or the consumed CQ entries) were written with ordinary stores to
     * host memory; the device must observe them before the doorbell: store barrier. */
    barrier_wmb();
    *(volatile uint32_t *)((uint8_t *)bar + offset) = value;
}

/* For Python (mmio.py's BarMmio.doorbell): the same write. */
void nv_doorbell(void *base, uint64_t offset, uint32_t value)
{
    qp_mmio_doorbell(base, offset, value);
}

static inline void qp_doorbell(struct nv_qp *qp, uint64_t offset, uint32_t value)
{
    if (qp->hook) {  /* the simulator's controller, in Python */
        qp->hook(qp->hook_ctx, offset, value);
        return;
    }
    qp_mmio_doorbell(qp->bar, offset, value);
}

/* 5.8 / Linux nvme_dbbuf_need_event: does moving the doorbell from old to new pass the
 * controller's EventIdx? (16-bit wrapping arithmetic, as in virtio's vring_need_event.) */
static inline int qp_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

/* Write the shadow doorbell; 1 when the MMIO doorbell must be written too. */
static inline int qp_shadow_update(volatile uint32_t *shadow, volatile uint32_t *eventidx, uint32_t value)
{
    /* The queue entries must be visible in memory before the shadow doorbell that
     * publishes them (the controller may read the shadow at any time). */
    barrier_wmb();
    uint32_t old = *shadow;
    *shadow = value;
    /* The shadow doorbell store must be visible before the EventIdx load: the controller
     * updates EventIdx and then reads the shadow, so with both fences one side always sees
     * the other's write. A store-load order needs the full fence. */
    barrier_mb();
    uint32_t ev = *eventidx;
    return qp_need_event((uint16_t)ev, (uint16_t)value, (uint16_t)old);
}

/* Publish a new doorbell value (SQ tail or CQ head) once: through the shadow doorbell when
 * configured, and by MMIO only when the EventIdx rule asks for it. 1: MMIO written. */
static inline int qp_publish(struct nv_qp *qp, uint32_t value, uint32_t *rung, uint32_t *shadow,
                             uint32_t *eventidx, uint64_t db, uint64_t *mmio_count, uint64_t *shadow_count,
                             uint64_t *mmio_ns)
{
    if (value == *rung)
        return 0;
    *rung = value;
    if (shadow && !qp_shadow_update(shadow, eventidx, value)) {
        (*shadow_count)++;
        return 0;
    }
    /* The write's own time: on real hardware a posted write of a few ns; under emulation the
     * vCPU's exit into the device model, which waits for the emulator's lock. */
    int64_t t0 = nv_now_ns();
    qp_doorbell(qp, db, value);
    *mmio_ns += (uint64_t)(nv_now_ns() - t0);
    (*mmio_count)++;
    return 1;
}

int nv_qp_ring_sq(struct nv_qp *qp)
{
    return qp_publish(qp, qp->sq_tail, &qp->sq_rung, qp->shadow_sq, qp->eventidx_sq, qp->sq_db, &qp->sq_mmio,
                      &qp->sq_shadow_only, &qp->sq_mmio_ns);
}

int nv_qp_ring_cq(struct nv_qp *qp)
{
    return qp_publish(qp, qp->cq_head, &qp->cq_rung, qp->shadow_cq, qp->eventidx_cq, qp->cq_db, &qp->cq_mmio,
                      &qp->cq_shadow_only, &qp->cq_mmio_ns);
}

/* ---- completions ---- */

int nv_qp_pending(const struct nv_qp *qp)
{
    return qp_pending(qp);
}

static inline void qp_count_unpin(struct nv_qp *qp, uint16_t cid, struct nv_unpin *unpin, uint32_t max_unpin,
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
    while (n < max && qp_pending(qp)) {
        struct nv_cqe cqe;
        int cid = qp_consume(qp, &cqe);
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
        c->result_hi = cqe.dw1;
        c->pad2 = 0;
        c->cookie = qp->cookie[cid];
        c->cid = (uint16_t)cid;
        c->status = cqe.status >> 1;
        c->opcode = qp->opcode[cid];
        memset(c->pad, 0, sizeof(c->pad));
        qp_count_unpin(qp, (uint16_t)cid, unpin, max_unpin, nunpin);
        qp_retire(qp, (uint16_t)cid);
    }
    return (int)n;
}

#define CSTS_EVERY_NS 1000000LL

int nv_qp_wait(struct nv_qp *qp, int64_t timeout_ns)
{
    if (qp_pending(qp))
        return 1;
    int64_t now = nv_now_ns();
    int64_t deadline = now + timeout_ns;
    int64_t next_csts = now + CSTS_EVERY_NS;
    if (qp->irq_fd >= 0) {
        for (;;) {
            now = nv_now_ns();
            int64_t left = deadline - now;
            if (left <= 0)
                return qp_pending(qp);
            /* The stop flag (host memory) every time; CSTS, an MMIO read (on an emulated controller
             * an exit into its model, as dear as a doorbell), once a millisecond across waits: at
             * QD1 a wait per command read it per command. A device gone is seen within the 100 ms
             * a sleep lasts at most. */
            int bad = qp_stop_flag(qp);
            if (!bad && now >= qp->csts_next_ns) {
                qp->csts_next_ns = now + CSTS_EVERY_NS;
                bad = qp_health(qp);
            }
            if (bad)
                return qp_pending(qp) ? 1 : bad;
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
            if (qp_pending(qp))
                return 1;
        }
    }
    for (uint32_t spins = 0;; spins++) {
        if (qp_pending(qp))
            return 1;
        if ((spins & 0x3F) == 0x3F) {
            now = nv_now_ns();
            /* CSTS and the stop flag before the deadline: a caller's waits are often exactly
             * CSTS_EVERY_NS long (perf's, the workload's), and one that gave up first would
             * never look, leaving a device taken away to be found only when a command is late. */
            if (now >= next_csts || now >= deadline) {
                next_csts = now + CSTS_EVERY_NS;
                int bad = qp_health(qp);
                if (bad)
                    return qp_pending(qp) ? 1 : bad;
                if (now >= deadline)
                    return qp_pending(qp);
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

int nv_qp_exec_rw(struct nv_qp *qp, uint8_t opc, uint8_t flags, uint32_t nsid, uint64_t slba, uint32_t nlb,
                  uint64_t prp1, uint64_t prp2, int64_t buf_slot, int64_t buf_gen, int64_t timeout_ns,
                  struct nv_completion *out)
{
    struct nv_sqe e;
    memset(&e, 0, sizeof(e));
    e.opc = opc;
    e.flags = flags;
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

void qp_keep_event(struct nv_qp *qp, uint16_t cid, const struct nv_cqe *cqe)
{
    struct nv_completion *c = &qp->events[qp->nevents < NV_EVENTS_MAX ? qp->nevents++ : NV_EVENTS_MAX - 1];
    memset(c, 0, sizeof(*c));
    c->tag = qp->tag[cid];
    c->latency_s = (double)(nv_now_ns() - qp->submit_ns[cid]) * 1e-9;
    c->result = cqe->dw0;
    c->result_hi = cqe->dw1;
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
        qp_advance_tail(qp);
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
    qp_retire(qp, cid);
    return 0;
}

int64_t nv_qp_oldest_submit(const struct nv_qp *qp)
{
    int64_t oldest = INT64_MAX;
    for (uint32_t cid = 0; cid < qp->ncids; cid++)
        if (qp->busy[cid] == CID_IN_FLIGHT && qp->submit_ns[cid] < oldest)
            oldest = qp->submit_ns[cid];
    return oldest;
}

