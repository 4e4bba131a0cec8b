"""Every refusal label: raised with its reason, and nothing reached the device
(no register write, no command executed)."""

import numpy as np
import pytest

from nvmevfio.errors import CommandError, Refused


def refused(rig, reason, fn, *a, **kw):
    m = rig.mark()
    with pytest.raises(Refused) as ei:
        fn(*a, **kw)
    assert ei.value.reason == reason, str(ei.value)
    assert rig.unchanged_since(m), "a refused request touched the device"
    return ei.value


def test_before_enable(rig):
    rig.p.bind()
    refused(rig, "controller-not-enabled", rig.p.identify_controller)
    refused(rig, "controller-not-enabled", rig.p.read, 1, 0, 1)
    refused(rig, "admin-queues-not-armed", rig.broker.ctrl.enable, 1)


def test_raw_register_writes(rig):
    rig.ready()
    refused(rig, "cc-enable-raw-blocked", rig.p.write_register, "CC", 0x460001)
    refused(rig, "register-write-unclaimed", rig.p.write_register, "ASQ", 0x1000)
    refused(rig, "register-write-unclaimed", rig.p.write_register, "CC", 0)
    m = rig.mark()
    rig.p.write_register("INTMS", 1)  # claimable
    assert not rig.unchanged_since(m)


def test_io_before_queues(rig):
    rig.p.bind()
    rig.p.enable()
    refused(rig, "io-queues-not-created", rig.p.read, 1, 0, 1)
    refused(rig, "io-queues-not-created", rig.p.flush, 1)


def test_window_and_counts(rig):
    p = rig.ready()
    refused(rig, "window-past-namespace-end", p.read, 1, 4095, 2)
    refused(rig, "window-past-namespace-end", p.write, 1, 4096, b"\0" * 512)
    refused(rig, "window-past-namespace-end", p.read, 1, -1, 1)
    refused(rig, "count-out-of-range", p.read, 1, 0, 0)
    refused(rig, "length-mismatch", p.write, 1, 0, b"\0" * 100)
    refused(rig, "length-mismatch", p.write, 2, 0, b"\0" * 512)  # 4096-byte blocks


def test_namespace_inactive_and_lba_format(rig):
    p = rig.ready()
    e = refused(rig, "namespace-inactive", p.read, 9, 0, 1)
    assert e.context["active"] == [1, 2]
    refused(rig, "namespace-inactive", p.identify_namespace, 0)
    with pytest.raises(CommandError) as ei:
        p.identify_namespace(9)  # asked explicitly, the device answers Invalid Namespace
    assert ei.value.sc_name == "Invalid Namespace or Format"


def test_metadata_format_refused():
    from nvmevfio.sim.controller import SimNamespace
    from nvmevfio.sim.rig import Rig

    r = Rig([SimNamespace(1024, 512, metadata=8)])
    p = r.ready()
    buf = p.alloc_buffer(4096)
    # the paths that move data alone (transfer, batches) refuse a format with metadata
    refused(r, "unsupported-lba-format", p.read_into, 1, 0, 1, buf)
    refused(r, "unsupported-lba-format", p.submit, "read", 1, [0], [1], buf, [0])
    # read/write move metadata: what they lack is refused before the device
    refused(r, "metadata-required", p.write, 1, 0, bytes(512))
    e = refused(r, "length-mismatch", p.write, 1, 0, bytes(1024), metadata=bytes(8))
    assert e.context["expected"] == 16
    refused(r, "invalid-argument", p.write, 1, 0, bytes(512), metadata=bytes(8), pract=True)  # no PI (DPS 0)
    refused(r, "invalid-argument", p.read, 1, 0, 1, prchk=4)


def test_queue_full_and_in_flight(rig):
    p = rig.ready(depth=4)  # 3 usable slots
    buf = p.alloc_buffer(4 * 512)
    rig.sim.swallow_completions = True
    p.submit("read", 1, [0, 1, 2], [1, 1, 1], buf, [0, 512, 1024])
    refused(rig, "queue-full", p.submit, "read", 1, [3], [1], buf, [1536])
    refused(rig, "buffer-in-flight", p.free_buffer, buf)
    # a caller's short wait only bounds the wait: nothing is late yet, so nothing is recovered
    assert len(p.reap(3, timeout_s=0.05)) == 0 and rig.broker.resets == 0 and p.in_flight() == 3


def test_stale_handle(rig):
    p = rig.ready()
    buf = p.alloc_buffer(4096)
    buf.array[:] = 7
    p.free_buffer(buf)
    refused(rig, "stale-handle", p.read_into, 1, 0, 8, buf)
    refused(rig, "stale-handle", p.submit, "write", 1, [0], [1], buf, [0])
    refused(rig, "stale-handle", p.free_buffer, buf)
    with pytest.raises(Refused):
        _ = buf.array


def test_batch_validation_is_all_or_nothing(rig):
    p = rig.ready()
    buf = p.alloc_buffer(8 * 512)
    refused(rig, "window-past-namespace-end", p.submit, "write", 1, [0, 4095], [1, 2], buf, [0, 512])
    refused(rig, "length-mismatch", p.submit, "write", 1, [0, 1], [1, 8], buf, [0, 512])
    refused(rig, "length-mismatch", p.submit, "write", 1, [0], [1], buf, [2])


def test_log_and_feature_refusals(rig):
    p = rig.ready()
    refused(rig, "unsupported-log-page", p.get_log_page, "vendor")
    refused(rig, "invalid-feature", p.get_features, 0)


def test_device_error_is_typed(rig):
    p = rig.ready()
    rig.sim.fail_next[0x02] = (2, 0x81)
    with pytest.raises(CommandError) as ei:
        p.read(1, 0, 1)
    e = ei.value
    assert (e.sct, e.sc, e.sc_name, e.sct_name) == (2, 0x81, "Unrecovered Read Error",
                                                    "Media and Data Integrity Errors")
    assert "Read failed: Unrecovered Read Error" in str(e)
    np.testing.assert_array_equal(p.read(1, 0, 1), 0)  # the queue keeps working


def test_unsupported_range_commands():
    from nvmevfio.sim.rig import Rig

    r = Rig(oncs=0)
    p = r.ready()
    e = refused(r, "unsupported-command", p.write_zeroes, 1, 0, 8)
    assert "Write Zeroes (ONCS bit 3)" in str(e)
    e = refused(r, "unsupported-command", p.deallocate, 1, 0, 8)
    assert "Dataset Management (ONCS bit 2)" in str(e)


@pytest.mark.parametrize("n", [2, 12])  # the entry-by-entry path and the vectorized one
def test_batch_refusals_name_the_first_bad_command(rig, n):
    p = rig.ready(depth=32)
    buf = p.alloc_buffer(n * 512)
    lbas, counts, offs = np.arange(n), np.ones(n, dtype=np.int64), np.arange(n) * 512
    cases = []
    c = counts.copy()
    c[-1] = 0
    cases.append(("count-out-of-range", lbas, c, offs))
    s_ = lbas.copy()
    s_[-1] = 4096
    cases.append(("window-past-namespace-end", s_, counts, offs))
    o = offs.copy()
    o[-1] = n * 512  # past the buffer
    cases.append(("length-mismatch", lbas, counts, o))
    o2 = offs.copy()
    o2[0] = 2  # not dword aligned
    cases.append(("length-mismatch", lbas, counts, o2))
    for reason, sl, cn, of in cases:
        e = refused(rig, reason, p.submit, "write", 1, sl, cn, buf, of)
        assert e.reason == reason
    # two bad commands: the first one's rule is reported
    s2, c2 = lbas.copy(), counts.copy()
    s2[0], c2[1] = 4096, 0
    assert refused(rig, "window-past-namespace-end", p.submit, "write", 1, s2, c2, buf, offs)


def test_large_batch_roundtrip_and_reap(rig):
    p = rig.ready(depth=64)
    n = 40
    buf = p.alloc_buffer(n * 512)
    buf.array[:] = np.repeat(np.arange(n, dtype=np.uint8), 512)
    tags = p.submit("write", 1, np.arange(n) * 3, np.ones(n), buf, np.arange(n) * 512)
    done = p.reap(n)
    assert len(done) == n and sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
    for i in (0, 17, 39):
        assert (p.read(1, 3 * i, 1) == i).all()


@pytest.mark.parametrize("n", [3, 12])  # both batch paths take the same inputs
def test_batch_inputs_integral_floats_ok_fractions_refused(rig, n):
    p = rig.ready(depth=32)
    buf = p.alloc_buffer(n * 512)
    buf.array[:] = 9
    p.submit("write", 1, np.arange(n, dtype=np.float64), np.ones(n), buf, np.arange(n) * 512.0)
    assert not p.reap(n)["status"].any() and (p.read(1, 0, n) == 9).all()
    e = refused(rig, "invalid-argument", p.submit, "read", 1, np.arange(n) + 0.5, np.ones(n), buf,
                np.arange(n) * 512)
    assert "LBAs must be whole numbers" in str(e)
    refused(rig, "invalid-argument", p.submit, "read", 1, np.arange(n), np.full(n, np.nan), buf, np.arange(n) * 512)
