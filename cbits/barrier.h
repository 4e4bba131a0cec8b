/* nvmevfio C shim: memory barriers, inline. Private to the C files: cffi never sees this
 * header (cbits/shim.h is the cffi declarations, and holds no inline code).
 *
 * Two kinds of ordering are needed, and each barrier below says which it gives:
 *  - host memory against the device: queue entries are ordinary stores to host memory that the
 *    controller reads by DMA once it sees a doorbell (an MMIO store), and completion entries are
 *    written by the controller's DMA while the host polls their phase tag;
 *  - host memory between two processes on the same machine: the service's shared rings
 *    (nvmevfio/service/ring.py), whose indices are published with a store-release and read with
 *    a load-acquire, and whose notification flags need a full fence (Dekker's store-load order).
 *
 * Python reaches the same barriers through thin exported wrappers in shim.c (nv_wmb, nv_rmb,
 * nv_mb, nv_load_acquire32, nv_store_release32); C calls these, which cost no call. */
#ifndef NVMEVFIO_BARRIER_H
#define NVMEVFIO_BARRIER_H

#include <stdint.h>

/* Store barrier: every store before it (SQ entries, a consumed CQ head, a shadow doorbell) is
 * visible to the device before any store after it (the MMIO doorbell that tells the device to
 * look). x86's sfence also orders write-combining and non-temporal stores; aarch64's dmb oshst
 * orders stores in the outer shareable domain, the one the device's DMA observes. */
static inline void barrier_wmb(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("sfence" ::: "memory");
#elif defined(__aarch64__)
    __asm__ __volatile__("dmb oshst" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_RELEASE);
#endif
}

/* Load barrier: no load after it is satisfied before a load before it. A completion entry is
 * read only after its phase tag says it is new; without the barrier the CPU (or the compiler)
 * could read the entry's other fields from before the device wrote them. */
static inline void barrier_rmb(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("lfence" ::: "memory");
#elif defined(__aarch64__)
    __asm__ __volatile__("dmb oshld" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
#endif
}

/* Full fence: every load and store before it before every load and store after it; the one
 * barrier that orders a store before a later load. Needed where each of two parties writes one
 * flag and then reads the other's (a shadow doorbell and the controller's EventIdx; the service's
 * ring tail and the other side's "do not notify me" flag): with a fence on both sides, at least
 * one of them sees the other's store, so nobody sleeps with nobody to wake it. */
static inline void barrier_mb(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("mfence" ::: "memory");
#elif defined(__aarch64__)
    __asm__ __volatile__("dmb osh" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* Load-acquire of a shared ring index (CPU to CPU, no device): the entries the index covers are
 * read after it, so a consumer that sees the new index sees the entries too. */
static inline uint32_t barrier_load_acquire32(const void *addr)
{
    return __atomic_load_n((const uint32_t *)addr, __ATOMIC_ACQUIRE);
}

/* Store-release of a shared ring index (CPU to CPU, no device): the entries written before it
 * (or, for a consumer's head, the entries read before it) are done before the index moves, so
 * the other side never sees an index ahead of its entries, nor overwrites an entry being read. */
static inline void barrier_store_release32(void *addr, uint32_t value)
{
    __atomic_store_n((uint32_t *)addr, value, __ATOMIC_RELEASE);
}

#endif
