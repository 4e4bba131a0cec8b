"""CLI checks that need no device: every command has help with an example, unique
options, the alias, the version, and clear errors for bad input."""

import warnings

import click
import pytest
from click.testing import CliRunner

from nvmevfio import __version__
from nvmevfio.cli import COMMAND_GROUPS, main

COMMANDS = sorted(main.list_commands(click.Context(main)))


def test_command_groups_name_what_each_module_defines():
    """COMMAND_GROUPS (which module to import for a command) against the modules themselves."""
    import importlib

    for group, names in COMMAND_GROUPS.items():
        module = f"nvmevfio.cli.{group}"
        importlib.import_module(module)
        defined = sorted(n for n, c in main.commands.items() if c.callback.__module__ == module)
        assert defined == sorted(names), group
    assert len(COMMANDS) == len(main.commands) == sum(len(names) for names in COMMAND_GROUPS.values())


def test_a_command_loads_only_its_group():
    """`nvmevfio id-ctrl --help` imports nvmevfio.cli.identify and none of the other groups."""
    import subprocess
    import sys

    code = ("import sys; from nvmevfio.cli import main\n"
            "try:\n    main(['id-ctrl', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('nvmevfio.cli.')), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stderr.strip().splitlines()[-1] == "['nvmevfio.cli.common', 'nvmevfio.cli.identify']", r.stderr


def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"nvmevfio, version {__version__}"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_example_and_unique_options(name):
    cmd = main.get_command(click.Context(main), name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # click warns on a duplicated option
        r = CliRunner().invoke(main, [name, "--help"])
    from nvmevfio.cli.common import NVMEVFIO_OWN

    # nvme-cli 2.3's `nvme id-ctrl --help` exits 1 (measured); nvmevfio's own commands' help exits 0
    assert r.exit_code == (0 if name in NVMEVFIO_OWN or name == "zns" else 1) and "Example" in r.output, name
    opts = [o for p in cmd.params if isinstance(p, click.Option) for o in p.opts]
    assert len(opts) == len(set(opts)), name


def test_identify_alias():
    r = CliRunner().invoke(main, ["identify", "--help"])
    assert r.exit_code == 1 and "Identify Controller" in r.output  # id-ctrl's help: nvme-cli's status, 1


def test_bad_address_is_one_line():
    r = CliRunner().invoke(main, ["id-ctrl", "zz:zz"])  # nvme-cli's command: its 1 (its main: err ? 1 : 0)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "not a PCI address" in r.stderr
    r = CliRunner().invoke(main, ["bind", "zz:zz"])  # nvmevfio's own: its setup class, 5
    assert r.exit_code == 5 and r.stderr.count("\n") == 1 and "not a PCI address" in r.stderr


def test_list_with_no_devices_is_not_an_error():
    r = CliRunner().invoke(main, ["list", "-o", "json"])
    assert r.exit_code == 0 and "Functions" in r.output


def test_shell_completion_script_and_commands():
    """click's shell completion: the bash script, and commands completed by prefix."""
    import os
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "nvmevfio")
    src = subprocess.run([exe], env={**os.environ, "_NVMEVFIO_COMPLETE": "bash_source"}, capture_output=True,
                         text=True, timeout=60)
    assert src.returncode == 0 and "_nvmevfio_completion" in src.stdout and "complete " in src.stdout
    got = subprocess.run([exe], env={**os.environ, "_NVMEVFIO_COMPLETE": "bash_complete", "COMP_WORDS": "nvmevfio id-",
                                     "COMP_CWORD": "1"}, capture_output=True, text=True, timeout=60)
    words = {line.split(",", 1)[1] for line in got.stdout.splitlines() if "," in line}
    assert words == {"id-ctrl", "id-ns"}
    got = subprocess.run([exe], env={**os.environ, "_NVMEVFIO_COMPLETE": "bash_complete",
                                     "COMP_WORDS": "nvmevfio io-passthru 00:04.0 --cdw1", "COMP_CWORD": "3"},
                         capture_output=True, text=True, timeout=60)
    assert {line.split(",", 1)[1] for line in got.stdout.splitlines()} == {f"--cdw1{i}" for i in range(6)}


def test_cpu_not_allowed_is_refused_before_the_device():
    """--cpu names a CPU this process may not use: refused, naming the ones it may, before the
    address is even looked at."""
    import os

    allowed = sorted(os.sched_getaffinity(0))
    r = CliRunner().invoke(main, ["perf", "zz:zz", "--cpu", str(allowed[-1] + 1)])
    assert r.exit_code == 1, r.output
    assert f"--cpu {allowed[-1] + 1}: this process may run on CPUs {', '.join(map(str, allowed))} only" in r.stderr
    r = CliRunner().invoke(main, ["perf", "zz:zz", "--queues", "2", "--cpu", f"0-{allowed[-1] + 1}"])
    assert r.exit_code == 1 and f"--cpu {','.join(map(str, range(allowed[-1] + 2)))}: this process may" in r.stderr
    r = CliRunner().invoke(main, ["perf", "zz:zz", "--queues", "2", "--cpu", "0-x"])
    assert r.exit_code == 1 and "expected CPU numbers and ranges, e.g. 0,1 or 0-3 or 0-1,3" in r.stderr


def test_pin_keeps_the_process_on_one_cpu():
    import os

    from nvmevfio.cli.common import _pin

    before = os.sched_getaffinity(0)
    try:
        cpu = max(before)
        _pin(cpu)
        assert os.sched_getaffinity(0) == {cpu}
        _pin(None)  # no --cpu: left alone
        assert os.sched_getaffinity(0) == {cpu}
    finally:
        os.sched_setaffinity(0, before)


# ---------------------------------------------------------------- nvme-cli's numbers, structures and exit codes
@pytest.mark.parametrize(("text", "suffix", "value"), [
    ("0", False, 0), ("28", False, 28), ("0x1c", False, 28), ("0X1C", False, 28), ("034", False, 28),
    (" 5", False, 5), ("4k", True, 4096), ("4K", True, 4096), ("4Ki", True, 4096), ("4KiB", True, 4096),
    ("2M", True, 2 << 20), ("1g", True, 1 << 30), ("0x10k", True, 16 << 10),
])
def test_numbers_as_nvme_cli_reads_them(text, suffix, value):
    from nvmevfio.cli.common import parse_number

    assert parse_number(text, suffix=suffix) == value


@pytest.mark.parametrize(("text", "suffix"), [("08", False), ("4x", True), ("1.5k", True), ("4k", False), ("", False),
                                              ("0x", False), ("-1", False)])
def test_numbers_nvme_cli_refuses(text, suffix):
    from nvmevfio.cli.common import parse_number

    with pytest.raises(ValueError, match=repr(text)):
        parse_number(text, suffix=suffix)


def test_lists_and_the_hex_dump():
    from nvmevfio.cli.common import nvme_dump, parse_list

    assert parse_list("0,0x10,010") == [0, 16, 8] and parse_list("") == []
    assert nvme_dump(bytes(range(0x41, 0x51)) + b"\x00 ~") == (
        "       0  1  2  3  4  5  6  7  8  9  a  b  c  d  e  f\n"
        '0000: 41 42 43 44 45 46 47 48 49 4a 4b 4c 4d 4e 4f 50 "ABCDEFGHIJKLMNOP"\n'
        '0010: 00 20 7e' + " " * 40 + ' "..~"\n')  # nvme-cli: 3 columns a missing byte, 2 more


def test_dsm_ranges_and_attributes():
    from nvmevfio.cli.data import dsm_attributes, dsm_ranges

    r = dsm_ranges([0x10, 0x200], [8], [])
    assert r == ((0).to_bytes(4, "little") + (8).to_bytes(4, "little") + (0x10).to_bytes(8, "little")
                 + bytes(8) + (0x200).to_bytes(8, "little"))
    assert dsm_attributes(True, False, False, 0) == 4 and dsm_attributes(False, True, True, 0) == 3
    assert dsm_attributes(True, True, True, 0x20) == 0x20  # --cdw11 wins, as in nvme-cli
    with pytest.raises(click.UsageError):
        dsm_ranges([], [], [])


def test_copy_ranges_within_mssrl_mcl_msrc():
    from nvmevfio.cli.data import copy_ranges
    from nvmevfio.errors import Refused

    r = copy_ranges([10, 0x100], [3, 0], mssrl=128, mcl=128, msrc=127)
    assert len(r) == 64 and r[8:16] == (10).to_bytes(8, "little") and r[16:18] == (3).to_bytes(2, "little")
    assert r[40:48] == (0x100).to_bytes(8, "little") and r[48:50] == bytes(2) and not any(r[:8])
    for kw, reason in (({"mssrl": 3}, "copy-range-too-long"), ({"mcl": 4}, "copy-too-long"),
                       ({"msrc": 0}, "copy-too-many-ranges")):
        limits = {"mssrl": 128, "mcl": 128, "msrc": 127, **kw}
        with pytest.raises(Refused) as ei:
            copy_ranges([10, 0x100], [3, 0], **limits)
        assert ei.value.reason == reason


def test_firmware_slots_and_ns_descriptors_as_nvme_cli():
    from nvmevfio.cli.identify import ns_descriptors
    from nvmevfio.cli.logs import firmware_slots

    page = bytearray(512)
    page[0], page[8:16] = 1, b"1.0     "
    assert firmware_slots(bytes(page)) == {"Active Firmware Slot (afi)": 1,
                                           "Firmware Rev Slot 1": "2314885530819505713 (1.0.....)"}
    raw = bytes([4, 1, 0, 0, 0]) + bytes([3, 16, 0, 0]) + bytes(range(16)) + bytes(4096 - 25)
    assert ns_descriptors(raw) == [
        {"loc": 0, "nidt": 4, "nidl": 1, "type": "csi", "csi": "0"},
        {"loc": 5, "nidt": 3, "nidl": 16, "type": "uuid", "uuid": "00010203-0405-0607-0809-0a0b0c0d0e0f"}]


def test_features_decoded_in_nvme_cli_words():
    from nvmevfio.cli.human_features import feature_fields
    from nvmevfio.cli.logs import c_hex

    assert c_hex(0) == "00000000" and c_hex(0x157) == "0x00000157"
    assert feature_fields(0x07, 0x003F003F) == ["\tNumber of IO Completion Queues Allocated (NCQA): 64",
                                                "\tNumber of IO Submission Queues Allocated (NSQA): 64"]
    assert feature_fields(0x04, 0x157)[2] == "\tTemperature Threshold         (TMPTH): 70°C (343 Kelvin)"
    assert feature_fields(0x01, 7)[3] == "\tArbitration Burst       (AB): No limit"
    assert feature_fields(0x08, 0) == ["\tAggregation Time     (TIME): 0 usec", "\tAggregation Threshold (THR): 1"]
    assert feature_fields(0x0A, 0) == ["\tDisable Normal (DN): False"] and feature_fields(0x55, 1) == []


@pytest.mark.parametrize("args", [["read", "00:04.0", "--bogus"], ["read", "00:04.0", "-c", "zz"],
                                  ["get-feature", "00:04.0", "-f", "0x100"], ["no-such-command"]])
def test_a_usage_error_exits_1_as_nvme_cli(args):
    """nvme-cli 2.3 exits 1 on a usage error (measured); click's own would be 2."""
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and ("Error:" in r.stderr), (r.exit_code, r.output)


def test_hex_option_values_are_accepted():
    r = CliRunner().invoke(main, ["read", "zz:zz", "-s", "0x10", "-c", "0x7", "-z", "4k"])
    assert r.exit_code == 1 and "not a PCI address" in r.stderr  # parsed; refused at the address


def test_every_command_is_nvme_cli_s_or_nvmevfio_s_own():
    """The exit status follows the command: nvme-cli's (0/1) unless the command is nvmevfio's own."""
    from nvme_cli_options import NVME_CLI_OPTIONS

    from nvmevfio.cli.common import NVMEVFIO_OWN

    names = {n for ns in COMMAND_GROUPS.values() for n in ns}
    assert names >= NVMEVFIO_OWN and not NVMEVFIO_OWN & set(NVME_CLI_OPTIONS)
    assert names - NVMEVFIO_OWN == set(NVME_CLI_OPTIONS) | {"zns"}  # nvme-cli's zns plugin


@pytest.mark.parametrize(("command", "code", "status"), [
    ("id-ctrl", 3, 1), ("id-ctrl", 5, 1), ("id-ctrl", 1, 1), ("subsystem-reset", 3, 1), ("zns", 3, 1),
    ("read", 0, 0), ("perf", 4, 4), ("perf", 3, 3), ("bind", 5, 5), ("nbd", 3, 3), (None, 2, 2),
])
def test_exit_status_of_a_failure_as_nvme_cli(command, code, status):
    """nvme-cli 2.3's main() returns ``err ? 1 : 0``: a refusal (3) or a setup failure (5) of one of its
    commands exits 1; nvmevfio's own commands keep 3, 4, 5."""
    from nvmevfio.cli.common import nvme_cli_status

    assert nvme_cli_status(command, code) == status


def test_a_refusal_of_an_nvme_cli_command_exits_1_and_names_its_reason(monkeypatch):
    from nvmevfio.cli import common
    from nvmevfio.errors import Refused

    def refuse(*a, **k):
        raise Refused("reset-kind-unavailable", "the controller has no NVM Subsystem Reset (CAP.NSSRS=0)")

    monkeypatch.setattr(common, "_need_root", lambda: None)
    monkeypatch.setattr("nvmevfio.pci.normalize_address", refuse)  # refused before anything is opened
    for args, code in ((["subsystem-reset", "00:04.0"], 1), (["id-ctrl", "00:04.0"], 1), (["shutdown", "00:04.0"], 3)):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == code, (args, r.output)
        assert r.stderr.count("\n") == 1 and "[reset-kind-unavailable]" in r.stderr and "refused:" in r.stderr


def test_io_queue_size_default_and_refusals_before_anything_opens():
    """--io-queue-size (perf, ublk): by default twice the depth and one, at least 256 (SPDK's
    default), capped at CAP.MQES+1 when opened; given, it must be above the depth (a queue keeps
    one entry empty); not with --socket."""
    from nvmevfio.cli.common import io_queue_entries

    assert io_queue_entries(128, None, "-q") == {"queue_depth": 257, "queue_depth_up_to": True}
    assert io_queue_entries(1, None, "-q") == {"queue_depth": 256, "queue_depth_up_to": True}
    assert io_queue_entries(1024, None, "-q") == {"queue_depth": 2049, "queue_depth_up_to": True}
    assert io_queue_entries(32, 33, "-q") == {"queue_depth": 33}
    r = CliRunner().invoke(main, ["perf", "00:10.0", "-q", "8", "--io-queue-size", "8"])
    assert r.exit_code == 1
    assert "--io-queue-size 8: a queue keeps one entry empty, so it needs more than -q 8 entries" in r.stderr
    r = CliRunner().invoke(main, ["perf", "--socket", "/nonexistent.sock", "--io-queue-size", "9"])
    assert r.exit_code == 1 and "the daemon sizes its queues" in r.stderr
