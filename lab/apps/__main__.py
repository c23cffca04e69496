"""``python -m lab.apps <app> --pod NAME --namespace NS --ports P1,P2 [--version vN] [--args ...]``

The entry point the supervisor's kubelet runs in a pod's network namespace, one process per
container: the counterpart of the container runtime starting an image's entrypoint. Logs go to
stdout (the pod's log file); SIGTERM ends the app promptly with exit status 0, as a well-behaved
container does when the kubelet stops it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lab.apps import APP_MODULES, DEFAULT_PORTS, AppOptions, process_name
from lab.common.procname import set_comm


def parse_ports(text: str) -> tuple[int, ...]:
    """``"9000,9001"`` -> (9000, 9001); empty -> ()."""
    ports = []
    for item in text.split(","):
        item = item.strip()
        if item:
            port = int(item)
            if not 0 <= port <= 65535:
                raise ValueError(f"port {port} out of range")
            ports.append(port)
    return tuple(ports)


def parse_args(argv: list[str]) -> AppOptions:
    """Turn the command line into AppOptions; exits with status 2 on a usage error."""
    parser = argparse.ArgumentParser(prog="python -m lab.apps",
                                     description="Run a stand-in app for a container image.")
    parser.add_argument("app", choices=sorted(APP_MODULES))
    parser.add_argument("--pod", default="", help="pod name (the real apps read $HOSTNAME)")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--ports", default=None,
                        help="comma-separated container ports (default: the image's)")
    parser.add_argument("--version", default="", help="image version, e.g. v2 for reviews")
    parser.add_argument("--listen", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    parser.add_argument("--args", nargs=argparse.REMAINDER, default=[],
                        help="the container's args (e.g. tcp-echo: 9000,9001 hello)")
    ns = parser.parse_args(argv)
    try:
        ports = DEFAULT_PORTS[ns.app] if ns.ports is None else parse_ports(ns.ports)
    except ValueError as exc:
        parser.error(f"--ports: {exc}")
    return AppOptions(app=ns.app, pod=ns.pod, namespace=ns.namespace, ports=ports,
                      version=ns.version, listen=ns.listen, args=tuple(ns.args))


def main(argv: list[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    set_comm(process_name(options.app))
    # stdout is the pod's log file: make every line reach it at once.
    sys.stdout.reconfigure(line_buffering=True)
    module = importlib.import_module(f"lab.apps.{APP_MODULES[options.app]}")
    return module.main(options)


if __name__ == "__main__":
    sys.exit(main())
