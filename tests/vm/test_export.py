"""A namespace over NVMe/TCP: `nvmevfio export` puts its ublk device behind Linux's NVMe target
(nvmet, through configfs) and the guest's own NVMe/TCP initiator attaches it on the loopback
address (`nvme discover`, `nvme connect` from nvme-cli). ext4 on the attached /dev/nvmeXnY keeps
every file's SHA-256 across a disconnect and a reconnect, fsck is clean, fio verifies its own
data; a host not on the list is refused; a SIGKILLed --recoverable server is recovered
(`nvmevfio ublk --recover`) under a writer that carries on with every fsync'd file intact;
--stop while connected takes the subsystem away from the initiator and leaves nothing in
configfs, nor the ublk device; a --read-only export fails the initiator's writes.

One export is shared by the tests that need the same one (each `python -m nvmevfio` costs 5-8 s
under the guest's emulated CPU); the read-only one is its own.

The type1 lane boots Debian's 6.1 kernel, which has no ublk: there the one test is that export
says so in one line, with nothing written to configfs. The data path under the export is
ublk's (tests/vm/test_ublk.py, in both custom-kernel lanes); this file runs in the iommufd lane
only among those (tests/test_guest_tier.py, LANE_EXTRA)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import controller
from disk_checks import (
    aligned,
    check_tree,
    crash_and_recover,
    fio_verify,
    fsck_clean,
    mkfs,
    mount,
    nv,
    one_line_error,
    sh,
    sizes,
    umount,
    umount_after_crash,
    write_tree,
)

from nvmevfio import export as ex
from nvmevfio import ublk_devices as ubd

UBLK = Path("/dev/ublk-control").exists()
NVMET = Path("/sys/kernel/config/nvmet")
HOST = "nqn.2014-08.org.nvmexpress:uuid:6e766d65-7666-696f-0000-000000000001"
STRANGER = "nqn.2014-08.org.nvmexpress:uuid:6e766d65-7666-696f-0000-000000000002"
ADDR, PORT, RO_PORT = "127.0.0.1", "4420", "4421"
MNT = Path("/tmp/export-mnt")
# the initiator gives a lost target up after 10 s and retries every 2 s (nvme connect's defaults:
# 600 s and 10 s)
CONNECT_OPTS = ("--ctrl-loss-tmo", "10", "--reconnect-delay", "2")


@pytest.fixture(scope="module")
def export_ctrl(guest):
    """The NBD tests' controller (256 MiB, 512-byte blocks); test_nbd.py and test_ublk.py format it again."""
    return controller(guest, "nvmevfio-nbd")


def test_the_nvme_target_and_the_tcp_initiator_are_loaded():
    """The harness loads nvmet, nvmet-tcp and nvme-tcp and mounts configfs on both kernels."""
    assert NVMET.is_dir() and Path("/sys/module/nvmet_tcp").is_dir() and Path("/sys/module/nvme_tcp").is_dir()


if not UBLK:

    def test_export_without_ublk_is_one_line_naming_what_to_load(export_ctrl):
        res = nv("export", export_ctrl["address"], "--tcp", f"{ADDR}:{PORT}", "--allow-host", HOST, check=False)
        line = one_line_error(res)
        assert "ublk is not available" in line and "modprobe ublk_drv" in line, line
        assert res.returncode == 5  # setup
        assert os.listdir(NVMET / "subsystems") == [] and os.listdir(NVMET / "ports") == []

else:

    def nvme(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["nvme", *args], capture_output=True, text=True, timeout=120)
        if check:
            assert res.returncode == 0, f"nvme {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res

    def controllers_of(nqn: str) -> list[Path]:
        """The initiator's controllers (/sys/class/nvme/nvmeN) attached to subsystem ``nqn``."""
        out = []
        for c in Path("/sys/class/nvme").glob("nvme*"):
            try:
                if (c / "subsysnqn").read_text().strip() == nqn:
                    out.append(c)
            except OSError:
                continue  # going away
        return out

    def connect(nqn: str, port: str = PORT) -> str:
        """`nvme connect` as HOST; the new namespace's block device once it is there."""
        nvme("connect", "-t", "tcp", "-a", ADDR, "-s", port, "-n", nqn, "--hostnqn", HOST, *CONNECT_OPTS)
        deadline = time.monotonic() + 30
        while True:
            devs = [f"/dev/{n.name}" for c in controllers_of(nqn) for n in c.glob(f"{c.name}n*")
                    if Path(f"/dev/{n.name}").exists()]
            if devs:
                return devs[0]
            assert time.monotonic() < deadline, f"no namespace appeared for {nqn}"
            time.sleep(0.1)

    def connect_dev(nqn: str) -> str:
        """The block device of ``nqn``'s attachment now."""
        c = controllers_of(nqn)[0]
        return f"/dev/{next(c.glob(f'{c.name}n*')).name}"

    def disconnect(nqn: str) -> None:
        nvme("disconnect", "-n", nqn)
        deadline = time.monotonic() + 30
        while controllers_of(nqn):
            assert time.monotonic() < deadline, f"{nqn} stayed connected"
            time.sleep(0.1)

    def start_export(addr: str, *extra: str) -> dict:
        return json.loads(nv("export", addr, "-o", "json", "--allow-host", HOST, *extra, timeout=300).stdout)

    def configfs_holds(info: dict) -> list[str]:
        """Whatever of the export is still in configfs."""
        left = [str(p) for p in NVMET.glob("*/*") if info["nqn"] in p.name]
        left += [str(p) for p in NVMET.glob("ports/*/subsystems/*")]
        left += [str(p) for p in NVMET.glob("ports/*")] + [str(p) for p in NVMET.glob("hosts/*")]
        return left

    @pytest.fixture(scope="module")
    def exported(export_ctrl):
        """The shared export: its ublk server --recoverable, HOST allowed, on 127.0.0.1:4420."""
        info = start_export(export_ctrl["address"], "--tcp", f"{ADDR}:{PORT}", "--recoverable")
        yield info
        if MNT.is_mount():
            umount_after_crash(MNT)
        if controllers_of(info["nqn"]):
            nvme("disconnect", "-n", info["nqn"], check=False)
        if any(r.nqn == info["nqn"] for r in ex.load_records()):  # a test failed before --stop
            nv("export", export_ctrl["address"], "--stop", check=False, timeout=300)
        for d in ubd.list_devices():
            if d.address == export_ctrl["address"]:
                ubd.stop_device(d.dev_id)

    def test_discovery_lists_the_subsystem_and_a_host_not_on_the_list_is_refused(exported):
        nqn = exported["nqn"]
        assert nqn == "nqn.2014-08.org.nvmexpress:nvmevfio:nvmevfio-nbd:ns1"  # serial and namespace
        assert exported["connect"] == f"nvme connect -t tcp -a {ADDR} -s {PORT} -n {nqn}"
        log = nvme("discover", "-t", "tcp", "-a", ADDR, "-s", PORT, "--hostnqn", HOST).stdout
        assert f"subnqn:  {nqn}" in log and "trtype:  tcp" in log, log
        assert f"subnqn:  {nqn}" not in nvme("discover", "-t", "tcp", "-a", ADDR, "-s", PORT,
                                              "--hostnqn", STRANGER).stdout
        res = nvme("connect", "-t", "tcp", "-a", ADDR, "-s", PORT, "-n", nqn, "--hostnqn", STRANGER, check=False)
        assert res.returncode != 0 and not controllers_of(nqn), res
        # what --list shows, and configfs as nvmet holds it: only HOST, never any host
        listed = json.loads(nv("export", "--list", "-o", "json").stdout)
        assert [(r["nqn"], r["tcp"], r["hosts"], r["any_host"], r["live"]) for r in listed] == \
            [(nqn, f"{ADDR}:{PORT}", [HOST], False, True)]
        sub = NVMET / "subsystems" / nqn
        assert (sub / "attr_allow_any_host").read_text().strip() == "0"
        assert os.listdir(sub / "allowed_hosts") == [HOST]
        assert (sub / "namespaces/1/device_path").read_text().strip() == exported["device"]

    def test_ext4_over_tcp_keeps_every_sha256_across_a_reconnect_and_fio_verifies(exported):
        nqn = exported["nqn"]
        dev = connect(nqn)
        mkfs(dev, "-E", "nodiscard")
        mount(dev, MNT)
        manifest = write_tree(MNT / "tree", sizes(2000, 32), seed=41)
        sh("sync")
        umount(MNT)
        disconnect(nqn)
        dev = connect(nqn)  # a new controller: only the target's bytes remain
        mount(dev, MNT)
        check_tree(MNT / "tree", manifest)
        assert len(manifest) == 2000
        fio_verify(f"--directory={MNT}", "--size=16M", "--rw=randrw", "--ioengine=psync")
        for f in MNT.glob("verify.*"):
            f.unlink()
        umount(MNT)
        fsck_clean(dev)
        mount(dev, MNT)  # for the crash test

    def test_a_killed_server_is_recovered_and_the_initiator_carries_on(exported):
        if not MNT.is_mount():
            mount(connect(exported["nqn"]), MNT)
        d = next(d for d in ubd.list_devices() if d.dev_id == exported["dev_id"])
        writer, _ = crash_and_recover(MNT / "crash", d.server_pid, d.dev_id)  # the writer goes through TCP
        assert controllers_of(exported["nqn"])  # the same attachment (reconnected if it had to)
        sh("sync")
        dev = connect_dev(exported["nqn"])
        umount(MNT)
        fsck_clean(dev)
        mount(dev, MNT)
        writer.check(MNT / "crash")
        umount(MNT)

    def test_stop_while_connected_takes_the_subsystem_away_and_leaves_nothing(exported, export_ctrl):
        nqn = exported["nqn"]
        if not controllers_of(nqn):
            connect(nqn)
        ctrl = controllers_of(nqn)[0]
        out = nv("export", export_ctrl["address"], "--stop", timeout=300).stdout
        assert f"{nqn}: export stopped; {exported['device']} stopped" in out, out
        deadline = time.monotonic() + 20  # the target dropped the connection: the initiator is no longer live
        while ctrl.exists() and (ctrl / "state").read_text().strip() == "live":
            assert time.monotonic() < deadline, "the initiator's controller stayed live"
            time.sleep(0.1)
        res = nvme("connect", "-t", "tcp", "-a", ADDR, "-s", PORT, "-n", nqn, "--hostnqn", HOST, "-D", check=False)
        assert res.returncode != 0, res  # nothing listens any more
        assert not Path(exported["device"]).exists()
        assert all(d.dev_id != exported["dev_id"] for d in ubd.list_devices())
        assert configfs_holds(exported) == []
        assert ex.load_records() == []  # what --list reads (the CLI's --list is checked above)
        if controllers_of(nqn):
            nvme("disconnect", "-n", nqn, check=False)

    def test_a_read_only_export_refuses_the_initiators_writes(guest):
        small = controller(guest, "nvmevfio-small")
        info = start_export(small["address"], "--tcp", f"{ADDR}:{RO_PORT}", "--read-only")
        assert info["read_only"]
        try:
            dev = connect(info["nqn"], RO_PORT)
            fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
            buf = aligned(4096)
            try:
                before = bytes(buf) if os.preadv(fd, [buf], 1 << 20) == 4096 else b""
                assert len(before) == 4096  # reads are served
                buf[:] = b"\x5a" * 4096
                with pytest.raises(OSError) as e:
                    os.pwritev(fd, [buf], 1 << 20)
                assert e.value.errno == 5  # EIO: the server refused the write (EROFS), nvmet says Internal Error
                assert os.preadv(fd, [buf], 1 << 20) == 4096 and bytes(buf) == before
            finally:
                os.close(fd)
            disconnect(info["nqn"])
        finally:
            if controllers_of(info["nqn"]):
                nvme("disconnect", "-n", info["nqn"], check=False)
            nv("export", small["address"], "--stop", timeout=300)
        assert configfs_holds(info) == []
