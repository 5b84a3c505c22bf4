"""The package's shape: imports only point down the data flow, no cycles, dependencies' private
parts only in ``compat/``, run-folder file names only in ``runfolder.py``.

Every import counts, function-local ones included (they hide cycles as well as any other).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mergekit_evolve"
DEPENDENCIES = ("mergekit", "optuna", "lm_eval")
# lower numbers are lower layers; an import may point to its own layer or below
LAYERS = {
    "compat": 0, "runfolder": 0, "prepared": 0,
    "methods": 1,
    "recipe": 2,
    "merge": 3, "evaluate": 3,
    "samplers": 4,
    "study": 5,
    "report": 6,
    "publish": 7,
    "preflight": 8, "pipeline": 8,
    "cli": 9, "commands": 9, "__main__": 9,
}
SIBLINGS = {frozenset({"merge", "evaluate"})}  # same layer, but neither may import the other
# (importer, imported) pairs allowed to point up, each with its reason; keep it empty
ALLOWED_UPWARD: set[tuple[str, str]] = set()
RUN_FILES = {"run.json", "recipe.yml", "study.db", "examples.db", "trials.jsonl", "archives.json", "report.json",
             "pareto.json", "stages.json", "mergekit_config.yml", "best", "best.partial", "history.png", "pareto.png",
             "adapter"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if "gradio_template" in rel.parts:  # the Space's own app: runs on the Hub, not part of the package's graph
            continue
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


MODULES = modules()


def imports(name: str, tree: ast.Module) -> set[str]:
    """The package modules ``name`` imports, anywhere in its body."""
    found = set()
    package = name if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {name: imports(name, tree) for name, tree in MODULES.items()}


def test_every_module_has_a_layer():
    assert {part(m) for m in MODULES} - {"__init__"} <= set(LAYERS)


def test_imports_point_down_the_layers():
    upward = []
    for importer, targets in GRAPH.items():
        for target in targets:
            a, b = part(importer), part(target)
            if a == "__init__" or b == "__init__" or (importer, target) in ALLOWED_UPWARD:
                continue
            if LAYERS[b] > LAYERS[a] or frozenset({a, b}) in SIBLINGS:
                upward.append(f"{importer} -> {target}")
    assert not upward, "imports against the layers (compat/runfolder < methods < recipe < merge|evaluate < samplers " \
                       "< study < report < publish < pipeline < cli/commands):\n" + "\n".join(upward)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def _dependency_classes(module: str) -> dict[str, tuple[list[type], set[str]]]:
    """Classes of ``module`` that subclass mergekit, Optuna or lm-eval classes -> those bases, and
    the names this package's own classes in their MRO define (methods, attributes set on self)."""
    mod = importlib.import_module(module)
    out = {}
    for cls_name, cls in vars(mod).items():
        if not (inspect.isclass(cls) and cls.__module__ == module):
            continue
        bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in DEPENDENCIES]
        if not bases:
            continue
        own: set[str] = set()
        for ours in (c for c in cls.__mro__ if c.__module__.startswith("mergekit_evolve")):
            tree = ast.parse(textwrap.dedent(inspect.getsource(ours)))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    own.add(node.name)
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                for target in targets:
                    if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                            and target.value.id == "self"):
                        own.add(target.attr)
                    elif isinstance(target, ast.Name):
                        own.add(target.id)
        out[cls_name] = (bases, own)
    return out


def _own_private_names() -> set[str]:
    """The private names this package defines itself (methods, attributes set on self), which its
    classes may use on their other instances."""
    own = set()
    for tree in MODULES.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_"):
                own.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                own.add(node.attr)
    return own


OWN_PRIVATE = _own_private_names()
STDLIB_PUBLIC = {("os", "_exit")}  # documented public API despite the underscore


def private_uses(name: str, tree: ast.Module) -> list[str]:
    """Private names of the dependencies that ``name`` imports, reads or overrides."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in DEPENDENCIES:
            if any(p.startswith("_") for p in node.module.split(".")) or any(
                    a.name.startswith("_") for a in node.names):
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in DEPENDENCIES and any(p.startswith("_") for p in a.name.split(".")):
                    found.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue  # checked against the classes' dependency bases below
            if node.attr in OWN_PRIVATE or (isinstance(owner, ast.Name) and (owner.id, node.attr) in STDLIB_PUBLIC):
                continue
            found.append(f"line {node.lineno}: ._{node.attr[1:]} on {ast.unparse(owner)}")
    classes = _dependency_classes(name) if any(isinstance(n, ast.ClassDef) for n in ast.walk(tree)) else {}
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name in classes):
        bases, own = classes[cls.name]
        for node in ast.walk(cls):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.startswith("__"):
                if any(hasattr(base, node.name) for base in bases):  # overrides a private hook
                    found.append(f"line {node.lineno}: {cls.name} overrides {node.name} of {bases[0].__name__}")
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in ("self", "cls") and node.attr.startswith("_")
                  and not node.attr.startswith("__") and node.attr not in own):
                found.append(f"line {node.lineno}: {cls.name} reads {node.attr} of {bases[0].__name__}")
    return found


def test_private_parts_of_dependencies_only_in_compat():
    offenders = {name: uses for name, tree in MODULES.items()
                 if not name.startswith("mergekit_evolve.compat") and (uses := private_uses(name, tree))}
    assert not offenders, "dependencies' private names outside compat/:\n" + "\n".join(
        f"{name}: {use}" for name, uses in offenders.items() for use in uses)


def test_the_checks_see_a_private_use():
    """The private-name check is not vacuous: it flags each kind of use it looks for."""
    source = ("from optuna.storages._heartbeat import BaseHeartbeat\n"
              "def f(study):\n    return study._storage\n")
    assert len(private_uses("mergekit_evolve.runfolder", ast.parse(source))) == 2
    with pytest.raises(AssertionError):
        GRAPH["mergekit_evolve.runfolder"] = {"mergekit_evolve.pipeline"}
        try:
            test_imports_point_down_the_layers()
        finally:
            GRAPH["mergekit_evolve.runfolder"] = imports("mergekit_evolve.runfolder",
                                                         MODULES["mergekit_evolve.runfolder"])


def test_run_folder_names_only_in_runfolder():
    found = []
    for name, tree in MODULES.items():
        if name == "mergekit_evolve.runfolder":
            continue
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in RUN_FILES or node.value.rsplit("/", 1)[-1] in RUN_FILES - {"best"}:
                    found.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not found, "run-folder file names outside runfolder.py (use RunFolder):\n" + "\n".join(found)


def test_the_architecture_page_names_every_module():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    files = {f"`{p.name}`" for p in PACKAGE.rglob("*.py")
             if p.name != "__init__.py" and "gradio_template" not in p.parts}
    missing = sorted(files - {word.rstrip(",;:.)") for word in page.split()})
    assert not missing, f"docs/architecture.md does not mention {missing}"
