"""The dashboard and the alert rules, checked against a real Prometheus scraping the real service.

Starts ``python -m service`` and Debian's ``prometheus`` on loopback (scrape and rule evaluation every
second, alerts.yml loaded), drives traffic with every kind of error, then evaluates every PromQL
expression of docker/grafana/dashboards/igcv2.json and docker/prometheus/alerts.yml through the HTTP
API: each must parse and return data. GPU-only expressions need only parse on a CPU machine, and
dcgm-exporter series (never run here) need only parse anywhere.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from e2e.monitoring import (
    ALERTS,
    PROMETHEUS_CONFIG,
    Query,
    alert_queries,
    alert_rules,
    dashboard_queries,
    igcv2_metric_names,
    inner_expression,
    substitute,
)
from live_server import LiveServer, free_port, live_server
from prometheus_client.parser import text_string_to_metric_families
from samples import default_model_store, fashion_pngs, fashion_test_images
from tritonclient.utils import InferenceServerException

PROMETHEUS = shutil.which("prometheus")
RATE_RANGE = "15s"  # substituted for $__rate_interval: 15 scrapes at the 1 s interval used here
MAX_IMAGES = 4  # IGCV2_MAX_IMAGES_PER_REQUEST, so that 5 images answer 413

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing (Debian package prometheus)"),
]


# ---------------------------------------------------------------- fixtures: model, images, processes


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[httpx.Client]:
    """Debian's Prometheus with the repository's scrape job (pointed at ``target``) and alert rules."""
    assert PROMETHEUS is not None
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "igcv2"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]  # dcgm-exporter does not run here
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"prometheus exited:\n{log_path.read_text()[-3000:]}"
            try:
                if client.get("/-/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready in 30 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield client
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def instant(prom: httpx.Client, expr: str) -> list[dict[str, Any]]:
    """Evaluate ``expr`` now; fail with Prometheus' own message when it does not parse or run."""
    response = prom.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body.get("status") == "success", f"{expr}\n-> {body.get('error')}"
    data = body["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


# ---------------------------------------------------------------- traffic


def multipart(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def error_requests(client: httpx.Client, image: bytes, unknown_model: str) -> dict[int, int]:
    """One request of each error kind; {expected status: status answered}."""
    png = {"content-type": "image/png"}
    return {
        400: client.post("/classify", content=b"this is not an image", headers=png).status_code,
        404: client.post("/classify", params={"model": unknown_model}, content=image, headers=png).status_code,
        413: client.post("/classify", files=multipart([image] * (MAX_IMAGES + 1))).status_code,
        415: client.post("/classify", content=b"plain text", headers={"content-type": "text/plain"}).status_code,
        422: client.post("/classify", params={"top_k": "0"}, content=image, headers=png).status_code,
        504: client.post("/classify", content=image, headers={**png, "X-Request-Timeout": "0.000001"}).status_code,
    }


def good_requests(client: httpx.Client, images: list[bytes]) -> list[int]:
    """Single raw images, a multipart request, and concurrent requests so that batches form."""
    codes = [
        client.post("/classify", content=image, headers={"content-type": "image/png"}).status_code
        for image in images[:2]
    ]
    codes.append(client.post("/classify", files=multipart(images[:3]), params={"top_k": 3}).status_code)
    with ThreadPoolExecutor(4) as pool:
        codes += list(
            pool.map(lambda i: client.post("/classify", files=multipart(images[i : i + 2])).status_code, range(0, 8, 2))
        )
    return codes


def grpc_requests(client: triton.InferenceServerClient, unknown_model: str) -> dict[str, str]:
    """A good ModelInfer and two bad ones over gRPC; {expected status code: code answered}."""
    images, _ = fashion_test_images(2)
    answered = {}
    for expected, name, tensor in (
        ("OK", "igcv2-fashion", "image"),
        ("INVALID_ARGUMENT", "igcv2-fashion", "bogus"),
        ("NOT_FOUND", unknown_model, "image"),
    ):
        data = triton.InferInput(tensor, list(images.shape), "UINT8")
        data.set_data_from_numpy(np.ascontiguousarray(images))
        try:
            client.infer(name, [data])
            answered[expected] = "OK"
        except InferenceServerException as exc:
            answered[expected] = str(exc.status()).removeprefix("StatusCode.")
    return answered


class BackgroundTraffic:
    """Keeps a trickle of good and bad requests flowing, so every rate has recent samples."""

    def __init__(self, server: LiveServer, images: list[bytes], unknown_model: str) -> None:
        self.server, self.images, self.unknown_model = server, images, unknown_model
        self.stop_event = threading.Event()
        self.codes: Counter[int | str] = Counter()
        self.mismatches: list[str] = []
        self.thread = threading.Thread(target=self.run, name="traffic", daemon=True)

    def run(self) -> None:
        with (
            self.server.client(timeout=30.0) as client,
            triton.InferenceServerClient(self.server.grpc_target) as grpc_client,
        ):
            round_ = 0
            while not self.stop_event.is_set():
                try:
                    self.codes.update(good_requests(client, self.images))
                    for expected, got in grpc_requests(grpc_client, self.unknown_model).items():
                        self.codes[got] += 1
                        if got != expected:
                            self.mismatches.append(f"gRPC: expected {expected}, got {got}")
                    if round_ % 3 == 0:
                        for expected, got in error_requests(client, self.images[0], self.unknown_model).items():
                            self.codes[got] += 1
                            if got != expected:
                                self.mismatches.append(f"expected {expected}, got {got}")
                except httpx.HTTPError as exc:
                    self.mismatches.append(f"{type(exc).__name__}: {exc}")
                round_ += 1
                self.stop_event.wait(0.3)

    def __enter__(self) -> BackgroundTraffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(60)


# ---------------------------------------------------------------- checks


def exposed_names(metrics_text: str) -> set[str]:
    """Every series name /metrics can show, including those of labelled metrics with no sample yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


def wait_for_scrapes(prom: httpx.Client, timeout: float = 60.0) -> None:
    """Until the error series and the batch histograms have enough samples for a rate over RATE_RANGE,
    and every alert rule has been evaluated."""
    conditions = [
        f'count_over_time(igcv2_requests_total{{code="504"}}[{RATE_RANGE}]) >= 4',
        f'count_over_time(igcv2_requests_total{{code="413"}}[{RATE_RANGE}]) >= 4',
        f"count_over_time(igcv2_batch_size_count[{RATE_RANGE}]) >= 4",
        f"count_over_time(igcv2_rejected_images_total[{RATE_RANGE}]) >= 4",
    ]
    deadline = time.monotonic() + timeout
    missing: list[str] = conditions
    while time.monotonic() < deadline:
        missing = [condition for condition in conditions if not instant(prom, condition)]
        rules = [rule for group in prom.get("/api/v1/rules").json()["data"]["groups"] for rule in group["rules"]]
        evaluated = rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules)
        if not missing and evaluated:
            return
        time.sleep(0.5)
    pytest.fail(f"Prometheus did not collect enough samples in {timeout:.0f} s: {missing}")


def check_query(prom: httpx.Client, query: Query, gpu: bool) -> str | None:
    """None when the query is fine, else what is wrong with it."""
    expr = substitute(query.expr, {"__rate_interval": RATE_RANGE})
    result = instant(prom, expr)  # must parse and run, whatever the machine
    if query.needs_dcgm or (query.gpu_only and not gpu):
        return None
    if not result:
        return f"{query.source}: no data for {expr}"
    if not finite(result):
        return f"{query.source}: only NaN/Inf for {expr}: {result}"
    return None


def check_alert(prom: httpx.Client, query: Query) -> str | None:
    if instant(prom, query.expr):
        return None  # the condition holds right now (a firing or pending alert): it has data
    inner = inner_expression(query.expr)
    if inner is None:
        return f"{query.source}: empty and no threshold comparison to check instead: {query.expr}"
    if not instant(prom, inner):
        return f"{query.source}: neither the rule nor its inner expression returns data: {inner}"
    return None


# ---------------------------------------------------------------- the test


def grpc_in_panels(prom: httpx.Client) -> dict[str, set[Any]]:
    """What the throughput panel ((endpoint, code)) and the error panel (code) show of gRPC now."""
    queries = {q.source.split("'")[1]: q.expr for q in dashboard_queries() if "sum by (endpoint, code)" in q.expr}
    queries |= {q.source.split("'")[1]: q.expr for q in dashboard_queries() if "sum by (code)" in q.expr}
    shown: dict[str, set[Any]] = {}
    for title, expr in queries.items():
        result = instant(prom, substitute(expr, {"__rate_interval": RATE_RANGE}))
        labels = [series["metric"] for series in result if float(series["value"][1]) > 0]
        shown[title] = {(m["endpoint"], m["code"]) if "endpoint" in m else m["code"] for m in labels}
    return shown


def test_dashboard_and_alerts_against_real_prometheus(tmp_path: Path) -> None:
    images = fashion_pngs(8)
    unknown_model = f"no-such-model-{uuid.uuid4().hex[:8]}"
    env = {
        "IGCV2_MODEL_STORE": str(default_model_store(tmp_path)),
        "IGCV2_COMPILE": "false",  # quick start; compilation is not what is observed here
        "IGCV2_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "IGCV2_MAX_BATCH_SIZE": "8",
        "IGCV2_MAX_QUEUE_DELAY_MS": "5",
        "IGCV2_CPU_THREADS": "1",
    }
    started = time.monotonic()
    with live_server(tmp_path, env=env) as server, server.client() as client:
        target = server.url.removeprefix("http://")
        with prometheus(tmp_path, target) as prom:
            assert set(good_requests(client, images)) == {200}
            answered = error_requests(client, images[0], unknown_model)
            assert answered == {code: code for code in answered}, f"status codes (expected: answered) {answered}"

            with BackgroundTraffic(server, images, unknown_model) as traffic:
                wait_for_scrapes(prom)
                gpu = cuda_available()
                problems = [check_query(prom, query, gpu) for query in dashboard_queries()]
                problems += [check_alert(prom, query) for query in alert_queries()]
                rules = prom.get("/api/v1/rules").json()["data"]["groups"]
                codes = {s["metric"]["code"] for s in instant(prom, 'igcv2_requests_total{endpoint="/classify"}')}
                grpc_series = grpc_in_panels(prom)
            assert not traffic.mismatches, traffic.mismatches[:10]
            assert traffic.codes[200] > 0

        problems = [problem for problem in problems if problem]
        assert not problems, "\n".join(problems)

        # alerts.yml loaded whole, every rule evaluates without error
        loaded = [rule for group in rules for rule in group["rules"]]
        assert {rule["name"] for rule in loaded} == {rule["alert"] for rule in alert_rules()}
        assert all(rule["health"] == "ok" for rule in loaded), [(r["name"], r.get("lastError")) for r in loaded]

        # every outcome is counted with its code, 413 and 504 included
        assert {"200", "400", "404", "413", "415", "422", "504"} <= codes, codes
        # the throughput and error panels count gRPC, by RPC and code name
        infer = "/inference.GRPCInferenceService/ModelInfer"
        assert {(infer, "OK"), (infer, "INVALID_ARGUMENT"), (infer, "NOT_FOUND")} <= grpc_series["Request throughput"]
        assert {"INVALID_ARGUMENT", "NOT_FOUND"} <= grpc_series["Error rate by status code"]

        # every metric the dashboard and the alerts name is served by /metrics
        metrics_text = client.get("/metrics").text
        exposed = exposed_names(metrics_text)
        referenced = set().union(*(igcv2_metric_names(q.expr) for q in [*dashboard_queries(), *alert_queries()]))
        referenced |= {"process_resident_memory_bytes", "process_cpu_seconds_total"}
        assert referenced - exposed == set(), f"named by dashboard/alerts but not on /metrics: {referenced - exposed}"

        # labels stay bounded: an unknown model name asked for never becomes a label value
        assert unknown_model not in metrics_text
    assert time.monotonic() - started < 240
