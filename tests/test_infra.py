"""The production stack without a docker daemon: the compose file against the Compose specification's schema, the
images installing the project the way the Makefile does, and the Kubernetes job template rendered by Prefect's own
Kubernetes worker code."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "compose" / "compose.yaml"
SCHEMA = Path(sys.prefix) / "share" / "compose-spec.json"
IMAGES = {"tunewright-platform": "docker/Dockerfile.platform", "tunewright-trainer": "docker/Dockerfile.trainer",
          "tunewright-server": "docker/Dockerfile.server"}
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "VLLM_NO_USAGE_STATS": "1"}


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: $$, ${VAR}, ${VAR:-default}, ${VAR:?error}."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op == ":?" and not value:
            raise KeyError(f"{name}: {arg}")
        return value or (arg if op == ":-" else "")

    return re.sub(r"\$\$|\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, text)


def compose(env: dict[str, str] | None = None) -> dict:
    values = _env_file(ROOT / "infra" / "compose" / ".env.example") if env is None else env
    return yaml.safe_load(interpolate(COMPOSE.read_text(), values))


def test_the_compose_file_is_valid_against_the_compose_specification():
    import jsonschema

    if not SCHEMA.is_file():
        pytest.fail(f"{SCHEMA} missing: `make install` writes it (scripts/compose_schema.py)")
    spec = compose()
    jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text())).validate(spec)
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        env = dict(os.environ, **_env_file(ROOT / "infra" / "compose" / ".env.example"))
        out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr


def test_the_compose_stack_is_wired_together():
    services = compose()["services"]
    assert {"postgres", "minio", "mlflow", "prefect", "deploy", "worker", "server"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on a service that does not exist: {dep}"
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert context == ROOT and svc["build"]["dockerfile"] == IMAGES[svc["image"]]
        if str(svc.get("image", "")).startswith("tunewright-"):
            env = svc.get("environment", {})
            assert {k: env.get(k) for k in TELEMETRY_OFF} == TELEMETRY_OFF, f"{name} would send telemetry"
    built = {svc["image"] for svc in services.values() if "build" in svc}
    assert built == set(IMAGES)  # every image a service runs is built from this repository
    ports = [p.split(":")[0] for svc in services.values() for p in svc.get("ports", [])]
    assert len(ports) == len(set(ports))
    mlflow = " ".join(services["mlflow"]["command"])
    assert "postgresql://" in mlflow and "@postgres:5432/mlflow" in mlflow and "s3://tunewright/mlflow" in mlflow
    assert "postgresql+asyncpg://" in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    worker = services["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert worker["shm_size"] and worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["server"]["command"][0] == "models:/support-ticket-json@champion"
    assert "s3://tunewright/requests" in services["server"]["command"][1]  # the request log stage 7 reads
    assert "mlflow" in (ROOT / "infra" / "compose" / "initdb.sql").read_text().lower()


def test_compose_refuses_to_start_without_its_secrets():
    with pytest.raises(KeyError, match=r"S3_ACCESS_KEY: set S3_ACCESS_KEY in infra/compose/.env"):
        compose(env={})
    env = _env_file(ROOT / "infra" / "compose" / ".env.example")
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        compose(env={k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"})


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_image_installs_the_project_the_way_the_makefile_does(image):
    steps = _instructions(ROOT / IMAGES[image])
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "scripts/install.sh /opt/venv" in runs and "pip install" not in runs  # one install, the Makefile's
    for op, arg in steps:
        if op == "COPY":
            for src in arg.split()[:-1]:
                assert (ROOT / src).exists(), f"{IMAGES[image]}: COPY {src}: not in the repository"
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert all(f"{k}={v}" in env for k, v in TELEMETRY_OFF.items())
    entry = [json.loads(arg) for op, arg in steps if op in ("ENTRYPOINT", "CMD")][0]
    assert (Path(sys.executable).parent / entry[0]).is_file(), f"{entry[0]} is not installed by the project"
    # the copied tree holds what the install needs, and the COPY of scripts/ comes before the install runs
    copies = [arg.split()[0] for op, arg in steps if op == "COPY"]
    assert {"pyproject.toml", "scripts", "tunewright", "flows", "tasks"} <= set(copies)
    first_run = next(i for i, (op, arg) in enumerate(steps) if op == "RUN" and "install.sh" in arg)
    assert all(i < first_run for i, (op, arg) in enumerate(steps) if op == "COPY" and arg.split()[0] == "scripts")


def test_the_makefile_installs_with_the_images_script():
    makefile = (ROOT / "Makefile").read_text()
    assert "sh scripts/install.sh $(VENV) dev" in makefile and "pip install" not in makefile
    out = subprocess.run(["sh", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True)
    assert out.returncode != 0 and "usage: scripts/install.sh VENV" in out.stderr
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_the_kubernetes_job_template_renders_gpu_jobs_with_prefects_worker():
    import asyncio

    import jsonschema
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((ROOT / "infra" / "k8s" / "base-job-template.json").read_text())
    values = {"gpu_count": 2, "image": "registry.example/tunewright-trainer:1", "shm_size": "32Gi"}
    jsonschema.validate(values, template["variables"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu_count": -1}, template["variables"])
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    pod = config.job_manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/tunewright-trainer:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and config.namespace == "tunewright"
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    assert {k: defaults["env"][k] for k in TELEMETRY_OFF} == TELEMETRY_OFF


def test_the_kubernetes_manifests_fit_together():
    docs = [d for d in yaml.safe_load_all((ROOT / "infra" / "k8s" / "tunewright.yaml").read_text()) if d]
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "tunewright"
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for (kind, name), doc in by.items():
        if kind in ("Deployment", "Job"):
            pod = doc["spec"]["template"]["spec"]
            for c in pod["containers"]:
                assert c["image"].split(":")[0] in IMAGES
            if kind == "Deployment":
                assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"][
                    "labels"].items()
            if "serviceAccountName" in pod:
                assert ("ServiceAccount", pod["serviceAccountName"]) in by
        if kind == "Service":
            assert any(k == "Deployment" and d["spec"]["template"]["metadata"]["labels"] == doc["spec"]["selector"]
                       for (k, _), d in by.items())
    worker = by[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert worker[worker.index("--pool") + 1] == "tunewright" and "kubernetes" in worker
    assert {r for rule in by[("Role", "prefect-worker")]["rules"] for r in rule["resources"]} >= {"jobs", "pods"}
    template = json.loads((ROOT / "infra" / "k8s" / "base-job-template.json").read_text())
    jobs_sa = template["variables"]["properties"]["service_account_name"]["default"]
    assert ("ServiceAccount", jobs_sa) in by
    deploy = by[("Job", "deploy")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert deploy[deploy.index("--kubernetes-template") + 1] == "infra/k8s/base-job-template.json"


def _env_list(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_the_ray_cluster_manifest_has_gpu_workers_and_a_shared_folder():
    docs = [d for d in yaml.safe_load_all((ROOT / "infra" / "k8s" / "raycluster.yaml").read_text()) if d]
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert all(d["metadata"]["namespace"] == "tunewright" for d in docs)
    pvc = by[("PersistentVolumeClaim", "tunewright-shared")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    ray = by[("RayCluster", "tunewright")]
    assert ray["apiVersion"] == "ray.io/v1"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'"ray\[[a-z,]*train[a-z,]*\]=={re.escape(ray["spec"]["rayVersion"])}"', pyproject)  # the image's Ray is the manifest's
    head = ray["spec"]["headGroupSpec"]
    groups = ray["spec"]["workerGroupSpecs"]
    gpu = next(g for g in groups if g["groupName"] == "gpu")
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    gpu_container = gpu["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0].get("resources"))
    k8s = [d for d in yaml.safe_load_all((ROOT / "infra" / "k8s" / "tunewright.yaml").read_text()) if d]
    services = {d["metadata"]["name"] for d in k8s if d["kind"] == "Service"}
    accounts = {d["metadata"]["name"] for d in k8s if d["kind"] == "ServiceAccount"}
    for group in [head, *groups]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] in accounts
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert c["image"].split(":")[0] == "tunewright-trainer"
            env = _env_list(c)
            assert env["RAY_USAGE_STATS_ENABLED"] == "0" and {k: env.get(k) for k in TELEMETRY_OFF} == TELEMETRY_OFF
            for url in (env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"]):
                assert url.split("//")[1].split(".")[0] in services  # the services of tunewright.yaml
            assert env["TUNEWRIGHT_HOME"].startswith("/shared/")
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"] == "tunewright-shared"
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_the_compose_ray_cluster_shares_a_volume_and_reserves_gpus():
    services = compose()["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["image"] == worker["image"] == "tunewright-trainer"
    assert head["command"][:4] == ["ray", "start", "--head", "--block"] and "--port=6379" in head["command"]
    assert "--address=ray-head:6379" in worker["command"] and "--block" in worker["command"]
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for svc in (head, worker, services["worker"]):  # the flow's worker reaches the same checkpoints
        assert "shared:/shared" in svc["volumes"]
    for svc in (head, worker):
        assert svc["environment"]["RAY_USAGE_STATS_ENABLED"] == "0"
        assert svc["environment"]["TUNEWRIGHT_HOME"].startswith("/shared/")
    assert "shared" in compose()["volumes"]
    assert "EXPOSE 6379 10001" in (ROOT / "docker" / "Dockerfile.trainer").read_text()
