"""Shared test set-up: where Istio's conformance files are, and how lab tests get root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CONFORMANCE = SHARED / "conformance" / "istio"
IN_CI = os.environ.get("CI") == "true"


def require_root() -> None:
    """Lab tests need root. Outside CI they are skipped without it; in CI that is a failure."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("lab tests must run as root in CI (sudo make test)")
        pytest.skip("lab tests need root (sudo make test)")


def require_conformance() -> Path:
    if not CONFORMANCE.is_dir():
        if IN_CI:
            pytest.fail(f"Istio's conformance files are missing: expected {CONFORMANCE}")
        pytest.skip(f"no conformance files at {CONFORMANCE}")
    return CONFORMANCE
