"""CompileCache: ahead-of-time compiled packages on disk, one folder per key, shared by processes.

Why it is shaped like this:
* An entry is a folder (``package.pt2`` + ``entry.json``) written under a temporary name beside the
  others and renamed into place: a reader (another worker, a replica on a shared volume) sees a whole
  entry or none, never a half-written package.
* ``entry.json`` holds the full key and the package's size and SHA-256. A truncated or corrupted
  package, or an entry written for another key, is found before anything loads it, logged, discarded
  and compiled again; so is an archive holding anything but AOTInductor's own files (its exported
  program or pickled weights: loading an entry never unpickles anything).
* One lock file per key (``flock``): one process compiles a key while the others compile other keys or
  wait for it. The OS releases the lock of a process that dies, so nothing is ever stuck behind it.
* A read-only cache (packages baked into an image, a volume mounted read-only) still serves its hits:
  a miss is compiled into a temporary folder and not kept, with one warning per cache.
* Loading a package runs its native code: the cache folder must be as trusted as the model store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from igcv2.artifact import sha256_file

log = logging.getLogger("igcv2.compile_cache")
PACKAGE_FILE = "package.pt2"
ENTRY_FILE = "entry.json"
# What an AOTInductor package holds (torch/csrc/export/pt2_archive_constants.h), below the archive's root folder.
PACKAGE_MEMBERS = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")
PACKAGE_CODE = "data/aotinductor/"
STALE_TEMP_S = 3600.0  # a temporary folder this old belongs to a writer that died: removed by the next writer
_warned_read_only: set[Path] = set()  # caches this process said it cannot write (once each)


class EntryError(ValueError):
    """A cache entry that must not be loaded; the message says why."""


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the generated code (``fields``), and a readable ``label`` for its folder."""

    label: str  # e.g. igcv2-fashion-v1-b16: a plain name, for people listing the cache
    fields: Mapping[str, Any]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()

    @property
    def name(self) -> str:
        return f"{self.label}-{self.digest[:32]}"


class CompileCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, key: CacheKey) -> Path:
        return self.root / key.name

    @property
    def writable(self) -> bool:
        """Whether entries can be written here (the folder is created if it can be)."""
        with contextlib.suppress(OSError):
            self.root.mkdir(parents=True, exist_ok=True)
        return self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)

    def lookup(self, key: CacheKey) -> Path | None:
        """The package stored for ``key``, checked against its entry; None on a miss. A bad entry is
        discarded (logged) and reads as a miss."""
        folder = self.entry(key)
        if not folder.exists():
            return None
        try:
            return verified(folder, key)
        except EntryError as exc:
            self.discard(key, str(exc))
            return None

    @contextlib.contextmanager
    def workspace(self, key: CacheKey) -> Iterator[Path]:
        """A new folder to compile ``key``'s package into (as ``PACKAGE_FILE``): a temporary entry in the
        cache, which :meth:`store` renames into place, or one in /tmp when the cache is read-only."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f".tmp-{key.name}-", dir=self.root))
        except OSError as exc:
            self.warn_read_only(exc)
            folder = Path(tempfile.mkdtemp(prefix="igcv2-aot-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # nothing left once stored

    def store(self, key: CacheKey, workspace: Path, **info: Any) -> Path | None:
        """Put the package compiled in ``workspace`` (from :meth:`workspace`) in place for ``key``: its
        stored path, or None where the cache cannot keep it (the package stays in ``workspace`` until
        that is left). An entry another process stored first is kept, and returned instead."""
        if workspace.parent != self.root:
            return None  # read-only: warned when the workspace was made
        final = self.entry(key)
        try:
            package = workspace / PACKAGE_FILE
            entry = {"key": dict(key.fields), "size": package.stat().st_size, "sha256": sha256_file(package)}
            (workspace / ENTRY_FILE).write_text(json.dumps(entry | info, indent=2, sort_keys=True) + "\n")
            workspace.chmod(0o755)  # mkdtemp's 0700 would hide the entry from other users of a shared cache
            try:
                workspace.rename(final)
            except OSError:  # another process stored this key first (a folder is never renamed over a full one)
                if not final.is_dir():
                    raise
                return self.lookup(key)  # theirs, checked; None if bad (then ours, still in the workspace, serves)
        except OSError as exc:
            self.warn_read_only(exc)
            return None
        self._remove_stale_temporaries()
        return final / PACKAGE_FILE

    def discard(self, key: CacheKey, reason: str) -> None:
        """Take a bad entry out of the cache: renamed aside first, so no reader finds it half-deleted."""
        log.warning("compile cache: discarding %s: %s", self.entry(key), reason)
        aside = self.root / f".discarded-{key.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            self.entry(key).rename(aside)
        except FileNotFoundError:  # another process discarded it first
            return
        except OSError as exc:
            self.warn_read_only(exc)
            return
        shutil.rmtree(aside, ignore_errors=True)

    @contextlib.contextmanager
    def claim(self, key: CacheKey) -> Iterator[bool]:
        """Hold ``key``'s lock while the block runs, if no other process (or runner) holds it: yields
        whether this caller has it. A read-only cache has no locks: every caller has every key."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / f"{key.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            yield True
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def warn_read_only(self, exc: OSError | None = None) -> None:
        """Say once that this cache cannot keep packages (``exc``: what writing it answered)."""
        if self.root not in _warned_read_only:
            _warned_read_only.add(self.root)
            log.warning(
                "compile cache %s is read-only%s: packages it lacks are compiled at every start and not kept",
                self.root,
                f" ({exc.strerror or exc})" if exc else "",
            )

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for path in self.root.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_TEMP_S:
                    shutil.rmtree(path, ignore_errors=True)


def verified(folder: Path, key: CacheKey) -> Path:
    """The package in ``folder`` if its entry describes it and ``key`` exactly; EntryError otherwise."""
    try:
        entry = json.loads((folder / ENTRY_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise EntryError(f"unreadable {ENTRY_FILE}: {exc}") from None
    if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(dict(key.fields))):
        raise EntryError("written for another key")
    package = folder / PACKAGE_FILE
    try:
        size, digest = package.stat().st_size, sha256_file(package)
    except OSError as exc:
        raise EntryError(f"unreadable package: {exc}") from None
    if size != entry.get("size") or digest != entry.get("sha256"):
        raise EntryError(f"package is not the one written ({size} bytes, sha256 {digest[:16]}...)")
    check_members(package)
    return package


def check_members(package: Path) -> None:
    """Refuse an archive holding anything but AOTInductor's compiled model: torch's loader would
    deserialise an exported program or weights (pickles) found beside it."""
    try:
        with zipfile.ZipFile(package) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise EntryError(f"not a package: {exc}") from None
    for name in names:
        inner = PurePosixPath(*PurePosixPath(name).parts[1:]).as_posix()  # below the archive's root folder
        if inner not in PACKAGE_MEMBERS and not inner.startswith(PACKAGE_CODE):
            raise EntryError(f"unexpected member {name!r} in the package")
