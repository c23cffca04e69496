"""Manifests: Istio's own samples load unchanged; bad input fails with file, line and a fix."""

from __future__ import annotations

import pytest

from lab.common.errors import ManifestError
from lab.kube import manifests
from lab.kube.model import Deployment, Service
from tests.conftest import require_conformance


def sample_files():
    return sorted((require_conformance() / "samples").glob("*.yaml")) + sorted(
        (require_conformance() / "getting-started").glob("*.yaml"))


def test_every_istio_sample_loads():
    files = sample_files()
    assert len(files) >= 12
    for f in files:
        loaded = manifests.load_files([f])
        assert loaded.resources, f


def test_bookinfo_objects_are_typed():
    loaded = manifests.load_files([require_conformance() / "samples" / "bookinfo_bookinfo.yaml"])
    kinds = {(r.kind, r.name) for r in loaded.resources}
    assert ("Deployment", "reviews-v2") in kinds and ("ServiceAccount", "bookinfo-reviews") in kinds
    d = next(r for r in loaded.resources if r.name == "reviews-v2")
    assert isinstance(d, Deployment) and d.template.service_account == "bookinfo-reviews"
    assert d.template.containers[0].ports[0].container_port == 9080
    svc = next(r for r in loaded.resources if r.kind == "Service" and r.name == "productpage")
    assert isinstance(svc, Service) and svc.selector == {"app": "productpage"} and svc.ports[0].port == 9080
    assert svc.namespace == "default"


def test_later_kinds_are_stored():
    loaded = manifests.load_files([require_conformance() / "getting-started" / "20-waypoint.yaml",
                                   require_conformance() / "getting-started" / "10-l4-policy-productpage-ztunnel.yaml"])
    assert [r.kind for r in loaded.resources] == ["Gateway", "AuthorizationPolicy"]
    assert loaded.resources[0].spec["gatewayClassName"] == "istio-waypoint"


def test_default_scenario_mirrors_bookinfo():
    from lab.supervisor.lifecycle import default_scenario

    ours = manifests.load_files([default_scenario()])
    names = {(r.kind, r.name) for r in ours.resources}
    for expect in [("Deployment", "productpage-v1"), ("Deployment", "reviews-v3"), ("Deployment", "curl"),
                   ("Deployment", "sleep"), ("ServiceAccount", "bookinfo-productpage"), ("Service", "ratings")]:
        assert expect in names


def test_kind_cluster_file_sets_nodes():
    text = "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n- role: control-plane\n- role: worker\n- role: worker\n- role: worker\n"
    assert manifests.load_text(text).cluster.workers == 3


BAD = [
    ("apiVersion: v1\nkind: Service\nmetadata:\n  name: a\nspec:\n  ports:\n  - port: [1\n", 8, "started at line 7"),
    ("apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n   bad: x\n", 5, "invalid YAML"),
    ("apiVersion: v1\nkind: Servce\nmetadata:\n  name: a\n", 1, "unknown kind 'Servce'"),
    ("apiVersion: v1\nkind: Service\nmetadata:\n  labels: {}\n", 1, "has no metadata.name"),
    ("kind: Service\nmetadata:\n  name: a\n", 1, "has no 'apiVersion'"),
    ("apiVersion: v1\nmetadata:\n  name: a\n", 1, "has no 'kind'"),
    ("---\napiVersion: v1\nkind: Service\nmetadata:\n  name: a\nspec:\n  ports:\n  - port: 70000\n", 2, "out of range"),
    ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: c\n    image: x\n    ports:\n"
     "    - containerPort: 0\n", 1, "out of range"),
    ("apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: a\n",
     6, "duplicate Service 'a'"),
]


@pytest.mark.parametrize("text,line,words", BAD)
def test_bad_manifests_name_file_and_line(tmp_path, text, line, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ManifestError) as e:
        manifests.load_files([f])
    assert f"bad.yaml:{line}:" in str(e.value)
    assert words in str(e.value)


def test_missing_file():
    with pytest.raises(ManifestError, match="no such file"):
        manifests.load_files(["/nonexistent/ambient-lab.yaml"])
