"""The project stands on its own: no file cites documents a user cannot open, and every documentation
link (including ``docs/<page>.md#section`` pointers in code comments) resolves to a file and heading
that exist."""

from __future__ import annotations

import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Citations of material outside the repository. Built from pieces so this file does not match itself.
FORBIDDEN = [
    ("section sign", re.compile("\u00a7")),
    ("private notes", re.compile("|".join(re.escape(s) for s in (
        "magi1" + "-spec", "magiattention" + ".md", "kernel" + "-anchors", "ecosystem" + ".md",
        "style" + "-review", "stop" + " note", "shared" + "/docs", "issue" + " text")), re.IGNORECASE)),
    ("path above the repository", re.compile(re.escape("../" + "shared") + "|" + re.escape("/work" + "/"))),
    # a tracker number ("issue" or "issues" followed by a number or #number); not the verb "issues" before a count.
    ("issue number", re.compile(r"\bissues?\s+(?:#\d+|\d+(?![.,]?\d|\s*x\b|x))", re.IGNORECASE)),
]
# Tests may load Triton's tutorial kernels from a configurable location whose default lies next to the
# checkout; that path (and only that path) is allowed.
ALLOWED = re.compile(r"(?:\.\./|/work/)" + "shared" + r"/anchors/triton-tutorials")

TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".yml", ".yaml", ".json", ".h", ".cuh", ".cu",
                 ".cpp", ".c", ".hpp", ".cmake", ".sh", ".rst", ""}
SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".venv", "venv", "out", ".pytest_cache"}


@lru_cache(maxsize=1)
def tracked_files() -> tuple[Path, ...]:
    """``git ls-files`` when this is a git checkout, else every text-like file under the repository."""
    try:
        res = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30)
        names = [n for n in res.stdout.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(root, f), REPO) for f in files]
    out = []
    for n in names:
        p = REPO / n
        if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "CMakeLists.txt"):
            out.append(p)
    return tuple(sorted(out))


def read_text(p: Path) -> str | None:
    data = p.read_bytes()
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def citation_hits(text: str) -> list[tuple[int, str, str]]:
    """(line number, kind, line) of every forbidden citation in ``text``."""
    hits = []
    for i, line in enumerate(text.splitlines(), 1):
        scrubbed = ALLOWED.sub("", line)
        for kind, rx in FORBIDDEN:
            if rx.search(scrubbed):
                hits.append((i, kind, line.strip()))
    return hits


def test_citation_scanner_catches_each_kind():
    bad = ["see spec \u00a74.5", "(magi1" + "-spec 4.3)", "the " + "stop" + " note", "``.." + "/shared/docs/x``",
           "fixed in issue" + " 3", "Issues" + " #12", "see issue" + " 3.", "kernel" + "-anchors 6.1", "ecosystem" + ".md"]
    for line in bad:
        assert citation_hits(line), line
    good = ["docs/magi1.md#attention-windows", "tissue 3", "an issue with 3 tiles",
            "the kernel issues 1.8x the tutorial's instructions", "it issues 2x fewer loads",
            "default ../" + "shared/anchors/triton-tutorials (override with an env var)",
            "or /work" + "/shared/anchors/triton-tutorials/06-fused-attention.py"]
    for line in good:
        assert not citation_hits(line), line


def test_no_citations_of_unavailable_documents():
    files = tracked_files()
    assert len(files) > 50, f"found only {len(files)} files under {REPO}"
    problems = []
    for p in files:
        if p.resolve() == Path(__file__).resolve():
            continue
        text = read_text(p)
        if text is None:
            continue
        problems += [f"{p.relative_to(REPO)}:{i}: {kind}: {line}" for i, kind, line in citation_hits(text)]
    assert not problems, ("cite the project's own docs/ or an upstream file path instead:\n  "
                          + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------
# Links and anchors

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
MD_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOCS_POINTER = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md)(#[A-Za-z0-9_-]+)?")


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def check_target(source: Path, target: str) -> str | None:
    """None if a relative link from ``source`` resolves (file, and heading if given), else the problem."""
    path_part, _, anchor = target.partition("#")
    dest = source if not path_part else (source.parent / path_part).resolve()
    if not dest.exists():
        return f"{target}: no such file {dest}"
    try:
        dest.relative_to(REPO)
    except ValueError:
        return f"{target}: points outside the repository"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: {dest.name} has no heading with anchor #{anchor}"
    return None


def markdown_files() -> list[Path]:
    return [p for p in tracked_files() if p.suffix == ".md"] + \
        [p for p in sorted((REPO / "docs").glob("*.md")) if p not in tracked_files()]


def test_docs_pages_exist():
    pages = ("architecture.md", "attention.md", "distributed.md", "fp8.md", "magi1.md", "planner.md", "testing.md",
             "tiny_model.md")
    for name in ("README.md",) + pages:
        assert (REPO / "docs" / name).is_file(), f"docs/{name} is missing"
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    assert all(f"]({name})" in index for name in pages), "docs/README.md must link every page"


def test_slug_rule():
    assert slug("MAGI-1 static quantization") == "magi-1-static-quantization"
    assert slug("Promotion every 128 of K") == "promotion-every-128-of-k"
    assert slug("The native extension `_C`") == "the-native-extension-_c"
    assert slug("LSE convention and merge_attn_states") == "lse-convention-and-merge_attn_states"


def test_link_checker_rejects_missing_targets():
    readme = REPO / "docs" / "README.md"
    assert check_target(readme, "magi1.md#attention-windows") is None
    assert "no heading" in check_target(readme, "magi1.md#no-such-section")
    assert "no such file" in check_target(readme, "no-such-page.md")
    assert "outside the repository" in check_target(readme, "../..")


def test_relative_links_in_markdown_resolve():
    problems = []
    for md in markdown_files():
        in_fence = False
        for i, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            if FENCE.match(line):
                in_fence = not in_fence
                continue
            if in_fence:
                continue
            for target in MD_LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                why = check_target(md, target)
                if why:
                    problems.append(f"{md.relative_to(REPO)}:{i}: {why}")
    assert not problems, "broken links:\n  " + "\n  ".join(problems)


def test_docs_pointers_in_code_resolve():
    """Comments and docstrings that say ``docs/<page>.md#section`` point at a real page and heading."""
    problems, count = [], 0
    for p in tracked_files():
        if p.suffix == ".md" and p.parent == REPO / "docs":
            continue
        text = read_text(p)
        if text is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            for page, anchor in DOCS_POINTER.findall(line):
                count += 1
                why = check_target(REPO / "docs" / "README.md", page + anchor)
                if why:
                    problems.append(f"{p.relative_to(REPO)}:{i}: docs/{why}")
    assert count > 10, "expected the code to point at docs/ sections"
    assert not problems, "pointers to missing docs sections:\n  " + "\n  ".join(problems)


REPO_PATH = re.compile(r"`((?:magi_kernels|magi_model|csrc|tests|benchmarks|scripts|docs)/[\w./*-]*)")


def test_repository_paths_named_in_docs_exist():
    """A renamed or deleted file must not leave the docs pointing at nothing (globs must match something)."""
    problems, count = [], 0
    for md in sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]:
        for i, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            for raw in REPO_PATH.findall(line):
                path = raw.rstrip(".:,")
                count += 1
                if not any(REPO.glob(path)):
                    problems.append(f"{md.relative_to(REPO)}:{i}: {path}")
    assert count > 20, "expected the docs to name repository files"
    assert not problems, "docs name files that do not exist:\n  " + "\n  ".join(problems)
