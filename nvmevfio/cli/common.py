"""What every command module of the ``nvmevfio`` command line shares: the group itself
(global options), exit codes, error handling (``errors()``: one line with the refusal reason
or the NVMe status name, and a non-zero exit code), the common options and arguments, and
opening a controller or a block device for a command.

Exit codes (the README's): a command nvme-cli 2.3 has exits as nvme-cli's does, 0 or 1 (its main()
returns ``err ? 1 : 0`` whatever failed: a usage error, an NVMe status, an errno); nvmevfio's refusal
by name stays on stderr. nvmevfio's own commands (:data:`NVMEVFIO_OWN`) keep its own classes: 1 a
usage error, an NVMe status or another error, 3 refused (a named reason; nothing was sent), 4
``perf --verify`` found a mismatch, 5 setup (not root, not bound, no IOMMU).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import click

from nvmevfio._version import __version__
from nvmevfio.errors import CommandError, DeviceInUse, NvmeVfioError, Refused, ShimError

EXIT_ERROR, EXIT_REFUSED, EXIT_SETUP = 1, 3, 5
# nvme-cli 2.3 exits 1 for a usage error and for an NVMe status (measured on Debian's 2.3, docs/nvme-cli.md)
EXIT_USAGE = EXIT_DEVICE = 1
# nvmevfio's commands that nvme-cli does not have: they keep nvmevfio's exit classes (3, 4, 5); every
# other command is nvme-cli's, whose main() exits 1 for any failure (nvme.c 2.3: ``return err ? 1 : 0``)
NVMEVFIO_OWN = frozenset({"bind", "unbind", "shutdown", "deallocate", "nbd", "ublk", "export", "perf", "serve",
                          "monitor"})
EXIT_MISMATCH = 4  # perf --verify: blocks that did not hold what was written (nvmevfio's own class)
PROGRESS_MIN = 4 << 20  # show a progress bar on transfers larger than this
CHUNK = 4 << 20


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


_BINARY_SUFFIX = {"": 0, "k": 10, "ki": 10, "kib": 10, "m": 20, "mi": 20, "mib": 20, "g": 30, "gi": 30,
                  "gib": 30, "t": 40, "ti": 40, "tib": 40, "p": 50, "pi": 50, "pib": 50}
_NUMBER = re.compile(r"\s*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)([A-Za-z]*)\s*")


def parse_number(text: str, *, suffix: bool = False) -> int:
    """A number as nvme-cli's option parser reads it (C's strtoull, base 0): decimal, 0x hex, a
    leading 0 octal; with ``suffix`` (nvme-cli's IONUM options: --start-block, --data-size, ...) a
    binary suffix too (4k = 4Ki = 4KiB = 4096). Raises ValueError naming the text otherwise."""
    m = _NUMBER.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or (unit and not suffix) or unit not in _BINARY_SUFFIX:
        kind = "a number with an optional k/M/G suffix" if suffix else "a number"
        raise ValueError(f"{text!r} is not {kind} (decimal, 0x hex or 0 octal)")
    return int(m.group(1), 0 if not m.group(1).startswith("0") or m.group(1)[:2].lower() == "0x" or
               m.group(1) == "0" else 8) << _BINARY_SUFFIX[unit]


def parse_list(text: str) -> list[int]:
    """nvme-cli's comma-separated LIST (dsm --slbs, copy --blocks): numbers as :func:`parse_number`."""
    return [parse_number(part) for part in text.split(",")] if text.strip() else []


class _Number(click.ParamType):
    """An option's number as nvme-cli reads it (:func:`parse_number`), optionally within a range."""

    name = "integer"

    def __init__(self, *, suffix: bool = False, lo: int | None = None, hi: int | None = None) -> None:
        self.suffix, self.lo, self.hi = suffix, lo, hi

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            n = value if isinstance(value, int) else parse_number(str(value), suffix=self.suffix)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if (self.lo is not None and n < self.lo) or (self.hi is not None and n > self.hi):
            self.fail(f"{n} is not in {self.lo}..{self.hi}", param, ctx)
        return n


class _NumberList(click.ParamType):
    name = "list"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            return parse_list(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


INT0 = NUM = _Number()
IONUM = _Number(suffix=True)
NUM_LIST = _NumberList()


def num(lo: int, hi: int) -> _Number:
    """A NUM option within lo..hi (decimal or 0x hex)."""
    return _Number(lo=lo, hi=hi)


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
FORMATS = ("normal", "json", "binary")


def output_format_opt(*, short: bool = True, binary: bool = True) -> Any:
    """-o/--output-format: nvme-cli's normal|json|binary (binary: the structure's raw bytes, as -b);
    without ``short`` where nvme-cli's -o means something else (get-log's --lpo, admin-passthru's
    --opcode), without ``binary`` where there is no structure to dump."""
    choices = FORMATS if binary else FORMATS[:2]
    return click.option(*(("-o",) if short else ()), "--output-format", "fmt", type=click.Choice(choices),
                        default="normal", show_default=True, help=f"output format: {'|'.join(choices)}")


output_opt = output_format_opt()
output_long_opt = output_format_opt(short=False, binary=False)
nsid_opt = click.option("-n", "--namespace-id", "nsid", type=NUM, default=1, show_default=True,
                        help="namespace id")
raw_binary_opt = click.option("-b", "--raw-binary", is_flag=True, help="the structure's raw bytes to stdout")
human_opt = click.option("-H", "--human-readable", "human", is_flag=True, help="decode the fields (normal output)")
vendor_specific_opt = click.option("-v", "--vendor-specific", is_flag=True,
                                   help="the vendor-specific bytes too (a hex dump; \"vs\" in JSON)")
# The block range of the I/O commands, nvme-cli's: -s first block, -c count 0's based (0 is one block)
start_block_opt = click.option("-s", "--start-block", "slba", type=IONUM, default=0, show_default=True,
                               help="first logical block")
block_count_opt = click.option("-c", "--block-count", "nlb", type=num(0, 0xFFFFFFFF), default=0, show_default=True,
                               help="number of blocks, 0's based as in nvme-cli (0 is one block)")


def block_range_opts(f: Any) -> Any:
    """-n, -s, -c: the namespace and nvme-cli's block range, as every block command takes them."""
    return nsid_opt(start_block_opt(block_count_opt(f)))


data_size_opt = click.option("-z", "--data-size", type=IONUM, default=0, help="bytes of data (default: the blocks')")
fua_opt = click.option("-f", "--force-unit-access", "fua", is_flag=True,
                       help="the data on media before completion (FUA)")
limited_retry_opt = click.option("-l", "--limited-retry", is_flag=True, help="limited retry (LR)")
timeout_ms_opt = click.option("-t", "--timeout", "timeout_ms", type=NUM,
                              help="milliseconds (default: the command timeout)")


def want_binary(fmt: str, raw_binary: bool) -> bool:
    """-b or -o binary: the structure's bytes instead of text."""
    return raw_binary or fmt == "binary"


# The block commands: a controller's address, or --socket to go through nvmevfio serve (no root).
block_address_arg = click.argument("address", required=False, default="", shell_complete=_complete_address)
service_socket_opt = click.option("--socket", "service_socket", type=click.Path(dir_okay=False), default=None,
                                  help="go through the nvmevfio serve daemon on this socket (no ADDRESS, no root)")


# Polling loops want a CPU of their own (as SPDK pins its reactors): a polling daemon and a client
# the scheduler wakes on the daemon's CPU share it, and lose a third of their rate or more.
cpu_opt = click.option("--cpu", type=click.IntRange(min=0), default=None,
                       help="run on this CPU only (sched_setaffinity), e.g. a polling daemon and its clients "
                            "on different CPUs")


def parse_cpu_list(text: str) -> list[int]:
    """A CPU list as taskset and fio's cpus_allowed write it: ``0,1``, ``0-3``, ``0-1,3`` (in the
    order given; a CPU may repeat)."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ValueError(f"{text!r}: expected CPU numbers and ranges, e.g. 0,1 or 0-3 or 0-1,3")
        cpus += range(int(lo), int(hi) + 1) if sep else [int(lo)]
    return cpus


def _cpu_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return parse_cpu_list(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


cpu_list_opt = click.option("--cpu", "cpus", metavar="LIST", callback=_cpu_list, default=None,
                            help="pin each queue's thread to a CPU of LIST (e.g. 0,1 or 0-1,3): queue i on "
                                 "LIST[i mod its length]")


# perf's and ublk's default NVMe I/O queue: at least SPDK's io_queue_size default (256 entries)
MIN_IO_QUEUE_ENTRIES = 256

io_queue_size_opt = click.option(
    "--io-queue-size", "io_queue_size", type=click.IntRange(2, 65536), default=None,
    help="entries of each NVMe I/O queue pair (spdk_nvme_perf's --io-queue-size), more than the depth; default: "
         f"twice the depth and one, at least {MIN_IO_QUEUE_ENTRIES} (SPDK's default), up to CAP.MQES+1: the "
         "completion queue's room to spare lets the C loop put off the CQ head doorbell until the entries it "
         "consumed and a depth more could fill it, instead of writing it every batch")


def io_queue_entries(depth: int, io_queue_size: int | None, depth_flag: str) -> dict[str, Any]:
    """How a C loop's queue pairs are opened (``blockdev`` keywords): ``--io-queue-size`` as
    given (more than the depth; the broker refuses more than CAP.MQES+1), or by default twice
    the depth and one, at least MIN_IO_QUEUE_ENTRIES, as many as the controller has when fewer
    (``queue_depth_up_to``). The CQ room beyond the depth is what lets the loop put off the CQ
    head doorbell (cbits/qpair.h, qp_cq_must_ring): with 256 entries at QD1, one in 255 commands
    writes it."""
    if io_queue_size is None:
        return {"queue_depth": max(2 * depth + 1, MIN_IO_QUEUE_ENTRIES), "queue_depth_up_to": True}
    if io_queue_size <= depth:
        _fail(f"--io-queue-size {io_queue_size}: a queue keeps one entry empty, so it needs more than {depth_flag} "
              f"{depth} entries", EXIT_ERROR)
    return {"queue_depth": io_queue_size}


def _pin(cpu: int | None) -> None:
    """Keep this process on ``cpu`` (--cpu); refused when it is not one this process may use."""
    if cpu is None:
        return
    check_cpus([cpu])
    os.sched_setaffinity(0, {cpu})


def check_cpus(cpus: list[int] | None) -> None:
    """--cpu names only CPUs this process may use (refused before anything else)."""
    allowed = sorted(os.sched_getaffinity(0))
    if cpus is not None and not set(cpus) <= set(allowed):
        _fail(f"--cpu {','.join(map(str, cpus))}: this process may run on CPUs {', '.join(map(str, allowed))} only",
              EXIT_ERROR)


# Every command's module (nvmevfio/cli/<group>.py). A command's module is imported when that
# command runs, not all ten: under the emulated CPU of the test guest the decorators of every
# command cost 0.7 s of each invocation. tests/unit/test_cli_host.py checks this table against
# what the modules define.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "device": ("list", "bind", "unbind", "reset", "subsystem-reset", "shutdown"),
    "identify": ("show-regs", "id-ctrl", "id-ns", "list-ns", "ns-descs", "list-ctrl"),
    "data": ("read", "write", "compare", "verify", "flush", "write-zeroes", "deallocate", "write-uncor", "dsm",
             "copy"),
    "logs": ("smart-log", "error-log", "fw-log", "get-log", "get-feature", "set-feature", "sanitize-log",
             "self-test-log"),
    "admin": ("format", "ns-rescan", "create-ns", "delete-ns", "attach-ns", "detach-ns",
              "sanitize", "fw-download", "fw-commit", "device-self-test", "get-lba-status"),
    "passthru": ("admin-passthru", "io-passthru"),
    "disk": ("nbd", "ublk"),
    "export": ("export",),
    "longrun": ("perf", "serve", "monitor"),
    "zns": ("zns",),  # a group: nvme-cli's zns plugin's sub-commands
}
_MODULE_OF = {name: group for group, names in COMMAND_GROUPS.items() for name in names}


class NvmeCliCommand(click.Command):
    """A command of the ``nvmevfio`` group: ``-h``/``--help`` of one nvme-cli has exits 1, as nvme-cli
    2.3's does (its argconfig returns an error after the help; measured: ``nvme id-ctrl --help``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.Exit as exc:  # the eager --help: shown, then the context exits
            if exc.exit_code == 0 and self.name not in NVMEVFIO_OWN:
                raise click.exceptions.Exit(EXIT_ERROR) from None
            raise


class AliasedGroup(click.Group):
    """The ``nvmevfio`` group: aliases, each command loaded from its group's module on first use, and
    nvme-cli's exit status for a usage error (1, not click's 2) and for any failure of a command
    nvme-cli has (:func:`nvme_cli_status`)."""

    aliases = {"identify": "id-ctrl"}
    command_class = NvmeCliCommand
    invoked: str | None = None  # the command this process runs (resolve_command)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(_MODULE_OF) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        name = self.aliases.get(cmd_name, cmd_name)
        group = _MODULE_OF.get(name)
        if group is not None and name not in self.commands:
            importlib.import_module(f"nvmevfio.cli.{group}")  # its decorators add it to main
        return super().get_command(ctx, name)

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        AliasedGroup.invoked = None
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            rv = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.ClickException as exc:  # a usage error: click's message, nvme-cli's status
            exc.show()
            sys.exit(EXIT_USAGE)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(EXIT_ERROR)
        except SystemExit as exc:  # a command nvme-cli has fails as nvme-cli's does: 1, whatever the class
            sys.exit(nvme_cli_status(self.invoked, exc.code))
        sys.exit(nvme_cli_status(self.invoked, rv if isinstance(rv, int) else 0))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        _, cmd, rest = super().resolve_command(ctx, args)
        if ctx.parent is None:
            AliasedGroup.invoked = cmd.name if cmd else None
        return (cmd.name if cmd else None), cmd, rest


def nvme_cli_status(command: str | None, code: Any) -> Any:
    """The exit status of ``command`` that ended with ``code``: nvme-cli 2.3's 0 or 1 for a command it
    has (its main(): ``return err ? 1 : 0``), nvmevfio's own classes otherwise (3, 4, 5)."""
    if command is None or command in NVMEVFIO_OWN or code in (0, None) or not isinstance(code, int):
        return code
    return EXIT_ERROR


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


# ------------------------------------------------------------------ output shared by commands
def _nvme_cli_json(d: dict[str, Any], str_fields: set[str]) -> dict[str, Any]:
    return {k: (str(v) if k in str_fields else v) for k, v in d.items()}


def _write_data(data: bytes, raw: bool, header: str = "") -> None:
    """Received data to stdout: raw bytes (-b), or a header line (if any) and nvme-cli's hex dump."""
    if not raw:
        click.echo((header + "\n" if header else "") + nvme_dump(data), nl=False)
        return
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def nvme_dump(data: bytes) -> str:
    """A hex dump as nvme-cli prints one (its d(): a column header, ``0000: 00 01 ... "ascii"`` rows of 16)."""
    lines = ["     " + "".join(f"{i:3x}" for i in range(16))]
    for at in range(0, len(data), 16):
        row = data[at : at + 16]
        text = "".join(chr(b) if 0x21 <= b <= 0x7E else "." for b in row)
        pad = 3 * (16 - len(row))
        lines.append(f"{at:04x}:" + "".join(f" {b:02x}" for b in row) + (" " * (pad + 1) if pad else "")
                     + f' "{text}"')
    return "\n".join(lines) + "\n"


def _hexdump(out: Any, data: bytes, base: int) -> None:
    lines = []
    for i in range(0, len(data), 16):
        row = data[i : i + 16]
        hx = " ".join(f"{b:02x}" for b in row)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + i:08x}  {hx:<47}  |{asc}|\n")
    out.write("".join(lines).encode())
