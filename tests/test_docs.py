"""The repository carries its own knowledge: every reference in it resolves inside it.

Three checks over README.md and docs/*.md (and, for the third, every text file in
docs/, src/ and tests/):

(a) every code reference -- a code span such as ``nn_core/model/layers.py: linear_forward``,
    ``src/nn_core/storage/checkpoint.py`` or ``nn_core/training/trainer.py:
    Trainer.resume`` -- names an existing file, and the name after the colon is a
    top-level function or class of that file (or ``Class.method``), found by parsing it;
(b) every relative markdown link ``[text](target)`` points at an existing file, and a
    ``#heading`` in it at a heading of that page;
(c) nothing cites the suite's shared contract file or its tracker by number (the
    words are spelled out in ``FORBIDDEN`` below): a clone of this repository has
    neither, so such a reference leads nowhere.

The top-level README.md is checked by ``test_readme_references`` separately.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"
TEXT_SUFFIXES = {".py", ".md", ".json", ".jsonl", ".toml", ".txt", ".cfg", ".ini", ".yml", ""}

# A code reference inside a code span: a path to a .py file (a bare "layers.py" too: it
# must then exist at the root, so a reference has to say where it is), then optionally
# ": name" or ": Class.method" (a call's arguments may follow).
CODE_SPAN = re.compile(r"`([^`]+)`")
FENCED = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.MULTILINE | re.DOTALL)
REFERENCE = re.compile(
    r"^(?P<path>(?:[\w.-]+/)*\w+\.py)(?![\w/])"
    r"(?::\s*(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?))?"
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# built so that this file does not match itself
FORBIDDEN = {
    "the shared contract file": re.compile(r"\bSPEC\b"),
    "the shared folder": re.compile(r"\.\./shared"),
    "an issue by number": re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE),
    "the core one": re.compile(r"\bcore\s+issue\b", re.IGNORECASE),
}


def code_references(text: str) -> list[tuple[str, str | None]]:
    """(path, name or None) of every code reference in the code spans of ``text``."""
    found = []
    for span in CODE_SPAN.findall(FENCED.sub("", text)):  # fences would pair up wrongly
        span = re.sub(r"/\s+", "/", " ".join(span.split()))  # a span may wrap across lines
        match = REFERENCE.match(span)
        if match:
            found.append((match["path"], match["name"]))
    return found


def resolve_path(path: str) -> Path:
    """``nn_core/...`` is relative to src/ (the docs' convention); the rest to the root."""
    return ROOT / "src" / path if path.startswith("nn_core/") else ROOT / path


@cache
def top_level(path: Path) -> dict[str, set[str]]:
    """Top-level functions and classes of ``path`` (assignments too); a class maps to its
    methods and class attributes."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members.update(t.id for t in item.targets if isinstance(t, ast.Name))
            names[node.name] = members
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.Assign):
            names.update({t.id: set() for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
    return names


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page``: lower case, punctuation other
    than - and _ dropped, spaces as -, a repeated one suffixed -1, -2, ..."""
    found: set[str] = set()
    text = FENCED.sub("", page.read_text(encoding="utf-8"))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def reference_errors(doc: Path) -> list[str]:
    """Every code reference or relative link of ``doc`` that does not resolve."""
    text = doc.read_text(encoding="utf-8")
    errors = []
    for path, name in code_references(text):
        file = resolve_path(path)
        if not file.is_file():
            errors.append(f"{path}: no such file")
            continue
        if name is None:
            continue
        head, _, member = name.partition(".")
        names = top_level(file)
        if head not in names:
            errors.append(f"{path}: {name}: no top-level {head} in {path}")
        elif member and member not in names[head]:
            errors.append(f"{path}: {name}: class {head} has no {member}")
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        if target.startswith("#"):
            target = doc.name + target  # an anchor on the same page
        name, _, anchor = target.partition("#")
        file = (doc.parent / name).resolve()
        if not file.exists():
            errors.append(f"link ({target}): no such file")
        elif anchor and file.suffix == ".md" and file.exists() and anchor not in anchors(file):
            errors.append(f"link ({target}): no heading #{anchor} in {name}")
    return errors


def forbidden_mentions(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [
        f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()[:100]}"
        for number, line in enumerate(text.splitlines(), start=1)
        for what, pattern in FORBIDDEN.items()
        if pattern.search(line)
    ]


def text_files() -> list[Path]:
    files = []
    for top in ("docs", "src", "tests"):
        for path in sorted((ROOT / top).rglob("*")):
            generated = any(p == "__pycache__" or p.endswith(".egg-info") for p in path.parts)
            if path.is_file() and path.suffix in TEXT_SUFFIXES and not generated:
                files.append(path)
    return files


# ---- the docs pages -----------------------------------------------------------------------


def test_the_docs_pages_exist() -> None:
    names = {p.name for p in DOCS}
    assert {"README.md", "model.md", "gradients.md", "training.md", "checkpoints.md"} <= names
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in sorted(names - {"README.md"}):
        assert f"]({page})" in index, f"docs/README.md does not link {page}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_references_resolve(doc: Path) -> None:
    """(a) and (b) for one page of docs/."""
    assert reference_errors(doc) == []


def test_the_reference_parser_finds_what_the_docs_write(tmp_path: Path) -> None:
    """The parser is not vacuous: it finds references in the forms the pages use (one
    wrapped across a line, one with call arguments) and rejects each kind of bad one."""
    assert len(code_references((ROOT / "docs" / "checkpoints.md").read_text())) >= 10
    page = tmp_path / "page.md"
    page.write_text(
        "```math\nx = y\n```\n\n"
        "`nn_core/model/layers.py: linear_backward` and `src/nn_core/storage/\n"
        "checkpoint.py: read_state` and `nn_core/training/trainer.py: Trainer.resume(path)`"
        " and [the model](other.md#2-the-section)\n"
    )
    (tmp_path / "other.md").write_text("# Other\n\n## 2. The section\n")
    assert code_references(page.read_text()) == [
        ("nn_core/model/layers.py", "linear_backward"),
        ("src/nn_core/storage/checkpoint.py", "read_state"),
        ("nn_core/training/trainer.py", "Trainer.resume"),
    ]
    assert reference_errors(page) == []
    bad = {
        "`nn_core/layers.py: linear_backward`": "no such file",
        "`layers.py: linear_backward`": "no such file",
        "`nn_core/model/layers.py: linear_backwards`": "no top-level",
        "`nn_core/training/trainer.py: Trainer.restart`": "has no restart",
        "[x](missing.md)": "no such file",
        "[x](other.md#3-the-section)": "no heading",
        "[x](#nowhere)": "no heading",
    }
    for text, message in bad.items():
        page.write_text(text)
        errors = reference_errors(page)
        assert len(errors) == 1 and message in errors[0], (text, errors)


# ---- no reference that leads outside the repository ---------------------------------------


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_repository(path: Path) -> None:
    """(c) for every text file of docs/, src/ and tests/."""
    assert forbidden_mentions(path) == []


def test_forbidden_patterns_catch_each_form() -> None:
    spec, shared, issue = "SP" + "EC.md", "../" + "shared/x", "iss" + "ue"
    mentions = (f"see {spec}", shared, f"as {issue} 6 says", f"{issue.title()} #1", f"core {issue}")
    for text in mentions:
        assert any(p.search(text) for p in FORBIDDEN.values()), text
    for text in ("the spec of safetensors", "issues with numbers", "score issue"):
        assert not any(p.search(text) for p in FORBIDDEN.values()), text


# ---- the top-level README -----------------------------------------------------------------


def test_readme_references() -> None:
    """(a), (b) and (c) for README.md."""
    assert reference_errors(README) + forbidden_mentions(README) == []


def empty_sections(text: str) -> list[str]:
    """Headings with nothing before the next heading of the same or a higher level
    (what a merge leaves when it keeps a heading twice); fenced code is not scanned."""
    found: list[str] = []
    open_heading: tuple[int, str] | None = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#+) ", line)
        if heading:
            level = len(heading.group(1))
            if open_heading and level <= open_heading[0]:
                found.append(open_heading[1])
            open_heading = (level, line)
        elif line.strip() and open_heading:
            open_heading = None
    return found + ([open_heading[1]] if open_heading else [])


def test_no_heading_is_left_empty() -> None:
    assert empty_sections("# A\n\n## B\n### C\n\ntext\n## D\n## E\n\nx\n") == ["## D"]
    for page in [README, *DOCS]:
        assert empty_sections(page.read_text(encoding="utf-8")) == [], page.name
