"""The pytest plugin against QEMU's NVMe model: the README's example test file run through it, and
its refusal of a device whose namespace is mounted."""

import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import controller, kernel_blockdev

from nvmevfio import pci

README = Path(__file__).resolve().parents[2] / "README.md"
# the README's example test file, run as written
EXAMPLE = re.search(r"### Testing a controller with pytest.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
pytest_plugins = ("pytester",)  # the example runs in a pytest session of its own, in this process


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    """The README's example file through pytest with the plugin as installed (its ``pytest11`` entry
    point), in this process (pytester: its own session, configuration and modules; a second
    interpreter costs ~35 s under the guest's emulated CPU): the run and its junit counts."""
    pytester.makepyfile(test_example=EXAMPLE)
    junit = pytester.path / "junit.xml"
    junit.unlink(missing_ok=True)
    r = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rs",
                                     f"--junitxml={junit}", "test_example.py", *args)
    counts = {}
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return r, counts


def test_example_file_through_the_plugin(guest, pytester):
    """The README's four tests (a verified mixed workload: ``nvmevfio.workload``; and one with a
    controller reset in the middle, its verify map read back after) run and pass on the device.
    Without --nvme-allow-destructive the marked ones are skipped at collection, before any device
    is touched."""
    addr = controller(guest, "nvmevfio-nbd")["address"]
    r, counts = run(pytester, "--nvme", addr, "--nvme-allow-destructive")
    assert r.ret == 0 and counts == {"tests": 4, "failures": 0, "errors": 0, "skipped": 0}, r.outlines
    r, counts = run(pytester, "--nvme", addr)
    assert r.ret == 0 and counts == {"tests": 4, "failures": 0, "errors": 0, "skipped": 3}, r.outlines
    assert "destructive: pass --nvme-allow-destructive" in r.stdout.str()


def test_a_mounted_namespace_is_refused(guest, pytester, tmp_path):
    addr = controller(guest, "nvmevfio-nbd")["address"]
    dev = kernel_blockdev(addr)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, timeout=300)
    subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
    try:
        r, _ = run(pytester, "--nvme", addr, "--nvme-allow-destructive")
        said = r.stdout.str() + r.stderr.str()
        assert r.ret == pytest.ExitCode.USAGE_ERROR, said  # 4: nothing ran
        assert f"refusing {addr}" in said and "mounted on" in said, said
        assert pci.get_function(addr).driver == "nvme"  # not taken from the kernel
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
        pci.bind(addr)
