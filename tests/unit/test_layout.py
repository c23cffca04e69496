"""The top of lab/ reads as the architecture (design.md), and the layers stay where they are.

Read from the source (every import, also those inside functions), so a lazy import cannot hide a
dependency that would load at the worst moment:
- the Kubernetes stand-ins (lab/kube) know nothing of Istio, of what runs them, or of a client;
- the core (everything but the CLI and the TUI) never imports a client;
- the mesh's components reach the supervisor only through its API client;
- no import cycle between modules imported at load time.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LAB = Path(ROOT) / "lab"
MESH = ("lab.cni", "lab.ztunnel", "lab.istiod", "lab.waypoint")
CLIENTS = ("lab.cli", "lab.tui")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The lab modules a file imports (`from lab.x import y` counts as lab.x and lab.x.y)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lab":
            assert node.level == 0, f"{path}: relative import; the lab writes absolute ones"
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lab")
    return found


MODULES = {module_name(p): p for p in LAB.rglob("*.py")}


def lab_imports(module: str, top_level_only: bool = False) -> set[str]:
    return {m for m in imports(MODULES[module], top_level_only) if m in MODULES}


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_top_of_lab_is_the_component_table():
    top = sorted(p.name for p in LAB.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert top == ["apps", "cli", "cni", "common", "course", "hbone", "istiod", "kube", "proto", "supervisor", "tls",
                   "tui", "waypoint", "ztunnel"]
    loose = sorted(p.name for p in LAB.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"], "modules belong in a package named after what they play"
    for package in top:
        doc = ast.get_docstring(ast.parse((LAB / package / "__init__.py").read_text()))
        assert doc, f"lab/{package}/__init__.py should say which real component it plays"


def test_kubernetes_knows_nothing_of_the_mesh_the_supervisor_or_the_clients():
    bad = {m: sorted(d for d in lab_imports(m) if within(d, MESH + CLIENTS + ("lab.supervisor",)))
           for m in MODULES if within(m, ("lab.kube",))}
    assert not {m: d for m, d in bad.items() if d}


def test_the_core_never_imports_a_client():
    core = [m for m in MODULES if not within(m, CLIENTS + ("lab.__main__",))]
    bad = {m: sorted(d for d in lab_imports(m) if within(d, CLIENTS)) for m in core}
    assert not {m: d for m, d in bad.items() if d}


def test_components_reach_the_supervisor_only_through_its_client():
    allowed = ("lab.supervisor", "lab.supervisor.client")  # the package itself only has a docstring
    bad = {m: sorted(d for d in lab_imports(m) if within(d, ("lab.supervisor",)) and d not in allowed
                     and not d.startswith("lab.supervisor.client."))
           for m in MODULES if within(m, MESH + ("lab.apps", "lab.hbone", "lab.tls", "lab.proto", "lab.common"))}
    assert not {m: d for m, d in bad.items() if d}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph, as a path that starts and ends at the same node ([] if none)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return []


def load_time_graph() -> dict[str, set[str]]:
    graph = {}
    for m in MODULES:
        deps = set()
        for d in lab_imports(m, top_level_only=True):
            deps.add(d)
            deps.update(p for p in (d.rsplit(".", i)[0] for i in range(1, d.count(".") + 1)) if p in MODULES
                        and p != "lab" and not m.startswith(p + "."))  # importing a.b.c runs a and a.b first
        # a module's own packages are already being loaded when it runs (`from lab.hbone import wire`
        # inside lab.hbone.client imports the submodule wire, not the package again)
        graph[m] = {d for d in deps if d != m and not m.startswith(d + ".")}
    return graph


def test_no_import_cycle_at_load_time():
    assert find_cycle(load_time_graph()) == []


def test_the_cycle_check_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", ["lab.kube", "lab.kube.apiserver", "lab.kube.printers", "lab.kube.dns"])
def test_the_kubernetes_package_imports_without_root_or_the_mesh(module: str):
    probe = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
             "print(','.join(sorted(m for m in sys.modules if m.split('.')[:2] in "
             "(['lab','cni'],['lab','ztunnel'],['lab','istiod'],['lab','waypoint'],['lab','supervisor']))))")
    r = subprocess.run([sys.executable, "-c", probe, module], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_the_apps_find_the_package_without_site_packages():
    from lab.kube.kubelet import PACKAGE_PARENT

    assert (Path(PACKAGE_PARENT) / "lab" / "__init__.py").is_file()


PATH_MENTION = re.compile(r"(?<![\w/.-])lab/[\w/]+(?:\.py|\.md|\.tcss|/)")


def test_every_path_the_lab_names_exists():
    """Docstrings, the TUI's "read more" lines, the README and the tests name lab/ paths: each one
    must exist, so a learner who follows one finds the file."""
    texts = [*LAB.rglob("*.py"), *LAB.rglob("*.md"), Path(ROOT) / "README.md", *(Path(ROOT) / "tests").rglob("*.py"),
             *(Path(ROOT) / "bench").glob("*.py")]
    missing = sorted({f"{p.relative_to(ROOT)}: {m}" for p in texts for m in PATH_MENTION.findall(p.read_text())
                      if not (Path(ROOT) / m).exists()})
    assert not missing, "\n".join(missing)
