"""The layout's rules (DESIGN.md), read from the source with ast: dependencies point one way, no import cycle (also
through imports inside functions), no module imports another's private names, models/ knows no Ray or MLflow, and
nothing but the command line and the demo imports serving/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipelines", "tuning", "serving")


def _imports() -> dict[str, list[tuple[str, str | None]]]:
    """module -> [(imported module, imported name or None)], every import statement of the file."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).glob("*.py")):
            found = []
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found += [(node.module, a.name) for a in node.names]
                elif isinstance(node, ast.Import):
                    found += [(a.name, None) for a in node.names]
            out[f"{pkg}.{f.stem}"] = found
    return out


def _edges(imports: dict) -> dict[str, set[str]]:
    edges = {m: set() for m in imports}
    for m, found in imports.items():
        for module, name in found:
            for target in (module, f"{module}.{name}"):
                if target in imports and target != m:
                    edges[m].add(target)
    return edges


def test_no_import_cycle():
    edges, state, cycles = _edges(_imports()), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_dependencies_point_one_way():
    imports = _imports()
    private = [(m, mod, n) for m, found in imports.items() for mod, n in found
               if n and n.startswith("_") and mod.split(".")[0] in PACKAGES and mod != m]
    assert not private, f"imports of another module's private names: {private}"
    core = [(m, mod) for m, found in imports.items() if m.startswith("models.") for mod, _ in found
            if mod.split(".")[0] in ("pipelines", "tuning", "serving", "ray", "mlflow", "pyarrow", "fsspec", "s3fs",
                                     "boto3")]
    assert not core, f"models/ is pure PyTorch + diffusers: {core}"
    serving = sorted(m for m, found in imports.items() if not m.startswith("serving.")
                     and any(mod.split(".")[0] == "serving" for mod, _ in found))
    assert serving == ["pipelines.cli", "pipelines.demo"], serving  # (both import it inside a function)
