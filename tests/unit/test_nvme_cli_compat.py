"""nvmevfio against nvme-cli 2.3's options (tests/unit/nvme_cli_options.py, taken from Debian's nvme-cli
2.3 ``--help``): every option of every shared command is accepted with nvme-cli's long and short name,
or explained here (different: how; not offered: why). The test writes the table in docs/nvme-cli.md
and fails when the file is not what it generates (``NVMEVFIO_WRITE_DOCS=1`` rewrites it)."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
from nvme_cli_options import NVME_CLI_OPTIONS

from nvmevfio.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "nvme-cli.md"

_REF_TAG = ("default: the first block's LBA (low 32 bits) where the format's protection is type 1 or 2, which "
            "its check needs; nvme-cli's is 0")
_STORAGE_TAG = ("0 only: a nonzero tag is refused by name (storage-tag-unsupported): formats with storage tag bits "
                "(STS) are not authored (QEMU 7.2's have none, where nvme-cli refuses a nonzero tag too)")
_DIR = ("refused by name (directives-unsupported) where the controller has no Directives (Identify Controller "
        "OACS bit 5 is 0, as QEMU 7.2's; nvme-cli sends the fields anyway); sent as given where it has them")
_FORCE = "accepted and ignored: nvmevfio holds the controller alone through VFIO, there is no other opener to exclude"

NOT_OFFERED: dict[tuple[str, str], str] = {}

DIFFERENT: dict[tuple[str, str], str] = {
    ("read", "data-size"): "optional (default: the blocks' bytes); nvme-cli requires it",
    **{(c, "ref-tag"): _REF_TAG for c in ("read", "write", "compare", "verify", "write-zeroes")},
    **{(c, "metadata-size"): "optional (default: block count x the format's metadata size)"
       for c in ("read", "write", "compare")},
    **{(c, "storage-tag"): _STORAGE_TAG for c in ("read", "write", "compare", "verify", "write-zeroes")},
    **{(c, o): _DIR for c in ("read", "write", "compare", "copy") for o in ("dir-type", "dir-spec")},
    **{(c, "force"): _FORCE for c in ("read", "write", "compare")},
    ("write", "block-count"): "optional: without it the whole data (or --data-size bytes of it) is written",
    ("read", "block-count"): "not limited to one command: more than MDTS is split (also compare's 65536 limit), "
                             "unless a field nvme-cli sends with the command is given (-l -f -C -g -T -S -D): then "
                             "one command, as nvme-cli",
    ("show-regs", "human-readable"): "nvme-cli's decoded text for every register it reads, on stdout; nvmevfio's "
                                     "own lines (BAR0, the DMA lane, IOVA ranges) go to stderr. CC, CSTS, AQA, ASQ, "
                                     "ACQ are as nvmevfio left them (no queues: show-regs does not enable)",
    ("show-regs", "output-format"): "json and binary exit 1 after the output, as nvme-cli 2.3's (its show_registers "
                                    "returns the output format's flag); json: nvme-cli's keys and values, and "
                                    "nvmevfio's own (the DMA lane, IOVA ranges); "
                                    "binary: nvme-cli's 0xE1C bytes built from the registers its show-regs reads, "
                                    "each at its offset (every other byte 0; ASQ, ACQ, BPMBL 0 in the no-IOMMU lane, "
                                    "where they are physical addresses)",
    ("sanitize-log", "rae"): "accepted; the broker reads the page for its own events anyway",
    ("list", "verbose"): "accepted; the list always shows everything",
    ("list", "output-format"): "lists PCI functions (address, driver, IOMMU group), nvmevfio's JSON",
    **{("copy", o): "in ELBAT and ELBATM of each range (format 0 bytes 29:28 and 31:30, format 1 37:36 and 39:38), "
                    "where NVM Command Set 1.0 puts them; nvme-cli 2.3 (libnvme 1.3's structs) swaps the two"
       for o in ("expected-app-tags", "expected-app-tag-masks")},
    **{(c, o): "0 only: fused and SGL commands and the metadata pointer are the broker's"
       for c in ("admin-passthru", "io-passthru") for o in ("flags", "rsvd")},
    ("admin-passthru", "metadata-len"): "0 only: admin commands carry no metadata pointer",
    ("admin-passthru", "metadata"): "refused: admin commands carry no metadata pointer",
    ("io-passthru", "metadata-len"): "the broker copies the metadata through its own buffer and authors MPTR",
    **{(c, "namespace-id"): "default 1 (nvmevfio names the controller, not a namespace's block device)"
       for c in ("read", "write", "compare", "verify", "write-zeroes", "flush", "dsm", "copy", "write-uncor",
                 "format", "id-ns", "ns-descs", "get-lba-status")},
}

OWN_NOTE = {"socket": "through nvmevfio serve", "hexdump": "a hex dump", "pad": "zero-fill a partial block",
            "all": "every namespace", "output-format": "JSON"}


def _command(name: str) -> click.Command:
    cmd = main.get_command(click.Context(main), name)
    assert cmd is not None, f"nvmevfio has no {name}"
    return cmd


def _options(cmd: click.Command) -> dict[str, click.Option]:
    return {o: p for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}


def classify(name: str, long: str, short: str, kind: str) -> tuple[str, str]:
    """(verdict, note) for one nvme-cli option of ``name``: same / different / not offered, or
    (``unexplained``, what is wrong)."""
    opts = _options(_command(name))
    here = opts.get(f"--{long}")
    if (name, long) in NOT_OFFERED:
        if here is not None:
            return "unexplained", "explained as not offered, but accepted: drop the explanation"
        return "not offered", NOT_OFFERED[(name, long)]
    if here is None:
        return "unexplained", "neither accepted nor explained"
    if short and opts.get(f"-{short}") is not here:
        return "unexplained", f"-{short} is not --{long} here"
    if bool(kind) == (isinstance(here, click.Option) and here.is_flag):
        return "unexplained", "nvme-cli's takes an argument and this one does not, or the other way round"
    if (name, long) in DIFFERENT:
        return "different", DIFFERENT[(name, long)]
    return "same", ""


def table() -> str:
    lines = [
        "# nvmevfio and nvme-cli 2.3",
        "",
        "Generated by `tests/unit/test_nvme_cli_compat.py` from nvme-cli 2.3's option lists (Debian 12's",
        "`nvme <command> --help`, kept as test data in `tests/unit/nvme_cli_options.py`); the test fails when an",
        "option is neither accepted nor explained, and when this file is not what it generates",
        "(`NVMEVFIO_WRITE_DOCS=1` rewrites it). Numbers are read as nvme-cli reads them: decimal, `0x` hex, a",
        "leading `0` octal, and k/M/G suffixes on the IONUM options (`--start-block`, `--data-size`, ...).",
        "",
        "## Exit status",
        "",
        "nvme-cli 2.3 exits 0 or 1: its main() returns `err ? 1 : 0` whatever `err` was (an NVMe status, a",
        "negative errno, a usage error; nvme.c at v2.3), and measured: a usage error exits 1 on the host, and",
        "in the test guest with the kernel driver an NVMe status (Invalid Command Opcode from `sanitize`,",
        "Compare Failure from `compare`, Invalid Field from `get-feature -f 0x55`) exits 1, as does",
        "`subsystem-reset` where CAP.NSSRS is 0. nvmevfio's commands that nvme-cli has exit",
        "the same, 0 or 1, for every failure, its refusals by name included (e.g. `subsystem-reset` where",
        "CAP.NSSRS is 0, `set-feature -f 7`: Number of Queues is the broker's); the refusal's name is on",
        "stderr. Their `-h`/`--help` exits 1 after the help, as nvme-cli 2.3's `nvme id-ctrl --help` does",
        "(measured; `nvme --help` and `nvme help CMD` exit 0, as `nvmevfio --help`).",
        "nvmevfio's own commands (`bind`, `unbind`, `shutdown`, `deallocate`, `perf`, `serve`,",
        "`monitor`, `nbd`, `ublk`, `export`) keep its classes: 3 refused by name, 5 setup (not root, not",
        "bound to vfio-pci, no IOMMU), 4 `perf --verify` found blocks that did not hold what was written.",
        "",
        "## Options, command by command",
        "",
        "The address of the controller (`00:04.0`) takes the place of nvme-cli's device; `-n` names the",
        "namespace where nvme-cli would take its block device.",
        "",
    ]
    for name in sorted(NVME_CLI_OPTIONS):
        opts = NVME_CLI_OPTIONS[name]
        own = sorted({o for p in _command(name).params if isinstance(p, click.Option) for o in p.opts
                      if o.startswith("--") and o[2:] not in {lo for lo, _, _ in opts} and o != "--help"})
        lines.append(f"### {name}")
        lines.append("")
        if not opts:
            lines.append("No options in either.")
        else:
            lines += ["| nvme-cli | nvmevfio | note |", "|---|---|---|"]
            for long, short, kind in opts:
                verdict, note = classify(name, long, short, kind)
                spelled = f"`--{long}`" + (f", `-{short}`" if short else "")
                lines.append(f"| {spelled} | {verdict} | {note} |")
        if own:
            lines.append("")
            lines.append("nvmevfio's own: " + ", ".join(f"`{o}`" for o in own))
        lines.append("")
    return "\n".join(lines)


@pytest.mark.parametrize("name", sorted(NVME_CLI_OPTIONS))
def test_every_nvme_cli_option_is_accepted_or_explained(name):
    bad = [(long, note) for long, short, kind in NVME_CLI_OPTIONS[name]
           for verdict, note in [classify(name, long, short, kind)] if verdict == "unexplained"]
    assert not bad, f"{name}: {bad}"


def test_explanations_name_real_options():
    known = {(c, long) for c, opts in NVME_CLI_OPTIONS.items() for long, _, _ in opts}
    assert not (set(NOT_OFFERED) | set(DIFFERENT)) - known


def test_the_doc_table_is_generated():
    text = table()
    if os.environ.get("NVMEVFIO_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/nvme-cli.md is stale: rerun with NVMEVFIO_WRITE_DOCS=1"
