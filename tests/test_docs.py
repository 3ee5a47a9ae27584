"""The docs cover every CLI command and option and every config key, and the README's first lines
are the two commands a newcomer needs."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import build_parser
from config.reference import reference

ROOT = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, prefix: str) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    found.update(_commands(sub, f"{prefix} {name}"))
                else:
                    found[f"{prefix} {name}"] = sub
    return found


def test_every_command_and_option_is_documented() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    sections = {s.split("\n", 1)[0].strip(): s for s in text.split("\n## ")[1:]}
    commands = _commands(build_parser(), "appliance")
    assert set(commands) <= set(sections), f"undocumented: {set(commands) - set(sections)}"
    for command, parser in commands.items():
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in sections[command], f"{command}: {option} undocumented"


def test_configuration_reference_is_current() -> None:
    current = (ROOT / "docs" / "configuration-reference.md").read_text()
    assert current == reference(), (
        "run: python -m config.reference > docs/configuration-reference.md"
    )


def test_readme_starts_with_make_run_and_make_test() -> None:
    lines = [
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("make ")
    ]
    assert lines[:2] and lines[0].startswith("make run") and lines[1].startswith("make test")
