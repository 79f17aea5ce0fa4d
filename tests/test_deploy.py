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
