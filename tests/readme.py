"""The README's code blocks, read from README.md itself, so tests run what users read."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_block(heading: str, readme: Path = README) -> str:
    """The first fenced ```python block under the Markdown heading line ``heading``
    (e.g. "### Weights for PyTorch"), before the next heading; its text, fences dropped.

    Raises AssertionError naming what is missing when the README no longer has it.
    """
    lines = readme.read_text(encoding="utf-8").splitlines()
    assert heading in lines, f"{readme.name} has no heading line {heading!r}"
    block: list[str] | None = None
    for line in lines[lines.index(heading) + 1 :]:
        if block is None:
            if line.startswith("#"):
                break  # the next heading: the section has no python block
            if line.strip() == "```python":
                block = []
        elif line.strip() == "```":
            return "\n".join(block) + "\n"
        else:
            block.append(line)
    raise AssertionError(f"{readme.name}: no complete ```python block under {heading!r}")
