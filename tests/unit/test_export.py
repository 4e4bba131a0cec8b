"""nvmevfio export's configfs part on the host: NQNs and addresses checked, the operations planned
with exact paths and values, applied to a folder standing in for nvmet's configfs (FakeNvmet:
configfs's default groups appear with their folder, as in the kernel), unwound completely when
any one fails, and taken down in order without what another subsystem still uses (the guest
tier, tests/vm/test_export.py, runs nvmet itself)."""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

import pytest
from click.testing import CliRunner

from nvmevfio import export as ex
from nvmevfio.cli import main

HOST_A = "nqn.2014-08.org.nvmexpress:uuid:6e766d65-7666-696f-0000-000000000001"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:6e766d65-7666-696f-0000-000000000002"
NQN = "nqn.2014-08.org.nvmexpress:nvmevfio:SN123:ns1"
SUB = f"subsystems/{NQN}"


class FakeNvmet(ex.OsConfigfs):
    """A temporary folder behaving as nvmet's configfs where an export cares: a subsystem's,
    namespace's and port's default groups and attributes come with their folder and go with it;
    ``fail`` makes one operation fail as the kernel would (its text: str(Op))."""

    DEFAULTS = {"subsystems": (["allowed_hosts", "namespaces"], ["attr_allow_any_host", "attr_serial"]),
                "namespaces": ([], ["device_path", "enable"]),
                "ports": (["subsystems"], list(ex.PORT_ATTRS))}

    def __init__(self, root: Path, fail: str = "") -> None:
        for d in ("subsystems", "hosts", "ports"):
            (root / d).mkdir(parents=True, exist_ok=True)
        super().__init__(root)
        self.fail = fail
        self.log: list[str] = []

    def _check(self, text: str) -> None:
        self.log.append(text)
        if text == self.fail:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def mkdir(self, path: PurePosixPath) -> None:
        self._check(f"mkdir {path}")
        super().mkdir(path)
        dirs, attrs = self.DEFAULTS.get(path.parent.name, ([], []))
        for d in dirs:
            (self.root / path / d).mkdir()
        for a in attrs:
            (self.root / path / a).write_text("0\n" if a in ("enable", "attr_allow_any_host") else "\n")

    def rmdir(self, path: PurePosixPath) -> None:
        self._check(f"rmdir {path}")
        dirs, attrs = self.DEFAULTS.get(path.parent.name, ([], []))
        for a in attrs:
            (self.root / path / a).unlink()
        for d in dirs:
            (self.root / path / d).rmdir()  # fails, as configfs does, while it holds something
        super().rmdir(path)

    def write(self, path: PurePosixPath, value: str) -> None:
        self._check(f"echo {value} > {path}")
        super().write(path, value)

    def symlink(self, path: PurePosixPath, target: PurePosixPath) -> None:
        self._check(f"ln -s {target} {path}")
        super().symlink(path, target)

    def unlink(self, path: PurePosixPath) -> None:
        self._check(f"rm {path}")
        super().unlink(path)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def spec(**kw) -> ex.ExportSpec:
    base = {"nqn": NQN, "device": "/dev/ublkb0", "tcp": ex.parse_tcp("10.1.2.3:4420"), "hosts": (HOST_A,),
            "serial": "SN123"}
    return ex.ExportSpec(**{**base, **kw})


# ------------------------------------------------------------------ names and addresses
def test_the_derived_nqn_names_the_serial_and_the_namespace():
    assert ex.derive_nqn("SN123", 1) == NQN
    assert ex.derive_nqn("  QEMU NVMe/Ctrl 7 ", 2) == "nqn.2014-08.org.nvmexpress:nvmevfio:QEMU-NVMe-Ctrl-7:ns2"
    assert ex.derive_nqn("", 1) == "nqn.2014-08.org.nvmexpress:nvmevfio:unknown:ns1"


@pytest.mark.parametrize("nqn", ["nqn.2014-08.com.example:disk1", HOST_A, "nqn.2024-12.io.x", "x" * 0 + NQN])
def test_valid_nqns_pass(nqn):
    assert ex.check_nqn(nqn) == nqn


@pytest.mark.parametrize("nqn", ["iqn.2014-08.com.example:d", "nqn.2014-13.com.example:d", "nqn.2014-08.:d",
                                 "nqn.2014-08.com.example:a/b", "nqn.2014-08.com.example:a b", "nqn.14-08.com.e"])
def test_invalid_nqns_are_refused_with_the_rule(nqn):
    with pytest.raises(ex.ExportError) as e:
        ex.check_nqn(nqn)
    assert e.value.reason == "bad-nqn" and "nqn.YYYY-MM.reverse.domain" in str(e.value)


def test_an_nqn_is_at_most_223_bytes():
    ok = "nqn.2014-08.com.example:" + "a" * (223 - 24)
    assert len(ok.encode()) == 223 and ex.check_nqn(ok) == ok
    with pytest.raises(ex.ExportError, match="224 bytes; an NQN has at most 223"):
        ex.check_nqn(ok + "a")
    with pytest.raises(ex.ExportError, match="at most 223"):  # counted in UTF-8 bytes, not characters
        ex.check_nqn("nqn.2014-08.com.example:" + "é" * 100)


@pytest.mark.parametrize(("text", "want"), [
    ("10.1.2.3:4420", ("ipv4", "10.1.2.3", "4420")),
    ("0.0.0.0", ("ipv4", "0.0.0.0", "4420")),
    ("[::1]:4421", ("ipv6", "::1", "4421")),
    ("[fe80::1]", ("ipv6", "fe80::1", "4420")),
    ("127.0.0.1:04420", ("ipv4", "127.0.0.1", "4420")),
])
def test_tcp_addresses(text, want):
    a = ex.parse_tcp(text)
    assert (a.adrfam, a.traddr, a.trsvcid) == want


@pytest.mark.parametrize("text", ["example.com:4420", "10.1.2.3:0", "10.1.2.3:65536", "10.1.2.3:http", "[::1]:x"])
def test_bad_tcp_addresses_are_refused(text):
    with pytest.raises(ex.ExportError) as e:
        ex.parse_tcp(text)
    assert e.value.reason == "bad-tcp-address"


# ------------------------------------------------------------------ plans
def test_the_plan_on_an_empty_nvmet_in_order_with_exact_values():
    ops = [str(op) for op in ex.plan_export(spec(hosts=(HOST_A, HOST_B)), ex.Survey())]
    assert ops == [
        "mkdir ports/1", "echo tcp > ports/1/addr_trtype", "echo ipv4 > ports/1/addr_adrfam",
        "echo 10.1.2.3 > ports/1/addr_traddr", "echo 4420 > ports/1/addr_trsvcid",
        f"mkdir {SUB}", f"echo 0 > {SUB}/attr_allow_any_host", f"echo SN123 > {SUB}/attr_serial",
        f"mkdir hosts/{HOST_A}", f"ln -s hosts/{HOST_A} {SUB}/allowed_hosts/{HOST_A}",
        f"mkdir hosts/{HOST_B}", f"ln -s hosts/{HOST_B} {SUB}/allowed_hosts/{HOST_B}",
        f"mkdir {SUB}/namespaces/1", f"echo /dev/ublkb0 > {SUB}/namespaces/1/device_path",
        f"echo 1 > {SUB}/namespaces/1/enable",
        f"ln -s {SUB} ports/1/subsystems/{NQN}",  # last: reachable once everything else is in place
    ]


def test_a_port_listening_there_and_an_existing_host_are_reused():
    now = ex.Survey(subsystems={"other"}, hosts={HOST_A}, ports={
        1: {"addr_trtype": "tcp", "addr_adrfam": "ipv4", "addr_traddr": "10.1.2.3", "addr_trsvcid": "4421"},
        2: {"addr_trtype": "tcp", "addr_adrfam": "ipv4", "addr_traddr": "10.1.2.3", "addr_trsvcid": "4420"}})
    ops = [str(op) for op in ex.plan_export(spec(serial=""), now)]
    assert ops == [f"mkdir {SUB}", f"echo 0 > {SUB}/attr_allow_any_host",
                   f"ln -s hosts/{HOST_A} {SUB}/allowed_hosts/{HOST_A}",
                   f"mkdir {SUB}/namespaces/1", f"echo /dev/ublkb0 > {SUB}/namespaces/1/device_path",
                   f"echo 1 > {SUB}/namespaces/1/enable", f"ln -s {SUB} ports/2/subsystems/{NQN}"]
    # a new port takes the lowest free id
    assert str(ex.plan_export(spec(tcp=ex.parse_tcp("10.9.9.9:4420")), now)[0]) == "mkdir ports/3"


def test_any_host_writes_allow_any_host_and_links_no_host():
    ops = [str(op) for op in ex.plan_export(spec(hosts=(), any_host=True), ex.Survey())]
    assert f"echo 1 > {SUB}/attr_allow_any_host" in ops and not any("hosts/" in o for o in ops)


@pytest.mark.parametrize(("kw", "reason"), [({"hosts": ()}, "bad-hosts"), ({"any_host": True}, "bad-hosts"),
                                            ({"hosts": ("bad",)}, "bad-nqn"), ({"nqn": "nqn.x"}, "bad-nqn")])
def test_plans_refused(kw, reason):
    with pytest.raises(ex.ExportError) as e:
        ex.plan_export(spec(**kw), ex.Survey())
    assert e.value.reason == reason


def test_an_existing_subsystem_is_refused():
    with pytest.raises(ex.ExportError) as e:
        ex.plan_export(spec(), ex.Survey(subsystems={NQN}))
    assert e.value.reason == "already-exported" and "--stop" in str(e.value)


# ------------------------------------------------------------------ applied to a stand-in configfs
def test_apply_then_teardown_leaves_configfs_as_it_was(tmp_path):
    fs = FakeNvmet(tmp_path)
    empty = tree(tmp_path)
    ops = ex.plan_export(spec(), ex.survey(fs))
    ex.apply(fs, ops)
    assert (tmp_path / SUB / "namespaces/1/device_path").read_text() == "/dev/ublkb0"
    assert (tmp_path / SUB / "namespaces/1/enable").read_text() == "1"
    assert (tmp_path / "ports/1/addr_traddr").read_text() == "10.1.2.3"
    assert os.readlink(tmp_path / "ports/1/subsystems" / NQN) == str(tmp_path / SUB)
    now = ex.survey(fs)
    assert now.subsystems == {NQN} and now.port_links == {1: {NQN}} and now.allowed == {NQN: {HOST_A}}
    fs.log.clear()
    assert ex.run_teardown(fs, ex.plan_teardown(ops, now)) == []
    assert fs.log == [f"rm ports/1/subsystems/{NQN}", f"echo 0 > {SUB}/namespaces/1/enable",
                      f"rmdir {SUB}/namespaces/1", f"rm {SUB}/allowed_hosts/{HOST_A}", f"rmdir hosts/{HOST_A}",
                      f"rmdir {SUB}", "rmdir ports/1"]
    assert tree(tmp_path) == empty


def _all_ops() -> list[str]:
    return [str(op) for op in ex.plan_export(spec(hosts=(HOST_A, HOST_B)), ex.Survey())]


@pytest.mark.parametrize("failing", _all_ops())
def test_a_failure_at_any_step_leaves_nothing_behind(tmp_path, failing):
    fs = FakeNvmet(tmp_path, fail=failing)
    empty = tree(tmp_path)
    ops = ex.plan_export(spec(hosts=(HOST_A, HOST_B)), ex.survey(fs))
    with pytest.raises(ex.ExportError) as e:
        ex.apply(fs, ops)
    assert e.value.reason == "nvmet-refused" and f"nvmet refused `{failing}`" in str(e.value)
    assert tree(tmp_path) == empty


def test_an_undo_that_fails_is_named(tmp_path):
    class Stuck(FakeNvmet):
        def rmdir(self, path: PurePosixPath) -> None:
            if path.name == "1" and path.parent.name == "ports":
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            super().rmdir(path)

    fs = Stuck(tmp_path, fail=f"echo 1 > {SUB}/namespaces/1/enable")
    with pytest.raises(ex.ExportError) as e:
        ex.apply(fs, ex.plan_export(spec(), ex.survey(fs)))
    assert e.value.reason == "unwind-failed" and "`rmdir ports/1`: Device or resource busy" in str(e.value)
    assert tree(tmp_path) == ["hosts", "ports", "ports/1", *(f"ports/1/{a}" for a in sorted(ex.PORT_ATTRS)),
                              "ports/1/subsystems", "subsystems"]


def test_teardown_keeps_a_port_and_a_host_another_subsystem_uses(tmp_path):
    fs = FakeNvmet(tmp_path)
    ours = ex.plan_export(spec(), ex.survey(fs))
    ex.apply(fs, ours)
    other = "nqn.2014-08.com.example:other"
    ex.apply(fs, ex.plan_export(spec(nqn=other, device="/dev/ublkb1", serial=""), ex.survey(fs)))
    ex.run_teardown(fs, ex.plan_teardown(ours, ex.survey(fs)))
    now = ex.survey(fs)
    assert now.subsystems == {other} and now.hosts == {HOST_A} and now.port_links == {1: {other}}


def test_records_round_trip(tmp_path):
    ops = ex.plan_export(spec(), ex.Survey())
    rec = ex.Record(nqn=NQN, address="0000:00:04.0", nsid=1, device="/dev/ublkb0", dev_id=0, tcp="10.1.2.3:4420",
                    hosts=[HOST_A], any_host=False, read_only=True, ublk_started=True, ops=ex.ops_to_dicts(ops))
    path = ex.save_record(rec, tmp_path)
    assert path == ex.record_path(NQN, tmp_path) and path.name.startswith("export-")
    (back,) = ex.load_records(tmp_path)
    assert back == rec and back.applied() == ops


# ------------------------------------------------------------------ the kernel's part
def test_missing_nvmet_and_nvmet_tcp_name_what_to_load(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "_modprobe", lambda name: None)
    cfg, mods = tmp_path / "config", tmp_path / "module"
    cfg.mkdir()
    mods.mkdir()
    with pytest.raises(ex.ExportError, match=r"modprobe nvmet \(CONFIG_NVME_TARGET\)") as e:
        ex.require_nvmet(cfg, mods)
    assert e.value.reason == "nvmet-missing"
    (cfg / "nvmet").mkdir()
    with pytest.raises(ex.ExportError, match=r"modprobe nvmet-tcp \(CONFIG_NVME_TARGET_TCP\)"):
        ex.require_nvmet(cfg, mods)
    (mods / "nvmet_tcp").mkdir()
    assert ex.require_nvmet(cfg, mods).root == cfg / "nvmet"
    with pytest.raises(ex.ExportError, match="configfs is not available"):
        ex.require_nvmet(tmp_path / "none", mods)


def test_cli_refuses_bad_input_in_one_line_before_anything_starts(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    r = CliRunner().invoke(main, ["export", "00:04.0", "--tcp", "example.com:4420", "--allow-host", HOST_A])
    assert r.exit_code == 1 and "the host must be an IP address" in r.output
    r = CliRunner().invoke(main, ["export", "00:04.0", "--tcp", "10.0.0.1:4420"])
    assert r.exit_code == 1 and "name each with --allow-host" in r.output
    r = CliRunner().invoke(main, ["export", "--stop"])
    assert r.exit_code == 1 and "give the ADDRESS" in r.output
