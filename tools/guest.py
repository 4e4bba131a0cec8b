#!/usr/bin/env python3
"""The nvmevfio test guest: a QEMU q35 machine with an emulated Intel IOMMU and
one or more emulated NVMe controllers, where the controllers bind to vfio-pci
exactly as on a server. Runs one command inside and returns its exit status
and output.

Standard library only (it runs before and outside the package). The guest's
root file system is the host's ``/`` shared read-only over 9p, so the guest
runs the host's Python, virtual environment and checkout at the same paths;
the checkout, the virtual environment and a per-run writable I/O folder are
shared as their own 9p mounts so that a checkout under /tmp (hidden by the
guest's tmpfs) is visible too.

    python tools/guest.py run -- nvmevfio list
    python tools/guest.py run --ctrl 'ns=64M,ns=32M:4096;mdts=0' -- pytest tests/vm
    python tools/guest.py run --kernel-driver -- sh -c 'ls /dev/nvme*'
    python tools/guest.py run --lane noiommu -- nvmevfio show-regs 00:10.0   # no IOMMU, custom kernel

The guest kernel is Debian's stock 6.1 (``--kernel debian``, the default: it needs no
build) or a 6.12 built for these tests (``--kernel custom``: iommufd, VFIO device cdevs,
VFIO's no-IOMMU mode; tools/build-guest-kernel.sh, cached).

See ``--help``. Build prerequisites: ``tools/setup-host.sh``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NVMEVFIO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
             / "nvmevfio")
START = "NVMEVFIO-PAYLOAD-START"
END = "NVMEVFIO-PAYLOAD-END"
FAIL = "NVMEVFIO-GUEST-FAIL"
# Modules the guest needs; their dependencies are resolved from modules.dep.
MOD_9P = ["virtio_pci", "9pnet_virtio", "9p"]
MOD_VFIO = ["vfio-pci", "vfio_iommu_type1"]
MOD_NVME = ["nvme"]
MOD_EXTRA = ["ext4", "crc32c_generic", "nbd"]  # ext4 loads crc32c by name (a soft dependency)
# Loaded when the kernel has them as modules: ublk_drv (nvmevfio ublk) is built into the custom
# kernel and missing from Debian's 6.1, where `nvmevfio ublk` must say so; the NVMe target with its
# TCP transport (nvmevfio export) and the NVMe/TCP initiator (nvme connect), modules in both.
MOD_OPTIONAL = ["ublk_drv", "nvmet", "nvmet_tcp", "nvme_tcp"]
NVME_CLASS = "0x010802"


NULL_CO = "null-co"  # Namespace.image: backed by QEMU's null-co block driver, no file


class GuestError(RuntimeError):
    """The guest could not be built, booted, or did not finish in time."""


@dataclasses.dataclass
class Namespace:
    size: int = 64 << 20
    block_size: int = 512
    image: str | None = None  # a host file; a fresh sparse one when None; NULL_CO: no file at all
    metadata: int = 0  # bytes of metadata per block (QEMU nvme-ns ms=)
    drive: str = ""  # extra QEMU -drive options, e.g. "throttling.iops-total=20" (slow commands, for timeouts)
    blkdebug: str = ""  # a QEMU blkdebug config file: inject I/O errors (media errors) at chosen sectors
    # more nvme-ns properties, e.g. {"zoned": "true", "zoned.zone_size": "4M"} (a zoned namespace)
    options: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def null_backed(self) -> bool:
        return self.image == NULL_CO

    def drive_source(self, path: Path) -> str:
        """The -drive options that name the backing: the image file at ``path`` (raw), through
        blkdebug when it has a config, or QEMU's null-co block driver (NULL_CO), which does no I/O
        (reads return zeroes, writes are dropped) and completes every request at once in QEMU's
        main loop: the device model's queueing without a block backend behind it."""
        if self.null_backed:
            return f"driver=null-co,size={self.size},read-zeroes=on"
        if self.blkdebug:
            return f"file=blkdebug:{self.blkdebug}:{path},format=raw"
        return f"file={path},file.locking=off,format=raw"

    @classmethod
    def parse(cls, text: str) -> Namespace:
        """``SIZE[:BLOCKSIZE[:MS]][+KEY=VALUE...][@IMAGE]``, e.g. ``64M``, ``32M:4096``, ``8M:512:8``,
        ``1G@/var/tmp/d.img``, ``64M:4096+zoned=true+zoned.zone_size=4M`` (nvme-ns properties),
        ``1G@null-co`` (no image: QEMU's null-co driver; a file of that name is ``@./null-co``)."""
        image = None
        if "@" in text:
            text, image = text.split("@", 1)
        text, *extra = text.split("+")
        size_s, _, rest = text.partition(":")
        bs, _, ms = rest.partition(":")
        options = dict(kv.partition("=")[::2] for kv in extra)
        return cls(parse_size(size_s) if size_s else 64 << 20, int(bs) if bs else 512, image, int(ms or 0),
                   options=options)


@dataclasses.dataclass
class Controller:
    namespaces: list[Namespace] = dataclasses.field(default_factory=lambda: [Namespace()])
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    # behind its own hot-pluggable PCIe root port: the guest can have it removed through the
    # QEMU monitor (device_del; see QmpRelay), as a server's hot-unplug
    hotplug: bool = False

    @classmethod
    def parse(cls, text: str) -> Controller:
        """``ns=64M,ns=32M:4096;mdts=0;max_ioqpairs=4`` (namespaces, then QEMU nvme options)."""
        nss: list[Namespace] = []
        opts: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            if part.startswith("ns="):
                nss += [Namespace.parse(x.removeprefix("ns=")) for x in part.split(",")]
            else:
                for kv in part.split(","):
                    key, _, value = kv.partition("=")
                    opts[key] = value
        return cls(nss or [Namespace()], opts)


@dataclasses.dataclass
class GuestResult:
    returncode: int
    output: str  # what the payload printed (stdout and stderr, interleaved)
    console: str  # the whole serial console
    boot_seconds: float
    seconds: float
    attempts: int
    io_dir: Path
    config: dict


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)(?:i?B)?", text.strip(), re.I)
    if m is None:
        raise ValueError(f"bad size {text!r} (e.g. 64M, 1G)")
    return int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))


# ---------------------------------------------------------------- kernel, initramfs
KERNELS = ("debian", "custom")
# How a guest boots for each DMA lane nvmevfio has (run()'s keyword arguments): type1 on Debian's
# stock kernel; iommufd (chosen automatically there) on the custom kernel, which has IOMMUFD and
# VFIO_DEVICE_CDEV; no-IOMMU on the custom kernel without the emulated IOMMU, VFIO in its unsafe
# no-IOMMU mode, 1.5 GiB of huge pages reserved for the broker's pinned pools, and the opt-in set.
LANES: dict[str, dict] = {
    "type1": {"kernel": "debian"},
    "iommufd": {"kernel": "custom"},
    "noiommu": {"kernel": "custom", "iommu": False, "memory": "3072",
                "append": "vfio.enable_unsafe_noiommu_mode=1 hugepages=768",
                "env": {"NVMEVFIO_UNSAFE_NOIOMMU": "1"}},
}


def lane_options(lane: str, env: dict[str, str] | None = None) -> dict:
    """run()'s keyword arguments for a guest in ``lane``; ``env`` is added to the lane's, with
    NVMEVFIO_VM_LANE naming the lane (tests/vm reads it)."""
    if lane not in LANES:
        raise GuestError(f"unknown DMA lane {lane!r}; choose one of {', '.join(LANES)}")
    opts = dict(LANES[lane])
    opts["env"] = {"NVMEVFIO_VM_LANE": lane, **opts.get("env", {}), **(env or {})}
    return opts


def kernel_root(kind: str = "debian") -> Path:
    """Where the guest kernel of ``kind`` lives: Debian's 6.1 image package extracted by
    tools/setup-host.sh (``debian``), or the 6.12 kernel tools/build-guest-kernel.sh builds with
    VFIO_NOIOMMU, IOMMUFD and VFIO_DEVICE_CDEV (``custom``; built now if it is not cached)."""
    if kind == "debian":
        return CACHE / "kernel"
    if kind != "custom":
        raise GuestError(f"unknown guest kernel {kind!r}; choose one of {', '.join(KERNELS)}")
    script = REPO / "tools/build-guest-kernel.sh"
    res = subprocess.run([str(script)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "NVMEVFIO_CACHE": str(CACHE)})
    if res.returncode != 0:
        raise GuestError(f"{script} failed (exit {res.returncode})")
    return Path(res.stdout.strip().splitlines()[-1])


def kernel_paths(kind: str = "debian") -> tuple[Path, Path, str]:
    root = kernel_root(kind)
    images = sorted((root / "boot").glob("vmlinuz-*")) if (root / "boot").exists() else []
    if not images:
        raise GuestError(f"no guest kernel in {root}: run tools/setup-host.sh (as root) first")
    version = images[-1].name.removeprefix("vmlinuz-")
    return images[-1], root / "lib/modules" / version, version


def module_closure(moddir: Path, names: list[str]) -> list[str]:
    """Module paths (relative to moddir) for ``names`` and their dependencies, dependencies first.
    Modules built into the kernel (modules.builtin) need no loading and are left out."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    builtin_list = moddir / "modules.builtin"
    builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
               for line in (builtin_list.read_text().split() if builtin_list.exists() else [])}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key in builtin and key not in by_name:
            continue
        if key not in by_name:
            raise GuestError(f"module {name} is not in the guest kernel's modules.dep")
        visit(by_name[key])
    return order


def extra_modules(moddir: Path) -> list[str]:
    """MOD_EXTRA, and those of MOD_OPTIONAL this kernel has as modules."""
    dep = (moddir / "modules.dep").read_text()
    have = {Path(line.partition(":")[0]).name.split(".ko")[0].replace("-", "_") for line in dep.splitlines()}
    return MOD_EXTRA + [m for m in MOD_OPTIONAL if m.replace("-", "_") in have]


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "NVMEVFIO-GUEST-FAIL: $*"; echo o > /proc/sysrq-trigger; sleep 10; }
for m in $(cat /modules-9p); do insmod /mod/$(basename $m) || fail "insmod $m"; done
mkdir -p /io /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 io /io || fail "mount io share"
. /io/guest.sh
fail "guest.sh returned"
"""


def build_initramfs(kernel: str = "debian") -> Path:
    _, moddir, version = kernel_paths(kernel)
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise GuestError("busybox is missing: apt-get install busybox-static (tools/setup-host.sh)")
    nine = module_closure(moddir, MOD_9P)
    rest = module_closure(moddir, MOD_VFIO + MOD_NVME + extra_modules(moddir))
    key = hashlib.sha256("\n".join([INIT, version, *nine, *rest, Path(busybox).read_bytes().hex()[:64]]).encode())
    out = CACHE / f"initramfs-{version}-{key.hexdigest()[:12]}.cpio.gz"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "mod", "proc", "sys", "dev", "io", "newroot"):
            (root / d).mkdir()
        shutil.copy2(busybox, root / "bin/busybox")
        for m in dict.fromkeys(nine + rest):
            shutil.copy2(moddir / m, root / "mod" / Path(m).name)
        (root / "modules-9p").write_text("\n".join(nine) + "\n")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(),
                              capture_output=True, check=True).stdout
    tmp_out = out.with_suffix(".tmp")
    with gzip.open(tmp_out, "wb", compresslevel=1) as f:
        f.write(cpio)
    tmp_out.rename(out)
    return out


# ---------------------------------------------------------------- the run
def _guest_script(*, io_dir: Path, shares: list[tuple[str, Path, bool]], addresses: list[str],
                  kernel_driver: bool, moddir: Path, command: list[str], cwd: str,
                  env: dict[str, str], nvme_params: str = "") -> str:
    vfio = module_closure(moddir, MOD_VFIO)
    nvme = module_closure(moddir, MOD_NVME)
    extra = module_closure(moddir, extra_modules(moddir))
    q = shlex.quote
    lines = [
        "mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose host /newroot"
        " || fail 'mount host root'",
        "mount -t proc proc /newroot/proc && mount -t sysfs sys /newroot/sys"
        " && mount -t devtmpfs dev /newroot/dev || fail 'mount proc/sys/dev'",
        "mount -t tmpfs -o mode=1777 tmp /newroot/tmp && mount -t tmpfs run /newroot/run || fail 'mount tmpfs'",
        f"mkdir -p /newroot{q(str(io_dir))} && mount --bind /io /newroot{q(str(io_dir))} || fail 'bind io'",
    ]
    for tag, path, ro in shares:
        # read-only shares (the checkout, the venv) are cached in the guest like its root: a Python
        # process there reads hundreds of files (numpy's), and uncached each read went to the host
        opts = "trans=virtio,version=9p2000.L,msize=262144" + (",ro,cache=loose" if ro else "")
        lines.append(f"mkdir -p /newroot{q(str(path))} 2>/dev/null; mount -t 9p -o {opts} {tag} "
                     f"/newroot{q(str(path))} || fail 'mount {tag} at {path}'")

    def insmod(mods: list[str], params: str = "") -> list[str]:
        out = []
        for m in mods:
            name = Path(m).name
            loaded = name.split(".ko")[0].replace("-", "_")
            args = f" {params}" if params and loaded == "nvme" else ""
            out.append(f"insmod /mod/{name}{args} 2>/dev/null || grep -q '^{loaded} ' /proc/modules"
                       f" || fail 'insmod {name}'")
        return out

    lines += insmod(vfio)
    if kernel_driver:
        lines += insmod(nvme, nvme_params)
    else:
        for addr in addresses:
            lines += [f"echo vfio-pci > /sys/bus/pci/devices/{addr}/driver_override || fail 'override {addr}'",
                      f"echo {addr} > /sys/bus/pci/drivers_probe || fail 'probe {addr}'"]
        lines += insmod(nvme, nvme_params)
    lines += insmod(extra)
    # configfs (nvmet's configuration; a module nvmet loaded in Debian's kernel) where the kernel has
    # it, and the loopback interface up for NVMe/TCP inside the guest
    lines += ["[ -d /newroot/sys/kernel/config ] && mount -t configfs configfs /newroot/sys/kernel/config; "
              "ip link set lo up 2>/dev/null; true"]
    if kernel_driver:  # wait for the namespaces' block devices
        lines.append("i=0; while [ $i -lt 100 ] && ! ls /dev/nvme*n1 >/dev/null 2>&1; do sleep 0.1; i=$((i+1)); done")
    envs = " ".join(f"{k}={q(v)}" for k, v in env.items())
    inner = f"cd {q(cwd)} && exec {' '.join(q(c) for c in command)}"
    lines += [
        f"echo {START}",
        f"chroot /newroot /usr/bin/env -i {envs} /bin/sh -c {q(inner)} </dev/null 2>&1",
        "rc=$?",
        "echo $rc > /io/rc",
        "sync",
        f'echo "{END} rc=$rc"',
        "echo o > /proc/sysrq-trigger",
        "sleep 10",
    ]
    return "\n".join(lines) + "\n"


def _venv_root() -> Path | None:
    exe = Path(os.environ.get("VIRTUAL_ENV") or sys.prefix)
    return exe if (exe / "pyvenv.cfg").exists() else None


def run(command: list[str], *, controllers: list[Controller] | None = None, kernel_driver: bool = False,
        timeout: float = 900.0, boot_timeout: float = 90.0, accel: str = "tcg", memory: str = "2048",
        smp: int = 2, append: str = "", env: dict[str, str] | None = None, cwd: str | None = None,
        io_dir: Path | None = None, echo: bool = False, retries: int = 1, iommu: bool = True,
        nvme_params: str = "", kernel: str = "debian", qemu_args: tuple[str, ...] = ()) -> GuestResult:
    """Boot the guest, run ``command`` in it, return its exit status and output.

    ``io_dir`` (created when None) is writable from the guest at the same path;
    images are created there. ``nvme_params`` go to the kernel nvme module (e.g.
    ``poll_queues=1``). A guest that dies before reaching the payload is
    retried ``retries`` times; one that does not finish within ``timeout`` raises.
    ``kernel``: ``debian`` (the stock 6.1 kernel, the default: it boots fastest) or ``custom``
    (6.12 with no-IOMMU mode, iommufd and VFIO device cdevs; see kernel_root()). ``qemu_args``:
    more QEMU options, e.g. ``("-object", "main-loop,id=ml,thread-pool-max=256")``.
    """
    controllers = controllers if controllers is not None else [Controller()]
    kernel_image, moddir, _ = kernel_paths(kernel)
    initrd = build_initramfs(kernel)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestError("qemu-system-x86_64 is missing: run tools/setup-host.sh")
    io_dir = Path(io_dir or tempfile.mkdtemp(prefix="nvmevfio-guest-", dir=os.environ.get("NVMEVFIO_IO_ROOT")))
    io_dir.mkdir(parents=True, exist_ok=True)
    io_dir.chmod(0o777)

    # Shares: the checkout, the virtual environment (when outside it), and the cwd's repo.
    shares: list[tuple[str, Path, bool]] = []
    wanted = [REPO]
    venv = _venv_root()
    if venv is not None and REPO not in venv.parents:
        wanted.append(venv)
    for i, path in enumerate(wanted):
        shares.append((f"share{i}", path, True))

    qargs = [qemu, "-machine", "q35,kernel-irqchip=split", "-m", memory, "-smp", str(smp),
             "-nographic", "-no-reboot", "-kernel", str(kernel_image), "-initrd", str(initrd),
             # QEMU's threads named by their job ("CPU 0/TCG", "worker", ...): a host-side profile
             # (/proc/PID/task/*/comm, top -H) tells the vCPUs from the device model's main loop
             "-name", "nvmevfio-guest,debug-threads=on",
             # no network card: nothing in the guest uses one (NVMe/TCP runs on loopback and veth),
             # and the firmware would spend seconds of emulated CPU starting its iPXE boot ROM
             "-nic", "none",
             "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
             "-virtfs", f"local,path={io_dir},mount_tag=io,security_model=none,multidevs=remap"]
    if accel == "kvm":
        qargs += ["-accel", "kvm", "-cpu", "host"]
    else:
        qargs += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    if iommu:
        qargs += ["-device", "intel-iommu,intremap=on"]
    for tag, path, ro in shares:
        qargs += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"
                  + (",readonly=on" if ro else "")]
    qargs += list(qemu_args)
    qmp_sock = io_dir / "qmp.sock"
    qargs += ["-qmp", f"unix:{qmp_sock},server=on,wait=off"]
    config: dict = {"controllers": [], "io_dir": str(io_dir), "kernel_driver": kernel_driver,
                    "kernel": kernel, "iommu": iommu}
    addresses = []
    buses = 0  # secondary buses the firmware numbers in slot order, one per root port
    for ci, ctrl in enumerate(controllers):
        cid = f"nvme{ci}"
        opts = {"serial": f"NVMEVFIO{ci:04d}", **ctrl.options}
        dev = f"nvme,id={cid}," + ",".join(f"{k}={v}" for k, v in opts.items())
        if "subsys" in opts:  # the controller in an NVMe subsystem: namespace attachment works
            qargs += ["-device", f"nvme-subsys,id={opts['subsys']},nqn={opts['subsys']}"]
        if ctrl.hotplug:
            buses += 1
            addr = f"0000:{buses:02x}:00.0"
            qargs += ["-device", f"pcie-root-port,id=rp{ci},chassis={ci + 1},slot={ci + 1},addr={0x10 + ci:#x}",
                      "-device", f"{dev},bus=rp{ci}"]
        else:
            addr = f"0000:00:{0x10 + ci:02x}.0"
            qargs += ["-device", f"{dev},addr={0x10 + ci:#x}"]
        addresses.append(addr)
        ctrl_cfg = {"address": addr, "id": cid, "options": opts, "namespaces": [], "hotplug": ctrl.hotplug}
        for ni, ns in enumerate(ctrl.namespaces):
            image = Path(ns.image) if ns.image and not ns.null_backed else io_dir / f"{cid}n{ni + 1}.img"
            if not image.exists() and not ns.null_backed:
                with open(image, "wb") as f:
                    f.truncate(ns.size)
            drive = f"{cid}d{ni + 1}"
            qargs += ["-drive", f"{ns.drive_source(image)},if=none,id={drive},cache=writeback,discard=unmap"
                      + (f",{ns.drive}" if ns.drive else ""),
                      "-device", f"nvme-ns,drive={drive},bus={cid},nsid={ni + 1},"
                      f"logical_block_size={ns.block_size},physical_block_size={ns.block_size}"
                      + (f",ms={ns.metadata}" if ns.metadata else "")
                      + "".join(f",{k}={v}" for k, v in ns.options.items())]
            ctrl_cfg["namespaces"].append({"nsid": ni + 1, "image": NULL_CO if ns.null_backed else str(image),
                                           "size": ns.size if ns.null_backed else image.stat().st_size,
                                           "block_size": ns.block_size, "metadata": ns.metadata,
                                           "options": ns.options})
        config["controllers"].append(ctrl_cfg)
    (io_dir / "config.json").write_text(json.dumps(config, indent=2))

    genv = {
        "PATH": ":".join([*([str(venv / "bin")] if venv else []),
                          "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]),
        "HOME": "/tmp", "TERM": "dumb", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
        "NVMEVFIO_IN_GUEST": "1", "NVMEVFIO_GUEST_CONFIG": str(io_dir / "config.json"),
        "PYTHONUNBUFFERED": "1",
    }
    if venv:
        genv["VIRTUAL_ENV"] = str(venv)
    genv.update(env or {})
    script = _guest_script(io_dir=io_dir, shares=shares, addresses=addresses, kernel_driver=kernel_driver,
                           moddir=moddir, command=command, cwd=cwd or os.getcwd(), env=genv,
                           nvme_params=nvme_params)
    (io_dir / "guest.sh").write_text(script)
    # iomem=relaxed: nvme-cli's show-regs maps BAR0 through sysfs (resource0) while the kernel's nvme driver
    # holds it, which Debian's CONFIG_IO_STRICT_DEVMEM refuses otherwise (nvme-cli issue 1846); the nvme-cli
    # comparison (tests/vm/test_nvme_cli_compat.py) reads the registers both ways
    kappend = "console=ttyS0 intel_iommu=on panic=-1 quiet clocksource=tsc tsc=reliable iomem=relaxed " + append
    qargs += ["-append", kappend.strip()]

    started = time.monotonic()
    for attempt in range(1, retries + 2):
        (io_dir / "rc").unlink(missing_ok=True)
        result = _boot(qargs, io_dir, timeout, boot_timeout, echo)
        if result is not None:
            console, boot_s = result
            rc_file = io_dir / "rc"
            output = _payload_output(console)
            if not rc_file.exists():
                raise GuestError(f"the guest reached the payload but left no exit status\n{console[-3000:]}")
            return GuestResult(int(rc_file.read_text().strip() or 1), output, console, boot_s,
                               time.monotonic() - started, attempt, io_dir, config)
        if echo:
            print(f"guest: attempt {attempt} never reached the payload; retrying", file=sys.stderr)
    raise GuestError(f"the guest never reached the payload in {retries + 1} attempts "
                     f"(see {io_dir / 'console.log'})")


def _payload_output(console: str) -> str:
    text = console.replace("\r\n", "\n")
    start = text.find(START + "\n")
    end = text.rfind(END)
    if start < 0:
        return ""
    body = text[start + len(START) + 1 : end if end >= 0 else len(text)]
    return body


def _boot(qargs: list[str], io_dir: Path, timeout: float, boot_timeout: float,
          echo: bool) -> tuple[str, float] | None:
    """One boot. Returns (console, seconds to payload), or None when the payload was never reached."""
    t0 = time.monotonic()
    proc = subprocess.Popen(qargs, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf = io.StringIO()
    reached = threading.Event()
    failed = threading.Event()
    boot_s = [0.0]
    in_payload = [False]

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            buf.write(line)
            if START in line and not reached.is_set():
                boot_s[0] = time.monotonic() - t0
                reached.set()
                in_payload[0] = True
                continue
            if FAIL in line:
                failed.set()
            if END in line:
                in_payload[0] = False
            if echo and in_payload[0]:
                sys.stdout.write(line.replace("\r\n", "\n"))
                sys.stdout.flush()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    relay = QmpRelay(io_dir)
    try:
        while proc.poll() is None:
            relay.serve()
            elapsed = time.monotonic() - t0
            if not reached.is_set() and (elapsed > boot_timeout or failed.is_set()):
                proc.kill()
                break
            if elapsed > timeout:
                proc.kill()
                proc.wait()
                th.join(5)
                (io_dir / "console.log").write_text(buf.getvalue())
                raise GuestError(f"the guest did not finish within {timeout:.0f} s (console: {io_dir / 'console.log'})"
                                 f"\n{buf.getvalue()[-3000:]}")
            time.sleep(0.05)
    finally:
        relay.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        th.join(5)
    console = buf.getvalue()
    (io_dir / "console.log").write_text(console)
    if not reached.is_set():
        return None
    if failed.is_set() and END not in console:
        raise GuestError(f"guest setup failed: {console[-3000:]}")
    return console, boot_s[0]


# ---------------------------------------------------------------- the QEMU monitor, for the guest
class QmpRelay:
    """Lets the guest drive the QEMU monitor (QMP), as an operator would from the host: a guest
    writes ``qmp-<name>.request`` (a QMP command as JSON) into the shared io folder; the host runs
    it and writes the answer to ``qmp-<name>.reply``. Every QMP event (DEVICE_DELETED...) is
    appended to ``qmp-events.jsonl`` there. Served from the host's wait loop while the guest runs."""

    def __init__(self, io_dir: Path) -> None:
        self.io_dir = io_dir
        self.sock: socket.socket | None = None
        self.pending = b""

    def _connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(str(self.io_dir / "qmp.sock"))
            self.sock = sock
            self._read_message()  # the greeting
            self._send({"execute": "qmp_capabilities"})
            self._answer()
        return self.sock

    def _send(self, msg: dict) -> None:
        assert self.sock is not None
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def _read_message(self) -> dict:
        assert self.sock is not None
        while b"\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise GuestError("the QEMU monitor closed its socket")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def _answer(self) -> dict:
        """The next reply; events read on the way are logged."""
        while True:
            msg = self._read_message()
            if "event" in msg:
                self._log_event(msg)
            else:
                return msg

    def _log_event(self, msg: dict) -> None:
        with (self.io_dir / "qmp-events.jsonl").open("a") as f:
            f.write(json.dumps(msg) + "\n")

    def serve(self) -> None:
        for req in sorted(self.io_dir.glob("qmp-*.request")):
            try:
                self._connect()
                self._send(json.loads(req.read_text()))
                answer = self._answer()
            except (OSError, ValueError, GuestError) as exc:
                answer = {"error": {"class": "HostRelayError", "desc": str(exc)}}
            tmp = req.with_suffix(".tmp")
            tmp.write_text(json.dumps(answer))
            tmp.rename(req.with_suffix(".reply"))
            req.unlink()
        if self.sock is not None:  # events that came without a request
            self.sock.setblocking(False)
            try:
                while True:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        break
                    self.pending += chunk
            except BlockingIOError:
                pass
            finally:
                self.sock.settimeout(10)
            while b"\n" in self.pending:
                self._log_event(self._read_message())

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/guest.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="boot the guest and run a command in it")
    r.add_argument("--ctrl", action="append", default=[],
                   help="a controller: 'ns=SIZE[:BS][+NS_OPT=V...][@IMAGE],...;QEMU_OPT=V,...' "
                   "(repeatable; default one 64M ns; IMAGE null-co: QEMU's null-co driver, no file)")
    r.add_argument("--kernel-driver", action="store_true", help="leave the controllers with the kernel nvme driver")
    r.add_argument("--nvme-params", default="", help="kernel nvme module parameters, e.g. poll_queues=1")
    r.add_argument("--no-iommu", action="store_true", help="boot without the emulated IOMMU")
    r.add_argument("--lane", choices=list(LANES), help="boot as the guest tier does for this DMA lane "
                   "(kernel, IOMMU, no-IOMMU mode, huge pages); overrides --kernel/--no-iommu/--memory")
    r.add_argument("--kernel", choices=KERNELS, default=os.environ.get("NVMEVFIO_GUEST_KERNEL", "debian"),
                   help="guest kernel: debian (stock 6.1, boots fastest) or custom (6.12 built by "
                        "tools/build-guest-kernel.sh: iommufd, VFIO device cdevs, no-IOMMU mode)")
    r.add_argument("--accel", choices=["tcg", "kvm"], default=os.environ.get("NVMEVFIO_ACCEL", "tcg"),
                   help="tcg (default: nested KVM hangs on these hosts) or kvm")
    r.add_argument("--timeout", type=float, default=900.0, help="hard limit for the whole run, seconds")
    r.add_argument("--memory", default="2048")
    r.add_argument("--append", default="", help="extra kernel command line")
    r.add_argument("--io-dir", type=Path, help="the writable folder shared with the guest (default: a new temp dir)")
    r.add_argument("--quiet", action="store_true", help="print the output at the end, not as it comes")
    r.add_argument("--qemu-arg", action="append", default=[], help="one more QEMU argument (repeatable), e.g. "
                   "--qemu-arg=-object --qemu-arg=main-loop,id=ml,thread-pool-max=256")
    r.add_argument("command", nargs="+")
    b = sub.add_parser("build", help="build (or check) the initramfs in the cache and print its path")
    b.add_argument("--kernel", choices=KERNELS, default=os.environ.get("NVMEVFIO_GUEST_KERNEL", "debian"))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            print(build_initramfs(args.kernel))
            return 0
        ctrls = [Controller.parse(c) for c in args.ctrl] or None
        opts = {"memory": args.memory, "iommu": not args.no_iommu, "kernel": args.kernel}
        if args.lane:
            opts.update(lane_options(args.lane))
        opts["append"] = " ".join(filter(None, [opts.get("append", ""), args.append]))
        res = run(args.command, controllers=ctrls, kernel_driver=args.kernel_driver, timeout=args.timeout,
                  accel=args.accel, io_dir=args.io_dir, echo=not args.quiet, nvme_params=args.nvme_params,
                  qemu_args=tuple(args.qemu_arg), **opts)
    except GuestError as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 125
    if args.quiet:
        sys.stdout.write(res.output)
    print(f"guest: exit {res.returncode}; boot {res.boot_seconds:.1f} s, total {res.seconds:.1f} s, "
          f"attempts {res.attempts}; io {res.io_dir}", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
