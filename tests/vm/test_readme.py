"""The README's Python example and its error example, run as written against a guest controller."""

import re
from pathlib import Path

from click.testing import CliRunner

from nvmevfio import pci
from nvmevfio.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_python_example_runs(small_ctrl):
    pci.bind(small_ctrl["address"], force=True)
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert 'ADDRESS = "0000:00:10.0"' in code
    code = code.replace('ADDRESS = "0000:00:10.0"', f'ADDRESS = "{small_ctrl["address"]}"')
    exec(compile(code, "README.md", "exec"), {})


def test_error_example_matches(small_ctrl):
    text = README.read_text()
    shown = re.search(r"\$ nvmevfio read 00:10.0 --start-block 99999999\n(.*)\n", text).group(1)
    addr = small_ctrl["address"]
    r = CliRunner().invoke(main, ["read", addr, "--start-block", "99999999"])
    assert r.exit_code == 1
    assert r.stderr.strip() == shown
