"""``show-regs -H``: the controller registers decoded in nvme-cli 2.3's words and layout.

A pure function of the register values (nvme-print.c at v2.3, ``nvme_show_ctrl_registers`` with
``-H`` and its ``nvme_show_registers_*``): C's ``%x`` (no 0x) for the register lines, the tabs
in ``cmbmsc``/``cmbsts``/``pmrmscl``/``pmrmscu``'s lines and each block's trailing blank line
(or its absence) kept. A register that is missing from the dict is left out (a BAR too small to
hold it); ``asq``/``acq``/``bpmbl`` set to None (withheld: the no-IOMMU lane's physical addresses)
print that they are withheld in place of the value.
"""

from __future__ import annotations

WITHHELD = "withheld (the no-IOMMU lane's physical address)"


def _yes(v: int, yes: str = "Yes", no: str = "No") -> str:
    return yes if v else no


def cap(v: int) -> list[str]:
    b = v.to_bytes(8, "little")
    top, css_word, ams_cqr = b[7], int.from_bytes(b[4:6], "little"), b[2]
    supported = ("Supported", "Not Supported")
    return [f"\tController Ready With Media Support (CRWMS): {supported[not top & 0x08]}",
            f"\tController Ready Independent of Media Support (CRIMS): {supported[not top & 0x10]}",
            f"\tController Memory Buffer Supported (CMBS): The Controller Memory Buffer is {supported[not top & 0x02]}",
            f"\tPersistent Memory Region Supported (PMRS): The Persistent Memory Region is {supported[not top & 0x01]}",
            f"\tMemory Page Size Maximum         (MPSMAX): {1 << (12 + (b[6] >> 4))} bytes",
            f"\tMemory Page Size Minimum         (MPSMIN): {1 << (12 + (b[6] & 0xF))} bytes",
            f"\tBoot Partition Support              (BPS): {_yes(css_word & 0x2000)}",
            f"\tCommand Sets Supported              (CSS): NVM command set is {supported[not css_word & 0x0020]}",
            f"\t                                           One or more I/O Command Sets are "
            f"{supported[not css_word & 0x0800]}",
            "\t                                           "
            + _yes(css_word & 0x1000, "Only Admin Command Set Supported", "I/O Command Set is Supported"),
            f"\tNVM Subsystem Reset Supported     (NSSRS): {_yes(css_word & 0x0010)}",
            f"\tDoorbell Stride                   (DSTRD): {1 << (2 + (css_word & 0xF))} bytes",
            f"\tTimeout                              (TO): {b[3] * 500} ms",
            "\tArbitration Mechanism Supported     (AMS): Weighted Round Robin with Urgent Priority Class is "
            + _yes(ams_cqr & 0x02, "supported", "not supported"),
            f"\tContiguous Queues Required          (CQR): {_yes(ams_cqr & 0x01)}",
            f"\tMaximum Queue Entries Supported    (MQES): {(v & 0xFFFF) + 1}", ""]


def version(v: int) -> list[str]:
    return [f"\tNVMe specification {v >> 16}.{v >> 8 & 0xFF}", ""]


CC_SHN = ("No notification; no effect", "Normal shutdown notification", "Abrupt shutdown notification", "Reserved")
CC_AMS = {0: "Round Robin", 1: "Weighted Round Robin with Urgent Priority Class", 7: "Vendor Specific"}
CC_CSS = {0x00: "NVM Command Set", 0x60: "All supported I/O Command Sets", 0x70: "Admin Command Set only"}


def cc(v: int) -> list[str]:
    return [f"\tController Ready Independent of Media Enable (CRIME): {_yes(v >> 24 & 1, 'Enabled', 'Disabled')}",
            f"\tI/O Completion Queue Entry Size (IOCQES): {1 << (v >> 20 & 0xF)} bytes",
            f"\tI/O Submission Queue Entry Size (IOSQES): {1 << (v >> 16 & 0xF)} bytes",
            f"\tShutdown Notification              (SHN): {CC_SHN[v >> 14 & 3]}",
            f"\tArbitration Mechanism Selected     (AMS): {CC_AMS.get(v >> 11 & 7, 'Reserved')}",
            f"\tMemory Page Size                   (MPS): {1 << (12 + (v >> 7 & 0xF))} bytes",
            f"\tI/O Command Set Selected           (CSS): {CC_CSS.get(v & 0x70, 'Reserved')}",
            f"\tEnable                              (EN): {_yes(v & 1)}", ""]


CSTS_SHST = ("Normal operation (no shutdown has been requested)", "Shutdown processing occurring",
             "Shutdown processing complete", "Reserved")


def csts(v: int) -> list[str]:
    return [f"\tProcessing Paused               (PP): {_yes(v & 0x20)}",
            f"\tNVM Subsystem Reset Occurred (NSSRO): {_yes(v & 0x10)}",
            f"\tShutdown Status               (SHST): {CSTS_SHST[v >> 2 & 3]}",
            f"\tController Fatal Status        (CFS): {_yes(v & 2, 'True', 'False')}",
            f"\tReady                          (RDY): {_yes(v & 1)}", ""]


def crto(v: int) -> list[str]:
    return [f"\tCRIMT                               : {(v >> 16) // 2} secs",
            f"\tCRWMT                               : {(v & 0xFFFF) // 2} secs"]


def aqa(v: int) -> list[str]:
    return [f"\tAdmin Completion Queue Size (ACQS): {(v >> 16 & 0xFFF) + 1}",
            f"\tAdmin Submission Queue Size (ASQS): {(v & 0xFFF) + 1}", ""]


NO_CMB = ["\tController Memory Buffer feature is not supported", ""]
ENFORCED = ("Enforced", "Not Enforced")


def cmbloc(v: int, size: int) -> list[str]:
    if size == 0:
        return list(NO_CMB)
    return [f"\tOffset                                                        (OFST): {v >> 12:#x} "
            "(See cmbsz.szu for granularity)",
            f"\tCMB Queue Dword Alignment                                     (CQDA): {v >> 8 & 1}",
            f"\tCMB Data Metadata Mixed Memory Support                      (CDMMMS): {ENFORCED[v >> 7 & 1]}",
            f"\tCMB Data Pointer and Command Independent Locations Support (CDPCILS): {ENFORCED[v >> 6 & 1]}",
            f"\tCMB Data Pointer Mixed Locations Support                    (CDPMLS): {ENFORCED[v >> 5 & 1]}",
            f"\tCMB Queue Physically Discontiguous Support                   (CQPDS): {ENFORCED[v >> 4 & 1]}",
            f"\tCMB Queue Mixed Memory Support                               (CQMMS): {ENFORCED[v >> 3 & 1]}",
            f"\tBase Indicator Register                                        (BIR): {v & 7:#x}", ""]


SZU = ("4 KB", "64 KB", "1 MB", "16 MB", "256 MB", "4 GB", "64 GB")


def cmbsz(v: int) -> list[str]:
    if v == 0:
        return list(NO_CMB)
    sup = ("Not supported", "Supported")
    szu = v >> 8 & 0xF
    return [f"\tSize                      (SZ): {v >> 12}",
            f"\tSize Units               (SZU): {SZU[szu] if szu < len(SZU) else 'Reserved'}",
            "\tWrite Data Support       (WDS): Write Data and metadata transfer in Controller Memory Buffer is "
            + sup[v >> 4 & 1],
            "\tRead Data Support        (RDS): Read Data and metadata transfer in Controller Memory Buffer is "
            + sup[v >> 3 & 1],
            f"\tPRP SGL List Support   (LISTS): PRP/SG Lists in Controller Memory Buffer is {sup[v >> 2 & 1]}",
            "\tCompletion Queue Support (CQS): Admin and I/O Completion Queues in Controller Memory Buffer is "
            + sup[v >> 1 & 1],
            "\tSubmission Queue Support (SQS): Admin and I/O Submission Queues in Controller Memory Buffer is "
            + sup[v & 1], ""]


BPINFO_BRS = ("No Boot Partition read operation requested", "Boot Partition read in progress",
              "Boot Partition read completed successfully", "Error completing Boot Partition read")


def bpinfo(v: int) -> list[str]:
    return [f"\tActive Boot Partition ID      (ABPID): {v >> 31}",
            f"\tBoot Read Status                (BRS): {BPINFO_BRS[v >> 24 & 3]}",
            f"\tBoot Partition Size            (BPSZ): {v & 0x7FFF}"]


def bprsel(v: int) -> list[str]:
    return [f"\tBoot Partition Identifier      (BPID): {v >> 31}",
            f"\tBoot Partition Read Offset    (BPROF): {v >> 10 & 0xFFFFF:x}",
            f"\tBoot Partition Read Size      (BPRSZ): {v & 0x3FF:x}"]


def cmbmsc(v: int) -> list[str]:
    return [f"\tController Base Address         (CBA): {v >> 12:x}",
            f"\tController Memory Space Enable (CMSE): {v >> 1 & 1:x}",
            f"\tCapabilities Registers Enabled  (CRE): CMBLOC and CMBSZ registers are{_yes(v & 1, ' ', ' NOT ')}"
            "enabled", ""]


def pmrcap(v: int) -> list[str]:
    return ["\tController Memory Space Supported                   (CMSS): Referencing PMR with host supplied "
            f"addresses is {_yes(v >> 24 & 1, 'Supported', 'Not Supported')}",
            f"\tPersistent Memory Region Timeout                   (PMRTO): {v >> 16 & 0xFF:x}",
            f"\tPersistent Memory Region Write Barrier Mechanisms (PMRWBM): {v >> 10 & 0xF:x}",
            "\tPersistent Memory Region Time Units                (PMRTU): PMR time unit is "
            + _yes(v >> 8 & 3, "minutes", "500 milliseconds"),
            f"\tBase Indicator Register                              (BIR): {v >> 5 & 7:x}",
            "\tWrite Data Support                                   (WDS): Write data to the PMR is "
            + _yes(v & 0x10, "supported", "not supported"),
            "\tRead Data Support                                    (RDS): Read data from the PMR is "
            + _yes(v & 0x08, "supported", "not supported")]


PMR_HSTS = ("Normal Operation", "Restore Error", "Read Only", "Unreliable")
PMR_SZU = ("Bytes", "One KB", "One MB", "One GB")


def pmrsts(v: int, ctl: int) -> list[str]:
    hsts = v >> 9 & 7
    ready = "READY" if not v & 0x100 and ctl & 1 else "Not Ready"
    return [f"\tController Base Address Invalid (CBAI): {v >> 12 & 1:x}",
            f"\tHealth Status                   (HSTS): {PMR_HSTS[hsts] if hsts < 4 else 'Reserved'}",
            f"\tNot Ready                       (NRDY): The Persistent Memory Region is {ready} to process PCI Express "
            "memory read and write requests",
            f"\tError                            (ERR): {v & 0xFF:x}"]


def _pmr_szu(v: int) -> str:
    return PMR_SZU[v] if v < 4 else "Reserved"


def pmrebs(v: int) -> list[str]:
    return [f"\tPMR Elasticity Buffer Size Base  (PMRWBZ): {v >> 8:x}",
            "\tRead Bypass Behavior                     : memory reads not conflicting with memory writes in the PMR "
            f"Elasticity Buffer {_yes(v & 0x10, 'SHALL', 'MAY')} bypass those memory writes",
            f"\tPMR Elasticity Buffer Size Units (PMRSZU): {_pmr_szu(v & 0xF)}"]


def pmrswtp(v: int) -> list[str]:
    return [f"\tPMR Sustained Write Throughput       (PMRSWTV): {v >> 8:x}",
            f"\tPMR Sustained Write Throughput Units (PMRSWTU): {_pmr_szu(v & 0xF)}/second"]


def _cx(v: int) -> str:
    return f"{v:#x}" if v else "0"


def registers(r: dict[str, int | None]) -> list[str]:
    """nvme-cli 2.3's ``show-regs -H`` text (a PCIe controller) for the register values in ``r``."""
    out: list[str] = []

    def reg(label: str, name: str, fmt: str, body: list[str] | None = None) -> None:
        if name not in r:
            return
        v = r[name]
        if v is None:
            out.extend([f"{label}: {WITHHELD}", ""])
            return
        out.append(f"{label}: {format(v, fmt) if fmt else _cx(v)}")
        out.extend(body or [])

    def val(name: str) -> int:
        return r.get(name) or 0

    # CAP ... CRTO: nvme-cli leaves a register out when it reads all ones (32 bits)
    for label, name, body in (("cap     ", "cap", cap), ("version ", "vs", version), ("cc      ", "cc", cc),
                              ("csts    ", "csts", csts)):
        if r.get(name) != 0xFFFFFFFF:
            reg(label, name, "x", body(val(name)))
    if r.get("nssr") != 0xFFFFFFFF:
        reg("nssr    ", "nssr", "x", [f"\tNVM Subsystem Reset Control (NSSRC): {val('nssr')}", ""])
    if r.get("crto") != 0xFFFFFFFF:
        reg("crto    ", "crto", "x", crto(val("crto")))
    reg("intms   ", "intms", "x", [f"\tInterrupt Vector Mask Set (IVMS): {val('intms'):x}", ""])
    reg("intmc   ", "intmc", "x", [f"\tInterrupt Vector Mask Clear (IVMC): {val('intmc'):x}", ""])
    reg("aqa     ", "aqa", "x", aqa(val("aqa")))
    reg("asq     ", "asq", "x", [f"\tAdmin Submission Queue Base (ASQB): {val('asq'):x}", ""])
    reg("acq     ", "acq", "x", [f"\tAdmin Completion Queue Base (ACQB): {val('acq'):x}", ""])
    reg("cmbloc  ", "cmbloc", "x", cmbloc(val("cmbloc"), val("cmbsz")))
    reg("cmbsz   ", "cmbsz", "x", cmbsz(val("cmbsz")))
    reg("bpinfo  ", "bpinfo", "x", bpinfo(val("bpinfo")))
    reg("bprsel  ", "bprsel", "x", bprsel(val("bprsel")))
    reg("bpmbl   ", "bpmbl", "x", [f"\tBoot Partition Memory Buffer Base Address (BMBBA): {val('bpmbl'):x}"])
    reg("cmbmsc\t", "cmbmsc", "x", cmbmsc(val("cmbmsc")))
    reg("cmbsts\t", "cmbsts", "x", [f"\tController Base Address Invalid (CBAI): {val('cmbsts') & 1:x}", ""])
    reg("pmrcap  ", "pmrcap", "x", pmrcap(val("pmrcap")))
    reg("pmrctl  ", "pmrctl", "x", [f"\tEnable (EN): PMR is {_yes(val('pmrctl') & 1, 'READY', 'Disabled')}"])
    reg("pmrsts  ", "pmrsts", "x", pmrsts(val("pmrsts"), val("pmrctl")))
    reg("pmrebs  ", "pmrebs", "x", pmrebs(val("pmrebs")))
    reg("pmrswtp ", "pmrswtp", "x", pmrswtp(val("pmrswtp")))
    reg("pmrmscl\t", "pmrmscl", "", [f"\tController Base Address         (CBA): {_cx(val('pmrmscl') >> 12)}",
                                     f"\tController Memory Space Enable (CMSE): {_cx(val('pmrmscl') >> 1 & 1)}", ""])
    reg("pmrmscu\t", "pmrmscu", "", [f"\tController Base Address         (CBA): {_cx(val('pmrmscu'))}"])
    return out
