"""Registers and identify: show-regs, id-ctrl, id-ns, list-ns, ns-descs, list-ctrl (nvme-cli's JSON field names)."""

from __future__ import annotations

import sys
from typing import Any

import click

from nvmevfio.cli.common import (
    EXIT_ERROR,
    NUM,
    _emit_json,
    _nvme_cli_json,
    _write_data,
    address_arg,
    controller,
    errors,
    human_opt,
    main,
    nsid_opt,
    num,
    nvme_dump,
    output_opt,
    raw_binary_opt,
    vendor_specific_opt,
    want_binary,
)

JSON_STR_FIELDS = {"tnvmcap", "unvmcap", "megcap", "maxdna", "nvmcap"}  # 128-bit values, as nvme-cli prints them
ID_CTRL_HEX = {"vid", "ssvid", "cmic", "cntlid", "ver", "rtd3r", "rtd3e", "oaes", "ctratt", "rrls", "oacs", "frmw",
               "lpa", "avscc", "apsta", "rpmbs", "hctma", "sanicap", "sqes", "cqes", "oncs", "fuses", "fna", "vwc",
               "ocfs", "sgls", "fcatt"}  # nvme-cli's %#x; the others are decimal
ID_NS_HEX = {"nsze", "ncap", "nuse", "nsfeat", "flbas", "mc", "dpc", "dps", "nmic", "rescap", "fpi"}  # nvme-cli's %#x


# ------------------------------------------------------------------ registers and identify
# show-regs -o json's keys, nvme-cli 2.3's order (json_ctrl_registers)
NVME_CLI_REGS = ("cap", "vs", "intms", "intmc", "cc", "csts", "nssr", "crto", "aqa", "asq", "acq", "cmbloc", "cmbsz",
                 "bpinfo", "bprsel", "bpmbl", "cmbmsc", "cmbsts", "pmrcap", "pmrctl", "pmrsts", "pmrebs", "pmrswtp",
                 "pmrmscl", "pmrmscu")
REGISTER_FILE = 0xE1C  # bytes nvme-cli's show-regs -o binary dumps (0000h..0E1Bh)


def register_file(values: dict[str, int | None]) -> bytes:
    """show-regs -o binary: nvme-cli's 0E1Ch bytes of BAR0, built from the registers its show-regs
    reads, each at its offset (NVMe Base 2.0, 3.1.4); every other byte 0, and a withheld register
    (the no-IOMMU lane's physical addresses) 0."""
    from nvmevfio.nvme import regs

    out = bytearray(REGISTER_FILE)
    for name, at, width in (("cap", regs.CAP, 8), ("vs", regs.VS, 4), ("cc", regs.CC, 4), ("csts", regs.CSTS, 4),
                            ("aqa", regs.AQA, 4), ("asq", regs.ASQ, 8), ("acq", regs.ACQ, 8), *regs.SHOWN):
        if values.get(name) is not None and at + width <= REGISTER_FILE:
            out[at : at + width] = int(values[name] or 0).to_bytes(width, "little")
    return bytes(out)


@main.command("show-regs")
@address_arg
@output_opt
@human_opt
def show_regs(address: str, fmt: str, human: bool) -> None:
    """Decode CAP, VS, CC, CSTS (read only) and show the IOMMU's usable IOVA ranges.

    With -H, every register nvme-cli's show-regs reads, decoded as nvme-cli 2.3 prints them (the
    controller, the DMA lane and the IOVA ranges then go to stderr).

    \b
    Example: nvmevfio show-regs 00:04.0
             nvmevfio show-regs 00:04.0 -H
    """
    from nvmevfio.nvme import regs

    with controller(address, enable=False) as s:
        r = s.registers(every=human or fmt != "normal")
        iommu = s.iommu
        info = {"address": s.address, "cap": r.cap, "vs": r.vs, "cc": r.cc, "csts": r.csts,
                "version": regs.version_string(r.vs), "decoded": r.decoded(), "bar0_size": s.bar0_size,
                "pci_command": s.pci_command, "iommu_backend": iommu.backend, "iova_pgsizes": iommu.iova_pgsizes,
                "iova_ranges": [{"start": a, "end": b} for a, b in iommu.ranges]}
    values = {"cap": r.cap, "vs": r.vs, "cc": r.cc, "csts": r.csts, "aqa": r.aqa, "asq": r.asq, "acq": r.acq,
              **r.others}
    if fmt != "normal":  # nvme-cli 2.3's show_registers returns the output format's flag: exit 1 after it
        if fmt == "binary":
            _write_data(register_file(values), True)
        else:  # nvme-cli's keys (json_ctrl_registers), and nvmevfio's own
            _emit_json({**{k: values.get(k) for k in NVME_CLI_REGS}, **info})
        sys.exit(EXIT_ERROR)
    summary = human  # with -H stdout is nvme-cli's text, nvmevfio's own lines go to stderr
    if human:
        from nvmevfio.cli.human_regs import registers

        click.echo("\n".join(registers(values)).encode() + b"\n", nl=False)
    click.echo(f"{info['address']}: NVMe {info['version']}, BAR0 {info['bar0_size']:#x} bytes, "
               f"PCI command {info['pci_command']:#06x}", err=summary)
    if not human:
        for name in ("cap", "vs", "cc", "csts"):
            fields = " ".join(f"{k}={v:#x}" for k, v in info["decoded"][name].items())
            click.echo(f"{name:<5}: {info[name]:#018x}  {fields}")
        cap = info["decoded"]["cap"]
        pages = f"{4 << (10 + cap['MPSMIN'])}..{4 << (10 + cap['MPSMAX'])}"
        click.echo(f"        timeout {cap['TO'] * 500} ms, doorbell stride {4 << cap['DSTRD']} B, "
                   f"MQES {cap['MQES'] + 1} entries, page size {pages} B")
    if iommu.backend == "noiommu":
        click.echo("iommu: none (noiommu): the device sees physical addresses, kept inside the broker's pinned "
                   "pool; caller buffers are bounced", err=summary)
    else:
        click.echo(f"iommu: {iommu.backend}, page sizes {iommu.iova_pgsizes:#x}", err=summary)
    for a, b in iommu.ranges:
        click.echo(f"       usable IOVA {a:#018x} - {b:#018x} ({(b - a + 1) / (1 << 30):.1f} GiB)", err=summary)


def identify_raw(s: Any, cns: int, nsid: int = 0, cntid: int = 0, csi: int = 0) -> bytes:
    """An Identify data structure's 4096 bytes (admin 06h, through the broker's passthrough)."""
    _, data = s.admin_passthru(0x06, nsid=nsid, data_len=4096, cdw10=cns | cntid << 16, cdw11=csi << 24)
    return bytes(data or b"")


def _vendor_dump(raw: bytes, at: int) -> str:
    return "vs[]:\n" + nvme_dump(raw[at:])


@main.command("id-ctrl")
@address_arg
@vendor_specific_opt
@output_opt
@raw_binary_opt
@human_opt
def id_ctrl(address: str, vendor_specific: bool, fmt: str, raw_binary: bool, human: bool) -> None:
    """Identify Controller (CNS 01h); alias: identify.

    \b
    Example: nvmevfio id-ctrl 00:04.0 -o json
             nvmevfio id-ctrl 00:04.0 -H -v
    """
    with controller(address) as s, errors():
        c = s.identify_controller()
        raw = identify_raw(s, 0x01) if vendor_specific or want_binary(fmt, raw_binary) else b""
    if want_binary(fmt, raw_binary):
        _write_data(raw, True)
        return
    if fmt == "json":
        _emit_json(_nvme_cli_json(c, JSON_STR_FIELDS))
        return
    from nvmevfio.cli import human as decode

    lines = ["NVME Identify Controller:"]
    for k, v in c.items():
        if k == "psds":
            continue
        if k == "ieee":
            v = f"{v:06x}"
        elif k in ID_CTRL_HEX and isinstance(v, int):
            v = f"{v:#x}" if v else "0"  # C's %#x, as nvme-cli prints them
        lines.append(f"{k:<10}: {v}")
        if human:
            lines += decode.id_ctrl_field(k, c[k])
    lines += decode.power_states(c["psds"])
    click.echo("\n".join(lines).encode() + b"\n", nl=False)  # UTF-8 whatever the locale (the °C), as nvme-cli
    if vendor_specific:
        click.echo(_vendor_dump(raw, 3072), nl=False)
    if c["oacs"] & (1 << 8):
        from nvmevfio.nvme.structures import shadow_doorbells_pay

        use = ("use them unless --no-shadow-doorbells / open(shadow_doorbells=False)" if shadow_doorbells_pay(c) else
               "do not use them on QEMU's model, where they are slower, unless --shadow-doorbells / "
               "open(shadow_doorbells=True)")
        click.echo(f"shadow doorbells: supported (OACS bit 8, Doorbell Buffer Config); nvmevfio's I/O queues {use}",
                   err=True)
    else:
        click.echo("shadow doorbells: not supported (OACS bit 8 clear); every doorbell is an MMIO write", err=True)


@main.command("id-ns")
@address_arg
@nsid_opt
@click.option("--force", is_flag=True, help="an allocated namespace, even if not attached (CNS 11h)")
@vendor_specific_opt
@raw_binary_opt
@output_opt
@human_opt
@click.option("-a", "--all", "all_", is_flag=True, help="every active namespace (a JSON array with -o json)")
def id_ns(address: str, nsid: int, force: bool, vendor_specific: bool, raw_binary: bool, fmt: str, human: bool,
          all_: bool) -> None:
    """Identify Namespace (CNS 00h).

    \b
    Example: nvmevfio id-ns 00:04.0 -n 1
             nvmevfio id-ns 00:04.0 --all -o json
    """
    from nvmevfio.nvme import structures

    binary = want_binary(fmt, raw_binary)
    with controller(address) as s, errors():
        nsids = s.active_namespaces() if all_ else [nsid]
        if force or binary or vendor_specific:
            raws = [identify_raw(s, 0x11 if force else 0x00, n) for n in nsids]
            idents = [(n, structures.parse_identify_namespace(r)) for n, r in zip(nsids, raws)]
        else:
            raws = []
            idents = [(n, s.identify_namespace(n).identify) for n in nsids]
        if not raws and fmt != "json" and any(n["nulbaf"] for _, n in idents):  # the formats past NLBAF: raw
            raws = [identify_raw(s, 0x00, n) for n in nsids]
    if binary:
        _write_data(b"".join(raws), True)
        return
    if fmt == "json":
        docs = [_nvme_cli_json(n, JSON_STR_FIELDS) for _, n in idents]
        _emit_json(docs if all_ else docs[0])
        return
    for i, (n_id, n) in enumerate(idents):
        if i:
            click.echo("")
        _print_id_ns(n_id, n, human, raws[i] if raws else None)
        if vendor_specific:
            click.echo(_vendor_dump(raws[i], 384), nl=False)


# id-ns's text lines in nvme-cli 2.3's order (the JSON keeps the parser's); NPWG..NOWS only when NSFEAT bit 4 says
# they are valid, as nvme-cli prints them
ID_NS_TEXT = ("nsze", "ncap", "nuse", "nsfeat", "nlbaf", "flbas", "mc", "dpc", "dps", "nmic", "rescap", "fpi", "dlfeat",
              "nawun", "nawupf", "nacwu", "nabsn", "nabo", "nabspf", "noiob", "nvmcap", "npwg", "npwa", "npdg", "npda",
              "nows", "mssrl", "mcl", "msrc", "nulbaf", "anagrpid", "nsattr", "nvmsetid", "endgid", "nguid", "eui64")
ID_NS_OPTIMAL = {"npwg", "npwa", "npdg", "npda", "nows"}


def lba_formats(n: dict[str, Any], raw: bytes | None) -> list[dict[str, int]]:
    """The LBA formats id-ns's text shows: 0..NLBAF+NULBAF, as nvme-cli 2.3 prints them (the formats
    with unique attributes past NLBAF too, read from the raw structure's LBAF array at byte 128, 64
    entries at most; its JSON, like the parser's, stops at NLBAF)."""
    count = min(n["nlbaf"] + n.get("nulbaf", 0) + 1, 64)
    if raw is None or count <= len(n["lbafs"]):
        return list(n["lbafs"])
    words = (int.from_bytes(raw[128 + 4 * i : 132 + 4 * i], "little") for i in range(count))
    return [{"ms": d & 0xFFFF, "ds": (d >> 16) & 0xFF, "rp": (d >> 24) & 0x3} for d in words]


def _print_id_ns(nsid: int, n: dict[str, Any], human: bool, raw: bytes | None = None) -> None:
    from nvmevfio.cli import human as decode
    from nvmevfio.nvme import structures

    lines = [f"NVME Identify Namespace {nsid}:"]
    for k in ID_NS_TEXT:
        v = n[k]
        if k in ID_NS_OPTIMAL and not n["nsfeat"] & 0x10:
            continue
        label = "nsattr\t" if k == "nsattr" else f"{k:<8}"  # nvme-cli's tab, kept
        lines.append(f"{label}: {hex(v) if k in ID_NS_HEX and v else v}")
        if human:
            lines += decode.id_ns_field(k, v)
    if human:  # nvme-cli's -H line, its in-use mark from FLBAS as libnvme reads it
        lines += [decode.lba_format(i, f, i == decode.lbaf_in_use(n["flbas"]))
                  for i, f in enumerate(lba_formats(n, raw))]
    else:
        in_use = structures.flbas_index(n["flbas"], n["nlbaf"])
        lines += [f"lbaf {i:>2} : ms:{f['ms']:<3} lbads:{f['ds']:<2} rp:{decode.hex0(f['rp'])} "
                  f"{'(in use)' if i == in_use else ''}" for i, f in enumerate(lba_formats(n, raw))]
    click.echo("\n".join(lines))


@main.command("list-ns")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=NUM, default=1, show_default=True,
              help="the list starts after this id minus one (nvme-cli's)")
@click.option("-y", "--csi", type=num(0, 255), default=None, help="I/O command set (CNS 07h / 11h)")
@click.option("-a", "--all", "all_", is_flag=True, help="allocated namespaces too, attached or not (CNS 10h)")
@output_opt
def list_ns(address: str, nsid: int, csi: int | None, all_: bool, fmt: str) -> None:
    """Active (or, with --all, allocated) namespace ids (Identify CNS 02h / 10h).

    \b
    Example: nvmevfio list-ns 00:04.0
    """
    cns = (0x10 if all_ else 0x02) if csi is None else (0x11 if all_ else 0x07)
    with controller(address) as s, errors():
        raw = identify_raw(s, cns, max(nsid, 1) - 1, csi=csi or 0)
    ids = [i for i in (int.from_bytes(raw[k : k + 4], "little") for k in range(0, 4096, 4)) if i]
    if fmt == "json":
        _emit_json({"nsid_list": [{"nsid": i} for i in ids]})
        return
    if fmt == "binary":
        _write_data(raw, True)
        return
    for i, n in enumerate(ids):
        click.echo(f"[{i:>4}]:{n:#x}")


NIDT = {1: ("eui64", 8), 2: ("nguid", 16), 3: ("uuid", 16), 4: ("csi", 1)}


def ns_descriptors(raw: bytes) -> list[dict[str, Any]]:
    """The Namespace Identification Descriptor list (CNS 03h) as nvme-cli's JSON entries."""
    out: list[dict[str, Any]] = []
    at = 0
    while at + 4 <= len(raw) and raw[at]:
        nidt, nidl = raw[at], raw[at + 1]
        value = raw[at + 4 : at + 4 + nidl]
        name = NIDT.get(nidt, (f"type{nidt}", nidl))[0]
        if nidt == 3:
            h = value.hex()
            text = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        elif nidt == 4:
            text = str(value[0])
        else:
            text = value.hex()
        out.append({"loc": at, "nidt": nidt, "nidl": nidl, "type": name, name: text})
        at += 4 + nidl
    return out


@main.command("ns-descs")
@address_arg
@nsid_opt
@output_opt
@raw_binary_opt
def ns_descs(address: str, nsid: int, fmt: str, raw_binary: bool) -> None:
    """Namespace Identification Descriptors (Identify CNS 03h): EUI64, NGUID, UUID, command set.

    \b
    Example: nvmevfio ns-descs 00:04.0 -n 1 -o json
    """
    with controller(address) as s, errors():
        raw = identify_raw(s, 0x03, nsid)
    if want_binary(fmt, raw_binary):
        _write_data(raw, True)
        return
    descs = ns_descriptors(raw)
    if fmt == "json":
        _emit_json({"ns-descs": descs})
        return
    click.echo(f"NVME Namespace Identification Descriptors NS {nsid}:")
    for d in descs:
        click.echo(f"{d['type']:<8}: {d[d['type']]}")


@main.command("list-ctrl")
@address_arg
@click.option("-c", "--cntid", type=num(0, 0xFFFF), default=0, help="the list starts at this controller id")
@click.option("-n", "--namespace-id", "nsid", type=NUM, default=0,
              help="controllers attached to this namespace (CNS 12h) instead of all in the subsystem (CNS 13h)")
@output_opt
def list_ctrl(address: str, cntid: int, nsid: int, fmt: str) -> None:
    """Controller list (Identify CNS 12h / 13h).

    \b
    Example: nvmevfio list-ctrl 00:04.0 -o json
    """
    with controller(address) as s, errors():
        raw = identify_raw(s, 0x12 if nsid else 0x13, nsid, cntid=cntid)
    if fmt == "binary":
        _write_data(raw, True)
        return
    count = int.from_bytes(raw[0:2], "little")
    ids = [int.from_bytes(raw[2 + 2 * i : 4 + 2 * i], "little") for i in range(min(count, 2047))]
    if fmt == "json":
        _emit_json({"num_ctrl": count, "ctrl_list": [{"ctrl_id": i} for i in ids]})
        return
    click.echo(f"num of ctrls present: {count}")
    for i, c in enumerate(ids):
        click.echo(f"[{i:>4}]:{c:#x}")
