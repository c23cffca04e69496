"""The checks an exercise is graded by, each reading the learner's live lab, each with live hints.

A check is a function `(lab, spec, ctx) -> Result`, registered by name with `@check("name")`; the
manifest names it and gives its fields (`spec`). A Result says what was checked, what was
observed and what should be, the command that shows it by hand, and, when it fails, hints
computed from the state of that lab: the labels the pod really has, the policy that really
denied, the rule that is really missing. A sentence that ignores the state is not a live hint.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lab.course.live import LiveLab

DATAPLANE = "istio.io/dataplane-mode"
REDIRECTION = "ambient.istio.io/redirection"


@dataclass
class Result:
    ok: bool
    title: str  # what is checked, as a sentence
    observed: str = ""
    command: str = ""  # how to see it by hand
    hints: list[str] = field(default_factory=list)  # live hints, computed from the lab (when failing)
    retry: bool = True  # a failure may be the lab still settling: the runner retries for a while

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        text = f"{mark} {self.title}"
        if not self.ok and self.observed:
            text += f", but {self.observed}"
        return text


@dataclass
class Context:
    """What a check may need beyond the lab: when the exercise started, the learner's answer,
    the baseline recorded at start, and the exercise's own folder."""

    started: float = 0.0
    answer: str | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    exercise: Any = None
    computed_answer: Callable[[], Any] | None = None  # -> answers.Answer


Check = Callable[[LiveLab, dict, Context], Result]
CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS[name] = fn
        return fn
    return register


# -- helpers -------------------------------------------------------------------------------------
def pod_name(p: dict) -> str:
    return p["metadata"]["name"]


def annotations(p: dict) -> dict[str, str]:
    return dict(p["metadata"].get("annotations") or {})


def labels(p: dict) -> dict[str, str]:
    return dict(p["metadata"].get("labels") or {})


def matching_pods(lab: LiveLab, namespace: str, prefixes: list[str] | None) -> list[dict]:
    pods = [p for p in lab.pods(namespace) if not labels(p).get("gateway.networking.k8s.io/gateway-name")]
    return [p for p in pods if not prefixes or any(pod_name(p).startswith(x) for x in prefixes)]


def why_not_in_mesh(lab: LiveLab, p: dict) -> str:
    """A live hint for one pod that is not `enabled`: what its labels, its namespace's labels and
    its annotation say, and what that means."""
    ns = p["metadata"]["namespace"]
    ns_value = lab.namespace_labels(ns).get(DATAPLANE)
    pod_value = labels(p).get(DATAPLANE)
    state = annotations(p).get(REDIRECTION)
    name = pod_name(p)
    if state == "pending":
        node = p["spec"].get("nodeName", "?")
        down = [c for c in lab.components() if c["node"] == node and not c["running"]]
        why = (f"{', '.join(c['component'] for c in down)} on {node} is not running" if down
               else f"no ztunnel on {node} has taken it yet")
        return f"pod {name} is `pending`: istio-cni installed its rules, but {why}"
    if pod_value == "none":
        return f"pod {name} is labelled {DATAPLANE}=none: that opts it out of its namespace's enrolment"
    for where, value in ((f"namespace {ns}", ns_value), (f"pod {name}", pod_value)):
        if value is not None and value != "ambient":
            return (f"{where} is labelled {DATAPLANE}={value}, but only the value `ambient` enrols "
                    f"(istio-cni's enablement selectors)")
    if ns_value is None and pod_value is None:
        return (f"pod {name} is in namespace {ns}, which has no {DATAPLANE} label, and the pod itself has none: "
                f"nothing selects it for ambient")
    phase = p.get("status", {}).get("phase")
    if phase != "Running":
        return f"pod {name} is {phase}: see `ambient-lab trace --pod {name}`"
    return f"pod {name} is selected for ambient, but has no {REDIRECTION} annotation yet: is istio-cni running on its node?"


def recent_failure(lab: LiveLab, since: float, pod_prefix: str = "") -> str:
    """The newest refusal in the event stream since `since` (a denial, a failed connection), as a
    hint: the component, and its own sentence."""
    for ev in reversed(lab.events(since)):
        if ev["kind"] in ("rbac.decision", "waypoint.authz") and not ev["fields"].get("allowed", True):
            return f"{ev['component']} on {ev['node'] or '?'} denied it: {ev['msg']}"
        if ev["kind"] in ("conn.failed", "waypoint.response") and (not pod_prefix or pod_prefix in ev.get("pod", "")
                                                                  or pod_prefix in ev["msg"]):
            if ev["kind"] == "conn.failed" or ev["fields"].get("status", 200) >= 400:
                return f"{ev['component']} on {ev['node'] or '?'}: {ev['msg']}"
    return ""


def policy_mistakes(lab: LiveLab) -> list[str]:
    """Live hints about the AuthorizationPolicies in the lab: principals that match no identity,
    HTTP rules bound by `selector` (which ztunnel cannot enforce)."""
    from lab.istiod.authorization import l7_fields_of_rule

    out = []
    for ap in lab.objects("authorizationpolicies"):
        key = f"{ap['metadata']['namespace']}/{ap['metadata']['name']}"
        spec = ap.get("spec") or {}
        for rule in spec.get("rules") or []:
            for entry in rule.get("from") or []:
                for p in (entry.get("source") or {}).get("principals") or []:
                    if p != "*" and "/sa/" not in p and not p.endswith("*"):
                        out.append(f"policy {key} lists principal {p!r}, which matches no identity: Istio writes "
                                   f"identities as cluster.local/ns/NAMESPACE/sa/SERVICEACCOUNT")
            admits_waypoint = any(p.endswith("/sa/waypoint") for entry in rule.get("from") or []
                                  for p in (entry.get("source") or {}).get("principals") or [])
            if admits_waypoint and spec.get("selector") is not None and not any(
                    (o.get("spec") or {}).get("targetRefs") for o in lab.objects("authorizationpolicies")):
                out.append(f"policy {key} admits the waypoint's identity at L4: through the waypoint every client "
                           f"arrives as the waypoint, so it lets every client in; only the waypoint still knows the "
                           f"real client, and a policy with targetRefs tells it whom to admit")
            l7 = l7_fields_of_rule(rule or {})
            if l7 and spec.get("selector") is not None:
                out.append(f"policy {key} selects pods ({(spec['selector'] or {}).get('matchLabels')}) and names HTTP "
                           f"attributes ({', '.join(l7)}): ztunnel cannot see HTTP, so istiod dropped those rules "
                           f"(an ALLOW policy left with none allows nothing); a waypoint enforces HTTP rules, and "
                           f"a policy reaches it with targetRefs")
    for pa in lab.objects("peerauthentications"):
        mode = ((pa.get("spec") or {}).get("mtls") or {}).get("mode")
        if mode in ("PERMISSIVE", "DISABLE"):
            out.append(f"PeerAuthentication {pa['metadata']['namespace']}/{pa['metadata']['name']} is {mode}: its "
                       f"pods now accept plaintext from anyone, in the mesh or not; STRICT refuses only connections "
                       f"without a client identity, so the question is how a client gets one")
    return out


def networkpolicy_mistakes(lab: LiveLab, namespace: str = "default") -> list[str]:
    """Live hints about NetworkPolicies that admit an app's port but not HBONE's 15008."""
    out = []
    meshed = {pod_name(p): labels(p) for p in lab.pods(namespace) if annotations(p).get(REDIRECTION) == "enabled"}
    for np in lab.objects("networkpolicies", namespace):
        spec = np.get("spec") or {}
        sel = (spec.get("podSelector") or {}).get("matchLabels") or {}
        targets = [n for n, lab_labels in meshed.items() if all(lab_labels.get(k) == v for k, v in sel.items())]
        ports = sorted({p.get("port") for rule in spec.get("ingress") or [] for p in rule.get("ports") or []
                        if p.get("port") is not None}, key=str)
        if targets and ports and 15008 not in ports:
            out.append(f"NetworkPolicy {namespace}/{np['metadata']['name']} admits only port(s) "
                       f"{', '.join(map(str, ports))} to {', '.join(targets[:2])}, which are in the mesh: meshed "
                       f"clients reach them as HBONE on port 15008 (ztunnel's inbound port, from the client pod's "
                       f"IP), so the node drops those packets and the call times out")
    return out


def waypoint_mistakes(lab: LiveLab, namespace: str = "default", pod_addressed: bool = False) -> list[str]:
    """Live hints about waypoint attachment: who says `istio.io/use-waypoint`, and for what."""
    gateways = [g for g in lab.objects("gateways", namespace) if g["spec"].get("gatewayClassName") == "istio-waypoint"]
    if not gateways:
        return []
    out = []
    ns_label = lab.namespace_labels(namespace).get("istio.io/use-waypoint")
    services = [s for s in lab.objects("services", namespace) if s["metadata"]["name"] not in
                {g["metadata"]["name"] for g in gateways}]
    bound = [s["metadata"]["name"] for s in services if labels(s).get("istio.io/use-waypoint") or ns_label]
    if not bound:
        out.append(f"neither namespace {namespace} nor any of its Services has istio.io/use-waypoint: ztunnel sends "
                   f"traffic straight to the pods, and the waypoint (with its L7 policies) is never on the path")
    for g in gateways:
        for_what = labels(g).get("istio.io/waypoint-for", "service")
        if pod_addressed and for_what == "service":
            out.append(f"this request is addressed to a pod's IP, and waypoint {g['metadata']['name']} takes only "
                       f"traffic addressed to Services (istio.io/waypoint-for: service): ztunnel sends it straight to "
                       f"the pod")
        pods = [pod_name(p) for p in lab.pods(namespace) if labels(p).get("istio.io/use-waypoint")]
        if pods and for_what == "service":
            out.append(f"pods {', '.join(pods[:3])} carry istio.io/use-waypoint, but waypoint {g['metadata']['name']} "
                       f"is for services (istio.io/waypoint-for: service): traffic addressed to a Service follows "
                       f"the Service's label or its namespace's, not the pods'")
    return out


# -- traffic -------------------------------------------------------------------------------------
CURL_EXITS = {0: "answered", 6: "could not resolve the name", 7: "was refused (exit 7)",
              28: "timed out (exit 28)", 52: "got an empty reply (exit 52)",
              56: "was reset (exit 56)"}


def resolve_url(lab: LiveLab, url: str, namespace: str = "default") -> str:
    """`{pod_ip:PREFIX}` in a URL becomes the IP of the first pod whose name starts with PREFIX."""
    def ip_of(m: re.Match) -> str:
        pod = next((p for p in lab.pods(namespace) if pod_name(p).startswith(m.group(1))), None)
        return (pod or {}).get("status", {}).get("podIP", "") or "0.0.0.0"
    return re.sub(r"\{pod_ip:([\w.-]+)\}", ip_of, url)


def run_curl(lab: LiveLab, spec: dict) -> tuple[int, int, str, str]:
    """(exit code, HTTP status, body, command) of one curl from a pod."""
    args = ["curl", "-s", "--max-time", str(spec.get("timeout", 5)), "-o", "/dev/stdout", "-w", "\\n%{http_code}"]
    if spec.get("method"):
        args += ["-X", str(spec["method"])]
    for h in spec.get("headers") or []:
        args += ["-H", str(h)]
    args.append(resolve_url(lab, str(spec["url"])))
    r = lab.exec(str(spec["from"]), *args, namespace=str(spec.get("namespace", "default")))
    body, _, status = r.stdout.rpartition("\n")
    shown = r.command.replace("-o /dev/stdout -w '\\n%{http_code}'", "-w '%{http_code}\\n'")
    return r.rc, int(status) if status.isdigit() else 0, body, shown


def describe_expectation(spec: dict) -> str:
    if "exit" in spec:
        return f"exit {spec['exit']} ({CURL_EXITS.get(int(spec['exit']), 'an error')})"
    want = f"HTTP {spec.get('status', 200)}"
    if spec.get("contains"):
        want += f" with {spec['contains']!r} in the body"
    return want


@check("curl")
def curl(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """A curl from a pod: `exit` (a refusal: 56 reset, 7 refused, 28 timeout) or `status`
    (and `contains`) is what it must give."""
    t0 = time.time() - 0.5
    rc, status, body, command = run_curl(lab, spec)
    title = f"curl from {spec['from']} to {spec['url']}" + (f" ({spec['method']})" if spec.get("method") else "") + \
        f" should give {describe_expectation(spec)}"
    if "exit" in spec:
        ok = rc == int(spec["exit"])
    else:
        ok = rc == 0 and status == int(spec.get("status", 200)) and (not spec.get("contains") or spec["contains"] in body)
    observed = f"it gave HTTP {status}" if rc == 0 else f"it {CURL_EXITS.get(rc, f'failed (exit {rc})')}"
    res = Result(ok, title, observed, command)
    if not ok:
        cause = recent_failure(lab, t0)
        if cause:
            res.hints.append(f"what refused it: {cause}")
        elif rc == 0 and "exit" in spec:
            res.hints.append(f"nothing refused it: the request was answered HTTP {status}; no policy applies to "
                             f"this connection yet (see `{lab.cmd('ztunnel-config', 'policies')}`)")
        else:
            res.hints.append(f"the last events of this flow: `{lab.cmd('trace')}` shows each step of it")
        res.hints += (policy_mistakes(lab) + networkpolicy_mistakes(lab)
                      + waypoint_mistakes(lab, pod_addressed="{pod_ip:" in str(spec["url"])))
    return res


@check("split")
def split(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """`n` requests from a pod; the share of answers containing each `expect` key must be within
    `tolerance` of its value (e.g. reviews-v3-: 0.2)."""
    n = int(spec.get("n", 200))
    args = ["curl", "-s", "--max-time", "60"] + [str(spec["url"])] * n
    r = lab.exec(str(spec["from"]), *args, timeout=90)
    counts = {k: r.stdout.count(k) for k in spec["expect"]}
    shares = {k: c / n for k, c in counts.items()}
    tol = float(spec.get("tolerance", 0.08))
    ok = r.rc == 0 and all(abs(shares[k] - float(v)) <= tol for k, v in spec["expect"].items())
    want = ", ".join(f"{k} {float(v):.0%}" for k, v in spec["expect"].items())
    got = ", ".join(f"{k} {s:.0%}" for k, s in shares.items())
    res = Result(ok, f"{n} requests to {spec['url']} should split {want} (±{tol:.0%})", f"they split {got}",
                 f"{lab.cmd('exec', str(spec['from']), '--', 'sh', '-c')} 'for i in $(seq {n}); do curl -s "
                 f"{spec['url']}; echo; done | grep -o \"reviews-v.\" | sort | uniq -c'")
    if not ok:
        routes = [o for o in lab.objects("httproutes") if o["metadata"]["namespace"] == "default"]
        if not routes:
            res.hints.append("there is no HTTPRoute in namespace default: without one the waypoint (or kube-proxy) "
                             "spreads requests evenly over every pod of the Service")
        else:
            for rt in routes:
                refs = [b for rule in rt["spec"].get("rules") or [] for b in rule.get("backendRefs") or []]
                weights = ", ".join(f"{b.get('name')}={b.get('weight', 1)}" for b in refs)
                res.hints.append(f"HTTPRoute {rt['metadata']['name']} sends to {weights}: weights are relative "
                                 f"(their sum is {sum(int(b.get('weight', 1)) for b in refs)})")
        svc = next((s for s in lab.objects("services", "default") if s["metadata"]["name"] == "reviews"), None)
        if svc is not None and "istio.io/use-waypoint" not in labels(svc) and \
                "istio.io/use-waypoint" not in lab.namespace_labels("default"):
            res.hints.append("neither Service reviews nor namespace default has istio.io/use-waypoint: an HTTPRoute "
                             "with a Service parent is applied by the waypoint, and no waypoint is on this path")
    return res


# -- the mesh ------------------------------------------------------------------------------------
@check("in_mesh")
def in_mesh(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """Pods of a namespace (optionally by name prefix) are `enabled` and ztunnel shows HBONE."""
    ns = str(spec.get("namespace", "default"))
    pods = matching_pods(lab, ns, spec.get("pods"))
    hbone = {w["name"] for w in lab.ztunnel_workloads() if w["protocol"] == "HBONE"}
    missing = [p for p in pods if annotations(p).get(REDIRECTION) != "enabled" or pod_name(p) not in hbone]
    what = ", ".join(spec["pods"]) if spec.get("pods") else f"every pod of namespace {ns}"
    res = Result(bool(pods) and not missing, f"{what} should be in the mesh (redirection enabled, HBONE)",
                 f"{len(missing)} of {len(pods)} are not: {', '.join(pod_name(p) for p in missing[:4])}",
                 f"{lab.cmd('get', 'pods', '-n', ns, '-o', 'wide')}; {lab.cmd('ztunnel-config', 'workloads')}")
    res.hints += [why_not_in_mesh(lab, p) for p in missing[:3]]
    return res


@check("not_in_mesh")
def not_in_mesh(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    ns = str(spec.get("namespace", "default"))
    pods = matching_pods(lab, ns, spec.get("pods"))
    inside = [p for p in pods if annotations(p).get(REDIRECTION)]
    res = Result(bool(pods) and not inside, f"pods of namespace {ns} should stay outside the mesh",
                 f"{', '.join(pod_name(p) for p in inside)} joined it", lab.cmd("get", "pods", "-n", ns, "-o", "wide"))
    if inside:
        res.hints.append(f"namespace {ns} has labels {lab.namespace_labels(ns)}: the task keeps it out of the mesh")
    return res


@check("no_restart")
def no_restart(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """The pods that ran when the exercise started still run (same names, no new pods)."""
    ns = str(spec.get("namespace", "default"))
    before = set(ctx.baseline.get(f"pods/{ns}", []))
    now = {pod_name(p) for p in matching_pods(lab, ns, None)}
    gone, new = sorted(before - now), sorted(now - before)
    res = Result(bool(before) and not gone, f"the pods of namespace {ns} should not be restarted",
                 f"{', '.join(gone)} {'were' if len(gone) > 1 else 'was'} replaced by {', '.join(new) or 'nothing'}",
                 lab.cmd("get", "pods", "-n", ns))
    if gone:
        deleted = [e for e in lab.events(ctx.started) if e["kind"] == "pod.deleted" and e.get("pod") in gone]
        when = (f" (the lab deleted {deleted[0]['pod']} at {time.strftime('%H:%M:%S', time.localtime(deleted[0]['ts']))}:"
                f" a Deployment change replaced it)" if deleted else "")
        res.hints.append(f"{', '.join(gone)} no longer run{when}; ambient mode enrols running pods where they are: "
                         f"istio-cni's informer sees the label and adds each pod's network namespace to the mesh, "
                         f"so no pod has to restart, unlike sidecars")
    return res


@check("hbone_seen")
def hbone_seen(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """Since the exercise started, an HBONE tunnel (a CONNECT on 15008) reached a pod `to`."""
    to = str(spec["to"])
    seen = [e for e in lab.events(ctx.started) if e["kind"] == "hbone.connect.received" and to in e.get("pod", "")]
    res = Result(bool(seen), f"an HBONE CONNECT should have reached a {to} pod since you started",
                 "none did", f"{lab.cmd('trace')} | grep hbone.connect.received")
    if not seen:
        pods = matching_pods(lab, "default", [to])
        off = [p for p in pods if annotations(p).get(REDIRECTION) != "enabled"]
        if off:
            res.hints.append(why_not_in_mesh(lab, off[0]) + "; without capture, traffic to it is plain TCP")
        else:
            res.hints.append(f"{to} is in the mesh, but nothing has called it since: send a request "
                             f"({lab.cmd('exec', 'deploy/curl', '--', 'curl', '-s', f'http://{to}:9080/')})")
    return res


@check("component")
def component(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """A per-node component (`what`) is running on `node` (a suffix such as worker2)."""
    what, node = str(spec["what"]), str(spec["node"])
    rows = [c for c in lab.components() if c["component"] == what and c["node"].endswith(node)]
    ok = bool(rows) and all(c["running"] for c in rows)
    res = Result(ok, f"{what} on {node} should be running", "it is not", lab.cmd("status"))
    if not ok:
        ended = [e for e in lab.events() if e["kind"] in ("component.killed", "component.exited")
                 and e.get("component") == what and e.get("node", "").endswith(node)]
        how = f"{ended[-1]['msg']} at {time.strftime('%H:%M:%S', time.localtime(ended[-1]['ts']))}" if ended else \
            f"{what} on {node} is not running"
        res.hints.append(f"{how}; `ambient-lab logs {what} --node {node}` shows its last words (a DaemonSet would "
                         f"have restarted it; here `ambient-lab restart` does)")
    return res


@check("pods_running")
def pods_running(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    ns = str(spec.get("namespace", "default"))
    pods = matching_pods(lab, ns, spec.get("pods"))
    stuck = [p for p in pods if p.get("status", {}).get("phase") != "Running"]
    res = Result(bool(pods) and not stuck, f"pods {', '.join(spec.get('pods') or [ns])} should be Running",
                 f"{', '.join(pod_name(p) + ' is ' + p['status'].get('phase', '?') for p in stuck)}",
                 lab.cmd("get", "pods", "-n", ns))
    sandbox_failures = [e for e in lab.events() if e["kind"] == "pod.sandbox.failed"] if stuck else []
    for p in stuck[:2]:
        failed = [e for e in sandbox_failures if e.get("pod") == pod_name(p)]
        if failed:
            res.hints.append(f"{pod_name(p)}: {failed[-1]['msg']}")
    return res


@check("answer")
def answer(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """The learner's `ambient-lab ex answer` equals the value computed from this lab."""
    assert ctx.computed_answer is not None
    truth = ctx.computed_answer()
    given = truth.normalize(ctx.answer or "")
    res = Result(bool(given) and given == truth.truth, str(spec.get("title", "your answer should be right")),
                 "you have not answered yet (ambient-lab ex answer NAME VALUE)" if not given
                 else f"{ctx.answer!r} is not it", retry=False)
    if given and given != truth.truth:
        res.hints.append(truth.explain(ctx.answer or ""))
    elif not given and truth.lead:
        res.hints.append(truth.lead)
    return res


# -- build-it: the learner's function ------------------------------------------------------------
@check("learner_code_loads")
def learner_code_loads(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """The learner's file imports and has the function (reported before anything else runs)."""
    from lab.common.seams import SeamError, load_function

    ex = ctx.exercise
    path = ex.folder / ex.seam.file
    try:
        load_function(f"{path}:{ex.seam.function}")
    except SeamError as e:
        return Result(False, f"{path.name} should import and define {ex.seam.function}()", str(e),
                      f"python3 {path}", [str(e)], retry=False)
    return Result(True, f"{path.name} imports and defines {ex.seam.function}()")


def learner_function(ctx: Context) -> Callable[..., Any]:
    from lab.common.seams import call_contained, load_function

    ex = ctx.exercise
    loaded = load_function(f"{ex.folder / ex.seam.file}:{ex.seam.function}")
    return lambda *a, **k: call_contained(loaded, a, k)


@check("rules_match_istio")
def rules_match_istio(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """The learner's `inpod_rules()` renders to the rule set Istio's golden file holds (the lab's
    reference, which `tests/unit/test_inpod_rules.py` compares with Istio's `default.golden`)."""
    from lab.cni import iptables
    from lab.common.seams import SeamError

    title = "your inpod_rules() should render to Istio's in-pod rules (testdata/default.golden)"
    try:
        mine = learner_function(ctx)(bool(spec.get("dns_capture", False)))
    except SeamError as e:
        return Result(False, title, str(e), hints=[str(e)], retry=False)
    problem = iptables.rule_set_problem(mine)
    if problem:
        return Result(False, title, problem, hints=[f"inpod_rules() must return a list of Rule: {problem}"],
                      retry=False)
    ref = iptables.inpod_rules(bool(spec.get("dns_capture", False)))
    mine_lines = [(r.table, r.line()) for r in mine]
    ref_lines = [(r.table, r.line()) for r in ref]
    res = Result(mine_lines == ref_lines, title, retry=False)
    if not res.ok:
        missing = [r for r in ref if (r.table, r.line()) not in mine_lines]
        extra = [line for line in mine_lines if line not in ref_lines]
        if missing:
            r = missing[0]
            res.observed = f"{len(missing)} of Istio's rules are missing"
            res.hints.append(f"missing in table {r.table}: `{r.line()}`. {r.why}")
        if extra:
            res.observed = res.observed or "rules differ"
            res.hints.append(f"not in Istio's set: table {extra[0][0]} `{extra[0][1]}`")
        if not missing and not extra:
            first = next(i for i, (a, b) in enumerate(zip(mine_lines, ref_lines)) if a != b)
            res.observed = "the order differs"
            res.hints.append(f"rule {first + 1} should be `{ref_lines[first][1]}`: iptables tries rules in order, "
                             f"and an early ACCEPT or REDIRECT decides")
    return res


@check("kernel_rules")
def kernel_rules(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """The rules istio-cni wrote into a pod's netns, read back from the kernel, are Istio's."""
    from lab.cni import iptables

    ref = str(spec.get("pod", "deploy/curl"))
    saved = lab.iptables_save(ref)
    want = iptables.normalise_save(iptables.render_save(iptables.inpod_rules(False), False))
    got = iptables.normalise_save(saved)
    res = Result(got == want, f"the rules in {ref}'s network namespace (read from the kernel) should be Istio's",
                 "they differ" if saved.strip() else "there are none",
                 f"sudo ip netns exec <{ref}'s netns> iptables-legacy-save")
    if not res.ok:
        failed = [e for e in lab.events(ctx.started) if e["kind"] == "cni.pod.failed"]
        if failed:
            res.hints.append(f"istio-cni could not add the pod: {failed[-1]['fields'].get('error', failed[-1]['msg'])}")
        missing = [line for line in want if line not in got]
        if missing:
            res.hints.append(f"the kernel lacks `{missing[0]}` (istio-cni installs what your function returns; "
                             f"it re-reads your file when you save it and enrols the pod again on the next change)")
    return res


@check("rbac_truth_table")
def rbac_truth_table(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """The learner's `assert_rbac` decides like ztunnel's on a table of policies and connections."""
    from lab.common.seams import SeamError
    from lab.course.tables import rbac_cases
    from lab.ztunnel.rbac import assert_rbac as reference

    title = "your assert_rbac() should decide as ztunnel does (DENY first, then no ALLOW -> allow, then ALLOW)"
    mine = learner_function(ctx)
    for name, policies, conn in rbac_cases():
        want = reference(policies, conn)
        try:
            got = mine(policies, conn)
        except SeamError as e:
            return Result(False, title, str(e), hints=[str(e)], retry=False)
        if getattr(got, "allowed", None) != want.allowed:
            return Result(False, title, f"for {name} it {'allowed' if getattr(got, 'allowed', False) else 'denied'}",
                          hints=[f"{name}: ztunnel {'allows' if want.allowed else 'denies'} it: {want.reason}"],
                          retry=False)
    return Result(True, title)



@check("hbone_request_truth_table")
def hbone_request_truth_table(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """The learner's `create_hbone_request` builds the CONNECT ztunnel builds: the same
    `:authority`, `forwarded`, `baggage`, and a valid `traceparent` carrying the flow's trace id."""
    from lab.common.seams import SeamError
    from lab.course.tables import hbone_request_cases
    from lab.hbone.headers import TraceparentError, create_hbone_request, parse_traceparent

    title = "your create_hbone_request() should build ztunnel's CONNECT (authority, forwarded, baggage, traceparent)"
    mine = learner_function(ctx)
    why = {":authority": "the :authority names where the tunnel leads: the destination's IP and port (IPv6 in brackets)",
           "forwarded": 'forwarded says who the client is: for="IP:PORT" (quoted), and ;host= the Service\'s name when '
                        "there is one",
           "baggage": "baggage describes the SOURCE workload (cluster, namespace, workload, service, version)"}
    for name, args in hbone_request_cases():
        want = create_hbone_request(**args)
        try:
            got = mine(**args)
        except SeamError as e:
            return Result(False, title, str(e), hints=[str(e)], retry=False)
        for field_name, w, g in ((":authority", want.authority, getattr(got, "authority", None)),
                                 ("forwarded", want.get("forwarded"), got.get("forwarded") if hasattr(got, "get") else None),
                                 ("baggage", want.get("baggage"), got.get("baggage") if hasattr(got, "get") else None)):
            if w != g:
                return Result(False, title, f"for {name}, {field_name} is {g!r}", retry=False,
                              hints=[f"{name}: ztunnel sends {field_name} {w!r}, yours {g!r}: {why[field_name]}"])
        try:
            tp = parse_traceparent(got.get("traceparent") or "")
        except TraceparentError as e:
            return Result(False, title, f"for {name}, traceparent is not valid: {e}", retry=False,
                          hints=["traceparent is W3C's 00-<32 hex trace id>-<16 hex span id>-00 (format_traceparent)"])
        if tp.trace_id != args["trace_id"]:
            return Result(False, title, f"for {name}, the traceparent's trace id is {tp.trace_id}", retry=False,
                          hints=["the traceparent carries the flow's trace id, so that the destination's steps share "
                                 "it: pass trace_id to format_traceparent"])
    return Result(True, title)


@check("identity_truth_table")
def identity_truth_table(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """The learner's `match_server_identity` accepts exactly what ztunnel's IdentityVerifier does."""
    from lab.common.seams import SeamError
    from lab.course.tables import identity_cases
    from lab.tls.contexts import match_server_identity as reference

    title = "your match_server_identity() should accept a server only on an exact SPIFFE identity"
    mine = learner_function(ctx)
    for name, presented, expected in identity_cases():
        want = reference(presented, expected)
        try:
            got = mine(presented, expected)
        except SeamError as e:
            return Result(False, title, str(e), hints=[str(e)], retry=False)
        if got != want:
            verdict = "accepted" if got is not None else "refused"
            return Result(False, title, f"for {name} it {verdict} the server", retry=False,
                          hints=[f"{name}: ztunnel {'accepts' if want else 'refuses'} it. Compare whole identities "
                                 f"(trust domain, namespace and service account), never a prefix: presented "
                                 f"{[str(i) for i in presented]}, expected {[str(i) for i in expected]}"])
    return Result(True, title)


@check("decision_truth_table")
def decision_truth_table(lab: LiveLab, spec: dict, ctx: Context) -> Result:
    """The learner's `build_request` decides as ztunnel's does: the plan's kind and next hop."""
    import random

    from lab.common.seams import SeamError
    from lab.course.tables import decision_cases, decision_state
    from lab.ztunnel.proxy.decision import build_request as reference

    title = "your build_request() should decide as ztunnel does (HBONE, TCP, passthrough, via a waypoint, refuse)"
    state = decision_state()
    source = state.workload_by_ip("10.244.1.20")
    mine = learner_function(ctx)
    for name, dst in decision_cases():
        want = reference(state, source, dst, random.Random(0))
        try:
            got = mine(state, source, dst, random.Random(0))
        except SeamError as e:
            return Result(False, title, str(e), hints=[str(e)], retry=False)
        got_hop = getattr(got, "upstream", None)
        if type(got) is not type(want) or got_hop != want.upstream:
            return Result(False, title, f"for {name} it planned {type(got).__name__} to {got_hop}", retry=False,
                          hints=[f"{name}: ztunnel plans {type(want).__name__} to {want.upstream}: {want.reason}"])
    return Result(True, title)
