"""Tests of `ambient-lab doctor` (lab/cli/doctor.py): the node-readiness checks.

The decisions (package versions, the iptables-restore verdict, kernel config lookup, the
report's format) are tested as pure functions. The whole run is tested for real on this
machine, where everything the lab needs is installed: as root every check must pass, and
afterwards no `ambient-lab-doctor-*` network namespace may be left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.cli import doctor
from lab.cli.doctor import Check, PythonPackage, format_checks, run_checks


def doctor_netns_left() -> list[str]:
    """Every `ambient-lab-doctor-*` namespace that `ip netns` would list."""
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith("ambient-lab-doctor-"))
    except FileNotFoundError:
        return []


@pytest.fixture(autouse=True)
def no_doctor_netns_left():
    """After each test, the doctor's throwaway namespace is gone."""
    yield
    assert doctor_netns_left() == []


def require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the doctor's kernel checks need root, and CI runs as root")
        pytest.skip("the doctor's kernel checks need root")


# ---- the whole run, for real ------------------------------------------------------------

@pytest.mark.lab
def test_every_check_passes_on_this_machine():
    require_root()
    checks = run_checks()
    failing = [c for c in checks if not c.ok]
    assert not failing, "\n" + format_checks(failing)
    names = {c.name for c in checks}
    expected = {"root", "Linux", "Python >= 3.12", "/run writable", "kernel netns", "kernel veth"}
    expected |= {f"command {cmd}" for cmd in doctor.COMMANDS}
    expected |= {f"package {p.module}" for p in doctor.PYTHON_PACKAGES}
    expected |= {f"kernel {p.module}" for p in doctor.NETFILTER_PROBES}
    assert names == expected
    assert len(checks) == len(expected) == 29
    h2 = next(c for c in checks if c.name == "package h2")
    assert h2.detail.startswith("h2 4.") and "(>= 4.4)" in h2.detail


def path_without(tmp_path: Path, missing: str) -> str:
    """A PATH holding links to every command the doctor looks for, except `missing`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for cmd in doctor.COMMANDS:
        found = shutil.which(cmd)
        if cmd != missing and found:
            (bin_dir / cmd).symlink_to(found)
    return str(bin_dir)


def test_a_missing_command_fails_and_shows_its_fix(tmp_path):
    checks = run_checks(path=path_without(tmp_path, "tshark"))
    by_name = {c.name: c for c in checks}
    tshark = by_name["command tshark"]
    assert not tshark.ok
    assert tshark.detail == "not on PATH"
    assert "sudo make setup" in tshark.fix and "apt-get install tshark" in tshark.fix
    for cmd in doctor.COMMANDS:
        if cmd != "tshark" and shutil.which(cmd):
            assert by_name[f"command {cmd}"].ok, by_name[f"command {cmd}"]
    if os.geteuid() == 0:
        # the kernel probes ran through the links in the same PATH; only tshark is missing
        assert [c.name for c in checks if not c.ok] == ["command tshark"]

    lines = format_checks(checks).splitlines()
    i = next(i for i, line in enumerate(lines) if "command tshark" in line)
    assert lines[i].startswith("✘ ")
    assert lines[i + 1].strip() == f"fix: {tshark.fix}"


def test_packages_missing_from_the_interpreter_fail_with_the_setup_fix(tmp_path):
    """A bare venv (no packages at all) stands for a machine where `make setup` never ran."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")],
                   check=True)
    checks = doctor.check_python_packages(python=str(tmp_path / "venv" / "bin" / "python"))
    assert [c.name for c in checks] == [f"package {p.module}" for p in doctor.PYTHON_PACKAGES]
    for c in checks:
        assert not c.ok
        assert "ModuleNotFoundError" in c.detail
        assert "sudo make setup" in c.fix


def test_extra_checks_come_last_and_a_crashing_one_is_reported():
    def pods_captured() -> Check:
        return Check("pods captured", False, "2 pods escaped capture", "ambient-lab down")

    def broken_check() -> Check:
        raise RuntimeError("boom")

    checks = run_checks(extra=[pods_captured, broken_check])
    assert checks[-2] == pods_captured()
    assert checks[-1].name == "broken_check"
    assert not checks[-1].ok and "RuntimeError: boom" in checks[-1].detail
    assert checks[-1].fix


@pytest.mark.lab
def test_the_throwaway_netns_is_deleted_even_when_the_probe_fails():
    require_root()
    ip = shutil.which("ip")
    with pytest.raises(RuntimeError):
        with doctor.ThrowawayNetns(ip) as netns:
            assert netns.create_error is None
            assert netns.name == f"ambient-lab-doctor-{os.getpid()}"
            assert netns.exists()
            links = subprocess.run([ip, "netns", "exec", netns.name, ip, "-o", "link"],
                                   capture_output=True, text=True, check=True).stdout
            assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
            raise RuntimeError("a probe blew up")
    assert not netns.exists()
    assert netns.delete_error is None


@pytest.mark.lab
def test_a_rule_that_cannot_load_is_reported_with_the_module_fix():
    """An unknown match goes through the same probe as the real ones, and commits nothing.

    (The kernel-side refusal, a warning with exit status 0, is in test_restore_probe_verdict.)
    """
    require_root()
    ip, restore = shutil.which("ip"), shutil.which("iptables-legacy-restore")
    probe = doctor.NetfilterProbe("xt_nonexistent", "CONFIG_NONEXISTENT", "nat",
                                  "-A OUTPUT -m nonexistentmatch -j RETURN", "-m nonexistent",
                                  "nothing")
    with doctor.ThrowawayNetns(ip) as netns:
        check = doctor.probe_rule(ip, netns.name, restore, probe)
        saved = subprocess.run([ip, "netns", "exec", netns.name, "iptables-legacy-save"],
                               capture_output=True, text=True, check=True).stdout
    assert not check.ok
    assert "nonexistentmatch" in check.detail
    assert check.fix.startswith("sudo modprobe xt_nonexistent")
    assert "CONFIG_NONEXISTENT" in check.fix
    assert "-A " not in saved  # --test committed nothing


# ---- pure decisions --------------------------------------------------------------------------

H2 = PythonPackage("h2", "h2", "4.4", "HBONE CONNECT")


@pytest.mark.parametrize(("version", "ok"), [
    ("4.4.1", True), ("4.4", True), ("4.10.0", True), ("5.0.0", True),
    ("4.3.9", False), ("4.1.0", False), ("3.99", False),
])
def test_package_version_against_its_minimum(version, ok):
    check = doctor.package_check(H2, version, None)
    assert check.ok is ok
    if not ok:
        assert f"h2 {version} < 4.4" in check.detail
        assert "sudo make setup" in check.fix


def test_package_import_errors():
    iptc = PythonPackage("iptc", "python-iptables", "1.0.1")
    check = doctor.package_check(
        iptc, "1.2.0",
        "XTablesError: can't find directory with extensions; please set XTABLES_LIBDIR")
    assert not check.ok and "import iptc failed" in check.detail
    assert "apt-get install iptables" in check.fix
    missing = doctor.package_check(H2, None, "ModuleNotFoundError: No module named 'h2'")
    assert not missing.ok and "sudo make setup" in missing.fix
    assert not doctor.package_check(H2, None, None).ok


def test_version_tuple():
    assert doctor.version_tuple("4.4.1") == (4, 4, 1)
    assert doctor.version_tuple("12.0rc1") == (12,)
    assert doctor.version_at_least("1.0.1", "1.0.1")
    assert not doctor.version_at_least("1.0", "1.0.1")


def test_restore_probe_verdict():
    warning = "Warning: Extension ipvs revision 0 not supported, missing kernel module?\n"
    assert doctor.restore_probe_problem(0, "") is None
    assert doctor.restore_probe_problem(0, warning) == warning.strip()
    assert doctor.restore_probe_problem(1, "iptables-restore: line 4 failed\n") == \
        "iptables-restore: line 4 failed"
    assert doctor.restore_probe_problem(2, "") == "exit status 2"


def test_kernel_config_value():
    config = "# CONFIG_VETHX is not set\nCONFIG_VETH=m\nCONFIG_NET_NS=y\n# CONFIG_FOO is not set\n"
    assert doctor.kernel_config_value(config, "CONFIG_VETH") == "m"
    assert doctor.kernel_config_value(config, "CONFIG_NET_NS") == "y"
    assert doctor.kernel_config_value(config, "CONFIG_FOO") is None
    assert doctor.kernel_config_value("CONFIG_VETHX=y\n", "CONFIG_VETH") is None


def test_format_checks_table():
    checks = [
        Check("root", True, "running as uid 0"),
        Check("command tshark", False, "not on PATH", "sudo make setup"),
        Check("kernel netns", True, "created and deleted ambient-lab-doctor-1", "unused fix"),
    ]
    assert format_checks(checks).splitlines() == [
        "✔ root            running as uid 0",
        "✘ command tshark  not on PATH",
        "    fix: sudo make setup",
        "✔ kernel netns    created and deleted ambient-lab-doctor-1",
        "3 checks: 2 ok, 1 failed",
    ]
    last = format_checks(checks[:1]).splitlines()[-1]
    assert last == "1 checks: 1 ok, 0 failed -- ready: sudo make lab"
