"""SIGKILL of the appliance mid-sync: the daemon ships to the reference receiver through the fault
proxy and is killed at random moments; in the end the receiver holds every record exactly once,
every payload byte-identical, and the journal's cursors agree with it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from receiver import build_receiver_app, serve_receiver
from tests.faultproxy import FaultProxy
from tests.helpers import fast_sensor, start_daemon, status_json, write_config

KILLS = 10


def _rows(db: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.timeout(300)
async def test_sigkill_mid_sync_still_exactly_once(tmp_path: Path) -> None:
    rng = random.Random(11)
    data, rdata = tmp_path / "data", tmp_path / "receiver"
    (tmp_path / "token").write_text("t0ken\n")
    app = build_receiver_app(rdata, {"test-01": "t0ken"})
    async with (
        serve_receiver(app, "127.0.0.1", 0) as bound,
        FaultProxy("127.0.0.1", bound[0][1]) as proxy,
    ):
        config = write_config(
            tmp_path / "c.yaml",
            data,
            [fast_sensor("a", sample_raw_every=2, sample_rate=8000), fast_sensor("b")],
            sync={
                "interval": "1s",
                "probe_interval": "200ms",
                "retry_max": "1s",
                "batch_records": 20,
                "chunk_size": "64KiB",
                "destinations": [
                    {
                        "name": "shore",
                        "type": "http",
                        "url": proxy.url_for(),
                        "token_file": str(tmp_path / "token"),
                        "timeout": "2s",
                    }
                ],
            },
        )
        log = tmp_path / "daemon.log"
        for _ in range(KILLS):
            proc = start_daemon(config, log)
            await asyncio.sleep(rng.uniform(0.8, 2.0))
            fault = rng.choice(["cut", "stall", "trickle", "none"])
            if fault == "cut":
                proxy.cut_after(rng.randint(200, 60_000), rng.choice(["upstream", "downstream"]))
            elif fault == "stall":
                proxy.stall(True)
            elif fault == "trickle":
                proxy.rate_limit(32 * 1024)
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            proxy.cut_all()
            proxy.clear()
        # A last clean run: it drains what is left; SIGTERM ships the rest in its final attempt.
        proc = start_daemon(config, log)
        for _ in range(200):
            await asyncio.sleep(0.2)
            report = await asyncio.to_thread(status_json, config)
            shore = report["destinations"]["shore"]
            if (
                report["daemon"].get("running")
                and shore["backlog_records"] < 20
                and not shore["payloads_waiting"]
            ):
                break
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    journal_db, receiver_db = data / "journal.db", rdata / "receiver.db"
    journalled = {int(s): str(b) for s, b in _rows(journal_db, "SELECT seq, body FROM records")}
    received = {
        int(s): str(line) for s, line in _rows(receiver_db, "SELECT seq, line FROM records")
    }
    assert set(received) == set(journalled), "records lost or invented on the way"
    assert all(json.loads(received[s])["body"] == json.loads(journalled[s]) for s in journalled)
    for (sha,) in _rows(journal_db, "SELECT sha256 FROM payloads"):
        copy = rdata / "payloads" / "test-01" / str(sha)
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha
    cursors = dict(
        _rows(journal_db, "SELECT priority, acked_seq FROM cursors WHERE destination = 'shore'")
    )
    newest = dict(_rows(journal_db, "SELECT priority, MAX(seq) FROM records GROUP BY priority"))
    assert cursors == newest
