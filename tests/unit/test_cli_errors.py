"""Bad input at the command line: one clear message, a fix, a non-zero exit, and nothing built."""

from __future__ import annotations

import os

import pytest

from lab.cli import main as cli
from lab.common.errors import LabError
from lab.kube import addressing
from lab.kube.apiserver import ApiServer, resolve_kind
from lab.kube.manifests import load_text


def test_not_root_is_refused_before_anything_happens(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the check reads the effective uid; nothing else runs
    for argv in (["up", "--name", "t"], ["down", "--name", "t"], ["exec", "curl", "--", "true"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "error: the lab needs root" in err and "fix: run it with sudo" in err


def test_selector_matching_nothing_is_a_warning_not_an_error():
    api = ApiServer(lab="t", nodes=addressing.plan_nodes("t", 1))
    api.apply(load_text("""apiVersion: v1
kind: Service
metadata: {name: lonely}
spec:
  selector: {app: nobody}
  ports: [{port: 80}]
""", "svc.yaml").resources)
    (warning,) = api.selector_warnings()
    assert "default/lonely" in warning and "app=nobody matches no pod" in warning and "svc.yaml:1" in warning


def test_unknown_resource_type():
    with pytest.raises(LabError, match='doesn\'t have a resource type "pdos"'):
        resolve_kind("pdos")
    assert resolve_kind("po") == resolve_kind("pods") == "Pod"
    assert resolve_kind("gtw") == "Gateway"


@pytest.mark.parametrize("words", [["=x"], ["novalue"]])
def test_bad_label_syntax(words):
    with pytest.raises(LabError, match="invalid label"):
        cli.parse_label_changes(words)


def test_label_changes_parse_like_kubectl():
    assert cli.parse_label_changes(["a=b", "c-", "d="]) == {"a": "b", "c": None, "d": ""}


def test_bad_lab_name(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["status", "--name", "Not_Valid"]) == 1
    assert "invalid lab name" in capsys.readouterr().err


def test_manifest_for_missing_namespace_is_refused():
    api = ApiServer(lab="t", nodes=addressing.plan_nodes("t", 1))
    with pytest.raises(LabError, match='namespaces "nowhere" not found'):
        api.apply(load_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, namespace: nowhere}\n").resources)
    assert not api.list("ServiceAccount", "nowhere")


def test_status_of_a_lab_that_is_not_running(capsys):
    assert cli.main(["status", "--name", "no-such-lab-here"]) == 1
    err = capsys.readouterr().err
    assert "lab 'no-such-lab-here' is not running" in err and "ambient-lab up --name no-such-lab-here" in err
