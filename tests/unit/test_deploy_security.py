"""deploy/: Ray itself is closed as shipped: token auth from a Secret, NetworkPolicies, no exposed dashboard."""

from __future__ import annotations

import re

from packaging.version import Version

from tests.unit.test_deploy import DEPLOY, all_objects, cluster_specs_of, pins, walk

TOKEN_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName
OPERATOR_POD = {"app.kubernetes.io/name": "kuberay-operator"}  # pod label of the KubeRay Helm chart
OPERATOR_PORTS = {8265, 8000}  # dashboard (job API, Serve status) and the head's proxy health check
SERVE_PORTS = {8000, "serve"}
PRIVATE_PORTS = {8265, 10001, "dashboard", "client"}  # dashboard / job API and Ray Client server
EXPOSED_TYPES = {"LoadBalancer", "NodePort"}
GENERATED = "<generated>"  # ray.io/cluster of a cluster that a RayJob, RayCronJob or RayService names


def clusters() -> list[dict]:
    """Every Ray cluster deploy/ starts, with the pods KubeRay makes for it.

    Returns:
        One dict per cluster spec: ``where`` (file:kind), ``file``, ``kind`` of the owning object, ``spec``,
        and ``pods``: ``(node type, labels)`` per group, the labels being the pod template's plus those
        KubeRay sets (``ray.io/cluster`` is only known for a RayCluster; the others get a generated name).
    """
    out = []
    for name, obj in all_objects():
        for spec in cluster_specs_of(obj):
            cluster = obj["metadata"]["name"] if obj["kind"] == "RayCluster" else GENERATED
            pods = []
            groups = [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec.get("workerGroupSpecs", [])]
            for node_type, group in groups:
                labels = {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
                labels.update((group["template"].get("metadata") or {}).get("labels") or {})
                labels.update({"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/is-ray-node": "yes",
                               "ray.io/group": group.get("groupName", "headgroup")})
                pods.append((node_type, labels))
            out.append({"where": f"{name}:{obj['kind']}", "file": name, "kind": obj["kind"], "spec": spec,
                        "pods": pods})
    return out


def ray_containers(spec: dict) -> list[dict]:
    """The containers of a cluster spec's head and worker pod templates (init containers excluded)."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env") or []}


def selects(selector: dict | None, labels: dict) -> bool:
    """Whether a Kubernetes label selector selects a pod.

    Args:
        selector: ``{matchLabels, matchExpressions}``; empty or None selects every pod.
        labels: The pod's labels.

    Returns:
        True when every matchLabels entry and every matchExpression holds.
    """
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, values = e["key"], e.get("values") or []
        holds = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
                 "Exists": key in labels, "DoesNotExist": key not in labels}[e["operator"]]
        if not holds:
            return False
    return True


def network_policies() -> list[tuple[str, dict]]:
    """``(file, NetworkPolicy)`` of deploy/ (all go to the namespace of the clusters)."""
    return [(name, obj) for name, obj in all_objects() if obj["kind"] == "NetworkPolicy"]


def rule_ports(rule: dict) -> set | None:
    """The ports an ingress rule admits (numbers or names), None for all ports."""
    return {p["port"] for p in rule["ports"]} if rule.get("ports") else None


def rule_problems(rule: dict, cluster: dict, node_type: str, others: list[dict]) -> list[str]:
    """Why an ingress rule of a policy that selects a pod of ``cluster`` admits too much.

    Args:
        rule: An entry of ``spec.ingress``.
        cluster: The cluster (see :func:`clusters`) of the selected pod.
        node_type: ``head`` or ``worker``: the selected pod's.
        others: Every other cluster of deploy/.

    Returns:
        Nothing when the rule admits only the cluster's own pods, the KubeRay operator (head, dashboard and
        serve ports) or, on a RayService cluster, anyone on the serve port; else one message per peer.
    """
    ports = rule_ports(rule)
    if cluster["kind"] == "RayService" and ports and ports <= SERVE_PORTS:
        return []
    peers = rule.get("from") or [{"ipBlock": {"cidr": "0.0.0.0/0"}}]  # no `from`: every source
    problems = []
    for peer in peers:
        pod_sel, ns_sel = peer.get("podSelector"), peer.get("namespaceSelector")
        if "ipBlock" in peer:
            problems.append(f"ipBlock {peer['ipBlock']} on ports {ports or 'all'}")
        elif ns_sel is None:  # pods of this namespace: only the cluster's own
            own = any(selects(pod_sel, labels) for _, labels in cluster["pods"])
            foreign = any(selects(pod_sel, labels) for c in others for _, labels in c["pods"])
            if not (pod_sel or {}).get("matchLabels") or not own or foreign:
                problems.append(f"podSelector {pod_sel} does not select exactly this cluster's pods")
        else:
            operator = (ns_sel.get("matchLabels") and pod_sel and selects(pod_sel, OPERATOR_POD)
                        and (pod_sel.get("matchLabels") or {}).items() >= OPERATOR_POD.items())
            if not operator:
                problems.append(f"peer {peer} is neither this cluster's pods nor the KubeRay operator")
            elif node_type != "head" or not ports or not ports <= OPERATOR_PORTS:
                problems.append(f"the operator reaches a {node_type} on ports {ports or 'all'}")
    return problems


# ---------------------------------------------------------------- token auth

def test_no_manifest_disables_ray_auth():
    for name, obj in all_objects():
        for k, v in walk(obj):
            if k == "env" and isinstance(v, list):
                modes = [str(e.get("value", "")).lower() for e in v if e.get("name") == "RAY_AUTH_MODE"]
                assert "disabled" not in modes, f"{name}: RAY_AUTH_MODE=disabled"
            if k == "authOptions":
                assert v.get("mode", "token") != "disabled", f"{name}: authOptions.mode disabled"


def test_every_cluster_runs_token_auth_with_the_token_from_a_secret():
    assert Version(pins()["ray"]) >= Version("2.52.0")  # Ray token auth; KubeRay's authOptions needs it too
    found = clusters()
    assert len(found) >= 5
    for c in found:
        auth = c["spec"].get("authOptions") or {}
        assert auth.get("mode") == "token", f"{c['where']}: authOptions.mode is not token"
        secret = auth.get("secretName")
        assert secret, f"{c['where']}: authOptions.secretName unset (KubeRay would make its own token per cluster)"
        for container in ray_containers(c["spec"]):
            env = env_of(container)
            where = f"{c['where']}:{container['name']}"
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
            ref = (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            assert (ref.get("name"), ref.get("key")) == (secret, TOKEN_KEY), f"{where}: RAY_AUTH_TOKEN not {secret}"
            assert not ref.get("optional"), f"{where}: an optional token would start Ray without one"
    for name, obj in all_objects():
        assert obj["kind"] != "Secret", f"{name}: a Secret inline in deploy/ (create it: deploy/README.md)"
        for k, v in walk(obj):
            if k == "env" and isinstance(v, list):
                inline = [e["name"] for e in v if e.get("name") in ("RAY_AUTH_TOKEN", "HF_TOKEN") and "value" in e]
                assert not inline, f"{name}: {inline} inline"


# ---------------------------------------------------------------- network

def test_every_cluster_is_fenced_by_network_policies_of_its_own_manifest():
    found, policies = clusters(), network_policies()
    for c in found:
        others = [o for o in found if o is not c]
        for node_type, labels in c["pods"]:
            where = f"{c['where']} {node_type}"
            selecting = [(f, p) for f, p in policies if selects(p["spec"].get("podSelector"), labels)]
            assert any(f == c["file"] and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                       for f, p in selecting), f"{where}: no NetworkPolicy of {c['file']} selects it"
            for f, p in selecting:
                for rule in p["spec"].get("ingress") or []:
                    problems = rule_problems(rule, c, node_type, others)
                    assert not problems, f"{where}: {f}:{p['metadata']['name']}: {problems}"


def test_rayjobs_submit_from_inside_the_cluster():
    """A K8sJobMode submitter is a pod outside the cluster: the NetworkPolicy would keep it off the dashboard."""
    jobs = [(name, o["spec"]) for name, o in all_objects() if o["kind"] == "RayJob"]
    jobs += [(name, o["spec"]["jobTemplate"]) for name, o in all_objects() if o["kind"] == "RayCronJob"]
    assert len(jobs) >= 3
    for name, spec in jobs:
        assert spec.get("submissionMode") in ("SidecarMode", "HTTPMode"), f"{name}: submitter pod outside the cluster"


def test_dashboard_and_client_ports_are_never_exposed_outside_the_cluster():
    for c in clusters():
        head = c["spec"]["headGroupSpec"]
        # the head service carries the dashboard and client ports: pinned, so an overlay cannot flip it unseen
        assert head.get("serviceType") == "ClusterIP", f"{c['where']}: headGroupSpec.serviceType is not ClusterIP"
        assert ((head.get("headService") or {}).get("spec") or {}).get("type", "ClusterIP") == "ClusterIP", c["where"]
        assert not head.get("enableIngress"), f"{c['where']}: enableIngress publishes the dashboard"
    for name, obj in all_objects():
        services = [obj] if obj["kind"] == "Service" else []
        if obj["kind"] == "RayService" and obj["spec"].get("serveService"):
            services.append(obj["spec"]["serveService"])
        for svc in services:
            if (svc.get("spec") or {}).get("type") in EXPOSED_TYPES:
                for p in svc["spec"].get("ports") or []:
                    assert not {p.get("port"), p.get("targetPort"), p.get("name")} & PRIVATE_PORTS, (name, p)
        if obj["kind"] == "Ingress":
            backends = [v for k, v in walk(obj) if k == "service" and isinstance(v, dict)]
            for b in backends:
                port = b.get("port") or {}
                assert not {port.get("number"), port.get("name")} & PRIVATE_PORTS, (name, b)
                assert not b.get("name", "").endswith("-head-svc"), (name, b)


# ---------------------------------------------------------------- serve and docs

def test_rayservice_head_declares_the_serve_port_of_the_readme_service():
    (service,) = [o for _, o in all_objects() if o["kind"] == "RayService"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in [{k: p.get(k) for k in ("name", "containerPort")}
                                                       for p in head.get("ports") or []]
    readme = (DEPLOY / "README.md").read_text()
    assert f"svc/{service['metadata']['name']}-serve-svc 8000:8000" in readme  # KubeRay's <name>-serve-svc


def test_readme_security_section_matches_the_manifests():
    readme = (DEPLOY / "README.md").read_text()
    assert "\n## Security\n" in readme
    section = readme.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    secrets = {c["spec"]["authOptions"]["secretName"] for c in clusters()}
    assert len(secrets) == 1, secrets
    (secret,) = secrets
    assert re.search(rf"kubectl create secret generic {secret} --from-literal={TOKEN_KEY}=", readme)
    operator_ns = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                   for _, p in network_policies() for rule in p["spec"].get("ingress") or []
                   for peer in rule.get("from") or [] if "namespaceSelector" in peer}
    for word in [*operator_ns, "kubernetes.io/metadata.name", "NetworkPolicy", "8000", "8265", "10001"]:
        assert word in section, f"the Security section does not say {word}"
