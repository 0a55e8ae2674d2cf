"""The pipeline's driver as a job in the cluster: ``torchx run -s kubernetes ssl.pipeline``.

``ssl-train pipeline -s kubernetes`` typed on a laptop drives the recipe only while the
laptop stays up. This component runs that same command in a small CPU pod instead, as
the ServiceAccount of ``k8s/pipeline-rbac.yaml`` (whose Role allows exactly what TorchX's
Kubernetes scheduler does), so the recipe outlives whoever started it. The pod is
preemptible: the scheduler restarts it, and the restarted driver takes its own lease in
``ROOT/pipeline.json`` back at once (its job id is the job's name) and follows the stage
jobs already running (``ssl_train.pipeline_state``).
"""

from __future__ import annotations

import torchx.specs as specs

from ssl_train.jobs import DEFAULT_IMAGE
from ssl_train.lease import JOB_ID_ENV

SERVICE_ACCOUNT = "ssl-train-pipeline"  # k8s/pipeline-rbac.yaml
# what the `kubernetes` scheduler sets as the pods' ServiceAccount when the run's
# `-cfg service_account` does not (ssl_train.k8s_scheduler)
SERVICE_ACCOUNT_METADATA = "ssl_train.service_account"


def driver_app(
    pipeline_args: tuple[str, ...] | list[str],
    root: str,
    name: str = "ssl-pipeline",
    image: str = DEFAULT_IMAGE,
    service_account: str = SERVICE_ACCOUNT,
    cpu: int = 1,
    memMB: int = 2048,
    max_retries: int = 100,
) -> specs.AppDef:
    """The job of the ``ssl.pipeline`` component (``ssl_train/components.py``, whose
    docstring says what each argument is): one pod running ``ssl-train pipeline -s
    kubernetes --root ROOT PIPELINE_ARGS``.

    Example:
        >>> app = driver_app(["--data", "s3://b/train"], "s3://b/runs")
        >>> app.roles[0].args[:5], app.metadata[SERVICE_ACCOUNT_METADATA]
        (['pipeline', '-s', 'kubernetes', '--root', 's3://b/runs'], 'ssl-train-pipeline')
    """
    role = specs.Role(
        name="driver",
        image=image,
        entrypoint="ssl-train",
        args=["pipeline", "-s", "kubernetes", "--root", root, *pipeline_args],
        # the job's own name, the same in every restarted pod: a restarted driver takes
        # its lease back at once instead of waiting one lease period
        env={JOB_ID_ENV: f"pipeline-{specs.macros.app_id}"},
        resource=specs.Resource(cpu=cpu, gpu=0, memMB=memMB),
        max_retries=max_retries,
        retry_policy=specs.RetryPolicy.REPLICA,
    )
    return specs.AppDef(
        name=name, roles=[role], metadata={SERVICE_ACCOUNT_METADATA: service_account}
    )
