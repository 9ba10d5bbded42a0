"""Run a command where a folder is read-only, as a read-only volume or a baked-in image layer is."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def read_only(folder: Path, command: list[str]) -> list[str]:
    """``command``, changed to run where ``folder`` is read-only. Root writes through any permission
    bits, so for root: a read-only bind mount in a private mount namespace (nothing outside the child
    sees it; skipped where root may not make one)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return command
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"root without a private mount namespace (unshare: {probe.stderr.decode().strip()})")
    mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(folder), *command]
