"""The package's layering (docs/architecture.md): nothing imports upward, no import cycles, and
every relative link in the documentation resolves.

Imports are read from the source with ``ast``, function-level ones included: a cycle cut by an
import inside a function is still a cycle in the design.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "infinitrain"

LAYERS = {
    "layout": 1, "model": 1, "data": 1, "preemption": 1, "integrity": 1, "consolidate": 1,
    "recipe": 2, "model_dir": 2,
    "export": 3, "slurm": 3,
    "inference": 4,
    "evaluation": 5,
    "training": 6,
    "cli": 7,
    "__main__": 8,
}
"""Top-level module or package of infinitrain -> its layer, as docs/architecture.md lists them."""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """infinitrain modules that ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "infinitrain" or base.startswith("infinitrain."):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names
                         if alias.name.startswith("infinitrain"))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (names that are not modules dropped)."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {target for target in imported_modules(path)
                   if target in files and target != name}
            for name, path in files.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_top_level_module_has_a_layer():
    tops = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
            if (path.suffix == ".py" and path.stem != "__init__")
            or (path.is_dir() and (path / "__init__.py").is_file())}
    assert tops == set(LAYERS), "add the new module to LAYERS and to docs/architecture.md"


def test_nothing_imports_upward():
    upward = [f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})"
              for source, targets in graph().items() for target in sorted(targets)
              if layer(source) is not None and layer(target) is not None
              and layer(target) > layer(source)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    imports = graph()
    cycles = []
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(imports[module]):
            if target.startswith(module + "."):
                continue  # a package's __init__ re-exporting its own modules
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(imports):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


DOCS = sorted([REPO / "README.md", REPO / "CHANGELOG.md", *REPO.glob("docs/*.md"),
               *REPO.glob("data/**/README.md"), *REPO.glob("benchmarks/*.md"),
               *REPO.glob("experiments/*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_in_the_documentation_resolve(document):
    missing = [target for target in LINK.findall(document.read_text())
               if not re.match(r"[a-z]+:", target) and not target.startswith("#")
               and not (document.parent / target.split("#")[0]).exists()]
    assert not missing, f"{document.relative_to(REPO)} links to missing files: {missing}"


def test_training_and_the_gpu_benchmark_import_without_the_evaluation_extras():
    """A bare torch + lightning GPU image has no ROUGE, lm-eval, datasets or W&B: training and
    benchmarks/gpu.py must import without them (they once came in through evaluation/__init__)."""
    code = textwrap.dedent("""
        import importlib.abc, importlib.util, sys
        ABSENT = {"rouge_score", "nltk", "lm_eval", "datasets", "wandb", "deepspeed", "flash_attn"}
        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ABSENT:
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, Absent())
        import infinitrain.training
        spec = importlib.util.spec_from_file_location("gpu_benchmark", "benchmarks/gpu.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        print("imported")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]
