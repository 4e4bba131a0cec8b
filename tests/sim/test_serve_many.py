"""One daemon serving several (simulated) controllers (nvmevfio serve ADDR ADDR): a socket each,
named after the controller; grants naming a controller apply on it alone; stopping one stops all
and every controller is closed."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import nvmevfio
from nvmevfio.errors import Refused
from nvmevfio.service.daemon import Service, controller_socket, run_several
from nvmevfio.service.grants import GrantsError, for_controller, parse_grants
from nvmevfio.sim.controller import SimNamespace
from nvmevfio.sim.rig import Rig

A, B = "0000:00:10.0", "0000:00:11.0"
GRANTS = f"""
[[grant]]
uid = {os.getuid()}
nsid = 1
blocks = 1000
access = "rw"
queue_depth = 8
dma_memory = "1M"
controller = "00:10.0"

[[grant]]
gid = 0
nsid = 1
blocks = 500
access = "ro"
queue_depth = 8
dma_memory = "1M"
"""


def test_controller_socket_names():
    assert controller_socket("/run/nvmevfio/nvmevfio.sock", A) == "/run/nvmevfio/nvmevfio-0000:00:10.0.sock"
    assert controller_socket("/tmp/d.x/sock", A) == "/tmp/d.x/sock-0000:00:10.0"


def test_grants_per_controller():
    grants = parse_grants(GRANTS)
    assert [g.controller for g in grants] == [A, None]
    assert for_controller(grants, A, [A, B]) == grants
    assert for_controller(grants, B, [A, B]) == [grants[1]]
    with pytest.raises(GrantsError) as ei:
        for_controller(grants, B, [B])
    assert "controller 0000:00:10.0 is not one this daemon serves" in str(ei.value)
    with pytest.raises(GrantsError) as ei:
        parse_grants(GRANTS.replace('"00:10.0"', '"nonsense"'))
    assert "grant 1: controller 'nonsense' is not a PCI address" in str(ei.value)


def test_one_daemon_two_controllers(tmp_path):
    rigs = [Rig([SimNamespace(4096)]), Rig([SimNamespace(4096)])]
    grants = parse_grants(GRANTS)
    services = [Service(r.p, for_controller(grants, a, [A, B]), controller_socket(str(tmp_path / "s.sock"), a),
                        clients=2, queue_depth=16, irq=False, address=a) for r, a in zip(rigs, (A, B))]
    failures: list[BaseException] = []

    def daemon() -> None:
        try:
            run_several(services)
        except BaseException as exc:
            failures.append(exc)

    t = threading.Thread(target=daemon)
    t.start()
    try:
        sock_a, sock_b = (controller_socket(str(tmp_path / "s.sock"), a) for a in (A, B))
        for _ in range(200):
            if os.path.exists(sock_a) and os.path.exists(sock_b):
                break
            threading.Event().wait(0.05)
        data = np.random.default_rng(3).integers(0, 256, 8 * 512, dtype=np.uint8)
        with nvmevfio.connect(sock_a, 1) as dev:  # this uid's grant: controller A, read-write
            assert dev.info.block_count == 1000 and dev.writable
            dev.write_blocks(10, data)
            assert np.array_equal(dev.read_blocks(10, 8), data)
        assert np.array_equal(rigs[0].sim.namespaces[0].data[10 * 512 : 18 * 512], data)
        assert not rigs[1].sim.namespaces[0].data.any()
        if os.getgid() == 0 or 0 in os.getgroups():  # on B only the group grant (gid 0: read-only, 500 blocks)
            with nvmevfio.connect(sock_b, 1) as dev:
                assert dev.info.block_count == 500 and not dev.writable
        else:
            with pytest.raises(Refused) as ei:
                nvmevfio.connect(sock_b, 1)
            assert ei.value.reason == "no-grant"
    finally:
        services[1].stop()  # one stops: the daemon stops them all
        t.join(20)
    assert not t.is_alive() and not failures, failures
    assert not os.path.exists(sock_a) and not os.path.exists(sock_b)
