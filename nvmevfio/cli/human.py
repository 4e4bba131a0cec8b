"""``-H`` for id-ctrl and id-ns: each field's bits decoded in nvme-cli 2.3's words and layout.

Pure functions, a field's value to the text lines nvme-cli prints under the field's own line
(nvme-print.c at v2.3, ``nvme_show_id_ctrl_*`` and ``nvme_show_id_ns_*``), its quirks kept so
that the text compares equal: the odd indents, the inverted FNA bit 3 and SANICAP bit 29, CNTRLTYPE's
whole value on the [1:0] line and no blank line after it, NVMSR's and MEC's reserved-bit shifts.
C's ``%#x`` prints 0 as ``0`` (``hex0``). The registers' decoding (show-regs -H) is in human_regs.py.
"""

from __future__ import annotations

from typing import Any, Callable


def hex0(v: int) -> str:
    """C's ``%#x``: ``0`` for zero, ``0x..`` otherwise."""
    return f"{v:#x}" if v else "0"


_x = hex0


def _not(v: int) -> str:
    return "" if v else "Not "


def _bits(v: int, hi: int, lo: int) -> int:
    return (v >> lo) & ((1 << (hi - lo + 1)) - 1)


def _supported(v: int, names: tuple[tuple[int, str], ...]) -> list[str]:
    """``  [b:b] : %#x\\t<name> %sSupported`` for each (bit, name), the common line."""
    return [f"  [{b}:{b}] : {_x(v >> b & 1)}\t{name} {_not(v >> b & 1)}Supported" for b, name in names]


def _reserved(prefix: str, v: int) -> list[str]:
    """A reserved range's line, printed only when it is not zero (``prefix`` as nvme-cli indents it)."""
    return [f"{prefix}{_x(v)}\tReserved"] if v else []


def _temp(v: int, what: str) -> list[str]:
    return [f" [15:0] : {v - 273}°C ({v} Kelvin)\t{what}", ""]


# ------------------------------------------------------------------ Identify Controller
def cmic(v: int) -> list[str]:
    ana, sriov, mctl, mp = v >> 3 & 1, v >> 2 & 1, v >> 1 & 1, v & 1
    return [*_reserved("  [7:4] : ", _bits(v, 7, 4)),
            f"  [3:3] : {_x(ana)}\tANA {'' if ana else 'not '}supported",
            f"  [2:2] : {_x(sriov)}\t{'SR-IOV' if sriov else 'PCI'}",
            f"  [1:1] : {_x(mctl)}\t{'Multi' if mctl else 'Single'} Controller",
            f"  [0:0] : {_x(mp)}\t{'Multi' if mp else 'Single'} Port", ""]


def oaes(v: int) -> list[str]:
    return [*_supported(v, ((31, "Discovery Log Change Notice"),)), *_reserved("  [30:28] : ", _bits(v, 30, 28)),
            *_supported(v, ((27, "Zone Descriptor Changed Notices"),)), *_reserved("  [26:16] : ", _bits(v, 26, 16)),
            *_supported(v, ((15, "Normal NSS Shutdown Event"),
                            (14, "Endurance Group Event Aggregate Log Page Change Notice"),
                            (13, "LBA Status Information Notices"),
                            (12, "Predictable Latency Event Aggregate Log Change Notices"),
                            (11, "Asymmetric Namespace Access Change Notices"))),
            *_reserved("  [10:10] : ", v >> 10 & 1),
            *_supported(v, ((9, "Firmware Activation Notices"), (8, "Namespace Attribute Changed Event"))),
            *_reserved("  [7:0] : ", v & 0xFF), ""]


def ctratt(v: int) -> list[str]:
    return [*_reserved(" [31:20] : ", v >> 20), *_supported(v, ((19, "Flexible Data Placement"),)),
            *_reserved("  [18:16] : ", _bits(v, 18, 16)),
            *_supported(v, ((15, "Extended LBA Formats"), (14, "Delete NVM Set"), (13, "Delete Endurance Group"),
                            (12, "Variable Capacity Management"), (11, "Fixed Capacity Management"),
                            (10, "Multi Domain Subsystem"), (9, "UUID List"), (8, "SQ Associations"),
                            (7, "Namespace Granularity"), (6, "Traffic Based Keep Alive"),
                            (5, "Predictable Latency Mode"), (4, "Endurance Groups"), (3, "Read Recovery Levels"),
                            (2, "NVM Sets"), (1, "Non-Operational Power State Permissive"),
                            (0, "128-bit Host Identifier"))), ""]


CNTRLTYPE = ("Controller type not reported", "I/O Controller", "Discovery Controller", "Administrative Controller")


def cntrltype(v: int) -> list[str]:
    # nvme-cli prints the whole byte on the [1:0] line, the reserved line always, and no blank line
    return [f"  [7:2] : {_x(_bits(v, 7, 2))}\tReserved", f"  [1:0] : {_x(v)}\t{CNTRLTYPE[v & 3]}"]


def nvmsr(v: int) -> list[str]:
    return [*_reserved(" [7:2] : ", (v >> 2) & 0xFC),  # nvme-cli's shift, kept
            f"  [1:1] : {_x(v >> 1 & 1)}\tNVM subsystem {_not(v >> 1 & 1)}part of an Enclosure",
            f"  [0:0] : {_x(v & 1)}\tNVM subsystem {_not(v & 1)}part of an Storage Device", ""]


def vwci(v: int) -> list[str]:
    return [f"  [7:7] : {_x(v >> 7 & 1)}\tVPD Write Cycles Remaining field is {_not(v >> 7 & 1)}valid.",
            f"  [6:0] : {_x(v & 0xFE)}\tVPD Write Cycles Remaining ", ""]  # nvme-cli's mask, kept


def mec(v: int) -> list[str]:
    return [*_reserved(" [7:2] : ", (v >> 2) & 0xFC),
            f"  [1:1] : {_x(v >> 1 & 1)}\tNVM subsystem {_not(v >> 1 & 1)}contains a Management Endpoint on a PCIe "
            "port",
            f"  [0:0] : {_x(v & 1)}\tNVM subsystem {_not(v & 1)}contains a Management Endpoint on an SMBus/I2C port",
            ""]


def oacs(v: int) -> list[str]:
    return [*_reserved(" [15:11] : ", _bits(v, 15, 11)),
            *_supported(v, ((10, "Lockdown Command and Feature"), (9, "Get LBA Status Capability"),
                            (8, "Doorbell Buffer Config"), (7, "Virtualization Management"),
                            (6, "NVMe-MI Send and Receive"), (5, "Directives"), (4, "Device Self-test"),
                            (3, "NS Management and Attachment"), (2, "FW Commit and Download"), (1, "Format NVM"),
                            (0, "Security Send and Receive"))), ""]


def frmw(v: int) -> list[str]:
    return [*_reserved("  [7:6] : ", _bits(v, 7, 6)),
            *_supported(v, ((5, "Multiple FW or Boot Update Detection"), (4, "Firmware Activate Without Reset"))),
            f"  [3:1] : {_x(_bits(v, 3, 1))}\tNumber of Firmware Slots",
            f"  [0:0] : {_x(v & 1)}\tFirmware Slot 1 Read{'-Only' if v & 1 else '/Write'}", ""]


def lpa(v: int) -> list[str]:
    return [*_reserved("  [7:7] : ", v >> 7 & 1),
            *_supported(v, ((6, "Telemetry Log Data Area 4"),
                            (5, "LID 0x0, Scope of each command in LID 0x5, 0x12, 0x13"),
                            (4, "Persistent Event log"), (3, "Telemetry host/controller initiated log page"),
                            (2, "Extended data for Get Log Page"), (1, "Command Effects Log Page"),
                            (0, "SMART/Health Log Page per NS"))), ""]


def elpe(v: int) -> list[str]:
    return [f"  [7:0] : {v} (0's based)\tError Log Page Entries (ELPE)", ""]


def npss(v: int) -> list[str]:
    return [f"  [7:0] : {v} (0's based)\tNumber of Power States Support (NPSS)", ""]


def avscc(v: int) -> list[str]:
    return [*_reserved("  [7:1] : ", v >> 1 & 0x7F),
            f"  [0:0] : {_x(v & 1)}\tAdmin Vendor Specific Commands uses {'NVMe' if v & 1 else 'Vendor Specific'} "
            "Format", ""]


def apsta(v: int) -> list[str]:
    return [*_reserved("  [7:1] : ", v >> 1 & 0x7F), *_supported(v, ((0, "Autonomous Power State Transitions"),)), ""]


def tnvmcap(v: int) -> list[str]:
    return [f"[127:0] : {v}", "\tTotal NVM Capacity (TNVMCAP)", ""]


def unvmcap(v: int) -> list[str]:
    return [f"[127:0] : {v}", "\tUnallocated NVM Capacity (UNVMCAP)", ""]


def rpmbs(v: int) -> list[str]:
    return [f" [31:24]: {_x(_bits(v, 31, 24))}\tAccess Size", f" [23:16]: {_x(_bits(v, 23, 16))}\tTotal Size",
            *_reserved(" [15:6] : ", _bits(v, 15, 6)), f"  [5:3] : {_x(_bits(v, 5, 3))}\tAuthentication Method",
            f"  [2:0] : {_x(v & 7)}\tNumber of RPMB Units", ""]


def hctma(v: int) -> list[str]:
    return [*_reserved(" [15:1] : ", _bits(v, 15, 1)), *_supported(v, ((0, "Host Controlled Thermal Management"),)),
            ""]


SANICAP_NODMMAS = (
    "Additional media modification after sanitize operation completes successfully is not defined",
    "Media is not additionally modified after sanitize operation completes successfully",
    "Media is additionally modified after sanitize operation completes successfully",
    "Reserved")


def sanicap(v: int) -> list[str]:
    ndi = v >> 29 & 1
    return [f"  [31:30] : {_x(v >> 30 & 3)}\t{SANICAP_NODMMAS[v >> 30 & 3]}",
            f"  [29:29] : {_x(ndi)}\tNo-Deallocate After Sanitize bit in Sanitize command "
            f"{'Not ' if ndi else ''}Supported",  # nvme-cli's reading of NDI, kept
            *_reserved("  [28:3] : ", _bits(v, 28, 3)),
            *("  " + line for line in _supported(v, ((2, "Overwrite Sanitize Operation"),
                                                      (1, "Block Erase Sanitize Operation"),
                                                      (0, "Crypto Erase Sanitize Operation")))), ""]


def anacap(v: int) -> list[str]:
    return [*_supported(v, ((7, "Non-zero group ID"),)),
            f"  [6:6] : {_x(v >> 6 & 1)}\tGroup ID does {'not ' if v >> 6 & 1 else ''}change",
            *_reserved(" [5:5] : ", v >> 5 & 1),
            *_supported(v, ((4, "ANA Change state"), (3, "ANA Persistent Loss state"), (2, "ANA Inaccessible state"),
                            (1, "ANA Non-optimized state"), (0, "ANA Optimized state"))), ""]


def _entry_sizes(v: int, q: str) -> list[str]:
    hi, lo = v >> 4 & 0xF, v & 0xF
    return [f"  [7:4] : {_x(hi)}\tMax {q} Entry Size ({1 << hi})",
            f"  [3:0] : {_x(lo)}\tMin {q} Entry Size ({1 << lo})", ""]


def oncs(v: int) -> list[str]:
    return [*_reserved(" [15:9] : ", _bits(v, 15, 9)),
            *_supported(v, ((8, "Copy"), (7, "Verify"), (6, "Timestamp"), (5, "Reservations"), (4, "Save and Select"),
                            (3, "Write Zeroes"), (2, "Data Set Management"), (1, "Write Uncorrectable"),
                            (0, "Compare"))), ""]


def fuses(v: int) -> list[str]:
    return [*_reserved(" [15:1] : ", (v & 0xFE) >> 1), *_supported(v, ((0, "Fused Compare and Write"),)), ""]


def fna(v: int) -> list[str]:
    b3, b2, b1, b0 = v >> 3 & 1, v >> 2 & 1, v >> 1 & 1, v & 1
    return [*_reserved("  [7:4] : ", v >> 4 & 0xF),
            f"  [3:3] : {_x(b3)}\tFormat NVM Broadcast NSID (FFFFFFFFh) {'Not ' if b3 else ''}Supported",  # kept
            f"  [2:2] : {_x(b2)}\tCrypto Erase {_not(b2)}Supported as part of Secure Erase",
            f"  [1:1] : {_x(b1)}\tCrypto Erase Applies to {'All' if b1 else 'Single'} Namespace(s)",
            f"  [0:0] : {_x(b0)}\tFormat Applies to {'All' if b0 else 'Single'} Namespace(s)", ""]


VWC_FLUSH = ("Support for the NSID field set to FFFFFFFFh is not indicated", "Reserved",
             "The Flush command does not support NSID set to FFFFFFFFh",
             "The Flush command supports NSID set to FFFFFFFFh")


def vwc(v: int) -> list[str]:
    return [*_reserved("  [7:3] : ", v >> 3 & 0x1F), f"  [2:1] : {_x(v >> 1 & 3)}\t{VWC_FLUSH[v >> 1 & 3]}",
            f"  [0:0] : {_x(v & 1)}\tVolatile Write Cache {_not(v & 1)}Present", ""]


def icsvscc(v: int) -> list[str]:
    return [*_reserved("  [7:1] : ", v >> 1 & 0x7F),
            f"  [0:0] : {_x(v & 1)}\tNVM Vendor Specific Commands uses {'NVMe' if v & 1 else 'Vendor Specific'} Format",
            ""]


def nwpc(v: int) -> list[str]:
    return [*_reserved("  [7:3] : ", v >> 3 & 0x1F),
            *_supported(v, ((2, "Permanent Write Protect"), (1, "Write Protect Until Power Supply"),
                            (0, "No Write Protect and Write Protect Namespace"))), ""]


def ocfs(v: int) -> list[str]:
    return [*_reserved("  [15:2] : ", _bits(v, 15, 2)),
            *_supported(v, ((1, "Controller Copy Format 1h"), (0, "Controller Copy Format 0h"))), ""]


SGLS_BITS = ((21, "Transport SGL Data Block Descriptor %sSupported"), (20, "Address Offsets %sSupported"),
             (19, "Metadata Pointer Containing SGL Descriptor is %sSupported"),
             (18, "SGL Length Larger than Buffer %sSupported"), (17, "Byte-Aligned Contig. MD Buffer %sSupported"),
             (16, "SGL Bit-Bucket %sSupported"))


def sgls(v: int) -> list[str]:
    sglsp = v & 3
    out = _reserved(" [31:22]: ", _bits(v, 31, 22))
    for b, text in SGLS_BITS:  # a capability bit's line only when SGLs are supported, or when it is set
        if sglsp or v >> b & 1:
            out.append(f" [{b}:{b}]: {_x(v >> b & 1)}\t{text % _not(v >> b & 1)}")
    out.append(f" [15:8] : {_x(_bits(v, 15, 8))}\tSGL Descriptor Threshold")
    out += _reserved(" [7:3] : ", _bits(v, 7, 3))
    if sglsp or v >> 2 & 1:
        out.append(f"  [2:2] : {_x(v >> 2 & 1)}\tKeyed SGL Data Block descriptor {_not(v >> 2 & 1)}Supported")
    out.append({3: f"  [1:0] : {_x(sglsp)}\tReserved",
                2: f"  [1:0] : {_x(sglsp)}\tScatter-Gather Lists Supported. Dword alignment required.",
                1: f"  [1:0] : {_x(sglsp)}\tScatter-Gather Lists Supported. No Dword alignment required.",
                0: f" [1:0]  : {_x(sglsp)}\tScatter-Gather Lists Not Supported"}[sglsp])
    return [*out, ""]


def fcatt(v: int) -> list[str]:
    return [*_reserved("  [7:1] : ", v >> 1 & 0x7F),
            f"  [0:0] : {_x(v & 1)}\t{'Static' if v & 1 else 'Dynamic'} Controller Model", ""]


def ofcs(v: int) -> list[str]:
    # nvme-cli's "%s Supported" with "" or "Not": two spaces when set, kept
    return [*_reserved("  [15:1] : ", _bits(v, 15, 1)),
            f"  [0:0] : {_x(v & 1)}\tDisconnect command {'' if v & 1 else 'Not'} Supported", ""]


# id-ctrl's fields nvme-cli 2.3 decodes under -H, each printed under the field's own line
ID_CTRL: dict[str, Callable[[int], list[str]]] = {
    "cmic": cmic, "oaes": oaes, "ctratt": ctratt, "cntrltype": cntrltype, "nvmsr": nvmsr, "vwci": vwci, "mec": mec,
    "oacs": oacs, "frmw": frmw, "lpa": lpa, "elpe": elpe, "npss": npss, "avscc": avscc, "apsta": apsta,
    "wctemp": lambda v: _temp(v, "Warning Composite Temperature Threshold (WCTEMP)"),
    "cctemp": lambda v: _temp(v, "Critical Composite Temperature Threshold (CCTEMP)"),
    "tnvmcap": tnvmcap, "unvmcap": unvmcap, "rpmbs": rpmbs, "hctma": hctma,
    "mntmt": lambda v: _temp(v, "Minimum Thermal Management Temperature (MNTMT)"),
    "mxtmt": lambda v: _temp(v, "Maximum Thermal Management Temperature (MXTMT)"),
    "sanicap": sanicap, "anacap": anacap, "sqes": lambda v: _entry_sizes(v, "SQ"),
    "cqes": lambda v: _entry_sizes(v, "CQ"), "oncs": oncs, "fuses": fuses, "fna": fna, "vwc": vwc,
    "icsvscc": icsvscc, "nwpc": nwpc, "ocfs": ocfs, "sgls": sgls, "fcatt": fcatt, "ofcs": ofcs,
}


def id_ctrl_field(name: str, value: int) -> list[str]:
    """The lines nvme-cli 2.3's ``id-ctrl -H`` prints under field ``name`` (none for a field it does not decode)."""
    decode = ID_CTRL.get(name)
    return decode(value) if decode else []


# ------------------------------------------------------------------ Identify Namespace
def nsfeat(v: int) -> list[str]:
    b4, b3, b2, b1, b0 = (v >> i & 1 for i in (4, 3, 2, 1, 0))
    return [*_reserved("  [7:5] : ", v >> 5 & 7),
            f"  [4:4] : {_x(b4)}\tNPWG, NPWA, NPDG, NPDA, and NOWS are {_not(b4)}Supported",
            f"  [3:3] : {_x(b3)}\tNGUID and EUI64 fields if non-zero, {'Never ' if b3 else ''}Reused",
            f"  [2:2] : {_x(b2)}\tDeallocated or Unwritten Logical Block error {_not(b2)}Supported",
            f"  [1:1] : {_x(b1)}\tNamespace uses {'NAWUN, NAWUPF, and NACWU' if b1 else 'AWUN, AWUPF, and ACWU'}",
            f"  [0:0] : {_x(b0)}\tThin Provisioning {_not(b0)}Supported", ""]


def flbas(v: int) -> list[str]:
    return [*_reserved("  [7:7] : ", v >> 7 & 1),
            f"  [6:5] : {_x(v >> 5 & 3)}\tMost significant 2 bits of Current LBA Format Selected",
            f"  [4:4] : {_x(v >> 4 & 1)}\tMetadata Transferred "
            f"{'at End of Data LBA' if v >> 4 & 1 else 'in Separate Contiguous Buffer'}",
            f"  [3:0] : {_x(v & 0xF)}\tLeast significant 4 bits of Current LBA Format Selected", ""]


def mc(v: int) -> list[str]:
    return [*_reserved("  [7:2] : ", v >> 2 & 0x3F),
            f"  [1:1] : {_x(v >> 1 & 1)}\tMetadata Pointer {_not(v >> 1 & 1)}Supported",
            f"  [0:0] : {_x(v & 1)}\tMetadata as Part of Extended Data LBA {_not(v & 1)}Supported", ""]


def dpc(v: int) -> list[str]:
    return [*_reserved("  [7:5] : ", v >> 5 & 7),
            *_supported(v, ((4, "Protection Information Transferred as Last 8 Bytes of Metadata"),
                            (3, "Protection Information Transferred as First 8 Bytes of Metadata"),
                            (2, "Protection Information Type 3"), (1, "Protection Information Type 2"),
                            (0, "Protection Information Type 1"))), ""]


def dps(v: int) -> list[str]:
    pit = v & 7
    state = {3: "Type 3 Enabled", 2: "Type 2 Enabled", 1: "Type 1 Enabled", 0: "Disabled"}.get(pit, "Reserved Enabled")
    return [*_reserved("  [7:4] : ", v >> 4 & 0xF),
            f"  [3:3] : {_x(v >> 3 & 1)}\tProtection Information is Transferred as "
            f"{'First' if v >> 3 & 1 else 'Last'} 8 Bytes of Metadata",
            f"  [2:0] : {_x(pit)}\tProtection Information {state}", ""]


def nmic(v: int) -> list[str]:
    return [*_reserved("  [7:1] : ", v >> 1 & 0x7F),
            f"  [0:0] : {_x(v & 1)}\tNamespace Multipath {_not(v & 1)}Capable", ""]


def rescap(v: int) -> list[str]:
    return [f"  [7:7] : {_x(v >> 7 & 1)}\tIgnore Existing Key - Used as defined in revision "
            f"{'1.3 or later' if v >> 7 & 1 else '1.2.1 or earlier'}",
            *_supported(v, ((6, "Exclusive Access - All Registrants"), (5, "Write Exclusive - All Registrants"),
                            (4, "Exclusive Access - Registrants Only"), (3, "Write Exclusive - Registrants Only"),
                            (2, "Exclusive Access"), (1, "Write Exclusive"), (0, "Persist Through Power Loss"))), ""]


def fpi(v: int) -> list[str]:
    fpis, fpii = v >> 7 & 1, v & 0x7F
    out = [f"  [7:7] : {_x(fpis)}\tFormat Progress Indicator {_not(fpis)}Supported"]
    if fpis or fpii:
        out.append(f"  [6:0] : {_x(fpii)}\tFormat Progress Indicator (Remaining {fpii}%)")
    return [*out, ""]


def dlfeat(v: int) -> list[str]:
    val = v & 7
    read = {2: "0xFF", 1: "0x00", 0: "Not Reported"}.get(val, "Reserved Value")
    return [*_reserved("  [7:5] : ", v >> 5 & 7),
            f"  [4:4] : {_x(v >> 4 & 1)}\tGuard Field of Deallocated Logical Blocks is set to "
            f"{'CRC of The Value Read' if v >> 4 & 1 else '0xFFFF'}",
            f"  [3:3] : {_x(v >> 3 & 1)}\tDeallocate Bit in the Write Zeroes Command is {_not(v >> 3 & 1)}Supported",
            f"  [2:0] : {_x(val)}\tBytes Read From a Deallocated Logical Block and its Metadata are {read}", ""]


ID_NS: dict[str, Callable[[int], list[str]]] = {
    "nsfeat": nsfeat, "flbas": flbas, "mc": mc, "dpc": dpc, "dps": dps, "nmic": nmic, "rescap": rescap, "fpi": fpi,
    "dlfeat": dlfeat,
}


def id_ns_field(name: str, value: int) -> list[str]:
    """The lines nvme-cli 2.3's ``id-ns -H`` prints under field ``name`` (none for a field it does not decode)."""
    decode = ID_NS.get(name)
    return decode(value) if decode else []


def lbaf_in_use(flbas_value: int) -> int:
    """libnvme's nvme_id_ns_flbas_to_lbaf_inuse: FLBAS bits 6:5 above bits 3:0."""
    return (flbas_value & 0x60) >> 1 | flbas_value & 0xF


RELATIVE_PERFORMANCE = ("Best", "Better", "Good", "Degraded")


def lba_format(i: int, f: dict[str, Any], in_use: bool) -> str:
    """``id-ns -H``'s line for LBA format ``i`` (``f``: ms, ds, rp), trailing spaces as nvme-cli prints them."""
    return (f"LBA Format {i:>2} : Metadata Size: {f['ms']:<3} bytes - Data Size: {1 << f['ds']:<2} bytes - "
            f"Relative Performance: {_x(f['rp'])} {RELATIVE_PERFORMANCE[f['rp'] & 3]} {'(in use)' if in_use else ''}")


# ------------------------------------------------------------------ power states (id-ctrl, with or without -H)
def _power(value: int, scale: int) -> str:
    """nvme-cli's print_ps_power_and_scale: IDLP/ACTP in the units their scale names."""
    if scale == 1:
        return f"{value // 10000}.{value % 10000:04}W"
    if scale == 2:
        return f"{value // 100}.{value % 100:02}W"
    return "-" if scale == 0 else "reserved"


PSD_WORKLOAD = {0: "-", 1: "1MiB 32 RW, 30s idle", 2: "80K 128KiB SW"}


def power_states(psds: list[dict[str, Any]]) -> list[str]:
    """id-ctrl's power state lines as nvme-cli 2.3 prints them (nvme_show_id_ctrl_power)."""
    out = []
    for i, ps in enumerate(psds):
        mp, flags = ps["max_power"], ps["flags"]
        power = f"{mp // 10000}.{mp % 10000:04}W" if flags & 1 else f"{mp // 100}.{mp % 100:02}W"  # MXPS: 0.0001 W
        out += [f"ps   {i:>4} : mp:{power} {'non-' if flags & 2 else ''}operational enlat:{ps['entry_lat']} "
                f"exlat:{ps['exit_lat']} rrt:{ps['read_tput']} rrl:{ps['read_lat']}",
                f"{'':12}rwt:{ps['write_tput']} rwl:{ps['write_lat']} "
                f"idle_power:{_power(ps['idle_power'], ps['idle_scale'])} "
                f"active_power:{_power(ps['active_power'], ps['active_scale'])}",
                f"{'':12}active_power_workload:{PSD_WORKLOAD.get(ps['active_power_work'], 'reserved')}"]
    return out
