"""`python -m lab.tui [--name LAB] [-f FILE] [--down-on-exit] [--recording DIR]`.

The CLI's `ambient-lab tui` does the same; `--recording` opens a recorded lab instead (no root,
nothing to change: e.g. tests/tui/fixtures/bookinfo).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lab.common.state import DEFAULT_LAB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.tui", description="The lab's TUI (k9s-shaped).")
    ap.add_argument("--name", default=os.environ.get("AMBIENT_LAB") or DEFAULT_LAB, help="the lab to open")
    ap.add_argument("-f", "--filename", action="append", default=[],
                    help="manifests to build the lab from when it is not running (default: the bookinfo scenario)")
    ap.add_argument("--down-on-exit", action="store_true", help="remove the lab when the TUI quits")
    ap.add_argument("--recording", metavar="DIR", help="open a recorded lab instead of a live one")
    args = ap.parse_args(argv)
    if args.recording:
        from lab.tui.app import LabApp
        from lab.tui.backend import RecordedBackend

        LabApp(RecordedBackend(args.recording)).run()
        return 0
    from lab.tui import run

    return run(args.name, files=[str(Path(f).resolve()) for f in args.filename], down_on_exit=args.down_on_exit)


if __name__ == "__main__":
    sys.exit(main())
