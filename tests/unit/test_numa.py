"""NUMA placement (issue 25 part 3): the choice read from a fake sysfs tree, exact; the CPUs of
several controllers' queues; the memory policy mbind(2) leaves on a DMA mapping."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from nvmevfio import dma, pci
from nvmevfio.perf import PerfResult
from nvmevfio.perf_many import choose_cpus, totals


def _sysfs(root: Path, online: str, functions: dict[str, tuple[str, str]]) -> Path:
    (root / "devices/system/node").mkdir(parents=True)
    (root / "devices/system/node/online").write_text(online + "\n")
    for addr, (node, cpus) in functions.items():
        d = root / "bus/pci/devices" / addr
        d.mkdir(parents=True)
        (d / "numa_node").write_text(node + "\n")
        (d / "local_cpulist").write_text(cpus + "\n")
    return root


def test_parse_cpulist():
    assert pci.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert pci.parse_cpulist("") == []
    assert pci.parse_cpulist("5") == [5]


def test_placement_on_a_host_of_two_nodes(tmp_path):
    root = _sysfs(tmp_path, "0-1", {"0000:3b:00.0": ("1", "16-31,48-63"), "0000:00:04.0": ("-1", "0-63"),
                                    "0000:5e:00.0": ("0", "0-15")})
    got = pci.numa_placement("3b:00.0", sysfs=root, allowed=set(range(64)))
    assert got == pci.NumaPlacement(1, (*range(16, 32), *range(48, 64)), 2, "node 1 of 2")
    # only the CPUs this process may use
    assert pci.numa_placement("0000:3b:00.0", sysfs=root, allowed={0, 17, 50}).cpus == (17, 50)
    none_mine = pci.numa_placement("0000:5e:00.0", sysfs=root, allowed={20})
    assert none_mine == pci.NumaPlacement(0, (), 2, "node 0 of 2: none of its CPUs is this process's, "
                                          "threads not pinned")
    # firmware that gives the function no node
    assert pci.numa_placement("00:04.0", sysfs=root, allowed={0}) == \
        pci.NumaPlacement(None, (), 2, "2 NUMA nodes, but the function has none (numa_node -1)")


def test_placement_on_a_host_of_one_node(tmp_path):
    root = _sysfs(tmp_path, "0", {"0000:00:04.0": ("0", "0-1")})
    assert pci.numa_placement("00:04.0", sysfs=root, allowed={0, 1}) == \
        pci.NumaPlacement(None, (), 1, "one NUMA node: nothing to choose")


def test_choose_cpus():
    # the user's list wins: the queues numbered across controllers take it in turn
    assert choose_cpus(2, [4, 5, 6], [(0, (0, 1)), (1, (2, 3))]) == [[4, 5], [6, 4]]
    # each controller on its node's CPUs; two on one node share them round robin
    assert choose_cpus(2, None, [(1, (8, 9, 10)), (0, (0, 1)), (1, (8, 9, 10))]) == [[8, 9], [0, 1], [10, 8]]
    # no node, or no CPU of it: not pinned
    assert choose_cpus(1, None, [(None, ()), (0, ())]) == [None, None]


def _res(ios: int, iops: float, mean: float, lo: float, hi: float, seconds: float, bad: int = 0) -> PerfResult:
    return PerfResult(workload="randread", io_size=4096, queue_depth=4, mode="poll", seconds=seconds, ios=ios,
                      reads=ios, writes=0, iops=iops, mib_per_s=iops * 4096 / (1 << 20), lat_mean_us=mean,
                      lat_min_us=lo, lat_max_us=hi, lat_p50_us=0, lat_p99_us=0, lat_p999_us=0, errors=0,
                      verified_blocks=ios, mismatches=[(1, (1, 1, 1), (0, 0, 0, 0))] * bad)


def test_totals_of_several_controllers():
    t = totals([_res(1000, 500.0, 10.0, 2.0, 40.0, 2.0), _res(3000, 1500.0, 30.0, 3.0, 90.0, 2.1, bad=2)])
    assert t["controllers"] == 2 and t["ios"] == 4000 and t["reads"] == 4000 and t["iops"] == 2000.0
    assert t["mib_per_s"] == pytest.approx(2000 * 4096 / (1 << 20))
    assert t["lat_mean_us"] == 25.0  # (1000 * 10 + 3000 * 30) / 4000
    assert (t["lat_min_us"], t["lat_max_us"], t["seconds"]) == (2.0, 90.0, 2.1)
    assert t["verified_blocks"] == 4000 and t["mismatches"] == 2


def test_node_mask():
    assert dma.node_mask(0) == [1]
    assert dma.node_mask(3) == [8]
    assert dma.node_mask(65) == [0, 2]


def test_prefer_node_sets_the_mappings_policy():
    mm = mmap.mmap(-1, 4 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(mm, dtype=np.uint8)
    addr = int(arr.ctypes.data)
    try:
        assert dma.memory_policy(addr) == 0  # MPOL_DEFAULT
        assert dma.prefer_node(addr, len(mm), 0) == 0
        assert dma.memory_policy(addr) == dma.MPOL_PREFERRED
        assert dma.prefer_node(addr, len(mm), 1000) == 22  # EINVAL: no such node
    finally:
        del arr
        mm.close()
