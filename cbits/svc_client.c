/* nvmevfio serve, the client's side: a closed loop over a client's shared rings (perf through
 * the service; nvmevfio/service/client.py runs it in slices). The same workload as the
 * in-process loop (cbits/perf.c): perf.h's PRNG and fill policy, perf.c's histogram
 * (nv_perf_done). The rings' layout and index protocol: svc_ring.h; the daemon's side:
 * cbits/service.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <unistd.h>

#include "shim.h"
#include "barrier.h"
#include "nvme.h"
#include "perf.h"
#include "svc_ring.h"

#define READ_TAG 0x80000000u  /* a request's tag: its slot, and this bit for a READ */

static int svc_client_loop(uint8_t *header, struct nv_svc_request *requests,
                           struct nv_svc_completion *completions, uint32_t depth, int doorbell_fd, int completion_fd,
                           int control_fd, struct nv_perf *p, uint64_t slot_size, int64_t *issued_ns, uint32_t *tail,
                           uint32_t *head, int64_t slice_ns, int drain)
{
    int64_t start = nv_now_ns(), end = start + slice_ns;
    uint32_t in_flight = p->nslots - p->nfree;
    barrier_store_release32(header + CLIENT_BUSY, 1);  /* looking at the ring: no eventfd writes needed */
    for (;;) {
        int finished = drain || (p->max_ios && p->issued >= p->max_ios);
        /* fill: what perf.h's policy allows, as one published batch and one doorbell */
        uint32_t room = depth - (*tail - barrier_load_acquire32(header + SQ_HEAD));
        uint32_t k = finished ? 0 : perf_batch(p, room, in_flight);
        if (k) {
            int64_t now = nv_now_ns();
            for (uint32_t i = 0; i < k; i++) {
                struct perf_io io = perf_next(p);
                struct nv_svc_request *r = &requests[*tail % depth];
                r->opcode = io.opcode;
                r->flags = 0;
                r->rsvd = 0;
                r->buffer = (uint32_t)p->buf_slot;
                r->generation = (uint64_t)p->buf_gen;
                r->offset = io.slot * slot_size;
                r->lba = io.lba;
                r->count = p->nlb;
                r->tag = io.slot | (io.opcode == NVME_CMD_READ ? READ_TAG : 0);
                issued_ns[io.slot] = now;
                (*tail)++;
            }
            barrier_store_release32(header + SQ_TAIL, *tail);  /* store-release: the entries first */
            /* Full fence: the tail's store before the flag's load (the daemon clears the flag,
             * fences, then reads the tail before it sleeps): one of the two sees the other. */
            barrier_mb();
            if (!barrier_load_acquire32(header + DAEMON_POLLING)) {
                uint64_t one = 1;
                ssize_t w = write(doorbell_fd, &one, sizeof(one));
                (void)w;
                p->doorbells++;
            }
            in_flight += k;
            p->issued += k;
            p->fills++;
        }
        /* reap: every published completion */
        uint32_t ready = barrier_load_acquire32(header + CQ_TAIL) - *head;
        if (ready > depth)
            return -EPROTO;  /* the daemon never publishes more than a ring */
        if (p->reap_max && ready > p->reap_max)
            ready = p->reap_max;  /* --iodepth-batch-complete-max: the rest on the next turn */
        if (ready) {
            int64_t now = nv_now_ns();
            for (uint32_t i = 0; i < ready; i++) {
                struct nv_svc_completion c = completions[(*head + i) % depth];
                uint32_t slot = c.tag & ~READ_TAG;
                if (slot >= p->nslots)
                    return -EPROTO;
                uint8_t opcode = c.tag & READ_TAG ? NVME_CMD_READ : NVME_CMD_WRITE;
                nv_perf_done(p, (uint64_t)(now - issued_ns[slot]), opcode, c.status, slot);
            }
            *head += ready;
            barrier_store_release32(header + CQ_HEAD, *head);  /* the entries may be written again */
            in_flight -= ready;
            p->reaps++;
        }
        if (!in_flight && finished)
            return 1;
        int64_t now = nv_now_ns();
        if (!drain && now >= end)
            return 0;
        if (!ready && in_flight) {
            if (now - start >= p->timeout_ns && drain)
                return -ETIMEDOUT;
            /* About to sleep: ask for the eventfd, then look once more (a completion published
             * before the daemon saw the flag came without one); the fence as in the fill above. */
            barrier_store_release32(header + CLIENT_BUSY, 0);
            barrier_mb();
            if (barrier_load_acquire32(header + CQ_TAIL) != *head) {
                barrier_store_release32(header + CLIENT_BUSY, 1);
                continue;
            }
            struct pollfd pf[2] = {{.fd = completion_fd, .events = POLLIN}, {.fd = control_fd, .events = POLLIN}};
            int64_t left = drain ? p->timeout_ns : end - now;
            int r = poll(pf, control_fd >= 0 ? 2 : 1, (int)((left + 999999) / 1000000));
            p->wait_ns += (uint64_t)(nv_now_ns() - now);
            p->sleeps++;
            barrier_store_release32(header + CLIENT_BUSY, 1);
            if (r < 0 && errno != EINTR)
                return -errno;
            if (r > 0 && pf[1].revents)
                return -EPIPE;  /* the daemon hung up (or broke the protocol): no completion will come */
            if (r > 0) {
                uint64_t v;
                ssize_t rr = read(completion_fd, &v, sizeof(v));
                (void)rr;
            }
        }
    }
}

int nv_svc_client_perf(uint8_t *header, struct nv_svc_request *requests, struct nv_svc_completion *completions,
                       uint32_t depth, int doorbell_fd, int completion_fd, int control_fd, struct nv_perf *p,
                       uint64_t slot_size,
                       int64_t *issued_ns, uint32_t *tail, uint32_t *head, int64_t slice_ns, int drain)
{
    int r = svc_client_loop(header, requests, completions, depth, doorbell_fd, completion_fd, control_fd, p,
                            slot_size, issued_ns, tail, head, slice_ns, drain);
    /* Whoever waits next (Python's client) waits on the eventfd: ask for it again. The fence
     * orders the flag's store before the caller's next look at the completion tail. */
    barrier_store_release32(header + CLIENT_BUSY, 0);
    barrier_mb();
    return r;
}
