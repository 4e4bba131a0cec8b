import pytest

from nvmevfio.sim.rig import Rig

__all__ = ["Rig"]  # tests import it from nvmevfio.sim.rig; this name stays until none imports it here


@pytest.fixture
def rig():
    return Rig()
