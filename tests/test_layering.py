"""The layering rules, read from the source with `ast` so that they stay true as the code grows.

- The registry (`models_registry`) never imports `inference`: inference depends on the registry, not back.
- The networks (`inference/nets`) are torch + timm only: no Django, no registry, nothing else of the site but
  `depthsite.netspecs`, the plain-data table of architecture facts they share with the catalogue.
- torch, timm and torchvision are imported at module level only where a network is built or run; every other
  module imports them inside the function that needs them, so that pages, the API and `models info` never
  pay for them (tests/jobs/test_no_torch.py checks the same from a live process).
- Nothing outside `tests/` imports `tests`: what product code, benchmarks and tests share lives in the product
  (the deterministic weights in `models_registry/detweights.py`; sites in subprocesses, the loopback weight
  mirror, photo and hostile-file builders in `depthsite/testing/`).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("depthsite", "inference", "models_registry", "scripts")
HEAVY = ("torch", "timm", "torchvision")
# Modules allowed to import the heavy packages at module level: the networks and the eager runtime.
HEAVY_AT_TOP = ("inference/nets/", "inference/estimator.py", "inference/runtime/eager.py")


@dataclass(frozen=True)
class Import:
    path: str  # relative to ROOT, with forward slashes
    line: int
    module: str  # the imported module, absolute
    top_level: bool  # at module level (not inside a function or class body)


def _imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    relative = path.relative_to(ROOT).as_posix()
    package = relative.rsplit("/", 1)[0].replace("/", ".")
    found: list[Import] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never executed
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(relative, child.lineno, alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = parts[: len(parts) - (child.level - 1)]
                    module = ".".join([*base, module] if module else base)
                found.append(Import(relative, child.lineno, module, top))
            visit(child, nested)

    visit(tree, True)
    return found


def _sources(*folders: str) -> list[Path]:
    paths: list[Path] = []
    for folder in folders:
        paths.extend(p for p in (ROOT / folder).rglob("*.py") if "migrations" not in p.parts)
    return sorted(paths)


def _all_imports(*folders: str) -> list[Import]:
    return [imp for path in _sources(*folders) for imp in _imports(path)]


def _names(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    # The rules below are only as good as the reader: it must resolve `from ..x import y` and see imports
    # inside functions, or a violation could hide there.
    sample = ROOT / "inference" / "nets" / "__init__.py"
    imports = _imports(sample)
    assert imports and all(not i.module.startswith(".") for i in imports)
    assert any(_names(i.module, "inference.nets") for i in imports)
    lazy = [i for i in _all_imports("models_registry") if not i.top_level]
    assert lazy, "models_registry has function-level imports; the checker must see them"


def test_the_registry_never_imports_inference():
    bad = [f"{i.path}:{i.line} imports {i.module}" for i in _all_imports("models_registry")
           if _names(i.module, "inference")]
    assert bad == []


def test_the_networks_import_only_torch_timm_and_each_other():
    allowed = ("torch", "timm", "numpy", "inference.nets", "depthsite.netspecs", "__future__")
    stdlib = {"math", "dataclasses", "typing", "functools", "collections", "itertools", "warnings", "re",
              "enum", "logging", "threading", "contextlib", "types", "abc", "copy", "operator", "os", "sys"}
    bad = [f"{i.path}:{i.line} imports {i.module}" for i in _all_imports("inference/nets")
           if not _names(i.module, *allowed) and i.module.split(".")[0] not in stdlib]
    assert bad == []


def test_heavy_packages_are_imported_lazily_outside_the_networks():
    bad = [f"{i.path}:{i.line} imports {i.module} at module level" for i in _all_imports(*PRODUCT)
           if i.top_level and _names(i.module, *HEAVY) and not i.path.startswith(HEAVY_AT_TOP)]
    assert bad == []


@pytest.mark.parametrize("folder", [*PRODUCT, "bench"])
def test_the_product_never_imports_the_tests(folder):
    bad = [f"{i.path}:{i.line} imports {i.module}" for i in _all_imports(folder) if _names(i.module, "tests")]
    assert bad == []


def test_the_fetcher_runs_without_django():
    # models_registry.fetch moves bytes only: importing it (and what it imports) loads no part of Django.
    import subprocess
    import sys

    code = "import sys, models_registry.fetch; print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
