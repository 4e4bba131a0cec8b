import pytest

from nvmevfio.sim.rig import Rig


@pytest.fixture
def rig():
    return Rig()
