"""The ``nvmevfio`` command line.

Output follows nvme-cli's conventions: ``-o json`` for scripts (the field names of
``nvme id-ctrl/id-ns/smart-log -o json``), ``-n`` for the namespace id. Errors are
one line with the refusal reason or the NVMe status name and what to do next,
and a non-zero exit code; ``-v`` adds detail.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import click

from nvmevfio._version import __version__
from nvmevfio.errors import CommandError, DeviceInUse, NvmeVfioError, Refused, ShimError
from nvmevfio.service import DEFAULT_SOCKET

EXIT_ERROR, EXIT_REFUSED, EXIT_DEVICE, EXIT_SETUP = 1, 3, 4, 5
PROGRESS_MIN = 4 << 20  # show a progress bar on transfers larger than this
CHUNK = 4 << 20

JSON_STR_FIELDS = {"tnvmcap", "unvmcap", "megcap", "maxdna", "nvmcap"}  # 128-bit values, as nvme-cli prints them
SMART_STR_FIELDS = {"data_units_read", "data_units_written", "host_read_commands", "host_write_commands",
                    "controller_busy_time", "power_cycles", "power_on_hours", "unsafe_shutdowns", "media_errors",
                    "num_err_log_entries"}
ID_CTRL_HEX = {"vid", "ssvid", "ver", "oaes", "ctratt", "oacs", "frmw", "lpa", "sanicap", "oncs", "fuses", "fna",
               "vwc", "sgls", "ieee", "cmic", "nvmsr", "vwci", "mec", "anacap", "ctrattr", "ocfs"}
ID_NS_HEX = {"nsze", "ncap", "nuse", "nsfeat", "flbas", "mc", "dpc"}


# ------------------------------------------------------------------ plumbing
class Ctx:
    verbose = False


def _fail(msg: str, code: int, detail: str = "") -> None:
    click.echo(f"nvmevfio: error: {msg}", err=True)
    if detail and Ctx.verbose:
        click.echo(detail, err=True)
    sys.exit(code)


def _hint(exc: NvmeVfioError) -> str:
    reason = exc.reason
    if reason in ("not-bound-to-vfio", "group-not-viable"):
        return "bind it first: nvmevfio bind <address>"
    if isinstance(exc, ShimError) and exc.errno in (1, 13):
        return "run as root (VFIO needs it)"
    if reason == "window-past-namespace-end":
        return "check the namespace size with: nvmevfio id-ns <address>"
    if reason == "length-mismatch":
        return "transfer whole blocks (see the block size in nvmevfio id-ns), or use --pad"
    if reason == "device-in-use":
        return "unmount/release it, or use --force"
    if reason == "no-iommu-group":
        return "enable the IOMMU (intel_iommu=on / amd_iommu=on on the kernel command line)"
    return ""


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Expected failures become one line and an exit code; no traceback unless -v."""
    import traceback

    try:
        yield
    except DeviceInUse as exc:
        _fail(f"{exc} — {_hint(exc)}", EXIT_REFUSED, traceback.format_exc())
    except Refused as exc:
        hint = _hint(exc)
        _fail(f"refused: {exc}{' — ' + hint if hint else ''}", EXIT_REFUSED, traceback.format_exc())
    except CommandError as exc:
        _fail(f"{exc}", EXIT_DEVICE, traceback.format_exc())
    except NvmeVfioError as exc:
        hint = _hint(exc)
        code = EXIT_SETUP if exc.reason in ("not-bound-to-vfio", "no-iommu-group", "group-not-viable",
                                            "bad-address", "no-such-function", "not-nvme", "no-iommufd",
                                            "noiommu-not-allowed", "noiommu-no-hugepages",
                                            "noiommu-no-pagemap") else EXIT_ERROR
        _fail(f"{exc}{' — ' + hint if hint else ''}", code, traceback.format_exc())
    except (OSError, ValueError) as exc:
        _fail(str(exc), EXIT_ERROR, traceback.format_exc())


def _need_root() -> None:
    if os.geteuid() != 0:
        _fail("this needs root: VFIO device files and sysfs binding are root-only (try sudo)", EXIT_SETUP)


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


def _address(address: str) -> str:
    from nvmevfio.pci import normalize_address

    with errors():
        return normalize_address(address)


def _check_bound(address: str) -> None:
    from nvmevfio.pci import get_function

    with errors():
        fn = get_function(address)
    if fn.driver != "vfio-pci":
        _fail(f"{address} is bound to {fn.driver or 'no driver'}, not vfio-pci — bind it first: "
              f"nvmevfio bind {address}", EXIT_SETUP)


def _root_option(name: str) -> Any:
    """A top-level option's value (--timeout, --backend), None when not given."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return root.params.get(name) if root is not None else None


def _timeout() -> float | None:
    return _root_option("timeout")


@contextlib.contextmanager
def controller(address: str, *, enable: bool = True) -> Iterator[Any]:
    """An enabled controller session; shut down (CC.SHN) on exit."""
    from nvmevfio.provider import open_controller

    _need_root()
    address = _address(address)
    _check_bound(address)
    with errors():
        s = open_controller(address, command_timeout_s=_timeout(), backend=_root_option("backend"),
                            unsafe_noiommu=_root_option("unsafe_noiommu") or None)
        try:
            if enable:
                s.enable()
                s.identify_controller()
            yield s
        finally:
            s.close()


@contextlib.contextmanager
def blockdev(address: str, nsid: int, socket_path: str | None = None, **kw: Any) -> Iterator[Any]:
    """The namespace for a block command: opened here (root), or through ``nvmevfio serve``'s
    socket (any user its grants name; the window's LBA 0 is block 0)."""
    from nvmevfio.blockdev import open as bopen

    if socket_path:
        from nvmevfio.service.client import connect

        with errors():
            sdev = connect(socket_path, nsid)
            try:
                yield sdev
            finally:
                sdev.close()
        return
    if not address:
        _fail("give the controller's ADDRESS, or --socket to go through nvmevfio serve", EXIT_ERROR)
    _need_root()
    address = _address(address)
    _check_bound(address)
    with errors():
        dev = bopen(address, nsid, command_timeout_s=_timeout(), backend=_root_option("backend"),
                    unsafe_noiommu=_root_option("unsafe_noiommu") or None, **kw)
        try:
            yield dev
        finally:
            dev.close()


def _progress(total: int, label: str) -> Any:
    if total > PROGRESS_MIN and sys.stderr.isatty():
        return click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True)
    return contextlib.nullcontext(None)


class _Int0(click.ParamType):
    """An integer in any base Python reads (0x1c, 28, 0o34), as nvme-cli's options."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            self.fail(f"{value!r} is not an integer (decimal or 0x...)", param, ctx)


INT0 = _Int0()


def _complete_address(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of ADDRESS: the NVMe functions on this machine (pyudev), with their driver."""
    from click.shell_completion import CompletionItem

    from nvmevfio.pci import list_functions

    try:
        fns = list_functions()
    except Exception:  # completion must never fail loudly
        return []
    return [CompletionItem(f.address, help=f"{f.driver or 'no driver'} {f.model or ''}".strip())
            for f in fns if f.address.startswith(incomplete) or f.address[5:].startswith(incomplete)]


address_arg = click.argument("address", shell_complete=_complete_address)
output_opt = click.option("-o", "--output-format", "fmt", type=click.Choice(["normal", "json"]), default="normal",
                          show_default=True, help="output format")
nsid_opt = click.option("-n", "--namespace-id", "nsid", type=int, default=1, show_default=True,
                        help="namespace id")
# The block commands: a controller's address, or --socket to go through nvmevfio serve (no root).
block_address_arg = click.argument("address", required=False, default="", shell_complete=_complete_address)
service_socket_opt = click.option("--socket", "service_socket", type=click.Path(dir_okay=False), default=None,
                                  help="go through the nvmevfio serve daemon on this socket (no ADDRESS, no root)")


# Polling loops want a CPU of their own (as SPDK pins its reactors): a polling daemon and a client
# the scheduler wakes on the daemon's CPU share it, and lose a third of their rate or more.
cpu_opt = click.option("--cpu", type=click.IntRange(min=0), default=None,
                       help="run on this CPU only (sched_setaffinity), e.g. a polling daemon and its clients "
                            "on different CPUs")


def _pin(cpu: int | None) -> None:
    """Keep this process on ``cpu`` (--cpu); refused when it is not one this process may use."""
    if cpu is None:
        return
    allowed = sorted(os.sched_getaffinity(0))
    if cpu not in allowed:
        _fail(f"--cpu {cpu}: this process may run on CPUs {', '.join(map(str, allowed))} only", EXIT_ERROR)
    os.sched_setaffinity(0, {cpu})


class AliasedGroup(click.Group):
    aliases = {"identify": "id-ctrl"}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        _, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd else None), cmd, rest


@click.group(cls=AliasedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nvmevfio")
@click.option("-v", "--verbose", is_flag=True, help="more detail on errors (tracebacks)")
@click.option("--timeout", "timeout", type=click.FloatRange(min=0.01), default=None,
              help="command timeout in seconds (default 30): a late command is aborted, then the controller "
                   "is reset and the command requeued")
@click.option("--backend", type=click.Choice(["auto", "type1", "iommufd", "noiommu"]), default=None,
              help="IOMMU backend: type1 (VFIO container), iommufd (VFIO device cdev, Linux 6.6+) or noiommu; "
                   "default auto (iommufd when the function has a cdev, noiommu in a no-IOMMU group), "
                   "or $NVMEVFIO_BACKEND")
@click.option("--unsafe-noiommu", is_flag=True, default=None,
              help="allow a controller without an IOMMU (VFIO no-IOMMU mode): the device can reach all memory; "
                   "the broker bounces every buffer through its pinned pool (or NVMEVFIO_UNSAFE_NOIOMMU=1)")
@click.pass_context
def main(ctx: click.Context, verbose: bool, timeout: float | None, backend: str | None,
         unsafe_noiommu: bool | None) -> None:
    """nvmevfio: a userspace NVMe driver over VFIO.

    ADDRESS is a PCI address, 0000:00:04.0 or 00:04.0. The controller must be bound
    to vfio-pci (`nvmevfio bind ADDRESS`), and commands need root.

    \b
    Example:
      nvmevfio list
      nvmevfio bind 00:04.0
      nvmevfio id-ctrl 00:04.0 -o json
      nvmevfio perf 00:04.0 -w randread -q 32 -s 4096 -t 10
    """
    Ctx.verbose = verbose


# ------------------------------------------------------------------ discovery and binding
@main.command("list")
@output_opt
def list_cmd(fmt: str) -> None:
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
def bind(address: str, force: bool) -> None:
    """Move a function to vfio-pci (for nvmevfio).

    \b
    Example: nvmevfio bind 00:04.0
    """
    from nvmevfio import pci

    _need_root()
    with errors():
        fn = pci.bind(address, force=force)
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


def _nvme_cli_json(d: dict[str, Any], str_fields: set[str]) -> dict[str, Any]:
    return {k: (str(v) if k in str_fields else v) for k, v in d.items()}


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
    from nvmevfio.nvme import spec

    click.echo(f"NVME Identify Namespace {nsid}:")
    in_use = spec.flbas_index(n["flbas"], n["nlbaf"])
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


# ------------------------------------------------------------------ data
def _window(dev: Any, lba: int | None, count: int | None, offset: int | None, size: int | None) -> tuple[int, int]:
    bs = dev.block_size
    if offset is not None or size is not None:
        if lba is not None or count is not None:
            _fail("give either --lba/--count or --offset/--size, not both", EXIT_ERROR)
        offset = offset or 0
        if size is None:
            _fail("--offset needs --size", EXIT_ERROR)
        assert size is not None
        if offset % bs or size % bs:
            _fail(f"refused: --offset {offset} / --size {size} are not multiples of the {bs}-byte block "
                  "[length-mismatch]", EXIT_REFUSED)
        return offset // bs, size // bs
    return (lba or 0), (count if count is not None else 1)


@main.command()
@block_address_arg
@nsid_opt
@service_socket_opt
@click.option("-s", "--lba", type=int, help="first logical block")
@click.option("-c", "--count", type=int, help="number of blocks (default 1)")
@click.option("--offset", type=int, help="byte offset (a multiple of the block size)")
@click.option("--size", type=int, help="bytes to read (a multiple of the block size)")
@click.option("-d", "--data", "data", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="output file (default: stdout)")
@click.option("--hexdump", is_flag=True, help="print a hex dump instead of raw bytes")
def read(address: str, nsid: int, service_socket: str | None, lba: int | None, count: int | None,
         offset: int | None, size: int | None, data: str, hexdump: bool) -> None:
    """Read blocks to a file or stdout.

    \b
    Example: nvmevfio read 00:04.0 -n 1 --lba 0 --count 8 --hexdump
             nvmevfio read 00:04.0 --offset 0 --size 1048576 -d out.bin
             nvmevfio read --socket /run/nvmevfio/nvmevfio.sock --lba 0 --hexdump
    """
    with blockdev(address, nsid, service_socket) as dev, errors():
        first, n = _window(dev, lba, count, offset, size)
        dev.check_window(first, n)
        per = max(1, CHUNK // dev.block_size)
        out = sys.stdout.buffer if data == "-" else open(data, "wb")  # noqa: SIM115
        try:  # a reader that stops early (| head) is not an error: BrokenPipeError ends quietly below
            with _progress(n * dev.block_size, "reading") as bar:
                for start in range(first, first + n, per):
                    k = min(per, first + n - start)
                    chunk = dev.read_blocks(start, k)
                    if hexdump:
                        _hexdump(out, chunk.tobytes(), (start - first) * dev.block_size)
                    else:
                        out.write(chunk.tobytes())
                    if bar is not None:
                        bar.update(len(chunk))
        except BrokenPipeError:
            # Send what is left to /dev/null so the interpreter's final flush does not fail too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        finally:
            if out is not sys.stdout.buffer:
                out.close()
            else:
                with contextlib.suppress(BrokenPipeError):
                    out.flush()


def _write_data(data: bytes, raw: bool, header: str = "", base: int = 0) -> None:
    """Received data to stdout: raw bytes (-b), or a header line (if any) and a hex dump."""
    if header and not raw:
        click.echo(header)
    sys.stdout.flush()  # the header's text before the bytes written under it
    out = sys.stdout.buffer
    if raw:
        out.write(data)
    else:
        _hexdump(out, data, base)
    out.flush()


def _hexdump(out: Any, data: bytes, base: int) -> None:
    lines = []
    for i in range(0, len(data), 16):
        row = data[i : i + 16]
        hx = " ".join(f"{b:02x}" for b in row)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + i:08x}  {hx:<47}  |{asc}|\n")
    out.write("".join(lines).encode())


@main.command()
@block_address_arg
@nsid_opt
@service_socket_opt
@click.option("-s", "--lba", type=int, help="first logical block")
@click.option("--offset", type=int, help="byte offset (a multiple of the block size)")
@click.option("-d", "--data", "data", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="input file (default: stdin)")
@click.option("--pad", is_flag=True, help="zero-pad a partial last block instead of refusing it")
def write(address: str, nsid: int, service_socket: str | None, lba: int | None, offset: int | None, data: str,
          pad: bool) -> None:
    """Write a file (or stdin) at a block address.

    A file is checked whole (size, window, partial last block) before the first block is
    written, then streamed; stdin is read to its end first, for the same reason.

    \b
    Example: nvmevfio write 00:04.0 -n 1 --lba 100 -d image.bin
             head -c 4096 /dev/urandom | nvmevfio write 00:04.0 --lba 0
    """
    import numpy as np

    payload: bytes | None = None
    if data == "-":
        stdin_data = sys.stdin.buffer.read()
        payload, total = stdin_data, len(stdin_data)
    else:
        try:
            total = os.path.getsize(data)
        except OSError as exc:
            _fail(f"cannot read {data}: {exc.strerror}", EXIT_ERROR)
    with blockdev(address, nsid, service_socket) as dev, errors():
        bs = dev.block_size
        if offset is not None:
            if lba is not None:
                _fail("give either --lba or --offset, not both", EXIT_ERROR)
            if offset % bs:
                _fail(f"refused: --offset {offset} is not a multiple of the {bs}-byte block [length-mismatch]",
                      EXIT_REFUSED)
            lba = offset // bs
        lba = lba or 0
        if not total:
            _fail("refused: no data to write [length-mismatch]", EXIT_REFUSED)
        if total % bs and not pad:
            _fail(f"refused: {total} bytes is not a multiple of the {bs}-byte block; the last block "
                  f"would be partial [length-mismatch] — use --pad to zero-fill it", EXIT_REFUSED)
        n = -(-total // bs)
        dev.check_window(lba, n)
        src = io.BytesIO(payload) if payload is not None else open(data, "rb")  # noqa: SIM115
        with src, _progress(n * bs, "writing") as bar:
            done = 0
            while done < n:
                chunk = src.read(min(CHUNK // bs, n - done) * bs)
                if not chunk:
                    _fail(f"{data} shrank while it was being written ({done} blocks written)", EXIT_ERROR)
                if len(chunk) % bs:  # only the last chunk, and only with --pad
                    chunk += b"\0" * (bs - len(chunk) % bs)
                k = len(chunk) // bs
                dev.write_blocks(lba + done, np.frombuffer(chunk, dtype=np.uint8))
                done += k
                if bar is not None:
                    bar.update(k * bs)
    click.echo(f"wrote {n} blocks ({n * bs} bytes) at LBA {lba}", err=True)


@main.command()
@block_address_arg
@nsid_opt
@service_socket_opt
def flush(address: str, nsid: int, service_socket: str | None) -> None:
    """Flush the volatile write cache of a namespace.

    \b
    Example: nvmevfio flush 00:04.0 -n 1
    """
    with blockdev(address, nsid, service_socket) as dev, errors():
        dev.flush()
    click.echo(f"NVMe Flush: success (nsid {nsid})")


def _range_command(verb: str, fn: Callable[[Any, int, int], None]) -> Callable[..., None]:
    @block_address_arg
    @nsid_opt
    @service_socket_opt
    @click.option("-s", "--lba", type=int, required=True, help="first logical block")
    @click.option("-c", "--count", type=int, required=True, help="number of blocks")
    def cmd(address: str, nsid: int, service_socket: str | None, lba: int, count: int) -> None:
        with blockdev(address, nsid, service_socket) as dev, errors():
            fn(dev, lba, count)
        click.echo(f"NVMe {verb}: success (nsid {nsid}, LBA {lba}, {count} blocks)")

    return cmd


main.command("write-zeroes", help="Write Zeroes over a range of blocks.\n\n\b\nExample: nvmevfio write-zeroes "
             "00:04.0 -n 1 --lba 0 --count 2048")(_range_command("Write Zeroes", lambda d, s, c: d.write_zeroes(s, c)))
main.command("deallocate", help="Deallocate (TRIM: Dataset Management) a range of blocks.\n\n\b\nExample: "
             "nvmevfio deallocate 00:04.0 -n 1 --lba 0 --count 2048")(
    _range_command("Deallocate", lambda d, s, c: d.deallocate(s, c)))


# ------------------------------------------------------------------ logs and features
SMART_LABELS = [
    ("critical_warning", "critical_warning"), ("temperature", "temperature"),
    ("avail_spare", "available_spare"), ("spare_thresh", "available_spare_threshold"),
    ("percent_used", "percentage_used"),
    ("endurance_grp_critical_warning_summary", "endurance group critical warning summary"),
    ("data_units_read", "Data Units Read"), ("data_units_written", "Data Units Written"),
    ("host_read_commands", "host_read_commands"), ("host_write_commands", "host_write_commands"),
    ("controller_busy_time", "controller_busy_time"), ("power_cycles", "power_cycles"),
    ("power_on_hours", "power_on_hours"), ("unsafe_shutdowns", "unsafe_shutdowns"),
    ("media_errors", "media_errors"), ("num_err_log_entries", "num_err_log_entries"),
    ("warning_temp_time", "Warning Temperature Time"), ("critical_comp_time", "Critical Composite Temperature Time"),
    ("thm_temp1_trans_count", "Thermal Management T1 Trans Count"),
    ("thm_temp2_trans_count", "Thermal Management T2 Trans Count"),
    ("thm_temp1_total_time", "Thermal Management T1 Total Time"),
    ("thm_temp2_total_time", "Thermal Management T2 Total Time"),
]


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} PB"  # pragma: no cover


@main.command("smart-log")
@address_arg
@output_opt
def smart_log(address: str, fmt: str) -> None:
    """SMART / Health Information log (log page 02h).

    \b
    Example: nvmevfio smart-log 00:04.0 -o json
    """
    from nvmevfio.nvme import spec

    with controller(address) as s, errors():
        d = spec.parse_smart_log(s.get_log_page("smart"))
    sensors = {f"temperature_sensor_{i}" for i in range(1, 9)}
    d = {k: v for k, v in d.items() if k not in sensors or v}  # nvme-cli prints sensors that report
    if fmt == "json":
        _emit_json(_nvme_cli_json(d, SMART_STR_FIELDS))
        return
    click.echo("Smart Log for NVME device:" + _address(address) + " namespace-id:ffffffff")
    for key, label in SMART_LABELS:
        v = d[key]
        if key == "temperature":
            text = f"{v - 273}°C ({v} Kelvin)"
        elif key in ("avail_spare", "spare_thresh", "percent_used"):
            text = f"{v}%"
        elif key in ("data_units_read", "data_units_written"):
            text = f"{v} ({_human_bytes(v * 512 * 1000)})"
        else:
            text = str(v)
        click.echo(f"{label:<40}: {text}")
    for i in range(1, 9):
        if f"temperature_sensor_{i}" in d:
            v = d[f"temperature_sensor_{i}"]
            click.echo(f"{'Temperature Sensor ' + str(i):<40}: {v - 273}°C ({v} Kelvin)")


@main.command("error-log")
@address_arg
@click.option("-e", "--log-entries", "entries", type=click.IntRange(1, 256), default=64, show_default=True)
@output_opt
def error_log(address: str, entries: int, fmt: str) -> None:
    """Error Information log (log page 01h).

    \b
    Example: nvmevfio error-log 00:04.0 -e 4
    """
    from nvmevfio.nvme import spec

    with controller(address) as s, errors():
        elpe = s.id_ctrl["elpe"] + 1
        log = spec.parse_error_log(s.get_log_page("error", entries=min(entries, elpe)))
    if fmt == "json":
        _emit_json({"errors": log})
        return
    click.echo(f"Error Log Entries for device:{_address(address)} entries:{len(log)}")
    click.echo(".................")
    for i, e in enumerate(log):
        click.echo(f" Entry[{i:>2}]   \n.................")
        sct, sc = (e["status_field"] >> 8) & 7, e["status_field"] & 0xFF
        for k, v in e.items():
            text = f"{v}({spec.status_name(sct, sc)})" if k == "status_field" else v
            click.echo(f"{k:<16}: {text}")
        click.echo(".................")


@main.command("fw-log")
@address_arg
@output_opt
def fw_log(address: str, fmt: str) -> None:
    """Firmware Slot Information log (log page 03h).

    \b
    Example: nvmevfio fw-log 00:04.0
    """
    from nvmevfio.nvme import spec

    with controller(address) as s, errors():
        d = spec.parse_firmware_log(s.get_log_page("firmware"))
    if fmt == "json":
        _emit_json({k: v for k, v in d.items() if k == "afi" or v})
        return
    click.echo(f"Firmware Log for device:{_address(address)}")
    click.echo(f"afi  : {d['afi']:#x}")
    for i in range(1, 8):
        if d[f"frs{i}"]:
            click.echo(f"frs{i} : {d[f'frs{i}']}")


@main.command("get-feature")
@address_arg
@click.option("-f", "--feature-id", "fid", type=click.IntRange(1, 255), required=True, help="feature identifier")
@click.option("-s", "--sel", type=click.IntRange(0, 3), default=0, show_default=True,
              help="0 current, 1 default, 2 saved, 3 supported capabilities")
@click.option("-n", "--namespace-id", "nsid", type=int, default=0, show_default=True)
@output_opt
def get_feature(address: str, fid: int, sel: int, nsid: int, fmt: str) -> None:
    """Get Features (admin opcode 0Ah).

    \b
    Example: nvmevfio get-feature 00:04.0 -f 7
    """
    from nvmevfio.nvme.spec import FEATURE_NAMES

    with controller(address) as s, errors():
        value = s.get_features(fid, sel=sel, nsid=nsid)
    name = FEATURE_NAMES.get(fid, "Unknown")
    if fmt == "json":
        _emit_json({"feature_id": fid, "name": name, "sel": sel, "value": value})
        return
    which = ["Current", "Default", "Saved", "Supported capabilities"][sel]
    click.echo(f"get-feature:{fid:#04x} ({name}), {which} value:{value:#010x}")


@main.command("set-feature")
@address_arg
@click.option("-f", "--feature-id", "fid", type=click.IntRange(1, 255), required=True, help="feature identifier")
@click.option("-V", "--value", type=INT0, default=0, show_default=True, help="the value (CDW11)")
@click.option("--cdw12", type=INT0, default=0, show_default=True)
@click.option("-s", "--save", is_flag=True, help="keep the value across resets (CDW10.SV)")
@click.option("-n", "--namespace-id", "nsid", type=INT0, default=0, show_default=True)
@click.option("-d", "--data", "data_file", type=click.File("rb"), help="a data buffer the feature takes")
@output_opt
def set_feature(address: str, fid: int, value: int, cdw12: int, save: bool, nsid: int, data_file: Any,
                fmt: str) -> None:
    """Set Features (admin opcode 09h). Number of Queues and Host Memory Buffer are the broker's.

    \b
    Example: nvmevfio set-feature 00:04.0 -f 4 -V 0x150      # temperature threshold 336 K
    """
    from nvmevfio.nvme.spec import FEATURE_NAMES

    data = data_file.read() if data_file is not None else None
    with controller(address) as s, errors():
        dw0 = s.set_features(fid, value, cdw12=cdw12, save=save, nsid=nsid, data=data)
    name = FEATURE_NAMES.get(fid, "Unknown")
    if fmt == "json":
        _emit_json({"feature_id": fid, "name": name, "value": value, "cdw12": cdw12, "save": save, "result": dw0})
        return
    click.echo(f"set-feature:{fid:#04x} ({name}), value:{value:#010x}, cdw12:{cdw12:#010x}, save:{int(save)}")


@main.command("get-log")
@address_arg
@click.option("-i", "--log-id", "lid", type=INT0, required=True, help="log page identifier")
@click.option("-l", "--log-len", "length", type=INT0, required=True, help="bytes (a multiple of 4)")
@click.option("-O", "--lpo", "offset", type=INT0, default=0, show_default=True, help="log page offset, bytes")
@click.option("-n", "--namespace-id", "nsid", type=INT0, default=0xFFFFFFFF, show_default=True)
@click.option("-b", "--raw-binary", is_flag=True, help="the log to stdout as raw bytes")
@output_opt
def get_log(address: str, lid: int, length: int, offset: int, nsid: int, raw_binary: bool, fmt: str) -> None:
    """Get Log Page (admin opcode 02h): any log id, --log-len bytes from --lpo.

    \b
    Example: nvmevfio get-log 00:04.0 --log-id 2 --log-len 512
    """
    with controller(address) as s, errors():
        data = s.get_log(lid, length, nsid=nsid, offset=offset)
    if fmt == "json":
        _emit_json({"log_id": lid, "length": length, "offset": offset, "data": data.hex()})
        return
    _write_data(data, raw_binary, f"Device:{_address(address)} log-id:{lid} namespace-id:{nsid:#x}", offset)


@main.command("format")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=INT0, default=1, show_default=True)
@click.option("-l", "--lbaf", type=click.IntRange(0, 63), required=True, help="LBA format index (see id-ns)")
@click.option("-s", "--ses", type=click.IntRange(0, 7), default=0, show_default=True,
              help="secure erase: 0 none, 1 user data, 2 cryptographic")
@click.option("-i", "--pi", type=click.IntRange(0, 7), default=0, show_default=True, help="protection information")
@click.option("-p", "--pil", type=click.IntRange(0, 1), default=0, show_default=True, help="PI location")
@click.option("-m", "--ms", "mset", type=click.IntRange(0, 1), default=0, show_default=True,
              help="metadata settings: 1 extended LBA")
@click.option("-t", "--timeout", "timeout_ms", type=INT0, help="milliseconds (default 600 s)")
@click.option("--force", is_flag=True, help="do not wait 10 s for Ctrl-C first")
def format_cmd(address: str, nsid: int, lbaf: int, ses: int, pi: int, pil: int, mset: int, timeout_ms: int | None,
               force: bool) -> None:
    """Format NVM (admin opcode 80h): destroys the namespace's data. The namespaces are identified
    again afterwards.

    \b
    Example: nvmevfio format 00:04.0 -n 1 --lbaf 4 --force
    """
    import time

    if not force:
        click.echo(f"You are about to format {_address(address)}, namespace {nsid:#x}.\nWARNING: Format may "
                   "irrevocably delete this device's data.\nYou have 10 seconds to press Ctrl-C to cancel.",
                   err=True)
        time.sleep(10)
    with controller(address) as s, errors():
        table = s.format_nvm(nsid, lbaf, ses=ses, pi=pi, pil=pil, mset=mset,
                             timeout_s=timeout_ms / 1000 if timeout_ms else None)
    ns = table.get(nsid)
    geometry = f" ({ns.size_blocks} blocks of {ns.block_size} bytes)" if ns is not None else ""
    click.echo(f"Success formatting namespace:{nsid:x}{geometry}")


def _block_range_command(verb: str) -> Callable[..., None]:
    @address_arg
    @click.option("-n", "--namespace-id", "nsid", type=INT0, default=1, show_default=True)
    @click.option("-s", "--start-block", "slba", type=INT0, required=True, help="first logical block")
    @click.option("-c", "--block-count", "nlb", type=INT0, required=True,
                  help="number of blocks, 0's based as in nvme-cli (0 is one block)")
    @click.option("-z", "--data-size", type=INT0, default=0, help="compare: bytes of --data")
    @click.option("-d", "--data", "data_file", type=click.File("rb"), help="compare: the expected data")
    def cmd(address: str, nsid: int, slba: int, nlb: int, data_size: int, data_file: Any) -> None:
        with blockdev(address, nsid) as dev, errors():
            if verb == "Compare":
                if data_file is None:
                    _fail("compare needs --data FILE", EXIT_ERROR)
                count = nlb + 1
                data = data_file.read(data_size or count * dev.block_size)
                if len(data) != count * dev.block_size:
                    _fail(f"--data holds {len(data)} bytes; {count} blocks are {count * dev.block_size}", EXIT_ERROR)
                dev.provider.compare(nsid, slba, data)
            else:
                dev.provider.verify(nsid, slba, nlb + 1)
        click.echo(f"NVMe {verb}: success (nsid {nsid}, LBA {slba}, {nlb + 1} blocks)")

    return cmd


main.command("compare", help="Compare (NVM opcode 05h): the device checks blocks against a file; a difference "
             "is the status Compare Failure, exit 4.\n\n\b\nExample: nvmevfio compare 00:04.0 -n 1 "
             "--start-block 0 --block-count 7 --data-size 4096 --data expected.bin")(_block_range_command("Compare"))
main.command("verify", help="Verify (NVM opcode 0Ch): the device reads and checks blocks, transferring nothing."
             "\n\n\b\nExample: nvmevfio verify 00:04.0 -n 1 --start-block 0 --block-count 255")(
    _block_range_command("Verify"))


@main.command("ns-rescan")
@address_arg
@output_opt
def ns_rescan(address: str, fmt: str) -> None:
    """Identify every active namespace again (after namespace management or a format).

    \b
    Example: nvmevfio ns-rescan 00:04.0
    """
    with controller(address) as s, errors():
        table = s.refresh_namespaces()
    rows = [{"nsid": n, "nsze": ns.size_blocks, "block_size": ns.block_size} for n, ns in sorted(table.items())]
    if fmt == "json":
        _emit_json({"namespaces": rows})
        return
    for r in rows:
        click.echo(f"[{r['nsid']:>4}]: {r['nsze']} blocks of {r['block_size']} bytes")


@main.command("create-ns")
@address_arg
@click.option("-s", "--nsze", type=INT0, required=True, help="size in blocks")
@click.option("-c", "--ncap", type=INT0, required=True, help="capacity in blocks")
@click.option("-f", "--flbas", type=INT0, default=0, show_default=True, help="LBA format index")
@click.option("-d", "--dps", type=INT0, default=0, show_default=True, help="data protection settings")
@click.option("-m", "--nmic", type=INT0, default=0, show_default=True, help="1: shared (multi-path)")
def create_ns(address: str, nsze: int, ncap: int, flbas: int, dps: int, nmic: int) -> None:
    """Namespace Management, create (admin opcode 0Dh). Attach it next (attach-ns).

    \b
    Example: nvmevfio create-ns 00:04.0 --nsze 2048 --ncap 2048 --flbas 0
    """
    with controller(address) as s, errors():
        nsid = s.create_namespace(nsze, ncap, flbas, dps=dps, nmic=nmic)
    click.echo(f"create-ns: Success, created nsid:{nsid}")


@main.command("delete-ns")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=INT0, required=True)
def delete_ns(address: str, nsid: int) -> None:
    """Namespace Management, delete (admin opcode 0Dh).

    \b
    Example: nvmevfio delete-ns 00:04.0 -n 2
    """
    with controller(address) as s, errors():
        s.delete_namespace(nsid)
    click.echo(f"delete-ns: Success, deleted nsid:{nsid}")


def _attach_command(detach: bool) -> Callable[..., None]:
    verb = "detach-ns" if detach else "attach-ns"

    @address_arg
    @click.option("-n", "--namespace-id", "nsid", type=INT0, required=True)
    @click.option("-c", "--controllers", default="", help="comma-separated controller ids (default: this one)")
    def cmd(address: str, nsid: int, controllers: str) -> None:
        with controller(address) as s, errors():
            ids = [int(c, 0) for c in controllers.split(",") if c] or [int(s.identify_controller()["cntlid"])]
            (s.detach_namespace if detach else s.attach_namespace)(nsid, ids)
        click.echo(f"{verb}: Success, nsid:{nsid}")

    return cmd


main.command("attach-ns", help="Namespace Attachment, attach (admin opcode 15h).\n\n\b\nExample: nvmevfio "
             "attach-ns 00:04.0 -n 2")(_attach_command(False))
main.command("detach-ns", help="Namespace Attachment, detach (admin opcode 15h).\n\n\b\nExample: nvmevfio "
             "detach-ns 00:04.0 -n 2")(_attach_command(True))


@main.command("sanitize")
@address_arg
@click.option("-a", "--sanact", type=click.IntRange(1, 4), required=True,
              help="1 exit failure mode, 2 block erase, 3 overwrite, 4 crypto erase")
@click.option("-u", "--ause", is_flag=True, help="allow unrestricted sanitize exit")
@click.option("-p", "--owpass", type=click.IntRange(0, 15), default=0, help="overwrite passes")
@click.option("-i", "--oipbp", is_flag=True, help="overwrite invert pattern between passes")
@click.option("-D", "--no-dealloc", is_flag=True, help="no deallocate after sanitize")
@click.option("-O", "--ovrpat", type=INT0, default=0, help="overwrite pattern")
def sanitize_cmd(address: str, sanact: int, ause: bool, owpass: int, oipbp: bool, no_dealloc: bool,
                 ovrpat: int) -> None:
    """Sanitize (admin opcode 84h): destroys every namespace's data. Progress: sanitize-log.

    \b
    Example: nvmevfio sanitize 00:04.0 --sanact 2
    """
    with controller(address) as s, errors():
        s.sanitize(sanact, ause=ause, owpass=owpass, oipbp=oipbp, no_dealloc=no_dealloc, ovrpat=ovrpat)
    click.echo("Sanitize: started (see sanitize-log)")


@main.command("fw-download")
@address_arg
@click.option("-f", "--fw", "fw", type=click.File("rb"), required=True, help="the firmware image")
@click.option("-x", "--xfer", type=INT0, default=4096, show_default=True, help="bytes per command")
@click.option("-O", "--offset", type=INT0, default=0, show_default=True, help="image offset, bytes")
def fw_download(address: str, fw: Any, xfer: int, offset: int) -> None:
    """Firmware Image Download (admin opcode 11h), in --xfer pieces. Activate with fw-commit.

    \b
    Example: nvmevfio fw-download 00:04.0 --fw image.bin --xfer 0x20000
    """
    image = fw.read()
    with controller(address) as s, errors():
        pieces = s.firmware_download(image, offset=offset, xfer=xfer)
    click.echo(f"Firmware download success ({len(image)} bytes in {pieces} pieces)")


@main.command("fw-commit")
@address_arg
@click.option("-s", "--slot", type=click.IntRange(0, 7), default=0, show_default=True)
@click.option("-a", "--action", type=click.IntRange(0, 7), required=True,
              help="0 replace, 1 replace and activate, 2 activate, 3 activate now, ...")
@click.option("-b", "--bpid", type=click.IntRange(0, 1), default=0, show_default=True, help="boot partition id")
def fw_commit(address: str, slot: int, action: int, bpid: int) -> None:
    """Firmware Commit (admin opcode 10h).

    \b
    Example: nvmevfio fw-commit 00:04.0 --slot 1 --action 1
    """
    with controller(address) as s, errors():
        dw0 = s.firmware_commit(slot, action, bpid=bpid)
    click.echo(f"Success committing firmware action:{action} slot:{slot} (result {dw0:#x})")


@main.command("device-self-test")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=INT0, default=0xFFFFFFFF, show_default=True)
@click.option("-s", "--self-test-code", "stc", type=INT0, required=True, help="1 short, 2 extended, 0xf abort")
def device_self_test(address: str, nsid: int, stc: int) -> None:
    """Device Self-test (admin opcode 14h). Results: self-test-log.

    \b
    Example: nvmevfio device-self-test 00:04.0 --self-test-code 1
    """
    with controller(address) as s, errors():
        s.device_self_test(stc, nsid=nsid)
    click.echo("Device self-test started" if stc != 0xF else "Aborting device self-test operation")


def _show_decoded(d: dict[str, Any], indent: str = "") -> None:
    """A decoded log as ``name : value`` lines (nested objects and lists indented)."""
    width = max((len(k) for k in d), default=0)
    for k, v in d.items():
        if isinstance(v, dict):
            click.echo(f"{indent}{k}:")
            _show_decoded(v, indent + "  ")
        elif isinstance(v, list):
            click.echo(f"{indent}{k}: {len(v)}")
            for i, item in enumerate(v):
                click.echo(f"{indent}  [{i}]")
                _show_decoded(item, indent + "    ")
        else:
            shown = f"{v:#x}" if isinstance(v, int) and v > 9 else v
            click.echo(f"{indent}{k:<{width}} : {shown}")


@main.command("sanitize-log")
@address_arg
@click.option("-b", "--raw-binary", is_flag=True, help="the page's 512 bytes, raw")
@output_opt
def sanitize_log(address: str, raw_binary: bool, fmt: str) -> None:
    """The Sanitize Status log page (81h), decoded; ``-o json`` has nvme-cli's field names.

    \b
    Example: nvmevfio sanitize-log 00:04.0 -o json
    """
    from nvmevfio.nvme import spec

    with controller(address) as s, errors():
        data = s.get_log(0x81, 512)
    if raw_binary:
        _write_data(data, True, "")
        return
    d = spec.parse_sanitize_log(data)
    if fmt == "json":
        _emit_json({_address(address): d})
        return
    click.echo(f"Sanitize Progress Log for device:{_address(address)}")
    _show_decoded(d)


@main.command("self-test-log")
@address_arg
@click.option("-e", "--dst-entries", type=click.IntRange(1, 20), default=20, show_default=True,
              help="how many of the 20 results to show, newest first")
@click.option("-b", "--raw-binary", is_flag=True, help="the page's 564 bytes, raw")
@output_opt
def self_test_log(address: str, dst_entries: int, raw_binary: bool, fmt: str) -> None:
    """The Device Self-test log page (06h), decoded; ``-o json`` has nvme-cli's field names.

    \b
    Example: nvmevfio self-test-log 00:04.0 -e 3 -o json
    """
    from nvmevfio.nvme import spec

    with controller(address) as s, errors():
        data = s.get_log(0x06, 564)
    if raw_binary:
        _write_data(data, True, "")
        return
    d = spec.parse_self_test_log(data, dst_entries)
    if fmt == "json":
        _emit_json(d)
        return
    click.echo(f"Device Self Test Log for NVME device:{_address(address)}")
    _show_decoded(d)


# ------------------------------------------------------------------ controller state
@main.command()
@address_arg
def reset(address: str) -> None:
    """Controller reset: CC.EN=0 and wait CSTS.RDY=0 (bounded by CAP.TO).

    \b
    Example: nvmevfio reset 00:04.0
    """
    with controller(address, enable=False) as s, errors():
        s.reset()
        csts = s.registers().csts
    click.echo(f"{_address(address)}: controller disabled (CSTS={csts:#010x})")


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


# ------------------------------------------------------------------ passthrough


def _passthru_command(admin: bool) -> Callable[..., None]:
    kind = "Admin" if admin else "IO"

    @address_arg
    @click.option("-O", "--opcode", type=INT0, required=True, help="opcode (vendor-specific C0h-FFh allowed)")
    @click.option("-f", "--flags", type=INT0, default=0, show_default=True,
                  help="CDW0 flags: only 0 (fused and SGL commands are the broker's)")
    @click.option("-R", "--rsvd", type=INT0, default=0, show_default=True, help="reserved field: only 0")
    @click.option("-n", "--namespace-id", "nsid", type=INT0, default=0 if admin else 1, show_default=True)
    @click.option("-2", "--cdw2", type=INT0, default=0)
    @click.option("-3", "--cdw3", type=INT0, default=0)
    @click.option("-4", "--cdw10", type=INT0, default=0)
    @click.option("-5", "--cdw11", type=INT0, default=0)
    @click.option("-6", "--cdw12", type=INT0, default=0)
    @click.option("-7", "--cdw13", type=INT0, default=0)
    @click.option("-8", "--cdw14", type=INT0, default=0)
    @click.option("-9", "--cdw15", type=INT0, default=0)
    @click.option("-l", "--data-len", type=INT0, default=0, help="bytes to transfer")
    @click.option("-m", "--metadata-len", type=INT0, default=0, help="only 0 (the metadata pointer is the broker's)")
    @click.option("-i", "--input-file", type=click.File("rb"), help="data to send (--write)")
    @click.option("-r", "--read", "read_", is_flag=True, help="controller to host (default: opcode bit 1)")
    @click.option("-w", "--write", "write_", is_flag=True, help="host to controller (default: opcode bit 0)")
    @click.option("-p", "--prefill", type=INT0, default=0, help="byte the data buffer is filled with first")
    @click.option("-t", "--timeout", "timeout_ms", type=INT0, help="milliseconds (default: the command timeout)")
    @click.option("-s", "--show-command", is_flag=True, help="print the command's fields first")
    @click.option("-d", "--dry-run", is_flag=True, help="print the command's fields, send nothing")
    @click.option("-b", "--raw-binary", is_flag=True, help="received data to stdout as raw bytes")
    @click.option("-T", "--latency", is_flag=True, help="print the command's latency")
    @click.option("-o", "--output-format", "fmt", type=click.Choice(["normal", "json"]), default="normal",
                  show_default=True)
    def cmd(address: str, opcode: int, flags: int, rsvd: int, nsid: int, cdw2: int, cdw3: int, cdw10: int,
            cdw11: int, cdw12: int, cdw13: int, cdw14: int, cdw15: int, data_len: int, metadata_len: int,
            input_file: Any, read_: bool, write_: bool, prefill: int, timeout_ms: int | None, show_command: bool,
            dry_run: bool, raw_binary: bool, latency: bool, fmt: str) -> None:
        import time

        from nvmevfio.nvme.spec import command_name

        if flags or rsvd or metadata_len:
            _fail("refused: --flags, --rsvd and --metadata-len must be 0: fused and SGL commands and the "
                  "metadata pointer are the broker's [broker-owned-command]", EXIT_REFUSED)
        write = write_ or (not read_ and bool(opcode & 1))
        read = read_ or (not write_ and bool(opcode & 2))
        if write and read:
            _fail("refused: bidirectional transfers are not supported (give --read or --write)", EXIT_REFUSED)
        payload = None
        if write and data_len:
            payload = bytearray([prefill & 0xFF]) * data_len
            if input_file is not None:
                got = input_file.read(data_len)
                payload[: len(got)] = got
        cdws = {"cdw2": cdw2, "cdw3": cdw3, "cdw10": cdw10, "cdw11": cdw11, "cdw12": cdw12, "cdw13": cdw13,
                "cdw14": cdw14, "cdw15": cdw15}
        name = command_name(admin, opcode)
        if show_command or dry_run:
            click.echo(f"opcode       : {opcode:#04x} ({name})\nnsid         : {nsid:#x}\n" + "".join(
                f"{k:<13}: {v:#010x}\n" for k, v in cdws.items()) + f"data_len     : {data_len} "
                f"({'write' if write else 'read' if read else 'none'})\ntimeout_ms   : {timeout_ms or 0}", err=True)
            if dry_run:
                return
        timeout_s = timeout_ms / 1000 if timeout_ms else None
        ctx = controller(address) if admin else blockdev(address, nsid if nsid else 1)
        with ctx as h, errors():
            provider = h if admin else h.provider
            t0 = time.perf_counter()
            if admin:
                dw0, data = provider.admin_passthru(opcode, nsid=nsid, data=payload,
                                                    data_len=data_len if read else 0, timeout_s=timeout_s, **cdws)
            else:
                dw0, data = provider.io_passthru(opcode, nsid=nsid, data=payload, data_len=data_len if read else 0,
                                                 timeout_s=timeout_s, **cdws)
            took_us = (time.perf_counter() - t0) * 1e6
        if fmt == "json":
            _emit_json({"opcode": opcode, "command": name, "result": dw0,
                        "data": data.hex() if data is not None else None, "latency_us": round(took_us, 1)})
            return
        click.echo(f"{kind} Command {name} is Success and result: {dw0:#010x}", err=True)
        if latency:
            click.echo(f"latency: {kind} {name}: {took_us:.0f} us", err=True)
        if data is not None:
            _write_data(data, raw_binary)

    return cmd


main.command("admin-passthru", help="Send an admin command the broker does not own (nvme-cli's options); the "
             "broker authors its data pointer.\n\n\b\nExample: nvmevfio admin-passthru 00:04.0 --opcode 0x06 "
             "--cdw10 1 --data-len 4096 --read")(_passthru_command(True))
main.command("io-passthru", help="Send an I/O command the broker does not own (nvme-cli's options); the broker "
             "authors its data pointer.\n\n\b\nExample: nvmevfio io-passthru 00:04.0 -n 1 --opcode 0x02 --cdw10 0 "
             "--cdw12 7 --data-len 4096 --read -b > lba0-7.bin")(_passthru_command(False))


# ------------------------------------------------------------------ NBD export
@main.command()
@address_arg
@nsid_opt
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="Unix socket to serve on (default /run/nvmevfio/nbd-ADDRESS-nNSID.sock)")
@click.option("--port", type=click.IntRange(1, 65535), help="serve on loopback TCP 127.0.0.1:PORT instead")
@click.option("--read-only", "readonly", is_flag=True, help="export read-only")
@click.option("--queues", type=click.IntRange(1, 64), default=4, show_default=True,
              help="I/O queue pairs: one per request in progress (nbdkit's parallel threads)")
@click.option("--mode", type=click.Choice(["irq", "poll"]), default="irq", show_default=True,
              help="completions by MSI-X interrupts, or polling (a spinning CPU per busy queue)")
@click.option("--background", is_flag=True,
              help="start nbdkit detached, wait until the device is open, print how to attach, return")
@click.option("--stop", is_flag=True, help="stop the background export of ADDRESS / -n (SIGTERM; the device "
                                           "is shut down cleanly)")
@click.option("--pidfile", type=click.Path(path_type=Path),
              help="nbdkit's pid file (default /run/nvmevfio/nbd-ADDRESS-nNSID.pid)")
@output_opt
def nbd(address: str, nsid: int, socket_path: Path | None, port: int | None, readonly: bool, queues: int,
        mode: str, background: bool, stop: bool, pidfile: Path | None, fmt: str) -> None:
    """Serve a namespace over NBD (nbdkit with nvmevfio's Python plugin), to use it as a disk.

    Runs in the foreground (Ctrl-C stops it) unless --background. Attach it with nbd-client,
    then mkfs and mount as any disk. Flush, trim (Deallocate), write-zeroes, FUA and
    multi-conn are offered; block size and max transfer are advertised.

    \b
    Example: nvmevfio nbd 00:04.0 --background
             nbd-client -unix /run/nvmevfio/nbd-0000:00:04.0-n1.sock /dev/nbd0 -b 512
             mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt
             nvmevfio nbd 00:04.0 --stop
    """
    from nvmevfio import nbd as nbdmod

    address = _address(address)
    pidfile = pidfile or nbdmod.default_pidfile(address, nsid, socket_path)
    if stop:
        with errors():
            pid = nbdmod.stop(pidfile)
        click.echo(f"{address} nsid {nsid}: NBD export stopped (nbdkit {pid})")
        return
    if socket_path is not None and port is not None:
        _fail("--socket and --port exclude each other", EXIT_ERROR)
    if port is None:
        socket_path = socket_path or nbdmod.default_socket(address, nsid)
    with errors():
        want = nbdmod.nbdkit_python_version()
    if want != sys.version_info[:2]:
        _fail(f"nbdkit's Python plugin embeds Python {want[0]}.{want[1]}, this environment is "
              f"{sys.version_info[0]}.{sys.version_info[1]}: install nvmevfio for Python {want[0]}.{want[1]}",
              EXIT_SETUP)
    with controller(address) as s, errors():
        block_size = s.identify_namespace(nsid).block_size
    with errors():  # only the folders of the paths in use; one line where /run is not writable
        nbdmod.prepare_run_dirs(socket_path, pidfile)
    if socket_path is not None:
        with errors():
            nbdmod.clear_stale_socket(socket_path)
    ready = pidfile.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    cmd = nbdmod.nbdkit_command(address, nsid, socket=socket_path, port=port, readonly=readonly, queues=queues,
                                block_size=block_size, pidfile=pidfile, ready=ready if background else None,
                                verbose=Ctx.verbose, foreground=not background, mode=mode)
    where = f"unix:{socket_path}" if socket_path is not None else f"nbd://127.0.0.1:{port}"
    attach = (f"nbd-client -unix {socket_path} /dev/nbd0 -b {min(block_size, 4096)}" if socket_path is not None
              else f"nbd-client 127.0.0.1 {port} /dev/nbd0 -b {min(block_size, 4096)}")
    if not background:
        click.echo(f"{address} nsid {nsid}: serving NBD on {where} (Ctrl-C stops); attach: {attach}", err=True)
        os.execvpe(cmd[0], cmd, nbdmod.nbdkit_env())
    log = pidfile.with_suffix(".log")
    import subprocess

    pidfile.unlink(missing_ok=True)
    with log.open("ab") as logf:  # nbdkit forks into the background itself once its socket is bound
        proc = subprocess.Popen(cmd, env=nbdmod.nbdkit_env(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    with errors():
        info = nbdmod.wait_ready(proc, pidfile, ready, log, timeout_s=120)
    info.update({"socket": str(socket_path) if socket_path else None, "port": port, "pidfile": str(pidfile),
                 "log": str(log), "attach": attach, "read_only": readonly, "queues": queues, "mode": mode})
    if fmt == "json":
        _emit_json(info)
        return
    click.echo(f"{address} nsid {nsid}: serving NBD on {where} (nbdkit pid {info['pid']}, log {log})")
    click.echo(f"attach: {attach}")
    click.echo(f"stop:   nvmevfio nbd {address} -n {nsid} --stop")


# ------------------------------------------------------------------ ublk block device
@main.command()
@click.argument("address", required=False, default=None, shell_complete=_complete_address)
@nsid_opt
@click.option("--queues", type=click.IntRange(1, 64), default=1, show_default=True,
              help="ublk queues, each on its own NVMe I/O queue pair and thread")
@click.option("--depth", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="requests in flight per queue (one DMA buffer slot each)")
@click.option("--mode", type=click.Choice(["poll", "irq"]), default="poll", show_default=True,
              help="NVMe completions by polling (while commands are in flight) or MSI-X interrupts")
@click.option("--read-only", "readonly", is_flag=True, help="a read-only disk")
@click.option("--recoverable", is_flag=True,
              help="ublk user recovery: a server that dies leaves the disk waiting for --recover (I/O held)")
@click.option("--background", is_flag=True, help="serve from a detached process; print the device and return")
@click.option("--stop", "stop_dev", type=int, metavar="DEV", help="stop ublk device DEV (its number: /dev/ublkbDEV)")
@click.option("--recover", "recover_dev", type=int, metavar="DEV",
              help="serve device DEV again after its --recoverable server died")
@click.option("--list", "list_", is_flag=True, help="list ublk devices, their servers, and stale ones")
@click.option("--notify-fd", type=int, hidden=True)
@output_opt
def ublk(address: str | None, nsid: int, queues: int, depth: int, mode: str, readonly: bool, recoverable: bool,
         background: bool, stop_dev: int | None, recover_dev: int | None, list_: bool, notify_fd: int | None,
         fmt: str) -> None:
    """Serve a namespace as a Linux ublk block device (/dev/ublkbN): every request in C, one NVMe
    command each. Runs until SIGTERM or Ctrl-C (drain, stop, delete, controller shutdown).

    \b
    Example: nvmevfio ublk 00:04.0 --background     (prints /dev/ublkb0)
             mkfs.ext4 /dev/ublkb0 && mount /dev/ublkb0 /mnt
             nvmevfio ublk --stop 0
    """
    from nvmevfio import ublk as ub

    if sum(map(bool, (background or recover_dev is not None, stop_dev is not None, list_))) > 1:
        _fail("--stop, --list and serving (--background, --recover) exclude each other", EXIT_ERROR)
    if list_ or stop_dev is not None:
        _need_root()
        with errors():
            if list_:
                devs = ub.list_devices()
                if fmt == "json":
                    _emit_json([d.to_dict() for d in devs])
                    return
                for d in devs:
                    who = f"{d.address} nsid {d.nsid}" if d.address else "not nvmevfio's"
                    srv = (f"server pid {d.server_pid}" if d.server_alive
                           else "waiting for --recover" if d.waiting_for_recovery else "stale: server gone")
                    click.echo(f"/dev/ublkb{d.dev_id}: {who}, {d.state}, {srv}, {d.queues} queue(s) x {d.depth}")
                return
            assert stop_dev is not None
            d = ub.stop_device(stop_dev)
        click.echo(f"/dev/ublkb{stop_dev} stopped ({'server pid ' + str(d.server_pid) if d.server_alive else 'stale'})")
        return
    _need_root()
    with errors():
        ub.require_ublk()
        target = ub.recovery_target(recover_dev) if recover_dev is not None else None
    if target is not None:
        assert target.address is not None and target.nsid is not None
        if address is not None and _address(address) != target.address:
            _fail(f"/dev/ublkb{recover_dev} serves {target.address}, not {_address(address)}", EXIT_ERROR)
        address, nsid, queues, depth = target.address, target.nsid, target.queues, target.depth
        recoverable = True
    if not address:
        _fail("give the controller's ADDRESS (or --stop DEV, --recover DEV, --list)", EXIT_ERROR)
    assert address is not None
    address = _address(address)
    if target is None:
        with errors():
            ub.check_not_served(address, nsid)
    if background:
        _ublk_background(address, nsid, queues, depth, mode, readonly, recoverable, recover_dev, fmt)
        return
    with blockdev(address, nsid, irq=mode == "irq", queue_depth=depth + 1, queues=queues) as dev, errors():
        server = ub.Server(dev, address=address, queues=queues, depth=depth, read_only=readonly,
                           recoverable=recoverable)
        with ub.signals_stop(server):
            try:
                if target is not None:
                    server.adopt(target)
                else:
                    server.add()
                server.start(recovering=target is not None)
                info = {"device": server.block_device, "dev_id": server.dev_id, "address": address, "nsid": nsid,
                        "pid": os.getpid(), "queues": queues, "depth": depth, "mode": mode, "read_only": readonly,
                        "recoverable": recoverable, "io_bytes": server.geometry.io_bytes,
                        "block_size": server.geometry.block_size, "size": server.geometry.blocks *
                        server.geometry.block_size}
                click.echo(json.dumps(info) if fmt == "json" else server.block_device)
                sys.stdout.flush()
                if notify_fd is not None:
                    os.write(notify_fd, (json.dumps(info) + "\n").encode())
                    os.close(notify_fd)
                server.serve()
            finally:
                server.close()
        click.echo(f"{address} nsid {nsid}: ublk device stopped; {server.counters()}", err=True)


def _ublk_background(address: str, nsid: int, queues: int, depth: int, mode: str, readonly: bool,
                     recoverable: bool, recover_dev: int | None, fmt: str) -> None:
    """Start `nvmevfio ublk` detached (its log in /run/nvmevfio), wait until its device is up."""
    import subprocess

    from nvmevfio import ublk as ub

    ub.RUN_DIR.mkdir(parents=True, exist_ok=True)
    logpath = ub.RUN_DIR / f"ublk-{address}-n{nsid}.log"
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "nvmevfio"]
    for name in ("timeout", "backend"):
        if _root_option(name) is not None:
            cmd += [f"--{name}", str(_root_option(name))]
    if _root_option("unsafe_noiommu"):
        cmd.append("--unsafe-noiommu")
    cmd += ["ublk", address, "-n", str(nsid), "--queues", str(queues), "--depth", str(depth), "--mode", mode,
            "--notify-fd", str(wfd)]
    cmd += ["--read-only"] if readonly else []
    cmd += ["--recoverable"] if recoverable else []
    cmd += ["--recover", str(recover_dev)] if recover_dev is not None else []
    with logpath.open("ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(wfd,),
                                start_new_session=True)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        line = r.readline()
    if not line:
        proc.wait(30)
        tail = [s for s in logpath.read_text(errors="replace").splitlines() if s.strip()]
        _fail(tail[-1].removeprefix("nvmevfio: error: ") if tail else f"the server exited ({proc.returncode})",
              EXIT_ERROR)
    info = json.loads(line)
    info["log"] = str(logpath)
    if fmt == "json":
        _emit_json(info)
    else:
        click.echo(info["device"])


# ------------------------------------------------------------------ perf
@main.command()
@block_address_arg
@click.option("--namespace-id", "nsid", type=int, default=1, show_default=True,
              help="namespace id (-n is the I/O count here, as in spdk_nvme_perf)")
@click.option("-w", "--workload", type=click.Choice(["randread", "randwrite", "read", "write", "randrw"]),
              default="randread", show_default=True)
@click.option("-q", "--queue-depth", type=click.IntRange(1, 4095), default=1, show_default=True)
@click.option("-s", "--io-size", type=int, default=4096, show_default=True, help="bytes per I/O")
@click.option("-t", "--time", "seconds", type=float, help="seconds to run (default 5 unless -n)")
@click.option("-n", "--count", "count", type=int, help="number of I/Os to run")
@click.option("--range", "lba_range", help="LBA range START:END to use (default: the whole namespace)")
@click.option("--mode", type=click.Choice(["poll", "irq", "hybrid"]), default="poll", show_default=True,
              help="completions by polling, MSI-X interrupts, or hybrid polling (nap about half the time to "
                   "the next completion, then poll)")
@click.option("-M", "--rwmixread", type=click.IntRange(0, 100), default=50, show_default=True,
              help="percentage of reads for randrw")
@click.option("--ramp", "ramp", type=float, default=0.0, show_default=True,
              help="seconds to run first, unmeasured (like fio --ramp_time)")
@click.option("--shadow-doorbells/--no-shadow-doorbells", "shadow", default=True, show_default=True,
              help="Doorbell Buffer Config when the controller offers it (MMIO doorbells only when needed)")
@click.option("--verify", is_flag=True,
              help="integrity mode (like fio's verify): every written block carries its LBA, a sequence number "
                   "and a CRC32C; blocks read back are checked; mismatches exit 4 (writes the range!)")
@cpu_opt
@service_socket_opt
@output_opt
def perf(address: str, nsid: int, workload: str, queue_depth: int, io_size: int, seconds: float | None,
         count: int | None, lba_range: str | None, mode: str, rwmixread: int, ramp: float, shadow: bool,
         verify: bool, cpu: int | None, service_socket: str | None, fmt: str) -> None:
    """Measure IOPS, bandwidth and latency (like spdk_nvme_perf / fio).

    \b
    Example: nvmevfio perf 00:04.0 -w randread -q 32 -s 4096 -t 10
             nvmevfio perf 00:04.0 -w write -q 8 -s 131072 -n 10000 -o json
             nvmevfio perf 00:04.0 -w randrw -q 16 --verify -t 60 --range 0:65536
             nvmevfio perf --socket /run/nvmevfio/nvmevfio.sock -w randread -q 32   (through the daemon)
    """
    from nvmevfio import perf as perfmod

    if service_socket and (verify or mode != "poll"):
        _fail("through --socket the daemon decides how completions arrive and perf runs its C loop: "
              "no --mode or --verify", EXIT_ERROR)
    _pin(cpu)

    rng = None
    if lba_range:
        try:
            a, b = (int(x, 0) for x in lba_range.split(":"))
            rng = (a, b)
        except ValueError:
            _fail(f"--range {lba_range!r}: expected START:END", EXIT_ERROR)
    live = sys.stderr.isatty() and fmt == "normal"

    def status(elapsed: float, ios: int) -> None:
        click.echo(f"\r  {elapsed:5.1f} s  {ios / elapsed:10.0f} IOPS", nl=False, err=True)

    with blockdev(address, nsid, service_socket, irq=mode == "irq", queue_depth=min(queue_depth + 1, 4096),
                  shadow_doorbells=shadow) as dev, errors():
        res = perfmod.run(dev, workload=workload, io_size=io_size, queue_depth=queue_depth, seconds=seconds,
                          hybrid=mode == "hybrid",
                          count=count, lba_range=rng, rwmixread=rwmixread, status=status if live else None,
                          ramp_s=ramp, verify=verify)
    if live:
        click.echo("", err=True)
    bad = len(res.mismatches)
    if fmt == "json":
        _emit_json(res.to_dict())
        if bad:
            sys.exit(EXIT_DEVICE)
        return
    click.echo(f"{service_socket or _address(address)} nsid {nsid}: {res.workload}, {res.io_size} B, "
               f"QD {res.queue_depth}, {res.mode}, {res.seconds:.2f} s, {res.ios} I/Os ({res.reads} reads, "
               f"{res.writes} writes), "
               f"{res.errors} errors")
    if not res.verify:  # the verify loop runs in Python: these figures are the C loop's
        click.echo(f"doorbells: shadow {'on' if res.shadow_doorbells else 'off'}, MMIO writes "
                   f"{res.sq_doorbell_mmio} SQ tail / {res.cq_doorbell_mmio} CQ head, {res.shadow_only_updates} "
                   "updates without MMIO")
        click.echo(f"profile: {res.wait_pct:.0f}% of the time waiting for the device, {res.ios_per_submit:.1f} "
                   f"commands per submit, {res.ios_per_reap:.1f} per reap")
    click.echo(f"{'IOPS':>12} {'MiB/s':>10} {'avg(us)':>10} {'min(us)':>10} {'max(us)':>10} {'p50(us)':>10} "
               f"{'p99(us)':>10} {'p99.9(us)':>10}")
    click.echo(f"{res.iops:12.1f} {res.mib_per_s:10.2f} {res.lat_mean_us:10.1f} {res.lat_min_us:10.1f} "
               f"{res.lat_max_us:10.1f} {res.lat_p50_us:10.1f} {res.lat_p99_us:10.1f} {res.lat_p999_us:10.1f}")
    if res.verify:
        click.echo(f"verify: {res.verified_blocks} blocks read back and checked, {bad} mismatches")
        for lba, want, found in res.mismatches[:10]:
            click.echo(f"  LBA {lba}: expected lba {want[0]} seq {want[1]} crc32c {want[2]:#010x}; found magic "
                       f"{found[0]:#010x} lba {found[1]} seq {found[2]} crc32c {found[3]:#010x}")
        if bad:
            _fail(f"verify: {bad} blocks did not hold what was written", EXIT_DEVICE)


@main.command()
@address_arg
@click.option("--grants", "grants_path", type=click.Path(dir_okay=False, exists=True), required=True,
              help="the grants file (TOML): who may use which namespace window, how")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=DEFAULT_SOCKET,
              show_default=True, help="the Unix socket clients connect to")
@click.option("--clients", type=click.IntRange(1, 64), default=4, show_default=True,
              help="client slots: one NVMe I/O queue pair each")
@click.option("--queue-depth", type=click.IntRange(2, 4096), default=64, show_default=True,
              help="entries per I/O queue (a client's depth is its grant's, at most this minus one)")
@click.option("--mode", type=click.Choice(["irq", "poll"]), default="irq", show_default=True,
              help="completions by MSI-X interrupts, or polling while commands are in flight")
@click.option("--idle-spin-us", type=click.IntRange(0, 10_000_000), default=1000, show_default=True,
              help="poll mode: keep polling this long after the last request or completion before "
                   "sleeping (clients skip their doorbell meanwhile); 0 sleeps at once")
@cpu_opt
def serve(address: str, grants_path: str, socket_path: str, clients: int, queue_depth: int, mode: str,
          idle_spin_us: int, cpu: int | None) -> None:
    """Own a controller and serve its namespaces to unprivileged clients (grants file).

    Clients use nvmevfio.connect(SOCKET, nsid=…) or the block commands' --socket. Runs until
    SIGTERM or Ctrl-C; then every session ends (its commands waited for, its memory scrubbed)
    and the controller is shut down.

    \b
    Example: nvmevfio serve 00:04.0 --grants /etc/nvmevfio/grants.toml
    """
    import logging

    from nvmevfio.service.daemon import run
    from nvmevfio.service.grants import GrantsError, load_grants

    try:
        grants = load_grants(grants_path)
    except GrantsError as exc:
        _fail(str(exc), EXIT_ERROR)
    _pin(cpu)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="nvmevfio serve: %(message)s")
    with controller(address, enable=False) as session, errors():
        try:
            run(session, grants, socket_path, clients=clients, queue_depth=queue_depth, irq=mode == "irq",
                idle_spin_s=idle_spin_us / 1e6, address=session.address)
        except GrantsError as exc:
            _fail(str(exc), EXIT_ERROR)


@main.command("monitor")
@address_arg
@click.option("-c", "--count", type=click.IntRange(min=1), help="exit after this many events")
@click.option("-d", "--duration", type=click.FloatRange(min=0), help="exit after this many seconds")
@output_opt
def monitor(address: str, count: int | None, duration: float | None, fmt: str) -> None:
    """Print asynchronous events as they arrive (Asynchronous Event Request, admin opcode 0Ch).

    The broker keeps AERs outstanding, reads the log page each event names (which clears it) and
    re-identifies the namespaces on a namespace notice. Runs until Ctrl-C, --count events or
    --duration seconds; exit 0. With -o json, one JSON object a line (JSON Lines). The controller
    is this command's while it runs.

    \b
    Example: nvmevfio monitor 00:04.0 -o json --count 1
    """
    import time

    seen = 0
    deadline = None if duration is None else time.monotonic() + duration
    with controller(address) as s, errors():
        cfg = s.event_config
        if cfg["events_off"]:
            _fail(f"the controller refused Asynchronous Event Requests: {cfg['events_off']}", EXIT_DEVICE)
        aec = f"{cfg['aec']:#x}" if cfg["aec"] is not None else "not set"
        click.echo(f"monitoring {_address(address)}: {cfg['outstanding']} Asynchronous Event Requests "
                   f"outstanding, Asynchronous Event Configuration {aec}; Ctrl-C to stop", err=True)
        try:
            while (count is None or seen < count) and (deadline is None or time.monotonic() < deadline):
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                for ev in s.poll_events(wait):
                    if fmt == "json":
                        click.echo(json.dumps(ev.as_dict()))
                    else:
                        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ev.time))
                        click.echo(f"{stamp} {_address(address)}: {ev}")
                    seen += 1
                    if count is not None and seen >= count:
                        break
        except KeyboardInterrupt:
            pass
    click.echo(f"{seen} event{'s' if seen != 1 else ''}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
