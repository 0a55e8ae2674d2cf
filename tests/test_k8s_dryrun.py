"""`torchx run --dryrun -s kubernetes ssl.<stage>`: the Volcano Job every component
would submit, checked against the Volcano CRD schema and its pods against Kubernetes'
own schemas, without a cluster. Fake credentials sit in the environment and must appear
nowhere in what would be sent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

BIN = Path(sys.executable).parent
CRD = Path(__file__).resolve().parent.parent / "k8s" / "crds" / "batch.volcano.sh_jobs.yaml"
FAKE_KEY, FAKE_SECRET = "AKIAFAKEKEYFORTESTS0", "fake/Secret+Value/Nobody+Should=See"
COMMON = ["--image", "registry.example.com/ssl-train:1.0", "-j", "2:4x8"]
COMPONENTS = {
    "ssl.pretrain": ["--data", "s3://b/train", "--run_dir", "s3://b/runs/p"],
    "ssl.finetune": ["--data", "s3://b/train", "--run_dir", "s3://b/runs/f", "--pretrained", "s3://b/runs/p"],
    "ssl.distill": ["--data", "s3://b/train", "--run_dir", "s3://b/runs/d", "--teacher", "s3://b/runs/f"],
    "ssl.linear_eval": ["--data", "s3://b/train", "--run_dir", "s3://b/runs/l", "--pretrained", "s3://b/runs/p"],
    "ssl.supervised": ["--data", "s3://b/train", "--run_dir", "s3://b/runs/s", "--subset", "10percent"],
}  # fmt: skip
for _args in COMPONENTS.values():  # 3072 divides over 16, 24 and 32 processes (-j 2:4x8)
    _args += ["--global_batch_size", "3072"]
EVAL = ["--run_dir", "s3://b/runs/f", "--data", "s3://b/val"]


def schema_of(crd_file: Path) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


CFG = "queue=ssl-train,namespace=ml,secret=s3-credentials"


def dryrun(
    component: str,
    args: list[str],
    tmp_path: Path,
    cfg: str = f"{CFG},grace_period_s=180",
    common: list[str] = COMMON,
) -> tuple[str, dict]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": FAKE_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    cmd = [
        str(BIN / "torchx"), "run", "--workspace", "", "--dryrun", "-s", "kubernetes",
        "-cfg", cfg,
        component, *common, *args,
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    request = result.stdout.split("=== SCHEDULER REQUEST ===", 1)[1]
    return output, yaml.safe_load(request)


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_dryrun_job_is_valid_and_carries_no_credentials(component: str, tmp_path: Path) -> None:
    import kubernetes_validate

    output, job = dryrun(component, COMPONENTS[component], tmp_path)
    assert FAKE_KEY not in output and FAKE_SECRET not in output
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    jsonschema.validate(job, schema_of(CRD))
    assert job["spec"]["queue"] == "ssl-train"
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 4  # max nodes
    assert sum(task.get("minAvailable", 0) for task in tasks) == 2  # min nodes (elastic)
    for task in tasks:
        assert task["maxRetry"] == 3  # the scheduler's retries of the job (max_retries)
        # the check before torchrun failed: Volcano ends the job instead of retrying it
        assert task["policies"][0] == {"exitCode": 2, "action": "TerminateJob"}
        # an elastic range: a failed pod is replaced, the others go on (no RestartJob)
        assert [p.get("action") for p in task["policies"]] == ["TerminateJob"]
        pod = {"apiVersion": "v1", "kind": "Pod", **task["template"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
        spec = pod["spec"]
        assert spec["terminationGracePeriodSeconds"] == 180
        assert spec["restartPolicy"] == "Never"  # torchrun restarts in the pod, Volcano the job
        (container,) = spec["containers"]
        assert {"secretRef": {"name": "s3-credentials"}} in container["envFrom"]
        ports = {port.get("name"): port["containerPort"] for port in container["ports"]}
        assert ports["metrics"] == 9732
        command = " ".join(container["command"])
        assert "--nnodes 2:4" in command and "--metrics-port 9732" in command
        stage = component.split(".")[1].replace("_", "-")
        check, _, launch = container["command"][2].partition(" && exec ")
        assert check.startswith(f"ssl-train {stage} --data s3://b/train") and check.endswith(
            "--check-only"
        )
        assert launch.startswith("torchrun ") and f"-m ssl_train.cli {stage}" in launch
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and env["PET_MAX_RESTARTS"] == "3"
        # torchrun's --rdzv-conf: a lost node is dropped after 6 s, a round waits 10 s
        assert env["PET_RDZV_CONF"] == (
            "keep_alive_interval=2,keep_alive_max_attempt=3,last_call_timeout=10"
        )
        # torchrun gives its workers the grace period, less 15 s for its own exit
        assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "165"
        shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and shm[0]["emptyDir"]["sizeLimit"] == "16Gi"


# 48 images per GPU at the smallest size (16 GPUs): fits 80 GiB; 768 divides 16, 24, 32
R152_BATCH = ["--global_batch_size", "768"]


@pytest.mark.parametrize(
    ("component", "args", "grace", "timeout"),
    [
        # 871M parameters (no classifier), and SimCLRv2's memory network (on by default)
        # and its 65,536 projections: weights, momentum, memory = 10.49 GB, 105 s at the
        # stated 100 MB/s + 60 s of fixed costs + 15 s for torchrun's exit; collectives
        # wait 4x the 165 s a checkpoint's read or write takes
        ("ssl.pretrain", ["--preset", "r152_3x_sk1", *R152_BATCH], 180, 660),
        ("ssl.pretrain", ["--preset", "r152_3x_sk1", *R152_BATCH, "--memory_size", "0"], 145, 600),
        ("ssl.finetune", [], 120, 600),  # its network comes from the pretrained run
    ],
)
def test_the_job_spec_carries_the_device_and_windows_sized_for_the_checkpoint(
    component: str, args: list[str], grace: int, timeout: int, tmp_path: Path
) -> None:
    """A GPU job (--gpu 8) trains on its GPUs or stops (--device cuda); its grace
    period, torchrun's shutdown window and the collectives' timeout fit its checkpoint."""
    base = COMPONENTS[component]
    if "--global_batch_size" in args:  # in place of the 3072 every component gets
        base = base[: base.index("--global_batch_size")]
    _, job = dryrun(component, [*base, "--gpu", "8", *args], tmp_path, cfg=CFG)
    for task in job["spec"]["tasks"]:
        spec = task["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == grace
        (container,) = spec["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(grace - 15)
        assert env["SSL_TRAIN_COLLECTIVE_TIMEOUT_S"] == str(timeout)
        check, _, launch = container["command"][2].partition(" && exec ")
        assert "--device cuda" in check and "--device cuda" in launch
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_an_elastic_range_the_batch_does_not_divide_is_a_valid_job(tmp_path: Path) -> None:
    """`-j 2:4x8` at the default global batch of 4096: 16, 24 or 32 GPUs (24 does not
    divide 4096; ranks take shares of 171 or 170), one valid Volcano job whose torchrun
    takes 2 to 4 nodes."""
    import kubernetes_validate

    base = COMPONENTS["ssl.pretrain"]
    base = base[: base.index("--global_batch_size")]
    _, job = dryrun("ssl.pretrain", [*base, "--global_batch_size", "4096", "--gpu", "8"], tmp_path)
    jsonschema.validate(job, schema_of(CRD))
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 4 and sum(task.get("minAvailable", 0) for task in tasks) == 2
    for task in tasks:
        pod = {"apiVersion": "v1", "kind": "Pod", **task["template"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
        command = " ".join(pod["spec"]["containers"][0]["command"])
        assert "--nnodes 2:4" in command and "--nproc_per_node 8" in command
        assert "--global-batch-size 4096" in command


def test_a_fixed_size_job_restarts_as_a_whole(tmp_path: Path) -> None:
    """-j 4x8 cannot go on without the lost node: Volcano restarts the job (TorchX's
    default), where an elastic range only replaces the failed pod."""
    base = COMPONENTS["ssl.pretrain"]
    _, job = dryrun("ssl.pretrain", base, tmp_path, common=[*COMMON[:-1], "4x8"])
    for task in job["spec"]["tasks"]:
        assert task["minAvailable"] == 1
        assert {"event": "PodFailed", "action": "RestartJob"} in task["policies"]
        assert {"event": "PodEvicted", "action": "RestartJob"} in task["policies"]


def test_a_cpu_job_keeps_the_device_choice_and_gloos_timeout(tmp_path: Path) -> None:
    _, job = dryrun("ssl.pretrain", COMPONENTS["ssl.pretrain"], tmp_path, cfg=CFG)
    container = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert "--device" not in container["command"][2]
    assert env["SSL_TRAIN_COLLECTIVE_TIMEOUT_S"] == "1800"  # gloo's own default, not less


def test_eval_component_runs_the_eval_command_on_every_node(tmp_path: Path) -> None:
    import kubernetes_validate

    output, job = dryrun("ssl.eval", EVAL, tmp_path)
    assert FAKE_KEY not in output and FAKE_SECRET not in output
    jsonschema.validate(job, schema_of(CRD))
    for task in job["spec"]["tasks"]:
        pod = {"apiVersion": "v1", "kind": "Pod", **task["template"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
        command = " ".join(pod["spec"]["containers"][0]["command"])
        assert "ssl_train.cli eval s3://b/runs/f --data s3://b/val" in command


def test_torchx_builtins_still_work_beside_the_ssl_components(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "torchx"), "builtins"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for name in ("dist.ddp", "utils.echo", "ssl.eval", *COMPONENTS):
        assert f" {name}\n" in result.stdout + "\n", name


def test_the_kubernetes_client_installs_with_the_package() -> None:
    """`pip install ssl-train` then `torchx run -s kubernetes`: no extra needed."""
    from importlib.metadata import requires

    required = [r for r in requires("ssl-train") or [] if re.match(r"kubernetes\b(?!-)", r)]
    assert required and all("extra ==" not in r for r in required), required


def test_a_missing_kubernetes_client_is_one_line(tmp_path: Path) -> None:
    """Where the client is missing anyway (a --no-deps install), one line says what to
    install instead of TorchX's traceback."""
    script = (
        "import sys; sys.modules['kubernetes'] = None\n"  # as if it were not installed
        "from torchx.cli.main import main; main()\n"
    )
    cmd = [
        sys.executable, "-c", script, "run", "--workspace", "", "--dryrun", "-s", "kubernetes",
        "-cfg", CFG, "ssl.pretrain", *COMMON, *COMPONENTS["ssl.pretrain"],
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "pip install 'kubernetes" in result.stderr.strip().splitlines()[-1]


def test_the_pipeline_driver_is_a_valid_job_running_as_its_service_account(
    tmp_path: Path,
) -> None:
    """Issue 36: ``ssl.pipeline`` submits the recipe's driver as one small CPU pod that
    runs ``ssl-train pipeline -s kubernetes`` as k8s/pipeline-rbac.yaml's ServiceAccount,
    with a job id that a restarted pod keeps (it takes its own lease back at once)."""
    import kubernetes_validate

    rbac = yaml.safe_load_all((CRD.parent.parent / "pipeline-rbac.yaml").read_text())
    (account,) = [d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"]
    args = ["--root", "s3://b/runs/r50", "--", "--data", "s3://b/train", "--subset",
            "1percent", "-cfg", "queue=ssl-train,namespace=ml,secret=s3-credentials"]  # fmt: skip
    output, job = dryrun("ssl.pipeline", args, tmp_path, cfg=CFG, common=COMMON[:2])
    assert FAKE_KEY not in output and FAKE_SECRET not in output
    jsonschema.validate(job, schema_of(CRD))
    (task,) = job["spec"]["tasks"]
    assert task["maxRetry"] == 100 and task["replicas"] == 1
    pod = {"apiVersion": "v1", "kind": "Pod", **task["template"]}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    assert pod["spec"]["serviceAccountName"] == account == "ssl-train-pipeline"
    (container,) = pod["spec"]["containers"]
    assert container["command"] == [
        "ssl-train", "pipeline", "-s", "kubernetes", "--root", "s3://b/runs/r50",
        "--data", "s3://b/train", "--subset", "1percent",
        "-cfg", "queue=ssl-train,namespace=ml,secret=s3-credentials",
    ]  # fmt: skip
    assert {"secretRef": {"name": "s3-credentials"}} in container["envFrom"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["SSL_TRAIN_JOB_ID"] == f"pipeline-{job['metadata']['name']}"
    limits = container["resources"]["limits"]
    assert limits["cpu"] == "1000m" and not any("gpu" in key for key in limits)

    _, other = dryrun(
        "ssl.pipeline", args, tmp_path, cfg=f"{CFG},service_account=mine", common=COMMON[:2]
    )
    assert other["spec"]["tasks"][0]["template"]["spec"]["serviceAccountName"] == "mine"


def test_inside_the_cluster_the_scheduler_uses_the_pods_service_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's pod has no kubeconfig: the scheduler's client takes the pod's own
    credentials (the token and CA Kubernetes mounts, the API server from the
    environment), which TorchX's scheduler alone does not try. The files stand in for
    what Kubernetes mounts at /var/run/secrets/kubernetes.io/serviceaccount."""
    from kubernetes.config import incluster_config

    from ssl_train.k8s_scheduler import create_scheduler

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("the-pods-token")
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    client = create_scheduler("test")._api_client()
    assert client.configuration.host == "https://10.96.0.1:443"
    assert client.configuration.api_key["authorization"].lower() == "bearer the-pods-token"
    assert client.configuration.ssl_ca_cert == str(ca)

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")  # outside: the kubeconfig, as TorchX does
    with pytest.warns(UserWarning, match="failed to load kube config"):
        outside = create_scheduler("test")._api_client()
    assert outside.configuration.host != "https://10.96.0.1:443"
