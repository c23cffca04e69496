"""The wire view's layers, read off the recorded flows' steps (lab/tui/wire.py)."""

from __future__ import annotations

from lab.common.events import Event
from lab.tui import wire
from lab.tui.model import LabModel

from .conftest import recorded_events


def test_an_allowed_hbone_flow_has_its_four_layers_from_the_events(model: LabModel) -> None:
    events = recorded_events()
    allowed = {e["flow"] for e in events if e["kind"] == "rbac.decision" and e["fields"]["allowed"]}
    assert allowed
    fid = sorted(allowed)[0]
    flow = model.flow(fid)
    layers = wire.layers(flow, model)
    assert [layer.name for layer in layers] == ["application", "TCP", "mTLS 1.3", "HTTP/2 CONNECT", "inner TCP"]
    hs = next(e["fields"] for e in events if e["flow"] == fid and e["kind"] == "tls.handshake"
              and e["fields"]["direction"] == "outbound")
    sent = next(e["fields"] for e in events if e["flow"] == fid and e["kind"] == "hbone.connect.sent")
    assert layers[1].summary == f"{hs['local']} -> {hs['remote']}"
    tls = dict(layers[2].details)
    assert (tls["client identity"], tls["server identity"]) == (hs["src_identity"], hs["dst_identity"])
    assert tls["version"] == hs["tls_version"]
    assert layers[3].summary == f":authority {sent['authority']}"
    assert dict(layers[3].details)["traceparent"] == sent["headers"]["traceparent"]
    assert fid in sent["headers"]["traceparent"]  # the flow id travels in the CONNECT
    assert dict(layers[3].details)["response"].startswith(":status 200")


def test_a_passthrough_flow_is_plain_tcp() -> None:
    m = LabModel()
    m.fold_snapshot({"services": [{"name": "web", "namespace": "default", "cluster_ip": "10.96.0.10", "ports": []}]})
    for kind, fields in (("conn.captured", {"direction": "outbound", "src": "10.244.1.2:40000"}),
                         ("conn.original_dst", {"direction": "outbound", "dst": "10.96.0.10:80"}),
                         ("conn.upstream", {"direction": "outbound", "src": "10.244.1.2:40001", "mark": 1337,
                                            "upstream": "10.96.0.10:80", "protocol": "TCP", "plan": "Passthrough"})):
        m.fold_event(Event(kind, kind, component="ztunnel", flow="f1", fields=fields))
    layers = wire.layers(m.flow("f1"), m)
    assert not wire.is_hbone(m.flow("f1"))
    assert [layer.name for layer in layers] == ["application", "TCP (no tunnel)"]
    assert layers[1].summary.startswith("10.244.1.2:40001 -> 10.96.0.10:80")
    assert "KUBE-SERVICES" in dict(layers[1].details)["kube-proxy"]
