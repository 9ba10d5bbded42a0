"""Per model version inference statistics, counted the way Triton's statistics extension reports them.

Prometheus histograms (service.metrics) are what dashboards use; this is the per-process ledger
behind ``GET /v2/models/{name}/stats``, for tools written against Triton (perf_analyzer reads it
to split server-side latency into queue and compute). Everything is updated and read on the event
loop, so it needs no lock.

Counting, as Triton does: ``success``/``fail`` count requests (one ``submit`` to the batcher, any
number of images) with their durations from queueing to result; ``queue`` and ``compute_infer``
count successful requests; ``inference_count`` counts images and ``execution_count`` batches
(model executions); ``batch_stats`` has one row per batch size executed. A request whose images
ran in several batches is charged its longest queue wait and the sum of those batches' times.
The runner copies in, computes and copies out in one call, so ``compute_input`` and
``compute_output`` are folded into ``compute_infer`` (reported with zero time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * 1e9))

    def triton(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class InferenceStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)

    def record_batch(self, size: int, seconds: float) -> None:
        """One model execution of ``size`` images that took ``seconds``."""
        self.execution_count += 1
        self.inference_count += size
        self.batches.setdefault(size, Duration()).add(seconds)
        self.last_inference_ms = int(time.time() * 1000)

    def record_success(self, total_s: float, queue_s: float, compute_s: float) -> None:
        self.success.add(total_s)
        self.queue.add(queue_s)
        self.compute_infer.add(compute_s)

    def record_failure(self, total_s: float) -> None:
        self.fail.add(total_s)

    def triton(self, name: str, version: int) -> dict[str, Any]:
        """One ``model_stats`` entry of Triton's statistics response."""
        zero = {"count": 0, "ns": 0}
        return {
            "name": name,
            "version": str(version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.triton(),
                "fail": self.fail.triton(),
                "queue": self.queue.triton(),
                "compute_input": {"count": self.compute_infer.count, "ns": 0},
                "compute_infer": self.compute_infer.triton(),
                "compute_output": {"count": self.compute_infer.count, "ns": 0},
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": d.count, "ns": 0},
                    "compute_infer": d.triton(),
                    "compute_output": {"count": d.count, "ns": 0},
                }
                for size, d in sorted(self.batches.items())
            ],
        }
