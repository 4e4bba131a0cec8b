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

_PI = "end-to-end protection information is not authored here (PRINFO 0); read and write take it"
_META = "the metadata pointer is the broker's; read and write move metadata (it authors MPTR from its own buffer)"
_STORAGE_TAG = "storage tags (formats with STS) are not authored: QEMU 7.2's model has none"
_DIR = "directives are not offered"
_LRFUA = "the broker's command carries no LR/FUA bit yet"
_FORCE = "nvmevfio holds the controller alone through VFIO: there is no other opener to exclude"
_PI_OPTS = ("prinfo", "ref-tag", "app-tag-mask", "app-tag", "storage-tag", "storage-tag-check")

NOT_OFFERED: dict[tuple[str, str], str] = {
    **{(c, o): _PI for c in ("compare", "verify", "write-zeroes") for o in _PI_OPTS},
    **{(c, o): _STORAGE_TAG for c in ("read", "write") for o in ("storage-tag", "storage-tag-check")},
    **{("compare", o): _META for o in ("metadata-size", "metadata")},
    **{(c, o): _DIR for c in ("read", "write", "compare", "copy") for o in ("dir-type", "dir-spec")},
    **{(c, o): _LRFUA for c in ("read", "write", "compare", "verify", "write-zeroes")
       for o in ("limited-retry", "force-unit-access")},
    **{(c, "force"): _FORCE for c in ("read", "write", "compare")},
    **{(c, "dsm"): "the DSM hint field of READ/WRITE is not authored" for c in ("read", "write", "compare")},
    **{("copy", o): _PI for o in ("prinfow", "prinfor", "ref-tag", "expected-ref-tags", "app-tag",
                                  "expected-app-tags", "app-tag-mask", "expected-app-tag-masks")},
    **{("create-ns", o): "the broker's Namespace Management authors NSZE, NCAP, FLBAS, DPS and NMIC only"
       for o in ("anagrp-id", "nvmset-id", "block-size", "csi", "lbstm", "nsze-si", "ncap-si", "timeout")},
    ("set-feature", "uuid-index"): "the broker's Set Features authors CDW14 as 0",
}

DIFFERENT: dict[tuple[str, str], str] = {
    ("read", "data-size"): "optional (default: the blocks' bytes); nvme-cli requires it",
    **{(c, "ref-tag"): "default: the first block's LBA (low 32 bits), which type 1 needs; nvme-cli's is 0"
       for c in ("read", "write")},
    **{(c, "metadata-size"): "optional (default: block count x the format's metadata size)" for c in ("read", "write")},
    ("write", "block-count"): "optional: without it the whole data (or --data-size bytes of it) is written",
    ("read", "block-count"): "not limited to one command: more than MDTS is split (also compare's 65536 limit)",
    ("get-feature", "sel"): "0-3; nvme-cli's 8 (changed: the feature only when it differs from its default) is "
                            "not taken",
    ("get-feature", "feature-id"): "required: nvme-cli without it reads every feature",
    ("show-regs", "human-readable"): "nvme-cli's decoded text for every register it reads, on stdout; nvmevfio's "
                                     "own lines (BAR0, the DMA lane, IOVA ranges) go to stderr. CC, CSTS, AQA, ASQ, "
                                     "ACQ are as nvmevfio left them (no queues: show-regs does not enable)",
    ("show-regs", "output-format"): "normal|json: BAR0 is read by field, there is no register dump",
    ("sanitize-log", "human-readable"): "accepted; the page is always decoded",
    ("sanitize-log", "rae"): "accepted; the broker reads the page for its own events anyway",
    ("self-test-log", "verbose"): "accepted; every field is shown anyway",
    ("list", "verbose"): "accepted; the list always shows everything",
    ("list", "output-format"): "lists PCI functions (address, driver, IOMMU group), nvmevfio's JSON",
    ("fw-download", "progress"): "accepted; the pieces are counted at the end",
    ("fw-download", "ignore-ovr"): "accepted; nvmevfio never prompts here",
    ("delete-ns", "timeout"): "accepted; the command timeout (nvmevfio --timeout S) applies",
    ("copy", "format"): "0 only (format 0's 32-byte source ranges)",
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
        "Measured with nvme-cli 2.3: a usage error (unknown option, a bad number) exits 1 on the host; in the",
        "test guest with the kernel driver, an NVMe status (Invalid Command Opcode from `sanitize`, Compare",
        "Failure from `compare`, Invalid Field from `get-feature -f 0x55`) exits 1. nvmevfio returns the same",
        "for the same class of failure. Its own classes, which nvme-cli does not have: 3 refused by name",
        "before the device saw anything (e.g. `set-feature -f 7`, Number of Queues, is the broker's; nvme-cli",
        "gets Command Sequence Error from the device and exits 1), 5 setup (not root, not bound to vfio-pci,",
        "no IOMMU), 4 `perf --verify` found blocks that did not hold what was written.",
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
