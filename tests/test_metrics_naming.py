"""Tests that `/metrics`, the appliance's and the receiver's, names its families by Prometheus'
conventions (docs/status-api.md, docs/fleet.md): a counter's samples end in `_total`, a gauge's
never do, every family says what it is, names are snake_case under the component's prefix, a
unit (`_bytes`, `_seconds`) ends the name, and an `_info` gauge is always 1. The exposition is
read both as Prometheus' own parser sees it and line by line: the parser quietly adds `_total`
to a counter sample that lacks it, so it alone cannot catch one."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from receiver import build_receiver_app, serve_receiver
from sync import NewRecord, Priority
from tests.test_web import TOKEN, serve

UNITS = ("bytes", "seconds")
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def naming_problems(text: str, prefix: str) -> list[str]:
    """Every way the exposition `text` breaks the conventions, in words (empty: none)."""
    problems: list[str] = []
    snake = re.compile(rf"^{prefix}_[a-z0-9]+(_[a-z0-9]+)*$")
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        if not snake.match(name):
            problems.append(f"{name}: not snake_case under {prefix}_")
        if not family.documentation.strip():
            problems.append(f"{name}: no HELP")
        if family.type == "gauge" and name.endswith("_total"):
            problems.append(f"{name}: a gauge named _total")
        if family.type not in ("counter", "gauge"):
            problems.append(f"{name}: type {family.type}, not counter or gauge")
        # A counter's creation time comes as a gauge `NAME_created` beside `NAME_total`.
        words = name.removesuffix("_total").removesuffix("_created").split("_")
        for unit in UNITS:
            if unit in words[:-1]:
                problems.append(f"{name}: the unit {unit} is not the name's last word")
        if name.endswith("_info"):
            values = {sample.value for sample in family.samples}
            if family.type != "gauge" or values - {1.0}:
                problems.append(f"{name}: an _info family must be a gauge of 1s")
    # Line by line: what the parser would mend.
    declared: dict[str, str] = {}
    helped: set[str] = set()
    current = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, current, kind = line.split(" ")
            declared[current] = kind
            if kind == "counter" and not current.endswith("_total"):
                problems.append(f"{current}: a counter declared without _total")
        elif line and not line.startswith("#"):
            sample = re.split(r"[{ ]", line, maxsplit=1)[0]
            if sample != current:
                problems.append(f"{sample}: a sample outside its family {current or '(none)'}")
    problems += [f"{name}: no HELP line" for name in declared if name not in helped]
    return problems


def test_the_checker_catches_each_break() -> None:
    good = (
        "# HELP appliance_a_total Things that happened.\n# TYPE appliance_a_total counter\n"
        "appliance_a_total 3.0\n"
        # How prometheus_client's Counter exposes its creation time in this format.
        "# HELP appliance_a_created Things that happened.\n# TYPE appliance_a_created gauge\n"
        "appliance_a_created 1.7e9\n"
        "# HELP appliance_b_bytes Bytes now.\n# TYPE appliance_b_bytes gauge\n"
        "appliance_b_bytes 5.0\n"
    )
    assert naming_problems(good, "appliance") == []
    bad = {
        "a gauge named _total": "# HELP appliance_x_total x\n# TYPE appliance_x_total gauge\n"
        "appliance_x_total 1.0\n",
        "a counter declared without _total": "# HELP appliance_x x\n# TYPE appliance_x counter\n"
        "appliance_x 1.0\n",
        "no HELP": "# TYPE appliance_x gauge\nappliance_x 1.0\n",
        "not snake_case": "# HELP appliance_fooBar x\n# TYPE appliance_fooBar gauge\n"
        "appliance_fooBar 1.0\n",
        "not the name's last word": "# HELP appliance_bytes_saved_total x\n"
        "# TYPE appliance_bytes_saved_total counter\nappliance_bytes_saved_total 1.0\n",
        "gauge of 1s": "# HELP appliance_info x\n# TYPE appliance_info gauge\n"
        'appliance_info{version="1"} 2.0\n',
    }
    for words, text in bad.items():
        found = naming_problems(text, "appliance")
        assert any(words in problem for problem in found), (words, found)
    elsewhere = "# HELP receiver_x x\n# TYPE receiver_x gauge\nreceiver_x 1.0\n"
    assert any("under appliance_" in p for p in naming_problems(elsewhere, "appliance"))


async def test_the_appliance_metrics_follow_the_conventions(tmp_path: Path) -> None:
    async with serve(tmp_path, destination=True) as appliance:
        for n in range(3):
            await appliance.journal.append(
                NewRecord(source="a", kind="reading", priority=Priority.TELEMETRY, body={"v": n})
            )
        async with (
            aiohttp.ClientSession(headers=BEARER) as session,
            session.get(f"{appliance.base}/metrics") as response,
        ):
            assert response.status == 200
            text = await response.text()
    assert naming_problems(text, "appliance") == []
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # The families this test is about are there, with samples, so the check saw them.
    assert families["appliance_records_journalled"].type == "counter"
    assert families["appliance_records_acknowledged"].samples
    assert families["appliance_journal_records"].type == "gauge"
    assert "appliance_records_total" not in text


async def test_the_receiver_metrics_follow_the_conventions(tmp_path: Path) -> None:
    admin = "admin-token-0123456789"
    app = build_receiver_app(tmp_path / "shore", {"ship-1": "token-one"}, admin_tokens=(admin,))
    async with (
        serve_receiver(app, "127.0.0.1", 0) as addresses,
        aiohttp.ClientSession() as session,
    ):
        host, port = addresses[0]
        base = f"http://{host}:{port}"
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 401  # counted as a refusal: a labelled sample to check
        headers = {"Authorization": f"Bearer {admin}"}
        async with session.get(f"{base}/metrics", headers=headers) as response:
            assert response.status == 200
            text = await response.text()
    assert naming_problems(text, "receiver") == []
    assert "receiver_refusals_total{" in text
