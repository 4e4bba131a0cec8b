"""NVMe data structures the controller returns: Identify Controller and Identify Namespace, the
active namespace list, the log pages (SMART / Health, Error Information, Firmware Slot, Sanitize
Status, Device Self-test), and an Asynchronous Event Request's completion decoded.

Field names of parsed structures follow nvme-cli's JSON output (``nvme id-ctrl -o json``).
Section numbers refer to the NVMe Base Specification 2.0 and NVM Command Set 1.0.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np


# ----------------------------------------------------------------- structure parsing
def _le(buf: bytes, lo: int, hi: int) -> int:
    return int.from_bytes(buf[lo:hi], "little")


def _ascii(buf: bytes, lo: int, hi: int) -> str:
    return buf[lo:hi].decode("ascii", "replace")


def _parse(buf: bytes, table: list[tuple[str, int, int, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, lo, hi, kind in table:
        if kind == "s":
            out[name] = _ascii(buf, lo, hi)
        elif kind == "hex":
            out[name] = buf[lo:hi].hex()
        elif kind == "hexrev":
            out[name] = buf[lo:hi][::-1].hex()
        elif kind == "uuid":
            out[name] = str(uuid.UUID(bytes=bytes(buf[lo:hi])))
        else:
            out[name] = _le(buf, lo, hi)
    return out


# Identify Controller data structure (Figure 275), in nvme-cli's field order and names.
ID_CTRL = [
    ("vid", 0, 2, "u"), ("ssvid", 2, 4, "u"), ("sn", 4, 24, "s"), ("mn", 24, 64, "s"), ("fr", 64, 72, "s"),
    ("rab", 72, 73, "u"), ("ieee", 73, 76, "u"), ("cmic", 76, 77, "u"), ("mdts", 77, 78, "u"),
    ("cntlid", 78, 80, "u"), ("ver", 80, 84, "u"), ("rtd3r", 84, 88, "u"), ("rtd3e", 88, 92, "u"),
    ("oaes", 92, 96, "u"), ("ctratt", 96, 100, "u"), ("rrls", 100, 102, "u"), ("cntrltype", 111, 112, "u"),
    ("fguid", 112, 128, "uuid"), ("crdt1", 128, 130, "u"), ("crdt2", 130, 132, "u"), ("crdt3", 132, 134, "u"),
    ("nvmsr", 253, 254, "u"), ("vwci", 254, 255, "u"), ("mec", 255, 256, "u"),
    ("oacs", 256, 258, "u"), ("acl", 258, 259, "u"), ("aerl", 259, 260, "u"), ("frmw", 260, 261, "u"),
    ("lpa", 261, 262, "u"), ("elpe", 262, 263, "u"), ("npss", 263, 264, "u"), ("avscc", 264, 265, "u"),
    ("apsta", 265, 266, "u"), ("wctemp", 266, 268, "u"), ("cctemp", 268, 270, "u"), ("mtfa", 270, 272, "u"),
    ("hmpre", 272, 276, "u"), ("hmmin", 276, 280, "u"), ("tnvmcap", 280, 296, "u"), ("unvmcap", 296, 312, "u"),
    ("rpmbs", 312, 316, "u"), ("edstt", 316, 318, "u"), ("dsto", 318, 319, "u"), ("fwug", 319, 320, "u"),
    ("kas", 320, 322, "u"), ("hctma", 322, 324, "u"), ("mntmt", 324, 326, "u"), ("mxtmt", 326, 328, "u"),
    ("sanicap", 328, 332, "u"), ("hmminds", 332, 336, "u"), ("hmmaxd", 336, 338, "u"),
    ("nsetidmax", 338, 340, "u"), ("endgidmax", 340, 342, "u"), ("anatt", 342, 343, "u"),
    ("anacap", 343, 344, "u"), ("anagrpmax", 344, 348, "u"), ("nanagrpid", 348, 352, "u"),
    ("pels", 352, 356, "u"), ("domainid", 356, 358, "u"), ("megcap", 368, 384, "u"),
    ("sqes", 512, 513, "u"), ("cqes", 513, 514, "u"), ("maxcmd", 514, 516, "u"), ("nn", 516, 520, "u"),
    ("oncs", 520, 522, "u"), ("fuses", 522, 524, "u"), ("fna", 524, 525, "u"), ("vwc", 525, 526, "u"),
    ("awun", 526, 528, "u"), ("awupf", 528, 530, "u"), ("icsvscc", 530, 531, "u"), ("nwpc", 531, 532, "u"),
    ("acwu", 532, 534, "u"), ("ocfs", 534, 536, "u"), ("sgls", 536, 540, "u"), ("mnan", 540, 544, "u"),
    ("maxdna", 544, 560, "u"), ("maxcna", 560, 564, "u"), ("subnqn", 768, 1024, "s"),
    ("ioccsz", 1792, 1796, "u"), ("iorcsz", 1796, 1800, "u"), ("icdoff", 1800, 1802, "u"),
    ("fcatt", 1802, 1803, "u"), ("msdbd", 1803, 1804, "u"), ("ofcs", 1804, 1806, "u"),
]
# Power State Descriptor (Figure 276), 32 bytes each from offset 2048.
PSD = [
    ("max_power", 0, 2, "u"), ("flags", 3, 4, "u"), ("entry_lat", 4, 8, "u"), ("exit_lat", 8, 12, "u"),
    ("read_tput", 12, 13, "u"), ("read_lat", 13, 14, "u"), ("write_tput", 14, 15, "u"),
    ("write_lat", 15, 16, "u"), ("idle_power", 16, 18, "u"), ("idle_scale", 18, 19, "u"),
    ("active_power", 20, 22, "u"), ("active_power_work", 22, 23, "u"), ("active_scale", 22, 23, "u"),
]


QEMU_VID = 0x1B36  # Identify Controller VID of QEMU's nvme model (its PCI vendor ID, Red Hat's)


def shadow_doorbells_pay(id_ctrl: dict[str, Any]) -> bool:
    """Shadow doorbells when the caller did not choose: on, except on QEMU's nvme model. There,
    once Doorbell Buffer Config is set, the device model DMA-reads the shadow SQ tail and writes
    the SQ EventIdx after every command it fetches and reads the shadow CQ head before every
    completion it posts, each through the emulated IOMMU in its one main-loop thread (the limit
    at depth), and it still needs the MMIO doorbell to notice a tail whenever it has caught up
    (it polls nothing), so a driver that rings once per batch writes as many MMIO doorbells
    with them as without: polled randread 4 KiB QD32 ran 0.87x as fast with them (3 boots), the
    C driver on libvfn 0.66x (docs/benchmarks.md, "Shadow doorbells"). Elsewhere an MMIO write
    is the costlier side (a VM exit on emulated controllers in the cloud, what the feature is for)."""
    return not (id_ctrl.get("vid") == QEMU_VID or str(id_ctrl.get("mn", "")).startswith("QEMU NVMe"))


def parse_identify_controller(buf: bytes) -> dict[str, Any]:
    if len(buf) < 4096:
        raise ValueError(f"Identify Controller data is 4096 bytes, got {len(buf)}")
    out = _parse(buf, ID_CTRL)
    out["subnqn"] = out["subnqn"].rstrip("\x00")
    psds = []
    for i in range(out["npss"] + 1):
        ps = _parse(buf[2048 + 32 * i : 2048 + 32 * (i + 1)], PSD)
        ps["idle_scale"] = (ps["idle_scale"] >> 6) & 3
        ps["active_scale"] = (ps["active_scale"] >> 6) & 3
        ps["active_power_work"] &= 7
        ps["read_tput"] &= 0x1F
        ps["read_lat"] &= 0x1F
        ps["write_tput"] &= 0x1F
        ps["write_lat"] &= 0x1F
        psds.append(ps)
    out["psds"] = psds
    return out


# Identify Namespace data structure, NVM command set (NVM Command Set spec, Figure 97).
ID_NS = [
    ("nsze", 0, 8, "u"), ("ncap", 8, 16, "u"), ("nuse", 16, 24, "u"), ("nsfeat", 24, 25, "u"),
    ("nlbaf", 25, 26, "u"), ("flbas", 26, 27, "u"), ("mc", 27, 28, "u"), ("dpc", 28, 29, "u"),
    ("dps", 29, 30, "u"), ("nmic", 30, 31, "u"), ("rescap", 31, 32, "u"), ("fpi", 32, 33, "u"),
    ("dlfeat", 33, 34, "u"), ("nawun", 34, 36, "u"), ("nawupf", 36, 38, "u"), ("nacwu", 38, 40, "u"),
    ("nabsn", 40, 42, "u"), ("nabo", 42, 44, "u"), ("nabspf", 44, 46, "u"), ("noiob", 46, 48, "u"),
    ("nvmcap", 48, 64, "u"), ("nsattr", 99, 100, "u"), ("nvmsetid", 100, 102, "u"),
    ("npwg", 64, 66, "u"), ("npwa", 66, 68, "u"), ("npdg", 68, 70, "u"), ("npda", 70, 72, "u"),
    ("nows", 72, 74, "u"), ("mssrl", 74, 76, "u"), ("mcl", 76, 80, "u"), ("msrc", 80, 81, "u"),
    ("nulbaf", 82, 83, "u"), ("anagrpid", 92, 96, "u"), ("endgid", 102, 104, "u"),  # NULBAF: byte 82 (NVM 1.1)
    ("eui64", 120, 128, "hex"), ("nguid", 104, 120, "hex"),
]


def parse_identify_namespace(buf: bytes) -> dict[str, Any]:
    if len(buf) < 4096:
        raise ValueError(f"Identify Namespace data is 4096 bytes, got {len(buf)}")
    out = _parse(buf, ID_NS)
    lbafs = []
    for i in range(out["nlbaf"] + 1):
        d = _le(buf, 128 + 4 * i, 132 + 4 * i)
        lbafs.append({"ms": d & 0xFFFF, "ds": (d >> 16) & 0xFF, "rp": (d >> 24) & 0x3})
    out["lbafs"] = lbafs
    return out


def elbaf_pif(buf: bytes, index: int) -> int:
    """The Protection Information Format of LBA format ``index`` (0 16-bit guard, 1 32-bit, 2 64-bit):
    ELBAF bits 8:7 in the NVM Command Set's Identify Namespace (CNS 05h CSI 00h; NVM Command Set
    1.0, 4.1.5.2: LBSTM bytes 7:0, PIC byte 8, ELBAF0 from byte 12, four bytes each)."""
    start = 12 + 4 * index
    if len(buf) < start + 4:
        raise ValueError(f"the NVM Command Set Identify Namespace has no ELBAF {index}")
    return (int.from_bytes(buf[start : start + 4], "little") >> 7) & 0x3


def flbas_index(flbas: int, nlbaf: int) -> int:
    """The LBA format in use: FLBAS bits 3:0, plus bits 6:5 as high bits when NLBAF > 16."""
    low = flbas & 0xF
    return low | (((flbas >> 5) & 0x3) << 4) if nlbaf >= 16 else low


def parse_active_namespaces(buf: bytes) -> list[int]:
    ids = np.frombuffer(bytes(buf[:4096]), dtype="<u4")
    nz = ids[ids != 0]
    return [int(x) for x in nz]


# SMART / Health Information log (Figure 207); 128-bit counters become ints.
SMART = [
    ("critical_warning", 0, 1, "u"), ("temperature", 1, 3, "u"), ("avail_spare", 3, 4, "u"),
    ("spare_thresh", 4, 5, "u"), ("percent_used", 5, 6, "u"),
    ("endurance_grp_critical_warning_summary", 6, 7, "u"),
    ("data_units_read", 32, 48, "u"), ("data_units_written", 48, 64, "u"),
    ("host_read_commands", 64, 80, "u"), ("host_write_commands", 80, 96, "u"),
    ("controller_busy_time", 96, 112, "u"), ("power_cycles", 112, 128, "u"),
    ("power_on_hours", 128, 144, "u"), ("unsafe_shutdowns", 144, 160, "u"),
    ("media_errors", 160, 176, "u"), ("num_err_log_entries", 176, 192, "u"),
    ("warning_temp_time", 192, 196, "u"), ("critical_comp_time", 196, 200, "u"),
] + [(f"temperature_sensor_{i + 1}", 200 + 2 * i, 202 + 2 * i, "u") for i in range(8)] + [
    ("thm_temp1_trans_count", 216, 220, "u"), ("thm_temp2_trans_count", 220, 224, "u"),
    ("thm_temp1_total_time", 224, 228, "u"), ("thm_temp2_total_time", 228, 232, "u"),
]


def parse_smart_log(buf: bytes) -> dict[str, Any]:
    return _parse(buf, SMART)


ERROR_ENTRY = [
    ("error_count", 0, 8, "u"), ("sqid", 8, 10, "u"), ("cmdid", 10, 12, "u"), ("status_field", 12, 14, "u"),
    ("parm_error_location", 14, 16, "u"), ("lba", 16, 24, "u"), ("nsid", 24, 28, "u"), ("vs", 28, 29, "u"),
    ("trtype", 29, 30, "u"), ("cs", 32, 40, "u"), ("trtype_spec_info", 40, 42, "u"),
]


def parse_error_log(buf: bytes) -> list[dict[str, Any]]:
    entries = []
    for i in range(len(buf) // 64):
        e = _parse(buf[64 * i : 64 * (i + 1)], ERROR_ENTRY)
        e["phase_tag"] = e["status_field"] & 1
        e["status_field"] >>= 1
        entries.append(e)
    return entries


def parse_firmware_log(buf: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"afi": buf[0]}
    for i in range(7):
        raw = bytes(buf[8 + 8 * i : 16 + 8 * i])
        out[f"frs{i + 1}"] = raw.decode("ascii", "replace") if any(raw) else ""
    return out


# Sanitize Status log page (81h, Figure 291): SSTAT bits 2:0 status of the most recent
# sanitize, 7:3 overwrite passes completed, bit 8 Global Data Erased. nvme-cli's JSON names.
SANITIZE_LOG = [
    ("sprog", 0, 2, "u"), ("sstat", 2, 4, "u"), ("cdw10_info", 4, 8, "u"), ("time_over_write", 8, 12, "u"),
    ("time_block_erase", 12, 16, "u"), ("time_crypto_erase", 16, 20, "u"),
    ("time_over_write_no_dealloc", 20, 24, "u"), ("time_block_erase_no_dealloc", 24, 28, "u"),
    ("time_crypto_erase_no_dealloc", 28, 32, "u"),
]
SANITIZE_STATUS = {0: "NVM Subsystem has never been sanitized.",
                   1: "Most Recent Sanitize Command Completed Successfully.",
                   2: "Sanitize in Progress.",
                   3: "Most Recent Sanitize Command Failed.",
                   4: "Most Recent Sanitize Command (No-Deallocate After Sanitize) Completed Successfully."}


def parse_sanitize_log(buf: bytes) -> dict[str, Any]:
    """The Sanitize Status log as nvme-cli's ``sanitize-log -o json`` shows one device."""
    raw = _parse(buf, SANITIZE_LOG)
    sstat = raw.pop("sstat")
    status = sstat & 0x7
    return {"sprog": raw.pop("sprog"),
            "sstat": {"global_erased": (sstat >> 8) & 1, "no_cmplted_passes": (sstat >> 3) & 0x1F,
                      "status": f"({status}) {SANITIZE_STATUS.get(status, 'Unknown')}"},
            **raw}


# Device Self-test log page (06h, Figure 284): byte 0 the current operation, byte 1 its
# completion (%), then 20 results of 28 bytes, newest first. nvme-cli's JSON names.
SELF_TEST_RESULTS = 20
SELF_TEST_RESULT = [
    ("dsts", 0, 1, "u"), ("Segment number", 1, 2, "u"), ("Valid Diagnostic Information", 2, 3, "u"),
    ("Power on hours", 4, 12, "u"), ("Namespace Identifier", 12, 16, "u"), ("Failing LBA", 16, 24, "u"),
    ("Status Code Type", 24, 25, "u"), ("Status Code", 25, 26, "u"), ("Vendor Specific", 26, 28, "u"),
]
# the optional fields, each with the Valid Diagnostic Information bit that says it holds a value
SELF_TEST_OPTIONAL = (("Namespace Identifier", 1), ("Failing LBA", 2), ("Status Code Type", 4), ("Status Code", 8))


def parse_self_test_log(buf: bytes, entries: int = SELF_TEST_RESULTS) -> dict[str, Any]:
    """The Device Self-test log as nvme-cli's ``self-test-log -o json`` shows it: a result of
    0xF (entry not used) carries nothing else, optional fields only where VDI says so."""
    reports = []
    for i in range(min(entries, SELF_TEST_RESULTS)):
        r = _parse(buf[4 + 28 * i : 32 + 28 * i], SELF_TEST_RESULT)
        r["Status Code Type"] &= 0x7
        report: dict[str, Any] = {"Self test result": r["dsts"] & 0xF}
        if r["dsts"] & 0xF != 0xF:
            vdi = r["Valid Diagnostic Information"]
            report["Self test code"] = r["dsts"] >> 4
            for name in ("Segment number", "Valid Diagnostic Information", "Power on hours"):
                report[name] = r[name]
            report.update((name, r[name]) for name, bit in SELF_TEST_OPTIONAL if vdi & bit)
            report["Vendor Specific"] = r["Vendor Specific"]
        reports.append(report)
    return {"Current Device Self-Test Operation": buf[0] & 0xF, "Current Device Self-Test Completion": buf[1] & 0x7F,
            "List of Valid Reports": reports}


# ---------------------------------------------------------------- Asynchronous Events (5.2)
# Completion DW0 of an Asynchronous Event Request (Figure 149): bits 2:0 Asynchronous Event
# Type, 15:8 Asynchronous Event Information, 23:16 Log Page Identifier.
AER_TYPE_NAMES = {0: "Error status", 1: "SMART / Health status", 2: "Notice", 6: "I/O Command specific status",
                  7: "Vendor specific"}
AER_INFO_NAMES = {
    0: {0: "Write to Invalid Doorbell Register", 1: "Invalid Doorbell Write Value", 2: "Diagnostic Failure",
        3: "Persistent Internal Error", 4: "Transient Internal Error", 5: "Firmware Image Load Error"},
    1: {0: "NVM subsystem Reliability", 1: "Temperature Threshold", 2: "Spare Below Threshold"},
    2: {0: "Namespace Attribute Changed", 1: "Firmware Activation Starting", 2: "Telemetry Log Changed",
        3: "Asymmetric Namespace Access Change", 4: "Predictable Latency Event Aggregate Log Change",
        5: "LBA Status Information Alert", 6: "Endurance Group Event Aggregate Log Page Change",
        7: "Normal NVM Subsystem Shutdown", 0xF0: "Discovery Log Page Change"},
    6: {0: "Reservation Log Page Available", 1: "Sanitize Operation Completed",
        2: "Sanitize Operation Completed With Unexpected Deallocation"},
}
AER_TYPE_NOTICE, AER_INFO_NS_ATTR_CHANGED = 2, 0
LOG_PAGE_NAMES = {0x01: "Error Information", 0x02: "SMART / Health Information", 0x03: "Firmware Slot Information",
                  0x04: "Changed Namespace List", 0x05: "Commands Supported and Effects", 0x06: "Device Self-test",
                  0x07: "Telemetry Host-Initiated", 0x08: "Telemetry Controller-Initiated",
                  0x0C: "Asymmetric Namespace Access", 0x0D: "Persistent Event Log",
                  0x80: "Reservation Notification", 0x81: "Sanitize Status"}
# bytes to read of the log page an event names (the error log: 64 bytes an entry, ELPE+1 entries)
AER_LOG_BYTES = {0x02: 512, 0x03: 512, 0x04: 4096, 0x80: 64, 0x81: 512}
# Asynchronous Event Configuration (Set Features 0Bh, Figure 316): SMART/health critical
# warnings in bits 7:0 (the five the spec defines), notices in bits 31:8 as OAES offers them.
AEC_SMART_WARNINGS = 0x1F
AEC_NOTICES_FROM_OAES = 0x7F00  # namespace attribute, firmware activation, telemetry, ANA, PLEA, LBA status, EGEA


def split_async_event(dw0: int) -> tuple[int, int, int]:
    """(type, information, log page identifier) of an Asynchronous Event Request's DW0."""
    return dw0 & 0x7, (dw0 >> 8) & 0xFF, (dw0 >> 16) & 0xFF


def async_event_names(dw0: int) -> tuple[str, str, str]:
    """Names of an event's type, information and log page, as the specification gives them."""
    t, info, lid = split_async_event(dw0)
    return (AER_TYPE_NAMES.get(t, f"Reserved ({t})"),
            AER_INFO_NAMES.get(t, {}).get(info, f"Vendor specific ({info:#04x})" if t == 7 or info >= 0xF0
                                          else f"Reserved ({info:#04x})"),
            LOG_PAGE_NAMES.get(lid, f"Vendor specific ({lid:#04x})" if lid >= 0xC0 else f"Log page {lid:#04x}"))


def async_event_log_bytes(lid: int, elpe: int) -> int:
    """How much of the log page an event names the host reads (which clears the event, RAE=0)."""
    if lid == 0x01:
        return 64 * (min(elpe, 63) + 1)
    return AER_LOG_BYTES.get(lid, 512)
