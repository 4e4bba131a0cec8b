"""The service's grants file: parsing with exact values, every mistake named, and who gets
which grant from the credentials the kernel reports."""

import pytest

from nvmevfio.service.grants import (
    GrantsError,
    ServiceGrant,
    connection_cap,
    grant_for,
    load_grants,
    parse_grants,
    parse_size,
)

GOOD = """
[[grant]]
uid = 1001
nsid = 1
first_lba = 2048
blocks = 4096
access = "rw"
queue_depth = 16
dma_memory = "8M"
lanes = ["default", "validated"]
sessions = 3
connections = 20

[[grant]]
group = "root"
nsid = 2
blocks = 100
"""


def test_parse_exact_values_and_defaults():
    a, b = parse_grants(GOOD)
    assert a == ServiceGrant(uid=1001, gid=None, nsid=1, first_lba=2048, blocks=4096, writable=True, queue_depth=16,
                             dma_memory=8 << 20, lanes=("default", "validated"), sessions=3, connections=20)
    assert b == ServiceGrant(uid=None, gid=0, nsid=2, first_lba=0, blocks=100, writable=False, queue_depth=32,
                             dma_memory=16 << 20, lanes=("default",), sessions=2, connections=8)
    w = a.window("uid 1001")
    assert (w.client, w.nsid, w.first_lba, w.blocks, w.writable) == ("uid 1001", 1, 2048, 4096, True)
    assert parse_grants('[[grant]]\nuser = "root"\nnsid = 1\nblocks = 1\n')[0].uid == 0


def test_who_gets_which_grant():
    grants = parse_grants(GOOD)
    assert grant_for(grants, 1001, 1001) is grants[0]
    assert grant_for(grants, 1001, 0) is grants[0]  # the uid's own grant wins over a group's
    assert grant_for(grants, 1002, 5, groups=[7, 0]) is grants[1]  # a supplementary group
    assert grant_for(grants, 1002, 1002, groups=[7]) is None  # no grant, no connection


def test_connection_caps():
    """Decided at accept, before the peer names a namespace: the largest cap of the grants it
    could use; 0 for a peer with none (closed at once)."""
    grants = parse_grants(GOOD)
    assert connection_cap(grants, 1001, 1001) == 20
    assert connection_cap(grants, 1001, 0) == 20  # its own grant (20) and its group's (8)
    assert connection_cap(grants, 1002, 5, groups=[0]) == 8  # a supplementary group's default
    assert connection_cap(grants, 1002, 1002, groups=[7]) == 0


@pytest.mark.parametrize("text, says", [
    ("not toml [", "not valid TOML"),
    ("", "no [[grant]] tables"),
    ("[[grant]]\nnsid = 1\nblocks = 1\n", "exactly one of user, uid, group, gid (got none)"),
    ("[[grant]]\nuid = 1\ngid = 1\nnsid = 1\nblocks = 1\n", "exactly one of user, uid, group, gid (got uid, gid)"),
    ('[[grant]]\nuser = "no-such-user-here"\nnsid = 1\nblocks = 1\n', "no user named 'no-such-user-here'"),
    ("[[grant]]\nuid = 1\nblocks = 1\n", "grant 1: nsid is missing"),
    ("[[grant]]\nuid = 1\nnsid = 0\nblocks = 1\n", "nsid must be a whole number of at least 1, got 0"),
    ("[[grant]]\nuid = 1\nnsid = 1\nblocks = 1\naccess = \"wo\"\n", "access must be"),
    ("[[grant]]\nuid = 1\nnsid = 1\nblocks = 1\nlanes = [\"fast\"]\n", "lanes must be a list of default, validated"),
    ("[[grant]]\nuid = 1\nnsid = 1\nblocks = 1\ndma_memory = \"lots\"\n", "dma_memory: 'lots' is not a size"),
    ("[[grant]]\nuid = 1\nnsid = 1\nblocks = 1\nwindow = 3\n", "unknown field(s) window"),
    ("[[grant]]\nuid = 1\nnsid = 1\nblocks = 1\nsessions = 0\n", "sessions must be a whole number of at least 1"),
    ("[[grant]]\nuid = 1\nnsid = 1\nblocks = 1\nconnections = \"many\"\n", "connections must be a whole number"),
    ("[[grant]]\nuid = 1\nnsid = 1\nblocks = 1\n[[grant]]\nuid = 2\nnsid = 1\nblocks = -5\n", "grant 2: blocks"),
])
def test_every_mistake_is_named(text, says):
    with pytest.raises(GrantsError) as ei:
        parse_grants(text, "grants.toml")
    assert ei.value.reason == "grants-invalid" and says in str(ei.value) and "grants.toml" in str(ei.value)


def test_sizes_and_files(tmp_path):
    assert [parse_size(s, "x") for s in ("512", "4K", "16M", "1G", "2MiB", 4096)] == [
        512, 4096, 16 << 20, 1 << 30, 2 << 20, 4096]
    path = tmp_path / "grants.toml"
    path.write_text(GOOD)
    assert len(load_grants(path)) == 2
    with pytest.raises(GrantsError, match="cannot read the grants file"):
        load_grants(tmp_path / "missing.toml")
