"""The data flow of DESIGN.md, enforced: each package imports only the packages upstream of it."""

from __future__ import annotations

import ast
import re
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


# The rooms inside `appliance/`, lowest first: a room imports only the rooms below it (and its
# own modules); the modules at `appliance/`'s root (daemon, cli) may import every room.
APPLIANCE_ROOMS = ("runtime", "stages", "models", "status")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports by absolute name, deferred imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def room_of(module: str) -> str | None:
    """The appliance room `module` lives in; None for the root and for other packages."""
    parts = module.split(".")
    if parts[0] != "appliance" or len(parts) < 2 or parts[1] not in APPLIANCE_ROOMS:
        return None
    return parts[1]


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


def test_appliance_rooms_import_only_downward() -> None:
    violations = []
    for room in APPLIANCE_ROOMS:
        files = sorted((ROOT / "appliance" / room).rglob("*.py"))
        assert files, f"room appliance/{room} has no modules"
        allowed = set(APPLIANCE_ROOMS[: APPLIANCE_ROOMS.index(room) + 1])
        for path in files:
            for module in sorted(imported_modules(path)):
                if module.split(".")[0] != "appliance":
                    continue
                target = room_of(module)
                if target not in allowed:
                    where = target or "the root (daemon, cli)"
                    violations.append(f"{path.relative_to(ROOT)} imports {module} ({where})")
    assert violations == []


def test_appliance_root_keeps_only_the_daemon_and_the_command() -> None:
    """New modules go into a room; the root holds what wires the rooms together."""
    root_modules = {p.name for p in (ROOT / "appliance").glob("*.py")}
    assert root_modules == {"__init__.py", "__main__.py", "cli.py", "daemon.py", "syncnow.py"}


def test_the_room_checker_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from appliance.status.web import StatusServer\n")
    assert room_of(next(iter(imported_modules(bad)))) == "status"
    assert room_of("appliance.daemon") is None


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


def test_only_sync_queries_the_journal() -> None:
    """The journal's tables are sync's to query: the appliance reads it through `JournalReader`'s
    methods (sync/reader.py), never with SQL of its own or the reader's connection."""
    found = []
    for package in ("config", "sensors", "inference", "appliance"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            if re.search(r"\bSELECT\b|\.conn\b", text):
                found.append(str(path.relative_to(ROOT)))
    assert found == []


def test_the_identifier_pattern_is_written_once() -> None:
    """Names and versions follow config/names.py everywhere (config, sensors, sync, receiver)."""
    copies = []
    for package in sorted(OURS):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.relative_to(ROOT) != Path("config/names.py") and "{0,63}" in path.read_text():
                copies.append(str(path.relative_to(ROOT)))
    assert copies == []
