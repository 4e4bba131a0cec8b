/* nvmevfio C shim: declarations only. This file is both the C header and the
 * cffi cdef, so it holds no #include, no macro and no inline code.
 * Every function returning int returns >= 0 on success and -errno on failure;
 * policy (what to open, what to map where) lives in Python. */

struct nv_device_info {
    uint32_t flags;        /* VFIO_DEVICE_FLAGS_* */
    uint32_t num_regions;
    uint32_t num_irqs;
};

struct nv_region_info {
    uint32_t index;
    uint32_t flags;        /* VFIO_REGION_INFO_FLAG_* */
    uint64_t size;
    uint64_t offset;       /* offset of the region in the device fd */
    uint32_t nr_sparse;    /* areas from VFIO_REGION_INFO_CAP_SPARSE_MMAP (0: none) */
};

struct nv_sparse_area {
    uint64_t offset;
    uint64_t size;
};

struct nv_irq_info {
    uint32_t index;
    uint32_t flags;        /* VFIO_IRQ_INFO_* */
    uint32_t count;
};

struct nv_iommu_info {
    uint32_t flags;        /* VFIO_IOMMU_INFO_* */
    uint64_t iova_pgsizes;
    uint32_t nr_ranges;    /* ranges from VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE (0: none reported) */
    uint32_t dma_avail;    /* VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, or 0xffffffff when not reported */
};

struct nv_iova_range {
    uint64_t start;
    uint64_t end;          /* inclusive */
};

/* The package version the shim was built for (stamped at build time). */
const char *nv_version(void);

/* VFIO constants, so Python does not restate the UAPI header. */
int nv_const(const char *name, uint64_t *value);

/* Container, group, device (linux/vfio.h). */
int nv_container_open(const char *path);
int nv_container_check_extension(int container_fd, uint32_t extension);
int nv_container_set_iommu(int container_fd, uint32_t iommu_type);
int nv_group_status(int group_fd, uint32_t *flags);
int nv_group_set_container(int group_fd, int container_fd);
int nv_group_unset_container(int group_fd);
int nv_group_get_device(int group_fd, const char *address);
int nv_close(int fd);

int nv_device_info(int device_fd, struct nv_device_info *out);
int nv_region_info(int device_fd, uint32_t index, struct nv_region_info *out,
                   struct nv_sparse_area *areas, uint32_t max_areas);
int nv_irq_info(int device_fd, uint32_t index, struct nv_irq_info *out);
int nv_device_reset(int device_fd);
/* PCI hot reset (a secondary bus reset through VFIO): how many devices it affects (or -errno where
 * the function cannot be hot reset), and the reset itself with the groups' fds (none: cdev). */
int nv_device_hot_reset_count(int device_fd);
int nv_device_hot_reset(int device_fd, const int32_t *group_fds, uint32_t count);
int nv_irq_set_eventfds(int device_fd, uint32_t index, uint32_t start,
                        uint32_t count, const int32_t *fds);
int nv_irq_disable(int device_fd, uint32_t index);

/* Region access through the device fd (config space, non-mmap regions). */
int nv_region_pread(int device_fd, uint64_t offset, void *buf, uint32_t len);
int nv_region_pwrite(int device_fd, uint64_t offset, const void *buf, uint32_t len);
int nv_region_mmap(int device_fd, uint64_t offset, uint64_t size, int writable, void **out);
int nv_munmap(void *addr, uint64_t size);
/* Replace a BAR mapping with anonymous memory reading all ones (the device was handed back). */
int nv_map_ones(void *addr, uint64_t size);

/* open(path, O_RDWR | O_CLOEXEC): VFIO groups, device cdevs, /dev/iommu. */
int nv_open_rw(const char *path);

/* iommufd (linux/iommufd.h) and VFIO device cdevs, Linux 6.6+ (cbits/iommufd.c). The
 * IOVA ranges are those of the IOAS once the device is attached (reserved holes removed). */
int nv_iommufd_destroy(int iommufd, uint32_t id);
int nv_ioas_alloc(int iommufd, uint32_t *ioas_id);
int nv_ioas_iova_ranges(int iommufd, uint32_t ioas_id, struct nv_iova_range *ranges, uint32_t max_ranges,
                        uint32_t *nr_ranges, uint64_t *alignment);
int nv_ioas_map(int iommufd, uint32_t ioas_id, uint64_t vaddr, uint64_t iova, uint64_t size,
                int device_writable);
int nv_ioas_unmap(int iommufd, uint32_t ioas_id, uint64_t iova, uint64_t size);
int nv_device_bind_iommufd(int device_fd, int iommufd, uint32_t *dev_id);
int nv_device_attach_pt(int device_fd, uint32_t pt_id);

/* Type1 IOMMU. */
int nv_iommu_info(int container_fd, struct nv_iommu_info *out,
                  struct nv_iova_range *ranges, uint32_t max_ranges);
int nv_dma_map(int container_fd, uint64_t vaddr, uint64_t iova, uint64_t size, int device_writable);
int nv_dma_unmap(int container_fd, uint64_t iova, uint64_t size);

/* Page-aligned anonymous memory, populated and locked; 2 MiB hugetlb pages on request
 * (size must then be a multiple of 2 MiB). */
int nv_mem_alloc(uint64_t size, int hugetlb, void **out);
int nv_mem_free(void *addr, uint64_t size);
/* The no-IOMMU lane's pool: huge pages in a hugetlbfs memfd, mapped once (grown when the
 * first pages are too scattered, the unwanted ones punched out), then the chosen pages
 * mapped again in a chosen order (sorted by physical address) and locked. Free with
 * nv_mem_free and nv_close(memfd). */
int nv_hugepool_create(uint64_t size, int *memfd, void **out);

/* Eventfds for MSI-X. */
int nv_eventfd_open(void);

/* MMIO: each is one volatile access of exactly that width. */
uint32_t nv_mmio_read32(const void *base, uint64_t offset);
void nv_mmio_write32(void *base, uint64_t offset, uint32_t value);
uint64_t nv_mmio_read64(const void *base, uint64_t offset);
void nv_mmio_write64(void *base, uint64_t offset, uint64_t value);

/* Barriers, for Python (C uses cbits/barrier.h's inline ones, where each says why it is needed). */
void nv_wmb(void);   /* stores before it are visible to the device before stores after it */
void nv_rmb(void);   /* loads after it are not satisfied before loads before it */
void nv_mb(void);    /* full fence */
/* The service's shared ring indices (service/ring.py): load-acquire and store-release. */
uint32_t nv_load_acquire32(const void *addr);
void nv_store_release32(void *addr, uint32_t value);

/* Doorbell: a store barrier, then one 32-bit MMIO write (so the device sees every queue entry
 * written before it). The queue pairs' own doorbell write (cbits/qpair.c), the only one. */
void nv_doorbell(void *base, uint64_t offset, uint32_t value);

/* ==== Queue pairs: the per-command hot path (NVMe Base Spec 2.0, 3.3 and 4.1; cbits/qpair.c) ====
 *
 * Python pays per batch, C per command. The broker (Python) authors every address
 * the device sees: queue bases, PRP1/PRP2 and PRP-list pages arrive here finished,
 * either inside whole SQEs (nv_qp_post) or as a table of pre-authored PRPs for the
 * slots of a registered buffer (nv_prp_slot). C copies them into the ring, keeps
 * the ring indexes, command ids and in-flight table, writes doorbells and reaps
 * completions. It never derives an address of its own. */

struct nv_sqe {            /* 4.2: Submission Queue Entry, 64 bytes */
    uint8_t opc;
    uint8_t flags;
    uint16_t cid;
    uint32_t nsid;
    uint32_t cdw2;
    uint32_t cdw3;
    uint64_t mptr;
    uint64_t prp1;
    uint64_t prp2;
    uint32_t cdw10;
    uint32_t cdw11;
    uint32_t cdw12;
    uint32_t cdw13;
    uint32_t cdw14;
    uint32_t cdw15;
};

struct nv_cqe {            /* 4.2.2: Completion Queue Entry, 16 bytes */
    uint32_t dw0;
    uint32_t dw1;
    uint16_t sqhd;
    uint16_t sqid;
    uint16_t cid;
    uint16_t status;       /* bit 0: phase tag */
};

struct nv_completion {     /* one completed command, as reap returns it (numpy: queue.COMPLETION) */
    int64_t tag;           /* unique over the queue's life, from 1 */
    double latency_s;      /* post to reap */
    uint32_t result;       /* CQE DW0 */
    uint32_t cookie;       /* what the poster attached (a registered-buffer slot in perf) */
    uint16_t cid;
    uint16_t status;       /* CQE status without the phase tag: 0 is success */
    uint8_t opcode;
    uint8_t pad[3];
    uint32_t result_hi;    /* CQE DW1 (Zone Append: the assigned LBA's high half, with DW0) */
    uint32_t pad2;
};

struct nv_unpin {          /* reaped commands per DMA buffer (slot, generation), for the ledger */
    int64_t slot;
    int64_t generation;
    int64_t commands;
};

struct nv_prp_slot {       /* a registered-buffer slot's data pointer, authored once by the broker */
    uint64_t prp1;         /* the slot's first byte (PRP1, or an SGL Data Block's Address) */
    uint64_t prp2_page;    /* PRP2 when a transfer touches exactly two memory pages */
    uint64_t prp2_list;    /* PRP2 (a PRP-list pointer) when it touches more */
    uint64_t sgl;          /* nonzero: the slot is one contiguous range; the command carries an SGL Data
                            * Block descriptor (PSDT 01b) with the transfer's length, not PRPs */
};

/* The simulator's doorbell: called instead of an MMIO store when set. */
typedef void (*nv_doorbell_fn)(void *ctx, uint64_t offset, uint32_t value);

struct nv_qp {
    /* set up by nv_qp_new / nv_qp_set_*; read-only afterwards */
    uint32_t qid;
    uint32_t depth;            /* entries per ring */
    uint32_t ncids;            /* depth - 1: one SQ slot always stays empty (3.3.1.5) */
    struct nv_sqe *sq;         /* broker-owned ring memory */
    struct nv_cqe *cq;
    uint8_t *bar;              /* mapped BAR0 */
    uint64_t sq_db;            /* SQ y Tail Doorbell offset in BAR0 (from CAP.DSTRD) */
    uint64_t cq_db;            /* CQ y Head Doorbell offset */
    nv_doorbell_fn hook;       /* not NULL: doorbells go here (the simulator), not to BAR0 */
    void *hook_ctx;
    uint32_t *shadow_sq;       /* Doorbell Buffer Config (admin 7Ch) shadow doorbells and */
    uint32_t *shadow_cq;       /* EventIdx entries for this queue; NULL when off */
    uint32_t *eventidx_sq;
    uint32_t *eventidx_cq;
    int irq_fd;                /* MSI-X eventfd of this queue's CQ, -1: poll */
    const uint32_t *csts;      /* CSTS, read while waiting: all ones (device gone) or CFS end the wait; NULL: not watched */
    const int32_t *stop;       /* the broker's stop flag, set by another thread: 1 the device is taken away
                                  (VFIO device request), every wait ends with -ENODEV; 2 a controller
                                  reset is coming, every wait ends with -EAGAIN; NULL: not watched */
    /* ring state */
    uint32_t sq_tail;          /* next slot the host writes */
    uint32_t sq_head;          /* last SQ head the controller reported (CQE.SQHD) */
    uint32_t sq_rung;          /* tail value last published */
    uint32_t cq_head;
    uint32_t cq_phase;         /* the phase tag of new entries: 1 on the first pass (3.3.3.2.2) */
    uint32_t cq_rung;          /* head value last published */
    /* command ids */
    uint32_t free_top;         /* free ids on the stack */
    uint32_t in_flight;
    int64_t next_tag;
    uint32_t bad_cid;          /* the command id of the last completion not in flight */
    uint32_t standing;         /* standing commands (Asynchronous Event Requests): posted, never late,
                                  not counted in in_flight; their completions go to events */
    uint32_t nevents;          /* completions of standing commands not yet taken (nv_qp_take_events) */
    struct nv_completion events[16];
    /* counters */
    uint64_t posted;
    uint64_t completed;
    uint64_t sq_mmio;          /* SQ tail doorbell MMIO writes */
    uint64_t cq_mmio;          /* CQ head doorbell MMIO writes */
    uint64_t sq_shadow_only;   /* SQ tail updates the EventIdx rule let go without MMIO */
    uint64_t cq_shadow_only;
    uint64_t sq_mmio_ns;       /* time spent in the SQ tail doorbell MMIO writes (each an exit into the
                                  device's emulation or a posted PCIe write): the profile's doorbell share */
    uint64_t cq_mmio_ns;
    int64_t csts_next_ns;      /* when a wait on the interrupt next reads CSTS (nv_qp_wait): at most once a ms */
    /* the in-flight table, ncids entries each */
    uint16_t *free_stack;
    uint8_t *busy;             /* 0: free, 1: taken (not yet posted), 2: in flight, 3: standing */
    uint8_t *opcode;
    int64_t *tag;
    int64_t *submit_ns;
    int64_t *buf_slot;
    int64_t *buf_gen;
    uint32_t *cookie;
    struct nv_sqe *saved;      /* each in-flight command's entry, for requeueing after a controller reset */
    uint8_t *retries;          /* times each in-flight command was requeued */
};

/* A queue pair over broker-owned rings of `depth` entries; NULL when out of memory. */
struct nv_qp *nv_qp_new(uint32_t qid, uint32_t depth, void *sq, void *cq, void *bar,
                        uint64_t sq_db, uint64_t cq_db);
void nv_qp_free(struct nv_qp *qp);
void nv_qp_set_hook(struct nv_qp *qp, nv_doorbell_fn fn, void *ctx);
/* Shadow doorbell and EventIdx entries of this queue (NULLs turn them off). */
void nv_qp_set_shadow(struct nv_qp *qp, void *shadow_sq, void *shadow_cq, void *eventidx_sq, void *eventidx_cq);
/* Commands that can be posted now: free command ids and free SQ slots. */
uint32_t nv_qp_capacity(const struct nv_qp *qp);
/* Reserve n command ids (-EBUSY when fewer are free), or hand back ids never posted. */
int nv_qp_take(struct nv_qp *qp, uint32_t n, uint16_t *cids);
int nv_qp_untake(struct nv_qp *qp, uint32_t n, const uint16_t *cids);
/* Copy n finished SQEs (ids from nv_qp_take) into the SQ at the tail and record them in
 * flight against DMA buffer (slot, gen) (-1: none). No doorbell. Returns the first tag. */
int64_t nv_qp_post(struct nv_qp *qp, const struct nv_sqe *entries, uint32_t n, int64_t buf_slot, int64_t buf_gen);
/* Post n READ/WRITE commands into slots of a registered buffer whose PRPs the broker
 * authored (nv_prp_slot); the transfer's page count picks PRP2. Ids are taken here.
 * No doorbell. Returns the first tag, or -EBUSY when the queue lacks room. */
int64_t nv_qp_post_slots(struct nv_qp *qp, uint8_t opc, uint32_t nsid, uint32_t n, const uint64_t *slba,
                         const uint32_t *nlb, const uint32_t *slot, const struct nv_prp_slot *prps,
                         uint32_t block_size, uint32_t page_size, int64_t buf_slot, int64_t buf_gen);
/* Publish the SQ tail: shadow doorbell + EventIdx rule, or the MMIO doorbell. 1: MMIO written. */
int nv_qp_ring_sq(struct nv_qp *qp);
/* Consume up to max ready completions (no doorbell); free their ids; per-buffer counts
 * go to unpin (nunpin set). Returns the count, or -EPROTO for a completion whose id is
 * not in flight (bad_cid names it; the entries before it were consumed). */
int nv_qp_reap(struct nv_qp *qp, struct nv_completion *out, uint32_t max, struct nv_unpin *unpin,
               uint32_t max_unpin, uint32_t *nunpin);
/* Publish the CQ head: shadow doorbell + EventIdx rule, or the MMIO doorbell. 1: MMIO written. */
int nv_qp_ring_cq(struct nv_qp *qp);
/* Is the entry at the CQ head new? */
int nv_qp_pending(const struct nv_qp *qp);
/* Wait until a completion is pending: spin, or poll(2) on the MSI-X eventfd. 1: pending, 0: timed
 * out, -ENODEV: CSTS reads all ones (surprise removal), -EIO: CSTS.CFS (both checked each ms). */
int nv_qp_wait(struct nv_qp *qp, int64_t timeout_ns);
/* Reap (ringing the CQ head once per batch) until at least `min` completions or the
 * timeout. Returns the count reaped (fewer than min: timed out) or -EPROTO. */
int nv_qp_reap_wait(struct nv_qp *qp, struct nv_completion *out, uint32_t max, uint32_t min, int64_t timeout_ns,
                    struct nv_unpin *unpin, uint32_t max_unpin, uint32_t *nunpin);
/* One command, start to end: post, ring, wait, reap. The entry's cid is one from nv_qp_take
 * (its PRP-list pages are authored), or 0xFFFF to take one here. The queue must be idle
 * (-EBUSY). -ETIMEDOUT leaves the command in flight against buffer (slot, gen). */
int nv_qp_exec(struct nv_qp *qp, struct nv_sqe *entry, int64_t buf_slot, int64_t buf_gen, int64_t timeout_ns,
               struct nv_completion *out);
/* nv_qp_exec for one READ or WRITE of nlb blocks at slba, built here from its fields (PRP1 and
 * PRP2, or an SGL Data Block descriptor, authored by the broker; no list; flags is CDW0's byte 1,
 * FUSE and PSDT): the synchronous API's one call per command. */
int nv_qp_exec_rw(struct nv_qp *qp, uint8_t opc, uint8_t flags, uint32_t nsid, uint64_t slba, uint32_t nlb,
                  uint64_t prp1, uint64_t prp2, int64_t buf_slot, int64_t buf_gen, int64_t timeout_ns, struct nv_completion *out);
/* Make in-flight command cid a standing one (an Asynchronous Event Request, 5.2): it is no
 * longer counted in in_flight nor ever late; its completion, whenever a reap meets it, is
 * kept aside (at most 16) for nv_qp_take_events, not returned by the reap. -EINVAL when cid
 * is not in flight, -ENOSPC when 16 are standing already. */
int nv_qp_make_standing(struct nv_qp *qp, uint16_t cid);
/* Move the kept completions of standing commands to out (up to max); returns the count. */
int nv_qp_take_events(struct nv_qp *qp, struct nv_completion *out, uint32_t max);
/* After CC.EN=0 the controller forgets standing commands: free their ids. Returns the count. */
int nv_qp_drop_standing(struct nv_qp *qp);
/* Controller reset, step 1: every ring index back to the start (the broker zeroed the ring memory
 * and re-created the queue); the in-flight table is kept. */
void nv_qp_reset_rings(struct nv_qp *qp);
/* Controller reset, step 2: copy every in-flight command's saved entry into the SQ again (same
 * id, same tag), except those already requeued max_retries times, whose ids go to over (nover
 * set; the caller cancels them). No doorbell. Returns the count requeued. */
int nv_qp_repost(struct nv_qp *qp, uint32_t max_retries, uint16_t *over, uint32_t *nover);
/* End an in-flight command without a completion from the device (after CC.EN=0): its record,
 * with the given status, goes to out and its id is freed. -EINVAL when cid is not in flight. */
int nv_qp_cancel(struct nv_qp *qp, uint16_t cid, uint16_t status, struct nv_completion *out);
/* CLOCK_MONOTONIC in nanoseconds. */
int64_t nv_now_ns(void);
/* Copy one finished SQE (its cid from nv_qp_take, its PRPs authored) into the SQ at the tail
 * and record it in flight against DMA buffer (slot, gen) with the caller's cookie, timed from
 * now. No doorbell. Returns its tag, -EBUSY (the SQ is full) or -EINVAL (cid not taken). */
int64_t nv_qp_push(struct nv_qp *qp, const struct nv_sqe *e, int64_t buf_slot, int64_t buf_gen, uint32_t cookie,
                   int64_t now);
/* Submit time (nv_now_ns) of the oldest command in flight; INT64_MAX when none is. */
int64_t nv_qp_oldest_submit(const struct nv_qp *qp);

/* ==== perf: a closed loop in C (in the manner of spdk_nvme_perf; cbits/perf.c) ==== */

/* Latency histogram: log-linear buckets in nanoseconds, fio's layout (64 per power of two). */
uint32_t nv_hist_bucket(uint64_t ns);
uint32_t nv_hist_buckets(void);

struct nv_perf {
    /* the workload, validated by Python */
    uint32_t nsid;
    uint32_t nlb;              /* blocks per I/O */
    uint32_t block_size;
    uint32_t page_size;
    uint64_t lba_lo;           /* first LBA of the range */
    uint64_t positions;        /* I/O-sized, aligned steps in the range (random and sequential) */
    uint32_t random;
    uint32_t read_pct;         /* 100: reads only, 0: writes only */
    uint32_t depth;
    uint32_t nslots;           /* registered-buffer slots (>= depth) */
    uint64_t max_ios;          /* 0: until time runs out */
    const struct nv_prp_slot *prps;
    int64_t buf_slot;
    int64_t buf_gen;
    int64_t timeout_ns;        /* a command in flight this long is late: -ETIMEDOUT (the broker recovers) */
    uint32_t hybrid;           /* polling: sleep (nanosleep) about half the time to the next completion
                                  instead of spinning the whole time, as Linux's hybrid polling */
    uint64_t zone_size;        /* a zoned workload (sequential): blocks per zone; 0: not zoned */
    uint64_t zone_ios;         /* its I/Os per zone (the zone's capacity in I/Os) */
    uint32_t zone_append;      /* 1: Zone Append to each zone's start; 0: Write at the zone's write pointer */
    uint32_t batch_min;        /* issue only when this many can go at once (fio's iodepth_batch_submit);
                                  0 or 1: whatever is free, at once */
    uint32_t reap_max;         /* at most this many completions per CQ head doorbell (fio's
                                  iodepth_batch_complete_max); 0: every ready one */
    uint32_t wave_cap;         /* with reap_max 0: the cap reap_max takes once the loop's reaps show
                                  whole-queue waves (perf.h perf_reap_each); 0: never */
    uint32_t refill;           /* 1: while reap_max is 0, re-post each completion's command as it is reaped,
                                  then the CQ head and SQ tail doorbells back to back (perf.c) */
    uint32_t wave_reaps;       /* reaps counted for that test (perf.h: the first few, then a window's) */
    uint64_t wave_reaped;      /* completions in the window's reaps */
    /* state kept between slices */
    uint64_t rng;
    uint64_t seq;
    uint64_t issued;
    uint32_t *free_slots;      /* nslots entries */
    uint32_t nfree;
    /* results */
    uint64_t ios;
    uint64_t reads;
    uint64_t writes;
    uint64_t errors;
    uint64_t lat_sum_ns;
    uint64_t lat_min_ns;
    uint64_t lat_max_ns;
    uint16_t first_error_status;
    uint8_t first_error_opcode;
    uint64_t wait_ns;          /* time spent waiting for the device (spinning or asleep on the eventfd) */
    uint64_t sleeps;           /* sleeps taken: hybrid polling's naps, the service client's eventfd waits */
    uint64_t fills;            /* SQ batches posted (one SQ tail doorbell each) */
    uint64_t reaps;            /* CQ batches reaped (one CQ head doorbell each) */
    uint64_t doorbells;        /* the service's client: eventfd doorbells written (the daemon was not spinning) */
    uint64_t *hist;            /* nv_hist_buckets() entries */
};

/* One completed I/O of a closed loop into p: its latency in the histogram and sums, read or
 * write by opcode (0x02: read), an error when status is not 0, and its slot free again. */
void nv_perf_done(struct nv_perf *p, uint64_t latency_ns, uint8_t opcode, uint16_t status, uint32_t slot);
/* Run the loop for slice_ns (keeping the queue full), or with drain=1 stop issuing and
 * reap what is in flight. Returns 1 when the workload is finished (max_ios done or
 * drained), 0 when the slice ended, or -errno. */
int nv_perf_run(struct nv_qp *qp, struct nv_perf *p, int64_t slice_ns, int drain);
/* Several closed loops in one thread (one poller for the polled queue pairs of several
 * controllers, as an SPDK reactor): each turn fills and reaps every queue, one SQ tail and one CQ
 * head doorbell per queue per batch; nothing sleeps. Returns as nv_perf_run for the whole group
 * (1: every loop finished or drained), a negative result with *which set to the queue it
 * concerns (the broker answers it for that queue). */
int nv_perf_run_many(struct nv_qp *const *qps, struct nv_perf *const *ps, uint32_t n, int64_t slice_ns, int drain,
                     uint32_t *which);

/* ==== the workload engine: a mix of operations, sizes and positions, a rate cap, and
 * verification, per command in C (cbits/workload.c; nvmevfio/workload_engine.py validates it) ====
 * Operations by index (struct nv_wl's per-op arrays): 0 Read, 1 Write, 2 Dataset Management
 * (Deallocate), 3 Flush, 4 Write Zeroes. */

/* The verify map: one entry per LBA of the range. gen: the generation last acknowledged there,
 * or a state (below); ack: the job's acknowledgement count when it was (a later Flush covers
 * it when submitted after it); pend: the generation or state of a command in flight there (a
 * write's: after a crash or reset either the old or the new content is right). */
struct nv_wl_vmap {
    uint64_t gen;
    uint64_t ack;
    uint64_t pend;
};

/* A block that did not hold what the map expects: the LBA, the expected generation (or
 * state), and the header found (magic, LBA, generation, the CRC32C it carries) with the
 * CRC32C computed over the rest of the block. */
struct nv_wl_mismatch {
    uint64_t lba;
    uint64_t want;
    uint64_t found_lba;
    uint64_t found_gen;
    uint32_t found_magic;
    uint32_t found_crc;
    uint32_t crc;
    uint32_t pad;
};

struct nv_wl {
    /* the workload, validated by Python */
    uint32_t op_cum[5];        /* cumulative shares of the ops, out of 1000000 (a draw below op_cum[i]: op i) */
    uint32_t nsizes;
    uint32_t size_nlb[8];      /* blocks per I/O of each size */
    uint32_t size_cum[8];      /* cumulative shares of the sizes, out of 1000000 */
    uint64_t lba_lo;           /* this job's slice of the range: [lba_lo, lba_lo + nblocks) */
    uint64_t nblocks;
    uint32_t random;           /* 0: sequential, each I/O step blocks after the last (0: its own size) */
    uint64_t step;
    uint32_t hot_pct;          /* skew: this share (percent) of the I/Os to the first hot_blocks of the slice */
    uint64_t hot_blocks;
    uint64_t interval_ns;      /* rate cap: one I/O per interval (0: none), a bucket of burst_ns */
    int64_t burst_ns;
    uint32_t deac;             /* Write Zeroes with DEAC (CDW12 bit 25) */
    uint32_t read_zeroes;      /* DLFEAT 001b: a deallocated block reads as zeroes */
    uint32_t verify;           /* stamp written blocks, check blocks read, keep the map */
    uint8_t *mem;              /* the slots' bytes as the device sees them (the PerfLoop's slot_memory) */
    uint64_t slot_size;
    struct nv_wl_vmap *map;    /* nblocks entries, the first for lba_lo (verify) */
    uint64_t nonce;            /* this run's, in every stamped header (its last 8 bytes) */
    struct nv_wl_mismatch *mism;
    uint32_t mism_cap;
    uint64_t *op_hist;         /* 5 x nv_hist_buckets() latency histograms, one per op */
    uint8_t *slot_op;          /* per slot (nslots): what is in flight there */
    uint32_t *slot_nlb;
    uint64_t *slot_lba;
    uint64_t *slot_gen;        /* a write's generation; a Flush's acknowledgement mark */
    /* state kept between slices */
    uint64_t rng;
    uint64_t gen;              /* the last generation stamped */
    uint64_t acks;             /* acknowledgements counted (writes, deallocates, write zeroes) */
    uint64_t durable;          /* acknowledgements up to this one were covered by a completed Flush */
    uint64_t cursor;           /* sequential: the next position (blocks from lba_lo) */
    int64_t next_ns;           /* rate cap: when the next I/O may go (0: from the first fill) */
    /* results */
    uint64_t op_ios[5];
    uint64_t op_bytes[5];
    uint64_t op_errors[5];
    uint64_t op_lat_sum_ns[5];
    uint64_t verified_blocks;  /* blocks read back and checked against the map */
    uint64_t zero_blocks;      /* of those, expected zeroes (deallocated, written zeroes) */
    uint64_t mismatches;       /* all of them; the first mism_cap kept in mism */
    uint64_t busy_redraws;     /* positions drawn again: a command was in flight there */
    uint64_t rate_naps;        /* naps taken ahead of the rate */
};

/* Run the workload on qp for slice_ns (keeping it full, within the rate), or with drain=1 stop
 * issuing and reap what is in flight: 1 finished, 0 the slice ended, or -errno (as
 * nv_perf_run). Called through PerfLoop.serve_c: p and qp are the broker's. */
int nv_wl_run(struct nv_wl *w, int64_t slice_ns, int drain, struct nv_perf *p, struct nv_qp *qp);
/* A command the broker ended (after a reset): its slot free again, counted as an error, and
 * the blocks a write, deallocate or write zeroes was changing marked undefined. */
void nv_wl_ended(struct nv_wl *w, struct nv_perf *p, uint32_t slot, uint16_t status);
/* Rate cap (a token bucket, as GCRA): how many of want I/Os may go at now, the bucket advanced
 * for them. */
uint32_t nv_wl_take(struct nv_wl *w, int64_t now, uint32_t want);
/* Check n blocks read into mem (LBAs lba.. of a map whose first entry is map_lo) against the map:
 * mismatches into out (at most cap; the count returned, or more when beyond cap), blocks checked in *checked. */
uint64_t nv_wl_check(const uint8_t *mem, uint32_t block_size, uint64_t lba, uint32_t n, const struct nv_wl_vmap *map,
                     uint64_t map_lo, uint64_t nonce, struct nv_wl_mismatch *out, uint32_t cap, uint64_t *checked);
/* Stamp n blocks at mem for LBAs lba.. with generation gen (header, payload, CRC32C). */
void nv_wl_stamp(uint8_t *mem, uint32_t block_size, uint64_t lba, uint32_t n, uint64_t gen, uint64_t nonce);
/* CRC32C (Castagnoli; the crc32c package's) of len bytes. */
uint32_t nv_crc32c(const uint8_t *buf, uint64_t len);

/* ==== the service's data path (nvmevfio serve; nvmevfio/service/; cbits/service.c) ====
 * One client's shared rings (service/ring.py) onto its own NVMe queue pair. Python decides who
 * may connect, with which grant, and authors the tables below (the client's buffers as pages of
 * device addresses, the queue's PRP-list pages); C takes each request, checks it against them,
 * and posts it, per command. A refusal completes the request with a reason, and nothing of it
 * reaches the device. */

enum nv_svc_reason {       /* service/ring.py REASONS (a unit test keeps the two equal) */
    NV_SVC_OK = 0,
    NV_SVC_OUT_OF_WINDOW = 1,
    NV_SVC_READ_ONLY = 2,
    NV_SVC_INVALID_REGION = 3,
    NV_SVC_STALE_GENERATION = 4,
    NV_SVC_REGION_OVERRUN = 5,
    NV_SVC_UNALIGNED = 6,
    NV_SVC_COUNT_OUT_OF_RANGE = 7,
    NV_SVC_DISALLOWED_OPCODE = 8
};

enum nv_svc_event {        /* what nv_svc_serve returns when Python has something to do */
    NV_SVC_TIMEOUT = 0,    /* the call's time ran out (or a signal came) */
    NV_SVC_CONTROL = 1,    /* a watched descriptor is readable */
    NV_SVC_HELD = 2,       /* session *which holds a FLUSH, Write Zeroes or deallocate */
    NV_SVC_LATE = 3        /* a command of session *which is older than late_ns */
};

struct nv_svc_request {    /* ring.REQUEST, 40 bytes */
    uint8_t opcode;
    uint8_t flags;
    uint16_t rsvd;
    uint32_t buffer;
    uint64_t generation;
    uint64_t offset;
    uint64_t lba;
    uint32_t count;
    uint32_t tag;
};

struct nv_svc_completion { /* ring.COMPLETION, 16 bytes */
    uint32_t tag;
    uint16_t status;       /* NVMe status field, or 0x8000 (refused: reason says why) */
    uint16_t reason;
    uint32_t result;
    uint32_t rsvd;
};

struct nv_svc_buffer {     /* one of the client's DMA buffers, by id; size 0: none, or freed */
    uint64_t generation;   /* the client's handle generation */
    uint64_t size;         /* bytes the client may use */
    const uint64_t *pages; /* the device address of each of its memory pages, authored by the broker */
    uint64_t npages;
    uint8_t *user;         /* no-IOMMU lane: the client's memory (the daemon's mapping) and its */
    uint8_t *shadow;       /* device-visible copy; shadow NULL: the device uses the memory itself */
    int64_t ledger_slot;   /* the ledger's handle, recorded in the in-flight table */
    int64_t ledger_gen;
};

struct nv_svc {
    /* the client's shared rings */
    uint8_t *header;            /* the four indices (ring.py HEADER) */
    struct nv_svc_request *requests;
    struct nv_svc_completion *completions;
    uint32_t depth;
    int doorbell_fd;            /* eventfd the client writes after publishing requests */
    int completion_fd;          /* eventfd written once per batch of completions; -1: none */
    /* the grant */
    uint32_t nsid;
    uint32_t writable;
    uint64_t first_lba;         /* the client's LBA 0 */
    uint64_t blocks;            /* its window */
    uint32_t block_size;
    uint32_t page_size;         /* the controller's memory page size (CC.MPS) */
    uint64_t max_transfer;      /* bytes per command (MDTS) */
    uint32_t max_pages;         /* memory pages one command may touch (MDTS) */
    uint32_t oncs;              /* Identify Controller ONCS: bit 3 Write Zeroes, bit 2 Dataset Management */
    /* the client's buffers, indexed by id; ids below next_buffer were handed out */
    const struct nv_svc_buffer *buffers;
    uint32_t nbuffers;
    uint32_t next_buffer;
    /* the queue's PRP-list pages, prp_pages per command id: memory, and device addresses */
    uint64_t *prp_area;
    const uint64_t *prp_dev;
    uint32_t prp_pages;
    /* per command id, for its completion: the queue's tag, and the no-IOMMU lane's copy back */
    uint32_t ncids;
    int64_t *cid_tag;
    uint32_t *cid_buffer;
    uint64_t *cid_offset;
    uint32_t *cid_length;
    /* state */
    uint32_t sq_head;           /* requests taken (free running) */
    uint32_t cq_tail;           /* completions published (free running) */
    uint32_t in_flight;         /* taken, not yet completed: posted, and held */
    uint32_t has_held;
    struct nv_svc_request held; /* a checked request C cannot post (see nv_svc_pump): Python runs it */
    /* counters */
    uint64_t taken;
    uint64_t refused;
    uint64_t posted;
    uint64_t completed;
    uint64_t pumps;             /* batches posted (one SQ tail doorbell each) */
    uint64_t reaps;             /* batches completed (one eventfd write each) */
    uint64_t sleeps;            /* nv_svc_serve: times it slept in poll(2) */
};

/* The reason to refuse request r, NV_SVC_OK to accept it. Pure: reads only s's grant and tables. */
int nv_svc_check(const struct nv_svc *s, const struct nv_svc_request *r);
/* Take what the client published (no more than its completion ring can answer), check each
 * request, post the accepted ones (one SQ tail doorbell for the batch), complete the refused
 * ones. READ and WRITE carry PRPs from the buffer's page table; FLUSH goes as it is; Write
 * Zeroes of up to 65536 blocks, and a deallocate (Dataset Management, one range written into
 * the command id's own list page), go when ONCS says the controller has them. A checked
 * request C cannot post (a longer Write Zeroes, a controller without the command) stops the
 * batch: it is taken into held (has_held) for Python to run or refuse. Returns the count posted. */
int nv_svc_pump(struct nv_svc *s, struct nv_qp *qp);
/* Completions of this session's commands (records from nv_qp_reap or from the broker's own
 * reap: tag in the cookie): the no-IOMMU lane's READ data copied back, each put in the ring,
 * the tail published, the eventfd written once. Returns n. */
int nv_svc_complete(struct nv_svc *s, const struct nv_completion *done, uint32_t n);
/* One completion the daemon made itself (a held request's outcome); ends one in_flight. */
int nv_svc_put(struct nv_svc *s, uint32_t tag, uint16_t status, uint16_t reason, uint32_t result);
/* Reap every ready completion of qp (one CQ head doorbell) into the client's ring. Returns the
 * count, or -EPROTO (a completion for an id not in flight: the broker's reap names it). */
int nv_svc_reap(struct nv_svc *s, struct nv_qp *qp);
/* The daemon's steady state, for n sessions on their queue pairs: pump and reap round robin
 * until Python is needed (enum nv_svc_event; *which names the session), timeout_ns passes, or
 * the broker's stop flag is set (-ENODEV, -EAGAIN). With commands in flight on a polled queue,
 * and for idle_spin_ns after its last work, it spins (telling its clients so: they need not
 * ring), looking at the watched descriptors every millisecond; otherwise it sleeps in poll(2)
 * on the clients' doorbells, the queues' MSI-X eventfds and the watched descriptors (all of
 * them, however many: the poll set is allocated for each call; -ENOMEM when it cannot be). */
int nv_svc_serve(struct nv_svc **s, struct nv_qp **qps, uint32_t n, const int *watch, uint32_t nwatch,
                 int64_t late_ns, int64_t timeout_ns, int64_t idle_spin_ns, uint32_t *which);
/* A client's closed loop over its rings (perf through the service; cbits/svc_client.c): like nv_perf_run, with
 * p->nslots slots of slot_size bytes in client buffer (p->buf_slot: id, p->buf_gen: generation);
 * tags are slot numbers. issued_ns: nslots submit times. control_fd: the client's socket, which
 * the daemon never writes unasked: readable while waiting means it hung up (-EPIPE). Returns 1
 * finished, 0 slice over, -errno. */
int nv_svc_client_perf(uint8_t *header, struct nv_svc_request *requests, struct nv_svc_completion *completions,
                       uint32_t depth, int doorbell_fd, int completion_fd, int control_fd, struct nv_perf *p,
                       uint64_t slot_size,
                       int64_t *issued_ns, uint32_t *tail, uint32_t *head, int64_t slice_ns, int drain);

/* ==== ublk: a namespace as /dev/ublkbN (cbits/ublk.c; nvmevfio/ublk.py) ====
 * Linux's userspace block driver over io_uring. Python adds, configures, starts, stops and
 * deletes the device (one control command per function) and runs one thread per queue; C
 * serves every block request of a queue: one NVMe command on that thread's queue pair, its
 * PRPs copied from the broker's table for the tag's slot of a registered buffer. */

struct nv_ublk_info {      /* ublksrv_ctrl_dev_info (linux/ublk_cmd.h), 64 bytes */
    uint16_t nr_hw_queues;
    uint16_t queue_depth;
    uint16_t state;        /* UBLK_S_DEV_DEAD 0, UBLK_S_DEV_LIVE 1, UBLK_S_DEV_QUIESCED 2 */
    uint16_t pad0;
    uint32_t max_io_buf_bytes;
    uint32_t dev_id;       /* 0xFFFFFFFF in ADD_DEV: the kernel picks */
    int32_t ublksrv_pid;
    uint32_t pad1;
    uint64_t flags;        /* UBLK_F_* */
    uint64_t ublksrv_flags;/* the server's own, kept by the kernel: nvmevfio puts the PCI function and namespace here */
    uint32_t owner_uid;
    uint32_t owner_gid;
    uint64_t reserved1;
    uint64_t reserved2;
};

struct nv_ublk_params {    /* ublk_param_basic and ublk_param_discard's fields nvmevfio sets (from Identify) */
    uint32_t attrs;        /* UBLK_ATTR_READ_ONLY 1, UBLK_ATTR_ROTATIONAL 2, UBLK_ATTR_VOLATILE_CACHE 4, UBLK_ATTR_FUA 8 */
    uint8_t logical_bs_shift;
    uint8_t physical_bs_shift;
    uint8_t io_opt_shift;
    uint8_t io_min_shift;
    uint32_t max_sectors;  /* 512-byte sectors per request: the tag buffer's size (MDTS) */
    uint64_t dev_sectors;
    uint32_t discard_granularity;        /* bytes */
    uint32_t max_discard_sectors;        /* 0: no discard (no Dataset Management) */
    uint32_t max_write_zeroes_sectors;   /* 0: no Write Zeroes */
};

struct nv_ublk_error {     /* one failed request, for the server's log */
    uint64_t slba;
    uint32_t nlb;
    uint16_t status;       /* NVMe status field (0: refused before the device) */
    uint16_t tag;
    int32_t err;           /* what the kernel got: -errno */
    uint8_t op;            /* UBLK_IO_OP_* */
    uint8_t pad[3];
};

enum { NV_UBLK_ERROR_LOG = 16 };

struct nv_ublk_queue {
    /* set by Python before nv_ublk_queue_open */
    uint32_t q_id;
    uint32_t depth;
    int char_fd;               /* /dev/ublkcN, opened once for every queue */
    uint8_t *buffers;          /* the tags' buffers, device-visible memory: tag t's at buffers + t * slot_size */
    uint64_t slot_size;
    uint32_t block_shift;      /* log2 of the logical block size */
    uint32_t read_only;
    uint64_t nblocks;          /* the namespace's size (NSZE) */
    uint32_t oncs;             /* Identify Controller ONCS: bit 2 Dataset Management, bit 3 Write Zeroes */
    int32_t stop;              /* set by another thread: nv_ublk_queue_run returns -ECANCELED */
    /* copied by nv_ublk_queue_run from the broker's validated workload (struct nv_perf), which
     * reaches C through PerfLoop.serve_c: Python never sets nor reads them */
    const struct nv_prp_slot *prps;  /* each tag's PRPs, authored by the broker */
    int64_t buf_slot;          /* the registered buffer's ledger handle, for the in-flight table */
    int64_t buf_gen;
    uint32_t nsid;
    uint32_t page_size;        /* the controller's memory page size (CC.MPS) */
    int64_t timeout_ns;        /* a command in flight this long is late: nv_ublk_queue_run returns -ETIMEDOUT */
    /* C's */
    void *ring;                /* the queue's io_uring */
    void *iods;                /* the kernel's request descriptors (mmapped, read-only) */
    uint8_t *tag_state;
    uint64_t irq_count;        /* the MSI-X eventfd's count, read through io_uring */
    uint32_t irq_armed;
    uint32_t ready;            /* every tag's FETCH_REQ was taken: the device may be started */
    uint32_t gone;             /* tags the kernel ended (UBLK_IO_RES_ABORT) */
    int32_t last_cqe_error;
    uint32_t null_device;      /* NVMEVFIO_UBLK_NULL (tools/bench.py's anchor): answer without the device */
    int64_t spin_ns;           /* how long an idle server spins before it sleeps in io_uring (SPIN_NS) */
    uint32_t coop_taskrun;     /* the ring has IORING_SETUP_COOP_TASKRUN: no IPI per new request (ublk.c) */
    /* counters */
    uint64_t requests;
    uint64_t reads;
    uint64_t writes;
    uint64_t flushes;
    uint64_t discards;
    uint64_t write_zeroes;         /* Write Zeroes that keep the blocks allocated (UBLK_IO_F_NOUNMAP) */
    uint64_t write_zeroes_unmap;   /* Write Zeroes with DEAC */
    uint64_t fua;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t interrupts;
    uint64_t nvme_batches;     /* SQ tail doorbells */
    uint64_t sleeps;
    uint64_t spin_hits;        /* waits that a request or completion ended while the server spun */
    uint64_t errors;
    uint64_t taskrun_enters;   /* entries into the kernel to run new requests' task work (IORING_SQ_TASKRUN) */
    /* where the loop's time goes (ns): inside io_uring submissions (the kernel's side of each
     * answer: COMMIT_AND_FETCH, a READ's copy into the request's pages), spinning, asleep */
    uint64_t submit_ns;
    uint64_t spun_ns;
    uint64_t slept_ns;
    struct nv_ublk_error error_log[16];  /* the last NV_UBLK_ERROR_LOG failures, at errors % 16 */
};

/* Control commands (URING_CMD on /dev/ublk-control); each returns the kernel's result. */
int nv_ublk_add_dev(struct nv_ublk_info *info);
int nv_ublk_set_params(uint32_t dev_id, const struct nv_ublk_params *p);
int nv_ublk_start_dev(uint32_t dev_id, int32_t pid);
int nv_ublk_stop_dev(uint32_t dev_id);
/* wait=0: DEL_DEV_ASYNC where the kernel has it (the device goes once its last user lets go). */
int nv_ublk_del_dev(uint32_t dev_id, int wait);
int nv_ublk_get_dev_info(uint32_t dev_id, struct nv_ublk_info *out);
int nv_ublk_start_recovery(uint32_t dev_id);
int nv_ublk_end_recovery(uint32_t dev_id, int32_t pid);
/* The errno a block request gets for an NVMe status field (EIO unless the status says otherwise). */
int nv_ublk_errno(uint16_t status);
/* On the queue's own thread (ublk serves a queue's tags from one task): its io_uring, the mmapped
 * descriptors, and with fetch=1 a FETCH_REQ for every tag (ready set once the kernel took them). */
int nv_ublk_queue_open(struct nv_ublk_queue *q, int fetch);
/* Serve requests until the device is stopped (0: every tag ended, nothing in flight), stop is
 * set (-ECANCELED), a command is late (-ETIMEDOUT), CSTS or the broker's stop flag end the wait
 * (-ENODEV, -EIO, -EAGAIN), or a completion is for an id not in flight (-EPROTO). The tags' PRPs,
 * ledger handle, namespace, page size and timeout come from w, the workload the broker validated
 * for queue pair qp (called through PerfLoop.serve_c, which holds the broker's guard). */
int nv_ublk_queue_run(struct nv_ublk_queue *q, const struct nv_perf *w, struct nv_qp *qp);
/* Answer tag's request from its NVMe status (for commands the broker ended itself). */
int nv_ublk_queue_complete(struct nv_ublk_queue *q, uint32_t tag, uint16_t status);
/* Close the io_uring (outstanding FETCHes are cancelled) and unmap the descriptors. */
void nv_ublk_queue_close(struct nv_ublk_queue *q);
