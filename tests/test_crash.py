"""Crash safety: SIGKILL the daemon at random moments, again and again, and check that nothing
reported durable is lost, seq is never reused, and payload files and rows agree."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import sqlite3
import time
from functools import partial
from pathlib import Path

from tests.helpers import fast_sensor, start_daemon, stop_daemon, wait_for, write_config

KILLS = 20


def _ro(data: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{(data / 'journal.db').as_uri()}?mode=ro", uri=True)


def _snapshot(data: Path) -> dict[int, tuple[str, str, str]]:
    """Every committed record (what the journal has reported written), by seq."""
    if not (data / "journal.db").exists():
        return {}
    conn = _ro(data)
    try:
        rows = conn.execute("SELECT seq, boot_id, ts, body FROM records").fetchall()
    except sqlite3.OperationalError:
        return {}  # the schema is not there yet: killed during the very first start
    finally:
        conn.close()
    return {
        seq: (boot, ts, hashlib.sha256(body.encode()).hexdigest()) for seq, boot, ts, body in rows
    }


def _payload_rows(data: Path) -> dict[str, tuple[int, str]]:
    conn = _ro(data)
    try:
        return {
            sha: (size, state)
            for sha, size, state in conn.execute("SELECT sha256, size, state FROM payloads")
        }
    finally:
        conn.close()


def _payload_files(data: Path) -> dict[str, bytes]:
    root = data / "payloads"
    return {p.name: p.read_bytes() for p in root.glob("??/*") if p.is_file()}


def _starts(log: Path) -> int:
    """How many boots have said `started` in the daemon's log so far. A SIGKILL can cut a line
    in half (and the next boot then continues it), so lines that do not parse are skipped."""
    if not log.exists():
        return 0
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        count += isinstance(event, dict) and event.get("msg") == "started"
    return count


def _started_since(log: Path, before: int) -> bool:
    return _starts(log) > before


def test_repeated_sigkill_loses_nothing_durable(tmp_path: Path) -> None:
    rng = random.Random(20261123)
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml",
        data,
        [
            fast_sensor("a", sample_raw_every=3),
            fast_sensor("b", sample_raw_every=5),
            fast_sensor("c"),
        ],
        journal={"commit_delay": "5ms"},
        appliance={"health_interval": "1s"},
    )
    log = tmp_path / "daemon.log"
    seen: dict[int, tuple[str, str, str]] = {}
    high_water = 0
    for round_no in range(KILLS):
        starts_before = _starts(log)
        proc = start_daemon(config, log)
        try:
            # Kill at random moments: half the rounds during start-up and recovery, half
            # mid-stream. A mid-stream kill is timed from the moment this boot says it started,
            # not from the spawn: a busy machine can take seconds to import and recover, and a
            # kill before that would test start-up again.
            early = rng.random() < 0.5
            if not early:
                wait_for(partial(_started_since, log, starts_before), 60, f"round {round_no} start")
            deadline = time.monotonic() + (
                rng.choice([0.05, 0.3]) if early else rng.uniform(0.3, 1.5)
            )
            while time.monotonic() < deadline:
                seen.update(_snapshot(data))
                time.sleep(0.05)
            seen.update(_snapshot(data))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

        after = _snapshot(data)
        conn = _ro(data) if (data / "journal.db").exists() else None
        if conn is not None:
            try:
                integrity = conn.execute("PRAGMA integrity_check").fetchall()
            except sqlite3.OperationalError:
                integrity = [("ok",)]  # no schema yet
            finally:
                conn.close()
            assert integrity == [("ok",)], f"round {round_no}: {integrity}"
        missing = [seq for seq in seen if seq not in after]
        assert missing == [], f"round {round_no}: durable records lost: {missing[:10]}"
        changed = [seq for seq, ident in seen.items() if after[seq] != ident]
        assert changed == [], f"round {round_no}: seq reused for another record: {changed[:10]}"
        if after:
            # Every new seq is above every seq any earlier boot handed out.
            new = sorted(seq for seq in after if seq not in seen)
            assert all(s > high_water for s in new), f"round {round_no}: seq went backwards"
            high_water = max(high_water, max(after))
        seen.update(after)
        # Invariant at any kill: a payload row is committed only after its file is complete.
        if (data / "journal.db").exists():
            files = _payload_files(data)
            try:
                rows = _payload_rows(data)
            except sqlite3.OperationalError:
                rows = {}
            for sha, (size, state) in rows.items():
                assert state == "present"
                assert sha in files, f"round {round_no}: payload row without file {sha}"
                assert hashlib.sha256(files[sha]).hexdigest() == sha and len(files[sha]) == size

    assert len(seen) > 150, "the daemon barely ran; the test proves little"
    assert len({boot for boot, _, _ in seen.values()}) >= KILLS // 4

    # A final clean run reconciles: orphans from killed payload writes are removed, and files
    # and rows agree exactly once it has stopped.
    starts_before = _starts(log)
    proc = start_daemon(config, log)
    wait_for(lambda: _starts(log) > starts_before, 30, "final start")
    time.sleep(1.0)
    assert stop_daemon(proc) == 0
    files = _payload_files(data)
    rows = _payload_rows(data)
    assert set(files) == set(rows)
    assert all(state == "present" for _, state in rows.values())
    final = _snapshot(data)
    assert all(seq in final and final[seq] == ident for seq, ident in seen.items())
    conn = _ro(data)
    try:
        recoveries = [
            json.loads(b)
            for (b,) in conn.execute("SELECT body FROM records WHERE kind = 'recovery'")
        ]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    # Kills mid-payload leave temp or orphan files; start-up found and counted them.
    assert all(r["payloads"] is not None for r in recoveries)
