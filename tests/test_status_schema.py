"""The status report's contract (appliance/status/schema.py) is one mypy checks: a reader that
uses a field wrongly, or one that is not there, is a type error."""

from __future__ import annotations

from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]

READER = """
from appliance.status.schema import StatusReport


def backlog(report: StatusReport) -> int:
    return sum(d["backlog_records"] for d in report["destinations"].values())


def {name}(report: StatusReport) -> {returns}:
    return {expression}
"""


def check(tmp_path: Path, name: str, returns: str, expression: str) -> str:
    module = tmp_path / f"{name}.py"
    module.write_text(READER.format(name=name, returns=returns, expression=expression))
    out, err, _ = api.run(
        ["--strict", "--no-error-summary", "--cache-dir", str(ROOT / ".mypy_cache"), str(module)]
    )
    return out + err


def test_a_reader_of_a_field_that_is_there_type_checks(tmp_path: Path) -> None:
    assert check(tmp_path, "good", "float | None", 'report["disk"]["used_bytes"] / 2') == ""


def test_a_misspelt_field_is_a_type_error(tmp_path: Path) -> None:
    found = check(tmp_path, "misspelt", "int", 'report["disk"]["used_byte"]')
    assert '"DiskReport" has no key "used_byte"' in found


def test_a_field_used_as_the_wrong_type_is_a_type_error(tmp_path: Path) -> None:
    found = check(tmp_path, "wrong_type", "str", 'report["destinations"]["usb"]["backlog_records"]')
    assert 'Incompatible return value type (got "int", expected "str")' in found
