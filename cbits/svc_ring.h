/* nvmevfio serve: the layout of a client's shared rings (nvmevfio/service/ring.py), which both
 * sides in C use: the daemon (cbits/service.c) and the client's closed loop (cbits/svc_client.c).
 * Private to the C files: cffi never sees this header.
 *
 * The index protocol is ring.py's: free-running 32-bit counters, each published with a
 * store-release after the entries it covers and read with a load-acquire before the entries
 * (barrier.h). */
#ifndef NVMEVFIO_SVC_RING_H
#define NVMEVFIO_SVC_RING_H

/* the header: one cache line per index */
#define SQ_TAIL 0
#define SQ_HEAD 64
#define CQ_TAIL 128
#define CQ_HEAD 192
/* Notification suppression (ring.py), the shape of virtio's VRING_USED_F_NO_NOTIFY / io_uring's
 * SQ_NEED_WAKEUP: each flag has one writer and only lets the other side skip an eventfd write.
 * 0, the value a fresh ring and a Python client have, means "notify me". Neither side trusts the
 * other's flag for anything but its own wake-ups: a client that lies only stalls itself. */
#define DAEMON_POLLING 320       /* the daemon: 1 while it spins over this ring (no doorbell needed) */
#define CLIENT_BUSY 384          /* the client: 1 while it looks at its completion ring itself */

#endif
