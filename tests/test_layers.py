"""The import layers of src/fastif, read from the source (ast): lower layers never import higher ones.

Each top-level module or package of ``fastif`` has a rank; a module may import modules of its own rank or below.
On top of the ranks: the pipeline imports no NLI code, the report computes no influence, and nothing below the
recipes imports the recipes, the applications or the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "fastif"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "config", "files", "fingerprint", "telemetry", "progress"),  # 0 shared plumbing
    ("data", "report", "evaluation", "recall"),  # 1 data; drawing and metrics read results only
    ("model",),  # 2 model adapters (and the frozen-bottom path)
    ("grads", "hvp", "projection"),  # 3 derivatives, projected gradients
    ("solvers", "candidates", "scores"),  # 4 inverse-HVP, kNN, scores
    ("store", "runner", "gradient_store"),  # 5 storage, parallel runs, the gradient store
    ("influence",),  # 6 the facade
    ("checkpoints", "__init__", "callbacks"),  # 7 checkpoint TracIn / ensembles, the public API, the HF callback
    ("pipeline", "applications"),  # 8 end to end, applications
    ("recipes",),  # 9 domains (NLI/MiniLM, tabular)
    ("cli",),  # 10 the command line
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
CORE = (
    "data", "model", "grads", "hvp", "projection", "solvers", "candidates", "scores", "store", "runner",
    "gradient_store", "recall", "influence", "checkpoints",
)  # fmt: skip
INFLUENCE = ("influence", "checkpoints", "solvers", "scores", "grads", "hvp", "runner", "pipeline", "applications")


def _module_name(path: Path) -> list[str]:
    """``fastif.x.y`` of a source file, as a list of parts (``__init__`` names its package)."""
    parts = ["fastif", *path.relative_to(SOURCE).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


MODULES = {".".join(_module_name(path)) for path in SOURCE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every ``fastif`` module that a source file imports (relative imports resolved, lazy ones included);
    ``from package import submodule`` counts as importing the submodule."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path)[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    return {name for name in found if name == "fastif" or name.startswith("fastif.")}


def _top(module: str) -> str:
    """The top-level part of ``fastif.x.y`` (``__init__`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {".".join(_module_name(path)): _imports(path) for path in sorted(SOURCE.rglob("*.py"))}


def _violations(rule) -> list[str]:
    """``importer -> imported`` for every import that ``rule(importer, imported)`` refuses."""
    return sorted(
        f"{importer} -> {imported}"
        for importer, imported_modules in GRAPH.items()
        for imported in imported_modules
        if _top(imported) in RANK and not rule(importer, imported)
    )


def test_the_import_graph_is_read() -> None:
    """The parser sees real edges (so the rules below cannot pass vacuously) and every module has a layer."""
    assert "fastif.solvers" in GRAPH["fastif.influence"] and "fastif.data" in GRAPH["fastif.model.adapter"]
    assert "fastif.pipeline.recipe" in GRAPH["fastif.pipeline.config"]
    assert {_top(module) for module in GRAPH} <= set(RANK)


def test_no_module_imports_a_higher_layer() -> None:
    assert _violations(lambda importer, imported: RANK[_top(imported)] <= RANK[_top(importer)]) == []


@pytest.mark.parametrize("lower", sorted(set(RANK) - {"recipes", "cli"}))
def test_nothing_below_the_recipes_imports_recipes_applications_or_cli(lower: str) -> None:
    refused = {"recipes", "cli"} | ({"applications"} if lower != "applications" else set())
    violations = _violations(lambda importer, imported: _top(importer) != lower or _top(imported) not in refused)
    assert violations == []


def test_the_report_computes_no_influence() -> None:
    violations = _violations(lambda importer, imported: _top(importer) != "report" or _top(imported) not in INFLUENCE)
    assert violations == []


def test_the_pipeline_imports_no_nli_code() -> None:
    def allowed(importer: str, imported: str) -> bool:
        return _top(importer) != "pipeline" or (_top(imported) != "recipes" and "nli" not in imported)

    assert _violations(allowed) == []


def test_the_core_imports_nothing_above_it() -> None:
    ceiling = max(RANK[name] for name in CORE)
    violations = _violations(lambda importer, imported: _top(importer) not in CORE or RANK[_top(imported)] <= ceiling)
    assert violations == []
