"""Every Prometheus metric of the service, defined once (names, types and labels are a contract).

Labels are bounded: model names and versions from the store, route templates, status codes.
Latency buckets resolve 0.5 ms to 10 s; the base unit is seconds. With several workers
(service/workers.py) each gauge says how the workers' values combine: queue depths, capacities and
requests in progress add up, a model is ready only where every live worker has it ready.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

# Several workers: prometheus_client keeps values in files there (read once, as the library does).
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
)  # fmt: skip


def batch_buckets(max_batch_size: int = 1024) -> tuple[float, ...]:
    """1, 2, 4, ... up to the largest batch size the service allows."""
    buckets, size = [], 1
    while size <= max_batch_size:
        buckets.append(float(size))
        size *= 2
    return tuple(buckets)


REQUESTS = Counter(
    "igcv2_requests",
    "Requests answered, by endpoint (an HTTP route template, or a gRPC method: /inference.GRPCInferenceService/"
    "ModelInfer), model and status code (HTTP's number, or gRPC's code name: OK, UNAVAILABLE, ...).",
    ["endpoint", "model", "code"],
)
REQUEST_DURATION = Histogram(
    "igcv2_request_duration_seconds",
    "End-to-end request latency inside the server.",
    ["endpoint", "model", "code"],
    buckets=LATENCY_BUCKETS,
)
IN_PROGRESS = Gauge(
    "igcv2_requests_in_progress",
    "Requests (HTTP and gRPC) received and not yet answered, at any stage (health probes and scrapes not counted).",
    multiprocess_mode="livesum",
)
IMAGES = Counter("igcv2_images", "Images classified (computed and answered).", ["model", "version"])
PREPROCESS_DURATION = Histogram(
    "igcv2_preprocess_duration_seconds",
    "Decode + resize time per image.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DURATION = Histogram(
    "igcv2_queue_duration_seconds",
    "Time an image waited in the batch queue.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "igcv2_inference_duration_seconds",
    "Model forward time per batch (copy in, compute, copy out).",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "igcv2_batch_size",
    "Images per batch run by the model (before padding to a bucket).",
    ["model", "version"],
    buckets=batch_buckets(),
)
QUEUE_DEPTH = Gauge(
    "igcv2_queue_depth", "Images waiting in the batch queue.", ["model", "version"], multiprocess_mode="livesum"
)
QUEUE_CAPACITY = Gauge(
    "igcv2_queue_capacity",
    "Bound of the batch queue (max_queue_size).",
    ["model", "version"],
    multiprocess_mode="livesum",
)
MODEL_READY = Gauge(
    "igcv2_model_ready",
    "1 when the model version is loaded and warmed up.",
    ["model", "version"],
    multiprocess_mode="livemin",
)
WARMUP_DURATION = Gauge(
    "igcv2_warmup_duration_seconds",
    "Time spent compiling and warming up every batch bucket.",
    ["model", "version"],
    multiprocess_mode="livemax",
)
DEVICE_MEMORY = Gauge(
    "igcv2_device_memory_bytes", "CUDA memory allocated by the service.", ["device"], multiprocess_mode="livesum"
)
REJECTED = Counter(
    "igcv2_rejected_images",
    "Images refused or dropped before compute, by reason (queue_full, deadline, client_left); a request refused "
    "before its body is read counts as many images as requests lately brought.",
    ["model", "version", "reason"],
)
WORKER_RESTARTS = Counter(
    "igcv2_worker_restarts",
    "Workers started in place of one that died (IGCV2_WORKERS > 1; always 0 with one process).",
)
