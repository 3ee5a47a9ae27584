"""Tests of the example Grafana dashboard (docs/grafana/appliance-dashboard.json) and alerting
rules (docs/prometheus/appliance-alerts.yml): they load, have the shape Grafana and Prometheus
read, and every metric they name is one the appliance's live `/metrics` exposes, so a rename
cannot leave them graphing nothing; `promtool check rules` accepts the rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.helpers import component_missing
from tests.test_web import TOKEN, serve

DOCS = Path(__file__).resolve().parent.parent / "docs"
DASHBOARD = DOCS / "grafana" / "appliance-dashboard.json"
ALERTS = DOCS / "prometheus" / "appliance-alerts.yml"
METRIC_NAME = re.compile(r"\bappliance_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    assert 36 <= doc["schemaVersion"] <= 41
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    panels: list[dict[str, Any]] = doc["panels"]
    assert panels
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids)
    exprs: list[str] = []
    for panel in panels:
        assert panel["title"] and panel["type"] in ("timeseries", "stat"), panel
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], f"{panel['title']}: no target"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: a target without expr"
            assert target["refId"]
            exprs.append(target["expr"])
    exprs += [variable["query"]["query"] for variable in doc["templating"]["list"]]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    rules: list[dict[str, Any]] = []
    for group in doc["groups"]:
        assert group["name"] and group["rules"], group
        for rule in group["rules"]:
            assert rule["alert"] and str(rule["expr"]).strip(), rule
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"].strip(), rule["alert"]
            rules.append(rule)
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names)
    return rules


async def exposed_names(tmp_path: Path) -> set[str]:
    """Every metric name the live `/metrics` declares or samples (a counter declared without
    samples yet counts: its family is there)."""
    async with (
        serve(tmp_path, destination=True) as appliance,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session,
        session.get(f"{appliance.base}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    names: set[str] = set()
    histograms: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names.add(name)
            if kind == "histogram":
                histograms.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    names |= {h + suffix for h in histograms for suffix in HISTOGRAM_SUFFIXES}
    return names


def test_the_dashboard_and_the_rules_have_their_shape() -> None:
    exprs = dashboard_exprs()
    rules = alert_rules()
    # What the issue asks them to show and watch.
    graphed = "\n".join(exprs)
    for name in (
        "rate(appliance_records_journalled_total[",
        "appliance_records_acknowledged_total",
        "appliance_sync_backlog_records",
        "appliance_sync_backlog_bytes",
        "appliance_sync_backlog_age_seconds",
        "appliance_disk_used_bytes",
        "appliance_disk_budget_bytes",
        "appliance_evictions_total",
        "appliance_drops_total",
        "appliance_source_up",
        "appliance_alarms_active",
    ):
        assert name in graphed.replace('{instance=~"$instance"}', ""), name
    watched = "\n".join(str(rule["expr"]) for rule in rules)
    for name in (
        "appliance_sync_backlog_age_seconds",
        "appliance_disk_used_bytes",
        "appliance_source_up",
        "appliance_sync_refused",
        "appliance_journal_integrity",
    ):
        assert name in watched, name


async def test_every_metric_they_name_is_exposed(tmp_path: Path) -> None:
    exposed = await exposed_names(tmp_path)
    used = {
        (where, name)
        for where, exprs in (
            ("dashboard", dashboard_exprs()),
            ("rules", [str(rule["expr"]) for rule in alert_rules()]),
        )
        for expr in exprs
        for name in METRIC_NAME.findall(expr)
    }
    assert len(used) > 10
    missing = sorted(f"{where}: {name}" for where, name in used if name not in exposed)
    assert missing == []


def test_promtool_accepts_the_rules() -> None:
    """Prometheus' own checker (Debian's `prometheus` package, which `make test` installs)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        component_missing("promtool (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
