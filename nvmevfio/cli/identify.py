"""Registers and identify: show-regs, id-ctrl, id-ns, list-ns (nvme-cli's JSON field names)."""

from __future__ import annotations

from typing import Any

import click

from nvmevfio.cli.common import _emit_json, _nvme_cli_json, address_arg, controller, errors, main, nsid_opt, output_opt

JSON_STR_FIELDS = {"tnvmcap", "unvmcap", "megcap", "maxdna", "nvmcap"}  # 128-bit values, as nvme-cli prints them
ID_CTRL_HEX = {"vid", "ssvid", "ver", "oaes", "ctratt", "oacs", "frmw", "lpa", "sanicap", "oncs", "fuses", "fna",
               "vwc", "sgls", "ieee", "cmic", "nvmsr", "vwci", "mec", "anacap", "ctrattr", "ocfs"}
ID_NS_HEX = {"nsze", "ncap", "nuse", "nsfeat", "flbas", "mc", "dpc"}


# ------------------------------------------------------------------ registers and identify
@main.command("show-regs")
@address_arg
@output_opt
def show_regs(address: str, fmt: str) -> None:
    """Decode CAP, VS, CC, CSTS (read only) and show the IOMMU's usable IOVA ranges.

    \b
    Example: nvmevfio show-regs 00:04.0
    """
    from nvmevfio.nvme import regs

    with controller(address, enable=False) as s:
        r = s.registers()
        iommu = s.iommu
        info = {"address": s.address, "cap": r.cap, "vs": r.vs, "cc": r.cc, "csts": r.csts,
                "version": regs.version_string(r.vs), "decoded": r.decoded(), "bar0_size": s.bar0_size,
                "pci_command": s.pci_command, "iommu_backend": iommu.backend, "iova_pgsizes": iommu.iova_pgsizes,
                "iova_ranges": [{"start": a, "end": b} for a, b in iommu.ranges]}
    if fmt == "json":
        _emit_json(info)
        return
    click.echo(f"{info['address']}: NVMe {info['version']}, BAR0 {info['bar0_size']:#x} bytes, "
               f"PCI command {info['pci_command']:#06x}")
    for name in ("cap", "vs", "cc", "csts"):
        fields = " ".join(f"{k}={v:#x}" for k, v in info["decoded"][name].items())
        click.echo(f"{name:<5}: {info[name]:#018x}  {fields}")
    cap = info["decoded"]["cap"]
    pages = f"{4 << (10 + cap['MPSMIN'])}..{4 << (10 + cap['MPSMAX'])}"
    click.echo(f"        timeout {cap['TO'] * 500} ms, doorbell stride {4 << cap['DSTRD']} B, "
               f"MQES {cap['MQES'] + 1} entries, page size {pages} B")
    if iommu.backend == "noiommu":
        click.echo("iommu: none (noiommu): the device sees physical addresses, kept inside the broker's pinned "
                   "pool; caller buffers are bounced")
    else:
        click.echo(f"iommu: {iommu.backend}, page sizes {iommu.iova_pgsizes:#x}")
    for a, b in iommu.ranges:
        click.echo(f"       usable IOVA {a:#018x} - {b:#018x} ({(b - a + 1) / (1 << 30):.1f} GiB)")


@main.command("id-ctrl")
@address_arg
@output_opt
def id_ctrl(address: str, fmt: str) -> None:
    """Identify Controller (CNS 01h); alias: identify.

    \b
    Example: nvmevfio id-ctrl 00:04.0 -o json
    """
    with controller(address) as s, errors():
        c = s.identify_controller()
    if fmt == "json":
        _emit_json(_nvme_cli_json(c, JSON_STR_FIELDS))
        return
    click.echo("NVME Identify Controller:")
    for k, v in c.items():
        if k == "psds":
            continue
        if k == "ieee":
            v = f"{v:06x}"
        elif k in ID_CTRL_HEX and isinstance(v, int):
            v = hex(v)
        click.echo(f"{k:<10}: {v}")
    for i, ps in enumerate(c["psds"]):
        click.echo(f"ps {i:>4} : mp:{ps['max_power'] / 100:.2f}W {'non-' if not ps['flags'] & 2 else ''}operational "
                   f"enlat:{ps['entry_lat']} exlat:{ps['exit_lat']} rrt:{ps['read_tput']} rrl:{ps['read_lat']}")
        click.echo(f"{'':10}rwt:{ps['write_tput']} rwl:{ps['write_lat']} idle_power:{ps['idle_power']} "
                   f"active_power:{ps['active_power']}")
    if c["oacs"] & (1 << 8):
        click.echo("shadow doorbells: supported (OACS bit 8, Doorbell Buffer Config); nvmevfio's I/O queues use "
                   "them unless --no-shadow-doorbells / open(shadow_doorbells=False)")
    else:
        click.echo("shadow doorbells: not supported (OACS bit 8 clear); every doorbell is an MMIO write")


@main.command("id-ns")
@address_arg
@nsid_opt
@click.option("-a", "--all", "all_", is_flag=True, help="every active namespace (a JSON array with -o json)")
@output_opt
def id_ns(address: str, nsid: int, all_: bool, fmt: str) -> None:
    """Identify Namespace (CNS 00h).

    \b
    Example: nvmevfio id-ns 00:04.0 -n 1
             nvmevfio id-ns 00:04.0 --all -o json
    """
    with controller(address) as s, errors():
        nsids = s.active_namespaces() if all_ else [nsid]
        idents = [(n, s.identify_namespace(n).identify) for n in nsids]
    if fmt == "json":
        docs = [_nvme_cli_json(n, JSON_STR_FIELDS) for _, n in idents]
        _emit_json(docs if all_ else docs[0])
        return
    for i, (n_id, n) in enumerate(idents):
        if i:
            click.echo("")
        _print_id_ns(n_id, n)


def _print_id_ns(nsid: int, n: dict[str, Any]) -> None:
    from nvmevfio.nvme import structures

    click.echo(f"NVME Identify Namespace {nsid}:")
    in_use = structures.flbas_index(n["flbas"], n["nlbaf"])
    for k, v in n.items():
        if k == "lbafs":
            continue
        click.echo(f"{k:<8}: {hex(v) if k in ID_NS_HEX and v else v}")
    for i, f in enumerate(n["lbafs"]):
        click.echo(f"lbaf {i:>2} : ms:{f['ms']:<3} lbads:{f['ds']:<2} rp:{f['rp']} {'(in use)' if i == in_use else ''}")


@main.command("list-ns")
@address_arg
@output_opt
def list_ns(address: str, fmt: str) -> None:
    """Active namespace ids (CNS 02h).

    \b
    Example: nvmevfio list-ns 00:04.0
    """
    with controller(address) as s, errors():
        ids = s.active_namespaces()
    if fmt == "json":
        _emit_json({"nsid_list": [{"nsid": i} for i in ids]})
        return
    for i, nsid in enumerate(ids):
        click.echo(f"[{i:>4}]:{nsid:#x}")
