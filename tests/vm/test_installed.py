"""The guest tier runs the installed package, not the checkout it was built from: tools/test
installs the wheel into a fresh environment outside the checkout and names it in
NVMEVFIO_INSTALLED; the guest's pytest and every ``python -m nvmevfio`` it starts use it.
(Run by hand from a development environment, without NVMEVFIO_INSTALLED, the test checks only
that the tests' subprocesses import the package this process imported.)"""

import os
import subprocess
import sys
from pathlib import Path

import nvmevfio

ROOT = Path(__file__).resolve().parents[2]
INSTALLED = os.environ.get("NVMEVFIO_INSTALLED")


def test_the_guest_runs_the_installed_package():
    here = Path(nvmevfio.__file__).resolve()
    print(f"guest: nvmevfio {nvmevfio.__version__} from {here}")
    # a subprocess as the tests start them (python -m nvmevfio ...), from this working directory
    r = subprocess.run([sys.executable, "-c", "import nvmevfio._ffi, nvmevfio; print(nvmevfio.__file__)"],
                       capture_output=True, text=True, timeout=120, check=True)
    assert Path(r.stdout.strip()).resolve() == here, (r.stdout, here)
    if INSTALLED:
        venv = Path(INSTALLED).resolve()
        assert venv in here.parents and ROOT not in here.parents, here
        assert Path(os.getcwd()).resolve() != ROOT
