"""The `appliance` command's basics: `--version`, `export --kind` taking only the kinds the
appliance journals (one list, appliance/status/kinds.py, held against every stage and the docs),
and the quick commands (`--help`, `status`, `export`) starting without the heavy libraries."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.status.health import app_version
from appliance.status.kinds import KIND_NAMES, check_kind
from tests.helpers import ROOT, cli_env, fast_sensor, run_cli, write_config

# The packages whose code journals records (receiver/ keeps what others journalled).
JOURNALLING = ("appliance", "sensors", "inference", "sync")

# What only running the pipeline (or a model command, or the receiver) needs. Each costs from
# tens of milliseconds (aiohttp, sqlite-utils) to over a second (onnxruntime, scikit-learn).
HEAVY = (
    "numpy",
    "cv2",
    "onnxruntime",
    "onnx",
    "sklearn",
    "aiohttp",
    "sqlite_utils",
    "botocore",
    "aiobotocore",
    "asyncpg",
    "cryptography",
    "aiomqtt",
    "pymodbus",
    "asyncua",
    "serial_asyncio",
    "prometheus_client",
    "tenacity",
)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config whose data directory holds a journal (readings, limits, samples, lifecycle)."""
    tmp = tmp_path_factory.mktemp("journal")
    config = write_config(
        tmp / "c.yaml",
        tmp / "data",
        [fast_sensor("a", duration="1s", pace="fast", sample_raw_every=4)],
    )
    result = run_cli("replay", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return config


# ---------------------------------------------------------------------------------- --version


def test_version_prints_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"appliance {app_version()}"
    assert app_version() != "0+unknown"  # the installed package's own, not the fallback


# ----------------------------------------------------------------------------- export --kind


def test_export_refuses_an_unknown_kind_naming_the_kinds(replayed: Path) -> None:
    # Before: `export --kind nonsense` printed nothing and exited 0, like a kind with no records.
    result = run_cli("export", "-c", str(replayed), "--kind", "nonsense")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "unknown kind 'nonsense'" in result.stderr
    assert all(kind in result.stderr for kind in KIND_NAMES)
    typo = run_cli("export", "-c", str(replayed), "--kind", "readings")
    assert typo.returncode == 2 and "did you mean reading?" in typo.stderr


def test_export_takes_every_known_kind(replayed: Path) -> None:
    limits = run_cli("export", "-c", str(replayed), "--kind", "limit")
    assert limits.returncode == 0, limits.stderr
    records = [json.loads(line) for line in limits.stdout.splitlines()]
    assert records and {r["kind"] for r in records} == {"limit"}
    # A kind this journal has no records of is still a kind: nothing printed, exit 0.
    none = run_cli("export", "-c", str(replayed), "--kind", "zone_entry")
    assert none.returncode == 0 and none.stdout == ""


def test_export_help_and_the_docs_list_every_kind() -> None:
    help_text = " ".join(run_cli("export", "--help").stdout.split())
    assert ", ".join(KIND_NAMES) in help_text
    docs = (ROOT / "docs" / "cli.md").read_text()
    section = docs.split("\n## appliance export\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip() for line in section.splitlines()]
    table = {row.split("|")[1].strip().strip("`") for row in rows if row.startswith("| `")}
    assert table == set(KIND_NAMES), f"docs/cli.md's kinds differ: {table ^ set(KIND_NAMES)}"


def journalled_kinds(roots: list[Path]) -> tuple[set[str], list[str]]:
    """Every kind a `NewRecord(...)` under `roots` journals, and the calls whose kind cannot be
    read: a literal, or a module-level `*_KIND` constant (also when a helper of that module
    takes it as a parameter and passes it on)."""
    kinds: set[str] = set()
    unreadable: list[str] = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            constants = {
                target.id: node.value.value
                for node in tree.body
                if isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                for target in node.targets
                if isinstance(target, ast.Name) and target.id.endswith("_KIND")
            }
            kinds.update(constants.values())
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name != "NewRecord":
                    continue
                kind = next((k.value for k in node.keywords if k.arg == "kind"), None)
                if kind is None and len(node.args) > 1:
                    kind = node.args[1]
                if isinstance(kind, ast.Constant) and isinstance(kind.value, str):
                    kinds.add(kind.value)
                elif not (isinstance(kind, ast.Name) and constants):
                    unreadable.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return kinds, unreadable


def test_every_kind_a_stage_journals_is_listed() -> None:
    kinds, unreadable = journalled_kinds([ROOT / package for package in JOURNALLING])
    assert not unreadable, (
        f"NewRecord calls whose kind this test cannot read (use a literal or a *_KIND "
        f"constant): {unreadable}"
    )
    missing = kinds - set(KIND_NAMES)
    assert not missing, f"journalled but not in appliance/status/kinds.py: {sorted(missing)}"
    stale = set(KIND_NAMES) - kinds
    assert not stale, f"listed in appliance/status/kinds.py but journalled nowhere: {stale}"


def test_the_kind_scanner_sees_a_new_kind(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "new.py").write_text(
        "ALARM_KIND = 'alarm'\n"
        "def a(j, kind):\n"
        "    j.append(NewRecord(source='x', kind='brand_new', priority=1, body={}))\n"
        "    j.append(NewRecord(source='x', kind=kind, priority=1, body={}))\n"
    )
    (stage / "odd.py").write_text("def b(j, k):\n    j.append(NewRecord('x', k.name, 1, {}))\n")
    kinds, unreadable = journalled_kinds([stage])
    assert kinds == {"alarm", "brand_new"}
    assert unreadable == ["stage/odd.py:2"]


def test_check_kind_answers_in_the_products_words() -> None:
    assert check_kind("reading") == "reading"
    with pytest.raises(
        ValueError, match=r"'telemetry'; telemetry is a priority, not a kind \(kinds: "
    ):
        check_kind("telemetry")
    with pytest.raises(ValueError, match=r"unknown kind 'zone' \(kinds: reading, limit, "):
        check_kind("zone")


# ------------------------------------------------------------------- the quick commands' imports


def loaded_packages(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the command with `-X importtime`; the top-level packages it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "appliance", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return result, names


@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["--version"],
        ["status"],
        ["status", "--json"],
        ["export"],
        ["export", "--kind", "limit", "--format", "csv"],
    ],
    ids=" ".join,
)
def test_quick_commands_start_without_the_heavy_libraries(
    replayed: Path, command: list[str]
) -> None:
    # Before: every command imported the daemon's whole world (numpy, OpenCV, aiohttp, the S3
    # and PostgreSQL clients) and took 1-4 s before doing anything.
    args = command if command[0].startswith("-") else [*command, "-c", str(replayed)]
    result, packages = loaded_packages(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "appliance" in packages  # the import log was read
    heavy = sorted(packages & set(HEAVY))
    assert not heavy, f"`appliance {' '.join(command)}` imports {heavy}"
