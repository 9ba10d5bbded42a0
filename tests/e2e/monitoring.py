"""Helpers shared by the monitoring tests: read the dashboard and alert rules, list their PromQL.

Convention read here (and documented in docs/monitoring.md): a dashboard panel whose description starts with
"GPU only" shows GPU metrics, which cannot have data on a CPU machine; expressions naming ``DCGM_*``
series need NVIDIA dcgm-exporter, which the tests never run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
GRAFANA_DIR = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "igcv2.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "igcv2.yml"

GPU_ONLY_PREFIX = "GPU only"
# Concrete values for the Grafana variables the dashboard uses. Ranges must hold >= 2 scrapes.
DEFAULT_VARIABLES = {
    "__rate_interval": "15s",
    "__interval": "5s",
    "__range": "1m",
    "model": ".*",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_IGCV2_NAME = re.compile(r"\b(igcv2_[a-z0-9_]+)\b")


@dataclass(frozen=True)
class Query:
    """One PromQL expression with where it came from."""

    source: str  # "panel 'Title' A" or "alert Name"
    expr: str
    gpu_only: bool = False

    @property
    def needs_dcgm(self) -> bool:
        return "DCGM_" in self.expr


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def load_alerts() -> dict[str, Any]:
    return yaml.safe_load(ALERTS.read_text())


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[Query]:
    dashboard = dashboard or load_dashboard()
    queries = []
    for panel in iter_panels(dashboard):
        gpu_only = str(panel.get("description", "")).startswith(GPU_ONLY_PREFIX)
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append(Query(f"panel {panel['title']!r} {target.get('refId', '?')}", target["expr"], gpu_only))
    return queries


def alert_rules(alerts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    alerts = alerts or load_alerts()
    return [rule for group in alerts["groups"] for rule in group["rules"]]


def alert_queries(alerts: dict[str, Any] | None = None) -> list[Query]:
    return [
        Query(f"alert {rule.get('alert') or rule.get('record')}", " ".join(rule["expr"].split()))
        for rule in alert_rules(alerts)
    ]


def template_variables(dashboard: dict[str, Any] | None = None) -> list[str]:
    dashboard = dashboard or load_dashboard()
    return [variable["name"] for variable in dashboard.get("templating", {}).get("list", [])]


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]) by concrete values; unknown ones raise."""
    values = {**DEFAULT_VARIABLES, **(values or {})}

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"no test value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def igcv2_metric_names(expr: str) -> set[str]:
    return set(_IGCV2_NAME.findall(expr))


def _top_level_positions(expr: str) -> list[tuple[int, str]]:
    """(index, character) of the characters outside (), {}, [] and string literals."""
    out: list[tuple[int, str]] = []
    depth, quote, escaped = 0, "", False
    for i, ch in enumerate(expr):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
            continue
        if ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            out.append((i, ch))
    return out


_LOGICAL = re.compile(r"\b(and|or|unless)\b")
_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def _split_first(expr: str, pattern: re.Pattern[str]) -> str | None:
    """The text left of the first top-level match of ``pattern``, or None when there is none."""
    top = _top_level_positions(expr)
    masked = list(" " * len(expr))
    for i, ch in top:
        masked[i] = ch
    match = pattern.search("".join(masked))
    return expr[: match.start()].strip() if match else None


def inner_expression(expr: str) -> str | None:
    """The left operand of an alert's threshold comparison: ``A / B > 0.05 and C > 1`` -> ``A / B``.

    An alert expression that returns nothing means "not firing"; its inner expression must still return
    data, else the rule can never fire (a wrong metric or label name, say). None when there is no
    top-level comparison.
    """
    expr = " ".join(expr.split())
    left = _split_first(expr, _LOGICAL) or expr
    return _split_first(left, _COMPARISON)
