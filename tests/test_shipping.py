"""The daemon ships to a directory destination: everything journalled arrives once, payloads
byte-identical, and status shows the destination's backlog."""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
from pathlib import Path

from tests.helpers import (
    fast_sensor,
    start_daemon,
    status_json,
    stop_daemon,
    wait_for,
    write_config,
)


def test_daemon_ships_everything_to_a_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml",
        data,
        [fast_sensor("a", sample_raw_every=3), fast_sensor("b")],
        sync={
            "interval": "1s",
            "destinations": [{"name": "usb", "type": "directory", "path": "outbox"}],
        },
    )
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(
            lambda: (
                (data / "journal.db").exists()
                and status_json(config)["destinations"]["usb"]["reachable"] is True
                and status_json(config)["records"]["by_kind"].get("sample", 0) >= 3
            ),
            30,
            "shipping to start",
        )
        report = status_json(config)
        usb = report["destinations"]["usb"]
        assert set(usb["backlog"]) == {"alert", "event", "sample", "telemetry"}
        assert usb["last_success"] is not None
    finally:
        assert stop_daemon(proc) == 0
    outbox = data / "outbox"
    shipped: dict[int, dict[str, object]] = {}
    for manifest_path in outbox.glob("records/test-01/*/*/*.manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        body = (manifest_path.parent / manifest["file"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == manifest["sha256"]
        for line in gzip.decompress(body).splitlines():
            record = json.loads(line)
            assert record["seq"] not in shipped, "a record was shipped twice"
            shipped[record["seq"]] = record
    conn = sqlite3.connect(f"{(data / 'journal.db').as_uri()}?mode=ro", uri=True)
    try:
        journalled = {seq: body for seq, body in conn.execute("SELECT seq, body FROM records")}
        payloads = [sha for (sha,) in conn.execute("SELECT sha256 FROM payloads")]
        waiting = conn.execute("SELECT COUNT(*) FROM payload_outbox").fetchone()[0]
    finally:
        conn.close()
    # The final attempt at stop shipped everything, the stop record included.
    assert set(shipped) == set(journalled)
    assert all(json.loads(journalled[s]) == shipped[s]["body"] for s in journalled)
    assert waiting == 0 and payloads
    # One journal, in the layout: records/APPLIANCE/JOURNAL/PRIORITY/..., payloads likewise.
    (journal_id,) = {p.relative_to(outbox).parts[2] for p in outbox.glob("records/*/*/*/*.gz")}
    assert journal_id == status_json(config)["journal_id"]
    for sha in payloads:
        copy = outbox / "payloads" / "test-01" / journal_id / sha[:2] / sha
        original = data / "payloads" / sha[:2] / sha
        assert copy.read_bytes() == original.read_bytes()
    assert status_json(config)["destinations"]["usb"]["backlog_records"] == 0


def test_the_daemon_drains_again_every_sync_interval(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml",
        data,
        [fast_sensor("a")],
        sync={
            "interval": "1s",
            "destinations": [{"name": "usb", "type": "directory", "path": "outbox"}],
        },
    )
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        successes: set[str] = set()

        def drained_three_times() -> bool:
            if not (data / "journal.db").exists():
                return False
            usb = status_json(config)["destinations"].get("usb", {})
            if usb.get("last_success"):
                successes.add(usb["last_success"])
            return len(successes) >= 3

        # The source writes ~20 records a second; each interval's drain ships them.
        wait_for(drained_three_times, 30, "three interval drains")
    finally:
        assert stop_daemon(proc) == 0
