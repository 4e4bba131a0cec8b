"""tools/bench.py's host side on made-up figures: ratios against the mean of A and A', the
median over boots, the bars, and the sweep plot (a real PNG)."""

import bench  # tools/bench.py
import pytest


def _boot(scale: float) -> dict:
    def k(iops: float) -> dict:
        return {"iops": iops}

    kernel = {row: {"io_uring_irq": k(1000), "io_uring_poll": k(2000)} for row, *_ in bench.MATRIX}
    kernel[bench.PY_ROW] = {"python": k(500)}
    kernel2 = {row: {"io_uring_irq": k(3000), "io_uring_poll": k(2000)} for row, *_ in bench.MATRIX}
    kernel2[bench.PY_ROW] = {"python": k(500)}
    mine = {row: {"poll": k(5000 * scale), "irq": k(4000 * scale), "poll_mmio": k(4500 * scale)}
            for row, *_ in bench.MATRIX}
    mine[bench.PY_ROW] = {"python": k(700 * scale)}
    mine[bench.SERVICE_ROW] = {"service": k(2000 * scale * scale)}
    return {"A": kernel, "A2": kernel2, "B": mine}


def test_ratios_and_median_over_boots():
    r = bench.ratios(_boot(1.0))
    row = bench.MATRIX[0][0]
    # kernel irq mean (1000 + 3000) / 2 = 2000, poll 2000
    assert r[row] == {"poll": 2.5, "poll_mmio": 2.25, "irq": 2.0, "poll_vs_irq": 2.5}
    assert r[bench.PY_ROW] == {"python": 1.4}
    assert r[bench.SERVICE_ROW] == {"service": 0.4}  # 2000 against in-process perf's 5000 (QD32, poll)
    text = bench.report([_boot(0.5), _boot(1.0), _boot(2.0)])  # the median boot is the middle one
    assert "median of 3 boot(s)" in text
    assert "randread-4k-qd32         poll vs kernel io_uring --hipri     2.50 (bar 2.2) met" in text
    assert "python-read_into-4k-qd1  read_into vs os.preadv loop         1.40 (bar 1.3) met" in text
    assert "serve client vs in-process perf poll  0.40 (bar 0.7) NOT MET" in text
    # the service row's own in-process runs (before and after it), when the boot has them
    b = _boot(1.0)
    b["B"][bench.SERVICE_ROW]["perf"] = {"iops": 2500.0}
    assert bench.ratios(b)[bench.SERVICE_ROW] == {"service": 0.8}
    assert "perf poll just before and after it 2500: ratio 0.80 (per boot 0.80)" in bench.report([b])
    low = bench.report([_boot(0.5)])
    assert "1.25 (bar 2.2) NOT MET" in low
    assert "nvmevfio DMA lane: type1 on guest kernel ?" in low  # results from before lanes were recorded
    lane = bench.report([{**_boot(1.0), "lane": "iommufd", "kernel": "6.12.117-nvmevfio"}])
    assert "nvmevfio DMA lane: iommufd on guest kernel 6.12.117-nvmevfio" in lane


def test_sweep_plot_is_a_png(tmp_path):
    sweep = {name: {str(q): {"iops": 1000.0 * q * f, "lat_p99_us": 40.0 * q} for q in bench.SWEEP_DEPTHS}
             for name, f in (("kernel", 1), ("nvmevfio", 2))}
    out = tmp_path / "sweep.png"
    bench.plot_sweep(sweep, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000


def test_ublk_report_ratios_and_bars():
    """--only ublk: each row against the mean of the kernel's A and A', with issue 28's bar."""
    def side(iops: float) -> dict:
        return {row: {"iops": iops} for row in bench.UBLK_BARS}

    b = side(900) | {"server": {"queues": 1, "depth": 64, "mode": "poll", "io_bytes": 262144}}
    b["randread-4k-qd1"] = {"iops": 700}
    text = bench.ublk_report(side(800), b, side(1000))
    assert "randread-4k-qd32" in text and " 1.00  1.0 met" in text  # 900 / mean(800, 1000)
    assert " 0.78  0.8 NOT MET" in text  # QD1: 700 / 900
    assert f"{bench.FS_ROW:<24}" in text


def test_ublk_report_with_the_c_ublk_server():
    """--only ublk --ublksrv: the C ublk server's IOPS are the mean of its runs before and after
    nvmevfio's; its ratio to the kernel and nvmevfio's to it, per row and as a median over boots."""
    def side(iops: float) -> dict:
        return {row: {"iops": iops} for row in bench.UBLK_BARS}

    b = side(900) | {"server": {"queues": 1, "depth": 64, "mode": "poll", "io_bytes": 262144}}
    c_ublk = {"before": side(700), "after": side(500)}  # mean 600
    r = bench.ublk_c_ratios(side(800), b, side(1000), c_ublk)
    assert r["read-128k-qd8 C/kernel"] == pytest.approx(600 / 900) and r["read-128k-qd8 ublk/C"] == 1.5
    assert len(r) == 2 * len(bench.UBLK_BARS)
    text = bench.ublk_report(side(800), b, side(1000), c_ublk=c_ublk)
    assert "C ublk: ublksrv's nvme_vfio target" in text
    assert "randread-4k-qd32               800       900      1000   1.00  1.0 met     " in text
    assert text.splitlines()[3].endswith("       600  0.67   1.50")  # C ublk, C/k, ublk/C
    text = bench.median_report("the C ublk server (ublksrv nvme_vfio)", [r, r, r], dict.fromkeys(r))
    assert "read-128k-qd8 ublk/C" in text and "1.50  [1.50, 1.50, 1.50]" in text
    assert "bar" not in text and "met" not in text  # an anchor's ratios: no bar, no verdict
    width = len("ext4-fio-randrw-4k-qd1 C/kernel")  # the longest row's name sets the column
    assert f"{'read-128k-qd8 ublk/C':<{width}}   1.50  [1.50, 1.50, 1.50]" in text.splitlines()


def test_ublk_and_tcp_ratios_and_their_median_over_boots():
    def rows(iops: float) -> dict:
        return {row: {"iops": iops} for row in bench.UBLK_BARS}

    r = bench.ublk_ratios(rows(1000), rows(900), rows(3000))  # 900 / mean(1000, 3000)
    assert r == dict.fromkeys(bench.UBLK_BARS, 0.45)
    per_boot = [{"x": 0.5, "y": 1.2}, {"x": 1.1, "y": 0.7}, {"x": 0.9, "y": 1.0}]
    text = bench.median_report("ublk", per_boot, {"x": 0.8, "y": 1.0})
    assert text.splitlines() == [
        "ublk: median of 3 boots (each boot's ratio in brackets)",
        "x                              0.90  [0.50, 1.10, 0.90]  bar 0.8 met",
        "y                              1.00  [1.20, 0.70, 1.00]  bar 1.0 met",
    ]
    kernel = {name: {"iops": 1000.0} for name, *_ in bench.TCP_ROWS}
    export = {mode: {name: {"iops": 950.0 if mode == "poll" else 800.0} for name, *_ in bench.TCP_ROWS}
              for mode in ("poll", "irq")}
    assert bench.tcp_ratios(kernel, export, kernel) == {
        f"{name} ({mode})": 0.95 if mode == "poll" else 0.8 for name, *_ in bench.TCP_ROWS for mode in ("poll", "irq")}


def test_a_shim_older_than_its_c_sources_is_named(tmp_path):
    import os

    pkg, cbits = tmp_path / "nvmevfio", tmp_path / "cbits"
    pkg.mkdir()
    cbits.mkdir()
    for name, when in (("nvmevfio/_cbits.abi3.so", 2000), ("cbits/ublk.c", 3000), ("cbits/qpair.c", 1000)):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (when, when))
    assert bench.stale_build(pkg, cbits) == ["ublk.c"]
    os.utime(pkg / "_cbits.abi3.so", (4000, 4000))
    assert bench.stale_build(pkg, cbits) == []
    assert bench.stale_build(tmp_path / "elsewhere", cbits) == []  # an installed wheel: no checkout beside it


def test_feature_ratios_against_prps_before_and_after():
    def r(a: float, b: float, c: float) -> dict:
        return {"randread-4k-qd32": {"iops": a}, "read-128k-qd8": {"iops": b}, "randwrite-4k-qd32": {"iops": c}}

    rounds = [r(100, 50, 80), r(90, 50, 60), r(45, 25, 40), r(80, 50, 40)]  # PRP, SGL, CMB, PRP
    got = bench.feature_ratios(rounds)
    assert got == {"randread-4k-qd32 sgl": 1.0, "randread-4k-qd32 cmb": 0.5, "read-128k-qd8 sgl": 1.0,
                   "read-128k-qd8 cmb": 0.5, "randwrite-4k-qd32 sgl": 1.0, "randwrite-4k-qd32 cmb": 40 / 60}


def test_fio_cpu_per_io():
    """fio's usr_cpu / sys_cpu are percentages of each job's run time (job_runtime, ms)."""
    jobs = [{"usr_cpu": 10.0, "sys_cpu": 30.0, "job_runtime": 5000, "read": {"total_ios": 100_000},
             "write": {"total_ios": 0}},
            {"usr_cpu": 20.0, "sys_cpu": 50.0, "job_runtime": 4000, "read": {"total_ios": 60_000},
             "write": {"total_ios": 40_000}}]
    # user 0.5 + 0.8 s, system 1.5 + 2.0 s over 200,000 I/Os: 6.5 + 17.5 = 24 us each
    got = bench.fio_cpu(jobs)
    assert got == {"cpu_us_per_io": pytest.approx(24.0), "usr_us_per_io": pytest.approx(6.5),
                   "sys_us_per_io": pytest.approx(17.5)}
    assert bench.fio_cpu([{**jobs[0], "read": {"total_ios": 0}}])["cpu_us_per_io"] == 0.0


def _scaling(one: float, two: float, cpu: float = 10.0) -> dict:
    return {f"{mode}_{n}": {"iops": (one if n == 1 else two) * (1 if mode == "poll" else 0.5), "cpu_us_per_io": cpu,
                            "wait_share": 0.25 if mode == "irq" else 0.0}
            for mode in ("poll", "irq") for n in (1, 2)}


def test_queue_scaling_ratios_report_and_median():
    a1, b, a2 = _scaling(20_000, 22_000, 30.0), _scaling(60_000, 90_000), _scaling(24_000, 22_000, 34.0)
    assert bench.scaling_ratios(a1, b, a2) == {"nvmevfio poll": 1.5, "kernel poll": 1.0, "nvmevfio irq": 1.5,
                                               "kernel irq": 1.0}
    lines = bench.scaling_report(a1, b, a2).splitlines()
    assert lines[2].split() == ["nvmevfio", "poll", "60000", "90000", "1.50", "10.0", "10.0", "0%", "/", "0%"]
    assert lines[3].split() == ["kernel", "poll", "22000", "22000", "1.00", "32.0", "32.0"]
    assert lines[4].split()[-3:] == ["25%", "/", "25%"]
    assert lines[-1] == "bar: nvmevfio poll 2 queues / 1 = 1.50 (1.6) NOT MET"
    boot = _boot(1.0)
    boot["A"][bench.SCALING_ROW], boot["A2"][bench.SCALING_ROW] = a1, a2
    boot["B"][bench.SCALING_ROW] = _scaling(50_000, 85_000)
    text = bench.report([boot])
    assert "randread-4k-qd32-queues (2 queues / 1): median of 1 boots" in text
    assert "nvmevfio poll                  1.70  [1.70]  bar 1.6 met" in text
    assert "kernel poll 1.00, nvmevfio irq 1.70, kernel irq 1.00 (informational)" in text


def test_cpu_per_io_report():
    boots = [_boot(1.0), _boot(1.0), _boot(1.0)]
    for i, b in enumerate(boots):
        for side in ("A", "A2", "B"):
            for row, *_ in bench.MATRIX:
                for mode, d in b[side][row].items():
                    d["cpu_us_per_io"] = {"A": 40.0, "A2": 50.0, "B": 10.0}[side] + i + (5 if "poll" in mode else 0)
    text = bench.report(boots)
    assert "CPU per I/O (us, user + system; kernel: fio's usr_cpu + sys_cpu over its I/Os), median of 3 boot(s)" in text
    # the middle boot: kernel irq mean(41, 51) = 46, poll 51; nvmevfio irq 11, poll 16
    assert "randread-4k-qd1             46.0    51.0    11.0    16.0" in text


def test_libvfn_anchor_command_lines(tmp_path):
    """--libvfn: the meson/ninja build of the checkout, the anchor's compile line, its run line."""
    src, build = tmp_path / "libvfn", tmp_path / "libvfn" / "build-nvmevfio"
    assert bench.libvfn_build_commands(src, build, "/v/bin/meson", configured=False) == [
        ["/v/bin/meson", "setup", str(build), str(src), f"--prefix={build}/prefix", "--libdir=lib",
         "--buildtype=release", "--default-library=static", "-Dlibnvme=disabled", "-Ddocs=disabled", "-Dwerror=false"],
        ["ninja", "-C", str(build), "install"]]
    assert bench.libvfn_build_commands(src, build, "meson", configured=True) == [["ninja", "-C", str(build), "install"]]
    assert bench.anchor_compile_command(build / "prefix", build / "anchor") == [
        "cc", "-O2", "-std=gnu11", "-Wall", "-o", str(build / "anchor"), str(bench.ANCHOR_SRC),
        f"-I{build}/prefix/include", f"{build}/prefix/lib/libvfn.a", "-lpthread"]
    assert bench.ANCHOR_SRC.is_file()
    assert bench.anchor_command("/b/anchor", "0000:00:10.0", "randread", 4096, 32, 5.0, "poll") == [
        "/b/anchor", "--device", "0000:00:10.0", "--workload", "randread", "--size", "4096", "--depth", "32",
        "--seconds", "5", "--ramp", "1", "--mode", "poll"]
    assert bench.anchor_command("a", "0000:00:10.0", "read", 131072, 8, 2.5, "irq", dbbuf=False)[-6:] == [
        "2.5", "--ramp", "1", "--mode", "irq", "--no-dbbuf"]


def test_parse_anchor_output():
    line = ('{"iops": 91234.5, "mib_per_s": 356.38, "lat_p50_us": 320.10, "lat_p99_us": 910.00, "lat_mean_us": 350.7, '
            '"ios": 456172, "seconds": 5.000, "sq_doorbell_mmio": 20000, "cq_doorbell_mmio": 20001, '
            '"shadow_only_updates": 0, "ios_per_submit": 22.81, "ios_per_reap": 22.81, "cpu_us_per_io": 10.96, '
            '"wait_pct": 0.0, "doorbell_pct": 4.4, "sq_doorbell_us": 2.31, "cq_doorbell_us": 25.9, "dbbuf": false, '
            '"mode": "poll", "workload": "randread", "queue_depth": 32, "io_size": 4096}')
    got = bench.parse_anchor("libvfn: some log line\n" + line + "\n")
    assert got == {"iops": 91234.5, "ios": 456172, "mib_per_s": 356.38, "lat_p50_us": 320.1, "lat_p99_us": 910.0,
                   "sq_doorbell_mmio": 20000, "cq_doorbell_mmio": 20001, "shadow_only_updates": 0,
                   "ios_per_submit": 22.81, "ios_per_reap": 22.81, "cpu_us_per_io": 10.96, "wait_pct": 0.0,
                   "doorbell_pct": 4.4, "sq_doorbell_us": 2.31, "cq_doorbell_us": 25.9, "dbbuf": False}
    with pytest.raises(RuntimeError, match="printed nothing"):
        bench.parse_anchor("\n")
    with pytest.raises(RuntimeError, match="lacks ios, mib_per_s"):
        bench.parse_anchor('{"iops": 1, "lat_p50_us": 1}')


def test_c_driver_column():
    """The matrix's C driver column: nvmevfio / mean(C, C'), per mode, median over boots."""
    boot = _boot(1.0)  # nvmevfio poll 5000, irq 4000 on every row
    boot["C"] = {row: {"poll": {"iops": 4000.0}, "irq": {"iops": 2000.0}} for row, *_ in bench.MATRIX}
    boot["C2"] = {row: {"poll": {"iops": 6000.0}, "irq": {"iops": 2000.0}} for row, *_ in bench.MATRIX}
    assert bench.c_ratios(boot)[bench.MATRIX[0][0]] == {"poll": 1.0, "irq": 2.0}
    text = bench.report([boot])
    assert "randread-4k-qd1              2000     5000      2.00       1.00  4000/6000" in text
    assert "C driver" not in bench.report([_boot(1.0)])  # boots without the anchor: no column


def test_sweep_table_and_every_line_plotted(tmp_path):
    sweep = {name: {str(q): {"iops": 1000.0 * q * f, "lat_p99_us": 40.0 * q} for q in (1, 1024)}
             for name, f in (("kernel", 1), ("nvmevfio", 2), ("libvfn", 4), ("nvmevfio_irq", 1), ("libvfn_irq", 1))}
    lines = bench.sweep_table(sweep).splitlines()
    assert lines[0].split() == ["QD", "kernel", "nvmevfio", "nvmevfio_irq", "libvfn", "libvfn_irq", "nv/C", "poll",
                                "nv/C", "irq"]
    assert lines[2].split() == ["1024", "1024000", "(", "40960)", "2048000", "(", "40960)", "1024000", "(", "40960)",
                                "4096000", "(", "40960)", "1024000", "(", "40960)", "0.50", "1.00"]
    out = tmp_path / "sweep.png"
    bench.plot_sweep(sweep, out, bench.sweep_title({"backing": "null-co", "thread_pool_max": 256}))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.sweep_title({"backing": "file", "drive_opts": "aio=io_uring"}).endswith(
        "1 GiB image in tmpfs, aio=io_uring")


def test_shadow_report():
    def r(iops: float, sq: int, cq: int) -> dict:
        return {"iops": iops, "ios": 1000, "sq_doorbell_mmio": sq, "cq_doorbell_mmio": cq}

    rounds = [{name: {"nvmevfio": r(900, 100, 0), "libvfn": r(800, 50, 50)} for name, *_ in bench.SHADOW_ROWS},
              {name: {"nvmevfio": r(1200, 40, 40), "libvfn": r(1000, 30, 30)} for name, *_ in bench.SHADOW_ROWS},
              {name: {"nvmevfio": r(1100, 100, 0), "libvfn": r(800, 50, 50)} for name, *_ in bench.SHADOW_ROWS}]
    lines = bench.shadow_report(rounds).splitlines()
    assert lines[2].split() == ["randread-4k-qd1", "nvmevfio", "900", "1200", "1100", "1.20", "0.10", "0.08"]
    assert lines[3].split() == ["randread-4k-qd1", "libvfn", "800", "1000", "800", "1.25", "0.10", "0.06"]


def test_the_other_doorbell_choice_column():
    """Results since shadow doorbells went off by default on QEMU's model carry perf with them on
    (poll_shadow); older results carry MMIO-only (poll_mmio): the table names whichever it has."""
    boot = _boot(1.0)
    for row, *_ in bench.MATRIX:
        boot["B"][row]["poll_shadow"] = boot["B"][row].pop("poll_mmio")
    assert bench.ratios(boot)[bench.MATRIX[0][0]]["poll_shadow"] == 2.25
    assert "nv shadow" in bench.report([boot]) and "nv mmio" in bench.report([_boot(1.0)])


def test_sweep_title_names_the_backing():
    assert bench.sweep_title({"backing": "null-co", "thread_pool_max": 256}) == (
        "QEMU 7.2 NVMe behind an emulated IOMMU, TCG guest; null-co (no I/O), thread-pool-max=256")


def test_paired_rounds_swap_the_order_and_keep_each_pairs_ratio():
    order: list[str] = []

    def run(name: str, iops: list[float]):
        it = iter(iops)

        def one() -> dict:
            order.append(name)
            return {"iops": next(it), "lat_p99_us": 10.0}
        return one

    got = bench.paired_rounds(run("C", [100.0, 200.0, 100.0]), run("nv", [110.0, 180.0, 90.0]), 3)
    assert order == ["C", "nv", "nv", "C", "C", "nv"]  # C first, then nvmevfio first, then C first
    assert got["ratios"] == pytest.approx([1.1, 0.9, 0.9])
    assert got["libvfn"]["iops"] == 100.0 and got["nvmevfio"]["iops"] == 110.0  # medians of the runs
    assert len(got["libvfn"]["runs"]) == 3


def test_median_sweep_and_the_paired_report_against_the_bar():
    def boot(nv: float, ratios: list[float]) -> dict:
        return {"nvmevfio": {"1": {"iops": nv, "lat_p99_us": 5.0}, "32": {"iops": 2 * nv, "lat_p99_us": 9.0}},
                "libvfn": {"1": {"iops": 100.0, "lat_p99_us": 6.0}, "32": {"iops": 200.0, "lat_p99_us": 8.0}},
                "paired": {"1": ratios, "32": [1.0, 1.2, 1.1]}}

    boots = [boot(90.0, [0.8, 0.9, 1.0]), boot(120.0, [1.1, 1.3, 1.2]), boot(100.0, [1.0, 1.0, 0.7])]
    m = bench.median_sweep(boots)
    assert m["nvmevfio"]["1"] == {"iops": 100.0, "lat_p99_us": 5.0} and m["nvmevfio"]["32"]["iops"] == 200.0
    assert len(m["paired"]["1"]) == 9
    lines = bench.paired_report(boots).splitlines()
    # QD1: boots' medians 0.9, 1.2, 1.0 -> 1.00 (met at the bar); QD32: 1.1 in every boot
    assert lines[1].split() == ["poll", "QD1", "1.00", "[0.90,", "1.20,", "1.00]", "met"]
    assert lines[2].split() == ["poll", "QD32", "1.10", "[1.10,", "1.10,", "1.10]", "met"]
    boots[2]["paired"]["1"] = [0.5, 0.6, 0.7]
    assert bench.paired_report(boots).splitlines()[1].split() == ["poll", "QD1", "0.90", "[0.90,", "1.20,", "0.60]",
                                                                  "NOT", "MET"]


def test_a_failed_command_says_what_it_printed():
    assert bench.run_checked(["sh", "-c", "echo fine"]).stdout == "fine\n"
    with pytest.raises(bench.CommandFailed) as e:
        bench.run_checked(["sh", "-c", "echo 'no ublk device 0' >&2; exit 1"])
    assert e.value.returncode == 1 and str(e.value).endswith("returned non-zero exit status 1.: no ublk device 0")
    with pytest.raises(bench.CommandFailed) as e:  # nothing on stderr: its stdout
        bench.run_checked(["sh", "-c", "echo only-stdout; exit 2"])
    assert str(e.value).endswith(": only-stdout")
