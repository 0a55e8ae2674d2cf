"""Prometheus metrics from every training process, served once per node.

Every process of a node (each local rank and each of its DataLoader workers) records
into prometheus_client's multiprocess files in one per-node folder; local rank 0
serves ``/metrics`` for all of them on ``--metrics-port`` (+ the node's rank, so two
nodes on one host do not collide). Counters therefore keep counting across a worker
restart (a dead process's files stay and are summed), and data-loading workers'
storage reads and corrupt samples reach the scrape.

``METRICS`` is the one list of what exists: the code registers from it and the docs
(``ssl-train metrics``) are generated from it. Labels are low-cardinality:
``stage``, ``run`` (the run dir's last path component, never a URL with credentials)
and ``rank``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PORT = 9732  # away from Prometheus (9090), Pushgateway (9091), node (9100), DCGM (9400)
PREFIX = "ssl_train_"
LABELS = ("stage", "run", "rank")
# Training steps take milliseconds (tiny models) to minutes (huge batches on few GPUs).
STEP_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: ``name`` without the ``ssl_train_`` prefix."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = LABELS
    buckets: tuple[float, ...] = ()

    @property
    def full_name(self) -> str:
        return PREFIX + self.name


METRICS: tuple[MetricSpec, ...] = (
    # progress
    MetricSpec("steps_total", "counter", "Optimizer steps this process completed."),
    MetricSpec("samples_total", "counter", "Training samples this process consumed (its share of each global batch)."),
    MetricSpec("global_step", "gauge", "Global step reached (steps of the whole run, across restarts)."),
    MetricSpec("epoch", "gauge", "Epoch of the data stream the run is in."),
    MetricSpec("learning_rate", "gauge", "Learning rate of the latest step."),
    MetricSpec("loss", "gauge", "Training loss of the global batch at the latest logged step."),
    MetricSpec("contrastive_top1", "gauge", "Pretraining: how often a view's nearest neighbour in the global batch is its partner."),
    MetricSpec("train_top1", "gauge", "Finetuning and linear evaluation: top-1 accuracy on the latest logged global batch."),
    MetricSpec("eval_top1", "gauge", "Top-1 accuracy of the final evaluation (--eval-data)."),
    MetricSpec("eval_top5", "gauge", "Top-5 accuracy of the final evaluation (--eval-data)."),
    # time
    MetricSpec("step_duration_seconds", "histogram", "Wall time of one training step, data wait included.", buckets=STEP_BUCKETS),
    MetricSpec("data_wait_seconds", "histogram", "Time a step waited for its batch from the data loader.", buckets=STEP_BUCKETS),
    # data
    MetricSpec("storage_read_bytes_total", "counter", "Bytes read from shard storage, by training and data-loading processes."),
    MetricSpec("storage_requests_total", "counter", "Read requests sent to shard storage (each try counts)."),
    MetricSpec("storage_retries_total", "counter", "Storage operations retried after a transient error."),
    MetricSpec("storage_read_errors_total", "counter", "Reads that failed for good (after retries)."),
    MetricSpec("corrupt_samples_total", "counter", "Samples skipped because their image could not be decoded."),
    # fault tolerance
    MetricSpec("restarts", "gauge", "Times torchrun restarted this worker group (TORCHELASTIC_RESTART_COUNT)."),
    MetricSpec("world_size", "gauge", "Processes in the job now."),
    MetricSpec("resumes_total", "counter", "Starts that resumed from a checkpoint."),
    MetricSpec("checkpoint_save_seconds", "histogram", "Time to write one checkpoint (in the background).", buckets=CHECKPOINT_BUCKETS),
    MetricSpec("checkpoint_size_bytes", "gauge", "Size of the latest checkpoint."),
    MetricSpec("last_checkpoint_timestamp_seconds", "gauge", "Unix time when the latest complete checkpoint was written."),
    # device
    MetricSpec("gpu_memory_allocated_bytes", "gauge", "GPU memory held by tensors (torch.cuda.memory_allocated)."),
    MetricSpec("gpu_memory_reserved_bytes", "gauge", "GPU memory reserved by torch's caching allocator."),
    # build
    MetricSpec("build_info", "gauge", "Always 1; the labels say which ssl-train, preset and world size run.", labels=(*LABELS, "version", "preset")),
)  # fmt: skip
SPECS = {spec.name: spec for spec in METRICS}


def markdown_table() -> str:
    """The metrics reference, generated from ``METRICS`` (the README embeds it).

    Example:
        >>> markdown_table().splitlines()[0]
        '| metric | type | labels | meaning |'
    """
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for spec in METRICS:
        rows.append(
            f"| `{spec.full_name}` | {spec.kind} | {', '.join(spec.labels)} | {spec.help} |"
        )
    return "\n".join(rows)


def run_label(run_dir: str) -> str:
    """A short, credential-free name for a run: the last component of its run dir.

    Example:
        >>> run_label("s3://key:secret@bucket/runs/r50-pretrain/")
        'r50-pretrain'
    """
    return run_dir.rstrip("/").rsplit("/", 1)[-1] or "run"


def node_metrics_dir() -> str:
    """The per-node folder all of a node's processes write to; it survives worker restarts
    (same torchrun run id and node rank) so counters keep counting."""
    configured = os.environ.get("SSL_TRAIN_METRICS_DIR")
    if configured:
        return configured
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", f"single-{os.getpid()}")
    node = os.environ.get("GROUP_RANK", "0")
    return os.path.join(tempfile.gettempdir(), "ssl-train-metrics", f"{run_id}-node{node}")


class Metrics:
    """This process's metrics, bound to its labels. Without ``enable`` every call is a
    no-op, so library code can record unconditionally.

    Example:
        >>> metrics = Metrics()
        >>> metrics.inc("steps_total")  # not enabled: nothing happens
    """

    def __init__(self) -> None:
        self._children: dict[str, Any] = {}
        self.server_port: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._children)

    def enable(self, stage: str, run: str, rank: int, preset: str | None, world_size: int) -> None:
        """Create this process's series in the node's multiprocess folder. Must run before
        anything imports prometheus_client (which reads the folder's variable at import)."""
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            folder = node_metrics_dir()
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
            if (
                "TORCHELASTIC_RUN_ID" not in os.environ
                and "SSL_TRAIN_METRICS_DIR" not in os.environ
            ):
                atexit.register(shutil.rmtree, folder, ignore_errors=True)  # one process: ours
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
        import prometheus_client as prom

        from ssl_train import __version__

        values = {"stage": stage, "run": run, "rank": str(rank)}
        registry = prom.CollectorRegistry()  # the served registry is the multiprocess one
        for spec in METRICS:
            labels = (
                {**values, "version": __version__, "preset": preset or ""}
                if spec.name == "build_info"
                else values
            )
            if spec.kind == "counter":
                metric = prom.Counter(
                    spec.full_name.removesuffix("_total"), spec.help, spec.labels, registry=registry
                )
            elif spec.kind == "histogram":
                metric = prom.Histogram(
                    spec.full_name, spec.help, spec.labels, buckets=spec.buckets, registry=registry
                )
            else:
                metric = prom.Gauge(
                    spec.full_name,
                    spec.help,
                    spec.labels,
                    registry=registry,
                    multiprocess_mode="mostrecent",
                )
            self._children[spec.name] = metric.labels(**labels)
        self.set("build_info", 1)
        self.set("world_size", world_size)
        self.set("restarts", int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))

    def inc(self, name: str, amount: float = 1.0) -> None:
        child = self._children.get(name)
        if child is not None:
            child.inc(amount)

    def set(self, name: str, value: float) -> None:
        child = self._children.get(name)
        if child is not None:
            child.set(value)

    def observe(self, name: str, value: float) -> None:
        child = self._children.get(name)
        if child is not None:
            child.observe(value)

    def storage_event(self, event: str, amount: int) -> None:
        """Listener for ``shards.storage`` events (in every process that reads)."""
        self.inc(f"storage_{event}_total", amount)

    def record_gpu_memory(self) -> None:
        import torch

        if self.enabled and torch.cuda.is_available():
            self.set("gpu_memory_allocated_bytes", torch.cuda.memory_allocated())
            self.set("gpu_memory_reserved_bytes", torch.cuda.memory_reserved())

    def serve(self, port: int) -> int | None:
        """Serve every process of this node on ``port``, plus the node rank where nodes
        may share a host (not in Kubernetes pods, whose named port is one number for all
        replicas). Returns the port, or None when it is taken (training goes on)."""
        import prometheus_client as prom
        from prometheus_client import multiprocess

        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        if "KUBERNETES_SERVICE_HOST" not in os.environ:  # a pod has its own IP: no offset
            port += int(os.environ.get("GROUP_RANK", "0"))
        try:
            prom.start_http_server(port, registry=registry)
        except OSError as exc:
            log.warning("metrics: port %d is taken (%s); this node serves no /metrics", port, exc)
            return None
        self.server_port = port
        log.info("metrics: http://%s:%d/metrics", os.uname().nodename, port)
        return port


METRICS_NOW = Metrics()  # this process's; enabled by the training loop
