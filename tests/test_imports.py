"""The package has no import cycles (GitHub issue 14, item 3).

Every `import d2lora...` counts, at module level or inside a function: a function-local import
that hides a cycle still ties the two modules together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def import_graph(src: Path, package: str = "d2lora") -> dict[str, set[str]]:
    """module -> the package's modules it imports (a submodule import names the deepest module that exists)."""
    modules = {}
    for path in src.rglob("*.py"):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path

    def existing(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target == package or target.startswith(package + "."):
                    found = existing(target)
                    # A package's own __init__ is not a dependency of its submodules for this purpose.
                    if found and found != name and not name.startswith(found + "."):
                        graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph(SRC)
    assert "d2lora.grid" in graph and "d2lora.training.inits" in graph["d2lora.training.run"]
    assert cycles(graph) == []


def test_a_cycle_through_a_function_local_import_is_found(tmp_path):
    package = tmp_path / "d2lora"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from d2lora.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (package / "c.py").write_text("import d2lora.a\n")
    assert cycles(import_graph(tmp_path)) == [["d2lora.a", "d2lora.sub.b"]]


# Imported by Snakemake itself (its config validation reads pandas): not ours to keep out.
ML_LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "lm_eval",
    "safetensors",
    "accelerate",
    "gguf",
    "matplotlib",
    "rouge_score",
)
PARSE_AUDIT = """
import sys
from snakemake.cli import main
try:
    main(["--dry-run", "--quiet", "all", "--cores", "1", "--configfile", sys.argv[1]])
except SystemExit as exit:
    code = exit.code
print(code, " ".join(sorted(name for name in sys.modules if name.split(".")[0] in sys.argv[2].split(","))))
"""


@pytest.mark.parametrize("config", ["config/config.yaml", "config/paper.yaml"])
def test_parsing_the_workflow_imports_no_ml_library(config, tmp_path):
    """Every Snakemake invocation parses the workflow (a dry run, a cluster submission, each job's own
    start): the modules the rules import keep torch and the rest inside the functions that use them."""
    result = subprocess.run(
        [sys.executable, "-c", PARSE_AUDIT, config, ",".join(ML_LIBRARIES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    code, _, loaded = result.stdout.strip().splitlines()[-1].partition(" ")
    assert code in ("0", "None"), result.stdout[-2000:] + result.stderr[-2000:]
    assert loaded == "", f"parsing the workflow imported {loaded}"


def test_function_local_imports_say_why():
    """A function-local import is there to keep a library out of workflow parsing (or out of jobs that
    never need it); the comment above it, or on its line, says which."""
    silent = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    above, line = lines[node.lineno - 2].strip(), lines[node.lineno - 1]
                    if not above.startswith("#") and "#" not in line:
                        silent.append(f"{path.relative_to(SRC)}:{node.lineno}: {line.strip()}")
    assert silent == []
