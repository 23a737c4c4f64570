"""The K3s bundle renders, validates against the Kubernetes and KEDA schemas, and every name in it resolves;
checkov, hadolint and yamllint pass; the configurations it carries are what the fleet's code reads."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.k3s import refs
from tests.k3s.conftest import DEVICE_CLASSES, K3S, REPO, TOOLS_VENV, Render, overlays, run, tool
from tests.k3s.controller import controller_configs

SCHEMAS = Path(__file__).parent / "schemas"
# K3s's stable channel and the newest Kubernetes the schemas know: the bundle must be valid on both.
KUBERNETES_VERSIONS = ("1.33", kubernetes_validate.utils.latest_version())
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json"}
CONTAINERFILES = sorted((K3S / "images").glob("*.Containerfile"))
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# The images the project builds (k3s/images/<name>.Containerfile), by their name in the manifests.
OWN_IMAGES = {f"zimage-edge/{path.name.removesuffix('.Containerfile')}" for path in CONTAINERFILES}


def kustomization(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((path / "kustomization.yaml").read_text())
    return data


def test_every_device_class_has_a_component_and_an_example_site_uses_it() -> None:
    used = {Path(c).name for name in overlays() for c in kustomization(K3S / "overlays" / name).get("components", [])}
    components = {p.name for p in (K3S / "components").iterdir() if (p / "kustomization.yaml").is_file()}
    assert set(DEVICE_CLASSES) <= components
    assert components <= used, f"components no example site renders: {sorted(components - used)}"
    for name in DEVICE_CLASSES:
        assert kustomization(K3S / "components" / name)["kind"] == "Component"


def test_every_overlay_renders_a_daemonset_per_class(renders: dict[str, Render]) -> None:
    assert set(renders) == set(overlays())
    assert len(renders) >= 4
    classes = {refs.pod_labels(ds)["zimage.io/device-class"] for r in renders.values() for ds in r.of_kind("DaemonSet")}
    assert classes == set(DEVICE_CLASSES)
    for render in renders.values():
        for ds in render.of_kind("DaemonSet"):
            cls = refs.pod_labels(ds)["zimage.io/device-class"]
            assert ds["metadata"]["name"] == f"zimage-agent-{cls}"
            # Each class's DaemonSet selects only its own pods: two classes never fight over a pod.
            assert ds["spec"]["selector"]["matchLabels"]["zimage.io/device-class"] == cls
            assert refs.pod_spec(ds)["nodeSelector"] == {"zimage.io/device-class": cls}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_kinds_validate_strictly(renders: dict[str, Render], version: str) -> None:
    for render in renders.values():
        for obj in render.objects:
            if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{render.name}: {obj['kind']} {obj['metadata']['name']} (k8s {version}): {exc.message}")


def test_custom_resources_match_their_published_schema(renders: dict[str, Render]) -> None:
    seen = 0
    for render in renders.values():
        for obj in render.objects:
            schema_file = CUSTOM_KINDS.get((obj["apiVersion"], obj["kind"]))
            if schema_file is None:
                continue
            schema = json.loads((SCHEMAS / schema_file).read_text())
            jsonschema.Draft7Validator(schema).validate(obj)
            spec = obj["spec"]
            # The CRD's CEL rule, which JSON Schema cannot say.
            assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
            seen += 1
    assert seen >= 1


def test_the_autoscalers_read_the_gauge_the_agent_exports(renders: dict[str, Render]) -> None:
    from edge_agent.metrics import Metrics

    exported = {metric.name for metric in Metrics.create().registry.collect()}
    scaled = renders["gpu-pool-keda"].of_kind("ScaledObject")
    hpas = renders["gpu-pool-hpa"].of_kind("HorizontalPodAutoscaler")
    assert scaled
    assert hpas
    for obj in scaled:
        trigger = obj["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        gauge = re.match(r"sum\((\w+)", query)
        assert gauge is not None, query
        assert gauge[1] in exported, query
        assert all(isinstance(v, str) for v in trigger["metadata"].values())
        assert "activationThreshold" in trigger["metadata"]
        assert "fallback" in obj["spec"]
    for hpa in hpas:
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in exported


def test_every_reference_resolves(renders: dict[str, Render]) -> None:
    bundle = Render("bundle", K3S, "", [o for r in renders.values() for o in r.objects])
    for render in renders.values():
        names = [(o["kind"], o["metadata"]["name"]) for o in render.objects]
        assert len(names) == len(set(names)), f"{render.name}: an object is rendered twice"
        for workload in render.workloads():
            refs.check_workload(render, workload)
        for service in render.of_kind("Service"):
            refs.check_service(render, service)
        for policy in render.of_kind("NetworkPolicy"):
            refs.check_network_policy(render, policy, bundle)
        for pdb in render.of_kind("PodDisruptionBudget"):
            assert refs.pods_selected(render, pdb["spec"]["selector"]), f"{render.name}: PDB selects nothing"
        for ingress in render.of_kind("Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    found = render.get("Service", backend["name"])
                    assert found is not None, f"{render.name}: Ingress to missing Service {backend['name']}"
                    assert backend["port"]["name"] in [p["name"] for p in found["spec"]["ports"]]
        for scaler in render.of_kind("ScaledObject", "HorizontalPodAutoscaler"):
            target = scaler["spec"]["scaleTargetRef"]
            # KEDA cannot scale a DaemonSet: the pool is a Deployment.
            assert target["kind"] == "Deployment", target
            assert render.get("Deployment", target["name"]), target
        # Everything namespaced lives in the bundle's namespace.
        for obj in render.objects:
            if obj["kind"] not in ("Namespace", "RuntimeClass"):
                assert obj["metadata"].get("namespace") == "zimage", f"{render.name}: {obj['kind']}"


def test_the_configurations_name_what_the_pods_mount(renders: dict[str, Render], tmp_path: Path) -> None:
    from edge_agent.settings import AgentSettings
    from fleet.node import NodeConfig

    for render in renders.values():
        for pod in controller_configs(render, tmp_path / render.name):
            controller, settings = pod.workload, pod.settings
            assert settings.port == refs.port_names(refs.pod_spec(controller))["http"]
            assert settings.host == "0.0.0.0"
            refs.service_port(render, settings.mqtt.host, settings.mqtt.port)
            assert settings.public_url is not None
            host, port = re.match(r"^http://([^:/]+):(\d+)$", settings.public_url).groups()  # type: ignore[union-attr]
            refs.service_port(render, host, int(port))
            for path in [settings.mqtt.ca_file, *settings.signing_public_keys]:
                refs.resolve_path(render, controller, "controller", str(path))
            if "://" not in settings.database:
                # SQLite: a file on the controller's claim (a database URL is the site's server).
                mount = refs.resolve_path(render, controller, "controller", str(Path(settings.database).parent))
                assert any(v["name"] == mount["name"] and "persistentVolumeClaim" in v
                           for v in refs.pod_spec(controller)["volumes"])  # fmt: skip

        for workload in [*render.of_kind("DaemonSet"), *render.of_kind("Deployment")]:
            names = [c["name"] for c in refs.pod_spec(workload)["containers"]]
            if "agent" not in names:
                continue
            agent = refs.container(workload, "agent")
            agent_file = agent["command"][agent["command"].index("--config") + 1]
            refs.resolve_path(render, workload, "agent", agent_file)
            toml = render.data("Secret", _secret_of(render, workload, "agent", agent_file))[Path(agent_file).name]
            agent_settings = AgentSettings(model="m", host="0.0.0.0", **tomllib.loads(toml))
            assert agent_settings.auth_enabled
            assert any(k.admin for k in agent_settings.api_keys)
            for path in agent_settings.trusted_keys:
                refs.resolve_path(render, workload, "agent", str(path))
            if "node" not in names:
                continue
            node = refs.container(workload, "node")
            node_file = node["command"][node["command"].index("--config") + 1]
            # The init container writes it into the volume the sidecar reads it from.
            init = refs.container(workload, "node-config")
            assert f"> {node_file}" in init["command"][-1]
            template = render.data("Secret", "node-config-" + _hash_of(render, "node-config"))["node.toml.in"]
            filled = template.replace("@NODE_ID@", "node-1").replace("@PASSWORD@", "p").replace("@DEVICE_CLASS@", "t4")
            config = NodeConfig.model_validate(tomllib.loads(filled))
            store = refs.resolve_path(render, workload, "node", str(config.store_dir))
            assert not store.get("readOnly", False)
            agent_store = refs.resolve_path(render, workload, "agent", str(config.store_dir))
            assert agent_store["mountPath"] == store["mountPath"], "the sidecar and the agent see different paths"
            assert config.agent_url.endswith(f":{agent_settings.port}")
            assert agent_settings.port == refs.port_names(refs.pod_spec(workload))["http"]
            refs.service_port(render, config.mqtt.host, config.mqtt.port)
            for path in [config.mqtt.ca_file, *config.trusted_keys]:
                refs.resolve_path(render, workload, "node", str(path))
            # Every example node has its broker password.
            credentials = render.data("Secret", "node-credentials-" + _hash_of(render, "node-credentials"))
            assert set(credentials) >= set(_example_nodes(render))


def _hash_of(render: Render, prefix: str) -> str:
    names = [o["metadata"]["name"] for o in render.objects if o["metadata"]["name"].startswith(prefix + "-")]
    assert len(names) == 1, names
    return names[0].removeprefix(prefix + "-")


def _secret_of(render: Render, workload: dict[str, Any], container_name: str, path: str) -> str:
    mount = refs.resolve_path(render, workload, container_name, path)
    volume = next(v for v in refs.pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    name: str = volume["secret"]["secretName"]
    return name


def _example_nodes(render: Render) -> list[str]:
    from tests.k3s.conftest import EXAMPLE_NODES

    return EXAMPLE_NODES[render.name]


def test_the_broker_config_is_what_fleet_security_writes(renders: dict[str, Render]) -> None:
    from fleet.security import BrokerFiles, BrokerSettings, broker_config

    conf = (K3S / "base" / "mosquitto.conf").read_text()
    expected = broker_config(BrokerFiles.beside(Path("/mosquitto/config/mosquitto.conf")),
                             BrokerSettings(data_dir=Path("/mosquitto/data"), certificate_port=None))  # fmt: skip
    assert conf == expected
    for render in renders.values():
        # The one site-secrets.py wrote beside the site's files differs only in their directory.
        secrets_dir = render.directory / "secrets"
        written = (secrets_dir / "mosquitto.conf").read_text()
        assert written.replace(str(secrets_dir.resolve()), "/mosquitto/config") == conf
        broker = render.get("Deployment", "mosquitto")
        assert broker is not None
        files = re.findall(r"^(?:password_file|acl_file|cafile|certfile|keyfile) (\S+)$", conf, re.M)
        assert len(files) == 5
        for path in [*files, refs.container(broker, "mosquitto")["command"][-1]]:
            refs.resolve_path(render, broker, "mosquitto", path)
        data = re.search(r"^persistence_location (\S+)$", conf, re.M)
        assert data is not None
        mount = refs.resolve_path(render, broker, "mosquitto", data[1].rstrip("/"))
        assert mount["name"] == "data"
        assert not mount.get("readOnly", False)
        listener = re.search(r"^listener (\d+)$", conf, re.M)
        assert listener is not None
        assert refs.port_names(refs.pod_spec(broker))["mqtts"] == int(listener[1])


def test_images_are_pinned_or_built_here(renders: dict[str, Render]) -> None:
    for render in renders.values():
        for workload in render.workloads():
            for c in refs.all_containers(refs.pod_spec(workload)):
                image = c["image"]
                name = image.split("@")[0].rsplit(":", 1)[0]
                assert DIGEST.search(image) or name in OWN_IMAGES, f"{render.name}: {image} is not pinned by digest"


def test_containerfiles_are_multi_stage_non_root_and_pinned() -> None:
    assert {p.name for p in CONTAINERFILES} == {"agent-cuda.Containerfile", "agent-l4t.Containerfile",
                                                "fleet.Containerfile"}  # fmt: skip
    for path in CONTAINERFILES:
        text = path.read_text()
        froms = re.findall(r"^FROM (\S+)", text, re.M)
        assert len(froms) >= 2, f"{path.name}: not multi-stage"
        for base in froms:
            if base.startswith("${"):
                arg = base[2:-1]
                # A base given as a build argument: the build refuses one without a digest.
                assert re.search(rf'case "\${{{arg}}}" in \*@sha256:\*\) ;; \*\) .*exit 1', text), path.name
            else:
                assert DIGEST.search(base), f"{path.name}: {base}"
        assert re.search(r"^USER 10001:10001$", text, re.M), f"{path.name}: runs as root"
        # No model weights in an image: nothing is copied in but the source.
        copied = re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
        allowed = ("k3s/images/fleet-requirements.txt", "pyproject.toml", "zimage_edge", "edge_agent", "quantize",
                   "fleet")  # fmt: skip
        for line in copied:
            assert line.split()[0] in allowed, f"{path.name}: COPY {line}"


def test_fleet_image_requirements_are_pyprojects_torch_free_part() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = {re.split(r"[<>=!\[]", d, maxsplit=1)[0]: d for d in pyproject["project"]["dependencies"]}
    lines = [line for line in (K3S / "images" / "fleet-requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]  # fmt: skip
    for line in lines:
        name = re.split(r"[<>=!\[]", line, maxsplit=1)[0]
        assert declared.get(name) == line, f"{line} differs from pyproject's {declared.get(name)}"
        assert name not in {"torch", "diffusers", "transformers", "accelerate", "optimum-quanto"}


def test_checkov_passes_on_the_rendered_overlays_and_the_containerfiles(
    renders: dict[str, Render], tmp_path: Path
) -> None:
    checkov = tool("checkov", TOOLS_VENV)
    for render in renders.values():
        (tmp_path / f"{render.name}.yaml").write_text(render.text)
    # checkov's Dockerfile runner finds files named Dockerfile*: the Containerfiles go in under such names.
    for path in CONTAINERFILES:
        shutil.copyfile(path, tmp_path / f"Dockerfile.{path.name.removesuffix('.Containerfile')}")
    proc = run([checkov, "--skip-download", "--framework", "kubernetes", "dockerfile", "-d", tmp_path,
                "--compact", "-o", "json"])  # fmt: skip
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    frameworks = {r["check_type"] for r in reports}
    assert frameworks == {"kubernetes", "dockerfile"}, frameworks
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed
    assert proc.returncode == 0, proc.stderr
    for report in reports:
        assert report["summary"]["passed"] > 0
        assert report["summary"]["parsing_errors"] == 0
        for skipped in report["results"]["skipped_checks"]:
            # Every suppression says why, where it is made.
            assert len(skipped["check_result"].get("suppress_comment", "")) >= 40, skipped["check_id"]


def test_hadolint_passes_on_the_containerfiles() -> None:
    hadolint = tool("hadolint")
    for path in CONTAINERFILES:
        proc = run([hadolint, path])
        assert proc.returncode == 0, f"{path.name}: {proc.stdout}{proc.stderr}"


def test_yamllint_passes_on_the_bundle() -> None:
    proc = run([tool("yamllint"), "-c", K3S / ".yamllint.yaml", "-f", "parsable", K3S])
    assert proc.returncode == 0, proc.stdout
