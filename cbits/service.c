/* nvmevfio serve: the per-command part of the service's data path (nvmevfio/service/).
 *
 * A client publishes 40-byte requests (a buffer id, an offset in it, LBAs of its window) in a
 * shared ring; here each is copied out of the shared page, checked against the session's grant
 * and buffer table, and turned into an NVMe READ or WRITE whose PRP1, PRP2 and PRP-list entries
 * are copied from the page tables the broker authored (NVMe Base 2.0, 4.1.1). Completions go
 * back into the client's completion ring. The rings' layout and index protocol: svc_ring.h. The
 * client's side in C (perf through the service): cbits/svc_client.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "shim.h"
#include "barrier.h"
#include "nvme.h"
#include "svc_ring.h"

#define SERVICE_REFUSED 0x8000
#define REAP_BATCH 64
#define WATCH_NS 1000000LL       /* spinning: how often the watched descriptors are looked at */
#define LATE_CHECK_NS 100000000LL /* how often in-flight ages are looked at */

_Static_assert(sizeof(struct nv_svc_request) == 40, "ring.REQUEST is 40 bytes");
_Static_assert(sizeof(struct nv_svc_completion) == 16, "ring.COMPLETION is 16 bytes");

static inline uint32_t svc_load_index(const struct nv_svc *s, uint32_t at)
{
    return barrier_load_acquire32(s->header + at);
}

static inline void svc_store_index(struct nv_svc *s, uint32_t at, uint32_t value)
{
    barrier_store_release32(s->header + at, value);
}

int nv_svc_check(const struct nv_svc *s, const struct nv_svc_request *r)
{
    /* the same order as the daemon's refusals always had: opcode, access, window, size, buffer */
    uint8_t opc = r->opcode;  /* the NVM command set's opcodes (ring.py); a deallocate is a DSM */
    if (opc != NVME_CMD_FLUSH && opc != NVME_CMD_WRITE && opc != NVME_CMD_READ && opc != NVME_CMD_WRITE_ZEROES &&
        opc != NVME_CMD_DSM)
        return NV_SVC_DISALLOWED_OPCODE;
    if (opc != NVME_CMD_READ && opc != NVME_CMD_FLUSH && !s->writable)
        return NV_SVC_READ_ONLY;
    if (opc == NVME_CMD_FLUSH)
        return NV_SVC_OK;
    if (r->count < 1 || r->lba >= s->blocks || r->count > s->blocks - r->lba)
        return NV_SVC_OUT_OF_WINDOW;
    if (opc != NVME_CMD_READ && opc != NVME_CMD_WRITE)
        return NV_SVC_OK;
    uint64_t length = (uint64_t)r->count * s->block_size;
    if (length > s->max_transfer)
        return NV_SVC_COUNT_OUT_OF_RANGE;
    const struct nv_svc_buffer *b = r->buffer < s->nbuffers ? &s->buffers[r->buffer] : NULL;
    if (!b || !b->size)  /* ids are never reused: one handed out earlier was freed */
        return r->buffer > 0 && r->buffer < s->next_buffer ? NV_SVC_STALE_GENERATION : NV_SVC_INVALID_REGION;
    if (b->generation != r->generation)
        return NV_SVC_STALE_GENERATION;
    if (r->offset > b->size || length > b->size - r->offset)
        return NV_SVC_REGION_OVERRUN;
    if (r->offset & 3)  /* PRP1: dword aligned (4.1.1) */
        return NV_SVC_UNALIGNED;
    uint64_t in_page = r->offset % s->page_size;
    uint64_t pages = (in_page + length + s->page_size - 1) / s->page_size;
    uint64_t per = s->page_size / 8;
    /* list pages for the pages - 1 entries after PRP1: each holds per - 1 entries and a chain
     * pointer, the last one up to per entries */
    uint64_t lists = pages <= 2 ? 0 : 1 + (pages - 3) / (per - 1);
    if (pages > s->max_pages || lists > s->prp_pages)
        return NV_SVC_COUNT_OUT_OF_RANGE;
    return NV_SVC_OK;
}

/* PRP1 and PRP2 of a checked READ/WRITE, and its PRP-list pages in cid's part of the queue's
 * list area: every value is an entry of the broker's tables, none is computed here beyond an
 * offset inside the first page. */
static void svc_author_prps(struct nv_svc *s, const struct nv_svc_buffer *b, uint16_t cid, uint64_t offset,
                            uint64_t length, struct nv_sqe *e)
{
    uint32_t ps = s->page_size;
    uint64_t first = offset / ps, in_page = offset % ps;
    uint64_t pages = (in_page + length + ps - 1) / ps;
    e->prp1 = b->pages[first] + in_page;
    if (pages == 1) {
        e->prp2 = 0;
        return;
    }
    if (pages == 2) {
        e->prp2 = b->pages[first + 1];
        return;
    }
    uint64_t per = ps / 8;
    uint64_t remaining = pages - 1;
    const uint64_t *src = &b->pages[first + 1];
    uint32_t list = cid * s->prp_pages;
    e->prp2 = s->prp_dev[list];
    for (;;) {
        uint64_t *page = &s->prp_area[(uint64_t)list * per];
        if (remaining <= per) {  /* the rest fits this page, its last entry included (4.1.1) */
            memcpy(page, src, remaining * 8);
            return;
        }
        memcpy(page, src, (per - 1) * 8);
        page[per - 1] = s->prp_dev[list + 1];  /* the last entry points to the next list page */
        src += per - 1;
        remaining -= per - 1;
        list++;
    }
}

static void svc_put_completion(struct nv_svc *s, uint32_t tag, uint16_t status, uint16_t reason, uint32_t result)
{
    struct nv_svc_completion *c = &s->completions[s->cq_tail % s->depth];
    c->tag = tag;
    c->status = status;
    c->reason = reason;
    c->result = result;
    c->rsvd = 0;
    s->cq_tail++;
    s->completed++;
}

static void svc_publish_completions(struct nv_svc *s)
{
    svc_store_index(s, CQ_TAIL, s->cq_tail);  /* store-release: the entries before the index */
    /* Full fence: the tail's store must be visible before CLIENT_BUSY is read, or a client that
     * cleared it and then read the old tail would sleep with nobody to wake it (Dekker; the
     * client fences between its flag and its tail read the same way). */
    barrier_mb();
    if (s->completion_fd >= 0 && !svc_load_index(s, CLIENT_BUSY)) {
        uint64_t one = 1;
        ssize_t w = write(s->completion_fd, &one, sizeof(one));
        (void)w;  /* EAGAIN: the counter is at its maximum, the client is woken anyway */
    }
    s->reaps++;
}

/* Can C post this checked request itself? */
static int svc_postable(const struct nv_svc *s, const struct nv_svc_request *r)
{
    switch (r->opcode) {
    case NVME_CMD_READ:
    case NVME_CMD_WRITE:
    case NVME_CMD_FLUSH:
        return 1;
    case NVME_CMD_WRITE_ZEROES:
        return (s->oncs & NVME_CTRL_ONCS_WRITE_ZEROES) && r->count <= NVME_WZ_MAX_NLB;
    case NVME_CMD_DSM:
        return (s->oncs & NVME_CTRL_ONCS_DSM) && s->prp_pages > 0;
    default:
        return 0;
    }
}

/* Every request taken gets one completion: no more are taken than the completion ring has room
 * for after the ones still owed. A client that wrote a wild head only stalls itself. */
static int64_t svc_completion_room(const struct nv_svc *s)
{
    int64_t owed = (int64_t)(uint32_t)(s->cq_tail - svc_load_index(s, CQ_HEAD)) + s->in_flight;
    return (int64_t)s->depth - owed;
}

/* Requests published and not taken yet: a tail more than a ring ahead counts one ring's worth. */
static uint32_t svc_published(const struct nv_svc *s)
{
    uint32_t avail = svc_load_index(s, SQ_TAIL) - s->sq_head;
    return avail > s->depth ? s->depth : avail;
}

int nv_svc_pump(struct nv_svc *s, struct nv_qp *qp)
{
    if (s->has_held)
        return 0;
    int64_t room = svc_completion_room(s);
    uint32_t avail = svc_published(s);
    uint32_t posted = 0, refused = 0;
    int64_t now = 0;
    while (avail && room > 0) {
        struct nv_svc_request r = s->requests[s->sq_head % s->depth];  /* a copy: what is checked is used */
        int reason = nv_svc_check(s, &r);
        if (reason == NV_SVC_OK && svc_postable(s, &r)) {
            uint16_t cid;
            if (nv_qp_take(qp, 1, &cid) < 0)
                break;  /* the queue is full: the rest waits for completions */
            const struct nv_svc_buffer *b = NULL;
            uint64_t length = 0;
            struct nv_sqe e;
            memset(&e, 0, sizeof(e));
            e.opc = r.opcode;
            e.cid = cid;
            e.nsid = s->nsid;
            uint64_t slba = s->first_lba + r.lba;
            if (r.opcode == NVME_CMD_READ || r.opcode == NVME_CMD_WRITE || r.opcode == NVME_CMD_WRITE_ZEROES) {
                e.cdw10 = (uint32_t)slba;
                e.cdw11 = (uint32_t)(slba >> 32);
                e.cdw12 = r.count - 1;  /* NLB is 0's based */
            }
            if (r.opcode == NVME_CMD_READ || r.opcode == NVME_CMD_WRITE) {
                b = &s->buffers[r.buffer];
                length = (uint64_t)r.count * s->block_size;
                svc_author_prps(s, b, cid, r.offset, length, &e);
                if (b->shadow && r.opcode == NVME_CMD_WRITE)  /* no IOMMU: the device reads the shadow */
                    memcpy(b->shadow + r.offset, b->user + r.offset, length);
            } else if (r.opcode == NVME_CMD_DSM) {
                /* One range (NVM Command Set 3.2.3: context attributes, NLB, SLBA; 16 bytes) in the
                 * first of this command id's list pages, which a DSM command has no other use for. */
                uint32_t list = cid * s->prp_pages;
                uint64_t *range = &s->prp_area[(uint64_t)list * (s->page_size / 8)];
                range[0] = (uint64_t)r.count << 32;  /* context attributes 0, then NLB */
                range[1] = slba;
                e.prp1 = s->prp_dev[list];
                e.cdw10 = 0;  /* NR: one range, 0's based */
                e.cdw11 = NVME_DSMGMT_AD;
            }  /* FLUSH: the namespace, nothing more */
            if (!now)
                now = nv_now_ns();
            int64_t tag = nv_qp_push(qp, &e, b ? b->ledger_slot : -1, b ? b->ledger_gen : 0, r.tag, now);
            if (tag < 0) {
                uint16_t back = cid;
                nv_qp_untake(qp, 1, &back);
                break;
            }
            s->cid_tag[cid] = tag;
            s->cid_buffer[cid] = b ? r.buffer : 0;
            s->cid_offset[cid] = r.offset;
            s->cid_length[cid] = (uint32_t)length;
            s->in_flight++;
            posted++;
        } else if (reason == NV_SVC_OK) {
            s->held = r;  /* after the batch drains, in Python */
            s->has_held = 1;
            s->in_flight++;
        } else {
            svc_put_completion(s, r.tag, SERVICE_REFUSED, (uint16_t)reason, 0);
            refused++;
        }
        s->sq_head++;
        s->taken++;
        avail--;
        room--;
        if (s->has_held)
            break;
    }
    svc_store_index(s, SQ_HEAD, s->sq_head);  /* store-release: those entries may be written again */
    if (posted) {
        nv_qp_ring_sq(qp);  /* one SQ tail doorbell for the batch */
        s->posted += posted;
        s->pumps++;
    }
    if (refused) {
        s->refused += refused;
        svc_publish_completions(s);
    }
    return (int)posted;
}

int nv_svc_complete(struct nv_svc *s, const struct nv_completion *done, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        const struct nv_completion *c = &done[i];
        if (c->cid < s->ncids && s->cid_tag[c->cid] == c->tag) {
            uint32_t id = s->cid_buffer[c->cid];
            const struct nv_svc_buffer *b = id < s->nbuffers ? &s->buffers[id] : NULL;
            /* no IOMMU: a READ's data went to the shadow; the client's memory gets it now */
            if (id && b && b->shadow && c->opcode == NVME_CMD_READ && c->status == 0)
                memcpy(b->user + s->cid_offset[c->cid], b->shadow + s->cid_offset[c->cid], s->cid_length[c->cid]);
            s->cid_tag[c->cid] = 0;
        }
        svc_put_completion(s, c->cookie, c->status, 0, c->result);
        if (s->in_flight)
            s->in_flight--;
    }
    if (n)
        svc_publish_completions(s);
    return (int)n;
}

int nv_svc_put(struct nv_svc *s, uint32_t tag, uint16_t status, uint16_t reason, uint32_t result)
{
    svc_put_completion(s, tag, status, reason, result);
    if (s->in_flight)
        s->in_flight--;
    svc_publish_completions(s);
    return 0;
}

int nv_svc_reap(struct nv_svc *s, struct nv_qp *qp)
{
    struct nv_completion done[REAP_BATCH];
    int total = 0;
    for (;;) {
        uint32_t nunpin = 0;
        int n = nv_qp_reap(qp, done, REAP_BATCH, NULL, 0, &nunpin);
        if (n < 0) {
            if (total)
                nv_qp_ring_cq(qp);
            return n;
        }
        if (n > 0)
            nv_svc_complete(s, done, (uint32_t)n);
        total += n;
        if (n < REAP_BATCH)
            break;
    }
    if (total)
        nv_qp_ring_cq(qp);  /* one CQ head doorbell for the batch */
    return total;
}

/* p: room for n entries (svc_serve_loop's poll set) */
static int svc_readable(struct pollfd *p, const int *fds, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        p[i].fd = fds[i];
        p[i].events = POLLIN;
        p[i].revents = 0;
    }
    return n ? poll(p, n, 0) > 0 : 0;
}

static void svc_drain_eventfd(int fd)
{
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof(v));  /* non-blocking: EAGAIN when it was not set */
    (void)r;
}

/* DAEMON_POLLING of every session: 1 on those whose queue is polled (the loop spins over them),
 * 0 on all when clear. */
static void svc_set_polling(struct nv_svc **s, struct nv_qp **qps, uint32_t n, int on)
{
    for (uint32_t i = 0; i < n; i++)
        svc_store_index(s[i], DAEMON_POLLING, on && qps[i]->irq_fd < 0);
}

/* Before sleeping: is there a request a client published without ringing (it saw DAEMON_POLLING
 * set) that nv_svc_pump would take? The flags were cleared first; the full fence orders that
 * store before these loads, as the client fences between publishing its tail and reading the
 * flag. Requests held back for want of completion room do not count: a client that does not
 * reap must not keep the daemon awake (it rings again when it has taken completions). */
static int svc_unrung(struct nv_svc **s, uint32_t n)
{
    barrier_mb();
    for (uint32_t i = 0; i < n; i++)
        if (!s[i]->has_held && svc_published(s[i]) && svc_completion_room(s[i]) > 0)
            return 1;
    return 0;
}

/* p: the poll set, room for every watched descriptor and two per session (nv_svc_serve sizes it:
 * no number of watched descriptors may crowd out a session's doorbell or interrupt) */
static int svc_serve_loop(struct nv_svc **s, struct nv_qp **qps, uint32_t n, const int *watch, uint32_t nwatch,
                          int64_t late_ns, int64_t timeout_ns, int64_t idle_spin_ns, uint32_t *which, struct pollfd *p)
{
    int64_t start = nv_now_ns();
    int64_t next_watch = start + WATCH_NS, next_late = start + LATE_CHECK_NS, last_work = start;
    uint32_t turn = 0;
    svc_set_polling(s, qps, n, 1);
    for (;;) {
        uint64_t work = 0;
        int polled = 0, busy = 0;  /* a polled queue among them; one with commands in flight */
        for (uint32_t k = 0; k < n; k++) {
            uint32_t i = (turn + k) % n;  /* round robin: a different session goes first each pass */
            if (qps[i]->stop && *(volatile const int32_t *)qps[i]->stop) {
                *which = i;
                return *qps[i]->stop == 1 ? -ENODEV : -EAGAIN;
            }
            int r = nv_svc_reap(s[i], qps[i]);
            if (r < 0) {
                *which = i;
                return r;
            }
            work += (uint64_t)r;
            work += (uint64_t)nv_svc_pump(s[i], qps[i]);
            if (s[i]->has_held && s[i]->in_flight == 1) {  /* only the held request is left */
                *which = i;
                return NV_SVC_HELD;
            }
            polled |= qps[i]->irq_fd < 0;
            busy |= qps[i]->irq_fd < 0 && qps[i]->in_flight != 0;
        }
        turn++;
        int64_t now = nv_now_ns();
        if (work)
            last_work = now;
        /* polled queues: spin while commands are in flight, and for idle_spin_ns after the last
         * work, so that a client's next batch is taken without a wake-up */
        int spin = busy || (polled && now - last_work < idle_spin_ns);
        if (now >= next_late) {
            next_late = now + LATE_CHECK_NS;
            for (uint32_t i = 0; i < n; i++) {
                if (qps[i]->in_flight && now - nv_qp_oldest_submit(qps[i]) >= late_ns) {
                    *which = i;
                    return NV_SVC_LATE;
                }
            }
        }
        if (now - start >= timeout_ns)
            return NV_SVC_TIMEOUT;
        if (work || spin) {
            if (now >= next_watch) {
                next_watch = now + WATCH_NS;
                if (svc_readable(p, watch, nwatch))
                    return NV_SVC_CONTROL;
            }
            continue;
        }
        /* Nothing to do: sleep until a client rings, a queue interrupts, or Python is needed. */
        svc_set_polling(s, qps, n, 0);
        if (svc_unrung(s, n)) {
            svc_set_polling(s, qps, n, 1);
            continue;
        }
        uint32_t np = 0;
        for (uint32_t i = 0; i < nwatch; i++)
            p[np++] = (struct pollfd){.fd = watch[i], .events = POLLIN};
        for (uint32_t i = 0; i < n; i++) {
            if (!s[i]->has_held)
                p[np++] = (struct pollfd){.fd = s[i]->doorbell_fd, .events = POLLIN};
            if (qps[i]->irq_fd >= 0 && qps[i]->in_flight)
                p[np++] = (struct pollfd){.fd = qps[i]->irq_fd, .events = POLLIN};
        }
        int64_t left = timeout_ns - (now - start);
        int in_flight = 0;
        for (uint32_t i = 0; i < n; i++)
            in_flight |= qps[i]->in_flight != 0;
        if (in_flight && left > LATE_CHECK_NS)
            left = LATE_CHECK_NS;
        int r = poll(p, np, (int)((left + 999999) / 1000000));
        if (r < 0)
            return errno == EINTR ? NV_SVC_TIMEOUT : -errno;  /* a signal: Python's handler runs */
        for (uint32_t i = 0; i < n; i++)
            s[i]->sleeps++;
        svc_set_polling(s, qps, n, 1);
        last_work = nv_now_ns();  /* woken: as if there was work (a doorbell usually) */
        int control = 0;
        for (uint32_t i = 0; i < np; i++) {
            if (!p[i].revents)
                continue;
            if (i < nwatch)
                control = 1;
            else
                svc_drain_eventfd(p[i].fd);  /* a client's doorbell or an MSI-X eventfd: the loop looks */
        }
        if (control)
            return NV_SVC_CONTROL;
    }
}

int nv_svc_serve(struct nv_svc **s, struct nv_qp **qps, uint32_t n, const int *watch, uint32_t nwatch,
                 int64_t late_ns, int64_t timeout_ns, int64_t idle_spin_ns, uint32_t *which)
{
    struct pollfd *p = calloc((size_t)nwatch + 2 * (size_t)n + 1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    int r = svc_serve_loop(s, qps, n, watch, nwatch, late_ns, timeout_ns, idle_spin_ns, which, p);
    free(p);
    svc_set_polling(s, qps, n, 0);  /* Python's loop looks at doorbells by their eventfds */
    barrier_mb();  /* the flags' stores before whatever Python reads next of the rings */
    return r;
}
