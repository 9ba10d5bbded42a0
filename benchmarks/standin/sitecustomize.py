"""A stand-in device, for GPU-shaped costs without a GPU (benchmarks only; put this folder on PYTHONPATH).

With ``STANDIN_DEVICE_MS="A,B"`` in the environment, every model call of every server process
(``service.runtime.ModelRunner.predict``, warm-up included) computes nothing and takes ``A + B * bucket``
milliseconds on one device that the processes share:

* the cost barely grows with the batch, as on a large GPU (an H200-like flat cost: ``A = 1``, ``B = 0.02``);
* the call releases the GIL (it sleeps), as a device call does;
* one call at a time, whichever process makes it (an ``flock`` on ``STANDIN_DEVICE_FILE``), as CUDA contexts
  time-slice one GPU: copies of the service side by side take turns, they do not add devices.

The file also keeps the device's busy seconds so far (a float64 at offset 0, updated under the lock): the
benchmark reads it to report the share of time the device computed. The patch is made when
``service.runtime`` is first imported, so a process that never imports it (a front-end) is untouched; it
works on any checkout of the service whose runner has ``predict(images)``, old designs included.
"""

from __future__ import annotations

import fcntl
import importlib.abc
import importlib.machinery
import os
import struct
import sys
import time
from types import ModuleType
from typing import Any

BUSY = struct.Struct("<d")


def _patch(runtime: ModuleType) -> None:
    a_ms, b_ms = (float(x) for x in os.environ["STANDIN_DEVICE_MS"].split(","))
    device = os.open(os.environ["STANDIN_DEVICE_FILE"], os.O_RDWR | os.O_CREAT, 0o600)
    import numpy as np

    def predict(self: Any, images: list[Any]) -> Any:
        bucket = self.bucket(len(images))
        fcntl.flock(device, fcntl.LOCK_EX)
        try:
            started = time.perf_counter()
            time.sleep((a_ms + b_ms * bucket) / 1000)
            busy = os.pread(device, BUSY.size, 0)
            total = (BUSY.unpack(busy)[0] if len(busy) == BUSY.size else 0.0) + time.perf_counter() - started
            os.pwrite(device, BUSY.pack(total), 0)
        finally:
            fcntl.flock(device, fcntl.LOCK_UN)
        return np.zeros((len(images), self.num_classes), np.float32)

    runtime.ModelRunner.predict = predict


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "service.runtime":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if os.environ.get("STANDIN_DEVICE_MS"):
    sys.meta_path.insert(0, _PatchOnImport())
