"""The guest tier: boots the QEMU test guest (q35 + intel-iommu + QEMU NVMe) and
runs tests/vm inside it through real VFIO, once per DMA lane (LANES). Fails, never
skips, when the guest cannot boot. Then checks from the host that the backing images hold exactly
the bytes the guest wrote."""

import hashlib
import json
import os
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import guest as guestlib  # tools/guest.py
import pytest

ROOT = Path(__file__).resolve().parent.parent


BLKDEBUG = """\
[inject-error]
event = "read_aio"
errno = "5"
sector = "100"
once = "off"

[inject-error]
event = "write_aio"
errno = "5"
sector = "200"
once = "off"
"""


def _controllers(io_dir):
    cfg = io_dir / "blkdebug.cfg"  # reads of sector 100 and writes of sector 200 fail with EIO
    cfg.write_text(BLKDEBUG)
    return [
        guestlib.Controller([guestlib.Namespace(64 << 20, 512), guestlib.Namespace(32 << 20, 4096),
                             guestlib.Namespace(8 << 20, 512, metadata=8)],
                            {"serial": "nvmevfio-data", "mdts": "0"}),
        guestlib.Controller([guestlib.Namespace(64 << 20, 512)],
                            {"serial": "nvmevfio-small", "mdts": "5", "max_ioqpairs": "4"}),
        # QEMU's drive throttling makes commands slow enough to time out for real (recovery tests)
        guestlib.Controller([guestlib.Namespace(8 << 20, 512, drive="throttling.iops-total=40")],
                            {"serial": "nvmevfio-slow"}),
        guestlib.Controller([guestlib.Namespace(8 << 20, 512, blkdebug=str(cfg))], {"serial": "nvmevfio-faulty"}),
        # the NBD export tests: ext4 through nbdkit and the kernel's nbd driver
        guestlib.Controller([guestlib.Namespace(256 << 20, 512)], {"serial": "nvmevfio-nbd"}),
        # on its own hot-pluggable PCIe root port: removal and hot-unplug tests (device_del)
        guestlib.Controller([guestlib.Namespace(8 << 20, 512)], {"serial": "nvmevfio-hotplug"}, hotplug=True),
        # in an NVMe subsystem (nvme-subsys): namespace attachment, and the asynchronous events it raises
        guestlib.Controller([guestlib.Namespace(8 << 20, 512), guestlib.Namespace(8 << 20, 512)],
                            {"serial": "nvmevfio-events", "subsys": "nvmevfio-subsys"}),
    ]


# The whole guest suite runs once per DMA lane (tools/guest.py LANES says how each guest boots):
# all three by default; NVMEVFIO_VM_LANES="type1" (say) runs fewer.
LANES = guestlib.LANES
SELECTED = [lane for lane in LANES if lane in os.environ.get("NVMEVFIO_VM_LANES", " ".join(LANES)).split()]


@pytest.fixture(scope="module", params=SELECTED)
def vm_run(request, tmp_path_factory):
    lane = request.param
    io_dir = tmp_path_factory.mktemp(f"guest-{lane}")
    junit = io_dir / "junit.xml"
    extra = shlex.split(os.environ.get("NVMEVFIO_VM_PYTEST_ARGS", ""))  # quoting as in a shell
    res = guestlib.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA", "tests/vm",
                        f"--junitxml={junit}", *extra],
                       controllers=_controllers(io_dir), io_dir=io_dir, cwd=str(ROOT), timeout=1500, echo=False,
                       **guestlib.lane_options(lane))
    print(res.output)
    return res, junit


def test_guest_suite_passes(vm_run):
    res, junit = vm_run
    assert res.returncode == 0, f"guest tests failed (exit {res.returncode}):\n{res.output[-20000:]}"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    # the whole guest suite is 62 tests; a subset only when NVMEVFIO_VM_PYTEST_ARGS selects one
    minimum = 1 if os.environ.get("NVMEVFIO_VM_PYTEST_ARGS") else 55
    assert counts["tests"] >= minimum and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts


def test_backing_images_hold_what_the_guest_wrote(vm_run):
    res, _ = vm_run
    manifest = res.io_dir / "images.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(entries) >= 2
    for e in entries:
        ctrl = next(c for c in res.config["controllers"] if c["address"] == e["address"])
        image = Path(next(ns["image"] for ns in ctrl["namespaces"] if ns["nsid"] == e["nsid"]))
        with image.open("rb") as f:
            f.seek(e["offset"])
            data = f.read(e["length"])
        assert len(data) == e["length"]
        assert hashlib.sha256(data).hexdigest() == e["sha256"], f"{image} at {e['offset']}"
