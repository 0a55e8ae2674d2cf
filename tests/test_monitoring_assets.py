"""The monitoring assets in k8s/monitoring/ are what the cluster and Prometheus accept.

- PodMonitor and PrometheusRule validate against prometheus-operator's CRD schemas, made
  strict (unknown fields fail, as with ``kubectl apply --validate=strict``);
- the PodMonitor selects the labels TorchX's Kubernetes scheduler really puts on pods;
- promtool accepts the rules and passes alerts.test.yaml (a firing and a quiet case per
  alert); the dashboard's queries parse;
- every metric the rules and the dashboard name is one ``ssl_train.metrics`` exports.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from torchx.schedulers import kubernetes_scheduler as k8s
from torchx.specs import AppDef, Resource, Role

from ssl_train.metrics import DEFAULT_PORT, LABELS, METRICS

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "k8s" / "monitoring"
# prometheus-operator's CRDs (v0.93.0, Apache-2.0): vendored beside the assets if present,
# else the workspace's shared copy.
SCHEMA_DIRS = (
    MONITORING / "crds",
    REPO.parent / "shared" / "schemas" / "prometheus-operator",
)
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (CI installs Debian's prometheus)"
)
METRIC_NAME = re.compile(r"(?<![a-zA-Z0-9_:.])[a-zA-Z_:][a-zA-Z0-9_:]*")
# Labels a query may group or match on: the exporter's own plus what the PodMonitor's
# targets get (namespace, pod, instance, job, container) and the histograms' `le`.
KNOWN_LABELS = {
    *LABELS,
    "version",
    "preset",
    "le",
    "namespace",
    "pod",
    "instance",
    "job",
    "container",
}
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")  # fmt: skip


def load_yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((MONITORING / name).read_text())


def strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation: an object
    with listed properties admits no others (the CRDs leave additionalProperties unset and
    rely on pruning). Go's `^(?i)...` patterns become Python's `(?i)^...`."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    pattern = out.get("pattern")
    if isinstance(pattern, str) and pattern.startswith("^(?i)"):
        out["pattern"] = "(?i)^" + pattern[len("^(?i)") :]
    return out


@cache
def crd_validator(kind_plural: str) -> jsonschema.protocols.Validator:
    name = f"monitoring.coreos.com_{kind_plural}.yaml"
    found = [folder / name for folder in SCHEMA_DIRS if (folder / name).is_file()]
    assert found, f"{name} (prometheus-operator's CRD) is in none of {SCHEMA_DIRS}"
    crd = yaml.safe_load(found[0].read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def crd_errors(kind_plural: str, document: dict[str, Any]) -> list[str]:
    errors = crd_validator(kind_plural).iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def check_object_meta(document: dict[str, Any], kind: str) -> None:
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == kind
    meta = document["metadata"]
    assert set(meta) <= {"name", "labels", "annotations"}, meta
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), meta["name"]
    for key, value in meta.get("labels", {}).items():
        assert re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", key)
        assert isinstance(value, str) and len(value) <= 63


# --- CRD schemas --------------------------------------------------------------------------


def test_podmonitor_is_valid_against_its_crd():
    podmonitor = load_yaml("podmonitor.yaml")
    check_object_meta(podmonitor, "PodMonitor")
    assert crd_errors("podmonitors", podmonitor) == []
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    assert DURATION.match(endpoint["scrapeTimeout"])


def test_prometheusrule_is_valid_against_its_crd():
    rule = load_yaml("prometheusrule.yaml")
    check_object_meta(rule, "PrometheusRule")
    assert crd_errors("prometheusrules", rule) == []
    names = [group["name"] for group in rule["spec"]["groups"]]
    assert len(names) == len(set(names)), "group names are the list's map key"
    for group in rule["spec"]["groups"]:
        for entry in group["rules"]:
            assert ("alert" in entry) != ("record" in entry), entry
            assert isinstance(entry["expr"], str)


def test_strict_schemas_reject_unknown_and_invalid_fields():
    """The strict validation above has teeth: a misspelt field or a bad value fails."""
    podmonitor = load_yaml("podmonitor.yaml")
    misspelt = copy.deepcopy(podmonitor)
    misspelt["spec"]["podMetricEndpoints"] = misspelt["spec"].pop("podMetricsEndpoints")
    assert any("podMetricEndpoints" in error for error in crd_errors("podmonitors", misspelt))
    bad_interval = copy.deepcopy(podmonitor)
    bad_interval["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert crd_errors("podmonitors", bad_interval)
    no_selector = copy.deepcopy(podmonitor)
    del no_selector["spec"]["selector"]
    assert crd_errors("podmonitors", no_selector)

    rule = load_yaml("prometheusrule.yaml")
    misspelt_rule = copy.deepcopy(rule)
    alert = next(r for r in misspelt_rule["spec"]["groups"][1]["rules"] if "alert" in r)
    alert["annotation"] = alert.pop("annotations")
    assert crd_errors("prometheusrules", misspelt_rule)
    bad_for = copy.deepcopy(rule)
    next(r for r in bad_for["spec"]["groups"][1]["rules"] if "for" in r)["for"] = "ten minutes"
    assert crd_errors("prometheusrules", bad_for)


# --- the PodMonitor against what TorchX creates --------------------------------------------


def trivial_app() -> AppDef:
    role = Role(
        name="trainer",
        image="ssl-train:latest",
        entrypoint="ssl-train",
        args=["pretrain"],
        num_replicas=2,
        resource=Resource(cpu=1, gpu=0, memMB=1024),
        port_map={"metrics": DEFAULT_PORT},
    )
    return AppDef(name="ssl-train-pretrain", roles=[role])


def prometheus_pod_label(key: str) -> str:
    """The source label Prometheus' Kubernetes discovery gives pod label ``key``."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_podmonitor_selects_the_labels_torchx_puts_on_pods():
    app = trivial_app()
    role = app.roles[0]
    labels = k8s.pod_labels(app=app, role_idx=0, role=role, replica_id=1, app_id="x-1a2b3c")
    selector = load_yaml("podmonitor.yaml")["spec"]["selector"]
    assert set(selector) == {"matchLabels"}, "matchExpressions are not checked here"
    assert selector["matchLabels"].items() <= labels.items(), (selector, labels)
    assert selector["matchLabels"] == {k8s.LABEL_ORGANIZATION: "torchx.pytorch.org"}


def test_podmonitor_matches_pods_of_a_whole_torchx_kubernetes_job():
    """The full path: the Volcano job TorchX would submit (needs the kubernetes client)."""
    pytest.importorskip("kubernetes", reason="torchx builds pods with the kubernetes client")
    resource = k8s.app_to_resource(trivial_app(), queue="default", service_account=None)
    pods = [task["template"] for task in resource["spec"]["tasks"]]
    assert len(pods) == 2
    endpoint = load_yaml("podmonitor.yaml")["spec"]["podMetricsEndpoints"][0]
    selector = load_yaml("podmonitor.yaml")["spec"]["selector"]["matchLabels"]
    for pod in pods:
        assert selector.items() <= pod.metadata.labels.items()
        ports = {p.name: p.container_port for c in pod.spec.containers for p in c.ports}
        assert ports == {endpoint["port"]: DEFAULT_PORT}


def test_podmonitor_relabels_labels_that_torchx_sets():
    relabelings = load_yaml("podmonitor.yaml")["spec"]["podMetricsEndpoints"][0]["relabelings"]
    app = trivial_app()
    torchx_keys = k8s.pod_labels(app, 0, app.roles[0], 0, "x-1a2b3c").keys()
    from_torchx = {prometheus_pod_label(key): key for key in torchx_keys}
    copied = {}
    for relabel in relabelings:
        assert relabel.get("action", "replace") == "replace"
        (source,) = relabel["sourceLabels"]
        target = relabel["targetLabel"]
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", target)
        assert target not in set(LABELS) | {"version", "preset"}, "would clash with a metric label"
        if source.startswith("__meta_kubernetes_pod_label_"):
            assert source in from_torchx, f"{source} is no label torchx sets"
            copied[from_torchx[source]] = target
    assert set(copied) == {
        k8s.LABEL_KUBE_APP_NAME,
        k8s.LABEL_UNIQUE_NAME,
        k8s.LABEL_ROLE_NAME,
        k8s.LABEL_REPLICA_ID,
    }


# --- promtool -----------------------------------------------------------------------------


def promtool(*args: str, cwd: Path) -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


@needs_promtool
def test_promtool_checks_the_rules_and_passes_the_alert_unit_tests(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": load_yaml("prometheusrule.yaml")["spec"]["groups"]}))
    promtool("check", "rules", rules.name, cwd=tmp_path)
    unit = load_yaml("alerts.test.yaml")
    unit["rule_files"] = [rules.name]
    (tmp_path / "alerts.test.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    alerts = {name for name, _ in alert_rules()}
    cases = [case for test in load_yaml("alerts.test.yaml")["tests"] for case in test.get("alert_rule_test", [])]  # fmt: skip
    for alert in alerts:
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case.get("exp_alerts") for case in mine), f"{alert} never fires in a test"
        assert any(not case.get("exp_alerts") for case in mine), f"{alert} never stays quiet"
    assert {case["alertname"] for case in cases} <= alerts


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    """Grafana's variables replaced by values, each query becomes a recording rule that
    promtool parses (syntax, function names and arity, vector/scalar types)."""
    rules = [
        {"record": f"dashboard:query_{number}:check", "expr": expr}
        for number, expr in enumerate(
            expr.replace("$__rate_interval", "1m").replace("$run", ".+")
            for expr in dashboard_exprs()
        )
    ]
    (tmp_path / "dashboard.rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    promtool("check", "rules", "dashboard.rules.yaml", cwd=tmp_path)


# --- metric and label names ---------------------------------------------------------------


def exported_names() -> dict[str, str]:
    """Every series name the exporter produces -> its metric's kind."""
    names = {}
    for spec in METRICS:
        if spec.kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[spec.full_name + suffix] = spec.kind
        else:
            names[spec.full_name] = spec.kind
    return names


def alert_rules() -> list[tuple[str, dict[str, Any]]]:
    groups = load_yaml("prometheusrule.yaml")["spec"]["groups"]
    return [(r["alert"], r) for g in groups for r in g["rules"] if "alert" in r]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in load_yaml("prometheusrule.yaml")["spec"]["groups"] for r in g["rules"]]  # fmt: skip


def recorded_names() -> set[str]:
    groups = load_yaml("prometheusrule.yaml")["spec"]["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", []) if "expr" in t]


def check_names(expr: str, recorded: set[str]) -> set[str]:
    """Assert every metric name in ``expr`` exists; return the ones it uses."""
    exported = exported_names()
    # Label values, then range and subquery durations ([30m:1m]) out of the way.
    without_strings = re.sub(r"\[[^\]]*\]", "[]", re.sub(r'"[^"]*"', '""', expr))
    used = set()
    for token in METRIC_NAME.findall(without_strings):
        if ":" in token:
            assert token in recorded, f"{token} in {expr!r} is no recording rule of ours"
        elif token.startswith("ssl_train"):
            assert token in exported, f"{token} in {expr!r} is not in ssl_train.metrics.METRICS"
            used.add(token)
    for function in ("rate", "irate", "increase"):
        for name in re.findall(rf"\b{function}\(\s*(ssl_train_\w+)", without_strings):
            assert exported[name] in ("counter", "histogram"), f"{function}() of gauge {name}"
    for grouping in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", without_strings):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            assert label in KNOWN_LABELS, f"label {label} in {expr!r} is on no series"
    return used


def test_rules_use_only_exported_metrics_and_labels():
    used = set()
    for expr in rule_exprs():
        used |= check_names(expr, recorded_names())
    assert {
        "ssl_train_steps_total",
        "ssl_train_data_wait_seconds_sum",
        "ssl_train_step_duration_seconds_sum",
        "ssl_train_restarts",
        "ssl_train_last_checkpoint_timestamp_seconds",
    } <= used


def test_alerts_have_severity_timing_and_run_specific_annotations():
    alerts = dict(alert_rules())
    assert set(alerts) == {
        "SSLTrainRunStalled",
        "SSLTrainDataBound",
        "SSLTrainRestartLoop",
        "SSLTrainCheckpointTooOld",
    }
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert DURATION.match(rule.get("for", "0")), name
        for key in ("summary", "description"):
            assert "{{ $labels.run }}" in rule["annotations"][key], (name, key)
    readme = (MONITORING / "README.md").read_text()
    for name in alerts:
        assert name in readme, f"README.md does not explain {name}"


def test_dashboard_uses_only_exported_metrics_filtered_by_run():
    used = set()
    for expr in dashboard_exprs():
        used |= check_names(expr.replace("$__rate_interval", "1m"), set())
        for match in re.finditer(r"ssl_train_\w+", expr):
            selector = expr[match.end() :]
            assert selector.startswith('{run=~"$run"'), f"{match.group()} unfiltered in {expr!r}"
    wanted = {
        "ssl_train_samples_total",
        "ssl_train_step_duration_seconds_bucket",
        "ssl_train_data_wait_seconds_sum",
        "ssl_train_loss",
        "ssl_train_learning_rate",
        "ssl_train_contrastive_top1",
        "ssl_train_restarts",
        "ssl_train_world_size",
        "ssl_train_last_checkpoint_timestamp_seconds",
        "ssl_train_storage_read_bytes_total",
        "ssl_train_storage_retries_total",
        "ssl_train_gpu_memory_allocated_bytes",
        "ssl_train_gpu_memory_reserved_bytes",
    }
    assert wanted <= used, wanted - used


def test_dashboard_structure():
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query"
    assert run["datasource"]["uid"] == "${datasource}"
    query = run["query"]["query"] if isinstance(run["query"], dict) else run["query"]
    assert query == "label_values(ssl_train_build_info, run)"

    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels:
        assert panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr") for t in targets), panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not cells & mine, f"panel {panel['title']} overlaps another"
        cells |= mine
