"""Which pods ambient captures: the default ambient.enablementSelectors of istio-cni (reference §1.4)."""

from __future__ import annotations

import pytest

from lab.cni.enrolment import (
    DEFAULT_ENABLEMENT_SELECTORS,
    EnablementSelector,
    pod_is_ambient,
    selected,
)
from lab.kube.model import DATAPLANE_MODE_LABEL as MODE
from lab.kube.model import LabelSelector, Requirement

POD = {"ambient": {MODE: "ambient"}, "none": {MODE: "none"}, "absent": {}}
NS = {"ambient": {MODE: "ambient"}, "absent": {}}

# pod label x namespace label -> captured?
TRUTH = {
    ("ambient", "ambient"): True,
    ("ambient", "absent"): True,   # the pod asks for itself
    ("none", "ambient"): False,    # the per-pod opt-out
    ("none", "absent"): False,
    ("absent", "ambient"): True,   # the namespace asks for its pods
    ("absent", "absent"): False,
}


@pytest.mark.parametrize(("pod", "ns"), sorted(TRUTH))
def test_truth_table(pod: str, ns: str) -> None:
    labels = {"app": "productpage", **POD[pod]}
    assert pod_is_ambient(labels, {"kubernetes.io/metadata.name": "default", **NS[ns]}) is TRUTH[(pod, ns)]


def test_other_values_and_labels() -> None:
    # Only the value "ambient" enrols; a namespace labelled "none" does not stop a pod asking for itself.
    assert pod_is_ambient({MODE: "ambient"}, {MODE: "none"}) is True
    assert pod_is_ambient({}, {MODE: "none"}) is False
    assert pod_is_ambient({}, {MODE: "Ambient"}) is False
    assert pod_is_ambient({MODE: "sidecar"}, {}) is False
    # Any pod value but "none" stays in an ambient namespace (NotIn [none]).
    assert pod_is_ambient({MODE: "sidecar"}, {MODE: "ambient"}) is True
    # The selectors look at this one key only: sidecar injection or waypoint labels play no part.
    assert pod_is_ambient({"sidecar.istio.io/inject": "true"}, {MODE: "ambient"}) is True
    assert pod_is_ambient({"gateway.networking.k8s.io/gateway-name": "waypoint", MODE: "none"},
                          {MODE: "ambient"}) is False
    assert pod_is_ambient(None, None) is False  # type: ignore[arg-type]


def test_label_selector_semantics() -> None:
    assert LabelSelector().matches({}) and LabelSelector().matches({"a": "b"})  # empty selects all
    assert Requirement("k", "In", ("x", "y")).matches({"k": "y"})
    assert not Requirement("k", "In", ("x",)).matches({})
    assert Requirement("k", "NotIn", ("x",)).matches({})
    assert not Requirement("k", "NotIn", ("x",)).matches({"k": "x"})
    assert Requirement("k", "Exists").matches({"k": ""}) and not Requirement("k", "Exists").matches({})
    assert Requirement("k", "DoesNotExist").matches({}) and not Requirement("k", "DoesNotExist").matches({"k": "v"})
    with pytest.raises(ValueError):
        Requirement("k", "Gt", ("1",)).matches({"k": "2"})  # type: ignore[arg-type]
    both = LabelSelector({"a": "1"}, (Requirement("b", "Exists"),))
    assert both.matches({"a": "1", "b": ""}) and not both.matches({"a": "1"}) and not both.matches({"b": "", "a": "2"})


def test_selectors_are_an_or_of_ands() -> None:
    assert len(DEFAULT_ENABLEMENT_SELECTORS) == 2
    assert selected((), {MODE: "ambient"}, {MODE: "ambient"}) is False  # no selectors: nothing captured
    team = (EnablementSelector(LabelSelector({"team": "a"}), LabelSelector({"env": "prod"})),)
    assert selected(team, {"team": "a"}, {"env": "prod"})
    assert not selected(team, {"team": "a"}, {"env": "dev"})
    assert not selected(team, {"team": "b"}, {"env": "prod"})
