"""The data flow of DESIGN.md, enforced: each package imports only the packages upstream of it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"config", "sensors", "inference", "sync", "receiver", "appliance"}
# The shore side (`receiver`) sits beside the appliance's data flow: it uses `sync`'s identities
# and file helpers, and only the CLI (appliance), tests and benchmarks import it.
ALLOWED = {
    "config": set(),
    "sensors": {"config"},
    "inference": {"sensors", "config"},
    "sync": {"config"},
    "receiver": {"sync", "config"},
    "appliance": OURS,
}


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


def test_packages_import_along_the_data_flow() -> None:
    violations = []
    for package, allowed in ALLOWED.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"package {package} has no modules"
        for path in files:
            for imported in imported_packages(path) - allowed - {package}:
                violations.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert violations == []


def test_no_import_circle_between_modules_of_a_package() -> None:
    """A module of a package never imports, even lazily, a module that imports it back."""
    edges: dict[str, set[str]] = {}
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            targets: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets.add(node.module)
                elif isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
            edges[name] = {t for t in targets if t.split(".")[0] in OURS and t != name}
    circles = sorted(
        f"{a} <-> {b}"
        for a, targets in edges.items()
        for b in targets
        if a < b
        and a in edges.get(b, set())
        and not a.endswith("__init__")
        and not b.endswith("__init__")
    )
    assert circles == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from sync.journal import Journal\nimport inference.features\n")
    assert imported_packages(bad) == {"sync", "inference"}


def test_every_module_says_what_it_owns() -> None:
    missing = []
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            if path.name == "__main__.py":
                continue
            if not ast.get_docstring(tree):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []
