/* nvmevfio perf: a closed loop in C over one queue pair (in the manner of spdk_nvme_perf), and
 * the latency histogram both closed loops fill (this one and the service client's,
 * cbits/svc_client.c). The workload's PRNG and fill policy are perf.h's, shared by the two;
 * the per-command steps (post into a slot, consume, retire) are qpair.h's, inline. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <time.h>

#include "shim.h"
#include "nvme.h"
#include "qpair.h"
#include "perf.h"  /* after qpair.h: perf_reap_each */

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

/* ==== the closed loop ==== */

void nv_perf_done(struct nv_perf *p, uint64_t latency_ns, uint8_t opcode, uint16_t status, uint32_t slot)
{
    p->hist[nv_hist_bucket(latency_ns)]++;
    p->lat_sum_ns += latency_ns;
    if (latency_ns < p->lat_min_ns)
        p->lat_min_ns = latency_ns;
    if (latency_ns > p->lat_max_ns)
        p->lat_max_ns = latency_ns;
    if (opcode == NVME_CMD_READ)
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

/* Post k I/Os of the workload into the SQ (no doorbell). */
static inline void perf_post(struct nv_qp *qp, struct nv_perf *p, uint32_t k, int64_t now)
{
    for (uint32_t i = 0; i < k; i++) {
        struct perf_io io = perf_next(p);
        qp_post_slot(qp, io.opcode, p->nsid, io.lba, p->nlb, io.slot, p->prps, p->block_size, p->page_size, now,
                     p->buf_slot, p->buf_gen);
    }
    qp->in_flight += k;
    qp->posted += k;
    p->issued += k;
}

/* Post every I/O the fill policy allows (perf.h), then one SQ tail doorbell for the batch. */
static void perf_fill(struct nv_qp *qp, struct nv_perf *p)
{
    uint32_t k = perf_batch(p, qp_capacity(qp), qp->in_flight);
    if (k == 0)
        return;
    perf_post(qp, p, k, nv_now_ns());
    p->fills++;
    nv_qp_ring_sq(qp);  /* one SQ tail doorbell per batch */
}

/* The deep loop's reap (p->refill, past QD64, every ready one): each completion's command is
 * re-posted as it is reaped, then the CQ head doorbell and the SQ tail doorbell back to back, as
 * libvfn's and SPDK's perf loops do. On QEMU's model the first write waits for the emulator's
 * lock while the model finishes its round and the second finds it free (1-14 us against 60-230
 * us for the SQ tail doorbell written after a separate refill); the loop that refilled after its
 * reap ran 0.64-0.91 of the C driver at QD128 over three sweep boots, this order 1.01-1.36 in
 * sixteen same-boot rounds (docs/benchmarks.md, "Session 25"). */
struct refill {
    struct nv_qp *qp;
    struct nv_perf *p;
    int finished;
    uint32_t posted;
    int64_t now;  /* the reap's time, read at its first completion: the re-posted commands' submission */
};

/* One completion into p, then its replacement posted (no doorbell) unless the workload is done. */
static inline void perf_refill_done(void *ctx, uint32_t slot, uint8_t opcode, uint16_t status, uint64_t latency_ns)
{
    struct refill *r = ctx;
    nv_perf_done(r->p, latency_ns, opcode, status, slot);
    if (!r->finished && perf_batch(r->p, qp_capacity(r->qp), r->qp->in_flight)) {
        if (!r->now)
            r->now = nv_now_ns();
        perf_post(r->qp, r->p, 1, r->now);
        r->posted++;
    }
}

static int perf_reap_refill(struct nv_qp *qp, struct nv_perf *p, int finished)
{
    struct refill r = {qp, p, finished, 0, 0};
    int n = perf_reap_each(qp, p, perf_refill_done, &r);
    if (n <= 0)
        return n;
    nv_qp_ring_cq(qp);  /* the CQ head doorbell first (perf_reap_each may have written it already), */
    if (r.posted) {
        p->fills++;
        nv_qp_ring_sq(qp);  /* then the SQ tail doorbell for every command re-posted */
    }
    return n;
}

/* Take every ready completion into p (nv_perf_done), then one CQ head doorbell for the batch. */
static inline void perf_one_done(void *ctx, uint32_t slot, uint8_t opcode, uint16_t status, uint64_t latency_ns)
{
    nv_perf_done(ctx, latency_ns, opcode, status, slot);
}

static int perf_reap(struct nv_qp *qp, struct nv_perf *p)
{
    return perf_reap_each(qp, p, perf_one_done, p);
}

/* A turn's reap: re-posting as it reaps (p->refill) while no completion cap is in force. */
static inline int perf_turn_reap(struct nv_qp *qp, struct nv_perf *p, int finished)
{
    return p->refill && !p->reap_max ? perf_reap_refill(qp, p, finished) : perf_reap(qp, p);
}

#define AGE_CHECK_NS 1000000LL  /* how often a waiting loop looks for a late command */
#define HYBRID_MIN_NS 2000LL    /* hybrid polling: shorter naps than this spin instead */

static int perf_run(struct nv_qp *qp, struct nv_perf *p, int64_t slice_ns, int drain)
{
    int64_t start = nv_now_ns();
    int64_t end = start + slice_ns;
    int64_t next_look = start;  /* when a hybrid nap next reads the stop flag and CSTS */
    for (;;) {
        int finished = drain || (p->max_ios && p->issued >= p->max_ios);
        if (!finished)
            perf_fill(qp, p);
        int r = perf_turn_reap(qp, p, finished);
        if (r < 0)
            return r;
        if (qp->in_flight == 0 && finished)
            return 1;
        int stop = qp_stop_flag(qp);  /* a reset or the device's release by another thread: now */
        if (stop)
            return stop;
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
                if (nap >= HYBRID_MIN_NS && !qp_pending(qp)) {
                    /* A nap ends in no wait of nv_qp_wait's, so look at the stop flag and CSTS
                     * here as it would, once per AGE_CHECK_NS: a device taken away or gone
                     * must end the loop now, not when its commands turn late. */
                    if (now >= next_look) {
                        next_look = now + AGE_CHECK_NS;
                        int bad = qp_health(qp);
                        if (bad)
                            return bad;
                    }
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

int nv_perf_run(struct nv_qp *qp, struct nv_perf *p, int64_t slice_ns, int drain)
{
    int r = perf_run(qp, p, slice_ns, drain);
    nv_qp_ring_cq(qp);  /* the head consumed so far: its next user starts with all its room */
    return r;
}

static int perf_run_many(struct nv_qp *const *qps, struct nv_perf *const *ps, uint32_t n, int64_t slice_ns, int drain,
                     uint32_t *which)
{
    int64_t start = nv_now_ns();
    int64_t end = start + slice_ns;
    int64_t next_look = start + AGE_CHECK_NS;
    *which = 0;
    if (n == 0)
        return -EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        if (qps[i]->irq_fd >= 0) {
            *which = i;
            return -EINVAL;  /* one thread cannot sleep on several queues' interrupts: polled queues only */
        }
    }
    for (;;) {
        int all_done = 1;
        for (uint32_t i = 0; i < n; i++) {
            struct nv_qp *qp = qps[i];
            struct nv_perf *p = ps[i];
            int finished = drain || (p->max_ios && p->issued >= p->max_ios);
            if (!finished)
                perf_fill(qp, p);
            int r = perf_turn_reap(qp, p, finished);
            if (r < 0) {
                *which = i;
                return r;
            }
            if (qp->in_flight || !finished)
                all_done = 0;
            int stop = qp_stop_flag(qp);  /* a reset or the device's release by another thread: now */
            if (stop) {
                *which = i;
                return stop;
            }
        }
        if (all_done)
            return 1;
        int64_t now = nv_now_ns();
        if (!drain && now >= end)
            return 0;
        if (now >= next_look) {
            /* Once per AGE_CHECK_NS, busy or not (one queue's completions must not hide another's
             * late command): each queue's controller health (CSTS) and its oldest command. */
            next_look = now + AGE_CHECK_NS;
            for (uint32_t i = 0; i < n; i++) {
                struct nv_qp *qp = qps[i];
                int bad = qp_health(qp);
                if (!bad && qp->in_flight && now - nv_qp_oldest_submit(qp) >= ps[i]->timeout_ns)
                    bad = -ETIMEDOUT;
                if (bad) {
                    *which = i;
                    return bad;
                }
            }
        }
    }
}

int nv_perf_run_many(struct nv_qp *const *qps, struct nv_perf *const *ps, uint32_t n, int64_t slice_ns, int drain,
                     uint32_t *which)
{
    int r = perf_run_many(qps, ps, n, slice_ns, drain, which);
    for (uint32_t i = 0; i < n; i++)
        nv_qp_ring_cq(qps[i]);  /* the head consumed so far: its next user starts with all its room */
    return r;
}
