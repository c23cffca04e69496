"""Seams: where a graded exercise plugs a learner's function into a running component.

A "build it" exercise asks the learner to write one small pure function of a real component:
istio-cni's in-pod rule set, ztunnel's L4 authorization... While the exercise is active, its lab
holds a file `seams.json` in its run directory, `{seam name: "path/to/file.py:function"}`, and the
component calls the learner's function at that point instead of its own. Nothing else changes:
the same process, the same sockets, the same kernel, so the learner's code is graded by real
traffic.

The learner's code is contained, as a real component would contain a plug-in: it runs in a
thread of its own with a time limit; an exception, a hang, a syntax error or a value of the
wrong type becomes a `SeamError` naming the learner's file and line. The component then fails
that one operation the way a bug in it would (a connection refused, a pod not enrolled), says so
in the event stream, and keeps running. The file is re-read when it changes, so a learner who
saves a fix sees it at the next connection.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

SEAMS_FILE = "seams.json"
CALL_TIMEOUT = 2.0  # seconds a learner's function may take before the call counts as hung


class SeamError(Exception):
    """The learner's function failed: the message names the file, the line and what happened."""


@dataclass
class _Loaded:
    fn: Callable[..., Any]
    path: str
    mtime: float


def seams_path(run_dir: str) -> str:
    return os.path.join(run_dir, SEAMS_FILE)


def where(exc: BaseException, path: str) -> str:
    """'file:line' of the deepest frame of `exc` inside the learner's file (or just the file)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) == path]
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"{path}:{exc.lineno}"
    return f"{path}:{frames[-1].lineno}" if frames else path


def load_function(spec: str) -> _Loaded:
    """`path/to/file.py:function` -> the function, imported fresh from that file."""
    path, _, name = spec.rpartition(":")
    path = os.path.abspath(path)
    try:
        mtime = os.stat(path).st_mtime
        module_spec = importlib.util.spec_from_file_location(f"learner_{abs(hash(path))}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except FileNotFoundError:
        raise SeamError(f"{path}: the exercise file is missing (ambient-lab ex reset restores it)") from None
    except Exception as e:  # noqa: BLE001 - any error in the learner's module is reported, not raised
        raise SeamError(f"{where(e, path)}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SeamError(f"{path}: no function named {name!r}")
    return _Loaded(fn, path, mtime)


def call_contained(loaded: _Loaded, args: tuple, kwargs: dict, timeout: float = CALL_TIMEOUT) -> Any:
    """Run the learner's function in a thread of its own; its errors become SeamError."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = loaded.fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the learner
            box["error"] = e

    t = threading.Thread(target=run, name="learner-code", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise SeamError(f"{loaded.path}: {loaded.fn.__name__}() did not return within {timeout:.0f} s "
                        "(an endless loop?); the component moved on without it")
    if "error" in box:
        e = box["error"]
        raise SeamError(f"{where(e, loaded.path)}: {type(e).__name__}: {e}")
    return box.get("value")


class Seams:
    """One component's view of its lab's seams file, re-read when it changes (one stat a call)."""

    def __init__(self, run_dir: str) -> None:
        self.path = seams_path(run_dir)
        self._mtime = -1.0
        self._specs: dict[str, str] = {}
        self._loaded: dict[str, _Loaded] = {}

    def _refresh(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            self._mtime, self._specs, self._loaded = -1.0, {}, {}
            return
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                with open(self.path) as f:
                    self._specs = {str(k): str(v) for k, v in json.load(f).items()}
            except (OSError, ValueError):
                self._specs = {}
            self._loaded = {}

    def active(self, name: str) -> str:
        """The learner's `file:function` plugged in at `name`, or ""."""
        self._refresh()
        return self._specs.get(name, "")

    def get(self, name: str, default: Callable[..., Any],
            check: Callable[[Any], str | None] | None = None) -> Callable[..., Any]:
        """The function to call at seam `name`: the component's own, or the learner's, contained.
        `check(value)` returns what is wrong with a returned value (None: fine)."""
        spec = self.active(name)
        if not spec:
            return default

        def learner(*args: Any, **kwargs: Any) -> Any:
            loaded = self._loaded.get(name)
            try:
                fresh = loaded is not None and os.stat(loaded.path).st_mtime == loaded.mtime
            except FileNotFoundError:
                fresh = False
            if not fresh:
                loaded = self._loaded[name] = load_function(spec)
            assert loaded is not None
            value = call_contained(loaded, args, kwargs)
            problem = check(value) if check is not None else None
            if problem:
                raise SeamError(f"{loaded.path}: {loaded.fn.__name__}() returned {value!r:.120}: {problem}")
            return value

        return learner
