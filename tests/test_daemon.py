"""The daemon end to end, in a subprocess: graceful stop, replay, restart budgets, status, export."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from tests.helpers import (
    fast_sensor,
    log_events,
    run_cli,
    start_daemon,
    status_json,
    stop_daemon,
    wait_for,
    write_config,
)


def _journal_rows(data_dir: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(f"{(data_dir / 'journal.db').as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_sigterm_stops_cleanly_with_the_journal_flushed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml", data, [fast_sensor("a"), fast_sensor("b", sample_raw_every=4)]
    )
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        wait_for(
            lambda: (
                (data / "journal.db").exists()
                and status_json(config)["records"]["by_kind"].get("reading", 0) > 20
            ),
            30,
            "readings",
        )
        report = status_json(config)
        assert report["daemon"]["running"] is True
        assert report["daemon"]["state"] == "ok"
        started = time.monotonic()
        assert stop_daemon(proc) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    events = log_events(log)
    assert [e["msg"] for e in events if e["msg"] in ("started", "stopped cleanly")] == [
        "started",
        "stopped cleanly",
    ]
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in events)
    assert _journal_rows(data, "PRAGMA integrity_check") == [("ok",)]
    lifecycle = _journal_rows(
        data, "SELECT body FROM records WHERE kind = 'lifecycle' ORDER BY seq"
    )
    assert [json.loads(str(b[0]))["event"] for b in lifecycle] == ["started", "stopped"]
    # The WAL was checkpointed and truncated on the way out.
    wal = data / "journal.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert status_json(config)["daemon"]["running"] is False


def test_status_and_export_work_while_the_daemon_runs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(tmp_path / "c.yaml", data, [fast_sensor("a", sample_raw_every=2)])
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(
            lambda: (
                (data / "journal.db").exists()
                and status_json(config)["records"]["by_kind"].get("sample", 0) >= 3
            ),
            30,
            "samples",
        )
        report = status_json(config)
        assert report["records"]["by_priority"]["telemetry"] > 0
        assert (
            report["unsynced"]["telemetry"]["records"]
            == report["records"]["by_priority"]["telemetry"]
        )
        assert report["oldest_unsynced_age_s"] is not None
        assert report["disk"]["payload_files"] >= 3
        assert report["disk"]["budget_bytes"] > 0

        # The first heartbeat is written before the sources start; wait for one that has them.
        wait_for(
            lambda: status_json(config)["daemon"].get("sources", {}).get("a"), 15, "a heartbeat"
        )
        text = run_cli("status", "-c", str(config))
        assert text.returncode == 0
        assert "daemon running" in text.stdout and "telemetry" in text.stdout
        # Each source on a line of its own: its state, how fresh its data is, reconnects.
        source_lines = [line for line in text.stdout.splitlines() if line.startswith("source ")]
        assert source_lines and "running" in source_lines[0] and "last reading" in source_lines[0]

        ndjson = run_cli("export", "-c", str(config))
        assert ndjson.returncode == 0, ndjson.stderr
        lines = [json.loads(line) for line in ndjson.stdout.splitlines()]
        assert lines
        for line in lines:
            assert {"seq", "ts", "source", "kind", "priority", "body"} <= set(line)
        seqs = [line["seq"] for line in lines]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

        samples = run_cli("export", "-c", str(config), "--kind", "sample")
        sample_lines = [json.loads(line) for line in samples.stdout.splitlines()]
        assert sample_lines and all(
            s["kind"] == "sample" and len(s["payloads"]) == 1 for s in sample_lines
        )

        cutoff = lines[len(lines) // 2]["ts"]
        recent = run_cli("export", "-c", str(config), "--since", cutoff)
        assert all(json.loads(line)["ts"] >= cutoff for line in recent.stdout.splitlines())
        assert 0 < len(recent.stdout.splitlines()) <= len(lines) + 200

        as_csv = run_cli("export", "-c", str(config), "--format", "csv", "--kind", "reading")
        rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
        assert rows and {"seq", "ts", "source", "kind", "priority", "body"} <= set(rows[0])
        assert json.loads(rows[0]["body"])["channels"]["vib"]["rms"] > 0

        bad = run_cli("export", "-c", str(config), "--since", "yesterday-ish")
        assert bad.returncode == 2 and "--since" in bad.stderr
    finally:
        stop_daemon(proc)


def test_data_dir_from_flag_and_environment(tmp_path: Path) -> None:
    data = tmp_path / "elsewhere"
    config = write_config(
        tmp_path / "c.yaml", tmp_path / "unused", [fast_sensor("a", duration="200ms", pace="fast")]
    )
    result = run_cli("replay", "-c", str(config), "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert (data / "journal.db").exists()
    assert not (tmp_path / "unused").exists()
    from tests.helpers import cli_env

    env = cli_env(APPLIANCE_DATA_DIR=str(data))
    status = run_cli("status", "-c", str(config), "--json", env=env)
    assert json.loads(status.stdout)["data_dir"] == str(data)
    missing = run_cli("status", "-c", str(config), "--data-dir", str(tmp_path / "never"))
    assert missing.returncode == 1 and "no journal" in missing.stderr


def test_replay_runs_finite_sources_to_the_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    csv_file = tmp_path / "readings.csv"
    csv_file.write_text(
        "timestamp,temp,vib\n"
        + "".join(f"2026-01-01T00:00:{i:02d}Z,{20 + i * 0.1},{i % 3}\n" for i in range(40))
        + "garbage line\n2026-01-01T00:00:45Z,nan,1\n2026-01-01T00:00:46Z,inf,1\n"
    )
    config = write_config(
        tmp_path / "c.yaml",
        data,
        [
            {"name": "logger", "type": "csv", "path": str(csv_file), "window": "10s"},
            fast_sensor("sim", duration="1s", pace="fast"),
        ],
    )
    started = time.monotonic()
    result = run_cli("replay", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    readings = _journal_rows(
        data, "SELECT source, COUNT(*) FROM records WHERE kind = 'reading' GROUP BY source"
    )
    assert dict(readings) == {"logger": 5, "sim": 20}
    quality = _journal_rows(
        data, "SELECT reason, count FROM quality WHERE source = 'logger' ORDER BY reason"
    )
    assert dict(quality) == {"inf": 1, "nan": 1, "wrong_field_count": 1}
    stopped = _journal_rows(
        data, "SELECT body FROM records WHERE kind = 'lifecycle' ORDER BY seq DESC LIMIT 1"
    )
    assert json.loads(str(stopped[0][0]))["reason"] == "replay_done"


def test_replay_refuses_endless_sources(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "d", [fast_sensor("forever")])
    result = run_cli("replay", "-c", str(config))
    assert result.returncode == 2
    assert "sensors[0].duration" in result.stderr and "never ends" in result.stderr
    live = write_config(
        tmp_path / "live.yaml",
        tmp_path / "d",
        [
            {
                "name": "plc",
                "type": "modbus",
                "host": "127.0.0.1",
                "registers": [{"channel": "v", "address": 0}],
            }
        ],
    )
    result = run_cli("replay", "-c", str(live))
    assert result.returncode == 2
    assert "sensors[0].type" in result.stderr and "live modbus source" in result.stderr


def test_a_crashing_source_is_restarted_within_budget_then_degraded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml",
        data,
        [
            {"name": "vanished", "type": "csv", "path": str(tmp_path / "not-there.csv")},
            fast_sensor("ok"),
        ],
        appliance={"restart_budget": 2, "restart_window": "1m"},
    )
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        report = wait_for(
            lambda: (
                (data / "journal.db").exists()
                and (r := status_json(config))["daemon"].get("state") == "degraded"
                and r
            ),
            30,
            "degraded state",
        )
        assert "component_degraded:source:vanished" in report["daemon"]["reasons"]
        component = report["daemon"]["components"]["source:vanished"]
        assert component["state"] == "degraded" and component["restarts"] == 2
        assert "not-there.csv" in component["last_error"]
        # The healthy source kept running throughout.
        assert report["daemon"]["components"]["source:ok"]["state"] == "running"
        assert proc.poll() is None
    finally:
        assert stop_daemon(proc) == 0
    events = _journal_rows(data, "SELECT body FROM records WHERE kind = 'component' ORDER BY seq")
    assert [json.loads(str(e[0]))["event"] for e in events] == [
        "restarting",
        "restarting",
        "degraded",
    ]
