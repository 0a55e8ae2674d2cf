"""TorchX's Kubernetes (Volcano) scheduler, with what preemptible training pods need and
TorchX 0.7 cannot express: storage credentials from a Kubernetes Secret, a termination
grace period long enough for the SIGTERM checkpoint, and a sized ``/dev/shm``.

Registered as the ``kubernetes`` scheduler (``pyproject.toml``, ``torchx.schedulers``),
so ``torchx run -s kubernetes ssl.pretrain ...`` submits the patched Volcano Job. Run
options on top of TorchX's (``-cfg`` or ``.torchxconfig``):

- ``secret``: name of a Secret whose keys become environment variables of every
  container (``envFrom``), e.g. ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
  (template: ``k8s/s3-credentials.secret.yaml``). The job spec names the Secret, never
  its values. Leave it unset with workload identity (``service_account``).
- ``grace_period_s``: seconds between SIGTERM and SIGKILL (default: from the size of the
  stage's checkpoint, memory network included, at a stated write speed, at least 120;
  ``ssl_train.preemption``).
  torchrun's shutdown window (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) is set from it, less a
  margin for torchrun's own exit, so the workers' preemption checkpoint has all of it.
- ``shm_size``: size limit of the memory-backed ``/dev/shm`` (default ``16Gi``).

Also: a job whose component names a ServiceAccount (the pipeline's driver,
``ssl_train.pipeline_job``) runs as it unless ``-cfg service_account`` says otherwise;
and inside the cluster, where there is no kubeconfig (the driver's pod), the client
takes the pod's own ServiceAccount credentials (in-cluster configuration).
"""

import os
from typing import Any, Optional

from torchx.schedulers.api import AppDryRunInfo
from torchx.schedulers.kubernetes_scheduler import (
    KubernetesJob,
    KubernetesOpts,
    KubernetesScheduler,
)
from torchx.specs import AppDef, runopts

from ssl_train.jobs import CHECK_FAILED_EXIT_CODE, CHECKPOINT_BYTES_METADATA
from ssl_train.pipeline_job import SERVICE_ACCOUNT_METADATA
from ssl_train.preemption import (
    MIN_GRACE_PERIOD_S,
    SHUTDOWN_TIMEOUT_ENV,
    grace_period_s,
    shutdown_timeout_s,
)

DEFAULT_SHM_SIZE = "16Gi"


class SSLKubernetesScheduler(KubernetesScheduler):
    """KubernetesScheduler whose Volcano Job pods read credentials from a Secret."""

    def _run_opts(self) -> runopts:
        opts = super()._run_opts()
        opts.add("secret", type_=str, help="Secret whose keys become env vars (envFrom)")
        opts.add(
            "grace_period_s",
            type_=int,
            default=None,
            help="seconds between SIGTERM and SIGKILL: time to save the preemption checkpoint "
            f"(default: sized from the preset's checkpoint, at least {MIN_GRACE_PERIOD_S})",
        )
        opts.add("shm_size", type_=str, default=DEFAULT_SHM_SIZE, help="size limit of /dev/shm")
        return opts

    def _api_client(self) -> Any:
        """TorchX's client, from the kubeconfig; in a pod without one (the pipeline's
        driver), from the pod's ServiceAccount, which TorchX 0.7 does not try."""
        if self._client is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            from kubernetes import client, config

            configuration = client.Configuration()
            try:
                config.load_kube_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_incluster_config(client_configuration=configuration)
            self._client = client.ApiClient(configuration)
        return super()._api_client()

    def _submit_dryrun(self, app: AppDef, cfg: KubernetesOpts) -> AppDryRunInfo[KubernetesJob]:
        info = super()._submit_dryrun(app, cfg)
        options: dict[str, Any] = dict(cfg)
        account = options.get("service_account") or app.metadata.get(SERVICE_ACCOUNT_METADATA)
        grace = options.get("grace_period_s") or default_grace_period_s(app)
        for task in info.request.resource["spec"]["tasks"]:  # type: ignore[index]
            # the check before torchrun failed (ssl_train.jobs): no retry can fix it; listed
            # first, Volcano applies it before the PodFailed -> RestartJob policy
            task["policies"] = [
                {"exitCode": CHECK_FAILED_EXIT_CODE, "action": "TerminateJob"},
                *task.get("policies", []),
            ]
            if account:
                task["template"].spec.service_account_name = account
            patch_pod(
                task["template"],
                secret=options.get("secret"),
                grace_period_s=int(grace),
                shm_size=str(options.get("shm_size") or DEFAULT_SHM_SIZE),
            )
        return info


def default_grace_period_s(app: AppDef) -> int:
    """The grace period that fits the preemption checkpoint of the app's stage (its
    size, memory network included, as the component computed it)."""
    size = app.metadata.get(CHECKPOINT_BYTES_METADATA)
    return grace_period_s(int(size)) if size else MIN_GRACE_PERIOD_S


def patch_pod(pod: Any, secret: Optional[str], grace_period_s: int, shm_size: str) -> None:
    """Add the Secret reference, grace period and /dev/shm size to a V1Pod in place."""
    from kubernetes.client.models import V1EnvFromSource, V1EnvVar, V1SecretEnvSource

    pod.spec.termination_grace_period_seconds = grace_period_s
    window = str(shutdown_timeout_s(grace_period_s))  # torchrun's, inside the grace period
    for container in pod.spec.containers:
        others = [e for e in container.env or [] if e.name != SHUTDOWN_TIMEOUT_ENV]
        container.env = [*others, V1EnvVar(name=SHUTDOWN_TIMEOUT_ENV, value=window)]
    for volume in pod.spec.volumes or []:
        if volume.empty_dir is not None and volume.empty_dir.medium == "Memory":
            volume.empty_dir.size_limit = shm_size
    if secret:
        for container in pod.spec.containers:
            container.env_from = [
                *(container.env_from or []),
                V1EnvFromSource(secret_ref=V1SecretEnvSource(name=secret)),
            ]


def create_scheduler(session_name: str, **kwargs: Any) -> SSLKubernetesScheduler:
    """The factory TorchX calls for ``-s kubernetes``.

    The Kubernetes client installs with ssl-train; where it is missing anyway (an install
    with ``--no-deps``, a pruned image), the user gets one line saying what to install
    instead of TorchX's traceback from deep inside the job's translation.
    """
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        raise SystemExit(
            "ssl-train: the kubernetes scheduler needs the Kubernetes Python client, which "
            "is missing here: pip install 'kubernetes>=28,<33' (or reinstall ssl-train "
            "with its dependencies)"
        ) from None
    return SSLKubernetesScheduler(
        session_name=session_name,
        client=kwargs.get("client"),
        docker_client=kwargs.get("docker_client"),
    )
