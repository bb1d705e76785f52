"""The house rules, checked: data flows one way through the package's layer folders, and a
run directory's file names are spelled in one place (RunDir)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fashion_cnn"
# Lowest first; a module may import from its own layer and the layers before it. The ground
# floor (errors, fileio, perf, devices, catalog) serves every layer; the package root and __main__
# sit on top, beside the CLI.
LAYERS = ["ground", "data", "models", "training", "analysis", "apps", "cli", "top"]
GROUND = {"errors", "fileio", "perf", "devices", "catalog"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "top"
    return "ground" if parts[1] in GROUND else parts[1]


def imports_of(module: str) -> set[str]:
    """The package modules `module` imports (at the top or inside functions)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod; `from pkg.mod import name` imports pkg.mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def test_every_module_is_in_a_known_layer():
    assert {layer_of(m) for m in MODULES} <= set(LAYERS)
    assert len(MODULES) > 30  # the walk found the package


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
              for m in sorted(MODULES) for t in sorted(imports_of(m))
              if not (m == "fashion_cnn" or t.startswith(m + "."))  # a package's own parts
              and LAYERS.index(layer_of(t)) > LAYERS.index(layer_of(m))]
    assert upward == []


def test_no_import_cycles():
    graph = {m: {t for t in imports_of(m)
                 # a package's __init__ re-exporting its own parts is not a cycle
                 if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
             for m in MODULES}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


RUN_DIR_NAMES = ["config.toml", "metrics.json", "history.csv", "model.safetensors",
                 "state.safetensors", "state.json", "checkpoints", "plots"]


def test_run_directory_file_names_are_spelled_only_in_rundir():
    quoted = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in RUN_DIR_NAMES))
    found = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
             for path in PACKAGE.rglob("*.py") if path.name != "rundir.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if quoted.search(line) and "add_parser" not in line]  # `fashion-cnn plots`
    assert found == []


def test_the_package_root_exports_every_public_name_lazily():
    """`import fashion_cnn` imports nothing heavy (the CLI's start-up runs inside its Ctrl-C
    handler); each public name resolves to the object of the module the root names."""
    code = ("import sys, fashion_cnn as fc; heavy = {'torch', 'numpy', 'matplotlib'} & set(sys.modules); "
            "assert not heavy, heavy; "
            "missing = [n for n in fc.__all__ if not hasattr(fc, n)]; assert not missing, missing; "
            "assert fc.__version__")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
