"""Offline checks of the monitoring files: Prometheus config and alert rules (promtool), the Grafana
dashboard and provisioning. The live check against a real Prometheus is test_observability.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.monitoring import (
    ALERTS,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    GPU_ONLY_PREFIX,
    PROMETHEUS_CONFIG,
    alert_queries,
    alert_rules,
    dashboard_queries,
    igcv2_metric_names,
    inner_expression,
    iter_panels,
    load_alerts,
    load_dashboard,
    substitute,
    template_variables,
)
from prometheus_client import Counter, Gauge, Histogram

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def defined_metric_names() -> set[str]:
    """Series names the service can expose, from service/metrics.py (the single definition)."""
    from service import metrics

    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(f"{value._name}_total")
        elif isinstance(value, Histogram):
            names.update(f"{value._name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif isinstance(value, Gauge):
            names.add(value._name)
    return names


# ---------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_check_config() -> None:
    # rule_files are relative to the config file, so the repository copy checks as it is deployed.
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """Every dashboard query, variables substituted, parses as PromQL (as a recording rule)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(q.expr)} for i, q in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _series(labels: dict[str, str], name: str, values: str) -> dict[str, str]:
    body = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


TARGET = {"job": "igcv2", "instance": "igcv2:8000"}
MODEL = {"model": "igcv2-fashion"}
VERSION = {**MODEL, "version": "1"}


def _requests(code: str, values: str, endpoint: str = "/classify", model: str = "igcv2-fashion") -> dict[str, str]:
    return _series({**TARGET, "endpoint": endpoint, "model": model, "code": code}, "igcv2_requests_total", values)


def _latency(bucket_values: dict[str, str], endpoint: str = "/classify", code: str = "200") -> list[dict[str, str]]:
    labels = {**TARGET, "endpoint": endpoint, **MODEL, "code": code}
    return [
        _series({**labels, "le": le}, "igcv2_request_duration_seconds_bucket", values)
        for le, values in bucket_values.items()
    ]


def _no_alerts(eval_time: str) -> list[dict[str, Any]]:
    return [
        {"eval_time": eval_time, "alertname": rule["alert"], "exp_alerts": []}
        for rule in alert_rules()
        if "alert" in rule
    ]


@needs_promtool
def test_alerts_fire_on_trouble_and_stay_quiet_otherwise(tmp_path: Path) -> None:
    """promtool unit tests on synthetic series: each alert fires when it should, none on a healthy service,
    health probes answering 503 do not count as errors, and a trickle of traffic does not page."""
    alerts = load_alerts()
    for group in alerts["groups"]:  # annotations are checked by `promtool check rules`, not compared here
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "alerts-no-annotations.yml"
    rules_path.write_text(yaml.safe_dump(alerts, sort_keys=False))

    trouble = [
        _series(TARGET, "up", "0x30"),
        _series({**TARGET, **VERSION}, "igcv2_model_ready", "0x30"),
        *_latency({"0.5": "0+10x30", "1.0": "0+100x30", "+Inf": "0+100x30"}),  # p99 ~ 1 s
        _requests("200", "0+60x30"),
        _requests("504", "0+30x30"),  # 20% 5xx
        _requests("400", "0+60x30"),  # 40% 4xx
        _series({**TARGET, **VERSION}, "igcv2_queue_depth", "230x30"),
        _series({**TARGET, **VERSION}, "igcv2_queue_capacity", "256x30"),
        _series({**TARGET, **VERSION, "reason": "queue_full"}, "igcv2_rejected_images_total", "0+60x30"),
        _series(TARGET, "igcv2_worker_restarts_total", "0x10 1x20"),  # one worker replaced at minute 11
    ]
    fired = {
        "IGCV2ServiceDown": [{"severity": "critical", **TARGET}],
        "IGCV2ModelNotReady": [{"severity": "critical", **TARGET, **VERSION}],
        "IGCV2HighP99Latency": [{"severity": "warning", **MODEL}],
        "IGCV2HighServerErrorRatio": [{"severity": "critical", **MODEL}],
        "IGCV2HighClientErrorRatio": [{"severity": "info", **MODEL}],
        "IGCV2QueueNearFull": [{"severity": "warning", **VERSION}],
        "IGCV2ImagesRejected": [{"severity": "warning", **VERSION, "reason": "queue_full"}],
        "IGCV2WorkerRestarted": [{"severity": "warning", **TARGET}],
    }
    assert set(fired) == {rule["alert"] for rule in alert_rules() if "alert" in rule}, "update this test"
    healthy = [
        _series(TARGET, "up", "1x30"),
        _series({**TARGET, **VERSION}, "igcv2_model_ready", "1x30"),
        *_latency({"0.05": "0+100x30", "0.5": "0+100x30", "1.0": "0+100x30", "+Inf": "0+100x30"}),
        _requests("200", "0+100x30"),
        _requests("503", "0+1x30"),  # 1% 5xx
        _requests("404", "0+5x30"),  # 5% 4xx
        _requests("503", "0+1000x30", endpoint="/health/ready", model=""),  # probes of a not-ready replica
        _requests("200", "0+4x30", endpoint="/metrics", model=""),
        _series({**TARGET, **VERSION}, "igcv2_queue_depth", "10x30"),
        _series({**TARGET, **VERSION}, "igcv2_queue_capacity", "256x30"),
        _series({**TARGET, **VERSION, "reason": "deadline"}, "igcv2_rejected_images_total", "0+1x30"),
        _series(TARGET, "igcv2_worker_restarts_total", "0x30"),
    ]
    trickle = [_requests("200", "0+1x30"), _requests("503", "0+1x30"), _requests("400", "0+1x30")]
    # gRPC alone: its code names count as HTTP's numbers do, its health checks as HTTP's probes.
    infer, check = "/inference.GRPCInferenceService/ModelInfer", "/grpc.health.v1.Health/Check"
    grpc_trouble = [
        *_latency({"0.5": "0+10x30", "1.0": "0+100x30", "+Inf": "0+100x30"}, endpoint=infer, code="OK"),
        _requests("OK", "0+60x30", endpoint=infer),
        _requests("DEADLINE_EXCEEDED", "0+15x30", endpoint=infer),
        _requests("UNAVAILABLE", "0+15x30", endpoint=infer),  # 20% server errors
        _requests("INVALID_ARGUMENT", "0+60x30", endpoint=infer),  # 40% client errors
    ]
    grpc_healthy = [
        *_latency({"0.05": "0+100x30", "+Inf": "0+100x30"}, endpoint=infer, code="OK"),
        _requests("OK", "0+100x30", endpoint=infer),
        _requests("UNAVAILABLE", "0+1x30", endpoint=infer),
        _requests("NOT_FOUND", "0+5x30", endpoint=infer),
        _requests("OK", "0+1000x30", endpoint=check, model=""),
        _requests("OK", "0+1000x30", endpoint="/inference.GRPCInferenceService/ServerReady", model=""),
    ]
    grpc_alerts = {"IGCV2HighP99Latency": "warning", "IGCV2HighServerErrorRatio": "critical"}
    grpc_alerts["IGCV2HighClientErrorRatio"] = "info"
    tests = {
        "rule_files": [str(rules_path)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "trouble",
                "interval": "1m",
                "input_series": trouble,
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in exp]}
                    for name, exp in fired.items()
                ]
                + [{"eval_time": "3m", "alertname": "IGCV2ModelNotReady", "exp_alerts": []}],  # warm-up grace
            },
            {"name": "healthy", "interval": "1m", "input_series": healthy, "alert_rule_test": _no_alerts("20m")},
            {"name": "trickle", "interval": "1m", "input_series": trickle, "alert_rule_test": _no_alerts("20m")},
            {
                "name": "grpc trouble",
                "interval": "1m",
                "input_series": grpc_trouble,
                "alert_rule_test": [
                    {
                        "eval_time": "20m",
                        "alertname": name,
                        "exp_alerts": [{"exp_labels": {"severity": severity, **MODEL}}],
                    }
                    for name, severity in grpc_alerts.items()
                ],
            },
            {
                "name": "grpc healthy",
                "interval": "1m",
                "input_series": grpc_healthy,
                "alert_rule_test": _no_alerts("20m"),
            },
        ],
    }
    test_path = tmp_path / "alerts-test.yml"
    test_path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(test_path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- alert rules


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        # Every alert is a threshold: its left side is what the live test requires data for.
        assert inner_expression(rule["expr"]), rule["alert"]
    exprs = " ".join(rule["expr"] for rule in rules)
    for needle in ("histogram_quantile(0.99", 'code=~"5..', "igcv2_queue_capacity", "igcv2_model_ready", "up{"):
        assert needle in exprs


def test_inner_expression() -> None:
    assert inner_expression('up{job="x"} == 0') == 'up{job="x"}'
    assert inner_expression('sum(rate(a{code=~"5.."}[5m])) / sum(rate(a[5m])) > 0.05 and sum(b) > 1') == (
        'sum(rate(a{code=~"5.."}[5m])) / sum(rate(a[5m]))'
    )
    assert inner_expression('max(x{le=">"}) >= 2') == 'max(x{le=">"})'
    assert inner_expression("absent(up)") is None


# ---------------------------------------------------------------- Prometheus scrape config


def test_prometheus_scrapes_service_and_dcgm() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["igcv2"]["static_configs"][0]["targets"] == ["igcv2:8000"]
    assert jobs["igcv2"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["dcgm"]["static_configs"][0]["targets"] == ["dcgm-exporter:9400"]
    assert (PROMETHEUS_CONFIG.parent / config["rule_files"][0]).resolve() == ALERTS.resolve()
    # Job names used by the alerts and the dashboard exist in the scrape config.
    used = set()
    for query in [*alert_queries(), *dashboard_queries()]:
        used.update(re.findall(r'job="([^"]+)"', query.expr))
    assert used and used <= set(jobs)


# ---------------------------------------------------------------- Grafana


def test_dashboard_panels_have_units_descriptions_and_queries() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "igcv2" and dashboard["title"]
    panels = [panel for panel in iter_panels(dashboard) if panel["type"] != "row"]
    ids = [panel["id"] for panel in iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        title = panel["title"]
        assert panel.get("description", "").strip(), f"{title}: no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["datasource"]["uid"] == "${datasource}", title
        assert panel["targets"], f"{title}: no queries"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}", title
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title


def test_queue_depth_panel_draws_images_and_requests_on_separate_axes() -> None:
    """Images queued and requests in progress are different units: one shared axis would read as one."""
    panel = next(p for p in iter_panels(load_dashboard()) if p["title"] == "Queue depth")
    ref = next(t["refId"] for t in panel["targets"] if "igcv2_requests_in_progress" in t["expr"])
    assert all("igcv2_queue_" in t["expr"] for t in panel["targets"] if t["refId"] != ref)
    assert panel["fieldConfig"]["defaults"]["custom"]["axisLabel"] == "images"
    matcher = {"id": "byFrameRefID", "options": ref}
    override = next(o for o in panel["fieldConfig"]["overrides"] if o["matcher"] == matcher)
    props = {prop["id"]: prop["value"] for prop in override["properties"]}
    assert props == {"custom.axisPlacement": "right", "custom.axisLabel": "requests"}


def test_dashboard_layout_does_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(load_dashboard()):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_quantiles_aggregate_buckets_by_le() -> None:
    quantile = re.compile(
        r"histogram_quantile\(\s*0\.\d+\s*,\s*sum by \(le\) \(rate\((\w+)_bucket\{[^}]*\}\[\$__rate_interval\]\)\)\)"
    )
    exprs = [query.expr for query in dashboard_queries() if "histogram_quantile" in query.expr]
    assert exprs
    for expr in exprs:
        assert quantile.fullmatch(expr), expr
    covered = {quantile.fullmatch(expr).group(1) for expr in exprs}  # type: ignore[union-attr]
    assert {
        "igcv2_request_duration_seconds",
        "igcv2_queue_duration_seconds",
        "igcv2_inference_duration_seconds",
    } <= covered
    for q in ("0.5", "0.95", "0.99"):
        prefix = f"histogram_quantile({q}, sum by (le) (rate(igcv2_request_duration"
        assert any(expr.startswith(prefix) for expr in exprs)


def test_dashboard_covers_the_required_views() -> None:
    text = " ".join(query.expr for query in dashboard_queries())
    for name in (
        "igcv2_requests_total",
        "igcv2_images_total",
        "igcv2_request_duration_seconds_bucket",
        "igcv2_queue_duration_seconds_bucket",
        "igcv2_inference_duration_seconds_bucket",
        "igcv2_batch_size_bucket",
        "igcv2_queue_depth",
        "igcv2_queue_capacity",
        "igcv2_model_ready",
        "igcv2_warmup_duration_seconds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "igcv2_device_memory_bytes",
        "DCGM_FI_DEV_GPU_UTIL",
    ):
        assert name in text, f"dashboard does not show {name}"
    assert "sum by (code) (rate(igcv2_requests_total{" in text  # error rate by code
    heatmaps = [panel for panel in iter_panels(load_dashboard()) if panel["type"] == "heatmap"]
    assert heatmaps and all(target.get("format") == "heatmap" for panel in heatmaps for target in panel["targets"])


def test_gpu_only_panels_are_marked() -> None:
    for query in dashboard_queries():
        if "DCGM_" in query.expr or "igcv2_device_memory_bytes" in query.expr:
            assert query.gpu_only, f"{query.source}: description must start with {GPU_ONLY_PREFIX!r}"
        else:
            assert not query.gpu_only, query.source


def test_dashboard_variables_are_defined_and_substituted() -> None:
    dashboard = load_dashboard()
    defined = set(template_variables(dashboard))
    assert {"datasource", "model"} <= defined
    for query in dashboard_queries(dashboard):
        used = set(re.findall(r"\$\{?(\w+)", query.expr))
        assert used <= defined | GRAFANA_BUILTINS, query.source
        assert "$" not in substitute(query.expr), query.source


def test_referenced_igcv2_metrics_are_defined_by_the_service() -> None:
    defined = defined_metric_names()
    for query in [*dashboard_queries(), *alert_queries()]:
        missing = igcv2_metric_names(query.expr) - defined
        assert not missing, f"{query.source} names {sorted(missing)}, not in service/metrics.py"


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    (prometheus,) = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    assert prometheus["isDefault"] is True
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert prometheus["jsonData"]["timeInterval"] == scrape  # keeps $__rate_interval >= 4 scrapes
    variable = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["query"] == "prometheus" and variable["current"]["value"] == prometheus["uid"]

    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
