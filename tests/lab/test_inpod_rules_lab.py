"""Lab tests (root, real network namespaces) of the istio-cni in-pod rules: what lands in the
kernel is Istio's golden rule set, install is idempotent and reconciles, removal is complete,
rules never land in the wrong pod, and the REDIRECT really delivers to ztunnel's 15001 port."""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import struct
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from lab.cni.iptables import (
    inpod_rules,
    install_inpod_rules,
    normalise_save,
    read_inpod_rules,
    remove_inpod_rules,
    render_save,
)

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT.parent / "shared" / "conformance" / "istio" / "cni-iptables" / "default.golden"
NS1, NS2 = "altest-inpod-1", "altest-inpod-2"
SO_ORIGINAL_DST = 80


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def host_state() -> dict[str, str]:
    """What the tests must never change in the host's own netns."""
    save = run("iptables-legacy-save")
    return {
        "iptables-legacy-save": "\n".join(l for l in save.splitlines() if not l.startswith("#")),
        "ip rule": run("ip", "rule"),
        "ip route table 100": subprocess.run(["ip", "route", "show", "table", "100"],
                                             capture_output=True, text=True).stdout,
    }


@pytest.fixture(scope="module", autouse=True)
def root_and_clean_host():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("lab tests need root (CI=true)")
        pytest.skip("lab tests need root")
    before = host_state()
    yield
    assert host_state() == before, "the host's own netns was changed"
    assert not [n for n in run("ip", "netns", "list").split() if n.startswith("altest-inpod-")]


def make_pod_netns(name: str, address: str) -> None:
    """A stand-in pod: lo up, eth0 with an address, default route out of eth0.

    eth0 is a veth whose peer stays, unaddressed, in the same netns (this kernel has no dummy
    driver): nothing ever answers there, so only the REDIRECT can complete a connection."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")
    run("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "nowhere0")
    run("ip", "-n", name, "link", "set", "nowhere0", "up")
    run("ip", "-n", name, "addr", "add", address, "dev", "eth0")
    run("ip", "-n", name, "link", "set", "eth0", "up")
    run("ip", "-n", name, "route", "add", "default", "dev", "eth0")


@pytest.fixture
def pods():
    names = [NS1, NS2]
    try:
        make_pod_netns(NS1, "10.244.1.5/24")
        make_pod_netns(NS2, "10.244.1.6/24")
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def expected(dns_capture: bool) -> list[str]:
    """Istio's golden file (minus the port-53 rules and raw without DNS capture), normalised."""
    lines, table = [], None
    for line in GOLDEN.read_text().splitlines():
        if line.startswith("* "):
            table = line[2:]
        if not dns_capture and (table == "raw" or "--dport 53" in line):
            continue
        lines.append(line)
    return normalise_save("\n".join(lines))


def kernel_rules(netns) -> list[str]:
    return normalise_save(read_inpod_rules(netns))


def policy_routing(name: str) -> tuple[list[str], list[str]]:
    rules = [l for l in run("ip", "-n", name, "rule").splitlines() if "lookup 100" in l]
    shown = subprocess.run(["ip", "-n", name, "route", "show", "table", "100"],
                           capture_output=True, text=True)
    # A table that never held a route does not exist: ip exits 2, "FIB table does not exist".
    assert shown.returncode == 0 or "table does not exist" in shown.stderr, shown.stderr
    routes = shown.stdout.splitlines()
    return rules, routes


def assert_installed(name: str, dns_capture: bool) -> None:
    assert kernel_rules(name) == expected(dns_capture)
    rules, routes = policy_routing(name)
    assert [r.split() for r in rules] == [["32764:", "from", "all", "fwmark", "0x111/0xfff", "lookup", "100"]]
    assert [r.split() for r in routes] == [["local", "default", "dev", "lo", "scope", "host"]]


def assert_clean(name: str) -> None:
    assert "ISTIO" not in read_inpod_rules(name)
    assert policy_routing(name) == ([], [])


# --- the rule set in the kernel ----------------------------------------------------------------


def test_install_writes_exactly_the_golden_rules_and_policy_routing(pods):
    install_inpod_rules(NS1)
    assert_installed(NS1, dns_capture=False)
    save = read_inpod_rules(NS1)
    assert "*raw" not in save and "*filter" not in save  # no table the pod does not need
    assert kernel_rules(NS1) == normalise_save(render_save(inpod_rules(False), with_dns=False))


def test_install_with_dns_capture_matches_the_full_golden_file(pods):
    install_inpod_rules(NS1, dns_capture=True)
    assert_installed(NS1, dns_capture=True)
    assert kernel_rules(NS1) == normalise_save(GOLDEN.read_text())


@pytest.mark.parametrize("dns_capture", [False, True])
def test_install_twice_changes_nothing(pods, caplog, dns_capture):
    install_inpod_rules(NS1, dns_capture)
    before = read_inpod_rules(NS1)
    with caplog.at_level(logging.DEBUG, logger="lab.cni.iptables"):
        install_inpod_rules(NS1, dns_capture)
    tables = ["mangle", "nat", "raw"] if dns_capture else ["mangle", "nat"]
    assert [r.getMessage() for r in caplog.records if r.name == "lab.cni.iptables"] == [
        f"in-pod {t} rules already in place" for t in tables]
    strip = lambda text: [l for l in text.splitlines() if not l.startswith("#")]  # noqa: E731
    assert strip(read_inpod_rules(NS1)) == strip(before)
    assert_installed(NS1, dns_capture)


def test_install_reconciles_a_partial_rule_set_without_duplicates(pods):
    install_inpod_rules(NS1, dns_capture=True)
    ipt = ["ip", "netns", "exec", NS1, "iptables-legacy"]
    run(*ipt, "-t", "nat", "-D", "ISTIO_OUTPUT", "-p", "tcp", "-m", "mark", "--mark", "0x111/0xfff",
        "-j", "ACCEPT")
    run(*ipt, "-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT")          # duplicated jump
    run(*ipt, "-t", "mangle", "-D", "PREROUTING", "-j", "ISTIO_PRERT")    # lost jump
    run(*ipt, "-t", "mangle", "-A", "ISTIO_OUTPUT", "-j", "RETURN")       # stray rule
    run("ip", "-n", NS1, "route", "del", "local", "default", "dev", "lo", "table", "100")
    assert kernel_rules(NS1) != expected(dns_capture=True)
    install_inpod_rules(NS1)  # agent restarted with DNS capture now off
    assert_installed(NS1, dns_capture=False)


def test_remove_leaves_no_istio_chain_rule_or_route(pods):
    install_inpod_rules(NS1, dns_capture=True)
    remove_inpod_rules(NS1)
    assert_clean(NS1)
    remove_inpod_rules(NS1)  # nothing left to remove: still fine
    assert_clean(NS1)


def test_rules_never_land_in_the_wrong_pod(pods):
    """The cached-table trap: python-iptables caches tables bound to the netns they were opened in."""
    fd2 = os.open(f"/run/netns/{NS2}", os.O_RDONLY)
    try:
        install_inpod_rules(NS1)
        assert_clean(NS2)
        install_inpod_rules(fd2, dns_capture=True)                   # by fd
        assert_installed(NS2, dns_capture=True)
        assert_installed(NS1, dns_capture=False)                     # untouched
        install_inpod_rules(f"/run/netns/{NS1}")                     # by path: a no-op
        assert_installed(NS1, dns_capture=False)
        remove_inpod_rules(NS1)
        assert_clean(NS1)
        assert_installed(NS2, dns_capture=True)
        assert kernel_rules(fd2) == kernel_rules(f"/run/netns/{NS2}") == expected(True)
        remove_inpod_rules(fd2)
        assert_clean(NS2)
    finally:
        os.close(fd2)


# --- the rules at work -------------------------------------------------------------------------


@contextmanager
def in_netns(name: str):
    """Create sockets inside a pod netns (as ztunnel does), then return to our own netns."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        os.setns(target, os.CLONE_NEWNET)
        try:
            yield
        finally:
            os.setns(home, os.CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


def redirect_15001_packets(name: str) -> int:
    for line in read_inpod_rules(name).splitlines():
        if line.endswith("-j REDIRECT --to-ports 15001"):
            return int(re.match(r"\[(\d+):", line).group(1))
    raise AssertionError("no REDIRECT to 15001")


def test_outbound_tcp_lands_on_15001_with_its_original_destination(pods):
    install_inpod_rules(NS1)
    with in_netns(NS1):
        listener = socket.socket()
        app = socket.socket()
        ztunnel_like = socket.socket()
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 15001))
        listener.listen(8)
        listener.settimeout(2)

        app.settimeout(2)
        app.connect(("10.1.2.3", 80))  # no such host: only the REDIRECT can answer
        conn, _ = listener.accept()
        with conn:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack("!2xH4s8x", raw)
            assert (socket.inet_ntoa(packed), port) == ("10.1.2.3", 80)
            assert app.getpeername() == ("10.1.2.3", 80)  # the app never sees the redirect
            app.sendall(b"ping")
            assert conn.recv(4) == b"ping"
        assert redirect_15001_packets(NS1) == 1

        # ztunnel's own sockets carry mark 0x539 and must go out untouched.
        ztunnel_like.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
        ztunnel_like.settimeout(0.5)
        with pytest.raises(OSError):  # nothing answers behind eth0: timeout
            ztunnel_like.connect(("10.1.2.3", 80))
        readable, _, _ = select.select([listener], [], [], 0.3)
        assert readable == []
        assert redirect_15001_packets(NS1) == 1
    finally:
        for s in (listener, app, ztunnel_like):
            s.close()
