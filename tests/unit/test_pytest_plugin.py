"""The pytest plugin on the host (no device): options, the destructive marker, the refusal of a
device in use. The guest tier runs it against a real controller (tests/vm/test_pytest_plugin.py)."""

import types

import pytest

pytest_plugins = ["pytester"]

EXAMPLE = """
import pytest

def test_reads(nvme_namespace):
    assert nvme_namespace.read_blocks(0, 1).size == nvme_namespace.block_size

@pytest.mark.nvme_destructive
def test_writes(nvme_namespace):
    nvme_namespace.write_blocks(0, bytes(nvme_namespace.block_size))
"""


def test_without_a_device_everything_skips(pytester):
    pytester.makepyfile(EXAMPLE)
    r = pytester.runpytest_inprocess("-rs")
    r.assert_outcomes(skipped=2)
    r.stdout.fnmatch_lines(["*no NVMe controller: pass --nvme ADDRESS*", "*pass --nvme-allow-destructive*"])


def test_destructive_tests_run_only_when_allowed(pytester):
    """The marker is applied at collection, whatever the device: without the option a marked test
    is skipped with the reason, an unmarked one runs; with it both run."""
    pytester.makepyfile("""
import pytest

def test_reads():
    pass

@pytest.mark.nvme_destructive
def test_writes():
    pass
""")
    r = pytester.runpytest_inprocess("-rs")
    r.assert_outcomes(passed=1, skipped=1)
    r.stdout.fnmatch_lines(["SKIPPED*.py:6: destructive: pass --nvme-allow-destructive to run it"])  # test_writes
    pytester.runpytest_inprocess("--nvme-allow-destructive").assert_outcomes(passed=2)


def test_a_device_in_use_is_refused(pytester, monkeypatch):
    from nvmevfio import pci

    fake = types.SimpleNamespace(address="0000:00:04.0", driver="nvme",
                                 users=lambda: ["/dev/nvme0n1 mounted on /data"])
    monkeypatch.setattr(pci, "get_function", lambda address: fake)
    monkeypatch.setattr(pci, "bind", lambda *a, **k: pytest.fail("bound a device in use"))
    pytester.makepyfile(EXAMPLE)
    r = pytester.runpytest_inprocess("--nvme", "00:04.0", "--nvme-allow-destructive")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stdout.fnmatch_lines(["*refusing 0000:00:04.0: /dev/nvme0n1 mounted on /data*"])


def test_options_are_registered(pytester):
    r = pytester.runpytest_inprocess("--help")
    r.stdout.fnmatch_lines(["*--nvme=ADDRESS*", "*--nvme-nsid=NSID*", "*--nvme-allow-destructive*"])
