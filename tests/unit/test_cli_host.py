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
    assert len(COMMANDS) == len(main.commands) == 42


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
    assert r.exit_code == 0 and "Example" in r.output, name
    opts = [o for p in cmd.params if isinstance(p, click.Option) for o in p.opts]
    assert len(opts) == len(set(opts)), name


def test_identify_alias():
    r = CliRunner().invoke(main, ["identify", "--help"])
    assert r.exit_code == 0 and "Identify Controller" in r.output


def test_bad_address_is_one_line():
    r = CliRunner().invoke(main, ["id-ctrl", "zz:zz"])
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
