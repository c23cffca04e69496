"""The sockets tab's summary, from real `ss -tanp` output (pure, no Textual)."""

from __future__ import annotations

from lab.tui.sockets_view import listeners, summary

MESHED = """\
State     Recv-Q Send-Q Local Address:Port   Peer Address:Port Process
LISTEN    0      1024         0.0.0.0:9080        0.0.0.0:*     users:(("productpage",pid=7569,fd=6))
LISTEN    0      128          0.0.0.0:15008       0.0.0.0:*     users:(("ztunnel",pid=7535,fd=19))
LISTEN    0      100          0.0.0.0:15001       0.0.0.0:*     users:(("ztunnel",pid=7535,fd=17))
LISTEN    0      100          0.0.0.0:15006       0.0.0.0:*     users:(("ztunnel",pid=7535,fd=18))
ESTAB     0      0         10.244.1.3:15008    10.244.1.2:44706 users:(("ztunnel",pid=7535,fd=31))
"""


def test_listeners_and_their_owners():
    assert listeners(MESHED) == [(9080, "productpage", 7569), (15001, "ztunnel", 7535), (15006, "ztunnel", 7535),
                                 (15008, "ztunnel", 7535)]


def test_summary_of_a_meshed_pod_names_ztunnel_and_each_port():
    s = summary(MESHED)
    assert ":15001  ztunnel (pid 7535)  outbound" in s
    assert ":15008  ztunnel (pid 7535)  HBONE" in s
    assert ":9080   productpage (pid 7569)  the app's own port" in s
    assert "ztunnel runs on the node, not in this pod" in s


def test_summary_of_a_pod_outside_the_mesh():
    s = summary(MESHED.splitlines()[0] + "\n" + MESHED.splitlines()[1])
    assert "No ztunnel listeners: this pod is not in the mesh" in s
    assert summary("") == ""
