"""Benchmarks of the IGCV2 inference service: in-process ceiling, HTTP load sweeps, overload, soak.

The HTTP load comes from Debian's ``hey`` (Go) so the load generator takes little of the CPU the
server is measured on; Python only orchestrates, scrapes ``/metrics`` and analyses.
Entry point: ``python -m benchmarks.run --help``.
"""
