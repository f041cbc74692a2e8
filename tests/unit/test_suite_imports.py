"""Collecting the suite stays cheap: every pytest-xdist process imports every test module it collects, so a package
imported at a module's top level costs each process its import (torch alone 2 s of CPU) even where no test of that
module runs there. The modules that are not all ``e2e`` (``suite_split._real_module``), and the helpers they import,
import the heavy packages inside the tests that need them."""

from __future__ import annotations

import ast
from pathlib import Path

from suite_split import _real_module

TESTS = Path(__file__).resolve().parents[1]
#: Packages whose import takes a second or more of CPU (with what they import).
HEAVY = {"torch", "diffusers", "transformers", "openai", "moto", "boto3", "ray"}


def _top_level_imports(path: Path) -> set[str]:
    """The modules ``path`` imports when it is imported: its top-level ``import`` and ``from`` statements and
    ``pytest.importorskip`` calls (also those inside a top-level ``if``/``try``), not those in functions or classes."""
    found: set[str] = set()
    pending = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Expr | ast.Assign) and (name := _importorskip(node.value)):
            found.add(name)
        elif isinstance(node, ast.If | ast.Try):
            pending.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            pending.extend(statement for handler in getattr(node, "handlers", []) for statement in handler.body)
    return found


def _importorskip(value: ast.expr) -> str | None:
    """The module a ``pytest.importorskip("NAME")`` call imports, or None for anything else."""
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "importorskip":
        first = value.args[0] if value.args else None
        return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
    return None


def _local(name: str, near: Path) -> Path | None:
    """The test helper module ``name`` is, when it is one (beside ``near`` or in tests/)."""
    for folder in (near.parent, TESTS):
        candidate = folder / f"{name.split('.')[0]}.py"
        if candidate.is_file():
            return candidate
    return None


def heavy_imports(path: Path, seen: set[Path] | None = None) -> dict[str, str]:
    """The heavy packages that importing ``path`` imports, each with the module that imports it (``path`` or a test
    helper it imports, followed)."""
    seen = set() if seen is None else seen
    seen.add(path)
    found: dict[str, str] = {}
    for name in _top_level_imports(path):
        if name.split(".")[0] in HEAVY:
            found.setdefault(name.split(".")[0], path.name)
        elif (helper := _local(name, path)) is not None and helper not in seen:
            found = {**heavy_imports(helper, seen), **found}
    return found


def test_modules_not_all_e2e_import_no_heavy_package_when_collected():
    modules = [path for path in sorted(TESTS.rglob("test_*.py")) if not _real_module(path)]
    assert len(modules) > 40
    offenders = {path.relative_to(TESTS).as_posix(): found for path in modules if (found := heavy_imports(path))}
    assert not offenders, f"import these inside the tests that need them: {offenders}"


def test_the_check_follows_helpers_and_top_level_blocks(tmp_path):
    (tmp_path / "helper_fakes.py").write_text("import json\ntry:\n    import torch\nexcept ImportError:\n    pass\n")
    (tmp_path / "test_a.py").write_text("import pytest\nfrom helper_fakes import thing\n\ndef test():\n    import openai\n")
    (tmp_path / "test_b.py").write_text("if True:\n    from ray import serve\nimport transformers.models\n")
    (tmp_path / "test_c.py").write_text('import pytest\nboto3 = pytest.importorskip("boto3")\npytest.importorskip("moto")\n')
    assert heavy_imports(tmp_path / "test_a.py") == {"torch": "helper_fakes.py"}
    assert heavy_imports(tmp_path / "test_b.py") == {"ray": "test_b.py", "transformers": "test_b.py"}
    assert heavy_imports(tmp_path / "test_c.py") == {"boto3": "test_c.py", "moto": "test_c.py"}
