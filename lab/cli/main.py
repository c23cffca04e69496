"""`ambient-lab`: the lab's command line, shaped like kubectl (and, for the mesh, istioctl).

Every command takes `--name LAB` and otherwise acts on the default lab. Commands that change
or read the cluster are requests to the lab's supervisor (lab/supervisor); `exec` and `logs`
run here, in the caller's terminal, inside the pod's network namespace.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from lab.cli import exercises
from lab.common import state
from lab.common.errors import LabError
from lab.common.state import DEFAULT_LAB
from lab.kube import manifests
from lab.supervisor.lifecycle import down_one, start_lab, supervisor_alive

NEXT_STEPS = """\
Next, in this terminal or another one (as root):
  ambient-lab get pods -o wide                      the pods, their IPs and nodes
  ambient-lab exec deploy/curl -- curl -s http://productpage:9080/productpage | grep -o '<title>.*</title>'
  ambient-lab get svc                               the ClusterIPs kube-proxy serves
  ip netns list                                     every node and pod is a network namespace
  ip netns exec {node} iptables-legacy-save -t nat   kube-proxy's rules on a node
  ambient-lab label namespace default istio.io/dataplane-mode=ambient
  ambient-lab down                                  remove the lab (nothing is left behind)"""


def need_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root: it creates network namespaces, veths and iptables rules",
                       "run it with sudo, e.g. sudo ambient-lab up")


def lab_name(args: argparse.Namespace) -> str:
    return state.check_lab_name(args.name or os.environ.get("AMBIENT_LAB") or DEFAULT_LAB)


def request(args: argparse.Namespace, op: str, **fields) -> dict:
    from lab.supervisor.client import call

    return call(lab_name(args), op, **fields)


def emit(reply: dict) -> int:
    if reply.get("stdout"):
        print(reply["stdout"])
    if reply.get("stderr"):
        print(reply["stderr"], file=sys.stderr)
    return int(reply.get("exit", 0))


# -- up / down / status ------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    need_root()
    files = [str(Path(f).resolve()) for f in args.filename]
    lab = lab_name(args)
    took = start_lab(lab, files, nodes=args.nodes, quiet=args.quiet, no_cni_taint=args.no_cni_taint,
                     cert_ttl=args.cert_ttl)
    if not args.quiet:
        print(f"lab {lab!r} is up ({took:.2f}s). ", file=sys.stderr)
        print(NEXT_STEPS.format(node=f"{lab}-worker"), file=sys.stderr)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    need_root()
    labs = state.running_labs() if args.all else [lab_name(args)]
    if args.all and not labs:
        print("no labs to remove", file=sys.stderr)
    for lab in labs:
        down_one(lab)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = lab_name(args)
    r = request(args, "status")
    print(f"lab {lab}: up {int(r['uptime'])}s, {r['pods']['running']}/{r['pods']['total']} pods running, "
          f"{r['services']} services, {r['netns']} network namespaces, {r['processes']} processes")
    for n in r["nodes"]:
        print(f"  node {n['name']:<24} {n['ip']:<12} pods {n['pod_cidr']:<16} netns {n['netns']}")
    return 0


# -- kubectl-shaped commands -------------------------------------------------------------------
def cmd_get(args: argparse.Namespace) -> int:
    name = args.name_arg
    kind = args.kind
    if "/" in kind and not name:
        kind, name = kind.split("/", 1)
    r = request(args, "get", kind=kind, name=name, namespace=args.namespace, all_namespaces=args.all_namespaces,
                output=args.output or "", show_labels=args.show_labels)
    return emit(r)


def read_docs(filenames: list[str]) -> list[dict]:
    docs = []
    for f in filenames:
        if f == "-":
            docs.append({"text": sys.stdin.read(), "file": "<stdin>"})
            continue
        for path in manifests.manifest_files([f]):
            docs.append({"text": path.read_text(), "file": str(path)})
    return docs


def cmd_apply(args: argparse.Namespace, op: str = "apply") -> int:
    docs = read_docs(args.filename)
    # Validate here too, so a bad file fails with its path before the lab is touched.
    for d in docs:
        manifests.load_text(d["text"], d["file"], args.namespace or "")
    return emit(request(args, op, docs=docs, namespace=args.namespace))


def cmd_delete(args: argparse.Namespace) -> int:
    return cmd_apply(args, "delete")


def parse_label_changes(words: list[str]) -> dict[str, str | None]:
    changes: dict[str, str | None] = {}
    for w in words:
        if w.endswith("-") and "=" not in w:
            changes[w[:-1]] = None
        elif "=" in w:
            k, v = w.split("=", 1)
            if not k:
                raise LabError(f"invalid label {w!r}", "write labels as key=value, or key- to remove one")
            changes[k] = v
        else:
            raise LabError(f"invalid label {w!r}", "write labels as key=value, or key- to remove one")
    return changes


def cmd_label(args: argparse.Namespace) -> int:
    words = list(args.words)
    target = words.pop(0)
    if "/" in target:
        kind, name = target.split("/", 1)
    else:
        if not words:
            raise LabError("label needs a kind and a name", "e.g. ambient-lab label namespace default key=value")
        kind, name = target, words.pop(0)
    if not words:
        raise LabError("at least one label update is required", "e.g. istio.io/dataplane-mode=ambient, or key- to remove")
    return emit(request(args, "label", kind=kind, name=name, namespace=args.namespace,
                        changes=parse_label_changes(words), overwrite=args.overwrite))


def cmd_exec(args: argparse.Namespace) -> int:
    need_root()
    cmd = args.command
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise LabError("you must specify at least one command for the container",
                       "e.g. ambient-lab exec deploy/curl -- curl -s http://productpage:9080/productpage")
    pod = request(args, "resolve_pod", ref=args.pod, namespace=args.namespace)
    if pod["phase"] != "Running":
        raise LabError(f"pod {pod['pod']} is {pod['phase']}, not Running", "wait for it, or see ambient-lab get pods")
    env = {**os.environ, "HOSTNAME": pod["pod"]}
    try:
        rc = subprocess.call(["ip", "netns", "exec", pod["netns"], *cmd], env=env)
    except KeyboardInterrupt:
        rc = 130
    if rc != 0:
        print(f"command terminated with exit code {rc}", file=sys.stderr)
    return rc


COMPONENT_LOGS = {"ztunnel": "ztunnel", "istiod": "istiod", "cni": "istio-cni", "istio-cni": "istio-cni",
                  "kube-dns": "kube-dns", "coredns": "kube-dns"}


def component_log_files(args: argparse.Namespace, what: str) -> list[tuple[str, str]]:
    """(node, log path) of a component on every node, or on --node."""
    lab = lab_name(args)
    nodes = [n["name"] for n in request(args, "status")["nodes"]]
    if args.node:
        nodes = [n for n in nodes if args.node in (n, n.removeprefix(lab + "-"))]
        if not nodes:
            raise LabError(f'nodes "{args.node}" not found', "see: ambient-lab get nodes")
    files = [(n, os.path.join(state.run_dir(lab), "logs", f"{what}_{n}.log")) for n in nodes]
    return [(n, f) for n, f in files if os.path.exists(f)]


def cmd_logs(args: argparse.Namespace) -> int:
    if args.pod in COMPONENT_LOGS:
        files = component_log_files(args, COMPONENT_LOGS[args.pod])
        if not files:
            raise LabError(f"no {args.pod} logs in lab {lab_name(args)!r}")
        for node, path in files:
            prefix = f"[{node}] " if len(files) > 1 else ""
            lines = open(path, errors="replace").read().splitlines()
            if args.tail is not None:
                lines = lines[-args.tail:] if args.tail else []
            for line in lines:
                print(prefix + line)
        if args.follow:
            return follow_files(files)
        return 0
    pod = request(args, "resolve_pod", ref=args.pod, namespace=args.namespace)
    path = pod["log"]
    with open(path, "rb") as f:
        data = f.read()
        lines = data.decode(errors="replace").splitlines()
        if args.tail is not None and args.tail >= 0:
            lines = lines[-args.tail:] if args.tail else []
        for line in lines:
            print(line)
        if args.follow:
            try:
                while True:
                    chunk = f.read()
                    if chunk:
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                    else:
                        time.sleep(0.2)
            except KeyboardInterrupt:
                return 0
    return 0


def follow_files(files: list[tuple[str, str]]) -> int:
    handles = [(n, open(p, errors="replace")) for n, p in files]
    for _, h in handles:
        h.seek(0, os.SEEK_END)
    try:
        while True:
            quiet = True
            for n, h in handles:
                for line in h.readlines():
                    quiet = False
                    print((f"[{n}] " if len(handles) > 1 else "") + line, end="", flush=True)
            if quiet:
                time.sleep(0.2)
    except KeyboardInterrupt:
        return 0


def ztunnel_admin(args: argparse.Namespace, op: str) -> list[tuple[str, object, str]]:
    """Ask every node's ztunnel (or --node's) over its admin socket: [(node, answer, error)]."""
    from lab.common.admin_socket import admin_request
    from lab.supervisor.components import NodeSockets

    lab = lab_name(args)
    out: list[tuple[str, object, str]] = []
    for n in request(args, "status")["nodes"]:
        if args.node and args.node not in (n["name"], n["name"].removeprefix(lab + "-")):
            continue
        try:
            out.append((n["name"], admin_request(NodeSockets.of(lab, n["name"]).ztunnel_admin, op, timeout=10), ""))
        except (OSError, ValueError) as e:
            out.append((n["name"], None, f"ztunnel on {n['name']} does not answer ({e})"))
    return out


def cmd_ztunnel_config(args: argparse.Namespace) -> int:
    from lab.cli import ztunnel_config

    which = ztunnel_config.section(args.section)
    rc = 0
    for node, dump, error in ztunnel_admin(args, "config_dump"):
        if error:
            print(f"error: {error}", file=sys.stderr)
            rc = 1
            continue
        if args.output == "json":
            print(ztunnel_config.render_json(which, dump))
        else:
            print(f"# ztunnel on {node}")
            print(ztunnel_config.render(which, dump))
            print()
    return rc


def cmd_metrics(args: argparse.Namespace) -> int:
    """Prometheus text from every ztunnel (istio_tcp_*) and every waypoint (istio_requests_total, ...)."""
    rc = 0
    for node, text, error in ztunnel_admin(args, "metrics"):
        if error:
            print(f"# error: {error}", file=sys.stderr)
            rc = 1
            continue
        print(f"# ztunnel on {node}")
        print(str(text).rstrip("\n"))
    if args.node:
        return rc
    from lab.common.admin_socket import admin_request

    for w in request(args, "waypoints", all_namespaces=True)["waypoints"]:
        try:
            text = admin_request(os.path.join(w["dir"], "admin.sock"), "metrics")
        except (OSError, ValueError) as e:
            print(f"# error: waypoint {w['namespace']}/{w['name']} does not answer ({e})", file=sys.stderr)
            rc = 1
            continue
        print(f"# waypoint {w['namespace']}/{w['name']}")
        print(str(text).rstrip("\n"))
    return rc


def cmd_capture(args: argparse.Namespace) -> int:
    """tcpdump (or tshark with --decrypt) in a pod's or node's namespace, as the docs suggest for proving mTLS."""
    need_root()
    lab = lab_name(args)
    nodes = {n["name"]: n for n in request(args, "status")["nodes"]}
    short = {name.removeprefix(lab + "-"): name for name in nodes}
    node_name = args.target if args.target in nodes else short.get(args.target)
    if node_name:
        netns_name = nodes[node_name]["netns"]
    else:
        netns_name = request(args, "resolve_pod", ref=args.target, namespace=args.namespace)["netns"]
    iface = args.iface or ("any" if node_name else "eth0")
    if args.decrypt:
        return capture_decrypted(lab, netns_name, iface, args)
    cmd = ["tcpdump", "-i", iface, "-n", "-l", "-c", str(args.count or 20)] + ([args.filter] if args.filter else [])
    full = ["ip", "netns", "exec", netns_name, *cmd]
    print("# " + " ".join(full), file=sys.stderr)
    try:
        return subprocess.call(full)
    except KeyboardInterrupt:
        return 0


def capture_decrypted(lab: str, netns_name: str, iface: str, args: argparse.Namespace) -> int:
    """Record HBONE (port 15008) with tcpdump, then let tshark decrypt it with the lab's TLS key log.

    TLS 1.3 can be decrypted only from the start of a connection (the handshake must be in the
    capture), so start this before the traffic; pooled tunnels opened earlier stay opaque.
    """
    from lab.supervisor.components import tls_keylog

    pcap = os.path.join(state.run_dir(lab), f"capture-{os.getpid()}.pcap")
    record = ["ip", "netns", "exec", netns_name, "tcpdump", "-i", iface, "-n", "-U", "-w", pcap,
              "-c", str(args.count or 40), args.filter or "tcp port 15008"]
    print("# " + " ".join(record), file=sys.stderr)
    print("# recording until the packet count is reached (Ctrl-C to stop early)...", file=sys.stderr)
    try:
        proc = subprocess.Popen(record, stderr=subprocess.DEVNULL)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
        decode = ["tshark", "-r", pcap, "-n", "-o", f"tls.keylog_file:{tls_keylog(lab)}", "-d", "tcp.port==15008,tls",
                  "-Y", "http2.type == 1", "-O", "http2"]
        print("# " + " ".join(decode), file=sys.stderr)
        out = subprocess.run(decode, capture_output=True, text=True).stdout
    finally:
        if os.path.exists(pcap):
            os.unlink(pcap)
    for line in out.splitlines():
        text = line.strip()
        if line.startswith("Frame ") or line.startswith("Internet Protocol") or text.startswith("Stream: HEADERS") \
                or text.startswith("Header: "):
            print(line)
    return 0


WAYPOINT_YAML = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    istio.io/waypoint-for: {waypoint_for}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"""


def cmd_waypoint(args: argparse.Namespace) -> int:
    """`istioctl waypoint apply|list|delete|generate`, with istioctl's messages."""
    ns = args.namespace or "default"
    text = WAYPOINT_YAML.format(name=args.waypoint, namespace=ns, waypoint_for=args.waypoint_for)
    if args.action == "generate":
        print(text, end="")
        return 0
    if args.action == "apply":
        request(args, "apply", docs=[{"text": text, "file": "<waypoint apply>"}], namespace=ns)
        print(f"waypoint {ns}/{args.waypoint} applied")
        if args.enroll_namespace:
            request(args, "label", kind="namespace", name=ns, namespace=ns, overwrite=True,
                    changes={"istio.io/use-waypoint": args.waypoint})
            print(f'namespace {ns} labeled with "istio.io/use-waypoint: {args.waypoint}"')
        if args.wait:
            deadline = time.monotonic() + 60
            while not any(w["name"] == args.waypoint and w["programmed"] == "True"
                          for w in request(args, "waypoints", namespace=ns)["waypoints"]):
                if time.monotonic() > deadline:
                    raise LabError(f"waypoint {ns}/{args.waypoint} is not programmed after 60s",
                                   f"see: ambient-lab get pods -n {ns}; ambient-lab logs deploy/{args.waypoint} -n {ns}")
                time.sleep(0.1)
        return 0
    if args.action == "delete":
        request(args, "delete", docs=[{"text": text, "file": "<waypoint delete>"}], namespace=ns)
        print(f"waypoint {ns}/{args.waypoint} deleted")
        return 0
    rows = request(args, "waypoints", namespace=ns, all_namespaces=args.all_namespaces)["waypoints"]
    if not rows:
        print("No waypoints found.", file=sys.stderr)
        return 0
    from lab.kube.printers import tabulate

    head = (["NAMESPACE"] if args.all_namespaces else []) + ["NAME", "REVISION", "PROGRAMMED"]
    body = [([w["namespace"]] if args.all_namespaces else []) + [w["name"], "default", w["programmed"]] for w in rows]
    print(tabulate([head, *body]), end="")
    return 0


def cmd_flows(args: argparse.Namespace) -> int:
    """The waypoints' HTTP flows, as `mitmdump -nr` prints them; the files open in mitmproxy/mitmweb as they are."""
    from lab.waypoint.flows import format_flow_line, read_flows

    rows = request(args, "waypoints", namespace=args.namespace, all_namespaces=True)["waypoints"]
    if args.waypoint:
        rows = [w for w in rows if args.waypoint in (w["name"], f"{w['namespace']}/{w['name']}")]
    files = [os.path.join(w["dir"], "flows.mitm") for w in rows]
    if not files:
        raise LabError("no waypoint in this lab", "deploy one: ambient-lab waypoint apply --enroll-namespace --wait")
    seen = {f: 0 for f in files}
    try:
        while True:
            for f in files:
                if os.path.exists(f):
                    flows = list(read_flows(f))
                    for flow in flows[seen[f]:]:
                        print(format_flow_line(flow), flush=True)
                    seen[f] = len(flows)
            if not args.follow:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    if not args.follow:
        print("# files: " + " ".join(files) + "  (mitmproxy -r FILE, or mitmweb -r FILE, opens them)", file=sys.stderr)
    return 0


STEP_USAGE = """\
ambient-lab step on             new connections wait before each step (every ztunnel and waypoint)
ambient-lab step held           what waits, where, and what will happen next
ambient-lab step next [FLOW]    one step: of FLOW (an id or its first characters), or of every held flow
ambient-lab step flow FLOW      FLOW runs to its end (through every proxy it still meets)
ambient-lab step all            every held flow runs to its end
ambient-lab step off            step mode ends: everything held goes on"""


def _wait_for_new_holds(args: argparse.Namespace, after: float, flows: set[str], timeout: float = 1.0) -> dict:
    """After a release: wait (briefly) until one of the released flows waits again, then the held list."""
    deadline = time.monotonic() + timeout
    while True:
        reply = request(args, "step_held")
        if not flows or any(h["flow"] in flows and h.get("since", 0) >= after for h in reply["held"]) \
                or time.monotonic() >= deadline:
            return reply
        time.sleep(0.05)


def cmd_step(args: argparse.Namespace) -> int:
    """Step mode, the mesh debugger: hold new connections in the proxies before each step."""
    import json

    from lab.supervisor.stepping import render_held

    lab = lab_name(args)
    action = args.action
    if action in ("on", "off"):
        reply = request(args, "step_mode", on=action == "on", **({"timeout": args.timeout} if args.timeout else {}))
        down = [p for p in reply["proxies"] if not p["ok"]]
        up_ = [p["name"] for p in reply["proxies"] if p["ok"]]
        ztunnels = sum(n.startswith("ztunnel") for n in up_)
        waypoints = len(up_) - ztunnels
        if action == "on":
            print(f"step mode on: {ztunnels} ztunnel(s) and {waypoints} waypoint(s) hold every NEW connection "
                  f"before each step (connections already open carry on).")
            print("  see what waits:   ambient-lab step held")
            print("  advance:          ambient-lab step next [FLOW] | step flow FLOW | step all")
            print("  end:              ambient-lab step off (releases everything)")
        else:
            print(f"step mode off: {len(reply['released'])} held step(s) released; connections run freely.")
        for p in down:
            print(f"warning: {p['error']}", file=sys.stderr)
        return 0
    if action == "held":
        reply = request(args, "step_held")
        if args.output == "json":
            print(json.dumps(reply["held"], indent=1))
            return 0
        print(f"step mode is {'on' if reply['on'] else 'off'}")
        print(render_held(reply["held"], lab))
        return 0
    if action == "flow" and not args.flow:
        raise LabError("which flow? ambient-lab step flow FLOW", "see the held flows: ambient-lab step held")
    flow = "*" if action == "all" else (args.flow or "*")
    scope = "step" if action == "next" else "flow"
    t0 = time.time()
    reply = request(args, "step_release", flow=flow, scope=scope)
    released = reply["released"]
    if scope == "step":
        after = _wait_for_new_holds(args, t0, {r["flow"] for r in released})
    else:
        after = request(args, "step_held")
    if args.output == "json":
        print(json.dumps({"released": released, "held": after["held"]}, indent=1))
        return 0
    if not released:
        print("nothing was held" + (f" for flow {flow[:12]}" if flow != "*" else "")
              + (": it will run to its end wherever it goes next" if scope == "flow" and flow != "*" else ""))
    for r in released:
        where = str(r.get("where", "")).replace(f"@{lab}-", "@")
        print(f"released {r['flow'][:12]} at {where}: {r['step']}"
              + (" (and every later step)" if scope == "flow" else ""))
    print()
    print(render_held(after["held"], lab))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from lab.common.events import Event
    from lab.supervisor.client import request as sup_request

    try:
        for msg in sup_request(lab_name(args), "trace", timeout=None, follow=args.follow, pod=args.pod or ""):
            if "event" in msg:
                ev = Event.from_dict(msg["event"])
                if args.output == "json":
                    print(ev.to_json(), flush=True)
                else:
                    print(ev.line(), flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_iptables(args: argparse.Namespace) -> int:
    """A pod's iptables rules, read from the kernel inside its namespace, with packet counters."""
    need_root()
    from lab.cni.iptables import read_inpod_rules

    pod = request(args, "resolve_pod", ref=args.pod, namespace=args.namespace)
    table = f" -t {args.table}" if args.table else ""
    print(f"# sudo ip netns exec {pod['netns']} iptables-legacy-save -c{table}", file=sys.stderr)
    print(read_inpod_rules(pod["netns"], table=args.table), end="")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    return emit(request(args, "kill", component=args.component, node=args.node, namespace=args.namespace))


def cmd_restart(args: argparse.Namespace) -> int:
    return emit(request(args, "restart", component=args.component, node=args.node, namespace=args.namespace))


def lab_checks(lab: str) -> list:
    """doctor's checks of a running lab: its per-node components, and ambient pods that escaped capture."""
    from lab.cli.doctor import Check
    from lab.supervisor.client import call

    r = call(lab, "components")
    checks = []
    for c in r["components"]:
        checks.append(Check(f"lab {lab}: {c['component']} on {c['node']}", c["running"],
                            f"pid {c['pid']}" if c["running"] else "not running",
                            f"ambient-lab restart {c['component']} {c['node']} --name {lab}"))
    for pod in r["uncaptured"]:
        checks.append(Check(f"lab {lab}: pod {pod} is captured", False,
                            "its namespace is ambient but the pod has no ambient.istio.io/redirection: it started "
                            "before istio-cni was installed on its node, and its traffic bypasses ztunnel until "
                            "the agent's informer enrols it",
                            f"check istio-cni on its node (ambient-lab logs cni --name {lab}); connections the pod "
                            "opened before capture stay outside the mesh until it restarts"))
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    from lab.cli import doctor

    labs = [lab_name(args)] if args.name else [lab for lab in state.running_labs() if supervisor_alive(lab)]
    extra = [lambda lab=lab: lab_checks(lab) for lab in labs]
    checks = doctor.run_checks()
    for fn in extra:
        try:
            checks += fn()
        except LabError as e:
            checks.append(doctor.Check(f"lab {lab_name(args)}", False, e.message, e.fix))
    print(doctor.format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


def cmd_tui(args: argparse.Namespace) -> int:
    """The TUI: attach to the lab, or bring it up first (with its progress on screen)."""
    need_root()
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise LabError("the TUI needs a terminal", "run it in a terminal, or use the commands: ambient-lab --help")
    from lab.tui import run

    files = [str(Path(f).resolve()) for f in getattr(args, "filename", [])]
    return run(lab_name(args), files=files or None, down_on_exit=getattr(args, "down_on_exit", False))


def cmd_default(args: argparse.Namespace) -> int:
    """No command: the TUI in a terminal; elsewhere, bring up the default lab and say what to do next."""
    need_root()
    if sys.stdin.isatty() and sys.stdout.isatty():
        args.filename, args.down_on_exit = [], False
        return cmd_tui(args)
    lab = lab_name(args)
    if supervisor_alive(lab):
        print(f"lab {lab!r} is already running.", file=sys.stderr)
        print(NEXT_STEPS.format(node=f"{lab}-worker"), file=sys.stderr)
        return 0
    took = start_lab(lab, [])
    print(f"lab {lab!r} is up ({took:.2f}s). ", file=sys.stderr)
    print(NEXT_STEPS.format(node=f"{lab}-worker"), file=sys.stderr)
    return 0


# -- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", help=f"the lab to act on (default: $AMBIENT_LAB or {DEFAULT_LAB!r})")
    ns = argparse.ArgumentParser(add_help=False)
    ns.add_argument("-n", "--namespace", help="the Kubernetes namespace (default: default)")

    ap = argparse.ArgumentParser(prog="ambient-lab", parents=[common],
                                 description="Learn Istio ambient mode on a cluster of Linux network namespaces.",
                                 epilog="With no command: the TUI (bringing up the default lab, bookinfo + curl + sleep, "
                                        "if it is not running). `ambient-lab COMMAND -h` explains each command.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("tui", parents=[common], help="the terminal UI (also: ambient-lab with no command)")
    p.add_argument("-f", "--filename", action="append", default=[], help="manifests for a lab it brings up")
    p.add_argument("--down-on-exit", action="store_true", help="remove the lab when the TUI quits")
    p.set_defaults(func=cmd_tui)

    p = sub.add_parser("up", parents=[common], help="build a lab from manifests and start its supervisor")
    p.add_argument("-f", "--filename", action="append", default=[], help="manifest file or directory (repeatable); "
                   "default: the bookinfo + curl + sleep scenario")
    p.add_argument("--nodes", type=int, default=0, help="worker nodes (default 2, or a kind cluster file's count)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--no-cni-taint", action="store_true",
                   help="reproduce Istio's start-up race: no cni.istio.io/not-ready taint, pods start before istio-cni")
    p.add_argument("--cert-ttl", type=int, default=0, metavar="SECONDS",
                   help="workload certificate lifetime (default 24h); short values show rotation at half-life")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", parents=[common], help="remove a lab: every namespace, process and file it made")
    p.add_argument("--all", action="store_true", help="remove every lab on this machine")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", parents=[common], help="the lab's nodes, pods and processes at a glance")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("get", parents=[common, ns], help="list objects, like kubectl get",
                       description="kinds: nodes, pods (po), services (svc), namespaces (ns), serviceaccounts (sa), "
                                   "deployments (deploy), gateways (gtw), httproutes, authorizationpolicies")
    p.add_argument("kind")
    p.add_argument("name_arg", nargs="?", metavar="NAME")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=["wide", "yaml", "json", "name"])
    p.add_argument("--show-labels", action="store_true")
    p.set_defaults(func=cmd_get)

    for verb, fn, text in (("apply", cmd_apply, "create or update objects from manifests"),
                           ("delete", cmd_delete, "delete the objects a manifest names")):
        p = sub.add_parser(verb, parents=[common, ns], help=text)
        p.add_argument("-f", "--filename", action="append", required=True, help="file, directory, or - for stdin")
        p.set_defaults(func=fn)

    p = sub.add_parser("label", parents=[common, ns], help="set (key=value) or remove (key-) labels",
                       description="e.g. ambient-lab label namespace default istio.io/dataplane-mode=ambient")
    p.add_argument("words", nargs="+", metavar="KIND NAME KEY=VALUE|KEY-")
    p.add_argument("--overwrite", action="store_true", help="replace a label that already has a value")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("exec", parents=[common, ns], help="run a command inside a pod's network namespace",
                       description="e.g. ambient-lab exec deploy/curl -- curl -s http://productpage:9080/productpage")
    p.add_argument("-i", "--stdin", action="store_true", help="accepted for kubectl compatibility (always on)")
    p.add_argument("-t", "--tty", action="store_true", help="accepted for kubectl compatibility")
    p.add_argument("pod", metavar="POD|deploy/NAME")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("logs", parents=[common, ns], help="a pod's app log, or ztunnel's, istiod's, cni's",
                       description="e.g. ambient-lab logs deploy/productpage; ambient-lab logs ztunnel --node worker2")
    p.add_argument("pod", metavar="POD|deploy/NAME|ztunnel|istiod|cni|kube-dns")
    p.add_argument("--node", help="for component logs: one node only")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=int, default=None)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("trace", parents=[common], help="the lab's event stream, one readable line per step")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    p.add_argument("--pod", help="only events about pods whose name starts with this")
    p.add_argument("-o", "--output", choices=["json"], help="one JSON object per line")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("step", parents=[common], help="step mode: hold new connections before each step (a debugger)",
                       description="Step mode, the mesh debugger: the proxies (every ztunnel and waypoint) hold each "
                                   "NEW connection before each of its steps until you release it.",
                       epilog=STEP_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["on", "off", "held", "next", "flow", "all"])
    p.add_argument("flow", nargs="?", metavar="FLOW", help="a flow id, or its first characters (next, flow)")
    p.add_argument("--timeout", type=float, help="with on: release any step held longer than this (default 600 s)")
    p.add_argument("-o", "--output", choices=["json"])
    p.set_defaults(func=cmd_step)

    p = sub.add_parser("iptables", parents=[common, ns], help="a pod's iptables rules from the kernel, with counters")
    p.add_argument("pod", metavar="POD|deploy/NAME")
    p.add_argument("-t", "--table", choices=["nat", "mangle", "raw", "filter"])
    p.set_defaults(func=cmd_iptables)

    for verb, fn, text in (("kill", cmd_kill, "kill a component (SIGKILL), to see what fails"),
                           ("restart", cmd_restart, "start a killed component again")):
        p = sub.add_parser(verb, parents=[common, ns], help=text,
                           description="ztunnel, istio-cni, kube-dns and istiod run per node (istiod: on the "
                                       "control-plane node); a waypoint is named (default: waypoint) in -n NS")
        p.add_argument("component", choices=["ztunnel", "istio-cni", "kube-dns", "istiod", "waypoint"])
        p.add_argument("node", metavar="NODE|WAYPOINT", nargs="?", default="waypoint",
                       help="node name (e.g. ambient-worker2 or worker2), or the waypoint's name")
        p.set_defaults(func=fn)

    p = sub.add_parser("ztunnel-config", aliases=["zc"], parents=[common],
                       help="ztunnel's own view: workloads, services, policies, certificates, connections",
                       description="istioctl ztunnel-config, read from each node's ztunnel")
    p.add_argument("section", nargs="?", default="all",
                   help="workloads | services | policies | certificates | connections | all")
    p.add_argument("--node", help="one node's ztunnel only")
    p.add_argument("-o", "--output", choices=["json"])
    p.set_defaults(func=cmd_ztunnel_config)

    p = sub.add_parser("metrics", parents=[common],
                       help="Prometheus metrics: ztunnels (istio_tcp_*) and waypoints (istio_requests_total)")
    p.add_argument("--node", help="one node's ztunnel only")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("capture", parents=[common, ns], help="tcpdump/tshark inside a pod or node namespace",
                       description="e.g. ambient-lab capture deploy/productpage (TLS on 15008 only); "
                                   "ambient-lab capture worker2 --decrypt (the HTTP/2 CONNECT inside HBONE)")
    p.add_argument("target", metavar="POD|deploy/NAME|NODE")
    p.add_argument("--iface", help="interface (default eth0 for a pod, any for a node); lo shows the plaintext leg")
    p.add_argument("--decrypt", action="store_true", help="tshark with ztunnel's TLS key log: HTTP/2 inside HBONE")
    p.add_argument("-c", "--count", type=int, default=0, help="stop after N packets (default 20; 40 with --decrypt)")
    p.add_argument("--filter", help="a capture filter (tcpdump) or display filter (tshark)")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("waypoint", parents=[common, ns], help="deploy, list or delete waypoints, like istioctl waypoint",
                       description="e.g. ambient-lab waypoint apply --enroll-namespace --wait")
    p.add_argument("action", choices=["apply", "list", "delete", "generate"])
    p.add_argument("waypoint", nargs="?", default="waypoint", metavar="WAYPOINT_NAME",
                   help="the waypoint's name (istioctl's --name; default: waypoint)")
    p.add_argument("--enroll-namespace", action="store_true", help="label the namespace istio.io/use-waypoint=NAME")
    p.add_argument("--wait", action="store_true", help="wait until the waypoint is programmed")
    p.add_argument("--for", dest="waypoint_for", default="service", choices=["service", "workload", "all", "none"],
                   help="what traffic the waypoint takes (istio.io/waypoint-for)")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.set_defaults(func=cmd_waypoint)

    p = sub.add_parser("flows", parents=[common, ns], help="the waypoints' HTTP flows, like mitmdump -nr")
    p.add_argument("--waypoint", help="one waypoint only (NAME or NS/NAME)")
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=cmd_flows)

    p = sub.add_parser("doctor", parents=[common], help="check this machine can run the lab, with the fix for each problem")
    p.set_defaults(func=cmd_doctor)

    exercises.add_parser(sub, common)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # kubectl takes flags between positionals (`label pod X -n ns key=value`): so does `label`.
    if unknown and getattr(args, "command", None) == "label" and not any(u.startswith("-") for u in unknown):
        args.words += unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    func = getattr(args, "func", cmd_default)
    try:
        return func(args)
    except LabError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
