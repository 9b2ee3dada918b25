"""The layering: the wings `lum`, `feature_store`, `ranker` never import each other, `contracts` imports none of
them, and no two modules import each other, directly or around a loop.

Every import counts: at the top of a module and inside functions (an import moved into a function still makes
a loop, it only postpones it). The modules are read with `ast`, none is imported.

A module's edges go to the modules it names: `import a.b`, `from a.b import c` -> `a.b.c` when that is a module,
else `a.b` (a name defined in `a/b/__init__.py`). The parent packages Python imports on the way are not edges:
a package's `__init__` importing its own submodules, which import each other, is fine. A submodule that imports
a name from its own package's `__init__` while that `__init__` imports it back is a real loop and is found.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contracts", "lum", "feature_store", "ranker", "pipelines")
WINGS = ("lum", "feature_store", "ranker")
# what contracts/ may import besides the standard library and itself (settings.py validates with pydantic)
CONTRACTS_THIRD_PARTY = {"numpy", "pyarrow", "pydantic"}

# Loops known when this test was written, in code being rewritten elsewhere. Each entry is one loop, as the set
# of its modules. Remove an entry once its loop is gone; the test fails on a listed loop that no longer exists.
KNOWN_CYCLES: list[frozenset[str]] = [
    # (none left: pipelines.cli <-> pipelines.cli.run was removed by the config redesign)
]

# The layers inside `pipelines`, top first (docs/design.md): a module imports only its own layer and those below.
# cli/ is the `lum` command and serve.py the service it starts; run/ orchestrates a run folder (its config names
# the report's settings, and it writes the report); report/ reads what the steps wrote; steps/ are the walk's
# steps; data/ the event contract, sources and splits; paths.py the run folder's layout, beneath everything.
PIPELINES_LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipelines.cli",),
    ("pipelines.serve", "pipelines.run"),
    ("pipelines.report",),
    ("pipelines.steps",),
    ("pipelines.data",),
    ("pipelines.paths", "pipelines"),
)


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: dict[str, list[int]] = field(default_factory=dict)  # imported name -> line numbers


def _modules() -> dict[str, Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            out[name] = Module(name, path, is_package)
    return out


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of a `from ... import` (relative imports resolved against the module's package)."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _read_imports(module: Module) -> None:
    tree = ast.parse(module.path.read_text(), filename=str(module.path))
    for node in ast.walk(tree):  # every level: top, functions, methods, if-blocks
        if isinstance(node, ast.Import):
            for alias in node.names:
                module.imports.setdefault(alias.name, []).append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                # `from a import b` names a.b if that is a module; resolved in _graph, where the modules are known
                module.imports.setdefault(f"{base}\0{alias.name}", []).append(node.lineno)


def _target(imported: str, modules: dict[str, Module]) -> str | None:
    """The project module an import names, or None for the standard library and third-party packages."""
    base, _, name = imported.partition("\0")
    candidates = [f"{base}.{name}", base] if name else [base]
    for candidate in candidates:
        while candidate:
            if candidate in modules:
                return candidate
            candidate = candidate.rpartition(".")[0]
    return None


def _top_level(imported: str) -> str:
    return imported.partition("\0")[0].split(".")[0]


def _graph() -> tuple[dict[str, Module], dict[str, dict[str, list[int]]]]:
    modules = _modules()
    edges: dict[str, dict[str, list[int]]] = {}
    for module in modules.values():
        _read_imports(module)
        edges[module.name] = {}
        for imported, lines in module.imports.items():
            target = _target(imported, modules)
            if target is not None and target != module.name:
                edges[module.name].setdefault(target, []).extend(lines)
    return modules, edges


def _strongly_connected(edges: dict[str, dict[str, list[int]]]) -> list[frozenset[str]]:
    """Tarjan's algorithm, iterative; the components of more than one module (no module imports itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[frozenset[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def _describe(component: frozenset[str], edges: dict[str, dict[str, list[int]]], modules: dict[str, Module]) -> str:
    lines = []
    for source in sorted(component):
        for target in sorted(set(edges[source]) & component):
            where = modules[source].path.relative_to(ROOT)
            lines.append(f"    {source} -> {target}  ({where}, line {', '.join(map(str, sorted(set(edges[source][target]))))})")
    return "\n".join(lines)


def test_the_wings_import_only_contracts_and_contracts_imports_no_wing():
    modules, _ = _graph()
    problems = []
    for module in modules.values():
        package = module.name.split(".")[0]
        if package not in (*WINGS, "contracts"):
            continue
        forbidden = {"lum", "feature_store", "ranker", "pipelines", "benchmarks", "tests"} - {package}
        if package == "contracts":
            forbidden |= set(WINGS)
        for imported, lines in module.imports.items():
            top = _top_level(imported)
            if not top:  # a relative import inside the package itself
                continue
            where = f"{module.path.relative_to(ROOT)}:{lines[0]}"
            if top in forbidden:
                problems.append(f"{where}: {module.name} imports {imported.replace(chr(0), '.')}")
            elif package == "contracts" and top != "contracts" and top not in sys.stdlib_module_names and top not in CONTRACTS_THIRD_PARTY:
                problems.append(f"{where}: contracts may use the standard library, {', '.join(sorted(CONTRACTS_THIRD_PARTY))} only, not {top}")
    assert not problems, "layering broken (the wings meet only through contracts/ and data files):\n" + "\n".join(problems)


def _layer(name: str) -> int | None:
    """The index in PIPELINES_LAYERS of a pipelines module (0 = top), by its longest listed prefix; None if unlisted."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for layer, prefixes in enumerate(PIPELINES_LAYERS):
        for prefix in prefixes:
            # `pipelines` itself (its __init__) by exact name only: a new top-level module must be given a layer
            inside = "." in prefix and name.startswith(prefix + ".")
            if (name == prefix or inside) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer)
    return None if best is None else best[1]


def _upward_imports(modules: dict[str, Module], edges: dict[str, dict[str, list[int]]]) -> list[str]:
    """Each import inside `pipelines` that runs up PIPELINES_LAYERS, and each pipelines module no layer lists."""
    problems = []
    for source, targets in sorted(edges.items()):
        if source.split(".")[0] != "pipelines":
            continue
        if _layer(source) is None:
            problems.append(f"{modules[source].path.relative_to(ROOT)}: {source} is in no layer of PIPELINES_LAYERS")
            continue
        for target, lines in sorted(targets.items()):
            if target.split(".")[0] == "pipelines" and _layer(target) is not None and _layer(target) < _layer(source):
                where = f"{modules[source].path.relative_to(ROOT)}:{min(lines)}"
                problems.append(f"{where}: {source} imports {target}, a layer above it")
    return problems


def test_pipelines_imports_run_down_its_layers():
    modules, edges = _graph()
    problems = _upward_imports(modules, edges)
    assert not problems, "imports up the layers of pipelines/ (move the shared piece down):\n" + "\n".join(problems)


def test_the_layer_check_finds_the_old_upward_imports(tmp_path, monkeypatch):
    """The two upward imports this check was written against (the report importing the run config, a step
    importing the report's retrieval A/B), rebuilt in a scratch tree, are both found; the downward ones are not."""
    for name in PACKAGES:
        (tmp_path / name).mkdir()
    for folder in ("cli", "run", "report", "steps", "data"):
        (tmp_path / "pipelines" / folder).mkdir()
        (tmp_path / "pipelines" / folder / "__init__.py").write_text("")
    files = {
        "pipelines/run/config.py": "from pipelines.report.spec import ReportConfig\n",  # down: fine
        "pipelines/report/spec.py": "from pipelines.data import contract\n",
        "pipelines/report/for_run.py": "from pipelines.run.config import RunConfig\n",  # up
        "pipelines/report/ab_retrieval.py": "",
        "pipelines/steps/retrieval.py": "def f():\n    from pipelines.report.ab_retrieval import retrieval_ab\n",  # up
        "pipelines/data/contract.py": "",
        "pipelines/paths.py": "",
    }
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules, edges = _graph()
    problems = _upward_imports(modules, edges)
    assert problems == [
        "pipelines/report/for_run.py:1: pipelines.report.for_run imports pipelines.run.config, a layer above it",
        "pipelines/steps/retrieval.py:2: pipelines.steps.retrieval imports pipelines.report.ab_retrieval, a layer above it",
    ]
    (tmp_path / "pipelines" / "extra.py").write_text("")
    modules, edges = _graph()
    assert "pipelines/extra.py: pipelines.extra is in no layer of PIPELINES_LAYERS" in _upward_imports(modules, edges)


def test_no_import_cycles():
    modules, edges = _graph()
    cycles = _strongly_connected(edges)
    unknown = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not unknown, "import cycles (move the shared piece to a module both import at the top, or to contracts/):\n" + "\n\n".join(
        _describe(c, edges, modules) for c in unknown
    )
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"these allowed cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_the_graph_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The checker itself: relative, function-level and `from package import submodule` imports make edges and
    a loop through them is found, while a package's __init__ importing its submodules is not a loop."""
    package = tmp_path / "lum"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from lum import a\n")
    (package / "a.py").write_text("from lum.sub import b\n")  # lum.a -> lum.sub.b (a submodule, not the package)
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")  # relative, inside a function
    (package / "c.py").write_text("import lum.a\nfrom lum import x\n")  # lum.c -> lum.a, and -> lum (a name of its __init__)
    for name in PACKAGES[1:]:
        if name != "lum":
            (tmp_path / name).mkdir()
    (tmp_path / "contracts").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules, edges = _graph()
    assert edges["lum.a"] == {"lum.sub.b": [1]} and edges["lum.sub.b"] == {"lum.c": [2]}
    assert edges["lum.c"] == {"lum.a": [1], "lum": [2]}
    assert _strongly_connected(edges) == [frozenset({"lum", "lum.a", "lum.sub.b", "lum.c"})]
    (package / "c.py").write_text("import lum.a\n")  # now the __init__ -> submodule edge closes no loop
    modules, edges = _graph()
    assert _strongly_connected(edges) == [frozenset({"lum.a", "lum.sub.b", "lum.c"})]
    (package / "sub" / "b.py").write_text("")
    modules, edges = _graph()
    assert _strongly_connected(edges) == []
