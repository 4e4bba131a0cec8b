"""The Controller Memory Buffer on the simulator, which has none (CAP.CMBS 0): SQs in the CMB
are refused by name before any queue exists."""

import pytest

from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import Refused
from nvmevfio.sim.controller import SimNamespace
from nvmevfio.sim.rig import Rig


def test_sq_in_cmb_refused_without_a_cmb():
    rig = Rig([SimNamespace(1024)])
    with pytest.raises(Refused) as ei:
        BlockDevice(rig.p, 1, sq_in_cmb=True)
    assert ei.value.reason == "cmb-unavailable" and "CAP.CMBS 0" in str(ei.value)
    assert not {opc for qid, opc, _ in rig.sim.commands if qid == 0} & {0x05, 0x01}  # no CREATE I/O CQ/SQ
    assert all(off != 0x50 for off, _, _ in rig.sim.mmio.writes)  # CMBMSC untouched
