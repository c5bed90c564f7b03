"""The test suite's layout, read from the source tree with `ast` (nothing is imported, so
it runs in well under a second): every module of server/, shadow/ and adapters/ that
holds logic is imported by at least one file under tests/, so its tests can be found by
grepping for it; the few tested only through another module, the CLI or a running server
are listed in COVERED_ELSEWHERE with where. And no two test files share a name, so a failure's
file name says which test it is.

Unit tests are named after the module they test (tests/unit/test_<package>_<module>.py),
chart tests test_chart_*.py, integration tests after what they run."""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "shadow", "adapters")

# Modules with logic that no file under tests/ imports, each with where it is tested.
COVERED_ELSEWHERE: dict[str, str] = {
    "adapters.diagnose.weights": "the streaming weight pass over two real checkpoints: run through adapters.diagnose.run "
                                 "on SmolLM2's bug kinds and controls in tests/adapters/test_diagnose.py",
    "adapters.diagnose.render": "diagnose's text and HTML report: checked through `shadowserve diagnose` (its text, "
                                "--json, the HTML page in headless chromium) in tests/adapters/test_diagnose_cli.py",
    "server.verify.html": "verify's HTML page (matplotlib figures): opened in headless chromium by "
                          "tests/integration/test_verify_report.py; its tables come from server/verify/text.py, unit-tested",
    "server.serving.completion": "the /v1/completions handler: its flow is the shared handler's (unit-tested on ChatHandler); "
                                 "its own parts (prompt batches, echo, prompt log-probs) run over HTTP on real engines in "
                                 "tests/integration/test_prompt_scoring.py, test_openai_conformance.py, test_openai_client.py",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_stub(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A body of only a docstring, `...`, `pass` or `raise NotImplementedError` (a Protocol's
    signature, an abstract method): no logic to test."""
    for statement in function.body:
        if isinstance(statement, ast.Pass):
            continue
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring or `...`
        if isinstance(statement, ast.Raise) and "NotImplementedError" in ast.unparse(statement):
            continue
        return False
    return True


def has_logic(tree: ast.Module) -> bool:
    """Defines a function, or a class with a method, that does something."""
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_stub(node) for node in ast.walk(tree))


@cache
def source_modules() -> dict[str, Path]:
    """Every module of the packages that holds logic, by dotted name (a package by its
    __init__.py)."""
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
            if has_logic(ast.parse(path.read_text(encoding="utf-8"), str(path)))}


def imported_names(tree: ast.Module) -> set[str]:
    """The dotted names an import statement anywhere in `tree` may bring in: `import a.b`
    gives a.b; `from a.b import c` gives a.b and a.b.c (c may be a module)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def files_under_tests() -> list[Path]:
    return sorted(p for p in (ROOT / "tests").rglob("*.py") if "__pycache__" not in p.parts)


@cache
def imported_by_tests() -> frozenset[str]:
    names: set[str] = set()
    for path in files_under_tests():
        names |= imported_names(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return frozenset(names)


def test_every_module_with_logic_is_imported_by_a_test():
    modules, imported = source_modules(), imported_by_tests()
    untested = sorted(set(modules) - imported - set(COVERED_ELSEWHERE))
    assert not untested, (
        f"no file under tests/ imports {untested}: add tests/unit/test_<package>_<module>.py for each, or, if it is "
        "tested only through another module, the CLI or a server, list it in COVERED_ELSEWHERE with where")


def test_the_allow_list_is_current():
    """An entry whose module is gone, holds no logic or is now imported by a test comes out;
    every entry says where the module is tested."""
    modules, imported = source_modules(), imported_by_tests()
    stale = {name: "no such module with logic" if name not in modules else "imported by a test now"
             for name in COVERED_ELSEWHERE if name not in modules or name in imported}
    assert not stale, f"remove from COVERED_ELSEWHERE: {stale}"
    assert all("tests/" in reason for reason in COVERED_ELSEWHERE.values())


def test_no_two_test_files_share_a_name():
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in files_under_tests():
        if path.name.startswith("test_"):
            by_name[path.name].append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not shared, f"test files that share a name (name each after what it tests): {shared}"


def test_no_test_module_imports_another():
    """What tests share lives in helper modules (tests/fakes.py, tests/scorers.py, tests/helm/chart.py, ...):
    a test module is found by its name, and running one never runs another's imports."""
    importing = {}
    for path in files_under_tests():
        tests = {name for name in imported_names(ast.parse(path.read_text(encoding="utf-8"), str(path)))
                 if name.startswith("tests.") and name.split(".")[-1].startswith("test_") and name.count(".") >= 2
                 and (ROOT / Path(*name.split("."))).with_suffix(".py").exists()}
        if tests:
            importing[str(path.relative_to(ROOT))] = sorted(tests)
    assert not importing, f"move what these share into a helper module: {importing}"


def test_the_checks_see_what_they_should():
    """The parsing itself: a Protocol's stubs are not logic, `from pkg import module` counts
    as importing the module, and the walk finds this very file."""
    stub = ast.parse("class P:\n    def f(self) -> int:\n        '''doc'''\n        ...\n")
    real = ast.parse("class P:\n    def f(self) -> int:\n        return 1\n")
    assert not has_logic(stub) and has_logic(real)
    assert imported_names(ast.parse("from adapters import tensor_parallel\nimport shadow.verdict\n")) == {
        "adapters", "adapters.tensor_parallel", "shadow.verdict"}
    assert module_name(ROOT / "server" / "serving" / "__init__.py") == "server.serving"
    assert Path(__file__).resolve() in files_under_tests()
    assert "shadow.verdict" in source_modules()
