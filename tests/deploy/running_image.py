"""Checks of a running container of the image, over HTTP: run by docker/test-image.sh (``make image-test``).

Not collected by the suite, which has no Docker engine: the script runs this file with ``IGCV2_IMAGE_URL``
and ``IGCV2_IMAGE_GRPC`` (its HTTP URL and gRPC address) set once the container's HEALTHCHECK reports
healthy, after each start. As a program, ``python tests/deploy/running_image.py PORT GRPC_PORT VOLUME``
prints the ``docker run`` options, one a line, that run the image as docker-compose.cpu.yml runs its
service (``deploy.wiring.docker_run_args``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import httpx
import pytest
import tritonclient.grpc as triton
from deploy.wiring import COMPOSE_CPU, ROOT, SERVICE, compose_config, docker_run_args
from prometheus_client.parser import text_string_to_metric_families
from samples import DEFAULT_MODEL, assert_matches_offline, fashion_pngs, multipart, offline_probabilities

URL = os.environ.get("IGCV2_IMAGE_URL", "")
GRPC = os.environ.get("IGCV2_IMAGE_GRPC", "")
N_IMAGES, PER_REQUEST = 256, 8
pytestmark = pytest.mark.skipif(not URL, reason="docker/test-image.sh runs these checks against its container")


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(base_url=URL, timeout=60) as client:
        yield client


def test_classifies_fashion_mnist_as_the_model_does_offline(client: httpx.Client) -> None:
    """The container serves the repository's model_store/ (docker-compose.cpu.yml mounts it on /models)."""
    pngs = fashion_pngs(N_IMAGES)
    results = []
    for i in range(0, N_IMAGES, PER_REQUEST):
        response = client.post("/classify", params={"top_k": 10}, files=multipart(pngs[i : i + PER_REQUEST]))
        assert response.status_code == 200, response.text
        results += response.json()["results"]
    assert_matches_offline(results, offline_probabilities(ROOT / "model_store", N_IMAGES))


def test_metrics_count_what_was_served(client: httpx.Client) -> None:
    def images_total() -> float:
        return sum(value for labels, value in scrape(client, "igcv2_images_total") if labels["model"] == DEFAULT_MODEL)

    before = images_total()
    assert client.post("/classify", files=multipart(fashion_pngs(3))).status_code == 200
    assert images_total() == before + 3
    ready = [value for labels, value in scrape(client, "igcv2_model_ready") if labels["model"] == DEFAULT_MODEL]
    assert ready == [1.0]


def test_open_inference_protocol_readiness(client: httpx.Client) -> None:
    response = client.get("/v2/health/ready")
    assert response.status_code == 200 and response.json() == {"ready": True}, response.text


def test_grpc_readiness() -> None:
    """The Open Inference Protocol's other wire, served beside HTTP by the same process."""
    with triton.InferenceServerClient(GRPC) as grpc_client:
        assert grpc_client.is_server_ready() and grpc_client.is_model_ready(DEFAULT_MODEL)


def scrape(client: httpx.Client, name: str) -> list[tuple[dict[str, str], float]]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name
    ]


if __name__ == "__main__":
    port, grpc_port, volume = sys.argv[1:]
    service = compose_config(COMPOSE_CPU)["services"][SERVICE]
    print("\n".join(docker_run_args(service, int(port), int(grpc_port), volume)))
