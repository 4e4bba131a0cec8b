#!/usr/bin/env python3
"""nvmevfio against the kernel nvme driver, in one guest boot, on one device (A/B/A).

    .venv/bin/python tools/bench.py                          # the matrix, 5 s per run, median of 3 boots
    .venv/bin/python tools/bench.py --boots 1 --seconds 3    # a quick look
    .venv/bin/python tools/bench.py --sweep --plot docs/sweep.png --json sweep.json

Round A: the kernel driver (loaded with poll_queues=1) measured with fio; round B: the
controller is bound to vfio-pci and measured with `nvmevfio perf` (polling and MSI-X, shadow
doorbells on and off); round A': back to the kernel, measured again. Ratios are
nvmevfio / mean(A, A'), each mode against its match: poll against fio io_uring --hipri
(polled queues), irq against fio io_uring (interrupts). The Python row compares a Python
loop of `dev.read_into` (QD1, 4 KiB random) with a Python loop of `os.preadv` on the O_DIRECT
kernel block device, the Python user's alternative.

`--sweep` runs randread 4 KiB at QD 1, 2, 4, ... 1024 for each driver, polled and with
interrupts, and writes a JSON of the figures and a PNG plot (matplotlib) of IOPS and p99 latency
against depth.

`--libvfn DIR` adds the C anchor (issue 26): tools/libvfn-anchor/anchor.c, a closed loop on
libvfn's C queue code (SamsungDS/libvfn, a checkout in DIR built here with meson and ninja), run
on the same vfio-bound controller in the same boot, A/B/A around nvmevfio (libvfn, nvmevfio,
libvfn): the table gains a "C driver" column and the sweep its line. With `--sweep --rounds N`
each depth runs N pairs instead, the C driver and nvmevfio back to back with the order swapped
every round, and the report is each boot's median pair ratio, then the median over `--boots`:
the drift within a boot (the C driver's own A and A' differ by up to 40 % here) then weighs on
both sides of every pair alike.

The guest boots with clocksource=tsc (see vm-notes: the HPET fallback distorts timings).
Absolute numbers under TCG mean little; the ratios are the point. Host load distorts them:
run it on an idle machine. Each boot is a fresh guest; the report is the median over boots.
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (name, fio rw, block size, queue depth)
MATRIX = [
    ("randread-4k-qd1", "randread", 4096, 1),
    ("randread-4k-qd32", "randread", 4096, 32),
    ("randwrite-4k-qd32", "randwrite", 4096, 32),
    ("read-128k-qd8", "read", 131072, 8),
]
SWEEP_DEPTHS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
SWEEP_DRIVERS = ("kernel", "nvmevfio", "libvfn")
ANCHOR_SRC = HERE / "libvfn-anchor" / "anchor.c"
PY_ROW = "python-read_into-4k-qd1"
SERVICE_ROW = "service-randread-4k-qd32"  # a client of `nvmevfio serve` against in-process perf (issue 9)
FS_ROW = "ext4-fio-randrw-4k-qd1"  # informational: kernel nvme + ext4 against nvmevfio nbd + nbd + ext4
# issue 26: randread 4 KiB QD32 on 2 queue pairs (a thread each) against 1; the polled path's bar
SCALING_ROW = "randread-4k-qd32-queues"
SCALING_BAR = 1.6
# the bars of issue 7: (row, ratio key from ratios(), what it compares, minimum ratio)
BARS = [
    ("randread-4k-qd32", "poll", "poll vs kernel io_uring --hipri", 2.2),
    ("randwrite-4k-qd32", "poll", "poll vs kernel io_uring --hipri", 2.0),
    ("randread-4k-qd1", "poll", "poll vs kernel io_uring --hipri", 1.6),
    ("read-128k-qd8", "poll_vs_irq", "poll vs kernel io_uring", 1.8),
    ("randread-4k-qd32", "irq", "irq vs kernel io_uring", 2.0),
    (PY_ROW, "python", "read_into vs os.preadv loop", 1.3),
    (SERVICE_ROW, "service", "serve client vs in-process perf poll", 0.7),  # issue 9
]


# ---------------------------------------------------------------------- inside the guest
class CommandFailed(subprocess.CalledProcessError):
    """A command that exited non-zero, said with what it printed (CalledProcessError's message has
    only the exit status)."""

    def __str__(self) -> str:
        said = (self.stderr or self.output or "").strip()
        return f"{super().__str__()}: {said}" if said else super().__str__()


def run_checked(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with its output captured as text; CommandFailed (with that output) if it fails."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if r.returncode:
        raise CommandFailed(r.returncode, cmd, r.stdout, r.stderr)
    return r


def fio(dev: str, rw: str, bs: int, qd: int, engine: str, seconds: float, hipri: bool, numjobs: int = 1) -> dict:
    """One fio run on the kernel driver's block device: IOPS and MiB/s summed over its
    ``numjobs`` jobs, the first job's latency percentiles, and CPU time per I/O (fio_cpu)."""
    args = ["fio", "--name=bench", f"--filename={dev}", "--direct=1", "--time_based", f"--runtime={seconds}",
            "--ramp_time=1", "--randrepeat=0", "--norandommap", "--output-format=json", "--lat_percentiles=1",
            f"--ioengine={engine}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--numjobs={numjobs}"]
    if hipri:
        args.append("--hipri=1")
    out = json.loads(run_checked(args).stdout)
    jobs = out["jobs"]
    sides = [job["read"] if "read" in rw else job["write"] for job in jobs]
    pct = sides[0]["lat_ns"].get("percentile", {})
    return {"iops": sum(side["iops"] for side in sides),
            "mib_per_s": sum(side["bw_bytes"] for side in sides) / (1 << 20),
            "lat_p50_us": pct.get("50.000000", 0) / 1000, "lat_p99_us": pct.get("99.000000", 0) / 1000,
            "jobs": len(jobs), **fio_cpu(jobs)}


def fio_cpu(jobs: list[dict]) -> dict[str, float]:
    """CPU time per I/O (µs) of fio's jobs: each job's usr_cpu and sys_cpu are percentages of its
    run time (job_runtime, ms, after the ramp), over its reads and writes (total_ios)."""
    usr = sum(j["usr_cpu"] / 100 * j["job_runtime"] / 1000 for j in jobs)
    sys_ = sum(j["sys_cpu"] / 100 * j["job_runtime"] / 1000 for j in jobs)
    ios = sum(j["read"]["total_ios"] + j["write"]["total_ios"] for j in jobs)
    per = 1e6 / ios if ios else 0.0
    return {"cpu_us_per_io": (usr + sys_) * per, "usr_us_per_io": usr * per, "sys_us_per_io": sys_ * per}


def python_preadv(dev: str, seconds: float, size_bytes: int) -> dict:
    """A Python loop of os.preadv on the O_DIRECT block device: 4 KiB random reads, QD1."""
    import numpy as np

    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT needs
    offsets = (np.random.default_rng(3).integers(0, size_bytes // 4096, 1 << 16) * 4096).tolist()
    try:
        n = _timed_loop(lambda off: os.preadv(fd, [buf], off), offsets, seconds)
    finally:
        os.close(fd)
    return {"iops": n / seconds}


def python_read_into(addr: str, seconds: float) -> dict:
    """A Python loop of BlockDevice.read_into: 4 KiB random reads, QD1, polled."""
    import numpy as np

    import nvmevfio

    with nvmevfio.open(addr, 1, queue_depth=2) as dev:
        buf = dev.alloc_buffer(4096)
        lbas = (np.random.default_rng(3).integers(0, dev.block_count // 8, 1 << 16) * 8).tolist()
        n = _timed_loop(lambda lba: dev.read_into(lba, 8, buf), lbas, seconds)
    return {"iops": n / seconds}


def service_randread(addr: str, seconds: float, mode: str = "poll") -> dict:
    """4 KiB random reads at QD32 by a client of `nvmevfio serve` (its queues polled, or MSI-X
    with ``mode="irq"``): `nvmevfio perf --socket`, the client's C closed loop over its shared
    rings, against the daemon's C loop; the same workload as the in-process perf row."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="nvmevfio-bench-serve-"))
    grants, sock = d / "grants.toml", str(d / "s.sock")
    grants.write_text('[[grant]]\nuid = 0\nnsid = 1\nblocks = 65536\naccess = "ro"\nqueue_depth = 32\n'
                      'dma_memory = "1M"\n')
    # the daemon and the client each on a CPU of its own, as one deploys a polling daemon (the
    # scheduler otherwise wakes the client on the daemon's CPU in some boots: 0.5-0.6 of in-process
    # perf there against ~0.8)
    cpus = sorted(os.sched_getaffinity(0))
    pin = len(cpus) >= 2
    proc = subprocess.Popen([sys.executable, "-m", "nvmevfio", "serve", addr, "--grants", str(grants), "--socket",
                             sock, "--clients", "1", "--mode", mode, *(["--cpu", str(cpus[-1])] if pin else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nvmevfio serve did not start")
            time.sleep(0.05)
        return perf(addr, "randread", 4096, 32, seconds, mode, socket=sock, cpu=cpus[0] if pin else None)
    finally:
        proc.terminate()
        proc.wait(60)


def _timed_loop(op, args: list, seconds: float) -> int:
    """Call ``op`` over ``args`` (cycling) for ``seconds`` after a one-second warm-up; the count."""
    for stop_after in (1.0, seconds):
        n = 0
        end = time.perf_counter() + stop_after
        while True:
            for a in args[:256]:
                op(a)
            n += 256
            args = args[256:] + args[:256]
            if time.perf_counter() >= end:
                break
    return n


def kernel_round(dev: str, seconds: float, size_bytes: int) -> dict:
    res: dict = {}
    for name, rw, bs, qd in MATRIX:
        res[name] = {
            "io_uring_irq": fio(dev, rw, bs, qd, "io_uring", seconds, False),
            "io_uring_poll": fio(dev, rw, bs, qd, "io_uring", seconds, True),
        }
        if qd == 1:
            res[name]["psync"] = fio(dev, rw, bs, 1, "psync", seconds, False)
    res[PY_ROW] = {"python": python_preadv(dev, seconds, size_bytes)}
    res[SCALING_ROW] = scaling_round(None, dev, seconds)
    return res


def perf(addr: str, rw: str, bs: int, qd: int, seconds: float, mode: str, shadow: bool | None = None,
         socket: str | None = None, cpu: int | str | None = None, queues: int = 1,
         extra: tuple[str, ...] = ()) -> dict:
    """`nvmevfio perf` on the controller, or with ``socket`` through `nvmevfio serve` (whose
    daemon decides the completion mode); ``cpu`` pins it (a list pins each queue's thread);
    ``queues``: that many queue pairs at once, a thread each; ``extra``: more perf options."""
    target = ["--socket", socket] if socket else [addr, "--mode", mode]
    if cpu is not None:
        target += ["--cpu", str(cpu)]
    args = [sys.executable, "-m", "nvmevfio", "perf", *target, "-w", rw, "-q", str(qd), "-s", str(bs), "-t",
            str(seconds), "--ramp", "1", "-o", "json", "--queues", str(queues)]
    if shadow is not None:  # None: perf's default (shadow doorbells where they pay: not on QEMU's model)
        args.append("--shadow-doorbells" if shadow else "--no-shadow-doorbells")
    args += extra
    d = json.loads(run_checked(args).stdout)
    return {k: d[k] for k in ("iops", "ios", "mib_per_s", "lat_p50_us", "lat_p99_us", "sq_doorbell_mmio",
                              "cq_doorbell_mmio", "shadow_only_updates", "wait_pct", "doorbell_pct",
                              "sq_doorbell_us", "cq_doorbell_us", "ios_per_submit",
                              "ios_per_reap", "cpu_us_per_io", "usr_us_per_io", "sys_us_per_io", "wait_share",
                              "per_queue", "iodepth_batch_complete_max")}


def scaling_round(addr: str | None, dev: str | None, seconds: float) -> dict:
    """The queue-scaling row, randread 4 KiB QD32 per queue: nvmevfio `perf --queues 1` and `2`
    (each queue's thread on its own vCPU), or the kernel's fio with numjobs 1 and 2; polled and
    with interrupts. The kernel driver is loaded with poll_queues=1: its two polled jobs share
    one polled queue, its interrupt-driven ones get a queue per CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    out: dict = {}
    for n in (1, 2):
        for mode in ("poll", "irq"):
            if addr is not None:
                out[f"{mode}_{n}"] = perf(addr, "randread", 4096, 32, seconds, mode, queues=n,
                                          cpu=",".join(map(str, cpus[:n])))
            else:
                assert dev is not None
                out[f"{mode}_{n}"] = fio(dev, "randread", 4096, 32, "io_uring", seconds, mode == "poll", numjobs=n)
    return out


def nvmevfio_round(addr: str, seconds: float) -> dict:
    res: dict = {}
    for name, rw, bs, qd in MATRIX:
        res[name] = {"poll": perf(addr, rw, bs, qd, seconds, "poll"), "irq": perf(addr, rw, bs, qd, seconds, "irq"),
                     # the other doorbell choice than perf's default (which is off on QEMU's model)
                     "poll_shadow": perf(addr, rw, bs, qd, seconds, "poll", shadow=True)}
    res[PY_ROW] = {"python": python_read_into(addr, seconds)}
    res[SCALING_ROW] = scaling_round(addr, None, seconds)
    # the service against in-process perf run right before and after it (A/B/A inside the row):
    # the row's ratio does not drift with whatever the boot did minutes earlier
    before = perf(addr, "randread", 4096, 32, seconds, "poll")
    served = service_randread(addr, seconds)
    after = perf(addr, "randread", 4096, 32, seconds, "poll")
    res[SERVICE_ROW] = {"service": served, "perf": {"iops": statistics.mean((before["iops"], after["iops"])),
                                                    "before": before, "after": after}}
    return res


FS_JOB = ["--size=32M", "--rw=randrw", "--bs=4k", "--ioengine=psync", "--direct=1", "--verify=crc32c",
          "--do_verify=1", "--verify_fatal=1"]
MNT = "/tmp/bench-fs"


def fio_fs(dev: str) -> dict:
    """The informational filesystem row: ext4 on ``dev``, fio randrw 4 KiB (QD1, psync, O_DIRECT,
    verify=crc32c) on a file in it; the same job as tests/vm/test_nbd.py."""
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev], check=True)
    os.makedirs(MNT, exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", dev, MNT], check=True)
    try:
        out = run_checked(["fio", "--name=fs", f"--directory={MNT}", *FS_JOB, "--output-format=json"]).stdout
    finally:
        subprocess.run(["umount", MNT], check=True)
    job = json.loads(out)["jobs"][0]
    return {"read_iops": job["read"]["iops"], "write_iops": job["write"]["iops"], "errors": job["error"]}


def nbd_fio_fs(addr: str) -> dict:
    """fio_fs through `nvmevfio nbd` (nbdkit + the plugin) and the kernel's nbd driver."""
    info = json.loads(run_checked([sys.executable, "-m", "nvmevfio", "nbd", addr, "--background", "-o", "json"]).stdout)
    try:
        run_checked(["nbd-client", "-unix", info["socket"], "/dev/nbd0", "-b", "512"])
        try:
            return fio_fs("/dev/nbd0")
        finally:
            run_checked(["nbd-client", "-d", "/dev/nbd0"])
    finally:
        run_checked([sys.executable, "-m", "nvmevfio", "nbd", addr, "--stop"])


# ---------------------------------------------------------------------- ublk (--only ublk, issue 28)
# (row, what it compares, minimum ratio): /dev/ublkbN served by `nvmevfio ublk` against the kernel
# driver's /dev/nvmeXnY, the same fio job (io_uring, direct=1, interrupts: ublk has no polled I/O)
UBLK_BARS = {"randread-4k-qd1": 0.8, "randread-4k-qd32": 1.0, "randwrite-4k-qd32": 1.0, "read-128k-qd8": 1.0,
             FS_ROW: 0.9}


def block_round(dev: str, seconds: float, fs: bool = True) -> dict:
    """The matrix's jobs through fio io_uring (interrupts) on a block device, and ext4 on it."""
    res: dict = {name: fio(dev, rw, bs, qd, "io_uring", seconds, False) for name, rw, bs, qd in MATRIX}
    if fs:
        got = fio_fs(dev)
        res[FS_ROW] = {"iops": got["read_iops"] + got["write_iops"], **got}
    return res


def ublk_round(addr: str, seconds: float, null: bool = False, extra: tuple[str, ...] = ()) -> dict:
    """block_round on the ublk device `nvmevfio ublk` serves (its default shape: on this guest's
    2 CPUs one queue, polled, on the last CPU). ``null``: the anchor, the same C server answering
    every request at once without an NVMe command (NVMEVFIO_UBLK_NULL, read by cbits/ublk.c):
    ublk's own cost in this guest. Its reads return no data, so no ext4 row. ``extra``: the
    server's options besides its defaults."""
    nv = [sys.executable, "-m", "nvmevfio", "ublk"]
    env = {**os.environ, **({"NVMEVFIO_UBLK_NULL": "1"} if null else {})}
    info = json.loads(run_checked([*nv, addr, *extra, "--background", "-o", "json"], env=env).stdout)
    try:
        dev = info["device"]
        wait_for_block_device(dev)
        res = block_round(dev, seconds, fs=not null)
        res["server"] = {k: info[k] for k in ("queues", "depth", "mode", "io_bytes", "cpus")}
        return res
    finally:
        try:
            run_checked([*nv, "--stop", str(info["dev_id"])])
        except CommandFailed as e:  # and what the server itself logged
            log = Path(info["log"]).read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"{e}; the server's log ({info['log']}) ends: " + " | ".join(log)) from e


def wait_for_block_device(dev: str, timeout: float = 30.0) -> None:
    """Until ``dev`` exists with a non-zero size (a ublk device is usable once START_DEV is done)."""
    deadline = time.monotonic() + timeout
    while not (Path(dev).exists() and int(Path(f"/sys/block/{Path(dev).name}/size").read_text()) > 0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dev} did not appear")
        time.sleep(0.05)


def ublk_default_shape(addr: str) -> dict:
    """The queues, depth and request size `nvmevfio ublk` takes by default on this machine: its
    server started and stopped (the C ublk server's first round runs before nvmevfio's)."""
    nv = [sys.executable, "-m", "nvmevfio", "ublk"]
    info = json.loads(run_checked([*nv, addr, "--background", "-o", "json"]).stdout)
    run_checked([*nv, "--stop", str(info["dev_id"])])
    return {k: info[k] for k in ("queues", "depth", "io_bytes")}


# ublksrv's device number for the C ublk server (nvmevfio's own server takes the lowest free one)
UBLKSRV_DEV_ID = 7


def ublksrv_round(ublk: str, addr: str, seconds: float, shape: dict) -> dict:
    """block_round on a device served by ublksrv's nvme_vfio target (``ublk`` is ublksrv's `ublk`
    program, ublk-org/ublksrv, with `ublk.nvme_vfio` beside it): a C ublk server that drives the
    controller through VFIO itself, polling its completion queue while requests are in flight.
    The C anchor for ublk, with nvmevfio's shape (``shape``: queues, depth, io_bytes of the
    default server measured in the same round); on a guest without an IOMMU, its --noiommu."""
    noiommu = not any(Path("/sys/class/iommu").glob("*"))
    dev_id = str(UBLKSRV_DEV_ID)
    run_checked([ublk, "add", "-t", "nvme_vfio", "-n", dev_id, "-q", str(shape["queues"]), "-d", str(shape["depth"]),
                 "--max_io_buf_bytes", str(shape["io_bytes"]), "--pci", addr, *(["--noiommu"] if noiommu else [])])
    try:
        dev = f"/dev/ublkb{dev_id}"
        wait_for_block_device(dev)
        res = block_round(dev, seconds)
        res["server"] = {"queues": shape["queues"], "depth": shape["depth"], "io_bytes": shape["io_bytes"],
                         "noiommu": noiommu}
        return res
    finally:
        run_checked([ublk, "del", "-n", dev_id])


def ublk_report(a1: dict, b: dict, a2: dict, null: dict | None = None, c_ublk: dict | None = None) -> str:
    """IOPS per row, kernel A / ublk / kernel A', the ratio against mean(A, A') and its bar; with
    the anchors of the same boot: the null server (its IOPS, its ratio to the kernel and ublk's to
    it) and the C ublk server (``c_ublk``: ublksrv's nvme_vfio target before and after nvmevfio's
    server; the mean of the two, its ratio to the kernel and ublk's to it)."""
    pinned = sorted({c for c in b["server"].get("cpus") or [] if c is not None})
    lines = [f"ublk ({b['server']['queues']} queue(s), depth {b['server']['depth']}, {b['server']['mode']}"
             f"{', every queue on CPU ' + ','.join(map(str, pinned)) if pinned else ''}) against "
             "the kernel nvme driver, fio io_uring direct=1, one boot (A/B/A); IOPS; null: the same server "
             "answering without the device (the anchor)"
             + ("; C ublk: ublksrv's nvme_vfio target, the same shape, before and after (mean)" if c_ublk else ""),
             f"{'workload':<24} {'kernel A':>9} {'ublk':>9} {'kernel A2':>9} {'ratio':>6}  {'bar':<11} "
             f"{'null':>9} {'null/k':>6} {'ublk/null':>9}" + (f" {'C ublk':>9} {'C/k':>5} {'ublk/C':>6}"
                                                                if c_ublk else "")]
    ratio = ublk_ratios(a1, b, a2)
    anchor = ublk_c_ratios(a1, b, a2, c_ublk) if c_ublk else {}
    for row, bar in UBLK_BARS.items():
        got = ratio[row]
        k = statistics.mean((a1[row]["iops"], a2[row]["iops"]))
        line = (f"{row:<24} {a1[row]['iops']:>9.0f} {b[row]['iops']:>9.0f} {a2[row]['iops']:>9.0f} "
                f"{got:>6.2f}  {bar:.1f} {'met' if got >= bar else 'NOT MET':<7}")
        if null and row in null:
            n = null[row]["iops"]
            line += f" {n:>9.0f} {n / k:>6.2f} {b[row]['iops'] / n:>9.2f}"
        elif c_ublk:
            line += f" {'':>9} {'':>6} {'':>9}"
        if c_ublk:
            line += (f" {anchor[f'{row} C/kernel'] * k:>9.0f} {anchor[f'{row} C/kernel']:>5.2f} "
                     f"{anchor[f'{row} ublk/C']:>6.2f}")
        lines.append(line)
    lines.append(f"({FS_ROW}: read + write IOPS of fio verify=crc32c on a file in ext4 on each device; the null "
                 "server has none: its reads return no data)")
    return "\n".join(lines)


def ublk_ratios(a1: dict, b: dict, a2: dict) -> dict[str, float]:
    """Per UBLK_BARS row: ublk IOPS / mean(kernel A, kernel A')."""
    return {row: b[row]["iops"] / statistics.mean((a1[row]["iops"], a2[row]["iops"])) for row in UBLK_BARS}


def ublk_anchor_ratios(a1: dict, b: dict, a2: dict, null: dict) -> dict[str, float]:
    """Per row the null server has: its IOPS / mean(kernel A, A') and ublk's / its."""
    out = {}
    for row in UBLK_BARS:
        if row in null:
            out[f"{row} null/kernel"] = null[row]["iops"] / statistics.mean((a1[row]["iops"], a2[row]["iops"]))
            out[f"{row} ublk/null"] = b[row]["iops"] / null[row]["iops"]
    return out


def ublk_c_ratios(a1: dict, b: dict, a2: dict, c_ublk: dict) -> dict[str, float]:
    """Per UBLK_BARS row, the C ublk server (mean of its runs before and after nvmevfio's): its
    IOPS / mean(kernel A, A') and nvmevfio's ublk IOPS / its."""
    out = {}
    for row in UBLK_BARS:
        c = statistics.mean((c_ublk["before"][row]["iops"], c_ublk["after"][row]["iops"]))
        out[f"{row} C/kernel"] = c / statistics.mean((a1[row]["iops"], a2[row]["iops"]))
        out[f"{row} ublk/C"] = b[row]["iops"] / c
    return out


def median_report(what: str, per_boot: list[dict[str, float]], bars: dict[str, float | None]) -> str:
    """The median over boots of each row's ratio (what a bar is judged on), with every boot's;
    a row whose bar is None (an anchor's ratios) has no verdict."""
    lines = [f"{what}: median of {len(per_boot)} boots (each boot's ratio in brackets)"]
    width = max(28, *(len(row) for row in bars))
    for row, bar in bars.items():
        got = statistics.median(r[row] for r in per_boot)
        each = ", ".join(f"{r[row]:.2f}" for r in per_boot)
        verdict = "" if bar is None else f"  bar {bar:.1f} {'met' if got >= bar else 'NOT MET'}"
        lines.append(f"{row:<{width}} {got:>6.2f}  [{each}]{verdict}")
    return "\n".join(lines)


# Controller features (issue 24): the same perf rows with PRPs, with SGLs, and with the SQ in the
# Controller Memory Buffer, in the order PRP, SGL, CMB, PRP in one boot (A/B/C/A)
FEATURE_ROWS = [("randread-4k-qd32", "randread", 4096, 32), ("read-128k-qd8", "read", 131072, 8),
                ("randwrite-4k-qd32", "randwrite", 4096, 32)]
FEATURES = {"sgl": ("--sgl",), "cmb": ("--sq-in-cmb",)}


def features_round(addr: str, seconds: float) -> list[dict]:
    """PRP, then each of FEATURES, then PRP again: every FEATURE_ROWS row, polled."""
    def one(extra: tuple[str, ...]) -> dict:
        return {name: perf(addr, rw, bs, qd, seconds, "poll", extra=extra) for name, rw, bs, qd in FEATURE_ROWS}

    return [one(()), *(one(extra) for extra in FEATURES.values()), one(())]


def feature_ratios(rounds: list[dict]) -> dict[str, float]:
    """Per row and feature: its IOPS / mean(PRP before, PRP after)."""
    first, *middle, last = rounds
    return {f"{name} {feature}": got[name]["iops"] / statistics.mean((first[name]["iops"], last[name]["iops"]))
            for name, *_ in FEATURE_ROWS for feature, got in zip(FEATURES, middle)}


def shadow_report(rounds: list[dict]) -> str:
    """Shadow doorbells on / off / on: IOPS, and MMIO doorbell writes per command, per driver."""
    on1, off, on2 = rounds
    lines = ["shadow doorbells (Doorbell Buffer Config) on, off, on again; polled; IOPS and MMIO doorbell "
             "writes (SQ + CQ) per command", f"{'row':<20} {'driver':<9} {'on':>8} {'off':>8} {'on again':>8} "
             f"{'off/on':>7} {'MMIO/IO on':>10} {'MMIO/IO off':>11}"]
    for name, *_ in SHADOW_ROWS:
        for driver in ("nvmevfio", "libvfn"):
            if driver not in off[name]:
                continue
            a, b, c = on1[name][driver], off[name][driver], on2[name][driver]

            def per_io(r: dict) -> float:
                return (r["sq_doorbell_mmio"] + r["cq_doorbell_mmio"]) / r["ios"] if r["ios"] else 0.0

            ratio = b["iops"] / statistics.mean((a["iops"], c["iops"]))
            lines.append(f"{name:<20} {driver:<9} {a['iops']:>8.0f} {b['iops']:>8.0f} {c['iops']:>8.0f} "
                         f"{ratio:>7.2f} {per_io(a):>10.2f} {per_io(b):>11.2f}")
    return "\n".join(lines)


# NVMe/TCP (issue 23): fio on the initiator over loopback, nvmet exporting the kernel nvme driver's
# /dev/nvme0n1 (A, A') against nvmet exporting nvmevfio's ublk device (`nvmevfio export`, B)
TCP_ROWS = [("randread-4k-qd32", "randread", 4096, 32), ("read-128k-qd8", "read", 131072, 8)]
TCP_BAR = 0.9
TCP_HOST = "nqn.2014-08.org.nvmexpress:uuid:6e766d65-7666-696f-0000-0000000000b1"
TCP_AT = "127.0.0.1:4420"


def tcp_ratios(a1: dict, b: dict, a2: dict) -> dict[str, float]:
    """Per TCP_ROWS row and server mode: the export's IOPS / mean(nvmet over the kernel, A and A')."""
    return {f"{name} ({mode})": b[mode][name]["iops"] / statistics.mean((a1[name]["iops"], a2[name]["iops"]))
            for name, *_ in TCP_ROWS for mode in ("poll", "irq")}


def tcp_fio(nqn: str, seconds: float) -> dict:
    """Attach ``nqn`` with the kernel's NVMe/TCP initiator, fio each TCP_ROWS row (io_uring,
    interrupts: nvme-tcp has no polled queues here), detach."""
    host, port = TCP_AT.split(":")
    run_checked(["nvme", "connect", "-t", "tcp", "-a", host, "-s", port, "-n", nqn, "--hostnqn", TCP_HOST])
    try:
        deadline = time.monotonic() + 30
        dev = None
        while dev is None:
            for c in Path("/sys/class/nvme").glob("nvme*"):
                if (c / "subsysnqn").read_text().strip() == nqn:
                    dev = next((f"/dev/{n.name}" for n in c.glob(f"{c.name}n*") if Path(f"/dev/{n.name}").exists()),
                               None)
            if dev is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no namespace appeared for {nqn}")
                time.sleep(0.1)
        return {name: fio(dev, rw, bs, qd, "io_uring", seconds, False) for name, rw, bs, qd in TCP_ROWS}
    finally:
        run_checked(["nvme", "disconnect", "-n", nqn])


def kernel_tcp(dev: str, seconds: float) -> dict:
    """nvmet exporting the kernel driver's block device, configured as `nvmevfio export` would."""
    from nvmevfio import export as ex

    fs = ex.require_nvmet()
    spec = ex.ExportSpec(nqn="nqn.2014-08.org.nvmexpress:bench-kernel", device=dev, tcp=ex.parse_tcp(TCP_AT),
                         hosts=(TCP_HOST,))
    ops = ex.plan_export(spec, ex.survey(fs))
    ex.apply(fs, ops)
    try:
        return tcp_fio(spec.nqn, seconds)
    finally:
        ex.run_teardown(fs, ex.plan_teardown(ops, ex.survey(fs)))


def nvmevfio_tcp(addr: str, seconds: float, mode: str) -> dict:
    """`nvmevfio export`, its ublk server in ``mode`` (poll or irq)."""
    nv = [sys.executable, "-m", "nvmevfio", "export", addr]
    info = json.loads(run_checked([*nv, "--tcp", TCP_AT, "--allow-host", TCP_HOST, "--mode", mode, "-o",
                                   "json"]).stdout)
    try:
        return tcp_fio(info["nqn"], seconds)
    finally:
        run_checked([*nv, "--stop"])


# ---------------------------------------------------------------------- the C anchor (--libvfn, issue 26)
def libvfn_build_commands(src: Path, build: Path, meson: str, configured: bool) -> list[list[str]]:
    """The commands that build libvfn from the checkout ``src`` into ``build`` and install its
    headers and static library under ``build``/prefix (no libnvme, no docs: only the library is
    needed); ``configured``: ``build`` has been set up before (then ninja alone)."""
    setup = [meson, "setup", str(build), str(src), f"--prefix={build / 'prefix'}", "--libdir=lib",
             "--buildtype=release", "--default-library=static", "-Dlibnvme=disabled", "-Ddocs=disabled",
             "-Dwerror=false"]
    return ([] if configured else [setup]) + [["ninja", "-C", str(build), "install"]]


def anchor_compile_command(prefix: Path, out: Path, cc: str = "cc") -> list[str]:
    """Compile tools/libvfn-anchor/anchor.c against libvfn installed under ``prefix``."""
    return [cc, "-O2", "-std=gnu11", "-Wall", "-o", str(out), str(ANCHOR_SRC), f"-I{prefix / 'include'}",
            str(prefix / "lib" / "libvfn.a"), "-lpthread"]


def anchor_command(binary: str, addr: str, rw: str, bs: int, qd: int, seconds: float, mode: str,
                   dbbuf: bool = True, ramp: float = 1.0) -> list[str]:
    """One run of the C anchor: ``rw`` (randread, read, randwrite) of ``bs`` bytes at depth ``qd``."""
    return [binary, "--device", addr, "--workload", rw, "--size", str(bs), "--depth", str(qd), "--seconds",
            f"{seconds:g}", "--ramp", f"{ramp:g}", "--mode", mode, *([] if dbbuf else ["--no-dbbuf"])]


ANCHOR_KEYS = ("iops", "ios", "mib_per_s", "lat_p50_us", "lat_p99_us", "sq_doorbell_mmio", "cq_doorbell_mmio",
               "shadow_only_updates", "ios_per_submit", "ios_per_reap", "cpu_us_per_io", "wait_pct", "doorbell_pct",
               "sq_doorbell_us", "cq_doorbell_us", "dbbuf")


def parse_anchor(stdout: str) -> dict:
    """The anchor's result: the JSON object on its last output line, keyed as perf's JSON."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("the libvfn anchor printed nothing")
    got = json.loads(lines[-1])
    missing = [k for k in ANCHOR_KEYS if k not in got]
    if missing:
        raise RuntimeError(f"the libvfn anchor's result lacks {', '.join(missing)}")
    return {k: got[k] for k in ANCHOR_KEYS}


def build_anchor(src: Path) -> Path:
    """Build libvfn in ``src``/build-nvmevfio (meson from PATH or next to this Python) and the
    anchor against it; the binary's path (under the host's root, which the guest mounts)."""
    import shutil

    if not (src / "meson.build").is_file() or not (src / "include" / "vfn" / "nvme.h").is_file():
        raise SystemExit(f"--libvfn {src}: not a libvfn checkout (no meson.build, include/vfn/nvme.h)")
    meson = shutil.which("meson") or shutil.which("meson", path=str(Path(sys.executable).parent))
    if meson is None or shutil.which("ninja") is None:
        raise SystemExit("--libvfn needs meson and ninja: apt-get install ninja-build; pip install meson "
                         "(e.g. python3 -m venv ~/meson-venv && ~/meson-venv/bin/pip install meson, then put "
                         "its bin on PATH)")
    build = src.resolve() / "build-nvmevfio"
    for cmd in libvfn_build_commands(src.resolve(), build, meson, (build / "build.ninja").exists()):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    out = build / "anchor"
    subprocess.run(anchor_compile_command(build / "prefix", out), check=True)
    return out


# The C anchor's doorbells in the matrix and the sweep: MMIO only, the faster choice on QEMU's model
# and nvmevfio's default there (libvfn itself would use shadow doorbells wherever offered:
# --libvfn-dbbuf; --only shadow measures both)
ANCHOR_DBBUF = {"on": False}


def anchor(binary: str, addr: str, rw: str, bs: int, qd: int, seconds: float, mode: str,
           dbbuf: bool | None = None) -> dict:
    """One run of the C anchor on the vfio-bound controller at ``addr``."""
    cmd = anchor_command(binary, addr, rw, bs, qd, seconds, mode, ANCHOR_DBBUF["on"] if dbbuf is None else dbbuf)
    return parse_anchor(run_checked(cmd).stdout)


def libvfn_round(binary: str, addr: str, seconds: float) -> dict:
    """The matrix's rows on the C anchor, polled and with interrupts."""
    return {name: {mode: anchor(binary, addr, rw, bs, qd, seconds, mode) for mode in ("poll", "irq")}
            for name, rw, bs, qd in MATRIX}


def paired_rounds(c_run, nv_run, rounds: int) -> dict:
    """``rounds`` pairs of runs, the C anchor and nvmevfio back to back, the order swapped every
    round (C first, then nvmevfio first) so that a drift within the boot favours neither: each
    driver's median IOPS and p99 over its runs (the runs kept), and each pair's nvmevfio / C."""
    runs: dict[str, list[dict]] = {"libvfn": [], "nvmevfio": []}
    for r in range(rounds):
        order = (("libvfn", c_run), ("nvmevfio", nv_run)) if r % 2 == 0 else (("nvmevfio", nv_run), ("libvfn", c_run))
        for name, run in order:
            runs[name].append(run())
    out: dict = {name: {"iops": statistics.median(x["iops"] for x in got),
                        "lat_p99_us": statistics.median(x["lat_p99_us"] for x in got), "runs": got}
                 for name, got in runs.items()}
    out["ratios"] = [n["iops"] / c["iops"] for n, c in zip(runs["nvmevfio"], runs["libvfn"])]
    return out


def sweep_round(addr: str, dev_of, seconds: float, depths: list[int], modes: tuple[str, ...],
                drivers: tuple[str, ...], binary: str | None = None, rounds: int = 1) -> dict:
    """randread 4 KiB at every depth, per driver and mode (keys ``kernel``, ``nvmevfio``,
    ``libvfn`` polled, ``..._irq`` with interrupts): the kernel (io_uring, --hipri when polled),
    then on vfio: the C anchor, nvmevfio, the C anchor again (its entry the mean of the two, each
    kept under ``runs``). ``rounds`` > 1 with both: at each depth that many pairs back to back
    instead (:func:`paired_rounds`; ``paired``/``paired_irq``: each pair's nvmevfio / C)."""
    from nvmevfio import pci

    out: dict = {}

    def key(driver: str, mode: str) -> str:
        return driver if mode == "poll" else f"{driver}_irq"

    if "kernel" in drivers:
        dev = dev_of()
        for mode in modes:
            out[key("kernel", mode)] = {qd: fio(dev, "randread", 4096, qd, "io_uring", seconds, mode == "poll")
                                        for qd in depths}
    pci.bind(addr)

    def c_driver() -> dict:
        assert binary is not None
        return {mode: {qd: anchor(binary, addr, "randread", 4096, qd, seconds, mode) for qd in depths}
                for mode in modes}

    if rounds > 1 and binary and {"libvfn", "nvmevfio"} <= set(drivers):
        for mode in modes:
            for qd in depths:
                got = paired_rounds(functools.partial(anchor, binary, addr, "randread", 4096, qd, seconds, mode),
                                    functools.partial(perf, addr, "randread", 4096, qd, seconds, mode), rounds)
                for driver in ("libvfn", "nvmevfio"):
                    out.setdefault(key(driver, mode), {})[qd] = got[driver]
                out.setdefault(key("paired", mode), {})[qd] = got["ratios"]
        pci.unbind(addr)
        return out
    c1 = c_driver() if binary and "libvfn" in drivers else None
    if "nvmevfio" in drivers:
        for mode in modes:
            out[key("nvmevfio", mode)] = {qd: perf(addr, "randread", 4096, qd, seconds, mode) for qd in depths}
    if c1 is not None:
        c2 = c_driver()
        for mode in modes:
            out[key("libvfn", mode)] = {qd: {"iops": statistics.mean((c1[mode][qd]["iops"], c2[mode][qd]["iops"])),
                                             "lat_p99_us": statistics.mean((c1[mode][qd]["lat_p99_us"],
                                                                            c2[mode][qd]["lat_p99_us"])),
                                             "runs": [c1[mode][qd], c2[mode][qd]]} for qd in depths}
    pci.unbind(addr)
    return out


# ------------------------------------------------------------ several controllers (--only controllers, issue 25)
CONTROLLERS_BAR = 1.7  # two controllers in one `perf`, polled: the sum against one controller alone


def _fio_two(devs: list[str], seconds: float, hipri: bool) -> dict:
    """fio with one job on each of ``devs`` at once (randread 4 KiB QD32): IOPS summed."""
    args = ["fio", "--direct=1", "--time_based", f"--runtime={seconds}", "--ramp_time=1", "--randrepeat=0",
            "--norandommap", "--output-format=json", "--ioengine=io_uring", "--rw=randread", "--bs=4096",
            "--iodepth=32", *(["--hipri=1"] if hipri else [])]
    for i, dev in enumerate(devs):
        args += [f"--name=job{i}", f"--filename={dev}"]
    jobs = json.loads(run_checked(args).stdout)["jobs"]
    return {"iops": sum(j["read"]["iops"] for j in jobs), "per_job": [j["read"]["iops"] for j in jobs]}


def _perf_many(addrs: list[str], seconds: float, mode: str, cpus: str | None = None,
               poller: str | None = None) -> dict:
    """`nvmevfio perf A B` (randread 4 KiB QD32, one queue each): perf's defaults (in the guest's two
    vCPUs, the shared poller on vCPU 0: two spinning threads would take both), or ``poller`` "threads"
    (`--thread-per-queue`: controller i's thread on the i-th of ``cpus``, "0,0" putting both on
    vCPU 0 and leaving the other host core to QEMU's main loop) or "shared" (`--shared-poller`, on
    the first of ``cpus``)."""
    flag = {"threads": ["--thread-per-queue"], "shared": ["--shared-poller"], None: []}[poller]
    args = [sys.executable, "-m", "nvmevfio", "perf", *addrs, "--mode", mode, "-w", "randread", "-q", "32", "-t",
            str(seconds), "--ramp", "1", "-o", "json", *(["--cpu", cpus] if cpus else []), *flag]
    d = json.loads(run_checked(args).stdout)
    return {"iops": d["total"]["iops"], "per_controller": [c["iops"] for c in d["controllers"]],
            "cpu_us_per_io": [c["cpu_us_per_io"] for c in d["controllers"]], "poller": d["poller"]}


def kernel_block_device(addr: str) -> str:
    """The kernel driver's block device of namespace 1 of ``addr`` (waited for, up to 10 s)."""
    from nvmevfio import pci

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = [ns.name for ns in pci.get_function(addr).namespaces if ns.nsid == 1]
        if names and Path("/dev/" + names[0]).exists():
            return "/dev/" + names[0]
        time.sleep(0.05)
    raise RuntimeError(f"no kernel block device for {addr}")


def controllers_in_guest(seconds: float, out_path: Path) -> int:
    """In the guest: the kernel driver on one controller, then on both (fio, a job each), then
    nvmevfio: one controller alone, both in one `perf`, one alone again (A/B/A); polled and with
    interrupts. Each phase's name goes to a file the host reads to label its QEMU thread samples."""
    from nvmevfio import pci

    addrs = [f.address for f in pci.list_functions()][:2]
    phase = out_path.parent / "phase"

    def mark(name: str) -> None:
        phase.write_text(name)

    res: dict = {"addresses": addrs}
    for mode in ("poll", "irq"):
        mark(f"kernel {mode} one")
        res[f"kernel_{mode}_one"] = fio(kernel_block_device(addrs[0]), "randread", 4096, 32, "io_uring", seconds,
                                        mode == "poll")
        mark(f"kernel {mode} both")
        res[f"kernel_{mode}_both"] = _fio_two([kernel_block_device(a) for a in addrs], seconds, mode == "poll")
    for a in addrs:
        pci.bind(a)
    for mode in ("poll", "irq"):
        mark(f"nvmevfio {mode} one")
        res[f"nvmevfio_{mode}_one"] = perf(addrs[0], "randread", 4096, 32, seconds, mode, cpu=0)
        mark(f"nvmevfio {mode} both")
        res[f"nvmevfio_{mode}_both"] = _perf_many(addrs, seconds, mode)  # perf's defaults
        mark(f"nvmevfio {mode} both, threads")
        res[f"nvmevfio_{mode}_both_threads"] = _perf_many(addrs, seconds, mode, cpus="0,1", poller="threads")
        mark(f"nvmevfio {mode} both 1 vCPU")
        res[f"nvmevfio_{mode}_both_one_cpu"] = _perf_many(addrs, seconds, mode, cpus="0,0", poller="threads")
        if mode == "poll":
            mark("nvmevfio poll both, one poller")
            res["nvmevfio_poll_both_shared"] = _perf_many(addrs, seconds, mode, cpus="0", poller="shared")
        mark(f"nvmevfio {mode} both again")  # perf's defaults once more: the first run of both has run low
        res[f"nvmevfio_{mode}_both_again"] = _perf_many(addrs, seconds, mode)
        mark(f"nvmevfio {mode} one again")
        res[f"nvmevfio_{mode}_one_again"] = perf(addrs[0], "randread", 4096, 32, seconds, mode, cpu=0)
    mark("done")
    out_path.write_text(json.dumps({"only": res}, indent=2))
    return 0


def _qemu_threads(io_dir: Path) -> dict[str, int]:
    """CPU ticks (utime + stime) of each thread of the QEMU running with ``io_dir`` (debug-threads
    names them: CPU 0/TCG, ..., the main loop as qemu-system-x86)."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and str(io_dir).encode() in cmd:
            out: dict[str, int] = {}
            for task in (proc / "task").iterdir():
                try:
                    stat = (task / "stat").read_text()
                except OSError:
                    continue
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                out[name] = out.get(name, 0) + int(fields[11]) + int(fields[12])
            return out
    return {}


def controllers_main(args: argparse.Namespace) -> int:
    """--only controllers: one boot with two controllers; the A/B/A figures, the ratios against the
    bar and the kernel's, and the QEMU threads' CPU share in each phase (sampled every second)."""
    import tempfile
    import threading

    import guest

    io_dir = Path(tempfile.mkdtemp(prefix="nvmevfio-bench-ctrls-"))
    ctrls = [guest.Controller([guest.Namespace(guest.parse_size(args.size), 512)], {"serial": f"nvmevfio-bench{i}"})
             for i in range(2)]
    out = io_dir / "results.json"
    samples: dict[str, list[dict[str, float]]] = {}
    stop = threading.Event()
    hz = os.sysconf("SC_CLK_TCK")

    def sample() -> None:
        before = _qemu_threads(io_dir)
        while not stop.wait(1.0):
            now = _qemu_threads(io_dir)
            label = (io_dir / "phase").read_text() if (io_dir / "phase").exists() else ""
            if label and label != "done" and before:
                samples.setdefault(label, []).append({k: 100.0 * (v - before.get(k, 0)) / hz for k, v in now.items()})
            before = now

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--seconds", str(args.seconds), "--in-guest", str(out),
           "--only", "controllers"]
    passed = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
    try:
        res = guest.run(cmd, controllers=ctrls, kernel_driver=True, io_dir=io_dir, nvme_params="poll_queues=1",
                        timeout=3600, echo=False, **guest.lane_options(args.lane, passed))
    finally:
        stop.set()
        t.join()
    if res.returncode != 0 or not out.exists():
        raise SystemExit(f"benchmark guest failed (exit {res.returncode}):\n{res.output[-4000:]}")
    r = json.loads(out.read_text())["only"]
    print(f"two controllers in one process, randread 4 KiB QD32 each (lane {args.lane}); bar: nvmevfio poll "
          f"both >= {CONTROLLERS_BAR}x one alone")
    def split(row: dict, key: str = "per_controller") -> str:
        return f"{row['iops']:.0f} ({' + '.join(f'{x:.0f}' for x in row[key])})"

    for mode in ("poll", "irq"):
        one = statistics.mean((r[f"nvmevfio_{mode}_one"]["iops"], r[f"nvmevfio_{mode}_one_again"]["iops"]))
        both, again = r[f"nvmevfio_{mode}_both"], r.get(f"nvmevfio_{mode}_both_again")
        both_iops = statistics.mean((both["iops"], again["iops"])) if again else both["iops"]
        k1, k2 = r[f"kernel_{mode}_one"]["iops"], r[f"kernel_{mode}_both"]
        anchor = f"the kernel's ratio, its anchor: {k2['iops'] / k1:.2f}"
        print(f"nvmevfio {mode}: one {r[f'nvmevfio_{mode}_one']['iops']:.0f} / "
              f"{r[f'nvmevfio_{mode}_one_again']['iops']:.0f}, both (perf's defaults: "
              f"{both.get('poller', 'per-queue')} poller) {split(both)}"
              + (f" / again {again['iops']:.0f}" if again else "") + f": ratio {both_iops / one:.2f}"
              + (f" (bar {CONTROLLERS_BAR}: {'met' if both_iops / one >= CONTROLLERS_BAR else 'NOT MET'}; "
                 f"{anchor})" if mode == "poll" else ""))
        for key, label, tail in (("both_threads", "a thread each on vCPUs 0 and 1", ""),
                                 ("both_one_cpu", "both threads on vCPU 0", ""),
                                 ("both_shared", "one poller thread for both (--shared-poller, vCPU 0)",
                                  f" ({anchor})")):
            row = r.get(f"nvmevfio_{mode}_{key}")
            if row:
                print(f"nvmevfio {mode}, {label}: {split(row)}: ratio {row['iops'] / one:.2f}{tail}")
        print(f"kernel {mode}:   one {k1:.0f}, both {split(k2, 'per_job')}: ratio {k2['iops'] / k1:.2f}")
    print("QEMU threads, % of a host CPU, mean over each phase's 1 s samples:")
    names = sorted({n for rows in samples.values() for row in rows for n, v in row.items() if v > 5})
    print(f"{'phase':<26}" + "".join(f"{n:>18}" for n in names))
    for label, rows in samples.items():
        print(f"{label:<26}" + "".join(f"{statistics.mean(row.get(n, 0.0) for row in rows):>18.0f}" for n in names))
    if args.json:
        args.json.write_text(json.dumps({"only": r, "qemu_threads": samples}, indent=2))
    return 0


# Shadow doorbells (issue 26): the same rows with Doorbell Buffer Config and without, in one boot
SHADOW_ROWS = [("randread-4k-qd1", "randread", 4096, 1), ("randread-4k-qd32", "randread", 4096, 32),
               ("read-128k-qd8", "read", 131072, 8), ("randread-4k-qd128", "randread", 4096, 128)]


def shadow_round(addr: str, seconds: float, binary: str | None) -> list[dict]:
    """Shadow doorbells on, off, on again (A/B/A): polled perf on every SHADOW_ROWS row, and the C
    anchor with and without Doorbell Buffer Config when there is one."""
    def one(on: bool) -> dict:
        return {name: {"nvmevfio": perf(addr, rw, bs, qd, seconds, "poll", shadow=on),
                       **({"libvfn": anchor(binary, addr, rw, bs, qd, seconds, "poll", dbbuf=on)} if binary else {})}
                for name, rw, bs, qd in SHADOW_ROWS}

    return [one(True), one(False), one(True)]


def in_guest(seconds: float, out_path: Path, sweep: bool, only: str | None = None, binary: str | None = None,
             sweep_opts: dict | None = None, ublksrv: str | None = None) -> int:
    from nvmevfio import pci

    if only == "controllers":
        return controllers_in_guest(seconds, out_path)
    [fn] = list(pci.list_functions())
    addr = fn.address
    if only == "shadow":  # shadow doorbells on, off, on: in-process perf (and the C anchor)
        pci.bind(addr)
        out_path.write_text(json.dumps({"only": shadow_round(addr, seconds, binary)}, indent=2))
        return 0
    if only == "features":  # PRP, SGL, SQ in the CMB, PRP: in-process perf only
        pci.bind(addr)
        out_path.write_text(json.dumps({"only": features_round(addr, seconds)}, indent=2))
        return 0
    if only == "service":  # A/B/A of in-process perf and the service client, nothing else
        pci.bind(addr)
        rounds = [{"perf": perf(addr, "randread", 4096, 32, seconds, "poll")} if i % 2 == 0 else
                  {"poll": service_randread(addr, seconds, "poll"), "irq": service_randread(addr, seconds, "irq")}
                  for i in range(3)]
        out_path.write_text(json.dumps({"only": rounds}, indent=2))
        return 0

    def kernel_dev() -> str:
        return kernel_block_device(addr)

    t0 = time.time()
    if sweep:
        o = sweep_opts or {}
        got = sweep_round(addr, kernel_dev, seconds, o.get("depths", SWEEP_DEPTHS), tuple(o.get("modes", ("poll",))),
                          tuple(o.get("drivers", SWEEP_DRIVERS)), binary, o.get("rounds", 1))
        out_path.write_text(json.dumps({"sweep": got, "seconds": time.time() - t0, "setup": o}, indent=2))
        return 0
    dev = kernel_dev()
    size = int(Path(f"/sys/class/block/{Path(dev).name}/size").read_text()) * 512
    if only == "randwrite":  # A/B/A of the randwrite row alone: fio io_uring poll/irq, perf poll/irq
        def kernel() -> dict:
            return {m: fio(kernel_dev(), "randwrite", 4096, 32, "io_uring", seconds, m == "poll")
                    for m in ("poll", "irq")}

        a1 = kernel()
        pci.bind(addr)
        b = {m: perf(addr, "randwrite", 4096, 32, seconds, m) for m in ("poll", "irq")}
        pci.unbind(addr)
        out_path.write_text(json.dumps({"only": [a1, b, kernel()]}, indent=2))
        return 0
    if only == "ublk":  # A/B/A: the kernel driver's block device, nvmevfio's ublk device, the kernel's again
        a1 = block_round(dev, seconds)
        pci.bind(addr)
        # the C ublk server (--ublksrv) right before and after nvmevfio's default, in its shape
        c_before = ublksrv_round(ublksrv, addr, seconds, ublk_default_shape(addr)) if ublksrv else None
        b = ublk_round(addr, seconds)  # the server's default shape (here: one queue, polled, on the last CPU)
        c_after = ublksrv_round(ublksrv, addr, seconds, b["server"]) if ublksrv else None
        irq = ublk_round(addr, seconds, extra=("--mode", "irq"))  # the other shape: a queue per CPU, interrupts
        null = ublk_round(addr, seconds, null=True)  # the anchor, after B: ublk's own cost here
        pci.unbind(addr)
        out_path.write_text(json.dumps({"only": [a1, b, block_round(kernel_dev(), seconds)], "irq": irq,
                                        "null": null, "kernel": os.uname().release,
                                        **({"c_ublk": {"before": c_before, "after": c_after}} if ublksrv else {})},
                                       indent=2))
        return 0
    if only == "tcp":  # A/B/A over NVMe/TCP: nvmet over the kernel driver, over nvmevfio's export, again
        a1 = kernel_tcp(dev, seconds)
        pci.bind(addr)
        b = {mode: nvmevfio_tcp(addr, seconds, mode) for mode in ("poll", "irq")}
        pci.unbind(addr)
        out_path.write_text(json.dumps({"only": [a1, b, kernel_tcp(kernel_dev(), seconds)]}, indent=2))
        return 0
    if only == "scaling":  # A/B/A of the queue-scaling row alone: fio numjobs 1 and 2, perf --queues 1 and 2
        a1 = scaling_round(None, dev, seconds)
        pci.bind(addr)
        b = scaling_round(addr, None, seconds)
        pci.unbind(addr)
        out_path.write_text(json.dumps({"only": [a1, b, scaling_round(None, kernel_dev(), seconds)]}, indent=2))
        return 0
    if only == "python":  # A/B/A of the Python row alone
        a1 = python_preadv(dev, seconds, size)
        pci.bind(addr)
        b = python_read_into(addr, seconds)
        pci.unbind(addr)
        out_path.write_text(json.dumps({"only": [a1, b, python_preadv(kernel_dev(), seconds, size)]}, indent=2))
        return 0
    a1 = kernel_round(dev, seconds, size)
    pci.bind(addr)
    from nvmevfio.vfio import choose_backend

    lane = choose_backend(addr)  # what nvmevfio opens the function with: type1, or iommufd on the custom kernel
    c1 = libvfn_round(binary, addr, seconds) if binary else None  # the C driver, A/B/A around nvmevfio
    b = nvmevfio_round(addr, seconds)
    c2 = libvfn_round(binary, addr, seconds) if binary else None
    b[FS_ROW] = nbd_fio_fs(addr)  # after the block rows: it writes a filesystem over the random data
    pci.unbind(addr)
    a2 = kernel_round(kernel_dev(), seconds, size)
    a2[FS_ROW] = fio_fs(kernel_dev())
    out_path.write_text(json.dumps({"A": a1, "B": b, "A2": a2, "lane": lane, "kernel": os.uname().release,
                                    "seconds": time.time() - t0, **({"C": c1, "C2": c2} if c1 else {})}, indent=2))
    return 0


# ---------------------------------------------------------------------- on the host
def _service_base(boot: dict) -> float:
    """In-process perf (randread 4 KiB QD32, polled) that the service row compares with: the mean
    of the runs just before and after it, or (results from before they were taken) the matrix's."""
    row = boot["B"][SERVICE_ROW]
    return float(row["perf"]["iops"] if "perf" in row else boot["B"]["randread-4k-qd32"]["poll"]["iops"])


def ratios(boot: dict) -> dict:
    """Per row and mode pairing: nvmevfio IOPS / mean of the kernel's A and A' IOPS."""
    def k(row: str, mode: str) -> float:
        return statistics.mean(boot[r][row][mode]["iops"] for r in ("A", "A2"))

    out = {}
    other = _other_doorbells(boot)
    for row, *_ in MATRIX:
        out[row] = {"poll": boot["B"][row]["poll"]["iops"] / k(row, "io_uring_poll"),
                    other: boot["B"][row][other]["iops"] / k(row, "io_uring_poll"),
                    "irq": boot["B"][row]["irq"]["iops"] / k(row, "io_uring_irq"),
                    "poll_vs_irq": boot["B"][row]["poll"]["iops"] / k(row, "io_uring_irq")}
    out[PY_ROW] = {"python": boot["B"][PY_ROW]["python"]["iops"] / k(PY_ROW, "python")}
    if SERVICE_ROW in boot["B"]:
        out[SERVICE_ROW] = {"service": boot["B"][SERVICE_ROW]["service"]["iops"] / _service_base(boot)}
    return out


def _other_doorbells(boot: dict) -> str:
    """perf's polled run with the doorbells it does not use by default: with shadow doorbells
    (off by default on QEMU's model since issue 26), or in results from before, MMIO only."""
    return "poll_shadow" if "poll_shadow" in boot["B"][MATRIX[0][0]] else "poll_mmio"


def report(boots: list[dict]) -> str:
    per = [ratios(b) for b in boots]
    other = _other_doorbells(boots[0])
    label = "shadow" if other == "poll_shadow" else "mmio"

    def med(row: str, key: str) -> float:
        return statistics.median(r[row][key] for r in per)

    def iops(side: str, row: str, mode: str) -> float:
        if side == "K":
            return statistics.median(statistics.mean(b[r][row][mode]["iops"] for r in ("A", "A2")) for b in boots)
        return statistics.median(b["B"][row][mode]["iops"] for b in boots)

    lanes = sorted({f"{b.get('lane', 'type1')} on guest kernel {b.get('kernel', '?')}" for b in boots})
    lines = [f"median of {len(boots)} boot(s); IOPS; ratio = nvmevfio / kernel (mean of A and A') in the matching mode",
             f"nvmevfio DMA lane: {', '.join(lanes)}",
             f"{'workload':<24} {'k irq':>8} {'k poll':>8} {'nv irq':>8} {'nv poll':>8} {'nv ' + label:>8} "
             f"{'irq':>6} {'poll':>6} {label:>6}  A/A' poll spread (per boot)"]
    for row, *_ in MATRIX:
        spread = ", ".join(f"{b['A'][row]['io_uring_poll']['iops']:.0f}/{b['A2'][row]['io_uring_poll']['iops']:.0f}"
                           for b in boots)
        figures = " ".join(f"{iops(side, row, mode):>8.0f}" for side, mode in (
            ("K", "io_uring_irq"), ("K", "io_uring_poll"), ("B", "irq"), ("B", "poll"), ("B", other)))
        lines.append(f"{row:<24} {figures} {med(row, 'irq'):>6.2f} {med(row, 'poll'):>6.2f} "
                     f"{med(row, other):>6.2f}  {spread}")
    if all("C" in b for b in boots):
        lines.append(c_driver_report(boots))
    lines.append(f"{PY_ROW:<24} os.preadv loop {iops('K', PY_ROW, 'python'):.0f}, read_into loop "
                 f"{iops('B', PY_ROW, 'python'):.0f}: ratio {med(PY_ROW, 'python'):.2f}")
    fs = [b for b in boots if FS_ROW in b["B"] and FS_ROW in b["A2"]]
    if fs:
        def fs_iops(side: str, key: str) -> float:
            return statistics.median(b[side][FS_ROW][key] for b in fs)

        lines.append(f"{FS_ROW:<24} (informational, fio verify=crc32c on a file) kernel nvme ext4 "
                     f"{fs_iops('A2', 'read_iops'):.0f} read / {fs_iops('A2', 'write_iops'):.0f} write IOPS; "
                     f"nvmevfio nbd ext4 {fs_iops('B', 'read_iops'):.0f} / {fs_iops('B', 'write_iops'):.0f}")
    if all(SERVICE_ROW in r for r in per):
        base = statistics.median(_service_base(b) for b in boots)
        each = ", ".join(f"{r[SERVICE_ROW]['service']:.2f}" for r in per)
        lines.append(f"{SERVICE_ROW:<24} nvmevfio serve client {iops('B', SERVICE_ROW, 'service'):.0f}, in-process "
                     f"perf poll just before and after it {base:.0f}: ratio {med(SERVICE_ROW, 'service'):.2f} "
                     f"(per boot {each})")
    scaled = [b for b in boots if SCALING_ROW in b["B"] and SCALING_ROW in b["A"] and SCALING_ROW in b["A2"]]
    if scaled:
        per_scaling = [scaling_ratios(b["A"][SCALING_ROW], b["B"][SCALING_ROW], b["A2"][SCALING_ROW]) for b in scaled]
        lines.append(median_report(f"{SCALING_ROW} (2 queues / 1)", per_scaling, {"nvmevfio poll": SCALING_BAR}))
        lines.append(", ".join(f"{key} {statistics.median(r[key] for r in per_scaling):.2f}"
                               for key in per_scaling[0] if key != "nvmevfio poll") + " (informational)")
    if all("cpu_us_per_io" in b["B"][MATRIX[0][0]]["poll"] and "cpu_us_per_io" in b["A"][MATRIX[0][0]]["io_uring_poll"]
           for b in boots):
        lines.append(cpu_report(boots))
    lines.append("bars (issues 7 and 9):")
    for row, key, what, bar in BARS:
        if not all(row in r for r in per):
            continue
        got = med(row, key)
        lines.append(f"  {row:<24} {what:<34} {got:5.2f} (bar {bar:.1f}) {'met' if got >= bar else 'NOT MET'}")
    return "\n".join(lines)


def c_ratios(boot: dict) -> dict[str, dict[str, float]]:
    """Per matrix row and mode: nvmevfio IOPS / the C driver's (the mean of its runs before and
    after nvmevfio's, C and C')."""
    return {row: {mode: boot["B"][row][mode]["iops"] / statistics.mean(boot[c][row][mode]["iops"]
                                                                       for c in ("C", "C2"))
                  for mode in ("poll", "irq")} for row, *_ in MATRIX}


def c_driver_report(boots: list[dict]) -> str:
    """The C driver column: libvfn's IOPS (mean of C and C') and nvmevfio's ratio to it, median
    over boots, each mode against its match."""
    per = [c_ratios(b) for b in boots]
    lines = ["C driver (tools/libvfn-anchor on libvfn, same controller, A/B/A around nvmevfio): IOPS, and "
             "nvmevfio / C driver", f"{'workload':<24} {'C irq':>8} {'C poll':>8} {'nv/C irq':>9} {'nv/C poll':>10}"
             "  C and C' poll (per boot)"]
    for row, *_ in MATRIX:
        c = {mode: statistics.median(statistics.mean(b[k][row][mode]["iops"] for k in ("C", "C2")) for b in boots)
             for mode in ("poll", "irq")}
        spread = ", ".join(f"{b['C'][row]['poll']['iops']:.0f}/{b['C2'][row]['poll']['iops']:.0f}" for b in boots)
        lines.append(f"{row:<24} {c['irq']:>8.0f} {c['poll']:>8.0f} "
                     f"{statistics.median(r[row]['irq'] for r in per):>9.2f} "
                     f"{statistics.median(r[row]['poll'] for r in per):>10.2f}  {spread}")
    return "\n".join(lines)


def scaling_ratios(a1: dict, b: dict, a2: dict) -> dict[str, float]:
    """The queue-scaling row: IOPS on 2 queues (jobs) / on 1, per driver and mode (the kernel's
    from the mean of A and A')."""
    def k(key: str) -> float:
        return statistics.mean((a1[key]["iops"], a2[key]["iops"]))

    out = {}
    for mode in ("poll", "irq"):
        out[f"nvmevfio {mode}"] = b[f"{mode}_2"]["iops"] / b[f"{mode}_1"]["iops"]
        out[f"kernel {mode}"] = k(f"{mode}_2") / k(f"{mode}_1")
    return out


def scaling_report(a1: dict, b: dict, a2: dict) -> str:
    """The queue-scaling row of one boot: IOPS on 1 and 2 queues, the ratio, CPU µs per I/O (the
    whole process: nvmevfio's perf, fio's jobs) and the share of nvmevfio's loop threads off CPU."""
    r = scaling_ratios(a1, b, a2)
    lines = [f"queue scaling, randread 4 KiB QD32 per queue (kernel: fio numjobs, mean of A and A'); bar: nvmevfio "
             f"poll 2 queues >= {SCALING_BAR}x 1",
             f"{'driver, mode':<16} {'1 queue':>9} {'2 queues':>9} {'ratio':>6} {'cpu us/IO 1q':>13} "
             f"{'cpu us/IO 2q':>13}  off-CPU 1q / 2q"]
    for mode in ("poll", "irq"):
        one, two = b[f"{mode}_1"], b[f"{mode}_2"]
        lines.append(f"{'nvmevfio ' + mode:<16} {one['iops']:>9.0f} {two['iops']:>9.0f} {r['nvmevfio ' + mode]:>6.2f} "
                     f"{one['cpu_us_per_io']:>13.1f} {two['cpu_us_per_io']:>13.1f}  "
                     f"{100 * one['wait_share']:.0f}% / {100 * two['wait_share']:.0f}%")
        kernel = [statistics.mean((a1[f"{mode}_{n}"][key], a2[f"{mode}_{n}"][key]))
                  for n in (1, 2) for key in ("iops", "cpu_us_per_io")]
        lines.append(f"{'kernel ' + mode:<16} {kernel[0]:>9.0f} {kernel[2]:>9.0f} {r['kernel ' + mode]:>6.2f} "
                     f"{kernel[1]:>13.1f} {kernel[3]:>13.1f}")
    got = r["nvmevfio poll"]
    lines.append(f"bar: nvmevfio poll 2 queues / 1 = {got:.2f} ({SCALING_BAR}) "
                 f"{'met' if got >= SCALING_BAR else 'NOT MET'}")
    return "\n".join(lines)


def cpu_report(boots: list[dict]) -> str:
    """CPU µs per I/O (user + system, the whole process), median over boots, per matrix row: the
    kernel's fio (A and A' mean) and nvmevfio's perf, each mode against its match."""
    lines = [f"CPU per I/O (us, user + system; kernel: fio's usr_cpu + sys_cpu over its I/Os), median of {len(boots)} "
             "boot(s)", f"{'workload':<24} {'k irq':>7} {'k poll':>7} {'nv irq':>7} {'nv poll':>7}"]
    def med(row: str, side: str, mode: str) -> float:
        if side == "K":
            return statistics.median(statistics.mean(b[r][row][mode]["cpu_us_per_io"] for r in ("A", "A2"))
                                     for b in boots)
        return statistics.median(b["B"][row][mode]["cpu_us_per_io"] for b in boots)

    for row, *_ in MATRIX:
        lines.append(f"{row:<24} {med(row, 'K', 'io_uring_irq'):>7.1f} {med(row, 'K', 'io_uring_poll'):>7.1f} "
                     f"{med(row, 'B', 'irq'):>7.1f} {med(row, 'B', 'poll'):>7.1f}")
    return "\n".join(lines)


SWEEP_LINES = {"kernel": "kernel nvme, io_uring --hipri", "kernel_irq": "kernel nvme, io_uring (irq)",
               "nvmevfio": "nvmevfio perf, poll", "nvmevfio_irq": "nvmevfio perf, irq",
               "libvfn": "C driver (libvfn), poll", "libvfn_irq": "C driver (libvfn), irq"}


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _name_list(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return names
    return parse


def sweep_title(setup: dict) -> str:
    """What the sweep's namespace was backed by, for the plot's title."""
    backing = "null-co (no I/O)" if setup.get("backing") == "null-co" else "1 GiB image in tmpfs"
    extra = ", ".join(filter(None, [setup.get("drive_opts") or "", setup.get("nvme_opts") or "",
                                    f"thread-pool-max={setup['thread_pool_max']}" if setup.get("thread_pool_max")
                                    else ""]))
    return f"QEMU 7.2 NVMe behind an emulated IOMMU, TCG guest; {backing}{', ' + extra if extra else ''}"


def sweep_table(sweep: dict) -> str:
    """The sweep as text: IOPS (p99 µs) per depth and line, and nvmevfio / C driver per mode."""
    lines = [name for name in SWEEP_LINES if name in sweep]
    depths = sorted({int(q) for name in lines for q in sweep[name]})
    out = [f"{'QD':>5} " + " ".join(f"{name:>20}" for name in lines)
           + "".join(f" {'nv/C ' + m:>10}" for m in ("poll", "irq") if f"libvfn{'' if m == 'poll' else '_irq'}" in sweep
                     and f"nvmevfio{'' if m == 'poll' else '_irq'}" in sweep)]
    for qd in depths:
        row = [sweep[name].get(str(qd), sweep[name].get(qd)) for name in lines]
        cells = " ".join(f"{r['iops']:>10.0f} ({r['lat_p99_us']:>6.0f})" if r else f"{'-':>20}" for r in row)
        ratios = ""
        for m in ("", "_irq"):
            nv, c = sweep.get(f"nvmevfio{m}", {}), sweep.get(f"libvfn{m}", {})
            if nv and c:
                a, b = nv.get(str(qd), nv.get(qd)), c.get(str(qd), c.get(qd))
                ratios += f" {a['iops'] / b['iops']:>10.2f}" if a and b else f" {'-':>10}"
        out.append(f"{qd:>5} {cells}{ratios}")
    return "\n".join(out)


def median_sweep(sweeps: list[dict]) -> dict:
    """Several boots' sweeps as one: per line and depth the median IOPS and p99 over the boots
    that measured it (the paired ratios: every boot's pairs together)."""
    out: dict = {}
    for name in dict.fromkeys(k for s in sweeps for k in s):
        depths = dict.fromkeys(str(q) for s in sweeps for q in s.get(name, {}))
        for q in depths:
            got = [s[name].get(q, s[name].get(int(q))) for s in sweeps if name in s]
            got = [g for g in got if g is not None]
            if name.startswith("paired"):
                out.setdefault(name, {})[q] = [r for g in got for r in g]
            else:
                out.setdefault(name, {})[q] = {"iops": statistics.median(g["iops"] for g in got),
                                               "lat_p99_us": statistics.median(g["lat_p99_us"] for g in got)}
    return out


PAIRED_BAR = 1.0  # issue 26: randread 4 KiB polled, nvmevfio >= the C driver at every depth


def paired_report(sweeps: list[dict]) -> str:
    """nvmevfio / C driver at each depth from paired rounds: per boot the median of its pairs'
    ratios, then the median over boots (each boot's in brackets), against the bar."""
    lines = [f"nvmevfio / C driver, randread 4 KiB, pairs back to back: median of {len(sweeps)} boot(s) of each "
             "boot's median pair (bar 1.0)"]
    for key in ("paired", "paired_irq"):
        depths = sorted({int(q) for s in sweeps for q in s.get(key, {})})
        for qd in depths:
            per_boot = [statistics.median(s[key].get(str(qd), s[key].get(qd))) for s in sweeps
                        if s.get(key, {}).get(str(qd), s.get(key, {}).get(qd))]
            med = statistics.median(per_boot)
            mode = "poll" if key == "paired" else "irq"
            verdict = ("met" if med >= PAIRED_BAR else "NOT MET") if mode == "poll" else "(informational)"
            lines.append(f"  {mode:<4} QD{qd:<5} {med:5.2f}  [{', '.join(f'{r:.2f}' for r in per_boot)}]  {verdict}")
    return "\n".join(lines)


def plot_sweep(sweep: dict, path: Path, title: str = "") -> None:
    """IOPS and p99 latency against queue depth, every driver and mode (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {"kernel": "C0", "nvmevfio": "C1", "libvfn": "C2"}
    for name, label in SWEEP_LINES.items():
        if name not in sweep:
            continue
        style = dict(color=colours[name.split("_")[0]], linestyle="--" if name.endswith("_irq") else "-",
                     marker="o", markersize=4, label=label)
        qds = sorted(sweep[name], key=int)  # JSON keys: depths as strings
        ax1.plot([int(q) for q in qds], [sweep[name][q]["iops"] for q in qds], **style)
        ax2.plot([int(q) for q in qds], [sweep[name][q]["lat_p99_us"] for q in qds], **style)
    for ax, what, unit in ((ax1, "IOPS", "IOPS"), (ax2, "p99 latency", "µs")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queue depth")
        ax.set_ylabel(unit)
        ax.set_title(f"randread 4 KiB: {what}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    fig.suptitle(title or "QEMU NVMe behind an emulated IOMMU, TCG guest (same boot, same device)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SHM = Path("/dev/shm")


def image_dir(size: int, fallback: Path) -> Path:
    """Where the namespace's backing image goes: tmpfs (/dev/shm) when it has room, so that the
    device model, not the host's filesystem, is the limit. On ext4 every 4 KiB write QEMU makes
    takes the file's inode lock and updates its times through the journal, which caps random
    writes near 20k/s for every driver alike (measured: randwrite QD32 poll, nvmevfio 15.9k and
    the kernel 14.7k with the image on ext4; 67.1k and 24.1k on tmpfs). Reads come from the page
    cache either way."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return fallback
    return SHM if st.f_bavail * st.f_frsize > size + (1 << 30) else fallback


def boot_once(args: argparse.Namespace, sweep: bool, only: str | None = None) -> dict:
    import tempfile

    import guest
    import numpy as np

    io_dir = Path(tempfile.mkdtemp(prefix="nvmevfio-bench-"))
    size = guest.parse_size(args.size)
    null_co = args.backing == guest.NULL_CO
    image = (args.image_dir or image_dir(size, io_dir)) / f"{io_dir.name}.img"
    if not null_co:
        rng = np.random.default_rng(0)
        with image.open("wb") as f:
            for _ in range(max(1, size // (64 << 20))):
                f.write(rng.integers(0, 256, min(size, 64 << 20), dtype=np.uint8).tobytes())
    # a Controller Memory Buffer for --only features (SQs in it); no other row uses one
    options = {"serial": "nvmevfio-bench", **({"cmb_size_mb": "4"} if only == "features" else {}),
               **dict(kv.partition("=")[::2] for kv in (args.nvme_opts or "").split(",") if kv)}
    ns = guest.Namespace(size, 512, guest.NULL_CO if null_co else str(image), drive=args.drive_opts or "")
    ctrl = guest.Controller([ns], options)
    out = io_dir / "results.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--seconds", str(args.seconds), "--in-guest", str(out)]
    if sweep:
        cmd += ["--sweep", "--rounds", str(args.rounds), "--depths", ",".join(map(str, args.depths)),
                "--modes", ",".join(args.modes),
                "--drivers", ",".join(args.drivers)]
    if only:
        cmd += ["--only", only]
    if getattr(args, "anchor_bin", None):
        cmd += ["--anchor-bin", str(args.anchor_bin), *(["--libvfn-dbbuf"] if args.libvfn_dbbuf else [])]
    if getattr(args, "ublksrv", None):
        cmd += ["--ublksrv", str(args.ublksrv)]
    qemu_args = ("-object", f"main-loop,id=bench-main-loop,thread-pool-max={args.thread_pool_max}") \
        if args.thread_pool_max else ()
    # PYTHONPATH: a worktree benchmarked with PYTHONPATH=<worktree> runs its own package in the guest
    passed = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
    try:
        res = guest.run(cmd, controllers=[ctrl], kernel_driver=True, io_dir=io_dir, nvme_params="poll_queues=1",
                        timeout=3600, echo=True, qemu_args=qemu_args, **guest.lane_options(args.lane, passed))
        if res.returncode != 0 or not out.exists():
            raise SystemExit(f"benchmark guest failed (exit {res.returncode}):\n{res.output[-4000:]}")
        return json.loads(out.read_text())
    finally:
        image.unlink(missing_ok=True)


def stale_build(package_dir: Path, cbits: Path) -> list[str]:
    """The C sources newer than the built shim when ``package_dir`` is a checkout's editable
    install (its ``_cbits*.so`` next to the sources): an old shim benchmarks old C, or fails where
    the Python expects new entry points. Empty for an installed wheel or an up-to-date build."""
    built = sorted(package_dir.glob("_cbits*.so"))
    if not built or not cbits.is_dir():
        return []
    when = min(p.stat().st_mtime for p in built)
    return sorted(p.name for p in cbits.iterdir() if p.is_file() and p.stat().st_mtime > when)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--size", default="1G", help="namespace size (filled with random data)")
    ap.add_argument("--boots", type=int, help="guest boots; the report is the median (default 3; 1 with --sweep)")
    ap.add_argument("--rounds", type=int, default=1, help="with --sweep and --libvfn: at each depth this many pairs "
                    "of runs, the C driver and nvmevfio back to back, the order swapped each round; the report "
                    "is the median of the pairs' ratios per boot, then over boots")
    ap.add_argument("--sweep", action="store_true", help="queue-depth sweep (QD 1..1024) instead of the matrix")
    ap.add_argument("--depths", type=_int_list, default=SWEEP_DEPTHS, help="with --sweep: the queue depths, "
                    "comma-separated (default 1,2,4,...,1024)")
    ap.add_argument("--modes", type=_name_list(("poll", "irq")), default=["poll", "irq"],
                    help="with --sweep: poll, irq or both (default poll,irq)")
    ap.add_argument("--drivers", type=_name_list(SWEEP_DRIVERS), default=list(SWEEP_DRIVERS),
                    help="with --sweep: which of kernel,nvmevfio,libvfn (default all; libvfn needs --libvfn)")
    ap.add_argument("--libvfn", type=Path, metavar="DIR", help="a libvfn checkout (SamsungDS/libvfn): build it with "
                    "meson and ninja and run the C anchor (tools/libvfn-anchor) in the same boot, A/B/A around "
                    "nvmevfio: the table's C driver column, the sweep's libvfn line")
    ap.add_argument("--ublksrv", metavar="UBLK", help="with --only ublk: ublksrv's `ublk` program (ublk-org/ublksrv, "
                    "built with its nvme_vfio target, `ublk.nvme_vfio`, beside it): the C ublk server, driving the "
                    "controller through VFIO itself, run with nvmevfio's shape right before and after nvmevfio's "
                    "server: the report's C ublk column and nvmevfio's ratio to it")
    ap.add_argument("--libvfn-dbbuf", action="store_true", help="the C anchor with shadow doorbells (libvfn's own "
                    "default where offered; without this, MMIO doorbells: nvmevfio's default on QEMU's model)")
    ap.add_argument("--backing", choices=["file", "null-co"], default="file",
                    help="the namespace's backing: the random-filled image file (default) or QEMU's null-co "
                         "driver, which does no I/O (the device model's queueing without a block backend)")
    ap.add_argument("--drive-opts", metavar="OPTS", help="more QEMU -drive options for the namespace, e.g. "
                    "aio=io_uring (QEMU's default is aio=threads: its thread pool, at most 64 workers)")
    ap.add_argument("--nvme-opts", metavar="K=V,...", help="more QEMU nvme device options, e.g. ioeventfd=true "
                    "(QEMU 7.2: the SQ doorbell signals an eventfd that the main loop serves at once, where by "
                    "default it arms a 500 ns timer)")
    ap.add_argument("--thread-pool-max", type=int, metavar="N", help="QEMU's main-loop thread pool maximum "
                    "(-object main-loop,thread-pool-max=N; QEMU's default 64)")
    ap.add_argument("--plot", type=Path, help="with --sweep: the PNG to write (default: sweep.png)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--lane", choices=["type1", "iommufd", "noiommu"], default="type1",
                    help="the DMA lane nvmevfio runs in (the guest boots as the guest tier does for it: type1 on "
                         "the Debian kernel, iommufd and noiommu on the custom 6.12 kernel)")
    ap.add_argument("--only", choices=["service", "python", "randwrite", "ublk", "tcp", "scaling", "features",
                                       "controllers", "shadow"],
                    help="a quick look at one row, A/B/A in one boot: service (in-process perf, the serve client "
                         "with a polled and an MSI-X daemon, perf again) or python (os.preadv, read_into, "
                         "os.preadv) or randwrite (fio, perf, fio; polled and with interrupts) or ublk (fio on "
                         "the kernel's /dev/nvmeXnY, on nvmevfio's /dev/ublkbN, on the kernel's again; and ext4 on "
                         "each: needs --lane iommufd or noiommu, the kernel with ublk) or tcp (fio over NVMe/TCP "
                         "on loopback: nvmet over the kernel driver, over `nvmevfio export`, over the kernel again; "
                         "needs ublk: --lane iommufd) or scaling (randread 4 KiB QD32 on 1 and 2 queues: fio "
                         "numjobs 1 and 2, perf --queues 1 and 2, fio again; polled and with interrupts) or features "
                         "(perf with PRPs, with SGLs --sgl, with the SQ in the Controller Memory Buffer --sq-in-cmb, "
                         "with PRPs again) or controllers (two controllers: randread 4 KiB QD32 on one, on both in "
                         "one perf, on one again; the kernel's fio on one and on both; QEMU's threads sampled) or "
                         "shadow (polled perf with shadow doorbells, without, with again; and the C anchor likewise "
                         "with --libvfn)")
    ap.add_argument("--image-dir", type=Path, help="where the namespace's backing image lives (default: /dev/shm "
                    "when it has room, else $TMPDIR: on ext4 the host's write path, not the drivers, limits "
                    "random writes)")
    ap.add_argument("--in-guest", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--anchor-bin", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.boots is None:
        args.boots = 1 if args.sweep else 3
    if args.in_guest:
        ANCHOR_DBBUF["on"] = args.libvfn_dbbuf
        return in_guest(args.seconds, args.in_guest, args.sweep, args.only, args.anchor_bin,
                        {"depths": args.depths, "modes": args.modes, "drivers": args.drivers, "rounds": args.rounds},
                        args.ublksrv)
    if args.libvfn:
        args.anchor_bin = build_anchor(args.libvfn)
    elif args.sweep:
        args.drivers = [d for d in args.drivers if d != "libvfn"]
    import nvmevfio

    package = Path(nvmevfio.__file__).resolve().parent
    newer = stale_build(package, package.parent / "cbits")
    if newer:
        raise SystemExit(f"{package}'s C shim is older than {', '.join(newer)}: rebuild it first "
                         "(tools/setup-host.sh)")
    if args.only == "controllers":
        return controllers_main(args)
    if args.ublksrv:
        if args.only != "ublk":
            raise SystemExit("--ublksrv: the C ublk server runs with --only ublk")
        ublk = Path(args.ublksrv).resolve()
        if not (ublk.is_file() and Path(f"{ublk}.nvme_vfio").is_file()):
            raise SystemExit(f"--ublksrv {args.ublksrv}: want ublksrv's `ublk` program with `ublk.nvme_vfio` beside it")
        args.ublksrv = str(ublk)
    if args.only == "ublk":
        if args.lane == "type1":
            raise SystemExit("--only ublk: Debian's 6.1 guest kernel has no ublk; use --lane iommufd (or noiommu)")
        boots = []
        for i in range(args.boots):
            data = boot_once(args, False, "ublk")
            boots.append(data)
            print(f"boot {i + 1} of {args.boots}, guest kernel {data['kernel']}, lane {args.lane}")
            print(ublk_report(*data["only"], null=data.get("null"), c_ublk=data.get("c_ublk")), flush=True)
            if data.get("irq"):  # the other shape: a queue per CPU, interrupts
                a1, _, a2 = data["only"]
                print(ublk_report(a1, data["irq"], a2), flush=True)
            if args.json:  # every boot so far: a run cut short keeps what it measured
                args.json.write_text(json.dumps({"boots": boots}, indent=2))
        if len(boots) > 1:
            print(median_report("ublk", [ublk_ratios(*b["only"]) for b in boots], UBLK_BARS))
            irq = [ublk_ratios(b["only"][0], b["irq"], b["only"][2]) for b in boots if b.get("irq")]
            if irq:
                print(median_report("ublk --mode irq, a queue per CPU", irq, UBLK_BARS))
            anchors = [ublk_anchor_ratios(*b["only"], b["null"]) for b in boots if b.get("null")]
            if anchors:  # no bar: what ublk with no device reaches here, and nvmevfio's share of it
                print(median_report("the anchor (null server)", anchors, dict.fromkeys(anchors[0])))
            c_ublk = [ublk_c_ratios(*b["only"], b["c_ublk"]) for b in boots if b.get("c_ublk")]
            if c_ublk:  # no bar: the C ublk server against the kernel, and nvmevfio's ublk against it
                print(median_report("the C ublk server (ublksrv nvme_vfio)", c_ublk, dict.fromkeys(c_ublk[0])))
        return 0
    if args.only == "features":
        boots, per_boot = [], []
        for i in range(args.boots):
            rounds = boot_once(args, False, "features")["only"]
            boots.append({"only": rounds})
            per_boot.append(feature_ratios(rounds))
            print(f"boot {i + 1} of {args.boots}, lane {args.lane}: IOPS with PRPs (before / after), then each "
                  "feature and its ratio to PRPs")
            for name, *_ in FEATURE_ROWS:
                each = "  ".join(f"{feature} {got[name]['iops']:>8.0f} ({per_boot[-1][f'{name} {feature}']:.2f})"
                                 for feature, got in zip(FEATURES, rounds[1:-1]))
                print(f"{name:<20} PRP {rounds[0][name]['iops']:>8.0f} / {rounds[-1][name]['iops']:>8.0f}  {each}",
                      flush=True)
            if args.json:
                args.json.write_text(json.dumps({"boots": boots}, indent=2))
        if len(boots) > 1:
            print(median_report("features against PRPs in host memory", per_boot, dict.fromkeys(per_boot[0])))
        return 0
    if args.only == "scaling":
        boots = []
        for i in range(args.boots):
            rounds = boot_once(args, False, "scaling")["only"]
            boots.append({"only": rounds})
            print(f"boot {i + 1} of {args.boots}, lane {args.lane}")
            print(scaling_report(*rounds), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"boots": boots}, indent=2))
        if len(boots) > 1:
            print(median_report("queue scaling (2 queues / 1)", [scaling_ratios(*b["only"]) for b in boots],
                                {"nvmevfio poll": SCALING_BAR}))
        return 0
    if args.only == "python":
        a1, b, a2 = boot_once(args, False, "python")["only"]
        print(f"python loop: read_into {b['iops']:.0f}, os.preadv {a1['iops']:.0f} / {a2['iops']:.0f}: ratio "
              f"{b['iops'] / statistics.mean((a1['iops'], a2['iops'])):.2f}")
        return 0
    if args.only == "randwrite":
        a1, b, a2 = boot_once(args, False, "randwrite")["only"]
        for m in ("poll", "irq"):
            k = statistics.mean((a1[m]["iops"], a2[m]["iops"]))
            print(f"randwrite 4 KiB QD32 {m}: nvmevfio {b[m]['iops']:.0f}, kernel {a1[m]['iops']:.0f} / "
                  f"{a2[m]['iops']:.0f}: ratio {b[m]['iops'] / k:.2f} (nvmevfio waiting {b[m]['wait_pct']:.0f}%)")
        return 0
    if args.only == "tcp":
        boots, ratios_per_boot = [], []
        for i in range(args.boots):
            a1, b, a2 = rounds = boot_once(args, False, "tcp")["only"]
            boots.append({"only": rounds})
            ratios_per_boot.append(tcp_ratios(a1, b, a2))
            print(f"boot {i + 1} of {args.boots}, lane {args.lane}")
            for name, *_ in TCP_ROWS:
                for mode in ("poll", "irq"):
                    got = b[mode][name]
                    r = ratios_per_boot[-1][f"{name} ({mode})"]
                    print(f"NVMe/TCP {name}: nvmevfio export ({mode}) {got['iops']:.0f} IOPS ({got['mib_per_s']:.0f} "
                          f"MiB/s), nvmet over the kernel driver {a1[name]['iops']:.0f} / {a2[name]['iops']:.0f}: "
                          f"ratio {r:.2f} (bar {TCP_BAR}: {'met' if r >= TCP_BAR else 'NOT MET'})", flush=True)
            if args.json:
                args.json.write_text(json.dumps({"boots": boots}, indent=2))
        if len(boots) > 1:
            print(median_report("NVMe/TCP", ratios_per_boot, dict.fromkeys(ratios_per_boot[0], TCP_BAR)))
        return 0
    if args.only == "service":
        rounds = boot_once(args, False, "service")["only"]
        base = statistics.mean(r["perf"]["iops"] for r in rounds[::2])
        for mode in ("poll", "irq"):
            got = rounds[1][mode]
            print(f"serve client ({mode} daemon) {got['iops']:.0f} IOPS, in-process perf poll {base:.0f}: ratio "
                  f"{got['iops'] / base:.2f} (p50 {got['lat_p50_us']:.0f} us, {got['ios_per_submit']:.1f} per "
                  f"submit, {got['ios_per_reap']:.1f} per reap, client waiting {got['wait_pct']:.0f}%)")
        return 0
    if args.only == "shadow":
        rounds = boot_once(args, False, "shadow")["only"]
        print(shadow_report(rounds))
        if args.json:
            args.json.write_text(json.dumps({"boots": [{"only": rounds}]}, indent=2))
        return 0
    if args.sweep:
        boots = []
        for i in range(args.boots):
            data = boot_once(args, True)
            data["setup"] = {**data.get("setup", {}), "backing": args.backing, "drive_opts": args.drive_opts,
                             "thread_pool_max": args.thread_pool_max, "nvme_opts": args.nvme_opts}
            boots.append(data)
            print(f"boot {i + 1} of {args.boots}", flush=True)
            print(sweep_table(data["sweep"]), flush=True)
            if args.json:  # every boot so far: a run cut short keeps what it measured
                args.json.write_text(json.dumps(data if len(boots) == 1 else {"boots": boots}, indent=2))
        sweep = median_sweep([b["sweep"] for b in boots])
        plot_sweep(sweep, args.plot or Path("sweep.png"), sweep_title(boots[0]["setup"]))
        if len(boots) > 1:
            print(f"median of {len(boots)} boots")
            print(sweep_table(sweep))
        if any(k.startswith("paired") for k in sweep):
            print(paired_report([b["sweep"] for b in boots]))
        return 0
    boots = []
    for i in range(args.boots):
        print(f"boot {i + 1} of {args.boots}", file=sys.stderr)
        boots.append(boot_once(args, False))
        if args.json:
            args.json.write_text(json.dumps({"boots": boots}, indent=2))
    print(report(boots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
