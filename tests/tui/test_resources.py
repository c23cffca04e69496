"""k9s-style tables, describe text and the commands keys resolve to, from the recorded lab."""

from __future__ import annotations

import pytest
import yaml

from lab.tui import commands, resources
from lab.tui.model import LabModel

from .conftest import recorded_snapshot


@pytest.mark.parametrize("view", sorted(resources.VIEWS))
def test_every_view_builds_a_table_whose_rows_fit_its_columns(model: LabModel, view: str) -> None:
    t = resources.build(view, model)
    assert t.columns
    assert all(len(r.cells) == len(t.columns) for r in t.rows)
    assert len({r.key for r in t.rows}) == len(t.rows)


def test_tables_list_what_the_snapshot_holds(model: LabModel) -> None:
    snap = recorded_snapshot()
    assert {r.key for r in resources.pods_table(model).rows} == {f"{p['namespace']}/{p['name']}" for p in snap["pods"]}
    assert {r.key for r in resources.services_table(model).rows} == {f"{s['namespace']}/{s['name']}"
                                                                     for s in snap["services"]}
    assert [r.key for r in resources.nodes_table(model).rows] == [n["name"] for n in snap["nodes"]]
    assert {r.key for r in resources.namespaces_table(model).rows} == {n["name"] for n in snap["namespaces"]}
    policies = {f"{o['namespace']}/{o['name']}" for o in snap["objects"] if o["kind"] == "AuthorizationPolicy"}
    assert {r.key for r in resources.policies_table(model).rows} == policies
    svc = {s["name"]: s for s in snap["services"]}
    for r in resources.services_table(model).rows:
        assert r.cells[2] == svc[r.cells[1]]["cluster_ip"]


def test_workloads_say_hbone_exactly_for_captured_pods(model: LabModel) -> None:
    for r in resources.workloads_table(model).rows:
        pod = model.pods[r.key]
        assert r.cells[5] == ("HBONE" if pod.annotations.get("ambient.istio.io/redirection") else "TCP")


def test_filter_keeps_matching_rows_and_bang_inverts(model: LabModel) -> None:
    t = resources.pods_table(model)
    some = t.filtered("productpage")
    assert some.rows and all("productpage" in r.key for r in some.rows)
    rest = t.filtered("!productpage")
    assert len(some.rows) + len(rest.rows) == len(t.rows)
    assert t.filtered("PRODUCTPAGE").rows == some.rows  # case-insensitive
    assert t.filtered("").rows == t.rows


def test_describe_pod_explains_the_mesh_state_and_lists_its_events(model: LabModel) -> None:
    pod = next(p for p in model.pods.values() if p.name.startswith("productpage"))
    text = resources.describe("pods", model, pod.key)
    assert f"Name:             {pod.name}" in text
    assert resources.MESH_EXPLAINED[pod.mesh] in text
    assert "productpage" in text.split("Services:")[1].splitlines()[0]
    last = list(model.pod_events[pod.name])[-1]
    assert last.msg in text


def test_describe_policy_names_the_pods_it_selects(model: LabModel) -> None:
    snap = recorded_snapshot()
    policy = next(o for o in snap["objects"] if o["kind"] == "AuthorizationPolicy")
    text = resources.describe("policies", model, f"{policy['namespace']}/{policy['name']}")
    selector = policy["raw"]["spec"]["selector"]["matchLabels"]
    selected = [p["name"] for p in snap["pods"] if all(p["labels"].get(k) == v for k, v in selector.items())]
    assert selected and all(name in text for name in selected)
    assert "ztunnel" in text  # a selector policy is enforced by the destination's ztunnel
    assert yaml.safe_load(resources.object_yaml(model, "policies", f"{policy['namespace']}/{policy['name']}")) == policy["raw"]


def test_resolve_view_knows_the_k9s_names() -> None:
    assert resources.resolve_view(":po") == "pods"
    assert resources.resolve_view("services") == "svc"
    assert resources.resolve_view("ap") == "policies"
    assert resources.resolve_view("httproutes") == "routes"
    assert resources.resolve_view("bogus") is None


def test_command_line_parsing() -> None:
    assert commands.parse_command_line(":pods default") == commands.CommandLine("view", "pods", "default")
    assert commands.parse_command_line("svc") == commands.CommandLine("view", "svc", "")
    assert commands.parse_command_line(":flows") == commands.CommandLine("screen", "flows", "")
    assert commands.parse_command_line(":cp") == commands.CommandLine("screen", "istiod", "")
    assert commands.parse_command_line(":q").action == "quit"
    assert commands.parse_command_line(":nope") == commands.CommandLine("unknown", "nope")


def test_commands_run_inside_the_pods_namespace() -> None:
    assert commands.shell_command("lab-default-curl-x") == ["ip", "netns", "exec", "lab-default-curl-x", "bash"]
    assert commands.pod_tab_commands("ns1", "iptables") == [["ip", "netns", "exec", "ns1", "iptables-legacy-save", "-c"]]
    assert commands.pod_tab_commands("ns1", "sockets") == [["ip", "netns", "exec", "ns1", "ss", "-tanp"]]
    assert [c[4:] for c in commands.pod_tab_commands("ns1", "network")] == [["ip", "-br", "addr"], ["ip", "route"],
                                                                            ["ip", "rule"]]
    curl = commands.curl_command("ns1", "productpage", "default", 9080)
    assert curl[:5] == ["ip", "netns", "exec", "ns1", "curl"] and curl[-1] == "http://productpage.default:9080/"
    with pytest.raises(ValueError):
        commands.pod_tab_commands("ns1", "bogus")


def test_requests_match_the_supervisor_ops(tmp_path) -> None:
    label = commands.label_namespace("default", True)
    assert (label.op, label.fields["changes"]) == ("label", {"istio.io/dataplane-mode": "ambient"})
    assert commands.label_namespace("default", False).fields["changes"] == {"istio.io/dataplane-mode": None}
    f = tmp_path / "p.yaml"
    f.write_text("kind: Namespace\n")
    req = commands.apply_file(str(f), "default")
    assert req.op == "apply" and req.fields["docs"] == [{"text": "kind: Namespace\n", "file": str(f)}]
    assert len(commands.apply_file(str(tmp_path)).fields["docs"]) == 1  # a directory: its YAML files
    with pytest.raises(FileNotFoundError):
        commands.apply_file(str(tmp_path / "empty-dir-does-not-exist" / "x.yaml")).fields["docs"][0]["text"]
    kill = commands.component_action("kill", "ztunnel", "worker")
    assert (kill.op, kill.fields) == ("kill", {"component": "ztunnel", "node": "worker"})
