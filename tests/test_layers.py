"""The import structure: algorithm packages import only downward, stages sit on top, no cycles.

Read straight from the source with `ast` (every import, module-level or inside a function, counts), so the
structure described in CONTRIBUTING.md cannot drift back without this test failing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "frugalseg"

# Layers, bottom to top. A module may import its own package and anything in a lower layer; modules of
# different packages in one layer (weak, semi: methods) never import each other.
LAYERS: list[set[str]] = [
    {"", "errors", "cpu_allocator"},
    {"data"},
    {"metrics", "surface_metrics", "losses"},
    {"models"},
    {"inference", "export"},
    {"evaluation"},
    {"weak", "semi", "active", "synth", "selfsup"},
    {"report"},
    {"runs"},
    {"stages"},
    {"cli"},
]
# Third-party frameworks only the stages (and the CLI) may use.
STAGE_ONLY_EXTERNAL = {"lightning", "pytorch_lightning", "click"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    return module.split(".")[0] if module else ""


def _layer(module: str) -> int:
    pkg = _package(module)
    for i, layer in enumerate(LAYERS):
        if pkg in layer:
            return i
    raise AssertionError(f"frugalseg.{module}: package '{pkg}' is in no layer of tests/test_layers.py; add it.")


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported name without 'frugalseg.' or with '!' for externals, inside a function?, line)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        local, type_only, q = False, False, node
        while q in parents:
            q = parents[q]
            local |= isinstance(q, (ast.FunctionDef, ast.AsyncFunctionDef))
            type_only |= isinstance(q, ast.If) and "TYPE_CHECKING" in ast.unparse(q.test)
        if type_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write frugalseg.… in full.")
        else:
            names = [node.module or ""]
            if node.module and node.module.startswith("frugalseg"):
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}"[len('frugalseg.'):] in MODULES
                         else node.module for a in node.names]
        for name in names:
            if name == "frugalseg" or name.startswith("frugalseg."):
                found.append((name[len("frugalseg."):] if name != "frugalseg" else "", local, node.lineno))
            else:
                found.append(("!" + name.split(".")[0], local, node.lineno))
    return found


def _violations() -> list[str]:
    bad = []
    for module in sorted(MODULES):
        layer = _layer(module)
        for target, _, line in _imports(module):
            where = f"frugalseg.{module} (line {line})"
            if target.startswith("!"):
                if target[1:] in STAGE_ONLY_EXTERNAL and _package(module) not in {"stages", "cli"}:
                    bad.append(f"{where} imports {target[1:]}: only stages and the CLI may.")
                continue
            tl = _layer(target)
            if tl > layer:
                bad.append(f"{where} imports frugalseg.{target}, a higher layer.")
            elif tl == layer and _package(target) != _package(module) and module != "":  # the root re-exports
                bad.append(f"{where} imports frugalseg.{target}, a sibling package of the same layer.")
    return bad


def test_imports_only_go_down():
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in _imports(m) if not t.startswith("!") and t != m and t in MODULES}
             for m in MODULES}
    # a package's __init__ re-exporting its own modules is not a cycle of the code's structure
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t and m.startswith(t + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(f"frugalseg.{c}" for c in cycle))


def test_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a data module that imported a stage would be reported."""
    fake = tmp_path / "fake.py"
    fake.write_text("from frugalseg.stages.train import train\n")
    monkeypatch.setitem(MODULES, "data.fake", fake)
    assert any("frugalseg.data.fake" in v and "higher layer" in v for v in _violations())
