"""Soaks (marked `soak`; run by `make soak`, not `make test`): hours of running in minutes.

Memory and disk stay bounded however long the daemon runs on a small budget, and the crash
loop of test_crash.py survives hundreds of kills instead of twenty."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import (
    fast_sensor,
    start_daemon,
    status_json,
    stop_daemon,
    wait_for,
    write_config,
)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SOAK_KILLS = int(os.environ.get("SOAK_KILLS", "200"))
BUDGET_MIB = 8


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 300)
def test_memory_and_disk_stay_bounded_on_a_small_budget(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sensors = [fast_sensor(f"s{i}", sample_raw_every=1, sample_rate=20000) for i in range(4)]
    config = write_config(
        tmp_path / "c.yaml",
        data,
        sensors,
        storage={
            "disk_budget": f"{BUDGET_MIB}MiB",
            "min_free": "0",
            "reserve": "0",
            "check_interval": "1s",
        },
    )
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(lambda: (data / "journal.db").exists(), 30, "journal")
        process = psutil.Process(proc.pid)
        time.sleep(min(60.0, SOAK_SECONDS / 5))  # warm-up: caches, first evictions
        baseline_rss = process.memory_info().rss
        worst_rss, worst_used = baseline_rss, 0
        deadline = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < deadline:
            time.sleep(5)
            assert proc.poll() is None, "the daemon died during the soak"
            worst_rss = max(worst_rss, process.memory_info().rss)
            report = status_json(config)
            worst_used = max(worst_used, report["disk"]["used_bytes"])
        report = status_json(config)
        assert report["daemon"]["state"] == "ok", report["daemon"]
        assert report["evictions"], "the budget was never reached; the soak proves nothing"
        # Memory does not grow with the data that went through (allow allocator noise).
        assert worst_rss < baseline_rss * 1.5 + 32 * 1024 * 1024, (baseline_rss, worst_rss)
        # The budget holds (a pass runs every second; one pass of slack).
        assert worst_used < BUDGET_MIB * 1024 * 1024 * 1.25, worst_used
    finally:
        assert stop_daemon(proc, timeout=60) == 0
    conn = sqlite3.connect(f"{(data / 'journal.db').as_uri()}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


@pytest.mark.soak
@pytest.mark.timeout(SOAK_KILLS * 10 + 300)
def test_hundreds_of_sigkills(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml",
        data,
        [fast_sensor("a", sample_raw_every=3), fast_sensor("b")],
        journal={"commit_delay": "5ms"},
    )
    log = tmp_path / "daemon.log"
    seen: dict[int, str] = {}
    for _ in range(SOAK_KILLS):
        proc = start_daemon(config, log)
        time.sleep(0.2 + (len(seen) % 17) / 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if not (data / "journal.db").exists():
            continue
        conn = sqlite3.connect(f"{(data / 'journal.db').as_uri()}?mode=ro", uri=True)
        try:
            rows = dict(conn.execute("SELECT seq, boot_id FROM records").fetchall())
            assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        except sqlite3.OperationalError:
            rows = {}
        finally:
            conn.close()
        assert all(rows.get(seq) == boot for seq, boot in seen.items()), "a durable record was lost"
        seen.update(rows)
    proc = start_daemon(config, log)
    wait_for(lambda: status_json(config)["daemon"].get("running"), 30, "final start")
    assert stop_daemon(proc) == 0
