"""The host's TSC frequency, which a TCG guest on the microvm machine is told."""

from __future__ import annotations

from pathlib import Path

from microvm_run import doctor
from microvm_run.host import tsc_khz, tsc_khz_from_cpuinfo

CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU @ 2.60GHz
cpu MHz\t\t: 1197.412
flags\t\t: fpu vme de pse tsc msr pae constant_tsc nonstop_tsc
bogomips\t: 5191.99

processor\t: 1
cpu MHz\t\t: 3400.000
flags\t\t: fpu tsc
bogomips\t: 9999.99
"""


def test_bogomips_of_the_first_cpu_is_twice_the_tsc_mhz() -> None:
    # Not `cpu MHz`: under frequency scaling that is the current clock.
    assert tsc_khz_from_cpuinfo(CPUINFO) == 2_595_995


def test_cpu_mhz_is_the_last_resort() -> None:
    text = "processor\t: 0\ncpu MHz\t\t: 2100.000\nflags\t\t: fpu tsc\n"
    assert tsc_khz_from_cpuinfo(text) == 2_100_000


def test_no_tsc_or_nonsense_is_unknown() -> None:
    assert tsc_khz_from_cpuinfo("processor\t: 0\nflags\t\t: fpu\nbogomips\t: 4200.00\n") is None
    assert tsc_khz_from_cpuinfo("processor\t: 0\nflags\t: tsc\nbogomips\t: 0.01\n") is None
    assert tsc_khz_from_cpuinfo("processor\t: 0\nflags\t: tsc\nbogomips\t: lots\n") is None
    assert tsc_khz_from_cpuinfo("") is None


def test_sysfs_wins_and_a_bad_sysfs_falls_back_to_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    sysfs = tmp_path / "tsc_freq_khz"
    sysfs.write_text("2596000\n")
    assert tsc_khz(sysfs, cpuinfo) == 2_596_000
    sysfs.write_text("garbage\n")
    assert tsc_khz(sysfs, cpuinfo) == 2_595_995
    assert tsc_khz(tmp_path / "absent", tmp_path / "absent-too") is None


def test_doctor_reports_the_tsc_a_tcg_guest_is_told() -> None:
    assert doctor.check_tsc(2_100_000).line() == (
        "ok    guest clock: host TSC 2100.000 MHz, passed to TCG guests"
    )
    unknown = doctor.check_tsc(None)
    assert unknown.status == doctor.WARN and "fast or slow" in unknown.detail
