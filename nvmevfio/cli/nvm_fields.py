"""nvme-cli's per-command fields of the NVM I/O commands (read, write, compare, verify, write-zeroes):
limited retry, force unit access, the storage tag and its check, the directive type and specific,
the dataset management hints, and the protection fields of verify and write-zeroes. A command line
that sets any of them is sent as nvme-cli sends it, one command (builders.nvm_io) through the
broker's passthrough, which authors the data and metadata pointers; refused by name before the
device what the controller cannot take (directives where OACS bit 5 is 0, a storage tag)."""

from __future__ import annotations

from typing import Any

import click

from nvmevfio.cli.common import IONUM, fua_opt, limited_retry_opt, num

DSM_RANGE = 16  # bytes of one Dataset Management range (NVM Command Set 3.2.3)
COPY_RANGE = {0: 32, 1: 40}  # bytes of one Copy source range, formats 0 and 1 (NVM Command Set 1.0, 3.2.2)
OACS_DIRECTIVES = 1 << 5  # Identify Controller OACS bit 5: Directive Send and Receive (NVMe Base 2.0, 5.17.2.1)

storage_tag_check_opt = click.option("-C", "--storage-tag-check", is_flag=True,
                                     help="check the storage tag (STC)")
dir_type_opt = click.option("-T", "--dir-type", "dtype", type=num(0, 15), default=0,
                            help="directive type (DTYPE; where the controller has directives, OACS bit 5)")
dir_spec_opt = click.option("-S", "--dir-spec", "dspec", type=num(0, 0xFFFF), default=0,
                            help="directive specific (DSPEC)")
dsm_hint_opt = click.option("-D", "--dsm", "dsm", type=num(0, 0xFF), default=0,
                            help="dataset management hints (DSM, CDW13 7:0)")
force_opt = click.option("--force", is_flag=True,
                         help="accepted (nvme-cli's exclusive-open override): nvmevfio holds the controller alone")


def storage_tag_opt(short: str) -> Any:
    """-g (read, write, compare) or -S (verify, write-zeroes): nvme-cli's storage tag."""
    return click.option(f"-{short}", "--storage-tag", type=IONUM, default=0,
                        help="storage tag (only 0: storage tags are not authored, STS 0)")


def control_opts(f: Any) -> Any:
    """read, write, compare: -l -f -C -g -T -S -D --force, as nvme-cli's submit_io takes them."""
    for opt in reversed((limited_retry_opt, fua_opt, storage_tag_check_opt, storage_tag_opt("g"), dir_type_opt,
                         dir_spec_opt, dsm_hint_opt, force_opt)):
        f = opt(f)
    return f


def protection_opts(f: Any) -> Any:
    """verify, write-zeroes: -l -f -p -r -a -m -S (storage tag) -C, as nvme-cli's verify and write-zeroes."""
    for opt in reversed((limited_retry_opt, fua_opt,
                         click.option("-p", "--prinfo", type=num(0, 15), default=0,
                                      help="PRINFO: 8 PRACT, checks 4 guard, 2 application tag, 1 reference tag"),
                         click.option("-r", "--ref-tag", type=IONUM, default=None,
                                      help="the first block's reference tag (EILBRT; default: the LBA's low 32 "
                                           "bits where the format's protection is type 1 or 2)"),
                         click.option("-a", "--app-tag", type=num(0, 0xFFFF), default=0, help="application tag (LBAT)"),
                         click.option("-m", "--app-tag-mask", type=num(0, 0xFFFF), default=0,
                                      help="application tag mask (LBATM)"),
                         storage_tag_opt("S"), storage_tag_check_opt)):
        f = opt(f)
    return f


class Control:
    """One command line's nvme-cli fields beyond the block range: whether they ask for the one-command
    path, their refusals, and builders.nvm_io's keywords."""

    def __init__(self, *, limited_retry: bool = False, fua: bool = False, storage_tag_check: bool = False,
                 storage_tag: int = 0, dtype: int = 0, dspec: int = 0, dsm: int = 0, prinfo: int = 0,
                 ref_tag: int | None = None, app_tag: int = 0, app_tag_mask: int = 0, **_: Any) -> None:
        self.lr, self.fua, self.stc, self.storage_tag = limited_retry, fua, storage_tag_check, storage_tag
        self.dtype, self.dspec, self.dsm = dtype, dspec, dsm
        self.prinfo, self.ref_tag, self.apptag, self.appmask = prinfo, ref_tag, app_tag, app_tag_mask

    @property
    def wanted(self) -> bool:
        """True when a field the block-device path does not carry is set (one command, nvme-cli's way)."""
        return bool(self.lr or self.fua or self.stc or self.storage_tag or self.dtype or self.dspec or self.dsm)

    @property
    def protected(self) -> bool:
        """True when a protection field is given (verify and write-zeroes send them in one command)."""
        return bool(self.prinfo or self.ref_tag is not None or self.apptag or self.appmask)

    def check(self, provider: Any) -> None:
        """Refusals by name before the device: a storage tag (the formats this driver authors have none:
        STS 0, where nvme-cli refuses a nonzero tag too), a directive where the controller has none."""
        from nvmevfio.errors import Refused

        if self.storage_tag:
            raise Refused("storage-tag-unsupported", f"storage tag {self.storage_tag:#x}: the namespace's format "
                          "has no storage tag bits (STS 0); nvme-cli refuses it too (storage tag larger than "
                          "storage tag size)", storage_tag=self.storage_tag)
        if (self.dtype or self.dspec) and not provider.id_ctrl.get("oacs", 0) & OACS_DIRECTIVES:
            raise Refused("directives-unsupported", f"directive type {self.dtype}, specific {self.dspec:#x}: the "
                          "controller has no Directives (Identify Controller OACS bit 5 is 0)",
                          dtype=self.dtype, dspec=self.dspec)

    def fields(self, slba: int, pi_type: int) -> dict[str, Any]:
        """builders.nvm_io's keywords; the reference tag defaults to the LBA's low 32 bits where the
        format's protection is type 1 or 2 (what its check needs), else 0."""
        ref = self.ref_tag if self.ref_tag is not None else (slba & 0xFFFFFFFF if pi_type in (1, 2) else 0)
        return {"lr": self.lr, "fua": self.fua, "prinfo": self.prinfo, "stc": self.stc, "dtype": self.dtype,
                "dspec": self.dspec, "dsm": self.dsm, "reftag": ref & 0xFFFFFFFF, "apptag": self.apptag,
                "appmask": self.appmask}


def send(dev: Any, control: Control, opc: int, name: str, slba: int, count: int, *, data: bytes | None = None,
         data_len: int = 0, metadata: Any = None, cdw12: int = 0) -> bytes | None:
    """One NVM command on blocks ``slba``..+``count`` of ``dev``'s namespace with ``control``'s fields
    (checked, the window too, before the device): ``data`` sent or ``data_len`` bytes received,
    ``metadata`` a buffer of the metadata's length (sent, or filled in). Returns the bytes received."""
    from nvmevfio.nvme import builders

    if not hasattr(dev, "provider"):
        from nvmevfio.errors import Refused

        raise Refused("invalid-argument", "these fields (limited retry, FUA, directives, hints, protection) go "
                      "through the device, not the service")
    p = dev.provider
    control.check(p)
    dev.check_window(slba, count)
    pi_type = dev.protection.pi_type if getattr(dev, "protection", None) is not None else 0
    cmd = builders.nvm_io(opc, dev.nsid, slba, count, cdw12=cdw12, command=name, **control.fields(slba, pi_type))
    _, got = p.io_passthru(opc, nsid=dev.nsid, data=data, data_len=data_len, metadata=metadata, **cmd.cdws)
    return got


def dsm_ranges(slbs: list[int], blocks: list[int], ctx_attrs: list[int]) -> bytes:
    """Dataset Management's range list, as nvme-cli builds it: range i from the i-th of each list
    (a missing entry is 0); context attributes, length in blocks (1's based), starting LBA."""
    nr = max(len(slbs), len(blocks), len(ctx_attrs))
    if not 0 < nr <= 256:
        raise click.UsageError(f"give 1..256 ranges (--slbs/--blocks/--ctx-attrs), not {nr}")
    out = bytearray(nr * DSM_RANGE)
    for i in range(nr):
        at = i * DSM_RANGE
        out[at : at + 4] = (ctx_attrs[i] if i < len(ctx_attrs) else 0).to_bytes(4, "little")
        out[at + 4 : at + 8] = (blocks[i] if i < len(blocks) else 0).to_bytes(4, "little")
        out[at + 8 : at + 16] = (slbs[i] if i < len(slbs) else 0).to_bytes(8, "little")
    return bytes(out)


def dsm_attributes(ad: bool, idw: bool, idr: bool, cdw11: int) -> int:
    """CDW11 of Dataset Management: --cdw11 as given, else the attribute bits (IDR 0, IDW 1, AD 2)."""
    return cdw11 or (int(idr) | int(idw) << 1 | int(ad) << 2)


def copy_ranges(slbs: list[int], blocks: list[int], *, mssrl: int, mcl: int, msrc: int,
                eilbrts: tuple[int, ...] = (), elbats: tuple[int, ...] = (), elbatms: tuple[int, ...] = (),
                fmt: int = 0) -> bytes:
    """Copy's source ranges (NVM Command Set 1.0, 3.2.2; range i's tags from the i-th of each list, 0
    where it is short): SLBA at byte 8, NLB 0's based at byte 16; format 0 (32 bytes) EILBRT at 24,
    ELBAT at 28, ELBATM at 30; format 1 (40 bytes, the 32b/64b guard formats) the 80-bit ELBST/EILBRT
    at 26 (big-endian, the reference tag in its low bytes, as libnvme writes it), ELBAT at 36, ELBATM
    at 38. Checked against the namespace's limits first: each range at most MSSRL blocks, all at most
    MCL, at most MSRC+1 ranges; refused by name otherwise (nothing sent)."""
    from nvmevfio.errors import Refused

    if len(slbs) != len(blocks) or not slbs:
        raise click.UsageError("--slbs and --blocks need the same number of entries (at least one)")
    if len(slbs) > msrc + 1:
        raise Refused("copy-too-many-ranges", f"{len(slbs)} source ranges; the namespace takes {msrc + 1} (MSRC)",
                      ranges=len(slbs), msrc=msrc)
    for nlb in blocks:
        if nlb + 1 > mssrl:
            raise Refused("copy-range-too-long", f"a source range of {nlb + 1} blocks; the namespace takes "
                          f"{mssrl} (MSSRL)", blocks=nlb + 1, mssrl=mssrl)
    if sum(b + 1 for b in blocks) > mcl:
        raise Refused("copy-too-long", f"{sum(b + 1 for b in blocks)} blocks in all; the namespace copies "
                      f"{mcl} at most (MCL)", blocks=sum(b + 1 for b in blocks), mcl=mcl)
    size = COPY_RANGE[fmt]
    out = bytearray(len(slbs) * size)
    for i, (s, b) in enumerate(zip(slbs, blocks)):
        at = i * size
        out[at + 8 : at + 16] = s.to_bytes(8, "little")
        out[at + 16 : at + 18] = b.to_bytes(2, "little")
        ref, tag, mask = ((t[i] if i < len(t) else 0) for t in (eilbrts, elbats, elbatms))
        if fmt == 0:
            out[at + 24 : at + 28] = ref.to_bytes(4, "little")
        else:
            out[at + 26 : at + 36] = ref.to_bytes(10, "big")
        tags = at + (28 if fmt == 0 else 36)
        out[tags : tags + 4] = tag.to_bytes(2, "little") + mask.to_bytes(2, "little")
    return bytes(out)


def copy_dwords(sdlba: int, nr: int, *, lr: bool = False, fua: bool = False, prinfor: int = 0, prinfow: int = 0,
                dtype: int = 0, dspec: int = 0, ilbrt: int = 0, lbat: int = 0, lbatm: int = 0,
                fmt: int = 0) -> dict[str, int]:
    """Copy's CDW3 and CDW10..15 (NVM Command Set 1.0, 3.2.2; libnvme's nvme_copy): CDW3 the high
    dword of a 64-bit ILBRT; SDLBA; CDW12 NR 7:0 (0's based), descriptor format 11:8, PRINFOR 15:12,
    DTYPE 23:20, PRINFOW 29:26, FUA 30, LR 31; CDW13 DSPEC 31:16; CDW14 ILBRT; CDW15 LBATM 31:16,
    LBAT 15:0."""
    return {"cdw3": (ilbrt >> 32) & 0xFFFFFFFF, "cdw10": sdlba & 0xFFFFFFFF, "cdw11": sdlba >> 32,
            "cdw12": ((nr - 1) & 0xFF) | fmt << 8 | prinfor << 12 | dtype << 20 | prinfow << 26 | int(fua) << 30
            | int(lr) << 31, "cdw13": dspec << 16, "cdw14": ilbrt & 0xFFFFFFFF, "cdw15": lbatm << 16 | lbat}
