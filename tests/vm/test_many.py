"""Several controllers in one process (issue 25 part 3): `nvmevfio perf ADDR ADDR` runs a workload
on each at once, a row each and the total, every block verified on each; the guest has one NUMA
node, which the output says (the choice itself is tested against a fake sysfs: tests/sim/test_perf_many.py)."""

from cli_runner import nv, nvj


def test_two_controllers_in_one_perf_verified(data_ctrl, small_ctrl):
    a, b = data_ctrl["address"], small_ctrl["address"]
    d = nvj("perf", a, b, "-w", "randrw", "-q", 8, "-s", 4096, "-n", 1500, "--verify", "--range", "100000:120000")
    assert [c["address"] for c in d["controllers"]] == [a, b]
    for c in d["controllers"]:
        assert c["ios"] == 1500 and c["errors"] == 0 and c["verify"] and c["mismatches"] == []
        assert c["verified_blocks"] > 0 and c["reads"] > 0 and c["writes"] > 0
    t = d["total"]
    assert t["ios"] == 3000 and t["mismatches"] == 0 and t["controllers"] == 2
    assert t["verified_blocks"] == sum(c["verified_blocks"] for c in d["controllers"])
    assert d["numa"].startswith("one NUMA node")


def test_two_controllers_rows_and_total(data_ctrl, small_ctrl):
    a, b = data_ctrl["address"], small_ctrl["address"]
    out = nv("perf", a, b, "-w", "randread", "-q", 16, "-n", 4000, "--queues", 2).stdout.decode().splitlines()
    rows = {line.split()[0]: line.split() for line in out if line.split() and line.split()[0] in (a, b, "total")}
    assert set(rows) == {a, b, "total"}, out
    assert float(rows["total"][1]) > 0  # (the total row has no CPUs column)
    assert abs(float(rows["total"][1]) - float(rows[a][2]) - float(rows[b][2])) < 0.2
    assert "NUMA: one NUMA node" in "\n".join(out)


def test_the_same_controller_twice_is_refused(data_ctrl):
    a = data_ctrl["address"]
    r = nv("perf", a, a, "-n", 10, check=False)
    assert r.returncode != 0 and b"named twice" in r.stderr
