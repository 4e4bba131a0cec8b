"""Every kind of reset against QEMU's NVMe model through real VFIO, each five times while a
verified mixed workload (the workload engine: reads, writes, flushes, write zeroes) runs in
another thread on its own queue: the workload never sees an error (its commands in flight are
requeued and end once), every block it read back was what it last wrote, afterwards its verify
map finds no lost or corrupted block, and every block it wrote carries its own LBA and a CRC
that matches. A kind the controller or the function does not offer is refused by name before
anything is touched."""

import threading
import time

import crc32c
import numpy as np
import pytest
from cli_runner import nv

import nvmevfio
from nvmevfio import perf
from nvmevfio.errors import Refused
from nvmevfio.nvme import regs
from nvmevfio.workload_map import verify_only

# type1 proves a hot reset with the group's fd, iommufd with none (the cdev); the no-IOMMU lane's
# group path is type1's. The file's name sorts before test_removal.py, which unplugs the hotplug controller.
pytestmark = pytest.mark.lanes("type1", "iommufd", why="the resets go through VFIO's group (type1) or the device "
                               "cdev (iommufd); no-IOMMU opens through a group as type1 does")
WINDOW = (8192, 12288)  # the LBAs the workload stamps and checks


def _workload_with_resets(dev, kind: str, resets: int = 5, window: tuple[int, int] = WINDOW,
                          refused: list | None = None, seconds: float = 10.0, verify_map=None) -> perf.PerfResult:
    """The workload engine for ``seconds`` (long enough for five resets of any kind, each a few
    hundred ms under TCG: at 6 s a slow boot ended it after four) with ``resets`` made under it.
    ``refused``: collect ``reset-kind-failed`` refusals (the kind failed; a CC.EN reset stood in).
    ``verify_map``: where the workload saves its verify map (then checked again after the run)."""
    out: dict[str, object] = {}

    def work() -> None:
        try:
            out["r"] = nvmevfio.workload(dev, mix="read:50,write:40,flush:5,wz:5", bs="4k:80,16k:20", queue_depth=16,
                                         seconds=seconds, lba_range=window, verify=True,
                                         verify_map=str(verify_map) if verify_map else None)
        except BaseException as exc:  # the test inspects it
            out["r"] = exc

    posted = dev.doorbell_counters()["posted"]
    t = threading.Thread(target=work)
    t.start()
    deadline = time.monotonic() + 60  # the engine's first commands: its resets count from there
    while t.is_alive() and dev.doorbell_counters()["posted"] == posted and time.monotonic() < deadline:
        time.sleep(0.05)
    done = 0
    while t.is_alive() and done < resets:
        time.sleep(0.4)
        try:
            dev.reset_controller(kind)
        except Refused as exc:
            if refused is None or exc.reason != "reset-kind-failed":
                raise
            refused.append(str(exc))
        done += 1
    t.join(120)
    r = out.get("r")
    ended = (str(r)[:600] if isinstance(r, BaseException)
             else f"{getattr(r, 'seconds', 0):.1f} s, {getattr(r, 'ios', 0)} I/Os")
    assert done == resets, f"the workload ended after {done} {kind} resets: {type(r).__name__} {ended}"
    assert not isinstance(r, BaseException), r
    print(f"{kind}: {r.ios} commands ({r.ops['write']['ios']} writes), {r.verified_blocks} blocks checked, "
          f"{r.resets} resets reported, {r.loop_recoveries} recoveries entered by the loop")
    # the workload reports every reset made under it, in its result and in the seconds they fell in
    assert r.resets == resets and sum(p["resets"] for p in r.series) <= resets, (r.resets, r.series)
    if verify_map:  # the map, read back once the resets are over: nothing lost, nothing corrupted
        rep = verify_only(dev, str(verify_map))
        assert rep["mismatch_count"] == 0 and rep["verified_blocks"] > 0, rep["mismatches"][:3]
    return r


def _every_stamped_block_is_its_own(dev, window: tuple[int, int] = WINDOW) -> int:
    lo, hi = window
    data = dev.read_blocks(lo, hi - lo).reshape(-1, dev.block_size)
    hdr = data[:, : perf.VERIFY_HEADER.itemsize].copy().view(perf.VERIFY_HEADER).reshape(-1)
    stamped = np.flatnonzero(hdr["magic"] == perf.VERIFY_MAGIC)
    for i in stamped.tolist():
        assert int(hdr["lba"][i]) == lo + i
        assert int(hdr["crc"][i]) == crc32c.crc32c(data[i, perf.VERIFY_HEADER.itemsize :].tobytes())
    return len(stamped)


@pytest.mark.parametrize("kind", ["controller", "flr"])
def test_reset_kinds_during_a_verified_workload(data_ctrl, kind, tmp_path):
    with nvmevfio.open(data_ctrl["address"], 1, queue_depth=64) as dev:
        br = dev.provider._broker
        r = _workload_with_resets(dev, kind, verify_map=tmp_path / "run.map")
        assert r.errors == 0 and r.mismatch_count == 0 and r.verified_blocks > 0, (r.errors, r.mismatches[:3])
        assert br.resets == 5 and br.failed is None
        assert _every_stamped_block_is_its_own(dev) > 0
        assert dev.doorbell_counters()["in_flight"] == 0


def test_subsystem_reset_where_offered(data_ctrl):
    with nvmevfio.open(data_ctrl["address"], 1, queue_depth=64) as dev:
        if not regs.get(dev.provider.registers().cap, regs.CAP_.NSSRS):
            with pytest.raises(Refused) as ei:
                dev.reset_controller("subsystem")
            assert ei.value.reason == "reset-kind-unavailable" and "CAP.NSSRS is 0" in str(ei.value)
            assert dev.provider._broker.resets == 0
            return
        r = _workload_with_resets(dev, "subsystem")
        assert r.errors == 0 and r.mismatches == []
        assert _every_stamped_block_is_its_own(dev) > 0


def test_hot_reset_on_a_root_port_and_refused_on_the_root_bus(data_ctrl, hotplug_ctrl):
    with nvmevfio.open(data_ctrl["address"], 1) as dev:  # an integrated endpoint: no bus of its own
        with pytest.raises(Refused) as ei:
            dev.reset_controller("hot")
        assert ei.value.reason == "reset-kind-unavailable", str(ei.value)
        assert dev.provider._broker.resets == 0
    # the hotplug controller sits alone behind a PCIe root port: VFIO's probe offers a hot reset
    # there. Debian 6.1's VFIO in this guest then fails the reset itself (ENOTTY): the broker
    # resets the controller through CC.EN instead, keeps everything in flight, and says so.
    with nvmevfio.open(hotplug_ctrl["address"], 1, queue_depth=64) as dev:
        window = (4096, 8192)  # an 8 MiB namespace
        refused: list[str] = []
        # a hot reset VFIO fails takes longer (its probe, the failed reset, then CC.EN): a longer run
        r = _workload_with_resets(dev, "hot", window=window, refused=refused, seconds=15.0)
        assert r.errors == 0 and r.mismatches == [] and r.verified_blocks > 0
        assert dev.provider._broker.resets == 5
        assert _every_stamped_block_is_its_own(dev, window) > 0
        print(f"hot reset: {5 - len(refused)} done, {len(refused)} failed in VFIO: {refused[:1]}")
        assert all("ENOTTY" in why for why in refused), refused


def test_the_command_line(data_ctrl):
    addr = data_ctrl["address"]
    r = nv("reset", addr, "--kind", "flr")
    assert r.returncode == 0 and b"flr reset done, controller enabled again" in r.stdout
    assert b"CSTS=0x00000001" in r.stdout  # RDY, after the reset
    r = nv("subsystem-reset", addr, check=False)
    assert r.returncode == 1 and b"reset-kind-unavailable" in r.stderr and b"CAP.NSSRS is 0" in r.stderr
    r = nv("reset", addr, "--kind", "hot", check=False)  # nvme-cli's reset and subsystem-reset exit 1
    assert r.returncode == 1 and b"reset-kind-unavailable" in r.stderr
