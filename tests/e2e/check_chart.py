#!/usr/bin/env python3
"""Security assertions on a rendered livepatch chart (output of `helm template`).

    check_chart.py RENDERED.yaml [--namespace NS] [--values-file custom|default]

Checks what the issues require of the chart and what a schema validator cannot see:
the agent DaemonSet has hostPID, exactly CAP_SYS_PTRACE, a read-only root filesystem and no
host mount but the engine's lock directory; the operator has no host access at all and runs non-root; RBAC is exactly the
least-privilege lists of docs/operator.md (operator) and of the agent's contract, with no
wildcard anywhere. Prints one line per check; exits 1 on the first failed group with the
reason.
"""
import argparse
import sys

import yaml  # PyYAML, from the setup venv (~/.cache/livepatch/venv)

FAILED = []


def check(cond, what):
    print(("  ok   " if cond else "  FAIL ") + what)
    if not cond:
        FAILED.append(what)
    return cond


# (apiGroup, resource, verb) triples, from docs/operator.md "RBAC the operator needs".
OPERATOR_CLUSTER_RULES = {
    ("livepatch.dev", "livepatches", v) for v in ("get", "list", "watch", "patch")
} | {
    ("livepatch.dev", "livepatches/status", "patch"),
    ("livepatch.dev", "livepatches/finalizers", "update"),
} | {
    ("livepatch.dev", "livepatchtasks", v) for v in ("get", "list", "watch", "create", "patch", "delete")
} | {
    ("", "pods", v) for v in ("get", "list", "watch")
} | {
    ("", "nodes", "get"),
} | {
    ("events.k8s.io", "events", v) for v in ("create", "patch")
}
OPERATOR_LEASE_RULES = {("coordination.k8s.io", "leases", v) for v in ("get", "create", "patch")}

# The agent, from docs/agent.md and its code (node-agent/src): the task watch of its node, status by
# server-side apply, bundles from ConfigMaps/Secrets, the pod watch of its node and the
# restart-required label (merge patch). It writes no events.
AGENT_RULES = {
    ("livepatch.dev", "livepatchtasks", v) for v in ("list", "watch")
} | {
    ("livepatch.dev", "livepatchtasks/status", "patch"),
    ("", "configmaps", "get"),
    ("", "secrets", "get"),
} | {
    ("", "pods", v) for v in ("get", "list", "watch", "patch")
}

HOST_FIELDS = ("hostPID", "hostNetwork", "hostIPC", "hostUsers")


def triples(rules):
    out = set()
    for r in rules or []:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    out.add((g, res, v))
    return out


def wildcard_free(rules):
    for r in rules or []:
        for key in ("apiGroups", "resources", "verbs"):
            if "*" in r.get(key, []):
                return False
        if r.get("nonResourceURLs"):
            return False
    return True


def containers(pod):
    return (pod.get("initContainers") or []) + (pod.get("containers") or []) + (pod.get("ephemeralContainers") or [])


def no_host_ports(pod):
    return all(not p.get("hostPort") for c in containers(pod) for p in c.get("ports") or [])


def host_paths(pod):
    return [v["name"] for v in pod.get("volumes") or [] if "hostPath" in v]


def env_of(c):
    return {e["name"]: e for e in c.get("env") or []}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--namespace", default="livepatch-system")
    ap.add_argument("--values", choices=["default", "custom", "watch", "sidecar"], default="default",
                    help="which values rendered it: default (or e2e), custom (values-custom.yaml), watch (watchNamespace=shop, 1 replica, no Secrets)")
    a = ap.parse_args()

    docs = [d for d in yaml.safe_load_all(open(a.rendered)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    ns = a.namespace

    print(f"{a.rendered}: {len(docs)} objects ({', '.join(sorted(by_kind))})")

    # --- every object
    names = set()
    for d in docs:
        key = (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        check(key not in names, f"{d['kind']}/{d['metadata']['name']}: unique")
        names.add(key)
        if d["kind"] in ("Deployment", "DaemonSet", "ServiceAccount", "ConfigMap", "Service", "PodDisruptionBudget"):
            check(d["metadata"].get("namespace") == ns, f"{d['kind']}/{d['metadata']['name']}: in namespace {ns}")
        labels = d["metadata"].get("labels") or {}
        if d["kind"] != "CustomResourceDefinition":
            check(labels.get("app.kubernetes.io/part-of") == "livepatch", f"{d['kind']}/{d['metadata']['name']}: labelled part-of=livepatch")
    for kind in ("ClusterRole", "Role"):
        for r in by_kind.get(kind, []):
            check(wildcard_free(r.get("rules")), f"{kind}/{r['metadata']['name']}: no wildcard, no nonResourceURLs")

    # --- the agent DaemonSet
    (ds,) = by_kind["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    print("agent DaemonSet:")
    check(pod.get("hostPID") is True, "hostPID: true")
    check(not pod.get("hostNetwork") and not pod.get("hostIPC"), "no hostNetwork, no hostIPC")
    check(pod.get("hostUsers") in (None, True), "host user namespace (CAP_SYS_PTRACE must be in the initial user namespace)")
    check(len(pod["containers"]) == 1 and not pod.get("initContainers"), "exactly one container, no init containers")
    c = pod["containers"][0]
    sc = c.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    check(caps.get("drop") == ["ALL"], f"capabilities drop [ALL] (got {caps.get('drop')})")
    check(caps.get("add") == ["SYS_PTRACE"], f"capabilities add exactly [SYS_PTRACE] (got {caps.get('add')})")
    check(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem: true")
    check(sc.get("privileged") in (None, False), "not privileged")
    check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false")
    check(sc.get("runAsUser") == 0, "runAsUser: 0 (added capabilities are effective only for uid 0)")
    check((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", "seccomp RuntimeDefault")
    check(not sc.get("procMount") or sc.get("procMount") == "Default", "default procMount")
    hp = [v for v in pod.get("volumes") or [] if "hostPath" in v]
    if a.values != "custom":
        check([(v["hostPath"]["path"], v["hostPath"].get("type")) for v in hp] == [("/run/livepatch", "DirectoryOrCreate")],
              f"one hostPath only: the engine's lock directory /run/livepatch (got {hp})")
        mounts = [m for m in c.get("volumeMounts") or [] if m["name"] == hp[0]["name"]] if hp else []
        check([m["mountPath"] for m in mounts] == ["/run/livepatch"], "lock directory mounted at /run/livepatch")
    else:
        check(hp == [], f"lockDir emptyDir: no hostPath at all (got {hp})")
    check(no_host_ports(pod), "no hostPort")
    e = env_of(c)
    check(e.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
          "NODE_NAME from the downward API (spec.nodeName)")
    tol = pod.get("tolerations") or []
    if a.values == "default":
        check({"operator": "Exists"} in tol, "tolerates every taint (operator: Exists)")
    check(c.get("livenessProbe") and c.get("readinessProbe"), "liveness and readiness probes")
    check((c.get("resources") or {}).get("limits", {}).get("memory"), "memory limit")
    check(c.get("command") == ["/usr/local/bin/node-agent"], "runs /usr/local/bin/node-agent (the Dockerfile's path)")
    for m in c.get("volumeMounts") or []:
        if m["mountPath"] != "/run/livepatch":
            check(m.get("readOnly") is True, f"mount {m['name']} read-only")

    # --- the operator Deployment
    (dep,) = by_kind["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    print("operator Deployment:")
    for f in HOST_FIELDS[:3]:
        check(not pod.get(f), f"no {f}")
    check(host_paths(pod) == [], "no hostPath volumes")
    check(no_host_ports(pod), "no hostPort")
    psc = pod.get("securityContext") or {}
    check(psc.get("runAsNonRoot") is True and (psc.get("runAsUser") or 0) != 0, "pod runs as non-root (runAsNonRoot, uid != 0)")
    check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", "seccomp RuntimeDefault")
    for c in containers(pod):
        sc = c.get("securityContext") or {}
        check(sc.get("readOnlyRootFilesystem") is True, f"{c['name']}: readOnlyRootFilesystem")
        check(sc.get("allowPrivilegeEscalation") is False, f"{c['name']}: allowPrivilegeEscalation false")
        check((sc.get("capabilities") or {}).get("drop") == ["ALL"] and not (sc.get("capabilities") or {}).get("add"),
              f"{c['name']}: drops ALL capabilities, adds none")
        check(not sc.get("privileged"), f"{c['name']}: not privileged")
        check(sc.get("runAsUser") in (None,) or sc.get("runAsUser") != 0, f"{c['name']}: no uid 0 override")
    c = pod["containers"][0]
    args = c.get("args") or []
    e = env_of(c)
    check(c.get("command") == ["/usr/local/bin/livepatch-operator"], "runs /usr/local/bin/livepatch-operator")
    check(e.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          "POD_NAME (lease identity) from the downward API")
    check(any(x.startswith("--metrics-addr=0.0.0.0:") for x in args), "metrics address flag")
    port = [p for p in c.get("ports") or [] if p["name"] == "metrics"]
    check(bool(port), "metrics port")
    check((c.get("livenessProbe") or {}).get("httpGet", {}).get("path") == "/healthz", "liveness /healthz")
    check((c.get("readinessProbe") or {}).get("httpGet", {}).get("path") == "/readyz", "readiness /readyz")
    if a.values in ("default", "sidecar"):
        check(dep["spec"]["replicas"] == 2, "2 replicas")
        check("--leader-election=true" in args and "--lease-namespace=$(POD_NAMESPACE)" in args, "leader election on, lease in own namespace")
        check(bool(by_kind.get("PodDisruptionBudget")), "PodDisruptionBudget for 2 replicas")
    else:
        check(dep["spec"]["replicas"] == 1 and "--leader-election=false" in args, "custom: 1 replica without leader election")

    # --- RBAC: exact lists
    print("RBAC:")
    roles = {(r["kind"], r["metadata"]["name"]): r for r in by_kind.get("ClusterRole", []) + by_kind.get("Role", [])}
    op_cr = [r for (k, n), r in roles.items() if k == "ClusterRole" and n.endswith("-operator")]
    ag_cr = [r for (k, n), r in roles.items() if k == "ClusterRole" and n.endswith("-agent")]
    lease = [r for (k, n), r in roles.items() if k == "Role" and n.endswith("-leader-election")]
    op_role = [r for (k, n), r in roles.items() if k == "Role" and n.endswith("-operator")]
    if a.values in ("custom", "watch"):
        check(triples(op_cr[0]["rules"]) == {("", "nodes", "get")}, "operator ClusterRole: nodes get only (watchNamespace)")
        check(triples(op_role[0]["rules"]) == OPERATOR_CLUSTER_RULES - {("", "nodes", "get")},
              "operator Role in the watched namespace: the namespaced rules")
        check(op_role[0]["metadata"]["namespace"] == "shop", "operator Role in namespace shop")
        check(not lease, "no Lease role without leader election")
        check(triples(ag_cr[0]["rules"]) == AGENT_RULES - {("", "secrets", "get")}, "agent ClusterRole without secrets (readSecrets false)")
    else:
        got = triples(op_cr[0]["rules"])
        check(got == OPERATOR_CLUSTER_RULES, f"operator ClusterRole exactly as docs/operator.md (extra {sorted(got - OPERATOR_CLUSTER_RULES)}, missing {sorted(OPERATOR_CLUSTER_RULES - got)})")
        got = triples(lease[0]["rules"])
        check(got == OPERATOR_LEASE_RULES, "operator Lease Role: leases get/create/patch")
        check(lease[0]["metadata"]["namespace"] == ns, "Lease Role in the release namespace")
        got = triples(ag_cr[0]["rules"])
        check(got == AGENT_RULES, f"agent ClusterRole exactly the agent's contract (extra {sorted(got - AGENT_RULES)}, missing {sorted(AGENT_RULES - got)})")
    check(not any(t[1] in ("secrets",) for t in triples(op_cr[0]["rules"])), "operator never reads secrets")
    for b in by_kind.get("ClusterRoleBinding", []) + by_kind.get("RoleBinding", []):
        subj = b["subjects"]
        if b["roleRef"]["name"].endswith("-sidecar"):
            # Sidecar mode: an application's service account, in its own namespace only.
            check(b["kind"] == "RoleBinding" and len(subj) == 1 and subj[0]["kind"] == "ServiceAccount"
                  and subj[0]["namespace"] == b["metadata"]["namespace"], f"RoleBinding/{b['metadata']['name']}: one ServiceAccount of its namespace")
            continue
        check(len(subj) == 1 and subj[0]["kind"] == "ServiceAccount" and subj[0]["namespace"] == ns,
              f"{b['kind']}/{b['metadata']['name']}: bound to one ServiceAccount of {ns}")

    # --- the agent's pod patches: only the restart-required label (ValidatingAdmissionPolicy)
    vap = by_kind.get("ValidatingAdmissionPolicy", [])
    vapb = by_kind.get("ValidatingAdmissionPolicyBinding", [])
    sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
    check(len(vap) == 1 and len(vapb) == 1 and vapb[0]["spec"]["policyName"] == vap[0]["metadata"]["name"]
          and vapb[0]["spec"]["validationActions"] == ["Deny"], "admission policy + binding (Deny) on the agent's pod patches")
    if vap:
        cond = vap[0]["spec"]["matchConditions"][0]["expression"]
        check(f'"system:serviceaccount:{ns}:{sa}"' in cond, f"policy keyed on the agent's service account ({cond})")
        check(vap[0]["spec"]["failurePolicy"] == "Fail", "policy fails closed")

    # --- values-dependent extras
    if a.values == "custom":
        print("custom values:")
        (cm,) = by_kind["ConfigMap"]
        check(sorted(cm["data"]) == ["release-2026.pub", "release-2027.pub"], "trusted keys ConfigMap, one file per key")
        ds_c = ds["spec"]["template"]["spec"]["containers"][0]
        check("--require-signature" in ds_c["args"], "signature enforcement flag")
        check(any(x.startswith("--trusted-keys-dir=") for x in ds_c["args"]), "trusted keys directory flag")
        check(ds_c["image"].endswith("@sha256:" + "0123456789abcdef" * 4), "agent image pinned by digest")
        check(dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/platform/livepatch-operator:v9.9.9",
              "operator image override")
        check(bool(by_kind.get("ServiceMonitor")), "ServiceMonitor rendered")
        check(ds["spec"]["template"]["spec"].get("securityContext", {}).get("appArmorProfile", {}).get("type") == "Unconfined",
              "AppArmor profile from values")
    else:
        check("ConfigMap" not in by_kind, "no trusted keys ConfigMap without keys")

    webhooks = by_kind.get("MutatingWebhookConfiguration", [])
    if a.values == "sidecar":
        print("sidecar mode:")
        check(len(webhooks) == 1, "one MutatingWebhookConfiguration")
        (wh,) = webhooks[0]["webhooks"]
        check(wh["objectSelector"] == {"matchLabels": {"livepatch.dev/sidecar": "enabled"}}, "webhook sees opted-in pods only")
        check(wh["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
              "webhook on pod creation only")
        check(wh["failurePolicy"] == "Fail" and wh["sideEffects"] == "None" and len(wh["clientConfig"].get("caBundle", "")) > 100,
              "fails closed, no side effects, CA bundle from the chart's certificate")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        check(any(x.startswith("--webhook-addr=") for x in args) and any(x.startswith("--sidecar-image=") for x in args), "operator serves the webhook")
        mounts = dep["spec"]["template"]["spec"]["containers"][0].get("volumeMounts") or []
        check([m.get("readOnly") for m in mounts] == [True], "webhook certificate mounted read-only")
        (scr,) = [r for (k, n), r in roles.items() if k == "ClusterRole" and n.endswith("-sidecar")]
        got = triples(scr["rules"])
        check(got == AGENT_RULES, f"sidecar ClusterRole exactly the agent's contract (extra {sorted(got - AGENT_RULES)})")
        check(any(b["roleRef"]["name"].endswith("-sidecar") for b in by_kind.get("RoleBinding", [])), "sidecar RoleBinding rendered")
    else:
        check(not webhooks, "no webhook unless sidecar mode is on")

    if FAILED:
        print(f"{len(FAILED)} check(s) failed:", *FAILED, sep="\n  ")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
