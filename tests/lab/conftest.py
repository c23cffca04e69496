"""Lab tests: real namespaces, as root. One default lab is shared by the whole session; tests
that need their own lab make a small one with a name of their own. At the end, the session
checks that the host's own network namespace is exactly as it was and that no namespace,
process or file of any test lab is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root

TEST_PREFIX = f"tl{os.getpid() % 100000}"
_made: set[str] = set()


def lab_cli(*args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `ambient-lab ARGS` as a learner would, capturing its output."""
    p = subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True, timeout=timeout,
                       input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"ambient-lab {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


class Lab:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return lab_cli(*args, "--name", self.name, **kw) if args and args[0] != "exec" else \
            lab_cli(args[0], "--name", self.name, *args[1:], **kw)

    def pods(self, namespace: str = "default") -> list[dict]:
        out = self("get", "pods", "-n", namespace, "-o", "json").stdout
        doc = json.loads(out)
        return doc.get("items", [doc]) if doc.get("kind") == "List" else [doc]

    def exec(self, target: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return lab_cli("exec", "--name", self.name, target, "--", *cmd, check=check)


def new_lab_name(suffix: str) -> str:
    name = f"{TEST_PREFIX}{suffix}"
    _made.add(name)
    return name


def up(name: str, *args: str) -> Lab:
    lab_cli("up", "--name", name, "-q", *args, timeout=180)
    return Lab(name)


def down(name: str) -> None:
    lab_cli("down", "--name", name, check=False)


@pytest.fixture(scope="session")
def root():
    require_root()


def host_network_state() -> dict[str, str]:
    """Everything about the host's own network namespace that the lab must never change."""
    def run(*cmd: str) -> str:
        p = subprocess.run(cmd, capture_output=True, text=True)
        return p.stdout if p.returncode == 0 else f"<{cmd[0]} failed: {p.stderr.strip()}>"

    def strip_counters(text: str) -> str:
        return "\n".join(line.split(" [")[0] if line.startswith(":") else line for line in text.splitlines()
                         if not line.startswith("#"))

    links = "\n".join(line for line in run("ip", "-o", "link", "show").splitlines())
    return {
        "links": "\n".join(sorted(l.split("link/")[0] for l in links.splitlines())),
        "addresses": run("ip", "-o", "addr", "show"),
        "routes": run("ip", "route", "show", "table", "all"),
        "rules": run("ip", "rule", "show"),
        "iptables-legacy": strip_counters(run("iptables-legacy-save")),
        "nft": run("nft", "list", "ruleset") if Path("/usr/sbin/nft").exists() else "",
    }


def leftovers(name: str) -> list[str]:
    """Anything of lab `name` still on the machine: namespaces, processes, files."""
    found = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(name + "-")] if os.path.isdir("/run/netns") else []
    if os.path.exists(f"/run/ambient-lab/{name}"):
        found.append(f"dir /run/ambient-lab/{name}")
    if os.path.isdir("/etc/netns"):
        found += [f"dir /etc/netns/{n}" for n in os.listdir("/etc/netns") if n.startswith(name + "-")]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"--name {name} " in cmd + " " or f"--lab {name} " in cmd + " " or f" {name}-" in cmd:
            found.append(f"process {pid}: {cmd[:120]}")
    return found


@pytest.fixture(scope="session", autouse=True)
def host_untouched(request):
    """Snapshot the host before any lab test, and after all of them: they must be identical."""
    lab_items = [i for i in request.session.items if "tests/lab" in str(i.fspath)]
    if not lab_items or os.geteuid() != 0:
        yield None
        return
    before = host_network_state()
    yield before
    for name in sorted(_made):
        down(name)
    after = host_network_state()
    left = [x for name in sorted(_made) for x in leftovers(name)]
    changed = [k for k in before if before[k] != after[k]]
    assert not left, f"test labs left things behind: {left}"
    assert not changed, "the host's network namespace changed: " + ", ".join(
        f"{k}:\n--- before\n{before[k]}\n--- after\n{after[k]}" for k in changed)


@pytest.fixture(scope="session")
def default_lab(root):
    """The default scenario (bookinfo + curl + sleep on two workers), shared by the session."""
    name = new_lab_name("d")
    try:
        lab = up(name)
    except Exception:
        down(name)
        raise
    yield lab
    down(name)
