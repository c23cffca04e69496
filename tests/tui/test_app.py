"""Pilot tests on the recorded lab: every view opens, the keys do what `?` says, filtering,
the pod view's kernel tabs, a flow's timeline and step mode, the actions of the palette."""

from __future__ import annotations

import io
import json
import re

from rich.console import Console
from textual.widgets import DataTable, Input, OptionList, Static, TabbedContent

from lab.tui import commands, resources
from lab.tui.app import LabApp
from lab.tui.screens.cluster import ClusterScreen
from lab.tui.screens.controlplane import ControlPlaneScreen
from lab.tui.screens.events import EventsScreen
from lab.tui.screens.flows import FlowsScreen
from lab.tui.screens.help import HelpScreen, help_text
from lab.tui.screens.pod import PodScreen
from lab.tui.screens.resources import ResourceScreen
from lab.tui.screens.text import TextScreen
from lab.tui.screens.timeline import TimelineScreen
from lab.tui.screens.wire import WireScreen
from lab.tui.widgets.node_panel import NodePanel

from .conftest import FIXTURE, SIZE, recorded_events, recorded_snapshot

SCREENS = [ClusterScreen, ResourceScreen, FlowsScreen, TimelineScreen, PodScreen, ControlPlaneScreen, EventsScreen,
           TextScreen, WireScreen, HelpScreen]
KEY_NAMES = {"escape": "esc", "question_mark": "?", "colon": ":", "slash": "/", "left_square_bracket": "[",
             "right_square_bracket": "]"}


def plain(widget: Static) -> str:
    """What a Static shows, as plain text."""
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(widget.content)
    return console.export_text()


async def settle(pilot) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def command(pilot, text: str) -> None:
    """`:` then TEXT then enter (the text is set at once: typing costs Pilot ~60 ms a key)."""
    await pilot.press("colon")
    await pilot.pause()
    pilot.app.screen.query_one(Input).value = text
    await pilot.press("enter")
    await settle(pilot)


def table_keys(app: LabApp) -> list[str]:
    table = app.screen.query_one(DataTable)
    return [table.coordinate_to_cell_key((i, 0))[0].value for i in range(table.row_count)]


def pod_named(app: LabApp, prefix: str):
    return next(p for p in app.model.pods.values() if p.name.startswith(prefix))


# -- every view opens ---------------------------------------------------------------------------
async def test_number_keys_open_the_main_views(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ClusterScreen)
        for key, screen in (("2", ResourceScreen), ("3", FlowsScreen), ("4", ControlPlaneScreen), ("5", EventsScreen),
                            ("1", ClusterScreen)):
            await pilot.press(key)
            await settle(pilot)
            assert isinstance(app.screen, screen), key


async def test_colon_opens_each_resource_view(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for view in sorted(resources.VIEWS):
            await command(pilot, view)
            assert isinstance(app.screen, ResourceScreen) and app.screen.view == view
            assert table_keys(app) == [r.key for r in resources.build(view, app.model).rows], view


async def test_colon_opens_the_other_screens_and_rejects_unknown_views(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for word, screen in (("flows", FlowsScreen), ("istiod", ControlPlaneScreen), ("events", EventsScreen),
                             ("cluster", ClusterScreen)):
            await command(pilot, word)
            assert isinstance(app.screen, screen), word
        await command(pilot, "bogus")
        assert isinstance(app.screen, ClusterScreen)
        assert any("unknown view 'bogus'" in n.message for n in app._notifications)
        await command(pilot, "pods kube-system")
        assert app.screen.filter_text == "kube-system"
        assert all(k.startswith("kube-system/") for k in table_keys(app))
        await command(pilot, "q")
        assert not app.is_running


# -- help lists every key -------------------------------------------------------------------------
def test_help_lists_every_key_of_every_screen() -> None:
    text = help_text()
    keys = {(b.key_display or KEY_NAMES.get(b.key, b.key)) for cls in [LabApp, *SCREENS] for b in cls.BINDINGS}
    keys.add("ctrl+p")  # Textual's command palette: the actions
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, f"keys not explained in help.md: {missing}"


async def test_question_mark_opens_help_and_escape_closes_it(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, ClusterScreen)


# -- resource keys: / enter esc d y l s -------------------------------------------------------
async def test_slash_filters_and_escape_clears(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")
        await settle(pilot)
        everything = table_keys(app)
        await pilot.press("slash", *"reviews")
        await settle(pilot)
        shown = table_keys(app)
        assert shown and len(shown) < len(everything) and all("reviews" in k for k in shown)
        await pilot.press("enter", "escape")  # leave the prompt, then clear the filter
        await settle(pilot)
        assert table_keys(app) == everything
        await pilot.press("escape")  # nothing to clear, and the view is a top-level one: stays
        await settle(pilot)
        assert isinstance(app.screen, ResourceScreen)


async def test_enter_on_a_pod_opens_its_view_and_escape_returns(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")
        await settle(pilot)
        first = table_keys(app)[0]
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, PodScreen) and app.screen.pod_key == first
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, ResourceScreen)


async def test_enter_on_a_node_lists_its_pods(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await command(pilot, "nodes")
        node = table_keys(app)[0]
        await pilot.press("enter")
        await settle(pilot)
        assert app.screen.view == "pods" and app.screen.scope == ("node", node)
        assert set(table_keys(app)) == {p.key for p in app.model.pods_on(node)}
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen.view == "nodes"
        await pilot.press("s")  # a shell in the node's network namespace (named after the node)
        await settle(pilot)
        assert app.commands_run[-1] == ["ip", "netns", "exec", node, "bash"]


async def test_d_y_l_s_on_a_pod(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        pod = pod_named(app, "productpage")
        await command(pilot, f"pods {pod.name}")
        await pilot.press("d")
        await settle(pilot)
        assert isinstance(app.screen, TextScreen)
        assert plain(app.screen.query_one("#text-body")).startswith(f"Name:             {pod.name}")
        await pilot.press("escape", "y")
        await settle(pilot)
        items = json.loads((FIXTURE / "get" / "pods.json").read_text())["items"]
        want = next(i for i in items if i["metadata"]["name"] == pod.name)
        import yaml

        assert yaml.safe_load(app.screen.text) == want
        await pilot.press("escape", "l")
        await settle(pilot)
        assert app.screen.text == (FIXTURE / "logs" / f"{pod.name}.log").read_text()
        await pilot.press("escape", "s")
        await settle(pilot)
        assert isinstance(app.screen, ResourceScreen)
        assert app.commands_run[-1] == commands.shell_command(pod.netns)
        assert pod.netns.startswith(app.backend.lab + "-")


# -- cluster view -------------------------------------------------------------------------------------
async def test_cluster_view_shows_nodes_side_by_side_and_follows_the_stream(app: LabApp) -> None:
    snap = recorded_snapshot()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        panels = list(app.screen.query(NodePanel))
        assert [p.node["name"] for p in panels] == [n["name"] for n in snap["nodes"]]
        assert len({p.region.x for p in panels}) == len(panels)  # side by side
        for p in panels:
            want = sorted(f"{q['namespace']}/{q['name']}" for q in snap["pods"] if q["node"] == p.node["name"])
            assert sorted(p.pod_keys) == want
            assert "up" in plain(p.query_one(".node-components"))
        node = panels[-1].node["name"]  # the view follows the stream: a ztunnel killed on the last node
        app.backend.post({"event": {"kind": "component.killed", "msg": "ztunnel killed", "component": "ztunnel",
                                    "node": node, "ts": 0}})
        app.pump()
        await settle(pilot)
        assert re.search(r"ztunnel\s+DOWN", plain(panels[-1].query_one(".node-components")))
        start = panels.index(app.screen.focused_panel())  # the first node with pods has the focus
        assert panels[start].pod_keys and not any(p.pod_keys for p in panels[:start])
        await pilot.press("right", "enter")
        await settle(pilot)
        assert isinstance(app.screen, PodScreen)
        assert app.screen.pod_key == panels[(start + 1) % len(panels)].pod_keys[0]


# -- pod view tabs --------------------------------------------------------------------------------------
async def test_pod_view_kernel_tabs_show_the_recorded_outputs(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        pod = pod_named(app, "productpage")
        app.open_pod(pod.key)
        await settle(pilot)
        tabs = app.screen.query_one(TabbedContent)
        assert tabs.active == "overview"
        await pilot.press("right_square_bracket", "right_square_bracket")
        for tab in ("iptables", "sockets", "network"):
            await pilot.press("right_square_bracket")
            await settle(pilot)
            assert tabs.active == tab
            shown = plain(app.screen.query_one(f"#tab-{tab}")).rstrip()
            assert shown.endswith((FIXTURE / "pods" / pod.name / f"{tab}.txt").read_text().expandtabs().rstrip())
            if tab == "sockets":  # the summary says who owns ztunnel's listeners inside the pod
                assert ":15008  ztunnel (pid " in shown and "ztunnel runs on the node, not in this pod" in shown
        await pilot.press("left_square_bracket")
        await settle(pilot)
        assert tabs.active == "sockets"


# -- flows and the timeline ---------------------------------------------------------------------------
async def test_flows_view_lists_every_connection_and_enter_opens_its_timeline(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("3")
        await settle(pilot)
        assert table_keys(app) == list(app.model.flows)
        await pilot.press("home", "enter")
        await settle(pilot)
        assert isinstance(app.screen, TimelineScreen)
        flow = app.model.flows[table_keys_first(app)]
        assert app.screen.query_one("#steps", OptionList).option_count == len(flow.steps)
        details = plain(app.screen.query_one("#step-details"))
        assert flow.steps[0].title in details and flow.steps[0].sentence.split()[0] in details
        await pilot.press("w")
        await settle(pilot)
        assert isinstance(app.screen, WireScreen)
        await pilot.press("escape", "escape")
        await settle(pilot)
        assert isinstance(app.screen, FlowsScreen)


def table_keys_first(app: LabApp) -> str:
    return app.screen.flow_id


async def test_step_mode_on_a_recording_replays_one_step_at_a_time(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        fid = next(iter(app.model.flows))
        n = len(app.model.flows[fid].steps)
        app.open_timeline(fid)
        await settle(pilot)
        steps = app.screen.query_one("#steps", OptionList)
        await pilot.press("x")
        await settle(pilot)
        assert steps.option_count == 1
        await pilot.press("space", "space")
        await settle(pilot)
        assert steps.option_count == 3 and steps.highlighted == 2
        await pilot.press("backspace")
        await settle(pilot)
        assert steps.option_count == 2
        banner = plain(app.screen.query_one("#step-banner"))
        assert f"step 2 of {n}" in banner
        assert "This is a recording: nothing can be held" in banner  # live holding: tests/tui/test_step_mode.py
        await pilot.press("x")
        await settle(pilot)
        assert steps.option_count == n


async def test_the_timeline_of_the_recorded_denied_flow(app: LabApp) -> None:
    """The recording's second curl was denied by the L4 policy: its timeline opens on the decision."""
    events = recorded_events()
    decision = next(e for e in events if e["kind"] == "rbac.decision" and not e["fields"]["allowed"])
    policy = next(o for o in recorded_snapshot()["objects"] if o["kind"] == "AuthorizationPolicy")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("3", "slash")
        app.screen.query_one(Input).value = "denied"
        await settle(pilot)
        assert table_keys(app) == [decision["flow"]]
        await pilot.press("enter", "enter")  # leave the filter prompt, open the timeline
        await settle(pilot)
        assert isinstance(app.screen, TimelineScreen)
        flow = app.model.flow(decision["flow"])
        steps = app.screen.query_one("#steps", OptionList)
        assert flow.steps[steps.highlighted].kind == "rbac.decision"
        summary = plain(app.screen.query_one("#flow-summary"))
        assert "denied" in summary and f"{policy['namespace']}/{policy['name']}" in summary
        assert decision["fields"]["reason"] in summary
        details = plain(app.screen.query_one("#step-details"))
        assert "authorization" in details and "allowed      False" in details
        kinds = [s.kind for s in flow.steps]
        assert kinds.index("hbone.connect.sent") < kinds.index("rbac.decision") < kinds.index("conn.failed")
        assert {s.fields["direction"] for s in flow.steps} == {"outbound", "inbound"}  # both ztunnels, one flow id
        await pilot.press("w")
        await settle(pilot)
        wire_text = plain(app.screen.query_one("#wire"))
        assert ":status 401" in wire_text and decision["fields"]["src_identity"] in wire_text


async def test_filtering_flows(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("3", "slash", *"details")
        await settle(pilot)
        shown = table_keys(app)
        assert shown and all("details" in (app.model.flows[k].dst_pod + app.model.name_of(app.model.flows[k].dst))
                             for k in shown)


async def test_new_events_update_the_flows_table_in_place(app: LabApp) -> None:
    """Coalescing: 300 events posted between two ticks cost one fold and one table update."""
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("3")
        await settle(pilot)
        before = len(table_keys(app))
        for i in range(100):
            fid = f"new-{i}"
            for kind, fields in (("conn.captured", {"direction": "outbound", "src": f"10.9.9.9:{1000 + i}"}),
                                 ("conn.original_dst", {"direction": "outbound", "dst": "10.96.0.99:80"}),
                                 ("conn.closed", {"direction": "outbound", "bytes_sent": i, "bytes_recv": 0})):
                app.backend.post({"event": {"kind": kind, "msg": kind, "component": "ztunnel", "flow": fid,
                                            "fields": fields, "ts": 2e9 + i}})
        ticks = app.stats.ticks
        assert app.pump() == 300
        await settle(pilot)
        assert app.stats.ticks == ticks + 1
        assert len(table_keys(app)) == before + 100
        assert table_keys(app)[-1] == "new-99"


# -- actions ----------------------------------------------------------------------------------------------
async def palette(pilot, text: str) -> None:
    """ctrl+p, the command's title, enter: the palette runs the best match."""
    await pilot.press("ctrl+p")
    await settle(pilot)
    pilot.app.screen.query_one(Input).value = text
    await pilot.pause(0.3)  # the palette searches after a short debounce
    await pilot.press("enter")
    await settle(pilot)


async def test_palette_labels_kills_and_restarts_and_the_recording_refuses(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        ambient = app.model.is_ambient_namespace("default")
        await palette(pilot, ("Remove namespace default" if ambient else "Add namespace default"))
        sent = app.backend.sent[-1]
        assert sent.op == "label" and sent.fields["name"] == "default"
        assert sent.fields["changes"] == {"istio.io/dataplane-mode": None if ambient else "ambient"}
        assert any("recording" in n.message for n in app._notifications)
        node = app.model.nodes[-1]["name"]
        await palette(pilot, f"Kill ztunnel on {node}")
        assert (app.backend.sent[-1].op, app.backend.sent[-1].fields) == ("kill", {"component": "ztunnel", "node": node})
        await palette(pilot, f"Restart ztunnel on {node}")
        assert (app.backend.sent[-1].op, app.backend.sent[-1].fields) == ("restart", {"component": "ztunnel", "node": node})


async def test_palette_curl_resolves_the_command_in_the_pods_namespace(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        pod = pod_named(app, "curl")
        await palette(pilot, f"curl from {pod.name} to productpage:9080")
        assert app.commands_run[-1] == commands.curl_command(pod.netns, "productpage", "default", 9080)


async def test_palette_applies_a_file(app: LabApp, tmp_path) -> None:
    f = tmp_path / "ns.yaml"
    f.write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await palette(pilot, "Apply a YAML file")
        app.screen.query_one(Input).value = str(f)
        await pilot.press("enter")
        await settle(pilot)
        sent = app.backend.sent[-1]
        assert sent.op == "apply" and sent.fields["docs"] == [{"text": f.read_text(), "file": str(f)}]


# -- control plane and events ---------------------------------------------------------------------------
async def test_istiod_view_lists_every_push_and_totals_them(app: LabApp) -> None:
    from lab.tui.screens.controlplane import human_bytes

    pushes = [e["fields"] for e in recorded_events() if e["kind"] == "istiod.push"]
    assert pushes, "the recording has no istiod push"
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("4")
        await settle(pilot)
        table = app.screen.query_one("#pushes", DataTable)
        assert table.row_count == len(pushes)
        text = plain(app.screen.query_one("#cp-totals"))
        total, sidecar = sum(p["bytes"] for p in pushes), sum(p["sidecar_equivalent_bytes"] for p in pushes)
        all_row = next(line for line in text.splitlines() if "all" in line.split())
        assert human_bytes(total) in all_row and human_bytes(sidecar) in all_row
        assert f"{sidecar / total:.1f}x" in all_row
        signed = sum(e["kind"] == "istiod.csr.signed" for e in recorded_events())
        assert plain(app.screen.query_one("#cp-certs")).count("✓") == signed
        acks = sum(e["kind"] == "istiod.ack" for e in recorded_events())
        assert f"ACKs: {acks}" in plain(app.screen.query_one("#cp-certs"))


async def test_events_view_filters(app: LabApp) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("5")
        await settle(pilot)
        from textual.widgets import RichLog

        log = app.screen.query_one(RichLog)
        assert len(log.lines) == len(app.model.events)
        await pilot.press("slash")
        app.screen.query_one(Input).value = "cni.pod.enabled"
        await settle(pilot)
        assert len(log.lines) == sum(e.kind == "cni.pod.enabled" for e in app.model.events) > 0
