"""The house: library layers import downward only (cli -> infer -> train -> models -> data -> util; read -> ingest -> sample ->
blocks), no module imports itself back through others, and inference runs without the training code."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cvfast"
# Higher number = higher layer. Leaves (errors, stats, progress) import no cvfast module and may be imported by anyone.
LAYERS = {"util": -1, "data": 0, "models": 1, "train": 2, "infer": 3, "crossval": 4, "demo": 4, "cli": 5, "__main__": 6}
DATA_LAYERS = {"classes": 0, "datasets": 0, "read": 0, "decode": 0, "manifest": 0, "crop": 0, "convert": 0, "loader": 0, "synth": 1,
               "ingest": 1, "sample": 2, "blocks": 3}
LEAVES = {"errors", "stats", "allocator"}


def _cvfast_imports(path: Path) -> set[str]:
    """Every cvfast module a source file imports, anywhere in it (imports inside functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cvfast"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if (PACKAGE.parent / node.module.replace(".", "/") / a.name).exists()
                    or (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()}  # from cvfast.data import read
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cvfast")}
    return out


def _module(path: Path) -> str:
    return ".".join(("cvfast", *path.relative_to(PACKAGE).with_suffix("").parts))


def _rank(module: str) -> tuple[int, int] | None:
    """(layer, data sub-layer) of a module; None for a leaf or the package itself."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in LEAVES or parts[0] == "__init__":
        return None
    return LAYERS[parts[0]], DATA_LAYERS.get(parts[1], 0) if parts[0] == "data" and len(parts) > 1 else 0


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    mine = _module(path)
    me = _rank(mine)
    for imported in _cvfast_imports(path):
        other = _rank(imported)
        if mine.split(".")[1] in LEAVES:
            assert imported == "cvfast.errors", f"{mine} is a leaf but imports {imported}"
        elif me is not None and other is not None:
            assert other <= me, f"{mine} (layer {me}) imports the higher layer {imported} (layer {other})"


def test_the_layer_map_knows_every_module():
    """A new package or data module must be placed in the map, or the test above would not check it."""
    for path in SOURCES:
        parts = _module(path).split(".")[1:]
        if parts[0] in LEAVES or parts[0] == "__init__":
            continue
        assert parts[0] in LAYERS, f"{path}: not in the layer map"
        if parts[0] == "data" and len(parts) > 1 and parts[1] != "__init__":
            assert parts[1] in DATA_LAYERS, f"{path}: data module not in the data layer map"


def _graph() -> dict[str, set[str]]:
    """Module -> the cvfast modules it imports (a package's import stands for its __init__)."""
    modules = {_module(p).removesuffix(".__init__") for p in SOURCES}
    return {_module(p).removesuffix(".__init__"): {m for m in _cvfast_imports(p) if m in modules} for p in SOURCES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of a module graph (depth-first search), or None."""
    state, path = {}, []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle_anywhere():
    """Not even between modules of one rank, nor hidden by an import inside a function (synth <-> synth_screening was one)."""
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_cycles():
    """The check above finds a planted cycle, and the graph it walks holds the imports it must see."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert "cvfast.data.manifest" in _graph()["cvfast.data.sample"]


def test_inference_imports_no_training_code():
    """Loading and predicting with a model pulls in nothing of cvfast.train (fastai's training machinery stays out)."""
    code = ("import sys, cvfast.infer.predict, cvfast.infer.heatmap, cvfast.infer.review, cvfast.infer.show, cvfast.infer.evaluate; "
            "print(sorted(m for m in sys.modules if m.startswith('cvfast.train')))")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
