"""The chart's SLO alerts and Grafana dashboard: every PromQL expression parses with
Prometheus's grammar (promql-parser, a port of its parser), names only metrics Steward exports,
and the rendered PrometheusRule is valid against the Prometheus Operator's published CRD."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

import jsonschema
import prometheus_client
import promql_parser
import pytest
import yaml

from tests.deploy.test_helm_chart import CHART, HELM, of_kind, render

FILES = CHART / "files"
CRD = (
    Path(__file__).parents[1]
    / "fixtures"
    / "prometheus-operator"
    / "monitoring.coreos.com_prometheusrules.yaml"
)
# What each alert of the SLOs watches (the list): the alert names the chart must ship.
ALERTS = {
    "StewardGatewayErrorRate",
    "StewardGatewayAddedLatencyHigh",
    "StewardMeteringLag",
    "StewardUsageSpoolNotDraining",
    "StewardOutboxBacklog",
    "StewardQuotaWebhookFailing",
    "StewardApprovalSlaBreached",
}


def exported_metrics() -> set[str]:
    """Every series name Steward's processes export: their modules registered the metrics."""
    for package in ("gateway", "services", "libs"):
        root = importlib.import_module(package)
        for module in pkgutil.walk_packages(root.__path__, package + "."):
            if ".migrations" in module.name or module.name.endswith("__main__"):
                continue
            importlib.import_module(module.name)
    registry = prometheus_client.REGISTRY
    return {n for names in registry._collector_to_names.values() for n in names}


def selectors(expr: Any) -> list[str]:
    """The metric names an expression reads (walking the parsed tree)."""
    found: list[str] = []
    kind = type(expr).__name__
    if kind == "VectorSelector":
        found.append(expr.name)
    for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(expr, attribute, None)
        if child is not None and not isinstance(child, (str, int, float)):
            found += selectors(child)
    for arg in getattr(expr, "args", None) or []:
        found += selectors(arg)
    return found


@pytest.fixture(scope="module")
def metrics() -> set[str]:
    return exported_metrics()


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((FILES / "prometheus-rules.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((FILES / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_every_alert_parses_reads_exported_metrics_and_says_what_to_do(
    metrics: set[str],
) -> None:
    found = rules()
    assert {r["alert"] for r in found} >= ALERTS
    for rule in found:
        parsed = promql_parser.parse(rule["expr"])
        names = selectors(parsed)
        assert names, rule["alert"]
        assert set(names) <= metrics, (rule["alert"], set(names) - metrics)
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_dashboard_query_parses_and_reads_exported_metrics(metrics: set[str]) -> None:
    dashboard = json.loads((FILES / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    wanted = {"calls", "tokens", "first token", "cost", "quota", "ready"}
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    assert all(w in titles for w in wanted), titles
    for expr in dashboard_exprs():
        names = selectors(promql_parser.parse(expr))
        assert names and set(names) <= metrics, (expr, set(names) - metrics)


def test_the_checks_are_not_vacuous(metrics: set[str]) -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(steward_gateway_calls_total[5m])")  # unbalanced
    assert selectors(promql_parser.parse("rate(no_such_metric_total[5m]) > 1")) == [
        "no_such_metric_total"
    ]
    assert "no_such_metric_total" not in metrics


@pytest.mark.skipif(not Path(HELM).exists(), reason="helm is not installed")
def test_the_chart_renders_a_valid_prometheus_rule_and_a_dashboard_configmap() -> None:
    objects = render(
        "--set",
        "monitoring.prometheusRule.enabled=true",
        "--set",
        "monitoring.prometheusRule.labels.release=kube-prometheus-stack",
        "--set",
        "monitoring.grafanaDashboard.enabled=true",
    )
    [rule] = of_kind(objects, "PrometheusRule").values()
    crd = yaml.safe_load(CRD.read_text())
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    jsonschema.Draft202012Validator(served["schema"]["openAPIV3Schema"]).validate(rule)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((FILES / "prometheus-rules.yaml").read_text())
    dashboards = of_kind(objects, "ConfigMap")
    [board] = [c for name, c in dashboards.items() if name.endswith("-dashboard")]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["steward.json"]) == json.loads(
        (FILES / "grafana-dashboard.json").read_text()
    )
    # Off by default: a cluster without the Prometheus Operator installs the chart as it is.
    assert not of_kind(render(), "PrometheusRule")
