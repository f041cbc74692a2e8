"""The container files agree with each other and with the server's settings.

compose.yaml, deploy/compose.multi-gpu.yaml, deploy/kubernetes.yaml and
deploy/kuberay-rayservice.yaml must name the same image, probe /health and /ready
on the port the server is told to use, ask for GPUs and mount the models; the
Dockerfile must keep its promises (non-root, HEALTHCHECK, volumes, entrypoint, no
test stage in the image). No container tool is needed: scripts/container-test.sh
builds and runs the image itself.
"""

from __future__ import annotations

import http.server
import importlib.util
import re
import threading
from pathlib import Path

import pytest
import yaml

from qwen_image_server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORT = Settings.model_fields["port"].default


def _load(relative: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((ROOT / relative).read_text()) if doc]


def _repository(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def _compose_service(relative: str) -> dict:
    (doc,) = _load(relative)
    (service,) = doc["services"].values()
    return service


def _k8s(kind: str) -> dict:
    (doc,) = [doc for doc in _load("deploy/kubernetes.yaml") if doc["kind"] == kind]
    return doc


def _kuberay(kind: str) -> dict:
    (doc,) = [doc for doc in _load("deploy/kuberay-rayservice.yaml") if doc["kind"] == kind]
    return doc


def _kuberay_containers() -> list[dict]:
    ray = _kuberay("RayService")
    cluster = ray["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    return [container for pod in pods for container in pod["spec"]["containers"]]


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def test_every_file_names_the_same_image():
    images = [
        _compose_service("compose.yaml")["image"],
        _compose_service("deploy/compose.multi-gpu.yaml")["image"],
        *(c["image"] for c in _k8s("Deployment")["spec"]["template"]["spec"]["containers"]),
        *(c["image"] for c in _kuberay_containers()),
    ]
    assert len({_repository(image) for image in images}) == 1, images


@pytest.mark.parametrize("relative", ["compose.yaml", "deploy/compose.multi-gpu.yaml"])
def test_compose_gpu_models_port_and_health(relative):
    service = _compose_service(relative)
    env = {key: str(value) for key, value in service["environment"].items()}
    port = int(env.get("PORT", DEFAULT_PORT))
    assert any(mapping.split(":")[-1] == str(port) for mapping in service["ports"])
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") or device.get("device_ids")
    targets = [re.search(r":(/[^:]*)(?::r[ow])?$", volume)[1] for volume in service["volumes"]]
    assert "/models" in targets
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    # The image's HEALTHCHECK script, which probes /ready on PORT (tested below).
    assert service["healthcheck"]["test"][-1] == "/opt/qis/healthcheck.py"
    assert "/opt/qis/healthcheck.py" in _dockerfile()


def test_compose_uses_the_names_of_seed_002():
    env = _compose_service("compose.yaml")["environment"]
    assert {"MODEL_PATH", "MODEL_NAME", "NUM_GPUS_TO_USE", "TASK_QUEUE_SIZE", "TASK_TIMEOUT", "IMAGE_OUTPUT_DIR"} <= set(env)
    assert env["MODEL_PATH"] == "/models/qwen-image"  # the folder name the README and the other files use
    names = Settings.model_fields  # every name given is one the server reads
    aliases = {alias for field in names.values() if field.validation_alias for alias in field.validation_alias.choices}
    assert set(env) - {"HF_HUB_OFFLINE"} <= aliases | {f"QIS_{name.upper()}" for name in names}


def test_kubernetes_probes_gpu_and_models_claim():
    deployment = _k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    port = int(_env(container).get("PORT", DEFAULT_PORT))
    assert port in ports.values()

    def probed(probe: str) -> tuple[str, int]:
        get = container[probe]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probed("readinessProbe") == ("/ready", port)
    assert probed("startupProbe") == ("/ready", port)
    assert probed("livenessProbe") == ("/health", port)
    # as the image's HEALTHCHECK (5 s) waits for /ready, not Kubernetes' 1 s default
    assert all(container[probe]["timeoutSeconds"] >= 5 for probe in ("readinessProbe", "startupProbe", "livenessProbe"))
    assert pod["shareProcessNamespace"] is True  # a PID 1 that reaps what worker processes leave behind
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    claim = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    assert _k8s("PersistentVolumeClaim")["metadata"]["name"] == claim
    assert pod["securityContext"]["runAsUser"] == int(re.search(r"ARG QIS_UID=(\d+)", _dockerfile())[1])
    service = _k8s("Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (service_port,) = service["spec"]["ports"]
    assert ports.get(service_port["targetPort"], service_port["targetPort"]) == port


def test_kuberay_workers_get_gpus_a_claim_every_node_can_mount_and_the_shutdown_grace():
    """The autoscaler spreads up to 8 GPU workers over nodes: they shared the Deployment's ReadWriteOnce claim, which
    attaches to one node only; and without terminationGracePeriodSeconds Kubernetes' 30 s cut the 30 s grace."""
    ray = _kuberay("RayService")
    cluster = ray["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(mount["mountPath"] == "/models" for mount in worker["volumeMounts"])
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    claim = _kuberay("PersistentVolumeClaim")
    assert claims == {claim["metadata"]["name"]} and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for spec in (pod, cluster["headGroupSpec"]["template"]["spec"]):
        assert spec["terminationGracePeriodSeconds"] > Settings().shutdown_grace_seconds + 5  # the ingress's grace


def test_dockerfile_promises():
    text = _dockerfile()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M | re.I)
    assert stages[-1] == ("runtime", ""), "the last (default) stage is the image, not the test"
    assert ("runtime", "test") in stages
    runtime = text[text.index("AS runtime") : text.index("AS test")]
    runtime = "\n".join(line for line in runtime.splitlines() if not line.startswith("#"))
    assert re.search(r"^USER (?!root|0\b)\S+", runtime, flags=re.M)
    assert re.search(r"^HEALTHCHECK .*healthcheck\.py", runtime, flags=re.M)
    assert re.search(rf"^EXPOSE {DEFAULT_PORT}$", runtime, flags=re.M)
    assert 'ENTRYPOINT ["qwen-image-server"]' in runtime and 'CMD ["serve"]' in runtime
    volumes = re.search(r"^VOLUME (\[.*\])$", runtime, flags=re.M)[1]
    hf_home = re.search(r"HF_HOME=(\S+)", runtime)[1]
    assert "/models" in volumes and hf_home in volumes
    assert "QIS_MODELS_DIR=/models" in runtime
    assert "container_smoke" not in runtime


def test_the_build_context_holds_what_the_dockerfile_copies():
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*", "the context is opt-in: everything is left out but what is named"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = []
    for line in _dockerfile().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += words[1:-1]
        sources += re.findall(r"type=bind,source=([^,\s]+)", line)
    assert sources
    for source in sources:
        assert source.rstrip("/") in kept, f"{source} is left out of the build context by .dockerignore"
        assert (ROOT / source).exists(), source


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("container_healthcheck", ROOT / "scripts/container_healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"QIS_HOST": "0.0.0.0"}, f"http://127.0.0.1:{DEFAULT_PORT}/ready"),
        ({"QIS_HOST": "0.0.0.0", "PORT": "6002"}, "http://127.0.0.1:6002/ready"),
        ({"QIS_PORT": "7000", "HOST": "::"}, "http://[::1]:7000/ready"),
        ({"HOST": "10.1.2.3", "PORT": "6002"}, "http://10.1.2.3:6002/ready"),
    ],
)
def test_the_healthcheck_probes_ready_where_the_server_listens(monkeypatch, env, url):
    for name in ("HOST", "QIS_HOST", "PORT", "QIS_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _healthcheck_module().ready_url(Settings()) == url


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1), (None, 1)])
def test_the_healthcheck_exit_status(monkeypatch, status, code):
    """0 only for a 200 on /ready; a 503 (loading) or nobody listening is 1."""

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    if status is not None:
        thread.start()
    else:
        server.server_close()  # the port was free a moment ago
    monkeypatch.setenv("PORT", str(port))
    monkeypatch.setenv("HOST", "127.0.0.1")
    try:
        assert _healthcheck_module().main() == code
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
