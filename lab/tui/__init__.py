"""The lab's TUI: k9s-shaped, a client of the supervisor only (design.md, "Layering").

`lab/tui/model.py` (the view model), `backend.py` (live supervisor or a recording),
`commands.py`, `resources.py`, `steps.py` and `wire.py` are plain Python; only `app.py`,
`screens/` and `widgets/` import Textual, and importing this package imports none of them.
Start it with `run()` (the CLI's `ambient-lab tui`).
"""

from __future__ import annotations


def run(lab: str, files: list[str] | None = None, down_on_exit: bool = False, start: bool = True) -> int:
    """Open the TUI on lab `lab`, bringing it up from `files` first if it is not running.

    With `down_on_exit`, the lab is removed when the TUI quits (`ambient-lab down`), whether or
    not this TUI started it. Returns the process exit code.
    """
    from lab.tui.app import LabApp
    from lab.tui.backend import LiveBackend

    backend = LiveBackend(lab, files=files, start_if_needed=start)
    app = LabApp(backend)
    try:
        app.run()
    finally:
        backend.stop()
        if down_on_exit:
            from lab.supervisor.lifecycle import down_one

            down_one(lab)
        elif getattr(backend, "live", True):
            import sys

            print(f"lab {lab!r} is still running: `sudo ambient-lab down --name {lab}` removes it", file=sys.stderr)
    return app.return_code or 0
