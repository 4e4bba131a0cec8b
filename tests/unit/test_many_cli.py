"""The several-controller forms of perf and serve refuse a controller named twice and --socket
with several addresses before anything is opened."""

from click.testing import CliRunner

from nvmevfio.cli import main


def test_perf_several_controllers_refusals():
    r = CliRunner().invoke(main, ["perf", "00:10.0", "0000:00:10.0", "-n", "10"])
    assert r.exit_code == 1 and "a controller named twice: 0000:00:10.0 0000:00:10.0" in r.stderr
    r = CliRunner().invoke(main, ["perf", "00:10.0", "00:11.0", "--socket", "/nonexistent.sock"])
    assert r.exit_code == 1 and "--socket serves one controller" in r.stderr
    r = CliRunner().invoke(main, ["perf", "00:10.0", "00:11.0", "--verify", "--queues", "2"])
    assert r.exit_code == 1 and "--verify runs in Python on one queue" in r.stderr


def test_serve_several_controllers_refusals(tmp_path):
    grants = tmp_path / "g.toml"
    grants.write_text('[[grant]]\nuid = 0\nnsid = 1\nblocks = 8\ncontroller = "00:12.0"\n')
    r = CliRunner().invoke(main, ["serve", "00:10.0", "00:10.0", "--grants", str(grants)])
    assert r.exit_code == 1 and "a controller named twice" in r.stderr
    r = CliRunner().invoke(main, ["serve", "00:10.0", "00:11.0", "--grants", str(grants)])
    assert r.exit_code == 1 and "grant 1: controller 0000:00:12.0 is not one this daemon serves" in r.stderr
    r = CliRunner().invoke(main, ["serve", "--grants", str(grants)])
    assert r.exit_code == 1 and "Missing argument 'ADDRESS...'" in r.stderr  # (usage errors exit 1, as nvme-cli)
