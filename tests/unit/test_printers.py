"""`kubectl get` printers: layout, columns per kind, -A, wide, --show-labels, yaml/json, AGE."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lab.common.errors import LabError
from lab.kube import addressing, printers
from lab.kube.apiserver import ApiServer
from lab.kube.manifests import load_files, load_text
from lab.kube.model import CNI_NOT_READY_TAINT, REDIRECTION_ANNOTATION
from lab.kube.printers import format_age, render

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT.parent / "shared" / "conformance" / "istio" / "samples"
T0 = 1_700_000_000.0
NOW = T0 + 192  # every object is 3m12s old


@pytest.fixture
def api() -> ApiServer:
    api = ApiServer("t", addressing.plan_nodes("t", 2))
    api.apply(load_files([SAMPLES / "bookinfo_bookinfo.yaml", SAMPLES / "curl_curl.yaml"]).resources)
    for p in api.pods():
        p.phase = "Running"
    for key in api.created:
        api.created[key] = T0
    return api


def apply(api: ApiServer, text: str) -> None:
    """Apply more objects, created at T0 like the fixture's."""
    api.apply(load_text(text).resources)
    for key in api.created:
        api.created[key] = T0


def created(api: ApiServer) -> dict:
    return {**api.created, **{printers.object_key(n): T0 - 3 * 86400 for n in api.nodes}}


def get(api: ApiServer, kind: str, ns: str | None = "default", **kw) -> printers.Printed:
    objs = api.nodes if kind == "Node" else api.list(kind, ns)
    extra = kw.pop("extra", None) or printers.derive_extra(api, os_image="Debian GNU/Linux 12 (bookworm)",
                                                           kernel_version="6.1.0-test")
    return render(kind, objs, namespace=ns or "default", now=NOW, created=created(api), extra=extra, **kw)


def cells(line: str) -> list[str]:
    """Split a table line on runs of 3+ spaces (kubectl's column gap); single spaces stay in
    headers such as NOMINATED NODE."""
    return re.split(r" {3,}", line.rstrip("\n"))


def table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = text.splitlines()
    header = cells(lines[0])
    name_at = header.index("NAME")
    return header, {cells(line)[name_at]: cells(line) for line in lines[1:]}


def pod_name(api: ApiServer, deployment: str) -> str:
    return next(p.name for p in api.pods() if p.owner == f"Deployment/{deployment}")


# -- AGE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, age", [
    (-5, "<invalid>"), (-1.5, "0s"), (0, "0s"), (45, "45s"), (119, "119s"),
    (120, "2m"), (192, "3m12s"), (300, "5m"), (599, "9m59s"),
    (600, "10m"), (2 * 3600 + 13 * 60, "133m"), (3 * 3600 - 1, "179m"),
    (3 * 3600, "3h"), (7 * 3600 + 59 * 60, "7h59m"), (8 * 3600 + 59 * 60, "8h"), (47 * 3600, "47h"),
    (2 * 86400, "2d"), (3 * 86400 + 4 * 3600, "3d4h"), (8 * 86400 + 5 * 3600, "8d"), (729 * 86400, "729d"),
    (730 * 86400, "2y"), (3 * 365 * 86400 + 12 * 86400, "3y12d"), (9 * 365 * 86400 + 40 * 86400, "9y"),
])
def test_format_age_follows_human_duration(seconds, age):
    assert format_age(seconds) == age


# -- layout --------------------------------------------------------------------------------------

def test_tabwriter_layout_three_space_gap_minwidth_and_no_trailing_spaces():
    out = printers.tabulate([["NAME", "X", "AGE"], ["a", "b", "5s"], ["longer-name", "", "3m"]])
    assert out == ("NAME          X     AGE\n"
                   "a             b     5s\n"
                   "longer-name         3m\n")
    assert all(not line.endswith(" ") for line in out.splitlines())


# -- pods ----------------------------------------------------------------------------------------

def test_pods_table(api):
    r = get(api, "Pod")
    header, rows = table(r.stdout)
    assert header == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    pp = pod_name(api, "productpage-v1")
    assert rows[pp] == [pp, "1/1", "Running", "0", "3m12s"]
    assert len(rows) == 7 and r.stderr == ""
    # kubectl's tabwriter: every line's columns start at the same offsets
    lines = r.stdout.splitlines()
    assert lines[0].index("READY") == lines[1].index("1/1")


def test_pods_status_before_running(api):
    pods = api.pods()
    pods[0].phase = "Pending"  # scheduled, sandbox not yet up
    pods[1].phase, pods[1].node = "Pending", ""  # not scheduled
    _, rows = table(get(api, "Pod").stdout)
    assert rows[pods[0].name][1:3] == ["0/1", "ContainerCreating"]
    assert rows[pods[1].name][1:3] == ["0/1", "Pending"]


def test_pods_wide_adds_kubectl_columns_then_app_and_redirection(api):
    pp = api.get("Pod", "default", pod_name(api, "productpage-v1"))
    pp.meta.annotations[REDIRECTION_ANNOTATION] = "enabled"
    header, rows = table(get(api, "Pod", output="wide").stdout)
    assert header == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE", "NOMINATED NODE",
                      "READINESS GATES", "APP", "REDIRECTION"]
    assert rows[pp.name][5:] == [pp.ip, pp.node, "<none>", "<none>", "productpage", "enabled"]
    curl = pod_name(api, "curl")
    assert rows[curl][-2:] == ["idle", "<none>"]


def test_all_namespaces_puts_namespace_first(api):
    apply(api, ("apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n---\n"
                        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: robot, namespace: other}\n"))
    out = get(api, "ServiceAccount", None, all_namespaces=True).stdout
    lines = out.splitlines()
    assert cells(lines[0]) == ["NAMESPACE", "NAME", "SECRETS", "AGE"]
    assert cells(lines[-1])[:3] == ["other", "robot", "0"]
    assert sum(1 for line in lines if line.startswith("default ")) == 5
    # cluster-scoped kinds get no NAMESPACE column, even with -A
    assert cells(get(api, "Namespace", None, all_namespaces=True).stdout.splitlines()[0])[0] == "NAME"


def test_unknown_image_note(api):
    apply(api, """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: "nginx:1.27", ports: [{containerPort: 80}]}]
""")
    web = api.get("Pod", "default", pod_name(api, "web"))
    assert web.app == "echo"
    r = get(api, "Pod")
    assert r.stderr == (f'note: pod/{web.name} runs the lab\'s generic echo app: '
                        f'image "nginx:1.27" is not one the lab plays\n')
    assert "note:" not in r.stdout
    assert f"pod/{web.name} in namespace default" in get(api, "Pod", None, all_namespaces=True).stderr


# -- services, namespaces, service accounts, deployments, nodes, gateways ----------------------------

def test_services_table_and_wide_selector(api):
    header, rows = table(get(api, "Service").stdout)
    assert header == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    details = api.get("Service", "default", "details")
    assert rows["details"] == ["details", "ClusterIP", details.cluster_ip, "<none>", "9080/TCP", "3m12s"]
    header, rows = table(get(api, "Service", output="wide").stdout)
    assert header[-1] == "SELECTOR" and rows["details"][-1] == "app=details"


def test_service_ports_joined_and_headless():
    svc = load_text("""
apiVersion: v1
kind: Service
metadata: {name: multi}
spec:
  clusterIP: None
  selector: {app: m, tier: b}
  ports: [{name: http, port: 9080}, {name: https, port: 9443}, {name: dns, port: 53, protocol: UDP}]
""").resources[0]
    out = render("Service", [svc], output="wide", now=NOW, created={svc.key: T0}).stdout
    _, rows = table(out)
    assert rows["multi"][2:5] == ["None", "<none>", "9080/TCP,9443/TCP,53/UDP"]
    assert rows["multi"][-1] == "app=m,tier=b"


def test_namespaces_show_labels(api):
    api.set_labels("Namespace", "", "default", {"istio.io/dataplane-mode": "ambient", "a": "1"})
    header, rows = table(get(api, "Namespace", None, show_labels=True).stdout)
    assert header == ["NAME", "STATUS", "AGE", "LABELS"]
    assert rows["default"] == ["default", "Active", "3m12s", "a=1,istio.io/dataplane-mode=ambient"]
    assert rows["kube-system"][-1] == "<none>"


def test_show_labels_works_for_every_kind(api):
    header, rows = table(get(api, "Pod", output="wide", show_labels=True).stdout)
    assert header[-1] == "LABELS" and header[-2] == "REDIRECTION"
    pp = api.get("Pod", "default", pod_name(api, "productpage-v1"))
    assert rows[pp.name][-1] == f"app=productpage,pod-template-hash={pp.meta.labels['pod-template-hash']},version=v1"
    _, rows = table(get(api, "Node", None, show_labels=True).stdout)
    assert rows["t-worker"][-1] == "kubernetes.io/hostname=t-worker,kubernetes.io/os=linux"


def test_service_accounts(api):
    header, rows = table(get(api, "ServiceAccount").stdout)
    assert header == ["NAME", "SECRETS", "AGE"]
    assert rows["bookinfo-productpage"] == ["bookinfo-productpage", "0", "3m12s"]


def test_deployments_ready_counts_from_pods(api):
    reviews = api.get("Pod", "default", pod_name(api, "reviews-v2"))
    reviews.phase = "Pending"
    header, rows = table(get(api, "Deployment").stdout)
    assert header == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert rows["details-v1"] == ["details-v1", "1/1", "1", "1", "3m12s"]
    assert rows["reviews-v2"] == ["reviews-v2", "0/1", "1", "0", "3m12s"]
    header, rows = table(get(api, "Deployment", output="wide").stdout)
    assert header[-3:] == ["CONTAINERS", "IMAGES", "SELECTOR"]
    assert rows["reviews-v2"][-3:] == ["reviews", "registry.istio.io/release/examples-bookinfo-reviews-v2:1.20.3",
                                       "app=reviews,version=v2"]


def test_nodes_table_and_wide(api):
    header, rows = table(get(api, "Node", None).stdout)
    assert header == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert rows["t-control-plane"] == ["t-control-plane", "Ready", "control-plane", "3d", "v1.34.0-lab"]
    assert rows["t-worker"] == ["t-worker", "Ready", "<none>", "3d", "v1.34.0-lab"]
    header, rows = table(get(api, "Node", None, output="wide").stdout)
    assert header[5:] == ["INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"]
    assert rows["t-worker2"][5:] == ["172.18.0.4", "<none>", "Debian GNU/Linux 12 (bookworm)", "6.1.0-test",
                                     "netns://ambient-lab"]


def test_nodes_wide_shows_taints_only_when_cni_not_ready(api):
    api.nodes[1].taints.append(f"{CNI_NOT_READY_TAINT}:NoSchedule")
    header, rows = table(get(api, "Node", None, output="wide").stdout)
    assert header[-1] == "TAINTS"
    assert rows["t-worker"][-1] == f"{CNI_NOT_READY_TAINT}:NoSchedule"
    assert rows["t-worker2"][-1] == "<none>"
    assert "TAINTS" not in get(api, "Node", None).stdout


GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def test_gateways_address_and_programmed_from_extra(api):
    apply(api, GATEWAY)
    header, rows = table(get(api, "Gateway").stdout)
    assert header == ["NAME", "CLASS", "ADDRESS", "PROGRAMMED", "AGE"]
    # no address yet: the CRD column prints blank, so the row has one cell fewer
    assert rows["waypoint"] == ["waypoint", "istio-waypoint", "Unknown", "3m12s"]
    key = ("Gateway", "default", "waypoint")
    out = get(api, "Gateway", extra={key: {"address": "10.96.5.5", "programmed": "True"}}).stdout
    assert table(out)[1]["waypoint"] == ["waypoint", "istio-waypoint", "10.96.5.5", "True", "3m12s"]


def test_other_kinds_name_and_age(api):
    apply(api, """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all}
spec: {}
""")
    out = get(api, "AuthorizationPolicy", show_labels=True).stdout
    assert out == "NAME       AGE     LABELS\ndeny-all   3m12s   <none>\n"


def test_missing_creation_time_is_unknown(api):
    svc = api.get("Service", "default", "details")
    out = render("Service", [svc], now=NOW, created={}).stdout
    assert table(out)[1]["details"][-1] == "<unknown>"


# -- empty results, -o name, errors --------------------------------------------------------------------

def test_no_resources_found_goes_to_stderr(api):
    r = render("Pod", [], namespace="prod", now=NOW, created={})
    assert r == printers.Printed("", "No resources found in prod namespace.\n")
    assert render("Pod", [], all_namespaces=True, now=NOW, created={}).stderr == "No resources found\n"
    assert render("Gateway", [], now=NOW, created={}).stderr == "No resources found in default namespace.\n"


def test_output_name(api):
    assert get(api, "Deployment", output="name").stdout.splitlines()[0] == "deployment.apps/curl"
    assert get(api, "Node", None, output="name").stdout.splitlines()[0] == "node/t-control-plane"


def test_unknown_output_format_is_refused(api):
    with pytest.raises(LabError, match="output format"):
        get(api, "Pod", output="table")


# -- yaml / json ---------------------------------------------------------------------------------------

def test_yaml_single_pod_round_trip(api):
    pp = api.get("Pod", "default", pod_name(api, "productpage-v1"))
    pp.meta.annotations[REDIRECTION_ANNOTATION] = "enabled"
    node_ip = next(n.ip for n in api.nodes if n.name == pp.node)
    doc = yaml.safe_load(render("Pod", [pp], output="yaml", by_name=True, now=NOW, created=created(api),
                                extra=printers.derive_extra(api)).stdout)
    assert doc["kind"] == "Pod" and doc["apiVersion"] == "v1"
    md = doc["metadata"]
    assert (md["name"], md["namespace"]) == (pp.name, "default")
    assert md["annotations"][REDIRECTION_ANNOTATION] == "enabled"
    assert md["annotations"]["prometheus.io/port"] == "9080"  # from the Deployment's template
    assert md["labels"]["app"] == "productpage"
    assert md["creationTimestamp"] == "2023-11-14T22:13:20Z"
    assert doc["spec"]["nodeName"] == pp.node
    assert doc["spec"]["serviceAccountName"] == "bookinfo-productpage"
    assert doc["spec"]["containers"][0]["image"].endswith("examples-bookinfo-productpage-v1:1.20.3")
    assert doc["status"] == {"phase": "Running", "hostIP": node_ip, "podIP": pp.ip, "podIPs": [{"ip": pp.ip}]}


def test_listing_prints_a_list_even_with_one_item(api):
    doc = yaml.safe_load(get(api, "Service", output="yaml").stdout)
    assert list(doc) == ["apiVersion", "items", "kind", "metadata"]
    assert doc["kind"] == "List" and len(doc["items"]) == 5
    details = next(i for i in doc["items"] if i["metadata"]["name"] == "details")
    assert details["metadata"]["namespace"] == "default"
    assert details["spec"]["clusterIP"] == api.get("Service", "default", "details").cluster_ip
    one = yaml.safe_load(render("Service", [api.get("Service", "default", "details")], output="yaml",
                                now=NOW, created={}).stdout)
    assert one["kind"] == "List" and len(one["items"]) == 1


def test_json_round_trip_matches_yaml(api):
    as_json = json.loads(get(api, "Deployment", output="json").stdout)
    as_yaml = yaml.safe_load(get(api, "Deployment", output="yaml").stdout)
    assert as_json == as_yaml
    reviews = next(i for i in as_json["items"] if i["metadata"]["name"] == "reviews-v1")
    assert reviews["status"]["readyReplicas"] == 1
    assert get(api, "Deployment", output="json").stdout.startswith('{\n    "apiVersion": "v1"')


def test_yaml_nodes_and_empty_list(api):
    doc = yaml.safe_load(get(api, "Node", None, output="yaml").stdout)
    cp = doc["items"][0]
    assert cp["metadata"]["name"] == "t-control-plane"
    assert cp["spec"]["taints"] == [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]
    assert cp["status"]["addresses"][0] == {"type": "InternalIP", "address": "172.18.0.2"}
    assert cp["status"]["nodeInfo"]["osImage"] == "Debian GNU/Linux 12 (bookworm)"
    empty = render("Pod", [], output="yaml", now=NOW, created={})
    assert yaml.safe_load(empty.stdout) == {"apiVersion": "v1", "items": [], "kind": "List",
                                            "metadata": {"resourceVersion": ""}}
    assert empty.stderr == ""
