"""Schema-driven fuzzing (schemathesis) of the real server from its own /openapi.json.

Every operation is driven with schemathesis's positive and negative data, once with generated
path parameters and once with the served model's real name, for a bounded number of examples.
Each answer must be: any status below 500, or 503 with Retry-After, or 504 because a deadline
passed (the only server errors the API documents); errors carry a JSON ``{"error": ...}``; 200
bodies conform to their declared schema; no request hangs (10 s each).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from e2e.reliability import assert_serving, fast_env, metric
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from live_server import LiveServer, live_server
from samples import DEFAULT_MODEL, default_model_store, fashion_pngs
from schemathesis.checks import response_schema_conformance

EXAMPLES = 12  # per operation, per generation mode, per path-parameter choice
REQUEST_TIMEOUT_S = 10.0
INFER_BODY = json.dumps(
    {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "UINT8", "data": [7] * 784}]}
).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp_path = tmp_path_factory.mktemp("schemathesis")
    # An admin key, so fuzzed load/unload calls are refused instead of unloading the model under test.
    env = fast_env(default_model_store(tmp_path), admin_key="fuzz-admin-key-never-sent", max_queue_size="64")
    with live_server(tmp_path, env) as running:
        yield running


def test_openapi_declares_every_path_parameter(server: LiveServer) -> None:
    """A path template's {parameters} must be declared, or clients generated from the spec (and
    schemathesis) cannot call the operation."""
    spec = httpx.get(server.url + "/openapi.json").json()
    missing = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            undeclared = set(re.findall(r"{(\w+)}", path)) - declared
            if undeclared:
                missing.append(f"{method.upper()} {path}: {', '.join(sorted(undeclared))}")
    assert not missing, "path parameters missing from /openapi.json:\n" + "\n".join(missing)


def problem(response: Any) -> str | None:
    """Why an answer breaks the documented contract (None: it does not)."""
    status = response.status_code
    if status >= 500 and status not in (503, 504):
        return f"undocumented server error {status}"
    if status >= 400:
        try:
            message = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} without a JSON error body"
        if not isinstance(message, str) or not message:
            return f"{status} with an empty error message"
        if status == 503 and not response.headers.get("retry-after", "").isdigit():
            return "503 without Retry-After"
        if status == 504 and "deadline" not in message:
            return f"504 that is not a passed deadline: {message}"
    return None


def drive(server: LiveServer, strategy: Any, extra: dict[str, Any], failures: list[str], codes: Counter[int]) -> None:
    """Send up to EXAMPLES cases from ``strategy``; record contract violations instead of raising, so
    a failure neither stops the run nor sends hypothesis into a long shrink."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def send(case: schemathesis.Case) -> None:
        label = f"{case.method} {case.formatted_path} query={case.query} headers={case.headers}"
        try:
            response = case.call(base_url=server.url, timeout=REQUEST_TIMEOUT_S, **extra)
        except Exception as exc:  # a timeout is a hang; a dropped connection a crash
            failures.append(f"{label}: no answer ({type(exc).__name__}: {exc})")
            return
        codes[response.status_code] += 1
        if (why := problem(response)) is not None:
            failures.append(f"{label}: {why}: {response.text[:300]}")
        elif response.status_code == 200:
            try:
                case.validate_response(response, checks=[response_schema_conformance])
            except Exception as exc:
                failures.append(f"{label}: 200 body off its schema: {exc}")

    with contextlib.suppress(Unsatisfiable):  # e.g. negative data for an operation without parameters
        send()


def test_fuzzing_finds_no_undocumented_server_error_and_no_hang(server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    png = fashion_pngs(1)[0]
    failures: list[str] = []
    codes: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    version = httpx.get(f"{server.url}/models/{DEFAULT_MODEL}").json()["versions"][0]["version"]
    served = {"name": DEFAULT_MODEL, "version": str(version)}  # path parameters that reach the model
    assert len(operations) >= 10
    started = time.monotonic()
    for operation in operations:
        extra: dict[str, Any] = {}
        if operation.path == "/classify":  # the body is read by hand, so the spec cannot describe it
            extra = {"data": png, "headers": {"Content-Type": "image/png"}}
        elif operation.path.endswith("/infer"):
            extra = {"data": INFER_BODY, "headers": {"Content-Type": "application/json"}}
        real = {k: v for k, v in served.items() if f"{{{k}}}" in operation.path}
        for mode in schemathesis.GenerationMode:
            for path_parameters in [None, real] if real else [None]:
                drive(server, operation.as_strategy(mode, path_parameters=path_parameters), extra, failures, codes)
    elapsed = time.monotonic() - started
    assert not failures, f"{len(failures)} contract violations:\n" + "\n".join(failures[:20])
    total = sum(codes.values())
    assert total >= 5 * len(operations), f"only {total} requests: the fuzzing did not run"
    assert codes[200] > len(operations) // 2, f"the real model name never got through: {dict(codes)}"
    print(f"{total} fuzzed requests in {elapsed:.1f}s over {len(operations)} operations: {dict(sorted(codes.items()))}")
    assert_serving(server)
    assert metric(server, "igcv2_requests_total", code="500") == 0
    assert "Traceback" not in server.log()
