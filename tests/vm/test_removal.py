"""The kernel takes the device back while nvmevfio uses it: VFIO's device request interrupt
(`echo 1 > remove`, unbind) and a hot-unplug through the QEMU monitor (device_del on a
hot-pluggable PCIe root port). nvmevfio fails its in-flight work with device-gone and releases
the device within 5 s, so the removal completes; nothing hangs. Then the re-plug: device_add
brings the controller back, nvmevfio.wait_for_device binds it to vfio-pci, and every block that
was written and flushed before the removal reads back. These tests run in file order on a
controller of their own (nvmevfio-hotplug), which the last one leaves plugged in and bound."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runner import nv
from conftest import qmp, qmp_event

import nvmevfio
from nvmevfio import pci
from nvmevfio.errors import DeviceGone, NvmeVfioError, Refused


def _wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.05)


def _fd_links(pid: int) -> list[str]:
    """What ``pid``'s open fds point at (empty once it is gone)."""
    try:
        return [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return []


def _holds_vfio_device(links: list[str]) -> bool:
    """A VFIO device fd among ``links``: anon_inode:[vfio-device] from a group (type1, no-IOMMU),
    or the device's cdev /dev/vfio/devices/vfioN (iommufd)?"""
    return any("vfio-device" in link or link.startswith("/dev/vfio/devices/") for link in links)


def _holds_request_channel(pid: int) -> bool:
    """Has ``pid`` registered its VFIO device request eventfd? ControllerSession does so right after
    opening the device and before anything else; an eventfd the kernel holds catches a request sent
    before the watcher thread polls it, but a request sent before it exists is never repeated
    sooner than 10 s (vfio_unregister_group_dev), so a removal test must wait for it."""
    links = _fd_links(pid)
    return _holds_vfio_device(links) and "anon_inode:[eventfd]" in links


def _peripherals(io_dir: Path) -> set[str]:
    """The ids of the devices under QEMU's /machine/peripheral (the monitor's qom-list)."""
    reply = qmp(io_dir, "qom-list", {"path": "/machine/peripheral"})
    assert "return" in reply, reply
    return {p["name"] for p in reply["return"] if p["type"].startswith("child<")}


def _dmesg_tail(lines: int = 30) -> str:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    return "\n".join(out.splitlines()[-lines:])


def test_kernel_remove_request_releases_the_device(hotplug_ctrl):
    addr = hotplug_ctrl["address"]
    sysfs = Path(f"/sys/bus/pci/devices/{addr}")
    data = np.random.default_rng(41).integers(0, 256, 64 * 512, dtype=np.uint8)
    dev = nvmevfio.open(addr, 1, queue_depth=32)
    dev.write_blocks(0, data)
    dev.flush()
    seen: list[BaseException] = []
    reads = [0]

    def reader() -> None:
        try:
            while True:
                assert np.array_equal(dev.read_blocks(0, 64), data)
                reads[0] += 1
        except (DeviceGone, Refused) as exc:
            seen.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    _wait_for(lambda: reads[0] >= 3, 30, "the reader did not get going")
    t0 = time.monotonic()
    # the kernel's removal blocks in vfio-pci until the device is released (device request)
    subprocess.run(["sh", "-c", f"echo 1 > {sysfs}/remove"], check=True, timeout=60)
    took = time.monotonic() - t0
    t.join(10)
    assert not t.is_alive(), "the I/O thread is stuck"
    assert took < 5, f"the removal waited {took:.1f} s for nvmevfio"
    assert not sysfs.exists()
    assert seen and seen[0].reason == "device-gone", seen
    assert dev.provider.released and "asked for the device back" in dev.provider.released
    with pytest.raises(Refused) as ei:
        dev.read_blocks(0, 1)
    assert ei.value.reason == "device-gone" and "asked for the device back" in str(ei.value)
    dev.close()  # nothing left to release; no error

    # The device comes back on a rescan (the kernel nvme driver takes it); it holds the data.
    subprocess.run(["sh", "-c", "echo 1 > /sys/bus/pci/rescan"], check=True, timeout=60)
    _wait_for(sysfs.exists, 30, f"{addr} did not come back on a rescan")
    pci.bind(addr, force=False)
    with nvmevfio.open(addr, 1) as dev2:
        assert np.array_equal(dev2.read_blocks(0, 64), data)


def test_hot_unplug_while_perf_runs(hotplug_ctrl, io_dir):
    """device_del on the root port: the guest's pciehp removes the function (after its 5 s
    attention-button delay), vfio-pci asks for the device back, `nvmevfio perf` ends with a
    clear error, and QEMU finishes deleting the device."""
    addr, qid = hotplug_ctrl["address"], hotplug_ctrl["id"]
    if pci.get_function(addr).driver != "vfio-pci":
        pci.bind(addr)
    log = Path("/tmp/perf-unplug.err")
    with log.open("w") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "nvmevfio", "perf", addr, "-w", "randrw", "-q", "16",
                                 "-t", "120"], stdout=subprocess.PIPE, stderr=errf, text=True)
    try:
        # perf has the device, and will hear the kernel's request, once it holds the VFIO device fd
        # and the request eventfd (imports take seconds under TCG)
        _wait_for(lambda: proc.poll() is not None or _holds_request_channel(proc.pid), 60, "perf did not start")
        time.sleep(2)  # enabled, queues created, I/O running
        assert proc.poll() is None, log.read_text()
        reply = qmp(io_dir, "device_del", {"id": qid})
        assert "return" in reply, reply
        t0 = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"perf still running 60 s after device_del; its stderr:\n{log.read_text()}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - t0
    err = log.read_text()
    assert proc.returncode not in (0, None), out
    assert "device is gone" in err and "asked for the device back" in err, err
    assert "Traceback" not in err
    # The guest's pciehp finished (the function gone, the slot powered off), then QEMU unplugged
    # the controller: it left the monitor's tree at once. QEMU 7.2 says DEVICE_DELETED only when
    # the object is finalized, which one CI run never saw within 60 s (its namespace's event
    # came): the tree is the proof, the event is printed when it comes.
    try:
        _wait_for(lambda: not Path(f"/sys/bus/pci/devices/{addr}").exists(), 60, f"{addr} not removed from the guest")
        _wait_for(lambda: qid not in _peripherals(io_dir), 60, f"{qid} not unplugged by QEMU")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; dmesg:\n{_dmesg_tail()}") from None
    try:
        print(qmp_event(io_dir, "DEVICE_DELETED", 5, device=qid))
    except AssertionError as exc:
        print(f"{exc} (QEMU deletes the object when its last reference goes)")
    print(f"perf ended {took:.1f} s after device_del")
    assert took < 15, f"perf took {took:.1f} s to end (pciehp waits 5 s before removing); its stderr:\n{err}\n" \
                      f"dmesg:\n{_dmesg_tail()}"
    with pytest.raises(NvmeVfioError):
        nvmevfio.open(addr, 1)


# ---------------------------------------------------------------- surprise removal and re-plug
STAMP = np.dtype([("lba", "<u8"), ("gen", "<u8")])


def _stamped(lba: int, gen: int, count: int, bs: int = 512) -> np.ndarray:
    """``count`` blocks from ``lba``, each its own LBA and generation first, then bytes that follow
    from both: what a block holds tells which write put it there."""
    out = np.empty(count * bs, dtype=np.uint8)
    for b in range(count):
        block = out[b * bs : (b + 1) * bs]
        block[: STAMP.itemsize] = np.array([(lba + b, gen)], dtype=STAMP).view(np.uint8)
        block[STAMP.itemsize :] = np.random.default_rng([lba + b, gen]).integers(0, 256, bs - STAMP.itemsize,
                                                                              dtype=np.uint8)
    return out


def _replug(io_dir: Path, ctrl: dict) -> None:
    """device_add the hot-plug controller again, on its root port, over its namespace's image. QEMU
    7.2 keeps the nvme-ns's -drive after device_del (printed below), but device models that mark
    their drive for deletion on unplug exist: the image comes back as a block node of its own
    (blockdev-add), which a later unplug leaves alone.
    The controller's one namespace is the legacy drive= namespace 1 (512-byte blocks, as before)."""
    qid = ctrl["id"]
    port = "rp" + qid.removeprefix("nvme")  # tools/guest.py: controller i (nvme<i>) on root port rp<i>
    node = f"{qid}-replug"
    nodes = qmp(io_dir, "query-named-block-nodes")
    assert "return" in nodes, nodes
    names = {b.get("node-name") for b in nodes["return"]}
    drives = qmp(io_dir, "query-block").get("return", [])
    print(f"drives before the re-plug: {sorted(d.get('device') or d.get('qdev', '') for d in drives)}")
    if node not in names:
        reply = qmp(io_dir, "blockdev-add", {"driver": "raw", "node-name": node, "discard": "unmap",
                                             "file": {"driver": "file", "filename": ctrl["namespaces"][0]["image"],
                                                      "locking": "off"}})
        assert "return" in reply, reply
    reply = qmp(io_dir, "device_add", {"driver": "nvme", "id": qid, "bus": port, "drive": node,
                                       **ctrl["options"]})
    assert "return" in reply, reply


@pytest.mark.lanes("type1", "iommufd", why="the re-plug is PCI hotplug and VFIO's bind; the no-IOMMU lane's "
                   "group opens as type1's does")
def test_surprise_removal_then_replug(hotplug_ctrl, io_dir):
    """Writes with a Flush every few run in a thread; device_del takes the controller away; the thread
    ends with device-gone; device_add brings it back, wait_for_device binds it, and every block whose
    write was acknowledged and then flushed reads back as that write or a later one, intact."""
    addr, qid = hotplug_ctrl["address"], hotplug_ctrl["id"]
    sysfs = Path(f"/sys/bus/pci/devices/{addr}")
    if not sysfs.exists():  # the test above unplugged it: back, and bound by the command line's form
        _replug(io_dir, hotplug_ctrl)
        out = nv("bind", addr, "--wait", "60").stdout.decode()
        assert f"{addr}: bound to vfio-pci" in out, out
    assert nvmevfio.wait_for_device(addr, 5).driver == "vfio-pci"  # there and bound: returns at once
    dev = nvmevfio.open(addr, 1, queue_depth=32)
    n = dev.block_count
    written: dict[int, list[int]] = {}  # lba -> every generation written there, in order
    flushed: dict[int, int] = {}  # lba -> the generation a completed Flush covers
    gen = [0]
    seen: list[BaseException] = []
    rng = np.random.default_rng(7)

    def writer() -> None:
        try:
            while True:
                batch = []
                for _ in range(4):
                    gen[0] += 1
                    lba = int(rng.integers(0, n // 8)) * 8
                    for b in range(8):  # before the write: one in flight at the removal may land
                        written.setdefault(lba + b, []).append(gen[0])
                    dev.write_blocks(lba, _stamped(lba, gen[0], 8))
                    batch.append((lba, gen[0]))
                dev.flush()
                for lba, g in batch:
                    for b in range(8):
                        flushed[lba + b] = g
        except (DeviceGone, Refused) as exc:
            seen.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    _wait_for(lambda: len(flushed) >= 64 * 8 or not t.is_alive(), 60, "the writer did not get going")
    reply = qmp(io_dir, "device_del", {"id": qid})
    assert "return" in reply, reply
    t.join(30)
    assert not t.is_alive(), "the writer is stuck"
    assert seen and seen[0].reason == "device-gone", seen
    dev.close()
    _wait_for(lambda: not sysfs.exists(), 60, f"{addr} not removed from the guest")
    _wait_for(lambda: qid not in _peripherals(io_dir), 60, f"{qid} not unplugged by QEMU")

    t0 = time.monotonic()
    _replug(io_dir, hotplug_ctrl)
    fn = nvmevfio.wait_for_device(addr, 60)
    print(f"{addr} back and bound to {fn.driver} {time.monotonic() - t0:.1f} s after device_add")
    assert fn.driver == "vfio-pci"
    with nvmevfio.open(addr, 1) as dev2:
        assert dev2.block_count == n
        data = dev2.read_blocks(0, n).reshape(n, 512)
    bad = []
    for lba, g in flushed.items():
        head = data[lba, : STAMP.itemsize].view(STAMP)[0]
        later = [x for x in written[lba] if x >= g]  # a later write may have landed before the removal
        if int(head["lba"]) != lba or int(head["gen"]) not in later or \
                not np.array_equal(data[lba], _stamped(lba, int(head["gen"]), 1)):
            bad.append((lba, g, int(head["lba"]), int(head["gen"])))
    print(f"{len(flushed)} flushed blocks checked after the re-plug, {gen[0]} writes before the removal")
    assert not bad, bad[:10]
