/* nvmevfio workload engine: per command in C, a mix of operations (Read, Write, Dataset
 * Management with Deallocate, Flush, Write Zeroes), a size distribution, random (optionally
 * skewed) or sequential positions, a rate cap, and verification against a map of what each
 * LBA last held. Python validates the workload (nvmevfio/workload_engine.py) and reads the counters
 * once a second; the hardware steps are qpair.h's (post into a slot, ring, consume, retire).
 * The plain perf loop (cbits/perf.c) is untouched by any of this. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "shim.h"
#include "nvme.h"
#include "qpair.h"
#include "perf.h"  /* after qpair.h: perf_reap_each */

enum { OP_READ, OP_WRITE, OP_TRIM, OP_FLUSH, OP_WZ, NOPS };

/* verify map states (struct nv_wl_vmap); stamped generations are GEN_FIRST and above */
#define ST_NEVER 0     /* never written by the run the map belongs to: anything goes */
#define ST_ZERO 1      /* written zeroes, or deallocated where DLFEAT says reads return zeroes */
#define ST_UNDEF 2     /* deallocated without that promise, or a command that failed: undefined */
#define ST_READING 3   /* pend only: a read in flight */
#define GEN_FIRST 16

#define VERIFY_MAGIC 0x4656564Eu  /* "NVVF": nvmevfio/perf.py VERIFY_HEADER's */
#define HDR 32                    /* magic u32, crc32c u32, lba u64, generation u64, nonce u64 */
#define SHARE 1000000u
#define REDRAWS 8                 /* positions drawn per I/O before the fill stops (all busy) */

/* ==== CRC32C (Castagnoli, reflected 0x82F63B78): SSE4.2's instruction where the CPU has it ==== */

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc_soft(uint32_t c, const uint8_t *p, uint64_t len)
{
    if (!crc_table[1])
        crc_init();
    while (len--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t c, const uint8_t *p, uint64_t len)
{
    uint64_t c64 = c;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = __builtin_ia32_crc32di(c64, v);
        p += 8;
        len -= 8;
    }
    c = (uint32_t)c64;
    while (len--)
        c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}
#endif

uint32_t nv_crc32c(const uint8_t *buf, uint64_t len)
{
#if defined(__x86_64__)
    static int hw = -1;
    if (hw < 0)
        hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    if (hw)
        return ~crc_hw(0xFFFFFFFFu, buf, len);
#endif
    return ~crc_soft(0xFFFFFFFFu, buf, len);
}

/* ==== stamping and checking blocks ==== */

static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

void nv_wl_stamp(uint8_t *mem, uint32_t block_size, uint64_t lba, uint32_t n, uint64_t gen, uint64_t nonce)
{
    for (uint32_t b = 0; b < n; b++, mem += block_size) {
        uint64_t s = (lba + b) * 0x9E3779B97F4A7C15ULL ^ gen ^ nonce;  /* the payload: this write's own */
        for (uint32_t o = HDR; o + 8 <= block_size; o += 8)
            put64(mem + o, perf_rand(&s));
        put32(mem, VERIFY_MAGIC);
        put32(mem + 4, nv_crc32c(mem + HDR, block_size - HDR));
        put64(mem + 8, lba + b);
        put64(mem + 16, gen);
        put64(mem + 24, nonce);
    }
}

static int all_zero(const uint8_t *p, uint32_t n)
{
    for (uint32_t o = 0; o + 8 <= n; o += 8)
        if (get64(p + o))
            return 0;
    return 1;
}

/* Does the block hold what state or generation v says? -1: v promises nothing */
static int block_holds(const uint8_t *blk, uint32_t bs, uint64_t lba, uint64_t v, uint64_t nonce)
{
    if (v == ST_NEVER || v == ST_UNDEF || v == ST_READING)
        return -1;
    if (v == ST_ZERO)
        return all_zero(blk, bs);
    return get32(blk) == VERIFY_MAGIC && get64(blk + 8) == lba && get64(blk + 16) == v && get64(blk + 24) == nonce &&
           get32(blk + 4) == nv_crc32c(blk + HDR, bs - HDR);
}

/* One block against its map entry: 1 checked and right, 0 nothing to check, -1 a mismatch (in *m). */
static int check_block(const uint8_t *blk, uint32_t bs, uint64_t lba, const struct nv_wl_vmap *e, uint64_t nonce,
                       struct nv_wl_mismatch *m)
{
    int now = block_holds(blk, bs, lba, e->gen, nonce);
    if (now == 1)
        return 1;
    /* a command in flight when the map was saved: its new content is right too (undefined: anything) */
    if (e->pend != ST_NEVER && e->pend != ST_READING) {
        int then = block_holds(blk, bs, lba, e->pend, nonce);
        if (then != 0)
            return 1;
    }
    if (now < 0)
        return 0;
    m->lba = lba;
    m->want = e->gen;
    m->found_magic = get32(blk);
    m->found_crc = get32(blk + 4);
    m->found_lba = get64(blk + 8);
    m->found_gen = get64(blk + 16);
    m->crc = nv_crc32c(blk + HDR, bs - HDR);
    m->pad = 0;
    return -1;
}

uint64_t nv_wl_check(const uint8_t *mem, uint32_t block_size, uint64_t lba, uint32_t n, const struct nv_wl_vmap *map,
                     uint64_t map_lo, uint64_t nonce, struct nv_wl_mismatch *out, uint32_t cap, uint64_t *checked)
{
    uint64_t bad = 0;
    struct nv_wl_mismatch m;
    for (uint32_t b = 0; b < n; b++) {
        int r = check_block(mem + (uint64_t)b * block_size, block_size, lba + b, &map[lba + b - map_lo], nonce, &m);
        if (r > 0)
            (*checked)++;
        else if (r < 0) {
            (*checked)++;
            if (bad < cap)
                out[bad] = m;
            bad++;
        }
    }
    return bad;
}

/* ==== the rate cap: a token bucket kept as one time (GCRA) ==== */

uint32_t nv_wl_take(struct nv_wl *w, int64_t now, uint32_t want)
{
    if (!w->interval_ns || !want)
        return want;
    if (w->next_ns < now - w->burst_ns)  /* idle for a while: a full bucket, no more */
        w->next_ns = now - w->burst_ns;
    if (w->next_ns > now)
        return 0;
    uint64_t may = (uint64_t)(now - w->next_ns) / w->interval_ns + 1;
    uint32_t k = may < want ? (uint32_t)may : want;
    w->next_ns += (int64_t)(k * w->interval_ns);
    return k;
}

/* ==== the loop ==== */

static inline uint32_t draw(uint64_t *rng, const uint32_t *cum, uint32_t n)
{
    uint32_t r = (uint32_t)(perf_rand(rng) % SHARE);
    for (uint32_t i = 0; i < n - 1; i++)
        if (r < cum[i])
            return i;
    return n - 1;
}

/* The next position for an I/O of nlb blocks: aligned to its size, in the slice (blocks from lba_lo) */
static inline uint64_t position(struct nv_wl *w, uint32_t nlb)
{
    if (!w->random) {
        uint64_t at = w->cursor - w->cursor % nlb;
        if (at + nlb > w->nblocks)
            at = 0;
        w->cursor = at + (w->step ? w->step : nlb);
        if (w->cursor >= w->nblocks)
            w->cursor = 0;
        return at;
    }
    uint64_t lo = 0, len = w->nblocks;
    if (w->hot_pct && w->hot_blocks >= nlb && w->nblocks - w->hot_blocks >= nlb) {
        if (perf_rand(&w->rng) % 100 < w->hot_pct)
            len = w->hot_blocks;
        else
            lo = w->hot_blocks, len = w->nblocks - w->hot_blocks;
    }
    uint64_t first = (lo + nlb - 1) / nlb, last = (lo + len) / nlb;  /* aligned positions in [lo, lo + len) */
    if (last <= first)  /* a part too small for one aligned I/O of this size: the whole slice */
        first = 0, last = w->nblocks / nlb;
    return (first + perf_rand(&w->rng) % (last - first)) * nlb;
}

static inline int busy(const struct nv_wl *w, uint64_t at, uint32_t nlb)
{
    for (uint32_t b = 0; b < nlb; b++)
        if (w->map[at + b].pend != ST_NEVER)
            return 1;
    return 0;
}

static inline void mark(struct nv_wl *w, uint64_t at, uint32_t nlb, uint64_t pend)
{
    for (uint32_t b = 0; b < nlb; b++)
        w->map[at + b].pend = pend;
}

/* One command into the SQ at the tail (a free id taken), recorded in flight with its slot. */
static inline void post(struct nv_qp *qp, struct nv_perf *p, uint8_t opc, uint32_t cdw10, uint32_t cdw11,
                        uint32_t cdw12, uint32_t slot, uint64_t len, int64_t now)
{
    uint16_t cid = qp->free_stack[--qp->free_top];
    struct nv_sqe *e = &qp->sq[qp->sq_tail];
    memset(e, 0, sizeof(*e));
    e->opc = opc;
    e->cid = cid;
    e->nsid = p->nsid;
    if (len)
        qp_slot_dptr(e, &p->prps[slot], len, p->page_size);
    e->cdw10 = cdw10;
    e->cdw11 = cdw11;
    e->cdw12 = cdw12;
    qp_advance_tail(qp);
    qp_record(qp, e, now, p->buf_slot, p->buf_gen, slot);
}

/* Issue one I/O of the workload; 0 when every position drawn was busy (nothing posted). */
static int issue(struct nv_qp *qp, struct nv_perf *p, struct nv_wl *w, int64_t now)
{
    uint32_t op = draw(&w->rng, w->op_cum, NOPS);
    uint32_t nlb = 0;
    uint64_t at = 0;
    if (op != OP_FLUSH) {
        nlb = w->size_nlb[w->nsizes > 1 ? draw(&w->rng, w->size_cum, w->nsizes) : 0];
        at = position(w, nlb);
        if (w->verify) {
            int tries = 0;
            while (busy(w, at, nlb)) {
                w->busy_redraws++;
                if (++tries == REDRAWS)
                    return 0;
                at = position(w, nlb);
            }
        }
    }
    uint32_t slot = p->free_slots[--p->nfree];
    uint8_t *mem = w->mem + (uint64_t)slot * w->slot_size;
    uint64_t slba = w->lba_lo + at;
    uint32_t lo32 = (uint32_t)slba, hi32 = (uint32_t)(slba >> 32);
    uint64_t gen = 0;
    w->slot_op[slot] = (uint8_t)op;
    w->slot_lba[slot] = at;
    w->slot_nlb[slot] = nlb;
    switch (op) {
    case OP_READ:
        if (w->verify)
            mark(w, at, nlb, ST_READING);
        post(qp, p, NVME_CMD_READ, lo32, hi32, nlb - 1, slot, (uint64_t)nlb * p->block_size, now);
        break;
    case OP_WRITE:
        if (w->verify) {
            gen = ++w->gen;
            nv_wl_stamp(mem, p->block_size, slba, nlb, gen, w->nonce);
            mark(w, at, nlb, gen);
        }
        post(qp, p, NVME_CMD_WRITE, lo32, hi32, nlb - 1, slot, (uint64_t)nlb * p->block_size, now);
        break;
    case OP_TRIM:
        /* one Dataset Management range (16 bytes: context attributes, length in blocks, SLBA) at
         * the start of the slot's buffer, whose address the broker authored: NR 0 (0's based),
         * attribute Deallocate (CDW11 bit 2) */
        put32(mem, 0);
        put32(mem + 4, nlb);
        put64(mem + 8, slba);
        if (w->verify)
            mark(w, at, nlb, w->read_zeroes ? ST_ZERO : ST_UNDEF);
        post(qp, p, NVME_CMD_DSM, 0, 1u << 2, 0, slot, 16, now);
        break;
    case OP_FLUSH:
        gen = w->acks;  /* every acknowledgement so far: covered once this Flush completes */
        post(qp, p, NVME_CMD_FLUSH, 0, 0, 0, slot, 0, now);
        break;
    default:  /* OP_WZ: no data; DEAC asks the controller to deallocate too (reads zeroes either way) */
        if (w->verify)
            mark(w, at, nlb, ST_ZERO);
        post(qp, p, NVME_CMD_WRITE_ZEROES, lo32, hi32, (nlb - 1) | (w->deac ? 1u << 25 : 0), slot, 0, now);
        break;
    }
    w->slot_gen[slot] = gen;
    return 1;
}

#define ENDED UINT64_MAX

/* A completed command into the counters and the map. */
static void complete(struct nv_perf *p, struct nv_wl *w, uint32_t slot, uint16_t status, uint64_t latency_ns)
{
    uint32_t op = w->slot_op[slot], nlb = w->slot_nlb[slot];
    uint64_t at = w->slot_lba[slot];
    if (latency_ns != ENDED) {  /* one the broker ended has no latency */
        uint32_t bucket = nv_hist_bucket(latency_ns);
        p->hist[bucket]++;
        w->op_hist[(uint64_t)op * nv_hist_buckets() + bucket]++;
        p->lat_sum_ns += latency_ns;
        w->op_lat_sum_ns[op] += latency_ns;
        if (latency_ns < p->lat_min_ns)
            p->lat_min_ns = latency_ns;
        if (latency_ns > p->lat_max_ns)
            p->lat_max_ns = latency_ns;
    }
    w->op_ios[op]++;
    w->op_bytes[op] += (uint64_t)nlb * p->block_size;
    if (op == OP_READ)
        p->reads++;
    else if (op == OP_WRITE)
        p->writes++;
    if (status) {
        if (!p->errors) {
            p->first_error_status = status;
            p->first_error_opcode = op == OP_READ ? NVME_CMD_READ : op == OP_WRITE ? NVME_CMD_WRITE
                                    : op == OP_TRIM ? NVME_CMD_DSM : op == OP_FLUSH ? NVME_CMD_FLUSH
                                    : NVME_CMD_WRITE_ZEROES;
        }
        p->errors++;
        w->op_errors[op]++;
    }
    p->ios++;
    p->free_slots[p->nfree++] = slot;
    if (op == OP_FLUSH) {
        if (!status && w->slot_gen[slot] > w->durable)
            w->durable = w->slot_gen[slot];
        return;
    }
    if (!w->verify)
        return;
    struct nv_wl_vmap *e = &w->map[at];
    if (op == OP_READ) {
        if (!status) {
            const uint8_t *mem = w->mem + (uint64_t)slot * w->slot_size;
            for (uint32_t b = 0; b < nlb; b++) {
                struct nv_wl_mismatch m;
                int r = check_block(mem + (uint64_t)b * p->block_size, p->block_size, w->lba_lo + at + b, &e[b],
                                    w->nonce, &m);
                if (r != 0)
                    w->verified_blocks++;
                if (r > 0 && e[b].gen == ST_ZERO)
                    w->zero_blocks++;
                if (r < 0) {
                    if (w->mismatches < w->mism_cap)
                        w->mism[w->mismatches] = m;
                    w->mismatches++;
                }
            }
        }
        for (uint32_t b = 0; b < nlb; b++)
            e[b].pend = ST_NEVER;
        return;
    }
    /* a write, deallocate or write zeroes: acknowledged, its new content is the map's; failed, undefined */
    uint64_t ack = status ? 0 : ++w->acks;
    for (uint32_t b = 0; b < nlb; b++) {
        e[b].gen = status ? ST_UNDEF : e[b].pend;
        e[b].ack = ack;
        e[b].pend = ST_NEVER;
    }
}

void nv_wl_ended(struct nv_wl *w, struct nv_perf *p, uint32_t slot, uint16_t status)
{
    complete(p, w, slot, status ? status : 0xFFFF, ENDED);
}

/* Post what the fill policy and the rate allow, then one SQ tail doorbell. */
static void wl_fill(struct nv_qp *qp, struct nv_perf *p, struct nv_wl *w, int64_t now)
{
    uint32_t k = perf_batch(p, qp_capacity(qp), qp->in_flight);
    k = nv_wl_take(w, now, k);
    if (k == 0)
        return;
    uint32_t n = 0;
    while (n < k && issue(qp, p, w, now))
        n++;
    if (n < k && w->interval_ns)  /* tokens not spent (every position busy) go back */
        w->next_ns -= (int64_t)((k - n) * w->interval_ns);
    if (n == 0)
        return;
    qp->in_flight += n;
    qp->posted += n;
    p->issued += n;
    p->fills++;
    nv_qp_ring_sq(qp);
}

struct wl_reaping {
    struct nv_perf *p;
    struct nv_wl *w;
};

static inline void wl_one_done(void *ctx, uint32_t slot, uint8_t opcode, uint16_t status, uint64_t latency_ns)
{
    struct wl_reaping *r = ctx;
    complete(r->p, r->w, slot, status, latency_ns);
}

static int wl_reap(struct nv_qp *qp, struct nv_perf *p, struct nv_wl *w)
{
    struct wl_reaping r = {.p = p, .w = w};
    return perf_reap_each(qp, p, wl_one_done, &r);
}

#define AGE_CHECK_NS 1000000LL

static int wl_run(struct nv_wl *w, int64_t slice_ns, int drain, struct nv_perf *p, struct nv_qp *qp)
{
    int64_t end = nv_now_ns() + slice_ns;
    int64_t next_look = 0;  /* when a rate nap next reads the stop flag and CSTS */
    for (;;) {
        int finished = drain || (p->max_ios && p->issued >= p->max_ios);
        int64_t now = nv_now_ns();
        if (!finished)
            wl_fill(qp, p, w, now);
        int r = wl_reap(qp, p, w);
        if (r < 0)
            return r;
        if (qp->in_flight == 0 && finished)
            return 1;
        int stop = qp_stop_flag(qp);  /* a reset or the device's release by another thread: now */
        if (stop)
            return stop;
        now = nv_now_ns();
        if (!drain && now >= end)
            return 0;
        if (r)
            continue;
        if (now - nv_qp_oldest_submit(qp) >= p->timeout_ns)
            return -ETIMEDOUT;
        int64_t left = AGE_CHECK_NS;
        if (!drain && end - now < left)
            left = end - now;
        if (!finished && w->interval_ns && w->next_ns > now && p->nfree && qp->in_flight < p->depth) {
            /* ahead of the rate with room to issue: nap until the next I/O may go (completions
             * wait in the queue meanwhile) rather than spin. No wait of nv_qp_wait's follows,
             * so read the stop flag and CSTS here as it would, once per AGE_CHECK_NS. */
            if (qp->in_flight && now >= next_look) {
                next_look = now + AGE_CHECK_NS;
                int bad = qp_health(qp);
                if (bad)
                    return bad;
            }
            int64_t nap = w->next_ns - now;
            if (nap > left)
                nap = left;
            struct timespec ts = {.tv_sec = 0, .tv_nsec = nap};
            nanosleep(&ts, NULL);
            w->rate_naps++;
            p->sleeps++;
            p->wait_ns += (uint64_t)(nv_now_ns() - now);
            continue;
        }
        if (qp->in_flight == 0)
            continue;
        int wr = nv_qp_wait(qp, left);
        p->wait_ns += (uint64_t)(nv_now_ns() - now);
        if (wr < 0)
            return wr;
    }
}

int nv_wl_run(struct nv_wl *w, int64_t slice_ns, int drain, struct nv_perf *p, struct nv_qp *qp)
{
    int r = wl_run(w, slice_ns, drain, p, qp);
    nv_qp_ring_cq(qp);  /* the head consumed so far: its next user starts with all its room */
    return r;
}
