"""`ambient-lab doctor`: can this machine run the lab?

Real Istio ambient needs a few things from each node, and the lab needs the same ones from
this machine. istio-cni's node agent must be able to enter pod network namespaces and install
iptables rules there (nat REDIRECT to ztunnel's 15001/15006, mangle mark/connmark for the
return path); kube-proxy needs the nat table, `statistic` for load balancing and `comment` for
its rule labels; the host-probe SNAT rule uses `owner`. The kind-like cluster needs veth pairs.
The lab's own code needs Python >= 3.12 and a few packages (h2 >= 4.4 for a correct HBONE
CONNECT).

Every check returns a `Check` with a concrete fix. The decisions are pure functions over plain
data (`package_check`, `restore_probe_problem`, `kernel_config_value`, `format_checks`); the
parts that touch the kernel are small: one throwaway network namespace named
`ambient-lab-doctor-<pid>`, created and always deleted, and read-only probes run inside it with
`ip netns exec` (listing a table, `iptables-legacy-restore --test`, which commits nothing).
Nothing is ever done in the host's own network namespace.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SETUP = "sudo make setup"
VM_HINT = "use the project's VM: `vagrant up`, `vagrant ssh`, then `cd /vagrant && sudo make lab`"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report: what was checked, the outcome, and how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


# --------------------------------------------------------------------------------------------
# What the lab needs, as data
# --------------------------------------------------------------------------------------------

# Commands on PATH -> the Debian/Ubuntu package that brings them (bootstrap.sh installs them).
COMMANDS: dict[str, str] = {
    "iptables-legacy": "iptables",
    "iptables-legacy-save": "iptables",
    "iptables-legacy-restore": "iptables",
    "ip": "iproute2",
    "tcpdump": "tcpdump",
    "tshark": "tshark",
    "curl": "curl",
}


@dataclass(frozen=True)
class PythonPackage:
    """An import name, its distribution name, and the minimum version (mirrors pyproject.toml)."""

    module: str
    distribution: str
    minimum: str
    why: str = ""


PYTHON_PACKAGES: tuple[PythonPackage, ...] = (
    PythonPackage("pyroute2", "pyroute2", "0.9", "netns, veth, routes over netlink"),
    PythonPackage("iptc", "python-iptables", "1.0.1", "in-pod iptables rules"),
    PythonPackage("cryptography", "cryptography", "43", "SPIFFE workload certificates"),
    PythonPackage("h2", "h2", "4.4", "HBONE: a CONNECT without :scheme/:path needs h2 >= 4.4"),
    PythonPackage("textual", "textual", "8", "the TUI"),
    PythonPackage("mitmproxy", "mitmproxy", "12", "the waypoint's HTTP parsing and flow files"),
    PythonPackage("yaml", "PyYAML", "6", "Kubernetes manifests"),
)

MIN_PYTHON = (3, 12)


@dataclass(frozen=True)
class NetfilterProbe:
    """A kernel module the lab's iptables rules need, and how to prove the kernel has it.

    `rule` is one rule in iptables-restore syntax that uses the module (None for a table
    module: listing the table proves it); `feature` names what the rule exercises. `config` is
    the Kconfig symbol that builds the module.
    """

    module: str
    config: str
    table: str
    rule: str | None
    feature: str
    used_for: str


NETFILTER_PROBES: tuple[NetfilterProbe, ...] = (
    NetfilterProbe("iptable_nat", "CONFIG_IP_NF_NAT", "nat", None, "nat table",
                   "in-pod REDIRECT to ztunnel, kube-proxy DNAT"),
    NetfilterProbe("iptable_mangle", "CONFIG_IP_NF_MANGLE", "mangle", None, "mangle table",
                   "in-pod mark/connmark rules (ISTIO_PRERT, ISTIO_OUTPUT)"),
    NetfilterProbe("iptable_raw", "CONFIG_IP_NF_RAW", "raw", None, "raw table",
                   "in-pod DNS-capture conntrack zones"),
    NetfilterProbe("xt_REDIRECT", "CONFIG_NETFILTER_XT_TARGET_REDIRECT", "nat",
                   "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001", "-j REDIRECT",
                   "REDIRECT to ztunnel's 15001/15006"),
    NetfilterProbe("xt_connmark", "CONFIG_NETFILTER_XT_CONNMARK", "mangle",
                   "-A OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark "
                   "--nfmask 0xffffffff --ctmask 0xffffffff", "-m connmark, -j CONNMARK",
                   "return path of ztunnel's inbound connections (connmark 0x111)"),
    NetfilterProbe("xt_mark", "CONFIG_NETFILTER_XT_MARK", "mangle",
                   "-A PREROUTING -m mark --mark 0x539/0xfff -j MARK --set-xmark 0x111/0xfff",
                   "-m mark, -j MARK",
                   "ztunnel's own sockets (mark 0x539) are not captured"),
    NetfilterProbe("xt_statistic", "CONFIG_NETFILTER_XT_MATCH_STATISTIC", "nat",
                   "-A OUTPUT -m statistic --mode random --probability 0.5 -j RETURN",
                   "-m statistic",
                   "kube-proxy's random choice of a Service endpoint"),
    NetfilterProbe("xt_owner", "CONFIG_NETFILTER_XT_MATCH_OWNER", "nat",
                   "-A POSTROUTING -m owner --socket-exists -j RETURN", "-m owner",
                   "the node's kubelet-probe SNAT rule"),
    NetfilterProbe("xt_comment", "CONFIG_NETFILTER_XT_MATCH_COMMENT", "nat",
                   '-A OUTPUT -m comment --comment "ambient-lab doctor" -j RETURN', "-m comment",
                   "kube-proxy's rule comments"),
)


# --------------------------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------------------------

def version_tuple(text: str) -> tuple[int, ...]:
    """`"4.4.1"` -> (4, 4, 1); stops at the first part that is not a number ("12.0rc1" -> (12,))."""
    parts: list[int] = []
    for piece in text.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def version_at_least(version: str, minimum: str) -> bool:
    """Compare dotted versions numerically, so that "4.10" is newer than "4.4"."""
    have, need = version_tuple(version), version_tuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def package_check(pkg: PythonPackage, version: str | None, error: str | None) -> Check:
    """Judge one Python package from what the probe interpreter reported."""
    name = f"package {pkg.module}"
    fix = f"{SETUP}   (re-installs .venv from pyproject.toml)"
    if error is not None:
        if "XTABLES_LIBDIR" in error or "extensions" in error:
            fix = f"sudo apt-get install iptables, then {SETUP}"
        return Check(name, False, f"import {pkg.module} failed: {error}", fix)
    if version is None:
        return Check(name, False, f"{pkg.distribution} imports but has no version metadata", fix)
    if not version_at_least(version, pkg.minimum):
        why = f": {pkg.why}" if pkg.why else ""
        return Check(name, False, f"{pkg.distribution} {version} < {pkg.minimum}{why}", fix)
    return Check(name, True, f"{pkg.distribution} {version} (>= {pkg.minimum})")


def restore_probe_problem(returncode: int, stderr: str) -> str | None:
    """Read the outcome of `iptables-legacy-restore --test`; None when the kernel has it all.

    With --test nothing is committed, but the kernel is still asked which revision of each
    match/target it supports. A missing module shows only as a warning ("Extension statistic
    revision 0 not supported, missing kernel module?") with exit status 0, so the warning
    counts as a failure.
    """
    text = " ".join(stderr.split())
    if returncode != 0:
        return text or f"exit status {returncode}"
    if "not supported" in text or "missing kernel module" in text:
        return text
    return None


def kernel_config_value(config_text: str, symbol: str) -> str | None:
    """`CONFIG_VETH=m` in a kernel .config -> "m"; None when it is absent or `is not set`."""
    prefix = symbol + "="
    for line in config_text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def format_checks(checks: Iterable[Check]) -> str:
    """A readable table: ✔/✘, name, detail, and the fix under each failure."""
    checks = list(checks)
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{'✔' if c.ok else '✘'} {c.name.ljust(width)}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"    fix: {c.fix}")
    failed = sum(not c.ok for c in checks)
    summary = f"{len(checks)} checks: {len(checks) - failed} ok, {failed} failed"
    lines.append(summary if failed else summary + " -- ready: sudo make lab")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Checks of the process and the machine (no kernel objects)
# --------------------------------------------------------------------------------------------

def _run(argv: list[str], stdin: str | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """Run a command; a missing program or a timeout is an ordinary failed result."""
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, "", str(e)
    return p.returncode, p.stdout, p.stderr


def check_root() -> Check:
    """The lab creates namespaces and iptables rules: root (CAP_NET_ADMIN, CAP_SYS_ADMIN)."""
    uid = os.geteuid()
    if uid == 0:
        return Check("root", True, "running as uid 0")
    return Check("root", False, f"running as uid {uid}", "run it as root: sudo ambient-lab doctor")


def check_linux() -> Check:
    """Network namespaces, veth and netfilter are Linux kernel features."""
    if sys.platform == "linux":
        return Check("Linux", True, f"kernel {platform.release()} ({platform.machine()})")
    return Check("Linux", False, f"this is {platform.system() or sys.platform}", VM_HINT)


def check_python() -> Check:
    """mitmproxy 12 and h2 4.4 need Python >= 3.12."""
    have = sys.version_info[:3]
    text = ".".join(map(str, have))
    if have >= MIN_PYTHON:
        return Check("Python >= 3.12", True, f"Python {text} ({sys.executable})")
    return Check("Python >= 3.12", False, f"Python {text} ({sys.executable})",
                 f"{SETUP}   (creates .venv with Python >= 3.12; Ubuntu 24.04: "
                 "sudo apt-get install python3.12-venv), then run .venv/bin/ambient-lab doctor")


def check_run_writable(run_dir: str = "/run") -> Check:
    """The supervisor's socket and state record live under /run/ambient-lab/<lab>/."""
    name = f"{run_dir} writable"
    if os.path.isdir(run_dir) and os.access(run_dir, os.W_OK):
        return Check(name, True, f"lab state goes to {run_dir}/ambient-lab/<lab>/")
    return Check(name, False, f"cannot write to {run_dir}",
                 f"run as root (sudo ...); {run_dir} must be a writable tmpfs")


def check_commands(path: str | None = None) -> list[Check]:
    """The command-line tools the lab runs or tells a learner to run."""
    checks = []
    for cmd, package in COMMANDS.items():
        found = shutil.which(cmd, path=path)
        if found:
            checks.append(Check(f"command {cmd}", True, found))
        else:
            checks.append(Check(f"command {cmd}", False, "not on PATH",
                                f"{SETUP}   (or: sudo apt-get install {package})"))
    return checks


_PACKAGE_PROBE = r"""
import importlib, importlib.metadata, json, sys
report = {}
for module, dist in json.loads(sys.argv[1]):
    try:
        importlib.import_module(module)
        error = None
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    report[module] = [version, error]
print(json.dumps(report))
"""


def check_python_packages(python: str = sys.executable) -> list[Check]:
    """Import each package in a fresh interpreter (so the doctor itself loads no Textual)."""
    wanted = [[p.module, p.distribution] for p in PYTHON_PACKAGES]
    rc, out, err = _run([python, "-c", _PACKAGE_PROBE, json.dumps(wanted)], timeout=120)
    try:
        report = json.loads(out.strip().splitlines()[-1]) if rc == 0 else None
    except (ValueError, IndexError):
        report = None
    if report is None:
        problem = " ".join(err.split())[-300:] or f"exit status {rc}"
        return [Check(f"package {p.module}", False, f"the import probe with {python} failed: "
                      f"{problem}", f"{SETUP}") for p in PYTHON_PACKAGES]
    return [package_check(p, *report.get(p.module, [None, "not reported"]))
            for p in PYTHON_PACKAGES]


def _kernel_config_text(release: str) -> tuple[str, str] | None:
    """The running kernel's build configuration and where it was read from, if readable."""
    for source in ("/proc/config.gz", f"/boot/config-{release}"):
        try:
            if source.endswith(".gz"):
                with gzip.open(source, "rt") as f:
                    return f.read(), source
            return Path(source).read_text(), source
        except OSError:
            continue
    return None


def check_veth() -> Check:
    """veth pairs join pods to nodes, as the primary CNI does in kind.

    Judged from evidence, not by creating a veth: the loaded module, the kernel's build
    configuration, or the module files of the running kernel.
    """
    release = platform.release()
    fix = ("sudo modprobe veth   (Ubuntu: sudo apt-get install linux-modules-$(uname -r)); "
           f"or {VM_HINT}")
    if Path("/sys/module/veth").exists():
        return Check("kernel veth", True, "veth module loaded (/sys/module/veth)")
    config = _kernel_config_text(release)
    value = kernel_config_value(config[0], "CONFIG_VETH") if config else None
    if value == "y":
        return Check("kernel veth", True, f"built in (CONFIG_VETH=y in {config[1]})")
    modules = Path("/lib/modules") / release
    try:
        builtin = "drivers/net/veth.ko" in (modules / "modules.builtin").read_text()
    except OSError:
        builtin = False
    if builtin:
        return Check("kernel veth", True, f"built in ({modules}/modules.builtin)")
    module_dir = modules / "kernel/drivers/net"
    module_files = sorted(module_dir.glob("veth.ko*")) if module_dir.is_dir() else []
    if module_files:
        return Check("kernel veth", True, f"available as a module ({module_files[0]})")
    if config:
        state = f"CONFIG_VETH={value}" if value else "CONFIG_VETH is not set"
        return Check("kernel veth", False,
                     f"{state} in {config[1]} and no veth.ko in {modules}", fix)
    return Check("kernel veth", False, "cannot confirm: no loaded module, no kernel config, "
                 f"no module files in {modules}", fix)


# --------------------------------------------------------------------------------------------
# The throwaway network namespace: the only kernel object the doctor creates
# --------------------------------------------------------------------------------------------

def doctor_netns_name(pid: int | None = None) -> str:
    """`ambient-lab-doctor-<pid>`: unique per running doctor, recognisable if ever left behind."""
    return f"ambient-lab-doctor-{os.getpid() if pid is None else pid}"


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Make SIGTERM exit through Python (status 143), so that `finally` deletes the netns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ThrowawayNetns:
    """`ambient-lab-doctor-<pid>`: created on enter, deleted on exit, whatever happened inside.

    Creation never raises: `create_error` says why there is no namespace. After exit,
    `delete_error` says why it could not be deleted (None when it is gone). A namespace of the
    same name can only be the leftover of a dead doctor that had our pid, so it is deleted
    before ours is created.
    """

    def __init__(self, ip: str, name: str | None = None) -> None:
        self.ip = ip
        self.name = name or doctor_netns_name()
        self.create_error: str | None = None
        self.delete_error: str | None = None
        self._guard = _sigterm_exits()

    def exists(self) -> bool:
        return Path("/run/netns", self.name).exists()

    def __enter__(self) -> ThrowawayNetns:
        self._guard.__enter__()
        try:
            self._delete()
            rc, _, err = _run([self.ip, "netns", "add", self.name])
            if rc != 0:
                self.create_error = " ".join(err.split()) or f"exit status {rc}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._delete()
        finally:
            self._guard.__exit__(None, None, None)

    def _delete(self) -> None:
        if not self.exists():
            return
        rc, _, err = _run([self.ip, "netns", "delete", self.name])
        if self.exists():
            self.delete_error = " ".join(err.split()) or f"ip netns delete: exit status {rc}"


def probe_table(ip: str, netns: str, iptables: str, probe: NetfilterProbe) -> Check:
    """List one table inside the throwaway netns (`iptables-legacy -t nat -L -n`)."""
    rc, _, err = _run([ip, "netns", "exec", netns, iptables, "-t", probe.table, "-L", "-n"])
    if rc == 0:
        return Check(f"kernel {probe.module}", True, f"{probe.feature}: {probe.used_for}")
    return Check(f"kernel {probe.module}", False,
                 f"`iptables-legacy -t {probe.table} -L -n` failed: {' '.join(err.split())}",
                 _module_fix(probe))


def probe_rule(ip: str, netns: str, restore: str, probe: NetfilterProbe) -> Check:
    """Ask the kernel, inside the throwaway netns, whether it supports one rule; commit nothing."""
    chain = probe.rule.split()[1]
    text = f"*{probe.table}\n:{chain} ACCEPT [0:0]\n{probe.rule}\nCOMMIT\n"
    rc, _, err = _run([ip, "netns", "exec", netns, restore, "--test"], stdin=text)
    problem = restore_probe_problem(rc, err)
    if problem is None:
        return Check(f"kernel {probe.module}", True, f"{probe.feature}: {probe.used_for}")
    return Check(f"kernel {probe.module}", False, f"`{probe.rule}` refused: {problem}",
                 _module_fix(probe))


def _module_fix(probe: NetfilterProbe) -> str:
    return (f"sudo modprobe {probe.module}; if there is no such module, this kernel was built "
            f"without {probe.config}: {VM_HINT}")


def check_kernel(path: str | None = None) -> list[Check]:
    """Network namespaces and the netfilter modules, tested inside one throwaway netns."""
    names = [f"kernel {p.module}" for p in NETFILTER_PROBES]
    ip = shutil.which("ip", path=path)
    iptables = shutil.which("iptables-legacy", path=path)
    restore = shutil.which("iptables-legacy-restore", path=path)

    def untested(reason: str, fix: str) -> list[Check]:
        return [Check(n, False, f"not tested: {reason}", fix) for n in names]

    if sys.platform != "linux":
        return [Check("kernel netns", False, "not Linux", VM_HINT), *untested("not Linux", VM_HINT)]
    if os.geteuid() != 0:
        fix = "run it as root: sudo ambient-lab doctor"
        return [Check("kernel netns", False, "not tested: needs root", fix),
                *untested("needs root", fix)]
    if ip is None:
        fix = f"{SETUP}   (or: sudo apt-get install iproute2)"
        return [Check("kernel netns", False, "not tested: `ip` is not on PATH", fix),
                *untested("`ip` is not on PATH", fix)]

    probes: list[Check] = []
    with ThrowawayNetns(ip) as netns:
        if netns.create_error is None:
            probes = [_probe(ip, netns.name, iptables, restore, p) for p in NETFILTER_PROBES]
    if netns.create_error is not None:
        fix = ("the kernel needs CONFIG_NET_NS and /run must be writable; try "
               f"`sudo ip netns add test && sudo ip netns delete test`; or {VM_HINT}")
        return [Check("kernel netns", False, f"cannot create {netns.name}: {netns.create_error}",
                      fix), *untested("no throwaway network namespace", fix)]
    if netns.delete_error is not None:
        netns_check = Check("kernel netns", False, f"{netns.name} created but not deleted: "
                            f"{netns.delete_error}", f"sudo ip netns delete {netns.name}")
    else:
        netns_check = Check("kernel netns", True, f"created and deleted {netns.name}")
    return [netns_check, *probes]


def _probe(ip: str, netns: str, iptables: str | None, restore: str | None,
           probe: NetfilterProbe) -> Check:
    """One netfilter probe: list the table, or test-load the rule (nothing is committed)."""
    if probe.rule is None:
        if iptables is None:
            return _tool_missing(probe, "iptables-legacy")
        return probe_table(ip, netns, iptables, probe)
    if restore is None:
        return _tool_missing(probe, "iptables-legacy-restore")
    return probe_rule(ip, netns, restore, probe)


def _tool_missing(probe: NetfilterProbe, tool: str) -> Check:
    return Check(f"kernel {probe.module}", False, f"not tested: `{tool}` is not on PATH",
                 f"{SETUP}   (or: sudo apt-get install iptables)")


# --------------------------------------------------------------------------------------------
# The whole report
# --------------------------------------------------------------------------------------------

def _run_extra(check: Callable[[], Check]) -> Check:
    """Run a caller-supplied check; a check that crashes is reported, not raised."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
        name = getattr(check, "__name__", repr(check))
        return Check(name, False, f"the check itself raised {type(e).__name__}: {e}",
                     "this is a bug in ambient-lab: please report it with this output")


def run_checks(extra: Iterable[Callable[[], Check]] = (), *, path: str | None = None,
               python: str = sys.executable, run_dir: str = "/run") -> list[Check]:
    """Run every check, in the order a learner would fix them.

    `extra`: more checks (e.g. the lab's own: pods that escaped capture), run last.
    `path`: the PATH to look commands up in (default: this process's PATH).
    `python`: the interpreter whose packages are checked (default: this one).
    `run_dir`: where runtime state goes (default /run).
    """
    checks = [check_root(), check_linux(), check_python(), check_run_writable(run_dir)]
    checks += check_commands(path)
    checks += check_python_packages(python)
    kernel = check_kernel(path)
    checks.append(kernel[0])  # network namespaces first, then veth, then netfilter
    if sys.platform == "linux":
        checks.append(check_veth())
    else:
        checks.append(Check("kernel veth", False, "not Linux", VM_HINT))
    checks += kernel[1:]
    checks += [_run_extra(c) for c in extra]
    return checks


def main(argv: list[str] | None = None) -> int:
    """`python -m lab.cli.doctor`: print the report; exit status 1 when anything failed."""
    checks = run_checks()
    print(format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
