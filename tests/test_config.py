"""Config: shipped profiles, the loader's substitutions and overrides, and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import PROFILES, ConfigError, config_schema, parse_config, profile_text
from config.loader import load_config
from config.units import parse_duration, parse_size
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "appliance:\n  id: t-1\n  data_dir: /tmp/x\n"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_shipped_profile_validates(profile: str) -> None:
    cfg = parse_config(profile_text(profile), file=f"{profile}.yaml", environ={})
    assert cfg.appliance.id
    assert cfg.sensors, "a shipped profile without sources shows nothing"


@pytest.mark.parametrize("profile", PROFILES)
def test_config_check_accepts_shipped_profile_files(profile: str) -> None:
    # The profiles name secret files of the machines they are for (/run/secrets/...).
    path = ROOT / "config" / f"{profile}.yaml"
    result = run_cli("config", "check", "--skip-file-checks", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_units() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300
    assert parse_duration("7d") == 7 * 86400
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("20GiB") == 20 * 1024**3
    assert parse_size("10MB") == 10_000_000
    assert parse_size("0") == 0 and parse_duration("30") == 30  # bare numbers: bytes, seconds
    for bad in ("fast", "5 minutes", "-1s", "1y"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_size("lots")


MISTAKES = {
    "unknown key": (
        MINIMAL + "storage:\n  disk_budgit: 1GiB\n",
        "storage.disk_budgit",
        "5:3",
        "unknown key 'disk_budgit' (did you mean 'disk_budget'?)",
    ),
    "wrong type": (
        MINIMAL + "journal:\n  commit_records: many\n",
        "journal.commit_records",
        "5:19",
        "must be an integer",
    ),
    "bad duration": (
        MINIMAL + "storage:\n  keep_synced: a week\n",
        "storage.keep_synced",
        "5:16",
        "invalid duration",
    ),
    "bad size": (
        MINIMAL + "storage:\n  disk_budget: 20 gigs\n",
        "storage.disk_budget",
        "5:16",
        "invalid size",
    ),
    "missing secret file": (
        MINIMAL.replace("id: t-1", "id: '${file:/nonexistent/secret-id}'"),
        "appliance.id",
        "2:7",
        "cannot read secret file",
    ),
    "unknown source type": (
        MINIMAL + "sensors:\n  - name: a\n    type: modbuss\n",
        "sensors[0].type",
        "6:11",
        "unknown type 'modbuss' (did you mean 'modbus'?)",
    ),
    "missing required key": (
        "appliance:\n  id: boat-1\n",
        "appliance.data_dir",
        "1:1",
        "required key is missing",
    ),
    "nested error in a list": (
        MINIMAL
        + "sensors:\n  - name: a\n    type: simulated\n    channels:\n"
        + "      - {name: v, signal: vibration}\n    faults:\n      - {kind: stuck, channel: nope}\n",
        "sensors[0].faults[0].channel",
        "10:32",
        "fault 'stuck': no channel 'nope' in this source; its channels are v",
    ),
    "repeated zone name": (
        MINIMAL
        + "cameras:\n  - name: gate\n    url: builtin:vtest\n    zones:\n"
        + "      - {name: quay, polygon: [[0, 0], [1, 0], [1, 1]]}\n"
        + "      - {name: quay, polygon: [[0, 0], [0, 1], [1, 1]]}\n",
        "cameras[0].zones[1].name",
        "9:16",
        "two zones are named 'quay'",
    ),
    "anomaly quantile replaced": (
        MINIMAL
        + "sensors:\n  - name: a\n    type: simulated\n    channels:\n"
        + "      - {name: v, signal: vibration}\n    anomaly: {quantile: 0.99}\n",
        "sensors[0].anomaly",
        "9:5",
        "anomaly.quantile was replaced by false_alarms_per_day",
    ),
    "unknown temporal feature": (
        MINIMAL
        + "sensors:\n  - name: a\n    type: simulated\n    channels:\n"
        + "      - {name: v, signal: vibration}\n    anomaly: {temporal: [delta, trend]}\n",
        "sensors[0].anomaly.temporal[1]",
        "9:33",
        "must be one of delta or residual, not 'trend'",
    ),
    "unset variable": (
        MINIMAL.replace("/tmp/x", "${NOT_SET_ANYWHERE}"),
        "appliance.data_dir",
        "3:13",
        "NOT_SET_ANYWHERE is not set",
    ),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_typical_mistakes_exit_2_naming_key_line_and_column(name: str, tmp_path: Path) -> None:
    text, key, where, fragment = MISTAKES[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("config", "check", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{path}:{where}: {key}: " in result.stderr, result.stderr
    assert fragment in result.stderr


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(MINIMAL + "sensors: [\n  - oops: {\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 2
    assert "not valid YAML" in result.stderr
    assert f"{path}:" in result.stderr


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("config", "check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr


def test_variables_defaults_and_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "id.secret"
    secret.write_text("from-secret\n")
    text = (
        "appliance:\n  id: '${file:id.secret}'\n  data_dir: ${BASE}/data\n"
        "storage:\n  disk_budget: ${BUDGET:-2GiB}\n"
    )
    cfg = parse_config(text, environ={"BASE": "/srv"}, base_dir=tmp_path)
    assert cfg.appliance.id == "from-secret"
    assert cfg.appliance.data_dir == Path("/srv/data")
    assert cfg.storage.disk_budget == 2 * 1024**3


def test_environment_overrides(tmp_path: Path) -> None:
    cfg = parse_config(
        MINIMAL,
        environ={
            "APPLIANCE_DATA_DIR": "/var/other",
            "APPLIANCE_ID": "override-7",
            "APPLIANCE__STORAGE__DISK_BUDGET": "3GiB",
        },
    )
    assert cfg.appliance.data_dir == Path("/var/other")
    assert cfg.appliance.id == "override-7"
    assert cfg.storage.disk_budget == 3 * 1024**3
    # --data-dir beats the environment.
    cfg = parse_config(MINIMAL, environ={"APPLIANCE_DATA_DIR": "/var/other"}, data_dir="/cli")
    assert cfg.appliance.data_dir == Path("/cli")


def test_bad_override_names_the_variable_path() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL, environ={"APPLIANCE__STORAGE__NOPE": "1"})
    assert "storage.nope" in str(caught.value)


def test_demo_profile_is_the_default() -> None:
    cfg = load_config(None, environ={})
    # No id in the demo profile: each data directory makes its own at first start.
    assert cfg.appliance.id == "auto"


def test_duplicate_source_names_rejected() -> None:
    text = MINIMAL + (
        "sensors:\n  - {name: a, type: csv, path: /x.csv}\n  - {name: a, type: csv, path: /y.csv}\n"
    )
    with pytest.raises(ConfigError, match="two sources are named 'a'") as caught:
        parse_config(text, environ={})
    # At the repeat's own name, not at line 1.
    assert (caught.value.key, caught.value.line) == ("sensors[1].name", 6)


def test_schema_command_prints_json_schema() -> None:
    result = run_cli("config", "schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema == json.loads(json.dumps(config_schema()))
    assert "appliance" in schema["properties"]


def _walk_properties(
    schema: dict[str, object], defs: dict[str, object], path: str, out: list[str]
) -> None:
    if "$ref" in schema:
        schema = defs[str(schema["$ref"]).split("/")[-1]]  # type: ignore[assignment]
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):  # type: ignore[attr-defined]
            _walk_properties(sub, defs, path, out)
    if "items" in schema:
        _walk_properties(schema["items"], defs, f"{path}[]", out)  # type: ignore[arg-type]
    for name, prop in schema.get("properties", {}).items():  # type: ignore[attr-defined]
        if not prop.get("description"):
            out.append(f"{path}.{name}")
        _walk_properties(prop, defs, f"{path}.{name}", out)


def test_every_config_field_is_described() -> None:
    schema = config_schema()
    undescribed: list[str] = []
    _walk_properties(schema, schema.get("$defs", {}), "", undescribed)
    assert undescribed == []
