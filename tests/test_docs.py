"""The Markdown documentation: every relative link and anchor resolves, the README stays short, and
docs/settings.md lists every setting of service/config.py with its default and description.

``python tests/test_docs.py`` prints the settings table that docs/settings.md must hold."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script too; the worktree's service, not an installed one

from service.config import Settings, env_name  # noqa: E402

SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache", "out"}
SETTINGS_PAGE = ROOT / "docs" / "settings.md"
README_MAX_LINES = 200

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
# [text](target) or [text](target "title"); images too. Nested brackets in the text are not used here.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).+?\1")


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository, outside virtual environments, caches and git's own."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIP_DIRS and not d.startswith((".venv", "wt-"))]
        found += [Path(folder) / name for name in files if name.endswith(".md")]
    return sorted(found)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker[0] * len(marker)
            elif marker.startswith(fence):
                fence = None
            continue
        if fence is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower-case, punctuation but '-' and '_' removed,
    spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_' of any script
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link that is not to another site or an e-mail address."""
    text = path.read_text()
    kept = dict(prose_lines(text))  # fenced code blanked out, so line numbers stay those of the file
    prose = "\n".join(kept.get(n, "") for n in range(1, len(text.splitlines()) + 1))
    prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), prose)  # `[not](a link)`
    links = []
    for match in LINK.finditer(prose):  # a link's text may wrap onto the next line
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        links.append((prose.count("\n", 0, match.start()) + 1, target))
    return links


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {resolved.relative_to(ROOT)}")
        elif anchor and resolved.suffix != ".md":
            problems.append(f"{where}: an anchor into a file that is not Markdown")
    return problems


def test_the_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "docs/index.md", "docs/settings.md", "benchmarks/RESULTS.md"} <= names
    assert not any(name.startswith(".venv") for name in names)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_every_docs_page_is_reachable_from_the_readme():
    """Each page under docs/ is linked from the README or from docs/index.md, which the README links."""
    linked = set()
    for source in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        for _, target in relative_links(source):
            linked.add((source.parent / target.partition("#")[0]).resolve())
    assert (ROOT / "docs" / "index.md").resolve() in linked
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == []


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines: move reference material to docs/"


# --- the checker itself: a broken link or anchor must be reported ------------------------------------


def test_a_broken_link_or_anchor_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Over gRPC (v2)\n\n## Notes\n\n## Notes\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok](docs/page.md#over-grpc-v2) [ok](docs/page.md#notes-1) [ok](#top)\n"
        "[web](https://example.com/x#y) [mail](mailto:a@b.c) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#notes-2) [a wrapped\nlink](docs/wrapped.md)\n"
        "# Top\n"
    )
    problems = broken_links(tmp_path / "README.md")
    assert [p.split(": ")[:2] for p in problems] == [
        ["README.md:6", "docs/missing.md"],
        ["README.md:6", "docs/page.md#notes-2"],
        ["README.md:6", "docs/wrapped.md"],
    ]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Several workers (`IGCV2_WORKERS`)", "several-workers-igcv2_workers"),
        ("Open Inference Protocol (KServe v2 / Triton HTTP)", "open-inference-protocol-kserve-v2--triton-http"),
        ("Start to `/health/ready`", "start-to-healthready"),
        ("Run K: batches formed on the inference thread, 2026-11-26 (latest full run)", None),
    ],
)
def test_slugs_follow_github(heading, anchor):
    if anchor is None:  # punctuation dropped, each space a hyphen
        anchor = "run-k-batches-formed-on-the-inference-thread-2026-11-26-latest-full-run"
    assert slug(heading) == anchor


# --- docs/settings.md --------------------------------------------------------------------------------


def default_text(name: str) -> str:
    field = Settings.model_fields[name]
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if value == []:
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"{value:,}" if isinstance(value, int) and value >= 10_000 else f"{value:g}"
    return f"`{value}`"


def settings_rows() -> list[str]:
    """One table row per field of Settings, in the order config.py declares them."""
    rows = []
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("<", "&lt;")  # <name> is no tag
        rows.append(f"| `{env_name(name)}` | {default_text(name)} | {description} |")
    return rows


def settings_table() -> str:
    return "\n".join(["| variable | default | what it does |", "|---|---|---|", *settings_rows()])


def test_settings_page_lists_every_setting():
    text = SETTINGS_PAGE.read_text()
    stale = [row for row in settings_rows() if row not in text.splitlines()]
    assert stale == [], "docs/settings.md is out of date: replace its table with `python tests/test_docs.py`"


def test_settings_page_names_no_setting_that_does_not_exist():
    known = {env_name(name) for name in Settings.model_fields}
    named = set(re.findall(r"\bIGCV2_[A-Z0-9_]+\b", SETTINGS_PAGE.read_text()))
    assert named - known == set()


if __name__ == "__main__":
    print(settings_table())
