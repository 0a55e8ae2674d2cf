"""The cluster files in k8s/ and the .torchxconfig example: each validates against its
schema, the kustomization renders, and the example's options exist."""

from __future__ import annotations

import configparser
import inspect
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"


def crd_schema(name: str) -> dict:
    crd = yaml.safe_load((K8S / "crds" / name).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


def test_queue_validates_against_the_volcano_crd() -> None:
    queue = yaml.safe_load((K8S / "queue.yaml").read_text())
    assert (queue["apiVersion"], queue["kind"]) == ("scheduling.volcano.sh/v1beta1", "Queue")
    jsonschema.validate(queue, crd_schema("scheduling.volcano.sh_queues.yaml"))


def test_secret_template_is_a_valid_secret_holding_no_real_values() -> None:
    import kubernetes_validate

    secret = yaml.safe_load((K8S / "s3-credentials.secret.yaml").read_text())
    kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
    assert set(secret["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert secret["stringData"]["AWS_SECRET_ACCESS_KEY"].startswith("<")  # a placeholder


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize built in)")
def test_kustomization_renders_every_resource_in_the_namespace() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {d["kind"] for d in documents}
    assert kinds == {"Queue", "PodMonitor", "PrometheusRule"}
    namespaced = [d for d in documents if d["kind"] != "Queue"]
    assert all(d["metadata"]["namespace"] == "ml" for d in namespaced)


def test_torchxconfig_example_names_real_options() -> None:
    from ssl_train import components
    from ssl_train.k8s_scheduler import SSLKubernetesScheduler

    config = configparser.ConfigParser()
    config.optionxform = str  # keep memMB as written
    config.read(REPO / ".torchxconfig.example")
    scheduler_options = {name for name, _ in SSLKubernetesScheduler("check")._run_opts()}
    assert set(config["kubernetes"]) <= scheduler_options | {"image_repo"}
    for section in config.sections():
        if section.startswith("component:ssl."):
            function = getattr(components, section.removeprefix("component:ssl."))
            assert set(config[section]) <= set(inspect.signature(function).parameters), section
