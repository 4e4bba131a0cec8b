"""What a user installs: the wheel that tools/test built from the sdist (PyPA's build) and
installed into a fresh virtual environment outside the checkout. tools/test names them in
NVMEVFIO_INSTALLED (the environment), NVMEVFIO_SDIST and NVMEVFIO_WHEEL.

Every check here runs a real process from ``/`` (never from the checkout, where ``python -m``
or ``-c`` would import the source tree) with the installed interpreter, or opens the artefacts
themselves. A subpackage forgotten by the build, a module that only imports from the source
tree, a missing data file or an sdist that cannot build the wheel fails here."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = os.environ.get("NVMEVFIO_INSTALLED")
SDIST = os.environ.get("NVMEVFIO_SDIST")
WHEEL = os.environ.get("NVMEVFIO_WHEEL")

if not (INSTALLED and SDIST and WHEEL):
    if os.environ.get("CI"):
        raise RuntimeError("tests/test_packaging.py needs NVMEVFIO_INSTALLED, NVMEVFIO_SDIST and "
                           "NVMEVFIO_WHEEL: run the suite through tools/test")
    pytest.skip("tests the installed wheel: run through tools/test (it builds and installs it)",
                allow_module_level=True)

VENV = Path(INSTALLED or "")
PYTHON = VENV / "bin" / "python"


def _run(*argv: str | Path, timeout: float = 120, env: dict[str, str] | None = None,
         cwd: str | Path = "/") -> subprocess.CompletedProcess[str]:
    """Run ``argv`` from ``cwd`` (``/``: nowhere near the checkout) without the test's PYTHONPATH."""
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={**base, **(env or {})})
    assert r.returncode == 0, f"{argv} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _source_modules() -> set[str]:
    """Every module of the package in the source tree, dotted (``nvmevfio.service.daemon``)."""
    pkg = ROOT / "nvmevfio"
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}


def _version() -> str:
    """The version the installation says it is (read from its metadata, not by importing it)."""
    return importlib.metadata.version("nvmevfio")


def test_nvmevfio_is_imported_from_the_installation_not_the_checkout():
    import nvmevfio

    here = Path(nvmevfio.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    print(f"nvmevfio imported from {here} (interpreter {sys.executable})")
    assert Path(sys.prefix).resolve() == VENV.resolve(), (sys.prefix, VENV)
    assert site in here.parents, f"{here} is not in the installation's site-packages {site}"
    assert ROOT not in here.parents, f"{here} is the source tree"
    assert ROOT not in VENV.resolve().parents, f"the test environment {VENV} is inside the checkout"


def test_the_wheel_holds_every_module_of_the_source_tree_and_its_data():
    with zipfile.ZipFile(WHEEL) as whl:
        names = set(whl.namelist())
    in_wheel = {n.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
                for n in names if n.startswith("nvmevfio/") and n.endswith(".py")}
    missing = sorted(_source_modules() - in_wheel)
    assert not missing, f"the wheel lacks {missing}"
    assert "nvmevfio/py.typed" in names
    assert "nvmevfio/nbd_plugin.py" in names  # nbdkit runs it as a file, not as an import
    assert any(n.startswith("nvmevfio/_cbits") and n.endswith(".so") for n in names), "no compiled C shim"
    assert not any(n.startswith(("tests/", "tools/", "cbits/")) for n in names), "test or build files in the wheel"
    print(f"{len(in_wheel)} modules in {Path(WHEEL or '').name}, as in the source tree")


def test_every_module_of_the_installed_package_imports():
    # Two modules are not imported: nvmevfio.__main__ runs the command line (`python -m nvmevfio`
    # runs below) and nvmevfio.nbd_plugin is the script nbdkit's embedded Python runs (it imports
    # nbdkit's own module); both are compiled instead.
    code = ("import importlib, importlib.util, pkgutil, nvmevfio\n"
            "mods = [m.name for m in pkgutil.walk_packages(nvmevfio.__path__, 'nvmevfio.')]\n"
            "for m in mods:\n"
            "    if m in ('nvmevfio.__main__', 'nvmevfio.nbd_plugin'):\n"
            "        path = importlib.util.find_spec(m).origin\n"
            "        compile(open(path).read(), path, 'exec')\n"
            "    else:\n"
            "        importlib.import_module(m)\n"
            "print(nvmevfio.__file__, *mods)\n")
    where, *mods = _run(PYTHON, "-c", code).stdout.split()
    assert VENV.resolve() in Path(where).resolve().parents, where
    # the source tree's modules, and the C shim that the build compiled
    assert {"nvmevfio", *mods} == _source_modules() | {"nvmevfio._cbits"}
    print(f"{len(mods) + 1} modules of the installed package import")
    _run(PYTHON, "-c", "import nvmevfio.service, nvmevfio.sim, nvmevfio.nvme, nvmevfio._ffi")


def test_the_command_line_runs_from_the_installation():
    version = _run(VENV / "bin" / "nvmevfio", "--version").stdout
    assert _version() in version, version
    helptext = _run(VENV / "bin" / "nvmevfio", "--help").stdout
    for command in ("list", "id-ctrl", "perf", "serve", "nbd"):
        assert command in helptext, command
    assert _version() in _run(PYTHON, "-m", "nvmevfio", "--version").stdout


def test_the_pytest_plugin_entry_point_loads(tmp_path):
    eps = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "nvmevfio"]
    assert len(eps) == 1, eps
    plugin = eps[0].load()
    assert VENV.resolve() in Path(plugin.__file__).resolve().parents
    # and pytest in that environment offers its options, from a folder with no conftest
    out = _run(VENV / "bin" / "pytest", "--help", cwd=tmp_path).stdout
    assert "--nvme=ADDRESS" in out and "--nvme-allow-destructive" in out


def test_nvmevfio_nbd_finds_its_plugin_file():
    from nvmevfio import nbd

    cmd = nbd.nbdkit_command("0000:00:04.0", 1, socket=Path("/run/x.sock"), port=None, readonly=False, queues=1,
                             block_size=512)
    plugin = Path(cmd[cmd.index("python") + 1])  # nbdkit's python plugin, then the script it runs
    assert plugin.name == "nbd_plugin.py" and plugin.is_file(), plugin
    assert VENV.resolve() in plugin.resolve().parents
    assert nbd.nbdkit_env()["PYTHONPATH"].split(os.pathsep)[0] == str(plugin.resolve().parent.parent)


def test_the_sdist_unpacked_in_an_empty_folder_builds_and_installs(tmp_path):
    with tarfile.open(SDIST) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
        if hasattr(tarfile, "data_filter"):  # 3.11.4+: refuse links and paths out of the folder
            tar.extractall(tmp_path / "src", filter="data")
        else:  # pragma: no cover - older 3.11; our own sdist, just built
            tar.extractall(tmp_path / "src")
    c_files = sorted(f"cbits/{path.name}" for path in (ROOT / "cbits").iterdir() if path.suffix in (".c", ".h"))
    for needed in ("pyproject.toml", "setup.py", "cbits/build_cbits.py", *c_files, "nvmevfio/py.typed"):
        assert needed in members, f"the sdist lacks {needed}"
    (src,) = (tmp_path / "src").iterdir()
    # pip builds in an isolated environment (setuptools, cffi from the index), as a user's pip does
    _run(PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "wheel", src, timeout=600)
    (built,) = (tmp_path / "wheel").glob("nvmevfio-*.whl")
    _run(PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp_path / "site", built, timeout=300)
    where = _run(PYTHON, "-c", "import nvmevfio._ffi, nvmevfio; print(nvmevfio.__file__)",
                 env={"PYTHONPATH": str(tmp_path / "site")}).stdout.strip()
    assert Path(where).resolve().parent == (tmp_path / "site" / "nvmevfio").resolve(), where
