#!/usr/bin/env python3
"""nvmevfio against the kernel nvme driver, in one guest boot, on one device (A/B/A).

    .venv/bin/python tools/bench.py                 # default matrix, 5 s per run, 1 GiB image
    .venv/bin/python tools/bench.py --seconds 15 --json results.json

Round A: the kernel driver (loaded with poll_queues=1) measured with fio; round B: the
controller is bound to vfio-pci and measured with `nvmevfio perf` in poll and irq modes;
round A': back to the kernel, measured again. Ratios are nvmevfio / mean(A, A'), each mode
against its match: poll against fio io_uring --hipri (polled queues), irq against fio
io_uring (interrupts), and both against psync QD1 as the plainest baseline. The guest
boots with clocksource=tsc (see vm-notes: the HPET fallback distorts timings). Absolute
numbers under TCG mean little; the ratios are the point. Host load distorts them: run it
on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (name, fio rw, block size, queue depth)
MATRIX = [
    ("randread-4k-qd1", "randread", 4096, 1),
    ("randread-4k-qd32", "randread", 4096, 32),
    ("randwrite-4k-qd32", "randwrite", 4096, 32),
    ("read-128k-qd8", "read", 131072, 8),
]


def fio(dev: str, rw: str, bs: int, qd: int, engine: str, seconds: float, hipri: bool) -> dict:
    args = ["fio", "--name=bench", f"--filename={dev}", "--direct=1", "--time_based", f"--runtime={seconds}",
            "--ramp_time=1", "--randrepeat=0", "--norandommap", "--output-format=json", f"--ioengine={engine}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}"]
    if hipri:
        args.append("--hipri=1")
    out = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    job = out["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"iops": side["iops"], "mib_per_s": side["bw_bytes"] / (1 << 20),
            "lat_p50_us": side["clat_ns"]["percentile"].get("50.000000", 0) / 1000}


def kernel_round(dev: str, seconds: float) -> dict:
    res = {}
    for name, rw, bs, qd in MATRIX:
        res[name] = {
            "io_uring_irq": fio(dev, rw, bs, qd, "io_uring", seconds, False),
            "io_uring_poll": fio(dev, rw, bs, qd, "io_uring", seconds, True),
        }
        if qd == 1:
            res[name]["psync"] = fio(dev, rw, bs, 1, "psync", seconds, False)
    return res


def nvmevfio_round(addr: str, seconds: float) -> dict:
    res = {}
    for name, rw, bs, qd in MATRIX:
        res[name] = {}
        for mode in ("poll", "irq"):
            out = subprocess.run([sys.executable, "-m", "nvmevfio", "perf", addr, "-w", rw, "-q", str(qd), "-s",
                                  str(bs), "-t", str(seconds), "--ramp", "1", "--mode", mode, "-o", "json"],
                                 check=True, capture_output=True, text=True).stdout
            d = json.loads(out)
            res[name][mode] = {"iops": d["iops"], "mib_per_s": d["mib_per_s"], "lat_p50_us": d["lat_p50_us"]}
    return res


def in_guest(seconds: float, out_path: Path) -> int:
    from nvmevfio import pci

    [fn] = [f for f in pci.list_functions()]
    addr = fn.address

    def kernel_dev() -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            names = [ns.name for ns in pci.get_function(addr).namespaces if ns.nsid == 1]
            if names:
                return "/dev/" + names[0]
            time.sleep(0.05)
        raise RuntimeError("no kernel block device")

    t0 = time.time()
    a1 = kernel_round(kernel_dev(), seconds)
    pci.bind(addr)
    b = nvmevfio_round(addr, seconds)
    pci.unbind(addr)
    a2 = kernel_round(kernel_dev(), seconds)
    out_path.write_text(json.dumps({"A": a1, "B": b, "A2": a2, "seconds": time.time() - t0}, indent=2))
    return 0


def report(data: dict) -> str:
    lines = [f"{'workload':<20} {'kernel psync':>12} {'kernel irq':>11} {'kernel poll':>12} {'nvmevfio irq':>13} "
             f"{'nvmevfio poll':>14} {'irq ratio':>10} {'poll ratio':>11}  (IOPS; ratio = nvmevfio / kernel)"]
    for name, *_ in MATRIX:
        def k(mode: str, name: str = name) -> float | None:
            vals = [data[r][name][mode]["iops"] for r in ("A", "A2") if mode in data[r][name]]
            return sum(vals) / len(vals) if vals else None

        ps, ki, kp = k("psync"), k("io_uring_irq"), k("io_uring_poll")
        ni, np_ = data["B"][name]["irq"]["iops"], data["B"][name]["poll"]["iops"]
        lines.append(f"{name:<20} {ps or 0:>12.0f} {ki:>11.0f} {kp:>12.0f} {ni:>13.0f} {np_:>14.0f} "
                     f"{ni / ki:>10.2f} {np_ / kp:>11.2f}")
        spread = [data[r][name]["io_uring_poll"]["iops"] for r in ("A", "A2")]
        lines.append(f"{'':<20} A/A' spread (poll): {spread[0]:.0f} / {spread[1]:.0f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--size", default="1G", help="namespace size (filled with random data)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--in-guest", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_guest:
        return in_guest(args.seconds, args.in_guest)

    import tempfile

    import guest
    import numpy as np

    io_dir = Path(tempfile.mkdtemp(prefix="nvmevfio-bench-"))
    image = io_dir / "bench.img"
    size = guest.parse_size(args.size)
    rng = np.random.default_rng(0)
    with image.open("wb") as f:
        for _ in range(size // (64 << 20) or 1):
            f.write(rng.integers(0, 256, min(size, 64 << 20), dtype=np.uint8).tobytes())
    ctrl = guest.Controller([guest.Namespace(size, 512, str(image))], {"serial": "nvmevfio-bench"})
    out = io_dir / "results.json"
    res = guest.run([sys.executable, str(Path(__file__).resolve()), "--seconds", str(args.seconds),
                     "--in-guest", str(out)], controllers=[ctrl], kernel_driver=True, io_dir=io_dir,
                    nvme_params="poll_queues=1", timeout=3600, echo=True)
    if res.returncode != 0 or not out.exists():
        print(res.output, file=sys.stderr)
        return res.returncode or 1
    data = json.loads(out.read_text())
    print(report(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
