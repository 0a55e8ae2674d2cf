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
    assert kinds == {
        "Queue", "PodMonitor", "PrometheusRule", "ServiceAccount", "Role", "RoleBinding"
    }  # fmt: skip
    namespaced = [d for d in documents if d["kind"] != "Queue"]
    assert all(d["metadata"]["namespace"] == "ml" for d in namespaced)
    (binding,) = [d for d in documents if d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ssl-train-pipeline", "namespace": "ml"}
    ]


def test_the_pipeline_drivers_role_grants_exactly_what_torchx_needs() -> None:
    """The driver's ServiceAccount, Role and RoleBinding validate against Kubernetes'
    schemas, and the Role allows Volcano jobs' create, get, list and delete (and get of
    their status, which TorchX reads a job's state through), and pods' and their logs'
    get and list: nothing else (no other verb, resource or group, no wildcard)."""
    import kubernetes_validate

    documents = list(yaml.safe_load_all((K8S / "pipeline-rbac.yaml").read_text()))
    for document in documents:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding"}
    granted = {
        (group, resource, verb)
        for rule in by_kind["Role"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    jobs = {("batch.volcano.sh", "jobs", v) for v in ("create", "get", "list", "delete")}
    jobs.add(("batch.volcano.sh", "jobs/status", "get"))  # get_namespaced_custom_object_status
    pods = {("", r, v) for r in ("pods", "pods/log") for v in ("get", "list")}
    assert granted == jobs | pods
    assert all(
        set(rule) == {"apiGroups", "resources", "verbs"} for rule in by_kind["Role"]["rules"]
    )
    binding = by_kind["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ssl-train-pipeline"
    }  # fmt: skip
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ssl-train-pipeline"}]
    assert by_kind["ServiceAccount"]["metadata"]["name"] == "ssl-train-pipeline"


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
