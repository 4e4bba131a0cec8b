"""The guest tier: boots the QEMU test guest (q35 + intel-iommu + QEMU NVMe) and
runs tests/vm inside it through real VFIO, once per DMA lane (LANES). Fails, never
skips, when the guest cannot boot. Then checks from the host that the backing images hold exactly
the bytes the guest wrote."""

import hashlib
import importlib.util
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


ZONED = {"zoned": "true", "zoned.zone_size": "4M", "zoned.zone_capacity": "3M", "zoned.max_open": "4",
         "zoned.max_active": "6", "zoned.descr_ext_size": "64"}


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
        # a 4 MiB Controller Memory Buffer in BAR2 that may hold submission queues (CMBSZ.SQS)
        guestlib.Controller([guestlib.Namespace(16 << 20, 512)], {"serial": "nvmevfio-cmb", "cmb_size_mb": "4"}),
        # end-to-end protection (tests/vm/test_pi.py): type 1 extended LBA; type 1 separate metadata
        # (the kernel cross-check); type 3 with 16 bytes of metadata, the tuple first; one to format;
        # type 1 with the 64-bit guard (PIF 2)
        guestlib.Controller([guestlib.Namespace(8 << 20, 512, metadata=8, options={"pi": "1", "mset": "1"}),
                             guestlib.Namespace(8 << 20, 512, metadata=8, options={"pi": "1"}),
                             guestlib.Namespace(8 << 20, 512, metadata=16, options={"pi": "3", "pil": "1"}),
                             guestlib.Namespace(8 << 20, 512, metadata=8, options={"pi": "1"}),
                             guestlib.Namespace(8 << 20, 512, metadata=16, options={"pi": "1", "pif": "2"})],
                            {"serial": "nvmevfio-pi"}),
        # a zoned namespace (ZNS): 16 zones of 4 MiB whose capacity (3 MiB) is smaller than their size, at
        # most 4 open and 6 active zones (the limits provoked), Zone Append up to 2^5 * 4 KiB = 128 KiB
        guestlib.Controller([guestlib.Namespace(64 << 20, 4096, options=ZONED)],
                            {"serial": "nvmevfio-zns", "zoned.zasl": "5"}),
    ]


# The guest suite runs once per DMA lane (tools/guest.py LANES says how each guest boots): all
# three by default; NVMEVFIO_VM_LANES="type1" (say) runs fewer. The default lane (type1) runs every
# guest test. The other two run the files whose outcome depends on how DMA memory reaches the
# device (the lane: IOMMU mappings, iommufd's IOAS, the no-IOMMU lane's pinned pool and bounce
# copies): the data path, windows and splits, the lanes themselves, VFIO's own handles, the
# service (its shared memory is mapped per lane), recovery (requeued commands keep their
# mappings), removal (mappings released under a running perf), metadata (the broker's MPTR is a
# device address) and the block-device exports
# (NBD's plugin and ublk's C server take their buffers from the lane). What they leave out
# (identify and admin commands, logs, passthrough, events, the CLI's formatting, the pytest
# plugin, the README's examples) builds commands and parses completions the same way in every
# lane. Inside a lane-dependent file, a `lanes(...)` mark (tests/vm/conftest.py) keeps a test that
# does not depend on the lane to the lanes named, with why: ublk's refusals and its dead-server
# behaviour run in the iommufd lane only, NBD in type1 (Python plugin) and iommufd (file plugin on
# ublk). NVMEVFIO_VM_ALL_LANES=1 runs everything everywhere.
DEFAULT_LANE = "type1"
LANE_DEPENDENT = ["test_installed.py", "test_vfio.py", "test_lanes.py", "test_datapath.py", "test_windows.py",
                  "test_service.py", "test_recovery.py", "test_removal.py", "test_nbd.py", "test_ublk.py",
                  "test_sgl.py", "test_cmb.py", "test_pi.py", "test_kinds_of_reset.py"]
# Files a lane runs besides LANE_DEPENDENT (the default lane runs them anyway): the NVMe/TCP export
# (test_export.py) needs ublk, which only the custom kernel has, so the default lane can test only
# its refusal; its data path is ublk's (test_ublk.py, lane-dependent, in both custom-kernel lanes)
# and what it adds (configfs, nvmet, the TCP initiator) does not depend on the lane. So it runs once
# with ublk, in the iommufd lane, and the no-IOMMU lane is spared its ~2 minutes.
LANE_EXTRA: dict[str, tuple[str, ...]] = {"iommufd": ("test_export.py",)}
# files a lane cannot run yet, each with its issue (none now: ublk joined the no-IOMMU lane, issue 28)
NOT_YET: dict[str, tuple[str, ...]] = {}
LANES = guestlib.LANES
SELECTED = [lane for lane in LANES if lane in os.environ.get("NVMEVFIO_VM_LANES", " ".join(LANES)).split()]


def suite_paths(lane: str) -> list[str]:
    """What the guest's pytest runs in ``lane``: all of tests/vm in the default lane (or when
    NVMEVFIO_VM_ALL_LANES=1), else the lane-dependent files."""
    vm = ROOT / "tests" / "vm"
    if lane == DEFAULT_LANE or os.environ.get("NVMEVFIO_VM_ALL_LANES") == "1":
        return [str(vm)]
    # in the default lane's order (pytest's, by file name): a test that hashes a whole namespace
    # for the host to compare must still run after the tests that write to it
    names = {*LANE_DEPENDENT, *LANE_EXTRA.get(lane, ())} - set(NOT_YET.get(lane, ()))
    return [str(vm / name) for name in sorted(names)]


@pytest.fixture(scope="module", params=SELECTED)
def vm_run(request, tmp_path_factory):
    lane = request.param
    io_dir = tmp_path_factory.mktemp(f"guest-{lane}")
    junit = io_dir / "junit.xml"
    extra = shlex.split(os.environ.get("NVMEVFIO_VM_PYTEST_ARGS", ""))  # quoting as in a shell
    # Run from the writable I/O folder, not the checkout: with the checkout as the working
    # directory, `python -m ...` (pytest here, nvmevfio in the tests' subprocesses) would import
    # the package from the source tree instead of the installation under test.
    # NVMEVFIO_VM_SOAK_S: the integrity soak's length (tests/vm/test_cli.py; CI runs its default, 20 s);
    # PYTHONPATH: a developer's worktree (PYTHONPATH=/work/wt-x pytest ...) is what the guest imports too,
    # not the package the shared virtual environment installed (tools/test sets none)
    # NVMEVFIO_VM_ALL_LANES: tests/vm/conftest.py's `lanes` marks narrow nothing then
    env = {k: os.environ[k] for k in ("NVMEVFIO_INSTALLED", "NVMEVFIO_VM_SOAK_S", "PYTHONPATH", "NVMEVFIO_VM_ALL_LANES")
           if k in os.environ}
    # -p no:hypothesispytest: no guest test uses hypothesis, and its plugin's imports cost a pytest
    # start about 40 s under the guest's emulated CPU (1.5 s on the host)
    res = guestlib.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                        "-v", "-rA",
                        f"--rootdir={ROOT}", *suite_paths(lane), f"--junitxml={junit}", *extra],
                       controllers=_controllers(io_dir), io_dir=io_dir, cwd=str(io_dir), timeout=2400, echo=False,
                       **guestlib.lane_options(lane, env))
    print(res.output)
    return res, junit, lane


def test_lane_dependent_files_exist():
    """A renamed file would silently stop running outside the default lane."""
    named = [*LANE_DEPENDENT, *(n for extra in LANE_EXTRA.values() for n in extra)]
    missing = [name for name in named if not (ROOT / "tests" / "vm" / name).is_file()]
    assert set(LANE_EXTRA) <= set(LANES) - {DEFAULT_LANE}, LANE_EXTRA
    assert not missing, f"LANE_DEPENDENT or LANE_EXTRA names files that do not exist: {missing}"


def test_the_guest_suite_knows_the_same_lanes():
    """The `lanes` mark refuses a lane name the guest's conftest does not know; the two lists agree."""
    spec = importlib.util.spec_from_file_location("vm_conftest", ROOT / "tests" / "vm" / "conftest.py")
    assert spec is not None and spec.loader is not None
    vm_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vm_conftest)
    assert tuple(vm_conftest.LANES) == tuple(LANES)


def _failures(junit: Path) -> str:
    """Each failed or erred guest test: its name, message and the end of its traceback (what a
    CI log must show first; the guest's output can be thousands of log lines)."""
    if not junit.exists():
        return "(no junit report: the guest's pytest did not finish)"
    parts = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for bad in (case.find("failure"), case.find("error")):
            if bad is not None:
                text = (bad.text or "").strip().splitlines()
                parts.append(f"--- {case.get('classname')}::{case.get('name')}: {bad.get('message', '')[:2000]}\n"
                             + "\n".join(text[-40:]))
    return "\n".join(parts) or "(none in the junit report)"


def test_guest_suite_passes(vm_run):
    res, junit, lane = vm_run
    assert res.returncode == 0, (f"guest tests failed (exit {res.returncode}); the failures:\n{_failures(junit)}\n"
                                 f"--- the end of the guest's output:\n{res.output[-6000:]}")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    # the whole guest suite is over 110 tests, the lane-dependent part over 60; a subset only when
    # NVMEVFIO_VM_PYTEST_ARGS selects one
    minimum = 1 if os.environ.get("NVMEVFIO_VM_PYTEST_ARGS") else 100 if len(suite_paths(lane)) == 1 else 50
    assert counts["tests"] >= minimum and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts


def test_backing_images_hold_what_the_guest_wrote(vm_run):
    res, _, _ = vm_run
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
