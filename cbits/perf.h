/* nvmevfio perf: the workload's one PRNG and one fill policy, shared by the two closed loops
 * (cbits/perf.c: on a queue pair in this process; cbits/svc_client.c: a client of the
 * service, over its shared rings), inline. Private to the C files: cffi never sees this
 * header. Include it after shim.h (which, being the cffi declarations too, can have no
 * include guard). */
#ifndef NVMEVFIO_PERF_H
#define NVMEVFIO_PERF_H

#include <stdint.h>

#include "nvme.h"

/* splitmix64 (Steele, Lea and Flood; the seeding generator of xoshiro): one 64-bit step. */
static inline uint64_t perf_rand(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* How many I/Os to issue now: every free slot, no more than the queue has room for (room), the
 * workload's depth allows beside those in flight, or its max_ios leaves. */
static inline uint32_t perf_batch(const struct nv_perf *p, uint32_t room, uint32_t in_flight)
{
    uint32_t k = p->nfree < room ? p->nfree : room;
    uint32_t cap = p->depth > in_flight ? p->depth - in_flight : 0;
    if (k > cap)
        k = cap;
    if (p->max_ios && p->max_ios - p->issued < k)
        k = (uint32_t)(p->max_ios - p->issued);
    /* fio's iodepth_batch_submit: wait until batch_min can go with one SQ tail doorbell (Python
     * keeps batch_min <= depth, so an empty queue always can); a count's last few go as they are. */
    if (k < p->batch_min && !(p->max_ios && p->max_ios - p->issued == k))
        return 0;
    return k;
}

struct perf_io {
    uint64_t lba;
    uint32_t slot;       /* the registered-buffer slot it uses, taken from the free ones */
    uint8_t opcode;      /* NVME_CMD_READ, NVME_CMD_WRITE or NVME_CMD_ZONE_APPEND */
};

/* The next I/O of the workload: its position (I/O-sized and aligned, for random and sequential
 * alike; a zoned workload's within each zone's capacity), its direction (read_pct, or the zoned
 * workload's opcode), and a free slot. */
static inline struct perf_io perf_next(struct nv_perf *p)
{
    struct perf_io io;
    if (p->zone_size) {  /* zoned: the zones filled in order, each to its capacity, at its write pointer */
        uint64_t n = p->seq++ % p->positions;
        io.lba = p->lba_lo + n / p->zone_ios * p->zone_size + (p->zone_append ? 0 : n % p->zone_ios * p->nlb);
        io.opcode = p->zone_append ? NVME_CMD_ZONE_APPEND : NVME_CMD_WRITE;
        io.slot = p->free_slots[--p->nfree];
        return io;
    }
    uint64_t pos = p->random ? perf_rand(&p->rng) % p->positions : p->seq++ % p->positions;
    io.lba = p->lba_lo + pos * p->nlb;
    int is_read = p->read_pct >= 100 ? 1 : p->read_pct == 0 ? 0 : (perf_rand(&p->rng) % 100) < p->read_pct;
    io.opcode = is_read ? NVME_CMD_READ : NVME_CMD_WRITE;
    io.slot = p->free_slots[--p->nfree];
    return io;
}

/* Whole-queue waves: a loop that reaps every ready completion and refills every free slot can
 * lock itself and the device into rounds of the whole queue (QEMU's model takes the whole SQ in
 * one round and posts its answers in one: ~253 of 256 per reap), the device idle between them.
 * Past the first WAVE_SKIP reaps (the first fill is one wave whatever the device does), each
 * window of WAVE_SAMPLE reaps is averaged: at 7/8 of the depth or more, reap_max becomes wave_cap
 * for the rest of the run, so that refills overlap the device's work; a loop can fall into waves
 * after a good start, so every window is judged until one is. Below it the loop keeps taking
 * every ready one, which on a device that answers in smaller rounds is the faster choice (the C
 * driver does the same). docs/benchmarks.md, "Session 24". */
#define WAVE_SKIP 16u
#define WAVE_SAMPLE 64u

static inline void perf_wave_check(struct nv_perf *p, uint32_t n)
{
    if (p->wave_reaps < WAVE_SKIP) {
        p->wave_reaps++;
        return;
    }
    p->wave_reaped += n;
    if (++p->wave_reaps < WAVE_SKIP + WAVE_SAMPLE)
        return;
    if (p->wave_reaped * 8 >= (uint64_t)7 * WAVE_SAMPLE * p->depth)
        p->reap_max = p->wave_cap;
    p->wave_reaps = WAVE_SKIP;  /* the next window */
    p->wave_reaped = 0;
}

/* Take every ready completion of qp, each into done(ctx, slot, opcode, status, latency) once its
 * command id is free again (done may post into the SQ), then one CQ head doorbell for the batch.
 * Returns how many, or -EPROTO (a completion for no command in flight). Inline, with done a
 * constant at each call: the compiler inlines it too. For the loops on a queue pair of this
 * process (qpair.h included first), not the service client's. */
#ifdef NVMEVFIO_QPAIR_H
typedef void (*perf_done_fn)(void *ctx, uint32_t slot, uint8_t opcode, uint16_t status, uint64_t latency_ns);

static inline int perf_reap_each(struct nv_qp *qp, struct nv_perf *p, perf_done_fn done, void *ctx)
{
    uint32_t n = 0;
    int64_t now = 0;
    while ((!p->reap_max || n < p->reap_max) && qp_pending(qp)) {
        struct nv_cqe cqe;
        int cid = qp_consume(qp, &cqe);
        if (cid == CID_DIVERTED)
            continue;
        if (cid < 0) {
            nv_qp_ring_cq(qp);
            return -EPROTO;
        }
        if (n++ == 0)
            now = nv_now_ns();
        uint32_t slot = qp->cookie[cid];
        uint8_t opcode = qp->opcode[cid];
        uint64_t latency = (uint64_t)(now - qp->submit_ns[cid]);
        qp_retire(qp, (uint16_t)cid);
        done(ctx, slot, opcode, cqe.status >> 1, latency);
    }
    if (n) {
        p->reaps++;
        if (qp_cq_must_ring(qp, p->depth))  /* the loop keeps p->depth or fewer outstanding */
            nv_qp_ring_cq(qp);  /* one CQ head doorbell for the batch, when the CQ needs its room back */
        if (p->wave_cap && !p->reap_max)
            perf_wave_check(p, n);
    }
    return (int)n;
}
#endif

#endif
