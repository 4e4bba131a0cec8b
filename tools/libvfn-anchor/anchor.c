/* libvfn-anchor: a closed-loop random-read benchmark on libvfn's C queue code (SamsungDS/libvfn),
 * the C driver that tools/bench.py --libvfn runs next to `nvmevfio perf` on the same vfio-bound
 * controller in the same guest boot.
 *
 *   anchor --device 0000:00:10.0 [--nsid 1] [--workload randread|read|randwrite] [--depth 32]
 *          [--size 4096] [--seconds 5] [--ramp 1] [--mode poll|irq] [--no-dbbuf]
 *
 * It keeps --depth commands of --size bytes in flight on one I/O queue pair (queue size depth + 1):
 * reads or writes at uniformly random aligned LBAs, or reads in LBA order (read), wrapping at the
 * namespace's end. Reap every ready completion, re-post one command for each, then
 * one CQ head doorbell and one SQ tail doorbell for the batch (as libvfn's examples/perf.c and as
 * nvmevfio's perf loop). --mode irq sleeps on the queue's MSI-X vector (an eventfd) when no
 * completion is ready. Shadow doorbells: libvfn's nvme_init() issues Doorbell Buffer Config
 * whenever the controller offers it (Identify Controller OACS bit 8; NVMe 5.8); --no-dbbuf brings the
 * controller up with libvfn's lower-level steps instead (reset, admin queue, enable, Set Features
 * Number of Queues) and leaves it out, so every doorbell is an MMIO write.
 *
 * One JSON object on stdout, keyed as `nvmevfio perf -o json`: iops, mib_per_s, lat_p50_us,
 * lat_p99_us, lat_mean_us, ios, seconds, sq_doorbell_mmio, cq_doorbell_mmio, shadow_only_updates,
 * ios_per_submit, ios_per_reap, cpu_us_per_io, wait_pct, doorbell_pct, sq_doorbell_us, cq_doorbell_us, dbbuf,
 * mode, workload, queue_depth, io_size.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <vfn/nvme.h>

#define ADMIN_IDENTIFY 0x06        /* NVMe 5.17 */
#define ADMIN_SET_FEATURES 0x09    /* NVMe 5.27 */
#define FID_NUMBER_OF_QUEUES 0x07  /* NVMe 5.27.1.11 */
#define CNS_NAMESPACE 0x00
#define IO_WRITE 0x01
#define IO_READ 0x02
#define ID_NS_NSZE 0      /* Identify Namespace: Namespace Size, bytes 7:0 */
#define ID_NS_FLBAS 26    /* Formatted LBA Size */
#define ID_NS_LBAF 128    /* LBA Format 0 Support, 4 bytes each; LBADS in bits 23:16 */
#define MAX_SAMPLES (1u << 24)

static struct nvme_ctrl ctrl;
static struct {
    unsigned long sq_mmio, cq_mmio, shadow_only, submits, reaps;
    int64_t sq_ns, cq_ns; /* time inside the MMIO doorbell writes (as nvmevfio's sq_mmio_ns, cq_mmio_ns) */
} db;

static void die(const char *what)
{
    fprintf(stderr, "anchor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* libvfn's nvme_sq_update_tail() and nvme_cq_update_head(), counting what nvme_try_dbbuf()
 * (the EventIdx rule) decided: an MMIO write, or the shadow doorbell alone. */
static void ring_sq(struct nvme_sq *sq)
{
    if (sq->tail == sq->ptail)
        return;
    db.submits++;
    if (nvme_try_dbbuf(sq->tail, &sq->dbbuf)) {
        wmb();
        int64_t t0 = now_ns();
        mmio_write32(sq->doorbell, cpu_to_le32(sq->tail));
        db.sq_ns += now_ns() - t0;
        db.sq_mmio++;
    } else {
        db.shadow_only++;
    }
    sq->ptail = sq->tail;
}

static void ring_cq(struct nvme_cq *cq)
{
    db.reaps++;
    if (nvme_try_dbbuf(cq->head, &cq->dbbuf)) {
        int64_t t0 = now_ns();
        mmio_write32(cq->doorbell, cpu_to_le32(cq->head));
        db.cq_ns += now_ns() - t0;
        db.cq_mmio++;
    } else {
        db.shadow_only++;
    }
}

/* nvme_init() without Doorbell Buffer Config: libvfn's own steps up to Set Features. */
static void init_without_dbbuf(const char *bdf)
{
    union nvme_cmd cmd = {.opcode = ADMIN_SET_FEATURES};
    struct nvme_cqe cqe;

    if (nvme_ctrl_init(&ctrl, bdf, NULL) || nvme_reset(&ctrl) || nvme_configure_adminq(&ctrl, 0) ||
        nvme_enable(&ctrl))
        die("bringing the controller up");
    cmd.features.fid = FID_NUMBER_OF_QUEUES;
    cmd.features.cdw11 = cpu_to_le32(0);  /* one SQ and one CQ (0's based) */
    if (nvme_admin(&ctrl, &cmd, NULL, 0, &cqe))
        die("Set Features Number of Queues");
    ctrl.config.nsqa = 0;
    ctrl.config.ncqa = 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
           ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv)
{
    const char *bdf = NULL, *mode = "poll", *workload = "randread";
    unsigned long nsid = 1, depth = 32, size = 4096;
    double seconds = 5, ramp = 1;
    int dbbuf = 1;
    static const struct option longopts[] = {
        {"device", required_argument, 0, 'd'}, {"nsid", required_argument, 0, 'n'},
        {"depth", required_argument, 0, 'q'}, {"size", required_argument, 0, 's'},
        {"seconds", required_argument, 0, 't'}, {"ramp", required_argument, 0, 'r'},
        {"mode", required_argument, 0, 'm'}, {"no-dbbuf", no_argument, 0, 'B'},
        {"workload", required_argument, 0, 'w'}, {0, 0, 0, 0}};
    for (int c; (c = getopt_long(argc, argv, "d:n:q:s:t:r:m:Bw:", longopts, NULL)) != -1;) {
        switch (c) {
        case 'd': bdf = optarg; break;
        case 'n': nsid = strtoul(optarg, NULL, 0); break;
        case 'q': depth = strtoul(optarg, NULL, 0); break;
        case 's': size = strtoul(optarg, NULL, 0); break;
        case 't': seconds = strtod(optarg, NULL); break;
        case 'r': ramp = strtod(optarg, NULL); break;
        case 'm': mode = optarg; break;
        case 'B': dbbuf = 0; break;
        case 'w': workload = optarg; break;
        default: return 2;
        }
    }
    int irq = strcmp(mode, "irq") == 0;
    int sequential = strcmp(workload, "read") == 0, is_write = strcmp(workload, "randwrite") == 0;
    if (!bdf || depth < 1 || (!irq && strcmp(mode, "poll") != 0) || size < 512 || size > (1 << 20) ||
        seconds <= 0 || !(sequential || is_write || strcmp(workload, "randread") == 0)) {
        fprintf(stderr, "usage: anchor --device BDF [--nsid N] [--workload randread|read|randwrite] "
                        "[--depth 1..] [--size 512..1M] [--seconds S] [--ramp S] [--mode poll|irq] "
                        "[--no-dbbuf]\n");
        return 2;
    }

    if (dbbuf) {
        if (nvme_init(&ctrl, bdf, NULL))
            die("nvme_init");
    } else {
        init_without_dbbuf(bdf);
    }
    if ((long)depth > ctrl.config.mqes) {  /* the queue holds depth + 1 entries; CAP.MQES is 0's based */
        fprintf(stderr, "anchor: depth %lu exceeds CAP.MQES %d\n", depth, ctrl.config.mqes);
        return 2;
    }

    /* Identify Namespace: its size and LBA data size */
    void *id;
    if (posix_memalign(&id, 4096, 4096))
        die("posix_memalign");
    union nvme_cmd cmd = {.opcode = ADMIN_IDENTIFY};
    cmd.nsid = cpu_to_le32((uint32_t)nsid);
    cmd.identify.cns = CNS_NAMESPACE;
    if (nvme_admin(&ctrl, &cmd, id, 4096, NULL))
        die("Identify Namespace");
    uint64_t nsze = le64_to_cpu(*(leint64_t *)((char *)id + ID_NS_NSZE));
    uint8_t flbas = ((uint8_t *)id)[ID_NS_FLBAS] & 0xf;
    uint32_t lbads = (le32_to_cpu(*(leint32_t *)((char *)id + ID_NS_LBAF + 4 * flbas)) >> 16) & 0xff;
    uint32_t lba_bytes = 1u << lbads;
    if (size % lba_bytes || nsze < size / lba_bytes) {
        fprintf(stderr, "anchor: --size %lu is not a multiple of the %u-byte LBA\n", size, lba_bytes);
        return 2;
    }
    uint32_t nlb = (uint32_t)(size / lba_bytes);
    uint64_t positions = nsze / nlb;

    int efd = -1;
    if (irq) {
        int efds[2] = {-1, -1};
        efds[1] = efd = eventfd(0, EFD_CLOEXEC);
        if (efd < 0 || vfio_set_irq(&ctrl.pci.dev, efds, 0, 2))
            die("MSI-X vector 1");
    }
    if (nvme_create_ioqpair(&ctrl, 1, (int)depth + 1, irq ? 1 : -1, 0))
        die("nvme_create_ioqpair");
    struct nvme_sq *sq = &ctrl.sq[1];
    struct nvme_cq *cq = &ctrl.cq[1];

    /* one page-aligned slot per request, mapped once; each request's PRPs are set up once */
    size_t slot = (size + 4095) & ~(size_t)4095;
    void *mem = mmap(NULL, depth * slot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    iova_t iova;
    if (mem == MAP_FAILED || iommu_map_vaddr(__iommu_ctx(&ctrl), mem, depth * slot, &iova, 0))
        die("mapping the data buffer");
    union nvme_cmd *cmds = calloc(depth, sizeof(*cmds));
    int64_t *t_submit = calloc(depth, sizeof(*t_submit));
    uint64_t *lat = malloc(MAX_SAMPLES * sizeof(*lat));
    if (!cmds || !t_submit || !lat)
        die("calloc");
    uint64_t seed = 0x9e3779b97f4a7c15ULL, nlat = 0, ios = 0, lat_sum = 0, next = 0;
#define NEXT_SLBA() cpu_to_le64((sequential ? next++ % positions : xorshift64(&seed) % positions) * nlb)

    for (unsigned long i = 0; i < depth; i++) {
        struct nvme_rq *rq = nvme_rq_acquire(sq);
        if (!rq)
            die("nvme_rq_acquire");
        cmds[rq->cid].rw.opcode = is_write ? IO_WRITE : IO_READ;
        cmds[rq->cid].rw.nsid = cpu_to_le32((uint32_t)nsid);
        cmds[rq->cid].rw.nlb = cpu_to_le16((uint16_t)(nlb - 1));
        if (nvme_rq_map_prp(&ctrl, rq, &cmds[rq->cid], iova + i * slot, size))
            die("nvme_rq_map_prp");
        nvme_rq_prep_cmd(rq, &cmds[rq->cid]);
    }

    int64_t t0 = now_ns(), start = t0, end = t0 + (int64_t)((ramp + seconds) * 1e9), measure_from = t0;
    int measuring = ramp <= 0;
    double cpu0 = cpu_seconds();
    int64_t waited = 0;
    for (unsigned long cid = 0; cid < depth; cid++) {
        cmds[cid].rw.slba = NEXT_SLBA();
        t_submit[cid] = t0;
        nvme_sq_post(sq, &cmds[cid]);
    }
    ring_sq(sq);

    int64_t now = t0;
    while (now < end) {
        unsigned int n = 0;
        struct nvme_cqe *cqe;
        now = now_ns();
        if (!measuring && now - start >= (int64_t)(ramp * 1e9)) {
            measuring = 1;
            measure_from = now;
            nlat = ios = lat_sum = 0;
            waited = 0;
            memset(&db, 0, sizeof(db));
            cpu0 = cpu_seconds();
        }
        while ((cqe = nvme_cq_get_cqe(cq))) {
            uint16_t cid = cqe->cid;
            uint64_t l = (uint64_t)(now - t_submit[cid]);
            if (le16_to_cpu(cqe->sfp) >> 1) {
                fprintf(stderr, "anchor: command failed, status %#x\n", le16_to_cpu(cqe->sfp) >> 1);
                return 1;
            }
            if (nlat < MAX_SAMPLES)
                lat[nlat++] = l;
            lat_sum += l;
            ios++;
            cmds[cid].rw.slba = NEXT_SLBA();
            t_submit[cid] = now;
            nvme_sq_post(sq, &cmds[cid]);
            n++;
        }
        if (n) {
            ring_cq(cq);
            ring_sq(sq);
        } else if (irq) {
            uint64_t v;
            int64_t before = now_ns();
            if (read(efd, &v, sizeof(v)) < 0 && errno != EINTR)
                die("reading the eventfd");
            waited += now_ns() - before;
        }
    }
    double elapsed = (double)(now_ns() - measure_from) / 1e9;
    double cpu = cpu_seconds() - cpu0;
    typeof(db) counted = db;

    /* drain: every command in flight completes before the queues go */
    for (unsigned long left = depth; left;) {
        struct nvme_cqe *cqe;
        while ((cqe = nvme_cq_get_cqe(cq)))
            left--;
        ring_cq(cq);
    }

    qsort(lat, nlat, sizeof(*lat), cmp_u64);
    double p50 = nlat ? (double)lat[nlat / 2] / 1e3 : 0, p99 = nlat ? (double)lat[nlat * 99 / 100] / 1e3 : 0;
    double iops = (double)ios / elapsed;
    printf("{\"iops\": %.1f, \"mib_per_s\": %.2f, \"lat_p50_us\": %.2f, \"lat_p99_us\": %.2f, "
           "\"lat_mean_us\": %.2f, \"ios\": %llu, \"seconds\": %.3f, \"sq_doorbell_mmio\": %lu, "
           "\"cq_doorbell_mmio\": %lu, \"shadow_only_updates\": %lu, \"ios_per_submit\": %.2f, "
           "\"ios_per_reap\": %.2f, \"cpu_us_per_io\": %.2f, \"wait_pct\": %.1f, \"doorbell_pct\": %.1f, "
           "\"sq_doorbell_us\": %.2f, \"cq_doorbell_us\": %.2f, \"dbbuf\": %s, "
           "\"mode\": \"%s\", \"workload\": \"%s\", \"queue_depth\": %lu, \"io_size\": %lu}\n",
           iops, iops * (double)size / (1 << 20), p50, p99, ios ? (double)lat_sum / (double)ios / 1e3 : 0,
           (unsigned long long)ios, elapsed, counted.sq_mmio, counted.cq_mmio, counted.shadow_only,
           counted.submits ? (double)ios / (double)counted.submits : 0,
           counted.reaps ? (double)ios / (double)counted.reaps : 0,
           ios ? cpu * 1e6 / (double)ios : 0, 100.0 * (double)waited / 1e9 / elapsed,
           100.0 * (double)(counted.sq_ns + counted.cq_ns) / 1e9 / elapsed,
           counted.sq_mmio ? (double)counted.sq_ns / (double)counted.sq_mmio / 1e3 : 0,
           counted.cq_mmio ? (double)counted.cq_ns / (double)counted.cq_mmio / 1e3 : 0,
           ctrl.dbbuf.doorbells.vaddr ? "true" : "false", mode, workload, depth, size);
    nvme_close(&ctrl);
    return 0;
}
