"""What every command module of the ``nvmevfio`` command line shares: the group itself
(global options), exit codes, error handling (``errors()``: one line with the refusal reason
or the NVMe status name, and a non-zero exit code), the common options and arguments, and
opening a controller or a block device for a command.

Exit codes (the README's): 0 success, 1 other error, 2 usage (click), 3 refused (a named
reason; nothing was sent), 4 the device returned an error status, 5 setup (not root, not bound,
no IOMMU).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

from nvmevfio._version import __version__
from nvmevfio.errors import CommandError, DeviceInUse, NvmeVfioError, Refused, ShimError

EXIT_ERROR, EXIT_REFUSED, EXIT_DEVICE, EXIT_SETUP = 1, 3, 4, 5
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


# Every command's module (nvmevfio/cli/<group>.py). A command's module is imported when that
# command runs, not all ten: under the emulated CPU of the test guest the decorators of every
# command cost 0.7 s of each invocation. tests/unit/test_cli_host.py checks this table against
# what the modules define.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "device": ("list", "bind", "unbind", "reset", "shutdown"),
    "identify": ("show-regs", "id-ctrl", "id-ns", "list-ns"),
    "data": ("read", "write", "flush", "write-zeroes", "deallocate"),
    "logs": ("smart-log", "error-log", "fw-log", "get-log", "get-feature", "set-feature", "sanitize-log",
             "self-test-log"),
    "admin": ("format", "compare", "verify", "ns-rescan", "create-ns", "delete-ns", "attach-ns", "detach-ns",
              "sanitize", "fw-download", "fw-commit", "device-self-test"),
    "passthru": ("admin-passthru", "io-passthru"),
    "disk": ("nbd", "ublk"),
    "export": ("export",),
    "longrun": ("perf", "serve", "monitor"),
}
_MODULE_OF = {name: group for group, names in COMMAND_GROUPS.items() for name in names}


class AliasedGroup(click.Group):
    """The ``nvmevfio`` group: aliases, and each command loaded from its group's module on first use."""

    aliases = {"identify": "id-ctrl"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(_MODULE_OF) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        name = self.aliases.get(cmd_name, cmd_name)
        group = _MODULE_OF.get(name)
        if group is not None and name not in self.commands:
            importlib.import_module(f"nvmevfio.cli.{group}")  # its decorators add it to main
        return super().get_command(ctx, name)

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


# ------------------------------------------------------------------ output shared by commands
def _nvme_cli_json(d: dict[str, Any], str_fields: set[str]) -> dict[str, Any]:
    return {k: (str(v) if k in str_fields else v) for k, v in d.items()}


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
