"""The validated (Model B) lane over the simulator: the client writes raw SQEs, PRP lists
included, into its shared ring; the daemon's validator checks each on the doorbell. One
hostile entry per refusal label, each answered with that label while the device sees no
command and the data stays; a PRP-list page rewritten after the check changes nothing."""

import os
import threading

import numpy as np
import pytest

import nvmevfio
from nvmevfio.nvme import prp
from nvmevfio.nvme.spec import SQE, IoOpcode
from nvmevfio.service import validator
from nvmevfio.service.daemon import Service
from nvmevfio.service.grants import parse_grants
from nvmevfio.sim.controller import SimNamespace
from nvmevfio.sim.rig import Rig

FIRST, BLOCKS = 1000, 2000
GRANTS = f"""
[[grant]]
uid = {os.getuid()}
nsid = 1
first_lba = {FIRST}
blocks = {BLOCKS}
access = "rw"
queue_depth = 16
dma_memory = "1M"
lanes = ["default", "validated"]
"""


@pytest.fixture
def served(tmp_path):
    rig = Rig([SimNamespace(8192), SimNamespace(1024)], mdts=5)  # 128 KiB per command
    service = Service(rig.p, parse_grants(GRANTS), str(tmp_path / "s.sock"), clients=2, queue_depth=32, irq=False)
    service.start()
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    yield rig, service, str(tmp_path / "s.sock")
    service.stop()
    thread.join(10)
    service.close()


def sqe(opc, slba=0, nlb=1, prp1=0, prp2=0, cid=1, nsid=1, **extra):
    e = np.zeros(1, dtype=SQE)
    e["opc"], e["cid"], e["nsid"], e["prp1"], e["prp2"] = opc, cid, nsid, prp1, prp2
    e["cdw10"], e["cdw11"], e["cdw12"] = slba & 0xFFFFFFFF, slba >> 32, nlb - 1
    for k, v in extra.items():
        e[k] = v
    return e


def one(dev, e):
    dev.submit_raw(e)
    return dev.reap(1)[0]


def test_raw_entries_with_prp_lists_move_the_right_bytes(served):
    rig, _, path = served
    ns = rig.sim.namespaces[0]
    with nvmevfio.connect(path, 1, lane="validated") as dev:
        assert dev.lane == "validated" and dev.page_size == 4096
        data = dev.alloc_buffer(64 << 10)
        lists = dev.alloc_buffer(4096)
        assert data.iova is not None and data.iova % 4096 == 0
        payload = np.random.default_rng(3).integers(0, 256, 64 << 10, dtype=np.uint8)
        data.array[:] = payload
        # 64 KiB: PRP1 + a list page of 15 entries, in the client's own list buffer
        p = prp.build(data.iova, 64 << 10, 4096, [lists.iova])
        lists.array.view(np.uint64)[: len(p.lists[0])] = p.lists[0]
        rec = one(dev, sqe(IoOpcode.WRITE, 10, 128, p.prp1, p.prp2, cid=7))
        assert (rec["tag"], rec["status"], rec["reason"]) == (7, 0, "")
        assert np.array_equal(ns.data[(FIRST + 10) * 512 : (FIRST + 138) * 512], payload)  # moved into the window
        data.array[:] = 0
        rec = one(dev, sqe(IoOpcode.READ, 10, 128, p.prp1, p.prp2, cid=8))
        assert rec["status"] == 0 and np.array_equal(data.array, payload)
        assert one(dev, sqe(IoOpcode.FLUSH, cid=9))["status"] == 0
        assert one(dev, sqe(IoOpcode.WRITE_ZEROES, 10, 8, cid=10))["status"] == 0
        assert not ns.data[(FIRST + 10) * 512 : (FIRST + 18) * 512].any()
        # Dataset Management, deallocate (AD): the range list in the client's buffer, moved into the window
        rng = np.zeros(1, dtype=validator.DSM_RANGE)
        rng["slba"], rng["nlb"] = 18, 8
        lists.array[:16] = rng.view(np.uint8)
        rec = one(dev, sqe(IoOpcode.DATASET_MANAGEMENT, prp1=lists.iova, cid=11, cdw10=0, cdw11=4, cdw12=0))
        assert rec["status"] == 0 and not ns.data[(FIRST + 18) * 512 : (FIRST + 26) * 512].any()


def test_each_refusal_label(served):
    rig, _service, path = served
    ns = rig.sim.namespaces[0]
    before = ns.data.copy()
    with nvmevfio.connect(path, 1, lane="validated") as dev:
        buf = dev.alloc_buffer(6000)  # not a whole number of pages: a transfer can run past its end
        lists = dev.alloc_buffer(4096)
        freed = dev.alloc_buffer(4096)
        old = freed.iova
        dev.free_buffer(freed)
        broker_memory = rig.broker.ledger.iova(rig.broker.admin.buffers[0])  # the admin SQ
        b = buf.iova
        lists.array.view(np.uint64)[:3] = [b + 4096, b + 8192, b + 12288]  # pages past the buffer
        hostile = {
            "out-of-window": sqe(IoOpcode.READ, BLOCKS - 1, 2, b),
            "host-physical": sqe(IoOpcode.READ, 0, 1, 1 << 41),
            "cross-owner-alias": sqe(IoOpcode.WRITE, 0, 1, broker_memory),
            "region-overrun": sqe(IoOpcode.WRITE, 0, 16, b, b + 4096),  # 8 KiB from a 6000-byte buffer
            "unaligned": sqe(IoOpcode.WRITE, 0, 16, b, b + 4096 + 8),
            "deep-prp-chain": sqe(IoOpcode.READ, 0, 257, b, lists.iova),  # 128.5 KiB: more than MDTS
            "stale-generation": sqe(IoOpcode.READ, 0, 1, old),
            "invalid-region": sqe(IoOpcode.READ, 0, 1, 1 << 39),
            "disallowed-opcode": sqe(0x05, 0, 1, b),  # Compare
            "disallowed-namespace": sqe(IoOpcode.READ, 0, 1, b, nsid=2),
        }
        assert set(hostile) == set(validator.LABELS)
        commands = len(rig.sim.commands)
        for label, e in hostile.items():
            e["cid"] = 100 + len(label)
            rec = one(dev, e)
            assert (rec["reason"], int(rec["tag"])) == (label, 100 + len(label)), label
        assert len(rig.sim.commands) == commands  # nothing of them reached the device
        assert np.array_equal(ns.data, before)
        # a batch mixing good and hostile entries: the good ones go through
        entries = np.concatenate([sqe(IoOpcode.READ, 0, 1, b, cid=1), sqe(IoOpcode.READ, 0, 1, 1 << 41, cid=2),
                                  sqe(IoOpcode.READ, 1, 1, b + 512, cid=3)])
        dev.submit_raw(entries)
        got = {int(r["tag"]): str(r["reason"]) for r in dev.reap(3)}
        assert got == {1: "", 2: "host-physical", 3: ""}
        assert dev.status()["session"]["refused"] == len(hostile) + 1


def test_a_list_rewritten_after_the_check_changes_nothing(served, monkeypatch):
    """The client rewrites its PRP-list page the moment the validator has checked it (the
    hook below runs exactly then): the device follows the broker's copy of the checked list."""
    rig, _, path = served
    ns = rig.sim.namespaces[0]
    with nvmevfio.connect(path, 1, lane="validated") as dev:
        good = dev.alloc_buffer(16384)
        other = dev.alloc_buffer(16384)
        lists = dev.alloc_buffer(4096)
        good.array[:] = 0x11
        other.array[:] = 0x22
        p = prp.build(good.iova, 16384, 4096, [lists.iova])
        page = lists.array.view(np.uint64)
        page[:3] = p.lists[0]
        real = validator.validate

        def validate_then_rewrite(*args, **kw):
            verdict = real(*args, **kw)
            page[:3] = [other.iova, other.iova + 4096, other.iova + 8192]  # after the check
            return verdict

        monkeypatch.setattr(validator, "validate", validate_then_rewrite)  # as the validated lane calls it
        rec = one(dev, sqe(IoOpcode.WRITE, 0, 32, p.prp1, p.prp2))
        assert rec["status"] == 0
        assert (ns.data[FIRST * 512 : (FIRST + 32) * 512] == 0x11).all()  # the checked pages' bytes only
