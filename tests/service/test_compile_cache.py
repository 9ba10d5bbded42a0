"""CompileCache on a real file system: hits, misses, atomic writes by racing processes, bad entries
discarded, per-key locks across processes, and a cache that cannot be written.

The packages here are small zip archives laid out as AOTInductor's (what the cache checks of them);
tests/service/test_aot.py stores and loads real compiled packages."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from read_only import read_only

from service.compile_cache import ENTRY_FILE, PACKAGE_FILE, STALE_TEMP_S, CacheKey, CompileCache

ROOT = Path(__file__).resolve().parents[2]
KEY = CacheKey("tiny-v1-b4", {"weights_sha256": "ab" * 32, "bucket": 4, "torch": "2.13.0"})


def write_package(path: Path, payload: bytes = b"\x7fELF" + bytes(range(256)) * 64, extra: str | None = None) -> None:
    """A zip laid out as AOTInductor's packages are (root folder, data/aotinductor/model/...)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("package/archive_format", "pt2")
        archive.writestr("package/archive_version", "0")
        archive.writestr("package/data/aotinductor/model/model.wrapper.so", payload)
        if extra:
            archive.writestr(extra, b"\x80\x04N.")  # a pickle of None


def stored(cache: CompileCache, key: CacheKey = KEY, **package: object) -> Path:
    with cache.workspace(key) as workspace:
        write_package(workspace / PACKAGE_FILE, **package)  # type: ignore[arg-type]
        path = cache.store(key, workspace, compile_s=1.5)
    assert path is not None
    return path


def test_miss_then_hit(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path / "cache")
    assert cache.lookup(KEY) is None
    path = stored(cache)
    assert path == cache.entry(KEY) / PACKAGE_FILE and cache.lookup(KEY) == path
    entry = json.loads((cache.entry(KEY) / ENTRY_FILE).read_text())
    assert entry["key"] == dict(KEY.fields) and entry["compile_s"] == 1.5 and entry["size"] == path.stat().st_size
    assert sorted(p.name for p in cache.root.iterdir() if not p.name.endswith(".lock")) == [KEY.name]


@pytest.mark.parametrize("field", ["weights_sha256", "bucket", "torch"])
def test_any_other_key_field_misses(tmp_path: Path, field: str) -> None:
    cache = CompileCache(tmp_path)
    stored(cache)
    other = CacheKey(KEY.label, {**KEY.fields, field: "something else"})
    assert other.name != KEY.name and cache.lookup(other) is None
    assert cache.lookup(KEY) is not None


def truncate(package: Path) -> None:
    package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])


def flip_a_byte(package: Path) -> None:
    data = bytearray(package.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the shared library: the zip still opens
    package.write_bytes(bytes(data))


def garble_entry(package: Path) -> None:
    (package.parent / ENTRY_FILE).write_text("{not json")


def entry_for_another_key(package: Path) -> None:
    entry_file = package.parent / ENTRY_FILE
    entry = json.loads(entry_file.read_text())
    entry["key"]["weights_sha256"] = "cd" * 32
    entry_file.write_text(json.dumps(entry))


def remove_package(package: Path) -> None:
    package.unlink()


@pytest.mark.parametrize(
    "damage", [truncate, flip_a_byte, garble_entry, entry_for_another_key, remove_package], ids=lambda f: f.__name__
)
def test_a_bad_entry_is_logged_discarded_and_missed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object
) -> None:
    cache = CompileCache(tmp_path)
    damage(stored(cache))  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="igcv2.compile_cache"):
        assert cache.lookup(KEY) is None
    assert [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()], caplog.text
    assert not cache.entry(KEY).exists() and not list(tmp_path.glob(".discarded-*"))
    assert stored(cache) == cache.lookup(KEY)  # the next compile's package takes its place


def test_an_archive_with_anything_but_compiled_code_is_refused(tmp_path: Path) -> None:
    """torch's loader would deserialise an exported program (and its pickled weights) found in the archive."""
    cache = CompileCache(tmp_path)
    stored(cache, extra="package/models/model.json")
    assert cache.lookup(KEY) is None and not cache.entry(KEY).exists()


def test_an_entry_stored_first_by_another_process_is_kept(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    first = stored(cache, payload=b"first")
    second = stored(cache, payload=b"second")
    assert second == first
    with zipfile.ZipFile(first) as archive:
        assert archive.read("package/data/aotinductor/model/model.wrapper.so") == b"first"
    assert not list(tmp_path.glob(".tmp-*")), "the loser's workspace is gone"


def test_stale_workspaces_of_dead_writers_are_removed_by_the_next_store(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    stale, fresh = tmp_path / ".tmp-dead-writer", tmp_path / ".tmp-busy-writer"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / PACKAGE_FILE).write_bytes(b"half")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    stored(cache)
    assert not stale.exists() and fresh.exists()


RACER = textwrap.dedent(
    """
    import sys, zipfile
    from pathlib import Path
    from service.compile_cache import CacheKey, CompileCache, PACKAGE_FILE
    cache, name = CompileCache(Path(sys.argv[1])), sys.argv[2]
    for i in range(int(sys.argv[3])):
        key = CacheKey(f"race-b{i}", {"bucket": i})
        with cache.workspace(key) as workspace:
            with zipfile.ZipFile(workspace / PACKAGE_FILE, "w") as archive:
                archive.writestr("p/data/aotinductor/model/m.so", (name * 200_000).encode())
            cache.store(key, workspace)
    """
)


def test_processes_storing_the_same_keys_at_once_never_expose_half_a_package(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two writers race on every key while this process reads: a reader finds a whole, checked entry
    or none (a half-written one would be logged and discarded), and one whole entry per key remains."""
    keys = 40
    cache = CompileCache(tmp_path)
    writers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), name, str(keys)], cwd=ROOT) for name in "AB"
    ]
    seen: set[int] = set()
    with caplog.at_level(logging.WARNING, logger="igcv2.compile_cache"):
        while any(w.poll() is None for w in writers):
            seen |= {i for i in range(keys) if cache.lookup(CacheKey(f"race-b{i}", {"bucket": i})) is not None}
    assert [w.wait() for w in writers] == [0, 0]
    assert not caplog.records, caplog.text
    assert seen, "the reader never overlapped the writers"
    for i in range(keys):
        with zipfile.ZipFile(cache.lookup(CacheKey(f"race-b{i}", {"bucket": i})) or "") as archive:
            assert archive.read("p/data/aotinductor/model/m.so") in (b"A" * 200_000, b"B" * 200_000)
    assert not list(tmp_path.glob(".tmp-*"))


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from service.compile_cache import CacheKey, CompileCache
    with CompileCache(Path(sys.argv[1])).claim(CacheKey("tiny-v1-b4", {"bucket": 4})) as mine:
        print("holding" if mine else "refused", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def test_a_key_claimed_by_another_process_is_refused_until_it_lets_go(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    key = CacheKey("tiny-v1-b4", {"bucket": 4})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "1.5"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with cache.claim(key) as mine:
            assert mine is False
        with cache.claim(CacheKey("tiny-v1-b8", {"bucket": 8})) as other:
            assert other is True  # other keys are free meanwhile
    finally:
        holder.wait()
    with cache.claim(key) as mine:
        assert mine is True


def test_a_process_that_dies_holding_a_key_lets_it_go(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "60"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    holder.kill()
    holder.wait()
    with CompileCache(tmp_path).claim(CacheKey("tiny-v1-b4", {"bucket": 4})) as mine:
        assert mine is True


READER = textwrap.dedent(
    """
    import logging, sys, zipfile
    from pathlib import Path
    from service.compile_cache import CacheKey, CompileCache, PACKAGE_FILE
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cache = CompileCache(Path(sys.argv[1]))
    print("writable", cache.writable)
    print("hit", cache.lookup(CacheKey("tiny-v1-b4", {"bucket": 4})) is not None)
    for i in range(3):
        key = CacheKey(f"tiny-v1-b{i}", {"bucket": i})
        with cache.workspace(key) as workspace, cache.claim(key) as mine:
            with zipfile.ZipFile(workspace / PACKAGE_FILE, "w") as archive:
                archive.writestr("p/data/aotinductor/model/m.so", b"x")
            print("claimed", mine, "stored", cache.store(key, workspace), "compiled in", workspace.parent)
    """
)


def test_a_read_only_cache_serves_hits_and_warns_once_about_what_it_cannot_keep(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path / "cache")
    stored(cache, CacheKey("tiny-v1-b4", {"bucket": 4}))
    before = sorted(p.name for p in cache.root.iterdir())
    command = read_only(cache.root, [sys.executable, "-c", READER, str(cache.root)])
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:2] == ["writable False", "hit True"], run.stdout
    assert [line.split(" compiled in ")[0] for line in lines[2:]] == ["claimed True stored None"] * 3
    assert all(not line.endswith(str(cache.root)) for line in lines[2:]), "compiled outside the cache"
    warnings = [line for line in run.stderr.splitlines() if "read-only" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], run.stderr
    assert sorted(p.name for p in cache.root.iterdir()) == before
