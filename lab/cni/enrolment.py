"""Which pods are in the ambient mesh: istio-cni's enablement selectors, as pure functions.

Real counterpart: the Helm value ``ambient.enablementSelectors`` of the istio-cni chart
(is:manifests/charts/istio-cni/values.yaml), evaluated by the node agent's informer
(is:cni/pkg/nodeagent) and by the chained CNI plugin (is:cni/pkg/plugin/plugin.go) before it
calls the agent. A pod is captured when ANY selector of the list matches it; a selector matches
when its ``podSelector`` matches the pod's labels AND its ``namespaceSelector`` (if any) matches
the labels of the pod's namespace. Both are ordinary Kubernetes label selectors
(``matchLabels`` plus ``matchExpressions``). The chart's default list says, in words:

1. the pod is labelled ``istio.io/dataplane-mode=ambient``; or
2. its namespace is labelled ``istio.io/dataplane-mode=ambient`` and the pod is not labelled
   ``istio.io/dataplane-mode=none`` (the per-pod opt-out).

Nothing else is consulted (reference/istio-ambient.md §1.4). Waypoints and gateways are kept
out of the mesh the same way: the deployments istiod and the gateway charts generate label
their pods ``istio.io/dataplane-mode=none``; whoever creates a waypoint pod in the lab must do
the same. ``sidecar.istio.io/inject`` plays no part in this decision.

Kept separate from the kernel so that a learner's version of :func:`pod_is_ambient` can be
graded against the truth table in ``tests/unit/test_enrolment.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from lab.kube.model import DATAPLANE_MODE_LABEL, LabelSelector, Requirement

#: The value of ``istio.io/dataplane-mode`` that enrols a pod or a namespace.
AMBIENT = "ambient"
#: The value of ``istio.io/dataplane-mode`` on a pod that opts out of its namespace's enrolment.
NONE = "none"

Labels = Mapping[str, str]


@dataclass(frozen=True)
class EnablementSelector:
    """One entry of ``ambient.enablementSelectors``: a pod selector and an optional namespace selector."""

    pod_selector: LabelSelector = field(default_factory=LabelSelector)
    namespace_selector: LabelSelector | None = None

    def matches(self, pod_labels: Labels, namespace_labels: Labels) -> bool:
        if not self.pod_selector.matches(pod_labels):
            return False
        return self.namespace_selector is None or self.namespace_selector.matches(namespace_labels)


#: The istio-cni chart's default ``ambient.enablementSelectors``, as data.
DEFAULT_ENABLEMENT_SELECTORS: tuple[EnablementSelector, ...] = (
    # the pod itself asks for ambient
    EnablementSelector(pod_selector=LabelSelector(match_labels={DATAPLANE_MODE_LABEL: AMBIENT})),
    # its namespace asks for ambient and the pod did not opt out
    EnablementSelector(
        pod_selector=LabelSelector(match_expressions=(Requirement(DATAPLANE_MODE_LABEL, "NotIn", (NONE,)),)),
        namespace_selector=LabelSelector(match_labels={DATAPLANE_MODE_LABEL: AMBIENT}),
    ),
)


def selected(
    selectors: tuple[EnablementSelector, ...], pod_labels: Labels, namespace_labels: Labels
) -> bool:
    """True if any of the enablement selectors matches the pod (an empty list selects nothing)."""
    return any(s.matches(pod_labels, namespace_labels) for s in selectors)


def pod_is_ambient(pod_labels: Labels, namespace_labels: Labels) -> bool:
    """Is this pod captured by ambient? The default ``ambient.enablementSelectors`` of istio-cni.

    Pod label ``istio.io/dataplane-mode=ambient`` -> yes, whatever the namespace says.
    Namespace label ``istio.io/dataplane-mode=ambient`` -> yes, unless the pod is labelled
    ``istio.io/dataplane-mode=none``. Anything else -> no.
    """
    return selected(DEFAULT_ENABLEMENT_SELECTORS, pod_labels or {}, namespace_labels or {})
