"""Exercise 03: istio-cni's in-pod rules (istio/istio cni/pkg/iptables/iptables.go, AppendInpodRules).

Return the rules, in order, that istio-cni writes into an ambient pod's network namespace. Each
Rule is (table, chain, spec tokens): `rule("nat", "ISTIO_OUTPUT", "-p tcp -j ACCEPT", why)`.
"""

from lab.cni.constants import (
    CHAIN_INPOD_OUTPUT,
    CHAIN_INPOD_PREROUTING,
    HOST_PROBE_SNAT_IP,
    INPOD_MARK,
    INPOD_MASK,
    INPOD_RESTORE_MASK,
    INPOD_TPROXY_MARK,
    INPOD_TPROXY_MASK,
    LOCALHOST_CIDR,
    ZTUNNEL_INBOUND_PLAINTEXT_PORT,
    ZTUNNEL_INBOUND_PORT,
    ZTUNNEL_OUTBOUND_PORT,
)
from lab.cni.iptables import Rule

ZTUNNEL_MARK = f"{INPOD_MARK:#x}/{INPOD_MASK:#x}"  # 0x539/0xfff: packets of ztunnel's own sockets
RETURN_MARK = f"{INPOD_TPROXY_MARK:#x}/{INPOD_TPROXY_MASK:#x}"  # 0x111/0xfff: ztunnel's connections to the app


def rule(table: str, chain: str, spec: str, why: str = "") -> Rule:
    return Rule(table, chain, tuple(spec.split()), why)


def inpod_rules(dns_capture: bool = False) -> list[Rule]:
    """The in-pod rule set without DNS capture (this exercise ignores `dns_capture`)."""
    prert, output = CHAIN_INPOD_PREROUTING, CHAIN_INPOD_OUTPUT
    restore = f"{INPOD_RESTORE_MASK:#x}"
    return [
        rule("mangle", "PREROUTING", f"-j {prert}"),
        rule("mangle", "OUTPUT", f"-j {output}"),
        rule("mangle", prert, f"-m mark --mark {ZTUNNEL_MARK} -j CONNMARK --set-xmark {RETURN_MARK}"),
        rule("mangle", output, f"-m connmark --mark {RETURN_MARK} -j CONNMARK --restore-mark "
                               f"--nfmask {restore} --ctmask {restore}"),
        rule("nat", "OUTPUT", f"-j {output}"),
        rule("nat", "PREROUTING", f"-j {prert}"),
        rule("nat", prert, f"-s {HOST_PROBE_SNAT_IP} -p tcp -m tcp -j ACCEPT"),
        rule("nat", output, f"-d {HOST_PROBE_SNAT_IP} -p tcp -m tcp -j ACCEPT"),
        rule("nat", prert, f"! -d {LOCALHOST_CIDR} -p tcp ! --dport {ZTUNNEL_INBOUND_PORT} "
                           f"-m mark ! --mark {ZTUNNEL_MARK} -j REDIRECT --to-ports {ZTUNNEL_INBOUND_PLAINTEXT_PORT}"),
        # TODO 1: in nat ISTIO_OUTPUT, ACCEPT the app's TCP replies on connections ztunnel opened to it
        #         (they carry the return mark, restored in mangle): "-p tcp -m mark --mark ... -j ACCEPT".
        # TODO 2: ACCEPT traffic to the pod's own IP, which leaves through the loopback interface
        #         ("! -d <LOCALHOST_CIDR> -o lo -j ACCEPT").
        # TODO 3: REDIRECT every other TCP connection the app opens to ztunnel's outbound port
        #         ZTUNNEL_OUTBOUND_PORT, except ztunnel's own (their mark is ZTUNNEL_MARK) and
        #         loopback destinations.
    ]
