"""The controller as replicas (k3s/components/controller-replicas) against the fleet's code: each replica
starts with its own broker identity and the site's PostgreSQL, shares the ingest and the artifacts, and
the cluster keeps one running; site-secrets.py refuses what the replicas cannot run on."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.k3s import refs
from tests.k3s.conftest import EXAMPLE_CONTROLLER_REPLICAS, EXAMPLE_DATABASE_URL, K3S, Render
from tests.k3s.controller import (
    CONTROLLER,
    config_path,
    controller_configs,
    controller_workload,
    pod_names,
    replicas,
    run_init,
)

COMPONENT = K3S / "components" / "controller-replicas"
# K3s's own storage class: ReadWriteOnce only, one node's disk.
K3S_LOCAL_STORAGE = "local-path"


def backend(database: str) -> str:
    from fleet.schema import database_url

    return make_url(database_url(database)).get_backend_name()


def replicated(renders: dict[str, Render]) -> list[Render]:
    found = [r for r in renders.values() if controller_workload(r)["kind"] == "StatefulSet"]
    assert {r.name for r in found} == set(EXAMPLE_CONTROLLER_REPLICAS)
    return found


def test_the_component_is_a_component_and_a_site_uses_it() -> None:
    data = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert data["kind"] == "Component"
    for name in EXAMPLE_CONTROLLER_REPLICAS:
        site = yaml.safe_load((K3S / "overlays" / name / "kustomization.yaml").read_text())
        assert "../../components/controller-replicas" in site["components"]


def test_more_than_one_replica_means_postgresql_and_a_share_group(renders: dict[str, Render], tmp_path: Path) -> None:
    for render in renders.values():
        workload = controller_workload(render)
        configs = controller_configs(render, tmp_path / render.name)
        if replicas(workload) == 1 and workload["kind"] == "Deployment":
            # One controller on SQLite: the old pod must be gone before the new one opens the file.
            assert workload["spec"]["strategy"]["type"] == "Recreate"
            assert backend(configs[0].settings.database) == "sqlite"
            continue
        assert workload["kind"] == "StatefulSet", render.name
        assert replicas(workload) == EXAMPLE_CONTROLLER_REPLICAS[render.name] > 1
        assert render.get("Deployment", CONTROLLER) is None
        assert render.get("PersistentVolumeClaim", "zimage-controller-data") is None
        assert workload["spec"]["updateStrategy"]["type"] == "RollingUpdate"
        # Nothing per replica on disk: the database is the site's server, the artifacts one shared volume.
        assert "volumeClaimTemplates" not in workload["spec"]
        assert len(configs) == replicas(workload)
        for pod in configs:
            settings = pod.settings
            assert backend(settings.database) == "postgresql", pod.pod
            assert settings.database == EXAMPLE_DATABASE_URL
            assert settings.replica_group, pod.pod
        assert len({pod.settings.replica_group for pod in configs}) == 1
        assert len({pod.settings.lease_ttl_s for pod in configs}) == 1


def test_each_replica_has_its_own_broker_identity(renders: dict[str, Render], tmp_path: Path) -> None:
    from fleet.controller import ControllerConfig
    from fleet.security import PkiPaths, Role, Status, load_registry

    for render in replicated(renders):
        configs = controller_configs(render, tmp_path / render.name)
        pki = render.directory / "secrets" / "pki"
        registry = load_registry(pki)
        acl = render.data("ConfigMap", _generated(render, "mosquitto-acl"))["mosquitto.acl"]
        passwd = render.data("Secret", _generated(render, "mosquitto-secrets"))["mosquitto.passwd"]
        for pod in configs:
            mqtt = pod.settings.mqtt
            # The broker takes the user name as the client id: one per pod, named as the pod.
            assert pod.settings.controller_id == mqtt.username == pod.pod
            identity = registry.identities[pod.pod]
            assert (identity.role, identity.status) == (Role.CONTROLLER, Status.ACTIVE)
            assert mqtt.password is not None
            issued = (PkiPaths(pki).client_dir(pod.pod) / "password").read_text().strip()
            assert mqtt.password.get_secret_value() == issued, pod.pod
            assert re.search(rf"^{re.escape(pod.pod)}:\$7\$", passwd, re.M), f"{pod.pod} not in the password file"
            assert re.search(rf"^user {re.escape(pod.pod)}$", acl, re.M), f"{pod.pod} has no ACL block"
            # As the controller runs it: a clean session in the share group.
            config = ControllerConfig(controller_id=pod.settings.controller_id, mqtt=mqtt, artifact_base_url="x",
                                      replica_group=pod.settings.replica_group)  # fmt: skip
            assert config.mqtt_session().clean_start is True
        assert len({pod.settings.mqtt.username for pod in configs}) == len(configs)


def test_a_replica_without_credentials_or_with_a_quoted_url_does_not_start(
    renders: dict[str, Render], tmp_path: Path
) -> None:
    for render in replicated(renders):
        workload = controller_workload(render)
        beyond = f"{CONTROLLER}-{replicas(workload)}"  # scaled past what site-secrets.py provisioned
        proc, where = run_init(render, workload, "controller-config", beyond, tmp_path / beyond)
        assert proc.returncode == 1
        assert f"controller replica {beyond}" in proc.stderr
        assert "--controller-replicas" in proc.stderr
        assert not Path(where["/run/zimage"], Path(config_path(workload)).name).exists()
        # A URL that cannot sit in the TOML string as it is (site-secrets.py refuses it too).
        pod = pod_names(workload)[0]
        quoted = {"/etc/zimage/database/database-url": 'postgresql://fleet:a"b@db/fleet\n'}
        proc, where = run_init(render, workload, "controller-config", pod, tmp_path / "quoted", replace=quoted)
        assert proc.returncode == 1
        assert "percent-encode" in proc.stderr
        assert not Path(where["/run/zimage"], Path(config_path(workload)).name).exists()


def test_the_database_url_comes_from_its_secret(renders: dict[str, Render]) -> None:
    for render in replicated(renders):
        workload = controller_workload(render)
        volumes = {v["name"]: v for v in refs.pod_spec(workload)["volumes"]}
        mount = refs.resolve_path(render, workload, "controller-config", "/etc/zimage/database/database-url")
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"].startswith("controller-database-")
        assert render.data("Secret", source["secretName"])["database-url"].strip() == EXAMPLE_DATABASE_URL
        # Only the init container sees the database URL, the credentials and the template.
        controller = {m["name"] for m in refs.container(workload, "controller")["volumeMounts"]}
        assert not controller & {"database", "credentials", "config"}
        run = refs.resolve_path(render, workload, "controller", config_path(workload))
        assert run["readOnly"] is True
        assert volumes[run["name"]]["emptyDir"]["medium"] == "Memory"


def test_a_disruption_budget_and_spread_keep_a_replica_up(renders: dict[str, Render]) -> None:
    for render in replicated(renders):
        workload = controller_workload(render)
        pdbs = [
            p
            for p in render.of_kind("PodDisruptionBudget")
            if workload in refs.pods_selected(render, p["spec"]["selector"])
        ]
        assert len(pdbs) == 1, render.name
        pdb = pdbs[0]
        assert pdb["spec"]["minAvailable"] == 1
        assert refs.pods_selected(render, pdb["spec"]["selector"]) == [workload], "the PDB selects other pods"
        anti = refs.pod_spec(workload)["affinity"]["podAntiAffinity"]
        # Preferred: a site with fewer nodes than replicas still runs them all.
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
        terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        assert [t["podAffinityTerm"]["topologyKey"] for t in terms] == ["kubernetes.io/hostname"]
        assert refs.matches(terms[0]["podAffinityTerm"]["labelSelector"], refs.pod_labels(workload))
        # The Service, Ingress and NetworkPolicies of the base reach the replicas.
        service = render.get("Service", CONTROLLER)
        assert service is not None
        assert refs.pods_selected(render, service["spec"]["selector"]) == [workload]


def test_every_replica_serves_every_artifact_from_one_shared_volume(renders: dict[str, Render]) -> None:
    for render in replicated(renders):
        workload = controller_workload(render)
        # Where the README tells operators to copy artifacts before `fleet publish`.
        mount = refs.resolve_path(render, workload, "controller", "/var/lib/zimage-controller/artifacts/int8-te8")
        assert not mount.get("readOnly", False)
        volume = next(v for v in refs.pod_spec(workload)["volumes"] if v["name"] == mount["name"])
        claim = render.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim is not None
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert claim["spec"]["storageClassName"] != K3S_LOCAL_STORAGE


def test_the_replicas_run_the_controller_as_the_base_does(renders: dict[str, Render]) -> None:
    base = yaml.safe_load_all((K3S / "base" / "controller.yaml").read_text())
    deployment = next(o for o in base if o["kind"] == "Deployment")
    for render in replicated(renders):
        workload = controller_workload(render)
        ours, theirs = refs.container(workload, "controller"), refs.container(deployment, "controller")
        same = ("image", "imagePullPolicy", "ports", "startupProbe", "readinessProbe", "livenessProbe", "resources",
                "securityContext")  # fmt: skip
        for key in same:
            assert ours[key] == theirs[key], f"{render.name}: the replicas' {key} differs from the base's"
        assert ours["command"][:-1] == theirs["command"][:-1]
        for key in ("securityContext", "automountServiceAccountToken"):
            assert refs.pod_spec(workload)[key] == refs.pod_spec(deployment)[key]
        assert (
            workload["spec"]["template"]["metadata"]["annotations"]
            == (deployment["spec"]["template"]["metadata"]["annotations"])
        )


def _generated(render: Render, prefix: str) -> str:
    names = [o["metadata"]["name"] for o in render.objects if o["metadata"]["name"].startswith(prefix + "-")]
    assert len(names) == 1, names
    return names[0]


def site_secrets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("site_secrets", K3S / "site-secrets.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("site_secrets", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantize.signing import generate_keypair

    _private, public = generate_keypair(tmp_path_factory.mktemp("keys"))
    return public


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:////var/lib/fleet.db", "PostgreSQL"),
        ("/var/lib/zimage-controller/fleet.db", "PostgreSQL"),
        ("mysql://fleet:p@db/fleet", "PostgreSQL"),
        ('postgresql://fleet:a"b@db/fleet', "percent-encode"),
        ("postgresql://fleet:a b@db/fleet", "percent-encode"),
        ("postgresql://fleet:p@db:notaport/fleet", "does not parse"),
    ],
)
def test_site_secrets_refuses_a_database_replicas_cannot_share(
    tmp_path: Path, signing_key: Path, url: str, message: str
) -> None:
    module = site_secrets()
    url_file = tmp_path / "database-url"
    url_file.write_text(url + "\n")
    with pytest.raises(ValueError, match=message):
        module.write_site(tmp_path / "secrets", ["n1"], signing_key, 2, url_file)
    assert not (tmp_path / "secrets").exists()


def test_site_secrets_keeps_identities_and_adds_replicas(tmp_path: Path, signing_key: Path) -> None:
    from fleet.cli import ControllerSettings

    module = site_secrets()
    url_file = tmp_path / "database-url"
    url_file.write_text(EXAMPLE_DATABASE_URL + "\n")
    out = tmp_path / "secrets"
    with pytest.raises(ValueError, match="go together"):
        module.write_site(out, ["n1"], signing_key, 2, None)
    with pytest.raises(ValueError, match="at least 1"):
        module.write_site(out, ["n1"], signing_key, 0, url_file)
    module.write_site(out, ["n1"], signing_key, 2, url_file)
    first = (out / "controller-credentials.env").read_text()
    assert [line.split("=")[0] for line in first.splitlines()] == [f"{CONTROLLER}-0", f"{CONTROLLER}-1"]
    assert not (out / "controller.toml").exists()
    module.write_site(out, ["n1", "n2"], signing_key, 3, url_file)
    second = (out / "controller-credentials.env").read_text()
    assert second.startswith(first), "a later run must keep the replicas' passwords"
    assert len(second.splitlines()) == 3
    template = (out / "controller.toml.in").read_text()
    for line in second.splitlines():
        pod, password = line.split("=", 1)
        text = module.complete_replica_toml(template, EXAMPLE_DATABASE_URL, pod, password)
        settings = ControllerSettings.model_validate(tomllib.loads(text))
        assert (settings.controller_id, settings.mqtt.username) == (pod, pod)
    for name in ("controller.toml.in", "controller-credentials.env", "database-url"):
        assert (out / name).stat().st_mode & 0o077 == 0, name
