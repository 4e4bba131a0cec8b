"""The pytest plugin against QEMU's NVMe model: the README's example test file run through it, and
its refusal of a device whose namespace is mounted."""

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import controller, kernel_blockdev

from nvmevfio import pci

README = Path(__file__).resolve().parents[2] / "README.md"
# the README's example test file, run as written
EXAMPLE = re.search(r"### Testing a controller with pytest.*?```python\n(.*?)```", README.read_text(), re.S).group(1)


def run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    junit = tmp_path / "junit.xml"
    junit.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", f"--junitxml={junit}",
                        str(tmp_path / "test_example.py"), *args], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    counts = {}
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return r, counts


def test_example_file_through_the_plugin(guest, tmp_path):
    addr = controller(guest, "nvmevfio-nbd")["address"]
    """Both of the README's tests run and pass on the device. (Without --nvme-allow-destructive the
    marked one is skipped at collection, before any device is touched: tests/unit/test_pytest_plugin.py
    shows that on the host; a second process here, 35 s under the guest's emulated CPU, would show it again.)"""
    (tmp_path / "test_example.py").write_text(EXAMPLE)
    r, counts = run(tmp_path, "--nvme", addr, "--nvme-allow-destructive")
    assert r.returncode == 0 and counts == {"tests": 2, "failures": 0, "errors": 0, "skipped": 0}, r.stdout


def test_a_mounted_namespace_is_refused(guest, tmp_path):
    addr = controller(guest, "nvmevfio-nbd")["address"]
    (tmp_path / "test_example.py").write_text(EXAMPLE)
    dev = kernel_blockdev(addr)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, timeout=300)
    subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
    try:
        r, _ = run(tmp_path, "--nvme", addr, "--nvme-allow-destructive")
        assert r.returncode == 4, r.stdout + r.stderr  # pytest's usage error: nothing ran
        assert f"refusing {addr}" in r.stdout + r.stderr and "mounted on" in r.stdout + r.stderr
        assert pci.get_function(addr).driver == "nvme"  # not taken from the kernel
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
        pci.bind(addr)
