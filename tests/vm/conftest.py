"""Guest-tier fixtures. These tests run inside the QEMU guest (tools/guest.py),
against QEMU's NVMe model through real VFIO and the emulated Intel IOMMU."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import nvmevfio


def _config() -> dict:
    path = os.environ.get("NVMEVFIO_GUEST_CONFIG")
    if not path or not Path(path).exists():
        raise RuntimeError("tests/vm runs inside the test guest: use tests/test_guest_tier.py or tools/guest.py")
    return json.loads(Path(path).read_text())


# The DMA lanes the guest tier boots (tools/guest.py LANES; tests/test_guest_tier.py checks the two agree).
LANES = ("type1", "iommufd", "noiommu")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lanes(*names, why): a test (or, as pytestmark, a file) of a lane-dependent file whose outcome "
        "depends on the lane only among these lanes: it runs in them alone (NVMEVFIO_VM_ALL_LANES=1: everywhere); "
        "`why` says what the others would repeat")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests a ``lanes`` mark keeps out of this guest's lane (the tier's
    LANE_DEPENDENT picks whole files; the mark narrows one where only part of it depends on the lane)."""
    lane = os.environ.get("NVMEVFIO_VM_LANE", "type1")
    keep, drop = [], []
    for item in items:
        mark = item.get_closest_marker("lanes")
        if mark is not None:
            unknown = set(mark.args) - set(LANES)
            if unknown or not mark.args or not mark.kwargs.get("why"):
                raise pytest.UsageError(f"{item.nodeid}: lanes() takes lane names out of {LANES} and why=...; "
                                        f"got {mark.args} {mark.kwargs}")
        out = mark is not None and lane not in mark.args and os.environ.get("NVMEVFIO_VM_ALL_LANES") != "1"
        (drop if out else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def guest():
    return _config()


@pytest.fixture(scope="session")
def lane():
    """The DMA lane this guest run tests (tests/test_guest_tier.py): ``type1`` on the stock Debian
    kernel, ``iommufd`` on the custom kernel, where nvmevfio's automatic choice must be iommufd."""
    return os.environ.get("NVMEVFIO_VM_LANE", "type1")


@pytest.fixture(scope="session")
def io_dir(guest):
    return Path(guest["io_dir"])


def controller(guest, role: str) -> dict:
    """The controller the host configured for ``role`` (its QEMU serial names the role)."""
    for c in guest["controllers"]:
        if c["options"].get("serial") == role:
            return c
    raise LookupError(f"no controller with role {role} in {guest['controllers']}")


@pytest.fixture(scope="session")
def data_ctrl(guest):
    """Controller with a 512-byte and a 4096-byte namespace and MDTS=0 (chained PRP lists)."""
    return controller(guest, "nvmevfio-data")


@pytest.fixture(scope="session")
def cmb_ctrl(guest):
    """Controller with a 4 MiB Controller Memory Buffer (QEMU cmb_size_mb=4) in BAR2."""
    return controller(guest, "nvmevfio-cmb")


@pytest.fixture(scope="session")
def small_ctrl(guest):
    """Controller with MDTS=5 (128 KiB) and 4 I/O queue pairs: splits, binding, kernel cross-checks."""
    return controller(guest, "nvmevfio-small")


@pytest.fixture(params=["poll", "irq", "poll-mmio", "irq-mmio"])
def dev(request, data_ctrl):
    """Every data test in both completion modes, with shadow doorbells on and off (-mmio)."""
    mode = request.param
    with nvmevfio.open(data_ctrl["address"], 1, irq=mode.startswith("irq"), queue_depth=64,
                       shadow_doorbells=not mode.endswith("mmio")) as d:
        assert d.info.shadow_doorbells == (not mode.endswith("mmio"))  # QEMU offers Doorbell Buffer Config
        yield d
        st = d.provider.doorbell_counters()
        if d.info.shadow_doorbells:
            shadow, _ = (b.array.view(np.uint32) for b in d.provider._broker._dbbuf)
            assert shadow[2] == st["sq_tail"] and shadow[3] == st["cq_head"]  # queue 1, DSTRD 0
        else:
            assert st["sq_shadow_only"] == st["cq_shadow_only"] == 0


@pytest.fixture(scope="session")
def pi_ctrl(guest):
    """Controller with protection information: 1 type 1 extended LBA (ms 8), 2 type 1 separate
    metadata (ms 8), 3 type 3 separate (ms 16, the tuple first), 4 type 1 separate (to format), 5 type 1
    with the 64-bit guard (PIF 2, ms 16)."""
    return controller(guest, "nvmevfio-pi")


@pytest.fixture(scope="session")
def slow_ctrl(guest):
    """Controller whose namespace QEMU throttles (40 IOPS): real command timeouts."""
    return controller(guest, "nvmevfio-slow")


@pytest.fixture(scope="session")
def faulty_ctrl(guest):
    """Controller whose drive fails reads of LBA 100 and writes of LBA 200 (QEMU blkdebug, EIO)."""
    return controller(guest, "nvmevfio-faulty")


@pytest.fixture(scope="session")
def hotplug_ctrl(guest):
    """Controller behind its own hot-pluggable PCIe root port (removal tests; used only there)."""
    return controller(guest, "nvmevfio-hotplug")


@pytest.fixture(scope="session")
def events_ctrl(guest):
    """Controller in an NVMe subsystem, two namespaces: namespace attachment and asynchronous events."""
    return controller(guest, "nvmevfio-events")


@pytest.fixture(scope="session")
def zns_ctrl(guest):
    """Controller with one zoned namespace (tests/test_guest_tier.py ZONED: 4 MiB zones of 3 MiB capacity,
    4096-byte blocks, 4 open / 6 active zones at most, ZASL 5, 64-byte zone descriptor extensions)."""
    return controller(guest, "nvmevfio-zns")


def qmp(io_dir: Path, execute: str, arguments: dict | None = None, timeout_s: float = 30.0) -> dict:
    """Run a QEMU monitor command from the host, as an operator would (tools/guest.py QmpRelay)."""
    name = f"qmp-{time.monotonic_ns()}"
    part = io_dir / f"{name}.part"
    part.write_text(json.dumps({"execute": execute, **({"arguments": arguments} if arguments else {})}))
    part.rename(io_dir / f"{name}.request")
    reply = io_dir / f"{name}.reply"
    deadline = time.monotonic() + timeout_s
    while not reply.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"the host did not answer QMP {execute} within {timeout_s} s")
        time.sleep(0.05)
    return json.loads(reply.read_text())


def qmp_event(io_dir: Path, event: str, timeout_s: float = 30.0, **data: str) -> dict:
    """Wait for a QEMU monitor event (relayed by the host) whose data has ``data``'s values."""
    path = io_dir / "qmp-events.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                e = json.loads(line)
                if e.get("event") == event and all(e.get("data", {}).get(k) == v for k, v in data.items()):
                    return e
        time.sleep(0.1)
    raise AssertionError(f"no QMP event {event} {data} within {timeout_s} s")


def record(io_dir: Path, name: str, entry: dict) -> None:
    """Append to a manifest the host checks against the backing images after the guest exits."""
    path = io_dir / f"{name}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def kernel_blockdev(address: str, nsid: int = 1, timeout_s: float = 10.0) -> str:
    """Hand ``address`` to the kernel nvme driver and return its namespace's block device
    (``/dev/nvmeXnY``) once it appears."""
    from nvmevfio import pci

    pci.unbind(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = [ns.name for ns in pci.get_function(address).namespaces if ns.nsid == nsid]
        if names and Path(f"/dev/{names[0]}").exists():
            return f"/dev/{names[0]}"
        time.sleep(0.05)
    raise AssertionError(f"no block device appeared for {address} namespace {nsid}")


def kernel_write(bdev: str, data: bytes, seek: int, scratch: Path) -> None:
    """Write ``data`` through the kernel's block device at 512-byte block ``seek`` (O_DIRECT, fsync)."""
    import subprocess

    scratch.write_bytes(data)
    subprocess.run(["dd", f"if={scratch}", f"of={bdev}", "bs=512", f"seek={seek}", "oflag=direct", "conv=fsync",
                    "status=none"], check=True)
