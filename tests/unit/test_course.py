"""The course engine without a lab: the manifest and its errors, the learner-code seams and their
containment, and checks and live hints on recorded lab state."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lab.common.seams import SeamError, Seams, call_contained, load_function, seams_path
from lab.course import checks
from lab.course.answers import ANSWERS
from lab.course.manifest import ManifestError, load_course
from lab.course.runner import Course
from tests.conftest import ROOT

EXERCISES = Path(ROOT) / "exercises"
SOLUTIONS = Path(ROOT) / "solutions"


# -- the manifest ----------------------------------------------------------------------------------
def test_the_course_loads_in_order_with_a_task_for_each():
    course = Course.load(EXERCISES)
    names = [e.name for e in course.exercises]
    assert names == sorted(names) and len(names) >= 10
    assert {e.kind for e in course.exercises} == {"fix", "build"}
    assert all(e.task.read_text().startswith("# ") for e in course.exercises)
    assert course.find("1").name == "01_enrol" and course.find("enrol").name == "01_enrol"


def bad_course(tmp_path: Path, entry: str) -> Path:
    (tmp_path / "01_x").mkdir()
    (tmp_path / "01_x" / "README.md").write_text("# x\n")
    path = tmp_path / "course.yaml"
    path.write_text("exercises:\n\n" + entry)
    return path


@pytest.mark.parametrize("entry,message", [
    ("- {name: 01_x, title: t, kind: fix, concept: c, checks: [{check: nope}]}\n", "unknown check"),
    ("- {name: 01_x, title: t, kind: nonsense, concept: c, checks: []}\n", "kind 'nonsense'"),
    ("- {name: 02_y, title: t, kind: fix, concept: c, checks: []}\n", "README.md (the task) is missing"),
    ("- {name: x, title: t, kind: fix, concept: c, checks: []}\n", "must start with two digits"),
    ("- {name: 01_x, kind: fix, concept: c, checks: []}\n", "needs `title`"),
    ("- {name: 01_x, title: t, kind: build, concept: c, checks: [], seam: {name: s, file: f.py, function: g}}\n",
     "the stub"),
    ("- {name: 01_x, title: t, kind: fix, concept: c, checks: [], answer: {compute: guess}}\n", "answer must name"),
    ("- {name: 01_x, title: [unclosed\n", "not valid YAML"),  # PyYAML sees it at the end of the file: line 4
])
def test_a_bad_manifest_names_the_file_and_the_line(tmp_path, entry, message):
    path = bad_course(tmp_path, entry)
    with pytest.raises(ManifestError) as e:
        load_course(path, set(checks.CHECKS), set(ANSWERS))
    line = 4 if "YAML" in message else 3
    assert message in e.value.message and e.value.message.startswith(f"{path}:{line}: "), e.value.message


# -- seams: the learner's code, contained ---------------------------------------------------------------
def learner_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "mine.py"
    path.write_text(body)
    return str(path)


def test_an_exception_names_the_learners_file_and_line(tmp_path):
    path = learner_file(tmp_path, "def f(x):\n    y = 1\n    return x / 0\n")
    with pytest.raises(SeamError, match=rf"^{path}:3: ZeroDivisionError"):
        call_contained(load_function(f"{path}:f"), (1,), {})


def test_a_syntax_error_is_reported_before_anything_runs(tmp_path):
    path = learner_file(tmp_path, "def f(x):\n    return (\n")
    with pytest.raises(SeamError, match=rf"^{path}:2: SyntaxError"):
        load_function(f"{path}:f")


def test_a_hang_is_cut_off_and_the_caller_goes_on(tmp_path):
    path = learner_file(tmp_path, "def f():\n    while True:\n        pass\n")
    t0 = time.monotonic()
    with pytest.raises(SeamError, match="did not return within"):
        call_contained(load_function(f"{path}:f"), (), {}, timeout=0.2)
    assert time.monotonic() - t0 < 2


def test_a_component_uses_the_learners_function_only_while_the_seam_is_set(tmp_path):
    path = learner_file(tmp_path, "def f(x):\n    return x + 1\n")
    seams = Seams(str(tmp_path))
    assert seams.get("demo.f", lambda x: x)(1) == 1  # no seams file: the component's own
    Path(seams_path(str(tmp_path))).write_text(json.dumps({"demo.f": f"{path}:f"}))
    assert seams.get("demo.f", lambda x: x)(1) == 2
    time.sleep(0.01)
    Path(path).write_text("def f(x):\n    return 'two'\n")  # saved again: reloaded
    import os
    os.utime(path, (time.time() + 1, time.time() + 1))
    with pytest.raises(SeamError, match="expected an int"):
        seams.get("demo.f", lambda x: x, check=lambda v: None if isinstance(v, int) else "expected an int")(1)


# -- build-it checks on the learner's code -------------------------------------------------------------
def ctx_for(tmp_path: Path, name: str, solution: str | None) -> checks.Context:
    """The exercise in a copy, with its stub or a file from solutions/ in place."""
    course = Course.load(EXERCISES)
    ex = course.find(name)
    folder = tmp_path / ex.name
    shutil.copytree(ex.folder, folder)
    if solution:
        shutil.copyfile(SOLUTIONS / ex.name / solution, folder / ex.seam.file)
    ex.folder = folder
    return checks.Context(exercise=ex)


@pytest.mark.parametrize("file,ok,hint", [
    (None, False, "missing in table nat"),
    ("wrong_inpod_rules.py", False, "ztunnel would capture itself"),
    ("inpod_rules.py", True, ""),
])
def test_inpod_rules_against_istios_set(tmp_path, file, ok, hint):
    r = checks.CHECKS["rules_match_istio"](None, {}, ctx_for(tmp_path, "03", file))
    assert r.ok is ok and (not hint or any(hint in h for h in r.hints)), r


@pytest.mark.parametrize("file,ok,hint", [
    (None, False, "an ALLOW for curl, sleep connecting"),
    ("wrong_assert_rbac.py", False, "DENY is checked first"),
    ("assert_rbac.py", True, ""),
])
def test_assert_rbac_against_ztunnels_truth_table(tmp_path, file, ok, hint):
    r = checks.CHECKS["rbac_truth_table"](None, {}, ctx_for(tmp_path, "10", file))
    assert r.ok is ok and (not hint or any(hint in h for h in r.hints)), r


# -- live hints on recorded state ----------------------------------------------------------------------
class RecordedLab:
    """A lab's answers, as recorded from a real one (kubectl JSON, components, events)."""

    name = "ex01"

    def __init__(self, pods, namespaces, components=(), events=(), objects=None, workloads=()):
        self._pods, self._ns, self._components, self._events = pods, namespaces, list(components), list(events)
        self._objects = objects or {}
        self._workloads = list(workloads)

    def cmd(self, *words):
        return "sudo ambient-lab " + " ".join(words)

    def pods(self, namespace=None):
        return [p for p in self._pods if namespace in (None, p["metadata"]["namespace"])]

    def namespace_labels(self, namespace):
        return dict(self._ns.get(namespace, {}))

    def components(self):
        return self._components

    def events(self, since=0.0):
        return [e for e in self._events if e["ts"] >= since]

    def objects(self, kind, namespace=None):
        return [o for o in self._objects.get(kind, []) if namespace in (None, o["metadata"]["namespace"])]

    def ztunnel_workloads(self):
        return self._workloads


def pod(name, labels=None, annotations=None, node="ex01-worker", phase="Running"):
    return {"metadata": {"name": name, "namespace": "default", "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"nodeName": node}, "status": {"phase": phase}}


@pytest.mark.parametrize("ns_labels,pod_labels,annotations,components,hint", [
    ({}, {}, {}, [], "which has no istio.io/dataplane-mode label, and the pod itself has none"),
    ({"istio.io/dataplane-mode": "enabled"}, {}, {}, [], "only the value `ambient` enrols"),
    ({"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "none"}, {}, [], "opts it out"),
    ({"istio.io/dataplane-mode": "ambient"}, {}, {"ambient.istio.io/redirection": "pending"},
     [{"component": "ztunnel", "node": "ex01-worker", "running": False, "pid": 0}], "ztunnel on ex01-worker is not running"),
])
def test_in_mesh_hints_say_what_this_lab_shows(ns_labels, pod_labels, annotations, components, hint):
    lab = RecordedLab([pod("productpage-v1-abc", pod_labels, annotations)], {"default": ns_labels}, components)
    r = checks.CHECKS["in_mesh"](lab, {"namespace": "default"}, checks.Context())
    assert not r.ok and any(hint in h for h in r.hints), r.hints


def test_in_mesh_passes_when_enabled_and_hbone():
    lab = RecordedLab([pod("a", annotations={"ambient.istio.io/redirection": "enabled"})], {},
                      workloads=[{"name": "a", "protocol": "HBONE"}])
    assert checks.CHECKS["in_mesh"](lab, {"namespace": "default"}, checks.Context()).ok


def policy(name, spec):
    return {"metadata": {"name": name, "namespace": "default"}, "spec": spec}


def test_policy_hints_name_the_mistake():
    lab = RecordedLab([], {}, objects={"authorizationpolicies": [
        policy("short-principal", {"selector": {"matchLabels": {"app": "productpage"}},
                                   "rules": [{"from": [{"source": {"principals": ["curl"]}}]}]}),
        policy("l7-on-ztunnel", {"selector": {"matchLabels": {"app": "productpage"}},
                                 "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        policy("fine", {"targetRefs": [{"kind": "Service", "group": "", "name": "productpage"}],
                        "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    ]})
    hints = checks.policy_mistakes(lab)
    assert len(hints) == 2
    assert "principal 'curl', which matches no identity" in hints[0]
    assert "ztunnel cannot see HTTP" in hints[1] and "methods" in hints[1]


def test_no_restart_names_the_replaced_pods():
    lab = RecordedLab([pod("b-new")], {})
    r = checks.CHECKS["no_restart"](lab, {}, checks.Context(baseline={"pods/default": ["b-old"]}))
    assert not r.ok and "b-old was replaced by b-new" in r.observed and "without restarting" not in r.observed


def test_an_entry_that_is_not_a_mapping_is_refused_with_its_line(tmp_path):
    path = bad_course(tmp_path, "- just a string\n")
    with pytest.raises(ManifestError, match=r"course.yaml:3: each exercise is a mapping"):
        load_course(path, set(checks.CHECKS), set(ANSWERS))
