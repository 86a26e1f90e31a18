"""The documentation is self-contained and its links hold: every relative link in README.md,
docs/*.md and benchmarks/*.md names a file inside the repository (and, with a ``#fragment``
into a Markdown file, one of its headings); no link is absolute or leaves the repository, and
no file of the repository points into the directories around it (``../shared``, ``/work/...``).
Plus the facts docs/architecture.md promises to keep in step with the code."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted({ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md")})
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# What the repository ships and edits (generated or installed trees are not looked at).
SOURCE_DIRS = ("docs", "benchmarks", "wsmanager", "csrc", "examples", "tests", "fuzz", "tools", ".ci")
SOURCE_FILES = ("README.md", "Makefile", "setup.py", "pyproject.toml", "MANIFEST.in")
TEXT_SUFFIXES = {".md", ".py", ".pyi", ".c", ".h", ".js", ".mjs", ".html", ".toml", ".cfg",
                 ".txt", ".sh", ".in", ".yml", ".yaml", ".json", ""}
SKIP_PARTS = {"__pycache__", "build", "results", "corpus", "node_modules"}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans (a link there is not a link)."""
    return CODE_SPAN.sub("code", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    text = prose(path.read_text(encoding="utf-8"))
    return [m.group(1) for rx in (INLINE_LINK, REFERENCE_DEF, HTML_LINK) for m in rx.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(CODE_SPAN.sub(lambda c: c.group(0).strip("`"), m.group(1)))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_documents_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "docs/architecture.md", "benchmarks/README.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_resolves_inside_the_repository(doc: Path):
    problems = []
    for target in links(doc):
        if SCHEME.match(target):
            if target.lower().startswith("file:"):
                problems.append(f"{target}: a file: URL")
            continue  # http(s), mailto: not ours to check
        path_part, _, fragment = target.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{target}: absolute path")
            continue
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        if resolved != ROOT and ROOT not in resolved.parents:
            problems.append(f"{target}: outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{target}: no such file")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert problems == [], f"{doc.relative_to(ROOT)}: " + "; ".join(problems)


def source_files() -> list[Path]:
    files = [ROOT / name for name in SOURCE_FILES if (ROOT / name).is_file()]
    for top in SOURCE_DIRS:
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and not SKIP_PARTS & set(path.parts):
                files.append(path)
    return files


OUTSIDE = re.compile(r"\.\./shared\b|/work/(?:shared|main)\b|shared/DESIGN\.md")


def test_no_file_points_outside_the_repository():
    me = Path(__file__).resolve()
    offenders = []
    for path in source_files():
        if path.resolve() == me:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert offenders == []


def test_the_link_checker_catches_what_it_must(tmp_path):
    """The checks above on a document that breaks each rule (guards the regular expressions)."""
    doc = tmp_path / "x.md"
    doc.write_text("[a](../shared/DESIGN.md) [b](/etc/passwd) ![c](img.png \"t\")\n"
                   "[d]: docs/x.md\n<a href=\"y.md#h\">e</a> `[not](a-link.md)`\n"
                   "```\n[nor](this.md)\n```\n## The `h` heading\n")
    assert links(doc) == ["../shared/DESIGN.md", "/etc/passwd", "img.png", "docs/x.md", "y.md#h"]
    assert anchors(doc) == {"the-h-heading"}
    assert slug("8. Performance targets") == "8-performance-targets"
    assert slug("The JS client: `wsmanager.js`") == "the-js-client-wsmanagerjs"


# ------------------------------------------------------------------ facts kept in step

def test_architecture_names_the_disconnect_reasons_the_extension_exports():
    from wsmanager import _core

    row = next(line for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines()
               if line.startswith("| disconnect reasons"))
    first_cell = row.split("|")[1]
    assert tuple(re.findall(r"`(\w+)`", first_cell)) == tuple(_core.REASONS)


def test_architecture_covers_every_source_file():
    """Each C and Python source file of the package appears in the layer table (a new file
    gets a line there)."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    named = set(re.findall(r"\]\(\.\./((?:csrc|wsmanager)/[\w/]+\.(?:c|h|py|pyi))\)", text))
    files = {p.relative_to(ROOT).as_posix() for p in (*ROOT.glob("csrc/*.[ch]"),
                                                      *ROOT.glob("wsmanager/**/*.py"),
                                                      *ROOT.glob("wsmanager/*.pyi"))}
    files.discard("wsmanager/__init__.py")  # the package: imports, ws_manager
    assert sorted(files - named) == []
