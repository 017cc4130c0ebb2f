"""The house: library layers import downward only (cli -> infer -> train -> models -> data; read -> ingest -> sample -> blocks)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cvfast"
# Higher number = higher layer. Leaves (errors, stats, progress) import no cvfast module and may be imported by anyone.
LAYERS = {"data": 0, "models": 1, "train": 2, "infer": 3, "crossval": 4, "demo": 4, "cli": 5, "__main__": 6}
DATA_LAYERS = {"paths": 0, "read": 0, "decode": 0, "manifest": 0, "crop": 0, "convert": 0, "loader": 0, "synth": 1, "synth_screening": 1,
               "ingest": 1, "sample": 2, "blocks": 3}
LEAVES = {"errors", "stats", "progress", "allocator"}


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
