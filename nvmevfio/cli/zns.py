"""Zoned namespaces: ``nvmevfio zns`` with nvme-cli 2.3's zns plugin's sub-commands, options,
JSON keys and success lines (id-ctrl, id-ns, report-zones, open/close/finish/reset/offline-zone,
zone-append)."""

from __future__ import annotations

import sys
from typing import Any

import click

from nvmevfio.cli.common import (
    EXIT_ERROR,
    EXIT_REFUSED,
    IONUM,
    NUM,
    _emit_json,
    _fail,
    _write_data,
    address_arg,
    blockdev,
    controller,
    errors,
    main,
    nsid_opt,
    num,
    output_opt,
)

# the Zone Management Send actions nvme-cli names a command for, and its action numbers (ZSA)
ZONE_COMMANDS = {"open-zone": ("open", 3), "close-zone": ("close", 1), "finish-zone": ("finish", 2),
                 "reset-zone": ("reset", 4), "offline-zone": ("offline", 5)}


def _hex(v: int) -> str:
    """C's %#x: 0 has no prefix."""
    return f"{v:#x}" if v else "0"


@main.group("zns")
def zns() -> None:
    """Zoned Namespace Command Set (nvme-cli's zns plugin): identify, report zones, zone actions, append.

    \b
    Example: nvmevfio zns report-zones 00:04.0 -n 1 -o json
             nvmevfio zns zone-append 00:04.0 -n 1 -s 0 -z 4096 -d data.bin
    """


@zns.command("id-ctrl")
@address_arg
@output_opt
def id_ctrl(address: str, fmt: str) -> None:
    """Identify Controller, Zoned Namespace Command Set (CNS 06h, CSI 02h): ZASL."""
    from nvmevfio.cli.identify import identify_raw
    from nvmevfio.nvme import zns as spec

    with controller(address) as s, errors():
        raw = identify_raw(s, 0x06, csi=2)
    if fmt == "binary":
        _write_data(raw, True)
    elif fmt == "json":
        _emit_json(spec.parse_zns_identify_controller(raw))
    else:
        click.echo(f"NVMe ZNS Identify Controller:\nzasl    : {raw[0]}")


@zns.command("id-ns")
@address_arg
@nsid_opt
@output_opt
def id_ns(address: str, nsid: int, fmt: str) -> None:
    """Identify Namespace, Zoned Namespace Command Set (CNS 05h, CSI 02h): MAR, MOR, the zone size
    of each LBA format (ZSZE) and its descriptor extension size (ZDES)."""
    from nvmevfio.cli.identify import identify_raw
    from nvmevfio.nvme import structures
    from nvmevfio.nvme import zns as spec

    with controller(address) as s, errors():
        ident = structures.parse_identify_namespace(identify_raw(s, 0x00, nsid))
        raw = identify_raw(s, 0x05, nsid, csi=2)
    z = spec.parse_zns_identify_namespace(raw, ident["nlbaf"])
    if fmt == "binary":
        _write_data(raw, True)
        return
    if fmt == "json":
        _emit_json(z)
        return
    in_use = structures.flbas_index(ident["flbas"], ident["nlbaf"])
    lines = ["ZNS Command Set Identify Namespace:", f"zoc     : {z['zoc']}", f"ozcs    : {z['ozcs']}",
             f"mar     : {_hex(z['mar'])}", f"mor     : {_hex(z['mor'])}"]
    # nvme-cli 2.3 prints FRL under frl1..frl3 too (its text, not its JSON); kept for equal output
    for name, key in (("rrl ", "rrl"), ("frl ", "frl"), ("rrl1", "rrl1"), ("rrl2", "rrl2"), ("rrl3", "rrl3"),
                      ("frl1", "frl"), ("frl2", "frl"), ("frl3", "frl")):
        lines.append(f"{name}    : {z[key]}")
    lines += [f"numzrwa : {_hex(z['numzrwa'])}", f"zrwafg  : {z['zrwafg']}", f"zrwasz  : {z['zrwasz']}",
              f"zrwacap : {z['zrwacap']}"]
    lines += [f"lbafe {i:2d}: zsze:{z['lbafe'][i]['zsze']:#x} zdes:{e['zdes']}{' (in use)' if i == in_use else ''}"
              for i, e in enumerate(z["lbafe"])]
    click.echo("\n".join(lines))


@zns.command("report-zones")
@address_arg
@nsid_opt
@click.option("-s", "--start-lba", "slba", type=IONUM, default=0, show_default=True, help="starting LBA of the zone")
@click.option("-d", "--descs", type=NUM, default=None, help="number of descriptors to retrieve (default: all of them)")
@click.option("-S", "--state", type=num(0, 7), default=0, show_default=True,
              help="state of zones to list (ZRASF: 0 all, 1 empty, 2 implicitly opened, 3 explicitly opened, "
                   "4 closed, 5 full, 6 read only, 7 offline)")
@output_opt
@click.option("-v", "--verbose", is_flag=True, help="show report zones verbosity (state and type by name)")
@click.option("-e", "--extended", is_flag=True, help="the extended report (descriptor extensions)")
@click.option("-p", "--partial", is_flag=True, help="a partial report (the count covers what is returned)")
def report_zones(address: str, nsid: int, slba: int, descs: int | None, state: int, fmt: str, verbose: bool,
                 extended: bool, partial: bool) -> None:
    """Report Zones (Zone Management Receive): nvme-cli's nr_zones is the header's count of the
    zones in the state asked for from LBA 0; the list starts at --start-lba.

    \b
    Example: nvmevfio zns report-zones 00:04.0 -n 1 -d 4 -o json
             nvmevfio zns report-zones 00:04.0 -S 5      # the full zones
    """
    from nvmevfio.nvme import zns as spec

    name = {v: k for k, v in spec.REPORT_FILTER.items()}.get(state)
    word = spec.STATE_NAMES[name].lower() if name is not None else None
    with blockdev(address, nsid) as dev, errors():
        total = dev.zone_report(0, state=word, count=1)[0]
        _, zones = dev.zone_report(slba, state=word, count=total if descs is None else descs, partial=partial,
                                   extended=extended)
    if fmt == "json":
        entries = []
        for z in zones:
            entry = z.as_json()
            if extended:
                entry["ext_data"] = _ext_json(z.extension) if z.attributes & spec.ZA_ZDEV else "Not valid"
            entries.append(entry)
        _emit_json({"nr_zones": total, "zone_list": entries})
        return
    if fmt == "binary":
        _fail("report-zones -o binary: not offered (use -o json)", EXIT_ERROR)
    click.echo(f"nr_zones: {total}")
    for z in zones:
        if verbose:
            click.echo(f"SLBA: {_hex(z.slba):<10} WP: {_hex(z.wp):<10} Cap: {_hex(z.capacity):<10} "
                       f"State: {z.state_name:<12} Type: {spec.ZONE_TYPE_NAMES.get(z.type, 'Unknown'):<14}")
        else:
            click.echo(f"SLBA: {_hex(z.slba):<10} WP: {_hex(z.wp):<10} Cap: {_hex(z.capacity):<10} "
                       f"State: {_hex(int(z.state) << 4):<4} Type: {_hex(z.type):<4} Attrs: {_hex(z.attributes):<4} "
                       f"AttrsInfo: {_hex(z.attributes_info):<4}")


def _ext_json(data: bytes) -> list[str]:
    """A descriptor extension as nvme-cli's d_json: one string of hex bytes per 16."""
    return [" ".join(f"{b:02x}" for b in data[i : i + 16]) for i in range(0, len(data), 16)]


def _zone_command(command: str, action: str, zsa: int) -> Any:
    @zns.command(command, help=f"{action.capitalize()} the zone starting at --start-lba, or all zones (-a) "
                 f"(Zone Management Send, ZSA {zsa:#x}).")
    @address_arg
    @nsid_opt
    @click.option("-s", "--start-lba", "slba", type=IONUM, default=0, show_default=True,
                  help="starting LBA of the zone for this command")
    @click.option("-a", "--select-all", is_flag=True, help="send command to all zones")
    def run(address: str, nsid: int, slba: int, select_all: bool) -> None:
        with blockdev(address, nsid) as dev, errors():
            dw0 = dev.zone_action(action, slba, select_all=select_all)
        zcapc = dw0 & 1 if action == "reset" else 0  # nvme-cli reads ZCAPC after a reset only
        click.echo(f"zns-{command}: Success, action:{zsa} zone:{slba:x} all:{int(select_all)} zcapc:{zcapc} "
                   f"nsid:{nsid}")

    return run


for _command, (_action, _zsa) in ZONE_COMMANDS.items():
    _zone_command(_command, _action, _zsa)


@zns.command("zone-append")
@address_arg
@nsid_opt
@click.option("-s", "--zslba", type=IONUM, default=0, show_default=True, help="starting LBA of the zone")
@click.option("-z", "--data-size", type=IONUM, required=True, help="size of data in bytes (whole blocks)")
@click.option("-d", "--data", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="file containing data to write (default: stdin)")
def zone_append(address: str, nsid: int, zslba: int, data_size: int, data: str) -> None:
    """Zone Append: the data goes where the zone's write pointer is; the LBA it was written at is
    printed (hex, as nvme-cli). Data shorter than --data-size is zero-filled.

    \b
    Example: nvmevfio zns zone-append 00:04.0 -n 1 -s 0x400 -z 8192 -d data.bin
    """
    src = sys.stdin.buffer.read(data_size) if data == "-" else open(data, "rb").read(data_size)  # noqa: SIM115
    payload = src + bytes(data_size - len(src))
    with blockdev(address, nsid) as dev, errors():
        if data_size % dev.block_size:
            _fail(f"refused: data size {data_size:#x} is not aligned to the {dev.block_size:#x}-byte block "
                  "[length-mismatch]", EXIT_REFUSED)
        lba = dev.zone_append(zslba, payload)
    click.echo(f"Success appended data to LBA {lba:x}")
