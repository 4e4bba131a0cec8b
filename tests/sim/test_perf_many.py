"""Several simulated controllers in one perf run (nvmevfio/perf_many.py): a row each and the total,
every command reaching its own controller, the NUMA choice (from a fake sysfs tree) pinning each
controller's queue threads to its node's CPUs and placing its DMA memory there."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from nvmevfio import dma, pci, perf
from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import Refused
from nvmevfio.perf_many import choose_poller, run_many, table
from nvmevfio.sim.rig import Rig


def _two() -> tuple[list[Rig], list[tuple[str, BlockDevice]]]:
    rigs = [Rig(), Rig()]
    return rigs, [(f"0000:00:{0x10 + i:02x}.0", BlockDevice(r.p, 1, queue_depth=32)) for i, r in enumerate(rigs)]


def test_two_controllers_rows_and_total():
    rigs, devs = _two()
    before = [len(r.sim.commands) for r in rigs]
    res = run_many(devs, workload="randrw", queue_depth=8, count=400, io_size=512, lba_range=(0, 1000),
                   shared_poller=False)
    assert [c["address"] for c in res.controllers] == ["0000:00:10.0", "0000:00:11.0"]
    assert [c["ios"] for c in res.controllers] == [400, 400]
    assert [len(r.sim.commands) - b for r, b in zip(rigs, before)] == [400, 400]
    assert res.total["ios"] == 800 and res.total["errors"] == 0
    assert res.total["iops"] == pytest.approx(sum(c["iops"] for c in res.controllers))
    assert res.controllers[0]["pinned_cpus"] == [] and "not placed" in res.numa
    lines = table(res)
    assert lines[1].startswith("0000:00:10.0") and lines[3].startswith("total") and len(lines) == 4
    d = res.to_dict()
    assert set(d) == {"controllers", "total", "numa", "poller", "poller_why"} and d["total"]["controllers"] == 2
    assert d["poller"] == "per-queue" and d["poller_why"] == "asked for (--thread-per-queue)"
    # one poller, pinned to the first CPU this process may use (nothing chosen: one node, no cpus),
    # as spdk_nvme_perf's core mask 0x1
    res = run_many(devs, workload="randread", queue_depth=8, count=100, io_size=512, shared_poller=True)
    first = min(os.sched_getaffinity(0))
    assert res.poller == "shared" and [c["pinned_cpus"] for c in res.controllers] == [[first], [first]]
    assert [c["per_queue"][0]["cpu"] for c in res.controllers] == [first, first]


def test_two_controllers_verified():
    _, devs = _two()
    res = run_many(devs, workload="randrw", queue_depth=4, count=300, io_size=1024, lba_range=(0, 256),
                   verify=True)
    assert all(c["verify"] and c["verified_blocks"] > 0 for c in res.controllers)
    assert res.mismatches == 0 and res.total["verified_blocks"] == sum(c["verified_blocks"] for c in res.controllers)


def test_numa_choice_pins_each_controller_to_its_node(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs this process may use")
    a, b = cpus[0], cpus[1]
    root = tmp_path
    (root / "devices/system/node").mkdir(parents=True)
    (root / "devices/system/node/online").write_text("0-1\n")
    rigs, devs = _two()
    for (addr, _), (node, cpu) in zip(devs, [(1, b), (0, a)]):
        d = root / "bus/pci/devices" / addr
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{node}\n")
        (d / "local_cpulist").write_text(f"{cpu}\n")
    for rig, (addr, _dev) in zip(rigs, devs):
        rig.p.numa = pci.numa_placement(addr, sysfs=root)  # as open_controller does
        rig.ledger.numa_node = 0  # the host has one node: node 0 stands for the function's
    res = run_many(devs, workload="randread", queue_depth=4, count=200, io_size=512, queues=1, shared_poller=False)
    assert [c["pinned_cpus"] for c in res.controllers] == [[b], [a]]
    assert [c["per_queue"][0]["cpu"] for c in res.controllers] == [b, a]
    assert [c["numa_node"] for c in res.controllers] == [1, 0] and res.numa == "node 1 of 2; node 0 of 2"
    # the user's --cpu wins
    res = run_many(devs, workload="randread", queue_depth=4, count=200, io_size=512, cpus=[a])
    assert [c["pinned_cpus"] for c in res.controllers] == [[a], [a]]
    assert res.poller == "per-queue" and res.poller_why == "the default (--cpu places the threads)"
    # one poller: on the first controller's node's CPU
    res = run_many(devs, workload="randread", queue_depth=4, count=200, io_size=512, shared_poller=True)
    assert res.poller == "shared" and [c["pinned_cpus"] for c in res.controllers] == [[b], [b]]
    # the buffers perf allocated after the choice were placed (MPOL_PREFERRED) before their mapping
    buf = devs[0][1].alloc_buffer(4096)
    slot = rigs[0].ledger._slots[buf.slot]
    assert dma.memory_policy(slot.mem.addr) == dma.MPOL_PREFERRED and rigs[0].ledger.numa_errors == 0


def test_refusals():
    _, devs = _two()
    with pytest.raises(Refused) as ei:
        run_many([devs[0], devs[0]], count=10)
    assert ei.value.reason == "invalid-argument"
    with pytest.raises(Refused) as ei:
        run_many(devs, workload="trim", count=10)
    assert ei.value.reason == "unsupported-workload"


def _threads_executing(rigs: list[Rig], monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """The threads whose doorbells made each simulated controller execute a command (the simulator
    executes on the doorbell write, in the writing thread)."""
    seen: set[int] = set()
    for r in rigs:
        def execute(*a, _orig=r.sim._execute, **k):
            seen.add(threading.get_ident())
            return _orig(*a, **k)
        monkeypatch.setattr(r.sim, "_execute", execute)
    return seen


def test_shared_poller_one_thread_drives_both_controllers(monkeypatch):
    rigs, devs = _two()
    seen = _threads_executing(rigs, monkeypatch)
    res = run_many(devs, workload="randrw", queue_depth=8, count=400, io_size=512, lba_range=(0, 1000),
                   shared_poller=False)
    assert len(seen) == 2 and res.poller == "per-queue"  # a thread per controller's queue
    seen.clear()
    before = [len(r.sim.commands) for r in rigs]
    res = run_many(devs, workload="randrw", queue_depth=8, count=400, io_size=512, lba_range=(0, 1000),
                   shared_poller=True)
    assert len(seen) == 1 and threading.get_ident() not in seen  # one poller thread, not the caller
    assert res.poller == "shared" and [len(r.sim.commands) - b for r, b in zip(rigs, before)] == [400, 400]
    assert [c["ios"] for c in res.controllers] == [400, 400] and res.total["errors"] == 0
    assert res.to_dict()["poller"] == "shared"
    # the thread's CPU time shared out by commands: equal counts, equal shares
    q0, q1 = (c["per_queue"][0] for c in res.controllers)
    assert q0["seconds"] == q1["seconds"] and q0["cpu_us_per_io"] == pytest.approx(q1["cpu_us_per_io"])


def test_shared_poller_recovers_one_controller_and_not_the_other():
    """A lost completion on one controller of a shared poller: that controller's broker recovers
    (abort, reset, requeue), the other is not reset, and both runs complete."""
    rigs, devs = _two()
    for r in rigs:
        r.broker.command_timeout_s = 0.2
    rigs[1].sim.drop_next = 2
    res = run_many(devs, workload="randwrite", queue_depth=8, count=200, io_size=1024, lba_range=(0, 512),
                   shared_poller=True)
    assert [c["ios"] for c in res.controllers] == [200, 200] and res.total["errors"] == 0
    assert [r.broker.resets for r in rigs] == [0, 1]


def test_shared_poller_refusals_before_any_io():
    rigs, devs = _two()
    marks = [r.mark() for r in rigs]
    live = [sum(1 for s in r.ledger._slots if s.mem is not None) for r in rigs]
    for kw, words in (({"verify": True}, "not with verify"), ({"hybrid": True}, "hybrid polling")):
        with pytest.raises(Refused) as ei:
            run_many(devs, count=10, shared_poller=True, **kw)
        assert ei.value.reason == "invalid-argument" and words in str(ei.value)
    # the second controller refuses the depth after the first was prepared: the first's buffer is
    # freed again and neither device saw a command
    shallow = [devs[0], ("0000:00:12.0", BlockDevice(Rig().p, 1, queue_depth=4))]
    with pytest.raises(Refused) as ei:
        run_many(shallow, count=10, queue_depth=8, shared_poller=True)
    assert ei.value.reason == "count-out-of-range"
    assert all(r.unchanged_since(m) for r, m in zip(rigs, marks))
    assert [sum(1 for s in r.ledger._slots if s.mem is not None) for r in rigs] == live  # nothing left held


def test_shared_poller_over_two_queues_of_one_controller():
    rig = Rig()
    dev = BlockDevice(rig.p, 1, queue_depth=32, queues=2)
    res = perf.run(dev, workload="randread", queue_depth=8, count=300, io_size=512, queues=2, shared_poller=True)
    assert [q["ios"] for q in res.per_queue] == [150, 150] and res.errors == 0
    assert sorted(q for q, _, _ in rig.sim.commands[-300:]) == [1] * 150 + [2] * 150


def test_choose_poller_exact():
    """The default: the shared poller only where a spinning thread per queue would take every CPU
    this process may use, and only where one thread can poll (no interrupts, naps or verify)."""
    auto = dict(user_cpus=None, polled=True, verify=False, hybrid=False)
    assert choose_poller(None, pollers=2, allowed_cpus=2, **auto) == (
        True, "the default: 2 spinning threads would take all 2 CPUs this process may use "
              "(--thread-per-queue for a thread each)")
    assert choose_poller(None, pollers=4, allowed_cpus=2, **auto)[0] is True
    assert choose_poller(None, pollers=2, allowed_cpus=3, **auto) == (
        False, "the default: 2 spinning threads leave CPUs free of the 3 this process may use")
    assert choose_poller(None, pollers=2, allowed_cpus=2, **{**auto, "polled": False}) == (
        False, "the default (interrupts: no shared poller)")
    assert choose_poller(None, pollers=2, allowed_cpus=2, **{**auto, "verify": True}) == (
        False, "the default (verify runs in Python: no shared poller)")
    assert choose_poller(None, pollers=2, allowed_cpus=2, **{**auto, "hybrid": True}) == (
        False, "the default (hybrid polling naps: no shared poller)")
    assert choose_poller(None, pollers=2, allowed_cpus=2, **{**auto, "user_cpus": [0, 0]}) == (
        False, "the default (--cpu places the threads)")
    assert choose_poller(True, pollers=2, allowed_cpus=64, **auto) == (True, "asked for")
    assert choose_poller(False, pollers=8, allowed_cpus=2, **auto) == (False, "asked for (--thread-per-queue)")


def test_default_poller_follows_the_cpus_this_process_may_use(monkeypatch):
    """run_many with no choice: two polled controllers on a one-CPU process share one poller,
    pinned to that CPU; given 64 CPUs, a thread each; with interrupts, a thread each whatever the
    CPUs."""
    import nvmevfio.perf_many as pm

    rigs, devs = _two()
    seen = _threads_executing(rigs, monkeypatch)
    first = min(os.sched_getaffinity(0))
    monkeypatch.setattr(pm, "cpus_allowed", lambda: {first})
    res = run_many(devs, workload="randread", queue_depth=8, count=300, io_size=512)
    assert res.poller == "shared" and len(seen) == 1
    assert res.poller_why.startswith("the default: 2 spinning threads would take all 1 CPUs")
    assert [c["pinned_cpus"] for c in res.controllers] == [[first], [first]]
    assert [c["ios"] for c in res.controllers] == [300, 300] and res.total["errors"] == 0
    seen.clear()
    monkeypatch.setattr(pm, "cpus_allowed", lambda: set(range(first, first + 64)))
    res = run_many(devs, workload="randread", queue_depth=8, count=300, io_size=512)
    assert res.poller == "per-queue" and len(seen) == 2 and res.controllers[0]["pinned_cpus"] == []
    seen.clear()
    monkeypatch.setattr(pm, "cpus_allowed", lambda: {first})
    for _, d in devs:  # as a device opened with interrupts says of itself
        monkeypatch.setattr(d, "info", dataclasses.replace(d.info, completion_mode="irq"))
    res = run_many(devs, workload="randread", queue_depth=8, count=300, io_size=512)
    assert res.poller == "per-queue" and len(seen) == 2
    assert res.poller_why == "the default (interrupts: no shared poller)"
