"""Layering (design.md): the core never imports Textual; the TUI is a thin client on top.

Each import runs in a fresh interpreter, as Harlequin checks its core, so a module imported by
an earlier test cannot hide a dependency.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

CORE = ["lab", "lab.cli.main", "lab.supervisor.server", "lab.ztunnel.main", "lab.istiod.server", "lab.cni.nodeagent",
        # the TUI's own plain-Python layer: the view model and the backends must not need Textual either
        "lab.tui", "lab.tui.model", "lab.tui.backend", "lab.tui.resources", "lab.tui.commands", "lab.tui.wire"]

PROBE = """
import importlib, sys
importlib.import_module(sys.argv[1])
loaded = sorted(m for m in sys.modules if m == "textual" or m.startswith("textual."))
print(",".join(loaded))
"""


@pytest.mark.parametrize("module", CORE)
def test_importing_the_core_loads_no_textual(module: str) -> None:
    r = subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {module} loaded Textual modules: {r.stdout.strip()}"


def test_the_probe_sees_textual_when_it_is_imported() -> None:
    """The check itself can fail: importing the TUI's app does load Textual."""
    r = subprocess.run([sys.executable, "-c", PROBE, "lab.tui.app"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "textual" in r.stdout.split(",")
