"""Discovery and binding (list, bind, unbind) and controller state (reset, shutdown)."""

from __future__ import annotations

import click

from nvmevfio.cli.common import (
    _address,
    _emit_json,
    _need_root,
    _root_option,
    address_arg,
    controller,
    errors,
    main,
    output_opt,
)


# ------------------------------------------------------------------ discovery and binding
@main.command("list")
@output_opt
@click.option("-v", "--verbose", "more", is_flag=True, help="accepted; the list always shows everything")
def list_cmd(fmt: str, more: bool) -> None:
    """List NVMe functions: address, ids, model, driver, IOMMU group, namespaces and mounts.

    \b
    Example: nvmevfio list -o json
    """
    from nvmevfio.pci import list_functions
    from nvmevfio.vfio import choose_backend

    with errors():
        fns = list_functions()
        # the IOMMU backend nvmevfio would open a vfio-pci function with (--backend / auto)
        backends = {f.address: choose_backend(f.address, _root_option("backend")) if f.driver == "vfio-pci" else None
                    for f in fns}
    if fmt == "json":
        _emit_json({"Functions": [{**f.to_dict(), "IommuBackend": backends[f.address]} for f in fns]})
        return
    if not fns:
        click.echo("no NVMe functions (PCI class 0x010802) found")
        return
    click.echo(f"{'Address':<13} {'Vendor:Device':<13} {'Driver':<9} {'Group':>5} {'Backend':<8} {'NUMA':>4}  Model")
    click.echo(f"{'-' * 13} {'-' * 13} {'-' * 9} {'-' * 5} {'-' * 8} {'-' * 4}  {'-' * 30}")
    for f in fns:
        group = "-" if f.iommu_group is None else str(f.iommu_group)
        numa = "-" if f.numa_node is None else str(f.numa_node)
        click.echo(f"{f.address:<13} {f.vendor_id:04x}:{f.device_id:04x}     {f.driver or '-':<9} {group:>5} "
                   f"{backends[f.address] or '-':<8} {numa:>4}  {f.vendor + ' ' if f.vendor else ''}{f.model}")
        for ns in f.namespaces:
            use = ", ".join([f"mounted on {m}" for m in ns.mounts] + (["swap"] if ns.swap else [])
                            + [f"held by {h}" for h in ns.holders])
            gb = ns.size_bytes / 1e9
            click.echo(f"{'':<13}   /dev/{ns.name} nsid {ns.nsid} {gb:.2f} GB{'  ' + use if use else ''}")


@main.command()
@address_arg
@click.option("--force", is_flag=True, help="bind even if a namespace is mounted, swap or held")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="wait up to SECONDS for the function to appear first (after a surprise removal: re-plug, rescan)")
def bind(address: str, force: bool, wait_s: float | None) -> None:
    """Move a function to vfio-pci (for nvmevfio).

    \b
    Example: nvmevfio bind 00:04.0
             nvmevfio bind 01:00.0 --wait 60   (a removed controller: when it is back)
    """
    from nvmevfio import pci
    from nvmevfio.replug import wait_for_device

    _need_root()
    with errors():
        fn = pci.bind(address, force=force) if wait_s is None else wait_for_device(address, wait_s, force=force)
    group = f", IOMMU group {fn.iommu_group} (/dev/vfio/{fn.iommu_group})" if fn.iommu_group is not None else ""
    click.echo(f"{fn.address}: bound to {fn.driver}{group}")


@main.command()
@address_arg
def unbind(address: str) -> None:
    """Give a function back to the kernel nvme driver.

    \b
    Example: nvmevfio unbind 00:04.0
    """
    from nvmevfio import pci

    _need_root()
    with errors():
        fn = pci.unbind(address)
    click.echo(f"{fn.address}: bound to {fn.driver}")


# ------------------------------------------------------------------ controller state
RESET_KINDS = ("controller", "subsystem", "flr", "hot")


@main.command()
@address_arg
@click.option("--kind", type=click.Choice(RESET_KINDS),
              help="reset the controller this way and bring it back enabled with its I/O queue: controller "
                   "(CC.EN), subsystem (NSSR, where CAP.NSSRS is 1), flr (PCI function level reset) or hot (PCI "
                   "hot reset); without it the controller is only disabled")
def reset(address: str, kind: str | None) -> None:
    """Controller reset: CC.EN=0 and wait CSTS.RDY=0 (bounded by CAP.TO); with --kind, the reset
    of that kind and the controller brought back (the API's reset_controller(kind)).

    \b
    Example: nvmevfio reset 00:04.0
             nvmevfio reset 00:04.0 --kind flr
    """
    if kind is None:
        with controller(address, enable=False) as s, errors():
            s.reset()
            csts = s.registers().csts
        click.echo(f"{_address(address)}: controller disabled (CSTS={csts:#010x})")
        return
    _reset_kind(address, kind)


def _reset_kind(address: str, kind: str) -> None:
    with controller(address, enable=False) as s, errors():
        s.check_reset_kind(kind)  # refused before the controller is touched
        s.enable()
        s.create_io_queues(1)
        s.reset_controller(kind)
        regs = s.registers()
    click.echo(f"{_address(address)}: {kind} reset done, controller enabled again (CC={regs.cc:#010x}, "
               f"CSTS={regs.csts:#010x})")


@main.command("subsystem-reset")
@address_arg
def subsystem_reset(address: str) -> None:
    """NVM Subsystem Reset (NSSR): written where CAP.NSSRS is 1 and the controller brought back;
    refused by name where it is 0. The same as ``reset --kind subsystem``.

    \b
    Example: nvmevfio subsystem-reset 00:04.0
    """
    _reset_kind(address, "subsystem")


@main.command()
@address_arg
def shutdown(address: str) -> None:
    """Normal shutdown: CC.SHN=01b and wait CSTS.SHST=10b.

    \b
    Example: nvmevfio shutdown 00:04.0
    """
    with controller(address) as s, errors():
        s.shutdown()
        csts = s.registers().csts
    click.echo(f"{_address(address)}: shutdown complete (CSTS={csts:#010x})")
