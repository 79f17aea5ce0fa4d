"""The deployment files: the Dockerfile lints clean (hadolint), the kustomize bases render with
`kubectl kustomize` and validate against the Kubernetes schemas offline (kubernetes-validate,
strict), and every `kiln serve` command line in them parses with kiln's own argument parser.

No container engine runs on these machines (and no image registry is reachable), so the image is
not built here; tests/test_distribution.py installs the wheel the Dockerfile installs, in a fresh
environment without PyTorch, and serves a package with it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kiln.runtime.cli import build_parser

ROOT = Path(__file__).parents[1]
KUBERNETES = "1.32.0"


def render(directory: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the kustomize bases"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / directory)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def serve_args(args: list[str]) -> None:
    """A `kiln serve` command line, as kiln itself parses it (fails on an unknown or bad flag)."""
    parsed = build_parser().parse_args(["serve", *[a.replace("{{.Name}}", "model") for a in args]])
    assert parsed.handler.__name__ == "_serve"


def test_dockerfile_lints_clean_and_its_command_parses():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("USER 10001") == 2 and "torch" not in text.split("AS cpu", 1)[1]
    for entrypoint in re.findall(r'ENTRYPOINT \["kiln", "serve", (.*)\]', text):
        serve_args([a.strip(' "') for a in entrypoint.split(",")] + ["--model-repository", "/models"])


def test_kubernetes_base_is_valid():
    docs = render("deploy/kubernetes")
    assert sorted(d["kind"] for d in docs) == [
        "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service",
    ]  # fmt: skip
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    serve_args(container["args"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 8001  # native gRPC probes on grpc.health.v1
    drain = int(next(a for a in container["args"] if a.startswith("--drain-seconds")).split("=")[1])
    grace = int(next(a for a in container["args"] if a.startswith("--grace")).split("=")[1])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + grace
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert {p["appProtocol"] for p in service["spec"]["ports"] if p["name"] == "grpc"} == {"kubernetes.io/h2c"}


def test_kserve_runtimes_and_example_are_valid():
    """KServe's CRDs are not in the Kubernetes schemas: their containers are checked as core/v1
    containers (strict), the rest against KServe's documented fields."""
    docs = render("deploy/kserve")
    runtimes = [d for d in docs if d["kind"] == "ClusterServingRuntime"]
    assert {r["spec"]["protocolVersions"][0] for r in runtimes} == {"v2", "grpc-v2"}
    for runtime in runtimes:
        assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
        assert runtime["spec"]["supportedModelFormats"][0]["name"] == "kiln"
        for container in runtime["spec"]["containers"]:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "check"},
                "spec": {"containers": [container]},
            }
            kubernetes_validate.validate(pod, KUBERNETES, strict=True)
            serve_args(container["args"])
            assert container["args"][0] == "/mnt/models"
    service = next(d for d in docs if d["kind"] == "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "kiln" and model["runtime"] in {r["metadata"]["name"] for r in runtimes}


@pytest.mark.parametrize("broken", [{"spec": {"clusterIP": None, "ports": "8001"}}])
def test_the_validator_does_fail(broken):
    """The validation above can fail: a malformed Service is refused."""
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, **broken}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_kserve_runtime_serves_a_package_under_the_inference_services_name(exported):
    """The runtime's own command line, with KServe's substitutions made (the package at /mnt/models,
    {{.Name}}) and free ports: the model answers under the InferenceService's name."""
    import tritonclient.grpc as tc
    from servers import free_port, running_server

    runtime = next(d for d in render("deploy/kserve") if d["metadata"]["name"] == "kiln-grpc")
    args = runtime["spec"]["containers"][0]["args"]
    package = exported("bert", "text-classification")
    ports = (free_port(), free_port(), free_port())
    substituted = [
        str(package) if a == "/mnt/models" else a.replace("{{.Name}}", "ynat")
        for a in args
        if not a.startswith(("--http-port", "--grpc-port"))
    ]
    with running_server(*substituted, ports=ports) as server:
        assert tc.InferenceServerClient(server.address).is_model_ready("ynat")


def test_a_package_on_a_read_only_mount_is_served(exported, tmp_path):
    """deploy/kubernetes mounts /models read-only: the server writes nothing into a package (its
    writable state goes to --cache-dir). The package is bind-mounted read-only in a mount namespace
    of its own (root is not stopped by file modes)."""
    import tritonclient.grpc as tc
    from servers import free_port, wait_listening

    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "--mount", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs unshare --mount (a mount namespace) to mount a directory read-only")
    mount = tmp_path / "models"
    mount.mkdir()
    grpc_port, http_port = free_port(), free_port()
    serve = [sys.executable, "-m", "kiln.runtime.cli", "serve", str(mount), "--name", "cls",
             "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "0",
             "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    script = """
        mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" || exit 7
        if touch "$2/probe" 2>/dev/null; then exit 9; fi  # the mount must refuse writes, or this proves nothing
        shift 2
        exec "$@"
    """
    command = [unshare, "--mount", "sh", "-c", script, "sh", str(exported("bert", "text-classification")), str(mount)]
    process = subprocess.Popen([*command, *serve], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(grpc_port, process)
        client = tc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        text = tc.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(__import__("numpy").array([b"Great service."], dtype=object))
        assert client.infer("cls", [text]).as_numpy("label").shape == (1,)
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0, process.stderr.read()
