"""The package layout is the architecture: imports flow one way, and never in a cycle.

Every import in src/nn_core is parsed (module-level and function-level ones alike,
``TYPE_CHECKING`` blocks included) and resolved to the nn-core module it names. Each
module belongs to a layer; a module may import its own package and any layer below
it, never one above. Separately, the module graph must have no cycle at all, inside a
package too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "nn_core"

# Lowest first. A module may import modules of its own package and of any lower layer,
# never of a higher layer or of another package of its own layer.
LAYERS: list[tuple[str, ...]] = [
    ("nn_core.errors", "nn_core.version"),  # the base: error types, the version
    ("nn_core.checks",),  # argument checks every layer shares
    ("nn_core.model", "nn_core.data"),  # the model core; tokenizers and datasets
    ("nn_core.storage", "nn_core.inference"),  # checkpoints and weights; sampling, generation
    ("nn_core.training",),  # trainer, optimizer, kernels, distributed training
    ("nn_core.bench",),  # the benchmark, which uses the library as a user does
    ("nn_core.app",),  # the command line and batch jobs
    # the package's public face: __init__, __main__ and the kept public module names
    ("nn_core", "nn_core.__main__", "nn_core.generate", "nn_core.batch"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The nn-core modules that ``path`` imports (resolved; ``from x import y`` counts as
    x.y when that is a module, else x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [
                f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import nn_core.x.y.z of an attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the package that owns ``module``) by the longest matching prefix."""
    best = (-1, "")
    for i, group in enumerate(LAYERS):
        for pkg in group:
            if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > len(best[1]):
                best = (i, pkg)
    if best[0] < 0:
        raise AssertionError(f"module {module} is in no layer of LAYERS")
    return best


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) for name, path in mods.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_imports_point_down_the_layers() -> None:
    bad = []
    for src, targets in graph().items():
        src_layer, src_pkg = layer_of(src)
        for dst in sorted(targets):
            dst_layer, dst_pkg = layer_of(dst)
            if dst_layer > src_layer or (dst_layer == src_layer and dst_pkg != src_pkg):
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports that point up (or sideways) the layers:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    g = graph()
    # package __init__ files re-export their members: an edge into a package's own
    # __init__ from inside it is not a dependency cycle of the design
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if node.startswith(nxt + "."):  # a module importing its own package's __init__
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_model_core_imports_only_the_base() -> None:
    for src, targets in graph().items():
        if src == "nn_core.model" or src.startswith("nn_core.model."):
            outside = sorted(
                t for t in targets if layer_of(t)[0] > 1 and not t.startswith("nn_core.model")
            )
            assert not outside, f"{src} imports {outside}"


@pytest.mark.parametrize("source", ["import nn_core.model.layers", "from ..model import layers"])
def test_the_parser_sees_import_forms(source: str, tmp_path: Path) -> None:
    """The checker itself: both import forms resolve to the module they name."""
    known = {"nn_core.model", "nn_core.model.layers", "nn_core.storage", "nn_core.storage.x"}
    fake = tmp_path / "src" / "nn_core" / "storage" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"def f():\n    {source}\n")
    global SRC
    saved, SRC = SRC, tmp_path / "src"
    try:
        assert imports_of(fake, known) == {"nn_core.model.layers"}
    finally:
        SRC = saved


def _modules_after(code: str) -> set[str]:
    """The nn_core modules a fresh interpreter has loaded after running ``code``."""
    import subprocess
    import sys

    show = "import sys; print(' '.join(m for m in sys.modules if m.startswith('nn_core')))"
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\n{show}"], capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_imports_load_only_what_is_used() -> None:
    """``import nn_core`` loads no layer; the model loads only the core; the command line
    loads only the subcommand it runs; every public name still resolves."""
    assert _modules_after("import nn_core") <= {"nn_core", "nn_core.errors", "nn_core.version"}
    model = _modules_after("from nn_core import MoETransformer")
    assert {layer_of(m)[1] for m in model} <= {"nn_core", *LAYERS[0], *LAYERS[1], "nn_core.model"}
    bench = _modules_after("from nn_core.app.cli import build_parser; build_parser(['bench'])")
    unused = ("nn_core.training", "nn_core.data", "nn_core.storage")
    assert not any(m.startswith(unused) for m in bench)
    assert "nn_core.app.commands.train" not in bench
    every = _modules_after(
        "import nn_core\nfor name in nn_core.__all__: getattr(nn_core, name)\n"
        "from nn_core.app.cli import build_parser; build_parser([])"
    )
    assert "nn_core.training.trainer" in every and "nn_core.app.commands.train" in every
