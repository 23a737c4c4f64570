"""Reference checks over rendered manifests: every name a manifest uses must name something rendered."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from tests.k3s.conftest import Render

# Objects a site has without this bundle: namespaces of the platform, which policies select by name.
PLATFORM_NAMESPACES = frozenset({"kube-system", "monitoring"})


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions with In/Exists, or a plain map)."""
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    wanted = {**plain, **selector.get("matchLabels", {})}
    if any(labels.get(k) != v for k, v in wanted.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator == "In" and labels.get(key) not in expression["values"]:
            return False
        if operator == "Exists" and key not in labels:
            return False
    return True


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in all_containers(pod_spec(workload)) if c["name"] == name)


def port_names(spec: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", []) if "name" in p}


def volume_keys(render: Render, volume: dict[str, Any]) -> set[str] | None:
    """The file names a secret, config map or projected volume shows; None for directories of data."""
    if "secret" in volume or "configMap" in volume:
        kind, source = ("Secret", volume["secret"]) if "secret" in volume else ("ConfigMap", volume["configMap"])
        name = source.get("secretName") or source.get("name")
        keys = set(render.data(kind, name))
        if "items" in source:
            missing = {i["key"] for i in source["items"]} - keys
            assert not missing, f"{render.name}: {kind} {name} has no keys {missing}"
            return {i["path"] for i in source["items"]}
        return keys
    if "projected" in volume:
        shown: set[str] = set()
        for source in volume["projected"]["sources"]:
            kind, ref = ("Secret", source["secret"]) if "secret" in source else ("ConfigMap", source["configMap"])
            shown |= set(render.data(kind, ref["name"]))
        return shown
    return None


def resolve_path(render: Render, workload: dict[str, Any], container_name: str, path: str) -> dict[str, Any]:
    """The mount a file path of a container lies in; asserts a secret or config map file exists there."""
    spec = pod_spec(workload)
    mounts = container(workload, container_name).get("volumeMounts", [])
    target = PurePosixPath(path)
    found = [m for m in mounts if target == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in
             target.parents]  # fmt: skip
    where = f"{render.name}: {workload['metadata']['name']}/{container_name}"
    assert found, f"{where}: nothing is mounted at {path}"
    mount = max(found, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    keys = volume_keys(render, volume)
    if keys is not None:
        relative = str(target.relative_to(mount["mountPath"]))
        assert relative in keys, f"{where}: {path} is not among the files of volume {volume['name']}: {sorted(keys)}"
    return mount


def check_workload(render: Render, workload: dict[str, Any]) -> None:
    spec = pod_spec(workload)
    name = f"{render.name}: {workload['kind']} {workload['metadata']['name']}"
    assert matches(workload["spec"]["selector"], pod_labels(workload)), f"{name}: selector misses its own pods"
    if "runtimeClassName" in spec:
        assert render.get("RuntimeClass", spec["runtimeClassName"]), f"{name}: no RuntimeClass"
    for volume in spec.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert render.get("PersistentVolumeClaim", claim), f"{name}: no PVC {claim}"
        volume_keys(render, volume)  # asserts secrets and config maps exist
    names = {v["name"] for v in spec.get("volumes", [])}
    ports = port_names(spec)
    for c in all_containers(spec):
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in names, f"{name}/{c['name']}: mounts unknown volume {mount['name']}"
        for env in c.get("env", []):
            ref = env.get("valueFrom", {})
            for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if key in ref:
                    assert ref[key]["key"] in render.data(kind, ref[key]["name"]), f"{name}: {env['name']}"
        own = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
            if action is None:
                continue
            port = action["port"]
            assert port in own or port in own.values(), f"{name}/{c['name']}: {probe} port {port} not served"
    for c in spec["containers"]:
        for p in c.get("ports", []):
            assert p.get("name") in ports


def pods_selected(render: Render, selector: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for w in render.workloads() if matches(selector, pod_labels(w))]


def check_service(render: Render, service: dict[str, Any]) -> None:
    name = f"{render.name}: Service {service['metadata']['name']}"
    selected = pods_selected(render, service["spec"]["selector"])
    assert selected, f"{name}: selects no pods"
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        for workload in selected:
            served = port_names(pod_spec(workload))
            assert target in served or target in served.values(), f"{name}: {workload['metadata']['name']} {target}"


def service_port(render: Render, host: str, port: int) -> dict[str, Any]:
    """The Service a URL's host and port name (short or qualified name in the bundle's namespace)."""
    short = host.split(".", maxsplit=1)[0]
    service = render.get("Service", short)
    assert service is not None, f"{render.name}: no Service for host {host}"
    namespace = service["metadata"].get("namespace")
    assert host in (short, f"{short}.{namespace}.svc", f"{short}.{namespace}.svc.cluster.local"), host
    assert port in [p["port"] for p in service["spec"]["ports"]], f"{render.name}: {host} has no port {port}"
    check_service(render, service)
    return service


def check_network_policy(render: Render, policy: dict[str, Any], bundle: Render) -> None:
    """Selectors must match pods of the bundle (``bundle``: every site's objects together): a base policy
    for the fleet's sidecars selects nothing at a site that runs only the GPU pool, and that is fine."""
    name = f"{render.name}: NetworkPolicy {policy['metadata']['name']}"
    render = bundle
    selector = policy["spec"]["podSelector"]
    selected = pods_selected(render, selector) if selector else list(render.workloads())
    assert selected, f"{name}: applies to no pod"
    rules = [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]
    for rule in rules:
        for peer in [*rule.get("from", []), *rule.get("to", [])]:
            namespaces = peer.get("namespaceSelector", {}).get("matchLabels", {})
            if namespaces:
                assert namespaces.get("kubernetes.io/metadata.name") in PLATFORM_NAMESPACES, f"{name}: {peer}"
            elif "podSelector" in peer:
                assert pods_selected(render, peer["podSelector"]), f"{name}: peer {peer} selects no pod"
        # Named ports: the pods on the receiving side must name them.
        receivers = selected if rule in policy["spec"].get("ingress", []) else [
            w for peer in rule.get("to", []) if "podSelector" in peer and "namespaceSelector" not in peer
            for w in pods_selected(render, peer["podSelector"])
        ]  # fmt: skip
        for port in rule.get("ports", []):
            if isinstance(port["port"], str):
                for workload in receivers:
                    assert port["port"] in port_names(pod_spec(workload)), f"{name}: {port['port']}"
