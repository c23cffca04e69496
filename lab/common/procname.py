"""Process names: every process the lab starts is named after the component it plays.

In a real cluster, `ss -tlnp` inside a meshed pod shows its listeners on 15001, 15006 and 15008
owned by `ztunnel`, though ztunnel runs in its own pod: the node's ztunnel opened them inside the
pod's network namespace (ztunnel `src/inpod`). The lab's components are Python programs, so
without this the kernel would call every one of them `python3.12` and that moment would be lost.

Two names matter, and `prctl(PR_SET_NAME)` alone sets only the first:
- the kernel's short name (`/proc/PID/comm`, at most 15 bytes), shown by `ss -p`, `ps -o comm`,
  `top` and `pgrep`;
- the command line (`/proc/PID/cmdline`), shown by `ps -ef` and `ps -o args`. setproctitle (a
  maintained library, the one PostgreSQL-style process titles in Python use) rewrites it.
"""

from __future__ import annotations

import sys

COMM_MAX = 15  # TASK_COMM_LEN - 1


def set_comm(name: str) -> None:
    """Set the kernel's short name of this process (its main thread) to `name`.

    Writing /proc/self/comm needs no library: the apps, which start with the standard library
    only (`python -S`), call this alone; their command line already names the app.
    """
    with open("/proc/self/comm", "w") as f:
        f.write(name[:COMM_MAX])


def name_process(name: str) -> None:
    """Name this process `name`: its short name, and a command line `name ARGS...` (the
    `python -m lab.<module>` prefix dropped, the arguments kept, as `ps -ef` would show a real
    binary). Call it first thing in main, before any thread starts: threads inherit the name."""
    import setproctitle

    setproctitle.setproctitle(" ".join([name, *sys.argv[1:]]))
    set_comm(name)
