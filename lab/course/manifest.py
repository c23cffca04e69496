"""The course manifest: `exercises/course.yaml`, validated with file:line errors.

One entry per exercise, in order:

    - name: 01_enrol                 # its folder under exercises/ (and solutions/)
      title: Put default in the mesh without restarting a pod
      kind: fix                      # fix: operate the lab; build: write a component's function
      concept: in-pod redirection     # the ambient concept it teaches
      lab:                           # the exercise's own lab
        files: [default]             # manifests: `default` (the default scenario), or files in its folder
        nodes: 2                     # worker nodes (default 2)
        setup: [[kill, ztunnel, worker2]]  # ambient-lab commands run after `up`, before the learner
      seam: {name: cni.inpod_rules, file: inpod_rules.py, function: inpod_rules}   # build only
      answer: {compute: ztunnel_pid, pod: deploy/productpage}                       # optional
      hints: [...]                   # the exercise's own hints, in order
      checks:                        # each: `check:` one of lab/course/checks.py, and its fields
        - {check: curl, from: deploy/curl, url: "http://productpage:9080/productpage", status: 200}
      wrong: {expect_hint: "..."}    # what the plausible wrong answer's live hint must say

Nothing here touches a lab: this module only reads and checks the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lab.common.errors import LabError

KINDS = ("fix", "build")
LAB_PREFIX_ENV = "AMBIENT_LAB_EXERCISE_PREFIX"


@dataclass
class Seam:
    name: str
    file: str
    function: str


@dataclass
class Exercise:
    name: str
    title: str
    kind: str
    concept: str
    folder: Path
    files: list[str] = field(default_factory=list)
    nodes: int = 2
    setup: list[list[str]] = field(default_factory=list)
    seam: Seam | None = None
    answer: dict[str, Any] | None = None
    hints: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    wrong: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    @property
    def number(self) -> int:
        return int(self.name.split("_", 1)[0])

    @property
    def lab(self) -> str:
        """The exercise's own lab: named after it (ex01...), so it never touches the learner's
        other labs; $AMBIENT_LAB_EXERCISE_PREFIX changes the prefix (the authors' check uses its own)."""
        return f"{os.environ.get(LAB_PREFIX_ENV) or 'ex'}{self.number:02d}"

    @property
    def task(self) -> Path:
        return self.folder / "README.md"


class ManifestError(LabError):
    def __init__(self, path: Path, line: int, message: str, fix: str = "") -> None:
        super().__init__(f"{path}:{line}: {message}", fix or "see exercises/README.md for the manifest's format")


def _line(node: Any) -> int:
    return node.start_mark.line + 1 if node is not None and hasattr(node, "start_mark") else 0


def load_course(path: Path, known_checks: set[str], known_answers: set[str]) -> list[Exercise]:
    """Read and validate the manifest; every problem names the file and the line."""
    text = path.read_text()
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ManifestError(path, mark.line + 1 if mark else 0, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("exercises"), list):
        raise ManifestError(path, 1, "the manifest must be a mapping with a list `exercises`")
    nodes = next(v for k, v in root.value if k.value == "exercises").value
    out: list[Exercise] = []
    seen: set[str] = set()
    for raw, node in zip(data["exercises"], nodes, strict=True):
        line = _line(node)
        if not isinstance(raw, dict):
            raise ManifestError(path, line, "each exercise is a mapping (name, title, kind, concept, checks...)")

        def need(key: str, kind: type = str) -> Any:
            value = raw.get(key) if isinstance(raw, dict) else None
            if not isinstance(value, kind) or (kind is str and not value):
                raise ManifestError(path, line, f"exercise needs `{key}` ({kind.__name__})")
            return value

        name = need("name")
        if name in seen:
            raise ManifestError(path, line, f"exercise {name!r} appears twice")
        seen.add(name)
        if not name[:2].isdigit() or name[2:3] != "_":
            raise ManifestError(path, line, f"exercise name {name!r} must start with two digits and _, e.g. 01_enrol")
        kind = need("kind")
        if kind not in KINDS:
            raise ManifestError(path, line, f"{name}: kind {kind!r} is not one of {', '.join(KINDS)}")
        folder = path.parent / name
        if not (folder / "README.md").is_file():
            raise ManifestError(path, line, f"{name}: {folder}/README.md (the task) is missing")
        lab = raw.get("lab") or {}
        seam = None
        if kind == "build":
            s = need("seam", dict)
            seam = Seam(str(s.get("name", "")), str(s.get("file", "")), str(s.get("function", "")))
            if not (seam.name and seam.file and seam.function):
                raise ManifestError(path, line, f"{name}: seam needs name, file and function")
            if not (folder / seam.file).is_file():
                raise ManifestError(path, line, f"{name}: the stub {folder / seam.file} is missing")
        checks = need("checks", list)
        for c in checks:
            if not isinstance(c, dict) or c.get("check") not in known_checks:
                raise ManifestError(path, line, f"{name}: unknown check {c!r}",
                                    f"one of: {', '.join(sorted(known_checks))}")
        answer = raw.get("answer")
        if answer is not None and (not isinstance(answer, dict) or answer.get("compute") not in known_answers):
            raise ManifestError(path, line, f"{name}: answer must name `compute:` one of {', '.join(sorted(known_answers))}")
        files = [str(f) for f in lab.get("files") or ["default"]]
        for f in files:
            if f != "default" and not (folder / f).is_file():
                raise ManifestError(path, line, f"{name}: lab file {folder / f} is missing")
        out.append(Exercise(
            name=name, title=need("title"), kind=kind, concept=need("concept"), folder=folder, files=files,
            nodes=int(lab.get("nodes") or 2), setup=[[str(w) for w in step] for step in lab.get("setup") or []],
            seam=seam, answer=answer, hints=[str(h) for h in raw.get("hints") or []], checks=checks,
            wrong=dict(raw.get("wrong") or {}), line=line))
    return out
