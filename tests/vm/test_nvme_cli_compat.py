"""A script written the way nvme-cli users write them, with nvme-cli's spellings, run on the same
controller twice: nvme-cli 2.3 on the kernel driver, then nvmevfio on vfio-pci. Same data, the same
JSON (the fields both have), the same exit codes (nvme-cli's: 1 for any failure, a refusal by name
included), the same -H text (id-ctrl, id-ns, show-regs: nvme-cli 2.3's words and layout), and
the differences docs/nvme-cli.md names. nvmevfio's commands run in this
process through the script's ``nvmevfio`` function (cli_runner.shell_nvmevfio): one Python, many
commands; one of them (``sanitize``) also as a real process for its real exit status."""

import difflib
import json
import re
import subprocess
import sys

import numpy as np
from cli_runner import SHELL_FUNCTION, shell_nvmevfio
from conftest import controller, kernel_blockdev

from nvmevfio import pci
from nvmevfio.cli import human, human_features, human_regs

# $NVME is nvme or nvmevfio; $CTRL the controller (/dev/nvme0 or its address), $NS a namespace
# (/dev/nvme0n1, or the address: nvmevfio's -n defaults to 1). Each step: NAME.out, NAME.err, NAME.rc.
SCRIPT = r"""
set -u
run() { name=$1; shift; "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"; echo $? > "$OUT/$name.rc"; }
run write       $NVME write $NS --start-block=100 --block-count=7 --data-size=4096 --data=$DATA
run read        $NVME read $NS --start-block=100 --block-count=7 --data-size=4096 --data=$OUT/read.bin
run read-short  $NVME read $NS -s 100 -c 7 -z 512 -d $OUT/read-short.bin
run compare     $NVME compare $NS -s 100 -c 7 -z 4096 -d $DATA
run compare-bad $NVME compare $NS -s 0x64 -c 7 -z 4096 -d $ZEROS
run verify      $NVME verify $NS -s 100 -c 7
run copy        $NVME copy $NS --sdlba=300 --slbs=100,104 --blocks=1,0
run read-copy   $NVME read $NS -s 300 -c 2 -z 1536 -d $OUT/read-copy.bin
run write-fua   $NVME write $NS -s 200 -c 7 -z 4096 -d $DATA --force-unit-access --limited-retry --dsm=0x7
run read-fua    $NVME read $NS -s 200 -c 7 -z 4096 -d $OUT/read-fua.bin -f -l -D 1 -C
run compare-fua $NVME compare $NS -s 200 -c 7 -z 4096 -d $DATA -f
run verify-fua  $NVME verify $NS -s 200 -c 7 -l -f
run zeroes-fua  $NVME write-zeroes $NS -s 204 -c 3 -f -l
run read-fua-zeros $NVME read $NS -s 200 -c 7 -z 4096 -d $OUT/read-fua-zeros.bin
run storage-tag $NVME read $NS -s 0 -c 0 -z 512 -g 1 -d $OUT/storage-tag.bin
run directive   $NVME write $NS -s 400 -c 0 -z 512 -d $DATA -T 1 -S 1
run flush       $NVME flush $NS
run zeroes      $NVME write-zeroes $NS -s 100 -c 3
run dsm         $NVME dsm $NS --slbs=104 --blocks=4 --ad
run read-zeros  $NVME read $NS -s 100 -c 7 -z 4096 -d $OUT/read-zeros.bin
run id-ctrl-v   $NVME id-ctrl $CTRL -v
run id-ctrl-H   $NVME id-ctrl $CTRL -H
run id-ctrl     $NVME id-ctrl $CTRL -o json
run id-ns       $NVME id-ns $NS -o json
run id-ns-H     $NVME id-ns $NS -H
run regs-H      $NVME show-regs $CTRL -H
run regs-json   $NVME show-regs $CTRL -o json
run list-ns     $NVME list-ns $CTRL -o json
run ns-descs    $NVME ns-descs $CTRL -n 1 -o json
run feature-4   $NVME get-feature $CTRL -f 0x04 -H
run feature-6   $NVME get-feature $CTRL --feature-id=0x06 -H
run feature-bad $NVME get-feature $CTRL -f 0x55
run feature-0b  $NVME get-feature $CTRL -f 0x0b -H
run feature-0e  $NVME get-feature $CTRL -f 0x0e -H
run feature-16  $NVME get-feature $CTRL -f 0x16 -H
run feature-16-dump $NVME get-feature $CTRL -f 0x16
run feature-19  $NVME get-feature $CTRL -f 0x19 -H
run feature-sel $NVME get-feature $CTRL -f 0x06 -s 3
run feature-0c  $NVME get-feature $CTRL -f 0x0c -H
run feature-changed $NVME get-feature $CTRL -f 0x04 -s 8 -H
run feature-0b-changed $NVME get-feature $CTRL -f 0x0b -s 8
run feature-sel5 $NVME get-feature $CTRL -f 0x06 -s 5
run feature-all $NVME get-feature $CTRL
run smart       $NVME smart-log $CTRL -n 0xffffffff -o json
run error-log   $NVME error-log $CTRL -e 1 -o json
run fw-log      $NVME fw-log $CTRL -o json
run sanitize-log   $NVME sanitize-log $CTRL -o json
run self-test-log  $NVME self-test-log $CTRL -o json
run sanitize    $NVME sanitize $CTRL -a 2
run self-test   $NVME device-self-test $CTRL -s 1
run fw-commit   $NVME fw-commit $CTRL -s 1 -a 1
run fw-download $NVME fw-download $CTRL --fw=$DATA --xfer=0x1000
run write-uncor $NVME write-uncor $NS -s 500 -c 0
run lba-status  $NVME get-lba-status $CTRL -n 1 -s 0 -m 15 -a 2
run usage       $NVME read $NS --no-such-option
run bad-number  $NVME read $NS -s 0 -c zz -z 512
run format      $NVME format $NS --lbaf=0 --force
run read-formatted $NVME read $NS -s 100 -c 0 -z 512 -d $OUT/read-formatted.bin
run subsys-reset   $NVME subsystem-reset $CTRL
"""
STEPS = [line.split()[1] for line in SCRIPT.splitlines() if line.startswith("run ")]
# nvmevfio's refusals before the device, by name on stderr, where nvme-cli fails too (the same exit status, 1)
REFUSED_BY_NAME = {"subsys-reset": "reset-kind-unavailable", "storage-tag": "storage-tag-unsupported"}
# nvmevfio refuses by name what nvme-cli sends and QEMU 7.2 ignores: a directive, without Directives (OACS bit 5)
REFUSED_WHERE_NVME_CLI_SENDS = {"directive": "directives-unsupported"}


def run_script(out, env):
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["sh", "-c", SHELL_FUNCTION + SCRIPT], env={**env, "OUT": str(out)}, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return {s: (int((out / f"{s}.rc").read_text()), (out / f"{s}.out").read_bytes(), (out / f"{s}.err").read_text())
            for s in STEPS}


def test_an_nvme_cli_script_runs_alike_on_nvmevfio(guest, io_dir):
    addr = controller(guest, "nvmevfio-nbd")["address"]  # throwaway contents (test_nbd formats it anyway)
    data = np.random.default_rng(30).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (io_dir / "compat-data.bin").write_bytes(data)
    (io_dir / "compat-zeros.bin").write_bytes(bytes(4096))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DATA": str(io_dir / "compat-data.bin"),
           "ZEROS": str(io_dir / "compat-zeros.bin")}
    ns = kernel_blockdev(addr)
    try:
        theirs = run_script(io_dir / "compat-nvme-cli", {**env, "NVME": "nvme", "CTRL": ns[:-2], "NS": ns})
    finally:
        pci.bind(addr, force=True)
    with shell_nvmevfio() as fifo:
        ours = run_script(io_dir / "compat-nvmevfio", {**env, **fifo, "NVME": "nvmevfio", "CTRL": addr, "NS": addr})
    real = subprocess.run([sys.executable, "-m", "nvmevfio", "sanitize", addr, "-a", "2"], capture_output=True,
                          text=True, timeout=300)

    # the same exit status, step by step (nvme-cli's main: err ? 1 : 0, whatever the failure)
    codes = {s: (ours[s][0], theirs[s][0]) for s in STEPS if s not in REFUSED_WHERE_NVME_CLI_SENDS}
    assert {s: c for s, c in codes.items() if c[0] != c[1]} == {}, codes
    assert {s: c[0] for s, c in codes.items() if c[0]} == {
        "compare-bad": 1, "feature-bad": 1, "feature-0c": 1, "sanitize-log": 1, "self-test-log": 1, "sanitize": 1,
        "self-test": 1, "fw-commit": 1, "write-uncor": 1, "lba-status": 1, "usage": 1, "bad-number": 1,
        "subsys-reset": 1, "storage-tag": 1, "feature-all": 1, "fw-download": 1,
        "regs-json": 1}, codes  # QEMU 7.2's model; show-regs -o json: nvme-cli 2.3 returns the format's flag
    assert real.returncode == theirs["sanitize"][0] == 1 and "Invalid Command Opcode" in real.stderr
    for s, reason in REFUSED_BY_NAME.items():
        assert theirs[s][0] == ours[s][0] == 1 and f"[{reason}]" in ours[s][2], (theirs[s], ours[s])
    for s, reason in REFUSED_WHERE_NVME_CLI_SENDS.items():
        assert (theirs[s][0], ours[s][0]) == (0, 1) and f"[{reason}]" in ours[s][2], (theirs[s], ours[s])
    for s in ("compare-bad", "sanitize", "self-test", "fw-commit", "write-uncor", "lba-status", "feature-bad",
              "feature-0c"):
        assert "Traceback" not in ours[s][2] and ours[s][2].count("\n") == 1, ours[s]  # one line: the status name
    assert "Compare Failure" in ours["compare-bad"][2] and "Invalid Command Opcode" in ours["sanitize"][2]
    assert all("Invalid Field in Command" in ours[s][2] for s in ("feature-bad", "feature-0c"))
    for s in ("sanitize-log", "self-test-log"):  # decoded with nvme-cli's names where this QEMU has the page
        if ours[s][0]:
            assert "Invalid" in ours[s][2] and "Traceback" not in ours[s][2], ours[s]
    if not ours["sanitize-log"][0]:
        d = json.loads(ours["sanitize-log"][1])[addr]
        assert set(d) >= {"sprog", "sstat", "cdw10_info", "time_over_write"} and "status" in d["sstat"]
    if not ours["self-test-log"][0]:
        assert "Current Device Self-Test Operation" in json.loads(ours["self-test-log"][1])

    # the same data: written, read (--data-size bytes of it), copied, zeroed, deallocated, formatted
    out_o, out_t = io_dir / "compat-nvmevfio", io_dir / "compat-nvme-cli"
    for f in ("read.bin", "read-short.bin", "read-copy.bin", "read-zeros.bin", "read-formatted.bin", "read-fua.bin",
              "read-fua-zeros.bin"):
        assert (out_o / f).read_bytes() == (out_t / f).read_bytes(), f
    assert (out_o / "read-fua.bin").read_bytes() == data  # written and read with FUA, LR, the DSM hints, STC
    assert (out_o / "read-fua-zeros.bin").read_bytes() == data[:2048] + bytes(2048)
    assert (out_o / "read.bin").read_bytes() == data and (out_o / "read-short.bin").read_bytes() == data[:512]
    assert (out_o / "read-copy.bin").read_bytes() == data[:1024] + data[2048:2560]
    assert (out_o / "read-zeros.bin").read_bytes() == bytes(4096)  # Write Zeroes, then DSM deallocate (DLFEAT=1)
    for s in ("write", "read", "compare"):
        assert ours[s][2].strip() == theirs[s][2].strip() == f"{s}: Success"
        assert ours[f"{s}-fua"][2].strip() == theirs[f"{s}-fua"][2].strip() == f"{s}: Success"
    for s in ("verify", "flush", "zeroes", "dsm", "copy", "format", "verify-fua", "zeroes-fua"):
        assert ours[s][1] == theirs[s][1], s  # "NVME Verify Success", "NVMe DSM: success", ...

    # the same JSON: every field nvme-cli reports, with its value (counters that move aside)
    def js(side, s):
        return json.loads(side[s][1])

    k_ctrl, o_ctrl = js(theirs, "id-ctrl"), js(ours, "id-ctrl")
    assert len(k_ctrl) > 80 and {k: (o_ctrl.get(k), v) for k, v in k_ctrl.items() if o_ctrl.get(k) != v} == {}
    k_ns, o_ns = js(theirs, "id-ns"), js(ours, "id-ns")
    assert len(k_ns) > 35 and {k: (o_ns.get(k), v) for k, v in k_ns.items() if o_ns.get(k) != v} == {}
    for s in ("list-ns", "ns-descs", "error-log"):
        assert js(ours, s) == js(theirs, s), s
    fw_o, fw_t = js(ours, "fw-log"), js(theirs, "fw-log")
    assert list(fw_o.values()) == list(fw_t.values()) and fw_o[addr]["Active Firmware Slot (afi)"] == 1
    k_smart, o_smart = js(theirs, "smart"), js(ours, "smart")
    moving = {"data_units_read", "data_units_written", "host_read_commands", "host_write_commands",
              "power_cycles", "unsafe_shutdowns", "controller_busy_time", "power_on_hours"}
    assert set(o_smart) == set(k_smart)
    assert {k: (o_smart[k], v) for k, v in k_smart.items() if k not in moving and o_smart[k] != v} == {}
    assert all(type(o_smart[k]) is type(k_smart[k]) for k in k_smart)

    # the same text: every block id-ctrl -H and id-ns -H decode (the field's line and the lines under it,
    # up to the next line that starts with a letter), id-ns -H's LBA format lines
    def block(text, field, width):
        lines = text.decode().splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{field:<{width}}:"))
        end = next(i for i in range(at + 1, len(lines)) if lines[i][:1].isalpha())
        return lines[at:end]

    differ = {}
    for step, fields, width in (("id-ctrl-H", ("vid", "mdts", *human.ID_CTRL), 10), ("id-ns-H", human.ID_NS, 8)):
        for field in fields:
            o, t = block(ours[step][1], field, width), block(theirs[step][1], field, width)
            if o != t:
                differ[f"{step} {field}"] = (o, t)

    def power_states(text):
        lines = text.decode().splitlines()
        return lines[next(i for i, line in enumerate(lines) if line.startswith("ps ")):]

    if power_states(ours["id-ctrl-H"][1]) != power_states(theirs["id-ctrl-H"][1]):
        differ["id-ctrl-H power states"] = (power_states(ours["id-ctrl-H"][1]), power_states(theirs["id-ctrl-H"][1]))
    for step in ("id-ctrl-H", "id-ns-H"):  # and the whole text, line for line (the values are the JSON's, equal)
        diff = [line for line in difflib.unified_diff(theirs[step][1].decode().splitlines(),
                                                      ours[step][1].decode().splitlines(), lineterm="", n=0)
                if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        if diff:
            differ[f"{step} whole text (- nvme-cli, + nvmevfio)"] = diff

    def lbafs(text):
        return [line for line in text.decode().splitlines() if line.startswith("LBA Format")]

    if lbafs(ours["id-ns-H"][1]) != lbafs(theirs["id-ns-H"][1]):
        differ["id-ns-H LBA formats"] = (lbafs(ours["id-ns-H"][1]), lbafs(theirs["id-ns-H"][1]))

    # show-regs -H: nvme-cli reads the registers of a controller the kernel runs; nvmevfio's show-regs
    # reads them with no queues of its own (enable=False, after the last command's shutdown). What the
    # controller is (CAP, VS, NSSR, CRTO, the CMB, boot partition and PMR registers) must read the same,
    # text for text. What the driver made of it (CC, CSTS, AQA, ASQ, ACQ, INTMS, INTMC: enabled or shut
    # down, the queue sizes and addresses, the interrupt mask) differs in value, fairly: for those the
    # decoded layout must match, each line's name up to its first colon.
    def regs(text):
        out, name = {}, None
        for line in text.decode().splitlines():
            if line[:1].isalpha():
                name = line.split(":")[0].strip()
                out[name] = []
            out[name].append(line)
        return out

    driver_state = {"cc", "csts", "aqa", "asq", "acq", "intms", "intmc"}
    r_o, r_t = regs(ours["regs-H"][1]), regs(theirs["regs-H"][1])
    if list(r_o) != list(r_t) or len(r_t) < 24:
        differ["regs-H registers"] = (list(r_o), list(r_t), theirs["regs-H"][0], theirs["regs-H"][2])
    for name, lines in r_t.items():
        if name not in r_o or human_regs.WITHHELD in r_o[name][0]:
            continue  # the no-IOMMU lane's ASQ/ACQ/BPMBL: physical addresses, never shown (NVMEVFIO_VM_ALL_LANES)
        if name in driver_state:
            o, t = [line.split(":")[0] for line in r_o[name]], [line.split(":")[0] for line in lines]
        else:
            o, t = r_o[name], lines
        if o != t:
            differ[f"regs-H {name}"] = (o, t)
    assert differ == {}, differ
    assert len(block(ours["id-ctrl-H"][1], "oncs", 10)) == 11  # decoded bit by bit, and the blank line
    assert "(in use)" in "".join(lbafs(ours["id-ns-H"][1])) and "Interrupt Vector Mask Set" in r_o["intms"][1]

    def dump(text):
        return [line for line in text.decode().splitlines() if line[:4].isalnum() and line[4:6] == ": "]

    assert dump(ours["id-ctrl-v"][1]) == dump(theirs["id-ctrl-v"][1]) and len(dump(theirs["id-ctrl-v"][1])) == 64
    # get-feature: the header, -H's decode (data buffers read as nvme-cli reads them: Timestamp's 8 bytes,
    # Host Behavior's 512), the hex dump without -H, the capabilities for -s 3. Async Event Configuration
    # is the driver's (the kernel enables Namespace Attribute notices, nvmevfio's broker the SMART ones
    # too): nvme-cli's text must be nvmevfio's decode of nvme-cli's value, and the lines' names match.
    # The timestamp moves, so its number and date are compared by shape
    feats = {}
    for s in ("feature-4", "feature-6", "feature-16", "feature-16-dump", "feature-19", "feature-sel", "feature-changed",
              "feature-sel5"):
        if ours[s][1] != theirs[s][1]:
            feats[s] = (ours[s][1], theirs[s][1])
    aec_o, aec_t = ours["feature-0b"][1].decode(), theirs["feature-0b"][1].decode()
    value_t = int(aec_t.splitlines()[0].rsplit(":", 1)[1], 16)
    if aec_t.split("\n", 1)[1] != human_features.feature_text(0x0B, value_t) or len(aec_t.splitlines()) != 10 or (
            [line.split(":")[0] for line in aec_o.splitlines()] != [line.split(":")[0] for line in aec_t.splitlines()]):
        feats["feature-0b"] = (aec_o, aec_t)
    # Timestamp: the kernel sets it (Set Features, measured), nvmevfio does not, so after nvmevfio's reset
    # the controller counts from 0: the number, the date and the origin line are the driver's, by shape
    stamp = re.compile(r"^\tThe timestamp is : \d+ \(.+\)$", re.M)
    origin = re.compile(r"^\tThe Timestamp field was initialized (with a Timestamp value using a Set Features "
                        r"command|to \u20180\u2019 by a Controller Level Reset)\.$", re.M)
    ts_o, ts_t = ours["feature-0e"][1].decode(), theirs["feature-0e"][1].decode()
    shape_o, shape_t = origin.sub("", stamp.sub("", ts_o)), origin.sub("", stamp.sub("", ts_t))
    if not (len(stamp.findall(ts_o)) == len(stamp.findall(ts_t)) == len(origin.findall(ts_o))
            == len(origin.findall(ts_t)) == 1 and shape_o == shape_t):
        feats["feature-0e"] = (ts_o, ts_t)
    assert feats == {}, feats
    assert ts_o.count("\n") == 4 and "Behavior Support: " in ours["feature-16"][1].decode()
    # -s 8: Async Event Configuration is the driver's, changed from its default by both drivers (the header
    # the same up to the value); every feature (no -f): the same features shown, in order, and the same end
    def headers(text):
        return [line.split(" value:")[0] for line in text.decode().splitlines() if line.startswith("get-feature:")]

    assert headers(ours["feature-0b-changed"][1]) == headers(theirs["feature-0b-changed"][1]) == [
        "get-feature:0x0b (Async Event Configuration), Changed"]
    # every feature (no -f): QEMU 7.2 answers feature 0 with Invalid Field and DNR, and nvme-cli 2.3 (which
    # skips only Invalid Field without DNR) stops there: nothing shown, the status, exit 1; nvmevfio the same
    assert ours["feature-all"][1] == theirs["feature-all"][1] == b"", (ours["feature-all"], theirs["feature-all"])
    assert "Invalid Field in Command" in ours["feature-all"][2] and ours["feature-all"][2].count("\n") == 1
    assert b"Reserved value:" in ours["feature-sel5"][1]  # -s 5 sent as given: QEMU 7.2 answers it
    # fw-download: QEMU 7.2 has no Firmware Image Download; nvme-cli's first line names the piece, and so does ours
    assert ours["fw-download"][2].splitlines()[0] == theirs["fw-download"][2].splitlines()[0] == (
        "fw-download: error on offset 0x00000000/0x00001000"), (ours["fw-download"], theirs["fw-download"])
    # show-regs -o json: nvme-cli's keys; what the controller is (not what its driver made of it) the same value
    regs_o, regs_t = js(ours, "regs-json"), js(theirs, "regs-json")
    assert set(regs_t) <= set(regs_o) and len(regs_t) == 25, (sorted(regs_t), sorted(regs_o))
    what_it_is = set(regs_t) - {"cc", "csts", "aqa", "asq", "acq", "intms", "intmc", "bpmbl", "cmbmsc"}
    assert {k: (regs_o[k], regs_t[k]) for k in what_it_is if regs_o[k] != regs_t[k]} == {}
    assert "Send async event" in aec_o and "Feature is" in ours["feature-sel"][1].decode()
