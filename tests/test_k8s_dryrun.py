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
    component: str, args: list[str], tmp_path: Path, cfg: str = f"{CFG},grace_period_s=180"
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
        component, *COMMON, *args,
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
        assert {"event": "PodFailed", "action": "RestartJob"} in task["policies"]
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
        # torchrun gives its workers the grace period, less 15 s for its own exit
        assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "165"
        shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and shm[0]["emptyDir"]["sizeLimit"] == "16Gi"


@pytest.mark.parametrize(
    ("component", "args", "grace"),
    [
        # 877M parameters with the head: 7.0 GB at 8 bytes each, 71 s at 100 MB/s + 75 s
        ("ssl.pretrain", ["--preset", "r152_3x_sk1"], 146),
        ("ssl.finetune", [], 120),  # its network comes from the pretrained run
    ],
)
def test_the_default_grace_period_fits_the_presets_checkpoint(
    component: str, args: list[str], grace: int, tmp_path: Path
) -> None:
    _, job = dryrun(component, [*COMPONENTS[component], *args], tmp_path, cfg=CFG)
    for task in job["spec"]["tasks"]:
        spec = task["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == grace
        env = {item["name"]: item.get("value") for item in spec["containers"][0]["env"]}
        assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(grace - 15)


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
