"""A pytest plugin for testing NVMe controllers through nvmevfio (``pip install nvmevfio[pytest]``;
registered through the ``pytest11`` entry point, so installing is enabling).

    pytest --nvme 0000:01:00.0 [--nvme-nsid 1] [--nvme-allow-destructive] tests/

Fixtures: ``nvme_address`` (the function, bound to vfio-pci), ``nvme_controller`` (an enabled
controller session: identify, logs, features, passthrough), ``nvme_namespace`` (a
:class:`nvmevfio.BlockDevice` on ``--nvme-nsid``) and ``nvme_buffer`` (a 1 MiB DMA buffer of it).
Tests that write or format the device are marked ``@pytest.mark.nvme_destructive`` and run only
with ``--nvme-allow-destructive``. The plugin refuses a device with a mounted filesystem (or swap,
or a holder such as LVM), whatever the options: nothing is bound or opened then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

BUFFER_BYTES = 1 << 20


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nvmevfio", "NVMe controllers through nvmevfio")
    group.addoption("--nvme", metavar="ADDRESS", help="PCI address of the NVMe controller the nvme_* fixtures use")
    group.addoption("--nvme-nsid", metavar="NSID", type=int, default=1, help="namespace of nvme_namespace (1)")
    group.addoption("--nvme-allow-destructive", action="store_true",
                    help="run tests marked nvme_destructive (they write, format or sanitize the device)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nvme_destructive: writes, formats or sanitizes the device; runs only "
                                       "with --nvme-allow-destructive")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--nvme-allow-destructive"):
        return
    skip = pytest.mark.skip(reason="destructive: pass --nvme-allow-destructive to run it")
    for item in items:
        if item.get_closest_marker("nvme_destructive") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def nvme_address(pytestconfig: pytest.Config) -> str:
    """The controller given with --nvme, bound to vfio-pci; refused when one of its namespaces is
    mounted, used as swap or held by another device."""
    from nvmevfio import pci

    address = pytestconfig.getoption("--nvme")
    if not address:
        pytest.skip("no NVMe controller: pass --nvme ADDRESS")
    fn = pci.get_function(pci.normalize_address(address))
    users = fn.users()
    if users:
        pytest.exit(f"nvmevfio: refusing {fn.address}: {'; '.join(users)} (unmount / release it first)",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    if fn.driver != "vfio-pci":
        fn = pci.bind(fn.address)
    return fn.address


@pytest.fixture
def nvme_controller(nvme_address: str) -> Iterator[Any]:
    """An enabled controller session (``nvmevfio.provider.ControllerSession``); shut down after."""
    from nvmevfio.provider import open_controller

    session = open_controller(nvme_address)
    try:
        session.enable()
        session.identify_controller()
        yield session
    finally:
        session.close()


@pytest.fixture
def nvme_namespace(nvme_address: str, pytestconfig: pytest.Config) -> Iterator[Any]:
    """Namespace --nvme-nsid as a :class:`nvmevfio.BlockDevice`; closed (CC.SHN) after."""
    import nvmevfio

    with nvmevfio.open(nvme_address, pytestconfig.getoption("--nvme-nsid")) as dev:
        yield dev


@pytest.fixture
def nvme_buffer(nvme_namespace: Any) -> Iterator[Any]:
    """A 1 MiB DMA buffer handle of ``nvme_namespace`` (scrubbed and freed after)."""
    from nvmevfio.errors import StaleHandle

    buf = nvme_namespace.alloc_buffer(BUFFER_BYTES)
    yield buf
    with contextlib.suppress(StaleHandle):  # the test may have freed it
        nvme_namespace.free_buffer(buf)
