"""`ambient-lab ztunnel-config`: istioctl's `ztunnel-config` (alias `zc`) tables, from each ztunnel's own state.

Real istioctl reads ztunnel's `localhost:15000/config_dump` and prints it with the columns of
is:istioctl/pkg/writer/ztunnel/configdump. The lab asks each node's ztunnel over its admin
socket (`config_dump`) and prints the same columns (reference/istio-ambient.md §5.3).
"""

from __future__ import annotations

import json
from typing import Any

from lab.kube.printers import tabulate

SECTIONS = ("workloads", "services", "policies", "certificates", "connections")
ALIASES = {"workload": "workloads", "service": "services", "policy": "policies", "certificate": "certificates",
           "connection": "connections", "secret": "certificates", "all": "all"}


def section(word: str) -> str:
    s = ALIASES.get(word, word)
    if s not in SECTIONS and s != "all":
        from lab.common.errors import LabError

        raise LabError(f"unknown ztunnel-config section {word!r}", "one of: " + ", ".join(SECTIONS + ("all",)))
    return s


def _addr(a: Any) -> str:
    if isinstance(a, dict):
        return str(a.get("address", ""))
    return str(a)


def _waypoint(w: Any) -> str:
    if not w:
        return "None"
    if isinstance(w, dict):
        if "hostname" in w and isinstance(w["hostname"], dict):
            return w["hostname"].get("hostname", "").split(".")[0] or "None"
        if "address" in w:
            return _addr(w["address"])
    text = str(w)  # "namespace/name.namespace.svc.cluster.local:15008" -> "name", as istioctl prints it
    host = text.split("/", 1)[-1].rsplit(":", 1)[0]
    return host.split(".")[0] if ".svc." in host else host


def workload_rows(dump: dict) -> list[list[str]]:
    rows = []
    for w in dump.get("workloads", []):
        w = w.get("workload", w)
        protocol = w.get("protocol") or ("HBONE" if w.get("tunnel_protocol") == "HBONE" else "TCP")
        rows.append([w.get("namespace", ""), w.get("name", ""), ",".join(_addr(a) for a in w.get("addresses", [])),
                     w.get("node", ""), _waypoint(w.get("waypoint")), protocol])
    return rows


def service_rows(dump: dict) -> list[list[str]]:
    rows = []
    for s in dump.get("services", []):
        s = s.get("service", s)
        endpoints = f"{s.get('healthy', 0)}/{s.get('total', 0)}"
        vips = s.get("vips") or s.get("addresses") or []
        rows.append([s.get("namespace", ""), s.get("name", ""), ",".join(_addr(a) for a in vips),
                     _waypoint(s.get("waypoint")), endpoints])
    return rows


SCOPES = {"GLOBAL": "Global", "NAMESPACE": "Namespace", "WORKLOAD_SELECTOR": "WorkloadSelector"}


def policy_rows(dump: dict) -> list[list[str]]:
    return [[p.get("namespace", ""), p.get("name", ""), str(p.get("action", "")).capitalize(),
             SCOPES.get(p.get("scope", ""), p.get("scope", ""))] for p in dump.get("policies", [])]


def certificate_rows(dump: dict) -> list[list[str]]:
    return [[c.get("identity", ""), c.get("type", "Leaf"), c.get("status", ""), str(c.get("valid", "")).lower(),
             c.get("serial", ""), c.get("not_after", ""), c.get("not_before", "")]
            for c in dump.get("certificates", [])]


def connection_rows(dump: dict) -> list[list[str]]:
    return [[c.get("workload", ""), str(c.get("direction", "")).capitalize(), c.get("local", ""),
             c.get("remote", ""), c.get("target", ""), c.get("protocol", "")] for c in dump.get("connections", [])]


HEADERS = {
    "workloads": (["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"], workload_rows),
    "services": (["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"], service_rows),
    "policies": (["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"], policy_rows),
    "certificates": (["CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"],
                     certificate_rows),
    "connections": (["WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL"], connection_rows),
}


def render(which: str, dump: dict) -> str:
    """One section (or `all`, each section in order) as istioctl prints it."""
    names = SECTIONS if which == "all" else (which,)
    parts = []
    for name in names:
        header, rows = HEADERS[name]
        body = sorted(rows(dump))
        parts.append(tabulate([header, *body]).rstrip("\n"))
    return "\n\n".join(parts)


def render_json(which: str, dump: dict) -> str:
    return json.dumps(dump if which == "all" else dump.get(which, []), indent=2)
